//! Pooled, aligned buffers for large device I/O: member reads, and NBD write payloads
//! read straight from the socket.
//!
//! Why pooled: a fresh large allocation costs page faults (or a memset) on every I/O.
//!
//! Why huge pages: an `O_DIRECT` request is built from the physical pages of the
//! buffer, and a device takes at most `max_segments` of them per request (254 for
//! virtio-blk). A 1 MiB buffer of 256 scattered 4 KiB pages — what the blocking threads
//! get when they fault their buffers in concurrently — is split into a 1016 KiB and an
//! 8 KiB request, and the second is a whole device round trip. Buffers of 1 MiB and more
//! therefore live in 2 MiB-aligned anonymous mappings with transparent huge pages asked
//! for (`MADV_HUGEPAGE`): one physically contiguous segment. Where the kernel gives no
//! huge page the mapping is still populated in order by one thread, which keeps most of
//! its pages adjacent.
//!
//! Buffers are not zeroed when reused: a reader fills all of one or fails, and a failed
//! buffer's bytes are never shown.

use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// Alignment of the memory of direct I/O (enough for any device's `dio_mem_align`);
/// offsets and lengths need only the device's logical block size
/// ([`crate::directio::DirectFile::block_size`]).
pub const ALIGN: usize = 4096;

/// Buffers of at least this many bytes come from the pool; smaller ones are cheap to
/// allocate.
pub const POOL_MIN: usize = 64 << 10;

/// Size of a transparent huge page (x86-64, and arm64 with 4 KiB pages).
const HUGE_PAGE: usize = 2 << 20;

/// Size classes from this one up live in huge-page mappings (smaller buffers need at
/// most 128 segments and are never split).
const HUGE_CLASS_MIN: usize = 1 << 20;

/// Bytes of free buffers kept per size class.
const POOL_KEEP_BYTES: usize = 64 << 20;

/// An anonymous private mapping, unmapped on drop.
struct Region {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: the mapping is plain memory owned by the `Region`; which bytes of it may be
// touched, and by whom, is decided by the `PooledBuf`s carved out of it (one slot each).
unsafe impl Send for Region {}
// SAFETY: as for `Send`; `Region` itself never reads or writes the memory.
unsafe impl Sync for Region {}

impl Region {
    /// Maps `len` bytes (a multiple of the page size), aligned to [`HUGE_PAGE`] with huge
    /// pages requested if `huge`, and populates them in order. `None` if `mmap` fails.
    fn new(len: usize, huge: bool) -> Option<Region> {
        let align = if huge { HUGE_PAGE } else { ALIGN };
        let map_len = len + align - ALIGN;
        // SAFETY: an anonymous private mapping at an address the kernel picks; no
        // existing memory is affected.
        let raw = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                map_len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if raw == libc::MAP_FAILED {
            return None;
        }
        let base = raw as usize;
        let start = base.next_multiple_of(align);
        let head = start - base;
        let tail = map_len - head - len;
        // SAFETY: both ranges lie inside the mapping just made and are not used; `mmap`
        // returns page-aligned addresses and every length here is a page multiple.
        unsafe {
            if head > 0 {
                libc::munmap(raw, head);
            }
            if tail > 0 {
                libc::munmap((start + len) as *mut libc::c_void, tail);
            }
        }
        if huge {
            // SAFETY: advice on our own mapping; failure (no THP support) only means
            // small pages.
            unsafe { libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE) };
        }
        let ptr = NonNull::new(start as *mut u8)?;
        // Populate in order, from this thread, before any I/O uses the memory.
        for page in (0..len).step_by(ALIGN) {
            // SAFETY: `page < len`: inside the mapping, which is writable and not yet
            // shared with anyone.
            unsafe { ptr.as_ptr().add(page).write_volatile(0) };
        }
        Some(Region { ptr, len })
    }
}

