//! t61: the one-command local cluster, `deploy/local/up.sh` and `down.sh`, as a user
//! runs them (with the binaries of this build and free ports):
//!
//! - up.sh starts etcd, mdserver and two agents, creates the clustered mirror md0,
//!   assembles it on both nodes and shows `mdctl detail`;
//! - up.sh again changes nothing (same processes, md0 not created twice);
//! - the two-node reproducer's checks against that cluster: assemble/stop cycles on
//!   node2, each bounded, with NBD opens refused while stopped and served once assembled;
//!   then `tests/scripts/two-node.sh` itself (3 cycles, its own cluster) beside it;
//! - the README's next step: `nbdfuse` + `losetup` + mkfs.ext4 + mount on node2's export;
//! - down.sh unmounts and detaches that, stops everything, and leaves no process, mount
//!   or loop device behind.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use mdcluster_tests::deploy::deploy_dir;
use mdcluster_tests::etcd::free_port;
use mdcluster_tests::tools::{bin, run_ok, run_timeout, target_dir};

const MARK: &str = "MDCLUSTER_LOCAL_STATE";

struct Local {
    state: tempfile::TempDir,
    env: Vec<(String, String)>,
    url: String,
    down: bool,
}

impl Local {
    fn new() -> Local {
        let state = tempfile::Builder::new()
            .prefix("mdcluster-local")
            .tempdir()
            .unwrap();
        let sport = free_port().unwrap();
        let env = vec![
            ("MDCLUSTER_STATE", state.path().display().to_string()),
            ("MDCLUSTER_BIN_DIR", target_dir().display().to_string()),
            ("ETCD_PORT", free_port().unwrap().to_string()),
            ("ETCD_PEER_PORT", free_port().unwrap().to_string()),
            ("MDSERVER_PORT", sport.to_string()),
            ("AGENT_PORT", free_port().unwrap().to_string()),
            ("METRICS_PORT", free_port().unwrap().to_string()),
            ("AGENT_METRICS_PORT", free_port().unwrap().to_string()),
            ("DISK_SIZE", "64M".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Local {
            state,
            env,
            url: format!("https://127.0.0.1:{sport}"),
            down: false,
        }
    }

    fn path(&self) -> &Path {
        self.state.path()
    }

    fn script(&self, name: &str, args: &[&str]) -> Output {
        run_timeout(
            Command::new(deploy_dir().join("local").join(name))
                .args(args)
                .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str()))),
            Duration::from_secs(300),
        )
    }

    fn script_ok(&self, name: &str) -> String {
        let o = self.script(name, &[]);
        let stdout = String::from_utf8_lossy(&o.stdout).into_owned();
        assert!(
            o.status.success(),
            "{name} failed ({}):\n{stdout}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        stdout
    }

    fn pids(&self) -> Vec<(String, u32)> {
        let mut v: Vec<(String, u32)> = std::fs::read_dir(self.path().join("pids"))
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                let pid = std::fs::read_to_string(e.path())
                    .unwrap()
                    .trim()
                    .parse()
                    .unwrap();
                (name, pid)
            })
            .collect();
        v.sort();
        v
    }

    fn mdctl(&self, args: &[&str]) -> Output {
        run_timeout(
            Command::new(bin("mdctl"))
                .env_remove("MDCTL_INSECURE")
                .arg("--server")
                .arg(&self.url)
                .args(self.admin())
                .args(args),
            Duration::from_secs(60),
        )
    }

    /// The admin certificate up.sh made (its cluster runs mutual TLS).
    fn admin(&self) -> Vec<String> {
        let pki = self.path().join("pki");
        ["ca.crt", "admin.crt", "admin.key"]
            .iter()
            .zip(["--tls-ca", "--tls-cert", "--tls-key"])
            .flat_map(|(f, flag)| [flag.to_owned(), pki.join(f).display().to_string()])
            .collect()
    }

    fn mdctl_ok(&self, args: &[&str]) -> String {
        let o = self.mdctl(args);
        assert!(
            o.status.success(),
            "mdctl {args:?}: {}\n{}",
            o.status,
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }
}

impl Drop for Local {
    fn drop(&mut self) {
        if !self.down {
            let _ = self.script("down.sh", &[]);
        }
    }
}

