//! [`Driver`]: everything a cluster-mode node runs beside its gRPC listener, binding
//! no socket — the session's notifications, the rejoin after a lost session, the fence
//! watchdog, the saved arrays assembled at start, the engine watcher, slot takeover and
//! the mdstat file — so a test runs several nodes in one process over its own lock
//! service ([`crate::lockport`]); `mdagent` runs it under its gRPC server
//! ([`super::runtime::run`]). [`Health`] is the readiness it keeps.
//!
//! Session notifications: messages on array channels are applied to the array's engine
//! ([`super::message::on_delivery`]) and acknowledged with the result (a payload that is not a
//! cluster message, or one this node cannot apply, gets a negative ack with the reason,
//! never silence). A suspended session (no replica could renew it, none said it is
//! gone) only changes the health: member I/O is held by the fence deadline and goes on
//! when the session resumes. A lost session is handled in-process:
//!
//! ```text
//! Lost ──▶ drop the session (clustered assembles answer EIO)
//!      ──▶ every clustered array: fenced for good, clients forced off, torn down
//!          without writing metadata (Node::drop_lost_arrays)
//!          └─ an array that cannot be torn down ─▶ exit 75 (the last resort)
//!      ──▶ open a new session (backoff) ──▶ assemble the saved arrays again
//!          (Node::reassemble_saved, as at agent start) ──▶ SERVING
//! ```

use std::sync::Arc;
use std::time::Duration;

use mdcluster_proto::v1::agent_service_server::AgentServiceServer;
use mdcluster_proto::v1::Errno;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use tonic_health::server::HealthReporter;

use super::grpc::AgentSvc;
use super::{events, Node};
use crate::lockport::{
    LockClientError, Notification, Opened, Session, SessionOpener, SessionState,
};

