//! t58: a node cut off from the cluster while it writes is fenced, taken over, and comes
//! back by itself. node2's agent runs in its own network namespace and reaches mdserver
//! over a veth link; both nodes write to their own region of a clustered mirror; node2's
//! link goes down for longer than the TTL, then comes back.
//!
//! - node2's client is never told success for a write between node2's fence deadline
//!   (at most TTL − margin after the cut) and node2's new session: its writes wait at
//!   the fence gate and fail. (The client reconnects to the export by itself; once the
//!   array is back on the new session, its writes go on.)
//! - node1 takes node2's slot over (`SlotRecovered`) and resyncs its dirty chunks.
//! - Once the link is back, node2 learns its lease is gone, stops its array without
//!   writing metadata, opens a new session and assembles the array again — in the same
//!   process (no exit, no restart by the test).
//! - Every write node1's client was told succeeded, and every write node2's client was
//!   told succeeded, is on both members; the members end identical.

use std::time::{Duration, Instant};

use mdcluster_tests::chaos::{
    assert_acked_on_members, clustered_mirror, mdctl_ok_at, plain, sessions, Monitor, Writer,
};
use mdcluster_tests::cluster::{AgentProc, AnyAddrServer, NetNs};
use mdcluster_tests::etcd::Etcd;
use mdcluster_tests::standalone::{assert_members_identical, dirty_bits, member_files};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const TTL: Duration = Duration::from_secs(4);
/// The agents' fence margin ([`AgentProc`] uses a quarter of the TTL).
const MARGIN: Duration = Duration::from_secs(1);
/// How long node2 stays cut off.
const CUT: Duration = Duration::from_secs(10);
/// Slack for a write that passed the gate just before the deadline and for the answer
/// to reach the client.
const SLACK: Duration = Duration::from_millis(500);

