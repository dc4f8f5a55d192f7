//! t81: input hardening on a real cluster (etcd, mdserver, one cluster-mode agent):
//! - the device allow-list cannot be bypassed: `..` out of an allowed directory, a
//!   symlinked directory inside one (`*` no longer crosses `/`), and a path that does
//!   not exist outside it are refused with EPERM naming the path, what it resolved to
//!   and the patterns — and the target is never opened (inotify watches it);
//! - clear errors: a member given twice (also under two paths) is refused with EINVAL
//!   before anything is written; a 10 kB array name is "invalid array name" (EINVAL)
//!   quoted short; `create` over a device that holds a member prints its hint once;
//! - absurd counts (`--raid-devices 4294967295`) and a member with a crafted bitmap
//!   header get a clear error at once, and the agent stays up with a flat RSS.

use std::ffi::CString;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::{Duration, Instant};

use mdcluster_tests::cluster::ClusterBuilder;
use mdcluster_tests::standalone::member_files;

const MIB: u64 = 1 << 20;

/// An inotify watch for opens of some files; counts the opens seen so far.
struct OpenWatch {
    fd: i32,
}

impl OpenWatch {
    fn new(paths: &[&Path]) -> OpenWatch {
        // SAFETY: plain syscall; the fd is closed on drop.
        let fd = unsafe { libc::inotify_init1(libc::IN_NONBLOCK | libc::IN_CLOEXEC) };
        assert!(fd >= 0, "inotify_init1");
        for p in paths {
            let c = CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
            // SAFETY: a valid fd and C string.
            let wd = unsafe { libc::inotify_add_watch(fd, c.as_ptr(), libc::IN_OPEN) };
            assert!(wd >= 0, "inotify_add_watch {}", p.display());
        }
        OpenWatch { fd }
    }

    /// Opens seen since the last call.
    fn opens(&self) -> usize {
        let mut n = 0;
        let mut buf = [0u8; 4096];
        loop {
            // SAFETY: reading into a buffer of the given length.
            let r = unsafe { libc::read(self.fd, buf.as_mut_ptr().cast(), buf.len()) };
            if r <= 0 {
                return n;
            }
            let mut off = 0usize;
            while off + 16 <= r as usize {
                let len = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap());
                n += 1;
                off += 16 + len as usize;
            }
        }
    }
}

impl Drop for OpenWatch {
    fn drop(&mut self) {
        // SAFETY: our fd.
        unsafe { libc::close(self.fd) };
    }
}

fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("agent status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// Whether `pid` runs (not gone, not a zombie waiting to be reaped).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("State:"))
            .is_some_and(|st| !st.trim_start().starts_with('Z'))
    })
}

