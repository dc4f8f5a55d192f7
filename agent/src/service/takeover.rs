//! Node failure and slot recovery (RFC 0001): a survivor takes over a dead node's
//! bitmap slot and resyncs exactly the chunks that slot marks dirty. The decisions
//! (which slot, when, which key, what is announced) are made by
//! [`crate::cluster::takeover`]; this module carries them out.
//!
//! Every [`crate::cluster::Timings::takeover_period`] the node reads the holders of
//! every other slot lock of each clustered array it has joined (a lock-free read of the
//! value block; one `ReadValues` call over every array lock per period, however many
//! arrays the node has, see [`super::slot_reads`]) into the array's
//! [`crate::cluster::takeover::SlotWatch`]. When a slot
//! that had a holder has none now and that holder has no live session any more (it is
//! gone from the node registry: its lease expired), the node recovers the slot. A
//! node that joined and died between two reads is never seen as a holder; its join
//! changed the slot lock's value block (its published key), so a slot free at both
//! reads whose value block changed has its bits read once on the members, and dirty
//! bits are recovered the same way (a clean leave's bits are clean: nothing is done).
//! Recovery:
//!
//! 1. take `slot/N` no-queue (another survivor got it first: nothing to do);
//!    Then, where the members take persistent reservations, preempt the dead node's
//!    key — read from slot N's value block at grant, where its joiner published it —
//!    before anything of the slot is touched: from then on the devices refuse its
//!    writes ([`preempt_dead_key`]). No key published (a node of a version before
//!    keys were published): the slot is recovered under the fence gate only, logged;
//! 2. read slot N's bits on every member (their union, [`crate::format::slots`]);
//! 3. merge them into this node's running bitmap: each chunk's bit is made durable in
//!    our slot (`start_write`) and marked needed (`end_write(.., degraded)`), then ask
//!    the engine for a bitmap-driven resync (which holds the engine's barrier against
//!    this node's own writes, chunk by chunk);
//! 4. clear slot N's bits on disk (ours are durable first, so a crash in between
//!    loses nothing);
//! 5. release `slot/N`, and emit `SlotTakenOver` with the chunk count; once none of
//!    those chunks is needed any more (the resync ran over them), emit `SlotRecovered`
//!    with the same count. The watch is bounded ([`crate::cluster::takeover::Announcer`]):
//!    when the resync run that covers them ends with some still needed, or after
//!    [`crate::cluster::Timings::announce_deadline`], `SlotRecoveryIncomplete` says how
//!    many are left (a later run resyncs them); an array stopped first keeps the bits
//!    in this node's slot, resynced at its next assembly (logged).
//!
//! A holder that left cleanly (its stop released the slot while its session lives on)
//! is not recovered: its slot is clean. A holder that left with dirty bits says so with
//! BITMAP_NEEDS_SYNC; every receiver then recovers the slot the same way once it is
//! released ([`needs_sync`]; the first wins, the others find it clean). Polling the
//! holders instead of queueing on each slot lock keeps a rejoining node's join from
//! meeting a survivor's queued request.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use crate::lockport::{Mode, Session, Wait};
use tokio_util::sync::CancellationToken;

use super::cluster_array::ClusterArray;
use super::Node;
use crate::cluster::slot_lock;
use crate::cluster::takeover::{
    after_merge, dead_holders, key_to_preempt, unseen_holder, AfterMerge, Announce, Announcer,
    Decision, ReleaseWait, ResyncSeen, WaitStep, Watch,
};
use crate::format::io::DeviceError;
use crate::raid::{Raid1, SyncKind};
use crate::reserve::{ArrayPr, PrError, PrKey};

/// Errors of one recovery.
#[derive(Debug, thiserror::Error)]
pub enum TakeoverError {
    /// The array is not active here any more.
    #[error("array {0} is not active on this node")]
    Gone(String),
    /// The array has no bitmap.
    #[error("array {0} has no bitmap")]
    NoBitmap(String),
    /// Reading or clearing the dead slot failed.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// Marking our bits failed.
    #[error("array {array}: {reason}")]
    Bitmap {
        /// The array.
        array: String,
        /// Why.
        reason: String,
    },
}

