//! Messages: publish to every subscriber of a channel, in order, and wait for their acks.
//!
//! A publish reads the subscribers (`subs/<channel>#/…`, tied to each subscriber's
//! lease), puts the message into each one's inbox in one transaction (tied to the
//! publisher's lease), and watches `acks/<msg-id>/` until every recipient answered or the
//! deadline passed. An ack is one transaction: if the inbox entry still exists, write the
//! ack and delete the entry. When the publish ends (answered, deadline, or the caller went
//! away) the remaining inbox entries and the acks are handed to the [`Sweeper`], which
//! deletes them in batched transactions (within ~20 ms), so delivered messages do not
//! stay in etcd and cleanup does not compete with the next publish for etcd writes.
//!
//! A recipient whose subscription disappears while the publish waits (its session ended
//! — lease expired or closed — or it unsubscribed) has left the channel: it is not
//! waited for, and its result says so (`ok`, not `answered`). It no longer has what the
//! channel is about; when it comes back it subscribes and reads the current state. A
//! recipient that is silent but still subscribed is named at the deadline.
//!
//! Replica-local fast path: while a publish waits, this replica remembers it in
//! [`Ctx::pending`]. An ack that reaches the same replica is handed to the waiting
//! publish in memory, with no etcd write: the publish's own cleanup deletes the inbox
//! entry. Acks through other replicas take the etcd path above.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use etcd_client::{
    Compare, CompareOp, DeleteOptions, EventType, GetOptions, PutOptions, Txn, TxnOp, WatchOptions,
};
use mdcluster_proto::v1::{
    session_event, AckRequest, AckResult, Message as WireMessage, PublishRequest, PublishResponse,
    SessionEvent, SubscribeRequest, UnsubscribeRequest,
};
use prost::Message;
use tokio::sync::mpsc;

use crate::error::LockError;
use crate::etcd::Etcd;
use crate::keys::{hex_id, last_component, parse_hex_id};
use crate::records::{decode, encode, AckRecord, SubRecord};
use crate::validate;
use crate::Ctx;

/// Subscribe a session to a channel (until it unsubscribes or its lease ends).
pub async fn subscribe(ctx: &Ctx, req: SubscribeRequest) -> Result<(), LockError> {
    validate::session_id(req.session_id)?;
    validate::name("channel", &req.channel)?;
    let node = ctx.session_node(req.session_id).await?;
    let put = TxnOp::put(
        ctx.keys.sub(&req.channel, req.session_id),
        encode(&SubRecord { node }),
        Some(PutOptions::new().with_lease(req.session_id)),
    );
    ctx.etcd
        .txn("subscribe", req.session_id, Txn::new().and_then([put]))
        .await?;
    Ok(())
}

/// Unsubscribe (idempotent).
pub async fn unsubscribe(ctx: &Ctx, req: UnsubscribeRequest) -> Result<(), LockError> {
    validate::session_id(req.session_id)?;
    validate::name("channel", &req.channel)?;
    ctx.etcd
        .delete(
            "unsubscribe",
            ctx.keys.sub(&req.channel, req.session_id),
            None,
        )
        .await?;
    Ok(())
}

/// A publish waiting on this replica.
#[derive(Debug)]
pub struct Pending {
    /// The sessions expected to ack.
    recipients: Vec<i64>,
    /// Where acks handled by this replica go (capacity: one per recipient, plus room
    /// for repeats, which are dropped).
    tx: mpsc::Sender<(i64, AckRecord)>,
}

/// A key or prefix left behind by a finished publish.
#[derive(Debug, Clone)]
pub enum Garbage {
    /// One key.
    Key(String),
    /// Every key under a prefix.
    Prefix(String),
}

/// How long the sweeper gathers garbage before one delete transaction.
const SWEEP_DELAY: Duration = Duration::from_millis(20);
/// Most deletes in one transaction (etcd's default limit is 128 operations).
const SWEEP_MAX_OPS: usize = 100;
/// Most finished publishes queued for the sweeper; beyond it each cleans up alone.
const SWEEP_QUEUE: usize = 1024;

