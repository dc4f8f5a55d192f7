//! One member of an array: a file or block device opened for positional I/O.
//!
//! A member is opened twice: once with `O_DIRECT` (when the filesystem or device allows
//! it) and once buffered. I/O whose offset, length and buffer address are all
//! [`ALIGN`]-aligned goes through the direct descriptor; anything else, and every I/O on
//! a member that refuses `O_DIRECT` (tmpfs), goes through the buffered one. Linux keeps
//! the two coherent (a direct read writes back dirty cached pages of its range first, a
//! direct write invalidates them), and [`MemberIo::sync`] (`fdatasync`) covers both
//! because durability is per inode.
//!
//! The blocking system calls run on tokio's blocking thread pool.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};

/// Alignment of direct I/O: offset, length and memory address.
pub const ALIGN: usize = 4096;

/// Errors opening a member.
#[derive(Debug, thiserror::Error)]
pub enum MemberError {
    /// `open(2)` failed.
    #[error("open member {path}: {source}")]
    Open {
        /// The member's path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// Its size could not be read.
    #[error("read the size of member {path}: {source}")]
    Size {
        /// The member's path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
}

/// A member device opened for positional I/O.
#[derive(Debug)]
pub struct MemberIo {
    path: PathBuf,
    /// The `O_DIRECT` descriptor, if the device accepted `O_DIRECT`.
    direct: Option<Arc<File>>,
    /// The buffered descriptor: unaligned I/O and devices without `O_DIRECT`.
    buffered: Arc<File>,
    size: u64,
}

/// Size of an open file or block device in bytes.
pub fn device_size(file: &File) -> io::Result<u64> {
    // `seek(End)` reports the size of regular files and block devices alike.
    use std::io::{Seek, SeekFrom};
    let mut f = file;
    let end = f.seek(SeekFrom::End(0))?;
    f.seek(SeekFrom::Start(0))?;
    Ok(end)
}

impl MemberIo {
    /// Opens `path` read-write, with `O_DIRECT` where the device allows it.
    pub fn open(path: &Path) -> Result<MemberIo, MemberError> {
        let buffered = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(|source| MemberError::Open {
                path: path.to_owned(),
                source,
            })?;
        let direct = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok();
        let size = device_size(&buffered).map_err(|source| MemberError::Size {
            path: path.to_owned(),
            source,
        })?;
        Ok(MemberIo {
            path: path.to_owned(),
            direct: direct.map(Arc::new),
            buffered: Arc::new(buffered),
            size,
        })
    }

    /// The member's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The member's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Whether the member was opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.direct.is_some()
    }

    fn pick(&self, offset: u64, len: usize, addr: usize) -> Arc<File> {
        match &self.direct {
            Some(d) if is_aligned(offset, len, addr) => d.clone(),
            _ => self.buffered.clone(),
        }
    }

    /// Reads `len` bytes at byte `offset` of the member.
    pub async fn read_at(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        if len >= POOL_MIN {
            let mut buf = PooledBuf::take(len);
            let file = self.pick(offset, len, buf.as_ref().as_ptr() as usize);
            return tokio::task::spawn_blocking(move || {
                file.read_exact_at(buf.as_mut(), offset)?;
                Ok(Bytes::from_owner(buf))
            })
            .await
            .map_err(join_error)?;
        }
        let (mut buf, start) = aligned_buf(len);
        let file = self.pick(offset, len, buf[start..].as_ptr() as usize);
        tokio::task::spawn_blocking(move || {
            file.read_exact_at(&mut buf[start..start + len], offset)?;
            Ok(buf.freeze().slice(start..start + len))
        })
        .await
        .map_err(join_error)?
    }

    /// Writes `data` at byte `offset` of the member (not durable until [`MemberIo::sync`]).
    pub async fn write_at(&self, offset: u64, data: Bytes) -> io::Result<()> {
        let file = self.pick(offset, data.len(), data.as_ptr() as usize);
        tokio::task::spawn_blocking(move || file.write_all_at(&data, offset))
            .await
            .map_err(join_error)?
    }

    /// Makes every completed write durable (`fdatasync`).
    pub async fn sync(&self) -> io::Result<()> {
        let file = self.buffered.clone();
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(join_error)?
    }
}

/// Reads of at least this many bytes use pooled buffers: a large fresh allocation
/// costs page faults (or a memset) on every read.
const POOL_MIN: usize = 64 << 10;
/// Bytes of free buffers kept per size class.
const POOL_KEEP_BYTES: usize = 64 << 20;

/// Free read buffers by size class (power of two, plus room for alignment).
static POOL: std::sync::Mutex<Vec<Vec<Vec<u8>>>> = std::sync::Mutex::new(Vec::new());

/// An aligned read buffer from [`POOL`], given back when the last `Bytes` over it drops.
/// Its contents are not zeroed: a read fills all of it or fails.
struct PooledBuf {
    vec: Vec<u8>,
    start: usize,
    len: usize,
}

impl PooledBuf {
    fn take(len: usize) -> PooledBuf {
        let class = len.next_power_of_two().trailing_zeros() as usize;
        let reused = {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            pool.get_mut(class).and_then(Vec::pop)
        };
        let vec = reused.unwrap_or_else(|| vec![0u8; (1usize << class) + ALIGN]);
        let start = (ALIGN - vec.as_ptr() as usize % ALIGN) % ALIGN;
        PooledBuf { vec, start, len }
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.vec[self.start..self.start + self.len]
    }
}

impl AsMut<[u8]> for PooledBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.vec[self.start..self.start + self.len]
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let vec = std::mem::take(&mut self.vec);
        let class = (vec.len() - ALIGN).trailing_zeros() as usize;
        let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
        if pool.len() <= class {
            pool.resize_with(class + 1, Vec::new);
        }
        if (pool[class].len() + 1) << class <= POOL_KEEP_BYTES {
            pool[class].push(vec);
        }
    }
}