/// Watches every joined clustered array's other slots until `stop`.
pub fn spawn(node: Arc<Node>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let period = node.timings().takeover_period;
        let mut reads = super::slot_reads::SlotReads::default();
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            let Some(session) = node.session() else {
                continue;
            };
            if !session.is_live() {
                continue;
            }
            let arrays = node.cluster_arrays();
            if arrays.is_empty() {
                continue;
            }
            let mut batch = reads.read(&*session).await;
            for arr in arrays {
                if batch.is_stale(period) {
                    // Recovering an earlier array took a while: read again, so that no
                    // decision rests on a read older than one period.
                    batch = reads.read(&*session).await;
                }
                for other in (0..arr.slots()).filter(|&s| s != arr.slot()) {
                    let res = slot_lock(arr.uuid(), other);
                    let Some((value, holders)) = batch.get(&*session, &res).await else {
                        continue;
                    };
                    let watch = arr.watch().seen(other, holders, value.clone());
                    let decision = match watch {
                        Watch::Nothing => continue,
                        Watch::CheckBits => Decision::CheckBits,
                        Watch::CheckLiveness { prev, changed } => {
                            let live: HashSet<String> = match session.nodes().await {
                                Ok(n) => n.into_iter().map(|e| e.node).collect(),
                                Err(e) => {
                                    tracing::warn!("takeover: list nodes: {e}");
                                    arr.watch().forget(other);
                                    continue;
                                }
                            };
                            dead_holders(prev, &live, node.name(), changed)
                        }
                    };
                    let decision = match decision {
                        Decision::CheckBits => match slot_dirty(&node, &arr, other).await {
                            Ok(dirty) => unseen_holder(dirty),
                            Err(e) => {
                                tracing::warn!(array = arr.name(), slot = other, "takeover: reading the bits of a slot held between two reads: {e}; read again next period");
                                arr.watch().forget(other);
                                continue;
                            }
                        },
                        d => d,
                    };
                    match decision {
                        Decision::CleanLeave | Decision::CheckBits => {}
                        Decision::Recover { dead } if dead.is_empty() => {
                            let unseen = [unseen_name(&value, other)];
                            recover(&node, &session, &arr, other, &unseen).await
                        }
                        Decision::Recover { dead } => {
                            recover(&node, &session, &arr, other, &dead).await
                        }
                    }
                }
            }
        }
    })
}

/// Whether slot `slot` of `arr` has dirty bits on any readable member (one read of
/// the slot on every member; a slot none of them has reads clean).
async fn slot_dirty(node: &Node, arr: &ClusterArray, slot: u32) -> Result<bool, TakeoverError> {
    let name = arr.name();
    let (_, members) = node
        .raid_of(name)
        .ok_or_else(|| TakeoverError::Gone(name.to_owned()))?;
    let bits =
        tokio::task::spawn_blocking(move || crate::format::slots::read_union(&members, slot))
            .await
            .map_err(|e| TakeoverError::Bitmap {
                array: name.to_owned(),
                reason: format!("read task failed: {e}"),
            })??;
    Ok(bits.is_some_and(|b| b.count() > 0))
}

/// How the events name the holder of slot `slot` that no read saw: by the
/// reservation key it published in `value`, if any.
fn unseen_name(value: &[u8], slot: u32) -> String {
    let key = PrKey(crate::cluster::ResyncInfo::decode(value).pr_key);
    if key.0 != 0 && key.slot() == slot {
        format!("(unseen, reservation key {:#x})", key.0)
    } else {
        "(unseen)".to_owned()
    }
}

/// BITMAP_NEEDS_SYNC from `from` (it left array `arr` with slot `slot` dirty): once its
/// leave has released the slot (read with backoff for at most
/// [`crate::cluster::Timings::needs_sync_wait`]), recover the slot as for a failed node.
pub async fn needs_sync(
    node: Arc<Node>,
    session: Arc<Session>,
    arr: Arc<ClusterArray>,
    slot: u32,
    from: String,
) {
    let res = slot_lock(arr.uuid(), slot);
    let limit = node.timings().needs_sync_wait;
    let mut wait = ReleaseWait::new(limit);
    let start = tokio::time::Instant::now();
    loop {
        let held = session
            .read_value(&res)
            .await
            .ok()
            .map(|(_, h)| !h.is_empty());
        match wait.step(held, start.elapsed()) {
            WaitStep::Recover => break,
            WaitStep::Sleep(d) => tokio::time::sleep(d).await,
            WaitStep::GiveUp => {
                tracing::warn!(array = arr.name(), slot, "BITMAP_NEEDS_SYNC from {from}: slot still held after {limit:?}; not recovered here");
                return;
            }
        }
    }
    recover(&node, &session, &arr, slot, &[from]).await;
}

