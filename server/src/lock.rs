//! Locks: the etcd Mutex recipe (client/v3/concurrency/mutex.go) extended with shared
//! mode (experimental/recipes/rwmutex.go), a value block and fencing.
//!
//! A request is the key `locks/<resource>#/<session>` tied to the session's lease. The
//! queue is the prefix in create-revision order. A request is granted when
//! [`is_granted`] says so; a waiting one watches only its [`predecessor`]. The fencing
//! token is the request key's create revision, and every write made under a lock is a
//! transaction that compares it (etcd's `IsOwner`). The pure queue logic is at the top
//! of this file and unit-tested; the etcd steps follow (see docs/LOCKS.md, step table).

use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Compare, CompareOp, EventType, GetOptions, KeyValue, PutOptions, SortOrder, SortTarget, Txn,
    TxnOp, TxnOpResponse, WatchOptions,
};
use mdcluster_proto::v1::{
    session_event, AcquireRequest, AcquireResponse, ConvertRequest, ConvertResponse, HolderExpired,
    LockBlocking, LockGranted, LockValue, ReadValueRequest, ReadValueResponse, ReadValuesRequest,
    ReadValuesResponse, ReleaseRequest, WriteValueRequest,
};

use crate::error::LockError;
use crate::etcd::Etcd;
use crate::keys::{last_component, parse_hex_id};
use crate::records::{decode, encode, LockRecord, Mode};
use crate::validate;
use crate::Ctx;

/// One request in a lock's queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Create revision: queue position and fencing token.
    pub rev: i64,
    /// The requesting session.
    pub session: i64,
    /// Node and mode.
    pub rec: LockRecord,
    /// The etcd key.
    pub key: Vec<u8>,
}

/// Parses a queue read in create-revision order.
pub fn parse_queue(kvs: &[KeyValue]) -> Result<Vec<Entry>, LockError> {
    kvs.iter()
        .map(|kv| {
            Ok(Entry {
                rev: kv.create_revision(),
                session: parse_hex_id(last_component(kv.key())).unwrap_or(kv.lease()),
                rec: decode(kv.key(), kv.value())?,
                key: kv.key().to_vec(),
            })
        })
        .collect()
}

/// Whether the request at `i` is granted: an exclusive one when it is first, a shared
/// one when no exclusive request is ahead of it.
pub fn is_granted(q: &[Entry], i: usize) -> bool {
    match q[i].rec.mode {
        Mode::Exclusive => i == 0,
        Mode::Shared => q[..i].iter().all(|e| e.rec.mode == Mode::Shared),
    }
}

/// Lock requests read under `locks_root` (`<locks_root><resource>#/<session>`, in
/// create-revision order), grouped by resource into parsed queues, sorted by resource.
fn queues_by_resource(
    locks_root: &str,
    kvs: &[KeyValue],
) -> Result<std::collections::BTreeMap<String, Vec<Entry>>, LockError> {
    let mut grouped: std::collections::BTreeMap<String, Vec<KeyValue>> = Default::default();
    for kv in kvs {
        let key = String::from_utf8_lossy(kv.key());
        let rest = key.strip_prefix(locks_root).unwrap_or(&key);
        // The queue is everything before the last `#/`.
        let res = rest.rsplit_once("#/").map_or(rest, |(r, _)| r);
        grouped.entry(res.to_owned()).or_default().push(kv.clone());
    }
    grouped
        .into_iter()
        .map(|(res, kvs)| Ok((res, parse_queue(&kvs)?)))
        .collect()
}

/// The node names of the holders of queue `q`, in queue order.
fn holder_names(q: &[Entry]) -> Vec<String> {
    holders(q).into_iter().map(|e| e.rec.node.clone()).collect()
}

