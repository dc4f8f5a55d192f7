//! Resync coordination of a clustered array (RFC 0001 "Resync coordination"): the
//! engine's [`SyncGate`] in cluster mode. The decisions (may a run start, what each
//! window and the end publish) are [`crate::cluster::resync`]'s; this module carries
//! them out against the lock service and the members.
//!
//! - **begin**: take `md/<uuid>/resync` exclusive, queued in attempts of
//!   [`crate::cluster::Timings::lock_attempt`] until granted (the engine shows
//!   `resync=PENDING` meanwhile; a stop cancels the wait and the request is
//!   withdrawn). Once granted: publish RESYNCING_START. A resync with no chunk needed
//!   here (this node only knows the array is unclean) reads the newest superblock
//!   first: `resync_offset` at MaxSector means another node finished it — release
//!   and answer [`GateDecision::Done`]. A resync with needed chunks (e.g. merged from
//!   a failed node's slot) always runs.
//!   A recovery whose members' own superblocks already say recovered (another node
//!   held the lock and finished) marks them in sync here and answers `Done`. A member
//!   another node added (attached here as recovering) is that node's to recover: this
//!   node waits (pending) until its superblock says recovered, and takes the recovery
//!   over only when that node's slot lock has no holder any more.
//! - **window** (sized to pass in a few seconds, at most 32 MiB,
//!   [`crate::raid::GATE_WINDOW`]): write `ResyncInfo{lo, hi}` (sectors) into our slot
//!   lock's value block and send RESYNCING(lo, hi) through the token round; receivers
//!   hold writes in the window and read from the first mirror there
//!   (`Raid1::set_remote_resync_window`), and show `resync=REMOTE`. A receiver acks
//!   once its writes in flight there ended and none of its member failures is
//!   unrecorded; the engine copies the window only when every node acked (a refusal
//!   or a missing ack: announced again, see `raid::sync`).
//! - **end**: clear the slot value, send RESYNCING(0, 0), release `resync`: the next
//!   waiting node (or a survivor after a failure: the lock service hands the lock on
//!   when the holder's lease expires) runs next.
//!
//! The wait for `resync` has no overall deadline, by design: giving up would leave the
//! array unsynced (md-cluster's PENDING waits too). Each attempt is bounded, the wait
//! ends with the array (stop), and it is never silent: mdstat shows `resync=PENDING`
//! and every [`crate::cluster::Timings::pending_report`] of waiting the monitor gets a
//! `ResyncPending` event naming the holder.
//!
//! RESYNCING_START and the end's RESYNCING(0, 0) are logged when not acknowledged:
//! they copy nothing. The window is also in the slot value for nodes that join later.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use crate::lockport::{Mode, Wait};
use mdcluster_proto::v1::Errno;

use super::cluster_array::ClusterArray;
use super::message::{self, Change};
use super::Node;
use crate::cluster::resync::{
    at_grant, before_lock, check_at_grant, end, remote_recovery, report_due, window, BeforeLock,
    Grant, GrantCheck, Publish, Remote,
};
use crate::cluster::{resync_lock, slot_lock, ClusterMsg, ResyncInfo};
use crate::format::io::read_member;
use crate::format::superblock::MAX_SECTOR;
use crate::raid::{GateDecision, GateFuture, MetaWrite, SyncGate, SyncKind};

/// The gate of one clustered array on this node.
pub struct ClusterGate {
    node: Weak<Node>,
    array: Arc<ClusterArray>,
    /// The token of the held `resync` lock.
    held: Mutex<Option<u64>>,
}

/// Withdraws a queued `resync` request when a wait is cancelled (array stopped).
struct WithdrawOnDrop {
    node: Weak<Node>,
    res: String,
    armed: bool,
}

impl Drop for WithdrawOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        if let Some(session) = self.node.upgrade().and_then(|n| n.session()) {
            let res = std::mem::take(&mut self.res);
            if let Ok(h) = tokio::runtime::Handle::try_current() {
                h.spawn(async move {
                    // Token 0: whatever request this session has, also a wait.
                    let _ = session.release(&res, 0).await;
                });
            }
        }
    }
}

impl ClusterGate {
    /// The gate of clustered array `array` on `node`.
    pub fn new(node: &Arc<Node>, array: Arc<ClusterArray>) -> Self {
        ClusterGate {
            node: Arc::downgrade(node),
            array,
            held: Mutex::new(None),
        }
    }

    fn name(&self) -> &str {
        self.array.name()
    }

