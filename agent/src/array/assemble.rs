//! Turning member devices into a running [`Raid1`]: read and check every member's
//! superblock (md v1.2), decide each member's state from the freshest superblock, load
//! this node's bitmap slot, and wire the superblock and bitmap writers the engine uses.
//!
//! Decisions (md's, simplified):
//! - the member with the highest `events` is the authority for roles;
//! - a member whose role there is active is in sync, or recovering from its
//!   `recovery_offset` when `RECOVERY_OFFSET` is set, if it is current: its events
//!   equal the freshest's, or are one behind and its own superblock lists it active
//!   (md's and mdadm's margin of one update); otherwise it is recovered in full;
//!   spare → spare; faulty → faulty;
//! - `resync_offset != MaxSector` means an unclean stop (or an unfinished first resync):
//!   with a bitmap the set bits are resynced, without one everything from
//!   `resync_offset`;
//! - bits are loaded as needed also when the array is degraded (kept for a re-add).

use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use crate::bitmap::{BitmapStore, Geometry, WriteIntent};
use crate::blockdev::IoFuture;
use crate::format::bitmap::{slot_bytes_for, slot_offset, BitmapSuper};
use crate::format::io::{read_member, read_member_bounded, DeviceError, Member, META_READ_TIMEOUT};
use crate::format::superblock::{feature, DevRole, Superblock, MAX_SECTOR, SB_BLOCK_BYTES};
use crate::format::{fmt_uuid, SB_OFFSET_BYTES, SECTOR};
use crate::raid::member::{aligned_copy, MemberError, MemberIo};
use crate::raid::{
    MemberSpec, MemberState, MetaEvent, MetaStore, MetaWrite, Raid1, Raid1Config, RaidError,
    SpeedLimits,
};