/// Counts the locks of the whole cluster: (exclusive held, shared held, waiting), from
/// one read of every lock queue (for metrics).
pub async fn count_locks(ctx: &Ctx) -> Result<(i64, i64, i64), LockError> {
    let resp = ctx
        .etcd
        .get_queue("count locks", &ctx.keys.locks_root())
        .await?;
    let (mut ex, mut sh, mut wait) = (0, 0, 0);
    for q in queues_by_resource(&ctx.keys.locks_root(), resp.kvs())?.values() {
        for (i, e) in q.iter().enumerate() {
            match (is_granted(q, i), e.rec.mode) {
                (true, Mode::Exclusive) => ex += 1,
                (true, Mode::Shared) => sh += 1,
                (false, _) => wait += 1,
            }
        }
    }
    Ok((ex, sh, wait))
}

/// The one request a waiting request at `i` watches: for exclusive the nearest earlier
/// request, for shared the nearest earlier exclusive one.
pub fn predecessor(q: &[Entry], i: usize) -> Option<usize> {
    match q[i].rec.mode {
        Mode::Exclusive => i.checked_sub(1),
        Mode::Shared => q[..i].iter().rposition(|e| e.rec.mode == Mode::Exclusive),
    }
}

/// The granted requests.
pub fn holders(q: &[Entry]) -> Vec<&Entry> {
    (0..q.len())
        .filter(|&i| is_granted(q, i))
        .map(|i| &q[i])
        .collect()
}

fn names<'a>(es: impl IntoIterator<Item = &'a Entry>) -> String {
    let v: Vec<&str> = es.into_iter().map(|e| e.rec.node.as_str()).collect();
    if v.is_empty() {
        "nobody".into()
    } else {
        v.join(", ")
    }
}

fn queue_opts() -> GetOptions {
    GetOptions::new()
        .with_prefix()
        .with_sort(SortTarget::Create, SortOrder::Ascend)
}

/// Deletes a request key if it is still the one created at `rev`.
async fn delete_if_rev(etcd: &Etcd, key: &[u8], rev: i64) -> Result<bool, LockError> {
    let txn = Txn::new()
        .when([Compare::create_revision(
            key.to_vec(),
            CompareOp::Equal,
            rev,
        )])
        .and_then([TxnOp::delete(key.to_vec(), None)]);
    Ok(etcd.txn("delete lock request", 0, txn).await?.succeeded())
}

/// Deletes a waiting request key when the future that owns it is dropped (the client
/// went away: tonic drops the handler), so that a waiter key never leaks.
struct WaiterGuard {
    /// Where to delete.
    etcd: Etcd,
    /// The request key.
    key: Vec<u8>,
    /// Its create revision: a newer request of the same session is not touched.
    rev: i64,
    /// False once the request is granted or handled explicitly.
    armed: bool,
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (etcd, key, rev) = (self.etcd.clone(), std::mem::take(&mut self.key), self.rev);
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = delete_if_rev(&etcd, &key, rev).await {
                    tracing::warn!("failed to withdraw a cancelled lock request: {e}");
                }
            });
        }
    }
}

/// The queue and value block read in one revision.
struct Snapshot {
    queue: Vec<Entry>,
    value: Vec<u8>,
    revision: i64,
}

/// The range reads of a transaction's answer, in order.
fn get_ranges(resp: &etcd_client::TxnResponse) -> Vec<etcd_client::GetResponse> {
    resp.op_responses()
        .into_iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        })
        .collect()
}

fn snapshot_from(resp: &etcd_client::TxnResponse) -> Result<Snapshot, LockError> {
    let ranges = get_ranges(resp);
    let queue = match ranges.first() {
        Some(g) => parse_queue(g.kvs())?,
        None => Vec::new(),
    };
    let value = ranges
        .get(1)
        .and_then(|g| g.kvs().first())
        .map(|kv| kv.value().to_vec());
    let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
    Ok(Snapshot {
        queue,
        value: value.unwrap_or_default(),
        revision,
    })
}

