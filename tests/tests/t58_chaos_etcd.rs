//! t58: an etcd outage suspends the cluster, it does not stop it. Two agents with a 6 s
//! session TTL, a clustered mirror assembled on both nodes, a client writing on each;
//! etcd is killed (-9) and started again after a short outage (3 s, under the fence
//! deadline) and after a long one (20 s, over three TTLs). No lock can change hands while
//! etcd is down and a restarted etcd extends every lease, so no agent may exit, no node
//! may be counted failed or taken over, and both nodes must keep their sessions: their
//! sessions are suspended (member I/O waits at the fence gate) and resume once etcd is
//! back; meanwhile the agents report themselves not ready. Every write must be acknowledged (none fails), I/O must resume within 2 s of
//! etcd being back (answering its health check), every acknowledged write must be on both members, and the members
//! must end identical.

use std::time::{Duration, Instant};

use mdcluster_tests::chaos::{
    agent_ready, assert_acked_on_members, first_answer_after, longest_stall, mdctl_ok_at,
    ms_between, plain, sessions, Monitor, Writer,
};
use mdcluster_tests::cluster::ClusterBuilder;
use mdcluster_tests::standalone::{assert_members_identical, member_files};

const MIB: u64 = 1 << 20;
const TTL: Duration = Duration::from_secs(6);
/// Pause between two writes of a client.
const GAP_MS: u64 = 40;
/// How long after etcd is back I/O must go on.
const RESUME_BOUND: Duration = Duration::from_secs(2);

fn outage(outage: Duration, writes: u64) {
    let mut c = ClusterBuilder::new(2)
        .agent_ttl(TTL)
        .start()
        .expect("cluster");
    let url = c.url();
    let before = sessions(&url);
    assert_eq!(before.len(), 2, "{before:?}");
    let monitor = Monitor::start(&url);

    let m = member_files(c.path(), "e", 2, 80 * MIB);
    let ms: Vec<&str> = m.iter().map(|p| p.to_str().unwrap()).collect();
    c.mirror_on_two_nodes("md0", ms[0], ms[1]);

    let limit = Duration::from_secs(240);
    let w1 = Writer::start(&c.agents[0].sock("md0"), "md0", 0, writes, GAP_MS, limit);
    let w2 = Writer::start(
        &c.agents[1].sock("md0"),
        "md0",
        40 * MIB,
        writes,
        GAP_MS,
        limit,
    );
    std::thread::sleep(Duration::from_secs(2));

    eprintln!("--- etcd killed for {outage:?} while both nodes write");
    c.etcd.kill();
    let down = Instant::now();
    if outage > TTL {
        // Suspended: the agents report themselves not ready (readiness probes).
        std::thread::sleep(TTL + Duration::from_secs(1));
        for a in &c.agents {
            assert_eq!(
                agent_ready(&a.addr),
                Some(false),
                "{} reports ready while its session is suspended",
                a.node
            );
        }
    }
    std::thread::sleep(outage.saturating_sub(down.elapsed()));
    c.etcd.restart().expect("restart etcd");
    let back = Instant::now();

    let a1 = w1.finish();
    let a2 = w2.finish();
    for (node, a) in [("node1", &a1), ("node2", &a2)] {
        let during = a.iter().filter(|x| x.at > down && x.at < back).count();
        let (from, to) = longest_stall(a).expect("answers");
        eprintln!(
            "{node}: {} of {writes} writes acknowledged, {during} while etcd was down; longest stall {:?}: from {} ms after etcd went down to {} ms after it was back",
            a.iter().filter(|x| x.ok).count(),
            to.duration_since(from),
            ms_between(from, down),
            ms_between(to, back),
        );
    }
    for a in c.agents.iter_mut() {
        let log = plain(&a.log_text());
        assert_eq!(
            a.wait_exit(Duration::ZERO),
            None,
            "{}'s agent exited during the etcd outage; log:\n{log}",
            a.node
        );
        assert!(
            !log.contains("SELF-FENCING") && !log.contains("session lost"),
            "{} fenced itself or lost its session; log:\n{log}",
            a.node
        );
        if outage > TTL {
            assert!(
                log.contains("session suspended") && log.contains("session resumed"),
                "{} was never suspended and resumed; log:\n{log}",
                a.node
            );
        }
    }
    for (node, a) in [("node1", &a1), ("node2", &a2)] {
        let failed: Vec<u64> = a.iter().filter(|x| !x.ok).map(|x| x.i).collect();
        assert!(failed.is_empty(), "{node}: writes {failed:?} failed");
        assert_eq!(a.len() as u64, writes, "{node}: writes went unanswered");
        let first = first_answer_after(a, back)
            .unwrap_or_else(|| panic!("{node}: no write answered after etcd was back"));
        assert!(
            first.at.duration_since(back) <= RESUME_BOUND,
            "{node}: I/O resumed {:?} after etcd was back",
            first.at.duration_since(back)
        );
        let (_, stall_end) = longest_stall(a).expect("answers");
        assert!(
            ms_between(stall_end, back) <= RESUME_BOUND.as_millis() as i64,
            "{node}: the longest stall ended {} ms after etcd was back",
            ms_between(stall_end, back)
        );
    }
    assert_eq!(sessions(&url), before, "a session was replaced");
    for a in &c.agents {
        assert_eq!(
            agent_ready(&a.addr),
            Some(true),
            "{} not ready again",
            a.node
        );
    }
    let events = monitor.events();
    for bad in ["NodeFailed", "SlotRecovered", "NodeLeft", "SlotLost"] {
        assert!(
            !events.iter().any(|e| e["event"] == bad),
            "{bad} reported during an etcd outage: {events:?}"
        );
    }
    mdctl_ok_at(&url, &["--node", "node2", "stop", "md0"]);
    mdctl_ok_at(&url, &["--node", "node1", "stop", "md0"]);
    assert_acked_on_members(&m, 0, &a1);
    assert_acked_on_members(&m, 40 * MIB, &a2);
    assert_members_identical(&m);
}

#[test]
fn a_short_etcd_outage_is_ridden_through() {
    let t = Instant::now();
    outage(Duration::from_secs(3), 200);
    eprintln!("short outage round passed in {:?}", t.elapsed());
}

#[test]
fn a_long_etcd_outage_suspends_io_and_resumes_it_with_the_same_sessions() {
    let t = Instant::now();
    outage(Duration::from_secs(20), 500);
    eprintln!("long outage round passed in {:?}", t.elapsed());
}
