//! The in-memory write-intent bitmap of one node's slot (md semantics, `md-bitmap.c`).
//!
//! Owns: the 16-bit counter per chunk, the node's slot image (256-byte bitmap
//! superblock + bits, padded to whole 4 KiB pages) and the ordering rule that a
//! chunk's bit is durable on disk before the first data write into that chunk.
//!
//! Counter (`docs/MD-FORMAT.md` §6): bit 15 [`NEEDED`] (the chunk must be
//! resynced), bit 14 [`RESYNC`] (it is being resynced), low 14 bits = pending writes
//! plus 1 for the bit on disk. A first write sets the disk bit and the count to 3; its end
//! lowers it to 2; the daemon, every `daemon_sleep`, lowers an idle 2 to 1 and then
//! clears the disk bit at 1 → 0 — after flushing every member, so a bit is cleared on
//! disk only once the data it covered is durable everywhere (md's
//! `md_bitmap_daemon_work`). A write that did not reach every member (degraded)
//! marks the chunk [`NEEDED`], which keeps its bit until a resync or recovery.
//!
//! Flushes are shared: a writer that set a bit waits until a flush that covers its
//! change has completed; one flush at a time writes every dirty page, so concurrent
//! writers ride on the same flush. Where the pages go (every live member, at this
//! node's slot offset) is the business of the [`BitmapStore`] the array gives.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;

use crate::blockdev::IoFuture;

/// Counter flag: the chunk must be resynced.
pub const NEEDED: u16 = 1 << 15;
/// Counter flag: the chunk is being resynced.
pub const RESYNC: u16 = 1 << 14;
/// The counting part of a counter.
pub const COUNTER_MASK: u16 = RESYNC - 1;
/// Bitmap pages are written whole.
pub const PAGE: usize = 4096;
/// Bytes of the bitmap superblock before the bits in a slot.
pub const SB_BYTES: usize = 256;

/// Test switch: write cleared pages before the members are flushed (the unsafe order).
#[cfg_attr(not(feature = "io-trace"), allow(dead_code))]
static UNSAFE_CLEAR_BEFORE_FLUSH: AtomicBool = AtomicBool::new(false);

/// Re-introduces, process-wide, the unsafe order of writing a page with cleared bits
/// *before* the data those bits covered is flushed on the members. Only for the
/// crash-consistency checker, which must see that order caught; never in production
/// (compiled only with the `io-trace` feature).
#[cfg(feature = "io-trace")]
pub fn set_unsafe_clear_before_flush(on: bool) {
    UNSAFE_CLEAR_BEFORE_FLUSH.store(on, Ordering::SeqCst);
}

/// Whether the unsafe order is switched on ([`set_unsafe_clear_before_flush`]).
fn unsafe_clear_before_flush() -> bool {
    UNSAFE_CLEAR_BEFORE_FLUSH.load(Ordering::Relaxed)
}

/// Errors of the write-intent bitmap.
#[derive(Debug, thiserror::Error)]
pub enum BitmapError {
    /// The members could not be flushed before clearing bits (the bits stay set; the
    /// daemon tries again).
    #[error("array {array}: flush the members before clearing bitmap bits: {source}")]
    MemberFlush {
        /// The array.
        array: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Writing bitmap pages failed on every member.
    #[error("write bitmap pages of array {array}: {source}")]
    Write {
        /// The array.
        array: String,
        /// The cause.
        source: std::io::Error,
    },
    /// The slot image does not match the geometry.
    #[error("bitmap slot image of array {array} is {got} bytes; {chunks} chunks need {need}")]
    BadImage {
        /// The array.
        array: String,
        /// Bytes given.
        got: usize,
        /// Bytes needed.
        need: usize,
        /// Chunks.
        chunks: u64,
    },
    /// The bitmap cannot grow to the new size inside its slot.
    #[error("bitmap of array {array}: {chunks} chunks need {need} bytes but its slot has {room}; switch the bitmap to none and back to get a larger chunk")]
    NoRoom {
        /// The array.
        array: String,
        /// Chunks wanted.
        chunks: u64,
        /// Bytes they need.
        need: usize,
        /// Bytes of the slot.
        room: usize,
    },
    /// Too many writes pending in one chunk (bounded by the array's I/O limit).
    #[error("too many writes pending in chunk {chunk} of array {array}")]
    Overflow {
        /// The array.
        array: String,
        /// The chunk.
        chunk: u64,
    },
}

/// Where the pages of this node's slot are written.
pub trait BitmapStore: Send + Sync {
    /// Writes `(page index in the slot, 4096 bytes)` pairs durably to every live member;
    /// succeeds if at least one member has them.
    fn write_pages(&self, pages: Vec<(u64, Bytes)>) -> IoFuture<'_, ()>;
    /// Makes every data write the array completed so far durable on every member that
    /// takes writes (`fdatasync`); fails if any of them could not. Called before a page
    /// with cleared bits is written.
    fn flush_members(&self) -> IoFuture<'_, ()>;
}

/// Shape of the bitmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Bytes of array data per bit.
    pub chunk_bytes: u64,
    /// Number of bits.
    pub chunks: u64,
    /// Period of the clearing daemon.
    pub daemon_sleep: Duration,
}

