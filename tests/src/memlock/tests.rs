//! The in-memory lock service against the lock service's contract (docs/LOCKS.md).

use super::*;

const TTL: Duration = Duration::from_secs(4);
const SHORT: Duration = Duration::from_millis(50);

fn errno(e: &LockClientError) -> Errno {
    e.errno()
}

async fn next(rx: &mut mpsc::Receiver<Notification>) -> Notification {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .expect("a notification within 5 s")
        .expect("channel open")
}

#[tokio::test]
async fn one_live_session_per_node() {
    let m = MemLock::new();
    let (a, _rx) = m.open_session("n1", "a1", TTL).unwrap();
    let e = m.open_session("n1", "a1", TTL).unwrap_err();
    assert_eq!(errno(&e), Errno::Ebusy);
    assert_eq!(e.code(), Code::AlreadyExists);
    let (_b, _rxb) = m.open_session("n2", "a2", TTL).unwrap();
    let nodes = a.nodes().await.unwrap();
    let names: Vec<_> = nodes.iter().map(|n| n.node.as_str()).collect();
    assert_eq!(names, ["n1", "n2"]);
    assert!(a.is_live());
    a.close().await.unwrap();
    assert!(!a.is_live());
    assert!(a.fence_deadline_handle().get().is_none());
    // Closed: the node may open again.
    let (_c, _rxc) = m.open_session("n1", "a1", TTL).unwrap();
}

#[tokio::test]
async fn exclusive_and_shared_grants_and_tokens() {
    let m = MemLock::new();
    let (a, _ra) = m.open_session("n1", "", TTL).unwrap();
    let (b, _rb) = m.open_session("n2", "", TTL).unwrap();
    let ga = a.acquire("r", Mode::Shared, Wait::NoQueue).await.unwrap();
    let gb = b.acquire("r", Mode::Shared, Wait::NoQueue).await.unwrap();
    assert!(
        gb.token > ga.token,
        "tokens grow: {} then {}",
        ga.token,
        gb.token
    );
    assert_eq!(m.holders("r"), ["n1", "n2"]);
    // Idempotent per session and mode; another mode is EPERM.
    let again = a.acquire("r", Mode::Shared, Wait::NoQueue).await.unwrap();
    assert_eq!(again.token, ga.token);
    let e = a
        .acquire("r", Mode::Exclusive, Wait::NoQueue)
        .await
        .unwrap_err();
    assert_eq!(errno(&e), Errno::Eperm);
    // An exclusive request meets shared holders: EBUSY naming them.
    let (c, _rc) = m.open_session("n3", "", TTL).unwrap();
    let e = c
        .acquire("r", Mode::Exclusive, Wait::NoQueue)
        .await
        .unwrap_err();
    assert_eq!(errno(&e), Errno::Ebusy);
    assert!(e.to_string().contains("n1, n2"), "{e}");
    assert_eq!(
        m.holders("r"),
        ["n1", "n2"],
        "the no-queue request was withdrawn"
    );
    // Release by the wrong token: ENOENT; by the right one: gone.
    let e = a.release("r", ga.token + 100).await.unwrap_err();
    assert_eq!(errno(&e), Errno::Enoent);
    a.release("r", ga.token).await.unwrap();
    b.release("r", 0).await.unwrap();
    assert!(m.holders("r").is_empty());
}

#[tokio::test]
async fn queued_wait_is_granted_after_release_with_notifications() {
    let m = MemLock::new();
    let (a, mut ra) = m.open_session("n1", "", TTL).unwrap();
    let (b, mut rb) = m.open_session("n2", "", TTL).unwrap();
    let ga = a
        .acquire("r", Mode::Exclusive, Wait::NoQueue)
        .await
        .unwrap();
    let b2 = b.clone_port();
    let waiter = tokio::spawn(async move {
        b2.acquire("r", Mode::Exclusive, Wait::Queue(Duration::from_secs(5)))
            .await
    });
    match next(&mut ra).await {
        Notification::Blocking {
            resource,
            waiter_node,
            waiter_mode,
        } => {
            assert_eq!((resource.as_str(), waiter_node.as_str()), ("r", "n2"));
            assert_eq!(waiter_mode, Mode::Exclusive);
        }
        other => panic!("expected Blocking, got {other:?}"),
    }
    a.write_value("r", ga.token, b"v1").await.unwrap();
    a.release("r", ga.token).await.unwrap();
    let gb = waiter.await.unwrap().unwrap();
    assert_eq!(
        gb.value, b"v1",
        "the value block outlives its writer's hold"
    );
    assert!(gb.token > ga.token);
    assert!(gb.expired_holders.is_empty(), "a release is no expiry");
    assert!(
        matches!(next(&mut rb).await, Notification::Granted { token, .. } if token == gb.token)
    );
}

