//! The typed client of the lock service, for agents: nothing here knows about etcd.
//!
//! [`Session::open`] opens a session on one of a list of `mdserver` replicas and runs it
//! on a task:
//!
//! ```text
//!  Open ──▶ Connected ──(stream broken / heartbeat ack late)──▶ Reconnecting ──resumed──▶ Connected
//!              │  heartbeat every interval; ack ⇒ fence deadline moves   │
//!              │                                                         ├─ fence deadline passed ─▶ Suspended
//!              │                                                         └─ session gone ─▶ Lost
//!              ├─ server says expired ─▶ Lost          Suspended ──resumed──▶ Connected (Resumed)
//!              └─ close() ─▶ Closed                    Suspended ──session gone / suspend_max passed──▶ Lost
//! ```
//!
//! **Self-fencing.** [`Session::fence_deadline`] is the send time of the last heartbeat
//! that etcd acknowledged, plus the TTL, minus a margin, on the monotonic clock. etcd
//! counts its expiry from a later instant (when it received that renewal), so an agent
//! that stops member I/O at this deadline always stops before its lease can expire and
//! before a survivor can take over its locks. [`Session::fence_deadline_handle`] gives
//! the same deadline as a [`FenceDeadline`] any thread reads without awaiting (the
//! agent checks it right before each member system call).
//!
//! **Resume.** When the stream to a replica breaks, the task reconnects to the next
//! endpoint with the same session id, with bounded backoff (50 ms doubling to 1 s). Locks,
//! subscriptions and undelivered messages survive a resume. A successful resume is a
//! renewal: the replica renews the lease after it received the request, so the send time
//! of the resume request moves the fence deadline like an acknowledged heartbeat.
//!
//! **Suspended, not lost.** Only a replica that reached etcd can say the lease is gone
//! (ENOENT: the lease does not exist; EPERM: it belongs to another node); then the
//! session is [`Notification::Lost`] at once. When no replica can renew it (every
//! replica down or hung, or etcd unreachable), nobody else can take its locks either: a
//! lease expires only in a running etcd, and a restarted etcd extends every lease by its
//! TTL. So once the fence deadline has passed the session is [`SessionState::Suspended`]
//! ([`Notification::Suspended`]: member I/O stays stopped) and the task keeps trying to
//! resume until the lease deadline plus [`SessionConfig::suspend_max`]; a resume that
//! succeeds brings the session back with the same id and locks
//! ([`Notification::Resumed`]), past that bound it is lost.
//!
//! **A hung replica.** A replica that is alive on TCP but does not answer (stopped,
//! starved, or stuck on etcd) never breaks the stream, so every heartbeat carries its
//! own deadline ([`SessionConfig::heartbeat_timeout`], half the period by default): the
//! first heartbeat not acknowledged in time counts the replica as hung and the task
//! resumes on the next one at once. With the default period (a quarter of the TTL) a
//! hung replica is left within three quarters of a period after the last good
//! acknowledgement was due, which leaves more than half the TTL to resume before the
//! fence deadline. docs/LOCKS.md has the timing budget.
//!
//! Notifications (granted, blocking, holder expired, messages, reconnected, suspended,
//! resumed, lost) arrive on a bounded channel; when the agent does not drain it they are
//! dropped and counted ([`Session::dropped_notifications`]).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prost::Message as _;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status, Streaming};

use crate::v1::lock_service_client::LockServiceClient;
use crate::v1::{
    session_event, session_request, AckRequest, AcquireRequest, CloseSession, ConvertRequest,
    Errno, ErrorDetail, Heartbeat, ListNodesRequest, LockMode, LockValue, OpenSession,
    PublishRequest, ReadValueRequest, ReadValuesRequest, ReleaseRequest, SessionEvent,
    SessionRequest, SubscribeRequest, UnsubscribeRequest, WriteValueRequest,
};

/// How a session is opened and kept.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// mdserver replicas, e.g. `http://10.0.0.1:7480`; tried in order, then round-robin.
    pub endpoints: Vec<String>,
    /// This node's name.
    pub node: String,
    /// Where this node's agent serves its API (published in the node registry).
    pub agent_addr: String,
    /// Requested lease TTL (the server rounds up to whole seconds).
    pub ttl: Duration,
    /// Heartbeat period; `None`: a quarter of the TTL.
    pub heartbeat_interval: Option<Duration>,
    /// How long a heartbeat may wait for its acknowledgement before the serving replica
    /// counts as hung and the session moves to the next one at once; `None`: half the
    /// heartbeat period. Kept under the period.
    pub heartbeat_timeout: Option<Duration>,
    /// Subtracted from the lease deadline to get the self-fencing deadline.
    pub fence_margin: Duration,
    /// Bound on connecting to one replica and opening the stream there.
    pub connect_timeout: Duration,
    /// Bound on a unary call beyond the wait it asks for.
    pub rpc_timeout: Duration,
    /// Capacity of the notification channel.
    pub notification_capacity: usize,
    /// Plain text or mutual TLS (each new connection to a replica reads the current
    /// certificate files).
    pub transport: crate::tls::Transport,
    /// How long past the lease deadline a suspended session keeps trying to resume
    /// (while no replica says the lease is gone) before it counts as lost. Zero: lost at
    /// the lease deadline.
    pub suspend_max: Duration,
    /// Told of every heartbeat: acknowledged (and its round trip) or not (and how long
    /// it waited); for metrics. `None`: nobody.
    pub observer: Option<HeartbeatObserver>,
}

/// A callback told of each heartbeat's outcome: `(acknowledged, round trip or wait)`.
#[derive(Clone)]
pub struct HeartbeatObserver(pub Arc<dyn Fn(bool, Duration) + Send + Sync>);

impl std::fmt::Debug for HeartbeatObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HeartbeatObserver")
    }
}

impl SessionConfig {
    /// A config with the defaults: TTL 10 s, margin 1 s, connect 2 s, rpc 10 s, 1024
    /// queued notifications, plain text, suspended for at most 5 min.
    pub fn new(
        endpoints: Vec<String>,
        node: impl Into<String>,
        agent_addr: impl Into<String>,
    ) -> Self {
        SessionConfig {
            endpoints,
            node: node.into(),
            agent_addr: agent_addr.into(),
            ttl: Duration::from_secs(10),
            heartbeat_interval: None,
            heartbeat_timeout: None,
            fence_margin: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(2),
            rpc_timeout: Duration::from_secs(10),
            notification_capacity: 1024,
            transport: crate::tls::Transport::Insecure,
            suspend_max: DEFAULT_SUSPEND_MAX,
            observer: None,
        }
    }
}

