//! Changing the size of a running array (`mdctl grow --size`, md's `update_size` and
//! `raid1_resize`), on the node that asks and on the nodes that follow.
//!
//! Owns the order of the writes, so that a crash at any point leaves members that
//! assemble and resync what they must:
//! - **grow** (sender, [`prepare_grow`]): check that every live member holds the new
//!   size and that this node's bitmap slot can cover it without moving the other slots
//!   (a clustered slot's stride depends on the size); resize the bitmap and set the bits
//!   of the new area on disk (they drive the resync of the new area, also after a
//!   crash); then write the superblocks (`size`, `resync_offset` = old end). The new
//!   capacity is shown only by [`expose`], once every node has followed
//!   (CHANGE_CAPACITY), and one node resyncs the new area.
//! - **shrink** (sender, [`shrink`]): the capacity shrinks first (I/O past the new end
//!   is refused), then the superblocks, then the bitmap. Nothing is resynced.
//! - **follow** (receivers, [`follow`]): the sender wrote the superblocks; this node
//!   adopts the size without writing them, resizes its own bitmap slot (its header
//!   carries `sync_size`) and, when shrinking, its capacity at once; a grown capacity
//!   waits for [`expose`].
//!
//! Refused: a resync or recovery running, pending or owed (md answers EBUSY too), a
//! size that is not a positive multiple of 4 KiB, a member too small.

use std::sync::Arc;

use super::assemble::Attachment;
use super::ArrayError;
use crate::format::SECTOR;
use crate::raid::{MetaEvent, MetaWrite, Raid1};

/// Sectors in 4 KiB: sizes are whole 4 KiB blocks (O_DIRECT and the NBD block size).
const BLOCK_SECTORS: u64 = 8;

fn invalid(raid: &Raid1, why: String) -> ArrayError {
    ArrayError::Invalid(format!("array {}: {why}", raid.name()))
}

/// The largest size (sectors) every live member of `raid` holds, in whole 4 KiB.
pub fn max_sectors(raid: &Raid1) -> u64 {
    raid.member_room_bytes()
        .into_iter()
        .map(|(_, b)| b / SECTOR)
        .min()
        .unwrap_or(0)
        & !(BLOCK_SECTORS - 1)
}

/// Checks a new size of `sectors` for `raid`: positive, whole 4 KiB, held by every
/// live member.
pub fn check_size(raid: &Raid1, sectors: u64) -> Result<(), ArrayError> {
    if sectors == 0 || !sectors.is_multiple_of(BLOCK_SECTORS) {
        return Err(invalid(
            raid,
            format!(
                "--size {} KiB: give a positive multiple of 4 KiB, or max",
                sectors / 2
            ),
        ));
    }
    for (path, room) in raid.member_room_bytes() {
        if sectors * SECTOR > room {
            return Err(invalid(
                raid,
                format!(
                    "--size {} KiB does not fit on {path}, which holds {} KiB after its data offset (max is {} KiB)",
                    sectors / 2,
                    room / 1024,
                    max_sectors(raid) / 2
                ),
            ));
        }
    }
    Ok(())
}

/// Refuses while a resync or recovery runs, waits or is owed here, or another node
/// resyncs (its window is installed here).
fn check_idle(raid: &Raid1) -> Result<(), ArrayError> {
    let remote = raid.remote_resync_window().is_some();
    if raid.sync_busy() || remote {
        return Err(ArrayError::Busy {
            name: raid.name().to_owned(),
            state: format!(
                "{}; change the size when it has finished",
                if remote {
                    "being resynced by another node"
                } else {
                    "resyncing or recovering"
                }
            ),
            clients: vec![],
        });
    }
    Ok(())
}

/// Sender, growing to `sectors`: bitmap resized with the new area's bits on disk, then
/// the superblocks (written as `how` says). The capacity stays until [`expose`].
/// Returns the old size (sectors).
pub async fn prepare_grow(
    raid: &Arc<Raid1>,
    att: &Attachment,
    sectors: u64,
    how: MetaWrite,
) -> Result<u64, ArrayError> {
    check_idle(raid)?;
    check_size(raid, sectors)?;
    let old = att.size_sectors();
    if sectors <= old {
        return Err(invalid(
            raid,
            format!("internal: grow to {sectors} sectors from {old}"),
        ));
    }
    att.resize_bitmap(sectors).map_err(|e| invalid(raid, e))?;
    let done = async {
        if let Some(bm) = raid.bitmap() {
            // The new area is written by nobody yet: its bits on disk before the
            // superblock says it exists, so that any crash from here on resyncs it.
            let (from, len) = (old * SECTOR, (sectors - old) * SECTOR);
            bm.start_write(from, len)
                .await
                .map_err(|e| ArrayError::Invalid(e.to_string()))?;
            bm.end_write(from, len, true);
        }
        raid.record(MetaEvent::Size(sectors), how).await?;
        Ok::<(), ArrayError>(())
    }
    .await;
    if let Err(e) = done {
        // Nothing says the array is larger: the bitmap goes back too.
        if let Err(e2) = att.resize_bitmap(old) {
            tracing::error!(array = %raid.name(), "undoing the bitmap resize: {e2}");
        }
        return Err(e);
    }
    tracing::info!(array = %raid.name(), from = old, to = sectors, "size grown in the superblocks");
    Ok(old)
}

