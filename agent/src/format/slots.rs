//! Clustered bitmap slots on disk: every read and rewrite of one node's slot across the
//! members of an array (the union of its bits, clearing it, resizing it, merging other
//! slots into one, counting its dirty chunks).
//!
//! A clustered array keeps one bitmap slot per node on every member
//! ([`super::bitmap`]); a node writes its own slot through its running bitmap, and the
//! functions here are for the slots of other nodes: a survivor reads and clears a dead
//! node's slot, a joiner merges unused dirty slots into its own, a size change rewrites
//! the headers of slots no node holds. The caller holds the slot's lock in the lock
//! service. Every function here is blocking (run it on a blocking thread); every write
//! goes through a [`MetaDev`] opened with the array's fence ticket, so a fenced node
//! writes nothing.
//!
//! An unreadable member is skipped (logged): the others still hold the slot. Only when
//! no member can be read is the read an error.

use std::path::PathBuf;

use super::bitmap::{clear_bit, count_set, set_bit, test_bit, BitmapSuper};
use super::io::{read_member, write_bitmap_slot, write_superblock, DeviceError, Member, MetaDev};
use super::superblock::MAX_SECTOR;
use crate::fence::FenceTicket;

/// The bits of one slot, OR-ed over the readable members.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotBits {
    /// The bits (`bits_bytes` of the slot).
    pub bits: Vec<u8>,
    /// How many chunks the slot covers.
    pub chunks: u64,
}

impl SlotBits {
    /// The set chunks, in order.
    pub fn dirty(&self) -> Vec<u64> {
        (0..self.chunks)
            .filter(|&c| test_bit(&self.bits, c))
            .collect()
    }

    /// How many chunks are set.
    pub fn count(&self) -> u64 {
        count_set(&self.bits, self.chunks)
    }
}

/// The dirty chunks of slot `slot` in an already read member (0 without that slot).
pub fn dirty_chunks(member: &Member, slot: u32) -> u64 {
    member
        .bitmap
        .get(slot as usize)
        .map_or(0, |s| count_set(&s.bits, s.sb.chunks()))
}

/// The union of slot `slot`'s bits over the readable members. `Ok(None)`: no readable
/// member has that slot; `Err`: no member could be read (the first error).
pub fn read_union(paths: &[PathBuf], slot: u32) -> Result<Option<SlotBits>, DeviceError> {
    let mut out: Option<SlotBits> = None;
    let mut first_err = None;
    for p in paths {
        match read_member(p) {
            Ok(m) => {
                let Some(s) = m.bitmap.get(slot as usize) else {
                    continue;
                };
                match &mut out {
                    None => {
                        out = Some(SlotBits {
                            bits: s.bits.clone(),
                            chunks: s.sb.chunks(),
                        })
                    }
                    Some(u) => u.bits.iter_mut().zip(&s.bits).for_each(|(a, o)| *a |= *o),
                }
            }
            Err(e) => {
                tracing::warn!(member = %p.display(), slot, "reading a bitmap slot: unreadable member: {e}");
                first_err.get_or_insert(e);
            }
        }
    }
    match (out, first_err) {
        (None, Some(e)) => Err(e),
        (out, _) => Ok(out),
    }
}

/// Whether slot `slot` has a set bit on any readable member (no member readable:
/// assumed yes, the safe answer for a caller about to drop the slot).
pub fn is_dirty(paths: &[PathBuf], slot: u32) -> bool {
    match read_union(paths, slot) {
        Ok(Some(u)) => u.count() > 0,
        Ok(None) => false,
        Err(_) => true,
    }
}

/// Rewrites slot `slot` on every readable member with what `f` makes of its header and
/// bits (an unreadable member is skipped, logged as `what`).
pub fn rewrite(
    paths: &[PathBuf],
    slot: u32,
    what: &str,
    fence: Option<FenceTicket>,
    f: impl Fn(&BitmapSuper, &[u8]) -> (BitmapSuper, Vec<u8>),
) -> Result<(), DeviceError> {
    for p in paths {
        let m = match read_member(p) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(member = %p.display(), slot, "{what} a bitmap slot: not touching an unreadable member: {e}");
                continue;
            }
        };
        let Some(s) = m.bitmap.get(slot as usize) else {
            continue;
        };
        let (header, bits) = f(&s.sb, &s.bits);
        let dev = MetaDev::open_fenced(p, true, fence.clone())?;
        write_bitmap_slot(&dev, &m.sb, slot, &header, &bits)?;
    }
    Ok(())
}

