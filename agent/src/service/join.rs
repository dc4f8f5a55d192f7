//! Joining and leaving a clustered array through the lock service (RFC 0001 "Join" and
//! "Leave").
//!
//! Join (assemble of a clustered array on this node):
//! 1. the node's session is open (else EIO);
//! 2. take the first free `md/<uuid>/slot/N` lock no-queue, N = 0..nodes−1; it is held
//!    for the whole membership. None free: EBUSY when every slot is held by a different
//!    node (a member); when some node holds two (step 4's probe of another joiner, or a
//!    survivor's recovery) try again shortly, bounded (see [`take_slot`]);
//! 3. subscribe to the array's message channel;
//! 4. for every other slot M: try `slot/M` no-queue. Held (its node is alive): read its
//!    value block (the node's resync window): an active one is installed in the engine
//!    as the remote window once it runs. Granted (the slot is unused):
//!    if slot M has dirty bits on disk, merge them into our slot on every member and
//!    mark the superblocks unclean, so the engine resyncs exactly those chunks when it
//!    starts; release `slot/M`. Our own slot's dirty bits (a previous crash of this
//!    node) also mark the superblocks unclean: the clean flag is shared by all nodes.
//!
//! Storage fencing (`crate::reserve`), right after step 2 and before any write: the
//! members are probed once; on those that take persistent reservations the node
//! registers `PrKey::new(slot, token)` and reserves the device if nobody holds it; the
//! key is published in our slot lock's value block (with the empty resync window) for
//! a survivor to preempt. A failure there fails the join. Taking the slot again on a
//! new session registers the new token's key the same way.
//!
//! Leave (after the lifecycle's stop): when our slot was dirty, publish
//! `BITMAP_NEEDS_SYNC(slot)` with a deadline; unsubscribe; unregister our key; release
//! the slot lock.
//! Every lock-service call is bounded by the session's RPC timeout; nothing queues.
//! What the probes and a busy slot search mean is decided by [`crate::cluster::join`].

use std::path::PathBuf;
use std::time::Duration;

use crate::lockport::{Mode, Session, Wait};
use mdcluster_proto::status::WireError;
use mdcluster_proto::v1::Errno;

use super::message::lock_error;
use crate::cluster::join::{all_busy, gather, merge_needed, Busy, Gather, Probe};
use crate::cluster::Timings;
use crate::cluster::{channel, slot_lock, ClusterMsg, MsgType, ResyncInfo};
use crate::format::fmt_uuid;
use crate::format::io::{DeviceError, Member};
use crate::reserve::{ArrayPr, PrKey};

/// What a joined array holds in the lock service.
#[derive(Debug, Clone)]
pub struct Membership {
    /// The array (for logs).
    pub array: String,
    /// Its UUID.
    pub uuid: [u8; 16],
    /// Our bitmap slot.
    pub slot: u32,
    /// The fencing token of our slot lock.
    pub token: u64,
    /// Chunks merged from unused dirty slots at join.
    pub merged_chunks: u64,
    /// A live node's resync window read at join (`ResyncInfo`, sectors), installed in
    /// the engine once it runs.
    pub remote_window: Option<(u64, u64)>,
    /// The members that take persistent reservations (and those that do not).
    pub pr: ArrayPr,
}

impl Membership {
    /// Our reservation key: our slot and our slot lock's fencing token.
    pub fn pr_key(&self) -> PrKey {
        PrKey::new(self.slot, self.token)
    }
}

/// Publishes our (empty) resync window and reservation key in our slot lock's value
/// block, then registers the key on the members that take reservations.
async fn publish_and_register(session: &Session, m: &Membership) -> Result<(), WireError> {
    let res = slot_lock(&m.uuid, m.slot);
    let info = ResyncInfo {
        pr_key: m.pr_key().0,
        ..ResyncInfo::default()
    };
    if let Err(e) = session.write_value(&res, m.token, &info.encode()).await {
        tracing::warn!(array = %m.array, lock = %res, "publishing our reservation key (a survivor cannot fence us by storage without it): {e}");
    }
    if !m.pr.any() {
        return Ok(());
    }
    let (pr, key) = (m.pr.clone(), m.pr_key());
    let r = tokio::task::spawn_blocking(move || pr.join(key))
        .await
        .map_err(|e| {
            WireError::new(
                Errno::Eio,
                format!("array {}", m.array),
                format!("reservation task failed: {e}"),
            )
        })?;
    r.map_err(|e| {
        WireError::new(
            Errno::Eio,
            format!("array {}", m.array),
            format!("array {}: registering reservation key {:#x} (slot {}): {e}; check the device's persistent-reservation support or stop the array on the node that holds it", m.array, key.0, m.slot),
        )
    })?;
    tracing::info!(array = %m.array, slot = m.slot, key = format_args!("{:#x}", key.0), "registered reservation key");
    Ok(())
}

