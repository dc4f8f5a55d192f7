//! Fencing on the I/O path: the node's gate that every member read, write and flush of
//! a clustered array passes right before its system call.
//!
//! A node may write its arrays' members only while it holds its lock-service session:
//! before the session's **fence deadline** (send time of the last heartbeat the server
//! acknowledged + TTL − margin, [`mdcluster_proto::lock_client::FenceDeadline`]). After
//! it, the lease may expire and a survivor take this node's bitmap slot over; any later
//! write of this node could land over the survivor's.
//!
//! [`FenceGate`] holds the deadline of the node's current session (none without a
//! session: closed). [`FenceTicket`] is an array's pass, taken when the array is
//! assembled: it is valid under that session only, so an array assembled under a lost
//! session never writes under the next one. The check ([`FenceTicket::enter`]) runs
//! in the thread that makes the system call, after the request left every queue (range
//! lock, blocking pool), with one atomic load and a clock read; a refused request
//! fails with [`Fenced`] (an [`std::io::Error`] that [`is_fenced`] recognises): never
//! reported to a client as success, never a member failure, never a superblock
//! update, and the bitmap bits of the write stay dirty.
//!
//! **Suspend, don't die.** New requests of a fenced array wait at the gate
//! ([`FenceTicket::wait_open`]), at most [`FenceGate::suspend_timeout`] (then EIO);
//! when the session is renewed (the deadline moves forward) they go on.
//!
//! **The window that remains.** A system call that passed the check before the
//! deadline may still be running after it (a write inside the kernel or the device
//! queue cannot be recalled), and a thread can be stopped (a paused VM, a frozen
//! cgroup) between the check and the system call's entry (a few instructions). The
//! first is bounded by the device's write latency: the margin must exceed the worst
//! member write latency (the gate records the slowest, [`FenceGate::slowest`], and logs
//! each new maximum past 1 ms; a call of a process frozen mid-call counts the time it
//! was frozen). The second is not bounded by anything this process
//! does; only storage fencing (reservations) closes it. docs/LOCKS.md has the budget.

use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use mdcluster_proto::lock_client::FenceDeadline;

/// Default bound on how long a request of a fenced array waits for the session to be
/// renewed before it fails with EIO.
pub const DEFAULT_SUSPEND_TIMEOUT: Duration = Duration::from_secs(30);

/// How often a request waiting at a closed gate looks again.
const WAIT_POLL: Duration = Duration::from_millis(10);

/// A member I/O refused because the node is fenced.
#[derive(Debug, Clone, thiserror::Error)]
#[error("node {node}: {op} of {device} refused: this node is fenced ({why}); no member I/O until the lock-service session is renewed (check the connection to mdserver)")]
pub struct Fenced {
    /// The node.
    pub node: String,
    /// "write", "read" or "flush".
    pub op: &'static str,
    /// The device.
    pub device: String,
    /// Why the gate is closed.
    pub why: &'static str,
}

impl From<Fenced> for io::Error {
    fn from(f: Fenced) -> io::Error {
        io::Error::other(f)
    }
}

/// Whether `e` is (or wraps) a [`Fenced`] refusal, or is the device's own refusal: a
/// reservation conflict ([`is_reservation_conflict`]) — another node preempted this
/// node's key ([`crate::reserve`]). Either way this node is fenced and no member failed.
pub fn is_fenced(e: &io::Error) -> bool {
    e.get_ref().is_some_and(|i| i.is::<Fenced>()) || is_reservation_conflict(e)
}

/// Whether `e` is a persistent-reservation conflict reported by the device: the block
/// layer completes such a request with `BLK_STS_RESV_CONFLICT` (`BLK_STS_NEXUS` before
/// Linux 6.5), which reaches user space as `EBADE`.
pub fn is_reservation_conflict(e: &io::Error) -> bool {
    e.raw_os_error() == Some(libc::EBADE)
}

