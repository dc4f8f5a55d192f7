//! Resync coordination of a clustered array (RFC 0001 "Resync coordination"): the
//! engine's [`SyncGate`] in cluster mode.
//!
//! - **begin**: take `md/<uuid>/resync` exclusive, queued in attempts of
//!   [`LOCK_ATTEMPT`] until granted (the engine shows `resync=PENDING` meanwhile; a
//!   stop cancels the wait and the request is withdrawn). Once granted: publish
//!   RESYNCING_START. A resync with no chunk needed here (this node only knows the
//!   array is unclean) reads the newest superblock first: `resync_offset` at MaxSector
//!   means another node finished it — release and answer [`GateDecision::Done`]. A
//!   resync with needed chunks (e.g. merged from a failed node's slot) always runs.
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
//! and every [`PENDING_REPORT`] of waiting the monitor gets a `ResyncPending` event
//! naming the holder.
//!
//! RESYNCING_START and the end's RESYNCING(0, 0) are logged when not acknowledged:
//! they copy nothing. The window is also in the slot value for nodes that join later.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use mdcluster_proto::lock_client::{Mode, Wait};
use mdcluster_proto::v1::Errno;

use super::message::{self, Change};
use super::{lock, Node};
use crate::cluster::{resync_lock, slot_lock, ClusterMsg, MsgType, ResyncInfo};
use crate::format::io::read_member;
use crate::format::superblock::MAX_SECTOR;
use crate::raid::{GateDecision, GateFuture, MetaWrite, SyncGate, SyncKind};

/// One queued attempt on the `resync` lock; attempts repeat until granted or stopped.
pub const LOCK_ATTEMPT: Duration = Duration::from_secs(30);

/// How often a node still waiting for `resync` says so (monitor event).
pub const PENDING_REPORT: Duration = Duration::from_secs(300);
/// Deadline of each RESYNCING round, token wait included. Well above the receivers'
/// quiesce bound ([`crate::raid::REMOTE_QUIESCE`]): a receiver whose writes into the
/// window do not end answers with a refusal before the sender stops waiting. Either
/// way the window is copied only after every node acknowledged it.
pub const WINDOW_DEADLINE: Duration = Duration::from_secs(30);
const _: () = assert!(WINDOW_DEADLINE.as_secs() >= 2 * crate::raid::REMOTE_QUIESCE.as_secs());

/// The gate of one clustered array on this node.
pub struct ClusterGate {
    node: Weak<Node>,
    array: String,
    uuid: [u8; 16],
    members: Vec<PathBuf>,
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
    /// The gate of array `array` (UUID `uuid`, members `members`) on `node`.
    pub fn new(node: &Arc<Node>, array: &str, uuid: [u8; 16], members: Vec<PathBuf>) -> Self {
        ClusterGate {
            node: Arc::downgrade(node),
            array: array.to_owned(),
            uuid,
            members,
            held: Mutex::new(None),
        }
    }

    /// Sends `msg` through the token round; failures are logged.
    async fn send(&self, msg: ClusterMsg) {
        if let Err(e) = self.send_acked(msg).await {
            tracing::warn!(array = %self.array, kind = ?msg.kind, "{e}");
        }
    }

    /// Sends `msg` through the token round; `Err` unless every joined node acked it.
    async fn send_acked(&self, msg: ClusterMsg) -> Result<(), String> {
        let Some(node) = self.node.upgrade() else {
            return Err(format!("array {}: the node is shutting down", self.array));
        };
        let Some(session) = node.session() else {
            return Err(format!(
                "node {}: array {}: no session with mdserver",
                node.name(),
                self.array
            ));
        };
        message::round(
            message::Target {
                session: &session,
                node: node.name(),
                array: &self.array,
                uuid: &self.uuid,
            },
            msg,
            WINDOW_DEADLINE,
            async { Ok(Change::Applied) },
            async {},
        )
        .await
        .map(|_| ())
        .map_err(|e| e.message)
    }

    /// Writes our resync window into our slot lock's value block.
    async fn publish_window(&self, lo: u64, hi: u64) {
        let Some(node) = self.node.upgrade() else {
            return;
        };
        let (Some(session), Some(m)) = (node.session(), node.membership(&self.array)) else {
            return;
        };
        let res = slot_lock(&self.uuid, m.slot);
        let v = ResyncInfo {
            lo,
            hi,
            pr_key: m.pr_key().0,
        }
        .encode();
        if let Err(e) = session.write_value(&res, m.token, &v).await {
            tracing::warn!(array = %self.array, lock = %res, "write resync window: {e}");
        }
    }

