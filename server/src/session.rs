//! Sessions: one etcd lease per node, kept alive by the replica the agent streams to.
//!
//! The session stream is a small state machine per replica:
//!
//! ```text
//!  Opening ──open/resume ok──▶ Serving ──heartbeat──▶ renew lease ──ack──▶ Serving
//!     │                          │  └─ lease gone (renewal TTL 0 / TTL -1) ──▶ Expired (told, stream ends)
//!     └─ invalid/busy ─▶ error   ├─ CloseSession ──▶ marker + revoke ──▶ Closed
//!                                ├─ stream broken ──▶ Detached (lease left to the agent:
//!                                │                     resume elsewhere within the TTL)
//!                                ├─ renewal failed (etcd unreachable/slow) ──▶ Unavailable
//!                                │     (EIO on the stream, stream ends, lease left to the agent)
//!                                └─ replica stopping ──▶ Detached (same)
//! ```
//!
//! The replica never renews a lease on its own: only an agent heartbeat does, so a dead
//! agent's lease expires and etcd deletes every key tied to it (its locks, its registry
//! entry, its subscriptions). A session is answered "gone" (`SessionExpired`, ENOENT) only
//! when etcd said so (a keep-alive answering TTL 0, `LeaseTimeToLive` answering −1); while
//! etcd does not answer, heartbeats and resumes are answered EIO/Unavailable and the
//! replica keeps running and forgets no session. Besides heartbeats the stream carries the session's
//! notifications and messages: those from this replica come through the [`Notifier`],
//! the rest from the session's etcd inbox, which this replica watches while it serves.
//!
//! [`Notifier`]: crate::notify::Notifier

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Compare, CompareOp, LeaseKeepAliveStream, LeaseKeeper, PutOptions, Txn, TxnOp, TxnOpResponse,
    WatchFilterType, WatchOptions,
};
use mdcluster_proto::v1::{
    session_event, session_request, HeartbeatAck, OpenSession, SessionEvent, SessionExpired,
    SessionOpened, SessionRequest,
};
use prost::Message;
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use crate::error::LockError;
use crate::notify::StreamTx;
use crate::records::{decode, encode, NodeRecord, SessionRecord};
use crate::validate;
use crate::Ctx;

/// Events queued towards one agent before the stream counts as stalled.
pub const STREAM_CAPACITY: usize = 256;
/// How long a send to a stalled agent may block before the stream is dropped.
const SEND_TIMEOUT: Duration = Duration::from_secs(5);
/// Most message ids remembered per stream to avoid delivering one twice.
const SEEN_CAPACITY: usize = 4096;
/// Shortest and longest session TTL a client may ask for.
const MIN_TTL: Duration = Duration::from_secs(1);
const MAX_TTL: Duration = Duration::from_secs(300);

