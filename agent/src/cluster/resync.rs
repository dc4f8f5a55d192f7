//! Resync gate decisions, sans-IO: may this node's resync or recovery start, what it
//! publishes around each window, and how it hands the `resync` lock on.
//!
//! The runtime (`service::resync::ClusterGate`, the engine's sync gate in cluster mode)
//! takes the `resync` lock, reads superblocks, publishes and releases; the choices are
//! made here:
//! - before the lock ([`before_lock`]): a recovery of a member another node added waits
//!   for that node while it lives ([`remote_recovery`]);
//! - at the grant ([`check_at_grant`], [`at_grant`]): a resync with no chunk needed here
//!   runs only when the newest superblock still says unclean; a recovery only when its
//!   members are not recovered already; otherwise the lock is handed on at once;
//! - each window ([`window`]) and the end ([`end`]): what is published, in order;
//! - the wait ([`report_due`]): when a node still waiting says so.

use std::time::Duration;

use super::msg::{ClusterMsg, MsgType};
use crate::raid::{GateDecision, SyncKind};

/// What a gate does before it queues for the `resync` lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BeforeLock {
    /// Wait for the recovery the node with this slot runs.
    WaitRemote(u32),
    /// Queue for the lock.
    TakeLock,
}

/// The first step of a `kind` run; `remote` is the slot of the node that added a
/// member attached here as recovering ([`super::Engine::remote_recovery`]).
pub fn before_lock(kind: SyncKind, remote: Option<u32>) -> BeforeLock {
    match (kind, remote) {
        (SyncKind::Recovery, Some(slot)) => BeforeLock::WaitRemote(slot),
        _ => BeforeLock::TakeLock,
    }
}

/// One look at another node's recovery of a member attached here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remote {
    /// Its superblock says recovered: the run is not needed.
    Done,
    /// That node still holds its slot: look again after
    /// [`super::Timings::remote_recovery_poll`].
    Wait,
    /// That node is gone (its slot has no holder): take the recovery over.
    TakeOver,
}

/// `recovered`: a recovering member's own superblock says it is in sync; `holder`:
/// whether the recovering node's slot has a holder (`None`: the read failed, assumed
/// alive).
pub fn remote_recovery(recovered: bool, holder: Option<bool>) -> Remote {
    if recovered {
        Remote::Done
    } else if holder == Some(false) {
        Remote::TakeOver
    } else {
        Remote::Wait
    }
}

/// What to check once the `resync` lock is granted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantCheck {
    /// A resync with no chunk needed here (the array is only known unclean): does the
    /// newest superblock say in sync (another node finished it)?
    CleanOnDisk,
    /// A recovery: are its members recovered already (another node finished it)?
    RecoveredElsewhere,
    /// A resync with needed chunks (e.g. merged from a failed node's slot) always runs.
    Nothing,
}

/// The check a `kind` run of `bytes` (0: no chunk needed here) needs at the grant.
pub fn check_at_grant(kind: SyncKind, bytes: u64) -> GrantCheck {
    match kind {
        SyncKind::Resync if bytes == 0 => GrantCheck::CleanOnDisk,
        SyncKind::Resync => GrantCheck::Nothing,
        SyncKind::Recovery => GrantCheck::RecoveredElsewhere,
    }
}

/// What the gate does at the grant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Grant {
    /// Release the lock; the run is not needed ([`GateDecision::Done`]).
    Release,
    /// Publish this (RESYNCING_START) and run ([`GateDecision::Run`]).
    Run(ClusterMsg),
}

impl Grant {
    /// The engine's answer.
    pub fn decision(&self) -> GateDecision {
        match self {
            Grant::Release => GateDecision::Done,
            Grant::Run(_) => GateDecision::Run,
        }
    }
}

/// `done`: the check said finished elsewhere (ignored for [`GrantCheck::Nothing`]).
pub fn at_grant(check: GrantCheck, done: bool, slot: u32) -> Grant {
    if check != GrantCheck::Nothing && done {
        Grant::Release
    } else {
        Grant::Run(ClusterMsg::new(MsgType::ResyncingStart, slot))
    }
}