/// Opens a session through `opener`, retrying with backoff (100 ms doubling to 1 s)
/// for at most `timeout`.
pub async fn open_session(
    opener: &dyn SessionOpener,
    timeout: Duration,
) -> Result<Opened, LockClientError> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut backoff = Duration::from_millis(100);
    loop {
        match opener.open().await {
            Ok(s) => return Ok(s),
            Err(e) => {
                if tokio::time::Instant::now() + backoff >= deadline {
                    return Err(e);
                }
                let why = if e.errno() == Errno::Ebusy {
                    " (a previous session of this node is still alive; waiting for its lease to expire)"
                } else {
                    ""
                };
                tracing::warn!("open session failed{why}, retrying in {backoff:?}: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// How often readiness is checked against the session's state, in case a
/// Suspended/Resumed notification was dropped.
const HEALTH_RECHECK: Duration = Duration::from_secs(1);

/// Handles session notifications until the channel closes or `stop`.
async fn notifications(
    node: Arc<Node>,
    session: Arc<Session>,
    mut rx: mpsc::Receiver<Notification>,
    stop: CancellationToken,
    health: Arc<Health>,
) -> Option<String> {
    // Suspended/Resumed notifications can be dropped when the channel is full (the
    // lock client counts them); the session's own state is the truth, so health is
    // also brought in line with it every [`HEALTH_RECHECK`].
    let mut recheck = tokio::time::interval(HEALTH_RECHECK);
    recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let n = tokio::select! {
            n = rx.recv() => n,
            _ = recheck.tick() => {
                let suspended = session.state() == SessionState::Suspended;
                health.set(Readiness::Suspended, suspended).await;
                continue;
            }
            _ = stop.cancelled() => return None,
        };
        match n {
            None => return Some("notification channel closed".into()),
            Some(Notification::Message(d)) => {
                let result =
                    super::message::on_delivery(&node, &d.channel, &d.publisher_node, &d.payload)
                        .await
                        .map_err(|nack| nack.to_string());
                if let Err(e) = session.ack(&d.message_id, result).await {
                    tracing::warn!(message = %d.message_id, "ack: {e}");
                }
            }
            Some(Notification::Lost { reason }) => return Some(reason),
            Some(Notification::Suspended { reason }) => {
                tracing::warn!(
                    node = node.name(),
                    session = format_args!("{:x}", session.id()),
                    "session suspended: member I/O of clustered arrays waits until it resumes: {reason}"
                );
                health.set(Readiness::Suspended, true).await;
            }
            Some(Notification::Resumed {
                endpoint,
                suspended_for,
            }) => {
                tracing::info!(
                    node = node.name(),
                    session = format_args!("{:x}", session.id()),
                    %endpoint,
                    "session resumed after {suspended_for:?} suspended: same session, same slot locks"
                );
                health.set(Readiness::Suspended, false).await;
            }
            Some(Notification::Reconnected { endpoint }) => {
                tracing::info!(node = node.name(), %endpoint, "session moved to another mdserver replica");
            }
            Some(Notification::HolderExpired {
                resource,
                node: dead,
                ..
            }) => {
                tracing::warn!(lock = %resource, node = %dead, "holder expired");
            }
            Some(other) => tracing::debug!(?other, "session notification"),
        }
    }
}

/// Why the agent service may not be ready.
#[derive(Debug, Clone, Copy)]
pub(super) enum Readiness {
    /// The session is suspended (its fence deadline passed, it is not lost).
    Suspended,
    /// No session, or a new one whose arrays are being assembled again.
    Rejoining,
    /// Shutdown started.
    Stopping,
}

/// The readiness of the agent service: ready when none of the [`Readiness`] reasons
/// holds. Reported on the gRPC health service when there is one, and watchable
/// ([`Health::watch`]) by whoever drives the node.
pub struct Health {
    reporter: Option<HealthReporter>,
    /// One flag per [`Readiness`] reason, in its order.
    not_ready: std::sync::Mutex<[bool; 3]>,
    ready: watch::Sender<bool>,
}

impl std::fmt::Debug for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Health")
            .field("ready", &*self.ready.borrow())
            .finish_non_exhaustive()
    }
}

impl Health {
    /// Ready, reported on `reporter` (if any) from its next change on.
    pub fn new(reporter: Option<HealthReporter>) -> Arc<Health> {
        Arc::new(Health {
            reporter,
            not_ready: std::sync::Mutex::new([false; 3]),
            ready: watch::channel(true).0,
        })
    }

    /// True while the node holds a live session and is not rejoining or stopping.
    pub fn is_ready(&self) -> bool {
        *self.ready.borrow()
    }

    /// Follows [`Health::is_ready`].
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Sets or clears one reason and reports the result when it changed.
    pub(super) async fn set(&self, why: Readiness, on: bool) {
        let (before, after) = {
            let mut f = self.not_ready.lock().unwrap_or_else(|e| e.into_inner());
            let before = !f.iter().any(|x| *x);
            f[why as usize] = on;
            (before, !f.iter().any(|x| *x))
        };
        if before != after {
            tracing::info!(reason = ?why, "readiness changed");
            self.ready.send_replace(after);
            if let Some(r) = &self.reporter {
                set_health(r, after).await;
            }
        }
    }
}

/// Reports the agent service SERVING (the node holds a session) or NOT_SERVING on the
/// health service, and logs a change.
pub(super) async fn set_health(health: &HealthReporter, serving: bool) {
    if serving {
        health.set_serving::<AgentServiceServer<AgentSvc>>().await;
    } else {
        health
            .set_not_serving::<AgentServiceServer<AgentSvc>>()
            .await;
    }
    tracing::info!(
        serving,
        "health => {}",
        if serving { "SERVING" } else { "NOT_SERVING" }
    );
}

/// Exit status of a self-fenced agent (EX_TEMPFAIL): restart it to rejoin.
pub const FENCE_EXIT_CODE: i32 = 75;

/// Self-fencing (RFC 0001). Member I/O stops at the session's fence deadline (send
/// time of the last acknowledged heartbeat + TTL − margin) by itself: every member
/// system call of a clustered array checks the node's fence gate right before it is
/// made ([`crate::fence`]), and new requests wait at the gate (suspended, bounded by
/// `--suspend-io-timeout`) until the session is renewed. The process is not ended: the
/// gate alone stops every system call that starts after the deadline, including the
/// rest of a partial write and the second half of a read-modify-write (each `pwrite`
/// is checked). What no process action can stop — a write already handed to the
/// kernel — is what the margin is for (docs/LOCKS.md). This watchdog, every quarter
/// margin (at most 100 ms), logs once when the clustered arrays' I/O is suspended and
/// once when it resumes, and an error when the lease deadline (fence deadline +
/// margin) has passed while a member system call that passed the gate before the fence
/// deadline had not returned (a device slower than the margin: raise the margin, or
/// fence the device by reservations). A lost session is not ended either: its arrays
/// are torn down and assembled again on a new session ([`rejoin`]); ending the process
/// (`_exit`, status [`FENCE_EXIT_CODE`]) stays only for an array of a lost session that
/// cannot be torn down ([`fence_now`]).
fn spawn_fence_watchdog(
    node: Arc<Node>,
    margin: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    let period = (margin / 4).clamp(Duration::from_millis(5), Duration::from_millis(100));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warned_slow = false;
        // Ticks in a row past the lease deadline with a member system call running (one
        // is not enough: a thread stopped with the process returns from its call only
        // when the process runs again).
        let mut slow_ticks = 0u32;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            let gate = node.fence_gate();
            let joined = node.memberships();
            let open = gate.is_open();
            if joined.is_empty() {
                gate.note_suspended(false);
                continue;
            }
            let arrays: Vec<String> = joined
                .iter()
                .map(|(n, m, _)| format!("{n} (slot {})", m.slot))
                .collect();
            let arrays = arrays.join(", ");
            if gate.note_suspended(!open) {
                if open {
                    warned_slow = false;
                    tracing::warn!(
                        node = node.name(),
                        "member I/O of {arrays} resumed: the session with mdserver was renewed"
                    );
                } else {
                    tracing::error!(
                        node = node.name(),
                        "member I/O of {arrays} suspended: the session with mdserver was not \
                         renewed before its fence deadline; requests wait up to {:?} for it \
                         ({} refused so far)",
                        gate.suspend_timeout(),
                        gate.refused()
                    );
                }
            }
            let Some(session) = node.session() else {
                continue;
            };
            let lease_end = session.fence_deadline() + margin;
            let inflight = gate.inflight();
            if !open && inflight > 0 && tokio::time::Instant::now() >= lease_end {
                slow_ticks += 1;
            } else {
                slow_ticks = 0;
            }
            if slow_ticks >= 2 && !warned_slow {
                warned_slow = true;
                tracing::error!(
                    node = node.name(),
                    "the lease of {arrays} expired while {inflight} member system call(s) \
                     issued before the fence deadline had not returned (slowest member I/O \
                     so far {:?}, fence margin {margin:?}); such a write may land after a \
                     survivor took the slot over: raise --fence-margin above the devices' \
                     worst write latency, or use devices fenced by reservations",
                    gate.slowest()
                );
            }
        }
    })
}