/// Opens (or resumes) the session described by the stream's first message and starts
/// serving it; returns the receiving half of the event stream. `authorize` checks that
/// the caller may act as the node named in the open message.
pub async fn open(
    ctx: Arc<Ctx>,
    mut inbound: Streaming<SessionRequest>,
    authorize: impl FnOnce(&str) -> Result<(), LockError>,
) -> Result<mpsc::Receiver<Result<SessionEvent, Status>>, LockError> {
    let first = tokio::time::timeout(ctx.etcd.timeout(), inbound.message()).await;
    let open = match first {
        Ok(Ok(Some(SessionRequest {
            kind: Some(session_request::Kind::Open(o)),
        }))) => o,
        _ => {
            return Err(LockError::Invalid {
                field: "open",
                reason: "the first message of a session stream must be OpenSession".into(),
            })
        }
    };
    validate::node(&open.node)?;
    validate::agent_addr(&open.agent_addr)?;
    authorize(&open.node)?;
    let permit = ctx.sessions_limit.take()?;
    let mut keeper = None;
    let (id, ttl_s, resumed) = if open.resume_session_id != 0 {
        let r = resume(&ctx, &open).await?;
        // A resume is a sign of life: renew at once, so a lease with under a second
        // left is not lost while the agent's first heartbeat is on its way.
        if renew(&ctx, r.0, &mut keeper).await?.is_none() {
            return Err(LockError::SessionGone { session_id: r.0 });
        }
        r
    } else {
        create(&ctx, &open).await?
    };
    ctx.remember(id, &open.node);
    let ttl = Duration::from_secs(ttl_s.max(1) as u64);
    let (tx, rx) = mpsc::channel(STREAM_CAPACITY);
    let opened = SessionOpened {
        session_id: id,
        ttl_ms: ttl.as_millis() as u64,
        resumed,
    };
    // The channel is new and empty: this cannot fail for lack of room.
    let _ = tx.try_send(Ok(event(session_event::Kind::Opened(opened))));
    tracing::info!(node = %open.node, session = format!("{id:x}"), resumed, "session => serving");
    let reg = ctx.notifier.register(id, tx.clone());
    tokio::spawn(async move {
        let serving = Serving {
            id,
            node: open.node,
            ttl,
            reg,
            keeper,
        };
        serve(ctx, serving, inbound, tx).await;
        drop(permit);
    });
    Ok(rx)
}

fn event(kind: session_event::Kind) -> SessionEvent {
    SessionEvent { kind: Some(kind) }
}

/// A new session: a lease plus the session and registry records, unless the node
/// already has a live session.
async fn create(ctx: &Ctx, open: &OpenSession) -> Result<(i64, i64, bool), LockError> {
    let ttl = if open.ttl_ms == 0 {
        ctx.session_ttl
    } else {
        Duration::from_millis(open.ttl_ms)
    };
    if ttl < MIN_TTL || ttl > MAX_TTL {
        return Err(LockError::Invalid {
            field: "ttl_ms",
            reason: format!("{ttl:?} is outside {MIN_TTL:?}..={MAX_TTL:?}"),
        });
    }
    let (id, granted) = ctx
        .etcd
        .lease_grant(ttl.as_millis().div_ceil(1000) as i64)
        .await?;
    let node_key = ctx.keys.node(&open.node);
    let srec = SessionRecord {
        node: open.node.clone(),
        agent_addr: open.agent_addr.clone(),
    };
    let nrec = NodeRecord {
        session_id: id,
        agent_addr: open.agent_addr.clone(),
    };
    let lease = || Some(PutOptions::new().with_lease(id));
    let txn = Txn::new()
        .when([Compare::create_revision(
            node_key.clone(),
            CompareOp::Equal,
            0,
        )])
        .and_then([
            TxnOp::put(ctx.keys.session(id), encode(&srec), lease()),
            TxnOp::put(node_key.clone(), encode(&nrec), lease()),
        ])
        .or_else([TxnOp::get(node_key.clone(), None)]);
    let resp = ctx.etcd.txn("open session", id, txn).await?;
    if resp.succeeded() {
        return Ok((id, granted, false));
    }
    if let Err(e) = ctx.etcd.lease_revoke(id).await {
        tracing::warn!("failed to revoke the lease of a refused session: {e}");
    }
    let existing = resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g
            .kvs()
            .first()
            .map(|kv| decode::<NodeRecord>(kv.key(), kv.value())),
        _ => None,
    });
    let session_id = match existing {
        Some(Ok(rec)) => rec.session_id,
        _ => 0,
    };
    Err(LockError::NodeBusy {
        node: open.node.clone(),
        session_id,
    })
}