/// The node's gate (see the module doc). One per node; shared by every clustered array.
#[derive(Debug)]
pub struct FenceGate {
    node: String,
    /// The current session's deadline; `None`: no session.
    source: RwLock<Option<FenceDeadline>>,
    /// Bumped whenever the session is replaced: tickets of an older one stay closed.
    generation: AtomicU64,
    suspend_timeout: Duration,
    /// Gated system calls in progress.
    inflight: AtomicU64,
    /// Slowest gated system call so far, in nanoseconds.
    slowest_ns: AtomicU64,
    /// Requests refused.
    refused: AtomicU64,
    /// Whether a suspension is being reported (logged once per suspension).
    suspended: AtomicBool,
}

impl FenceGate {
    /// A closed gate (no session yet) of node `node`; requests wait at most
    /// `suspend_timeout` for it.
    pub fn new(node: impl Into<String>, suspend_timeout: Duration) -> Arc<FenceGate> {
        Arc::new(FenceGate {
            node: node.into(),
            source: RwLock::new(None),
            generation: AtomicU64::new(0),
            suspend_timeout,
            inflight: AtomicU64::new(0),
            slowest_ns: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            suspended: AtomicBool::new(false),
        })
    }

    /// The node.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Feeds the gate from a session (`None`: no session, closed). A different session
    /// closes the tickets taken under the previous one.
    pub fn set_session(&self, deadline: Option<FenceDeadline>) {
        let mut s = self.source.write().unwrap_or_else(|e| e.into_inner());
        *s = deadline;
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// A pass for an array assembled now, valid under the current session only.
    pub fn ticket(self: &Arc<Self>) -> FenceTicket {
        FenceTicket {
            gate: self.clone(),
            generation: self.generation.load(Ordering::Acquire),
        }
    }

    /// The current session's fence deadline (`None`: no session, or it was lost).
    pub fn deadline(&self) -> Option<Instant> {
        self.source
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .and_then(FenceDeadline::get)
    }

    /// Whether member I/O under the current session may go now.
    pub fn is_open(&self) -> bool {
        self.deadline().is_some_and(|d| Instant::now() < d)
    }

    /// How long a request of a fenced array waits for the gate to open.
    pub fn suspend_timeout(&self) -> Duration {
        self.suspend_timeout
    }

    /// Gated system calls in progress now.
    pub fn inflight(&self) -> u64 {
        self.inflight.load(Ordering::Acquire)
    }

    /// The slowest gated system call so far.
    pub fn slowest(&self) -> Duration {
        Duration::from_nanos(self.slowest_ns.load(Ordering::Relaxed))
    }

    /// Member I/O requests refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Records whether the gate is closed now; true when that is a change (the caller
    /// logs it: once per suspension and once per resumption).
    pub fn note_suspended(&self, suspended: bool) -> bool {
        self.suspended.swap(suspended, Ordering::AcqRel) != suspended
    }

    fn record(&self, took: Duration) {
        let ns = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        let prev = self.slowest_ns.fetch_max(ns, Ordering::Relaxed);
        // Log each new maximum that at least doubles the last one, from 1 ms on.
        if ns > prev && ns >= 1_000_000 && ns >= prev.saturating_mul(2) {
            tracing::info!(
                node = %self.node,
                "slowest member I/O so far: {took:?} (the fence margin must stay above this)"
            );
        }
    }
}

/// An array's pass through the node's gate (see the module doc).
#[derive(Debug, Clone)]
pub struct FenceTicket {
    gate: Arc<FenceGate>,
    generation: u64,
}

impl FenceTicket {
    /// The gate.
    pub fn gate(&self) -> &Arc<FenceGate> {
        &self.gate
    }

    /// Why member I/O under this ticket may not go now (`None`: it may).
    fn closed(&self) -> Option<&'static str> {
        if self.gate.generation.load(Ordering::Acquire) != self.generation {
            return Some("the session the array was assembled under was replaced");
        }
        match self.gate.deadline() {
            None => Some("no lock-service session"),
            Some(d) if Instant::now() >= d => Some("its session's fence deadline passed"),
            Some(_) => None,
        }
    }

