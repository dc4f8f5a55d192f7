//! Positional I/O on a device that other hosts share, without this host's page cache.
//!
//! Every host has its own page cache: a page one host cached is not invalidated when
//! another host writes the block, so a buffered read may return bytes that are no longer
//! on disk, and a buffered partial-block write is a read-modify-write of such a page that
//! writes the stale rest of the block back. [`DirectFile`] therefore opens the device
//! with `O_DIRECT` (as md's `sync_page_io` reads and writes metadata) and does all I/O on
//! spans aligned to the device's **logical block size** ([`DirectFile::block_size`]),
//! from [`ALIGN`]-aligned memory:
//!
//! - a read covering part of a block reads the whole span and hands out the slice;
//! - a write covering part of a block reads the span, patches it and writes it back (a
//!   read-modify-write through the device, never through a cached page). Two such writes
//!   to the same span must not interleave: the caller serialises them (one metadata
//!   writer per device; [`crate::raid::member::MemberIo`] holds a range lock).
//!
//! The logical block size is the smallest write the device takes without a
//! read-modify-write, and the unit other hosts write in: a 512-byte write on a device
//! with 512-byte sectors goes straight down and never rewrites a neighbouring sector
//! another host may be writing. For a block device it is `BLKSSZGET`; for a regular
//! file it is the filesystem's `O_DIRECT` offset alignment (`statx` `STATX_DIOALIGN`),
//! or, where the kernel does not report it, 512 if a 512-byte direct read succeeds and
//! 4096 otherwise.
//!
//! **Fallback.** A device that refuses `O_DIRECT` at `open` (`EINVAL`: filesystems
//! without direct I/O) is opened buffered instead; its I/O goes through the page cache
//! and [`DirectFile::sync`] (`fdatasync`) makes it durable. That is correct for a device
//! one host uses, and wrong for a shared one: a warning says so, once per device.
//!
//! **Fencing.** A device of a clustered array carries the array's
//! [`crate::fence::FenceTicket`] ([`DirectFile::set_fence`]): every `pread`, `pwrite`
//! and `fdatasync` checks it right before the system call, in the calling thread, and
//! fails with [`crate::fence::Fenced`] when the node is fenced (each `pwrite` of a
//! partial write and both halves of a read-modify-write are checked).
//!
//! Every write reports itself to [`crate::iotrace`] after `pwrite` returned, with the
//! bytes as written at that offset (for a read-modify-write, the whole span), and every
//! `fdatasync` reports its start and end.

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;

use crate::fence::{FenceTicket, SyscallGuard};

pub use crate::iobuf::ALIGN;
use crate::iobuf::{aligned_buf, AlignedBuf};
use crate::iotrace;

/// Smallest logical block size of any block device.
pub const SECTOR: u64 = 512;

/// The byte span `[start, end)` of whole `block`-byte blocks covering `len` bytes at
/// `offset`.
pub fn span(offset: u64, len: usize, block: u64) -> (u64, u64) {
    let start = offset / block * block;
    let end = (offset + len as u64).div_ceil(block) * block;
    (start, end)
}

/// Whether `len` bytes at `offset` are whole `block`-byte blocks.
pub fn is_span_aligned(offset: u64, len: usize, block: u64) -> bool {
    offset.is_multiple_of(block) && (len as u64).is_multiple_of(block)
}

/// Whether an I/O of `len` bytes at `offset` from memory at `addr` can go direct as is
/// on a device with `block`-byte logical blocks (memory is always [`ALIGN`]-aligned).
pub fn is_aligned(offset: u64, len: usize, addr: usize, block: u64) -> bool {
    is_span_aligned(offset, len, block) && addr.is_multiple_of(ALIGN)
}