#[test]
fn allow_list_cannot_be_bypassed() {
    let c = ClusterBuilder::new(1)
        .node_args(1, &["--device-allow", "{dir}/ok/*"])
        .start()
        .expect("cluster");
    let dir = std::fs::canonicalize(c.path()).unwrap();
    std::fs::create_dir_all(dir.join("ok")).unwrap();
    std::fs::create_dir_all(dir.join("secretdir")).unwrap();
    let ok = member_files(&dir.join("ok"), "d", 3, 32 * MIB);
    let secret = member_files(&dir, "secret", 1, 32 * MIB).remove(0);
    let hidden = member_files(&dir.join("secretdir"), "s", 1, 32 * MIB).remove(0);
    symlink(dir.join("secretdir"), dir.join("ok/sub")).unwrap();
    let watch = OpenWatch::new(&[&secret, &hidden]);
    let s = |p: &Path| p.display().to_string();
    let ok1 = s(&ok[1]);
    let attempts = [
        (
            format!("{}/ok/../secret0", dir.display()),
            s(&secret),
            "`..` out of the allowed directory",
        ),
        (
            format!("{}/ok/sub/s0", dir.display()),
            s(&hidden),
            "a symlinked directory inside the allowed one (`*` across `/`)",
        ),
    ];
    for (path, target, what) in &attempts {
        eprintln!("--- create --force over {what}: {path}");
        let (rc, err) = c.code(&[
            "--node",
            "node1",
            "create",
            "md1",
            "--level",
            "1",
            "--raid-devices",
            "2",
            "--bitmap",
            "internal",
            "--force",
            "--assume-clean",
            path,
            &ok1,
        ]);
        eprintln!("{err}");
        assert_eq!(rc, 9, "EPERM expected for {what}: {err}");
        assert!(err.contains(path.as_str()), "names the path: {err}");
        assert!(
            err.contains(&format!("resolves to {target}")),
            "names the resolution: {err}"
        );
        assert!(err.contains("/ok/*"), "names the patterns: {err}");
        assert_eq!(watch.opens(), 0, "{what}: the target was opened");
    }

    eprintln!("--- assemble and manage --add go through the same check");
    let (rc, err) = c.code(&["--node", "node1", "assemble", "md1", &attempts[0].0, &ok1]);
    assert_eq!(rc, 9, "{err}");
    c.mdctl_ok(&[
        "--node",
        "node1",
        "create",
        "md0",
        "--level",
        "1",
        "--raid-devices",
        "2",
        "--bitmap",
        "internal",
        "--assume-clean",
        &s(&ok[0]),
        &ok1,
    ]);
    for (path, _, what) in &attempts {
        let (rc, err) = c.code(&["--node", "node1", "manage", "md0", "--add", path]);
        assert_eq!(rc, 9, "manage --add over {what}: {err}");
    }
    assert_eq!(watch.opens(), 0, "a refused target was opened");

    eprintln!("--- an allowed path that resolves inside the allow-list still works");
    let back_in = format!("{}/ok/../ok/d2", dir.display());
    c.mdctl_ok(&["--node", "node1", "manage", "md0", "--add-spare", &back_in]);
    let d = c.mdctl_ok(&["--node", "node1", "detail", "md0"]);
    assert!(d.contains("d2"), "{d}");
}

/// In cluster mode an empty allow-list allows nothing, and the agent says so at start.
#[test]
fn an_empty_allow_list_allows_nothing_in_cluster_mode() {
    let c = ClusterBuilder::new(1)
        .node_args(1, &["--device-allow", ""])
        .start()
        .expect("cluster");
    let dir = std::fs::canonicalize(c.path()).unwrap();
    let m = member_files(&dir, "d", 2, 32 * MIB);
    let watch = OpenWatch::new(&[&m[0], &m[1]]);
    let (rc, err) = c.code(&[
        "--node",
        "node1",
        "create",
        "md0",
        "--level",
        "1",
        "--raid-devices",
        "2",
        "--bitmap",
        "internal",
        m[0].to_str().unwrap(),
        m[1].to_str().unwrap(),
    ]);
    eprintln!("{err}");
    assert_eq!(rc, 9, "{err}");
    assert!(err.contains("allows nothing"), "{err}");
    assert_eq!(watch.opens(), 0, "a member was opened");
    let log = c.agents[0].log_text();
    assert!(log.contains("opens no device at all"), "{log}");
}

