//! Messages against a real etcd and two real `mdserver` replicas: publish to three
//! subscribers (all ack, in order), a dead subscriber named at the deadline, a negative
//! ack with its reason, and delivered messages cleaned up from etcd.

use std::time::{Duration, Instant};

use mdcluster_proto::lock_client::{Notification, Session};
use mdcluster_tests::server::{session, Cluster, Holder, ServerOpts};
use tokio::sync::mpsc;

const TTL: Duration = Duration::from_secs(3);
const LONG: Duration = Duration::from_secs(20);

/// Acks every message (negatively with `refuse`), and reports payloads in arrival order.
fn acker(
    s: Session,
    mut rx: mpsc::Receiver<Notification>,
    refuse: Option<&'static str>,
) -> mpsc::Receiver<Vec<u8>> {
    let (tx, out) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Some(n) = rx.recv().await {
            if let Notification::Message(m) = n {
                let r = match refuse {
                    Some(why) => Err(why.to_string()),
                    None => Ok(()),
                };
                s.ack(&m.message_id, r).await.expect("ack");
                let _ = tx.send(m.payload).await;
            }
        }
    });
    out
}

async fn keys_under(c: &Cluster, prefix: &str) -> i64 {
    let mut e = etcd_client::Client::connect([c.etcd.url()], None)
        .await
        .expect("etcd");
    let opts = etcd_client::GetOptions::new()
        .with_prefix()
        .with_count_only();
    e.get(format!("/mdcluster/test/{prefix}"), Some(opts))
        .await
        .expect("get")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn publish_to_three_subscribers_all_ack_in_order_and_clean_up() {
    let c = Cluster::start(2, ServerOpts::default()).expect("cluster");
    let urls = c.urls();
    let mut seen = Vec::new();
    for (i, n) in ["n1", "n2", "n3"].into_iter().enumerate() {
        let mut u = urls.clone();
        u.rotate_left(i % 2);
        let (s, rx) = session(&u, n, TTL).await.expect("subscriber");
        s.subscribe("md0/events").await.expect("subscribe");
        seen.push(acker(s, rx, None));
    }
    let (p, _prx) = session(&urls, "pub", TTL).await.expect("publisher");
    for i in 0..5u8 {
        let out = p.publish("md0/events", &[i], LONG).await.expect("publish");
        assert!(out.all_ok, "{out:?}");
        let nodes: Vec<_> = out
            .results
            .iter()
            .map(|r| (r.node.as_str(), r.answered, r.ok))
            .collect();
        assert_eq!(
            nodes,
            vec![("n1", true, true), ("n2", true, true), ("n3", true, true)]
        );
    }
    for rx in &mut seen {
        let mut got = Vec::new();
        for _ in 0..5 {
            got.push(
                tokio::time::timeout(LONG, rx.recv())
                    .await
                    .expect("payload")
                    .expect("open")[0],
            );
        }
        assert_eq!(got, vec![0, 1, 2, 3, 4], "in-order delivery");
    }
    // --- delivered messages and their acks are deleted from etcd.
    let deadline = Instant::now() + LONG;
    while keys_under(&c, "inbox/").await + keys_under(&c, "acks/").await > 0 {
        assert!(Instant::now() < deadline, "message keys left in etcd");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_subscriber_is_named_at_the_deadline_and_negative_acks_carry_reasons() {
    let c = Cluster::start(2, ServerOpts::default()).expect("cluster");
    let urls = c.urls();
    let (s1, r1) = session(&urls, "n1", TTL).await.expect("n1");
    s1.subscribe("md0/events").await.expect("subscribe");
    let _a1 = acker(s1, r1, None);
    let (s2, r2) = session(&urls[1..], "n2", TTL).await.expect("n2");
    s2.subscribe("md0/events").await.expect("subscribe");
    let _a2 = acker(s2, r2, Some("disk sdc not visible on n2"));
    let mut dead =
        Holder::start(&urls, "n3", Duration::from_secs(10), &["sub=md0/events"]).expect("n3");
    let (p, _prx) = session(&urls, "pub", TTL).await.expect("publisher");

    // --- all three answer: one negative ack, with its reason.
    let out = p
        .publish("md0/events", b"NEWDISK sdc", LONG)
        .await
        .expect("publish");
    assert!(!out.all_ok);
    let n2 = &out.results[1];
    assert_eq!((n2.node.as_str(), n2.answered, n2.ok), ("n2", true, false));
    assert_eq!(n2.reason, "disk sdc not visible on n2");
    assert!(out.results[0].ok && out.results[2].ok, "{out:?}");

    // --- n3 is killed -9 (its lease is still alive): publish ends at its deadline
    // naming it.
    dead.kill();
    let t = Instant::now();
    let out = p
        .publish(
            "md0/events",
            b"METADATA_UPDATED",
            Duration::from_millis(1500),
        )
        .await
        .expect("publish");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(1500) && took < Duration::from_secs(6),
        "{took:?}"
    );
    assert_eq!(out.unanswered(), vec!["n3"]);
    assert!(out.results[2].reason.contains("no answer"), "{out:?}");
    assert!(out.results[0].ok);
}

/// A subscriber that dies while a publish waits for it is not waited for once its lease
/// expires: the publish ends long before its deadline and reports that node as having
/// left the channel (`ok`, not `answered`), the others as answered.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn subscriber_whose_lease_expires_mid_publish_is_not_waited_for() {
    let c = Cluster::start(1, ServerOpts::default()).expect("cluster");
    let urls = c.urls();
    let (s1, r1) = session(&urls, "n1", TTL).await.expect("n1");
    s1.subscribe("md0/events").await.expect("subscribe");
    let _a1 = acker(s1, r1, None);
    let mut dead =
        Holder::start(&urls, "n2", Duration::from_secs(2), &["sub=md0/events"]).expect("n2");
    let (p, _prx) = session(&urls, "pub", TTL).await.expect("publisher");
    dead.kill();
    let t = Instant::now();
    let out = p
        .publish("md0/events", b"METADATA_UPDATED", LONG)
        .await
        .expect("publish");
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(8),
        "ended when n2's 2 s lease expired, not at the {LONG:?} deadline: {took:?}"
    );
    assert!(out.all_ok, "{out:?}");
    let n2 = out
        .results
        .iter()
        .find(|r| r.node == "n2")
        .expect("n2 listed");
    assert!(!n2.answered && n2.ok, "{out:?}");
    assert!(n2.reason.contains("left the channel"), "{out:?}");
    let n1 = out
        .results
        .iter()
        .find(|r| r.node == "n1")
        .expect("n1 listed");
    assert!(n1.answered && n1.ok, "{out:?}");
}