/// Deletes what finished publishes left in etcd, batched into few transactions (a
/// publish's cleanup otherwise competes with the next publish for etcd writes).
#[derive(Debug)]
pub struct Sweeper {
    /// The queue to the sweeping task.
    tx: mpsc::Sender<Vec<Garbage>>,
    /// For cleaning up directly when the queue is full.
    etcd: Etcd,
}

fn delete_ops(garbage: &[Garbage]) -> Vec<TxnOp> {
    garbage
        .iter()
        .map(|g| match g {
            Garbage::Key(k) => TxnOp::delete(k.clone(), None),
            Garbage::Prefix(p) => {
                TxnOp::delete(p.clone(), Some(DeleteOptions::new().with_prefix()))
            }
        })
        .collect()
}

async fn delete_all(etcd: &Etcd, garbage: &[Garbage]) {
    for chunk in garbage.chunks(SWEEP_MAX_OPS) {
        let txn = Txn::new().and_then(delete_ops(chunk));
        if let Err(e) = etcd.txn("clean up messages", 0, txn).await {
            tracing::warn!("failed to clean up delivered messages: {e}");
        }
    }
}

impl Sweeper {
    /// Starts the sweeping task (it ends when the sweeper is dropped).
    pub fn start(etcd: Etcd) -> Sweeper {
        let (tx, mut rx) = mpsc::channel::<Vec<Garbage>>(SWEEP_QUEUE);
        let worker = etcd.clone();
        tokio::spawn(async move {
            while let Some(mut batch) = rx.recv().await {
                let until = tokio::time::Instant::now() + SWEEP_DELAY;
                while batch.len() < SWEEP_MAX_OPS {
                    match tokio::time::timeout_at(until, rx.recv()).await {
                        Ok(Some(more)) => batch.extend(more),
                        _ => break,
                    }
                }
                delete_all(&worker, &batch).await;
            }
        });
        Sweeper { tx, etcd }
    }

    /// Queues `garbage` for deletion.
    pub fn push(&self, garbage: Vec<Garbage>) {
        if let Err(mpsc::error::TrySendError::Full(g) | mpsc::error::TrySendError::Closed(g)) =
            self.tx.try_send(garbage)
        {
            let etcd = self.etcd.clone();
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(async move { delete_all(&etcd, &g).await });
            }
        }
    }
}

/// Hands what a publish left in etcd to the sweeper when it is dropped (finished or
/// cancelled), and forgets the pending publish.
struct Cleanup<'a> {
    ctx: &'a Ctx,
    message_id: String,
    /// Inbox entries (an ack through etcd already deleted its own).
    inbox: Vec<String>,
    /// The acks prefix.
    acks: String,
}

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        if let Ok(mut p) = self.ctx.pending.lock() {
            p.remove(&self.message_id);
        }
        let mut garbage: Vec<Garbage> = self.inbox.drain(..).map(Garbage::Key).collect();
        garbage.push(Garbage::Prefix(std::mem::take(&mut self.acks)));
        self.ctx.sweeper.push(garbage);
    }
}