/// Errors assembling an array.
#[derive(Debug, thiserror::Error)]
pub enum AssembleError {
    /// A member's metadata could not be read or is invalid.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// A member could not be opened for I/O.
    #[error(transparent)]
    Member(#[from] MemberError),
    /// The members do not form one array.
    #[error("array {array}: {reason}")]
    Mismatch {
        /// The array.
        array: String,
        /// What does not fit.
        reason: String,
    },
    /// The engine refused to start.
    #[error(transparent)]
    Raid(#[from] RaidError),
    /// The device to add is still a member of the array (faulty, spare or active): md
    /// refuses it the same way; a failed member must be removed before its re-add.
    #[error("array {array}: {device} is still a member ({state}); remove it first: mdctl manage {array} --remove {device}")]
    StillMember {
        /// The array.
        array: String,
        /// The device as given.
        device: String,
        /// Its state in the array.
        state: String,
    },
    /// A blocking task failed.
    #[error("array {array}: assemble task failed: {reason}")]
    Task {
        /// The array.
        array: String,
        /// Why.
        reason: String,
    },
}

/// Options of an assemble (the same for every array of a registry; the bitmap slot is
/// per array: a parameter of [`assemble`]).
#[derive(Debug, Clone, Default)]
pub struct AssembleOptions {
    /// Overrides the bitmap's `daemon_sleep` (tests).
    pub daemon_sleep: Option<Duration>,
    /// Initial resync/recovery speed limits.
    pub speed: SpeedLimits,
    /// Every sync run waits for a cluster gate ([`crate::raid::Raid1::set_sync_gate`]);
    /// set by cluster mode for clustered arrays only.
    pub sync_gate: bool,
    /// md's `safe_mode_delay` (`None`: superblocks marked clean only at stop).
    pub safe_mode: Option<Duration>,
    /// The node's fence gate (cluster mode): a clustered array's member I/O and
    /// requests go through it ([`crate::fence`]); other arrays are never fenced.
    pub fence: Option<Arc<crate::fence::FenceGate>>,
}

/// What was assembled, for status.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ArrayIdentity {
    /// Array UUID, mdadm style.
    pub uuid: String,
    /// `set_name` from the superblock.
    pub md_name: String,
    /// Member paths, in the order given.
    pub members: Vec<PathBuf>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Writes superblock changes to the members.
struct SbStore {
    array: String,
    /// Grows with added members, in the engine's member order.
    ios: Mutex<Vec<Arc<MemberIo>>>,
    sbs: Mutex<Vec<Superblock>>,
    /// The bitmap and its slot superblock, whose `events` follow the superblock's
    /// (replaced by `grow --bitmap`).
    bitmap: Mutex<Option<(Arc<WriteIntent>, BitmapSuper)>>,
    /// Assembled without a member the superblocks list active: the first update moves
    /// `events` on by two, so that member ends at least two behind and is never taken
    /// as current by the one-update margin (md marks such a member faulty instead).
    absent_active: std::sync::atomic::AtomicBool,
}

impl SbStore {
    /// A copy of member `i`'s superblock.
    fn superblock(&self, i: usize) -> Superblock {
        self.sbs.lock().unwrap_or_else(|e| e.into_inner())[i].clone()
    }

    fn dev_numbers(&self) -> Vec<u32> {
        self.sbs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|s| s.dev_number)
            .collect()
    }

    /// Appends a member; returns its index.
    fn push(&self, io: Arc<MemberIo>, sb: Superblock) -> usize {
        let mut ios = self.ios.lock().unwrap_or_else(|e| e.into_inner());
        let mut sbs = self.sbs.lock().unwrap_or_else(|e| e.into_inner());
        ios.push(io);
        sbs.push(sb);
        sbs.len() - 1
    }

    /// Applies `event` to the copies, over the engine's failed members `faulty`
    /// (written faulty whatever a copy re-read from disk says, unless a live member
    /// of `live` holds the same device number: a re-added device).
    fn apply(&self, event: &MetaEvent, live: &[usize], faulty: &[usize]) -> (Vec<Bytes>, u64) {
        let mut sbs = self.sbs.lock().unwrap_or_else(|e| e.into_inner());
        let step = if self
            .absent_active
            .swap(false, std::sync::atomic::Ordering::AcqRel)
        {
            2
        } else {
            1
        };
        let events = sbs.iter().map(|s| s.events).max().unwrap_or(0) + step;
        let dev_of: Vec<u32> = sbs.iter().map(|s| s.dev_number).collect();
        let failed: Vec<u32> = faulty
            .iter()
            .filter_map(|&f| dev_of.get(f).copied())
            .filter(|d| !live.iter().any(|&l| dev_of.get(l) == Some(d)))
            .collect();
        for (i, sb) in sbs.iter_mut().enumerate() {
            for &d in &failed {
                let _ = sb.set_role(d, DevRole::Faulty);
            }
            match *event {
                MetaEvent::ResyncOffset(v) => sb.resync_offset = v,
                MetaEvent::Faulty { member } => {
                    let _ = sb.set_role(dev_of[member], DevRole::Faulty);
                }
                MetaEvent::Added { member } if sb.role_of(dev_of[member]) != DevRole::Faulty => {
                    let _ = sb.set_role(dev_of[member], DevRole::Spare);
                }
                MetaEvent::SpareActive { member, role } => {
                    // A member absent from this assembly that still claims the role
                    // loses it (md's super_1_sync marks absent devices too).
                    for d in 0..sb.dev_roles.len() as u32 {
                        if d != dev_of[member]
                            && sb.role_of(d) == DevRole::Active(role)
                            && !dev_of.contains(&d)
                        {
                            let _ = sb.set_role(d, DevRole::Faulty);
                        }
                    }
                    let _ = sb.set_role(dev_of[member], DevRole::Active(role));
                    if i == member {
                        sb.feature_map |= feature::RECOVERY_OFFSET;
                        sb.recovery_offset = 0;
                    }
                }
                MetaEvent::RecoveryCheckpoint { member, sectors } if i == member => {
                    sb.feature_map |= feature::RECOVERY_OFFSET;
                    sb.recovery_offset = sectors;
                }
                MetaEvent::RaidDisks(n) => sb.raid_disks = n,
                MetaEvent::Size(sectors) => {
                    if sectors > sb.size {
                        // md's raid1_resize: the new area is resynced from the old end.
                        sb.resync_offset = sb.resync_offset.min(sb.size);
                    } else if sb.resync_offset >= sectors {
                        // Nothing left to resync inside the new end.
                        sb.resync_offset = MAX_SECTOR;
                    }
                    sb.size = sectors;
                }
                MetaEvent::Removed { member } => {
                    let _ = sb.set_role(dev_of[member], DevRole::Spare);
                }
                MetaEvent::RecoveryDone { member } if i == member => {
                    sb.feature_map &= !feature::RECOVERY_OFFSET;
                    sb.recovery_offset = 0;
                }
                _ => {}
            }
            sb.events = events;
            sb.utime = now_secs();
        }
        (
            sbs.iter()
                .map(|sb| aligned_copy(&Bytes::from(sb.encode())))
                .collect(),
            events,
        )
    }
}

impl MetaStore for SbStore {
    fn update(&self, event: MetaEvent, live: Vec<usize>, faulty: Vec<usize>) -> IoFuture<'_, ()> {
        Box::pin(async move {
            let (blocks, events) = self.apply(&event, &live, &faulty);
            let ios = self.ios.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let ops = live.iter().map(|&i| {
                let io = ios[i].clone();
                let block = blocks[i].clone();
                async move {
                    io.write_at(SB_OFFSET_BYTES, block).await?;
                    io.sync().await
                }
            });
            let results = futures::future::join_all(ops).await;
            let mut ok = 0;
            let mut last = None;
            for (&i, r) in live.iter().zip(results) {
                match r {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        tracing::warn!(array = %self.array, member = %ios[i].path().display(),
                            "failed to write the superblock: {e}");
                        last = Some(e);
                    }
                }
            }
            if ok == 0 {
                return Err(last.unwrap_or_else(|| std::io::Error::other("no live member")));
            }
            let stamped = {
                let mut bitmap = self.bitmap.lock().unwrap_or_else(|e| e.into_inner());
                bitmap.as_mut().map(|(wi, b)| {
                    b.events = events;
                    (wi.clone(), b.encode())
                })
            };
            if let Some((wi, Ok(enc))) = stamped {
                wi.set_super(&enc);
                wi.flush()
                    .await
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
            }
            Ok(())
        })
    }
}

/// Writes this node's bitmap slot pages to every live member.
struct SlotStore {
    array: String,
    /// Per member: its device and the byte offset of our slot on it (grows with added
    /// members, in the engine's member order).
    members: Mutex<Vec<(Arc<MemberIo>, u64)>>,
    raid: OnceLock<Weak<Raid1>>,
}

