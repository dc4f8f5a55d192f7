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
//!   session lives on) is not. A slot free at both reads whose lock value block
//!   changed in between (every join publishes a key made from a fresh fencing token)
//!   was held by a node never seen: its bits on disk are read once
//!   ([`Watch::CheckBits`]) and dirty bits are recovered as for a dead holder
//!   ([`unseen_holder`]);
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
    /// Held, or free and untouched since the last read: nothing to do.
    Nothing,
    /// Had holders `prev` and has none now: are they still alive?
    CheckLiveness {
        /// The holders seen last time.
        prev: Vec<String>,
        /// The value block changed since that read: a node may have joined (and
        /// published a new key) after they left.
        changed: bool,
    },
    /// Free now and at the last read (or never read before), but its value block is
    /// not what that read saw: some node took the slot and lost it in between, unseen.
    /// Its bits on disk decide ([`unseen_holder`]).
    CheckBits,
}

/// One read of a slot: its holders and its lock's value block.
#[derive(Debug, Clone, Default)]
struct Seen {
    holders: Vec<String>,
    value: Vec<u8>,
}

/// The holders and value block of the other slots of one array, as last read.
///
/// Every join publishes its reservation key, made from the slot lock's fresh fencing
/// token, in the value block (which outlives the holding): a value block that changed
/// while no holder was seen means the slot was taken and released between two reads.
/// A slot read for the first time that is free with a value block already written
/// counts as changed: someone held it before, maybe after this node's join looked.
#[derive(Debug, Clone, Default)]
pub struct SlotWatch {
    last: HashMap<u32, Seen>,
}

impl SlotWatch {
    /// Records the holders and value block of `slot` read now.
    pub fn seen(&mut self, slot: u32, holders: Vec<String>, value: Vec<u8>) -> Watch {
        let empty = holders.is_empty();
        let prev = self.last.insert(slot, Seen { holders, value });
        if !empty {
            return Watch::Nothing;
        }
        let now = &self.last[&slot].value;
        let Some(prev) = prev else {
            return if now.is_empty() {
                Watch::Nothing
            } else {
                Watch::CheckBits
            };
        };
        let changed = prev.value != *now;
        match (prev.holders.is_empty(), changed) {
            (false, _) => Watch::CheckLiveness {
                prev: prev.holders,
                changed,
            },
            (true, true) => Watch::CheckBits,
            (true, false) => Watch::Nothing,
        }
    }

    /// The live nodes or the slot's bits could not be read: forget `slot`, so the
    /// next read decides from scratch (a free slot with a value block is checked).
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
        /// The dead holders (empty: a holder that was never seen).
        dead: Vec<String>,
    },
    /// They left alive, but the value block changed since: another node may have
    /// held it in between; its bits on disk decide ([`unseen_holder`]).
    CheckBits,
}

/// Which of `prev` died: not among `live` and not this node. `changed`: the slot's
/// value block changed since `prev` were seen ([`Watch::CheckLiveness`]).
pub fn dead_holders(
    prev: Vec<String>,
    live: &HashSet<String>,
    me: &str,
    changed: bool,
) -> Decision {
    let dead: Vec<String> = prev
        .into_iter()
        .filter(|h| !live.contains(h) && h != me)
        .collect();
    match (dead.is_empty(), changed) {
        (false, _) => Decision::Recover { dead },
        (true, true) => Decision::CheckBits,
        (true, false) => Decision::CleanLeave,
    }
}