impl Geometry {
    /// Bytes of a slot image: superblock + bits, rounded up to whole pages.
    pub fn image_bytes(&self) -> usize {
        let raw = SB_BYTES + self.chunks.div_ceil(8) as usize;
        raw.div_ceil(PAGE) * PAGE
    }

    /// The chunks `[first, last]` touched by `len > 0` bytes at `offset`.
    pub fn chunk_range(&self, offset: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        let first = offset / self.chunk_bytes;
        let last = (offset + len.max(1) - 1) / self.chunk_bytes;
        first..=last.min(self.chunks.saturating_sub(1))
    }
}

/// Counts of what the bitmap did, for status and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BitmapStats {
    /// Flushes that wrote pages.
    pub flushes: u64,
    /// Bits set on disk now (in the image).
    pub dirty_bits: u64,
    /// Chunks marked [`NEEDED`].
    pub needed: u64,
}

struct State {
    /// The shape; `chunks` changes with [`WriteIntent::resize`].
    geom: Geometry,
    counters: Vec<u16>,
    image: Vec<u8>,
    dirty_pages: BTreeSet<u64>,
    /// Chunks whose counter reached 0 and whose disk bit is still set: cleared in the
    /// image only by [`WriteIntent::flush`], after the members were flushed.
    clears: BTreeSet<u64>,
    /// Bumped at every change of `image`.
    gen: u64,
}

/// The write-intent bitmap of this node's slot.
pub struct WriteIntent {
    array: String,
    state: Mutex<State>,
    /// Serialises flushes: one writes, the others find their change already flushed.
    flush_lock: tokio::sync::Mutex<()>,
    /// `gen` of the image as of the last completed flush.
    flushed_gen: AtomicU64,
    flushes: AtomicU64,
    store: Arc<dyn BitmapStore>,
}

impl std::fmt::Debug for WriteIntent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteIntent")
            .field("array", &self.array)
            .field("geom", &self.geometry())
            .finish()
    }
}

fn bit_pos(chunk: u64) -> (usize, u8) {
    (SB_BYTES + (chunk / 8) as usize, 1u8 << (chunk % 8))
}

impl WriteIntent {
    /// A bitmap over `image` (the slot as read from disk). Bits set on disk become
    /// counters of 2 (cleared by the daemon when idle), and also [`NEEDED`] when
    /// `needed` (the array stopped uncleanly or runs degraded).
    pub fn new(
        array: &str,
        geom: Geometry,
        mut image: Vec<u8>,
        needed: bool,
        store: Arc<dyn BitmapStore>,
    ) -> Result<WriteIntent, BitmapError> {
        let need = geom.image_bytes();
        if image.len() < SB_BYTES + geom.chunks.div_ceil(8) as usize {
            return Err(BitmapError::BadImage {
                array: array.to_owned(),
                got: image.len(),
                need,
                chunks: geom.chunks,
            });
        }
        image.resize(need, 0);
        let mut counters = vec![0u16; geom.chunks as usize];
        for (c, ctr) in counters.iter_mut().enumerate() {
            let (byte, mask) = bit_pos(c as u64);
            if image[byte] & mask != 0 {
                *ctr = 2 | if needed { NEEDED } else { 0 };
            }
        }
        // Bits past the last chunk are not ours to keep.
        for c in geom.chunks..((image.len() - SB_BYTES) as u64 * 8) {
            let (byte, mask) = bit_pos(c);
            image[byte] &= !mask;
        }
        Ok(WriteIntent {
            array: array.to_owned(),
            state: Mutex::new(State {
                geom,
                counters,
                image,
                dirty_pages: BTreeSet::new(),
                clears: BTreeSet::new(),
                gen: 0,
            }),
            flush_lock: tokio::sync::Mutex::new(()),
            flushed_gen: AtomicU64::new(0),
            flushes: AtomicU64::new(0),
            store,
        })
    }