impl BitmapStore for SlotStore {
    fn write_pages(&self, pages: Vec<(u64, Bytes)>) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if let Some(r) = self.raid.get().and_then(Weak::upgrade) {
                if r.is_fenced() {
                    return Err(std::io::Error::other(format!(
                        "array {}: fenced (this node lost its slot lock); bitmap pages not written",
                        self.array
                    )));
                }
            }
            let members = self
                .members
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let live: Vec<usize> = match self.raid.get().and_then(Weak::upgrade) {
                Some(r) => r
                    .live_members()
                    .into_iter()
                    .filter(|&i| i < members.len())
                    .collect(),
                None => (0..members.len()).collect(),
            };
            let ops = live.iter().map(|&i| {
                let (io, slot) = members[i].clone();
                let pages = pages.clone();
                async move {
                    for (p, b) in pages {
                        io.write_at(slot + p * crate::bitmap::PAGE as u64, b)
                            .await?;
                    }
                    io.sync().await
                }
            });
            let results = futures::future::join_all(ops).await;
            let mut ok = 0;
            let mut last = None;
            for (&i, r) in live.iter().zip(results) {
                match r {
                    Ok(()) => ok += 1,
                    Err(e) => {
                        tracing::warn!(array = %self.array, member = %members[i].0.path().display(),
                            "failed to write bitmap pages: {e}");
                        last = Some(e);
                    }
                }
            }
            if ok == 0 {
                return Err(last.unwrap_or_else(|| std::io::Error::other("no live member")));
            }
            Ok(())
        })
    }

    fn flush_members(&self) -> IoFuture<'_, ()> {
        Box::pin(async move {
            match self.raid.get().and_then(Weak::upgrade) {
                Some(r) => r.sync_members().await,
                None => {
                    let members = self
                        .members
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .clone();
                    for (io, _) in members {
                        io.sync().await?;
                    }
                    Ok(())
                }
            }
        })
    }
}

/// What adding a member to a running array needs: the superblock and bitmap writers
/// the engine was built with.
pub struct Attachment {
    sb_store: Arc<SbStore>,
    slot_store: Option<Arc<SlotStore>>,
    slot: u32,
    uuid: [u8; 16],
    /// One add at a time (indexes of engine, superblock and bitmap writers agree).
    add_lock: tokio::sync::Mutex<()>,
}

/// Bytes this node's bitmap slot may take for an array of `sectors`: a clustered
/// slot keeps its stride (the other slots cannot move while nodes use them); the one
/// slot of an internal bitmap may grow up to the data.
fn slot_room(sb: &Superblock, bsb: &BitmapSuper, sectors: u64) -> Result<usize, String> {
    let want = slot_bytes_for(sectors, bsb.chunksize);
    if bsb.is_clustered() {
        let stride = bsb.slot_bytes();
        if want != stride {
            return Err(format!(
                "the clustered bitmap ({} KiB chunks) lays out its {} slots {stride} bytes apart for the current size and would need {want} for {} KiB; slots cannot move while nodes use them — pick a size that keeps the layout, or switch the bitmap to none and back to clustered first",
                bsb.chunksize / 1024,
                bsb.slots(),
                sectors / 2
            ));
        }
        return Ok(stride as usize);
    }
    let start = sb.bitmap_start_bytes().unwrap_or(0);
    let end = if sb.data_offset > sb.super_offset {
        sb.data_offset * SECTOR
    } else {
        start + bsb.slot_bytes()
    };
    let room = end.saturating_sub(start);
    if want > room {
        return Err(format!(
            "the bitmap ({} KiB chunks) needs {want} bytes for {} KiB but has {room} before the data",
            bsb.chunksize / 1024,
            sectors / 2
        ));
    }
    Ok(room as usize)
}

impl Attachment {
    /// The bitmap kind in the superblocks: "none", "internal" or "clustered".
    pub fn bitmap_kind(&self) -> &'static str {
        let sb = self.sb_store.superblock(0);
        match (sb.has_bitmap(), sb.is_clustered()) {
            (false, _) => "none",
            (true, false) => "internal",
            (true, true) => "clustered",
        }
    }

    /// This node's bitmap slot.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The used size per member (= array size) in the superblocks, sectors.
    pub fn size_sectors(&self) -> u64 {
        self.sb_store.superblock(0).size
    }

    /// `events` and `utime` of this node's newest superblock copy.
    pub fn events(&self) -> (u64, u64) {
        let sbs = self.sb_store.sbs.lock().unwrap_or_else(|e| e.into_inner());
        sbs.iter()
            .max_by_key(|s| s.events)
            .map_or((0, 0), |s| (s.events, s.utime))
    }

    /// The size (sectors) this node's bitmap slot covers now, if the array has a bitmap.
    pub fn bitmap_sectors(&self) -> Option<u64> {
        store_super(&self.sb_store).map(|b| b.sync_size)
    }

    /// Whether this node's bitmap slot can describe an array of `sectors`.
    pub fn check_bitmap_size(&self, sectors: u64) -> Result<(), String> {
        let sb = self.sb_store.superblock(0);
        match store_super(&self.sb_store) {
            Some(bsb) => slot_room(&sb, &bsb, sectors).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Resizes this node's bitmap to an array of `sectors` (`sync_size` in its slot
    /// header, bits added clean or dropped); written with the next flush.
    pub fn resize_bitmap(&self, sectors: u64) -> Result<(), String> {
        let sb = self.sb_store.superblock(0);
        let mut bitmap = self
            .sb_store
            .bitmap
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let Some((wi, bsb)) = bitmap.as_mut() else {
            return Ok(());
        };
        let room = slot_room(&sb, bsb, sectors)?;
        let mut next = bsb.clone();
        next.sync_size = sectors;
        let header = next.encode().map_err(|e| e.to_string())?;
        wi.resize(next.chunks(), &header, room)
            .map_err(|e| e.to_string())?;
        *bsb = next;
        Ok(())
    }

    /// Re-reads the members' superblocks into this node's copies (another node wrote
    /// them under the `token`), except members in `faulty` (engine indexes the engine
    /// has as Faulty: their superblocks are out of date, and a dead path must not stall
    /// the caller). A member that cannot be read, or now holds another array, keeps its
    /// copy. Each read is bounded by [`META_READ_TIMEOUT`]: a member that does not
    /// answer fails the reload ([`DeviceError::Unresponsive`], naming it) and no copy
    /// is replaced. Blocking I/O.
    pub fn reload(&self, faulty: &[usize]) -> Result<(), DeviceError> {
        let ios = self
            .sb_store
            .ios
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut fresh: Vec<Option<Superblock>> = Vec::with_capacity(ios.len());
        for (i, io) in ios.iter().enumerate() {
            if faulty.contains(&i) {
                fresh.push(None);
                continue;
            }
            fresh.push(match read_member_bounded(io.path(), META_READ_TIMEOUT) {
                Ok(m) if m.sb.set_uuid == self.uuid => Some(m.sb),
                Ok(_) => None,
                Err(e @ DeviceError::Unresponsive { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(member = %io.path().display(), "reload: {e}");
                    None
                }
            });
        }
        let mut sbs = self.sb_store.sbs.lock().unwrap_or_else(|e| e.into_inner());
        for (i, sb) in fresh.into_iter().enumerate() {
            if let (Some(sb), Some(slot)) = (sb, sbs.get_mut(i)) {
                *slot = sb;
            }
        }
        Ok(())
    }

    /// Takes `sectors` as the size in this node's superblock copies without writing
    /// them (another node wrote the superblocks).
    pub fn adopt_size(&self, sectors: u64) {
        let mut sbs = self.sb_store.sbs.lock().unwrap_or_else(|e| e.into_inner());
        for sb in sbs.iter_mut() {
            sb.size = sectors;
        }
    }
}

impl std::fmt::Debug for Attachment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Attachment")
            .field("uuid", &fmt_uuid(&self.uuid))
            .finish()
    }
}

