//! Failures against a real etcd and two real `mdserver` replicas: a lock holder killed
//! with -9, the replica an agent is connected to killed with -9, etcd restarted.

use std::time::{Duration, Instant};

use mdcluster_proto::lock_client::{Mode, Notification, Session, SessionConfig, Wait};
use mdcluster_proto::v1::lock_service_client::LockServiceClient;
use mdcluster_proto::v1::{AcquireRequest, Errno, LockMode};
use mdcluster_tests::server::{session, wait_note, Cluster, Holder, ServerOpts};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus as Serving;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const LONG: Duration = Duration::from_secs(30);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_holder_lock_goes_to_next_waiter_after_ttl() {
    let c = Cluster::start(2, ServerOpts::default()).expect("cluster");
    let urls = c.urls();
    let ttl = Duration::from_secs(2);
    // --- a separate agent process takes md0/token, a waiter queues behind it.
    let mut dead = Holder::start(&urls, "dead", ttl, &["lock=md0/token"]).expect("holder");
    let (w, mut wrx) = session(&urls[1..], "survivor", ttl).await.expect("waiter");
    let waiter = tokio::spawn(async move {
        let g = w
            .acquire("md0/token", Mode::Exclusive, Wait::Queue(LONG))
            .await;
        (w, g)
    });
    // Wait until the survivor is queued behind the holder, then queue a second waiter
    // behind the survivor.
    let (probe, _prx) = session(&urls, "probe", ttl).await.expect("probe");
    let deadline = Instant::now() + LONG;
    while !waiters_queued(&c, 2).await {
        assert!(Instant::now() < deadline, "waiter never queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (second, mut srx) = session(&urls, "second", ttl).await.expect("second");
    let second_wait = tokio::spawn(async move {
        let r = second
            .acquire("md0/token", Mode::Exclusive, Wait::Queue(LONG))
            .await;
        (second, r)
    });
    while probe.read_value("md0/token").await.expect("read").1 != ["dead"]
        || !waiters_queued(&c, 3).await
    {
        assert!(Instant::now() < deadline, "waiter never queued");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // --- kill -9 the holder: after its TTL the waiter is granted and told whose
    // lease expired.
    let killed = Instant::now();
    dead.kill();
    let (w, g) = tokio::time::timeout(LONG, waiter)
        .await
        .expect("waiter in time")
        .expect("join");
    let g = g.expect("granted after expiry");
    let after = killed.elapsed();
    assert!(
        after >= Duration::from_millis(1000),
        "granted {after:?} after the kill: before the TTL"
    );
    assert_eq!(g.expired_holders, vec!["dead".to_string()]);
    assert!(g.token > dead.token);
    let n = wait_note(&mut wrx, LONG, |n| {
        matches!(n, Notification::HolderExpired { .. })
    })
    .await
    .expect("note");
    assert_eq!(
        n,
        Notification::HolderExpired {
            resource: "md0/token".into(),
            node: "dead".into(),
            session_id: dead.session_id
        }
    );
    // The waiter further back is told too, by the survivor (it watched the survivor).
    let n = wait_note(&mut srx, LONG, |n| {
        matches!(n, Notification::HolderExpired { .. })
    })
    .await
    .expect("note");
    assert!(matches!(n, Notification::HolderExpired { node, .. } if node == "dead"));
    second_wait.abort();
    // The dead node left the registry with its lease.
    let nodes: Vec<String> = w
        .nodes()
        .await
        .expect("nodes")
        .into_iter()
        .map(|n| n.node)
        .collect();
    assert!(!nodes.contains(&"dead".to_string()), "{nodes:?}");
    // --- a request made with the dead session gets a clean error.
    let mut raw = LockServiceClient::connect(urls[0].clone())
        .await
        .expect("connect");
    let s = raw
        .acquire(AcquireRequest {
            session_id: dead.session_id,
            resource: "x".into(),
            mode: LockMode::Exclusive as i32,
            no_queue: true,
            wait_ms: 0,
        })
        .await
        .expect_err("dead session");
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    assert!(s.message().contains("open a new session"), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_agent_waits_for_its_old_session_to_expire() {
    let c = Cluster::start(2, ServerOpts::default()).expect("cluster");
    let urls = c.urls();
    let ttl = Duration::from_secs(2);
    let mut old = Holder::start(&urls, "n1", ttl, &["lock=md0/slot/1"]).expect("holder");
    // --- the agent of n1 dies and restarts at once: its old session still lives, so a
    // plain open is refused (EBUSY, naming it), and a waiting open succeeds after the
    // old lease expired, with the old lock released.
    old.kill();
    let e = session(&urls, "n1", ttl)
        .await
        .expect_err("old session alive");
    assert_eq!(e.errno(), Errno::Ebusy, "{e}");
    assert!(
        e.to_string().contains(&format!("{:x}", old.session_id)),
        "{e}"
    );
    let mut cfg = SessionConfig::new(urls.clone(), "n1", "n1.agent:7481");
    cfg.ttl = ttl;
    let (s, _rx) = Session::open_waiting(cfg, LONG)
        .await
        .expect("open after expiry");
    assert_ne!(s.id(), old.session_id);
    let g = s
        .acquire("md0/slot/1", Mode::Exclusive, Wait::NoQueue)
        .await
        .expect("slot");
    assert!(g.token > old.token);
}

/// True once the lock queue of md0/token has `n` requests.
async fn waiters_queued(c: &Cluster, n: i64) -> bool {
    let Ok(mut e) = etcd_client::Client::connect([c.etcd.url()], None).await else {
        return false;
    };
    let opts = etcd_client::GetOptions::new()
        .with_prefix()
        .with_count_only();
    match e.get("/mdcluster/test/locks/md0/token#/", Some(opts)).await {
        Ok(r) => r.count() == n,
        Err(_) => false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_replica_session_resumes_on_the_other_and_keeps_its_locks() {
    let mut c = Cluster::start(2, ServerOpts::default()).expect("cluster");
    let urls = c.urls();
    let ttl = Duration::from_secs(3);
    // --- a connects to replica 0 and takes a lock; b is on replica 1.
    let (a, mut arx) = session(&urls, "a", ttl).await.expect("a");
    assert_eq!(a.endpoint(), urls[0]);
    let g = a
        .acquire("md0/slot/0", Mode::Exclusive, Wait::NoQueue)
        .await
        .expect("acquire");
    let (b, _brx) = session(&urls[1..], "b", ttl).await.expect("b");
    // --- kill -9 replica 0: a resumes on replica 1 with the same session.
    c.servers[0].kill();
    let n = wait_note(&mut arx, LONG, |n| {
        matches!(n, Notification::Reconnected { .. })
    })
    .await
    .expect("reconnected");
    assert_eq!(
        n,
        Notification::Reconnected {
            endpoint: urls[1].clone()
        }
    );
    // --- well past the TTL, a still holds the lock and its fencing token works.
    let until = Instant::now() + ttl + Duration::from_secs(1);
    while Instant::now() < until {
        let e = b
            .acquire("md0/slot/0", Mode::Exclusive, Wait::NoQueue)
            .await
            .expect_err("still held");
        assert_eq!(e.errno(), Errno::Ebusy, "{e}");
        assert!(e.to_string().contains("held by a"), "{e}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(
        a.is_live(),
        "a's fence deadline moved with heartbeats on the new replica"
    );
    a.write_value("md0/slot/0", g.token, b"window")
        .await
        .expect("fenced write after resume");
    a.release("md0/slot/0", g.token).await.expect("release");
    b.acquire("md0/slot/0", Mode::Exclusive, Wait::NoQueue)
        .await
        .expect("b acquires");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graceful_stop_moves_sessions_to_another_replica_at_once() {
    let mut c = Cluster::start(2, ServerOpts::default()).expect("cluster");
    let urls = c.urls();
    let (a, mut arx) = session(&urls, "a", Duration::from_secs(3))
        .await
        .expect("a");
    let g = a
        .acquire("md0/token", Mode::Exclusive, Wait::NoQueue)
        .await
        .expect("acquire");
    // --- SIGTERM replica 0: its session streams end at once (not after the grace), the
    // agent resumes on replica 1, and the replica exits cleanly within its grace.
    let t = Instant::now();
    let stop = tokio::task::spawn_blocking(move || {
        let ok = c.servers[0]
            .terminate(Duration::from_secs(10))
            .expect("terminate");
        (c, ok)
    });
    let n = wait_note(&mut arx, LONG, |n| {
        matches!(n, Notification::Reconnected { .. })
    })
    .await
    .expect("moved");
    assert_eq!(
        n,
        Notification::Reconnected {
            endpoint: urls[1].clone()
        }
    );
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "moved after {:?}",
        t.elapsed()
    );
    let (_c, exited) = stop.await.expect("join");
    assert!(exited, "replica 0 did not exit cleanly after SIGTERM");
    a.write_value("md0/token", g.token, b"still mine")
        .await
        .expect("fenced write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restart_keeps_live_sessions_and_fails_cleanly_meanwhile() {
    let mut c = Cluster::start(2, ServerOpts::default()).expect("cluster");
    let urls = c.urls();
    let ttl = Duration::from_secs(6);
    let (a, _arx) = session(&urls, "a", ttl).await.expect("a");
    let g = a
        .acquire("md0/token", Mode::Exclusive, Wait::NoQueue)
        .await
        .expect("acquire");
    // A holder that dies while etcd is down: its session does not outlive the restart.
    let mut gone =
        Holder::start(&urls, "gone", Duration::from_secs(2), &["lock=md0/resync"]).expect("holder");
    assert_eq!(health(&urls[0]).await, Some(Serving::Serving));
    // --- etcd down: calls fail with a clean EIO/Unavailable error in bounded time.
    c.etcd.kill();
    gone.kill();
    let t = Instant::now();
    let e = a
        .acquire("other", Mode::Exclusive, Wait::NoQueue)
        .await
        .expect_err("etcd down");
    assert_eq!(e.code(), Code::Unavailable, "{e}");
    assert_eq!(e.errno(), Errno::Eio, "{e}");
    assert!(e.to_string().contains("etcd"), "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "took {:?}",
        t.elapsed()
    );
    // The gRPC health service (Kubernetes probes) reports NOT_SERVING meanwhile.
    wait_health(&urls[0], Serving::NotServing).await;
    // --- etcd back: a's session outlived the restart and still holds its lock.
    c.etcd.restart().expect("restart etcd");
    wait_health(&urls[1], Serving::Serving).await;
    let deadline = Instant::now() + LONG;
    let (b, _brx) = loop {
        match session(&urls[1..], "b", ttl).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no session after the restart: {e}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let e = b
        .acquire("md0/token", Mode::Exclusive, Wait::NoQueue)
        .await
        .expect_err("still held");
    assert!(e.to_string().contains("held by a"), "{e}");
    a.write_value("md0/token", g.token, b"v")
        .await
        .expect("fenced write after restart");
    // The dead holder's lease expires after the restart; its lock passes on.
    let g2 = b
        .acquire("md0/resync", Mode::Exclusive, Wait::Queue(LONG))
        .await
        .expect("resync lock");
    assert_eq!(g2.expired_holders, vec!["gone".to_string()]);
    assert!(a.is_live());
}

/// The health of the lock service on replica `url` (None if unreachable).
async fn health(url: &str) -> Option<Serving> {
    let ch = tonic::transport::Endpoint::from_shared(url.to_string()).ok()?;
    let mut h = HealthClient::new(ch.connect().await.ok()?);
    let req = HealthCheckRequest {
        service: "mdcluster.v1.LockService".into(),
    };
    let r = h.check(req).await.ok()?.into_inner();
    Serving::try_from(r.status).ok()
}

/// Waits until replica `url` reports `want`.
async fn wait_health(url: &str, want: Serving) {
    let deadline = Instant::now() + LONG;
    while health(url).await != Some(want) {
        assert!(Instant::now() < deadline, "{url} never reported {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