    /// Carries out what the decisions publish, in order; `Err` when an acked message
    /// was not acknowledged by every node (the rest is not done then).
    async fn publish(&self, steps: Vec<Publish>) -> Result<(), String> {
        for step in steps {
            match step {
                Publish::SlotValue { lo, hi } => self.publish_window(lo, hi).await,
                Publish::Acked(msg) => self.send_acked(msg).await?,
                Publish::Logged(msg) => {
                    if let Err(e) = self.send_acked(msg).await {
                        tracing::warn!(array = self.name(), kind = ?msg.kind, "{e}");
                    }
                }
                Publish::ReleaseLock => self.release().await,
            }
        }
        Ok(())
    }

    /// Sends `msg` through the token round; `Err` unless every joined node acked it.
    async fn send_acked(&self, msg: ClusterMsg) -> Result<(), String> {
        let Some(node) = self.node.upgrade() else {
            return Err(format!("array {}: the node is shutting down", self.name()));
        };
        let Some(session) = node.session() else {
            return Err(format!(
                "node {}: array {}: no session with mdserver",
                node.name(),
                self.name()
            ));
        };
        message::round(
            self.array.target(&session, node.name()),
            msg,
            node.timings().window_deadline,
            async { Ok(Change::Applied) },
            async {},
        )
        .await
        .map(|_| ())
        .map_err(|e| e.message)
    }

    /// Writes our resync window into our slot lock's value block.
    async fn publish_window(&self, lo: u64, hi: u64) {
        let Some(session) = self.node.upgrade().and_then(|n| n.session()) else {
            return;
        };
        let m = self.array.membership();
        let res = slot_lock(&m.uuid, m.slot);
        let v = ResyncInfo {
            lo,
            hi,
            pr_key: m.pr_key().0,
        }
        .encode();
        if let Err(e) = session.write_value(&res, m.token, &v).await {
            tracing::warn!(array = self.name(), lock = %res, "write resync window: {e}");
        }
    }

    /// Whether the newest superblock says the array is in sync (`resync_offset` at
    /// MaxSector).
    async fn clean_on_disk(&self) -> bool {
        let paths = self.array.members().to_vec();
        tokio::task::spawn_blocking(move || {
            paths
                .iter()
                .filter_map(|p| read_member(p).ok())
                .max_by_key(|m| m.sb.events)
                .is_some_and(|m| m.sb.resync_offset == MAX_SECTOR)
        })
        .await
        .unwrap_or(false)
    }

    /// Marks in sync every member recovering here whose own superblock says it is
    /// recovered (another node held `resync` and finished it). Returns whether any was.
    async fn recovered_elsewhere(&self) -> bool {
        let Some((raid, _)) = self.node.upgrade().and_then(|n| n.raid_of(self.name())) else {
            return false;
        };
        let recovering: Vec<PathBuf> = raid
            .status()
            .members
            .iter()
            .filter(|m| {
                !m.removed && matches!(m.state, crate::raid::MemberState::Recovering { .. })
            })
            .map(|m| PathBuf::from(&m.path))
            .collect();
        let done: Vec<PathBuf> = tokio::task::spawn_blocking(move || {
            recovering
                .into_iter()
                .filter(|p| {
                    read_member(p).is_ok_and(|m| {
                        m.sb.feature_map & crate::format::superblock::feature::RECOVERY_OFFSET == 0
                            && matches!(m.sb.role(), crate::format::superblock::DevRole::Active(_))
                    })
                })
                .collect()
        })
        .await
        .unwrap_or_default();
        let mut any = false;
        for p in &done {
            // The recovering node wrote it to the superblocks: follow, do not write.
            any |= raid.mark_recovered(p, MetaWrite::Following).await;
        }
        any
    }

    /// A member another node (slot `slot`) added is recovered by that node while it
    /// holds its slot: wait here (pending) until its superblock says recovered (`Done`)
    /// or that node is gone (`None`: this node takes the recovery over).
    async fn wait_remote_recovery(&self, slot: u32) -> Option<GateDecision> {
        loop {
            let recovered = self.recovered_elsewhere().await;
            let node = self.node.upgrade()?;
            let holder = if recovered {
                None
            } else {
                match node.session() {
                    Some(s) => s
                        .read_value(&slot_lock(self.array.uuid(), slot))
                        .await
                        .ok()
                        .map(|(_, holders)| !holders.is_empty()),
                    None => None,
                }
            };
            match remote_recovery(recovered, holder) {
                Remote::Done => {
                    self.array.engine().clear_remote_recovery();
                    return Some(GateDecision::Done);
                }
                Remote::TakeOver => {
                    tracing::warn!(
                        array = self.name(),
                        slot,
                        "the node recovering a member is gone; taking the recovery over"
                    );
                    self.array.engine().clear_remote_recovery();
                    return None;
                }
                Remote::Wait => {}
            }
            let poll = node.timings().remote_recovery_poll;
            drop(node);
            tokio::time::sleep(poll).await;
        }
    }

