//! t56: joins that do not trip over each other. One clustered mirror with 4 bitmap slots,
//! 4 agents; in each round all 4 nodes assemble it at the same instant (4 `mdctl
//! assemble` runs started together), and every assemble must succeed — a slot held for
//! a moment by another joiner's gathering probe is not a slot held by a member — then
//! all 4 stop it again. At the end nothing is left locked.
//!
//! `T56_ROUNDS` sets the number of rounds (default 50, about 20 s).

use std::process::Command;
use std::time::{Duration, Instant};

use mdcluster_tests::cluster::{ClusterBuilder, TestCluster, MDCTL_TIMEOUT};
use mdcluster_tests::standalone::member_files;
use mdcluster_tests::tools::{bin, run_timeout};

const MIB: u64 = 1 << 20;
const NODES: usize = 4;

/// Runs `args` on every node at once (one mdctl process each); (node, success, stderr).
fn on_every_node(c: &TestCluster, args: &[&str]) -> Vec<(String, bool, String)> {
    let url = c.url();
    let threads: Vec<_> = (1..=NODES)
        .map(|n| {
            let node = format!("node{n}");
            let url = url.clone();
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            std::thread::spawn(move || {
                let o = run_timeout(
                    Command::new(bin("mdctl"))
                        .args(["--server", &url, "--node", &node])
                        .args(&args),
                    MDCTL_TIMEOUT,
                );
                (
                    node,
                    o.status.success(),
                    String::from_utf8_lossy(&o.stderr).into_owned(),
                )
            })
        })
        .collect();
    threads
        .into_iter()
        .map(|t| t.join().expect("mdctl thread"))
        .collect()
}

#[test]
fn four_nodes_assembling_at_once_all_get_a_slot() {
    let rounds: usize = std::env::var("T56_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(50);
    let c = ClusterBuilder::new(NODES).start().expect("cluster");
    let m = member_files(c.path(), "j", 2, 16 * MIB);
    let ms: Vec<&str> = m.iter().map(|p| p.to_str().unwrap()).collect();
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
        "4",
        "--assume-clean",
        ms[0],
        ms[1],
    ]);
    c.mdctl_ok(&["--node", "node1", "stop", "md0"]);

    let start = Instant::now();
    let mut slowest = Duration::ZERO;
    for round in 0..rounds {
        let t = Instant::now();
        let assembled = on_every_node(&c, &["assemble", "md0"]);
        let took = t.elapsed();
        slowest = slowest.max(took);
        let failed: Vec<_> = assembled.iter().filter(|(_, ok, _)| !ok).collect();
        assert!(
            failed.is_empty(),
            "round {round}: assembles failed: {failed:#?}"
        );
        let stopped = on_every_node(&c, &["stop", "md0"]);
        let failed: Vec<_> = stopped.iter().filter(|(_, ok, _)| !ok).collect();
        assert!(
            failed.is_empty(),
            "round {round}: stops failed: {failed:#?}"
        );
    }
    eprintln!(
        "{rounds} rounds of 4 simultaneous assembles: {:?} in all, slowest round's assembles {slowest:?}",
        start.elapsed()
    );
    let locks = c.etcd_keys("locks/");
    assert!(locks.is_empty(), "left locked: {locks:?}");
}
