//! The merged event stream of `mdctl monitor`: every live node's agent event stream
//! plus node events, on one bounded channel per watcher.
//!
//! A task per watcher compares the node registry every [`NODE_PERIOD`]: a new node gets
//! `NodeJoined` and a forwarder of its agent's `Watch` stream; a node that disappears
//! gets `NodeLeft` when its session was closed on purpose (the lock service's `closed/`
//! marker) and `NodeFailed` when its lease expired. A forwarder whose stream breaks
//! reconnects with backoff while the node is live. Everything ends when the watcher
//! goes away (the channel closes).

use std::collections::HashMap;
use std::pin::Pin;
use std::time::Duration;

use futures::Stream;
use mdcluster_proto::v1 as pb;
use mdcluster_proto::v1::NodeInfo;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt as _;
use tonic::Status;

use super::ClusterSvc;

/// How often the node registry is compared.
pub const NODE_PERIOD: Duration = Duration::from_millis(500);
/// Events buffered per watcher.
pub const CAPACITY: usize = 1024;

/// A stream of events.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ArrayEvent, Status>> + Send>>;

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn node_event(event: &str, node: &str, detail: String) -> pb::ArrayEvent {
    pb::ArrayEvent {
        event: event.into(),
        node: node.into(),
        detail,
        time_unix_ms: now_ms(),
        ..Default::default()
    }
}

/// Forwards `node`'s agent events until the receiver goes away or the task is aborted.
/// Forwards `node`'s agent events to `tx`; `recent`: the node has just joined, so its
/// first stream starts with the agent's recent events (those of its start, sent before
/// this forwarder connected).
async fn forward(
    svc: ClusterSvc,
    node: NodeInfo,
    tx: mpsc::Sender<pb::ArrayEvent>,
    mut recent: bool,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let stream = match svc.agent(&node) {
            Ok(mut c) => {
                tokio::time::timeout(super::READ_TIMEOUT, c.watch(pb::WatchRequest { recent }))
                    .await
            }
            Err(e) => {
                tracing::warn!(node = %node.node, "watch: {e}");
                return;
            }
        };
        match stream {
            Ok(Ok(s)) => {
                backoff = Duration::from_millis(100);
                // A reconnect must not repeat what the first stream delivered.
                recent = false;
                let mut s = s.into_inner();
                while let Some(ev) = s.next().await {
                    match ev {
                        Ok(ev) => {
                            if tx.send(ev).await.is_err() {
                                return;
                            }
                        }
                        Err(e) => {
                            tracing::debug!(node = %node.node, "watch stream ended: {e}");
                            break;
                        }
                    }
                }
            }
            Ok(Err(e)) => tracing::debug!(node = %node.node, "watch: {e}"),
            Err(_) => tracing::debug!(node = %node.node, "watch: no answer"),
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// The merged stream (only `filter`'s events when it names a node).
pub fn merged(svc: ClusterSvc, filter: String) -> EventStream {
    let (tx, rx) = mpsc::channel(CAPACITY);
    tokio::spawn(async move {
        let mut known: HashMap<String, (i64, tokio::task::JoinHandle<()>)> = HashMap::new();
        let mut first = true;
        let mut tick = tokio::time::interval(NODE_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = tx.closed() => break,
            }
            let nodes = match svc.live_nodes().await {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("monitor: listing nodes: {e}");
                    continue;
                }
            };
            let nodes: Vec<NodeInfo> = nodes
                .into_iter()
                .filter(|n| filter.is_empty() || n.node == filter)
                .collect();
            for n in &nodes {
                let fresh = match known.get(&n.node) {
                    None => true,
                    Some((sid, _)) => *sid != n.session_id,
                };
                if !fresh {
                    continue;
                }
                if let Some((_, h)) = known.remove(&n.node) {
                    h.abort();
                }
                if !first {
                    let _ = tx
                        .send(node_event(
                            "NodeJoined",
                            &n.node,
                            format!("node {} joined (agent at {})", n.node, n.agent_addr),
                        ))
                        .await;
                }
                let h = tokio::spawn(forward(svc.clone(), n.clone(), tx.clone(), !first));
                known.insert(n.node.clone(), (n.session_id, h));
            }
            let gone: Vec<String> = known
                .keys()
                .filter(|k| !nodes.iter().any(|n| &n.node == *k))
                .cloned()
                .collect();
            for g in gone {
                let Some((sid, h)) = known.remove(&g) else {
                    continue;
                };
                h.abort();
                let closed = svc
                    .ctx()
                    .etcd
                    .get("read closed marker", svc.ctx().keys.closed(sid), None)
                    .await
                    .map(|r| !r.kvs().is_empty())
                    .unwrap_or(false);
                let ev = if closed {
                    node_event(
                        "NodeLeft",
                        &g,
                        format!("node {g} left (its agent closed its session)"),
                    )
                } else {
                    node_event(
                        "NodeFailed",
                        &g,
                        format!("node {g} failed: its session lease expired"),
                    )
                };
                let _ = tx.send(ev).await;
            }
            first = false;
        }
        for (_, (_, h)) in known {
            h.abort();
        }
    });
    Box::pin(ReceiverStream::new(rx).map(Ok))
}
