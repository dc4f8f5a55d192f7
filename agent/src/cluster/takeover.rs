//! Slot takeover decisions, sans-IO: when a survivor recovers another node's bitmap
//! slot, which reservation key it preempts, what it announces, and when the recovered
//! chunks count as resynced.
//!
//! The runtime (`service::takeover`) reads the slot holders every
//! [`super::Timings::takeover_period`], lists the live nodes, takes the slot lock,
//! preempts, reads/merges/clears the bits and emits the events; every choice on the
//! way is made here:
//! - [`SlotWatch`]: a slot that had holders and has none now is checked
//!   ([`Watch::CheckLiveness`]); holders that have no live session any more are dead
//!   and their slot is recovered ([`dead_holders`]); a holder that left cleanly (its
//!   session lives on) is not;
//! - [`ReleaseWait`]: a BITMAP_NEEDS_SYNC receiver waits, with backoff, for the sender
//!   to release its slot, bounded by [`super::Timings::needs_sync_wait`];
//! - [`key_to_preempt`]: the dead holder's reservation key, from its slot's value
//!   block;
//! - [`after_merge`]: the events once the bits are merged into this node's bitmap;
//! - [`Announcer`]: `SlotRecovered` once none of the merged chunks is needed any more,
//!   or a report of what is left when the resync that ran over them ended, the array
//!   stopped, or [`super::Timings::announce_deadline`] passed.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use super::msg::ResyncInfo;
use crate::reserve::PrKey;

/// What the last read of a slot's holders means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watch {
    /// Held, or was not held before: nothing to do.
    Nothing,
    /// Had holders `prev` and has none now: are they still alive?
    CheckLiveness {
        /// The holders seen last time.
        prev: Vec<String>,
    },
}

/// The holders of the other slots of one array, as last read.
#[derive(Debug, Clone, Default)]
pub struct SlotWatch {
    last: HashMap<u32, Vec<String>>,
}

impl SlotWatch {
    /// Records the holders of `slot` read now.
    pub fn seen(&mut self, slot: u32, holders: Vec<String>) -> Watch {
        let empty = holders.is_empty();
        let prev = self.last.insert(slot, holders).unwrap_or_default();
        if !empty || prev.is_empty() {
            return Watch::Nothing;
        }
        Watch::CheckLiveness { prev }
    }

    /// The live nodes could not be listed: forget `slot`, so the next read decides
    /// from scratch.
    pub fn forget(&mut self, slot: u32) {
        self.last.remove(&slot);
    }
}

/// What to do with a slot whose holders `prev` are gone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// They released it while alive (a clean leave): its bits are clean.
    CleanLeave,
    /// These holders died holding it: recover the slot.
    Recover {
        /// The dead holders.
        dead: Vec<String>,
    },
}

/// Which of `prev` died: not among `live` and not this node.
pub fn dead_holders(prev: Vec<String>, live: &HashSet<String>, me: &str) -> Decision {
    let dead: Vec<String> = prev
        .into_iter()
        .filter(|h| !live.contains(h) && h != me)
        .collect();
    if dead.is_empty() {
        Decision::CleanLeave
    } else {
        Decision::Recover { dead }
    }
}

/// One look at a slot a BITMAP_NEEDS_SYNC sender should release.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStep {
    /// Released: recover it.
    Recover,
    /// Still held: look again after this pause.
    Sleep(Duration),
    /// Still held at the deadline: not recovered here.
    GiveUp,
}

/// The bounded wait for a slot's release.
#[derive(Debug, Clone, Copy)]
pub struct ReleaseWait {
    limit: Duration,
    backoff: Duration,
}

impl ReleaseWait {
    /// Waits at most `limit` in all.
    pub fn new(limit: Duration) -> ReleaseWait {
        ReleaseWait {
            limit,
            backoff: Duration::from_millis(50),
        }
    }

    /// `held`: whether the slot still has a holder (`None`: the read failed) after
    /// `elapsed` of waiting.
    pub fn step(&mut self, held: Option<bool>, elapsed: Duration) -> WaitStep {
        if held == Some(false) {
            return WaitStep::Recover;
        }
        if elapsed + self.backoff >= self.limit {
            return WaitStep::GiveUp;
        }
        let pause = self.backoff;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(1));
        WaitStep::Sleep(pause)
    }
}

