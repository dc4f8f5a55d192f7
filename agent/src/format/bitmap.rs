//! The md write-intent bitmap on disk: `bitmap_super_t` (version 4 internal, version 5
//! clustered with one slot per node), the slot stride, and access to the bits.
//!
//! Layout: `docs/MD-FORMAT.md` §5–7. A slot is one 256-byte bitmap
//! superblock followed by its bits (bit *i* = chunk *i*, little-endian bit order),
//! padded to 4 KiB; slot *N* starts `N · slot_bytes` after the first.

use super::superblock::Superblock;
use super::{cstr, fixed_cstr, le_u32, le_u64, put_u32, put_u64, FormatError};

/// `BITMAP_MAGIC` ("bitm" as little-endian bytes).
pub const BITMAP_MAGIC: u32 = 0x6d74_6962;
/// Size of the bitmap superblock; the bits follow it.
pub const BITMAP_SB_BYTES: usize = 256;
/// Version of a plain internal bitmap (little-endian bits).
pub const VERSION_INTERNAL: u32 = 4;
/// Version of a clustered bitmap (one slot per node).
pub const VERSION_CLUSTERED: u32 = 5;
/// Oldest version the kernel accepts (3 = host-endian bits).
pub const VERSION_MIN: u32 = 3;
/// Largest `write_behind` the kernel accepts.
pub const MAX_WRITE_BEHIND: u32 = 16383;
/// Slots are padded to this size.
pub const SLOT_ALIGN: u64 = 4096;
/// Longest cluster name (the field is 64 bytes, NUL-terminated).
pub const CLUSTER_NAME_MAX: usize = 63;

/// State bits of `bitmap_super_t.state`.
pub mod state {
    /// The bitmap is out of date: a full resync is needed.
    pub const STALE: u32 = 1 << 1;
    /// A write error happened on the bitmap.
    pub const WRITE_ERROR: u32 = 1 << 2;
    /// Bits are host-endian (version 3).
    pub const HOSTENDIAN: u32 = 1 << 15;
}

/// `bitmap_super_t`: one per slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapSuper {
    /// 3, 4 (internal) or 5 (clustered).
    pub version: u32,
    /// Must equal the array UUID.
    pub uuid: [u8; 16],
    /// Event count when the bitmap was last written.
    pub events: u64,
    /// Event count when bits were last cleared.
    pub events_cleared: u64,
    /// Sectors the bitmap covers (the member's used size for RAID1).
    pub sync_size: u64,
    /// See [`state`].
    pub state: u32,
    /// Bytes of data per bit; a power of two, at least 512.
    pub chunksize: u32,
    /// Seconds a chunk stays idle before its bit is cleared.
    pub daemon_sleep: u32,
    /// Write-behind limit (0 = none).
    pub write_behind: u32,
    /// Sectors reserved for an external bitmap (unused here).
    pub sectors_reserved: u32,
    /// Number of node slots (version 5 only).
    pub nodes: u32,
    /// Cluster name (version 5 only).
    pub cluster_name: String,
}

impl BitmapSuper {
    /// Parses and validates a bitmap superblock (first 256 bytes of `buf`).
    pub fn parse(buf: &[u8]) -> Result<BitmapSuper, FormatError> {
        if buf.len() < BITMAP_SB_BYTES {
            return Err(FormatError::Truncated {
                what: "bitmap superblock",
                need: BITMAP_SB_BYTES,
                got: buf.len(),
            });
        }
        let magic = le_u32(buf, 0);
        if magic != BITMAP_MAGIC {
            return Err(FormatError::BitmapBadMagic { found: magic });
        }
        let version = le_u32(buf, 4);
        if !(VERSION_MIN..=VERSION_CLUSTERED).contains(&version) {
            return Err(FormatError::BitmapBadVersion { found: version });
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&buf[8..24]);
        let chunksize = le_u32(buf, 52);
        if chunksize < 512 || !chunksize.is_power_of_two() {
            return Err(FormatError::BitmapBadChunk { chunksize });
        }
        let daemon_sleep = le_u32(buf, 56);
        if daemon_sleep == 0 {
            return Err(FormatError::BitmapBadField {
                field: "daemon_sleep",
                value: 0,
            });
        }
        let write_behind = le_u32(buf, 60);
        if write_behind > MAX_WRITE_BEHIND {
            return Err(FormatError::BitmapBadField {
                field: "write_behind",
                value: u64::from(write_behind),
            });
        }
        let nodes = le_u32(buf, 68);
        if version == VERSION_CLUSTERED && nodes == 0 {
            return Err(FormatError::BitmapBadField {
                field: "nodes",
                value: 0,
            });
        }
        Ok(BitmapSuper {
            version,
            uuid,
            events: le_u64(buf, 24),
            events_cleared: le_u64(buf, 32),
            sync_size: le_u64(buf, 40),
            state: le_u32(buf, 48),
            chunksize,
            daemon_sleep,
            write_behind,
            sectors_reserved: le_u32(buf, 64),
            nodes,
            cluster_name: cstr(&buf[72..136]),
        })
    }

