//! Join decisions, sans-IO: what a joining node makes of the other slots it probes and
//! of a slot search where every slot is busy. The runtime (`service::join`) takes the
//! slot locks, reads the value blocks and merges the bits.

use super::msg::ResyncInfo;

/// What a no-queue probe of another slot found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Probe {
    /// Granted: the slot is unused; it has this many dirty chunks on disk.
    Free {
        /// Dirty chunks of the slot (first readable member).
        dirty: u64,
    },
    /// Held by a live node; its value block says this.
    Held(ResyncInfo),
}

/// What the joiner does with one probed slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gather {
    /// Nothing (a clean free slot, or a live node not resyncing).
    Nothing,
    /// Merge its bits into ours (a free slot left dirty by a node that died or left
    /// dirty while nobody took it over).
    Merge,
    /// Install this live node's resync window (sectors) once the engine runs.
    RemoteWindow(u64, u64),
}

/// The joiner's decision for one probed slot.
pub fn gather(probe: Probe) -> Gather {
    match probe {
        Probe::Free { dirty } if dirty > 0 => Gather::Merge,
        Probe::Free { .. } => Gather::Nothing,
        Probe::Held(w) if w.active() => Gather::RemoteWindow(w.lo, w.hi),
        Probe::Held(_) => Gather::Nothing,
    }
}

/// Whether the joiner merges anything: another slot to merge, or dirty bits in its own
/// slot (a previous crash of this node: the superblock's clean flag is shared by every
/// node, so another node's clean stop may have marked the array clean since).
pub fn merge_needed(others: usize, own_dirty: u64) -> bool {
    others > 0 || own_dirty > 0
}

/// What a slot search where every slot was busy means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Busy {
    /// Every slot is held by a different node, each one a member: EBUSY now.
    Full,
    /// Some slot is only held for a moment (a node holding two: another joiner's
    /// probe, a survivor's recovery; or a slot released since): try again, bounded.
    Passing,
}

/// From the holders of every slot (one list per slot): a member holds exactly one
/// slot, so a node seen twice, or a slot without holder, is passing.
pub fn all_busy(holders: &[Vec<String>]) -> Busy {
    let mut seen = std::collections::HashSet::new();
    let members = holders
        .iter()
        .all(|h| !h.is_empty() && h.iter().all(|node| seen.insert(node.as_str())));
    if members {
        Busy::Full
    } else {
        Busy::Passing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(v: &[&[&str]]) -> Vec<Vec<String>> {
        v.iter()
            .map(|s| s.iter().map(|n| n.to_string()).collect())
            .collect()
    }

    #[test]
    fn a_slot_held_by_a_probe_is_not_a_member_slot() {
        assert_eq!(all_busy(&h(&[&["n1"], &["n2"], &["n3"]])), Busy::Full);
        // n3 holds its own slot and probes slot 3.
        assert_eq!(
            all_busy(&h(&[&["n1"], &["n2"], &["n3"], &["n3"]])),
            Busy::Passing
        );
        // Released between the acquire and the read.
        assert_eq!(all_busy(&h(&[&["n1"], &[]])), Busy::Passing);
    }

    #[test]
    fn free_dirty_slots_are_merged_live_windows_installed() {
        assert_eq!(gather(Probe::Free { dirty: 3 }), Gather::Merge);
        assert_eq!(gather(Probe::Free { dirty: 0 }), Gather::Nothing);
        let w = ResyncInfo {
            lo: 2048,
            hi: 4096,
            pr_key: 7,
        };
        assert_eq!(gather(Probe::Held(w)), Gather::RemoteWindow(2048, 4096));
        assert_eq!(
            gather(Probe::Held(ResyncInfo::default())),
            Gather::Nothing,
            "a live node not resyncing"
        );
        assert!(merge_needed(1, 0));
        assert!(merge_needed(0, 5), "our own dirty bits from a crash");
        assert!(!merge_needed(0, 0));
    }
}