    /// The bitmap's shape.
    pub fn geometry(&self) -> Geometry {
        self.lock().geom
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock leaves counters that are still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a write of `len` bytes at array `offset`; returns once the bits of its
    /// chunks are durable on disk. On an error the write is not counted (the caller
    /// must not write, nor call [`WriteIntent::end_write`]).
    pub async fn start_write(&self, offset: u64, len: u64) -> Result<(), BitmapError> {
        let target = {
            let mut st = self.lock();
            // Checked before any counter moves, so a refused write counts nowhere.
            for c in st.geom.chunk_range(offset, len) {
                if st.counters[c as usize] & COUNTER_MASK >= COUNTER_MASK - 1 {
                    return Err(BitmapError::Overflow {
                        array: self.array.clone(),
                        chunk: c,
                    });
                }
            }
            let mut changed = false;
            for c in st.geom.chunk_range(offset, len) {
                let v = st.counters[c as usize];
                let low = v & COUNTER_MASK;
                if low == 0 {
                    let (byte, mask) = bit_pos(c);
                    if st.image[byte] & mask == 0 {
                        st.image[byte] |= mask;
                        st.dirty_pages.insert((byte / PAGE) as u64);
                        changed = true;
                    }
                }
                st.counters[c as usize] = (v & !COUNTER_MASK) | (low.max(2) + 1);
            }
            if changed {
                st.gen += 1;
            }
            st.gen
        };
        let flushed = self.flush_to(target).await;
        if flushed.is_err() {
            // The write will not happen: uncount it (its bits stay set in memory and
            // are written by the next flush; the daemon clears them when idle).
            self.end_write(offset, len, false);
        }
        flushed
    }

    /// Ends a write counted by [`WriteIntent::start_write`]; `degraded` when it did not
    /// reach every member, which keeps the chunks' bits for a later recovery.
    pub fn end_write(&self, offset: u64, len: u64, degraded: bool) {
        let mut st = self.lock();
        for c in st.geom.chunk_range(offset, len) {
            let v = st.counters[c as usize];
            let low = (v & COUNTER_MASK).saturating_sub(1).max(2);
            st.counters[c as usize] = (v & !COUNTER_MASK) | low | if degraded { NEEDED } else { 0 };
        }
    }

    /// One pass of the clearing daemon: idle 2 → 1, then 1 → 0 with the disk bit to
    /// be cleared by the next [`WriteIntent::flush`]. Returns whether bits are to be
    /// cleared.
    pub fn daemon_pass(&self) -> bool {
        let mut st = self.lock();
        let mut changed = false;
        for c in 0..st.geom.chunks {
            let v = st.counters[c as usize];
            if v == 2 {
                st.counters[c as usize] = 1;
            } else if v == 1 {
                st.counters[c as usize] = 0;
                st.clears.insert(c);
                changed = true;
            }
        }
        changed
    }

    /// For a clean stop with no writes in flight: clears every bit that is not
    /// [`NEEDED`] (after flushing the members) and writes the pages.
    pub async fn clear_idle_and_flush(&self) -> Result<(), BitmapError> {
        {
            let mut st = self.lock();
            for c in 0..st.geom.chunks {
                let v = st.counters[c as usize];
                if v & (NEEDED | RESYNC) == 0 && v & COUNTER_MASK <= 2 {
                    st.counters[c as usize] = 0;
                    let (byte, mask) = bit_pos(c);
                    if st.image[byte] & mask != 0 {
                        st.clears.insert(c);
                    }
                }
            }
        }
        self.flush().await
    }

    /// Writes every dirty page, and clears the bits of chunks that became idle — md's
    /// bitmap daemon order: the members are flushed first, so a bit is cleared on disk
    /// only once the data it covered is durable on every member.
    pub async fn flush(&self) -> Result<(), BitmapError> {
        if self.lock().clears.is_empty() {
            let target = self.lock().gen;
            return self.flush_to(target).await;
        }
        let _one = self.flush_lock.lock().await;
        let unsafe_order = unsafe_clear_before_flush();
        if !unsafe_order {
            self.flush_members().await?;
        }
        let target = {
            let mut st = self.lock();
            let clears = std::mem::take(&mut st.clears);
            let mut changed = false;
            for c in clears {
                // A write that started in the chunk since keeps its bit.
                if c < st.geom.chunks && st.counters[c as usize] == 0 {
                    let (byte, mask) = bit_pos(c);
                    if st.image[byte] & mask != 0 {
                        st.image[byte] &= !mask;
                        st.dirty_pages.insert((byte / PAGE) as u64);
                        changed = true;
                    }
                }
            }
            if changed {
                st.gen += 1;
            }
            st.gen
        };
        self.write_dirty(target).await?;
        if unsafe_order {
            self.flush_members().await?;
        }
        Ok(())
    }

    async fn flush_members(&self) -> Result<(), BitmapError> {
        self.store
            .flush_members()
            .await
            .map_err(|source| BitmapError::MemberFlush {
                array: self.array.clone(),
                source,
            })
    }

    async fn flush_to(&self, target: u64) -> Result<(), BitmapError> {
        if self.flushed_gen.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let _one = self.flush_lock.lock().await;
        self.write_dirty(target).await
    }

    /// Writes the dirty pages unless a flush up to `target` completed; the caller
    /// holds `flush_lock`.
    async fn write_dirty(&self, target: u64) -> Result<(), BitmapError> {
        if self.flushed_gen.load(Ordering::Acquire) >= target {
            return Ok(());
        }
        let (pages, gen, taken) = {
            let mut st = self.lock();
            let taken: Vec<u64> = std::mem::take(&mut st.dirty_pages).into_iter().collect();
            let pages: Vec<(u64, Bytes)> = taken
                .iter()
                .map(|&p| {
                    let s = p as usize * PAGE;
                    let page = Bytes::copy_from_slice(&st.image[s..s + PAGE]);
                    (p, crate::raid::member::aligned_copy(&page))
                })
                .collect();
            (pages, st.gen, taken)
        };
        if !pages.is_empty() {
            if let Err(source) = self.store.write_pages(pages).await {
                self.lock().dirty_pages.extend(taken);
                return Err(BitmapError::Write {
                    array: self.array.clone(),
                    source,
                });
            }
            self.flushes.fetch_add(1, Ordering::Relaxed);
        }
        self.flushed_gen.fetch_max(gen, Ordering::AcqRel);
        Ok(())
    }

    /// Chunks marked [`NEEDED`], in order.
    pub fn needed_chunks(&self) -> Vec<u64> {
        let st = self.lock();
        (0..st.geom.chunks)
            .filter(|&c| st.counters[c as usize] & NEEDED != 0)
            .collect()
    }

    /// Whether any chunk of the range is [`NEEDED`] or being resynced.
    pub fn is_needed(&self, offset: u64, len: u64) -> bool {
        let st = self.lock();
        st.geom
            .chunk_range(offset, len)
            .any(|c| st.counters[c as usize] & (NEEDED | RESYNC) != 0)
    }

    /// Marks every chunk [`NEEDED`] whose bit is set on disk (a re-added member
    /// needs them).
    pub fn mark_set_bits_needed(&self) {
        let mut st = self.lock();
        for c in 0..st.geom.chunks {
            let (byte, mask) = bit_pos(c);
            if st.image[byte] & mask != 0 {
                let v = st.counters[c as usize];
                st.counters[c as usize] = v | NEEDED | (v & COUNTER_MASK).max(2);
            }
        }
    }

    /// Forgets every [`NEEDED`] mark (a full recovery made all members identical);
    /// the bits are then cleared by the daemon.
    pub fn clear_all_needed(&self) {
        let mut st = self.lock();
        for v in st.counters.iter_mut() {
            *v &= !NEEDED;
        }
    }

    /// Starts resyncing `chunk`: [`NEEDED`] → [`RESYNC`]. False if it was not needed.
    pub fn start_sync(&self, chunk: u64) -> bool {
        let mut st = self.lock();
        let v = st.counters[chunk as usize];
        if v & NEEDED == 0 {
            return false;
        }
        st.counters[chunk as usize] = (v & !NEEDED) | RESYNC;
        true
    }

    /// Ends resyncing `chunk`; if it failed the chunk is [`NEEDED`] again. A synced
    /// chunk's bit is left to the daemon.
    pub fn end_sync(&self, chunk: u64, ok: bool) {
        let mut st = self.lock();
        let v = st.counters[chunk as usize] & !RESYNC;
        st.counters[chunk as usize] = if ok { v } else { v | NEEDED };
    }

    /// What the bitmap holds now.
    pub fn stats(&self) -> BitmapStats {
        let st = self.lock();
        let dirty_bits = (0..st.geom.chunks)
            .filter(|&c| {
                let (byte, mask) = bit_pos(c);
                st.image[byte] & mask != 0
            })
            .count() as u64;
        let needed = st.counters.iter().filter(|&&v| v & NEEDED != 0).count() as u64;
        BitmapStats {
            flushes: self.flushes.load(Ordering::Relaxed),
            dirty_bits,
            needed,
        }
    }

    /// A copy of the slot image as it is in memory.
    pub fn image(&self) -> Vec<u8> {
        self.lock().image.clone()
    }

    /// Replaces the bitmap superblock (first 256 bytes) of the image, e.g. with new
    /// events; written with the next flush.
    pub fn set_super(&self, sb: &[u8; SB_BYTES]) {
        let mut st = self.lock();
        st.image[..SB_BYTES].copy_from_slice(sb);
        st.dirty_pages.insert(0);
        st.gen += 1;
    }

    /// Resizes the bitmap to `chunks` bits because the array's size changed, with `sb`
    /// (the slot's bitmap superblock carrying the new `sync_size`) as the image's first
    /// 256 bytes. Chunks added start clean; the bits of chunks past a smaller end are
    /// cleared. Refused, with nothing changed, when the image would not fit in `room`
    /// bytes (the slot). Written with the next flush.
    pub fn resize(&self, chunks: u64, sb: &[u8; SB_BYTES], room: usize) -> Result<(), BitmapError> {
        let mut st = self.lock();
        let geom = Geometry { chunks, ..st.geom };
        let need = geom.image_bytes();
        if need > room {
            return Err(BitmapError::NoRoom {
                array: self.array.clone(),
                chunks,
                need,
                room,
            });
        }
        let old = st.geom.chunks;
        for c in chunks..old {
            let (byte, mask) = bit_pos(c);
            if st.image[byte] & mask != 0 {
                st.image[byte] &= !mask;
                st.dirty_pages.insert((byte / PAGE) as u64);
            }
        }
        if st.image.len() < need {
            st.image.resize(need, 0);
        }
        st.counters.resize(chunks as usize, 0);
        st.geom = geom;
        st.image[..SB_BYTES].copy_from_slice(sb);
        st.dirty_pages.insert(0);
        st.gen += 1;
        Ok(())
    }

    /// Marks every page dirty, so the next flush writes the whole slot (to a member
    /// that was just added).
    pub fn mark_all_dirty(&self) {
        let mut st = self.lock();
        let pages = (st.image.len() / PAGE) as u64;
        st.dirty_pages.extend(0..pages);
        st.gen += 1;
    }

    /// Runs the clearing daemon every `daemon_sleep` until `stop` fires.
    pub fn spawn_daemon(
        self: &Arc<Self>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let period = me.geometry().daemon_sleep.max(Duration::from_millis(10));
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(period) => {}
                    _ = stop.changed() => return,
                }
                if *stop.borrow() {
                    return;
                }
                if me.daemon_pass() {
                    if let Err(e) = me.flush().await {
                        tracing::warn!(array = %me.array, "bitmap daemon: failed to {e}");
                    }
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::raid::member::MemberIo;

    /// Writes pages to one real file at a slot offset.
    struct FileStore {
        m: MemberIo,
        slot: u64,
    }

    impl BitmapStore for FileStore {
        fn write_pages(&self, pages: Vec<(u64, Bytes)>) -> IoFuture<'_, ()> {
            Box::pin(async move {
                for (p, b) in pages {
                    self.m.write_at(self.slot + p * PAGE as u64, b).await?;
                }
                self.m.sync().await
            })
        }
        fn flush_members(&self) -> IoFuture<'_, ()> {
            Box::pin(self.m.sync())
        }
    }