async fn read_snapshot(ctx: &Ctx, resource: &str) -> Result<Snapshot, LockError> {
    let txn = Txn::new().and_then([
        TxnOp::get(ctx.keys.lock_prefix(resource), Some(queue_opts())),
        TxnOp::get(ctx.keys.value(resource), None),
    ]);
    snapshot_from(&ctx.etcd.txn("read lock queue", 0, txn).await?)
}

/// What ended a wait on a key.
enum Change {
    /// The key was deleted; the previous value is known.
    Deleted,
    /// The key was written.
    Put,
}

/// Waits for the next change of `key` (or of every key under it with `prefix`) after
/// `revision`, until `deadline`. `None` when the deadline passed.
async fn wait_change(
    etcd: &Etcd,
    key: Vec<u8>,
    prefix: bool,
    revision: i64,
    deadline: Instant,
) -> Result<Option<Change>, LockError> {
    let mut opts = WatchOptions::new().with_start_revision(revision + 1);
    if prefix {
        opts = opts.with_prefix();
    }
    let wait = async {
        let mut stream = etcd.watch(key, opts).await?;
        loop {
            let msg = stream.message().await.map_err(|source| LockError::Etcd {
                op: "watch lock queue",
                source,
            })?;
            let Some(msg) = msg else {
                return Err(LockError::Etcd {
                    op: "watch lock queue",
                    source: etcd_client::Error::WatchError("watch stream ended".into()),
                });
            };
            if msg.canceled() {
                return Err(LockError::Etcd {
                    op: "watch lock queue",
                    source: etcd_client::Error::WatchError(msg.cancel_reason().to_string()),
                });
            }
            if let Some(ev) = msg.events().first() {
                return Ok(match ev.event_type() {
                    EventType::Delete => Change::Deleted,
                    EventType::Put => Change::Put,
                });
            }
        }
    };
    match tokio::time::timeout_at(deadline.into(), wait).await {
        Ok(r) => r.map(Some),
        Err(_) => Ok(None),
    }
}

/// Whether a deleted request of `session` went away because the session's lease
/// expired (not a release or a purposeful close).
async fn deleted_by_expiry(ctx: &Ctx, session: i64) -> Result<bool, LockError> {
    if ctx.etcd.lease_ttl(session).await?.is_some() {
        return Ok(false);
    }
    let closed = ctx
        .etcd
        .get("read close marker", ctx.keys.closed(session), None)
        .await?;
    Ok(closed.kvs().is_empty())
}

/// The sessions to tell that request `p` expired (see `tell_expired`).
pub fn expired_recipients(
    queue: &[Entry],
    p: &Entry,
    me: i64,
    my_rev: i64,
    immediate_successor: bool,
) -> Vec<i64> {
    let mut told = vec![me];
    if immediate_successor {
        // The queue as it was with `p` in place decides who watched `p`.
        let mut full = queue.to_vec();
        let at = full.partition_point(|e| e.rev < p.rev);
        full.insert(at, p.clone());
        told.extend(
            (0..full.len())
                .filter(|&j| full[j].rev > my_rev && predecessor(&full, j) != Some(at))
                .map(|j| full[j].session),
        );
    }
    told
}

/// Tells waiters that request `p` went away because its lease expired: always this
/// waiter `me`; and, when `me` was `p`'s immediate successor, every later request in
/// the current `queue` that did not watch `p` itself (those find out on their own), so
/// that each is told exactly once.
fn tell_expired(
    ctx: &Ctx,
    res: &str,
    p: &Entry,
    me: i64,
    queue: &[Entry],
    my_rev: i64,
    immediate_successor: bool,
) {
    for to in expired_recipients(queue, p, me, my_rev, immediate_successor) {
        let h = HolderExpired {
            resource: res.into(),
            node: p.rec.node.clone(),
            session_id: p.session,
        };
        ctx.notifier.send(
            &ctx.etcd,
            &ctx.keys,
            to,
            session_event::Kind::HolderExpired(h),
        );
    }
}