/// The default of [`SessionConfig::suspend_max`].
pub const DEFAULT_SUSPEND_MAX: Duration = Duration::from_secs(300);

/// Where a session stands (see the module doc for the transitions).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// A replica serves the session and acknowledges its heartbeats.
    Connected,
    /// The stream broke or a heartbeat went unacknowledged; resuming on the next
    /// replica, the fence deadline is still ahead.
    Reconnecting,
    /// The fence deadline passed without a renewal, and no replica said the lease is
    /// gone: member I/O stays stopped while the task keeps trying to resume.
    Suspended,
    /// The session is gone (a replica said so, or the suspension lasted too long).
    Lost,
    /// Closed on purpose.
    Closed,
}

impl SessionState {
    fn from_u8(v: u8) -> SessionState {
        match v {
            0 => SessionState::Connected,
            1 => SessionState::Reconnecting,
            2 => SessionState::Suspended,
            3 => SessionState::Lost,
            _ => SessionState::Closed,
        }
    }

    fn to_u8(self) -> u8 {
        match self {
            SessionState::Connected => 0,
            SessionState::Reconnecting => 1,
            SessionState::Suspended => 2,
            SessionState::Lost => 3,
            SessionState::Closed => 4,
        }
    }
}

impl std::fmt::Display for SessionState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            SessionState::Connected => "connected",
            SessionState::Reconnecting => "reconnecting",
            SessionState::Suspended => "suspended",
            SessionState::Lost => "lost",
            SessionState::Closed => "closed",
        })
    }
}

/// A lock mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Compatible with other shared holders (DLM PR).
    Shared,
    /// Compatible with nothing (DLM EX); only this mode writes the value block.
    Exclusive,
}

impl Mode {
    fn to_wire(self) -> i32 {
        match self {
            Mode::Shared => LockMode::Shared as i32,
            Mode::Exclusive => LockMode::Exclusive as i32,
        }
    }

    fn from_wire(m: i32) -> Mode {
        if m == LockMode::Shared as i32 {
            Mode::Shared
        } else {
            Mode::Exclusive
        }
    }
}

/// Whether a request may queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Answer [`Errno::Ebusy`] at once if the lock cannot be granted now.
    NoQueue,
    /// Queue for at most this long (1 ms ..= 10 min), then [`Errno::Etimedout`].
    Queue(Duration),
}

/// A granted lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// The lock.
    pub resource: String,
    /// The granted mode.
    pub mode: Mode,
    /// The fencing token: pass it to release, convert and write_value; it only grows.
    pub token: u64,
    /// The value block at grant time.
    pub value: Vec<u8>,
    /// Nodes whose lease expired while this request waited behind them.
    pub expired_holders: Vec<String>,
}

/// A message to acknowledge with [`Session::ack`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// The channel.
    pub channel: String,
    /// Pass to [`Session::ack`].
    pub message_id: String,
    /// Who published it.
    pub publisher_node: String,
    /// The payload.
    pub payload: Vec<u8>,
}

/// What the session tells the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notification {
    /// A queued acquire or convert was granted.
    Granted {
        /// The lock.
        resource: String,
        /// The mode.
        mode: Mode,
        /// The fencing token.
        token: u64,
    },
    /// Another node waits for a lock this session holds (blocking AST).
    Blocking {
        /// The lock.
        resource: String,
        /// The waiting node.
        waiter_node: String,
        /// The mode it wants.
        waiter_mode: Mode,
    },
    /// A holder this session waited behind lost its lease (node failure).
    HolderExpired {
        /// The lock.
        resource: String,
        /// The failed node.
        node: String,
        /// Its session.
        session_id: i64,
    },
    /// A message on a subscribed channel.
    Message(Delivery),
    /// The session moved to another replica before its fence deadline.
    Reconnected {
        /// The replica now serving the session.
        endpoint: String,
    },
    /// The fence deadline passed while no replica could renew the lease, and none said
    /// it is gone: keep member I/O stopped; the session keeps trying to resume (at most
    /// [`SessionConfig::suspend_max`] past the lease deadline).
    Suspended {
        /// Why the last attempt to resume failed.
        reason: String,
    },
    /// A suspended session was resumed: same id, same locks, the fence deadline ahead
    /// again.
    Resumed {
        /// The replica now serving the session.
        endpoint: String,
        /// How long the session was suspended.
        suspended_for: Duration,
    },
    /// The session is gone: every lock is lost. Open a new one (after fencing).
    Lost {
        /// Why.
        reason: String,
    },
}

/// One subscriber's answer to a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckOutcome {
    /// The subscriber's node.
    pub node: String,
    /// Its session.
    pub session_id: i64,
    /// False: it did not answer before the deadline.
    pub answered: bool,
    /// Positive ack.
    pub ok: bool,
    /// Why a negative ack refused (or why there is no answer).
    pub reason: String,
}

/// The result of a publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublishOutcome {
    /// The message id.
    pub message_id: String,
    /// One entry per subscriber at publish time, in node order.
    pub results: Vec<AckOutcome>,
    /// Every subscriber acked positively.
    pub all_ok: bool,
}

impl PublishOutcome {
    /// Nodes that did not answer.
    pub fn unanswered(&self) -> Vec<&str> {
        self.results
            .iter()
            .filter(|r| !r.answered)
            .map(|r| r.node.as_str())
            .collect()
    }
}

/// A live node in the registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeEntry {
    /// The node.
    pub node: String,
    /// Its agent's address.
    pub agent_addr: String,
    /// Its session.
    pub session_id: i64,
}

/// Errors of the lock client.
#[derive(Debug, thiserror::Error)]
pub enum LockClientError {
    /// The service answered with an error (see `errno` and `resource`).
    #[error("{message}")]
    Service {
        /// The gRPC code.
        code: Code,
        /// The errno-style reason.
        errno: Errno,
        /// What it is about, e.g. "lock md0/token".
        resource: String,
        /// The server's sentence.
        message: String,
    },
    /// No replica answered.
    #[error("no mdserver replica answered ({endpoints}): {last}")]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// The last failure.
        last: String,
    },
    /// An endpoint URL is malformed.
    #[error("invalid mdserver endpoint {endpoint:?}: {reason}")]
    Endpoint {
        /// The endpoint.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The session is gone; open a new one.
    #[error("session lost: {reason}")]
    SessionLost {
        /// Why.
        reason: String,
    },
}