    fn setup(chunks: u64) -> (tempfile::TempDir, Arc<WriteIntent>, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
        let geom = Geometry {
            chunk_bytes: 65536,
            chunks,
            daemon_sleep: Duration::from_millis(50),
        };
        let store = Arc::new(FileStore {
            m: MemberIo::open(&path).unwrap(),
            slot: 8192,
        });
        let image = vec![0u8; geom.image_bytes()];
        let wi = Arc::new(WriteIntent::new("t", geom, image, false, store).unwrap());
        (dir, wi, path)
    }

    fn disk_bit(path: &std::path::Path, chunk: u64) -> bool {
        let all = std::fs::read(path).unwrap();
        let (byte, mask) = bit_pos(chunk);
        all[8192 + byte] & mask != 0
    }

    #[tokio::test]
    async fn bit_on_disk_before_write_returns_and_cleared_after_two_passes() {
        let (_d, wi, path) = setup(100);
        wi.start_write(65536 * 3 + 10, 100).await.unwrap();
        assert!(disk_bit(&path, 3));
        assert!(!disk_bit(&path, 2));
        // Pending write: the daemon does not touch it.
        assert!(!wi.daemon_pass());
        wi.end_write(65536 * 3 + 10, 100, false);
        assert!(!wi.daemon_pass()); // 2 -> 1
        assert!(wi.daemon_pass()); // 1 -> 0, bit cleared
        wi.flush().await.unwrap();
        assert!(!disk_bit(&path, 3));
        assert_eq!(wi.stats().dirty_bits, 0);
    }