/// Ends the process at once (`_exit`, status [`FENCE_EXIT_CODE`]): member I/O of
/// `arrays` must stop and cannot be stopped otherwise.
pub(super) fn fence_now(node: &Node, arrays: &str, why: &str) -> ! {
    let msg = format!(
        "mdagent node {}: SELF-FENCING: {why}; stopping all member I/O of {arrays} by exiting now \
         (status {FENCE_EXIT_CODE}); restart the agent to rejoin",
        node.name(),
    );
    tracing::error!("{msg}");
    eprintln!("{msg}");
    // SAFETY: _exit(2) ends the process immediately; it touches no Rust state.
    unsafe { libc::_exit(FENCE_EXIT_CODE) };
}

/// After session `reason` was lost: tears down the clustered arrays of the lost session
/// ([`Node::drop_lost_arrays`]; exit 75 when one cannot be torn down) and opens a new
/// session (each attempt bounded, retried until it opens or `stop`); the caller
/// assembles the saved arrays again on it. `None` when stopping.
async fn rejoin(
    node: &Arc<Node>,
    opener: &dyn SessionOpener,
    reason: &str,
    stop: &CancellationToken,
) -> Option<Opened> {
    tracing::error!(
        node = node.name(),
        "session lost: {reason}; stopping its clustered arrays and rejoining with a new session"
    );
    let t = tokio::time::Instant::now();
    // Cleared first: an assemble finishing now either sees no session (and fails) or
    // was recorded as joined before (and is torn down here).
    node.set_session(None);
    match node.drop_lost_arrays(reason).await {
        Ok(dropped) if !dropped.is_empty() => {
            tracing::warn!(node = node.name(), arrays = ?dropped, "arrays of the lost session stopped without writing metadata")
        }
        Ok(_) => {}
        Err(stuck) => fence_now(
            node,
            &stuck.to_string(),
            &format!("the session with mdserver was lost ({reason}) and these arrays could not be stopped"),
        ),
    }
    loop {
        if stop.is_cancelled() {
            return None;
        }
        let opened = tokio::select! {
            r = open_session(opener, Duration::from_secs(60)) => r,
            _ = stop.cancelled() => return None,
        };
        match opened {
            Ok((s, r)) => {
                node.set_session(Some(s.clone()));
                tracing::info!(
                    node = node.name(),
                    session = format_args!("{:x}", s.id()),
                    "new session open {:?} after the old one was lost; assembling the saved arrays again",
                    t.elapsed()
                );
                return Some((s, r));
            }
            Err(e) => tracing::error!("reopening the session failed: {e}"),
        }
    }
}