/// Processes carrying the state directory's mark (what up.sh starts).
fn marked_processes(state: &Path) -> Vec<u32> {
    let want = format!("{MARK}={}", state.display());
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if let Ok(env) = std::fs::read(e.path().join("environ")) {
            if env.split(|b| *b == 0).any(|v| v == want.as_bytes()) {
                out.push(pid);
            }
        }
    }
    out
}

fn mounts_under(state: &Path) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap()
        .lines()
        .filter(|l| l.contains(state.to_str().unwrap()))
        .map(str::to_string)
        .collect()
}

fn loops_under(state: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/sys/block").unwrap().flatten() {
        if let Ok(f) = std::fs::read_to_string(e.path().join("loop/backing_file")) {
            if f.starts_with(state.to_str().unwrap()) {
                out.push(format!("{}: {}", e.file_name().to_string_lossy(), f.trim()));
            }
        }
    }
    out
}

/// nbdfuse on node2's export, killed on drop if down.sh did not end it.
struct Fuse(Option<Child>);

impl Drop for Fuse {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn up_twice_cycles_nbdfuse_losetup_then_down_leaves_nothing() {
    let mut l = Local::new();
    let state: PathBuf = l.path().to_path_buf();

    eprintln!("--- up.sh");
    let t = Instant::now();
    let out = l.script_ok("up.sh");
    eprintln!("up.sh took {:?}", t.elapsed());
    assert!(out.contains("creating md0 on node1"), "{out}");
    assert!(out.contains("made the cluster CA"), "{out}");
    eprintln!("--- mutual TLS by default: plain text gets no answer, the viewer reads only");
    let plain = run_timeout(
        Command::new(bin("mdctl"))
            .args(["--insecure", "--server"])
            .arg(l.url.replacen("https://", "http://", 1))
            .arg("nodes"),
        Duration::from_secs(60),
    );
    // No gRPC answer: unreachable (11) or a broken HTTP/2 exchange (6), nothing printed.
    assert!(
        matches!(plain.status.code(), Some(6 | 11)) && plain.stdout.is_empty(),
        "{plain:?}"
    );
    let pki = state.join("pki");
    let viewer = |args: &[&str]| {
        run_timeout(
            Command::new(bin("mdctl"))
                .env_remove("MDCTL_INSECURE")
                .arg("--server")
                .arg(&l.url)
                .arg("--tls-ca")
                .arg(pki.join("ca.crt"))
                .arg("--tls-cert")
                .arg(pki.join("viewer.crt"))
                .arg("--tls-key")
                .arg(pki.join("viewer.key"))
                .args(args),
            Duration::from_secs(60),
        )
    };
    assert!(viewer(&["nodes"]).status.success());
    assert_eq!(
        viewer(&["--node", "node2", "stop", "md0"]).status.code(),
        Some(9)
    );
    assert!(out.contains("Intent Bitmap : Clustered"), "{out}");
    assert!(out.contains("State : clean"), "{out}");
    let active_rows = out
        .lines()
        .filter(|l| l.trim_start().starts_with("node") && l.contains(" active "))
        .count();
    assert_eq!(active_rows, 2, "md0 active on both nodes in detail:\n{out}");
    let pids = l.pids();
    assert_eq!(
        pids.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["etcd.pid", "mdserver.pid", "node1.pid", "node2.pid"]
    );
    assert_eq!(marked_processes(&state).len(), 4, "{pids:?}");
    eprintln!("--- metrics on: mdserver and node2 answer /metrics");
    let env = |k: &str| {
        l.env
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    for (url, series) in [
        (
            format!("http://127.0.0.1:{}/metrics", env("METRICS_PORT")),
            "mdcluster_server_sessions 2",
        ),
        (
            format!("http://127.0.0.2:{}/metrics", env("AGENT_METRICS_PORT")),
            r#"mdcluster_array_state{array="md0",state="active"} 1"#,
        ),
    ] {
        let m = run_ok(Command::new("curl").args(["-sf", "--max-time", "10", &url]));
        assert!(m.contains(series), "{url}: no {series}:\n{m}");
    }

    eprintln!("--- up.sh again: nothing restarted, md0 not created again");
    let out = l.script_ok("up.sh");
    assert!(out.contains("md0 exists"), "{out}");
    assert!(!out.contains("creating md0"), "{out}");
    assert!(out.contains("md0 is active on node2"), "{out}");
    assert_eq!(l.pids(), pids, "up.sh restarted something");

    eprintln!("--- assemble/stop cycles on node2 while clients open the array");
    let sock = state.join("run/node2/md0.nbd");
    let uri = format!("nbd+unix:///md0?socket={}", sock.display());
    for cycle in 1..=3 {
        let t = Instant::now();
        l.mdctl_ok(&["--node", "node2", "stop", "md0"]);
        let o = run_timeout(
            Command::new("nbdinfo").arg("--size").arg(&uri),
            Duration::from_secs(10),
        );
        assert!(!o.status.success(), "md0 stopped on node2 but opened");
        l.mdctl_ok(&["--node", "node2", "assemble", "md0"]);
        let size = run_ok(Command::new("nbdinfo").arg("--size").arg(&uri));
        assert_eq!(size.trim().parse::<u64>().unwrap() % 4096, 0, "{size}");
        let took = t.elapsed();
        eprintln!("cycle {cycle}: {took:?}");
        assert!(took < Duration::from_secs(8), "cycle {cycle} took {took:?}");
    }
    let mdstat = l.mdctl_ok(&["--node", "node2", "mdstat"]);
    assert!(mdstat.contains("md0 : active raid1"), "{mdstat}");

    eprintln!("--- tests/scripts/two-node.sh beside the local cluster (its own ports)");
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/two-node.sh");
    let o = run_timeout(
        Command::new(&script)
            .env("BIN", target_dir())
            .env("CYCLES", "3"),
        Duration::from_secs(300),
    );
    let so = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success() && so.contains("two-node: OK (3 cycles)"),
        "two-node.sh: {}\n{so}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(l.pids(), pids, "the local cluster was disturbed");
    assert_eq!(marked_processes(&state).len(), 4);

    eprintln!("--- README: nbdfuse + losetup on node2's export, mkfs.ext4, mount");
    let mnt = state.join("mnt/md0");
    std::fs::create_dir_all(&mnt).unwrap();
    let file = mnt.join("disk");
    let mut fuse = Fuse(Some(
        Command::new("nbdfuse")
            .arg(&file)
            .arg("--unix")
            .arg(&sock)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    ));
    wait_until("the nbdfuse file", Duration::from_secs(20), || {
        file.exists()
    });
    let lo = run_ok(Command::new("losetup").arg("-f").arg("--show").arg(&file));
    let lo = lo.trim().to_string();
    run_ok(Command::new("mkfs.ext4").arg("-q").arg(&lo));
    let fs = state.join("mnt/fs");
    std::fs::create_dir_all(&fs).unwrap();
    run_ok(Command::new("mount").arg(&lo).arg(&fs));
    std::fs::write(fs.join("hello"), b"mdcluster").unwrap();
    assert_eq!(mounts_under(&state).len(), 2, "{:?}", mounts_under(&state));
    assert_eq!(loops_under(&state).len(), 1);

    eprintln!("--- down.sh: nothing left");
    let t = Instant::now();
    let out = l.script_ok("down.sh");
    l.down = true;
    eprintln!("down.sh took {:?}:\n{out}", t.elapsed());
    assert!(out.contains(&format!("detaching {lo}")), "{out}");
    for n in ["node1", "node2", "mdserver", "etcd"] {
        assert!(out.contains(&format!("down: {n} stopped")), "{out}");
    }
    assert!(
        !out.contains("killing"),
        "a process had to be killed:\n{out}"
    );
    assert_eq!(mounts_under(&state), Vec::<String>::new());
    assert_eq!(loops_under(&state), Vec::<String>::new());
    assert_eq!(marked_processes(&state), Vec::<u32>::new());
    for (name, pid) in &pids {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                    .is_ok_and(|s| s.contains(") Z ")),
            "{name} (pid {pid}) still runs"
        );
    }
    if let Some(c) = fuse.0.as_mut() {
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.try_wait().unwrap().is_none() {
            assert!(
                Instant::now() < deadline,
                "nbdfuse still runs after down.sh"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        fuse.0 = None;
    }
    // The agents stopped md0 cleanly: the members say so.
    let ex = run_ok(
        Command::new(bin("mdctl"))
            .arg("examine")
            .arg(state.join("disks/disk0")),
    );
    assert!(ex.contains("clean"), "{ex}");

    eprintln!("--- down.sh again is harmless; --purge removes the state");
    let _ = l.script_ok("down.sh");
    let o = l.script("down.sh", &["--purge"]);
    assert!(o.status.success());
    assert!(!state.join("etcd").exists());
}
