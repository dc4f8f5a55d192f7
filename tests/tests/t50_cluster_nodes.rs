//! t50: a node crash while both nodes write to different regions of a clustered
//! mirror, and nodes coming and going as `mdctl monitor` reports them, on multi-view
//! storage (each node reaches each member through its own loop device and path; node2
//! assembles from the cluster's record by array UUID and shows its own paths): node2's agent is
//! killed (-9) mid-write; the monitor reports NodeFailed; node1 takes over node2's
//! bitmap slot (SlotTakenOver, then SlotRecovered at the resync's end) and resyncs exactly its dirty chunks — counted on disk
//! right after the crash — in one run, then clears the slot; node2's agent restarts
//! (NodeJoined) and assembles md0 again by itself (rejoin) with a clean slot; the members end identical. A clean agent
//! shutdown is reported as NodeLeft and nothing stays locked. The monitor survives an
//! mdserver restart (it reconnects).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mdcluster_tests::cluster::{ClusterBuilder, TestCluster};
use mdcluster_tests::standalone::{assert_members_identical, dirty_bits};
use mdcluster_tests::tools::bin;
use serde_json::Value;

const MIB: u64 = 1 << 20;

struct Monitor {
    child: Child,
    events: Arc<Mutex<Vec<Value>>>,
}

