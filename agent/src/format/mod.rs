//! The md v1.2 on-disk format, byte-compatible with Linux md and mdadm.
//!
//! # Layout
//! - [`superblock`]: `struct mdp_superblock_1` — parse, validate, encode, checksum,
//!   device roles, feature bits.
//! - [`bitmap`]: `bitmap_super_t` (version 4 internal, 5 clustered), slot stride, bits.
//! - [`create`]: the layout of a new array's members (what `mdadm --create` writes),
//!   computed without I/O.
//! - [`examine`]: the facts of `mdadm --examine` / `--examine-bitmap` as data, and
//!   their text rendering.
//! - [`io`]: the only part that touches devices: reading a member, writing superblocks
//!   and bitmap slots, zeroing.
//! - [`slots`]: the clustered bitmap slots of other nodes across the members (union,
//!   clear, resize, merge, dirty count), over [`io`].
//!
//! Everything but [`io`] and [`slots`] is pure code over byte buffers, so it is tested
//! (and fuzzed) without disks. Facts and offsets: `docs/MD-FORMAT.md`.

pub mod bitmap;
pub mod create;
pub mod examine;
pub mod io;
pub mod rebitmap;
pub mod slots;
pub mod superblock;

/// Bytes per sector: every size in the superblock counts 512-byte sectors.
pub const SECTOR: u64 = 512;
/// Where a v1.2 superblock lives: 4 KiB from the start of the member.
pub const SB_OFFSET_BYTES: u64 = 4096;
/// The same, in sectors (`super_offset` of every v1.2 member).
pub const SB_OFFSET_SECTORS: u64 = SB_OFFSET_BYTES / SECTOR;

/// Every way a member's metadata can be wrong or a request for a new array invalid.
///
/// Messages say what is wrong; the device path is added by [`io::DeviceError`].
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum FormatError {
    /// The superblock area is all zeros.
    #[error("no md superblock found (the 4 KiB at offset 4096 are blank)")]
    NoSuperblock,
    /// The magic number is not `0xa92b4efc`.
    #[error("no md superblock found: bad magic {found:#010x} (expected 0xa92b4efc)")]
    BadMagic {
        /// What was read.
        found: u32,
    },
    /// `major_version` is not 1.
    #[error("unsupported superblock major version {found} (only 1.x is supported)")]
    BadVersion {
        /// What was read.
        found: u32,
    },
    /// `max_dev` is larger than fits in 4 KiB.
    #[error("invalid max_dev {found} (at most 1920)")]
    BadMaxDev {
        /// What was read.
        found: u32,
    },
    /// The checksum does not match the contents.
    #[error("superblock checksum mismatch: stored {stored:#x}, computed {computed:#x}; the superblock is corrupt")]
    BadChecksum {
        /// `sb_csum` as stored.
        stored: u32,
        /// `sb_csum` as computed from the contents.
        computed: u32,
    },
    /// Feature bits Linux md does not know.
    #[error("unknown feature bits {bits:#x} in feature_map; written by a newer md?")]
    UnknownFeatures {
        /// The unknown bits.
        bits: u32,
    },
    /// Features this implementation cannot run (but knows).
    #[error("unsupported features {bits:#x} ({names}) in feature_map")]
    UnsupportedFeatures {
        /// The unsupported bits.
        bits: u32,
        /// Their names.
        names: String,
    },
    /// `pad0` or `pad3` is not zero.
    #[error("reserved superblock padding is not zero")]
    NonZeroPadding,
    /// The buffer is shorter than the structure.
    #[error("{what} truncated: need {need} bytes, got {got}")]
    Truncated {
        /// Which structure.
        what: &'static str,
        /// Bytes needed.
        need: usize,
        /// Bytes present.
        got: usize,
    },
    /// `data_size` below the kernel's minimum of 10 sectors.
    #[error("data_size {data_size} sectors is below the minimum of 10")]
    DataTooSmall {
        /// What was read.
        data_size: u64,
    },
    /// The data area starts inside the superblock.
    #[error("data_offset {data_offset} lies inside the superblock at sector {super_offset}")]
    DataOverlapsSuperblock {
        /// What was read.
        data_offset: u64,
        /// What was read.
        super_offset: u64,
    },
    /// The used size is larger than the data area.
    #[error("used size {size} sectors exceeds the data area of {data_size} sectors")]
    SizeExceedsData {
        /// `size`.
        size: u64,
        /// `data_size`.
        data_size: u64,
    },
    /// The bitmap's geometry (slots × slot size) does not fit where it must lie.
    #[error("bitmap geometry out of range: {0}")]
    BitmapGeometry(String),
    /// The bitmap does not lie between superblock and data.
    #[error("bitmap_offset {bitmap_offset} does not fit between the superblock and data_offset {data_offset}")]
    BitmapOffsetOutOfRange {
        /// What was read.
        bitmap_offset: i32,
        /// What was read.
        data_offset: u64,
    },
    /// The data area runs past the end of the device.
    #[error("data area (offset {data_offset}, {data_size} sectors) runs past the end of the device ({device_sectors} sectors)")]
    BeyondDevice {
        /// `data_offset`.
        data_offset: u64,
        /// `data_size`.
        data_size: u64,
        /// Device size in sectors.
        device_sectors: u64,
    },
    /// The device is too small for what is asked.
    #[error("device too small: {device_bytes} bytes, need at least {need_bytes}")]
    DeviceTooSmall {
        /// Device size.
        device_bytes: u64,
        /// Size needed.
        need_bytes: u64,
    },
    /// No bitmap recorded, but one was asked for.
    #[error("the member has no write-intent bitmap")]
    NoBitmap,
    /// Bitmap magic wrong.
    #[error("bad bitmap magic {found:#010x} (expected 0x6d746962 \"bitm\")")]
    BitmapBadMagic {
        /// What was read.
        found: u32,
    },
    /// Bitmap version outside 3..=5.
    #[error("unknown bitmap version {found} (supported: 3, 4, 5)")]
    BitmapBadVersion {
        /// What was read.
        found: u32,
    },
    /// Bitmap chunk size not a power of two ≥ 512.
    #[error("invalid bitmap chunk size {chunksize} bytes (a power of two, at least 512)")]
    BitmapBadChunk {
        /// What was read.
        chunksize: u32,
    },
    /// Another bitmap field out of range.
    #[error("invalid bitmap {field} {value}")]
    BitmapBadField {
        /// Field name.
        field: &'static str,
        /// What was read.
        value: u64,
    },
    /// The bitmap belongs to another array.
    #[error("bitmap UUID {} does not match array UUID {}", fmt_uuid(.bitmap), fmt_uuid(.array))]
    BitmapUuidMismatch {
        /// UUID in the bitmap.
        bitmap: [u8; 16],
        /// UUID of the array.
        array: [u8; 16],
    },
    /// A name does not fit its field.
    #[error("{what} is {got} bytes long; at most {max} fit")]
    NameTooLong {
        /// Which name.
        what: &'static str,
        /// Limit.
        max: usize,
        /// Actual length.
        got: usize,
    },
    /// A creation parameter is invalid.
    #[error("{0}")]
    InvalidSpec(String),
}

