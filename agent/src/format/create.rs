//! What `mdadm --create` writes on each member of a new array, computed without I/O.
//!
//! [`plan`] turns a [`CreateSpec`] and the device sizes into one [`MemberImage`] per
//! device: its superblock and, with a bitmap, every slot's bitmap superblock and bits.
//! [`super::io::create_members`] writes them.
//!
//! Layout choices, as mdadm 4.x makes them for metadata 1.2:
//! - superblock at sector 8, bitmap (if any) at sector 16 (`bitmap_offset = 8`);
//! - `data_offset` = superblock + bitmap area + headroom, rounded up to 1 MiB, where the
//!   headroom is 128 MiB halved until it is at most 1/1024 of the device;
//! - `max_dev` 128; no bad-block log (md-cluster has none, and we do not write one);
//! - bitmap chunk 64 MiB unless given, `daemon_sleep` 5 s;
//! - a clustered bitmap has `nodes` slots; each slot reserves room for its bits.
//!
//! Initial bits: with `--assume-clean` every slot is clean. Otherwise the whole array
//! must be resynced once: `resync_offset` is 0 and slot 0 (the creating node's) has every
//! bit set, so an interrupted first resync continues from the bitmap.

use super::bitmap::{slot_bytes_for, BitmapSuper, VERSION_CLUSTERED, VERSION_INTERNAL};
use super::superblock::{
    feature, DevRole, Superblock, DEFAULT_MAX_DEV, MAX_SECTOR, SB_BLOCK_BYTES,
};
use super::{FormatError, SB_OFFSET_SECTORS, SECTOR};

/// Default bitmap chunk: 64 MiB, as mdadm.
pub const DEFAULT_BITMAP_CHUNK: u32 = 64 << 20;
/// Default seconds before an idle chunk's bit is cleared.
pub const DEFAULT_DAEMON_SLEEP: u32 = 5;
/// Default number of node slots of a clustered bitmap (mdadm's default).
pub const DEFAULT_NODES: u32 = 4;
/// `bitmap_offset` in sectors from the superblock.
pub const BITMAP_OFFSET_SECTORS: i32 = 8;
/// Data offsets are multiples of 1 MiB.
const DATA_ALIGN_SECTORS: u64 = 2048;
/// Largest headroom before the data: 128 MiB.
const MAX_HEADROOM_SECTORS: u64 = 128 * 1024 * 2;
/// Smallest data area we create: 1 MiB.
const MIN_DATA_SECTORS: u64 = 2048;

/// Which bitmap a new array gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BitmapMode {
    /// No write-intent bitmap: any unclean stop means a full resync.
    None,
    /// One bitmap (version 4).
    Internal,
    /// One bitmap slot per cluster node (version 5).
    Clustered,
}

impl std::str::FromStr for BitmapMode {
    type Err = FormatError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(BitmapMode::None),
            "internal" => Ok(BitmapMode::Internal),
            "clustered" => Ok(BitmapMode::Clustered),
            other => Err(FormatError::InvalidSpec(format!(
                "unknown bitmap mode {other:?}: use none, internal or clustered"
            ))),
        }
    }
}

/// Everything `mdctl create` can say about a new array.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    /// RAID level; only 1 is supported.
    pub level: i32,
    /// Active members.
    pub raid_devices: u32,
    /// Spares (the devices after the active ones).
    pub spare_devices: u32,
    /// Bitmap kind.
    pub bitmap: BitmapMode,
    /// Node slots for a clustered bitmap (default [`DEFAULT_NODES`]).
    pub nodes: Option<u32>,
    /// Cluster name recorded in a clustered bitmap.
    pub cluster_name: String,
    /// Array name as stored ("homehost:name", at most 32 bytes).
    pub name: String,
    /// Used size per member in KiB; `None` = the largest that fits every device.
    pub size_kib: Option<u64>,
    /// Skip the initial resync: the members are declared identical.
    pub assume_clean: bool,
    /// Bitmap chunk in bytes (default [`DEFAULT_BITMAP_CHUNK`]).
    pub bitmap_chunk: Option<u32>,
    /// Seconds before an idle chunk's bit is cleared.
    pub daemon_sleep: u32,
    /// The array UUID.
    pub uuid: [u8; 16],
    /// One UUID per device.
    pub device_uuids: Vec<[u8; 16]>,
    /// Creation time, seconds since the epoch.
    pub ctime_secs: u64,
}