impl LockClientError {
    /// The errno-style reason.
    pub fn errno(&self) -> Errno {
        match self {
            LockClientError::Service { errno, .. } => *errno,
            LockClientError::Unreachable { .. } => Errno::Eio,
            LockClientError::Endpoint { .. } => Errno::Einval,
            LockClientError::SessionLost { .. } => Errno::Enoent,
        }
    }

    /// The gRPC code (Unavailable for unreachable replicas).
    pub fn code(&self) -> Code {
        match self {
            LockClientError::Service { code, .. } => *code,
            LockClientError::Unreachable { .. } => Code::Unavailable,
            LockClientError::Endpoint { .. } => Code::InvalidArgument,
            LockClientError::SessionLost { .. } => Code::FailedPrecondition,
        }
    }

    /// Decodes a status from the lock service.
    pub fn from_status(s: Status) -> Self {
        let detail = ErrorDetail::decode(s.details()).ok();
        LockClientError::Service {
            code: s.code(),
            errno: detail
                .as_ref()
                .and_then(|d| Errno::try_from(d.errno).ok())
                .unwrap_or(Errno::Unspecified),
            resource: detail.map(|d| d.resource).unwrap_or_default(),
            message: s.message().to_string(),
        }
    }
}

/// Is this status a transport failure (no answer from the service itself)?
fn is_transport(s: &Status) -> bool {
    s.details().is_empty()
        && matches!(
            s.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        )
}

/// Heartbeat send times kept to pair acks with.
const SENT_CAPACITY: usize = 64;

/// State shared by the session handle and its task.
struct Inner {
    cfg: SessionConfig,
    /// One lazily connected channel per endpoint.
    channels: Vec<Channel>,
    /// Index of the endpoint currently serving the session.
    current: AtomicUsize,
    /// The session id (etcd lease id).
    id: i64,
    /// The lease TTL the server granted.
    ttl: Duration,
    /// Send time of the last acknowledged heartbeat (or of the open request).
    last_acked_send: Mutex<Instant>,
    /// The fence deadline, readable without the lock (see [`FenceDeadline`]).
    deadline: FenceDeadline,
    /// Set once the session is lost.
    lost: Mutex<Option<String>>,
    /// The [`SessionState`] (as its `u8`).
    state: AtomicU8,
    /// Notifications dropped because the channel was full.
    dropped: AtomicU64,
}

impl Inner {
    /// Tells the observer, if any, of a heartbeat's outcome.
    fn observe(&self, ok: bool, took: Duration) {
        if let Some(o) = &self.cfg.observer {
            (o.0)(ok, took);
        }
    }

    fn heartbeat_interval(&self) -> Duration {
        self.cfg
            .heartbeat_interval
            .unwrap_or(self.ttl / 4)
            .max(Duration::from_millis(50))
    }

    /// The bound on one heartbeat's acknowledgement: the configured one (or half the
    /// period), never more than 90% of the period, never under 20 ms.
    fn heartbeat_timeout(&self) -> Duration {
        ack_deadline(self.cfg.heartbeat_timeout, self.heartbeat_interval())
    }

    fn lease_deadline(&self) -> Instant {
        *self
            .last_acked_send
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            + self.ttl
    }

    /// The lease deadline minus the fence margin.
    fn fence_deadline(&self) -> Instant {
        fence_at(self.lease_deadline(), self.cfg.fence_margin)
    }

    /// Moves the last acknowledged send time forward to `at` (never back), and the
    /// fence deadline handle with it.
    fn acked(&self, at: Instant) {
        let mut l = self
            .last_acked_send
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if at > *l {
            *l = at;
            self.deadline
                .set(fence_at(at + self.ttl, self.cfg.fence_margin));
        }
    }

    fn state(&self) -> SessionState {
        SessionState::from_u8(self.state.load(Ordering::SeqCst))
    }

    /// Records a transition and logs it (the one place transitions are logged).
    fn set_state(&self, to: SessionState, why: &str) {
        let from = SessionState::from_u8(self.state.swap(to.to_u8(), Ordering::SeqCst));
        if from == to {
            return;
        }
        let session = format!("{:x}", self.id);
        match to {
            SessionState::Suspended | SessionState::Lost => {
                tracing::warn!(node = %self.cfg.node, %session, "session {from} => {to}: {why}")
            }
            _ => tracing::info!(node = %self.cfg.node, %session, "session {from} => {to}: {why}"),
        }
    }

    fn lost(&self) -> Option<String> {
        self.lost.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set_lost(&self, reason: &str) {
        self.deadline.clear();
        let mut l = self.lost.lock().unwrap_or_else(|e| e.into_inner());
        if l.is_none() {
            *l = Some(reason.to_string());
        }
    }
}

/// A session's fence deadline, shared with the session task: cheap to clone and to
/// read from any thread without awaiting (one atomic load), for the checks right before
/// member I/O. Moves forward with every acknowledged heartbeat; empty (`None`) once the
/// session is lost or closed. On the monotonic clock ([`std::time::Instant`]).
#[derive(Debug, Clone)]
pub struct FenceDeadline(Arc<DeadlineCell>);

#[derive(Debug)]
struct DeadlineCell {
    /// Nanoseconds since [`deadline_base`]; 0: none.
    ns: AtomicU64,
    /// Made by [`FenceDeadline::manual`]: moved by hand, never by a session.
    manual: bool,
}

/// The origin of [`FenceDeadline`]'s nanoseconds (0 there means "no deadline").
fn deadline_base() -> std::time::Instant {
    static BASE: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *BASE.get_or_init(std::time::Instant::now)
}

impl FenceDeadline {
    fn new(at: Instant, manual: bool) -> Self {
        let d = FenceDeadline(Arc::new(DeadlineCell {
            ns: AtomicU64::new(0),
            manual,
        }));
        d.set(at);
        d
    }

    /// A deadline no session moves, only [`FenceDeadline::move_to`]: for tests of what
    /// is gated on it.
    pub fn manual(at: std::time::Instant) -> Self {
        FenceDeadline::new(Instant::from_std(at), true)
    }

    /// Moves a [`FenceDeadline::manual`] deadline (`None`: none); false (and nothing
    /// changes) on a session's.
    pub fn move_to(&self, at: Option<std::time::Instant>) -> bool {
        if !self.0.manual {
            return false;
        }
        match at {
            Some(at) => self.set(Instant::from_std(at)),
            None => self.clear(),
        }
        true
    }

