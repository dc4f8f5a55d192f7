//! Joining and leaving a clustered array through the lock service (RFC 0001 "Join" and
//! "Leave").
//!
//! Join (assemble of a clustered array on this node):
//! 1. the node's session is open (else EIO);
//! 2. take the first free `md/<uuid>/slot/N` lock no-queue, N = 0..nodes−1 (none free:
//!    EBUSY naming the slot count); it is held for the whole membership;
//! 3. subscribe to the array's message channel;
//! 4. for every other slot M: try `slot/M` no-queue. Held (its node is alive): read its
//!    value block (the node's resync window): an active one is installed in the engine
//!    as the remote window once it runs. Granted (the slot is unused):
//!    if slot M has dirty bits on disk, merge them into our slot on every member and
//!    mark the superblocks unclean, so the engine resyncs exactly those chunks when it
//!    starts; release `slot/M`. Our own slot's dirty bits (a previous crash of this
//!    node) also mark the superblocks unclean: the clean flag is shared by all nodes.
//!
//! Leave (after the lifecycle's stop): when our slot was dirty, publish
//! `BITMAP_NEEDS_SYNC(slot)` with a deadline; unsubscribe; release the slot lock.
//! Every lock-service call is bounded by the session's RPC timeout; nothing queues.

use std::path::PathBuf;
use std::time::Duration;

use mdcluster_proto::lock_client::{LockClientError, Mode, Session, Wait};
use mdcluster_proto::status::WireError;
use mdcluster_proto::v1::Errno;

use crate::cluster::{channel, slot_lock, ClusterMsg, MsgType, ResyncInfo};
use crate::format::bitmap::{count_set, test_bit};
use crate::format::fmt_uuid;
use crate::format::io::{
    read_member, write_bitmap_slot, write_superblock, DeviceError, Member, MetaDev,
};
use crate::format::superblock::MAX_SECTOR;

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
}

fn wire(e: LockClientError, what: &str) -> WireError {
    let errno = match e.errno() {
        Errno::Unspecified => Errno::Eio,
        x => x,
    };
    WireError::new(errno, what.to_owned(), format!("{what}: {e}"))
}

