//! t80: a node acts only for itself. A client holding node2's valid certificate cannot
//! see node1's session id, resume or open node1's session, release or take node1's slot
//! lock, publish or subscribe through node1's session; node1's array keeps running and
//! no takeover happens.
//!
//! Two nodes run with mutual TLS and a clustered mirror assembled on both. The rogue is
//! this test process with node2's certificate, talking to mdserver's lock service
//! directly. node1's real session id, slot lock and fencing token are read from etcd (as
//! only an etcd administrator could), so every refused call would have hit a real
//! target.

use std::time::Duration;

use mdcluster_proto::tls::{Tls, TlsFiles, Transport};
use mdcluster_proto::v1::lock_service_client::LockServiceClient;
use mdcluster_proto::v1::{
    session_request, AcquireRequest, ListNodesRequest, LockMode, OpenSession, PublishRequest,
    ReleaseRequest, SessionRequest, SubscribeRequest,
};
use mdcluster_tests::cluster::{ClusterBuilder, TestCluster};
use mdcluster_tests::pki::ClusterPki;
use mdcluster_tests::standalone::member_files;
use tonic::transport::Channel;

/// `(key, create revision, value)` of every etcd key under the cluster's `sub`.
fn etcd_get(c: &TestCluster, sub: &str) -> Vec<(String, i64, String)> {
    let prefix = format!("/mdcluster/{}/{sub}", c.cluster_name());
    mdcluster_tests::etcd::range_blocking(&c.etcd.url(), &prefix)
        .into_iter()
        .map(|kv| {
            let value = String::from_utf8_lossy(&kv.value).into_owned();
            (kv.key, kv.create_revision, value)
        })
        .collect()
}

/// node1's session id from its registry entry.
fn session_of(c: &TestCluster, node: &str) -> i64 {
    let kvs = etcd_get(c, &format!("nodes/{node}"));
    let (_, _, v) = kvs
        .first()
        .unwrap_or_else(|| panic!("no registry entry of {node}"));
    let rec: serde_json::Value = serde_json::from_str(v).unwrap();
    rec["session_id"].as_i64().expect("session_id")
}

fn denied<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>) -> String {
    let st = r.expect_err(&format!("{what} must be refused"));
    eprintln!("{what}: {:?} {}", st.code(), st.message());
    assert_eq!(st.code(), tonic::Code::PermissionDenied, "{what}: {st:?}");
    st.message().to_owned()
}

async fn open(
    ch: Channel,
    node: &str,
    resume: i64,
) -> Result<tonic::Streaming<mdcluster_proto::v1::SessionEvent>, tonic::Status> {
    let req = SessionRequest {
        kind: Some(session_request::Kind::Open(OpenSession {
            node: node.into(),
            agent_addr: "127.0.0.9:1".into(),
            ttl_ms: 0,
            resume_session_id: resume,
        })),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tx.send(req).await.unwrap();
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        LockServiceClient::new(ch).session(tokio_stream::wrappers::ReceiverStream::new(rx)),
    )
    .await
    .expect("session call timed out")?
    .into_inner();
    // The first answer tells whether the session opened.
    match tokio::time::timeout(Duration::from_secs(10), s.message()).await {
        Ok(Ok(_)) => Ok(s),
        Ok(Err(st)) => Err(st),
        Err(_) => panic!("no answer to the session open"),
    }
}