    fn set(&self, at: Instant) {
        let ns = at
            .into_std()
            .saturating_duration_since(deadline_base())
            .as_nanos();
        // An instant at or before the origin is in the past: stored as 1, not "none".
        let ns = u64::try_from(ns).unwrap_or(u64::MAX).max(1);
        self.0.ns.store(ns, Ordering::Release);
    }

    fn clear(&self) {
        self.0.ns.store(0, Ordering::Release);
    }

    /// The deadline; `None` once the session is lost or closed.
    pub fn get(&self) -> Option<std::time::Instant> {
        match self.0.ns.load(Ordering::Acquire) {
            0 => None,
            ns => Some(deadline_base() + Duration::from_nanos(ns)),
        }
    }
}

/// The acknowledgement deadline of one heartbeat: `configured` (default half the
/// `period`), at most 90% of the period, at least 20 ms.
fn ack_deadline(configured: Option<Duration>, period: Duration) -> Duration {
    configured
        .unwrap_or(period / 2)
        .min(period * 9 / 10)
        .max(Duration::from_millis(20))
}

/// The fence deadline of a lease that expires at `lease`.
fn fence_at(lease: Instant, margin: Duration) -> Instant {
    lease.checked_sub(margin).unwrap_or(lease)
}

/// An open session. Dropping it without [`Session::close`] stops heartbeats: the lease
/// then expires after its TTL and its locks are released (like a crash).
pub struct Session {
    inner: Arc<Inner>,
    /// Asks the task to close the session.
    close_tx: Mutex<Option<oneshot::Sender<oneshot::Sender<()>>>>,
    task: tokio::task::JoinHandle<()>,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session")
            .field("id", &format_args!("{:x}", self.inner.id))
            .field("node", &self.inner.cfg.node)
            .finish_non_exhaustive()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An open session stream on one replica.
struct Conn {
    out: mpsc::Sender<SessionRequest>,
    inbound: Streaming<SessionEvent>,
}

fn channels(cfg: &SessionConfig) -> Result<Vec<Channel>, LockClientError> {
    if cfg.endpoints.is_empty() {
        return Err(LockClientError::Endpoint {
            endpoint: String::new(),
            reason: "no endpoints given".into(),
        });
    }
    cfg.endpoints
        .iter()
        .map(|e| {
            cfg.transport
                .endpoint(e)
                .map(|ep| {
                    let ep = ep
                        .connect_timeout(cfg.connect_timeout)
                        .tcp_nodelay(true)
                        .http2_keep_alive_interval(Duration::from_secs(2))
                        .keep_alive_timeout(Duration::from_secs(2));
                    cfg.transport.channel(&ep, None)
                })
                .map_err(|err| LockClientError::Endpoint {
                    endpoint: e.clone(),
                    reason: err.to_string(),
                })
        })
        .collect()
}

/// Opens a session stream on `channel`: returns the stream and the `SessionOpened` fields.
async fn open_stream(
    channel: Channel,
    open: OpenSession,
    bound: Duration,
) -> Result<(Conn, i64, Duration), LockClientError> {
    let go = async {
        let (out, rx) = mpsc::channel(16);
        let req = SessionRequest {
            kind: Some(session_request::Kind::Open(open)),
        };
        // The channel is new and empty: room for the first message.
        let _ = out.try_send(req);
        let mut client = LockServiceClient::new(channel);
        let mut inbound = client
            .session(ReceiverStream::new(rx))
            .await
            .map_err(LockClientError::from_status)?
            .into_inner();
        match inbound
            .message()
            .await
            .map_err(LockClientError::from_status)?
        {
            Some(SessionEvent {
                kind: Some(session_event::Kind::Opened(o)),
            }) => Ok((
                Conn { out, inbound },
                o.session_id,
                Duration::from_millis(o.ttl_ms),
            )),
            other => Err(LockClientError::Unreachable {
                endpoints: String::new(),
                last: format!("unexpected first event {other:?}"),
            }),
        }
    };
    match tokio::time::timeout(bound, go).await {
        Ok(r) => r,
        Err(_) => Err(LockClientError::Unreachable {
            endpoints: String::new(),
            last: format!("opening the session stream took longer than {bound:?}"),
        }),
    }
}

/// Why a connected stream ended.
enum End {
    Closed,
    Lost(String),
    Broken(String),
}

impl Session {
    /// Opens a new session on the first replica that answers; returns the session and
    /// its notification channel.
    pub async fn open(
        cfg: SessionConfig,
    ) -> Result<(Session, mpsc::Receiver<Notification>), LockClientError> {
        let channels = channels(&cfg)?;
        let mut last = None;
        for (i, ch) in channels.iter().enumerate() {
            let open = OpenSession {
                node: cfg.node.clone(),
                agent_addr: cfg.agent_addr.clone(),
                ttl_ms: cfg.ttl.as_millis() as u64,
                resume_session_id: 0,
            };
            let sent = Instant::now();
            match open_stream(ch.clone(), open, cfg.connect_timeout).await {
                Ok((conn, id, ttl)) => {
                    let (ntx, nrx) = mpsc::channel(cfg.notification_capacity.max(1));
                    let deadline =
                        FenceDeadline::new(fence_at(sent + ttl, cfg.fence_margin), false);
                    let inner = Arc::new(Inner {
                        cfg,
                        channels,
                        current: AtomicUsize::new(i),
                        id,
                        ttl,
                        last_acked_send: Mutex::new(sent),
                        deadline,
                        lost: Mutex::new(None),
                        state: AtomicU8::new(SessionState::Connected.to_u8()),
                        dropped: AtomicU64::new(0),
                    });
                    let (close_tx, close_rx) = oneshot::channel();
                    let task = tokio::spawn(run(inner.clone(), conn, ntx, close_rx));
                    return Ok((
                        Session {
                            inner,
                            close_tx: Mutex::new(Some(close_tx)),
                            task,
                        },
                        nrx,
                    ));
                }
                Err(e @ LockClientError::Service { .. })
                    if !matches!(e.code(), Code::Unavailable | Code::ResourceExhausted) =>
                {
                    return Err(e)
                }
                Err(e) => last = Some(e),
            }
        }
        // Every replica refused: the last refusal says why (EBUSY at its bound, or EIO).
        Err(match last {
            Some(e @ LockClientError::Service { .. }) => e,
            other => LockClientError::Unreachable {
                endpoints: cfg.endpoints.join(","),
                last: other.map(|e| e.to_string()).unwrap_or_default(),
            },
        })
    }

