//! The block-device interface between the NBD export and whatever serves the blocks
//! (the RAID engine; a plain file in tests).
//!
//! Methods return boxed futures so that the trait stays object-safe
//! (`Arc<dyn BlockDevice>`): the NBD server does not know what kind of array it serves.

use std::future::Future;
use std::io;
use std::pin::Pin;

use bytes::Bytes;

/// A boxed, sendable future of an I/O result.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = io::Result<T>> + Send + 'a>>;

/// A random-access block device of fixed size, addressed in bytes.
///
/// Callers never pass a range that ends past [`BlockDevice::size`]; implementations may
/// still check and answer `InvalidInput`.
pub trait BlockDevice: Send + Sync {
    /// Size of the device in bytes.
    fn size(&self) -> u64;
    /// The smallest write, in bytes, that the device takes without a read-modify-write
    /// (a power of two); offsets and lengths that are multiples of it go straight down.
    /// Advertised to NBD clients as the minimum block size.
    fn block_size(&self) -> u32 {
        1
    }
    /// Reads `len` bytes at `offset`.
    fn read(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes>;
    /// Writes `data` at `offset`; with `fua` the data is durable when the future completes.
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()>;
    /// Makes every completed write durable.
    fn flush(&self) -> IoFuture<'_, ()>;
    /// Discards `len` bytes at `offset` (a hint: the data may read back unchanged or zero).
    fn trim(&self, offset: u64, len: u32) -> IoFuture<'_, ()>;
    /// Writes `len` zero bytes at `offset`.
    fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> IoFuture<'_, ()>;
}

/// A plain file (or block device node) served as a [`BlockDevice`]: positional I/O on
/// tokio's blocking pool, `fdatasync` for flush and FUA, `fallocate` for trim and write
/// zeroes (with explicit zero writes where the filesystem cannot). For tests and tools.
#[derive(Debug, Clone)]
pub struct FileDevice {
    file: std::sync::Arc<std::fs::File>,
    size: u64,
}

/// Largest buffer [`FileDevice::write_zeroes`] writes at once when it must write zeroes.
const ZERO_CHUNK: usize = 1 << 20;

impl FileDevice {
    /// Opens an existing file read-write; the device size is the file's size now.
    pub fn open(path: &std::path::Path) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)?;
        let size = file.metadata()?.len();
        Ok(FileDevice {
            file: std::sync::Arc::new(file),
            size,
        })
    }

    /// Creates (or truncates) a sparse file of `size` bytes.
    pub fn create(path: &std::path::Path, size: u64) -> io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        file.set_len(size)?;
        Ok(FileDevice {
            file: std::sync::Arc::new(file),
            size,
        })
    }

    fn check(&self, offset: u64, len: u64) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "range {offset}+{len} is past the end of the device ({} bytes)",
                    self.size
                ),
            )),
        }
    }

    /// Runs `f` on the file in tokio's blocking pool.
    fn blocking<T, F>(&self, f: F) -> IoFuture<'_, T>
    where
        T: Send + 'static,
        F: FnOnce(&std::fs::File) -> io::Result<T> + Send + 'static,
    {
        let file = std::sync::Arc::clone(&self.file);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || f(&file))
                .await
                .map_err(|e| io::Error::other(format!("blocking I/O task failed: {e}")))?
        })
    }
}

/// `fallocate(2)` on `file`; `Ok(false)` if the filesystem does not support `mode`.
fn fallocate(file: &std::fs::File, mode: libc::c_int, offset: u64, len: u64) -> io::Result<bool> {
    use std::os::fd::AsRawFd;
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "range too large",
        ));
    };
    // SAFETY: fallocate only reads its integer arguments; the fd is open for the
    // duration of the call because `file` is borrowed.
    let rc = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, len) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENODEV) => {
            Ok(false)
        }
        _ => Err(err),
    }
}

fn write_zeroes_explicitly(file: &std::fs::File, mut offset: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
    let end = offset + len;
    while offset < end {
        let n = (end - offset).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], offset)?;
        offset += n as u64;
    }
    Ok(())
}

impl BlockDevice for FileDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        if let Err(e) = self.check(offset, u64::from(len)) {
            return Box::pin(async move { Err(e) });
        }
        self.blocking(move |f| {
            use std::os::unix::fs::FileExt;
            let mut buf = vec![0u8; len as usize];
            f.read_exact_at(&mut buf, offset)?;
            Ok(Bytes::from(buf))
        })
    }

    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        if let Err(e) = self.check(offset, data.len() as u64) {
            return Box::pin(async move { Err(e) });
        }
        self.blocking(move |f| {
            use std::os::unix::fs::FileExt;
            f.write_all_at(&data, offset)?;
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        self.blocking(|f| f.sync_data())
    }

    fn trim(&self, offset: u64, len: u32) -> IoFuture<'_, ()> {
        if let Err(e) = self.check(offset, u64::from(len)) {
            return Box::pin(async move { Err(e) });
        }
        self.blocking(move |f| {
            // A hint: where holes cannot be punched the data simply stays.
            fallocate(
                f,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                offset,
                u64::from(len),
            )
            .map(drop)
        })
    }

    fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> IoFuture<'_, ()> {
        if let Err(e) = self.check(offset, u64::from(len)) {
            return Box::pin(async move { Err(e) });
        }
        self.blocking(move |f| {
            let len = u64::from(len);
            if len > 0
                && !fallocate(
                    f,
                    libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )?
                && !fallocate(
                    f,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    offset,
                    len,
                )?
            {
                write_zeroes_explicitly(f, offset, len)?;
            }
            if fua {
                f.sync_data()?;
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn file_device_reads_writes_trims_and_zeroes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev");
        let dev = FileDevice::create(&path, 1 << 20).unwrap();
        assert_eq!(dev.size(), 1 << 20);
        dev.write(4096, Bytes::from(vec![0xab; 8192]), true)
            .await
            .unwrap();
        assert_eq!(&dev.read(4096, 8192).await.unwrap()[..], &[0xab; 8192][..]);
        dev.write_zeroes(4096, 4096, false).await.unwrap();
        let back = dev.read(4096, 8192).await.unwrap();
        assert!(back[..4096].iter().all(|&b| b == 0));
        assert!(back[4096..].iter().all(|&b| b == 0xab));
        dev.trim(0, 1 << 20).await.unwrap();
        dev.flush().await.unwrap();
        // Past the end: refused, nothing written.
        let err = dev
            .write((1 << 20) - 1, Bytes::from_static(b"xy"), false)
            .await;
        assert_eq!(err.unwrap_err().kind(), io::ErrorKind::InvalidInput);
        assert!(dev.read(1 << 20, 1).await.is_err());
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);
        // Reopen sees the size.
        assert_eq!(FileDevice::open(&path).unwrap().size(), 1 << 20);
    }

    #[test]
    fn explicit_zero_writes_cover_the_range() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("z");
        std::fs::write(&path, vec![1u8; 3 << 20]).unwrap();
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        write_zeroes_explicitly(&f, 100, (2 << 20) + 5).unwrap();
        let data = std::fs::read(&path).unwrap();
        assert!(data[..100].iter().all(|&b| b == 1));
        assert!(data[100..100 + (2 << 20) + 5].iter().all(|&b| b == 0));
        assert!(data[100 + (2 << 20) + 5..].iter().all(|&b| b == 1));
    }
}