async fn recover(
    node: &Arc<Node>,
    session: &Session,
    arr: &Arc<ClusterArray>,
    slot: u32,
    dead: &[String],
) {
    let name = arr.name();
    let res = slot_lock(arr.uuid(), slot);
    let grant = match session.acquire(&res, Mode::Exclusive, Wait::NoQueue).await {
        Ok(g) => g,
        Err(e) => {
            tracing::info!(
                array = name,
                slot,
                "slot of failed node {dead:?} taken by another survivor: {e}"
            );
            return;
        }
    };
    tracing::warn!(array = name, slot, failed = ?dead, "recovering the bitmap slot of a failed node");
    crate::metrics::agent().slot_takeover(name);
    let m = arr.membership();
    if m.pr.any() {
        let (pr, mine, value) = (m.pr.clone(), m.pr_key(), grant.value.clone());
        match tokio::task::spawn_blocking(move || preempt_dead_key(&pr, mine, slot, &value)).await {
            Ok(Ok(Some(k))) => {
                tracing::warn!(array = name, slot, failed = ?dead, key = format_args!("{:#x}", k.0), "preempted the failed node's reservation key: the devices refuse its writes")
            }
            Ok(Ok(None)) => {
                tracing::error!(array = name, slot, failed = ?dead, "the failed node published no reservation key in its slot lock: it cannot be fenced by storage, only by its own fence gate")
            }
            Ok(Err(e)) => {
                tracing::error!(array = name, slot, failed = ?dead, "preempting the failed node's reservation key failed ({e}); it is fenced by its own fence gate only")
            }
            Err(e) => tracing::error!(array = name, slot, "preempt task failed: {e}"),
        }
    }
    let result = match node.raid_of(name) {
        Some((raid, members)) => recover_locked(name, &raid, &members, slot).await,
        None => Err(TakeoverError::Gone(name.to_owned())),
    };
    if let Err(e) = session.release(&res, grant.token).await {
        tracing::warn!(array = name, lock = %res, "release after recovery: {e}");
    }
    let component = format!("slot{slot}");
    match result {
        Ok(Merged { chunks, pending }) => {
            tracing::info!(array = name, slot, chunks, "slot taken over");
            let dead = dead.join(", ");
            node.emit(
                "SlotTakenOver",
                name,
                &component,
                format!(
                    "node {} took over bitmap slot {slot} of {name} (node {dead} failed or left it dirty): {chunks} dirty chunks to resync",
                    node.name()
                ),
            );
            let done = format!(
                "node {} recovered bitmap slot {slot} of {name} (node {dead} failed or left it dirty): {chunks} dirty chunks resynced",
                node.name()
            );
            match (after_merge(chunks), pending) {
                (AfterMerge::Watch, Some((raid, offsets))) => {
                    tokio::spawn(announce_resynced(
                        Arc::downgrade(node),
                        Arc::downgrade(&raid),
                        name.to_owned(),
                        slot,
                        offsets,
                        done,
                    ));
                }
                _ => node.emit("SlotRecovered", name, &component, done),
            }
        }
        Err(e) => {
            tracing::error!(array = name, slot, "slot recovery failed: {e}");
            node.emit(
                "SlotRecoveryFailed",
                name,
                &component,
                format!(
                    "node {}: recovering slot {slot} of {name} failed: {e}",
                    node.name()
                ),
            );
        }
    }
}

/// Preempts, as `mine`, the reservation key that slot `slot`'s holder published in the
/// slot lock's value block `value` ([`key_to_preempt`]; see the module doc, step 1).
/// `Ok(None)`: no key of that slot published, nothing done. Blocking.
pub fn preempt_dead_key(
    pr: &ArrayPr,
    mine: PrKey,
    slot: u32,
    value: &[u8],
) -> Result<Option<PrKey>, PrError> {
    let Some(key) = key_to_preempt(value, slot, mine) else {
        return Ok(None);
    };
    pr.take_over(mine, key)?;
    Ok(Some(key))
}

