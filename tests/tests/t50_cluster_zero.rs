//! t50: `mdctl zero-superblock` once the cluster exists (issue 2): a member of an array
//! assembled on any node is refused with EBUSY naming the node, an unreachable mdserver
//! refuses too (nothing is erased on a guess), and once the array is stopped everywhere
//! the superblock is erased (the real `mdadm --examine` agrees).

use std::process::Command;

use mdcluster_tests::cluster::ClusterBuilder;
use mdcluster_tests::standalone::member_files;
use mdcluster_tests::tools::{bin, run_timeout, CMD_TIMEOUT};

#[test]
fn zero_superblock_refuses_members_of_assembled_arrays() {
    let c = ClusterBuilder::new(2).start().expect("cluster");
    let m = member_files(c.path(), "z", 2, 32 << 20);
    let (m0, m1) = (m[0].to_str().unwrap(), m[1].to_str().unwrap());
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
        "--assume-clean",
        m0,
        m1,
    ]);
    c.mdctl_ok(&["--node", "node2", "assemble", "md0"]);

    eprintln!("--- assembled on both nodes: EBUSY (4), naming them, nothing erased");
    let o = c.mdctl(&["zero-superblock", m0]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(
        err.contains("md0") && err.contains("node1") && err.contains("node2"),
        "{err}"
    );
    assert!(mdadm_examine_ok(m0), "the superblock must still be there");

    eprintln!("--- mdserver unreachable: refused (11), nothing erased");
    let o = run_timeout(
        Command::new(bin("mdctl")).args(["--server", "http://127.0.0.1:1", "zero-superblock", m0]),
        CMD_TIMEOUT,
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(11), "{err}");
    assert!(err.contains("--force"), "says how to override: {err}");
    assert!(mdadm_examine_ok(m0));

    eprintln!("--- stopped on node2 only: still refused, naming node1 alone");
    c.mdctl_ok(&["--node", "node2", "stop", "md0"]);
    let o = c.mdctl(&["zero-superblock", m0]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(4), "{err}");
    assert!(err.contains("node1") && !err.contains("node2"), "{err}");

    eprintln!("--- stopped everywhere: erased; mdadm finds no superblock");
    c.mdctl_ok(&["--node", "node1", "stop", "md0"]);
    c.mdctl_ok(&["zero-superblock", m0]);
    assert!(
        !mdadm_examine_ok(m0),
        "mdadm still reads a superblock on {m0}"
    );
    assert!(mdadm_examine_ok(m1), "the other member is untouched");
}

fn mdadm_examine_ok(dev: &str) -> bool {
    run_timeout(Command::new("mdadm").args(["--examine", dev]), CMD_TIMEOUT)
        .status
        .success()
}