/// Resume: the lease must be alive and belong to the same node. "Alive" is judged by
/// [`crate::etcd::lease_remaining`]: a lease etcd reports with 0 s left still has up to a
/// second, and the caller renews it at once.
async fn resume(ctx: &Ctx, open: &OpenSession) -> Result<(i64, i64, bool), LockError> {
    let id = open.resume_session_id;
    let Some((_, granted)) = ctx.etcd.lease_info(id).await? else {
        return Err(LockError::SessionGone { session_id: id });
    };
    let key = ctx.keys.session(id);
    let got = ctx.etcd.get("read session", key.clone(), None).await?;
    let Some(kv) = got.kvs().first() else {
        return Err(LockError::SessionGone { session_id: id });
    };
    let rec: SessionRecord = decode(kv.key(), kv.value())?;
    if rec.node != open.node {
        return Err(LockError::WrongNode {
            session_id: id,
            owner: rec.node,
            node: open.node.clone(),
        });
    }
    if rec.agent_addr != open.agent_addr {
        let srec = SessionRecord {
            node: rec.node.clone(),
            agent_addr: open.agent_addr.clone(),
        };
        let nrec = NodeRecord {
            session_id: id,
            agent_addr: open.agent_addr.clone(),
        };
        let lease = || Some(PutOptions::new().with_lease(id));
        let txn = Txn::new().and_then([
            TxnOp::put(key, encode(&srec), lease()),
            TxnOp::put(ctx.keys.node(&rec.node), encode(&nrec), lease()),
        ]);
        ctx.etcd.txn("update session address", id, txn).await?;
    }
    Ok((id, granted, true))
}

/// The lease keep-alive stream of a session on this replica.
struct Keeper {
    keeper: LeaseKeeper,
    stream: LeaseKeepAliveStream,
}

/// Renews lease `id` once. `Ok(None)`: the lease is gone (etcd answers a keep-alive of
/// a missing or already expired lease with TTL 0; a renewed lease reports its full TTL).
/// A keep-alive stream that fails (an etcd restart ends it) is replaced once within the
/// same bound, so the first heartbeat after etcd is back renews at once.
async fn renew(ctx: &Ctx, id: i64, keeper: &mut Option<Keeper>) -> Result<Option<i64>, LockError> {
    let deadline = tokio::time::Instant::now() + ctx.etcd.timeout();
    if keeper.is_some() {
        match renew_on(ctx, id, keeper, deadline).await {
            Ok(r) => return Ok(r),
            Err(e) => {
                tracing::debug!(
                    session = format!("{id:x}"),
                    "lease keep-alive stream failed, opening a new one: {e}"
                );
                *keeper = None;
            }
        }
    }
    let r = renew_on(ctx, id, keeper, deadline).await;
    if r.is_err() {
        *keeper = None;
    }
    r
}

/// One renewal on the keep-alive stream in `keeper` (opened first if there is none),
/// bounded by `deadline`.
async fn renew_on(
    ctx: &Ctx,
    id: i64,
    keeper: &mut Option<Keeper>,
    deadline: tokio::time::Instant,
) -> Result<Option<i64>, LockError> {
    let timeout = LockError::EtcdTimeout {
        op: "lease keep-alive",
        timeout: ctx.etcd.timeout(),
    };
    let k = match keeper {
        Some(k) => k,
        None => {
            let mut c = ctx.etcd.client();
            let (k, s) = tokio::time::timeout_at(deadline, c.lease_keep_alive(id))
                .await
                .map_err(|_| LockError::EtcdTimeout {
                    op: "lease keep-alive",
                    timeout: ctx.etcd.timeout(),
                })?
                .map_err(|source| LockError::Etcd {
                    op: "lease keep-alive",
                    source,
                })?;
            keeper.insert(Keeper {
                keeper: k,
                stream: s,
            })
        }
    };
    let once = async {
        k.keeper.keep_alive().await?;
        k.stream.message().await
    };
    match tokio::time::timeout_at(deadline, once).await {
        Err(_) => Err(timeout),
        Ok(Err(source)) => Err(LockError::Etcd {
            op: "lease keep-alive",
            source,
        }),
        Ok(Ok(None)) => Err(LockError::Etcd {
            op: "lease keep-alive",
            source: etcd_client::Error::LeaseKeepAliveError("stream ended".into()),
        }),
        Ok(Ok(Some(r))) => Ok((r.ttl() > 0).then_some(r.ttl())),
    }
}

