//! One member of an array: a file or block device opened for positional I/O.
//!
//! The members are shared between hosts, each with its own page cache, so a member is
//! opened with `O_DIRECT` only ([`crate::directio`]): a buffered read could return bytes
//! another node has since overwritten, and a buffered partial-block write would write
//! the stale rest of a cached block back over them.
//!
//! - I/O of whole logical blocks of the member ([`MemberIo::block_size`]: 512 bytes on
//!   most disks, see [`crate::directio`]) goes straight down (data in memory not
//!   [`ALIGN`]-aligned is copied to an aligned buffer first). Other hosts write in
//!   logical blocks too, so such a write never rewrites bytes another host wrote.
//! - An unaligned read reads the covering blocks and hands out the slice.
//! - A write not aligned to logical blocks (only from a client that ignores the NBD
//!   minimum block size) is a read-modify-write of the covering blocks through the
//!   device. It holds those blocks exclusively in the member's range lock
//!   ([`RangeLock`]); every other I/O holds its blocks shared. So no write — aligned or
//!   not — and no read interleaves with a read-modify-write of the same blocks, while
//!   aligned I/O never waits for other aligned I/O (its lock is one short, uncontended
//!   critical section).
//!
//! A member that refuses `O_DIRECT` at open (filesystems without direct I/O) is opened
//! buffered, with a warning that it must not be shared between nodes; then all of its
//! I/O goes through the page cache and [`MemberIo::sync`] (`fdatasync`) makes it
//! durable.
//!
//! A member of a clustered array carries the array's fence ticket
//! ([`MemberIo::set_fence`]): each system call checks it in the blocking-pool thread
//! that makes it, after the range lock and the pool's queue ([`crate::fence`]).
//!
//! Every write reports to [`crate::iotrace`] after `pwrite` returned (a read-modify-write
//! as the whole span it wrote), every `fdatasync` its start and end. The blocking system
//! calls run on tokio's blocking thread pool.

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::pin;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use crate::directio::{is_span_aligned, span, DirectFile};
pub use crate::iobuf::{aligned_copy, aligned_zeroes, ALIGN};

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
    file: Arc<DirectFile>,
    /// Serialises read-modify-writes against other I/O to the same blocks.
    blocks: Arc<RangeLock>,
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
    /// Opens `path` read-write with `O_DIRECT` (buffered only if the device refuses it).
    pub fn open(path: &Path) -> Result<MemberIo, MemberError> {
        let file = DirectFile::open(path, true).map_err(|source| MemberError::Open {
            path: path.to_owned(),
            source,
        })?;
        Ok(MemberIo {
            file: Arc::new(file),
            blocks: Arc::new(RangeLock::default()),
        })
    }

    /// The member's path.
    pub fn path(&self) -> &Path {
        self.file.path()
    }

    /// Gates every system call on this member with `ticket` from now on (clustered
    /// arrays; see [`crate::fence`]). Set once; false if it was set already.
    pub fn set_fence(&self, ticket: crate::fence::FenceTicket) -> bool {
        self.file.set_fence(ticket)
    }

    /// The member's size in bytes.
    pub fn size(&self) -> u64 {
        self.file.size()
    }

    /// Whether the member was opened with `O_DIRECT`.
    pub fn is_direct(&self) -> bool {
        self.file.is_direct()
    }

    /// The member's logical block size in bytes: writes of whole, aligned blocks go
    /// straight down; smaller ones are read-modify-writes.
    pub fn block_size(&self) -> u64 {
        self.file.block_size()
    }

    /// The range-lock guard an I/O of `len` bytes at `offset` needs: none on a buffered
    /// member, exclusive for a read-modify-write, else shared.
    async fn blocks(&self, offset: u64, len: usize, rmw: bool) -> Option<RangeGuard> {
        if !self.file.is_direct() || len == 0 {
            return None;
        }
        let a = self.file.block_size();
        let (start, end) = span(offset, len, a);
        Some(self.blocks.lock(start / a, end / a, rmw).await)
    }

    /// Reads `len` bytes at byte `offset` of the member (into an aligned buffer, pooled
    /// for large reads: see [`crate::iobuf`]).
    pub async fn read_at(&self, offset: u64, len: usize) -> io::Result<Bytes> {
        let guard = self.blocks(offset, len, false).await;
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let r = file.read_at(offset, len);
            drop(guard);
            r
        })
        .await
        .map_err(join_error)?
    }

    /// Writes `data` at byte `offset` of the member (not durable until [`MemberIo::sync`]).
    pub async fn write_at(&self, offset: u64, data: Bytes) -> io::Result<()> {
        let rmw = !is_span_aligned(offset, data.len(), self.file.block_size());
        let data = if rmw { data } else { aligned_copy(&data) };
        let guard = self.blocks(offset, data.len(), rmw).await;
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || {
            let r = file.write_at(offset, &data);
            drop(guard);
            r
        })
        .await
        .map_err(join_error)?
    }

    /// Makes every completed write durable (`fdatasync`).
    pub async fn sync(&self) -> io::Result<()> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.sync())
            .await
            .map_err(join_error)?
    }
}

