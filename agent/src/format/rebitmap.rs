//! Adding or removing the write-intent bitmap of a stopped, clean array's members
//! (`mdctl grow --bitmap`, mdadm's `Grow_addbitmap`).
//!
//! - **none**: clear `BITMAP_OFFSET` and `CLUSTERED` in every member's superblock
//!   (`bitmap_offset` 0); the old slots stay on disk, unused.
//! - **internal** / **clustered**: the bitmap goes where `mdadm --create` puts it,
//!   8 sectors after the superblock, with `nodes` slots (1 for internal), its chunk the
//!   default (64 MiB) doubled until every slot fits before the data; all bits clean
//!   (the array is clean). Slots are written first, the superblock last, so a crash
//!   in between leaves a member without a bitmap, as before.
//!
//! Every member gets `events + 1`. Refused, before anything is written: a member that
//! is not clean (a resync is owed), members of different arrays, no room for the bitmap
//! on the member with the least, a bad-block log (it sits where the bitmap goes). The
//! chunk is the same on every member (so is the slot stride).

use std::path::PathBuf;

use super::bitmap::{slot_bytes_for, BitmapSuper, VERSION_CLUSTERED, VERSION_INTERNAL};
use super::create::{BITMAP_OFFSET_SECTORS, DEFAULT_BITMAP_CHUNK, DEFAULT_DAEMON_SLEEP};
use super::io::{read_member_from, write_bitmap_slot, write_superblock, DeviceError, MetaDev};
use super::superblock::{feature, MAX_SECTOR};
use super::{FormatError, SECTOR};

/// The bitmap to give the members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NewBitmap {
    /// No bitmap.
    None,
    /// One slot (version 4).
    Internal,
    /// `nodes` slots (version 5) for cluster `cluster_name`.
    Clustered {
        /// Slots.
        nodes: u32,
        /// Cluster name recorded in the bitmap.
        cluster_name: String,
    },
}

fn invalid(path: &std::path::Path, why: String) -> DeviceError {
    DeviceError::Format {
        path: path.to_path_buf(),
        source: FormatError::InvalidSpec(why),
    }
}

/// Gives the members at `paths` (one array, stopped, clean) the bitmap `want`. See
/// the module doc. Blocking I/O.
pub fn set_bitmap(paths: &[PathBuf], want: &NewBitmap) -> Result<(), DeviceError> {
    let mut members = Vec::with_capacity(paths.len());
    for p in paths {
        let f = MetaDev::open(p, true)?;
        let m = read_member_from(&f)?;
        members.push((f, m));
    }
    let Some((_, first)) = members.first() else {
        return Ok(());
    };
    let uuid = first.sb.set_uuid;
    for (_, m) in &members {
        if m.sb.set_uuid != uuid {
            return Err(invalid(
                &m.path,
                "belongs to another array than the first member".into(),
            ));
        }
        if m.sb.resync_offset != MAX_SECTOR {
            return Err(invalid(
                &m.path,
                "the array is not clean (a resync is owed); assemble it and let the resync finish first".into(),
            ));
        }
    }
    let (version, slots, cluster_name) = match want {
        NewBitmap::None => (0, 0, String::new()),
        NewBitmap::Internal => (VERSION_INTERNAL, 1, String::new()),
        NewBitmap::Clustered {
            nodes,
            cluster_name,
        } => (VERSION_CLUSTERED, (*nodes).max(1), cluster_name.clone()),
    };
    // One chunk for every member (the stride must be the same on all of them), chosen
    // from the smallest room; everything checked before anything is written.
    let mut chunk = DEFAULT_BITMAP_CHUNK;
    if slots > 0 {
        for (_, m) in &members {
            if m.sb.bblog_size != 0 {
                return Err(invalid(
                    &m.path,
                    "has a bad-block log where the bitmap would go; remove it first (mdadm --update=no-bbl) or keep no bitmap".into(),
                ));
            }
        }
        let mut probe = members[0].1.sb.clone();
        probe.bitmap_offset = BITMAP_OFFSET_SECTORS;
        probe.feature_map |= feature::BITMAP_OFFSET;
        let start = probe.bitmap_start_bytes().unwrap_or(0);
        let room = members
            .iter()
            .map(|(_, m)| (m.sb.data_offset * SECTOR).saturating_sub(start))
            .min()
            .unwrap_or(0);
        while u64::from(slots) * slot_bytes_for(probe.size, chunk) > room {
            if chunk >= 1 << 30 {
                return Err(invalid(
                    &members[0].1.path,
                    format!(
                        "no room for a bitmap of {slots} slots: {room} bytes between the superblock and the data"
                    ),
                ));
            }
            chunk *= 2;
        }
    }
    for (f, m) in &members {
        let mut sb = m.sb.clone();
        sb.events += 1;
        if slots == 0 {
            sb.feature_map &= !(feature::BITMAP_OFFSET | feature::CLUSTERED);
            sb.bitmap_offset = 0;
            write_superblock(f, &sb)?;
            continue;
        }
        sb.bitmap_offset = BITMAP_OFFSET_SECTORS;
        sb.feature_map |= feature::BITMAP_OFFSET;
        if version == VERSION_CLUSTERED {
            sb.feature_map |= feature::CLUSTERED;
        } else {
            sb.feature_map &= !feature::CLUSTERED;
        }
        let bm = BitmapSuper {
            version,
            uuid,
            events: sb.events,
            events_cleared: sb.events,
            sync_size: sb.size,
            state: 0,
            chunksize: chunk,
            daemon_sleep: DEFAULT_DAEMON_SLEEP,
            write_behind: 0,
            sectors_reserved: 0,
            nodes: if version == VERSION_CLUSTERED {
                slots
            } else {
                0
            },
            cluster_name: cluster_name.clone(),
        };
        let bits = vec![0u8; bm.bits_bytes() as usize];
        for slot in 0..slots {
            write_bitmap_slot(f, &sb, slot, &bm, &bits)?;
        }
        write_superblock(f, &sb)?;
    }
    Ok(())
}
