//! The md v1.x superblock (`struct mdp_superblock_1`), byte for byte as Linux md and
//! mdadm read and write it: every field, the checksum, device roles and feature bits.
//!
//! Pure code over byte buffers: [`Superblock::parse`] validates a 4 KiB block read at
//! the superblock offset, [`Superblock::encode`] produces one with a correct `sb_csum`.
//! Layout: `docs/MD-FORMAT.md` §1–4 (offsets checked against the kernel uapi
//! header `linux/raid/md_p.h`).

use super::{le_i32, le_u16, le_u32, le_u64, put_i32, put_u16, put_u32, put_u64, FormatError};

/// `MD_SB_MAGIC`, stored little-endian at offset 0.
pub const MD_SB_MAGIC: u32 = 0xa92b_4efc;
/// The superblock is read and written as one 4 KiB block.
pub const SB_BLOCK_BYTES: usize = 4096;
/// Size of the fixed part; `dev_roles` follows it.
pub const SB_FIXED_BYTES: usize = 256;
/// Largest `max_dev` that fits a 4 KiB block: (4096 − 256) / 2.
pub const MAX_DEV_LIMIT: u32 = ((SB_BLOCK_BYTES - SB_FIXED_BYTES) / 2) as u32;
/// `max_dev` mdadm uses for new 1.x arrays.
pub const DEFAULT_MAX_DEV: u32 = 128;
/// `resync_offset`/`recovery_cp` value meaning "nothing left to resync".
pub const MAX_SECTOR: u64 = u64::MAX;

/// Role value of a spare (also used for unused `dev_roles` entries).
pub const ROLE_SPARE: u16 = 0xffff;
/// Role value of a faulty member.
pub const ROLE_FAULTY: u16 = 0xfffe;
/// Role value of a journal device.
pub const ROLE_JOURNAL: u16 = 0xfffd;
/// Roles at or above this value are not active slot numbers (`MD_DISK_ROLE_MAX`).
pub const ROLE_MAX: u16 = 0xff00;

/// Feature bits of `feature_map` (`MD_FEATURE_*`).
pub mod feature {
    /// `bitmap_offset` is valid: an internal bitmap exists.
    pub const BITMAP_OFFSET: u32 = 1;
    /// `recovery_offset` is valid: this member is partly recovered.
    pub const RECOVERY_OFFSET: u32 = 2;
    /// A reshape is in progress.
    pub const RESHAPE_ACTIVE: u32 = 4;
    /// The bad-block log has entries.
    pub const BAD_BLOCKS: u32 = 8;
    /// This member is a replacement for another.
    pub const REPLACEMENT: u32 = 16;
    /// The reshape runs backwards.
    pub const RESHAPE_BACKWARDS: u32 = 32;
    /// `new_offset` is valid.
    pub const NEW_OFFSET: u32 = 64;
    /// Recovery is driven by the bitmap (re-add).
    pub const RECOVERY_BITMAP: u32 = 128;
    /// The array is clustered (md-cluster).
    pub const CLUSTERED: u32 = 256;
    /// The array has a write journal.
    pub const JOURNAL: u32 = 512;
    /// Partial parity log (RAID5).
    pub const PPL: u32 = 1024;
    /// Multiple partial parity logs.
    pub const MULTIPLE_PPLS: u32 = 2048;
    /// RAID0 layout is recorded.
    pub const RAID0_LAYOUT: u32 = 4096;
    /// Every bit Linux md knows (`MD_FEATURE_ALL`); anything else is refused.
    pub const ALL: u32 = 0x1fff;
}

/// What one member is to the array, from `dev_roles[dev_number]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DevRole {
    /// An active slot (`raid_disk`) of the array.
    Active(u16),
    /// A spare: no slot yet.
    Spare,
    /// Failed; kept in the superblock so every node agrees it is out.
    Faulty,
    /// A write journal device.
    Journal,
}

impl DevRole {
    /// Decodes a `dev_roles` entry.
    pub fn from_raw(raw: u16) -> DevRole {
        match raw {
            ROLE_FAULTY => DevRole::Faulty,
            ROLE_JOURNAL => DevRole::Journal,
            r if r < ROLE_MAX => DevRole::Active(r),
            _ => DevRole::Spare,
        }
    }

