//! t58: losing one of two mdserver replicas is survived, not fenced. Two replicas, two
//! agents with a 6 s session TTL connected to both (the first one serving), a clustered
//! mirror assembled on both nodes with a client writing on each. The serving replica is
//! killed (-9) and stays dead for two TTLs. Every agent must resume its session on the
//! other replica right away: no agent ends itself, no session is suspended or lost,
//! both sessions keep their ids, no node is counted failed, every write is
//! acknowledged, every acknowledged write is on both members and the members end
//! identical. (A replica that hangs instead of dying is t55.)
//!
//! `T58_REPLICA_ROUNDS` (default 2) sets how many independent rounds run.

use std::time::{Duration, Instant};

use mdcluster_tests::chaos::{
    assert_acked_on_members, longest_gap, mdctl_ok_at, mirror_on_replicas, plain, rounds, sessions,
    MirrorOnReplicas, Writer,
};
use mdcluster_tests::standalone::assert_members_identical;

const MIB: u64 = 1 << 20;
const TTL: Duration = Duration::from_secs(6);
const WRITES: u64 = 300;

fn one_round(round: usize) {
    let MirrorOnReplicas {
        cluster: mut c,
        live,
        victim: dead,
        sessions: before,
        monitor,
        members: m,
    } = mirror_on_replicas(TTL, "k");

    let limit = Duration::from_secs(180);
    let w1 = Writer::start(&c.agents[0].sock("md0"), "md0", 0, WRITES, 40, limit);
    let w2 = Writer::start(&c.agents[1].sock("md0"), "md0", 40 * MIB, WRITES, 40, limit);
    std::thread::sleep(Duration::from_secs(2));

    eprintln!(
        "--- round {round}: the serving replica {dead} killed for {:?}",
        TTL * 2
    );
    c.server.kill();
    let killed = Instant::now();
    std::thread::sleep(TTL * 2);

    let a1 = w1.finish();
    let a2 = w2.finish();
    for a in c.agents.iter_mut() {
        let log = plain(&a.log_text());
        assert_eq!(
            a.wait_exit(Duration::ZERO),
            None,
            "{}'s agent exited; log:\n{log}",
            a.node
        );
        for bad in ["SELF-FENCING", "session lost", "session suspended"] {
            assert!(
                !log.contains(bad),
                "{}: {bad:?} after a replica was killed; log:\n{log}",
                a.node
            );
        }
        let moved = log
            .lines()
            .filter(|l| l.contains("session reconnecting => connected"))
            .find(|l| l.contains(&format!("resumed on {live}")))
            .unwrap_or_else(|| panic!("{} did not move to {live}; log:\n{log}", a.node));
        eprintln!("{}: {moved}", a.node);
    }
    for (node, a) in [("node1", &a1), ("node2", &a2)] {
        let during = a.iter().filter(|x| x.at > killed).count();
        eprintln!(
            "{node}: {} of {WRITES} acknowledged ({during} after the kill), longest stall {:?}",
            a.iter().filter(|x| x.ok).count(),
            longest_gap(a)
        );
        let failed: Vec<u64> = a.iter().filter(|x| !x.ok).map(|x| x.i).collect();
        assert!(failed.is_empty(), "{node}: writes {failed:?} failed");
        assert_eq!(a.len() as u64, WRITES, "{node}: writes went unanswered");
        assert!(during > 0, "{node}: no write after the kill");
    }
    assert_eq!(sessions(&live), before, "a session was replaced");
    let events = monitor.events();
    for bad in ["NodeFailed", "SlotRecovered", "NodeLeft", "SlotLost"] {
        assert!(
            !events.iter().any(|e| e["event"] == bad),
            "{bad} reported after a replica was killed: {events:?}"
        );
    }
    mdctl_ok_at(&live, &["--node", "node2", "stop", "md0"]);
    mdctl_ok_at(&live, &["--node", "node1", "stop", "md0"]);
    assert_acked_on_members(&m, 0, &a1);
    assert_acked_on_members(&m, 40 * MIB, &a2);
    assert_members_identical(&m);
}

#[test]
fn a_killed_replica_moves_sessions_without_fencing() {
    for round in 0..rounds("T58_REPLICA_ROUNDS", 2) {
        let t = Instant::now();
        one_round(round);
        eprintln!("round {round} passed in {:?}", t.elapsed());
    }
}