fn join_error(e: tokio::task::JoinError) -> io::Error {
    io::Error::other(format!("member I/O task failed: {e}"))
}

/// Whether an I/O of `len` bytes at `offset` from memory at `addr` can go direct on a
/// device with `block`-byte logical blocks.
pub fn is_aligned(offset: u64, len: usize, addr: usize, block: u64) -> bool {
    crate::directio::is_aligned(offset, len, addr, block)
}

/// A lock over ranges of blocks `[start, end)`, shared or exclusive, granted in arrival
/// order among overlapping requests that conflict (so a waiting read-modify-write is not
/// starved by a stream of reads). A request waits only for earlier ones, so the oldest
/// always proceeds. The number of entries is the number of I/Os in flight on the member.
#[derive(Debug, Default)]
pub struct RangeLock {
    state: Mutex<RangeState>,
    /// Woken when an entry goes while some are waiting.
    released: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct RangeState {
    next_id: u64,
    /// In arrival order.
    entries: Vec<RangeEntry>,
}

#[derive(Debug)]
struct RangeEntry {
    id: u64,
    start: u64,
    end: u64,
    exclusive: bool,
    granted: bool,
}

impl RangeEntry {
    fn conflicts(&self, start: u64, end: u64, exclusive: bool) -> bool {
        (self.exclusive || exclusive) && self.start < end && start < self.end
    }
}

impl RangeLock {
    fn state(&self) -> std::sync::MutexGuard<'_, RangeState> {
        // The state is a list of entries, valid after any panic of a holder.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until blocks `[start, end)` are granted (`exclusive` or shared) and returns
    /// the guard that releases them. Cancel-safe: a dropped request leaves the queue.
    pub async fn lock(self: &Arc<Self>, start: u64, end: u64, exclusive: bool) -> RangeGuard {
        let (id, granted) = {
            let mut st = self.state();
            let id = st.next_id;
            st.next_id += 1;
            let granted = !st
                .entries
                .iter()
                .any(|e| e.conflicts(start, end, exclusive));
            st.entries.push(RangeEntry {
                id,
                start,
                end,
                exclusive,
                granted,
            });
            (id, granted)
        };
        let guard = RangeGuard {
            lock: self.clone(),
            id,
        };
        if granted {
            return guard;
        }
        loop {
            let mut released = pin!(self.released.notified());
            released.as_mut().enable();
            if self.try_grant(id) {
                return guard;
            }
            released.await;
        }
    }

    /// Grants entry `id` if no earlier entry conflicts with it.
    fn try_grant(&self, id: u64) -> bool {
        let mut st = self.state();
        let Some(i) = st.entries.iter().position(|e| e.id == id) else {
            return false;
        };
        let (earlier, rest) = st.entries.split_at_mut(i);
        let me = &mut rest[0];
        if earlier
            .iter()
            .any(|e| e.conflicts(me.start, me.end, me.exclusive))
        {
            return false;
        }
        me.granted = true;
        true
    }

