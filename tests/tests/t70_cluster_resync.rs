//! t70: resync coordination of a clustered mirror on a real cluster (etcd, mdserver,
//! two cluster-mode agents) over multi-view storage (each node reaches each member
//! through its own loop device and path; node2 assembles by array UUID), modelled on mdadm's `clustermd_tests` `00r1_Create` and
//! `03r1_switch-resync`, checked through `mdctl mdstat` on each node:
//! - created without `--assume-clean` on node1 and assembled on node2: exactly one node
//!   resyncs (node1, `resync =`), the other shows `resync=PENDING` (it waits for the
//!   array's `resync` lock); once node1 finished, node2 learns from the superblock that
//!   the array is in sync and drops its own resync without running it;
//! - the resyncing node is stopped mid-resync: node2 takes the `resync` lock and
//!   resyncs, and the array ends in sync on node2;
//! - created `--assume-clean` with a spare and `--name`: both nodes show the spare and
//!   the name, and nothing resyncs.
//!
//! Speeds are set low with `mdctl tune` so the states can be seen, then raised to
//! finish.

use std::time::{Duration, Instant};

use mdcluster_tests::cluster::{ClusterBuilder, TestCluster};

/// Bytes of each member.
const DISK: u64 = 32 << 20;

/// Node1's paths of members `range` (what `create` on node1 names).
fn node1_paths(c: &TestCluster, range: std::ops::Range<usize>) -> Vec<String> {
    range
        .map(|k| c.member(1, k).display().to_string())
        .collect()
}

/// Bound of every cluster wait here.
const WAIT: Duration = Duration::from_secs(30);

/// The mdstat block of array `name` (from its line to the next blank line).
fn block(text: &str, name: &str) -> String {
    let start = text
        .find(&format!("{name} : "))
        .unwrap_or_else(|| panic!("{name} not in mdstat:\n{text}"));
    let rest = &text[start..];
    rest.split("\n\n").next().unwrap_or(rest).to_owned()
}