/// Joins array `name` (whose first readable member is `first`) on this node: takes a
/// slot and gathers the others. See the module doc.
pub async fn join(
    session: &Session,
    name: &str,
    node: &str,
    members: &[PathBuf],
    first: &Member,
    fence: crate::fence::FenceTicket,
    timings: &Timings,
) -> Result<Membership, WireError> {
    let uuid = first.sb.set_uuid;
    let Some(b0) = first.bitmap.first() else {
        return Err(WireError::new(
            Errno::Einval,
            format!("array {name}"),
            format!("array {name} has no clustered bitmap"),
        ));
    };
    let nodes = b0.sb.slots().max(1);
    if !session.is_live() {
        return Err(WireError::new(
            Errno::Eio,
            format!("node {node}"),
            "no live session with mdserver; the agent will rejoin when it is back",
        ));
    }
    // Step 2: the first free slot.
    let (slot, token) = take_slot(session, name, &uuid, nodes, timings.slot_wait).await?;
    let (array, paths) = (name.to_owned(), members.to_vec());
    let pr = tokio::task::spawn_blocking(move || ArrayPr::probe(&array, &paths))
        .await
        .unwrap_or_default();
    let mut m = Membership {
        array: name.to_owned(),
        uuid,
        slot,
        token,
        merged_chunks: 0,
        remote_window: None,
        pr,
    };
    // A window left in our slot's value by an earlier holder that died mid-resync
    // would hold other nodes' writes: start with none (and publish our key).
    if let Err(e) = publish_and_register(session, &m).await {
        leave(session, &m, false, timings).await;
        return Err(e);
    }
    // Step 3.
    if let Err(e) = session.subscribe(&channel(&uuid)).await {
        leave(session, &m, false, timings).await;
        return Err(lock_error(e, &format!("subscribe {}", channel(&uuid))));
    }
    // Step 4.
    let mut merge_from = Vec::new();
    for other in (0..nodes).filter(|&o| o != slot) {
        let res = slot_lock(&uuid, other);
        match session.acquire(&res, Mode::Exclusive, Wait::NoQueue).await {
            Ok(g) => {
                let dirty = crate::format::slots::dirty_chunks(first, other);
                if gather(Probe::Free { dirty }) == Gather::Merge {
                    merge_from.push(other);
                }
                if let Err(e) = session.release(&res, g.token).await {
                    tracing::warn!(array = name, lock = %res, "release after gathering: {e}");
                }
            }
            Err(e) if e.errno() == Errno::Ebusy => match session.read_value(&res).await {
                Ok((v, holders)) => {
                    let w = ResyncInfo::decode(&v);
                    if let Gather::RemoteWindow(lo, hi) = gather(Probe::Held(w)) {
                        m.remote_window = Some((lo, hi));
                    }
                    tracing::info!(
                        array = name,
                        slot = other,
                        ?holders,
                        lo = w.lo,
                        hi = w.hi,
                        "slot held by a live node"
                    );
                }
                Err(e) => tracing::warn!(array = name, lock = %res, "read slot value: {e}"),
            },
            Err(e) => tracing::warn!(array = name, lock = %res, "probe slot: {e}"),
        }
    }
    // Our own slot's bits count too: the superblock's clean flag is shared by every
    // node, so a node that died dirty may find it marked clean by another node's stop.
    let own_dirty = crate::format::slots::dirty_chunks(first, slot);
    if merge_needed(merge_from.len(), own_dirty) {
        let paths = members.to_vec();
        let from = merge_from.clone();
        let merged = tokio::task::spawn_blocking(move || {
            crate::format::slots::merge(&paths, slot, &from, Some(&fence))
        })
        .await;
        match merged {
            Ok(Ok(n)) => {
                m.merged_chunks = n;
                tracing::info!(array = name, slot, from = ?merge_from, chunks = n, "merged dirty bits of unused slots; they are resynced at start");
            }
            Ok(Err(e)) => {
                let errno = if matches!(e, DeviceError::Io { .. }) {
                    Errno::Eio
                } else {
                    Errno::Einval
                };
                leave(session, &m, false, timings).await;
                return Err(WireError::new(
                    errno,
                    format!("array {name}"),
                    format!("merging dirty bitmap slots of {name}: {e}"),
                ));
            }
            Err(e) => {
                leave(session, &m, false, timings).await;
                return Err(WireError::new(
                    Errno::Eio,
                    format!("array {name}"),
                    format!("merge task failed: {e}"),
                ));
            }
        }
    }
    tracing::info!(array = name, slot, token, "joined");
    Ok(m)
}