    async fn begin_inner(&self, kind: SyncKind, bytes: u64) -> GateDecision {
        let remote = self.array.engine().remote_recovery();
        if let BeforeLock::WaitRemote(slot) = before_lock(kind, remote) {
            if let Some(d) = self.wait_remote_recovery(slot).await {
                return d;
            }
        }
        let res = resync_lock(self.array.uuid());
        let waiting_since = tokio::time::Instant::now();
        let mut last_report = waiting_since;
        let mut backoff = Duration::from_millis(200);
        let mut guard = WithdrawOnDrop {
            node: self.node.clone(),
            res: res.clone(),
            armed: true,
        };
        let token = loop {
            let Some(node) = self.node.upgrade() else {
                guard.armed = false;
                return GateDecision::Later;
            };
            let timings = *node.timings();
            let Some(session) = node.session() else {
                drop(node);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            };
            drop(node);
            match session
                .acquire(&res, Mode::Exclusive, Wait::Queue(timings.lock_attempt))
                .await
            {
                Ok(g) => {
                    crate::metrics::agent().lock_wait("resync", waiting_since.elapsed());
                    break g.token;
                }
                Err(e) if e.errno() == Errno::Etimedout => {
                    tracing::info!(
                        array = self.name(),
                        ?kind,
                        "still waiting for the resync lock: {e}"
                    );
                    if report_due(last_report.elapsed(), timings.pending_report) {
                        last_report = tokio::time::Instant::now();
                        self.report_pending(&session, &res, kind, waiting_since.elapsed())
                            .await;
                    }
                }
                Err(e) => {
                    tracing::warn!(
                        array = self.name(),
                        ?kind,
                        "resync lock: {e}; retrying in {backoff:?}"
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        };
        guard.armed = false;
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = Some(token);
        let check = check_at_grant(kind, bytes);
        let done = match check {
            GrantCheck::CleanOnDisk => self.clean_on_disk().await,
            GrantCheck::RecoveredElsewhere => self.recovered_elsewhere().await,
            GrantCheck::Nothing => false,
        };
        let grant = at_grant(check, done, self.array.slot());
        match &grant {
            Grant::Release => {
                tracing::info!(
                    array = self.name(),
                    ?kind,
                    "resync lock granted; finished elsewhere, handing it on"
                );
                self.release().await;
            }
            Grant::Run(start) => {
                tracing::info!(array = self.name(), ?kind, token, "resync lock granted");
                if let Err(e) = self.publish(vec![Publish::Logged(*start)]).await {
                    tracing::warn!(array = self.name(), "{e}");
                }
            }
        }
        grant.decision()
    }

    /// A `ResyncPending` event: how long this node has waited and who holds `resync`.
    async fn report_pending(
        &self,
        session: &crate::lockport::Session,
        res: &str,
        kind: SyncKind,
        waited: Duration,
    ) {
        let holders = match session.read_value(res).await {
            Ok((_, h)) if !h.is_empty() => h.join(", "),
            Ok(_) => "nobody (being handed on)".to_owned(),
            Err(e) => format!("unknown ({e})"),
        };
        if let Some(node) = self.node.upgrade() {
            node.emit(
                "ResyncPending",
                self.name(),
                "",
                format!(
                    "node {} has waited {} s to {kind:?} {}: the resync lock is held by {holders}",
                    node.name(),
                    waited.as_secs(),
                    self.name()
                ),
            );
        }
    }

    async fn release(&self) {
        let token = self.held.lock().unwrap_or_else(|e| e.into_inner()).take();
        let (Some(token), Some(node)) = (token, self.node.upgrade()) else {
            return;
        };
        if let Some(session) = node.session() {
            let res = resync_lock(self.array.uuid());
            if let Err(e) = session.release(&res, token).await {
                tracing::warn!(array = self.name(), lock = %res, "release: {e}");
            }
        }
    }
}

impl SyncGate for ClusterGate {
    fn begin(&self, kind: SyncKind, bytes: u64) -> GateFuture<'_, GateDecision> {
        Box::pin(self.begin_inner(kind, bytes))
    }

    fn window(&self, lo: u64, hi: u64) -> GateFuture<'_, Result<(), String>> {
        Box::pin(async move { self.publish(window(self.array.slot(), lo, hi)).await })
    }

    fn end(&self, kind: SyncKind, finished: bool) -> GateFuture<'_, ()> {
        Box::pin(async move {
            tracing::info!(
                array = self.name(),
                ?kind,
                finished,
                "sync run ended; releasing the resync lock"
            );
            if let Err(e) = self.publish(end(self.array.slot())).await {
                tracing::warn!(array = self.name(), "{e}");
            }
        })
    }
}
