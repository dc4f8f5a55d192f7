//! Device I/O for the on-disk format: read and validate a member, write superblocks and
//! bitmap slots, create a new array's members, zero a superblock.
//!
//! The only module of [`crate::format`] that touches files or block devices. Every error
//! names the device.
//!
//! Superblocks and bitmap slots are shared between the nodes, and each host has its own
//! page cache: every read and write here goes through a [`MetaDev`], which opens the
//! device with `O_DIRECT` and does all I/O on spans of the device's logical blocks from
//! aligned memory (a partial block is read whole and sliced, or read, patched and
//! written back), like
//! md's `sync_page_io`; see [`crate::directio`]. A device that refuses `O_DIRECT` at
//! open (`EINVAL`) is opened buffered instead, every write followed by `fdatasync`, with
//! a warning (once per device) that it must not be shared between nodes.
//!
//! [`read_member_bounded`] bounds a read by a timeout, for the re-reads done during
//! cluster rounds, where a dead path must not stall the round.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};

use bytes::Bytes;
use mdcluster_proto::v1::Errno;

use super::bitmap::{slot_offset, BitmapSuper, BITMAP_SB_BYTES};
use super::create::{plan, CreateSpec, MemberImage};
use super::superblock::{Superblock, SB_BLOCK_BYTES};
use super::{FormatError, SB_OFFSET_BYTES, SECTOR};
use std::collections::HashSet;
use std::sync::Mutex;

use crate::directio::DirectFile;

/// An error reading or writing a member, naming the device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// Opening failed.
    #[error("cannot open {}: {source}", path.display())]
    Open {
        /// The device.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Reading, writing or syncing failed.
    #[error("cannot {op} {} at byte {offset}: {source}", path.display())]
    Io {
        /// The device.
        path: PathBuf,
        /// "read", "write" or "sync".
        op: &'static str,
        /// Byte offset of the operation.
        offset: u64,
        /// The OS error.
        source: std::io::Error,
    },
    /// The metadata on the device is invalid.
    #[error("{}: {source}", path.display())]
    Format {
        /// The device.
        path: PathBuf,
        /// What is wrong.
        source: FormatError,
    },
    /// A metadata read did not return in time (or an earlier one still has not): the
    /// device does not answer.
    #[error("reading the metadata of {} did not finish within {timeout:?}: the device does not answer (a dead path: check its multipath/SCSI state, or fail the member)", path.display())]
    Unresponsive {
        /// The device.
        path: PathBuf,
        /// How long the read was given.
        timeout: std::time::Duration,
    },
    /// The device already belongs to an array and `force` was not given.
    #[error("{} already holds a member of array {uuid} ({name}); if it is really unused, run `mdctl zero-superblock {}` first or create with --force", path.display(), path.display())]
    InUse {
        /// The device.
        path: PathBuf,
        /// UUID of the array found.
        uuid: String,
        /// Name of the array found.
        name: String,
    },
    /// One device given twice (the same path, or two paths to one device).
    #[error("{} and {} are the same device; give each member once", a.display(), b.display())]
    Duplicate {
        /// The first path.
        a: PathBuf,
        /// The second path.
        b: PathBuf,
    },
}

impl DeviceError {
    /// The errno of the error: a device that is missing ENOENT, not permitted EPERM,
    /// busy (a member of another array) EBUSY, not answering ETIMEDOUT; a device given
    /// twice or metadata that does not fit the request EINVAL; other I/O EIO.
    pub fn errno(&self) -> Errno {
        match self {
            DeviceError::Open { source, .. } => match source.kind() {
                std::io::ErrorKind::NotFound => Errno::Enoent,
                std::io::ErrorKind::PermissionDenied => Errno::Eperm,
                _ => Errno::Eio,
            },
            DeviceError::InUse { .. } => Errno::Ebusy,
            DeviceError::Duplicate { .. } => Errno::Einval,
            // No superblock, a corrupt one, or a spec the format refuses: the request
            // does not fit the devices.
            DeviceError::Format { .. } => Errno::Einval,
            DeviceError::Io { .. } => Errno::Eio,
            DeviceError::Unresponsive { .. } => Errno::Etimedout,
        }
    }
}