/// Step 2: takes the first free `slot/N` lock, no-queue. A slot can be busy for a
/// moment without being anyone's: a node that joins holds its own slot and, while it
/// gathers (step 4), briefly one other. A node is a member through exactly one slot, so
/// when every slot is busy but some node holds more than one of them (or a slot has no
/// holder any more), a slot is only being probed (or recovered by a survivor): try
/// again after a short, jittered pause, for at most
/// [`Timings::slot_wait`]. EBUSY only when every
/// slot is held by a different node — each one a member — or at that deadline.
async fn take_slot(
    session: &Session,
    name: &str,
    uuid: &[u8; 16],
    nodes: u32,
    slot_wait: Duration,
) -> Result<(u32, u64), WireError> {
    let deadline = tokio::time::Instant::now() + slot_wait;
    let mut pause = Duration::from_millis(10);
    loop {
        for n in 0..nodes {
            let res = slot_lock(uuid, n);
            match session.acquire(&res, Mode::Exclusive, Wait::NoQueue).await {
                Ok(g) => {
                    let waited = slot_wait.saturating_sub(
                        deadline.saturating_duration_since(tokio::time::Instant::now()),
                    );
                    crate::metrics::agent().lock_wait("slot", waited);
                    return Ok((n, g.token));
                }
                Err(e) if e.errno() == Errno::Ebusy => {}
                Err(e) => return Err(lock_error(e, &format!("lock {res}"))),
            }
        }
        // Every slot was busy: by whom?
        let mut holders = Vec::with_capacity(nodes as usize);
        for n in 0..nodes {
            let res = slot_lock(uuid, n);
            let (_, h) = session
                .read_value(&res)
                .await
                .map_err(|e| lock_error(e, &format!("read lock {res}")))?;
            holders.push(h);
        }
        let held_by = |h: &[String]| {
            if h.is_empty() {
                "nobody now".to_owned()
            } else {
                h.join(",")
            }
        };
        let listed = holders
            .iter()
            .enumerate()
            .map(|(n, h)| format!("slot {n}: {}", held_by(h)))
            .collect::<Vec<_>>()
            .join("; ");
        if all_busy(&holders) == Busy::Full {
            return Err(WireError::new(
                Errno::Ebusy,
                format!("array {name}"),
                format!("all {nodes} bitmap slots of array {name} ({}) are held by other nodes ({listed}); stop it on one of them or create it with more --nodes", fmt_uuid(uuid)),
            ));
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Err(WireError::new(
                Errno::Ebusy,
                format!("array {name}"),
                format!("no bitmap slot of array {name} ({}) came free within {slot_wait:?} ({listed}): a node holding two slots is recovering one of them; try again once it is done", fmt_uuid(uuid)),
            ));
        }
        tracing::debug!(array = name, %listed, "every slot busy, some only for a moment; trying again");
        // Jitter, so joiners that collided do not collide again in step.
        let jitter = Duration::from_micros(u64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
                % 10_000,
        ));
        tokio::time::sleep((pause + jitter).min(deadline - now)).await;
        pause = (pause * 2).min(Duration::from_millis(200));
    }
}

/// Leaves: BITMAP_NEEDS_SYNC when `dirty`, unsubscribe, release the slot. Failures are
/// logged: the slot lock goes away with the session at the latest.
pub async fn leave(session: &Session, m: &Membership, dirty: bool, timings: &Timings) {
    let ch = channel(&m.uuid);
    if dirty {
        let msg = ClusterMsg::new(MsgType::BitmapNeedsSync, m.slot);
        match session
            .publish(&ch, &msg.encode(), timings.leave_publish)
            .await
        {
            Ok(o) if !o.all_ok => {
                tracing::warn!(array = %m.array, unanswered = ?o.unanswered(), "BITMAP_NEEDS_SYNC not acknowledged by every node")
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(array = %m.array, "publish BITMAP_NEEDS_SYNC: {e}"),
        }
    }
    if let Err(e) = session.unsubscribe(&ch).await {
        tracing::debug!(array = %m.array, "unsubscribe: {e}");
    }
    if m.pr.any() {
        let (pr, key) = (m.pr.clone(), m.pr_key());
        match tokio::task::spawn_blocking(move || pr.leave(key)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(array = %m.array, "unregistering our reservation key: {e}")
            }
            Err(e) => tracing::warn!(array = %m.array, "unregister task failed: {e}"),
        }
    }
    let res = slot_lock(&m.uuid, m.slot);
    match session.release(&res, m.token).await {
        Ok(()) => tracing::info!(array = %m.array, slot = m.slot, "left"),
        Err(e) => tracing::warn!(array = %m.array, lock = %res, "release slot lock: {e}"),
    }
}