/// A free slot that some unseen node held between two reads, whose bits on disk
/// (their union over the members) read `dirty`: dirty bits are a holder that died (or
/// left dirty) and are recovered as for a dead holder; clean bits are a clean leave
/// (or a holder that wrote nothing) and nothing is done.
pub fn unseen_holder(dirty: bool) -> Decision {
    if dirty {
        Decision::Recover { dead: Vec::new() }
    } else {
        Decision::CleanLeave
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

    fn h(n: &str) -> Vec<String> {
        vec![n.to_string()]
    }

    #[test]
    fn a_slot_whose_holder_died_is_recovered_a_clean_leave_is_not() {
        let mut w = SlotWatch::default();
        let v = b"key of n2".to_vec();
        assert_eq!(w.seen(1, vec![], vec![]), Watch::Nothing, "never held");
        assert_eq!(w.seen(1, h("n2"), v.clone()), Watch::Nothing, "held");
        assert_eq!(w.seen(1, h("n2"), v.clone()), Watch::Nothing);
        let Watch::CheckLiveness { prev, changed } = w.seen(1, vec![], v.clone()) else {
            panic!("released: check liveness")
        };
        assert_eq!(prev, h("n2"));
        assert!(!changed);
        assert_eq!(w.seen(1, vec![], v), Watch::Nothing, "decided once");
        // n2's session is gone: recover; alive (it stopped the array): clean.
        assert_eq!(
            dead_holders(prev.clone(), &live(&["n1", "n3"]), "n1", false),
            Decision::Recover {
                dead: vec!["n2".into()]
            }
        );
        assert_eq!(
            dead_holders(prev, &live(&["n1", "n2"]), "n1", false),
            Decision::CleanLeave
        );
        // This node's own former holding (a probe) is never "dead".
        assert_eq!(
            dead_holders(h("n1"), &live(&[]), "n1", false),
            Decision::CleanLeave
        );
    }

    #[test]
    fn a_slot_held_and_lost_between_two_reads_has_its_bits_checked_once() {
        let mut w = SlotWatch::default();
        let (k1, k2) = (b"key, token 7".to_vec(), b"key, token 9".to_vec());
        // Free at the first read, value block empty (never held): nothing.
        assert_eq!(w.seen(3, vec![], vec![]), Watch::Nothing);
        // A node joined (published k1) and died before the next read: the slot is
        // free again, but its value block changed.
        assert_eq!(w.seen(3, vec![], k1.clone()), Watch::CheckBits);
        assert_eq!(
            w.seen(3, vec![], k1.clone()),
            Watch::Nothing,
            "checked once"
        );
        // Dirty on disk: recover as for a dead holder (none seen by name); clean (a
        // clean leave, or a holder that wrote nothing): nothing.
        assert_eq!(unseen_holder(true), Decision::Recover { dead: vec![] });
        assert_eq!(unseen_holder(false), Decision::CleanLeave);
        // Once more, with another token.
        assert_eq!(w.seen(3, vec![], k2.clone()), Watch::CheckBits);
        // Held and seen, then gone with the value unchanged: the liveness decides.
        assert_eq!(w.seen(3, h("n4"), k2.clone()), Watch::Nothing);
        assert_eq!(
            w.seen(3, vec![], k2.clone()),
            Watch::CheckLiveness {
                prev: h("n4"),
                changed: false
            }
        );
        // n4 seen, left alive, then another node joined and died before the next read:
        // n4 is alive, but the value changed: the bits decide.
        assert_eq!(w.seen(3, h("n4"), k2.clone()), Watch::Nothing);
        let Watch::CheckLiveness { prev, changed } = w.seen(3, vec![], k1) else {
            panic!("released: check liveness")
        };
        assert!(changed);
        assert_eq!(
            dead_holders(prev.clone(), &live(&["n1", "n4"]), "n1", changed),
            Decision::CheckBits
        );
        // A dead holder seen by name is recovered whatever the value did.
        assert_eq!(
            dead_holders(prev, &live(&["n1"]), "n1", changed),
            Decision::Recover { dead: h("n4") }
        );
    }

    #[test]
    fn a_free_slot_first_read_with_a_value_block_is_checked() {
        // This node's join probed the slot free; a node then joined it and died before
        // the first takeover read: the value block is all that is left of it.
        let mut w = SlotWatch::default();
        assert_eq!(w.seen(1, vec![], b"key".to_vec()), Watch::CheckBits);
        assert_eq!(w.seen(1, vec![], b"key".to_vec()), Watch::Nothing);
        // Held at the first read: nothing until it is released.
        assert_eq!(w.seen(2, h("n3"), b"key".to_vec()), Watch::Nothing);
    }

    #[test]
    fn a_node_that_leaves_mid_round_is_checked_again_after_a_failed_listing() {
        let mut w = SlotWatch::default();
        let v = b"key of n3".to_vec();
        w.seen(2, h("n3"), v.clone());
        assert!(matches!(
            w.seen(2, vec![], v.clone()),
            Watch::CheckLiveness { .. }
        ));
        // The node list could not be read: forget, and the next read checks the
        // slot's bits (free, with a value block: it was held). The holder seen again
        // and then gone is checked again.
        w.forget(2);
        assert_eq!(w.seen(2, vec![], v.clone()), Watch::CheckBits);
        w.seen(2, h("n3"), v.clone());
        assert!(matches!(w.seen(2, vec![], v), Watch::CheckLiveness { .. }));
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