    /// Parses and checks that the bitmap belongs to the array `uuid`.
    pub fn parse_for(buf: &[u8], array_uuid: &[u8; 16]) -> Result<BitmapSuper, FormatError> {
        let bm = BitmapSuper::parse(buf)?;
        if &bm.uuid != array_uuid {
            return Err(FormatError::BitmapUuidMismatch {
                bitmap: bm.uuid,
                array: *array_uuid,
            });
        }
        Ok(bm)
    }

    /// Encodes into 256 bytes.
    pub fn encode(&self) -> Result<[u8; BITMAP_SB_BYTES], FormatError> {
        let mut buf = [0u8; BITMAP_SB_BYTES];
        put_u32(&mut buf, 0, BITMAP_MAGIC);
        put_u32(&mut buf, 4, self.version);
        buf[8..24].copy_from_slice(&self.uuid);
        put_u64(&mut buf, 24, self.events);
        put_u64(&mut buf, 32, self.events_cleared);
        put_u64(&mut buf, 40, self.sync_size);
        put_u32(&mut buf, 48, self.state);
        put_u32(&mut buf, 52, self.chunksize);
        put_u32(&mut buf, 56, self.daemon_sleep);
        put_u32(&mut buf, 60, self.write_behind);
        put_u32(&mut buf, 64, self.sectors_reserved);
        put_u32(&mut buf, 68, self.nodes);
        let name: [u8; 64] = fixed_cstr(&self.cluster_name, "cluster name")?;
        if name[63] != 0 {
            return Err(FormatError::NameTooLong {
                what: "cluster name",
                max: CLUSTER_NAME_MAX,
                got: self.cluster_name.len(),
            });
        }
        buf[72..136].copy_from_slice(&name);
        Ok(buf)
    }

    /// True for a clustered (version 5) bitmap.
    pub fn is_clustered(&self) -> bool {
        self.version == VERSION_CLUSTERED
    }

    /// Number of slots on disk: `nodes` for a clustered bitmap, else 1.
    pub fn slots(&self) -> u32 {
        if self.is_clustered() {
            self.nodes.max(1)
        } else {
            1
        }
    }

    /// Sectors of data per bit.
    pub fn chunk_sectors(&self) -> u64 {
        u64::from(self.chunksize) / 512
    }

    /// Number of bits (chunks) the bitmap has.
    pub fn chunks(&self) -> u64 {
        chunks_for(self.sync_size, self.chunksize)
    }

    /// Bytes that hold the bits.
    pub fn bits_bytes(&self) -> u64 {
        self.chunks().div_ceil(8)
    }

    /// Distance between two slots: superblock plus bits, rounded up to 4 KiB.
    pub fn slot_bytes(&self) -> u64 {
        slot_bytes_for(self.sync_size, self.chunksize)
    }

    /// The chunk that contains array sector `sector`.
    pub fn chunk_of(&self, sector: u64) -> u64 {
        sector / self.chunk_sectors()
    }
}

/// Number of bits for `sync_size` sectors at `chunksize` bytes per bit.
pub fn chunks_for(sync_size: u64, chunksize: u32) -> u64 {
    let per = (u64::from(chunksize) / 512).max(1);
    sync_size.div_ceil(per)
}

/// Slot stride for `sync_size` sectors at `chunksize` bytes per bit (the kernel's and
/// mdadm's `roundup(ceil(bits/8) + 256, 4096)`).
pub fn slot_bytes_for(sync_size: u64, chunksize: u32) -> u64 {
    let bytes = chunks_for(sync_size, chunksize).div_ceil(8) + BITMAP_SB_BYTES as u64;
    bytes.div_ceil(SLOT_ALIGN) * SLOT_ALIGN
}

/// Absolute byte offset on a member of slot `slot`'s bitmap superblock (its bits start
/// 256 bytes later).
pub fn slot_offset(sb: &Superblock, bm: &BitmapSuper, slot: u32) -> Result<u64, FormatError> {
    let start = sb.bitmap_start_bytes().ok_or(FormatError::NoBitmap)?;
    u64::from(slot)
        .checked_mul(bm.slot_bytes())
        .and_then(|o| start.checked_add(o))
        .ok_or_else(|| {
            FormatError::BitmapGeometry(format!(
                "slot {slot} of {} bytes past the end of a 64-bit device",
                bm.slot_bytes()
            ))
        })
}

