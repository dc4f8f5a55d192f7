//! t55: a hung mdserver replica is survived, not fenced. Two replicas, two agents with a
//! 6 s session TTL connected to both (the first one serving), a clustered mirror
//! assembled on both nodes with a client writing on each. The serving replica is frozen
//! (SIGSTOP: its sockets stay open, it answers nothing) for 12 s — twice the TTL — and
//! then thawed (SIGCONT). Every agent must move its session to the other replica before
//! its fence deadline: no agent ends itself (status 75), both sessions keep their ids,
//! no node is counted failed (no NodeFailed, no SlotTakenOver or SlotRecovered), every acknowledged
//! write reads back from the other node, and the members end identical.
//!
//! `T55_ROUNDS` (default 2) sets how many independent rounds run (a fresh cluster each).
//!
//! Also: `mdctl --server DEAD,LIVE` answers from the live replica, and `mdctl monitor`
//! given a frozen replica first follows the live one and says so.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mdcluster_tests::chaos::{
    mdctl_at, mdctl_ok_at, mirror_on_replicas, plain, rounds, sessions, MirrorOnReplicas,
};
use mdcluster_tests::cluster::{ClusterBuilder, TestCluster, MDCTL_TIMEOUT};
use mdcluster_tests::etcd::free_port;
use mdcluster_tests::standalone::assert_members_identical;
use mdcluster_tests::tools::{bin, run_timeout};
use serde_json::Value;

const MIB: u64 = 1 << 20;
const TTL: Duration = Duration::from_secs(6);
const FREEZE: Duration = Duration::from_secs(12);
/// Size of one client write.
const WRITE: u64 = 64 * 1024;
/// Writes per client (one pass over its region, each offset once).
const WRITES: u64 = 400;

/// The pattern byte of write `i`.
fn pattern(i: u64) -> u64 {
    i % 250 + 1
}