/// Acquire: enqueue, then wait (watching the predecessor only) until granted, the
/// deadline, or at once with no-queue.
pub async fn acquire(ctx: &Arc<Ctx>, req: AcquireRequest) -> Result<AcquireResponse, LockError> {
    let sid = req.session_id;
    validate::session_id(sid)?;
    validate::name("resource", &req.resource)?;
    let mode = Mode::from_proto(req.mode)?;
    let wait = if req.no_queue {
        Duration::ZERO
    } else {
        validate::wait("wait_ms", req.wait_ms)?
    };
    let started = Instant::now();
    let deadline = started + wait;
    let res = req.resource.as_str();
    let node = ctx.session_node(sid).await?;
    let key = ctx.keys.lock(res, sid);
    let rec = LockRecord {
        node: node.clone(),
        mode,
    };

    // Step 1: create the request key (once per session and lock) and read the queue.
    let reads = [
        TxnOp::get(ctx.keys.lock_prefix(res), Some(queue_opts())),
        TxnOp::get(ctx.keys.value(res), None),
    ];
    let txn = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then(
            [
                vec![TxnOp::put(
                    key.clone(),
                    encode(&rec),
                    Some(PutOptions::new().with_lease(sid)),
                )],
                reads.to_vec(),
            ]
            .concat(),
        )
        .or_else(reads.to_vec());
    let resp = ctx.etcd.txn("acquire", sid, txn).await?;
    let mut snap = snapshot_from(&resp)?;
    let Some(mine) = snap.queue.iter().find(|e| e.session == sid).cloned() else {
        return Err(LockError::Cancelled {
            resource: res.into(),
            session_id: sid,
        });
    };
    if !resp.succeeded() && mine.rec.mode != mode {
        return Err(LockError::NotAllowed {
            action: "acquire",
            resource: res.into(),
            session_id: sid,
            reason: format!(
                "this session already has a {:?} request on it; convert that one instead",
                mine.rec.mode
            ),
        });
    }
    let mut guard = WaiterGuard {
        etcd: ctx.etcd.clone(),
        key: key.clone().into_bytes(),
        rev: mine.rev,
        armed: true,
    };
    let mut expired = Vec::new();
    let mut waited = false;
    let mut _permit = None;
    loop {
        let q = &snap.queue;
        let Some(i) = q.iter().position(|e| e.session == sid && e.rev == mine.rev) else {
            guard.armed = false;
            return Err(LockError::Cancelled {
                resource: res.into(),
                session_id: sid,
            });
        };
        if is_granted(q, i) {
            guard.armed = false;
            if waited {
                let g = LockGranted {
                    resource: res.into(),
                    mode: mode.to_proto() as i32,
                    token: mine.rev as u64,
                };
                ctx.notifier
                    .send(&ctx.etcd, &ctx.keys, sid, session_event::Kind::Granted(g));
            }
            return Ok(AcquireResponse {
                token: mine.rev as u64,
                mode: mode.to_proto() as i32,
                value: std::mem::take(&mut snap.value),
                expired_holders: expired,
            });
        }
        let holding = names(holders(q));
        if req.no_queue {
            guard.armed = false;
            delete_if_rev(&ctx.etcd, key.as_bytes(), mine.rev).await?;
            return Err(LockError::Busy {
                resource: res.into(),
                holders: holding,
            });
        }
        if !waited {
            _permit = match ctx.waits_limit.take() {
                Ok(p) => Some(p),
                Err(e) => {
                    guard.armed = false;
                    delete_if_rev(&ctx.etcd, key.as_bytes(), mine.rev).await?;
                    return Err(e);
                }
            };
            // DLM's blocking AST: tell the holders that someone waits.
            for h in holders(q).into_iter().filter(|h| h.session != sid) {
                let b = LockBlocking {
                    resource: res.into(),
                    waiter_node: node.clone(),
                    waiter_mode: mode.to_proto() as i32,
                };
                ctx.notifier.send(
                    &ctx.etcd,
                    &ctx.keys,
                    h.session,
                    session_event::Kind::Blocking(b),
                );
            }
            waited = true;
        }
        let Some(pidx) = predecessor(q, i) else {
            // Not granted yet no predecessor cannot happen; re-read to be safe.
            snap = read_snapshot(ctx, res).await?;
            continue;
        };
        let p = q[pidx].clone();
        match wait_change(&ctx.etcd, p.key.clone(), false, snap.revision, deadline).await? {
            None => {
                guard.armed = false;
                delete_if_rev(&ctx.etcd, key.as_bytes(), mine.rev).await?;
                return Err(LockError::Timeout {
                    resource: res.into(),
                    waited: started.elapsed(),
                    holders: holding,
                });
            }
            Some(Change::Deleted) => {
                let immediate_successor = i == pidx + 1;
                if deleted_by_expiry(ctx, p.session).await? {
                    tracing::info!(resource = res, node = %p.rec.node, "lock holder's lease expired");
                    expired.push(p.rec.node.clone());
                    snap = read_snapshot(ctx, res).await?;
                    tell_expired(
                        ctx,
                        res,
                        &p,
                        sid,
                        &snap.queue,
                        mine.rev,
                        immediate_successor,
                    );
                    continue;
                }
            }
            Some(Change::Put) => {}
        }
        snap = read_snapshot(ctx, res).await?;
    }
}

