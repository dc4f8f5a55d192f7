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

use bytes::Bytes;

use crate::iobuf::aligned_buf;
pub use crate::iobuf::{aligned_copy, aligned_zeroes, ALIGN};
use crate::iotrace;

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
    path: Arc<Path>,
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
            path: Arc::from(path),
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

    /// Reads `len` bytes at byte `offset` of the member (into an aligned buffer, pooled
    /// for large reads: see [`crate::iobuf`]).
    pub async fn read_at(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let mut buf = aligned_buf(len);
        let file = self.pick(offset, len, buf.as_ref().as_ptr() as usize);
        tokio::task::spawn_blocking(move || {
            file.read_exact_at(buf.as_mut(), offset)?;
            Ok(buf.freeze())
        })
        .await
        .map_err(join_error)?
    }

    /// Writes `data` at byte `offset` of the member (not durable until [`MemberIo::sync`]).
    pub async fn write_at(&self, offset: u64, data: Bytes) -> io::Result<()> {
        let file = self.pick(offset, data.len(), data.as_ptr() as usize);
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            file.write_all_at(&data, offset)?;
            iotrace::on_write(&path, offset, &data);
            Ok(())
        })
        .await
        .map_err(join_error)?
    }

    /// Makes every completed write durable (`fdatasync`).
    pub async fn sync(&self) -> io::Result<()> {
        let file = self.buffered.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let token = iotrace::on_flush_begin(&path);
            file.sync_data()?;
            iotrace::on_flush_end(&path, token);
            Ok(())
        })
        .await
        .map_err(join_error)?
    }
}

fn join_error(e: tokio::task::JoinError) -> io::Error {
    io::Error::other(format!("member I/O task failed: {e}"))
}

/// Whether an I/O of `len` bytes at `offset` from memory at `addr` can go direct.
pub fn is_aligned(offset: u64, len: usize, addr: usize) -> bool {
    offset.is_multiple_of(ALIGN as u64) && len.is_multiple_of(ALIGN) && addr.is_multiple_of(ALIGN)
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