    /// Encodes into a `dev_roles` entry.
    pub fn to_raw(self) -> u16 {
        match self {
            DevRole::Active(n) => n,
            DevRole::Spare => ROLE_SPARE,
            DevRole::Faulty => ROLE_FAULTY,
            DevRole::Journal => ROLE_JOURNAL,
        }
    }
}

impl std::fmt::Display for DevRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DevRole::Active(n) => write!(f, "Active device {n}"),
            DevRole::Spare => f.write_str("spare"),
            DevRole::Faulty => f.write_str("faulty"),
            DevRole::Journal => f.write_str("journal"),
        }
    }
}

/// `struct mdp_superblock_1`: field names and meanings are the kernel's.
///
/// Sizes are in 512-byte sectors unless a field says otherwise.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Always 1 for v1.x.
    pub major_version: u32,
    /// `MD_FEATURE_*` bits, see [`feature`].
    pub feature_map: u32,
    /// The array UUID, shared by every member.
    pub set_uuid: [u8; 16],
    /// "homehost:name", NUL-padded.
    pub set_name: [u8; 32],
    /// Creation time: low 40 bits seconds, high 24 bits microseconds.
    pub ctime: u64,
    /// RAID level (1 for a mirror).
    pub level: i32,
    /// Layout (RAID5/10 only).
    pub layout: u32,
    /// Used size of every member, in sectors (the array size for RAID1).
    pub size: u64,
    /// Chunk size in sectors (0 for RAID1).
    pub chunksize: u32,
    /// Number of active slots.
    pub raid_disks: u32,
    /// Sectors from the superblock to the bitmap (signed; valid with BITMAP_OFFSET).
    pub bitmap_offset: i32,
    /// Reshape: target level.
    pub new_level: u32,
    /// Reshape: progress.
    pub reshape_position: u64,
    /// Reshape: change of raid_disks.
    pub delta_disks: u32,
    /// Reshape: target layout.
    pub new_layout: u32,
    /// Reshape: target chunk size.
    pub new_chunk: u32,
    /// Reshape: signed offset added to data_offset.
    pub new_offset: u32,
    /// Where the data starts on this member.
    pub data_offset: u64,
    /// Sectors usable for data on this member.
    pub data_size: u64,
    /// Where this superblock is: 8 for v1.2.
    pub super_offset: u64,
    /// How far a recovering member is rebuilt (valid with RECOVERY_OFFSET).
    pub recovery_offset: u64,
    /// This member's index into `dev_roles`.
    pub dev_number: u32,
    /// Corrected read errors seen on this member.
    pub cnt_corrected_read: u32,
    /// UUID of this member (blkid's UUID_SUB).
    pub device_uuid: [u8; 16],
    /// 1 WriteMostly, 2 FailFast.
    pub devflags: u8,
    /// Bad-block log: shift of the entry unit.
    pub bblog_shift: u8,
    /// Bad-block log size in sectors (0 = none).
    pub bblog_size: u16,
    /// Bad-block log offset from the superblock, signed sectors.
    pub bblog_offset: i32,
    /// Time of the last superblock update (same encoding as `ctime`).
    pub utime: u64,
    /// Event counter: the member with the highest value is the most recent.
    pub events: u64,
    /// Sector up to which the array is known in sync ([`MAX_SECTOR`] = clean).
    pub resync_offset: u64,
    /// Number of `dev_roles` entries.
    pub max_dev: u32,
    /// Role of each device number, see [`DevRole`].
    pub dev_roles: Vec<u16>,
}