impl Drop for Region {
    fn drop(&mut self) {
        // SAFETY: the range is the mapping made in `new`; every buffer carved from it
        // held an `Arc` of this region, so none is left.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// A free slot of a size class: `class` bytes at `offset` of `region`.
struct Slot {
    region: Arc<Region>,
    offset: usize,
}

/// Free slots by size class (log2 of the class size).
static POOL: Mutex<Vec<Vec<Slot>>> = Mutex::new(Vec::new());

fn pool() -> std::sync::MutexGuard<'static, Vec<Vec<Slot>>> {
    // The pool is a list of free slots: a panicking holder leaves it valid.
    POOL.lock().unwrap_or_else(|e| e.into_inner())
}

/// An [`ALIGN`]-aligned buffer from the pool, given back when dropped (as the owner of a
/// [`Bytes`], when the last `Bytes` over it drops). Its contents are not zeroed.
pub struct PooledBuf {
    region: Arc<Region>,
    offset: usize,
    class: u32,
    len: usize,
}

impl PooledBuf {
    /// A buffer of `len` bytes (`len` ≥ 1). `None` only if memory cannot be mapped.
    pub fn take(len: usize) -> Option<PooledBuf> {
        let class = len.max(POOL_MIN).next_power_of_two().trailing_zeros();
        let size = 1usize << class;
        let reused = pool().get_mut(class as usize).and_then(Vec::pop);
        let slot = match reused {
            Some(slot) => slot,
            None => {
                let huge = size >= HUGE_CLASS_MIN;
                let region_len = if huge { size.max(HUGE_PAGE) } else { size };
                let region = Arc::new(Region::new(region_len, huge)?);
                // A huge page holds several buffers of a class below its size: the
                // others go to the free list.
                let mut spare: Vec<Slot> = (size..region_len)
                    .step_by(size)
                    .map(|offset| Slot {
                        region: region.clone(),
                        offset,
                    })
                    .collect();
                if !spare.is_empty() {
                    let mut pool = pool();
                    if pool.len() <= class as usize {
                        pool.resize_with(class as usize + 1, Vec::new);
                    }
                    pool[class as usize].append(&mut spare);
                }
                Slot { region, offset: 0 }
            }
        };
        Some(PooledBuf {
            region: slot.region,
            offset: slot.offset,
            class,
            len,
        })
    }

    /// The buffer frozen into [`Bytes`] (no copy; back to the pool when the last clone
    /// drops).
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        // SAFETY: `offset + len ≤ offset + class size ≤ region.len`, the memory is
        // initialised (zeroed by mmap, then only ever written with bytes), and this slot
        // belongs to this buffer alone until it is dropped.
        unsafe { std::slice::from_raw_parts(self.region.ptr.as_ptr().add(self.offset), self.len) }
    }
}

