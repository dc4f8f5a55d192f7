//! Sessions through coordination outages, against a real etcd and two real `mdserver`
//! replicas: etcd down longer than the TTL (the session is suspended, not lost, and
//! resumes with its locks and subscriptions once etcd is back), and a lease that really
//! expired in etcd while no replica answered (lost at once when a replica says so).

use std::time::{Duration, Instant};

use mdcluster_proto::lock_client::{Mode, Notification, SessionState, Wait};
use mdcluster_proto::v1::Errno;
use mdcluster_tests::server::{session, wait_note, Cluster, ServerOpts};

const LONG: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_etcd_outage_suspends_sessions_and_they_resume_with_their_locks() {
    let mut c = Cluster::start(2, ServerOpts::default()).expect("cluster");
    let urls = c.urls();
    let ttl = Duration::from_secs(3);
    // --- a holds a lock, b is subscribed to a channel; each on its own replica.
    let (a, mut arx) = session(&urls, "a", ttl).await.expect("a");
    let (b, mut brx) = session(&urls[1..], "b", ttl).await.expect("b");
    let (a_id, b_id) = (a.id(), b.id());
    let g = a
        .acquire("md0/token", Mode::Exclusive, Wait::NoQueue)
        .await
        .expect("acquire");
    b.subscribe("md0").await.expect("subscribe");

    // --- etcd down for more than twice the TTL.
    c.etcd.kill();
    let down = Instant::now();
    for (name, rx) in [("a", &mut arx), ("b", &mut brx)] {
        let n = wait_note(rx, ttl + Duration::from_secs(3), |n| {
            matches!(
                n,
                Notification::Suspended { .. } | Notification::Lost { .. }
            )
        })
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let Notification::Suspended { reason } = n else {
            panic!("{name}: lost instead of suspended: {n:?}");
        };
        // The replicas answered "etcd unavailable", never "session gone".
        assert!(reason.contains("etcd"), "{name}: {reason}");
    }
    println!("suspended {:?} after etcd went down", down.elapsed());
    assert_eq!(a.state(), SessionState::Suspended);
    assert!(!a.is_live(), "past the fence deadline");
    tokio::time::sleep((ttl * 2 + Duration::from_secs(2)).saturating_sub(down.elapsed())).await;
    assert_eq!(
        a.state(),
        SessionState::Suspended,
        "still suspended, not lost"
    );
    assert_eq!(
        b.state(),
        SessionState::Suspended,
        "still suspended, not lost"
    );
    for (i, s) in c.servers.iter_mut().enumerate() {
        assert!(s.running(), "replica {i} exited during the etcd outage");
    }

    // --- etcd back: both sessions resume, same ids, fence deadline ahead again.
    c.etcd.restart().expect("restart etcd");
    let back = Instant::now();
    for (name, rx) in [("a", &mut arx), ("b", &mut brx)] {
        let n = wait_note(rx, LONG, |n| {
            matches!(n, Notification::Resumed { .. } | Notification::Lost { .. })
        })
        .await
        .unwrap_or_else(|e| panic!("{name}: {e}"));
        let Notification::Resumed { suspended_for, .. } = n else {
            panic!("{name}: lost after etcd came back: {n:?}");
        };
        println!(
            "{name} resumed {:?} after etcd was restarted (suspended {suspended_for:?})",
            back.elapsed()
        );
    }
    let resumed_in = back.elapsed();
    assert!(
        resumed_in < Duration::from_secs(5),
        "resumed {resumed_in:?} after etcd"
    );
    assert_eq!((a.id(), b.id()), (a_id, b_id));
    assert!(a.is_live() && b.is_live());
    assert_eq!(a.state(), SessionState::Connected);

    // --- the lock, its token and the subscription are intact, and stay so past a TTL.
    let until = Instant::now() + ttl + Duration::from_secs(1);
    while Instant::now() < until {
        let e = b
            .acquire("md0/token", Mode::Exclusive, Wait::NoQueue)
            .await
            .expect_err("still held");
        assert_eq!(e.errno(), Errno::Ebusy, "{e}");
        assert!(e.to_string().contains("held by a"), "{e}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    a.write_value("md0/token", g.token, b"after")
        .await
        .expect("fenced write after the outage");
    let publish = a.publish("md0", b"hello", Duration::from_secs(10));
    let ack = async {
        let n = wait_note(&mut brx, LONG, |n| matches!(n, Notification::Message(_)))
            .await
            .expect("message");
        let Notification::Message(d) = n else {
            unreachable!()
        };
        assert_eq!(d.payload, b"hello");
        b.ack(&d.message_id, Ok(())).await.expect("ack");
    };
    let (out, ()) = tokio::join!(publish, ack);
    let out = out.expect("publish");
    assert!(out.all_ok, "{out:?}");
    assert_eq!(out.results.len(), 1);
    for (i, s) in c.servers.iter_mut().enumerate() {
        assert!(s.running(), "replica {i} exited");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_that_expired_in_etcd_ends_a_suspended_session_at_once() {
    let c = Cluster::start(2, ServerOpts::default()).expect("cluster");
    let urls = c.urls();
    let ttl = Duration::from_secs(2);
    let (a, mut arx) = session(&urls, "a", ttl).await.expect("a");
    a.acquire("md0/token", Mode::Exclusive, Wait::NoQueue)
        .await
        .expect("acquire");
    // --- every replica frozen: no one renews, etcd lets the lease expire.
    for s in &c.servers {
        s.signal("STOP").expect("stop replica");
    }
    let n = wait_note(&mut arx, LONG, |n| {
        matches!(
            n,
            Notification::Suspended { .. } | Notification::Lost { .. }
        )
    })
    .await
    .expect("suspended");
    assert!(matches!(n, Notification::Suspended { .. }), "{n:?}");
    tokio::time::sleep(ttl * 2 + Duration::from_secs(1)).await;
    assert_eq!(a.state(), SessionState::Suspended);
    // --- the replicas wake up and reach etcd: the lease is gone, the session is lost
    // at once (not after the 5 min suspension limit).
    for s in &c.servers {
        s.signal("CONT").expect("continue replica");
    }
    let woke = Instant::now();
    let n = wait_note(&mut arx, LONG, |n| {
        matches!(n, Notification::Resumed { .. } | Notification::Lost { .. })
    })
    .await
    .expect("lost");
    let Notification::Lost { reason } = n else {
        panic!("a session whose lease expired was resumed: {n:?}");
    };
    println!(
        "lost {:?} after the replicas woke: {reason}",
        woke.elapsed()
    );
    assert!(
        woke.elapsed() < Duration::from_secs(5),
        "{:?}",
        woke.elapsed()
    );
    assert!(
        reason.contains("gone") || reason.contains("expired"),
        "{reason}"
    );
    assert_eq!(a.state(), SessionState::Lost);
    // Its lock went with it.
    let (b, _brx) = session(&urls, "b", ttl).await.expect("b");
    b.acquire("md0/token", Mode::Exclusive, Wait::NoQueue)
        .await
        .expect("the expired session's lock is free");
}