/// What [`add_member`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct AddOutcome {
    /// The member's index in the engine.
    pub index: usize,
    /// Re-added: it recovers only the chunks the bitmap marks needed.
    pub readded: bool,
}

/// Adds the device at `path` to the running array: a device that was a member of this
/// array comes back in its old role and recovers only the chunks the bitmap marks
/// needed (a re-add; needs a bitmap and the role still free); any other device without
/// an md superblock becomes a spare, which takes a free role at once and recovers fully.
pub async fn add_member(
    raid: &Arc<Raid1>,
    att: &Attachment,
    path: &std::path::Path,
) -> Result<AddOutcome, AssembleError> {
    add_member_opts(raid, att, path, false, MetaWrite::Local).await
}

/// [`add_member`]; with `spare_only` a new device stays a spare even when a role is
/// free (`mdadm --add-spare`); the superblock updates are written as `how` says.
pub async fn add_member_opts(
    raid: &Arc<Raid1>,
    att: &Attachment,
    path: &std::path::Path,
    spare_only: bool,
    how: MetaWrite,
) -> Result<AddOutcome, AssembleError> {
    let name = raid.name().to_owned();
    let _one = att.add_lock.lock().await;
    let p = path.to_owned();
    let fence = raid.fence_ticket();
    let (existing, io) = tokio::task::spawn_blocking(move || -> Result<_, AssembleError> {
        // The superblock only: a device a NEWDISK's sender just gave one (its device
        // UUID, which every node confirmed) has no bitmap yet.
        let existing = super::scan::read_superblock(&p).ok_or(());
        let io = Arc::new(MemberIo::open(&p)?);
        if let Some(t) = fence {
            io.set_fence(t);
        }
        Ok((existing, io))
    })
    .await
    .map_err(|e| AssembleError::Task {
        array: name.clone(),
        reason: e.to_string(),
    })??;
    let live = raid.live_members();
    // Refused before anything is written: a member not removed (faulty ones included),
    // found by its path or, under another path, by its superblock's device number.
    let former = existing
        .as_ref()
        .ok()
        .filter(|m| m.set_uuid == att.uuid)
        .map(|m| m.dev_number);
    if let Some(m) = raid.status().members.iter().find(|m| {
        !m.removed && (std::path::Path::new(&m.path) == path || former == Some(m.dev_number))
    }) {
        return Err(AssembleError::StillMember {
            array: name,
            device: path.display().to_string(),
            state: m.state.name().to_owned(),
        });
    }
    let Some(&first) = live.first() else {
        return Err(mismatch(
            &name,
            "no live member to copy the superblock from".into(),
        ));
    };
    // Clients were told the array's logical block size as the NBD minimum block size:
    // a member with larger blocks would turn their whole-block writes into
    // read-modify-writes, which another node's writes to the same block can undo.
    let block = u64::from(raid.block_size());
    if io.block_size() > block {
        return Err(mismatch(
            &name,
            format!(
                "{} has {}-byte logical blocks, larger than the array's {block}: writes of one array block would be read-modify-writes on it; use a device with {block}-byte (or smaller) logical blocks",
                path.display(),
                io.block_size()
            ),
        ));
    }
    let template = att.sb_store.superblock(first);
    let (mut sb, old_role) = match existing {
        Ok(m) if m.set_uuid == att.uuid => {
            let mut sb = template.clone();
            sb.dev_number = m.dev_number;
            sb.device_uuid = m.device_uuid;
            sb.data_offset = m.data_offset;
            sb.data_size = m.data_size;
            let role = match m.role() {
                DevRole::Active(r) => Some(r),
                _ => None,
            };
            (sb, role)
        }
        Ok(m) => {
            return Err(mismatch(
                &name,
                format!(
                    "{} holds a member of another array ({})",
                    path.display(),
                    fmt_uuid(&m.set_uuid)
                ),
            ))
        }
        Err(_) => {
            let used = att.sb_store.dev_numbers();
            let d = (0..crate::format::superblock::MAX_DEV_LIMIT)
                .find(|d| !used.contains(d) && template.role_of(*d) == DevRole::Spare)
                .ok_or_else(|| mismatch(&name, "no free device number".into()))?;
            let mut sb = template.clone();
            sb.dev_number = d;
            sb.device_uuid = *uuid::Uuid::new_v4().as_bytes();
            sb.data_size = (io.size() / SECTOR).saturating_sub(sb.data_offset);
            (sb, None)
        }
    };
    sb.feature_map &= !feature::RECOVERY_OFFSET;
    sb.recovery_offset = 0;
    if (sb.data_offset + sb.size) * SECTOR > io.size() || sb.data_size < sb.size {
        return Err(mismatch(
            &name,
            format!("{} is too small for the array", path.display()),
        ));
    }
    let write_err = |e: std::io::Error| {
        AssembleError::Device(DeviceError::Io {
            path: path.to_owned(),
            op: "write",
            offset: 0,
            source: e,
        })
    };
    io.write_at(SB_OFFSET_BYTES, aligned_copy(&Bytes::from(sb.encode())))
        .await
        .map_err(write_err)?;
    let mut slot_off = None;
    if raid.bitmap().is_some() && att.slot_store.is_some() {
        let bsb = store_super(&att.sb_store)
            .ok_or_else(|| mismatch(&name, "bitmap superblock missing".into()))?;
        for s in 0..bsb.slots() {
            let off = slot_offset(&sb, &bsb, s).map_err(|e| mismatch(&name, e.to_string()))?;
            let mut block = vec![0u8; bsb.slot_bytes() as usize];
            block[..crate::bitmap::SB_BYTES]
                .copy_from_slice(&bsb.encode().map_err(|e| mismatch(&name, e.to_string()))?);
            io.write_at(off, aligned_copy(&Bytes::from(block)))
                .await
                .map_err(write_err)?;
            if s == att.slot {
                slot_off = Some(off);
            }
        }
    }
    io.sync().await.map_err(write_err)?;
    let dev_number = sb.dev_number;
    let data_offset = sb.data_offset * SECTOR;
    // The same index in the superblock writer, the bitmap writer and the engine.
    let index = att.sb_store.push(io.clone(), sb);
    if let (Some(store), Some(off)) = (&att.slot_store, slot_off) {
        store
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((io.clone(), off));
    }
    let readd = old_role.filter(|r| raid.bitmap().is_some() && !raid.role_in_use(*r));
    let (state, role) = match readd {
        Some(r) => (
            MemberState::Recovering {
                offset: 0,
                bitmap_only: true,
            },
            Some(r),
        ),
        None => (MemberState::Spare, None),
    };
    let engine_index = raid.add_member(MemberSpec {
        io,
        data_offset,
        dev_number,
        role,
        state,
    });
    if engine_index != index {
        return Err(mismatch(
            &name,
            format!("member index mismatch ({engine_index} != {index})"),
        ));
    }
    raid.record(MetaEvent::Added { member: index }, how).await?;
    match readd {
        Some(r) => {
            raid.record(
                MetaEvent::SpareActive {
                    member: index,
                    role: r,
                },
                how,
            )
            .await?
        }
        None if spare_only => {}
        None => raid.use_spares(how).await,
    }
    if let Some(bm) = raid.bitmap() {
        bm.mark_all_dirty();
        if let Err(e) = bm.flush().await {
            tracing::warn!(array = %name, "failed to write the bitmap to the added member: {e}");
        }
    }
    tracing::info!(array = %name, member = %path.display(), index, readded = readd.is_some(), "member added");
    Ok(AddOutcome {
        index,
        readded: readd.is_some(),
    })
}