/// The chunks of a recovered slot still to resync: the array and each chunk's
/// (offset, length) in array bytes.
type Pending = (Arc<Raid1>, Vec<(u64, u64)>);

/// What a recovery merged: the chunk count and what is left to resync, if anything.
struct Merged {
    chunks: u64,
    pending: Option<Pending>,
}

/// Emits `SlotRecovered` (`detail`) once none of `chunks` of `raid` is needed any more;
/// bounded by the resync run over them and the announce deadline
/// ([`Announcer`]), and ends when the array stops or the node goes first.
async fn announce_resynced(
    node: std::sync::Weak<Node>,
    raid: std::sync::Weak<Raid1>,
    name: String,
    slot: u32,
    chunks: Vec<(u64, u64)>,
    detail: String,
) {
    let Some(timings) = node.upgrade().map(|n| *n.timings()) else {
        return;
    };
    let mut announcer = Announcer::new(timings.announce_deadline);
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(timings.resync_poll);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let component = format!("slot{slot}");
    loop {
        tick.tick().await;
        let (Some(node), Some(raid)) = (node.upgrade(), raid.upgrade()) else {
            tracing::info!(array = %name, slot, "array stopped before the recovered slot's chunks were resynced; they stay dirty in this node's slot");
            return;
        };
        let current = node
            .raid_of(&name)
            .is_some_and(|(r, _)| Arc::ptr_eq(&r, &raid));
        let left = raid.bitmap().map_or(0, |bm| {
            chunks
                .iter()
                .filter(|&&(off, len)| bm.is_needed(off, len))
                .count() as u64
        });
        let seen = ResyncSeen {
            array_current: current,
            chunks_left: left,
            resync_running: raid.status().sync.kind == Some(SyncKind::Resync),
            resync_pending: raid.sync_busy(),
        };
        match announcer.look(seen, start.elapsed()) {
            Announce::Wait => {}
            Announce::Recovered => {
                tracing::info!(array = %name, slot, chunks = chunks.len(), "slot recovered: its chunks are resynced");
                node.emit("SlotRecovered", &name, &component, detail);
                return;
            }
            Announce::Stopped => {
                tracing::info!(array = %name, slot, "array stopped before the recovered slot's chunks were resynced; they stay dirty in this node's slot");
                return;
            }
            Announce::ResyncEnded { left } => {
                node.emit(
                    "SlotRecoveryIncomplete",
                    &name,
                    &component,
                    format!(
                        "node {}: the resync over bitmap slot {slot} of {name} ended with {left} of {} recovered chunks still to resync; they stay marked in this node's bitmap for the next resync",
                        node.name(),
                        chunks.len()
                    ),
                );
                return;
            }
            Announce::Deadline { left } => {
                node.emit(
                    "SlotRecoveryIncomplete",
                    &name,
                    &component,
                    format!(
                        "node {}: {left} of {} recovered chunks of bitmap slot {slot} of {name} were still not resynced after {:?}; they stay marked in this node's bitmap (check the array's resync)",
                        node.name(),
                        chunks.len(),
                        timings.announce_deadline
                    ),
                );
                return;
            }
        }
    }
}

/// Steps 2–4 of the module doc.
async fn recover_locked(
    name: &str,
    raid: &Arc<Raid1>,
    members: &[PathBuf],
    slot: u32,
) -> Result<Merged, TakeoverError> {
    let bm = raid
        .bitmap()
        .ok_or_else(|| TakeoverError::NoBitmap(name.to_owned()))?;
    let paths = members.to_vec();
    let bits = tokio::task::spawn_blocking(move || crate::format::slots::read_union(&paths, slot))
        .await
        .map_err(|e| TakeoverError::Bitmap {
            array: name.to_owned(),
            reason: format!("read task failed: {e}"),
        })??;
    // The failed node's resync window (if it was resyncing) no longer holds writes.
    let _ = raid.set_remote_resync_window(None).await;
    let nothing = Merged {
        chunks: 0,
        pending: None,
    };
    let Some(union) = bits else {
        return Ok(nothing);
    };
    let dirty = union.dirty();
    if dirty.is_empty() {
        return Ok(nothing);
    }
    let cb = bm.geometry().chunk_bytes;
    for &c in &dirty {
        bm.start_write(c * cb, cb)
            .await
            .map_err(|e| TakeoverError::Bitmap {
                array: name.to_owned(),
                reason: e.to_string(),
            })?;
        bm.end_write(c * cb, cb, true);
    }
    raid.request_resync();
    let paths = members.to_vec();
    let fence = raid.fence_ticket();
    tokio::task::spawn_blocking(move || crate::format::slots::clear(&paths, slot, fence))
        .await
        .map_err(|e| TakeoverError::Bitmap {
            array: name.to_owned(),
            reason: format!("clear task failed: {e}"),
        })??;
    Ok(Merged {
        chunks: union.count(),
        pending: Some((raid.clone(), dirty.iter().map(|&c| (c * cb, cb)).collect())),
    })
}