/// Clears slot `slot`'s bits on every readable member (its header kept).
pub fn clear(paths: &[PathBuf], slot: u32, fence: Option<FenceTicket>) -> Result<(), DeviceError> {
    rewrite(paths, slot, "clearing", fence, |sb, bits| {
        (sb.clone(), vec![0u8; bits.len()])
    })
}

/// Brings unused slot `slot`'s header to an array of `sectors` on every readable member
/// (`sync_size`, bits kept up to the new chunk count), as md-cluster's `update_size`
/// does for slots no node holds.
pub fn resize(
    paths: &[PathBuf],
    slot: u32,
    sectors: u64,
    fence: Option<FenceTicket>,
) -> Result<(), DeviceError> {
    rewrite(paths, slot, "resizing", fence, |sb, bits| {
        let mut sb = sb.clone();
        sb.sync_size = sectors;
        let mut bits = bits.to_vec();
        bits.resize(sb.bits_bytes() as usize, 0);
        for c in sb.chunks()..(bits.len() as u64 * 8) {
            clear_bit(&mut bits, c);
        }
        (sb, bits)
    })
}

/// ORs the bits of slots `from` into slot `to` on every readable member, and marks the
/// superblocks unclean (`resync_offset` 0 where it was MaxSector) so the engine resyncs
/// the set bits at start. Returns the chunks set in slot `to` afterwards (the most on
/// any member). The bits of `from` are left as they are.
pub fn merge(
    paths: &[PathBuf],
    to: u32,
    from: &[u32],
    fence: Option<&FenceTicket>,
) -> Result<u64, DeviceError> {
    let mut total = 0;
    for p in paths {
        let m = match read_member(p) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(member = %p.display(), "not merging bits on an unreadable member: {e}");
                continue;
            }
        };
        let Some(ours) = m.bitmap.get(to as usize) else {
            continue;
        };
        let mut bits = ours.bits.clone();
        let chunks = ours.sb.chunks();
        for &f in from {
            if let Some(s) = m.bitmap.get(f as usize) {
                for i in (0..chunks).filter(|&i| test_bit(&s.bits, i)) {
                    set_bit(&mut bits, i);
                }
            }
        }
        let dev = MetaDev::open_fenced(p, true, fence.cloned())?;
        write_bitmap_slot(&dev, &m.sb, to, &ours.sb, &bits)?;
        let mut sb = m.sb.clone();
        if sb.resync_offset == MAX_SECTOR {
            sb.resync_offset = 0;
            write_superblock(&dev, &sb)?;
        }
        total = total.max(count_set(&bits, chunks));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::create::{BitmapMode, CreateSpec};
    use crate::format::io::create_members;

    /// A clustered mirror of two 32 MiB files with 4 slots.
    fn mirror(dir: &std::path::Path) -> Vec<PathBuf> {
        let paths: Vec<PathBuf> = ["a", "b"].iter().map(|n| dir.join(n)).collect();
        for p in &paths {
            std::fs::File::create(p).unwrap().set_len(32 << 20).unwrap();
        }
        let mut spec = CreateSpec::new("host:md0", 2, 0, BitmapMode::Clustered);
        spec.nodes = Some(4);
        spec.assume_clean = true;
        // 1 MiB chunks: 32 chunks per slot.
        spec.bitmap_chunk = Some(1 << 20);
        create_members(&spec, &paths, false).unwrap();
        paths
    }

    /// Sets `chunks` of slot `slot` on member `path` only.
    fn set_on(path: &std::path::Path, slot: u32, chunks: &[u64]) {
        let m = read_member(path).unwrap();
        let s = &m.bitmap[slot as usize];
        let mut bits = s.bits.clone();
        for &c in chunks {
            set_bit(&mut bits, c);
        }
        let dev = MetaDev::open(path, true).unwrap();
        write_bitmap_slot(&dev, &m.sb, slot, &s.sb, &bits).unwrap();
    }

    fn bits_on(path: &std::path::Path, slot: u32) -> Vec<u64> {
        let m = read_member(path).unwrap();
        let s = &m.bitmap[slot as usize];
        (0..s.sb.chunks())
            .filter(|&c| test_bit(&s.bits, c))
            .collect()
    }

    #[test]
    fn union_clear_and_dirty_over_members() {
        let dir = tempfile::tempdir().unwrap();
        let p = mirror(dir.path());
        assert!(!is_dirty(&p, 1));
        assert_eq!(read_union(&p, 1).unwrap().unwrap().count(), 0);
        // The slot's bits differ per member (one write reached only one of them).
        set_on(&p[0], 1, &[0, 3]);
        set_on(&p[1], 1, &[3, 7]);
        let u = read_union(&p, 1).unwrap().unwrap();
        assert_eq!(u.dirty(), vec![0, 3, 7]);
        assert_eq!(u.count(), 3);
        assert!(is_dirty(&p, 1));
        assert!(!is_dirty(&p, 2), "another slot is untouched");
        assert_eq!(dirty_chunks(&read_member(&p[1]).unwrap(), 1), 2);
        // A slot past the last one: no member has it.
        assert_eq!(read_union(&p, 9).unwrap(), None);
        clear(&p, 1, None).unwrap();
        assert!(!is_dirty(&p, 1));
        assert!(bits_on(&p[0], 1).is_empty() && bits_on(&p[1], 1).is_empty());
    }

    #[test]
    fn unreadable_members_are_skipped_and_none_readable_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = mirror(dir.path());
        set_on(&p[1], 2, &[5]);
        let gone = dir.path().join("gone");
        let with_gone = vec![gone.clone(), p[1].clone()];
        assert_eq!(read_union(&with_gone, 2).unwrap().unwrap().dirty(), vec![5]);
        let e = read_union(std::slice::from_ref(&gone), 2).unwrap_err();
        assert!(e.to_string().contains("gone"), "{e}");
        assert!(
            is_dirty(std::slice::from_ref(&gone), 2),
            "unreadable = dirty"
        );
        // Clearing skips what it cannot read, and clears the rest.
        clear(&with_gone, 2, None).unwrap();
        assert!(bits_on(&p[1], 2).is_empty());
    }

    #[test]
    fn merge_ors_other_slots_into_ours_and_marks_unclean() {
        let dir = tempfile::tempdir().unwrap();
        let p = mirror(dir.path());
        assert_eq!(read_member(&p[0]).unwrap().sb.resync_offset, MAX_SECTOR);
        set_on(&p[0], 0, &[1]);
        set_on(&p[0], 2, &[2, 4]);
        set_on(&p[1], 3, &[9]);
        let n = merge(&p, 0, &[2, 3], None).unwrap();
        assert_eq!(n, 3, "the most on one member: 1, 2, 4 on a (9 on b)");
        assert_eq!(bits_on(&p[0], 0), vec![1, 2, 4]);
        assert_eq!(bits_on(&p[1], 0), vec![9]);
        assert_eq!(bits_on(&p[0], 2), vec![2, 4], "the sources keep their bits");
        for m in &p {
            assert_eq!(read_member(m).unwrap().sb.resync_offset, 0, "unclean");
        }
    }

    #[test]
    fn resize_rewrites_the_header_and_drops_bits_past_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = mirror(dir.path());
        let before = read_member(&p[0]).unwrap().bitmap[3].sb.clone();
        let chunks = before.chunks();
        assert!(chunks > 2, "{chunks}");
        set_on(&p[0], 3, &[0, chunks - 1]);
        // Half the size: the last chunk is past the new end.
        let sectors = before.sync_size / 2;
        resize(&p, 3, sectors, None).unwrap();
        for m in &p {
            let s = read_member(m).unwrap().bitmap[3].clone();
            assert_eq!(s.sb.sync_size, sectors);
            assert!(s.sb.chunks() < chunks);
        }
        assert_eq!(bits_on(&p[0], 3), vec![0]);
        assert_eq!(
            read_member(&p[0]).unwrap().bitmap[1].sb.sync_size,
            before.sync_size,
            "other slots keep theirs"
        );
    }
}