/// Everything that runs a cluster-mode node beside its gRPC listener: the session's
/// notifications (messages applied and acknowledged; a lost session replaced through
/// the [`SessionOpener`] and the saved arrays assembled again), the fence watchdog, the
/// saved arrays assembled at start, the engine watcher, slot takeover and the mdstat
/// file. It binds no socket, so a test runs several nodes in one process over its own
/// lock service; `mdagent` runs it under its gRPC server ([`run`]).
#[derive(Debug)]
pub struct Driver {
    node: Arc<Node>,
    health: Arc<Health>,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Driver {
    /// Starts driving `node` on the session `opened` (set on the node here); a lost
    /// session is replaced through `opener`. `fence_margin` is the session's (the fence
    /// watchdog's period and its lease-end estimate).
    pub fn start(
        node: Arc<Node>,
        opener: Arc<dyn SessionOpener>,
        opened: Opened,
        fence_margin: Duration,
        health: Arc<Health>,
    ) -> Driver {
        let stop = CancellationToken::new();
        let (session, rx) = opened;
        node.set_session(Some(session.clone()));
        let keeper = {
            let node = node.clone();
            let health = health.clone();
            let stop = stop.clone();
            tokio::spawn(keep_session(node, opener, session, rx, stop, health))
        };
        let fence = spawn_fence_watchdog(node.clone(), fence_margin, stop.clone());
        let rejoin = {
            let node = node.clone();
            tokio::spawn(async move { node.reassemble_saved().await })
        };
        let watcher = events::spawn_engine_watcher(node.clone(), stop.clone());
        let takeover = super::takeover::spawn(node.clone(), stop.clone());
        let mdstat_file = super::mdstat_file::spawn(node.clone(), stop.clone());
        Driver {
            node,
            health,
            stop,
            tasks: vec![keeper, rejoin, fence, watcher, takeover, mdstat_file],
        }
    }

    /// The node driven.
    pub fn node(&self) -> &Arc<Node> {
        &self.node
    }

    /// The node's readiness.
    pub fn health(&self) -> &Arc<Health> {
        &self.health
    }

    /// Cancelled when the driver stops (for tasks started beside it).
    pub fn stop_token(&self) -> CancellationToken {
        self.stop.clone()
    }

    /// Stops every array (leaving the cluster for each), stops the tasks and closes the
    /// session when nothing else holds it.
    pub async fn shutdown(self) {
        self.health.set(Readiness::Stopping, true).await;
        self.node.shutdown().await;
        self.stop.cancel();
        for t in self.tasks {
            let _ = t.await;
        }
        let last = self.node.session();
        self.node.set_session(None);
        match last {
            Some(s) if Arc::strong_count(&s) == 1 => {
                if let Err(e) = s.close().await {
                    tracing::warn!("close session: {e}");
                }
            }
            Some(_) => {
                tracing::debug!("session still shared at exit; its lease expires by itself")
            }
            None => {}
        }
    }

    /// Ends the driver without stopping the arrays or closing the session, as a crashed
    /// process would (tests of node death: the lock service then expires the session).
    pub async fn abandon(self) {
        self.stop.cancel();
        for t in self.tasks {
            t.abort();
            let _ = t.await;
        }
    }
}

/// Handles notifications, and opens a new session when one is lost (the saved arrays
/// are then assembled again on a task).
async fn keep_session(
    node: Arc<Node>,
    opener: Arc<dyn SessionOpener>,
    mut session: Arc<Session>,
    mut rx: mpsc::Receiver<Notification>,
    stop: CancellationToken,
    health: Arc<Health>,
) {
    // The arrays being assembled again on the current session, if any.
    let mut rejoining: Option<tokio::task::JoinHandle<()>> = None;
    loop {
        let Some(reason) = notifications(
            node.clone(),
            session.clone(),
            rx,
            stop.clone(),
            health.clone(),
        )
        .await
        else {
            return;
        };
        health.set(Readiness::Rejoining, true).await;
        health.set(Readiness::Suspended, false).await;
        if let Some(h) = rejoining.take() {
            // Each assemble is bounded; the teardown must see what it joined.
            let _ = h.await;
        }
        match rejoin(&node, opener.as_ref(), &reason, &stop).await {
            Some((s, r)) => {
                session = s;
                rx = r;
            }
            None => return,
        }
        // Assembled on a task: the new session's messages (a survivor's recovery of
        // our old slot) must be answered meanwhile.
        let (node, health) = (node.clone(), health.clone());
        rejoining = Some(tokio::spawn(async move {
            let t = tokio::time::Instant::now();
            node.reassemble_saved().await;
            tracing::info!(
                node = node.name(),
                "saved arrays assembled again in {:?}",
                t.elapsed()
            );
            health.set(Readiness::Rejoining, false).await;
        }));
    }
}