#[test]
fn clear_errors_and_bounded_inputs() {
    let c = ClusterBuilder::new(1).start().expect("cluster");
    let dir = std::fs::canonicalize(c.path()).unwrap();
    let m = member_files(&dir, "d", 3, 32 * MIB);
    let s = |p: &Path| p.display().to_string();
    let (d0, d1, d2) = (s(&m[0]), s(&m[1]), s(&m[2]));
    let link = dir.join("d2-link");
    symlink(&m[2], &link).unwrap();
    let create = |name: &str, extra: &[&str], members: &[&str]| {
        let mut args = vec![
            "--node",
            "node1",
            "create",
            name,
            "--level",
            "1",
            "--assume-clean",
        ];
        if !extra.contains(&"--bitmap") {
            args.extend_from_slice(&["--bitmap", "internal"]);
        }
        args.extend_from_slice(extra);
        args.extend_from_slice(members);
        c.code(&args)
    };
    let blank = |p: &Path| {
        let mut b = vec![0u8; 8192];
        use std::os::unix::fs::FileExt;
        std::fs::File::open(p)
            .unwrap()
            .read_exact_at(&mut b, 0)
            .unwrap();
        b.iter().all(|&x| x == 0)
    };

    eprintln!("--- a member given twice, by one path and by two: EINVAL, nothing written");
    for pair in [[d2.as_str(), d2.as_str()], [d2.as_str(), &s(&link)]] {
        let (rc, err) = create("md9", &["--raid-devices", "2", "--force"], &pair);
        eprintln!("{err}");
        assert_eq!(rc, 5, "{err}");
        assert!(err.contains("same device"), "{err}");
        assert!(blank(&m[2]), "d2 was written");
    }

    eprintln!("--- a 10 kB array name: invalid array name, quoted short");
    let long = "x".repeat(10_000);
    let (rc, err) = create(&long, &["--raid-devices", "2"], &[&d0, &d1]);
    eprintln!("{err}");
    assert_eq!(rc, 5, "{err}");
    assert!(err.contains("invalid array name"), "{err}");
    assert!(err.len() < 1000, "the error echoes {} bytes", err.len());

    let pid = c.agents[0].pid().expect("agent pid");
    let rss0 = rss_kib(pid);
    eprintln!("--- absurd counts: refused at once, the agent stays up, RSS flat ({rss0} KiB)");
    for extra in [
        &["--raid-devices", "4294967295"][..],
        &["--raid-devices", "2", "--spare-devices", "4294967294"][..],
        &[
            "--raid-devices",
            "2",
            "--bitmap",
            "clustered",
            "--nodes",
            "4294967295",
        ][..],
    ] {
        let t = Instant::now();
        let (rc, err) = create("md8", extra, &[&d0, &d1]);
        eprintln!("{extra:?}: {rc} {err}");
        assert_eq!(rc, 5, "{extra:?}: {err}");
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    }
    assert!(alive(pid), "the agent died");
    let many: Vec<&str> = std::iter::repeat_n(d0.as_str(), 129).collect();
    let (rc, err) = create("md8", &["--raid-devices", "129"], &many);
    eprintln!("129 members: {rc} {err}");
    assert_eq!(rc, 5, "{err}");
    assert!(err.contains("at most 128"), "{err}");
    assert!(alive(pid), "the agent died");
    let rss1 = rss_kib(pid);
    eprintln!("RSS {rss0} KiB -> {rss1} KiB");
    assert!(
        rss1 < rss0 + 64 * 1024,
        "RSS grew from {rss0} to {rss1} KiB"
    );
    assert!(alive(pid), "the agent died");

    eprintln!("--- create over a device holding a member: the hint once");
    c.mdctl_ok(&[
        "--node",
        "node1",
        "create",
        "md0",
        "--level",
        "1",
        "--raid-devices",
        "2",
        "--bitmap",
        "clustered",
        "--nodes",
        "2",
        "--assume-clean",
        &d0,
        &d1,
    ]);
    c.mdctl_ok(&["--node", "node1", "stop", "md0"]);
    let (rc, err) = create("md7", &["--raid-devices", "2"], &[&d0, &d2]);
    eprintln!("{err}");
    assert_eq!(rc, 4, "{err}");
    assert_eq!(err.matches("zero-superblock").count(), 1, "{err}");

    eprintln!("--- a member with a crafted bitmap header: a clear error at once");
    // The first slot's bitmap superblock sits 4 KiB past the md superblock
    // (bitmap_offset 8 sectors): 2^32-1 nodes, and a sync_size near 2^64 sectors at
    // 512-byte chunks, on both members.
    for p in [&m[0], &m[1]] {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
        let bm = 8192u64;
        f.write_all_at(&(u64::MAX - 7).to_le_bytes(), bm + 40)
            .unwrap();
        f.write_all_at(&512u32.to_le_bytes(), bm + 52).unwrap();
        f.write_all_at(&u32::MAX.to_le_bytes(), bm + 68).unwrap();
        f.sync_all().unwrap();
    }
    let rss0 = rss_kib(pid);
    let t = Instant::now();
    let (rc, err) = c.code(&["--node", "node1", "assemble", "md0", &d1, &d0]);
    eprintln!("{rc} {err}");
    assert_ne!(rc, 0, "{err}");
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    assert!(err.contains("bitmap"), "{err}");
    assert!(alive(pid), "the agent died");
    let rss1 = rss_kib(pid);
    assert!(
        rss1 < rss0 + 64 * 1024,
        "RSS grew from {rss0} to {rss1} KiB"
    );
    assert!(alive(pid), "the agent died");
    // The agent still serves.
    c.mdctl_ok(&["--node", "node1", "mdstat"]);
}