/// Release (or cancel a wait with token 0): delete the request key if it is ours.
pub async fn release(ctx: &Ctx, req: ReleaseRequest) -> Result<(), LockError> {
    let sid = req.session_id;
    validate::session_id(sid)?;
    validate::name("resource", &req.resource)?;
    let key = ctx.keys.lock(&req.resource, sid);
    let cmp = if req.token == 0 {
        Compare::create_revision(key.clone(), CompareOp::Greater, 0)
    } else {
        Compare::create_revision(key.clone(), CompareOp::Equal, req.token as i64)
    };
    let txn = Txn::new().when([cmp]).and_then([TxnOp::delete(key, None)]);
    if ctx.etcd.txn("release", sid, txn).await?.succeeded() {
        Ok(())
    } else {
        Err(LockError::NotHeld {
            resource: req.resource,
            session_id: sid,
            token: req.token,
        })
    }
}

/// Convert a granted request: a downgrade at once, an upgrade once this session is the
/// only holder (or EBUSY at once with no-queue).
pub async fn convert(ctx: &Arc<Ctx>, req: ConvertRequest) -> Result<ConvertResponse, LockError> {
    let sid = req.session_id;
    validate::session_id(sid)?;
    validate::name("resource", &req.resource)?;
    let target = Mode::from_proto(req.mode)?;
    let wait = if req.no_queue {
        Duration::ZERO
    } else {
        validate::wait("wait_ms", req.wait_ms)?
    };
    let started = Instant::now();
    let deadline = started + wait;
    let res = req.resource.as_str();
    let key = ctx.keys.lock(res, sid);
    let mut waited = false;
    let mut _permit = None;
    loop {
        let snap = read_snapshot(ctx, res).await?;
        let q = &snap.queue;
        let Some(i) = q
            .iter()
            .position(|e| e.session == sid && e.rev as u64 == req.token)
        else {
            return Err(LockError::NotHeld {
                resource: res.into(),
                session_id: sid,
                token: req.token,
            });
        };
        if !is_granted(q, i) {
            return Err(LockError::NotAllowed {
                action: "convert",
                resource: res.into(),
                session_id: sid,
                reason: "the request is still waiting; only a granted lock converts".into(),
            });
        }
        let old = q[i].rec.clone();
        if old.mode == target {
            return Ok(ConvertResponse {
                token: req.token,
                mode: target.to_proto() as i32,
            });
        }
        let sole = i == 0 && q.get(1).is_none_or(|e| e.rec.mode == Mode::Exclusive);
        if target == Mode::Shared || sole {
            let new = LockRecord {
                node: old.node.clone(),
                mode: target,
            };
            let txn = Txn::new()
                .when([
                    Compare::create_revision(key.clone(), CompareOp::Equal, req.token as i64),
                    Compare::value(key.clone(), CompareOp::Equal, encode(&old)),
                ])
                .and_then([TxnOp::put(
                    key.clone(),
                    encode(&new),
                    Some(PutOptions::new().with_lease(sid)),
                )]);
            if ctx.etcd.txn("convert", sid, txn).await?.succeeded() {
                if waited {
                    let g = LockGranted {
                        resource: res.into(),
                        mode: target.to_proto() as i32,
                        token: req.token,
                    };
                    ctx.notifier
                        .send(&ctx.etcd, &ctx.keys, sid, session_event::Kind::Granted(g));
                }
                return Ok(ConvertResponse {
                    token: req.token,
                    mode: target.to_proto() as i32,
                });
            }
            continue;
        }
        let others = names(holders(q).into_iter().filter(|e| e.session != sid));
        if req.no_queue {
            return Err(LockError::Busy {
                resource: res.into(),
                holders: others,
            });
        }
        if _permit.is_none() {
            _permit = Some(ctx.waits_limit.take()?);
        }
        waited = true;
        let prefix = ctx.keys.lock_prefix(res).into_bytes();
        if wait_change(&ctx.etcd, prefix, true, snap.revision, deadline)
            .await?
            .is_none()
        {
            return Err(LockError::Timeout {
                resource: res.into(),
                waited: started.elapsed(),
                holders: others,
            });
        }
    }
}