/// Whether bit `i` is set.
pub fn test_bit(bits: &[u8], i: u64) -> bool {
    bits.get((i / 8) as usize)
        .is_some_and(|b| b & (1 << (i % 8)) != 0)
}

/// Sets bit `i` (ignored past the end of `bits`).
pub fn set_bit(bits: &mut [u8], i: u64) {
    if let Some(b) = bits.get_mut((i / 8) as usize) {
        *b |= 1 << (i % 8);
    }
}

/// Clears bit `i` (ignored past the end of `bits`).
pub fn clear_bit(bits: &mut [u8], i: u64) {
    if let Some(b) = bits.get_mut((i / 8) as usize) {
        *b &= !(1 << (i % 8));
    }
}

/// Number of set bits among the first `n` bits (bits past `n` are padding and do not
/// count: mdadm fills them with ones).
pub fn count_set(bits: &[u8], n: u64) -> u64 {
    let full = (n / 8) as usize;
    let mut count: u64 = bits
        .iter()
        .take(full)
        .map(|b| u64::from(b.count_ones()))
        .sum();
    let rem = n % 8;
    if rem > 0 {
        if let Some(b) = bits.get(full) {
            count += u64::from((b & ((1u8 << rem) - 1)).count_ones());
        }
    }
    count
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(version: u32) -> BitmapSuper {
        BitmapSuper {
            version,
            uuid: [3; 16],
            events: 4,
            events_cleared: 2,
            sync_size: 2 * 1024 * 1024, // 1 GiB
            state: 0,
            chunksize: 64 << 20,
            daemon_sleep: 5,
            write_behind: 0,
            sectors_reserved: 0,
            nodes: if version == 5 { 4 } else { 0 },
            cluster_name: if version == 5 {
                "east".into()
            } else {
                String::new()
            },
        }
    }

    #[test]
    fn roundtrip_and_geometry() {
        let bm = sample(5);
        let back = BitmapSuper::parse_for(&bm.encode().unwrap(), &[3; 16]).unwrap();
        assert_eq!(back, bm);
        // docs/MD-FORMAT.md §7: 1 GiB at 64 MiB → 16 bits → stride 8 sectors.
        assert_eq!(bm.chunks(), 16);
        assert_eq!(bm.slot_bytes(), 4096);
        // 10 TiB at 64 MiB → 163840 bits → 20736 B → stride 48 sectors.
        assert_eq!(slot_bytes_for(10 << 31, 64 << 20) / 512, 48);
        assert_eq!(chunks_for(10 << 31, 64 << 20), 163_840);
        assert_eq!(bm.slots(), 4);
        assert_eq!(sample(4).slots(), 1);
    }

    #[test]
    fn errors() {
        let good = sample(4).encode().unwrap();
        assert!(matches!(
            BitmapSuper::parse_for(&good, &[4; 16]),
            Err(FormatError::BitmapUuidMismatch { .. })
        ));
        let mut b = good;
        b[0] = 0;
        assert!(matches!(
            BitmapSuper::parse(&b),
            Err(FormatError::BitmapBadMagic { .. })
        ));
        let mut b = good;
        b[4] = 6;
        assert!(matches!(
            BitmapSuper::parse(&b),
            Err(FormatError::BitmapBadVersion { found: 6 })
        ));
        let mut bm = sample(4);
        bm.chunksize = 1000;
        assert!(matches!(
            BitmapSuper::parse(&bm.encode().unwrap()),
            Err(FormatError::BitmapBadChunk { .. })
        ));
        let mut bm = sample(5);
        bm.cluster_name = "x".repeat(64);
        assert!(bm.encode().is_err());
    }

    #[test]
    fn bits() {
        let mut bits = vec![0u8; 3];
        set_bit(&mut bits, 0);
        set_bit(&mut bits, 9);
        set_bit(&mut bits, 23);
        assert!(test_bit(&bits, 9) && !test_bit(&bits, 8));
        assert_eq!(count_set(&bits, 24), 3);
        assert_eq!(count_set(&bits, 23), 2);
        clear_bit(&mut bits, 9);
        assert_eq!(count_set(&bits, 24), 2);
        // Padding ones past n are not counted.
        assert_eq!(count_set(&[0xfe], 1), 0);
        set_bit(&mut bits, 1000); // out of range: ignored
        assert!(!test_bit(&bits, 1000));
    }
}