    fn release(&self, id: u64) {
        let waiting = {
            let mut st = self.state();
            if let Some(i) = st.entries.iter().position(|e| e.id == id) {
                st.entries.remove(i);
            }
            st.entries.iter().any(|e| !e.granted)
        };
        if waiting {
            self.released.notify_waiters();
        }
    }

    /// Entries held or waiting (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.state().entries.len()
    }
}

/// Blocks held in a [`RangeLock`] (or waited for), released on drop.
#[derive(Debug)]
pub struct RangeGuard {
    lock: Arc<RangeLock>,
    id: u64,
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        self.lock.release(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::time::timeout;

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

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_unaligned_writes_to_the_same_blocks_all_land() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        std::fs::write(&path, vec![0u8; 64 << 10]).unwrap();
        let m = Arc::new(MemberIo::open(&path).unwrap());
        assert!(m.is_direct());
        // 40 writers of 100 bytes each, 101 bytes apart: all inside blocks 1 and 2, some
        // across their boundary; aligned writes of block 2 and reads race with them.
        let place = |i: u64| 4096 + i * 101;
        let mut tasks = Vec::new();
        for i in 0..40u64 {
            let m = m.clone();
            tasks.push(tokio::spawn(async move {
                m.write_at(place(i), Bytes::from(vec![i as u8 + 1; 100]))
                    .await
            }));
        }
        for _ in 0..4 {
            let m = m.clone();
            tasks.push(tokio::spawn(async move {
                m.read_at(4000, 5000).await.map(|_| ())
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        m.sync().await.unwrap();
        let all = std::fs::read(&path).unwrap();
        for i in 0..40u64 {
            let at = place(i) as usize;
            assert!(
                all[at..at + 100].iter().all(|&b| b == i as u8 + 1),
                "write {i} at byte {at} was lost"
            );
        }
        assert_eq!(m.blocks.len(), 0, "every guard was released");
    }

    #[test]
    fn read_modify_writes_without_the_lock_lose_bytes() {
        // What the range lock prevents: read-modify-writes of one block that all read it
        // before any writes it back. Each writes the block it read plus its own bytes,
        // so only the last one's bytes survive.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        std::fs::write(&path, vec![0u8; 16 << 10]).unwrap();
        let f = Arc::new(DirectFile::open(&path, true).unwrap());
        assert!(f.is_direct());
        let n = 8;
        let read_all = Arc::new(std::sync::Barrier::new(n));
        let threads: Vec<_> = (0..n)
            .map(|i| {
                let (f, read_all) = (f.clone(), read_all.clone());
                std::thread::spawn(move || {
                    // All inside one 512-byte block (the file's logical block).
                    let off = 4096 + 10 + i as u64 * 60;
                    let mut block = f.read_covering(off, 50).unwrap();
                    read_all.wait();
                    block.patch(off, &[i as u8 + 1; 50]);
                    f.write_covering(&block).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let all = std::fs::read(&path).unwrap();
        let landed = (0..n)
            .filter(|&i| {
                let at = 4096 + 10 + i * 60;
                all[at..at + 50].iter().all(|&b| b == i as u8 + 1)
            })
            .count();
        assert_eq!(
            landed, 1,
            "unserialised read-modify-writes kept only the last"
        );
    }

    use crate::testloop::Loop;

    /// Two nodes, each with its own loop device over one file (the shared disk), write
    /// neighbouring sectors of one 4 KiB block. Node A's write is held between its read
    /// and its write if it is a read-modify-write, and node B writes its sector in that
    /// gap. Returns (the members' block size, whether A's write was a read-modify-write,
    /// A's sector as on disk, B's sector as on disk).
    async fn two_nodes_write_neighbouring_sectors(sector: u32) -> (u64, bool, Vec<u8>, Vec<u8>) {
        let dir = tempfile::tempdir_in("/var/tmp").unwrap();
        let file = dir.path().join("shared");
        std::fs::write(&file, vec![0u8; 1 << 20]).unwrap();
        let (la, lb) = (Loop::attach(&file, sector), Loop::attach(&file, sector));
        let a = Arc::new(MemberIo::open(&la.0).unwrap());
        let b = MemberIo::open(&lb.0).unwrap();
        assert!(a.is_direct() && b.is_direct());
        assert_eq!(a.block_size(), b.block_size());
        let (read_tx, read_rx) = std::sync::mpsc::channel::<()>();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let go_rx = Mutex::new(go_rx);
        let read_tx = Mutex::new(read_tx);
        crate::directio::test_hook::set(
            &la.0,
            Arc::new(move || {
                read_tx.lock().unwrap().send(()).unwrap();
                go_rx
                    .lock()
                    .unwrap()
                    .recv_timeout(Duration::from_secs(10))
                    .expect("node B's write did not finish");
            }),
        );
        let a2 = a.clone();
        let wa = tokio::spawn(async move {
            a2.write_at(4096, aligned_copy(&Bytes::from(vec![0xaa; 512])))
                .await
        });
        // Wait (bounded) for A to sit between its read and its write, if it does.
        let rmw = tokio::task::spawn_blocking(move || {
            read_rx.recv_timeout(Duration::from_secs(2)).is_ok()
        })
        .await
        .unwrap();
        b.write_at(4096 + 512, aligned_copy(&Bytes::from(vec![0xbb; 512])))
            .await
            .unwrap();
        b.sync().await.unwrap();
        let _ = go_tx.send(());
        wa.await.unwrap().unwrap();
        a.sync().await.unwrap();
        crate::directio::test_hook::clear(&la.0);
        let disk = DirectFile::open(&file, false).unwrap();
        let got = disk.read_at(4096, 1024).unwrap();
        (
            a.block_size(),
            rmw,
            got[..512].to_vec(),
            got[512..].to_vec(),
        )
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sector_writes_from_two_nodes_to_one_block_both_land() {
        let (block, rmw, a, b) = two_nodes_write_neighbouring_sectors(512).await;
        assert!(a.iter().all(|&x| x == 0xaa), "node A's sector was lost");
        assert!(b.iter().all(|&x| x == 0xbb), "node B's sector was lost");
        assert!(
            !rmw,
            "a 512-byte write on a 512-byte-sector device was read-modify-written"
        );
        assert_eq!(block, 512);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn sub_block_writes_on_4k_sector_devices_are_read_modify_written() {
        // The fallback the NBD minimum block size keeps clients away from: on a device
        // with 4 KiB logical blocks a 512-byte write must read the block, and another
        // host's write in the gap is lost (what the minimum block size prevents).
        let (block, rmw, a, b) = two_nodes_write_neighbouring_sectors(4096).await;
        assert_eq!(block, 4096);
        assert!(rmw);
        assert!(a.iter().all(|&x| x == 0xaa));
        assert!(
            b.iter().all(|&x| x == 0),
            "the read-modify-write rewrote the old sector"
        );
    }

    #[tokio::test]
    async fn range_lock_grants_in_order_of_conflict() {
        let short = Duration::from_millis(30);
        let long = Duration::from_secs(5);
        let l = Arc::new(RangeLock::default());
        let s1 = l.lock(0, 2, false).await;
        // Shared overlapping shared, and disjoint exclusive: at once.
        let s2 = timeout(long, l.lock(1, 3, false)).await.unwrap();
        let x = timeout(long, l.lock(5, 6, true)).await.unwrap();
        // Exclusive over block 1 waits for both shared holders.
        let l2 = l.clone();
        let mut ex = tokio::spawn(async move { l2.lock(1, 2, true).await });
        tokio::time::sleep(short).await;
        assert!(!ex.is_finished());
        // A later shared request that overlaps the waiting exclusive one queues behind it.
        let l3 = l.clone();
        let mut sh = tokio::spawn(async move { l3.lock(1, 2, false).await });
        // One that does not overlap it goes ahead.
        let s3 = timeout(long, l.lock(0, 1, false)).await.unwrap();
        tokio::time::sleep(short).await;
        assert!(!sh.is_finished());
        drop(s1);
        tokio::time::sleep(short).await;
        assert!(!ex.is_finished(), "s2 still holds block 1");
        drop(s2);
        let g = timeout(long, &mut ex).await.unwrap().unwrap();
        tokio::time::sleep(short).await;
        assert!(!sh.is_finished(), "the exclusive holder has block 1");
        drop(g);
        let g = timeout(long, &mut sh).await.unwrap().unwrap();
        drop((g, s3, x));
        assert_eq!(l.len(), 0);
        // A waiter that gives up leaves the queue.
        let held = l.lock(0, 1, true).await;
        assert!(timeout(short, l.lock(0, 1, true)).await.is_err());
        assert_eq!(l.len(), 1);
        drop(held);
        assert_eq!(l.len(), 0);
    }

    #[tokio::test]
    async fn buffered_fallback_serves_unaligned_io() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        std::fs::write(&path, vec![0u8; 64 << 10]).unwrap();
        let m = MemberIo {
            file: Arc::new(DirectFile::open_mode(&path, true, false).unwrap()),
            blocks: Arc::new(RangeLock::default()),
        };
        assert!(!m.is_direct());
        m.write_at(5000, Bytes::from_static(b"xyz")).await.unwrap();
        m.write_at(8192, aligned_copy(&Bytes::from(vec![4u8; 4096])))
            .await
            .unwrap();
        m.sync().await.unwrap();
        assert_eq!(&m.read_at(4999, 5).await.unwrap()[..], b"\0xyz\0");
        let all = std::fs::read(&path).unwrap();
        assert_eq!(&all[5000..5003], b"xyz");
        assert!(all[8192..12288].iter().all(|&b| b == 4));
    }

    /// A read-modify-write reports the whole span it wrote, with the bytes written.
    #[cfg(feature = "io-trace")]
    #[tokio::test]
    async fn read_modify_write_is_traced_as_its_span() {
        use crate::iotrace::{install, IoTracer};
        #[derive(Default)]
        struct Rec(std::sync::Mutex<Vec<(PathBuf, u64, Vec<u8>)>>);
        impl IoTracer for Rec {
            fn write(&self, path: &Path, offset: u64, data: &[u8]) {
                self.0
                    .lock()
                    .unwrap()
                    .push((path.into(), offset, data.to_vec()));
            }
            fn flush_begin(&self, _path: &Path) -> u64 {
                0
            }
            fn flush_end(&self, _path: &Path, _id: u64) {}
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        std::fs::write(&path, vec![3u8; 16 << 10]).unwrap();
        let m = MemberIo::open(&path).unwrap();
        let rec = Arc::new(Rec::default());
        install(Some(rec.clone()));
        m.write_at(4096 + 4000, Bytes::from(vec![9u8; 200]))
            .await
            .unwrap();
        install(None);
        let mine: Vec<_> = rec
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|w| w.0 == path)
            .cloned()
            .collect();
        assert_eq!(mine.len(), 1);
        let (_, off, data) = &mine[0];
        // The covering logical blocks of the file (512 bytes on ext4).
        let b = m.block_size();
        let (lo, hi) = ((4096 + 4000) / b * b, (4096 + 4200u64).div_ceil(b) * b);
        assert_eq!((*off, data.len() as u64), (lo, hi - lo));
        let mut want = vec![3u8; (hi - lo) as usize];
        let at = (4096 + 4000 - lo) as usize;
        want[at..at + 200].fill(9);
        assert!(data[..] == want[..]);
    }
}
