//! t70: `mdctl grow --size` of a clustered mirror on a real cluster (etcd, mdserver, two
//! cluster-mode agents) over multi-view storage (each node reaches each member through
//! its own loop device and path), after mdadm's resize tests ("grow --size max: check resync;
//! back: check nosync") run the md-cluster way (token, METADATA_UPDATED,
//! CHANGE_CAPACITY), checked through `mdctl mdstat` on each node, `mdadm --examine`
//! and `-X`, `nbdinfo` and `qemu-io` on both nodes' exports:
//! - created with `--size` half the members; the area past it holds different bytes
//!   on the two members;
//! - `grow --size max` via node2: both nodes show the new size (every bitmap slot,
//!   the unused third one too, covers it), node2 resyncs the new
//!   area while node1 shows `resync=REMOTE`, a grow during that resync is refused
//!   (EBUSY), and afterwards the members' data areas are identical (the stale bytes
//!   were resynced), `mdadm` reads the new size in the superblock and the bitmap;
//! - data written through node1 past the old end reads back through node2;
//! - `grow --size` back to the old size: no resync, both nodes show it, old data intact;
//! - a size no member holds or not a multiple of 4 KiB is refused with what fits.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mdcluster_tests::cluster::ClusterBuilder;
use mdcluster_tests::tools::{key_values, run_ok, value_of, LoopDevice};

/// Bound of every cluster wait here.
const WAIT: Duration = Duration::from_secs(60);
const MIB: u64 = 1 << 20;

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///md0?socket={}", sock.display())
}

fn qemu_io(sock: &Path, cmd: &str) -> String {
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", cmd, &uri(sock)]))
}

fn nbd_size(sock: &Path) -> u64 {
    run_ok(Command::new("nbdinfo").args(["--size", &uri(sock)]))
        .trim()
        .parse()
        .expect("nbdinfo --size")
}

/// `mdadm -X` of a member file (through a read-only loop device: on a plain file mdadm
/// reads a bitmap file, not a member).
fn mdadm_x(member: &Path) -> String {
    let lo = LoopDevice::attach_ro(member);
    run_ok(Command::new("mdadm").arg("-X").arg(&lo.path))
}

fn read_range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut f = std::fs::File::open(path).expect("open member");
    f.seek(SeekFrom::Start(offset)).expect("seek");
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).expect("read member");
    buf
}

