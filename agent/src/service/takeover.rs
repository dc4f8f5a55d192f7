//! Node failure and slot recovery (RFC 0001): a survivor takes over a dead node's
//! bitmap slot and resyncs exactly the chunks that slot marks dirty.
//!
//! Every [`PERIOD`] the node reads the holders of every other slot lock of each
//! clustered array it has joined (a lock-free read of the value block). When a slot
//! that had a holder has none now and that holder has no live session any more (it is
//! gone from the node registry: its lease expired), the node recovers the slot:
//!
//! 1. take `slot/N` no-queue (another survivor got it first: nothing to do);
//!    Then, where the members take persistent reservations, preempt the dead node's
//!    key — read from slot N's value block at grant, where its joiner published it —
//!    before anything of the slot is touched: from then on the devices refuse its
//!    writes ([`preempt_dead_key`]). No key published (a node of a version before
//!    keys were published): the slot is recovered under the fence gate only, logged;
//! 2. read slot N's bits on every member (their union);
//! 3. merge them into this node's running bitmap: each chunk's bit is made durable in
//!    our slot (`start_write`) and marked needed (`end_write(.., degraded)`), then ask
//!    the engine for a bitmap-driven resync (which holds the engine's barrier against
//!    this node's own writes, chunk by chunk);
//! 4. clear slot N's bits on disk (ours are durable first, so a crash in between
//!    loses nothing);
//! 5. release `slot/N`, and emit `SlotTakenOver` with the chunk count; once none of
//!    those chunks is needed any more (the resync ran over them), emit `SlotRecovered`
//!    with the same count (watched every [`RESYNC_POLL`] while the array stays active;
//!    an array stopped first keeps the bits in this node's slot, resynced at its next
//!    assembly).
//!
//! A holder that left cleanly (its stop released the slot while its session lives on)
//! is not recovered: its slot is clean. A holder that left with dirty bits says so with
//! BITMAP_NEEDS_SYNC; every receiver then recovers the slot the same way once it is
//! released ([`needs_sync`]; the first wins, the others find it clean). Polling the holders instead of queueing on each
//! slot lock keeps a rejoining node's join from meeting a survivor's queued request.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::lockport::{Mode, Session, Wait};
use tokio_util::sync::CancellationToken;

use super::Node;
use crate::cluster::{slot_lock, ResyncInfo};
use crate::format::bitmap::{count_set, test_bit, BitmapSuper};
use crate::format::io::{read_member, write_bitmap_slot, DeviceError, MetaDev};
use crate::raid::Raid1;
use crate::reserve::{ArrayPr, PrError, PrKey};

/// How often the slot holders are read.
pub const PERIOD: Duration = Duration::from_millis(500);
/// How often a recovered slot's chunks are checked for the end of their resync.
pub const RESYNC_POLL: Duration = Duration::from_millis(100);

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
        let mut last: HashMap<(String, u32), Vec<String>> = HashMap::new();
        let mut tick = tokio::time::interval(PERIOD);
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
            let joined = node.memberships();
            last.retain(|(a, _), _| joined.iter().any(|(n, _, _)| n == a));
            for (name, m, slots) in joined {
                for other in (0..slots).filter(|&s| s != m.slot) {
                    let res = slot_lock(&m.uuid, other);
                    let Ok((_, holders)) = session.read_value(&res).await else {
                        continue;
                    };
                    let prev = last
                        .insert((name.clone(), other), holders.clone())
                        .unwrap_or_default();
                    if !holders.is_empty() || prev.is_empty() {
                        continue;
                    }
                    let live: HashSet<String> = match session.nodes().await {
                        Ok(n) => n.into_iter().map(|e| e.node).collect(),
                        Err(e) => {
                            tracing::warn!("takeover: list nodes: {e}");
                            last.remove(&(name.clone(), other));
                            continue;
                        }
                    };
                    let dead: Vec<String> = prev
                        .into_iter()
                        .filter(|h| !live.contains(h) && h != node.name())
                        .collect();
                    if dead.is_empty() {
                        continue; // a clean leave
                    }
                    recover(&node, &session, &name, &m.uuid, other, &dead).await;
                }
            }
        }
    })
}

/// How long a BITMAP_NEEDS_SYNC receiver waits for the sender to release its slot.
pub const NEEDS_SYNC_WAIT: Duration = Duration::from_secs(10);