impl CreateSpec {
    /// A spec with mdadm's defaults and fresh random UUIDs.
    pub fn new(
        name: &str,
        raid_devices: u32,
        spare_devices: u32,
        bitmap: BitmapMode,
    ) -> CreateSpec {
        // Counts come from the network: no more UUIDs than md can have devices (a
        // larger count is refused by the check, before anything is written).
        let total = raid_devices
            .saturating_add(spare_devices)
            .min(DEFAULT_MAX_DEV) as usize;
        CreateSpec {
            level: 1,
            raid_devices,
            spare_devices,
            bitmap,
            nodes: None,
            cluster_name: String::new(),
            name: name.to_string(),
            size_kib: None,
            assume_clean: false,
            bitmap_chunk: None,
            daemon_sleep: DEFAULT_DAEMON_SLEEP,
            uuid: *uuid::Uuid::new_v4().as_bytes(),
            device_uuids: (0..total)
                .map(|_| *uuid::Uuid::new_v4().as_bytes())
                .collect(),
            ctime_secs: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    fn check(&self, devices: usize) -> Result<(), FormatError> {
        let bad = |m: String| Err(FormatError::InvalidSpec(m));
        if self.level != 1 {
            return bad(format!(
                "raid level {} is not supported: only level 1 (mirror)",
                self.level
            ));
        }
        if self.raid_devices < 1 || self.raid_devices > 64 {
            return bad(format!(
                "--raid-devices {} out of range 1..=64",
                self.raid_devices
            ));
        }
        if self.raid_devices.saturating_add(self.spare_devices) > DEFAULT_MAX_DEV {
            return bad(format!("at most {DEFAULT_MAX_DEV} devices in all"));
        }
        let want = self.raid_devices.saturating_add(self.spare_devices) as usize;
        if devices != want {
            return bad(format!(
                "{devices} devices given for --raid-devices {} plus --spare-devices {}: give exactly {want}",
                self.raid_devices, self.spare_devices
            ));
        }
        if self.device_uuids.len() != devices {
            return bad(format!(
                "{} device UUIDs for {devices} devices",
                self.device_uuids.len()
            ));
        }
        if self.name.len() > 32 {
            return bad(format!(
                "array name {} is longer than 32 bytes",
                mdcluster_proto::quote::quoted(&self.name)
            ));
        }
        match (self.bitmap, self.nodes) {
            (BitmapMode::Clustered, Some(n)) if n < 2 => {
                return bad(format!(
                    "--nodes {n}: a clustered array needs two nodes at least"
                ))
            }
            (BitmapMode::Clustered, Some(n)) if n > 256 => {
                return bad(format!("--nodes {n}: at most 256 node slots"))
            }
            (BitmapMode::None | BitmapMode::Internal, Some(_)) => {
                return bad("--nodes is only valid with --bitmap clustered".into())
            }
            _ => {}
        }
        if self.bitmap == BitmapMode::Clustered && self.cluster_name.len() > 63 {
            return bad("--cluster-name longer than 63 bytes".into());
        }
        if self.bitmap != BitmapMode::Clustered && !self.cluster_name.is_empty() {
            return bad("--cluster-name is only valid with --bitmap clustered".into());
        }
        if let Some(c) = self.bitmap_chunk {
            if c < 4096 || !c.is_power_of_two() {
                return bad(format!(
                    "bitmap chunk {c} bytes: a power of two, at least 4 KiB"
                ));
            }
        }
        if self.daemon_sleep == 0 || self.daemon_sleep > 3600 {
            return bad(format!(
                "daemon sleep {} s out of range 1..=3600",
                self.daemon_sleep
            ));
        }
        if self.size_kib == Some(0) {
            return bad("--size 0: give a positive size in KiB or max".into());
        }
        Ok(())
    }
}

/// What to write on one member.
#[derive(Debug, Clone)]
pub struct MemberImage {
    /// The superblock (goes at 4 KiB).
    pub sb: Superblock,
    /// Bitmap slots in order: slot superblock and its bits.
    pub bitmap_slots: Vec<(BitmapSuper, Vec<u8>)>,
}

impl MemberImage {
    /// The writes that create this member, as (absolute byte offset, bytes).
    pub fn writes(&self) -> Result<Vec<(u64, Vec<u8>)>, FormatError> {
        let mut out = vec![(self.sb.super_offset * SECTOR, self.sb.encode())];
        if let Some(start) = self.sb.bitmap_start_bytes() {
            for (i, (bm, bits)) in self.bitmap_slots.iter().enumerate() {
                let stride = bm.slot_bytes();
                let mut block = vec![0u8; stride as usize];
                block[..256].copy_from_slice(&bm.encode()?);
                block[256..256 + bits.len()].copy_from_slice(bits);
                out.push((start + i as u64 * stride, block));
            }
        }
        Ok(out)
    }
}

/// The geometry chosen for a new array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Data offset in sectors (same on every member).
    pub data_offset: u64,
    /// Used size per member in sectors (= the array size of a mirror).
    pub size: u64,
    /// Bitmap chunk in bytes (0 without bitmap).
    pub chunk: u32,
    /// Number of bitmap slots (0 without bitmap).
    pub slots: u32,
}

/// Chooses data offset, size and bitmap chunk for devices of `device_bytes`.
pub fn geometry(spec: &CreateSpec, device_bytes: &[u64]) -> Result<Geometry, FormatError> {
    spec.check(device_bytes.len())?;
    let smallest = device_bytes.iter().copied().min().unwrap_or(0) / SECTOR;
    let slots = match spec.bitmap {
        BitmapMode::None => 0,
        BitmapMode::Internal => 1,
        BitmapMode::Clustered => spec.nodes.unwrap_or(DEFAULT_NODES),
    };
    let mut headroom = MAX_HEADROOM_SECTORS;
    while headroom > 8 && headroom * 1024 > smallest {
        headroom /= 2;
    }
    // The bitmap must cover the used size, which depends on data_offset: size it for the
    // whole device (an upper bound), with at least 4 KiB per slot.
    let mut chunk = spec.bitmap_chunk.unwrap_or(DEFAULT_BITMAP_CHUNK);
    let bitmap_sectors = |chunk: u32| {
        if slots == 0 {
            0
        } else {
            u64::from(slots) * slot_bytes_for(smallest, chunk) / SECTOR
        }
    };
    // Keep the bitmap area at most 1/64 of the device: grow the chunk if needed.
    while slots > 0 && bitmap_sectors(chunk) * 64 > smallest && chunk < (1 << 30) {
        chunk *= 2;
    }
    let meta_end =
        SB_OFFSET_SECTORS + (SB_BLOCK_BYTES as u64 / SECTOR) + bitmap_sectors(chunk) + headroom;
    let data_offset = meta_end.div_ceil(DATA_ALIGN_SECTORS) * DATA_ALIGN_SECTORS;
    let min_bytes = (data_offset + MIN_DATA_SECTORS) * SECTOR;
    if smallest * SECTOR < min_bytes {
        return Err(FormatError::DeviceTooSmall {
            device_bytes: smallest * SECTOR,
            need_bytes: min_bytes,
        });
    }
    let avail = (smallest - data_offset) & !7; // whole 4 KiB blocks
    let size = match spec.size_kib {
        None => avail,
        Some(kib) => {
            let want = kib * 2;
            if want > avail {
                return Err(FormatError::InvalidSpec(format!(
                    "--size {kib} KiB does not fit: the smallest device holds {} KiB after the metadata",
                    avail / 2
                )));
            }
            if want % 8 != 0 {
                return Err(FormatError::InvalidSpec(format!(
                    "--size {kib} KiB is not a multiple of 4 KiB"
                )));
            }
            want
        }
    };
    Ok(Geometry {
        data_offset,
        size,
        chunk: if slots == 0 { 0 } else { chunk },
        slots,
    })
}

/// Computes every member of a new array. `device_bytes[i]` is the size of device `i`;
/// the first `raid_devices` become active slots 0.., the rest spares.
pub fn plan(spec: &CreateSpec, device_bytes: &[u64]) -> Result<Vec<MemberImage>, FormatError> {
    let geo = geometry(spec, device_bytes)?;
    let total = device_bytes.len() as u32;
    let mut roles = vec![super::superblock::ROLE_SPARE; DEFAULT_MAX_DEV as usize];
    for (i, r) in roles
        .iter_mut()
        .enumerate()
        .take(spec.raid_devices as usize)
    {
        *r = DevRole::Active(i as u16).to_raw();
    }
    let mut feature_map = 0;
    if geo.slots > 0 {
        feature_map |= feature::BITMAP_OFFSET;
    }
    if spec.bitmap == BitmapMode::Clustered {
        feature_map |= feature::CLUSTERED;
    }
    let set_name = super::fixed_cstr::<32>(&spec.name, "array name")?;
    let bitmap_slots = if geo.slots > 0 {
        let base = BitmapSuper {
            version: if spec.bitmap == BitmapMode::Clustered {
                VERSION_CLUSTERED
            } else {
                VERSION_INTERNAL
            },
            uuid: spec.uuid,
            events: 0,
            events_cleared: 0,
            sync_size: geo.size,
            state: 0,
            chunksize: geo.chunk,
            daemon_sleep: spec.daemon_sleep,
            write_behind: 0,
            sectors_reserved: 0,
            nodes: if spec.bitmap == BitmapMode::Clustered {
                geo.slots
            } else {
                0
            },
            cluster_name: if spec.bitmap == BitmapMode::Clustered {
                spec.cluster_name.clone()
            } else {
                String::new()
            },
        };
        base.encode()?; // validates the cluster name once
        let nbits = base.chunks();
        (0..geo.slots)
            .map(|slot| {
                let mut bits = vec![0u8; base.bits_bytes() as usize];
                if slot == 0 && !spec.assume_clean {
                    for i in 0..nbits {
                        super::bitmap::set_bit(&mut bits, i);
                    }
                }
                (base.clone(), bits)
            })
            .collect::<Vec<_>>()
    } else {
        Vec::new()
    };
    let ctime = spec.ctime_secs & 0xff_ffff_ffff;
    (0..total)
        .map(|i| {
            let dev_sectors = device_bytes[i as usize] / SECTOR;
            let sb = Superblock {
                major_version: 1,
                feature_map,
                set_uuid: spec.uuid,
                set_name,
                ctime,
                level: spec.level,
                layout: 0,
                size: geo.size,
                chunksize: 0,
                raid_disks: spec.raid_devices,
                bitmap_offset: if geo.slots > 0 {
                    BITMAP_OFFSET_SECTORS
                } else {
                    0
                },
                new_level: 0,
                reshape_position: 0,
                delta_disks: 0,
                new_layout: 0,
                new_chunk: 0,
                new_offset: 0,
                data_offset: geo.data_offset,
                data_size: (dev_sectors - geo.data_offset) & !7,
                super_offset: SB_OFFSET_SECTORS,
                recovery_offset: 0,
                dev_number: i,
                cnt_corrected_read: 0,
                device_uuid: spec.device_uuids[i as usize],
                devflags: 0,
                bblog_shift: 0,
                bblog_size: 0,
                bblog_offset: 0,
                utime: ctime,
                events: 1,
                resync_offset: if spec.assume_clean { MAX_SECTOR } else { 0 },
                max_dev: DEFAULT_MAX_DEV,
                dev_roles: roles.clone(),
            };
            Ok(MemberImage {
                sb,
                bitmap_slots: bitmap_slots.clone(),
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::bitmap::count_set;

    const MIB: u64 = 1 << 20;

    /// Counts from the network near 2^32 size nothing before the check refuses them.
    #[test]
    fn absurd_counts_refused_without_allocating() {
        let spec = CreateSpec::new("h:md0", u32::MAX, u32::MAX, BitmapMode::Internal);
        assert!(spec.device_uuids.len() <= DEFAULT_MAX_DEV as usize);
        let e = plan(&spec, &[64 * MIB, 64 * MIB]).unwrap_err();
        assert!(e.to_string().contains("--raid-devices"), "{e}");
        let spec = CreateSpec::new("h:md0", 2, u32::MAX - 1, BitmapMode::Internal);
        let e = plan(&spec, &[64 * MIB, 64 * MIB]).unwrap_err();
        assert!(e.to_string().contains("devices in all"), "{e}");
        let mut spec = CreateSpec::new("h:md0", 2, 0, BitmapMode::Clustered);
        spec.nodes = Some(u32::MAX);
        let e = plan(&spec, &[64 * MIB, 64 * MIB]).unwrap_err();
        assert!(e.to_string().contains("at most 256"), "{e}");
    }

    #[test]
    fn small_device_matches_mdadm_offsets() {
        // mdadm put data at 2048 sectors on the 16 MiB fixture disks.
        let spec = CreateSpec::new("h:fixa", 2, 0, BitmapMode::Internal);
        let geo = geometry(&spec, &[16 * MIB, 16 * MIB]).unwrap();
        assert_eq!(geo.data_offset, 2048);
        assert_eq!(geo.size, 30720);
        assert_eq!(geo.chunk, 64 << 20);
    }

    #[test]
    fn clustered_layout() {
        let mut spec = CreateSpec::new("h:md0", 2, 1, BitmapMode::Clustered);
        spec.cluster_name = "east".into();
        spec.bitmap_chunk = Some(1 << 20);
        let members = plan(&spec, &[64 * MIB, 64 * MIB, 80 * MIB]).unwrap();
        assert_eq!(members.len(), 3);
        let m = &members[2];
        assert_eq!(m.sb.feature_map, 0x101);
        assert_eq!(m.sb.role(), DevRole::Spare);
        assert_eq!(members[1].sb.role(), DevRole::Active(1));
        assert_eq!(m.bitmap_slots.len(), 4);
        let (bm, bits) = &m.bitmap_slots[0];
        assert_eq!(count_set(bits, bm.chunks()), bm.chunks());
        assert_eq!(count_set(&m.bitmap_slots[1].1, bm.chunks()), 0);
        // The smallest device decides the size, the bigger one keeps its data_size.
        assert!(m.sb.data_size > members[0].sb.data_size);
        assert_eq!(m.sb.size, members[0].sb.size);
        // Every slot fits between superblock and data.
        let writes = m.writes().unwrap();
        let last = writes.last().unwrap();
        assert!(last.0 + last.1.len() as u64 <= m.sb.data_offset * SECTOR);
    }

    #[test]
    fn assume_clean_has_no_dirty_bits() {
        let mut spec = CreateSpec::new("h:md0", 2, 0, BitmapMode::Internal);
        spec.assume_clean = true;
        let members = plan(&spec, &[32 * MIB, 32 * MIB]).unwrap();
        assert_eq!(members[0].sb.resync_offset, MAX_SECTOR);
        assert!(members[0].bitmap_slots[0].1.iter().all(|&b| b == 0));
    }

    #[test]
    fn bad_specs() {
        let spec = CreateSpec::new("h:md0", 2, 0, BitmapMode::None);
        assert!(plan(&spec, &[32 * MIB]).is_err(), "device count");
        assert!(plan(&spec, &[MIB, MIB]).is_err(), "too small");
        let mut s = spec.clone();
        s.level = 5;
        assert!(plan(&s, &[32 * MIB, 32 * MIB]).is_err());
        let mut s = spec.clone();
        s.nodes = Some(4);
        assert!(
            plan(&s, &[32 * MIB, 32 * MIB]).is_err(),
            "nodes without clustered"
        );
        let mut s = CreateSpec::new("h:md0", 2, 0, BitmapMode::Clustered);
        s.nodes = Some(1);
        assert!(plan(&s, &[32 * MIB, 32 * MIB]).is_err());
        let mut s = spec.clone();
        s.size_kib = Some(1 << 30);
        assert!(plan(&s, &[32 * MIB, 32 * MIB]).is_err());
        let mut s = spec;
        s.size_kib = Some(8192);
        let m = plan(&s, &[32 * MIB, 32 * MIB]).unwrap();
        assert_eq!(m[0].sb.size, 16384);
    }

    #[test]
    fn big_device_headroom_and_bitmap() {
        let mut spec = CreateSpec::new("h:md0", 2, 0, BitmapMode::Clustered);
        spec.nodes = Some(8);
        let tib = 1u64 << 40;
        let geo = geometry(&spec, &[10 * tib, 10 * tib]).unwrap();
        assert_eq!(geo.data_offset % 2048, 0);
        // 128 MiB headroom plus 8 slots of 48 sectors.
        assert!(geo.data_offset >= MAX_HEADROOM_SECTORS + 8 * 48);
        assert_eq!(geo.chunk, 64 << 20);
    }
}