/// Attaches a device another node has just added to this array (cluster mode,
/// METADATA_UPDATED after NEWDISK): its superblock is read, not written, and it joins
/// the engine in the state its superblock gives it — a recovering member stays
/// `Recovering`, and the cluster gate decides which node copies it.
pub async fn attach_member(
    raid: &Arc<Raid1>,
    att: &Attachment,
    path: &std::path::Path,
) -> Result<AddOutcome, AssembleError> {
    let name = raid.name().to_owned();
    let _one = att.add_lock.lock().await;
    let p = path.to_owned();
    let fence = raid.fence_ticket();
    let (m, io) = tokio::task::spawn_blocking(move || -> Result<_, AssembleError> {
        let m = read_member(&p)?;
        let io = Arc::new(MemberIo::open(&p)?);
        if let Some(t) = fence {
            io.set_fence(t);
        }
        Ok((m, io))
    })
    .await
    .map_err(|e| AssembleError::Task {
        array: name.clone(),
        reason: e.to_string(),
    })??;
    if m.sb.set_uuid != att.uuid {
        return Err(mismatch(
            &name,
            format!(
                "{} holds a member of another array ({})",
                path.display(),
                fmt_uuid(&m.sb.set_uuid)
            ),
        ));
    }
    let status = raid.status();
    if status.members.iter().any(|x| {
        !x.removed
            && x.state != MemberState::Faulty
            && (x.path == path.display().to_string() || x.dev_number == m.sb.dev_number)
    }) {
        return Err(mismatch(
            &name,
            format!(
                "{} (device {}) is already a member here",
                path.display(),
                m.sb.dev_number
            ),
        ));
    }
    let (state, role) = match m.sb.role() {
        DevRole::Active(r) if m.sb.feature_map & feature::RECOVERY_OFFSET != 0 => (
            MemberState::Recovering {
                offset: m.sb.recovery_offset.saturating_mul(SECTOR),
                bitmap_only: false,
            },
            Some(r),
        ),
        DevRole::Active(r) => (MemberState::InSync, Some(r)),
        DevRole::Faulty => (MemberState::Faulty, None),
        _ => (MemberState::Spare, None),
    };
    let mut slot_off = None;
    if att.slot_store.is_some() {
        if let Some(bsb) = store_super(&att.sb_store) {
            slot_off = Some(
                slot_offset(&m.sb, &bsb, att.slot).map_err(|e| mismatch(&name, e.to_string()))?,
            );
        }
    }
    let dev_number = m.sb.dev_number;
    let data_offset = m.sb.data_offset * SECTOR;
    let index = att.sb_store.push(io.clone(), m.sb.clone());
    if let (Some(store), Some(off)) = (&att.slot_store, slot_off) {
        store
            .members
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((io.clone(), off));
    }
    let engine_index = raid.add_member(MemberSpec {
        io,
        data_offset,
        dev_number,
        role,
        state,
    });
    if engine_index != index {
        return Err(mismatch(
            &name,
            format!("member index mismatch ({engine_index} != {index})"),
        ));
    }
    tracing::info!(array = %name, member = %path.display(), index, ?state, "member attached (added by another node)");
    Ok(AddOutcome {
        index,
        readded: false,
    })
}

