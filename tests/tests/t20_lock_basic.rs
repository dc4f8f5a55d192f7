//! Lock service basics against a real etcd and two real `mdserver` replicas: mutual
//! exclusion under contention, FIFO order, no-queue, deadlines, shared mode and convert,
//! the value block and its fencing, validation, the node registry.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mdcluster_proto::lock_client::{Mode, Notification, Wait};
use mdcluster_proto::v1::Errno;
use mdcluster_tests::server::{session, wait_note, Cluster, ServerOpts};
use tonic::Code;

const TTL: Duration = Duration::from_secs(3);
const LONG: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_exclusion_under_contention() {
    // --- 8 sessions spread over 2 replicas each take one lock 8 times; inside the
    // critical section a counter must never see two holders, and tokens must grow.
    let c = Cluster::start(2, ServerOpts::default()).expect("cluster");
    let urls = c.urls();
    let inside = Arc::new(AtomicUsize::new(0));
    let total = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for n in 0..8 {
        let mut u = urls.clone();
        u.rotate_left(n % 2);
        let (inside, total) = (inside.clone(), total.clone());
        tasks.push(tokio::spawn(async move {
            let (s, _rx) = session(&u, &format!("node{n}"), TTL)
                .await
                .expect("session");
            let mut last = 0;
            for _ in 0..8 {
                let g = s
                    .acquire("counter", Mode::Exclusive, Wait::Queue(LONG))
                    .await
                    .expect("acquire");
                assert!(g.token > last, "fencing tokens grow per session");
                last = g.token;
                assert_eq!(
                    inside.fetch_add(1, Ordering::SeqCst),
                    0,
                    "two holders at once"
                );
                tokio::time::sleep(Duration::from_millis(1)).await;
                total.fetch_add(1, Ordering::SeqCst);
                assert_eq!(
                    inside.fetch_sub(1, Ordering::SeqCst),
                    1,
                    "two holders at once"
                );
                s.release("counter", g.token).await.expect("release");
            }
            s.close().await.expect("close");
        }));
    }
    for t in tasks {
        t.await.expect("contender");
    }
    assert_eq!(total.load(Ordering::SeqCst), 64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifo_order_blocking_and_grant_notifications() {
    // --- a holds; b then c queue (each enqueue confirmed by a's blocking notification);
    // releases hand the lock to b, then c: FIFO by etcd revision.
    let c = Cluster::start(2, ServerOpts::default()).expect("cluster");
    let urls = c.urls();
    let (a, mut arx) = session(&urls, "a", TTL).await.expect("a");
    let ga = a
        .acquire("fifo", Mode::Exclusive, Wait::NoQueue)
        .await
        .expect("a acquires");
    let order = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut waiters = Vec::new();
    for name in ["b", "c"] {
        let mut u = urls.clone();
        if name == "c" {
            u.reverse();
        }
        let (s, mut rx) = session(&u, name, TTL).await.expect("session");
        let order = order.clone();
        waiters.push(tokio::spawn(async move {
            let g = s
                .acquire("fifo", Mode::Exclusive, Wait::Queue(LONG))
                .await
                .expect("acquire");
            order.lock().expect("order").push(s.node().to_string());
            // The queued grant is also announced on the session stream.
            let n = wait_note(&mut rx, LONG, |n| matches!(n, Notification::Granted { .. }))
                .await
                .expect("granted note");
            assert_eq!(
                n,
                Notification::Granted {
                    resource: "fifo".into(),
                    mode: Mode::Exclusive,
                    token: g.token
                }
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            s.release("fifo", g.token).await.expect("release");
            s
        }));
        let n = wait_note(
            &mut arx,
            LONG,
            |n| matches!(n, Notification::Blocking { waiter_node, .. } if waiter_node == name),
        )
        .await
        .expect("blocking notification");
        assert!(matches!(
            n,
            Notification::Blocking {
                waiter_mode: Mode::Exclusive,
                ..
            }
        ));
    }
    a.release("fifo", ga.token).await.expect("a releases");
    for w in waiters {
        w.await.expect("waiter");
    }
    assert_eq!(
        *order.lock().expect("order"),
        vec!["b".to_string(), "c".to_string()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_queue_busy_and_deadlines() {
    let c = Cluster::start(2, ServerOpts::default()).expect("cluster");
    let urls = c.urls();
    let (a, _arx) = session(&urls, "a", TTL).await.expect("a");
    let (b, _brx) = session(&urls[1..], "b", TTL).await.expect("b");
    let g = a
        .acquire("busy", Mode::Exclusive, Wait::NoQueue)
        .await
        .expect("a acquires");

    // --- no-queue answers busy at once, naming the holder.
    let t = Instant::now();
    let e = b
        .acquire("busy", Mode::Exclusive, Wait::NoQueue)
        .await
        .expect_err("busy");
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "busy took {:?}",
        t.elapsed()
    );
    assert_eq!(e.errno(), Errno::Ebusy, "{e}");
    assert!(e.to_string().contains("held by a"), "{e}");

    // --- a queued request ends at its deadline with ETIMEDOUT and is withdrawn.
    let t = Instant::now();
    let e = b
        .acquire(
            "busy",
            Mode::Shared,
            Wait::Queue(Duration::from_millis(400)),
        )
        .await
        .expect_err("timeout");
    let waited = t.elapsed();
    assert_eq!(e.errno(), Errno::Etimedout, "{e}");
    assert_eq!(e.code(), Code::DeadlineExceeded);
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(5),
        "{waited:?}"
    );
    assert!(e.to_string().contains("lock busy"), "{e}");
    let (_, holders) = b.read_value("busy").await.expect("read");
    assert_eq!(holders, vec!["a".to_string()]);
    // Withdrawn: once a releases, b's no-queue request is granted (no stale key ahead).
    a.release("busy", g.token).await.expect("release");
    b.acquire("busy", Mode::Exclusive, Wait::NoQueue)
        .await
        .expect("b acquires after release");

    // --- a client that gives up (drops the call) leaves no waiter key behind.
    let call = a.acquire("busy", Mode::Exclusive, Wait::Queue(LONG));
    assert!(tokio::time::timeout(Duration::from_millis(300), call)
        .await
        .is_err());
    b.release("busy", 0).await.expect("b releases");
    let deadline = Instant::now() + LONG;
    loop {
        let (_, holders) = b.read_value("busy").await.expect("read");
        if holders.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "cancelled waiter of a was not withdrawn: {holders:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_convert_value_block_and_fencing() {
    let c = Cluster::start(2, ServerOpts::default()).expect("cluster");
    let urls = c.urls();
    let (a, _arx) = session(&urls, "a", TTL).await.expect("a");
    let (b, _brx) = session(&urls[1..], "b", TTL).await.expect("b");

    // --- two shared holders at once; exclusive is busy meanwhile.
    let ga = a
        .acquire("slot/1", Mode::Shared, Wait::NoQueue)
        .await
        .expect("a shared");
    let gb = b
        .acquire("slot/1", Mode::Shared, Wait::NoQueue)
        .await
        .expect("b shared");
    let (_, holders) = a.read_value("slot/1").await.expect("read");
    assert_eq!(holders, vec!["a".to_string(), "b".to_string()]);
    // A shared holder may not write the value block.
    let e = a
        .write_value("slot/1", ga.token, b"x")
        .await
        .expect_err("shared write");
    assert_eq!(e.errno(), Errno::Eperm, "{e}");
    // Upgrade while another shared holder exists: busy with no-queue.
    let e = a
        .convert("slot/1", ga.token, Mode::Exclusive, Wait::NoQueue)
        .await
        .expect_err("upgrade busy");
    assert_eq!(e.errno(), Errno::Ebusy, "{e}");
    // A queued upgrade is granted once b leaves.
    let (m, _) = tokio::join!(
        a.convert("slot/1", ga.token, Mode::Exclusive, Wait::Queue(LONG)),
        async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            b.release("slot/1", gb.token).await.expect("b releases");
        }
    );
    assert_eq!(m.expect("upgrade"), Mode::Exclusive);

    // --- the exclusive holder writes the value block; others read it; a stale token
    // (after release) is fenced off.
    a.write_value("slot/1", ga.token, b"resync 0-4096")
        .await
        .expect("write");
    assert_eq!(
        b.read_value("slot/1").await.expect("read").0,
        b"resync 0-4096"
    );
    let e = b
        .write_value("slot/1", gb.token, b"stale")
        .await
        .expect_err("stale token");
    assert_eq!(e.errno(), Errno::Enoent, "{e}");
    // Downgrade is immediate; then writes are refused.
    assert_eq!(
        a.convert("slot/1", ga.token, Mode::Shared, Wait::NoQueue)
            .await
            .expect("down"),
        Mode::Shared
    );
    assert!(a.write_value("slot/1", ga.token, b"y").await.is_err());
    a.release("slot/1", ga.token).await.expect("release");
    // The value survives its holders and is returned with the next grant.
    let g = b
        .acquire("slot/1", Mode::Exclusive, Wait::NoQueue)
        .await
        .expect("b exclusive");
    assert_eq!(g.value, b"resync 0-4096");
    assert!(g.token > ga.token, "tokens grow across holders");
    let e = b
        .release("slot/1", ga.token)
        .await
        .expect_err("wrong token");
    assert_eq!(e.errno(), Errno::Enoent);

    // --- a session closed on purpose releases its locks at once, and the next waiter
    // is not told of an expiry.
    let (a_wait, b_close) = tokio::join!(
        a.acquire("slot/1", Mode::Exclusive, Wait::Queue(LONG)),
        async {
            tokio::time::sleep(Duration::from_millis(200)).await;
            b.close().await.expect("close b");
        }
    );
    let () = b_close;
    let g = a_wait.expect("a granted after b closed");
    assert!(g.expired_holders.is_empty(), "{:?}", g.expired_holders);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn validation_and_node_registry() {
    let c = Cluster::start(2, ServerOpts::default()).expect("cluster");
    let urls = c.urls();
    let (a, _arx) = session(&urls, "a", TTL).await.expect("a");

    // --- the self-fencing deadline lies within one TTL and moves with heartbeats.
    let first = a.fence_deadline();
    assert!(first <= tokio::time::Instant::now() + TTL);
    let deadline = Instant::now() + LONG;
    while a.fence_deadline() <= first {
        assert!(
            Instant::now() < deadline,
            "heartbeats never moved the fence deadline"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(a.is_live());

    // --- every request is validated with a clear error.
    for bad in ["", "a#b", "/x", "a//b", &"r".repeat(201)] {
        let e = a
            .acquire(bad, Mode::Exclusive, Wait::NoQueue)
            .await
            .expect_err("invalid name");
        assert_eq!(e.code(), Code::InvalidArgument, "{bad:?}: {e}");
        assert_eq!(e.errno(), Errno::Einval);
    }
    let e = a
        .acquire("ok", Mode::Exclusive, Wait::Queue(Duration::from_secs(601)))
        .await
        .expect_err("wait");
    assert!(e.to_string().contains("wait_ms"), "{e}");
    let e = a
        .write_value("ok", 1, &[0; 1025])
        .await
        .expect_err("value size");
    assert!(e.to_string().contains("value"), "{e}");
    let e = a
        .publish("ch", &vec![0; 65537], Duration::from_secs(1))
        .await
        .expect_err("payload");
    assert_eq!(e.code(), Code::InvalidArgument);
    let e = mdcluster_tests::server::session(&urls, "bad/node", TTL)
        .await
        .expect_err("node name");
    assert!(e.to_string().contains("node"), "{e}");

    // --- one live session per node.
    let e = session(&urls[1..], "a", TTL)
        .await
        .expect_err("second session of a");
    assert_eq!(e.errno(), Errno::Ebusy, "{e}");

    // --- the registry lists live nodes with their agent address; a closed one leaves.
    let (b, _brx) = session(&urls[1..], "b", TTL).await.expect("b");
    let nodes = a.nodes().await.expect("nodes");
    let names: Vec<_> = nodes
        .iter()
        .map(|n| (n.node.as_str(), n.agent_addr.as_str()))
        .collect();
    assert_eq!(names, vec![("a", "a.agent:7481"), ("b", "b.agent:7481")]);
    assert_eq!(nodes[1].session_id, b.id());
    b.close().await.expect("close");
    let nodes = a.nodes().await.expect("nodes");
    assert_eq!(nodes.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_at_its_session_limit_sends_agents_to_another() {
    // --- two replicas that each serve at most one session stream.
    let opts = ServerOpts {
        extra_args: vec!["--max-sessions".into(), "1".into()],
        ..Default::default()
    };
    let c = Cluster::start(2, opts).expect("cluster");
    let urls = c.urls();
    let (a, _arx) = session(&urls, "a", TTL).await.expect("a");
    assert_eq!(a.endpoint(), urls[0]);
    // b asks replica 0 first, is refused, and is served by replica 1.
    let (b, _brx) = session(&urls, "b", TTL).await.expect("b");
    assert_eq!(b.endpoint(), urls[1]);
    // With no replica left: a clear EBUSY naming the limit.
    let e = session(&urls, "c", TTL).await.expect_err("no room");
    assert_eq!(e.errno(), Errno::Ebusy, "{e}");
    assert!(e.to_string().contains("limit of 1 session streams"), "{e}");
    // A session that ends frees its place.
    a.close().await.expect("close");
    let deadline = Instant::now() + LONG;
    loop {
        match session(&urls[..1], "c", TTL).await {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "place never freed: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// ReadValues answers, for every lock under a prefix and in one call, what ReadValue
/// answers for each: value block and holders (shared holders all, waiters none), a lock
/// named like a prefix of another kept apart (`slot/1` vs `slot/10`), released locks
/// with a value still listed; the prefix validated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_values_lists_every_lock_under_a_prefix_as_read_value_does() {
    let c = Cluster::start(2, ServerOpts::default()).expect("cluster");
    let urls = c.urls();
    let (a, mut arx) = session(&urls, "a", TTL).await.expect("a");
    let (b, _brx) = session(&urls[1..], "b", TTL).await.expect("b");
    let b = Arc::new(b);

    let g1 = a
        .acquire("md/x/slot/1", Mode::Exclusive, Wait::NoQueue)
        .await
        .expect("slot/1");
    a.write_value("md/x/slot/1", g1.token, b"one")
        .await
        .expect("value of slot/1");
    let g10 = b
        .acquire("md/x/slot/10", Mode::Exclusive, Wait::NoQueue)
        .await
        .expect("slot/10");
    b.write_value("md/x/slot/10", g10.token, b"ten")
        .await
        .expect("value of slot/10");
    b.release("md/x/slot/10", g10.token).await.expect("release");
    a.acquire("md/x/resync", Mode::Shared, Wait::NoQueue)
        .await
        .expect("a shared");
    b.acquire("md/x/resync", Mode::Shared, Wait::NoQueue)
        .await
        .expect("b shared");
    // b queues behind a on slot/1: a waiter is not a holder.
    let b2 = b.clone();
    let waiter = tokio::spawn(async move {
        b2.acquire("md/x/slot/1", Mode::Exclusive, Wait::Queue(LONG))
            .await
    });
    wait_note(
        &mut arx,
        LONG,
        |n| matches!(n, Notification::Blocking { resource, .. } if resource == "md/x/slot/1"),
    )
    .await
    .expect("b's request queued behind a");
    // Outside the prefix.
    a.acquire("md/xy/token", Mode::Exclusive, Wait::NoQueue)
        .await
        .expect("other array");

    let all = a.read_values("md/x/").await.expect("read_values");
    let got: Vec<(&str, &[u8], Vec<&str>)> = all
        .iter()
        .map(|l| {
            (
                l.resource.as_str(),
                l.value.as_slice(),
                l.holders.iter().map(String::as_str).collect(),
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            ("md/x/resync", &b""[..], vec!["a", "b"]),
            ("md/x/slot/1", &b"one"[..], vec!["a"]),
            ("md/x/slot/10", &b"ten"[..], vec![]),
        ]
    );
    for l in &all {
        let (value, holders) = b.read_value(&l.resource).await.expect("read_value");
        assert_eq!((&value, &holders), (&l.value, &l.holders), "{}", l.resource);
    }
    let wide = b.read_values("md/").await.expect("read_values md/");
    assert_eq!(wide.len(), 4, "{wide:?}");
    assert!(b.read_values("md/none/").await.expect("empty").is_empty());
    for bad in ["md//x", "/md", "md x", ""] {
        let e = a.read_values(bad).await.expect_err(bad);
        assert_eq!(e.errno(), Errno::Einval, "{bad:?}: {e}");
    }
    // The waiter is granted once a releases: the listing follows.
    a.release("md/x/slot/1", g1.token).await.expect("release");
    waiter.await.expect("waiter").expect("granted");
    let after = a.read_values("md/x/slot/1").await.expect("read_values");
    assert_eq!(after[0].holders, ["b"], "{after:?}");
}