#[test]
fn grow_size_to_max_and_back_on_both_nodes() {
    let c = ClusterBuilder::new(2)
        .shared_storage(2, 64 * MIB)
        .start()
        .expect("cluster");
    // On-disk checks read the shared disks; node1 creates through its own paths.
    let m = c.disks(2);
    let n1 = c.members_of(1, 2);
    let ms: Vec<&str> = n1.iter().map(String::as_str).collect();
    let old_kib: u64 = 16 * 1024;
    c.mdctl_ok(&[
        "--node",
        "node1",
        "create",
        "md0",
        "--raid-devices",
        "2",
        "--bitmap",
        "clustered",
        "--nodes",
        "3",
        "--bitmap-chunk",
        "1024",
        "--assume-clean",
        "--size",
        &old_kib.to_string(),
        ms[0],
        ms[1],
    ]);
    c.mdctl_ok(&["--node", "node2", "assemble", "md0"]);
    for n in ["node1", "node2"] {
        c.wait_mdstat(WAIT, n, "16384 blocks", |t| {
            t.contains(&format!("{old_kib} blocks"))
        });
    }
    let ex = run_ok(Command::new("mdadm").arg("--examine").arg(&m[0]));
    let kv = key_values(&ex);
    let data_offset: u64 = value_of(&kv, "Data Offset")
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("Data Offset in mdadm --examine");
    let data = data_offset * 512;
    let max_kib = (64 * MIB - data) / 1024;

    eprintln!("--- data in the old area; stale, different bytes past it on m1 only");
    let (s1, s2) = (c.agents[0].sock("md0"), c.agents[1].sock("md0"));
    qemu_io(&s1, "write -P 0x5a 1M 4M");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&m[1])
            .expect("open m1");
        f.seek(SeekFrom::Start(data + old_kib * 1024))
            .expect("seek");
        f.write_all(&vec![0xa5u8; (20 * MIB) as usize])
            .expect("stale bytes");
        f.sync_all().expect("sync");
    }
    assert_eq!(nbd_size(&s2), old_kib * 1024);

    eprintln!("--- grow --size max via node2: node2 resyncs the new area, node1 REMOTE");
    c.tune(4096);
    let out = c.mdctl(&["--node", "node2", "grow", "md0", "--size", "max"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "grow --size max: {err}");
    assert!(
        err.contains(&format!("{max_kib} KiB")),
        "mdctl says the new size: {err}"
    );
    let deadline = Instant::now() + WAIT;
    loop {
        let t1 = c.mdstat("node1");
        let t2 = c.mdstat("node2");
        for t in [&t1, &t2] {
            assert!(
                t.contains(&format!("{max_kib} blocks")),
                "both nodes show the new size at once:\n{t1}\n{t2}"
            );
        }
        if t2.contains("resync =") && t1.contains("resync=REMOTE") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no resync on node2 with node1 REMOTE within {WAIT:?}:\n{t1}\n{t2}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let (code, err) = c.code(&[
        "--node",
        "node1",
        "grow",
        "md0",
        "--size",
        &old_kib.to_string(),
    ]);
    assert_eq!(
        code, 4,
        "a size change during the resync is refused (EBUSY): {err}"
    );
    c.tune(500_000);
    for n in ["node1", "node2"] {
        c.wait_mdstat(WAIT, n, "resync finished", |t| {
            !t.contains("resync") && !t.contains("PENDING")
        });
    }
    assert_eq!(c.node_status("md0", "node2")["sync"]["last_kind"], "resync");
    assert_eq!(c.node_status("md0", "node1")["sync"]["runs"], 0);
    assert_eq!(
        read_range(&m[0], data, max_kib * 1024),
        read_range(&m[1], data, max_kib * 1024),
        "after the resync of the new area the members' data areas are identical"
    );
    for (n, s) in [("node1", &s1), ("node2", &s2)] {
        assert_eq!(nbd_size(s), max_kib * 1024, "{n}'s export has the new size");
    }
    let ex = run_ok(Command::new("mdadm").arg("--examine").arg(&m[1]));
    let kv = key_values(&ex);
    assert!(
        value_of(&kv, "Array Size").is_some_and(|v| v.starts_with(&format!("{max_kib} KiB"))),
        "mdadm --examine reads the new size: {ex}"
    );
    let x = mdadm_x(&m[0]);
    assert!(
        x.contains(&format!("Sync Size : {max_kib}")),
        "mdadm -X reads the new sync size:\n{x}"
    );
    // Every slot — node1's, node2's and the unused third — covers the new size.
    let bits = format!("Bitmap : {} bits", max_kib.div_ceil(1024));
    assert_eq!(
        x.matches(&bits).count(),
        3,
        "{bits} in all three slots:\n{x}"
    );

    eprintln!("--- written through node1 past the old end, read through node2");
    qemu_io(&s1, "write -P 0x33 40M 2M");
    let r = qemu_io(&s2, "read -P 0x33 40M 2M");
    assert!(
        !r.contains("fail") && r.contains("read 2097152/2097152"),
        "{r}"
    );

    eprintln!("--- back to the old size: no resync, old data intact");
    c.mdctl_ok(&[
        "--node",
        "node1",
        "grow",
        "md0",
        "--size",
        &old_kib.to_string(),
    ]);
    for n in ["node1", "node2"] {
        let t = c.mdstat(n);
        assert!(t.contains(&format!("{old_kib} blocks")), "{n}:\n{t}");
        assert!(
            !t.contains("resync"),
            "shrinking resyncs nothing on {n}:\n{t}"
        );
    }
    assert_eq!(c.node_status("md0", "node1")["sync"]["runs"], 0);
    for s in [&s1, &s2] {
        assert_eq!(nbd_size(s), old_kib * 1024);
        let r = qemu_io(s, "read -P 0x5a 1M 4M");
        assert!(
            !r.contains("fail") && r.contains("read 4194304/4194304"),
            "{r}"
        );
    }
    let o = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 1 20M 4k", &uri(&s2)])
        .output()
        .expect("qemu-io");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        !o.status.success()
            || text.contains("failed")
            || text.contains("out of range")
            || text.contains("beyond"),
        "a write past the shrunk end is refused: {text}"
    );

    eprintln!("--- sizes that do not fit or are not whole 4 KiB are refused");
    let (code, err) = c.code(&["grow", "md0", "--size", &(max_kib + 4).to_string()]);
    assert_eq!(code, 5, "{err}");
    assert!(
        err.contains("does not fit") && err.contains(&format!("{max_kib} KiB")),
        "{err}"
    );
    let (code, err) = c.code(&["grow", "md0", "--size", "16382"]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("multiple of 4 KiB"), "{err}");

    for n in ["node2", "node1"] {
        c.mdctl_ok(&["--node", n, "stop", "md0"]);
    }
    let x = mdadm_x(&m[1]);
    assert!(x.contains(&format!("Sync Size : {old_kib}")), "{x}");
}