/// Computes `sb_csum` over `buf` (the first `256 + 2·max_dev` bytes), treating the
/// checksum field itself as zero (`calc_sb_1_csum`).
pub fn checksum(buf: &[u8], max_dev: u32) -> u32 {
    let len = SB_FIXED_BYTES + 2 * max_dev as usize;
    let buf = &buf[..len.min(buf.len())];
    let mut sum: u64 = 0;
    let mut words = buf.chunks_exact(4);
    for (i, w) in words.by_ref().enumerate() {
        // The csum field (offset 216) counts as zero.
        if i * 4 != 216 {
            sum += u64::from(u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
        }
    }
    let rest = words.remainder();
    if rest.len() >= 2 {
        sum += u64::from(u16::from_le_bytes([rest[0], rest[1]]));
    }
    ((sum & 0xffff_ffff) + (sum >> 32)) as u32
}

impl Superblock {
    /// Parses and validates a superblock block (at least 256 + 2·max_dev bytes; read
    /// 4 KiB). Refuses everything the kernel refuses (`super_1_load`).
    pub fn parse(buf: &[u8]) -> Result<Superblock, FormatError> {
        if buf.len() < SB_FIXED_BYTES {
            return Err(FormatError::Truncated {
                what: "superblock",
                need: SB_FIXED_BYTES,
                got: buf.len(),
            });
        }
        let magic = le_u32(buf, 0);
        if magic != MD_SB_MAGIC {
            if buf[..SB_FIXED_BYTES].iter().all(|&b| b == 0) {
                return Err(FormatError::NoSuperblock);
            }
            return Err(FormatError::BadMagic { found: magic });
        }
        let major_version = le_u32(buf, 4);
        if major_version != 1 {
            return Err(FormatError::BadVersion {
                found: major_version,
            });
        }
        let max_dev = le_u32(buf, 220);
        if max_dev > MAX_DEV_LIMIT {
            return Err(FormatError::BadMaxDev { found: max_dev });
        }
        let need = SB_FIXED_BYTES + 2 * max_dev as usize;
        if buf.len() < need {
            return Err(FormatError::Truncated {
                what: "superblock dev_roles",
                need,
                got: buf.len(),
            });
        }
        let stored = le_u32(buf, 216);
        let computed = checksum(buf, max_dev);
        if stored != computed {
            return Err(FormatError::BadChecksum { stored, computed });
        }
        let feature_map = le_u32(buf, 8);
        if feature_map & !feature::ALL != 0 {
            return Err(FormatError::UnknownFeatures {
                bits: feature_map & !feature::ALL,
            });
        }
        if le_u32(buf, 12) != 0 || buf[224..256].iter().any(|&b| b != 0) {
            return Err(FormatError::NonZeroPadding);
        }
        let mut set_uuid = [0u8; 16];
        set_uuid.copy_from_slice(&buf[16..32]);
        let mut set_name = [0u8; 32];
        set_name.copy_from_slice(&buf[32..64]);
        let mut device_uuid = [0u8; 16];
        device_uuid.copy_from_slice(&buf[168..184]);
        let dev_roles = (0..max_dev as usize)
            .map(|i| le_u16(buf, SB_FIXED_BYTES + 2 * i))
            .collect();
        let sb = Superblock {
            major_version,
            feature_map,
            set_uuid,
            set_name,
            ctime: le_u64(buf, 64),
            level: le_i32(buf, 72),
            layout: le_u32(buf, 76),
            size: le_u64(buf, 80),
            chunksize: le_u32(buf, 88),
            raid_disks: le_u32(buf, 92),
            bitmap_offset: le_i32(buf, 96),
            new_level: le_u32(buf, 100),
            reshape_position: le_u64(buf, 104),
            delta_disks: le_u32(buf, 112),
            new_layout: le_u32(buf, 116),
            new_chunk: le_u32(buf, 120),
            new_offset: le_u32(buf, 124),
            data_offset: le_u64(buf, 128),
            data_size: le_u64(buf, 136),
            super_offset: le_u64(buf, 144),
            recovery_offset: le_u64(buf, 152),
            dev_number: le_u32(buf, 160),
            cnt_corrected_read: le_u32(buf, 164),
            device_uuid,
            devflags: buf[184],
            bblog_shift: buf[185],
            bblog_size: le_u16(buf, 186),
            bblog_offset: le_i32(buf, 188),
            utime: le_u64(buf, 192),
            events: le_u64(buf, 200),
            resync_offset: le_u64(buf, 208),
            max_dev,
            dev_roles,
        };
        sb.validate_layout()?;
        Ok(sb)
    }

    /// The checks on offsets that do not need the device size.
    fn validate_layout(&self) -> Result<(), FormatError> {
        if self.data_size < 10 {
            return Err(FormatError::DataTooSmall {
                data_size: self.data_size,
            });
        }
        // v1.1/v1.2 keep the data after the superblock: data may not start inside the
        // superblock's own 4 KiB.
        if self.super_offset < self.data_offset
            && self.data_offset
                < self
                    .super_offset
                    .saturating_add(SB_BLOCK_BYTES as u64 / 512)
        {
            return Err(FormatError::DataOverlapsSuperblock {
                data_offset: self.data_offset,
                super_offset: self.super_offset,
            });
        }
        if self.level == 1 && self.size > self.data_size {
            return Err(FormatError::SizeExceedsData {
                size: self.size,
                data_size: self.data_size,
            });
        }
        if self.feature_map & feature::BITMAP_OFFSET != 0 {
            // The bitmap must lie between the superblock block and the data.
            let bm = i128::from(self.super_offset) + i128::from(self.bitmap_offset);
            let sb_end = i128::from(self.super_offset) + (SB_BLOCK_BYTES as i128 / 512);
            let data = i128::from(self.data_offset);
            let inside_sb = bm >= i128::from(self.super_offset) && bm < sb_end;
            if bm < 0 || inside_sb || (self.data_offset > self.super_offset && bm >= data) {
                return Err(FormatError::BitmapOffsetOutOfRange {
                    bitmap_offset: self.bitmap_offset,
                    data_offset: self.data_offset,
                });
            }
        }
        Ok(())
    }

    /// Checks the superblock against the size of the device it was read from.
    pub fn validate_device(&self, device_sectors: u64) -> Result<(), FormatError> {
        let end = self.data_offset.checked_add(self.data_size);
        match end {
            Some(end) if end <= device_sectors => {}
            _ => {
                return Err(FormatError::BeyondDevice {
                    data_offset: self.data_offset,
                    data_size: self.data_size,
                    device_sectors,
                })
            }
        }
        if self.super_offset + (SB_BLOCK_BYTES as u64 / 512) > device_sectors {
            return Err(FormatError::DeviceTooSmall {
                device_bytes: device_sectors * 512,
                need_bytes: (self.super_offset * 512) + SB_BLOCK_BYTES as u64,
            });
        }
        Ok(())
    }

    /// Encodes into a 4 KiB block with `sb_csum` computed.
    pub fn encode(&self) -> Vec<u8> {
        let mut buf = vec![0u8; SB_BLOCK_BYTES];
        put_u32(&mut buf, 0, MD_SB_MAGIC);
        put_u32(&mut buf, 4, self.major_version);
        put_u32(&mut buf, 8, self.feature_map);
        buf[16..32].copy_from_slice(&self.set_uuid);
        buf[32..64].copy_from_slice(&self.set_name);
        put_u64(&mut buf, 64, self.ctime);
        put_i32(&mut buf, 72, self.level);
        put_u32(&mut buf, 76, self.layout);
        put_u64(&mut buf, 80, self.size);
        put_u32(&mut buf, 88, self.chunksize);
        put_u32(&mut buf, 92, self.raid_disks);
        put_i32(&mut buf, 96, self.bitmap_offset);
        put_u32(&mut buf, 100, self.new_level);
        put_u64(&mut buf, 104, self.reshape_position);
        put_u32(&mut buf, 112, self.delta_disks);
        put_u32(&mut buf, 116, self.new_layout);
        put_u32(&mut buf, 120, self.new_chunk);
        put_u32(&mut buf, 124, self.new_offset);
        put_u64(&mut buf, 128, self.data_offset);
        put_u64(&mut buf, 136, self.data_size);
        put_u64(&mut buf, 144, self.super_offset);
        put_u64(&mut buf, 152, self.recovery_offset);
        put_u32(&mut buf, 160, self.dev_number);
        put_u32(&mut buf, 164, self.cnt_corrected_read);
        buf[168..184].copy_from_slice(&self.device_uuid);
        buf[184] = self.devflags;
        buf[185] = self.bblog_shift;
        put_u16(&mut buf, 186, self.bblog_size);
        put_i32(&mut buf, 188, self.bblog_offset);
        put_u64(&mut buf, 192, self.utime);
        put_u64(&mut buf, 200, self.events);
        put_u64(&mut buf, 208, self.resync_offset);
        let max_dev = self.max_dev.min(MAX_DEV_LIMIT);
        put_u32(&mut buf, 220, max_dev);
        for i in 0..max_dev as usize {
            let role = self.dev_roles.get(i).copied().unwrap_or(ROLE_SPARE);
            put_u16(&mut buf, SB_FIXED_BYTES + 2 * i, role);
        }
        let csum = checksum(&buf, max_dev);
        put_u32(&mut buf, 216, csum);
        buf
    }

    /// The role of device number `dev_number` (out of range means spare, as in md).
    pub fn role_of(&self, dev_number: u32) -> DevRole {
        self.dev_roles
            .get(dev_number as usize)
            .map_or(DevRole::Spare, |&r| DevRole::from_raw(r))
    }

    /// This member's own role.
    pub fn role(&self) -> DevRole {
        self.role_of(self.dev_number)
    }

    /// Sets the role of `dev_number`, growing `dev_roles`/`max_dev` if needed.
    pub fn set_role(&mut self, dev_number: u32, role: DevRole) -> Result<(), FormatError> {
        if dev_number >= MAX_DEV_LIMIT {
            return Err(FormatError::BadMaxDev {
                found: dev_number + 1,
            });
        }
        let idx = dev_number as usize;
        if idx >= self.dev_roles.len() {
            self.dev_roles.resize(idx + 1, ROLE_SPARE);
        }
        if self.max_dev <= dev_number {
            self.max_dev = dev_number + 1;
        }
        self.dev_roles[idx] = role.to_raw();
        Ok(())
    }

    /// True when an internal bitmap is recorded.
    pub fn has_bitmap(&self) -> bool {
        self.feature_map & feature::BITMAP_OFFSET != 0
    }

    /// True for an md-cluster array.
    pub fn is_clustered(&self) -> bool {
        self.feature_map & feature::CLUSTERED != 0
    }

    /// Absolute byte offset of the (first) bitmap superblock on the member.
    pub fn bitmap_start_bytes(&self) -> Option<u64> {
        if !self.has_bitmap() {
            return None;
        }
        let sector = i128::from(self.super_offset) + i128::from(self.bitmap_offset);
        u64::try_from(sector).ok().and_then(|s| s.checked_mul(512))
    }

    /// `set_name` as text, without the NUL padding.
    pub fn name(&self) -> String {
        super::cstr(&self.set_name)
    }

    /// Sets `set_name` (at most 32 bytes).
    pub fn set_name_str(&mut self, name: &str) -> Result<(), FormatError> {
        self.set_name = super::fixed_cstr(name, "array name")?;
        Ok(())
    }

    /// Number of active slots that `dev_roles` fills (an array with fewer than
    /// `raid_disks` is degraded).
    pub fn active_count(&self) -> u32 {
        let mut seen = vec![false; self.raid_disks as usize];
        for &r in &self.dev_roles {
            if let DevRole::Active(n) = DevRole::from_raw(r) {
                if let Some(s) = seen.get_mut(n as usize) {
                    *s = true;
                }
            }
        }
        seen.iter().filter(|&&s| s).count() as u32
    }

    /// Array state letters as `mdadm -E` prints them: 'A' active, '.' missing.
    pub fn array_state(&self) -> String {
        (0..self.raid_disks)
            .map(|slot| {
                let present = self
                    .dev_roles
                    .iter()
                    .any(|&r| DevRole::from_raw(r) == DevRole::Active(slot as u16));
                if present {
                    'A'
                } else {
                    '.'
                }
            })
            .collect()
    }
}

/// Seconds part of a `ctime`/`utime` value.
pub fn time_secs(t: u64) -> u64 {
    t & 0xff_ffff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            major_version: 1,
            feature_map: feature::BITMAP_OFFSET,
            set_uuid: [7; 16],
            set_name: super::super::fixed_cstr("host:md0", "n").unwrap(),
            ctime: 1_700_000_000,
            level: 1,
            layout: 0,
            size: 30720,
            chunksize: 0,
            raid_disks: 2,
            bitmap_offset: 8,
            new_level: 0,
            reshape_position: 0,
            delta_disks: 0,
            new_layout: 0,
            new_chunk: 0,
            new_offset: 0,
            data_offset: 2048,
            data_size: 30720,
            super_offset: 8,
            recovery_offset: 0,
            dev_number: 1,
            cnt_corrected_read: 0,
            device_uuid: [9; 16],
            devflags: 0,
            bblog_shift: 0,
            bblog_size: 0,
            bblog_offset: 0,
            utime: 1_700_000_000,
            events: 5,
            resync_offset: MAX_SECTOR,
            max_dev: 128,
            dev_roles: {
                let mut r = vec![ROLE_SPARE; 128];
                r[0] = 0;
                r[1] = 1;
                r
            },
        }
    }

    #[test]
    fn roundtrip() {
        let sb = sample();
        let bytes = sb.encode();
        assert_eq!(bytes.len(), 4096);
        let back = Superblock::parse(&bytes).unwrap();
        assert_eq!(back, sb);
        assert_eq!(back.role(), DevRole::Active(1));
        assert_eq!(back.name(), "host:md0");
        assert_eq!(back.array_state(), "AA");
    }

    #[test]
    fn every_checksummed_byte_is_covered() {
        let bytes = sample().encode();
        let covered = SB_FIXED_BYTES + 2 * 128;
        for i in 0..covered {
            let mut b = bytes.clone();
            b[i] ^= 0x01;
            assert!(
                Superblock::parse(&b).is_err(),
                "flipping byte {i} went unnoticed"
            );
        }
    }

    #[test]
    fn specific_errors() {
        let good = sample().encode();
        assert!(matches!(
            Superblock::parse(&[0u8; 4096]),
            Err(FormatError::NoSuperblock)
        ));
        let mut b = good.clone();
        b[0] = 0x11;
        assert!(matches!(
            Superblock::parse(&b),
            Err(FormatError::BadMagic { .. })
        ));
        let mut b = good.clone();
        b[100] ^= 0xff;
        assert!(matches!(
            Superblock::parse(&b),
            Err(FormatError::BadChecksum { .. })
        ));
        let mut sb = sample();
        sb.feature_map |= 1 << 20;
        assert!(matches!(
            Superblock::parse(&sb.encode()),
            Err(FormatError::UnknownFeatures { bits }) if bits == 1 << 20
        ));
        let mut sb = sample();
        sb.data_size = 4;
        sb.size = 4;
        assert!(matches!(
            Superblock::parse(&sb.encode()),
            Err(FormatError::DataTooSmall { .. })
        ));
        let mut sb = sample();
        sb.data_offset = 10;
        assert!(matches!(
            Superblock::parse(&sb.encode()),
            Err(FormatError::DataOverlapsSuperblock { .. })
        ));
        let sb = sample();
        assert!(matches!(
            sb.validate_device(20000),
            Err(FormatError::BeyondDevice { .. })
        ));
        assert!(sb.validate_device(2048 + 30720).is_ok());
    }

    #[test]
    fn roles() {
        assert_eq!(DevRole::from_raw(0xffff), DevRole::Spare);
        assert_eq!(DevRole::from_raw(0xfffe), DevRole::Faulty);
        assert_eq!(DevRole::from_raw(0xfffd), DevRole::Journal);
        assert_eq!(DevRole::from_raw(0xff00), DevRole::Spare);
        assert_eq!(DevRole::from_raw(3), DevRole::Active(3));
        let mut sb = sample();
        sb.set_role(1, DevRole::Faulty).unwrap();
        assert_eq!(sb.role(), DevRole::Faulty);
        assert_eq!(sb.array_state(), "A.");
        assert_eq!(sb.active_count(), 1);
        assert_eq!(sb.role_of(500), DevRole::Spare);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(2000))]

        /// Arbitrary bytes never panic the parsers.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..4200)) {
            let _ = Superblock::parse(&bytes);
            let _ = crate::format::bitmap::BitmapSuper::parse(&bytes);
        }

        /// A valid superblock with arbitrary field values and one corrupted byte inside
        /// the checksummed area is always refused.
        #[test]
        fn corruption_always_detected(
            events in proptest::prelude::any::<u64>(),
            size in 10u64..30720,
            pos in 0usize..(SB_FIXED_BYTES + 256),
            flip in 1u8..=255,
        ) {
            let mut sb = sample();
            sb.events = events;
            sb.size = size;
            let mut bytes = sb.encode();
            let parsed = Superblock::parse(&bytes);
            proptest::prop_assert_eq!(parsed, Ok(sb));
            bytes[pos] ^= flip;
            proptest::prop_assert!(Superblock::parse(&bytes).is_err());
        }
    }

    #[test]
    fn odd_max_dev_checksum_adds_trailing_u16() {
        let mut sb = sample();
        sb.max_dev = 3;
        sb.dev_roles.truncate(3);
        let bytes = sb.encode();
        assert_eq!(Superblock::parse(&bytes).unwrap().max_dev, 3);
    }
}