    /// Whether member I/O under this ticket may go now.
    pub fn is_open(&self) -> bool {
        self.closed().is_none()
    }

    /// The check right before a member system call (`op` of `device`): call it in the
    /// thread that makes the call, and keep the guard until the call returned.
    pub fn enter(&self, op: &'static str, device: &Path) -> Result<SyscallGuard<'_>, Fenced> {
        // Counted before the check: the watchdog that sees no call in flight after
        // the deadline knows none can start.
        self.gate.inflight.fetch_add(1, Ordering::AcqRel);
        let guard = SyscallGuard {
            gate: &self.gate,
            start: Instant::now(),
        };
        match self.closed() {
            None => Ok(guard),
            Some(why) => {
                drop(guard);
                self.gate.refused.fetch_add(1, Ordering::Relaxed);
                Err(Fenced {
                    node: self.gate.node.clone(),
                    op,
                    device: device.display().to_string(),
                    why,
                })
            }
        }
    }

    /// Waits (polling, bounded by `until`) until member I/O under this ticket may go;
    /// EIO naming `array` at `until`, or at once when the session this ticket belongs
    /// to was replaced (that never reopens).
    pub async fn wait_open(&self, array: &str, until: tokio::time::Instant) -> io::Result<()> {
        loop {
            let why = match self.closed() {
                None => return Ok(()),
                Some(why) => why,
            };
            let replaced = self.gate.generation.load(Ordering::Acquire) != self.generation;
            if replaced || tokio::time::Instant::now() >= until {
                return Err(io::Error::other(format!(
                    "array {array} on node {}: I/O suspended ({why}) and not resumed within \
                     {:?}; the node is fenced until its lock-service session is renewed",
                    self.gate.node, self.gate.suspend_timeout
                )));
            }
            tokio::time::sleep_until(until.min(tokio::time::Instant::now() + WAIT_POLL)).await;
        }
    }
}

/// A gated member system call in progress ([`FenceTicket::enter`]).
#[derive(Debug)]
pub struct SyscallGuard<'a> {
    gate: &'a FenceGate,
    start: Instant,
}

impl Drop for SyscallGuard<'_> {
    fn drop(&mut self) {
        self.gate.record(self.start.elapsed());
        self.gate.inflight.fetch_sub(1, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_session_is_closed_and_refusals_are_recognised() {
        let g = FenceGate::new("n1", Duration::from_secs(1));
        let t = g.ticket();
        assert!(!g.is_open() && !t.is_open());
        let e: io::Error = t.enter("write", Path::new("/dev/x")).unwrap_err().into();
        assert!(is_fenced(&e), "{e}");
        assert!(e.to_string().contains("node n1") && e.to_string().contains("/dev/x"));
        assert!(!is_fenced(&io::Error::other("disk error")));
        assert_eq!(g.refused(), 1);
        assert_eq!(g.inflight(), 0);
    }

    #[tokio::test]
    async fn a_ticket_of_a_replaced_session_stays_closed() {
        // A live session's deadline, from a real lock-service session, is tested in
        // the cluster tests; here the gate's own rules.
        let g = FenceGate::new("n1", Duration::from_millis(200));
        let t = g.ticket();
        g.set_session(None);
        assert!(!t.is_open());
        let until = tokio::time::Instant::now() + Duration::from_secs(5);
        let started = Instant::now();
        let e = t.wait_open("md0", until).await.unwrap_err();
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "replaced: fails at once"
        );
        assert!(e.to_string().contains("array md0"), "{e}");
    }

    #[tokio::test]
    async fn waiting_at_a_closed_gate_is_bounded() {
        let g = FenceGate::new("n1", Duration::from_millis(100));
        let t = g.ticket();
        let started = Instant::now();
        let until = tokio::time::Instant::now() + Duration::from_millis(100);
        assert!(t.wait_open("md0", until).await.is_err());
        let took = started.elapsed();
        assert!(took >= Duration::from_millis(100) && took < Duration::from_secs(2));
    }
}