/// The logical block size of an open device (see the module doc): `BLKSSZGET` for a
/// block device, else the `O_DIRECT` offset alignment of the file's filesystem.
pub fn logical_block_size(file: &File, direct: bool) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::FileTypeExt;
    let fd = file.as_raw_fd();
    if file.metadata()?.file_type().is_block_device() {
        let mut size: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int through the pointer, which is valid.
        if unsafe { libc::ioctl(fd, libc::BLKSSZGET, &mut size) } != 0 {
            return Err(io::Error::last_os_error());
        }
        return Ok(u64::try_from(size).unwrap_or(0).max(SECTOR));
    }
    if !direct {
        return Ok(SECTOR);
    }
    // SAFETY: `statx` is plain old data, valid all zero.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: statx fills the struct behind the valid pointer; the path is an empty C
    // string with AT_EMPTY_PATH, which names `fd` itself.
    let r = unsafe {
        libc::statx(
            fd,
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r == 0 && stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align > 0 {
        return Ok(u64::from(stx.stx_dio_offset_align));
    }
    // Not reported: probe with one 512-byte direct read.
    if file_size(file)? >= SECTOR {
        let mut buf = aligned_buf(SECTOR as usize);
        match file.read_at(buf.as_mut(), 0) {
            Ok(_) => return Ok(SECTOR),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(ALIGN as u64)
}

/// Devices already warned about (see the module doc).
static WARNED: Mutex<Option<HashSet<PathBuf>>> = Mutex::new(None);

fn warn_buffered_once(path: &Path) {
    let mut warned = WARNED.lock().unwrap_or_else(|e| e.into_inner());
    if warned
        .get_or_insert_with(HashSet::new)
        .insert(path.to_path_buf())
    {
        tracing::warn!(
            device = %path.display(),
            "the device refuses O_DIRECT: it is opened buffered (this host's page cache, \
             fdatasync for durability) and therefore must not be shared between nodes"
        );
    }
}

/// A device opened for page-cache-free positional I/O (see the module doc).
#[derive(Debug)]
pub struct DirectFile {
    file: File,
    path: Arc<Path>,
    direct: bool,
    size: u64,
    /// Logical block size: the alignment of offsets and lengths of direct I/O.
    block: u64,
    /// The array's pass through the node's fence gate (clustered arrays only).
    fence: OnceLock<FenceTicket>,
}

impl DirectFile {
    /// Opens `path` (read-write if `write`) with `O_DIRECT`, or buffered if the device
    /// refuses `O_DIRECT` (warned once per device).
    pub fn open(path: &Path, write: bool) -> io::Result<DirectFile> {
        match Self::open_mode(path, write, true) {
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                let f = Self::open_mode(path, write, false)?;
                warn_buffered_once(path);
                Ok(f)
            }
            r => r,
        }
    }

    /// Opens with or without `O_DIRECT`, no fallback.
    pub(crate) fn open_mode(path: &Path, write: bool, direct: bool) -> io::Result<DirectFile> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(write);
        if direct {
            opts.custom_flags(libc::O_DIRECT);
        }
        let file = opts.open(path)?;
        let size = file_size(&file)?;
        let block = logical_block_size(&file, direct)?;
        Ok(DirectFile {
            file,
            path: Arc::from(path),
            direct,
            size,
            block,
            fence: OnceLock::new(),
        })
    }

    /// Gates every system call on this device from now on (see the module doc). Set
    /// once: a later call is ignored and returns false.
    pub fn set_fence(&self, ticket: FenceTicket) -> bool {
        self.fence.set(ticket).is_ok()
    }

    /// Whether the device's I/O is gated.
    pub fn is_fenced_io(&self) -> bool {
        self.fence.get().is_some()
    }

    /// The check right before a system call (none for an ungated device).
    fn gate(&self, op: &'static str) -> io::Result<Option<SyscallGuard<'_>>> {
        match self.fence.get() {
            None => Ok(None),
            Some(t) => Ok(Some(t.enter(op, &self.path)?)),
        }
    }

    /// `pwrite` until all of `buf` is written, each call gated.
    fn pwrite_all(&self, mut buf: &[u8], mut offset: u64) -> io::Result<()> {
        while !buf.is_empty() {
            let _g = self.gate("write")?;
            #[cfg(test)]
            test_hook::device_judges_write(&self.path)?;
            match self.file.write_at(buf, offset) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::WriteZero,
                        "failed to write whole buffer",
                    ))
                }
                Ok(n) => {
                    buf = &buf[n..];
                    offset += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// The device's path.
    pub fn path(&self) -> &Arc<Path> {
        &self.path
    }

    /// Whether the device is opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct
    }

    /// The device's size in bytes when it was opened.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The device's logical block size in bytes: direct I/O of whole blocks goes straight
    /// down, anything smaller is a read-modify-write (see the module doc).
    pub fn block_size(&self) -> u64 {
        self.block
    }

    /// Reads `len` bytes at `offset` into an aligned buffer (the whole covering span,
    /// sliced, if the range is not aligned).
    pub fn read_at(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        if len == 0 {
            return Ok(Bytes::new());
        }
        if !self.direct || is_span_aligned(offset, len, self.block) {
            let mut buf = aligned_buf(len);
            let _g = self.gate("read")?;
            self.file.read_exact_at(buf.as_mut(), offset)?;
            return Ok(buf.freeze());
        }
        let (start, end) = span(offset, len, self.block);
        let (buf, filled) = self.read_span(start, end)?;
        let lo = (offset - start) as usize;
        let hi = lo + len;
        if filled < hi {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("read of {len} bytes at byte {offset} ends past the end of the device"),
            ));
        }
        Ok(buf.freeze().slice(lo..hi))
    }

    /// Reads the aligned span `[start, end)` as far as the device reaches; returns the
    /// buffer and how many bytes were read (fewer only at the end of the device).
    fn read_span(&self, start: u64, end: u64) -> io::Result<(AlignedBuf, usize)> {
        let mut buf = aligned_buf((end - start) as usize);
        let mut filled = 0;
        let b = buf.as_mut();
        while filled < b.len() {
            let _g = self.gate("read")?;
            match self.file.read_at(&mut b[filled..], start + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        b[filled..].fill(0);
        Ok((buf, filled))
    }

    /// Writes `data` at `offset` (not durable until [`DirectFile::sync`]). Aligned data
    /// goes straight down; data in unaligned memory is copied to aligned memory first;
    /// a range that is not whole aligned blocks is a read-modify-write of its span. The
    /// caller serialises overlapping writes (see the module doc).
    pub fn write_at(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        if !self.direct || is_aligned(offset, data.len(), data.as_ptr() as usize, self.block) {
            self.pwrite_all(data, offset)?;
            iotrace::on_write(&self.path, offset, data);
            return Ok(());
        }
        if is_span_aligned(offset, data.len(), self.block) {
            let mut buf = aligned_buf(data.len());
            buf.as_mut().copy_from_slice(data);
            self.pwrite_all(buf.as_ref(), offset)?;
            iotrace::on_write(&self.path, offset, buf.as_ref());
            return Ok(());
        }
        let mut block = self.read_covering(offset, data.len())?;
        #[cfg(test)]
        test_hook::between_read_and_write(&self.path);
        block.patch(offset, data);
        self.write_covering(&block)
    }

    /// The first half of a read-modify-write: the span covering `len` bytes at `offset`,
    /// as on the device now (up to the end of the device, in whole sectors, where its
    /// size is not block-aligned).
    pub(crate) fn read_covering(&self, offset: u64, len: usize) -> io::Result<Covering> {
        let (start, mut end) = span(offset, len, self.block);
        if end > self.size {
            end = self.size.max(offset + len as u64).div_ceil(SECTOR) * SECTOR;
        }
        let (buf, _) = self.read_span(start, end)?;
        Ok(Covering { start, buf })
    }

    /// The second half of a read-modify-write: writes the patched span back.
    pub(crate) fn write_covering(&self, block: &Covering) -> io::Result<()> {
        self.pwrite_all(block.buf.as_ref(), block.start)?;
        iotrace::on_write(&self.path, block.start, block.buf.as_ref());
        Ok(())
    }

    /// Makes every completed write durable (`fdatasync`).
    pub fn sync(&self) -> io::Result<()> {
        let _g = self.gate("flush")?;
        let token = iotrace::on_flush_begin(&self.path);
        self.file.sync_data()?;
        iotrace::on_flush_end(&self.path, token);
        Ok(())
    }
}

/// The aligned span around an unaligned write, read from the device
/// ([`DirectFile::read_covering`]).
pub(crate) struct Covering {
    start: u64,
    buf: AlignedBuf,
}

impl Covering {
    /// Copies `data`, meant for byte `offset` of the device, into the span.
    pub(crate) fn patch(&mut self, offset: u64, data: &[u8]) {
        let lo = (offset - self.start) as usize;
        self.buf.as_mut()[lo..lo + data.len()].copy_from_slice(data);
    }
}

/// A pause a test can put between the read and the write of a read-modify-write, to
/// show what another host's write in that gap does.
#[cfg(test)]
pub(crate) mod test_hook {
    use std::path::{Path, PathBuf};
    use std::sync::{Arc, Mutex};

    type Hook = Arc<dyn Fn() + Send + Sync>;

    static HOOKS: Mutex<Vec<(PathBuf, Hook)>> = Mutex::new(Vec::new());

    /// Runs `hook` in every read-modify-write on `path`, between its read and its write.
    pub(crate) fn set(path: &Path, hook: Hook) {
        HOOKS.lock().unwrap().push((path.to_owned(), hook));
    }

    /// Removes the hooks of `path`.
    pub(crate) fn clear(path: &Path) {
        HOOKS.lock().unwrap().retain(|(p, _)| p != path);
        JUDGES.lock().unwrap().retain(|(p, _)| p != path);
    }

    type Judge = Arc<dyn Fn() -> std::io::Result<()> + Send + Sync>;

    static JUDGES: Mutex<Vec<(PathBuf, Judge)>> = Mutex::new(Vec::new());

    /// Lets `judge` answer for the device at `path` before each write system call: an
    /// error is returned as the device's (a reservation conflict, say).
    pub(crate) fn set_judge(path: &Path, judge: Judge) {
        JUDGES.lock().unwrap().push((path.to_owned(), judge));
    }

    pub(super) fn device_judges_write(path: &Path) -> std::io::Result<()> {
        let mine: Vec<Judge> = JUDGES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, j)| j.clone())
            .collect();
        mine.iter().try_for_each(|j| j())
    }

    pub(super) fn between_read_and_write(path: &Path) {
        let mine: Vec<Hook> = HOOKS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(p, _)| p == path)
            .map(|(_, h)| h.clone())
            .collect();
        for hook in mine {
            hook();
        }
    }
}

