//! The md-cluster protocol's timings, in one struct carried in the node's configuration
//! (`service::NodeConfig::timings`), so tests can shrink them. `Default` holds the
//! values the agent runs with.

use std::time::Duration;

/// Every deadline, period and bound of the cluster protocol on one node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timings {
    /// Deadline of one acknowledged message round, the token wait included
    /// (md-cluster's `WAIT_DLM_LOCK_TIMEOUT`).
    pub round_deadline: Duration,
    /// One queued attempt on the `resync` lock; attempts repeat until granted or the
    /// array stops.
    pub lock_attempt: Duration,
    /// How often a node still waiting for the `resync` lock says so (monitor event
    /// `ResyncPending`).
    pub pending_report: Duration,
    /// Deadline of each RESYNCING round, token wait included; kept at least twice the
    /// receivers' quiesce bound ([`crate::raid::REMOTE_QUIESCE`]) so a receiver whose
    /// writes into the window do not end refuses before the sender stops waiting.
    pub window_deadline: Duration,
    /// How often the slot holders of every joined array are read (node failure
    /// detection).
    pub takeover_period: Duration,
    /// How often a recovered slot's chunks are checked for the end of their resync.
    pub resync_poll: Duration,
    /// How long the `SlotRecovered` announcer waits at most for the recovered chunks to
    /// be resynced before it reports them as still pending.
    pub announce_deadline: Duration,
    /// How long a BITMAP_NEEDS_SYNC receiver waits for the sender to release its slot.
    pub needs_sync_wait: Duration,
    /// How often a node waiting for another node's recovery of a member it added checks
    /// whether it ended or that node is gone.
    pub remote_recovery_poll: Duration,
    /// How long a join keeps looking for a free slot while some slot is held only for a
    /// moment (another node's probe).
    pub slot_wait: Duration,
    /// Deadline of the BITMAP_NEEDS_SYNC a node publishes when it leaves dirty.
    pub leave_publish: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            round_deadline: Duration::from_secs(30),
            lock_attempt: Duration::from_secs(30),
            pending_report: Duration::from_secs(300),
            window_deadline: Duration::from_secs(30),
            takeover_period: Duration::from_millis(500),
            resync_poll: Duration::from_millis(100),
            announce_deadline: Duration::from_secs(6 * 3600),
            needs_sync_wait: Duration::from_secs(10),
            remote_recovery_poll: Duration::from_millis(250),
            slot_wait: Duration::from_secs(10),
            leave_publish: Duration::from_secs(10),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_deadline_outlasts_the_receivers_quiesce_bound() {
        let t = Timings::default();
        assert!(t.window_deadline >= 2 * crate::raid::REMOTE_QUIESCE);
        assert!(t.resync_poll < t.announce_deadline);
    }
}
