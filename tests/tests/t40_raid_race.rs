//! t40: the md_open race, as a stress test (`docs/LIFECYCLE.md` §1). 100
//! assemble/stop cycles of one array while several clients open it in a tight loop
//! (raw NBD opens, timed, plus `nbdinfo` and status lookups). Every open answers
//! success, EBUSY or ENOENT within 100 ms; every cycle completes; at the end the agent
//! holds no member open, no socket but its control socket is left, and it exits
//! cleanly on SIGTERM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mdcluster_tests::standalone::{member_files, nbd_probe, run_for, Agent, Probe};
use serde_json::json;

const CYCLES: usize = 100;
const OPEN_BOUND: Duration = Duration::from_millis(100);

#[derive(Default, Debug)]
struct Tally {
    ok: u64,
    busy: u64,
    not_found: u64,
    slowest: Duration,
    bad: Vec<String>,
}

#[test]
fn assemble_stop_cycles_with_clients_opening_in_a_loop() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let members = member_files(d, "m", 2, 32 << 20);
    let agent = Arc::new(Agent::start(&d.join("run"), &["--stop-grace", "2s"]));
    agent.ok(json!({
        "op": "create", "name": "md0", "members": members, "raid_devices": 2,
        "bitmap": "internal", "chunk_kib": 64, "assume_clean": true,
    }));
    agent.ok(json!({"op": "stop", "name": "md0"}));

    let done = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut threads = Vec::new();
    // Raw openers: timed.
    for _ in 0..4 {
        let (done, tally, sock) = (done.clone(), tally.clone(), agent.sock("md0"));
        threads.push(std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let t = Instant::now();
                let p = nbd_probe(&sock, "", Duration::from_secs(5));
                let took = t.elapsed();
                let mut t = tally.lock().unwrap();
                t.slowest = t.slowest.max(took);
                if took > OPEN_BOUND {
                    t.bad.push(format!("open took {took:?} ({p:?})"));
                }
                match p {
                    Probe::Ok => t.ok += 1,
                    Probe::Busy => t.busy += 1,
                    Probe::NotFound => t.not_found += 1,
                    Probe::Other(e) => t.bad.push(e),
                }
                drop(t);
                // A tight loop, but one that leaves the 2-core test machine to the agent.
                std::thread::sleep(Duration::from_millis(1));
            }
        }));
    }
    // A real client in a loop: it must always finish, whatever the answer.
    {
        let (done, tally, uri) = (done.clone(), tally.clone(), agent.uri("md0"));
        threads.push(std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let t = Instant::now();
                let out = run_for(20, &["nbdinfo", "--size", &uri]);
                if t.elapsed() > Duration::from_secs(10) || out.status.code() == Some(124) {
                    tally
                        .lock()
                        .unwrap()
                        .bad
                        .push(format!("nbdinfo hung: {out:?}"));
                }
            }
        }));
    }
    // Status lookups: answered at once, never create anything.
    {
        let (done, tally, agent) = (done.clone(), tally.clone(), agent.clone());
        threads.push(std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                let a = agent.ctl(json!({"op": "status", "name": "md0"}));
                if a["ok"] != true && a["errno"] != "ENOENT" {
                    tally.lock().unwrap().bad.push(format!("status: {a}"));
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }));
    }

    let started = Instant::now();
    for cycle in 0..CYCLES {
        let a = agent.ctl(json!({"op": "assemble", "name": "md0", "members": members}));
        assert_eq!(a["ok"], true, "cycle {cycle}: assemble: {a}");
        // Let the clients in (a stop then meets connected clients now and then).
        std::thread::sleep(Duration::from_millis(20));
        // Stop: clients come and go; a stop that meets one waits for it (bounded grace).
        let s = agent.ctl(json!({"op": "stop", "name": "md0"}));
        assert_eq!(s["ok"], true, "cycle {cycle}: stop: {s}");
    }
    let cycles_took = started.elapsed();
    done.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let t = tally.lock().unwrap();
    eprintln!("{CYCLES} cycles in {cycles_took:?}; opens: {t:?}");
    assert!(
        t.bad.is_empty(),
        "bad opens: {:?}",
        &t.bad[..t.bad.len().min(20)]
    );
    assert!(
        t.ok > 0 && t.not_found > 0,
        "the openers met both states: {t:?}"
    );

    // Nothing left open or locked.
    let members_open: Vec<_> = agent
        .open_files()
        .into_iter()
        .filter(|p| members.iter().any(|m| m == p))
        .collect();
    assert!(
        members_open.is_empty(),
        "members still open: {members_open:?}"
    );
    // No array socket left: only the control socket and the node_exporter mdstat file.
    let list = |dir: &std::path::Path| {
        let mut v: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let left = list(&agent.run_dir);
    assert_eq!(left, ["mdagent.ctl", "proc"], "run dir: {left:?}");
    let proc_left = list(&agent.run_dir.join("proc"));
    assert_eq!(proc_left, ["mdstat"], "run dir proc/: {proc_left:?}");
    let mut agent = Arc::into_inner(agent).expect("last reference");
    assert!(
        agent.term().success(),
        "clean exit; log:\n{}",
        agent.log_text()
    );
}

#[test]
fn stop_with_a_client_connected_answers_ebusy_naming_it_unless_forced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let members = member_files(d, "m", 2, 32 << 20);
    let agent = Agent::start(&d.join("run"), &["--stop-grace", "1s"]);
    agent.ok(json!({
        "op": "create", "name": "md0", "members": members, "raid_devices": 2,
        "bitmap": "internal", "assume_clean": true,
    }));
    let held =
        mdcluster_tests::standalone::nbd_hold(&agent.sock("md0"), "", Duration::from_secs(5))
            .expect("open md0");
    let t = Instant::now();
    let a = agent.ctl(json!({"op": "stop", "name": "md0"}));
    let took = t.elapsed();
    assert_eq!(a["errno"], "EBUSY", "{a}");
    assert!(
        a["error"].as_str().unwrap().contains("client #"),
        "names the client: {a}"
    );
    assert!(
        took >= Duration::from_secs(1) && took < Duration::from_secs(5),
        "{took:?}"
    );
    // Back to active: it still serves, new opens succeed.
    assert_eq!(agent.status("md0")["state"], "active");
    assert_eq!(
        nbd_probe(&agent.sock("md0"), "", Duration::from_secs(5)),
        Probe::Ok
    );
    // Forced: the client is disconnected and the stop completes.
    agent.ok(json!({"op": "stop", "name": "md0", "force": true}));
    assert_eq!(
        nbd_probe(&agent.sock("md0"), "", Duration::from_secs(5)),
        Probe::NotFound
    );
    drop(held);
}