fn store_super(sb_store: &SbStore) -> Option<BitmapSuper> {
    sb_store
        .bitmap
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
        .map(|(_, b)| b.clone())
}

/// Refuses a clustered bitmap layout in which one node's write of its bitmap slot
/// could rewrite bytes of another slot or of the superblock on members with
/// `block`-byte logical blocks: each node writes its own slot without the cluster
/// token, so a write that is not whole logical blocks (a read-modify-write) could undo
/// another node's concurrent write of the neighbouring bytes. The slots must start on
/// a block boundary, lie a whole number of blocks apart, and share no block with the
/// superblock (written as one 4 KiB block). md's layout — the bitmap 8 sectors after
/// the superblock, slots a multiple of 4 KiB apart — passes for 512- and 4096-byte
/// blocks; only a `bitmap_offset` that is not a multiple of the block size (or that
/// puts the bitmap inside the superblock's block) fails.
pub fn check_clustered_layout(
    sb: &Superblock,
    bsb: &BitmapSuper,
    block: u64,
) -> Result<(), String> {
    let Some(start) = sb.bitmap_start_bytes() else {
        return Ok(());
    };
    let stride = bsb.slot_bytes();
    let end = start + stride * u64::from(bsb.slots());
    let sb_start = sb.super_offset * SECTOR;
    let sb_end = sb_start + SB_BLOCK_BYTES as u64;
    let (sb_lo, sb_hi) = (sb_start / block * block, sb_end.div_ceil(block) * block);
    if start < sb_hi && sb_lo < end {
        return Err(format!(
            "the clustered bitmap (bitmap_offset {} sectors) shares a {block}-byte logical block with the superblock: a node's bitmap write would rewrite the superblock another node writes; re-create the bitmap with mdadm's layout (bitmap_offset 8)",
            sb.bitmap_offset
        ));
    }
    if !start.is_multiple_of(block) || !stride.is_multiple_of(block) {
        return Err(format!(
            "the clustered bitmap slots (at byte {start}, {stride} bytes apart) are not aligned to the members' {block}-byte logical blocks: one node's bitmap write would rewrite part of another node's slot; re-create the bitmap with mdadm's layout (bitmap_offset a multiple of {} sectors)",
            block / SECTOR
        ));
    }
    Ok(())
}

fn mismatch(array: &str, reason: String) -> AssembleError {
    AssembleError::Mismatch {
        array: array.to_owned(),
        reason,
    }
}

/// Reads every member (blocking I/O; call from a blocking context).
pub fn read_members(array: &str, paths: &[PathBuf]) -> Result<Vec<Member>, AssembleError> {
    if paths.is_empty() {
        return Err(mismatch(array, "no member devices given".into()));
    }
    let members: Vec<Member> = paths
        .iter()
        .map(|p| read_member(p))
        .collect::<Result<_, _>>()?;
    let uuid = members[0].sb.set_uuid;
    for m in &members {
        if m.sb.set_uuid != uuid {
            return Err(mismatch(
                array,
                format!(
                    "{} belongs to array {}, {} to {}",
                    m.path.display(),
                    fmt_uuid(&m.sb.set_uuid),
                    members[0].path.display(),
                    fmt_uuid(&uuid)
                ),
            ));
        }
        if m.sb.level != 1 {
            return Err(mismatch(
                array,
                format!(
                    "{}: raid level {} is not supported (only 1)",
                    m.path.display(),
                    m.sb.level
                ),
            ));
        }
    }
    let mut devs: Vec<u32> = members.iter().map(|m| m.sb.dev_number).collect();
    devs.sort_unstable();
    devs.dedup();
    if devs.len() != members.len() {
        return Err(mismatch(
            array,
            "two members have the same dev_number (the same device given twice?)".into(),
        ));
    }
    Ok(members)
}