/// md-cluster's `gather_bitmaps` for a re-add: the bits of every slot but `mine` (the
/// chunks other nodes wrote, also while the member was out; a degraded write keeps its
/// bit) are marked needed in this node's bitmap, on disk first, without clearing them
/// there. Returns how many chunks were marked.
pub async fn gather_slots(
    name: &str,
    raid: &Arc<Raid1>,
    members: &[PathBuf],
    mine: u32,
    slots: u32,
) -> Result<u64, TakeoverError> {
    let bm = raid
        .bitmap()
        .ok_or_else(|| TakeoverError::NoBitmap(name.to_owned()))?;
    let cb = bm.geometry().chunk_bytes;
    let mut marked = 0;
    for slot in (0..slots).filter(|&s| s != mine) {
        let paths = members.to_vec();
        let bits =
            tokio::task::spawn_blocking(move || crate::format::slots::read_union(&paths, slot))
                .await
                .map_err(|e| TakeoverError::Bitmap {
                    array: name.to_owned(),
                    reason: format!("read task failed: {e}"),
                })??;
        let Some(union) = bits else {
            continue;
        };
        let chunks = bm.geometry().chunks;
        for c in union.dirty().into_iter().filter(|&c| c < chunks) {
            bm.start_write(c * cb, cb)
                .await
                .map_err(|e| TakeoverError::Bitmap {
                    array: name.to_owned(),
                    reason: e.to_string(),
                })?;
            bm.end_write(c * cb, cb, true);
            marked += 1;
        }
    }
    Ok(marked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::ResyncInfo;
    use crate::reserve::{MemoryDevice, MemoryPr, Reservations};

    #[test]
    fn the_survivor_preempts_exactly_the_key_published_in_the_dead_slot() {
        let dev = Arc::new(MemoryDevice::default());
        let h = |n: &str| MemoryPr::new(dev.clone(), n);
        let pr =
            |n: &str| ArrayPr::with_devices(vec![Arc::new(h(n)) as Arc<dyn Reservations>], vec![]);
        let (k0, k1, k2) = (PrKey::new(0, 7), PrKey::new(1, 8), PrKey::new(2, 9));
        pr("n0").join(k0).unwrap();
        pr("n1").join(k1).unwrap();
        pr("n2").join(k2).unwrap();
        // n1 (slot 1) died; its slot lock's value block holds its window and key.
        let value = ResyncInfo {
            lo: 0,
            hi: 0,
            pr_key: k1.0,
        }
        .encode();
        let got = preempt_dead_key(&pr("n0"), k0, 1, &value).unwrap();
        assert_eq!(got, Some(k1));
        assert_eq!(h("n1").registered(), None, "the dead node's key is gone");
        assert!(h("n1").write().is_err(), "the device refuses its writes");
        assert_eq!(
            h("n2").registered(),
            Some(k2),
            "nobody else's key is touched"
        );
        h("n2").write().unwrap();
        h("n0").write().unwrap();
        // No key published (an old value block of 16 bytes, or none): nothing done.
        let old = ResyncInfo::default().encode();
        assert_eq!(
            preempt_dead_key(&pr("n0"), k0, 2, &old[..16]).unwrap(),
            None
        );
        assert_eq!(preempt_dead_key(&pr("n0"), k0, 2, &[]).unwrap(), None);
        // A key of another slot is never preempted for this one.
        let wrong = ResyncInfo {
            pr_key: k2.0,
            ..ResyncInfo::default()
        }
        .encode();
        assert_eq!(preempt_dead_key(&pr("n0"), k0, 1, &wrong).unwrap(), None);
        assert_eq!(h("n2").registered(), Some(k2));
    }
}