/// Write the value block: a transaction fenced on the request key (create revision =
/// token, mode exclusive, no older request in the queue).
pub async fn write_value(ctx: &Ctx, req: WriteValueRequest) -> Result<(), LockError> {
    let sid = req.session_id;
    validate::session_id(sid)?;
    validate::name("resource", &req.resource)?;
    validate::size("value", req.value.len(), validate::MAX_VALUE)?;
    let res = req.resource.as_str();
    let node = ctx.session_node(sid).await?;
    let key = ctx.keys.lock(res, sid);
    let ex = LockRecord {
        node,
        mode: Mode::Exclusive,
    };
    let token = req.token as i64;
    let txn = Txn::new()
        .when([
            Compare::create_revision(key.clone(), CompareOp::Equal, token),
            Compare::value(key.clone(), CompareOp::Equal, encode(&ex)),
            Compare::create_revision(ctx.keys.lock_prefix(res), CompareOp::Greater, token - 1)
                .with_prefix(),
        ])
        .and_then([TxnOp::put(ctx.keys.value(res), req.value, None)])
        .or_else([TxnOp::get(key.clone(), None)]);
    let resp = ctx.etcd.txn("write value", sid, txn).await?;
    if resp.succeeded() {
        return Ok(());
    }
    let current = resp.op_responses().into_iter().find_map(|r| match r {
        TxnOpResponse::Get(g) => g
            .kvs()
            .first()
            .map(|kv| (kv.create_revision(), kv.value().to_vec())),
        _ => None,
    });
    match current {
        Some((rev, v)) if rev == token => {
            let rec: LockRecord = decode(key.as_bytes(), &v)?;
            let reason = if rec.mode == Mode::Shared {
                "the lock is held shared; only an exclusive holder writes the value block"
            } else {
                "the request is still waiting in the queue"
            };
            Err(LockError::NotAllowed {
                action: "write value",
                resource: res.into(),
                session_id: sid,
                reason: reason.into(),
            })
        }
        _ => Err(LockError::NotHeld {
            resource: res.into(),
            session_id: sid,
            token: req.token,
        }),
    }
}