/// Ends session `id` on purpose: a close marker (so waiters do not report an expiry)
/// and a revoke.
async fn close(ctx: &Ctx, id: i64, node: &str) -> Result<(), LockError> {
    let (marker_lease, _) = ctx.etcd.lease_grant(60).await?;
    let opts = PutOptions::new().with_lease(marker_lease);
    ctx.etcd
        .put(
            "put close marker",
            ctx.keys.closed(id),
            node.to_string(),
            Some(opts),
        )
        .await?;
    ctx.etcd.lease_revoke(id).await
}

async fn send(tx: &StreamTx, ev: SessionEvent) -> bool {
    matches!(tx.send_timeout(Ok(ev), SEND_TIMEOUT).await, Ok(()))
}

/// What [`serve`] serves: the session, its granted TTL, its notifier registration and
/// the lease keep-alive stream a resume already opened.
struct Serving {
    id: i64,
    node: String,
    ttl: Duration,
    reg: u64,
    keeper: Option<Keeper>,
}

/// Serves an open session until it ends; see the module doc for the states.
async fn serve(
    ctx: Arc<Ctx>,
    serving: Serving,
    mut inbound: Streaming<SessionRequest>,
    tx: StreamTx,
) {
    let Serving {
        id,
        node,
        ttl,
        reg,
        mut keeper,
    } = serving;
    let inbox = tokio::spawn(inbox_loop(ctx.clone(), id, tx.clone()));
    let mut last_renewal = Instant::now();
    let mut check = tokio::time::interval(ttl);
    let mut stopping = ctx.stopping.subscribe();
    let end = loop {
        tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(SessionRequest { kind: Some(session_request::Kind::Heartbeat(hb)) })) => {
                    match renew(&ctx, id, &mut keeper).await {
                        Ok(Some(ttl_s)) => {
                            last_renewal = Instant::now();
                            let ack = HeartbeatAck { seq: hb.seq, ttl_ms: ttl_s as u64 * 1000 };
                            if !send(&tx, event(session_event::Kind::HeartbeatAck(ack))).await {
                                break "agent stalled";
                            }
                        }
                        Ok(None) => {
                            let reason = "the session lease expired in etcd".to_string();
                            let _ = send(&tx, event(session_event::Kind::Expired(SessionExpired { reason }))).await;
                            break "expired";
                        }
                        Err(e) => {
                            // etcd did not answer: the lease may well be alive, and only
                            // etcd may say it is gone. Say "unavailable" and end the
                            // stream, so the agent resumes at once (on another replica,
                            // or here once etcd answers); the lease stays the agent's.
                            tracing::warn!(session = format!("{id:x}"), "failed to renew session lease: {e}");
                            let _ = tx.send_timeout(Err(e.into()), SEND_TIMEOUT).await;
                            break "etcd unavailable";
                        }
                    }
                }
                Ok(Some(SessionRequest { kind: Some(session_request::Kind::Close(_)) })) => {
                    if let Err(e) = close(&ctx, id, &node).await {
                        tracing::warn!(session = format!("{id:x}"), "failed to close session: {e}");
                    }
                    break "closed";
                }
                Ok(Some(_)) => {
                    let e = LockError::Invalid { field: "session request", reason: "only Heartbeat or CloseSession may follow OpenSession".into() };
                    let _ = tx.send_timeout(Err(e.into()), SEND_TIMEOUT).await;
                    break "protocol error";
                }
                Ok(None) | Err(_) => break "detached",
            },
            _ = check.tick() => {
                if last_renewal.elapsed() > ttl && matches!(ctx.etcd.lease_ttl(id).await, Ok(None)) {
                    let reason = "no heartbeat renewed the session lease within its TTL".to_string();
                    let _ = send(&tx, event(session_event::Kind::Expired(SessionExpired { reason }))).await;
                    break "expired";
                }
            }
            _ = tx.closed() => break "detached",
            _ = stopping.changed() => break "replica shutting down",
        }
    };
    inbox.abort();
    ctx.notifier.unregister(id, reg);
    if end == "expired" {
        crate::metrics::server().session_expired();
    }
    if end == "expired" || end == "closed" {
        ctx.forget(id);
    }
    tracing::info!(node = %node, session = format!("{id:x}"), "session serving => {end}");
}