fn join_error(e: tokio::task::JoinError) -> io::Error {
    io::Error::other(format!("member I/O task failed: {e}"))
}

/// Whether an I/O of `len` bytes at `offset` from memory at `addr` can go direct.
pub fn is_aligned(offset: u64, len: usize, addr: usize) -> bool {
    offset.is_multiple_of(ALIGN as u64) && len.is_multiple_of(ALIGN) && addr.is_multiple_of(ALIGN)
}

/// A zeroed buffer with room for `len` bytes starting at an [`ALIGN`]-aligned address;
/// returns the buffer and the index where the aligned area starts.
fn aligned_buf(len: usize) -> (BytesMut, usize) {
    let buf = BytesMut::zeroed(len + ALIGN);
    let addr = buf.as_ptr() as usize;
    let start = (ALIGN - addr % ALIGN) % ALIGN;
    (buf, start)
}

/// `data` copied into an [`ALIGN`]-aligned buffer (or `data` itself if already aligned),
/// so that one copy can go direct to every member.
pub fn aligned_copy(data: &Bytes) -> Bytes {
    if (data.as_ptr() as usize).is_multiple_of(ALIGN) {
        return data.clone();
    }
    let (mut buf, start) = aligned_buf(data.len());
    buf[start..start + data.len()].copy_from_slice(data);
    buf.freeze().slice(start..start + data.len())
}

/// A zero-filled aligned buffer of `len` bytes.
pub fn aligned_zeroes(len: usize) -> Bytes {
    let (buf, start) = aligned_buf(len);
    buf.freeze().slice(start..start + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn read_write_aligned_and_not() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let m = MemberIo::open(&path).unwrap();
        assert_eq!(m.size(), 1 << 20);
        let data = aligned_copy(&Bytes::from(vec![7u8; 8192]));
        assert_eq!(data.as_ptr() as usize % ALIGN, 0);
        m.write_at(4096, data).await.unwrap();
        m.write_at(100, Bytes::from_static(b"hello")).await.unwrap();
        m.sync().await.unwrap();
        let r = m.read_at(4096, 8192).await.unwrap();
        assert!(r.iter().all(|&b| b == 7));
        let r = m.read_at(100, 5).await.unwrap();
        assert_eq!(&r[..], b"hello");
        let all = std::fs::read(&path).unwrap();
        assert_eq!(&all[100..105], b"hello");
        assert!(all[4096..4096 + 8192].iter().all(|&b| b == 7));
    }

    #[tokio::test]
    async fn large_reads_use_pooled_aligned_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        std::fs::write(&path, vec![0u8; 1 << 20]).unwrap();
        let m = MemberIo::open(&path).unwrap();
        for round in 0..3u8 {
            let data = vec![round + 1; 1 << 19];
            m.write_at(0, aligned_copy(&Bytes::from(data.clone())))
                .await
                .unwrap();
            let a = m.read_at(0, 1 << 19).await.unwrap();
            assert!(a[..] == data[..], "round {round}");
            assert_eq!(a.as_ptr() as usize % ALIGN, 0);
            let b = m.read_at(4096, 300_000).await.unwrap();
            assert_eq!(b.len(), 300_000);
            assert!(b[..] == data[4096..4096 + 300_000]);
        }
    }

    #[tokio::test]
    async fn read_past_end_fails() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        std::fs::write(&path, vec![0u8; 4096]).unwrap();
        let m = MemberIo::open(&path).unwrap();
        assert!(m.read_at(4096, 4096).await.is_err());
    }
}