    #[tokio::test]
    async fn write_spanning_chunks_sets_each() {
        let (_d, wi, path) = setup(100);
        wi.start_write(65536 - 512, 1024).await.unwrap();
        assert!(disk_bit(&path, 0) && disk_bit(&path, 1));
        assert_eq!(wi.stats().dirty_bits, 2);
    }

    #[tokio::test]
    async fn concurrent_writers_share_flushes() {
        let (_d, wi, _path) = setup(4000);
        let mut tasks = Vec::new();
        for i in 0..64u64 {
            let wi = wi.clone();
            tasks.push(tokio::spawn(async move {
                wi.start_write(i * 65536, 4096).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
        let s = wi.stats();
        assert_eq!(s.dirty_bits, 64);
        assert!(s.flushes < 64, "flushes {} not shared", s.flushes);
        // A second write into a dirty chunk needs no flush.
        let before = wi.stats().flushes;
        wi.start_write(0, 4096).await.unwrap();
        assert_eq!(wi.stats().flushes, before);
    }

    #[tokio::test]
    async fn degraded_write_keeps_bit_needed() {
        let (_d, wi, path) = setup(10);
        wi.start_write(0, 4096).await.unwrap();
        wi.end_write(0, 4096, true);
        for _ in 0..3 {
            wi.daemon_pass();
        }
        wi.clear_idle_and_flush().await.unwrap();
        assert!(disk_bit(&path, 0));
        assert_eq!(wi.needed_chunks(), vec![0]);
        assert!(wi.start_sync(0));
        wi.end_sync(0, true);
        wi.clear_idle_and_flush().await.unwrap();
        assert!(!disk_bit(&path, 0));
    }

    #[tokio::test]
    async fn failed_start_writes_are_not_counted() {
        struct Failing(AtomicBool);
        impl BitmapStore for Failing {
            fn write_pages(&self, _: Vec<(u64, Bytes)>) -> IoFuture<'_, ()> {
                let fail = self.0.load(Ordering::SeqCst);
                Box::pin(async move {
                    if fail {
                        return Err(std::io::Error::other("bitmap write refused by the test"));
                    }
                    Ok(())
                })
            }
            fn flush_members(&self) -> IoFuture<'_, ()> {
                Box::pin(async { Ok(()) })
            }
        }
        let geom = Geometry {
            chunk_bytes: 65536,
            chunks: 4,
            daemon_sleep: Duration::from_secs(60),
        };
        let store = Arc::new(Failing(AtomicBool::new(true)));
        let image = vec![0u8; geom.image_bytes()];
        let wi = WriteIntent::new("t", geom, image, false, store.clone()).unwrap();
        // More failed writes than a counter holds: each fails on the bitmap write, none
        // leaves a count behind.
        for i in 0..u32::from(COUNTER_MASK) + 10 {
            match wi.start_write(0, 4096).await {
                Err(BitmapError::Write { .. }) => {}
                other => panic!("start_write #{i}: {other:?}"),
            }
        }
        store.0.store(false, Ordering::SeqCst);
        wi.start_write(0, 4096).await.unwrap();
        wi.end_write(0, 4096, false);
        // Idle again: the daemon clears the bit in two passes.
        assert!(!wi.daemon_pass());
        assert!(wi.daemon_pass(), "the chunk's counter went back to idle");
    }

    #[tokio::test]
    async fn loaded_bits_become_needed() {
        let (_d, _wi, _path) = setup(10);
        let geom = Geometry {
            chunk_bytes: 4096,
            chunks: 20,
            daemon_sleep: Duration::from_secs(5),
        };
        let mut image = vec![0u8; geom.image_bytes()];
        image[SB_BYTES] = 0b1000_0101;
        image[SB_BYTES + 2] = 0xff; // chunks 16..24, only 16..20 exist
        struct Null;
        impl BitmapStore for Null {
            fn write_pages(&self, _: Vec<(u64, Bytes)>) -> IoFuture<'_, ()> {
                Box::pin(async { Ok(()) })
            }
            fn flush_members(&self) -> IoFuture<'_, ()> {
                Box::pin(async { Ok(()) })
            }
        }
        let wi = WriteIntent::new("t", geom, image, true, Arc::new(Null)).unwrap();
        assert_eq!(wi.needed_chunks(), vec![0, 2, 7, 16, 17, 18, 19]);
        assert!(wi.is_needed(7 * 4096, 1));
        assert!(!wi.is_needed(8 * 4096, 4096));
    }

