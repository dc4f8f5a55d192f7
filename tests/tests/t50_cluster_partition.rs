//! t50: a partitioned node fences itself. node2's agent runs in its own network
//! namespace, reaching mdserver over a veth link; both nodes write to their own region
//! of a clustered mirror; node2's link goes down. node2's agent must stop all member
//! I/O (its fence gate closes: I/O suspended) before its lease can expire, so before
//! node1 starts recovering its slot: the suspension is logged before node1's
//! `SlotTakenOver`. node2's agent keeps running, suspended (it cannot tell a partition
//! from an outage of the lock service). node1 then resyncs exactly node2's dirty chunks
//! (`SlotRecovered`); when the link is back, node2's agent learns that its session is
//! gone, stops md0 without writing metadata and assembles it again on a new session, in
//! the same process, and the members end identical.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use mdcluster_tests::chaos::{clustered_mirror, mdctl_ok_at};
use mdcluster_tests::cluster::{AgentProc, AnyAddrServer, NetNs};
use mdcluster_tests::etcd::Etcd;
use mdcluster_tests::standalone::{assert_members_identical, dirty_bits, member_files};
use mdcluster_tests::tools::bin;
use serde_json::Value;

const MIB: u64 = 1 << 20;
const TTL: Duration = Duration::from_secs(4);

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn writer(sock: &std::path::Path, off: u64, len: u64) -> Child {
    let uri = format!("nbd+unix:///md0?socket={}", sock.display());
    let mut args: Vec<String> = ["-k", "2", "120", "qemu-io", "-f", "raw"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for round in 0..300u64 {
        args.push("-c".into());
        args.push(format!(
            "write -P {} {} 1M",
            round % 250,
            off + (round % (len / MIB)) * MIB
        ));
    }
    args.push(uri);
    Command::new("timeout")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-io")
}

#[test]
fn partitioned_node_fences_itself_before_its_slot_is_recovered_and_rejoins() {
    let dir = tempfile::tempdir().unwrap();
    let etcd = Etcd::start_with(true).expect("etcd");
    let ns = NetNs::create("part").expect("network namespace");
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
    while !mdctl_ok_at(&url, &["nodes"]).contains("node2") {
        assert!(Instant::now() < deadline, "node2 not live");
        std::thread::sleep(Duration::from_millis(100));
    }

    let mut monitor = Command::new(bin("mdctl"))
        .args(["--server", &url, "--json", "monitor"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("monitor");
    let events = Arc::new(Mutex::new(Vec::<Value>::new()));
    {
        let out = monitor.stdout.take().unwrap();
        let ev = events.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&l) {
                    ev.lock().unwrap().push(v);
                }
            }
        });
    }
    let wait_event = |name: &str, node: &str, timeout: Duration| -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = events
                .lock()
                .unwrap()
                .iter()
                .find(|e| e["event"] == name && e["node"] == node)
            {
                return e.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {name} of {node}: {:?}",
                events.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    std::thread::sleep(Duration::from_millis(700)); // the monitor's first node round (not an assertion)

    let m = member_files(dir.path(), "p", 2, 48 * MIB);
    clustered_mirror(&url, &m);

    eprintln!("--- both write; node2's link goes down");
    let mut w1 = writer(&n1.sock("md0"), 0, 8 * MIB);
    let mut w2 = writer(&n2.sock("md0"), 24 * MIB, 3 * MIB);
    let deadline = Instant::now() + Duration::from_secs(20);
    while dirty_bits(&m[0], 1) == 0 {
        assert!(Instant::now() < deadline, "node2 never dirtied its slot");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let cut = now_ms();
    ns.link(false).expect("link down");

    eprintln!("--- node2 suspends its member I/O before its lease can expire");
    let deadline = Instant::now() + TTL + Duration::from_secs(2);
    let suspended = loop {
        if n2
            .log_text()
            .contains("suspended: the session with mdserver was not renewed")
        {
            break now_ms();
        }
        assert!(
            Instant::now() < deadline,
            "node2 did not suspend its member I/O; log:\n{}",
            n2.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    };
    assert!(
        suspended - cut < TTL.as_millis() as i64,
        "suspended {} ms after the cut (TTL {TTL:?})",
        suspended - cut
    );
    let _ = w2.kill();
    let _ = w2.wait();
    let dirty = dirty_bits(&m[0], 1).max(dirty_bits(&m[1], 1));
    assert!(dirty > 0 && dirty <= 3, "{dirty}");

    eprintln!("--- node1 recovers node2's slot only after node2 suspended its I/O");
    let taken = wait_event("SlotTakenOver", "node1", Duration::from_secs(20));
    let recovered = taken["time_unix_ms"].as_i64().unwrap();
    eprintln!(
        "cut at {cut}, node2 suspended at {suspended} (+{} ms), slot recovered at {recovered} (+{} ms)",
        suspended - cut,
        recovered - cut
    );
    assert!(
        suspended < recovered,
        "node2's member I/O was not suspended when node1 started recovering its slot"
    );
    let ev = wait_event("SlotRecovered", "node1", Duration::from_secs(60));
    assert!(
        ev["detail"]
            .as_str()
            .unwrap()
            .contains(&format!(": {dirty} dirty chunks")),
        "{ev}"
    );
    wait_event("NodeFailed", "node2", Duration::from_secs(10));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d: Value =
            serde_json::from_str(&mdctl_ok_at(&url, &["--json", "detail", "md0"])).unwrap();
        let st = d["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == "node1")
            .unwrap()["status"]
            .clone();
        if st["sync"]["runs"].as_u64() >= Some(1) && st["bitmap"]["needed"] == 0 {
            assert_eq!(st["sync"]["last_chunks"].as_u64(), Some(dirty), "{st}");
            break;
        }
        assert!(Instant::now() < deadline, "node1 did not resync: {st}");
        std::thread::sleep(Duration::from_millis(100));
    }

    assert_eq!(
        n2.wait_exit(Duration::ZERO),
        None,
        "node2's agent exited; log:\n{}",
        n2.log_text()
    );

    eprintln!("--- link back; node2 rejoins by itself, in the same process");
    ns.link(true).expect("link up");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let d: Value =
            serde_json::from_str(&mdctl_ok_at(&url, &["--json", "detail", "md0"])).unwrap();
        if d["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node"] == "node2" && n["state"] == "active")
        {
            break;
        }
        assert!(Instant::now() < deadline, "node2 did not rejoin: {d}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(n2.wait_exit(Duration::ZERO), None, "{}", n2.log_text());
    assert!(n2.log_text().contains("session lost"), "{}", n2.log_text());
    assert!(!n2.log_text().contains("SELF-FENCING"), "{}", n2.log_text());
    let _ = w1.wait();
    mdctl_ok_at(&url, &["--node", "node2", "stop", "md0"]);
    mdctl_ok_at(&url, &["--node", "node1", "stop", "md0"]);
    assert_members_identical(&m);
    let _ = monitor.kill();
    let _ = monitor.wait();
    n1.kill9();
    n2.kill9();
}