#[tokio::test]
async fn deadline_withdraws_and_cancelled_waiter_leaves_nothing() {
    let m = MemLock::new();
    let (a, _ra) = m.open_session("n1", "", TTL).unwrap();
    let (b, _rb) = m.open_session("n2", "", TTL).unwrap();
    a.acquire("r", Mode::Exclusive, Wait::NoQueue)
        .await
        .unwrap();
    let e = b
        .acquire("r", Mode::Exclusive, Wait::Queue(SHORT))
        .await
        .unwrap_err();
    assert_eq!(errno(&e), Errno::Etimedout);
    assert!(e.to_string().contains("n1"), "{e}");
    // A waiter dropped mid-wait withdraws its request.
    let fut = b.acquire("r", Mode::Exclusive, Wait::Queue(Duration::from_secs(5)));
    assert!(tokio::time::timeout(SHORT, fut).await.is_err());
    let st = m.st();
    assert_eq!(
        st.queues.get("r").map(|q| q.len()),
        Some(1),
        "only n1's request is left"
    );
}

#[tokio::test]
async fn value_is_written_only_by_the_exclusive_holder() {
    let m = MemLock::new();
    let (a, _ra) = m.open_session("n1", "", TTL).unwrap();
    let g = a.acquire("r", Mode::Shared, Wait::NoQueue).await.unwrap();
    let e = a.write_value("r", g.token, b"x").await.unwrap_err();
    assert_eq!(errno(&e), Errno::Eperm);
    assert_eq!(
        a.convert("r", g.token, Mode::Exclusive, Wait::NoQueue)
            .await
            .unwrap(),
        Mode::Exclusive
    );
    a.write_value("r", g.token, b"x").await.unwrap();
    let e = a.write_value("r", g.token + 1, b"y").await.unwrap_err();
    assert_eq!(errno(&e), Errno::Enoent, "a stale token writes nothing");
    let e = a
        .write_value("r", g.token, &[0; MAX_VALUE + 1])
        .await
        .unwrap_err();
    assert_eq!(errno(&e), Errno::Einval);
    assert_eq!(
        a.read_value("r").await.unwrap(),
        (b"x".to_vec(), vec!["n1".to_string()])
    );
}

#[tokio::test]
async fn kill_releases_locks_tells_waiters_and_the_session() {
    let m = MemLock::new();
    let (a, mut ra) = m.open_session("n1", "", TTL).unwrap();
    let (b, mut rb) = m.open_session("n2", "", TTL).unwrap();
    a.acquire("r", Mode::Exclusive, Wait::NoQueue)
        .await
        .unwrap();
    a.subscribe("ch").await.unwrap();
    let b2 = b.clone_port();
    let waiter = tokio::spawn(async move {
        b2.acquire("r", Mode::Exclusive, Wait::Queue(Duration::from_secs(5)))
            .await
    });
    assert!(matches!(next(&mut ra).await, Notification::Blocking { .. }));
    let handle = a.fence_deadline_handle();
    assert!(handle.get().is_some());
    assert!(m.kill("n1"));
    let g = waiter.await.unwrap().unwrap();
    assert_eq!(g.expired_holders, ["n1"]);
    assert!(
        matches!(next(&mut rb).await, Notification::HolderExpired { node, .. } if node == "n1")
    );
    assert!(matches!(next(&mut ra).await, Notification::Lost { .. }));
    assert!(handle.get().is_none(), "the fence deadline empties");
    assert_eq!(a.state(), SessionState::Lost);
    let e = a
        .acquire("q", Mode::Shared, Wait::NoQueue)
        .await
        .unwrap_err();
    assert!(matches!(e, LockClientError::SessionLost { .. }), "{e}");
    let nodes: Vec<_> = b
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.node)
        .collect();
    assert_eq!(nodes, ["n2"]);
    // Its subscription went with it: a publish has nobody to wait for.
    b.subscribe("ch").await.unwrap();
    let out = b.publish("ch", b"p", SHORT).await.unwrap();
    assert!(out.results.is_empty() && out.all_ok);
    // The node may open a new session.
    assert!(m.open("n1", "", TTL).is_ok());
}