/// BITMAP_NEEDS_SYNC from `from` (it left array `name` with slot `slot` dirty): once its
/// leave has released the slot (read with backoff for at most [`NEEDS_SYNC_WAIT`]),
/// recover the slot as for a failed node.
pub async fn needs_sync(
    node: Arc<Node>,
    session: Arc<Session>,
    name: String,
    uuid: [u8; 16],
    slot: u32,
    from: String,
) {
    let res = slot_lock(&uuid, slot);
    let deadline = tokio::time::Instant::now() + NEEDS_SYNC_WAIT;
    let mut backoff = Duration::from_millis(50);
    loop {
        if let Ok((_, holders)) = session.read_value(&res).await {
            if holders.is_empty() {
                break;
            }
        }
        if tokio::time::Instant::now() + backoff >= deadline {
            tracing::warn!(array = %name, slot, "BITMAP_NEEDS_SYNC from {from}: slot still held after {NEEDS_SYNC_WAIT:?}; not recovered here");
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
    recover(&node, &session, &name, &uuid, slot, &[from]).await;
}

async fn recover(
    node: &Arc<Node>,
    session: &Session,
    name: &str,
    uuid: &[u8; 16],
    slot: u32,
    dead: &[String],
) {
    let res = slot_lock(uuid, slot);
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
    if let Some(m) = node.membership(name).filter(|m| m.pr.any()) {
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
    match result {
        Ok(Merged { chunks, pending }) => {
            tracing::info!(array = name, slot, chunks, "slot taken over");
            let dead = dead.join(", ");
            node.emit(
                "SlotTakenOver",
                name,
                &format!("slot{slot}"),
                format!(
                    "node {} took over bitmap slot {slot} of {name} (node {dead} failed or left it dirty): {chunks} dirty chunks to resync",
                    node.name()
                ),
            );
            let done = format!(
                "node {} recovered bitmap slot {slot} of {name} (node {dead} failed or left it dirty): {chunks} dirty chunks resynced",
                node.name()
            );
            match pending {
                None => node.emit("SlotRecovered", name, &format!("slot{slot}"), done),
                Some((raid, offsets)) => {
                    tokio::spawn(announce_resynced(
                        Arc::downgrade(node),
                        Arc::downgrade(&raid),
                        name.to_owned(),
                        slot,
                        offsets,
                        done,
                    ));
                }
            }
        }
        Err(e) => {
            tracing::error!(array = name, slot, "slot recovery failed: {e}");
            node.emit(
                "SlotRecoveryFailed",
                name,
                &format!("slot{slot}"),
                format!(
                    "node {}: recovering slot {slot} of {name} failed: {e}",
                    node.name()
                ),
            );
        }
    }
}

/// Preempts, as `mine`, the reservation key that slot `slot`'s holder published in the
/// slot lock's value block `value` (see the module doc, step 1). `Ok(None)`: no key of
/// that slot published, nothing done. Blocking.
pub fn preempt_dead_key(
    pr: &ArrayPr,
    mine: PrKey,
    slot: u32,
    value: &[u8],
) -> Result<Option<PrKey>, PrError> {
    let key = PrKey(ResyncInfo::decode(value).pr_key);
    if key.0 == 0 || key.slot() != slot || key == mine {
        return Ok(None);
    }
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
/// gives up silently (logged) when the array stops or the node goes first.
async fn announce_resynced(
    node: std::sync::Weak<Node>,
    raid: std::sync::Weak<Raid1>,
    name: String,
    slot: u32,
    chunks: Vec<(u64, u64)>,
    detail: String,
) {
    let mut tick = tokio::time::interval(RESYNC_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let (Some(node), Some(raid)) = (node.upgrade(), raid.upgrade()) else {
            tracing::info!(array = %name, slot, "array stopped before the recovered slot's chunks were resynced; they stay dirty in this node's slot");
            return;
        };
        let current = node.raid_of(&name).map(|(r, _)| r);
        if !current.is_some_and(|r| Arc::ptr_eq(&r, &raid)) {
            tracing::info!(array = %name, slot, "array stopped before the recovered slot's chunks were resynced; they stay dirty in this node's slot");
            return;
        }
        let Some(bm) = raid.bitmap() else { return };
        if chunks.iter().all(|&(off, len)| !bm.is_needed(off, len)) {
            tracing::info!(array = %name, slot, chunks = chunks.len(), "slot recovered: its chunks are resynced");
            node.emit("SlotRecovered", &name, &format!("slot{slot}"), detail);
            return;
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
    let bits = tokio::task::spawn_blocking(move || read_slot_union(&paths, slot))
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
    let Some((bits, chunks)) = bits else {
        return Ok(nothing);
    };
    let dirty: Vec<u64> = (0..chunks).filter(|&c| test_bit(&bits, c)).collect();
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
    tokio::task::spawn_blocking(move || clear_slot(&paths, slot, fence))
        .await
        .map_err(|e| TakeoverError::Bitmap {
            array: name.to_owned(),
            reason: format!("clear task failed: {e}"),
        })??;
    Ok(Merged {
        chunks: count_set(&bits, chunks),
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
        let bits = tokio::task::spawn_blocking(move || read_slot_union(&paths, slot))
            .await
            .map_err(|e| TakeoverError::Bitmap {
                array: name.to_owned(),
                reason: format!("read task failed: {e}"),
            })??;
        let Some((bits, chunks)) = bits else {
            continue;
        };
        let chunks = chunks.min(bm.geometry().chunks);
        for c in (0..chunks).filter(|&c| test_bit(&bits, c)) {
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

/// Whether slot `slot` has a set bit on any readable member (unreadable: assumed yes).
pub fn slot_dirty(paths: &[PathBuf], slot: u32) -> bool {
    match read_slot_union(paths, slot) {
        Ok(Some((bits, chunks))) => (0..chunks).any(|c| test_bit(&bits, c)),
        Ok(None) => false,
        Err(_) => true,
    }
}

/// Brings unused slot `slot`'s header to an array of `sectors` on every readable
/// member (`sync_size`, bits kept up to the new chunk count), as md-cluster's
/// `update_size` does for slots no node holds. The caller holds that slot's lock.
pub fn resize_slot(
    paths: &[PathBuf],
    slot: u32,
    sectors: u64,
    fence: Option<crate::fence::FenceTicket>,
) -> Result<(), DeviceError> {
    rewrite_slot(paths, slot, "resizing", fence, |sb, bits| {
        let mut sb = sb.clone();
        sb.sync_size = sectors;
        let mut bits = bits.to_vec();
        bits.resize(sb.bits_bytes() as usize, 0);
        for c in sb.chunks()..(bits.len() as u64 * 8) {
            crate::format::bitmap::clear_bit(&mut bits, c);
        }
        (sb, bits)
    })
}

/// Rewrites slot `slot` on every readable member with what `f` makes of its header
/// and bits (an unreadable member is skipped, logged as `what`).
fn rewrite_slot(
    paths: &[PathBuf],
    slot: u32,
    what: &str,
    fence: Option<crate::fence::FenceTicket>,
    f: impl Fn(&BitmapSuper, &[u8]) -> (BitmapSuper, Vec<u8>),
) -> Result<(), DeviceError> {
    for p in paths {
        let m = match read_member(p) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(member = %p.display(), slot, "{what} a bitmap slot: not touching an unreadable member: {e}");
                continue;
            }
        };
        let Some(s) = m.bitmap.get(slot as usize) else {
            continue;
        };
        let (header, bits) = f(&s.sb, &s.bits);
        let dev = MetaDev::open_fenced(p, true, fence.clone())?;
        write_bitmap_slot(&dev, &m.sb, slot, &header, &bits)?;
    }
    Ok(())
}

/// The union of slot `slot`'s bits over the readable members, and the chunk count.
fn read_slot_union(paths: &[PathBuf], slot: u32) -> Result<Option<(Vec<u8>, u64)>, DeviceError> {
    let mut out: Option<(Vec<u8>, u64)> = None;
    let mut first_err = None;
    for p in paths {
        match read_member(p) {
            Ok(m) => {
                let Some(s) = m.bitmap.get(slot as usize) else {
                    continue;
                };
                match &mut out {
                    None => out = Some((s.bits.clone(), s.sb.chunks())),
                    Some((b, _)) => b.iter_mut().zip(&s.bits).for_each(|(a, o)| *a |= *o),
                }
            }
            Err(e) => {
                tracing::warn!(member = %p.display(), "takeover: unreadable member: {e}");
                first_err.get_or_insert(e);
            }
        }
    }
    match (out, first_err) {
        (None, Some(e)) => Err(e),
        (out, _) => Ok(out),
    }
}

/// Clears slot `slot`'s bits on every readable member.
fn clear_slot(
    paths: &[PathBuf],
    slot: u32,
    fence: Option<crate::fence::FenceTicket>,
) -> Result<(), DeviceError> {
    rewrite_slot(paths, slot, "clearing", fence, |sb, bits| {
        (sb.clone(), vec![0u8; bits.len()])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
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