    fn slot(&self) -> u32 {
        self.node
            .upgrade()
            .and_then(|n| n.membership(&self.array))
            .map_or(0, |m| m.slot)
    }

    /// Whether the newest superblock says the array is in sync (`resync_offset` at
    /// MaxSector).
    async fn clean_on_disk(&self) -> bool {
        let paths = self.members.clone();
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
        let Some((raid, _)) = self.node.upgrade().and_then(|n| n.raid_of(&self.array)) else {
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

    /// A member another node added is recovered by that node while it holds its slot:
    /// wait here (pending) until its superblock says recovered (`Done`) or that node is
    /// gone (then this node takes the recovery over).
    async fn wait_remote_recovery(&self) -> Option<GateDecision> {
        loop {
            if self.recovered_elsewhere().await {
                if let Some(n) = self.node.upgrade() {
                    lock(&n.remote_recovery).remove(&self.array);
                }
                return Some(GateDecision::Done);
            }
            let node = self.node.upgrade()?;
            let slot = lock(&node.remote_recovery).get(&self.array).copied()?;
            let alive = match node.session() {
                Some(s) => match s.read_value(&slot_lock(&self.uuid, slot)).await {
                    Ok((_, holders)) => !holders.is_empty(),
                    Err(_) => true,
                },
                None => true,
            };
            if !alive {
                tracing::warn!(array = %self.array, slot, "the node recovering a member is gone; taking the recovery over");
                lock(&node.remote_recovery).remove(&self.array);
                return None;
            }
            drop(node);
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn begin_inner(&self, kind: SyncKind, bytes: u64) -> GateDecision {
        if kind == SyncKind::Recovery {
            if let Some(d) = self.wait_remote_recovery().await {
                return d;
            }
        }
        let res = resync_lock(&self.uuid);
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
            let Some(session) = node.session() else {
                drop(node);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            };
            drop(node);
            match session
                .acquire(&res, Mode::Exclusive, Wait::Queue(LOCK_ATTEMPT))
                .await
            {
                Ok(g) => break g.token,
                Err(e) if e.errno() == Errno::Etimedout => {
                    tracing::info!(array = %self.array, ?kind, "still waiting for the resync lock: {e}");
                    if last_report.elapsed() >= PENDING_REPORT {
                        last_report = tokio::time::Instant::now();
                        self.report_pending(&session, &res, kind, waiting_since.elapsed())
                            .await;
                    }
                }
                Err(e) => {
                    tracing::warn!(array = %self.array, ?kind, "resync lock: {e}; retrying in {backoff:?}");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                }
            }
        };
        guard.armed = false;
        *self.held.lock().unwrap_or_else(|e| e.into_inner()) = Some(token);
        if kind == SyncKind::Resync && bytes == 0 && self.clean_on_disk().await {
            tracing::info!(array = %self.array, "resync lock granted; the superblock says in sync");
            self.release().await;
            return GateDecision::Done;
        }
        if kind == SyncKind::Recovery && self.recovered_elsewhere().await {
            self.release().await;
            return GateDecision::Done;
        }
        tracing::info!(array = %self.array, ?kind, token, "resync lock granted");
        self.send(ClusterMsg::new(MsgType::ResyncingStart, self.slot()))
            .await;
        GateDecision::Run
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
                &self.array,
                "",
                format!(
                    "node {} has waited {} s to {kind:?} {}: the resync lock is held by {holders}",
                    node.name(),
                    waited.as_secs(),
                    self.array
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
            let res = resync_lock(&self.uuid);
            if let Err(e) = session.release(&res, token).await {
                tracing::warn!(array = %self.array, lock = %res, "release: {e}");
            }
        }
    }
}

impl SyncGate for ClusterGate {
    fn begin(&self, kind: SyncKind, bytes: u64) -> GateFuture<'_, GateDecision> {
        Box::pin(self.begin_inner(kind, bytes))
    }

    fn window(&self, lo: u64, hi: u64) -> GateFuture<'_, Result<(), String>> {
        Box::pin(async move {
            let (lo, hi) = (lo / 512, hi / 512);
            self.publish_window(lo, hi).await;
            let mut msg = ClusterMsg::new(MsgType::Resyncing, self.slot());
            msg.low = lo;
            msg.high = hi;
            self.send_acked(msg).await
        })
    }

    fn end(&self, kind: SyncKind, finished: bool) -> GateFuture<'_, ()> {
        Box::pin(async move {
            tracing::info!(array = %self.array, ?kind, finished, "sync run ended; releasing the resync lock");
            self.publish_window(0, 0).await;
            self.send(ClusterMsg::new(MsgType::Resyncing, self.slot()))
                .await;
            self.release().await;
        })
    }
}