/// Read the value block and the holders.
pub async fn read_value(ctx: &Ctx, req: ReadValueRequest) -> Result<ReadValueResponse, LockError> {
    validate::name("resource", &req.resource)?;
    let snap = read_snapshot(ctx, &req.resource).await?;
    Ok(ReadValueResponse {
        holders: holder_names(&snap.queue),
        value: snap.value,
    })
}

/// The most locks one [`read_values`] answers; a prefix matching more is refused.
pub const MAX_READ_VALUES: usize = 16384;

/// The most bytes of names, values and holders one [`read_values`] answers, well under
/// the 4 MiB a gRPC client decodes by default; more is refused like too many locks.
pub const MAX_READ_VALUES_BYTES: usize = 2 << 20;

/// Read the value blocks and holders of every lock under a prefix, in one etcd
/// transaction (one revision), bounded by [`MAX_READ_VALUES`].
pub async fn read_values(
    ctx: &Ctx,
    req: ReadValuesRequest,
) -> Result<ReadValuesResponse, LockError> {
    let prefix = req.prefix.as_str();
    validate::name("prefix", prefix.strip_suffix('/').unwrap_or(prefix))?;
    let locks_root = ctx.keys.locks_root();
    let values_root = ctx.keys.value("");
    // One more than the bound, so that too many is seen, not cut silently. Lock
    // requests: at most one per session per lock, so the bound on keys is generous.
    let limit = MAX_READ_VALUES as i64 + 1;
    let txn = Txn::new().and_then([
        TxnOp::get(
            format!("{locks_root}{prefix}"),
            Some(queue_opts().with_limit(limit * 4)),
        ),
        TxnOp::get(
            format!("{values_root}{prefix}"),
            Some(GetOptions::new().with_prefix().with_limit(limit)),
        ),
    ]);
    let resp = ctx.etcd.txn("read lock values", 0, txn).await?;
    let ranges = get_ranges(&resp);
    if ranges.iter().any(|g| g.more()) {
        return Err(too_many(prefix));
    }
    let (queues, values) = match ranges.as_slice() {
        [q, v] => (q.kvs(), v.kvs()),
        _ => (&[][..], &[][..]),
    };
    let locks = group_values(&locks_root, queues, &values_root, values)?;
    within_read_bounds(prefix, &locks)?;
    Ok(ReadValuesResponse { locks })
}

/// The refusal of a [`read_values`] prefix that matches too much.
fn too_many(prefix: &str) -> LockError {
    LockError::Invalid {
        field: "prefix",
        reason: format!(
            "{prefix:?} matches more than {MAX_READ_VALUES} locks or {MAX_READ_VALUES_BYTES} \
             bytes; read with a longer prefix"
        ),
    }
}

/// Refuses an answer of more than [`MAX_READ_VALUES`] locks or
/// [`MAX_READ_VALUES_BYTES`] bytes of names, values and holders.
fn within_read_bounds(prefix: &str, locks: &[LockValue]) -> Result<(), LockError> {
    let bytes: usize = locks
        .iter()
        .map(|l| {
            l.resource.len() + l.value.len() + l.holders.iter().map(String::len).sum::<usize>()
        })
        .sum();
    if locks.len() > MAX_READ_VALUES || bytes > MAX_READ_VALUES_BYTES {
        return Err(too_many(prefix));
    }
    Ok(())
}

