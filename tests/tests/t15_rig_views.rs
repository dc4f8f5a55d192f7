//! t15: the multi-view test rig itself ([`mdcluster_tests::cluster::SharedStorage`]).
//! Two nodes reach one shared disk through two loop devices: each device has its own
//! page cache, and the backing file is written directly. The rig must bite the way two
//! hosts on one LUN do:
//! - a buffered read through node1's device after node2 wrote through its own returns
//!   the OLD bytes (node1's cache), while the disk (the backing file) and node1's
//!   device once its cache is dropped (`blockdev --flushbufs`) have the new ones;
//! - the devices go away when the guard drops (autoclear, then explicit detach);
//! - in a cluster built with it, each agent may open only its own views; node2
//!   assembles an array node1 created by the array UUID through its own paths, and
//!   refuses when it sees only some of the members.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mdcluster_tests::cluster::{ClusterBuilder, SharedStorage};
use mdcluster_tests::tools::{run_ok, run_timeout};

const MIB: u64 = 1 << 20;

fn read_at(path: &Path, off: u64, len: usize) -> Vec<u8> {
    let mut f = std::fs::File::open(path).expect("open for read");
    f.seek(SeekFrom::Start(off)).expect("seek");
    let mut b = vec![0u8; len];
    f.read_exact(&mut b).expect("read");
    b
}

#[test]
fn a_buffered_read_through_one_view_misses_a_write_through_the_other() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = SharedStorage::create(dir.path(), 2, 1, 8 * MIB).expect("shared storage");
    let (v1, v2) = (s.view(1, 0), s.view(2, 0));
    let (d1, d2) = (s.device(1, 0), s.device(2, 0));
    assert_ne!(d1, d2, "each node has its own loop device");
    assert_ne!(v1, v2, "each node has its own path");
    for d in [&d1, &d2] {
        let dio = run_ok(
            Command::new("losetup")
                .args(["-n", "-O", "DIO,AUTOCLEAR", "-l"])
                .arg(d),
        );
        let f: Vec<&str> = dio.split_whitespace().collect();
        assert_eq!(
            f,
            ["1", "1"],
            "{}: direct I/O and autoclear: {dio}",
            d.display()
        );
    }

    let off = 64 * 1024;
    let old = read_at(&v1, off, 4096);
    assert!(old.iter().all(|&b| b == 0), "a fresh disk reads zeros");

    // node2 writes through its own device (buffered, then flushed to the disk).
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&v2)
        .expect("open node2's view");
    f.seek(SeekFrom::Start(off)).unwrap();
    f.write_all(&[0xab; 4096]).unwrap();
    f.sync_all().expect("fsync node2's view");
    drop(f);
    assert_eq!(
        read_at(&s.disk(0), off, 4096),
        vec![0xab; 4096],
        "the write reached the shared disk"
    );
    assert_eq!(
        read_at(&v2, off, 4096),
        vec![0xab; 4096],
        "node2 reads its write"
    );

    // node1's cache still holds the old bytes: the rig bites.
    assert_eq!(
        read_at(&v1, off, 4096),
        old,
        "a buffered read through node1's device returns the OLD bytes"
    );
    run_ok(Command::new("blockdev").arg("--flushbufs").arg(&d1));
    assert_eq!(
        read_at(&v1, off, 4096),
        vec![0xab; 4096],
        "node1 sees the new bytes once its cache is dropped"
    );

    let backing = s.disk(0);
    assert_eq!(s.attached().len(), 2, "two views of disk0");
    drop(s);
    let left = run_ok(
        Command::new("losetup")
            .args(["-n", "-O", "NAME", "-j"])
            .arg(&backing),
    );
    assert!(left.trim().is_empty(), "loop devices left attached: {left}");
}

#[test]
fn each_node_may_open_only_its_own_views() {
    let c = ClusterBuilder::new(2)
        .shared_storage(2, 16 * MIB)
        .start()
        .expect("cluster");
    let storage = c.storage.as_ref().expect("multi-view");
    let devices = storage.attached();
    assert_eq!(devices.len(), 4, "2 nodes x 2 members: {devices:?}");
    let root = c.path().display().to_string();
    let n1 = c.members_of(1, 2);
    let n2 = c.members_of(2, 2);
    assert_ne!(n1, n2);
    // node2 may not open node1's views (nor the backing files).
    let (rc, err) = c.code(&[
        "--node",
        "node2",
        "create",
        "md0",
        "--raid-devices",
        "2",
        "--bitmap",
        "none",
        &n1[0],
        &n1[1],
    ]);
    assert_eq!(rc, 9, "EPERM: {err}");
    assert!(err.contains("--device-allow"), "{err}");

    // Created on node1 through its paths; node2 assembles from the cluster's record,
    // by the array UUID, through its own paths — and refuses to when it sees only one
    // of the two members (it would assemble degraded only because it misses a path).
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
        "2",
        "--assume-clean",
        &n1[0],
        &n1[1],
    ]);
    let link = c.member(2, 1);
    std::fs::remove_file(&link).expect("hide node2's view of m1");
    let (rc, err) = c.code(&["--node", "node2", "assemble", "md0"]);
    assert_eq!(rc, 3, "ENOENT: {err}");
    assert!(
        err.contains("not assembling it degraded") && err.contains(&n2[0]),
        "{err}"
    );
    std::os::unix::fs::symlink(storage.device(2, 1), &link).expect("restore the view");
    c.mdctl_ok(&["--node", "node2", "assemble", "md0"]);
    let st = c.node_status("md0", "node2");
    let mut paths: Vec<String> = st["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["path"].as_str().unwrap().to_owned())
        .collect();
    paths.sort();
    assert_eq!(paths, n2, "node2 uses its own paths: {st}");
    for n in ["node2", "node1"] {
        c.mdctl_ok(&["--node", n, "stop", "md0"]);
    }
    drop(c);
    for d in devices {
        // Detached (or reused by someone else for another file).
        let o = run_timeout(
            Command::new("losetup")
                .args(["-n", "-O", "BACK-FILE", "-l"])
                .arg(&d),
            Duration::from_secs(20),
        );
        let back = String::from_utf8_lossy(&o.stdout);
        assert!(
            !back.contains(&root),
            "{} still attached to {back}",
            d.display()
        );
    }
}
