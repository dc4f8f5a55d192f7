//! How the takeover watch ([`super::takeover`]) reads the other nodes' slot locks each
//! period: every array lock in one `ReadValues` call, so that the cost per period does
//! not grow with the number of arrays, or lock by lock where mdserver refuses that call.

use crate::lockport::{LockClientError, Session};

/// How a period reads the slot locks: every array lock at once
/// ([`crate::lockport::LockPort::read_values`] over [`crate::cluster::ARRAYS_PREFIX`]),
/// one call per node and period whatever the number of arrays; or one call per slot
/// lock where mdserver refuses that call — it predates it, or the cluster has more
/// array locks than one call returns — tried again after [`SlotReads::PER_LOCK_FOR`].
#[derive(Default)]
pub(super) struct SlotReads {
    /// Until when to read each lock on its own.
    per_lock_until: Option<tokio::time::Instant>,
}

impl SlotReads {
    /// How long an mdserver without `ReadValues` is read lock by lock before the batch
    /// read is tried again (it may have been upgraded).
    const PER_LOCK_FOR: std::time::Duration = std::time::Duration::from_secs(300);

    /// This period's read.
    pub(super) async fn read(&mut self, session: &Session) -> SlotBatch {
        let now = tokio::time::Instant::now();
        if self.per_lock_until.is_some_and(|t| now < t) {
            return SlotBatch::PerLock;
        }
        match session.read_values(crate::cluster::ARRAYS_PREFIX).await {
            Ok(locks) => SlotBatch::Read {
                at: now,
                locks: locks
                    .into_iter()
                    .map(|l| (l.resource, (l.value, l.holders)))
                    .collect(),
            },
            // mdserver answered, but not with the locks: it predates the call, or the
            // cluster has more array locks than one call returns.
            Err(e @ LockClientError::Service { .. }) => {
                tracing::info!(
                    "takeover: reading every array lock in one call failed ({e}); reading each slot lock on its own for {:?}",
                    Self::PER_LOCK_FOR
                );
                self.per_lock_until = Some(now + Self::PER_LOCK_FOR);
                SlotBatch::PerLock
            }
            Err(e) => {
                tracing::debug!("takeover: reading the slot locks: {e}; next period");
                SlotBatch::Failed
            }
        }
    }
}

/// The slot locks as one period reads them.
pub(super) enum SlotBatch {
    /// Every array lock, read at `at` (a lock not listed has no value and no holder).
    Read {
        at: tokio::time::Instant,
        locks: std::collections::HashMap<String, (Vec<u8>, Vec<String>)>,
    },
    /// Each lock read on its own when it is needed.
    PerLock,
    /// The read failed: nothing is decided this period.
    Failed,
}

impl SlotBatch {
    /// Older than `period`.
    pub(super) fn is_stale(&self, period: std::time::Duration) -> bool {
        matches!(self, SlotBatch::Read { at, .. } if at.elapsed() > period)
    }

    /// The value block and holders of `res`; None when this period's read failed (or,
    /// lock by lock, this lock's), so that nothing is decided on it.
    pub(super) async fn get(&self, session: &Session, res: &str) -> Option<(Vec<u8>, Vec<String>)> {
        match self {
            SlotBatch::Read { locks, .. } => Some(locks.get(res).cloned().unwrap_or_default()),
            SlotBatch::PerLock => session.read_value(res).await.ok(),
            SlotBatch::Failed => None,
        }
    }
}
