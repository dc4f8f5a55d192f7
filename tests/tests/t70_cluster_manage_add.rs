//! t70: adding members to a clustered mirror, cluster-wide, on a real cluster (etcd,
//! mdserver, two cluster-mode agents) over multi-view storage (each node reaches each
//! member through its own loop device and path: NEWDISK names the device by its device
//! UUID and each node finds its own path; node1 may also open a file `x0` that node2
//! may not), modelled on
//! mdadm's `clustermd_tests` `02r1_Manage_add`, `02r1_Manage_add-spare` and
//! `03r1_switch-recovery`, checked through `mdctl mdstat` on each node:
//! - NEWDISK: a device node2 may not open (`--device-allow`) is rejected by node2's
//!   negative ack; the error names node2 and its reason, and nothing is written;
//! - `--add-spare` adds a spare on both nodes;
//! - `--fail` of an active member: the spare takes its role on both nodes and the
//!   recovery runs on exactly one node (the `resync` lock) while the other shows
//!   `resync=PENDING`; both end in sync, and only one node ran a recovery;
//! - `--remove` then `--add` of the former member: it comes back as a spare on both
//!   nodes (its role is taken); `--re-add` of a device that was never a member is
//!   EINVAL;
//! - `--fail` again: the spare takes the role, and when the recovering node stops
//!   mid-recovery the other node takes the recovery over and finishes it;
//! - the same with a crash: the adding node is killed (-9) mid-recovery and the other
//!   takes the recovery over once its lease expires.

use std::time::{Duration, Instant};

use mdcluster_tests::cluster::ClusterBuilder;
use mdcluster_tests::standalone::member_files;
use mdcluster_tests::tools::path_strs;

const DISK: u64 = 32 << 20;

/// Bound of every cluster wait here.
const WAIT: Duration = Duration::from_secs(30);