#[test]
fn node2s_certificate_cannot_act_for_node1() {
    let dir = tempfile::tempdir().unwrap();
    let pki = ClusterPki::generate(dir.path(), 2).unwrap();
    let c = ClusterBuilder::new(2).tls(&pki).start().unwrap();
    let m = member_files(c.path(), "m", 2, 32 << 20);
    let ms: Vec<String> = m.iter().map(|p| p.display().to_string()).collect();
    c.mirror_on_two_nodes("md0", &ms[0], &ms[1]);

    let id1 = session_of(&c, "node1");
    let id2 = session_of(&c, "node2");
    let hex1 = format!("{:016x}", id1 as u64);
    let locks = etcd_get(&c, "locks/");
    let (slot_key, token, _) = locks
        .iter()
        .find(|(k, _, _)| k.contains("/slot/") && k.ends_with(&hex1))
        .unwrap_or_else(|| panic!("node1 holds no slot lock: {locks:?}"))
        .clone();
    let root = format!("/mdcluster/{}/locks/", c.cluster_name());
    let resource = slot_key
        .strip_prefix(&root)
        .and_then(|r| r.split_once("#/"))
        .map(|(r, _)| r.to_owned())
        .unwrap();
    let subs = etcd_get(&c, "subs/");
    let channel = subs
        .iter()
        .find(|(k, _, _)| k.ends_with(&hex1))
        .and_then(|(k, _, _)| {
            k.strip_prefix(&format!("/mdcluster/{}/subs/", c.cluster_name()))
                .and_then(|r| r.split_once("#/"))
                .map(|(ch, _)| ch.to_owned())
        })
        .unwrap_or_else(|| panic!("node1 subscribes to no channel: {subs:?}"));
    eprintln!("node1: session {id1:x}, slot lock {resource} (token {token}), channel {channel}");
    let mdstat_before = c.mdctl_ok(&["--node", "node1", "mdstat"]);
    assert!(mdstat_before.contains("md0 : active"), "{mdstat_before}");

    let rogue = Transport::Tls(
        Tls::load(TlsFiles {
            ca: pki.nodes[1].ca.clone(),
            cert: pki.nodes[1].cert.clone(),
            key: pki.nodes[1].key.clone(),
        })
        .unwrap(),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let ep = rogue
            .endpoint(&c.url())
            .unwrap()
            .connect_timeout(Duration::from_secs(3));
        let ch = rogue
            .connect(&ep, None)
            .await
            .expect("node2's certificate connects");
        let mut lock = LockServiceClient::new(ch.clone());

        eprintln!("--- ListNodes shows node2 its own session id only");
        let nodes = lock
            .list_nodes(ListNodesRequest {})
            .await
            .expect("node2 may list the nodes")
            .into_inner()
            .nodes;
        let n1 = nodes
            .iter()
            .find(|n| n.node == "node1")
            .expect("node1 listed");
        let n2 = nodes
            .iter()
            .find(|n| n.node == "node2")
            .expect("node2 listed");
        assert_eq!(n1.session_id, 0, "node1's session id shown to node2");
        assert_eq!(n2.session_id, id2, "node2 sees its own session id");

        eprintln!("--- resume node1's session, as node1 and as node2; open one as node1");
        let m = denied(
            "resume node1's session as node1",
            open(ch.clone(), "node1", id1).await,
        );
        assert!(m.contains("node node2") && m.contains("node1"), "{m}");
        denied(
            "resume node1's session as node2",
            open(ch.clone(), "node2", id1).await,
        );
        denied(
            "open a session as node1",
            open(ch.clone(), "node1", 0).await,
        );

        eprintln!("--- release, take, publish, subscribe through node1's session");
        let m = denied(
            "release node1's slot lock",
            lock.release(ReleaseRequest {
                session_id: id1,
                resource: resource.clone(),
                token: token as u64,
            })
            .await,
        );
        assert!(m.contains("not its own"), "{m}");
        denied(
            "acquire with node1's session",
            lock.acquire(AcquireRequest {
                session_id: id1,
                resource: resource.clone(),
                mode: LockMode::Exclusive as i32,
                no_queue: true,
                wait_ms: 0,
            })
            .await,
        );
        denied(
            "publish as node1",
            lock.publish(PublishRequest {
                session_id: id1,
                channel: channel.clone(),
                payload: b"RESYNCING 0 18446744073709551615".to_vec(),
                timeout_ms: 1000,
            })
            .await,
        );
        denied(
            "subscribe node1's session",
            lock.subscribe(SubscribeRequest {
                session_id: id1,
                channel: channel.clone(),
            })
            .await,
        );
    });

    eprintln!("--- past node1's lease TTL: node1 keeps its session, slot and array");
    std::thread::sleep(Duration::from_secs(6));
    assert_eq!(session_of(&c, "node1"), id1, "node1's session was replaced");
    let locks = etcd_get(&c, "locks/");
    assert!(
        locks
            .iter()
            .any(|(k, rev, _)| *k == slot_key && *rev == token),
        "node1's slot lock {slot_key} is gone or was retaken: {locks:?}"
    );
    let mdstat = c.mdctl_ok(&["--node", "node1", "mdstat"]);
    assert!(mdstat.contains("md0 : active"), "{mdstat}");
    let log1 = c.agents[0].log_text();
    let log2 = c.agents[1].log_text();
    for (n, log) in [("node1", &log1), ("node2", &log2)] {
        for marker in [
            "recovering the bitmap slot of a failed node",
            "holder expired",
            "session open again",
        ] {
            assert!(!log.contains(marker), "{n} logged {marker:?}:\n{log}");
        }
    }
}