/// The status of md0 on `node` from `mdctl --json detail` (null when absent there).
fn status(url: &str, node: &str) -> Value {
    let d: Value = serde_json::from_str(&mdctl_ok_at(url, &["--json", "detail", "md0"])).unwrap();
    d["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == node)
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn a_cut_off_node_is_taken_over_and_rejoins_in_process() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start_with(true).expect("etcd");
    let ns = NetNs::create("chaos").expect("network namespace");
    let server = AnyAddrServer::start(&etcd.url(), "test").expect("mdserver");
    let url = server.url("127.0.0.1");
    let mut n1 = AgentProc::start(&url, "node1", "127.0.0.1", dir.path(), TTL, &[]).expect("node1");
    let mut n2 = AgentProc::start_in_netns(
        &server.url(&ns.host_ip),
        "node2",
        &ns.ns_ip,
        dir.path(),
        TTL,
        &[],
        &ns.name,
    )
    .expect("node2");
    let deadline = Instant::now() + Duration::from_secs(20);
    while sessions(&url).len() < 2 {
        assert!(Instant::now() < deadline, "node2 not live");
        std::thread::sleep(Duration::from_millis(100));
    }
    let before = sessions(&url);
    let monitor = Monitor::start(&url);
    std::thread::sleep(Duration::from_millis(700)); // the monitor's first round (not an assertion)

    let m = member_files(dir.path(), "c", 2, 80 * MIB);
    clustered_mirror(&url, &m);

    eprintln!("--- both write; node2's link goes down for {CUT:?}");
    let limit = Duration::from_secs(240);
    let w1 = Writer::start(&n1.sock("md0"), "md0", 0, 600, 40, limit);
    let w2 = Writer::start(&n2.sock("md0"), "md0", 40 * MIB, 400, 40, limit);
    let deadline = Instant::now() + Duration::from_secs(20);
    while w2.answers().len() < 20 || dirty_bits(&m[0], 1) == 0 {
        assert!(Instant::now() < deadline, "node2 never wrote");
        std::thread::sleep(Duration::from_millis(20));
    }
    ns.link(false).expect("link down");
    let cut = Instant::now();
    let cut_wall = std::time::SystemTime::now();

    eprintln!("--- node1 takes node2's slot over");
    let ev = monitor.wait("SlotRecovered", "node1", Duration::from_secs(30));
    eprintln!(
        "slot recovered {:?} after the cut: {}",
        cut.elapsed(),
        ev["detail"]
    );
    monitor.wait("NodeFailed", "node2", Duration::from_secs(10));
    let remaining = CUT.saturating_sub(cut.elapsed());
    std::thread::sleep(remaining);

    eprintln!("--- link back: node2 finds its session gone and rejoins by itself");
    ns.link(true).expect("link up");
    let healed = Instant::now();
    let deadline = healed + Duration::from_secs(60);
    loop {
        let st = status(&url, "node2");
        if st["state"] == "active" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node2 did not rejoin: {st}; log:\n{}",
            plain(&n2.log_text())
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let rejoined = healed.elapsed();
    eprintln!("node2 active again {rejoined:?} after the link came back");
    assert_eq!(
        n2.wait_exit(Duration::ZERO),
        None,
        "node2's agent exited; log:\n{}",
        n2.log_text()
    );
    let log = plain(&n2.log_text());
    assert!(log.contains("session lost"), "{log}");
    assert!(!log.contains("SELF-FENCING"), "{log}");
    let after = sessions(&url);
    let old = before.iter().find(|(n, _)| n == "node2").unwrap().1;
    let new = after.iter().find(|(n, _)| n == "node2").unwrap().1;
    assert_ne!(old, new, "node2 rejoined with a new session");
    assert_eq!(before[0], after[0], "node1 kept its session");

    eprintln!("--- node2's client: no success from the fence deadline until the array is back");
    let a2 = w2.finish();
    let fence_bound = cut + TTL - MARGIN + SLACK;
    // When node2 opened its new session (its log): its old array was torn down before,
    // and the array is assembled again only after (the monitor does not see node2's
    // lifecycle events while node2 has no session: it follows the node registry).
    let cut_ms = cut_wall
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let log = plain(&n2.log_text());
    let line = log
        .lines()
        .find(|l| l.contains("new session open"))
        .unwrap_or_else(|| panic!("node2 never opened a new session; log:\n{log}"));
    let stamp = line.split_whitespace().next().unwrap_or_default();
    let back_ms = humantime::parse_rfc3339_weak(stamp)
        .unwrap_or_else(|e| panic!("log time {stamp:?}: {e}"))
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let back = cut + Duration::from_millis((back_ms - cut_ms) as u64);
    eprintln!(
        "node2's new session open {:?} after the cut",
        back.duration_since(cut)
    );
    let late: Vec<_> = a2
        .iter()
        .filter(|a| a.ok && a.at > fence_bound && a.at < back)
        .map(|a| (a.i, a.at.duration_since(cut)))
        .collect();
    assert!(
        late.is_empty(),
        "node2's client was told success after node2's fence deadline, before its new session (write, time after the cut): {late:?}"
    );
    let failed: Vec<_> = a2
        .iter()
        .filter(|a| !a.ok)
        .map(|a| a.at.duration_since(cut))
        .collect();
    let ok = a2.iter().filter(|a| a.ok).count();
    eprintln!(
        "node2's client: {ok} acknowledged, {} failed (first {:?}, last {:?} after the cut)",
        failed.len(),
        failed.first(),
        failed.last()
    );
    assert!(!failed.is_empty(), "no write of node2's client failed");
    let last_before = a2
        .iter()
        .filter(|a| a.ok && a.at < back)
        .map(|a| a.at.duration_since(cut))
        .max();
    eprintln!(
        "node2's last acknowledged write before its new session: {last_before:?} after the cut"
    );

    eprintln!("--- node1's client is unaffected; the array ends in sync on both nodes");
    let a1 = w1.finish();
    let failed1: Vec<u64> = a1.iter().filter(|a| !a.ok).map(|a| a.i).collect();
    assert!(failed1.is_empty(), "node1's writes {failed1:?} failed");
    assert_eq!(a1.len(), 600);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (s1, s2) = (status(&url, "node1"), status(&url, "node2"));
        // Active, nothing left to resync, no sync running.
        let idle = |s: &Value| {
            let sync = &s["status"]["sync"];
            let running = sync["kind"].as_str().is_some_and(|k| !k.is_empty())
                && (sync["state"] == "busy" || sync["state"] == "throttled");
            s["state"] == "active" && s["status"]["bitmap"]["needed"] == 0 && !running
        };
        if idle(&s1) && idle(&s2) {
            break;
        }
        assert!(Instant::now() < deadline, "not in sync: {s1} {s2}");
        std::thread::sleep(Duration::from_millis(100));
    }
    mdctl_ok_at(&url, &["--node", "node2", "stop", "md0"]);
    mdctl_ok_at(&url, &["--node", "node1", "stop", "md0"]);
    assert_acked_on_members(&m, 0, &a1);
    assert_acked_on_members(&m, 40 * MIB, &a2);
    assert_members_identical(&m);
    drop(monitor);
    n1.kill9();
    n2.kill9();
}