/// Formats a UUID the way mdadm does: `xxxxxxxx:xxxxxxxx:xxxxxxxx:xxxxxxxx`.
pub fn fmt_uuid(u: &[u8; 16]) -> String {
    let hex: Vec<String> = u
        .chunks(4)
        .map(|c| c.iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    hex.join(":")
}

/// Parses a UUID written as 32 hex digits with any of `:`, `-` as separators.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    let hex: String = s.chars().filter(|c| *c != ':' && *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    let mut out = [0u8; 16];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

pub(crate) fn le_u16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
pub(crate) fn le_u32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
pub(crate) fn le_i32(b: &[u8], off: usize) -> i32 {
    le_u32(b, off) as i32
}
pub(crate) fn le_u64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_le_bytes(a)
}
pub(crate) fn put_u16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_u32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}
pub(crate) fn put_i32(b: &mut [u8], off: usize, v: i32) {
    put_u32(b, off, v as u32);
}
pub(crate) fn put_u64(b: &mut [u8], off: usize, v: u64) {
    b[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

/// A NUL-padded byte field as text (up to the first NUL).
pub(crate) fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Text into a NUL-padded fixed field; refuses text longer than the field.
pub(crate) fn fixed_cstr<const N: usize>(
    s: &str,
    what: &'static str,
) -> Result<[u8; N], FormatError> {
    if s.len() > N {
        return Err(FormatError::NameTooLong {
            what,
            max: N,
            got: s.len(),
        });
    }
    let mut out = [0u8; N];
    out[..s.len()].copy_from_slice(s.as_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_text() {
        let u = [
            0xe9, 0x49, 0xd4, 0x84, 0xe1, 0x47, 0xbe, 0xef, 0x6f, 0xf3, 0x27, 0xb4, 0x5d, 0x32,
            0x5e, 0xb9,
        ];
        assert_eq!(fmt_uuid(&u), "e949d484:e147beef:6ff327b4:5d325eb9");
        assert_eq!(parse_uuid("e949d484:e147beef:6ff327b4:5d325eb9"), Some(u));
        assert_eq!(parse_uuid("e949d484-e147-beef-6ff3-27b45d325eb9"), Some(u));
        assert_eq!(parse_uuid("e949d484"), None);
        assert_eq!(parse_uuid("zz49d484:e147beef:6ff327b4:5d325eb9"), None);
    }
}