#[tokio::test]
async fn publish_waits_for_every_ack_and_reports_nacks_and_silence() {
    let m = MemLock::new();
    let (a, _ra) = m.open_session("n1", "", TTL).unwrap();
    let (b, mut rb) = m.open_session("n2", "", TTL).unwrap();
    let (c, mut rc) = m.open_session("n3", "", TTL).unwrap();
    let (d, _rd) = m.open_session("n4", "", TTL).unwrap();
    for s in [&a, &b, &c, &d] {
        s.subscribe("ch").await.unwrap();
    }
    let a2 = a.clone_port();
    let publish =
        tokio::spawn(async move { a2.publish("ch", b"hello", Duration::from_millis(300)).await });
    let Notification::Message(mb) = next(&mut rb).await else {
        panic!("n2: expected a message")
    };
    assert_eq!(
        (mb.publisher_node.as_str(), mb.payload.as_slice()),
        ("n1", &b"hello"[..])
    );
    let Notification::Message(mc) = next(&mut rc).await else {
        panic!("n3: expected a message")
    };
    b.ack(&mb.message_id, Ok(())).await.unwrap();
    c.ack(&mc.message_id, Err("no such disk".into()))
        .await
        .unwrap();
    // n4 stays silent.
    let out = publish.await.unwrap().unwrap();
    assert!(!out.all_ok);
    let got: Vec<_> = out
        .results
        .iter()
        .map(|r| (r.node.as_str(), r.answered, r.ok, r.reason.as_str()))
        .collect();
    assert_eq!(got[0], ("n2", true, true, ""));
    assert_eq!(got[1], ("n3", true, false, "no such disk"));
    assert_eq!((got[2].0, got[2].1, got[2].2), ("n4", false, false));
    assert!(got[2].3.contains("no answer"), "{}", got[2].3);
    assert_eq!(out.unanswered(), ["n4"]);
    // The publish ended: a late ack is ENOENT.
    let e = d.ack(&mb.message_id, Ok(())).await.unwrap_err();
    assert_eq!(errno(&e), Errno::Enoent);
}

#[tokio::test]
async fn a_recipient_that_dies_while_a_publish_waits_has_left_the_channel() {
    let m = MemLock::new();
    let (a, _ra) = m.open_session("n1", "", TTL).unwrap();
    let (b, _rb) = m.open_session("n2", "", TTL).unwrap();
    a.subscribe("ch").await.unwrap();
    b.subscribe("ch").await.unwrap();
    let a2 = a.clone_port();
    let publish = tokio::spawn(async move { a2.publish("ch", b"x", Duration::from_secs(5)).await });
    tokio::time::sleep(SHORT).await;
    let t = Instant::now();
    m.kill("n2");
    let out = publish.await.unwrap().unwrap();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the publish stopped waiting at once"
    );
    assert!(out.all_ok);
    assert!(!out.results[0].answered && out.results[0].reason.contains("left the channel"));
}

#[tokio::test]
async fn delays_keep_order_per_session() {
    let m = MemLock::new();
    let (a, _ra) = m.open_session("n1", "", TTL).unwrap();
    let (b, mut rb) = m.open_session("n2", "", TTL).unwrap();
    b.subscribe("ch").await.unwrap();
    let n = Arc::new(AtomicU64::new(0));
    let n2 = n.clone();
    // Decreasing delays: without the per-session order the last would arrive first.
    m.set_delay(Some(Arc::new(move |_, _| {
        Duration::from_millis(30u64.saturating_sub(10 * n2.fetch_add(1, Ordering::Relaxed)))
    })));
    for i in 0..3u8 {
        let a2 = a.clone_port();
        tokio::spawn(async move { a2.publish("ch", &[i], SHORT).await });
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    for i in 0..3u8 {
        let Notification::Message(d) = next(&mut rb).await else {
            panic!("expected a message")
        };
        assert_eq!(d.payload, [i]);
    }
    assert_eq!(n.load(Ordering::Relaxed), 3);
}