impl AsMut<[u8]> for PooledBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_ref`; `&mut self` makes the access exclusive.
        unsafe {
            std::slice::from_raw_parts_mut(self.region.ptr.as_ptr().add(self.offset), self.len)
        }
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let class = self.class as usize;
        let slot = Slot {
            region: self.region.clone(),
            offset: self.offset,
        };
        let mut pool = pool();
        if pool.len() <= class {
            pool.resize_with(class + 1, Vec::new);
        }
        if (pool[class].len() + 1) << class <= POOL_KEEP_BYTES {
            pool[class].push(slot);
        }
    }
}

/// A buffer of `len` bytes at an [`ALIGN`]-aligned address, for reading into: pooled
/// from [`POOL_MIN`] bytes up, else a fresh zeroed allocation.
pub fn aligned_buf(len: usize) -> AlignedBuf {
    if len >= POOL_MIN {
        if let Some(b) = PooledBuf::take(len) {
            return AlignedBuf::Pooled(b);
        }
    }
    let buf = bytes::BytesMut::zeroed(len + ALIGN);
    let start = (ALIGN - buf.as_ptr() as usize % ALIGN) % ALIGN;
    AlignedBuf::Heap { buf, start, len }
}

/// A mutable aligned buffer ([`aligned_buf`]).
pub enum AlignedBuf {
    /// From the pool.
    Pooled(PooledBuf),
    /// A small heap allocation: the aligned area is `buf[start..start + len]`.
    Heap {
        /// The allocation.
        buf: bytes::BytesMut,
        /// Where the aligned area starts.
        start: usize,
        /// Its length.
        len: usize,
    },
}

impl AlignedBuf {
    /// The buffer frozen into [`Bytes`] (no copy).
    pub fn freeze(self) -> Bytes {
        match self {
            AlignedBuf::Pooled(b) => b.freeze(),
            AlignedBuf::Heap { buf, start, len } => buf.freeze().slice(start..start + len),
        }
    }
}

impl AsRef<[u8]> for AlignedBuf {
    fn as_ref(&self) -> &[u8] {
        match self {
            AlignedBuf::Pooled(b) => b.as_ref(),
            AlignedBuf::Heap { buf, start, len } => &buf[*start..*start + *len],
        }
    }
}

impl AsMut<[u8]> for AlignedBuf {
    fn as_mut(&mut self) -> &mut [u8] {
        match self {
            AlignedBuf::Pooled(b) => b.as_mut(),
            AlignedBuf::Heap { buf, start, len } => &mut buf[*start..*start + *len],
        }
    }
}

/// `data` copied into an [`ALIGN`]-aligned buffer (or `data` itself if already aligned),
/// so that one copy can go direct to every member.
pub fn aligned_copy(data: &Bytes) -> Bytes {
    if (data.as_ptr() as usize).is_multiple_of(ALIGN) {
        return data.clone();
    }
    let mut buf = aligned_buf(data.len());
    buf.as_mut().copy_from_slice(data);
    buf.freeze()
}

/// A zero-filled aligned buffer of `len` bytes.
pub fn aligned_zeroes(len: usize) -> Bytes {
    let buf = bytes::BytesMut::zeroed(len + ALIGN);
    let start = (ALIGN - buf.as_ptr() as usize % ALIGN) % ALIGN;
    buf.freeze().slice(start..start + len)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_sized_and_disjoint() {
        for len in [1, 4096, 65_536, 300_000, 1 << 20, (1 << 20) + 1, 3 << 20] {
            let mut b = aligned_buf(len);
            assert_eq!(b.as_ref().len(), len);
            assert_eq!(b.as_ref().as_ptr() as usize % ALIGN, 0, "len {len}");
            b.as_mut().fill(0xa5);
            let bytes = b.freeze();
            assert_eq!(bytes.len(), len);
            assert!(bytes.iter().all(|&x| x == 0xa5));
        }
        // Two live 1 MiB buffers never overlap (they may share a huge page).
        let mut a = PooledBuf::take(1 << 20).unwrap();
        let mut b = PooledBuf::take(1 << 20).unwrap();
        a.as_mut().fill(1);
        b.as_mut().fill(2);
        assert!(a.as_ref().iter().all(|&x| x == 1));
        assert!(b.as_ref().iter().all(|&x| x == 2));
        let pa = a.as_ref().as_ptr() as usize;
        let pb = b.as_ref().as_ptr() as usize;
        assert!(pa.abs_diff(pb) >= 1 << 20);
    }

    #[test]
    fn aligned_copy_copies_only_unaligned_data() {
        let data = aligned_copy(&Bytes::from(vec![7u8; 8192]));
        assert_eq!(data.as_ptr() as usize % ALIGN, 0);
        assert_eq!(aligned_copy(&data).as_ptr(), data.as_ptr());
        let unaligned = data.slice(1..);
        let copy = aligned_copy(&unaligned);
        assert_eq!(copy.as_ptr() as usize % ALIGN, 0);
        assert_eq!(copy, unaligned);
        let z = aligned_zeroes(10_000);
        assert_eq!(z.as_ptr() as usize % ALIGN, 0);
        assert!(z.len() == 10_000 && z.iter().all(|&x| x == 0));
    }
}