/// Size of a regular file or block device in bytes.
fn file_size(file: &File) -> io::Result<u64> {
    use std::io::Seek;
    let mut f = file;
    let end = f.seek(io::SeekFrom::End(0))?;
    f.seek(io::SeekFrom::Start(0))?;
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(dir: &Path, bytes: &[u8]) -> PathBuf {
        let p = dir.join("dev");
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn span_math() {
        assert_eq!(span(0, 4096, 4096), (0, 4096));
        assert_eq!(span(0, 1, 4096), (0, 4096));
        assert_eq!(span(4095, 2, 4096), (0, 8192));
        assert_eq!(span(4096, 0, 4096), (4096, 4096));
        assert_eq!(span(8192 + 100, 100, 4096), (8192, 12288));
        assert_eq!(span(8192 + 256, 4096, 4096), (8192, 16384));
        assert_eq!(span(8192 + 600, 100, 512), (8192 + 512, 8192 + 1024));
        assert!(is_span_aligned(8192, 4096, 4096));
        assert!(!is_span_aligned(8192, 512, 4096));
        assert!(is_span_aligned(8192 + 512, 512, 512));
        assert!(!is_span_aligned(512, 4096, 4096));
        assert!(is_aligned(4096, 8192, 4096 * 3, 4096));
        assert!(is_aligned(512, 512, 4096 * 3, 512));
        assert!(!is_aligned(4096, 8192, 4096 * 3 + 8, 512));
    }

    #[test]
    fn unaligned_read_and_read_modify_write() {
        let dir = tempfile::tempdir().unwrap();
        let init: Vec<u8> = (0..64 * 1024).map(|i| (i % 251) as u8).collect();
        let p = file_with(dir.path(), &init);
        let f = DirectFile::open(&p, true).unwrap();
        assert!(f.is_direct(), "ext4/tmpfs take O_DIRECT");
        assert_eq!(f.size(), init.len() as u64);
        // Reads inside one block, across blocks, aligned.
        for (off, len) in [(100, 50), (4000, 300), (8192, 4096), (12_345, 9_000)] {
            let r = f.read_at(off, len).unwrap();
            assert_eq!(
                &r[..],
                &init[off as usize..off as usize + len],
                "{off}+{len}"
            );
        }
        // Unaligned writes patch only their bytes.
        let mut want = init.clone();
        for (off, len, v) in [(100usize, 7usize, 1u8), (4090, 20, 2), (20_000, 5000, 3)] {
            let data = vec![v; len];
            f.write_at(off as u64, &data).unwrap();
            want[off..off + len].copy_from_slice(&data);
        }
        // Aligned range from unaligned memory.
        let mut odd = vec![0u8; 4097];
        odd[1..].fill(9);
        f.write_at(32_768, &odd[1..]).unwrap();
        want[32_768..36_864].fill(9);
        f.sync().unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), want);
        // Past the end fails.
        assert!(f.read_at(init.len() as u64 - 10, 20).is_err());
    }

    #[test]
    fn device_tail_smaller_than_a_block() {
        let dir = tempfile::tempdir().unwrap();
        // 2.5 blocks: the last span is 2048 bytes, 4 sectors.
        let p = file_with(dir.path(), &vec![5u8; 10_240]);
        let f = DirectFile::open(&p, true).unwrap();
        f.write_at(9000, b"tail").unwrap();
        assert_eq!(
            &f.read_at(8990, 20).unwrap()[..],
            b"\x05\x05\x05\x05\x05\x05\x05\x05\x05\x05tail\x05\x05\x05\x05\x05\x05"
        );
        let all = std::fs::read(&p).unwrap();
        assert_eq!(all.len(), 10_240, "the write did not grow the file");
        assert_eq!(&all[9000..9004], b"tail");
    }

    #[test]
    fn buffered_mode_reads_and_writes_the_same() {
        let dir = tempfile::tempdir().unwrap();
        let p = file_with(dir.path(), &[0u8; 16_384]);
        let f = DirectFile::open_mode(&p, true, false).unwrap();
        assert!(!f.is_direct());
        f.write_at(10, b"abc").unwrap();
        f.sync().unwrap();
        assert_eq!(&f.read_at(9, 5).unwrap()[..], b"\0abc\0");
        assert_eq!(&std::fs::read(&p).unwrap()[10..13], b"abc");
    }

    #[test]
    fn read_only_open_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = file_with(dir.path(), &[0u8; 8192]);
        let f = DirectFile::open(&p, false).unwrap();
        assert!(f.write_at(0, &[1u8; 10]).is_err());
    }
}