/// The reservation key to preempt when taking over slot `slot`: the one its holder
/// published in the slot lock's value block `value` — none when no key was published
/// (a holder of an older version), when it is another slot's, or when it is ours.
pub fn key_to_preempt(value: &[u8], slot: u32, mine: PrKey) -> Option<PrKey> {
    let key = PrKey(ResyncInfo::decode(value).pr_key);
    (key.0 != 0 && key.slot() == slot && key != mine).then_some(key)
}

/// What follows a merge of a recovered slot's bits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AfterMerge {
    /// Nothing was dirty: `SlotTakenOver` and `SlotRecovered` (0 chunks) at once.
    Recovered,
    /// `SlotTakenOver` with the count, then watch the chunks ([`Announcer`]).
    Watch,
}

/// The announcement after `chunks` dirty chunks were merged.
pub fn after_merge(chunks: u64) -> AfterMerge {
    if chunks == 0 {
        AfterMerge::Recovered
    } else {
        AfterMerge::Watch
    }
}

/// One look at the merged chunks of a recovered slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResyncSeen {
    /// The same engine still runs the array here.
    pub array_current: bool,
    /// How many of the merged chunks are still needed.
    pub chunks_left: u64,
    /// A resync runs now.
    pub resync_running: bool,
    /// A resync is requested and waits to run (its gate, or a run before it).
    pub resync_pending: bool,
}

/// What the announcer does after one look.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Announce {
    /// Look again after [`super::Timings::resync_poll`].
    Wait,
    /// Every merged chunk is resynced: `SlotRecovered`.
    Recovered,
    /// The array stopped first: the chunks stay dirty in this node's slot and are
    /// resynced at its next assembly.
    Stopped,
    /// The resync that ran over them ended with this many still needed (a failed run,
    /// or one that stopped short); a later run resyncs them.
    ResyncEnded {
        /// Chunks still needed.
        left: u64,
    },
    /// The deadline passed with this many still needed.
    Deadline {
        /// Chunks still needed.
        left: u64,
    },
}

/// Watches a recovered slot's merged chunks until they are resynced, bounded by the
/// resync run's end and a deadline.
#[derive(Debug, Clone, Copy)]
pub struct Announcer {
    deadline: Duration,
    ran: bool,
}

impl Announcer {
    /// Gives up after `deadline` of watching.
    pub fn new(deadline: Duration) -> Announcer {
        Announcer {
            deadline,
            ran: false,
        }
    }