/// A client writing `WRITES` blocks of `WRITE` bytes from `base` on, 40 ms apart,
/// through the node's NBD export; its acknowledgements (offset, when) are collected.
struct Writer {
    child: Child,
    acked: Arc<Mutex<Vec<(u64, Instant)>>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn start(sock: &std::path::Path, base: u64) -> Writer {
        let uri = format!("nbd+unix:///md0?socket={}", sock.display());
        let mut args: Vec<String> = ["-k", "2", "180", "qemu-io", "-f", "raw"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for i in 0..WRITES {
            args.push("-c".into());
            args.push(format!(
                "write -P {} {} {WRITE}",
                pattern(i),
                base + i * WRITE
            ));
            args.push("-c".into());
            args.push("sleep 40".into());
        }
        args.push(uri);
        let mut child = Command::new("timeout")
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("qemu-io");
        let out = child.stdout.take().expect("qemu-io stdout");
        let acked = Arc::new(Mutex::new(Vec::new()));
        let a = acked.clone();
        let reader = std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                // "wrote 65536/65536 bytes at offset 1048576"
                if let Some(off) = l
                    .strip_prefix(&format!("wrote {WRITE}/{WRITE} bytes at offset "))
                    .and_then(|o| o.trim().parse::<u64>().ok())
                {
                    a.lock().unwrap().push((off, Instant::now()));
                }
            }
        });
        Writer {
            child,
            acked,
            reader: Some(reader),
        }
    }

    /// Waits (bounded by qemu-io's own `timeout`) for the end; the acknowledged offsets
    /// with their times.
    fn finish(mut self) -> Vec<(u64, Instant)> {
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.acked.lock().unwrap().clone()
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads back every acknowledged write of the client that wrote from `base`, through
/// `sock`; panics on the first block whose pattern does not match.
fn verify(sock: &std::path::Path, base: u64, acked: &[(u64, Instant)]) {
    let uri = format!("nbd+unix:///md0?socket={}", sock.display());
    for chunk in acked.chunks(100) {
        let mut cmd = Command::new("qemu-io");
        cmd.args(["-f", "raw"]);
        for (off, _) in chunk {
            let i = (off - base) / WRITE;
            cmd.arg("-c")
                .arg(format!("read -P {} {off} {WRITE}", pattern(i)));
        }
        cmd.arg(&uri);
        let o = run_timeout(&mut cmd, Duration::from_secs(120));
        let out = String::from_utf8_lossy(&o.stdout);
        let reads = out
            .lines()
            .filter(|l| l.starts_with(&format!("read {WRITE}/{WRITE} bytes")))
            .count();
        assert!(
            o.status.success() && reads == chunk.len() && !out.contains("verification failed"),
            "acknowledged writes do not read back ({reads} of {} read):\n{out}\n{}",
            chunk.len(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
}

/// Makes sure a frozen replica is thawed even when an assertion fails (the guard's
/// drop kills it afterwards either way).
struct Thaw<'a>(&'a TestCluster);

impl Drop for Thaw<'_> {
    fn drop(&mut self) {
        let _ = self.0.server.signal("CONT");
    }
}

fn one_round(round: usize) {
    // Every mdctl call of the test goes to the replica that stays up.
    let MirrorOnReplicas {
        cluster: mut c,
        live,
        victim: hung,
        sessions: before,
        monitor,
        members: m,
    } = mirror_on_replicas(TTL, "r");

    let base = [0, 32 * MIB];
    let w1 = Writer::start(&c.agents[0].sock("md0"), base[0]);
    let w2 = Writer::start(&c.agents[1].sock("md0"), base[1]);
    std::thread::sleep(Duration::from_secs(2));

    eprintln!("--- round {round}: freezing the serving replica {hung} for {FREEZE:?}");
    let thaw = Thaw(&c);
    c.server.signal("STOP").expect("SIGSTOP mdserver");
    let frozen_at = Instant::now();
    std::thread::sleep(FREEZE);
    c.server.signal("CONT").expect("SIGCONT mdserver");
    let thawed_at = Instant::now();
    drop(thaw);

    let a1 = w1.finish();
    let a2 = w2.finish();
    eprintln!(
        "acknowledged writes: node1 {} of {WRITES}, node2 {} of {WRITES}",
        a1.len(),
        a2.len()
    );
    for (a, node) in c.agents.iter().zip(["node1", "node2"]) {
        let log = plain(&a.log_text());
        assert!(
            a.pid().is_some() && !log.contains("SELF-FENCING"),
            "{node}'s agent fenced itself (status 75) while a replica hung; log:\n{log}"
        );
        assert!(
            !log.contains("session lost"),
            "{node} lost its session; log:\n{log}"
        );
        assert!(
            log.lines()
                .any(|l| l.contains("session reconnecting => connected")
                    && l.contains(&format!("resumed on {live}"))),
            "{node} did not move its session to {live}; log:\n{log}"
        );
    }
    for a in c.agents.iter_mut() {
        let code = a.wait_exit(Duration::ZERO);
        assert_eq!(
            code,
            None,
            "{}'s agent exited; log:\n{}",
            a.node,
            a.log_text()
        );
    }
    assert_eq!(sessions(&live), before, "a session was replaced");
    let during = |a: &[(u64, Instant)]| {
        a.iter()
            .filter(|(_, t)| *t > frozen_at && *t < thawed_at)
            .count()
    };
    eprintln!(
        "writes acknowledged while the replica was frozen: node1 {}, node2 {}",
        during(&a1),
        during(&a2)
    );
    // Suspend, not die: member I/O went on while the replica was frozen.
    assert!(
        during(&a1) > 0 && during(&a2) > 0,
        "no client write was acknowledged while the replica was frozen"
    );
    assert!(
        a1.len() as u64 == WRITES && a2.len() as u64 == WRITES,
        "a client write failed: node1 {} of {WRITES}, node2 {} of {WRITES} acknowledged",
        a1.len(),
        a2.len()
    );

    eprintln!("--- every acknowledged write reads back from the other node");
    verify(&c.agents[1].sock("md0"), base[0], &a1);
    verify(&c.agents[0].sock("md0"), base[1], &a2);
    let events = monitor.events();
    for bad in ["NodeFailed", "SlotTakenOver", "SlotRecovered", "NodeLeft"] {
        assert!(
            !events.iter().any(|e| e["event"] == bad),
            "{bad} reported while a replica hung: {events:?}"
        );
    }
    mdctl_ok_at(&live, &["--node", "node2", "stop", "md0"]);
    mdctl_ok_at(&live, &["--node", "node1", "stop", "md0"]);
    assert_members_identical(&m);
    drop(monitor);
}

#[test]
fn sessions_survive_a_frozen_replica() {
    for round in 0..rounds("T55_ROUNDS", 2) {
        let t = Instant::now();
        one_round(round);
        eprintln!("round {round} passed in {:?}", t.elapsed());
    }
}

#[test]
fn mdctl_fails_over_from_dead_and_frozen_replicas() {
    let c = ClusterBuilder::new(1).replicas(2).start().expect("cluster");
    let dead = format!("http://127.0.0.1:{}", free_port().expect("port"));
    let live = c.replicas[0].url();

    eprintln!("--- a dead replica first: the call is answered by the live one");
    let t = Instant::now();
    let o = mdctl_at(&format!("{dead},{live}"), &["--json", "nodes"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["node"], "node1", "{v}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(&format!("using {live}")),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    eprintln!("dead,live answered in {:?}", t.elapsed());
    // The same through the environment.
    let o = run_timeout(
        Command::new(bin("mdctl"))
            .env("MDCTL_SERVER", format!("{dead},{live}"))
            .args(["--json", "nodes"]),
        MDCTL_TIMEOUT,
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    eprintln!("--- every replica dead: EX 11 naming them");
    let o = mdctl_at(&format!("{dead},{dead}"), &["nodes"]);
    assert_eq!(o.status.code(), Some(11), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("no mdserver replica answered"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    eprintln!("--- a frozen replica first: bounded, then the live one answers");
    let frozen = c.server.url();
    let _thaw = Thaw(&c);
    c.server.signal("STOP").expect("SIGSTOP");
    let t = Instant::now();
    let o = mdctl_at(&format!("{frozen},{live}"), &["--json", "nodes"]);
    let took = t.elapsed();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(took < Duration::from_secs(15), "took {took:?}");
    eprintln!("frozen,live answered in {took:?}");

    eprintln!("--- monitor started on the frozen replica follows the live one and says so");
    let mut mon = Command::new(bin("mdctl"))
        .args(["--server", &format!("{frozen},{live}"), "--json", "monitor"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("monitor");
    let err = mon.stderr.take().unwrap();
    let lines = Arc::new(Mutex::new(Vec::<String>::new()));
    {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines().map_while(Result::ok) {
                lines.lock().unwrap().push(l);
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while !lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains(&format!("using {live}")))
    {
        assert!(
            Instant::now() < deadline,
            "monitor did not move to {live}: {:?}",
            lines.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    c.server.signal("CONT").expect("SIGCONT");

    eprintln!("--- the replica it follows hangs: it moves on and says so");
    // Now it follows `live`: freeze that one, with `frozen` thawed.
    let _thaw_live = ThawServer(&c.replicas[0]);
    c.replicas[0].signal("STOP").expect("SIGSTOP");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !lines
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains(&format!("now following mdserver at {frozen}")))
    {
        assert!(
            Instant::now() < deadline,
            "monitor did not move back to {frozen}: {:?}",
            lines.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("monitor stderr: {:?}", lines.lock().unwrap());
    let _ = mon.kill();
    let _ = mon.wait();
}

/// Thaws one replica on drop.
struct ThawServer<'a>(&'a mdcluster_tests::server::MdServer);

impl Drop for ThawServer<'_> {
    fn drop(&mut self) {
        let _ = self.0.signal("CONT");
    }
}