/// Forwards the session's etcd inbox to its stream, in revision order, until the stream
/// closes. Retries with bounded backoff when etcd fails.
async fn inbox_loop(ctx: Arc<Ctx>, id: i64, tx: StreamTx) {
    let mut seen = Seen::default();
    let mut backoff = Duration::from_millis(100);
    loop {
        match inbox_pass(&ctx, id, &tx, &mut seen).await {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(
                    session = format!("{id:x}"),
                    "inbox watch failed, retrying in {backoff:?}: {e}"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Message keys already forwarded on this stream (bounded).
#[derive(Default)]
struct Seen {
    set: HashSet<Vec<u8>>,
    order: VecDeque<Vec<u8>>,
}

impl Seen {
    /// Records `key`; false if it was there already.
    fn insert(&mut self, key: &[u8]) -> bool {
        if !self.set.insert(key.to_vec()) {
            return false;
        }
        self.order.push_back(key.to_vec());
        if self.order.len() > SEEN_CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// One range-then-watch pass over the inbox. `Ok(())` when the stream closed.
async fn inbox_pass(ctx: &Ctx, id: i64, tx: &StreamTx, seen: &mut Seen) -> Result<(), LockError> {
    let prefix = ctx.keys.inbox_prefix(id);
    let r = ctx.etcd.get_queue("read inbox", &prefix).await?;
    let rev = r.header().map(|h| h.revision()).unwrap_or(0);
    for kv in r.kvs() {
        if !forward(ctx, tx, seen, kv.key(), kv.value()).await {
            return Ok(());
        }
    }
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(rev + 1)
        .with_filters([WatchFilterType::NoDelete]);
    let mut w = ctx.etcd.watch(prefix, opts).await?;
    loop {
        let msg = tokio::select! {
            m = w.message() => m.map_err(|source| LockError::Etcd { op: "watch inbox", source })?,
            _ = tx.closed() => return Ok(()),
        };
        let Some(msg) = msg else {
            return Err(LockError::Etcd {
                op: "watch inbox",
                source: etcd_client::Error::WatchError("watch stream ended".into()),
            });
        };
        if msg.canceled() {
            return Err(LockError::Etcd {
                op: "watch inbox",
                source: etcd_client::Error::WatchError(msg.cancel_reason().to_string()),
            });
        }
        for ev in msg.events() {
            if let Some(kv) = ev.kv() {
                if !forward(ctx, tx, seen, kv.key(), kv.value()).await {
                    return Ok(());
                }
            }
        }
    }
}

/// Forwards one inbox entry; a notification is deleted once forwarded, a message stays
/// until acked. False when the stream is closed.
async fn forward(ctx: &Ctx, tx: &StreamTx, seen: &mut Seen, key: &[u8], value: &[u8]) -> bool {
    let ev = match SessionEvent::decode(value) {
        Ok(ev) => ev,
        Err(e) => {
            tracing::warn!(key = %String::from_utf8_lossy(key), "dropping undecodable inbox entry: {e}");
            return true;
        }
    };
    let is_notification = crate::keys::last_component(key).starts_with("n-");
    if !is_notification && !seen.insert(key) {
        return true;
    }
    if !send(tx, ev).await {
        return false;
    }
    if is_notification {
        if let Err(e) = ctx
            .etcd
            .delete("delete notification", key.to_vec(), None)
            .await
        {
            tracing::debug!("failed to delete a forwarded notification: {e}");
        }
    }
    true
}