/// Shows the size the superblocks have to clients and, when it grew from `old`
/// sectors, starts the resync of the new area (with a bitmap: its chunks, marked by
/// [`prepare_grow`]).
pub fn expose(raid: &Raid1, att: &Attachment, old: u64) {
    let sectors = att.size_sectors();
    raid.set_size(sectors * SECTOR);
    if sectors > old {
        raid.request_resync_from(old * SECTOR);
    }
}

/// Undoes a [`prepare_grow`] whose round was refused: superblocks and bitmap back to
/// `old` sectors (best effort; logged; superblocks written as `how` says).
pub async fn undo_grow(raid: &Arc<Raid1>, att: &Attachment, old: u64, how: MetaWrite) {
    if let Err(e) = raid.record(MetaEvent::Size(old), how).await {
        tracing::error!(array = %raid.name(), "undoing the size change: superblocks: {e}");
    }
    if let Err(e) = att.resize_bitmap(old) {
        tracing::error!(array = %raid.name(), "undoing the size change: bitmap: {e}");
    }
    if let Some(bm) = raid.bitmap() {
        if let Err(e) = bm.flush().await {
            tracing::error!(array = %raid.name(), "undoing the size change: bitmap: {e}");
        }
    }
}

/// Sender, shrinking to `sectors`: capacity, superblocks (written as `how` says),
/// bitmap. Returns the old size.
pub async fn shrink(
    raid: &Arc<Raid1>,
    att: &Attachment,
    sectors: u64,
    how: MetaWrite,
) -> Result<u64, ArrayError> {
    check_idle(raid)?;
    check_size(raid, sectors)?;
    let old = att.size_sectors();
    if sectors >= old {
        return Err(invalid(
            raid,
            format!("internal: shrink to {sectors} sectors from {old}"),
        ));
    }
    // Check the bitmap can take the new size before anything changes.
    att.check_bitmap_size(sectors)
        .map_err(|e| invalid(raid, e))?;
    raid.set_size(sectors * SECTOR);
    raid.record(MetaEvent::Size(sectors), how).await?;
    att.resize_bitmap(sectors).map_err(|e| invalid(raid, e))?;
    if let Some(bm) = raid.bitmap() {
        bm.flush()
            .await
            .map_err(|e| ArrayError::Invalid(e.to_string()))?;
    }
    tracing::info!(array = %raid.name(), from = old, to = sectors, "size shrunk");
    Ok(old)
}

/// Receiver: the superblocks (written by the sender) say `sectors`. Adopt it: bitmap
/// slot resized (and written), superblock copies updated in memory; a smaller size is
/// shown at once, a larger one at CHANGE_CAPACITY (`expose_now`). Returns whether
/// anything changed. What this node had is read from its bitmap slot and its
/// capacity, not from its superblock copies (which a reload may already have updated).
pub async fn follow(
    raid: &Arc<Raid1>,
    att: &Attachment,
    sectors: u64,
    expose_now: bool,
) -> Result<bool, ArrayError> {
    let shown = raid.size() / SECTOR;
    let covered = att.bitmap_sectors().unwrap_or(shown);
    if sectors == shown && sectors == covered {
        return Ok(false);
    }
    if sectors > shown && sectors > covered {
        check_size(raid, sectors)?;
    }
    if sectors != covered {
        check_idle(raid)?;
        att.check_bitmap_size(sectors)
            .map_err(|e| invalid(raid, e))?;
    }
    if sectors < shown {
        raid.set_size(sectors * SECTOR);
    }
    att.adopt_size(sectors);
    if sectors != covered {
        att.resize_bitmap(sectors).map_err(|e| invalid(raid, e))?;
        if let Some(bm) = raid.bitmap() {
            bm.flush()
                .await
                .map_err(|e| ArrayError::Invalid(e.to_string()))?;
        }
        tracing::info!(array = %raid.name(), from = covered, to = sectors, "bitmap follows the new size");
    }
    if expose_now && raid.size() / SECTOR != sectors {
        raid.set_size(sectors * SECTOR);
    }
    Ok(true)
}