/// Joins array `name` (whose first readable member is `first`) on this node: takes a
/// slot and gathers the others. See the module doc.
pub async fn join(
    session: &Session,
    name: &str,
    node: &str,
    members: &[PathBuf],
    first: &Member,
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
    let mut mine = None;
    let mut holders = Vec::new();
    for n in 0..nodes {
        let res = slot_lock(&uuid, n);
        match session.acquire(&res, Mode::Exclusive, Wait::NoQueue).await {
            Ok(g) => {
                mine = Some((n, g.token));
                break;
            }
            Err(e) if e.errno() == Errno::Ebusy => holders.push(format!("slot {n}")),
            Err(e) => return Err(wire(e, &format!("lock {res}"))),
        }
    }
    let Some((slot, token)) = mine else {
        return Err(WireError::new(
            Errno::Ebusy,
            format!("array {name}"),
            format!("all {nodes} bitmap slots of array {name} ({}) are held by other nodes; stop it on one of them or create it with more --nodes", fmt_uuid(&uuid)),
        ));
    };
    let mut m = Membership {
        array: name.to_owned(),
        uuid,
        slot,
        token,
        merged_chunks: 0,
        remote_window: None,
    };
    // A window left in our slot's value by an earlier holder that died mid-resync
    // would hold other nodes' writes: start with none.
    let res = slot_lock(&uuid, slot);
    if let Err(e) = session
        .write_value(&res, token, &ResyncInfo::default().encode())
        .await
    {
        tracing::warn!(array = name, lock = %res, "clearing our resync window: {e}");
    }
    // Step 3.
    if let Err(e) = session.subscribe(&channel(&uuid)).await {
        leave(session, m, false).await;
        return Err(wire(e, &format!("subscribe {}", channel(&uuid))));
    }
    // Step 4.
    let mut merge_from = Vec::new();
    for other in (0..nodes).filter(|&o| o != slot) {
        let res = slot_lock(&uuid, other);
        match session.acquire(&res, Mode::Exclusive, Wait::NoQueue).await {
            Ok(g) => {
                let dirty = first
                    .bitmap
                    .get(other as usize)
                    .map_or(0, |s| count_set(&s.bits, s.sb.chunks()));
                if dirty > 0 {
                    merge_from.push(other);
                }
                if let Err(e) = session.release(&res, g.token).await {
                    tracing::warn!(array = name, lock = %res, "release after gathering: {e}");
                }
            }
            Err(e) if e.errno() == Errno::Ebusy => match session.read_value(&res).await {
                Ok((v, holders)) => {
                    let w = ResyncInfo::decode(&v);
                    if w.active() {
                        m.remote_window = Some((w.lo, w.hi));
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
    let own_dirty = first
        .bitmap
        .get(slot as usize)
        .map_or(0, |s| count_set(&s.bits, s.sb.chunks()));
    if !merge_from.is_empty() || own_dirty > 0 {
        let paths = members.to_vec();
        let from = merge_from.clone();
        let merged = tokio::task::spawn_blocking(move || merge_slots(&paths, slot, &from)).await;
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
                leave(session, m, false).await;
                return Err(WireError::new(
                    errno,
                    format!("array {name}"),
                    format!("merging dirty bitmap slots of {name}: {e}"),
                ));
            }
            Err(e) => {
                leave(session, m, false).await;
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

/// ORs the bits of slots `from` into slot `to` on every member, and marks the
/// superblocks unclean so the engine resyncs the set bits (step 4 of the module doc;
/// the caller holds the slot locks). Returns the chunks set in slot `to` afterwards.
pub fn merge_slots(paths: &[PathBuf], to: u32, from: &[u32]) -> Result<u64, DeviceError> {
    let mut total = 0;
    for p in paths {
        let m = match read_member(p) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(member = %p.display(), "not merging bits on an unreadable member: {e}");
                continue;
            }
        };
        let Some(ours) = m.bitmap.get(to as usize) else {
            continue;
        };
        let mut bits = ours.bits.clone();
        let chunks = ours.sb.chunks();
        for &f in from {
            if let Some(s) = m.bitmap.get(f as usize) {
                for i in 0..chunks {
                    if test_bit(&s.bits, i) {
                        crate::format::bitmap::set_bit(&mut bits, i);
                    }
                }
            }
        }
        let dev = MetaDev::open(p, true)?;
        write_bitmap_slot(&dev, &m.sb, to, &ours.sb, &bits)?;
        let mut sb = m.sb.clone();
        if sb.resync_offset == MAX_SECTOR {
            sb.resync_offset = 0;
            write_superblock(&dev, &sb)?;
        }
        total = total.max(count_set(&bits, chunks));
    }
    Ok(total)
}

/// Leaves: BITMAP_NEEDS_SYNC when `dirty`, unsubscribe, release the slot. Failures are
/// logged: the slot lock goes away with the session at the latest.
pub async fn leave(session: &Session, m: Membership, dirty: bool) {
    let ch = channel(&m.uuid);
    if dirty {
        let msg = ClusterMsg::new(MsgType::BitmapNeedsSync, m.slot);
        match session
            .publish(&ch, &msg.encode(), Duration::from_secs(10))
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
    let res = slot_lock(&m.uuid, m.slot);
    match session.release(&res, m.token).await {
        Ok(()) => tracing::info!(array = %m.array, slot = m.slot, "left"),
        Err(e) => tracing::warn!(array = %m.array, lock = %res, "release slot lock: {e}"),
    }
}

/// After a new session (the old one was lost with every lock): takes our slot again,
/// no-queue, and subscribes again. EBUSY when another node took the slot meanwhile (a
/// survivor recovering it): the caller must not write until it has rejoined.
pub async fn retake(session: &Session, m: &mut Membership) -> Result<(), WireError> {
    let res = slot_lock(&m.uuid, m.slot);
    let g = session
        .acquire(&res, Mode::Exclusive, Wait::NoQueue)
        .await
        .map_err(|e| wire(e, &format!("lock {res}")))?;
    m.token = g.token;
    session
        .subscribe(&channel(&m.uuid))
        .await
        .map_err(|e| wire(e, &format!("subscribe {}", channel(&m.uuid))))?;
    tracing::info!(array = %m.array, slot = m.slot, token = m.token, "rejoined with a new session");
    Ok(())
}