/// What the gate publishes, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Publish {
    /// Our resync window (sectors; (0, 0): none) into our slot lock's value block, for
    /// nodes that join later.
    SlotValue {
        /// First sector.
        lo: u64,
        /// End sector (exclusive).
        hi: u64,
    },
    /// This message through the token round; the window is copied only when every
    /// node acked it.
    Acked(ClusterMsg),
    /// This message through the token round; a refusal is only logged (it copies
    /// nothing).
    Logged(ClusterMsg),
    /// Release the `resync` lock: the next waiting node runs.
    ReleaseLock,
}

/// Before copying `[lo, hi)` (array bytes): the window, in sectors.
pub fn window(slot: u32, lo: u64, hi: u64) -> Vec<Publish> {
    let (lo, hi) = (lo / 512, hi / 512);
    let mut msg = ClusterMsg::new(MsgType::Resyncing, slot);
    msg.low = lo;
    msg.high = hi;
    vec![Publish::SlotValue { lo, hi }, Publish::Acked(msg)]
}

/// The run ended: clear the window everywhere and hand the lock on.
pub fn end(slot: u32) -> Vec<Publish> {
    vec![
        Publish::SlotValue { lo: 0, hi: 0 },
        Publish::Logged(ClusterMsg::new(MsgType::Resyncing, slot)),
        Publish::ReleaseLock,
    ]
}

/// Whether a node waiting for the lock, `since_report` after its last report (or the
/// start of the wait), reports again.
pub fn report_due(since_report: Duration, every: Duration) -> bool {
    since_report >= every
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recovery_of_a_member_another_node_added_waits_for_that_node() {
        assert_eq!(
            before_lock(SyncKind::Recovery, Some(2)),
            BeforeLock::WaitRemote(2)
        );
        assert_eq!(before_lock(SyncKind::Recovery, None), BeforeLock::TakeLock);
        assert_eq!(
            before_lock(SyncKind::Resync, Some(2)),
            BeforeLock::TakeLock,
            "a resync is nobody else's"
        );
        assert_eq!(remote_recovery(true, Some(true)), Remote::Done);
        assert_eq!(remote_recovery(false, Some(true)), Remote::Wait);
        assert_eq!(
            remote_recovery(false, None),
            Remote::Wait,
            "unreadable: alive"
        );
        assert_eq!(
            remote_recovery(false, Some(false)),
            Remote::TakeOver,
            "the node left mid-recovery"
        );
    }

    #[test]
    fn the_grant_hands_on_what_another_node_finished() {
        let start = ClusterMsg::new(MsgType::ResyncingStart, 1);
        let c = check_at_grant(SyncKind::Resync, 0);
        assert_eq!(c, GrantCheck::CleanOnDisk);
        assert_eq!(at_grant(c, true, 1), Grant::Release);
        assert_eq!(at_grant(c, true, 1).decision(), GateDecision::Done);
        assert_eq!(at_grant(c, false, 1), Grant::Run(start));
        assert_eq!(at_grant(c, false, 1).decision(), GateDecision::Run);
        let c = check_at_grant(SyncKind::Resync, 4096);
        assert_eq!(c, GrantCheck::Nothing);
        assert_eq!(
            at_grant(c, true, 1),
            Grant::Run(start),
            "needed chunks always run"
        );
        let c = check_at_grant(SyncKind::Recovery, 1 << 20);
        assert_eq!(c, GrantCheck::RecoveredElsewhere);
        assert_eq!(at_grant(c, true, 1), Grant::Release);
        assert_eq!(at_grant(c, false, 1), Grant::Run(start));
    }

    #[test]
    fn each_window_is_published_then_acked_in_sectors() {
        let mut m = ClusterMsg::new(MsgType::Resyncing, 3);
        m.low = 2048;
        m.high = 4096;
        assert_eq!(
            window(3, 1 << 20, 2 << 20),
            vec![Publish::SlotValue { lo: 2048, hi: 4096 }, Publish::Acked(m)]
        );
    }

    #[test]
    fn the_end_clears_the_window_and_hands_the_lock_on() {
        assert_eq!(
            end(3),
            vec![
                Publish::SlotValue { lo: 0, hi: 0 },
                Publish::Logged(ClusterMsg::new(MsgType::Resyncing, 3)),
                Publish::ReleaseLock
            ]
        );
    }

    #[test]
    fn a_waiting_node_reports_every_period() {
        let every = Duration::from_secs(300);
        assert!(!report_due(Duration::from_secs(299), every));
        assert!(report_due(every, every));
    }
}