/// Publish and wait for the acks (or the deadline).
pub async fn publish(ctx: &Ctx, req: PublishRequest) -> Result<PublishResponse, LockError> {
    let sid = req.session_id;
    validate::session_id(sid)?;
    validate::name("channel", &req.channel)?;
    validate::size("payload", req.payload.len(), validate::MAX_PAYLOAD)?;
    let timeout = validate::wait("timeout_ms", req.timeout_ms)?;
    let deadline = Instant::now() + timeout;
    let node = ctx.session_node(sid).await?;
    let subs = ctx
        .etcd
        .get(
            "read subscribers",
            ctx.keys.subs_prefix(&req.channel),
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    let rev = subs.header().map(|h| h.revision()).unwrap_or(0);
    let mut recipients = Vec::new();
    for kv in subs.kvs() {
        let Some(s) = parse_hex_id(last_component(kv.key())) else {
            continue;
        };
        if s != sid {
            recipients.push((s, decode::<SubRecord>(kv.key(), kv.value())?.node));
        }
    }
    if recipients.len() > validate::MAX_SUBSCRIBERS {
        return Err(LockError::Invalid {
            field: "channel",
            reason: format!(
                "{} has {} subscribers, more than the limit of {}",
                req.channel,
                recipients.len(),
                validate::MAX_SUBSCRIBERS
            ),
        });
    }
    recipients.sort_by(|a, b| a.1.cmp(&b.1));
    let message_id = format!("{}-{:016x}", hex_id(sid), rand::random::<u64>());
    if recipients.is_empty() {
        return Ok(PublishResponse {
            message_id,
            results: vec![],
            all_ok: true,
        });
    }
    let _permit = ctx.waits_limit.take()?;
    let ev = SessionEvent {
        kind: Some(session_event::Kind::Message(WireMessage {
            channel: req.channel.clone(),
            message_id: message_id.clone(),
            publisher_node: node,
            payload: req.payload,
        })),
    }
    .encode_to_vec();
    let inbox: Vec<String> = recipients
        .iter()
        .map(|(s, _)| ctx.keys.inbox_message(*s, &message_id))
        .collect();
    let acks = ctx.keys.acks_prefix(&message_id);
    let (ack_tx, mut ack_rx) = mpsc::channel(recipients.len() * 2);
    if let Ok(mut p) = ctx.pending.lock() {
        let pending = Pending {
            recipients: recipients.iter().map(|r| r.0).collect(),
            tx: ack_tx,
        };
        p.insert(message_id.clone(), pending);
    }
    let _cleanup = Cleanup {
        ctx,
        message_id: message_id.clone(),
        inbox: inbox.clone(),
        acks: acks.clone(),
    };
    let puts: Vec<TxnOp> = inbox
        .iter()
        .map(|k| {
            TxnOp::put(
                k.clone(),
                ev.clone(),
                Some(PutOptions::new().with_lease(sid)),
            )
        })
        .collect();
    // The ack watch starts at the revision of the subscriber read, so it is opened
    // alongside the message transaction and still sees every ack.
    let wopts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(rev + 1);
    // Subscriptions that end while we wait: their recipients left the channel.
    let sopts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(rev + 1);
    let (watch, subs_watch, put) = tokio::join!(
        ctx.etcd.watch(acks.clone(), wopts),
        ctx.etcd.watch(ctx.keys.subs_prefix(&req.channel), sopts),
        ctx.etcd.txn("publish", sid, Txn::new().and_then(puts))
    );
    put?;
    let mut watch = watch?;
    let mut subs_watch = subs_watch?;
    let mut answers: HashMap<i64, AckRecord> = HashMap::new();
    let mut left: std::collections::HashSet<i64> = std::collections::HashSet::new();
    let wanted = |answers: &HashMap<i64, AckRecord>, left: &std::collections::HashSet<i64>| {
        recipients
            .iter()
            .all(|(s, _)| answers.contains_key(s) || left.contains(s))
    };
    while !wanted(&answers, &left) {
        let until = tokio::time::Instant::from(deadline);
        let msg = tokio::select! {
            _ = tokio::time::sleep_until(until) => break,
            local = ack_rx.recv() => {
                if let Some((s, rec)) = local {
                    answers.insert(s, rec);
                }
                continue;
            }
            gone = subs_watch.message() => {
                let gone = gone.map_err(|source| LockError::Etcd { op: "watch subscribers", source })?;
                let Some(gone) = gone else {
                    return Err(LockError::Etcd {
                        op: "watch subscribers",
                        source: etcd_client::Error::WatchError("watch stream ended".into()),
                    });
                };
                for ev in gone.events() {
                    if ev.event_type() != EventType::Delete {
                        continue;
                    }
                    if let Some(s) = ev.kv().and_then(|kv| parse_hex_id(last_component(kv.key()))) {
                        left.insert(s);
                    }
                }
                continue;
            }
            m = watch.message() => m.map_err(|source| LockError::Etcd { op: "watch acks", source })?,
        };
        let Some(msg) = msg else {
            return Err(LockError::Etcd {
                op: "watch acks",
                source: etcd_client::Error::WatchError("watch stream ended".into()),
            });
        };
        for ev in msg.events() {
            if ev.event_type() != EventType::Put {
                continue;
            }
            let Some(kv) = ev.kv() else { continue };
            if let Some(s) = parse_hex_id(last_component(kv.key())) {
                answers.insert(s, decode(kv.key(), kv.value())?);
            }
        }
    }
    while let Ok((s, rec)) = ack_rx.try_recv() {
        answers.insert(s, rec);
    }
    if !left.is_empty() {
        // An ack written just before its sender unsubscribed may come on the ack watch
        // after the delete on the other: read what is there, answers win over "left".
        if let Ok(r) = ctx
            .etcd
            .get(
                "read acks",
                acks.clone(),
                Some(GetOptions::new().with_prefix()),
            )
            .await
        {
            for kv in r.kvs() {
                if let Some(s) = parse_hex_id(last_component(kv.key())) {
                    answers.insert(s, decode(kv.key(), kv.value())?);
                }
            }
        }
    }
    let results: Vec<AckResult> = recipients
        .iter()
        .map(|(s, n)| match answers.get(s) {
            Some(a) => AckResult {
                node: n.clone(),
                session_id: *s,
                ok: a.ok,
                reason: a.reason.clone(),
                answered: true,
            },
            None if left.contains(s) => AckResult {
                node: n.clone(),
                session_id: *s,
                ok: true,
                reason: "left the channel before answering (its session ended or it unsubscribed); not waited for".into(),
                answered: false,
            },
            None => AckResult {
                node: n.clone(),
                session_id: *s,
                ok: false,
                reason: format!("no answer within {timeout:?}"),
                answered: false,
            },
        })
        .collect();
    let all_ok = results.iter().all(|r| r.ok);
    crate::metrics::server().publish(
        match (all_ok, results.iter().any(|r| !r.ok && !r.answered)) {
            (true, _) => "ok",
            (false, true) => "timeout",
            (false, false) => "nack",
        },
        timeout.saturating_sub(deadline.saturating_duration_since(Instant::now())),
    );
    Ok(PublishResponse {
        message_id,
        results,
        all_ok,
    })
}

/// Ack (positive or negative) a message this session received.
pub async fn ack(ctx: &Ctx, req: AckRequest) -> Result<(), LockError> {
    let sid = req.session_id;
    validate::session_id(sid)?;
    validate::size("reason", req.reason.len(), validate::MAX_REASON)?;
    let publisher = req
        .message_id
        .split_once('-')
        .filter(|(p, r)| p.len() == 16 && r.len() == 16)
        .and_then(|(p, _)| parse_hex_id(p))
        .ok_or_else(|| LockError::Invalid {
            field: "message_id",
            reason: format!("{:?} is not a message id", req.message_id),
        })?;
    let node = ctx.session_node(sid).await?;
    let rec = AckRecord {
        node,
        ok: req.ok,
        reason: req.reason,
    };
    // The publish waits on this replica: hand the ack over in memory.
    let local = ctx.pending.lock().ok().and_then(|p| {
        p.get(&req.message_id)
            .filter(|p| p.recipients.contains(&sid))
            .map(|p| p.tx.clone())
    });
    if let Some(tx) = local {
        // Full means this session already acked (a repeat): nothing to add.
        let _ = tx.try_send((sid, rec));
        return Ok(());
    }
    let entry = ctx.keys.inbox_message(sid, &req.message_id);
    let txn = Txn::new()
        .when([Compare::version(entry.clone(), CompareOp::Greater, 0)])
        .and_then([
            TxnOp::put(
                ctx.keys.ack(&req.message_id, sid),
                encode(&rec),
                Some(PutOptions::new().with_lease(publisher)),
            ),
            TxnOp::delete(entry, None),
        ]);
    let gone = || LockError::MessageGone {
        message_id: req.message_id.clone(),
    };
    match ctx.etcd.txn("ack", publisher, txn).await {
        Ok(r) if r.succeeded() => Ok(()),
        Ok(_) | Err(LockError::SessionGone { .. }) => Err(gone()),
        Err(e) => Err(e),
    }
}