/// Assembles and starts the array `name` over `paths`, with this node's bitmap in
/// `slot` (0 for an internal bitmap).
pub async fn assemble(
    name: &str,
    paths: &[PathBuf],
    opts: &AssembleOptions,
    slot: u32,
) -> Result<(Arc<Raid1>, ArrayIdentity, Attachment), AssembleError> {
    let (members, ios) = {
        let owned = name.to_owned();
        let paths = paths.to_vec();
        tokio::task::spawn_blocking(move || -> Result<_, AssembleError> {
            let members = read_members(&owned, &paths)?;
            let ios: Vec<Arc<MemberIo>> = paths
                .iter()
                .map(|p| MemberIo::open(p).map(Arc::new))
                .collect::<Result<_, _>>()?;
            Ok((members, ios))
        })
        .await
        .map_err(|e| AssembleError::Task {
            array: name.to_owned(),
            reason: e.to_string(),
        })??
    };
    let freshest = members
        .iter()
        .max_by_key(|m| m.sb.events)
        .ok_or_else(|| mismatch(name, "no members".into()))?;
    // A clustered array's member I/O is gated from its first write on.
    let fence_ticket = opts
        .fence
        .as_ref()
        .filter(|_| freshest.bitmap.first().is_some_and(|b| b.sb.is_clustered()))
        .map(|g| g.ticket());
    if let Some(t) = &fence_ticket {
        for io in &ios {
            io.set_fence(t.clone());
        }
        // The members were probed for persistent reservations at join
        // (`crate::reserve::ArrayPr::probe`, which logs those fenced by the gate only).
    }
    if let Some(slot) = freshest.bitmap.first().filter(|b| b.sb.is_clustered()) {
        let block = ios.iter().map(|io| io.block_size()).max().unwrap_or(SECTOR);
        check_clustered_layout(&freshest.sb, &slot.sb, block).map_err(|r| mismatch(name, r))?;
    }
    let fresh = freshest.sb.clone();
    let size = fresh.size * SECTOR;
    // md's rule at assemble (kernel `super_1_validate`, mdadm `Assemble.c`'s
    // `event_margin = 1`): a member whose own superblock lists it active is current if
    // its events are at most one behind the freshest (the crash hit between the
    // superblock writes of one update, whose change never let a write through before
    // it was on every member); its role then comes from the freshest superblock. A
    // member further behind missed updates (it was away while the array ran, md's
    // "non-fresh" member, which md kicks out): it is recovered in full, never trusted;
    // so is a member one behind that its own superblock does not list as active (a
    // spare whose activation did not reach it). (A bitmap-only recovery would need
    // `events_cleared` kept the way md keeps it; `--re-add` is the way to a
    // bitmap-based recovery.)
    let current = |m: &Member| {
        m.sb.events >= fresh.events
            || (m.sb.events + 1 == fresh.events && matches!(m.sb.role(), DevRole::Active(_)))
    };
    let mut stale = Vec::new();
    // Where two members claim one role, the fresher one gets it.
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(members[i].sb.events));
    let mut winner = std::collections::HashMap::new();
    for &i in &order {
        if let DevRole::Active(r) = fresh.role_of(members[i].sb.dev_number) {
            winner.entry(r).or_insert(i);
        }
    }
    // Member states from the freshest superblock.
    let mut seen_roles = Vec::new();
    let mut specs = Vec::new();
    for (i, (m, io)) in members.iter().zip(&ios).enumerate() {
        let role = fresh.role_of(m.sb.dev_number);
        let (state, role) = match role {
            DevRole::Active(r)
                if r < fresh.raid_disks as u16
                    && !seen_roles.contains(&r)
                    && winner.get(&r) == Some(&i) =>
            {
                seen_roles.push(r);
                let recovering = m.sb.feature_map & feature::RECOVERY_OFFSET != 0
                    && m.sb.recovery_offset < fresh.size;
                if !current(m) {
                    tracing::warn!(array = name, member = %m.path.display(), events = m.sb.events,
                        freshest = fresh.events, "member is behind the array: recovering it in full");
                    stale.push(i);
                    (
                        MemberState::Recovering {
                            offset: 0,
                            bitmap_only: false,
                        },
                        Some(r),
                    )
                } else if recovering {
                    (
                        MemberState::Recovering {
                            offset: m.sb.recovery_offset * SECTOR,
                            bitmap_only: false,
                        },
                        Some(r),
                    )
                } else {
                    if m.sb.events < fresh.events {
                        tracing::info!(array = name, member = %m.path.display(), events = m.sb.events,
                            freshest = fresh.events, "member is one update behind the freshest: current (md's rule)");
                    }
                    (MemberState::InSync, Some(r))
                }
            }
            DevRole::Spare => (MemberState::Spare, None),
            DevRole::Journal => {
                return Err(mismatch(
                    name,
                    format!("{}: journal devices are not supported", m.path.display()),
                ))
            }
            _ => (MemberState::Faulty, None),
        };
        specs.push(MemberSpec {
            io: io.clone(),
            data_offset: m.sb.data_offset * SECTOR,
            dev_number: m.sb.dev_number,
            role,
            state,
        });
    }
    let in_sync: Vec<usize> = (0..specs.len())
        .filter(|&i| specs[i].state == MemberState::InSync)
        .collect();
    if in_sync.is_empty() {
        return Err(mismatch(
            name,
            "no in-sync member among the given devices".into(),
        ));
    }
    for s in &specs {
        if s.data_offset + size > s.io.size() {
            return Err(mismatch(
                name,
                format!("{} is smaller than the array", s.io.path().display()),
            ));
        }
    }
    let degraded = in_sync.len() < fresh.raid_disks as usize;
    // Unclean if any current member says so: a crash between the writes of the update
    // that marked the array clean (after flushing the data) or dirty (before any
    // write) leaves both, and resyncing a clean array is only work.
    let resync_offset = members
        .iter()
        .filter(|m| current(m))
        .map(|m| m.sb.resync_offset)
        .min()
        .unwrap_or(fresh.resync_offset);
    let unclean = resync_offset != MAX_SECTOR;
    let mut sbs: Vec<Superblock> = members.iter().map(|m| m.sb.clone()).collect();
    // Roles and array-wide fields follow the freshest superblock everywhere.
    for sb in sbs.iter_mut() {
        sb.dev_roles = fresh.dev_roles.clone();
        sb.max_dev = fresh.max_dev;
        sb.events = fresh.events;
        sb.resync_offset = resync_offset;
    }
    // A stale member must not look in sync before its recovery is done: it says
    // "recovering from 0" — in this node's copy and, before the engine runs, on its own
    // superblock (only that member's; nothing array-wide changes, so no token needed).
    for &i in &stale {
        sbs[i].feature_map |= feature::RECOVERY_OFFSET;
        sbs[i].recovery_offset = 0;
        let mut own = members[i].sb.clone();
        own.feature_map |= feature::RECOVERY_OFFSET;
        own.recovery_offset = 0;
        let io = ios[i].clone();
        let block = aligned_copy(&Bytes::from(own.encode()));
        io.write_at(SB_OFFSET_BYTES, block)
            .await
            .and(io.sync().await)
            .map_err(|e| {
                mismatch(
                    name,
                    format!("{}: marking it recovering: {e}", members[i].path.display()),
                )
            })?;
    }
    let sb_store = Arc::new(SbStore {
        array: name.to_owned(),
        ios: Mutex::new(ios.clone()),
        sbs: Mutex::new(sbs),
        bitmap: Mutex::new(None),
        absent_active: (0..fresh.dev_roles.len() as u32)
            .any(|d| {
                matches!(fresh.role_of(d), DevRole::Active(r) if r < fresh.raid_disks as u16)
                    && !members.iter().any(|m| m.sb.dev_number == d)
            })
            .into(),
    });
    // This node's bitmap slot.
    let mut slot_store = None;
    let bitmap = match members[in_sync[0]].bitmap.get(slot as usize) {
        Some(mine) if fresh.has_bitmap() => {
            let mut bsb = mine.sb.clone();
            // The superblock's size is the truth: a slot written before a size change
            // (unused, or a crash in between) is brought to it.
            let stale_header = bsb.sync_size != fresh.size;
            bsb.sync_size = fresh.size;
            let geom = Geometry {
                chunk_bytes: u64::from(bsb.chunksize),
                chunks: bsb.chunks(),
                daemon_sleep: opts
                    .daemon_sleep
                    .unwrap_or(Duration::from_secs(u64::from(bsb.daemon_sleep.max(1)))),
            };
            let mut image = vec![0u8; crate::bitmap::SB_BYTES];
            image.copy_from_slice(&bsb.encode().map_err(|e| mismatch(name, e.to_string()))?);
            // The union of the in-sync members' bits.
            let mut bits = mine.bits.clone();
            for &i in &in_sync {
                if let Some(s) = members[i].bitmap.get(slot as usize) {
                    for (b, o) in bits.iter_mut().zip(&s.bits) {
                        *b |= *o;
                    }
                }
            }
            image.extend_from_slice(&bits);
            image.resize(crate::bitmap::SB_BYTES + bsb.bits_bytes() as usize, 0);
            let offsets: Vec<(Arc<MemberIo>, u64)> = members
                .iter()
                .zip(&ios)
                .map(|(m, io)| {
                    Ok((
                        io.clone(),
                        slot_offset(&m.sb, &bsb, slot)
                            .map_err(|e| mismatch(name, e.to_string()))?,
                    ))
                })
                .collect::<Result<_, AssembleError>>()?;
            let store = Arc::new(SlotStore {
                array: name.to_owned(),
                members: Mutex::new(offsets),
                raid: OnceLock::new(),
            });
            let wi = Arc::new(
                WriteIntent::new(name, geom, image, unclean || degraded, store.clone())
                    .map_err(|e| mismatch(name, e.to_string()))?,
            );
            if stale_header {
                let header = bsb.encode().map_err(|e| mismatch(name, e.to_string()))?;
                wi.set_super(&header);
            }
            *sb_store.bitmap.lock().unwrap_or_else(|e| e.into_inner()) = Some((wi.clone(), bsb));
            slot_store = Some(store);
            Some(wi)
        }
        _ if fresh.has_bitmap() => {
            return Err(mismatch(
                name,
                format!("bitmap slot {} does not exist", slot),
            ))
        }
        _ => None,
    };
    let resync_from = unclean.then(|| resync_offset.saturating_mul(SECTOR).min(size));
    let clustered_bitmap = fresh.has_bitmap()
        && members[in_sync[0]]
            .bitmap
            .first()
            .is_some_and(|b| b.sb.is_clustered());
    let raid = Raid1::start(Raid1Config {
        name: name.to_owned(),
        size,
        raid_disks: fresh.raid_disks,
        members: specs,
        bitmap,
        meta: sb_store.clone(),
        resync_from,
        speed: opts.speed,
        gated: opts.sync_gate && clustered_bitmap,
        // md disables safemode on clustered arrays: the clean flag is shared by every
        // node, and each mark would be a token round in the write path.
        safe_mode: if clustered_bitmap {
            None
        } else {
            opts.safe_mode
        },
    })?;

    if let Some(s) = &slot_store {
        let _ = s.raid.set(Arc::downgrade(&raid));
    }
    if let Some(t) = fence_ticket {
        raid.set_fence_ticket(t);
    }
    let attachment = Attachment {
        sb_store,
        slot_store,
        slot,
        uuid: fresh.set_uuid,
        add_lock: tokio::sync::Mutex::new(()),
    };
    tracing::info!(array = name, uuid = %fmt_uuid(&fresh.set_uuid), size, degraded, unclean, "assembled");
    Ok((
        raid,
        ArrayIdentity {
            uuid: fmt_uuid(&fresh.set_uuid),
            md_name: fresh.name(),
            members: paths.to_vec(),
        },
        attachment,
    ))
}