    /// Like [`Session::open`], but while the node still has a live session (EBUSY with
    /// AlreadyExists: a restarted agent whose previous lease has not expired yet) keeps
    /// retrying with backoff for at most `max_wait` (one TTL is enough).
    pub async fn open_waiting(
        cfg: SessionConfig,
        max_wait: Duration,
    ) -> Result<(Session, mpsc::Receiver<Notification>), LockClientError> {
        let deadline = Instant::now() + max_wait;
        let mut backoff = Duration::from_millis(100);
        loop {
            match Session::open(cfg.clone()).await {
                Err(e) if e.code() == Code::AlreadyExists && Instant::now() < deadline => {
                    let rest = deadline.saturating_duration_since(Instant::now());
                    tokio::time::sleep(backoff.min(rest)).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                r => return r,
            }
        }
    }

    /// The session id (the etcd lease id).
    pub fn id(&self) -> i64 {
        self.inner.id
    }

    /// The node this session belongs to.
    pub fn node(&self) -> &str {
        &self.inner.cfg.node
    }

    /// The lease TTL the server granted.
    pub fn ttl(&self) -> Duration {
        self.inner.ttl
    }

    /// The self-fencing deadline: stop member I/O at this instant unless a later
    /// heartbeat moved it. See the module doc.
    pub fn fence_deadline(&self) -> Instant {
        self.inner.fence_deadline()
    }

    /// Where the session stands now.
    pub fn state(&self) -> SessionState {
        self.inner.state()
    }

    /// A handle on [`Session::fence_deadline`] that any thread reads without awaiting;
    /// empty once the session is lost or closed.
    pub fn fence_deadline_handle(&self) -> FenceDeadline {
        self.inner.deadline.clone()
    }

    /// True while the fence deadline is ahead and the session is not lost.
    pub fn is_live(&self) -> bool {
        self.inner.lost().is_none() && Instant::now() < self.fence_deadline()
    }

    /// The endpoint currently serving the session.
    pub fn endpoint(&self) -> &str {
        let i = self.inner.current.load(Ordering::Relaxed);
        self.inner
            .cfg
            .endpoints
            .get(i)
            .map(String::as_str)
            .unwrap_or("")
    }

    /// Notifications dropped because the channel was full.
    pub fn dropped_notifications(&self) -> u64 {
        self.inner.dropped.load(Ordering::Relaxed)
    }

    /// Runs one unary call on the current replica, moving on to the next replica when
    /// one does not answer at the transport level (at most once per replica).
    async fn call<T, F, Fut>(&self, wait: Duration, f: F) -> Result<T, LockClientError>
    where
        F: Fn(LockServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        if let Some(reason) = self.inner.lost() {
            return Err(LockClientError::SessionLost { reason });
        }
        let n = self.inner.channels.len();
        let start = self.inner.current.load(Ordering::Relaxed);
        let bound = wait + self.inner.cfg.rpc_timeout;
        let mut last = String::new();
        for k in 0..n {
            let i = (start + k) % n;
            let client = LockServiceClient::new(self.inner.channels[i].clone());
            match tokio::time::timeout(bound, f(client)).await {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                // A replica that does not answer, or is at its bounds: try the next one.
                Ok(Err(s)) if is_transport(&s) || s.code() == Code::ResourceExhausted => {
                    last = s.to_string()
                }
                Ok(Err(s)) => return Err(LockClientError::from_status(s)),
                Err(_) => last = format!("no answer within {bound:?}"),
            }
        }
        Err(LockClientError::Unreachable {
            endpoints: self.inner.cfg.endpoints.join(","),
            last,
        })
    }

    /// Acquires `resource` in `mode`.
    pub async fn acquire(
        &self,
        resource: &str,
        mode: Mode,
        wait: Wait,
    ) -> Result<Grant, LockClientError> {
        let (no_queue, wait_d) = match wait {
            Wait::NoQueue => (true, Duration::ZERO),
            Wait::Queue(d) => (false, d),
        };
        let req = AcquireRequest {
            session_id: self.inner.id,
            resource: resource.to_string(),
            mode: mode.to_wire(),
            no_queue,
            wait_ms: wait_d.as_millis() as u64,
        };
        let r = self
            .call(wait_d, |mut c| {
                let req = req.clone();
                async move { c.acquire(req).await }
            })
            .await?;
        Ok(Grant {
            resource: resource.to_string(),
            mode: Mode::from_wire(r.mode),
            token: r.token,
            value: r.value,
            expired_holders: r.expired_holders,
        })
    }

    /// Releases `resource` (token 0: whatever request this session has, also a wait).
    pub async fn release(&self, resource: &str, token: u64) -> Result<(), LockClientError> {
        let req = ReleaseRequest {
            session_id: self.inner.id,
            resource: resource.to_string(),
            token,
        };
        self.call(Duration::ZERO, |mut c| {
            let req = req.clone();
            async move { c.release(req).await }
        })
        .await
        .map(|_| ())
    }

    /// Converts a granted lock to `mode` (downgrade at once; upgrade when sole holder).
    pub async fn convert(
        &self,
        resource: &str,
        token: u64,
        mode: Mode,
        wait: Wait,
    ) -> Result<Mode, LockClientError> {
        let (no_queue, wait_d) = match wait {
            Wait::NoQueue => (true, Duration::ZERO),
            Wait::Queue(d) => (false, d),
        };
        let req = ConvertRequest {
            session_id: self.inner.id,
            resource: resource.to_string(),
            token,
            mode: mode.to_wire(),
            no_queue,
            wait_ms: wait_d.as_millis() as u64,
        };
        let r = self
            .call(wait_d, |mut c| {
                let req = req.clone();
                async move { c.convert(req).await }
            })
            .await?;
        Ok(Mode::from_wire(r.mode))
    }

    /// Writes the value block of a lock held exclusive (fenced by `token`).
    pub async fn write_value(
        &self,
        resource: &str,
        token: u64,
        value: &[u8],
    ) -> Result<(), LockClientError> {
        let req = WriteValueRequest {
            session_id: self.inner.id,
            resource: resource.to_string(),
            token,
            value: value.to_vec(),
        };
        self.call(Duration::ZERO, |mut c| {
            let req = req.clone();
            async move { c.write_value(req).await }
        })
        .await
        .map(|_| ())
    }

    /// Reads the value block and the current holders' node names.
    pub async fn read_value(
        &self,
        resource: &str,
    ) -> Result<(Vec<u8>, Vec<String>), LockClientError> {
        let req = ReadValueRequest {
            resource: resource.to_string(),
        };
        let r = self
            .call(Duration::ZERO, |mut c| {
                let req = req.clone();
                async move { c.read_value(req).await }
            })
            .await?;
        Ok((r.value, r.holders))
    }

    /// Reads the value block and holders of every lock whose name starts with
    /// `prefix`, in one call (sorted by resource; locks with neither are not listed).
    /// An mdserver older than this call answers `Unimplemented`; a prefix matching
    /// more than mdserver returns at once is refused (`InvalidArgument`).
    pub async fn read_values(&self, prefix: &str) -> Result<Vec<LockValue>, LockClientError> {
        let req = ReadValuesRequest {
            prefix: prefix.to_string(),
        };
        let r = self
            .call(Duration::ZERO, |mut c| {
                let req = req.clone();
                async move { c.read_values(req).await }
            })
            .await?;
        Ok(r.locks)
    }

    /// Subscribes to `channel`.
    pub async fn subscribe(&self, channel: &str) -> Result<(), LockClientError> {
        let req = SubscribeRequest {
            session_id: self.inner.id,
            channel: channel.to_string(),
        };
        self.call(Duration::ZERO, |mut c| {
            let req = req.clone();
            async move { c.subscribe(req).await }
        })
        .await
        .map(|_| ())
    }

    /// Unsubscribes from `channel`.
    pub async fn unsubscribe(&self, channel: &str) -> Result<(), LockClientError> {
        let req = UnsubscribeRequest {
            session_id: self.inner.id,
            channel: channel.to_string(),
        };
        self.call(Duration::ZERO, |mut c| {
            let req = req.clone();
            async move { c.unsubscribe(req).await }
        })
        .await
        .map(|_| ())
    }

    /// Publishes `payload` on `channel` and waits for every subscriber's ack (or
    /// `timeout`).
    pub async fn publish(
        &self,
        channel: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> Result<PublishOutcome, LockClientError> {
        let req = PublishRequest {
            session_id: self.inner.id,
            channel: channel.to_string(),
            payload: payload.to_vec(),
            timeout_ms: timeout.as_millis() as u64,
        };
        let r = self
            .call(timeout, |mut c| {
                let req = req.clone();
                async move { c.publish(req).await }
            })
            .await?;
        Ok(PublishOutcome {
            message_id: r.message_id,
            all_ok: r.all_ok,
            results: r
                .results
                .into_iter()
                .map(|a| AckOutcome {
                    node: a.node,
                    session_id: a.session_id,
                    answered: a.answered,
                    ok: a.ok,
                    reason: a.reason,
                })
                .collect(),
        })
    }

    /// Acks a delivered message: `Ok(())` positive, `Err(reason)` negative.
    pub async fn ack(
        &self,
        message_id: &str,
        result: Result<(), String>,
    ) -> Result<(), LockClientError> {
        let (ok, reason) = match result {
            Ok(()) => (true, String::new()),
            Err(r) => (false, r),
        };
        let req = AckRequest {
            session_id: self.inner.id,
            message_id: message_id.to_string(),
            ok,
            reason,
        };
        self.call(Duration::ZERO, |mut c| {
            let req = req.clone();
            async move { c.ack(req).await }
        })
        .await
        .map(|_| ())
    }

    /// The nodes with a live session.
    pub async fn nodes(&self) -> Result<Vec<NodeEntry>, LockClientError> {
        let r = self
            .call(Duration::ZERO, |mut c| async move {
                c.list_nodes(ListNodesRequest {}).await
            })
            .await?;
        Ok(r.nodes
            .into_iter()
            .map(|n| NodeEntry {
                node: n.node,
                agent_addr: n.agent_addr,
                session_id: n.session_id,
            })
            .collect())
    }

    /// Closes the session on purpose: its locks are released at once (waiters are not
    /// told of an expiry). Bounded by the connect timeout. A second call does nothing.
    pub async fn close(&self) -> Result<(), LockClientError> {
        let tx = self
            .close_tx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(tx) = tx {
            let (done_tx, done_rx) = oneshot::channel();
            if tx.send(done_tx).is_ok() {
                let _ = tokio::time::timeout(self.inner.cfg.connect_timeout, done_rx).await;
            }
        }
        Ok(())
    }
}

/// The session task: connected ⇄ reconnecting, until closed or lost.
async fn run(
    inner: Arc<Inner>,
    mut conn: Conn,
    ntx: mpsc::Sender<Notification>,
    mut close_rx: oneshot::Receiver<oneshot::Sender<()>>,
) {
    loop {
        let end = connected(&inner, &mut conn, &ntx, &mut close_rx).await;
        let reason = match end {
            End::Closed => {
                inner.set_state(SessionState::Closed, "closed on purpose");
                return;
            }
            End::Lost(r) => r,
            End::Broken(why) => {
                inner.set_state(SessionState::Reconnecting, &why);
                match reconnect(&inner, &ntx).await {
                    Ok((c, suspended)) => {
                        conn = c;
                        let i = inner.current.load(Ordering::Relaxed);
                        let endpoint = inner.cfg.endpoints.get(i).cloned().unwrap_or_default();
                        let note = match suspended {
                            Some(since) => {
                                let suspended_for = since.elapsed();
                                inner.set_state(
                                    SessionState::Connected,
                                    &format!(
                                        "resumed on {endpoint} after {suspended_for:?} suspended"
                                    ),
                                );
                                Notification::Resumed {
                                    endpoint,
                                    suspended_for,
                                }
                            }
                            None => {
                                inner.set_state(
                                    SessionState::Connected,
                                    &format!("resumed on {endpoint}"),
                                );
                                Notification::Reconnected { endpoint }
                            }
                        };
                        notify(&inner, &ntx, note);
                        continue;
                    }
                    Err(r) => r,
                }
            }
        };
        inner.set_lost(&reason);
        inner.set_state(SessionState::Lost, &reason);
        // The agent must learn this even when the channel is full: wait for room.
        let _ = tokio::time::timeout(inner.ttl, ntx.send(Notification::Lost { reason })).await;
        return;
    }
}

fn notify(inner: &Inner, ntx: &mpsc::Sender<Notification>, n: Notification) {
    if ntx.try_send(n).is_err() {
        inner.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// Serves one connected stream: heartbeats out, acks and notifications in.
async fn connected(
    inner: &Inner,
    conn: &mut Conn,
    ntx: &mpsc::Sender<Notification>,
    close_rx: &mut oneshot::Receiver<oneshot::Sender<()>>,
) -> End {
    let interval = inner.heartbeat_interval();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut sent: VecDeque<(u64, Instant)> = VecDeque::new();
    let mut seq = 0u64;
    // A replica that does not acknowledge a heartbeat within this bound (hung, stopped,
    // or cut off from etcd) is left for the next one at once.
    let ack_timeout = inner.heartbeat_timeout();
    loop {
        // The oldest heartbeat not yet acknowledged must be acknowledged by this instant.
        let ack_due = sent.front().map(|&(s, at)| (s, at + ack_timeout));
        tokio::select! {
            _ = tokio::time::sleep_until(ack_due.map_or_else(Instant::now, |(_, d)| d)), if ack_due.is_some() => {
                let s = ack_due.map_or(0, |(s, _)| s);
                inner.observe(false, ack_timeout);
                return End::Broken(format!(
                    "heartbeat {s} not acknowledged within {ack_timeout:?}: the replica is hung or cut off from etcd"
                ));
            }
            _ = tick.tick() => {
                seq += 1;
                sent.push_back((seq, Instant::now()));
                if sent.len() > SENT_CAPACITY {
                    sent.pop_front();
                }
                let hb = SessionRequest { kind: Some(session_request::Kind::Heartbeat(Heartbeat { seq })) };
                if conn.out.try_send(hb).is_err() {
                    return End::Broken("session stream not draining".into());
                }
            }
            m = conn.inbound.message() => match m {
                Ok(Some(SessionEvent { kind: Some(kind) })) => match kind {
                    session_event::Kind::HeartbeatAck(a) => {
                        if let Some(&(_, at)) = sent.iter().find(|(s, _)| *s == a.seq) {
                            inner.observe(true, at.elapsed());
                            inner.acked(at);
                            sent.retain(|(s, _)| *s > a.seq);
                        }
                    }
                    session_event::Kind::Expired(e) => return End::Lost(e.reason),
                    session_event::Kind::Opened(_) => {}
                    session_event::Kind::Granted(g) => notify(inner, ntx, Notification::Granted {
                        resource: g.resource,
                        mode: Mode::from_wire(g.mode),
                        token: g.token,
                    }),
                    session_event::Kind::Blocking(b) => notify(inner, ntx, Notification::Blocking {
                        resource: b.resource,
                        waiter_node: b.waiter_node,
                        waiter_mode: Mode::from_wire(b.waiter_mode),
                    }),
                    session_event::Kind::HolderExpired(h) => notify(inner, ntx, Notification::HolderExpired {
                        resource: h.resource,
                        node: h.node,
                        session_id: h.session_id,
                    }),
                    session_event::Kind::Message(m) => notify(inner, ntx, Notification::Message(Delivery {
                        channel: m.channel,
                        message_id: m.message_id,
                        publisher_node: m.publisher_node,
                        payload: m.payload,
                    })),
                },
                Ok(Some(_)) => {}
                Ok(None) => return End::Broken("the replica ended the session stream".into()),
                Err(s) => {
                    let e = LockClientError::from_status(s);
                    if e.errno() == Errno::Enoent && e.code() == Code::FailedPrecondition {
                        return End::Lost(e.to_string());
                    }
                    return End::Broken(e.to_string());
                }
            },
            done = &mut *close_rx => {
                let close = SessionRequest { kind: Some(session_request::Kind::Close(CloseSession {})) };
                if conn.out.try_send(close).is_ok() {
                    // The replica ends the stream once the lease is revoked.
                    let wait = async { while let Ok(Some(_)) = conn.inbound.message().await {} };
                    let _ = tokio::time::timeout(inner.cfg.connect_timeout, wait).await;
                }
                inner.set_lost("closed");
                if let Ok(done) = done {
                    let _ = done.send(());
                }
                return End::Closed;
            }
        }
    }
}

/// Resumes the session on the next replicas in turn, with bounded backoff. Past the
/// fence deadline the session is suspended (told once); the attempts go on until the
/// lease deadline plus [`SessionConfig::suspend_max`]. `Ok` carries the instant the
/// session was suspended, if it was; `Err(reason)` means the session is lost: a replica
/// that reached etcd said the lease is gone, or the suspension lasted too long.
async fn reconnect(
    inner: &Inner,
    ntx: &mpsc::Sender<Notification>,
) -> Result<(Conn, Option<Instant>), String> {
    let n = inner.channels.len();
    let mut i = inner.current.load(Ordering::Relaxed) + 1;
    let mut backoff = Duration::from_millis(50);
    let mut last = String::from("no replica tried yet");
    let mut suspended: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let lease_deadline = inner.lease_deadline();
        if suspended.is_none() && now >= inner.fence_deadline() {
            suspended = Some(now);
            let reason = format!(
                "no replica renewed the lease before the fence deadline; still trying to resume \
                 for up to {:?} past the lease deadline: {last}",
                inner.cfg.suspend_max
            );
            inner.set_state(SessionState::Suspended, &reason);
            notify(inner, ntx, Notification::Suspended { reason });
        }
        let give_up = lease_deadline + inner.cfg.suspend_max;
        if now >= give_up {
            return Err(if inner.cfg.suspend_max.is_zero() {
                format!("could not resume the session within its TTL: {last}")
            } else {
                format!(
                    "could not resume the session within its TTL and {:?} suspended: {last}",
                    inner.cfg.suspend_max
                )
            });
        }
        let ep = i % n;
        let open = OpenSession {
            node: inner.cfg.node.clone(),
            agent_addr: inner.cfg.agent_addr.clone(),
            ttl_ms: 0,
            resume_session_id: inner.id,
        };
        let bound = inner.cfg.connect_timeout.min(give_up - now);
        let sent = Instant::now();
        match open_stream(inner.channels[ep].clone(), open, bound).await {
            Ok((conn, _, _)) => {
                inner.current.store(ep, Ordering::Relaxed);
                // The replica renewed the lease after it received the resume.
                inner.acked(sent);
                return Ok((conn, suspended));
            }
            Err(e) if matches!(e.errno(), Errno::Enoent | Errno::Eperm) => {
                return Err(format!("{}: {e}", inner.cfg.endpoints[ep]))
            }
            Err(e) => last = format!("{}: {e}", inner.cfg.endpoints[ep]),
        }
        i += 1;
        let rest = (inner.lease_deadline() + inner.cfg.suspend_max)
            .saturating_duration_since(Instant::now());
        tokio::time::sleep(backoff.min(rest)).await;
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fence_deadline_handle_reads_what_was_set_and_none_once_cleared() {
        let at = std::time::Instant::now() + Duration::from_secs(3);
        let d = FenceDeadline::manual(at);
        let got = d.get().unwrap();
        assert!(got.max(at) - got.min(at) < Duration::from_micros(1));
        let copy = d.clone();
        assert!(d.move_to(Some(at + Duration::from_secs(1))));
        assert!(copy.get().unwrap() > at, "clones share the deadline");
        assert!(d.move_to(None));
        assert!(copy.get().is_none());
        // Long past is still a deadline (in the past), not "none".
        let past = FenceDeadline::manual(deadline_base());
        assert!(past.get().is_some_and(|p| p <= std::time::Instant::now()));
        // A session's deadline moves with its heartbeats only.
        let session = FenceDeadline::new(Instant::now(), false);
        assert!(!session.move_to(None));
        assert!(session.get().is_some());
        session.set(Instant::now() + Duration::from_secs(5));
        session.clear();
        assert!(session.get().is_none());
    }

    #[test]
    fn service_errors_keep_errno_and_resource() {
        let detail = ErrorDetail {
            errno: Errno::Ebusy as i32,
            resource: "lock md0/token".into(),
        };
        let s = Status::with_details(
            Code::Aborted,
            "lock md0/token is busy",
            detail.encode_to_vec().into(),
        );
        assert!(!is_transport(&s));
        let e = LockClientError::from_status(s);
        assert_eq!(e.errno(), Errno::Ebusy);
        assert_eq!(e.code(), Code::Aborted);
        assert_eq!(e.to_string(), "lock md0/token is busy");
        match e {
            LockClientError::Service { resource, .. } => assert_eq!(resource, "lock md0/token"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn statuses_without_details_are_transport_failures() {
        assert!(is_transport(&Status::unavailable("connection refused")));
        let e = LockClientError::from_status(Status::unavailable("connection refused"));
        assert_eq!(e.errno(), Errno::Unspecified);
    }

    #[test]
    fn modes_round_trip() {
        for m in [Mode::Shared, Mode::Exclusive] {
            assert_eq!(Mode::from_wire(m.to_wire()), m);
        }
    }

    #[test]
    fn config_defaults_derive_the_heartbeat() {
        let cfg = SessionConfig::new(vec!["http://127.0.0.1:1".into()], "n1", "a:1");
        assert_eq!(cfg.ttl, Duration::from_secs(10));
        assert!(cfg.fence_margin < cfg.ttl);
        assert!(channels(&SessionConfig::new(vec![], "n1", "")).is_err());
    }

    #[test]
    fn a_heartbeat_deadline_stays_under_the_period() {
        let p = Duration::from_millis(1500);
        assert_eq!(ack_deadline(None, p), Duration::from_millis(750));
        assert_eq!(
            ack_deadline(Some(Duration::from_secs(5)), p),
            Duration::from_millis(1350)
        );
        assert_eq!(
            ack_deadline(Some(Duration::ZERO), p),
            Duration::from_millis(20)
        );
    }

    #[test]
    fn states_round_trip() {
        for st in [
            SessionState::Connected,
            SessionState::Reconnecting,
            SessionState::Suspended,
            SessionState::Lost,
            SessionState::Closed,
        ] {
            assert_eq!(SessionState::from_u8(st.to_u8()), st);
        }
        assert_eq!(
            SessionConfig::new(vec![], "n1", "").suspend_max,
            DEFAULT_SUSPEND_MAX
        );
    }

    /// A session whose lease was last renewed `ago`, on endpoints nobody listens on.
    fn unreachable_session(ago: Duration, suspend_max: Duration) -> Inner {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let mut cfg = SessionConfig::new(vec![format!("http://127.0.0.1:{port}")], "n1", "a:1");
        cfg.ttl = Duration::from_secs(2);
        cfg.fence_margin = Duration::from_millis(500);
        cfg.connect_timeout = Duration::from_millis(200);
        cfg.suspend_max = suspend_max;
        let now = Instant::now();
        Inner {
            channels: channels(&cfg).expect("channels"),
            ttl: cfg.ttl,
            cfg,
            current: AtomicUsize::new(0),
            id: 0x42,
            last_acked_send: Mutex::new(now.checked_sub(ago).unwrap_or(now)),
            deadline: FenceDeadline::new(now, false),
            lost: Mutex::new(None),
            state: AtomicU8::new(SessionState::Reconnecting.to_u8()),
            dropped: AtomicU64::new(0),
        }
    }

    #[tokio::test]
    async fn unreachable_replicas_suspend_the_session_until_suspend_max() {
        // The fence deadline (ttl - margin = 1.5 s after the last renewal) has passed, the
        // lease deadline (2 s) passes during the attempts.
        let inner = unreachable_session(Duration::from_millis(1800), Duration::from_millis(700));
        let (ntx, mut nrx) = mpsc::channel(8);
        let t = Instant::now();
        let r = reconnect(&inner, &ntx).await;
        let took = t.elapsed();
        let e = r.err().expect("no replica: the session ends lost");
        assert!(e.contains("suspended"), "{e}");
        assert!(e.contains("127.0.0.1"), "names the replica: {e}");
        // Lost no earlier than the lease deadline + suspend_max (0.2 s + 0.7 s from now).
        assert!(took >= Duration::from_millis(850), "gave up after {took:?}");
        assert!(took < Duration::from_secs(3), "gave up after {took:?}");
        assert_eq!(inner.state(), SessionState::Suspended);
        match nrx.try_recv() {
            Ok(Notification::Suspended { reason }) => {
                assert!(reason.contains("fence deadline"), "{reason}")
            }
            other => panic!("expected Suspended first, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn without_suspend_max_the_session_is_lost_at_the_lease_deadline() {
        let inner = unreachable_session(Duration::from_millis(1000), Duration::ZERO);
        let (ntx, mut nrx) = mpsc::channel(8);
        let t = Instant::now();
        let e = reconnect(&inner, &ntx).await.err().expect("lost");
        let took = t.elapsed();
        assert!(e.contains("within its TTL"), "{e}");
        // The lease deadline is 1 s away; the fence deadline 0.5 s away.
        assert!(took >= Duration::from_millis(950), "gave up after {took:?}");
        assert!(took < Duration::from_millis(2500), "gave up after {took:?}");
        assert!(matches!(nrx.try_recv(), Ok(Notification::Suspended { .. })));
    }
}