#[test]
fn add_spare_fail_recover_on_one_node_remove_add() {
    let c = ClusterBuilder::new(2)
        .shared_storage(3, DISK)
        .node_args(1, &["--device-allow", "{dir}/x*"])
        .start()
        .expect("cluster");
    let dir = c.path().to_owned();
    let x = member_files(&dir, "x", 1, DISK);
    let (n1, n2) = (c.members_of(1, 3), c.members_of(2, 3));
    let ms: Vec<&str> = n1.iter().map(String::as_str).collect();
    let xs = path_strs(&x);
    c.mirror_on_two_nodes("md0", ms[0], ms[1]);

    eprintln!("--- NEWDISK: node2 may not open x0, so the disk is rejected");
    let (rc, err) = c.code(&["--node", "node1", "manage", "md0", "--add-spare", xs[0]]);
    assert_eq!(rc, 6, "{err}");
    assert!(
        err.contains("node node2 refused")
            && err.contains("device-allow")
            && err.contains("rejected"),
        "{err}"
    );
    assert!(
        mdcluster_agent::format::io::read_member(&x[0]).is_err(),
        "a rejected disk must not be written"
    );
    for n in ["node1", "node2"] {
        let t = c.mdstat(n);
        assert!(!t.contains("x0[") && t.contains("[2/2] [UU]"), "{n}:\n{t}");
    }

    eprintln!("--- --add-spare m2: a spare on both nodes");
    c.mdctl_ok(&["--node", "node1", "manage", "md0", "--add-spare", ms[2]]);
    for n in ["node1", "node2"] {
        let t = c.mdstat(n);
        assert!(
            t.contains("m2[") && t.contains("(S)") && t.contains("[2/2] [UU]"),
            "{n}:\n{t}"
        );
    }

    eprintln!("--- --fail m1: the spare takes its role; one node recovers, the other waits");
    c.tune(2048);
    c.mdctl_ok(&["--node", "node2", "manage", "md0", "--fail", &n2[1]]);
    let deadline = Instant::now() + WAIT;
    let (recovering, waiting) = loop {
        let t1 = c.mdstat("node1");
        let t2 = c.mdstat("node2");
        if t1.contains("recovery =") && t2.contains("resync=PENDING") {
            break ("node1", "node2");
        }
        if t2.contains("recovery =") && t1.contains("resync=PENDING") {
            break ("node2", "node1");
        }
        assert!(
            !(t1.contains("recovery =") && t2.contains("recovery =")),
            "both nodes recover:\n{t1}\n{t2}"
        );
        assert!(
            Instant::now() < deadline,
            "no recovery on one node with the other pending within {WAIT:?}:\n{t1}\n{t2}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("--- {recovering} recovers, {waiting} is pending; finish");
    c.tune(500_000);
    for n in ["node1", "node2"] {
        c.wait_mdstat(WAIT, n, "in sync with m2 active", |t| {
            t.contains("[2/2] [UU]") && !t.contains("recovery") && !t.contains("PENDING")
        });
    }
    let r = c.node_status("md0", recovering);
    let w = c.node_status("md0", waiting);
    assert_eq!(r["sync"]["last_kind"], "recovery", "{r}");
    assert_eq!(w["sync"]["runs"], 0, "{waiting} ran a sync of its own: {w}");

    eprintln!("--- --remove m1, --add m1: it comes back as a spare on both nodes");
    c.mdctl_ok(&[
        "--node", "node1", "manage", "md0", "--remove", ms[1], "--add", ms[1],
    ]);
    for n in ["node1", "node2"] {
        let t = c.mdstat(n);
        assert!(
            t.contains("m1[")
                && t.contains("(S)")
                && !t.contains("(F)")
                && t.contains("[2/2] [UU]"),
            "{n}:\n{t}"
        );
    }
    let (rc, err) = c.code(&["--node", "node1", "manage", "md0", "--re-add", xs[0]]);
    assert_eq!(rc, 5, "{err}");
    assert!(err.contains("not a former member"), "{err}");

    eprintln!("--- --fail m2: spare m1 takes its role; the recovering node stops mid-recovery and the other takes over (03r1_switch-recovery)");
    c.tune(2048);
    c.mdctl_ok(&["--node", "node1", "manage", "md0", "--fail", ms[2]]);
    let deadline = Instant::now() + WAIT;
    let (recovering, waiting) = loop {
        let t1 = c.mdstat("node1");
        let t2 = c.mdstat("node2");
        if t1.contains("recovery =") && t2.contains("resync=PENDING") {
            break ("node1", "node2");
        }
        if t2.contains("recovery =") && t1.contains("resync=PENDING") {
            break ("node2", "node1");
        }
        assert!(
            Instant::now() < deadline,
            "no recovery of m1 on one node within {WAIT:?}:\n{t1}\n{t2}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    c.mdctl_ok(&["--node", recovering, "stop", "md0"]);
    let t = c.wait_mdstat(
        WAIT,
        waiting,
        "the other node takes the recovery over",
        |t| t.contains("recovery ="),
    );
    assert!(!t.contains("PENDING"), "{t}");
    c.tune(500_000);
    c.wait_mdstat(WAIT, waiting, "m1 recovered by the survivor", |t| {
        t.contains("[2/2] [UU]") && !t.contains("recovery")
    });
    let w = c.node_status("md0", waiting);
    assert_eq!(w["sync"]["last_kind"], "recovery", "{w}");
    assert!(
        !c.etcd_keys("locks/").iter().any(|k| k.contains("/resync")),
        "resync lock left held: {:?}",
        c.etcd_keys("locks/")
    );
    c.mdctl_ok(&["--node", waiting, "stop", "md0"]);
}

/// `03r1_switch-recovery` with a crash: node1 adds a disk (`--add`, it recovers it) and
/// is killed (-9) mid-recovery; once its lease expires node2, which waited (PENDING),
/// takes the recovery over and finishes it; the members end identical.
#[test]
fn recovering_node_killed_the_other_takes_the_recovery_over() {
    let mut c = ClusterBuilder::new(2)
        .agent_ttl(Duration::from_secs(3))
        .shared_storage(3, DISK)
        .start()
        .expect("cluster");
    let m = c.disks(3);
    let n1 = c.members_of(1, 3);
    let ms: Vec<&str> = n1.iter().map(String::as_str).collect();
    c.mirror_on_two_nodes("md0", ms[0], ms[1]);
    // Data the recovery must carry to the new disk.
    let sock = c.agents[0].sock("md0");
    mdcluster_tests::tools::run_ok(std::process::Command::new("qemu-io").args([
        "-f",
        "raw",
        "-c",
        "write -P 0x5c 0 24M",
        &format!("nbd+unix:///md0?socket={}", sock.display()),
    ]));
    c.tune(1024);
    c.mdctl_ok(&[
        "--node", "node1", "manage", "md0", "--fail", ms[1], "--remove", ms[1],
    ]);
    c.mdctl_ok(&["--node", "node1", "manage", "md0", "--add", ms[2]]);
    let deadline = Instant::now() + WAIT;
    loop {
        let t1 = c.mdstat("node1");
        let t2 = c.mdstat("node2");
        if t1.contains("recovery =") && t2.contains("resync=PENDING") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node1 (the adder) not recovering with node2 pending within {WAIT:?}:\n{t1}\n{t2}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("--- kill -9 node1 mid-recovery");
    c.agents[0].kill9();
    c.mdctl_ok(&[
        "--node",
        "node2",
        "tune",
        "--sync-speed-min",
        "500000",
        "--sync-speed-max",
        "500000",
    ]);
    let deadline = Instant::now() + WAIT;
    let st = loop {
        let st = c.node_status("md0", "node2");
        // Recovered (not degraded), nothing running or owed (node1's slot, taken over,
        // may add a resync after the recovery).
        if st["degraded"] == false
            && st["sync"]["kind"] == ""
            && st["sync"]["runs"].as_u64() >= Some(1)
            && st["bitmap"]["needed"] == 0
        {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "node2 did not finish the recovery within {WAIT:?}: {st}\n{}",
            c.agents[1].log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(st["sync"]["last_interrupted"], false, "{st}");
    assert!(
        st["members"]
            .as_array()
            .is_some_and(|ms| ms.iter().all(|m| m["state"] == "in_sync")),
        "{st}"
    );
    let t = c.mdstat("node2");
    assert!(t.contains("[2/2] [UU]") && !t.contains("PENDING"), "{t}");
    c.mdctl_ok(&["--node", "node2", "stop", "md0"]);
    mdcluster_tests::standalone::assert_members_identical(&[m[0].clone(), m[2].clone()]);
}