    /// One look, `elapsed` after the merge.
    pub fn look(&mut self, seen: ResyncSeen, elapsed: Duration) -> Announce {
        if !seen.array_current {
            return Announce::Stopped;
        }
        if seen.chunks_left == 0 {
            return Announce::Recovered;
        }
        if seen.resync_running {
            self.ran = true;
        } else if self.ran && !seen.resync_pending {
            return Announce::ResyncEnded {
                left: seen.chunks_left,
            };
        }
        if elapsed >= self.deadline {
            return Announce::Deadline {
                left: seen.chunks_left,
            };
        }
        Announce::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn live(n: &[&str]) -> HashSet<String> {
        n.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_slot_whose_holder_died_is_recovered_a_clean_leave_is_not() {
        let mut w = SlotWatch::default();
        assert_eq!(w.seen(1, vec![]), Watch::Nothing, "never held");
        assert_eq!(w.seen(1, vec!["n2".into()]), Watch::Nothing, "held");
        assert_eq!(w.seen(1, vec!["n2".into()]), Watch::Nothing);
        let Watch::CheckLiveness { prev } = w.seen(1, vec![]) else {
            panic!("released: check liveness")
        };
        assert_eq!(prev, vec!["n2".to_string()]);
        assert_eq!(w.seen(1, vec![]), Watch::Nothing, "decided once");
        // n2's session is gone: recover; alive (it stopped the array): clean.
        assert_eq!(
            dead_holders(prev.clone(), &live(&["n1", "n3"]), "n1"),
            Decision::Recover {
                dead: vec!["n2".into()]
            }
        );
        assert_eq!(
            dead_holders(prev, &live(&["n1", "n2"]), "n1"),
            Decision::CleanLeave
        );
        // This node's own former holding (a probe) is never "dead".
        assert_eq!(
            dead_holders(vec!["n1".into()], &live(&[]), "n1"),
            Decision::CleanLeave
        );
    }

    #[test]
    fn a_node_that_leaves_mid_round_is_checked_again_after_a_failed_listing() {
        let mut w = SlotWatch::default();
        w.seen(2, vec!["n3".into()]);
        assert!(matches!(w.seen(2, vec![]), Watch::CheckLiveness { .. }));
        // The node list could not be read: forget, and the next read that sees the
        // slot empty does not decide (no holder before it). The holder seen again
        // and then gone is checked again.
        w.forget(2);
        assert_eq!(w.seen(2, vec![]), Watch::Nothing);
        w.seen(2, vec!["n3".into()]);
        assert!(matches!(w.seen(2, vec![]), Watch::CheckLiveness { .. }));
    }

    #[test]
    fn the_needs_sync_wait_backs_off_and_is_bounded() {
        let mut w = ReleaseWait::new(Duration::from_secs(1));
        assert_eq!(
            w.step(Some(true), Duration::ZERO),
            WaitStep::Sleep(Duration::from_millis(50))
        );
        assert_eq!(
            w.step(None, Duration::from_millis(50)),
            WaitStep::Sleep(Duration::from_millis(100)),
            "an unreadable slot counts as still held"
        );
        assert_eq!(
            w.step(Some(true), Duration::from_millis(150)),
            WaitStep::Sleep(Duration::from_millis(200))
        );
        assert_eq!(
            w.step(Some(false), Duration::from_millis(350)),
            WaitStep::Recover
        );
        assert_eq!(
            w.step(Some(true), Duration::from_millis(700)),
            WaitStep::GiveUp,
            "700 ms + the next 400 ms pause pass the 1 s bound"
        );
    }

    #[test]
    fn exactly_the_dead_slots_published_key_is_preempted() {
        let (k0, k1) = (PrKey::new(0, 7), PrKey::new(1, 8));
        let v = |k: u64| {
            ResyncInfo {
                lo: 0,
                hi: 0,
                pr_key: k,
            }
            .encode()
        };
        assert_eq!(key_to_preempt(&v(k1.0), 1, k0), Some(k1));
        assert_eq!(key_to_preempt(&v(k1.0), 2, k0), None, "another slot's key");
        assert_eq!(key_to_preempt(&v(k0.0), 0, k0), None, "our own key");
        assert_eq!(key_to_preempt(&v(k1.0)[..16], 1, k0), None, "no key");
        assert_eq!(key_to_preempt(&[], 1, k0), None);
    }

    #[test]
    fn after_merge_announces_at_once_only_when_nothing_was_dirty() {
        assert_eq!(after_merge(0), AfterMerge::Recovered);
        assert_eq!(after_merge(5), AfterMerge::Watch);
    }

    fn seen(left: u64, running: bool, pending: bool) -> ResyncSeen {
        ResyncSeen {
            array_current: true,
            chunks_left: left,
            resync_running: running,
            resync_pending: pending,
        }
    }

    #[test]
    fn recovered_once_the_chunks_are_resynced() {
        let mut a = Announcer::new(Duration::from_secs(60));
        let s = Duration::from_secs(1);
        assert_eq!(a.look(seen(5, false, true), s), Announce::Wait, "pending");
        assert_eq!(a.look(seen(3, true, false), s), Announce::Wait, "running");
        assert_eq!(a.look(seen(0, false, false), s), Announce::Recovered);
    }

    #[test]
    fn a_dead_slots_bits_not_yet_recovered_are_reported_not_announced() {
        // The resync ran and ended with chunks still needed (a failed run).
        let mut a = Announcer::new(Duration::from_secs(60));
        let s = Duration::from_secs(1);
        assert_eq!(
            a.look(seen(5, false, false), s),
            Announce::Wait,
            "not run yet"
        );
        assert_eq!(a.look(seen(4, true, false), s), Announce::Wait);
        assert_eq!(
            a.look(seen(2, false, true), s),
            Announce::Wait,
            "a rerun is queued"
        );
        assert_eq!(
            a.look(seen(2, false, false), s),
            Announce::ResyncEnded { left: 2 }
        );
        // Never ran (its gate waits for another node's resync): the deadline ends it.
        let mut a = Announcer::new(Duration::from_secs(60));
        assert_eq!(a.look(seen(5, false, true), s), Announce::Wait);
        assert_eq!(
            a.look(seen(5, false, true), Duration::from_secs(60)),
            Announce::Deadline { left: 5 }
        );
        // The array stopped: its chunks stay in this node's slot.
        let mut gone = seen(5, false, false);
        gone.array_current = false;
        assert_eq!(a.look(gone, s), Announce::Stopped);
    }
}