impl Monitor {
    fn start(c: &TestCluster) -> Monitor {
        let mut child = Command::new(bin("mdctl"))
            .args(["--server", &c.url(), "--json", "monitor"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("monitor");
        let events = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let ev = events.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&l) {
                    ev.lock().unwrap().push(v);
                }
            }
        });
        Monitor { child, events }
    }

    /// Waits (bounded) for an event `name` of `node`.
    fn wait(&self, name: &str, node: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self
                .events
                .lock()
                .unwrap()
                .iter()
                .find(|e| e["event"] == name && e["node"] == node)
            {
                return e.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {name} of {node} within {timeout:?}: {:?}",
                self.events.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A qemu-io writing pattern `pat` over `[off, off+len)` of the array on `sock` in a loop.
fn writer(sock: &std::path::Path, off: u64, len: u64, pat: u8) -> Child {
    let uri = format!("nbd+unix:///md0?socket={}", sock.display());
    let mut args = vec![
        "-k".to_owned(),
        "2".into(),
        "120".into(),
        "qemu-io".into(),
        "-f".into(),
        "raw".into(),
    ];
    for round in 0..200u64 {
        let o = off + (round % (len / MIB)) * MIB;
        args.push("-c".into());
        args.push(format!("write -P {} {o} 1M", pat.wrapping_add(round as u8)));
    }
    args.push(uri);
    Command::new("timeout")
        .args(&args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("qemu-io")
}

fn detail_on(c: &TestCluster, node: &str) -> Value {
    let d: Value = serde_json::from_str(&c.mdctl_ok(&["--json", "detail", "md0"])).unwrap();
    d["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node"] == node)
        .unwrap()["status"]
        .clone()
}

#[test]
fn crash_of_a_writing_node_survivor_recovers_its_slot_then_it_rejoins() {
    let mut c = ClusterBuilder::new(2)
        .agent_ttl(Duration::from_secs(3))
        .shared_storage(2, 48 * MIB)
        .start()
        .expect("cluster");
    let mon = Monitor::start(&c);
    std::thread::sleep(Duration::from_millis(700)); // the monitor's first node round (not an assertion)
                                                    // On-disk checks read the shared disks; each node uses its own paths.
    let m = c.disks(2);
    let ms = c.members_of(1, 2);
    c.mirror_on_two_nodes("md0", &ms[0], &ms[1]);
    let paths = |c: &TestCluster, node: &str| -> Vec<String> {
        let st = detail_on(c, node);
        let mut v: Vec<(u64, String)> = st["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["role"].as_u64().unwrap_or(99),
                    m["path"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        v.sort();
        v.into_iter().map(|x| x.1).collect()
    };
    assert_eq!(paths(&c, "node1"), ms, "node1 uses its own paths");
    assert_eq!(
        paths(&c, "node2"),
        c.members_of(2, 2),
        "node2 found its own paths of the members by the array UUID"
    );
    // `mdctl detail` lists each member's path on every node.
    let d: Value = serde_json::from_str(&c.mdctl_ok(&["--json", "detail", "md0"])).unwrap();
    for (k, m) in d["members"].as_array().expect("members").iter().enumerate() {
        assert_eq!(m["role"], k as u64, "{d}");
        for (node, n) in [("node1", 1), ("node2", 2)] {
            let p = m["paths"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["node"] == node)
                .unwrap_or_else(|| panic!("no path of member {k} on {node}: {d}"));
            assert_eq!(p["path"], c.member(n, k).display().to_string(), "{d}");
        }
    }
    let text = c.mdctl_ok(&["detail", "md0"]);
    let row = text
        .lines()
        .find(|l| l.contains(&c.member(2, 1).display().to_string()) && l.contains(&ms[1]))
        .unwrap_or_else(|| panic!("no row with member 1's path on both nodes:\n{text}"));
    assert!(text.contains("Path on node2"), "{text}");
    eprintln!("detail: {row}");

    eprintln!("--- both nodes write to their own region; node2 is killed mid-write");
    let mut w1 = writer(&c.agents[0].sock("md0"), 0, 8 * MIB, 0x10);
    let mut w2 = writer(&c.agents[1].sock("md0"), 24 * MIB, 3 * MIB, 0x80);
    let deadline = Instant::now() + Duration::from_secs(20);
    while dirty_bits(&m[0], 1) == 0 {
        assert!(Instant::now() < deadline, "node2 never dirtied its slot");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    c.agents[1].kill9();
    let _ = w2.kill();
    let _ = w2.wait();
    let dirty = dirty_bits(&m[0], 1).max(dirty_bits(&m[1], 1));
    eprintln!("node2 left {dirty} dirty chunks in slot 1");
    assert!(
        dirty > 0 && dirty <= 3,
        "node2 wrote only chunks 24..27: {dirty}"
    );
    let ev = mon.wait("NodeFailed", "node2", Duration::from_secs(15));
    eprintln!("monitor: {ev}");

    eprintln!("--- node1 takes over node2's slot and resyncs exactly its dirty chunks");
    let taken = mon.wait("SlotTakenOver", "node1", Duration::from_secs(15));
    eprintln!("monitor: {taken}");
    assert_eq!(taken["component"], "slot1");
    assert!(
        taken["detail"]
            .as_str()
            .unwrap()
            .contains(&format!(": {dirty} dirty chunks to resync")),
        "{taken}"
    );
    let ev = mon.wait("SlotRecovered", "node1", Duration::from_secs(60));
    // Announced at the resync's end: nothing is left to sync when it arrives.
    let at_event = detail_on(&c, "node1");
    eprintln!("monitor: {ev}");
    assert_eq!(ev["component"], "slot1");
    assert!(
        ev["detail"]
            .as_str()
            .unwrap()
            .contains(&format!(": {dirty} dirty chunks resynced")),
        "{ev}"
    );
    assert!(
        ev["time_unix_ms"].as_i64() >= taken["time_unix_ms"].as_i64(),
        "SlotRecovered before SlotTakenOver: {taken} {ev}"
    );
    assert_eq!(
        at_event["bitmap"]["needed"], 0,
        "SlotRecovered came before node2's chunks were resynced: {at_event}"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let st = loop {
        let st = detail_on(&c, "node1");
        let busy = matches!(st["sync"]["state"].as_str(), Some("busy" | "throttled"));
        if st["sync"]["runs"].as_u64() >= Some(1) && !busy && st["bitmap"]["needed"] == 0 {
            break st;
        }
        assert!(
            Instant::now() < deadline,
            "node1 did not resync node2's chunks: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(st["sync"]["last_kind"], "resync", "{st}");
    assert_eq!(st["sync"]["last_interrupted"], false, "{st}");
    assert_eq!(
        st["sync"]["last_chunks"].as_u64(),
        Some(dirty),
        "exactly node2's dirty chunks: {st}"
    );
    assert_eq!(st["sync"]["runs"], 1, "one resync run: {st}");
    assert_eq!(
        dirty_bits(&m[0], 1) + dirty_bits(&m[1], 1),
        0,
        "node2's slot is cleared on disk"
    );

    eprintln!("--- node2 comes back and rejoins by itself (its array list): slot clean, nothing to resync");
    let node2_events = |mon: &Monitor| {
        let ev = mon.events.lock().unwrap();
        let n = |name: &str| {
            ev.iter()
                .filter(|e| e["event"] == name && e["node"] == "node2")
                .count()
        };
        (n("ArrayAssembling"), n("NewArray"))
    };
    let before = node2_events(&mon);
    c.agents[1].restart().expect("restart node2");
    mon.wait("NodeJoined", "node2", Duration::from_secs(15));
    // The re-assembly runs as the agent starts, before mdserver's monitor connects to
    // it: its events still reach the monitor (the agent's recent events), once each.
    let deadline = Instant::now() + Duration::from_secs(15);
    while node2_events(&mon) != (before.0 + 1, before.1 + 1) {
        assert!(
            Instant::now() < deadline,
            "the re-assembly of node2's array at its start did not reach the monitor once (ArrayAssembling, NewArray before {before:?}, now {:?}): {:?}",
            node2_events(&mon),
            mon.events.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let st = detail_on(&c, "node2");
    assert_eq!(st["state"], "active", "{st}");
    assert_eq!(
        paths(&c, "node2"),
        c.members_of(2, 2),
        "node2 rejoined through its own paths"
    );
    assert_eq!(st["bitmap"]["slot"], 1, "{st}");
    assert_eq!(st["bitmap"]["needed"], 0, "{st}");
    assert_eq!(st["sync"]["last_chunks"], 0, "{st}");

    eprintln!("--- writers end; members identical; a clean shutdown is NodeLeft");
    let _ = w1.wait();
    c.mdctl_ok(&["--node", "node2", "stop", "md0"]);
    c.mdctl_ok(&["--node", "node1", "stop", "md0"]);
    assert_members_identical(&m);
    assert!(c.agents[1].term(), "node2's agent exits 0 on SIGTERM");
    mon.wait("NodeLeft", "node2", Duration::from_secs(15));
    assert!(
        c.etcd_keys("locks/").is_empty(),
        "{:?}",
        c.etcd_keys("locks/")
    );

    eprintln!("--- mdserver restarts; the monitor reconnects and keeps reporting");
    let count = |ev: &[Value]| {
        ev.iter()
            .filter(|e| e["event"] == "NewArray" && e["node"] == "node1")
            .count()
    };
    let before = count(&mon.events.lock().unwrap());
    c.server.restart().expect("restart mdserver");
    c.wait_nodes(1, Duration::from_secs(20))
        .expect("node1 live again");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // The monitor may still be reconnecting: assemble and stop until it reports one.
        c.mdctl_ok(&["--node", "node1", "assemble", "md0"]);
        c.mdctl_ok(&["--node", "node1", "stop", "md0"]);
        if count(&mon.events.lock().unwrap()) > before {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the monitor did not come back after the mdserver restart"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}