/// Waits until array `name`'s mdstat block on `node` satisfies `pred`.
fn wait_block(
    c: &TestCluster,
    node: &str,
    name: &str,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let t = c.mdstat(node);
        if t.contains(&format!("{name} : ")) {
            let b = block(&t, name);
            if pred(&b) {
                return b;
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not seen on {node} within {WAIT:?}:\n{t}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn create(c: &TestCluster, name: &str, m: &[&str]) {
    c.mdctl_ok(&[
        "--node",
        "node1",
        "create",
        name,
        "--raid-devices",
        "2",
        "--bitmap",
        "clustered",
        "--nodes",
        "2",
        "--bitmap-chunk",
        "1024",
        m[0],
        m[1],
    ]);
}

#[test]
fn one_node_resyncs_the_other_is_pending_and_takes_over() {
    let c = ClusterBuilder::new(2)
        .shared_storage(4, DISK)
        .start()
        .expect("cluster");
    let (a, b) = (node1_paths(&c, 0..2), node1_paths(&c, 2..4));
    let (a, b): (Vec<&str>, Vec<&str>) = (
        a.iter().map(String::as_str).collect(),
        b.iter().map(String::as_str).collect(),
    );

    eprintln!("--- md0: resync on node1, PENDING on node2");
    c.tune(1024);
    create(&c, "md0", &a);
    c.mdctl_ok(&["--node", "node2", "assemble", "md0"]);
    wait_block(&c, "node1", "md0", "node1 resyncing", |t| {
        t.contains("resync =")
    });
    wait_block(&c, "node2", "md0", "node2 pending", |t| {
        t.contains("resync=PENDING")
    });
    let t = block(&c.mdstat("node1"), "md0");
    assert!(
        t.contains("resync =") && !t.contains("PENDING"),
        "node1 must be the one resyncing:\n{t}"
    );

    eprintln!("--- node1 finishes; node2 drops its resync without running it");
    c.tune(500_000);
    wait_block(&c, "node1", "md0", "node1 in sync", |t| {
        t.contains("[UU]") && !t.contains("resync")
    });
    wait_block(&c, "node2", "md0", "node2 in sync", |t| {
        t.contains("[UU]") && !t.contains("resync")
    });
    let st = c.node_status("md0", "node2");
    assert_eq!(st["sync"]["runs"], 0, "node2 ran a resync of its own: {st}");
    assert_eq!(st["bitmap"]["needed"], 0, "{st}");
    let st1 = c.node_status("md0", "node1");
    assert!(st1["sync"]["runs"].as_u64() >= Some(1), "{st1}");

    eprintln!("--- md1: node1 resyncs, node2 pending; node1 stops mid-resync");
    c.tune(1024);
    create(&c, "md1", &b);
    c.mdctl_ok(&["--node", "node2", "assemble", "md1"]);
    wait_block(&c, "node1", "md1", "node1 resyncing md1", |t| {
        t.contains("resync =")
    });
    wait_block(&c, "node2", "md1", "node2 pending on md1", |t| {
        t.contains("resync=PENDING")
    });
    c.mdctl_ok(&["--node", "node1", "stop", "md1"]);
    let t = wait_block(&c, "node2", "md1", "node2 takes over the resync", |t| {
        t.contains("resync =")
    });
    assert!(!t.contains("PENDING"), "{t}");
    c.tune(500_000);
    wait_block(&c, "node2", "md1", "md1 in sync on node2", |t| {
        t.contains("[UU]") && !t.contains("resync")
    });
    let st = c.node_status("md1", "node2");
    assert!(st["sync"]["runs"].as_u64() >= Some(1), "{st}");
    assert_eq!(st["bitmap"]["needed"], 0, "{st}");
    assert!(
        !c.etcd_keys("locks/").iter().any(|k| k.contains("/resync")),
        "resync lock left held: {:?}",
        c.etcd_keys("locks/")
    );
    for (n, a) in [("node2", "md1"), ("node2", "md0"), ("node1", "md0")] {
        c.mdctl_ok(&["--node", n, "stop", a]);
    }
}

#[test]
fn create_with_a_spare_and_a_name_shows_on_both_nodes() {
    let c = ClusterBuilder::new(2)
        .shared_storage(3, DISK)
        .start()
        .expect("cluster");
    let m = node1_paths(&c, 0..3);
    let m: Vec<&str> = m.iter().map(String::as_str).collect();
    c.mdctl_ok(&[
        "--node",
        "node1",
        "create",
        "md0",
        "--raid-devices",
        "2",
        "--spare-devices",
        "1",
        "--name",
        "data",
        "--bitmap",
        "clustered",
        "--nodes",
        "2",
        "--assume-clean",
        m[0],
        m[1],
        m[2],
    ]);
    c.mdctl_ok(&["--node", "node2", "assemble", "md0"]);
    for n in ["node1", "node2"] {
        let t = block(&c.mdstat(n), "md0");
        assert!(
            t.contains("m2[2](S)") && t.contains("[2/2] [UU]") && !t.contains("resync"),
            "{n}:\n{t}"
        );
        assert_eq!(c.node_status("md0", n)["md_name"], "data");
    }
    for (n, a) in [("node2", "md0"), ("node1", "md0")] {
        c.mdctl_ok(&["--node", n, "stop", a]);
    }
}

/// `03r1_switch-resync` with a crash instead of a stop: node1 is killed (-9) mid-resync;
/// its lease expires, node2 gets the `resync` lock and takes node1's slot over (its
/// bits, the chunks not yet resynced, merged into node2's), resyncs them; the members
/// end identical.
#[test]
fn resyncing_node_killed_the_other_takes_over() {
    let mut c = ClusterBuilder::new(2)
        .agent_ttl(Duration::from_secs(3))
        .shared_storage(2, DISK)
        .start()
        .expect("cluster");
    let m = c.disks(2);
    // Different contents: only a finished resync makes them identical. Written to the
    // shared disk before any node reads it (no cache holds it yet).
    std::fs::write(&m[0], mdcluster_tests::standalone::noise(DISK as usize, 9)).unwrap();
    let ms = node1_paths(&c, 0..2);
    let ms: Vec<&str> = ms.iter().map(String::as_str).collect();
    c.tune(1024);
    create(&c, "md0", &ms);
    c.mdctl_ok(&["--node", "node2", "assemble", "md0"]);
    wait_block(&c, "node1", "md0", "node1 resyncing", |t| {
        t.contains("resync =")
    });
    wait_block(&c, "node2", "md0", "node2 pending", |t| {
        t.contains("resync=PENDING")
    });
    eprintln!("--- kill -9 node1 mid-resync");
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
    // Done when node2 owes nothing: node1's slot merged into node2's and resynced (the
    // mdstat line alone has gaps between runs).
    let deadline = Instant::now() + WAIT;
    let st = loop {
        let st = c.node_status("md0", "node2");
        // node1's slot on disk is cleared once node2 has merged it (takeover).
        let slot0 = mdcluster_tests::standalone::dirty_bits_union(&m, 0);
        if slot0 == 0
            && st["bitmap"]["needed"] == 0
            && st["sync"]["kind"] == ""
            && st["sync"]["runs"].as_u64() >= Some(2)
            && st["degraded"] == false
        {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "node2 did not finish node1's resync within {WAIT:?}: {st}\n{}",
            c.agents[1].log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        st["sync"]["last_chunks"].as_u64() >= Some(20),
        "node2 resynced what node1 had left (about 30 chunks): {st}"
    );
    let t = block(&c.mdstat("node2"), "md0");
    assert!(t.contains("[UU]") && !t.contains("PENDING"), "{t}");
    c.mdctl_ok(&["--node", "node2", "stop", "md0"]);
    mdcluster_tests::standalone::assert_members_identical(&m);
}
