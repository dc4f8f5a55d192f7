//! t70: growing a clustered mirror cluster-wide on a real cluster (etcd, mdserver, two
//! cluster-mode agents), modelled on mdadm's `clustermd_tests` `01r1_Grow_add` and the
//! grow-from-a-spare case, checked through `mdctl mdstat` on each node:
//! - `mdctl grow md0 --raid-devices 3 --add m2`: the new device is confirmed by every
//!   node (NEWDISK), both nodes show 3 roles, it is recovered on exactly one node while
//!   the other shows `resync=PENDING`, and both end `[3/3] [UUU]`;
//! - a spare added with `manage --add-spare` takes the fourth role after
//!   `grow --raid-devices 4`, on both nodes; the superblock (`mdadm --examine`) says 4;
//! - shrinking is refused (EINVAL).

use std::process::Command;
use std::time::{Duration, Instant};

use mdcluster_tests::cluster::ClusterBuilder;
use mdcluster_tests::standalone::member_files;
use mdcluster_tests::tools::{key_values, path_strs, run_ok, value_of};

/// Bound of every cluster wait here.
const WAIT: Duration = Duration::from_secs(30);

#[test]
fn grow_with_add_and_from_a_spare_on_both_nodes() {
    let c = ClusterBuilder::new(2).start().expect("cluster");
    let dir = c.path().to_owned();
    let m = member_files(&dir, "m", 4, 32 << 20);
    let ms = path_strs(&m);
    c.mirror_on_two_nodes("md0", ms[0], ms[1]);

    eprintln!("--- grow --raid-devices 3 --add m2: one node recovers m2, the other waits");
    c.tune(2048);
    c.mdctl_ok(&[
        "--node",
        "node1",
        "grow",
        "md0",
        "--raid-devices",
        "3",
        "--add",
        ms[2],
    ]);
    let deadline = Instant::now() + WAIT;
    let (recovering, waiting) = loop {
        let t1 = c.mdstat("node1");
        let t2 = c.mdstat("node2");
        assert!(
            t1.contains("[3/") && t2.contains("[3/"),
            "both nodes must have 3 roles:\n{t1}\n{t2}"
        );
        if t1.contains("recovery =") && t2.contains("resync=PENDING") {
            break ("node1", "node2");
        }
        if t2.contains("recovery =") && t1.contains("resync=PENDING") {
            break ("node2", "node1");
        }
        assert!(
            Instant::now() < deadline,
            "no recovery on one node with the other pending within {WAIT:?}:\n{t1}\n{t2}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("--- {recovering} recovers, {waiting} waits; finish");
    c.tune(500_000);
    for n in ["node1", "node2"] {
        c.wait_mdstat(WAIT, n, "[3/3] [UUU]", |t| {
            t.contains("[3/3] [UUU]") && !t.contains("recovery") && !t.contains("PENDING")
        });
    }
    assert_eq!(
        c.node_status("md0", recovering)["sync"]["last_kind"],
        "recovery"
    );
    assert_eq!(c.node_status("md0", waiting)["sync"]["runs"], 0);

    eprintln!("--- --add-spare m3, grow --raid-devices 4: the spare takes the new role");
    c.mdctl_ok(&["--node", "node2", "manage", "md0", "--add-spare", ms[3]]);
    c.mdctl_ok(&["--node", "node2", "grow", "md0", "--raid-devices", "4"]);
    for n in ["node1", "node2"] {
        c.wait_mdstat(WAIT, n, "[4/4] [UUUU]", |t| {
            t.contains("[4/4] [UUUU]") && !t.contains("recovery") && !t.contains("PENDING")
        });
    }
    let ex = run_ok(Command::new("mdadm").arg("--examine").arg(&m[0]));
    assert_eq!(
        value_of(&key_values(&ex), "Raid Devices"),
        Some("4"),
        "mdadm --examine {}:\n{ex}",
        ms[0]
    );

    eprintln!("--- shrinking is refused");
    let o = c.mdctl(&["--node", "node1", "grow", "md0", "--raid-devices", "2"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(5), "{err}");
    assert!(err.contains("shrinking"), "{err}");
    for n in ["node2", "node1"] {
        c.mdctl_ok(&["--node", n, "stop", "md0"]);
    }
}