/// Joins the lock queues read under `locks_root` and the value blocks read under
/// `values_root` (`<values_root><resource>`) by resource: value and holders per lock,
/// sorted by resource.
fn group_values(
    locks_root: &str,
    queues: &[KeyValue],
    values_root: &str,
    values: &[KeyValue],
) -> Result<Vec<LockValue>, LockError> {
    let mut by: std::collections::BTreeMap<String, (Vec<u8>, Vec<String>)> =
        queues_by_resource(locks_root, queues)?
            .into_iter()
            .map(|(res, q)| (res, (Vec::new(), holder_names(&q))))
            .collect();
    for kv in values {
        let key = String::from_utf8_lossy(kv.key());
        if let Some(res) = key.strip_prefix(values_root) {
            by.entry(res.to_owned()).or_default().0 = kv.value().to_vec();
        }
    }
    Ok(by
        .into_iter()
        .map(|(resource, (value, holders))| LockValue {
            resource,
            value,
            holders,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(modes: &str) -> Vec<Entry> {
        modes
            .chars()
            .enumerate()
            .map(|(i, c)| Entry {
                rev: 10 + i as i64,
                session: i as i64 + 1,
                rec: LockRecord {
                    node: format!("n{i}"),
                    mode: if c == 'x' {
                        Mode::Exclusive
                    } else {
                        Mode::Shared
                    },
                },
                key: vec![],
            })
            .collect()
    }

    #[test]
    fn read_values_refuses_too_many_locks_or_bytes() {
        let lock = |i: usize, value: usize| LockValue {
            resource: format!("md/a/slot/{i}"),
            value: vec![0; value],
            holders: vec!["node1".into()],
        };
        let fits: Vec<_> = (0..MAX_READ_VALUES).map(|i| lock(i, 24)).collect();
        assert!(within_read_bounds("md/", &fits).is_ok());
        let many: Vec<_> = (0..=MAX_READ_VALUES).map(|i| lock(i, 0)).collect();
        let e = within_read_bounds("md/", &many).unwrap_err();
        assert!(e.to_string().contains("longer prefix"), "{e}");
        let big: Vec<_> = (0..3).map(|i| lock(i, MAX_READ_VALUES_BYTES / 2)).collect();
        assert!(within_read_bounds("md/", &big).is_err());
    }

    #[test]
    fn exclusive_first_is_granted_alone() {
        let q = q("xxs");
        assert!(is_granted(&q, 0));
        assert!(!is_granted(&q, 1));
        assert!(!is_granted(&q, 2));
        assert_eq!(predecessor(&q, 1), Some(0));
        assert_eq!(predecessor(&q, 2), Some(1));
        assert_eq!(names(holders(&q)), "n0");
    }

    #[test]
    fn leading_shared_run_is_granted() {
        let q = q("ssxs");
        assert_eq!(
            (0..4).map(|i| is_granted(&q, i)).collect::<Vec<_>>(),
            [true, true, false, false]
        );
        // The exclusive waiter watches the nearest earlier request, the shared one the
        // nearest earlier exclusive.
        assert_eq!(predecessor(&q, 2), Some(1));
        assert_eq!(predecessor(&q, 3), Some(2));
        assert_eq!(names(holders(&q)), "n0, n1");
    }

    #[test]
    fn expiry_is_told_once_to_every_waiter() {
        // Dead exclusive holder (session 1), then: exclusive 2 (me, watched 1),
        // shared 3 (watches 2), exclusive 4 (watches 3).
        let full = q("xxsx");
        let rest = full[1..].to_vec();
        assert_eq!(
            expired_recipients(&rest, &full[0], 2, 11, true),
            vec![2, 3, 4]
        );
        // Not the immediate successor: only itself.
        assert_eq!(expired_recipients(&rest, &full[0], 2, 11, false), vec![2]);
        // Dead exclusive holder, then shared 2 (me) and shared 3 both watched it: 3 finds
        // out itself; exclusive 4 watched 3 and is told by me.
        let full = q("xssx");
        let rest = full[1..].to_vec();
        assert_eq!(expired_recipients(&rest, &full[0], 2, 11, true), vec![2, 4]);
    }

    #[test]
    fn empty_queue_has_nobody() {
        assert_eq!(names(holders(&[])), "nobody");
    }
}