    #[tokio::test]
    async fn daemon_task_clears_idle_bits() {
        let (_d, wi, path) = setup(10);
        let (tx, rx) = tokio::sync::watch::channel(false);
        let h = wi.spawn_daemon(rx);
        wi.start_write(0, 4096).await.unwrap();
        wi.end_write(0, 4096, false);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while disk_bit(&path, 0) {
            assert!(tokio::time::Instant::now() < deadline, "bit not cleared");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tx.send(true).unwrap();
        h.await.unwrap();
    }

    /// Records, in order, the member flushes and the page writes (with the state of
    /// chunk 3's bit in each written page) it does on a real file; `fail_flush` makes
    /// the member flush fail.
    struct OrderStore {
        m: MemberIo,
        log: Mutex<Vec<String>>,
        fail_flush: AtomicBool,
    }

    impl BitmapStore for OrderStore {
        fn write_pages(&self, pages: Vec<(u64, Bytes)>) -> IoFuture<'_, ()> {
            Box::pin(async move {
                for (p, b) in pages {
                    let (byte, mask) = bit_pos(3);
                    if p == (byte / PAGE) as u64 {
                        let set = b[byte % PAGE] & mask != 0;
                        self.log
                            .lock()
                            .unwrap()
                            .push(format!("page bit3={}", if set { 1 } else { 0 }));
                    }
                    self.m.write_at(8192 + p * PAGE as u64, b).await?;
                }
                self.m.sync().await
            })
        }
        fn flush_members(&self) -> IoFuture<'_, ()> {
            Box::pin(async move {
                if self.fail_flush.load(Ordering::SeqCst) {
                    return Err(std::io::Error::other("member flush refused by the test"));
                }
                self.m.sync().await?;
                self.log.lock().unwrap().push("member flush".into());
                Ok(())
            })
        }
    }

    /// The unsafe-order switch is process-wide, and the agent's unit tests run with the
    /// `io-trace` feature in a workspace run: the tests that assert the write order and
    /// the one that flips the switch take turns.
    static ORDER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

    fn order_setup() -> (tempfile::TempDir, Arc<OrderStore>, Arc<WriteIntent>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m");
        std::fs::write(&path, vec![0u8; 64 * 1024]).unwrap();
        let geom = Geometry {
            chunk_bytes: 65536,
            chunks: 100,
            daemon_sleep: Duration::from_secs(60),
        };
        let store = Arc::new(OrderStore {
            m: MemberIo::open(&path).unwrap(),
            log: Mutex::new(Vec::new()),
            fail_flush: AtomicBool::new(false),
        });
        let image = vec![0u8; geom.image_bytes()];
        let wi = Arc::new(WriteIntent::new("t", geom, image, false, store.clone()).unwrap());
        (dir, store, wi)
    }

    /// Writes into chunk 3 and lets the daemon clear its bit.
    async fn write_then_clear(wi: &WriteIntent) -> Result<(), BitmapError> {
        wi.start_write(65536 * 3, 4096).await?;
        wi.end_write(65536 * 3, 4096, false);
        assert!(!wi.daemon_pass()); // 2 -> 1
        assert!(wi.daemon_pass()); // 1 -> 0: to be cleared
        wi.flush().await
    }

    #[tokio::test]
    async fn members_flushed_before_a_cleared_bit_is_written() {
        let _turn = ORDER.lock().await;
        let (_d, store, wi) = order_setup();
        write_then_clear(&wi).await.unwrap();
        let log = store.log.lock().unwrap().clone();
        assert_eq!(log, ["page bit3=1", "member flush", "page bit3=0"]);
        assert_eq!(wi.stats().dirty_bits, 0);
    }

    #[tokio::test]
    async fn a_failed_member_flush_keeps_the_bit() {
        let _turn = ORDER.lock().await;
        let (_d, store, wi) = order_setup();
        store.fail_flush.store(true, Ordering::SeqCst);
        let err = write_then_clear(&wi).await.unwrap_err();
        assert!(matches!(err, BitmapError::MemberFlush { .. }), "{err}");
        assert_eq!(store.log.lock().unwrap().clone(), ["page bit3=1"]);
        assert_eq!(wi.stats().dirty_bits, 1);
        // The next flush, with the members flushable again, clears it.
        store.fail_flush.store(false, Ordering::SeqCst);
        wi.flush().await.unwrap();
        let log = store.log.lock().unwrap().clone();
        assert_eq!(log, ["page bit3=1", "member flush", "page bit3=0"]);
    }

    #[tokio::test]
    async fn a_write_after_the_daemon_pass_keeps_the_bit() {
        let _turn = ORDER.lock().await;
        let (_d, store, wi) = order_setup();
        wi.start_write(65536 * 3, 4096).await.unwrap();
        wi.end_write(65536 * 3, 4096, false);
        wi.daemon_pass();
        assert!(wi.daemon_pass());
        // A new write into the chunk before the daemon's flush: the bit stays.
        wi.start_write(65536 * 3, 4096).await.unwrap();
        wi.flush().await.unwrap();
        assert_eq!(wi.stats().dirty_bits, 1);
        assert!(!store.log.lock().unwrap().iter().any(|l| l == "page bit3=0"));
    }

    #[cfg(feature = "io-trace")]
    #[tokio::test]
    async fn the_unsafe_switch_writes_the_cleared_page_first() {
        let _turn = ORDER.lock().await;
        let (_d, store, wi) = order_setup();
        set_unsafe_clear_before_flush(true);
        let r = write_then_clear(&wi).await;
        set_unsafe_clear_before_flush(false);
        r.unwrap();
        let log = store.log.lock().unwrap().clone();
        assert_eq!(log, ["page bit3=1", "page bit3=0", "member flush"]);
    }
}