/// What makes a device one device: the device number of a block device, the
/// filesystem and inode of anything else (symlinks followed).
pub fn device_identity(path: &Path) -> Result<(u64, u64), DeviceError> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let m = std::fs::metadata(path).map_err(|source| DeviceError::Open {
        path: path.to_owned(),
        source,
    })?;
    Ok(if m.file_type().is_block_device() {
        (u64::MAX, m.rdev())
    } else {
        (m.dev(), m.ino())
    })
}

/// Refuses a device given twice in `paths` (before anything is opened for writing).
pub fn check_distinct(paths: &[PathBuf]) -> Result<(), DeviceError> {
    let mut seen: Vec<((u64, u64), &PathBuf)> = Vec::with_capacity(paths.len());
    for p in paths {
        let id = device_identity(p)?;
        if let Some((_, first)) = seen.iter().find(|(i, _)| *i == id) {
            return Err(DeviceError::Duplicate {
                a: (*first).clone(),
                b: p.clone(),
            });
        }
        seen.push((id, p));
    }
    Ok(())
}

impl DeviceError {
    /// The format error behind this error, if that is what it is.
    pub fn format_error(&self) -> Option<&FormatError> {
        match self {
            DeviceError::Format { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// One bitmap slot as read from a member.
#[derive(Debug, Clone)]
pub struct BitmapSlot {
    /// Absolute byte offset of the slot's bitmap superblock.
    pub offset: u64,
    /// The slot's bitmap superblock.
    pub sb: BitmapSuper,
    /// The slot's bits (`bits_bytes` long).
    pub bits: Vec<u8>,
}

/// A member read from a device and validated.
#[derive(Debug, Clone)]
pub struct Member {
    /// The device.
    pub path: PathBuf,
    /// Size of the device in bytes.
    pub device_bytes: u64,
    /// Its superblock.
    pub sb: Superblock,
    /// Its bitmap slots (one for internal, `nodes` for clustered; empty without bitmap).
    pub bitmap: Vec<BitmapSlot>,
}

/// Size in bytes of a regular file or block device.
pub fn device_size(file: &File) -> std::io::Result<u64> {
    let mut f = file;
    f.seek(SeekFrom::End(0))
}

/// A member device opened for metadata I/O without the page cache (see the module
/// doc): the only way this module reads or writes a device.
#[derive(Debug)]
pub struct MetaDev {
    io: DirectFile,
}

impl MetaDev {
    /// Opens `path` (read-write if `write`) with `O_DIRECT`, buffered only if the device
    /// refuses it.
    pub fn open(path: &Path, write: bool) -> Result<MetaDev, DeviceError> {
        let io = DirectFile::open(path, write).map_err(|source| DeviceError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(MetaDev { io })
    }

    /// [`MetaDev::open`], every system call gated by `fence` (a clustered array's
    /// superblock and bitmap writes outside the engine: join, takeover; see
    /// [`crate::fence`]).
    pub fn open_fenced(
        path: &Path,
        write: bool,
        fence: Option<crate::fence::FenceTicket>,
    ) -> Result<MetaDev, DeviceError> {
        let dev = MetaDev::open(path, write)?;
        if let Some(t) = fence {
            dev.io.set_fence(t);
        }
        Ok(dev)
    }

    /// The device.
    pub fn path(&self) -> &Path {
        self.io.path()
    }

    /// Size of the device in bytes.
    pub fn size(&self) -> u64 {
        self.io.size()
    }

    /// Whether the device is opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.io.is_direct()
    }

    fn io_err(
        &self,
        op: &'static str,
        offset: u64,
    ) -> impl FnOnce(std::io::Error) -> DeviceError + '_ {
        move |source| DeviceError::Io {
            path: self.path().to_path_buf(),
            op,
            offset,
            source,
        }
    }

    /// Reads `len` bytes at byte `offset`.
    pub fn read_at(&self, offset: u64, len: usize) -> Result<Bytes, DeviceError> {
        self.io
            .read_at(offset, len)
            .map_err(self.io_err("read", offset))
    }

    /// Writes `data` at byte `offset` (not durable until [`MetaDev::sync`]).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.io
            .write_at(offset, data)
            .map_err(self.io_err("write", offset))
    }

    /// Makes every completed write durable (`fdatasync`).
    pub fn sync(&self) -> Result<(), DeviceError> {
        self.io.sync().map_err(self.io_err("sync", 0))
    }
}

fn format_err(path: &Path) -> impl FnOnce(FormatError) -> DeviceError + '_ {
    move |source| DeviceError::Format {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads and validates the superblock and bitmap of the member at `path`.
pub fn read_member(path: &Path) -> Result<Member, DeviceError> {
    let dev = MetaDev::open(path, false)?;
    read_member_from(&dev)
}

/// How long one metadata read of a member ([`read_member_bounded`]) may take before
/// the member counts as not answering.
pub const META_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Members with a [`read_member_bounded`] read still blocked in the kernel.
static READS_IN_FLIGHT: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

fn in_flight() -> std::sync::MutexGuard<'static, Option<HashSet<PathBuf>>> {
    READS_IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner())
}

/// [`read_member`] bounded by `timeout`: the read runs on its own thread, and if it has
/// not returned in time this fails with [`DeviceError::Unresponsive`] naming the
/// device (the thread stays blocked in the kernel until the device answers). While it
/// is blocked, further reads of that device fail at once, so a dead device holds at
/// most one thread.
pub fn read_member_bounded(
    path: &Path,
    timeout: std::time::Duration,
) -> Result<Member, DeviceError> {
    let unresponsive = || DeviceError::Unresponsive {
        path: path.to_owned(),
        timeout,
    };
    if !in_flight()
        .get_or_insert_with(HashSet::new)
        .insert(path.to_owned())
    {
        return Err(unresponsive());
    }
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let p = path.to_owned();
    let spawned = std::thread::Builder::new()
        .name("md-meta-read".into())
        .spawn(move || {
            let r = read_member(&p);
            if let Some(set) = in_flight().as_mut() {
                set.remove(&p);
            }
            // The caller may have given up; then nobody receives.
            let _ = tx.send(r);
        });
    if let Err(source) = spawned {
        if let Some(set) = in_flight().as_mut() {
            set.remove(path);
        }
        return Err(DeviceError::Open {
            path: path.to_owned(),
            source,
        });
    }
    rx.recv_timeout(timeout).map_err(|_| unresponsive())?
}

/// Like [`read_member`], on an already open device.
pub fn read_member_from(dev: &MetaDev) -> Result<Member, DeviceError> {
    let path = dev.path();
    let device_bytes = dev.size();
    let need = SB_OFFSET_BYTES + SB_BLOCK_BYTES as u64;
    if device_bytes < need {
        return Err(format_err(path)(FormatError::DeviceTooSmall {
            device_bytes,
            need_bytes: need,
        }));
    }
    let block = dev.read_at(SB_OFFSET_BYTES, SB_BLOCK_BYTES)?;
    let sb = Superblock::parse(&block).map_err(format_err(path))?;
    if sb.super_offset != SB_OFFSET_BYTES / SECTOR {
        return Err(format_err(path)(FormatError::InvalidSpec(format!(
            "super_offset {} does not match the v1.2 location (sector 8); not a 1.2 member",
            sb.super_offset
        ))));
    }
    sb.validate_device(device_bytes / SECTOR)
        .map_err(format_err(path))?;
    let bitmap = read_bitmap(dev, &sb, device_bytes)?;
    Ok(Member {
        path: path.to_path_buf(),
        device_bytes,
        sb,
        bitmap,
    })
}

/// Largest bitmap area (all slots) read from a member. The area lies between the
/// superblock and the data, where mdadm and this project reserve at most a few MiB; a
/// larger one is a crafted or corrupt header, refused before a buffer is sized by it.
pub const MAX_BITMAP_AREA: u64 = 256 << 20;

fn read_bitmap(
    dev: &MetaDev,
    sb: &Superblock,
    device_bytes: u64,
) -> Result<Vec<BitmapSlot>, DeviceError> {
    let path = dev.path();
    let Some(start) = sb.bitmap_start_bytes() else {
        return Ok(Vec::new());
    };
    let first = dev.read_at(start, BITMAP_SB_BYTES)?;
    let bm0 = BitmapSuper::parse_for(&first, &sb.set_uuid).map_err(format_err(path))?;
    if bm0.is_clustered() != sb.is_clustered() {
        return Err(format_err(path)(FormatError::InvalidSpec(format!(
            "bitmap version {} does not match the superblock's clustered flag ({})",
            bm0.version,
            sb.is_clustered()
        ))));
    }
    // All slots must lie before the data (or before the end of the device), and on
    // the device: every number here comes from the disk, so the arithmetic is checked
    // and the read is bounded before it sizes a buffer.
    let geometry = |why: String| format_err(path)(FormatError::BitmapGeometry(why));
    let limit = if sb.data_offset > sb.super_offset {
        sb.data_offset
            .checked_mul(SECTOR)
            .ok_or_else(|| geometry(format!("data_offset {} sectors", sb.data_offset)))?
            .min(device_bytes)
    } else {
        device_bytes
    };
    let area = u64::from(bm0.slots())
        .checked_mul(bm0.slot_bytes())
        .filter(|a| *a <= MAX_BITMAP_AREA)
        .ok_or_else(|| {
            geometry(format!(
                "{} slots of {} bytes (sync_size {} sectors, chunk {} bytes) exceed {MAX_BITMAP_AREA} bytes",
                bm0.slots(),
                bm0.slot_bytes(),
                bm0.sync_size,
                bm0.chunksize
            ))
        })?;
    let end = start
        .checked_add(area)
        .filter(|e| *e <= limit)
        .ok_or(format_err(path)(FormatError::BitmapOffsetOutOfRange {
            bitmap_offset: sb.bitmap_offset,
            data_offset: sb.data_offset,
        }))?;
    // Every slot in one read.
    let all = dev.read_at(start, (end - start) as usize)?;
    let mut slots = Vec::with_capacity(bm0.slots() as usize);
    for slot in 0..bm0.slots() {
        let offset = slot_offset(sb, &bm0, slot).map_err(format_err(path))?;
        let at = (offset - start) as usize;
        let raw = &all[at..at + BITMAP_SB_BYTES + bm0.bits_bytes() as usize];
        let bsb = BitmapSuper::parse_for(raw, &sb.set_uuid).map_err(format_err(path))?;
        slots.push(BitmapSlot {
            offset,
            sb: bsb,
            bits: raw[BITMAP_SB_BYTES..].to_vec(),
        });
    }
    Ok(slots)
}

/// Writes `sb` at the v1.2 superblock location and syncs.
pub fn write_superblock(dev: &MetaDev, sb: &Superblock) -> Result<(), DeviceError> {
    dev.write_at(sb.super_offset * SECTOR, &sb.encode())?;
    dev.sync()
}

/// Writes one bitmap slot (superblock and bits) and syncs.
pub fn write_bitmap_slot(
    dev: &MetaDev,
    sb: &Superblock,
    slot: u32,
    bm: &BitmapSuper,
    bits: &[u8],
) -> Result<(), DeviceError> {
    let path = dev.path();
    let offset = slot_offset(sb, bm, slot).map_err(format_err(path))?;
    let mut block = Vec::with_capacity(BITMAP_SB_BYTES + bits.len());
    block.extend_from_slice(&bm.encode().map_err(format_err(path))?);
    block.extend_from_slice(bits);
    dev.write_at(offset, &block)?;
    dev.sync()
}

/// Writes a new array's members like `mdadm --create`: a superblock on each device and
/// every bitmap slot. Refuses a device that already holds a member unless `force`.
/// The devices are checked and sized before anything is written.
pub fn create_members(
    spec: &CreateSpec,
    paths: &[PathBuf],
    force: bool,
) -> Result<Vec<MemberImage>, DeviceError> {
    // Before anything is written: each device once.
    check_distinct(paths)?;
    let mut devs = Vec::with_capacity(paths.len());
    let mut sizes = Vec::with_capacity(paths.len());
    for path in paths {
        let dev = MetaDev::open(path, true)?;
        let size = dev.size();
        if !force {
            if let Ok(existing) = read_member_from(&dev) {
                return Err(DeviceError::InUse {
                    path: path.clone(),
                    uuid: super::fmt_uuid(&existing.sb.set_uuid),
                    name: existing.sb.name(),
                });
            }
        }
        devs.push(dev);
        sizes.push(size);
    }
    let first = paths
        .first()
        .map(PathBuf::as_path)
        .unwrap_or(Path::new("(no device)"));
    let images = plan(spec, &sizes).map_err(format_err(first))?;
    for (dev, image) in devs.iter().zip(&images) {
        for (offset, data) in image.writes().map_err(format_err(dev.path()))? {
            dev.write_at(offset, &data)?;
        }
        dev.sync()?;
    }
    Ok(images)
}

/// Erases the md superblock of `path` (the 4 KiB at the v1.2 location), like
/// `mdadm --zero-superblock`. Fails if there is no valid superblock unless `force`.
pub fn zero_superblock(path: &Path, force: bool) -> Result<(), DeviceError> {
    let dev = MetaDev::open(path, true)?;
    if !force {
        read_member_from(&dev)?;
    }
    dev.write_at(SB_OFFSET_BYTES, &[0u8; SB_BLOCK_BYTES])?;
    dev.sync()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::create::BitmapMode;
    use crate::format::superblock::DevRole;
    use std::fs::OpenOptions;
    use std::os::unix::fs::FileExt;

    fn file_of(dir: &Path, name: &str, bytes: u64) -> PathBuf {
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        f.set_len(bytes).unwrap();
        p
    }

    #[test]
    fn create_read_zero() {
        let dir = tempfile::tempdir().unwrap();
        let a = file_of(dir.path(), "a", 32 << 20);
        let b = file_of(dir.path(), "b", 32 << 20);
        let mut spec = CreateSpec::new("host:md0", 2, 0, BitmapMode::Clustered);
        spec.cluster_name = "c1".into();
        spec.nodes = Some(2);
        create_members(&spec, &[a.clone(), b.clone()], false).unwrap();
        let m = read_member(&b).unwrap();
        assert_eq!(m.sb.role(), DevRole::Active(1));
        assert_eq!(m.bitmap.len(), 2);
        assert_eq!(m.bitmap[1].sb.cluster_name, "c1");
        // A second create on the same devices is refused without force.
        let err = create_members(&spec, &[a.clone(), b.clone()], false).unwrap_err();
        assert!(matches!(err, DeviceError::InUse { .. }), "{err}");
        zero_superblock(&a, false).unwrap();
        let err = read_member(&a).unwrap_err();
        assert_eq!(err.format_error(), Some(&FormatError::NoSuperblock));
        assert!(zero_superblock(&a, false).is_err());
    }

    /// One device given twice, by the same path or through a symlink: refused before
    /// anything is written.
    #[test]
    fn a_device_given_twice_is_refused_before_writing() {
        let dir = tempfile::tempdir().unwrap();
        let a = file_of(dir.path(), "a", 32 << 20);
        let b = file_of(dir.path(), "b", 32 << 20);
        let link = dir.path().join("b-link");
        std::os::unix::fs::symlink(&b, &link).unwrap();
        let spec = CreateSpec::new("host:md9", 2, 0, BitmapMode::Internal);
        for pair in [[b.clone(), b.clone()], [b.clone(), link.clone()]] {
            let err = create_members(&spec, &pair, true).unwrap_err();
            assert!(matches!(err, DeviceError::Duplicate { .. }), "{err}");
            assert!(err.to_string().contains("same device"), "{err}");
        }
        // Nothing was written to b.
        let e = read_member(&b).unwrap_err();
        assert_eq!(e.format_error(), Some(&FormatError::NoSuperblock));
        assert!(create_members(&spec, &[a, b], false).is_ok());
    }

    /// A FIFO with no writer: opening it for reading blocks in the kernel, as a read of
    /// a device with a dead path does.
    #[test]
    fn a_member_that_does_not_answer_times_out_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("dead-path");
        let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid C string; mkfifo only creates the node.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let t = std::time::Instant::now();
        let e = read_member_bounded(&fifo, std::time::Duration::from_millis(300)).unwrap_err();
        assert!(matches!(e, DeviceError::Unresponsive { .. }), "{e}");
        assert!(e.to_string().contains("dead-path"), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(5));
        // The first read is still blocked: the next one fails at once.
        let t = std::time::Instant::now();
        let e = read_member_bounded(&fifo, std::time::Duration::from_secs(30)).unwrap_err();
        assert!(matches!(e, DeviceError::Unresponsive { .. }), "{e}");
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
        // A writer unblocks the open; the read then fails (a FIFO is no member) and the
        // device may be read again.
        let w = OpenOptions::new().write(true).open(&fifo).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while in_flight().as_ref().is_some_and(|s| s.contains(&fifo)) {
            assert!(
                std::time::Instant::now() < deadline,
                "the blocked read never ended"
            );
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        drop(w);
        let a = file_of(dir.path(), "a", 32 << 20);
        let b = file_of(dir.path(), "b", 32 << 20);
        let spec = CreateSpec::new("host:md0", 2, 0, BitmapMode::None);
        create_members(&spec, &[a.clone(), b], false).unwrap();
        let m = read_member_bounded(&a, META_READ_TIMEOUT).unwrap();
        assert_eq!(m.sb.raid_disks, 2);
    }

    #[test]
    fn bitmap_uuid_mismatch_detected() {
        let dir = tempfile::tempdir().unwrap();
        let a = file_of(dir.path(), "a", 16 << 20);
        let spec = CreateSpec::new("h:x", 1, 0, BitmapMode::Internal);
        create_members(&spec, std::slice::from_ref(&a), false).unwrap();
        let f = OpenOptions::new().write(true).open(&a).unwrap();
        f.write_all_at(&[0xaa; 16], 8192 + 8).unwrap();
        let err = read_member(&a).unwrap_err();
        assert!(
            matches!(
                err.format_error(),
                Some(FormatError::BitmapUuidMismatch { .. })
            ),
            "{err}"
        );
    }

    #[test]
    fn truncated_device_detected() {
        let dir = tempfile::tempdir().unwrap();
        let a = file_of(dir.path(), "a", 16 << 20);
        let spec = CreateSpec::new("h:x", 1, 0, BitmapMode::None);
        create_members(&spec, std::slice::from_ref(&a), false).unwrap();
        File::options()
            .write(true)
            .open(&a)
            .unwrap()
            .set_len(8 << 20)
            .unwrap();
        let err = read_member(&a).unwrap_err();
        assert!(
            matches!(err.format_error(), Some(FormatError::BeyondDevice { .. })),
            "{err}"
        );
        File::options()
            .write(true)
            .open(&a)
            .unwrap()
            .set_len(6000)
            .unwrap();
        let err = read_member(&a).unwrap_err();
        assert!(
            matches!(err.format_error(), Some(FormatError::DeviceTooSmall { .. })),
            "{err}"
        );
    }
}
