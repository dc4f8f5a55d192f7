//! An in-memory lock service implementing the agent's lock port
//! ([`mdcluster_agent::lockport::LockPort`]), for the in-process test tier only: several
//! `Node`s in one process share one [`MemLock`]. It is a test double of `mdserver` +
//! etcd (docs/LOCKS.md), never a replacement for them in the real-process tests.
//!
//! Semantics kept from the real service:
//! - **sessions**: one live session per node (a second open answers EBUSY/AlreadyExists);
//!   each has a TTL and a fence deadline ([`FenceDeadline`], moved by hand here: far
//!   ahead while the session lives, past while it is suspended, empty once it is gone);
//! - **locks**: a queue per resource in request order; an exclusive request is granted
//!   when first, a shared one when no exclusive request is ahead of it; acquire is
//!   idempotent per session and lock (another mode: EPERM); no-queue requests that
//!   cannot be granted answer EBUSY naming the holders; queued ones wait until their
//!   deadline (ETIMEDOUT naming the holders, the request withdrawn); a waiter that goes
//!   away withdraws its request; the first time a request blocks, every holder gets
//!   `Blocking`; a request granted after a wait gets `Granted`;
//! - **fencing tokens**: one counter for every new request on any lock, so tokens only
//!   grow; release, convert and write_value compare it;
//! - **value blocks** (≤ 1024 bytes) that outlive their holders;
//! - **channels**: publish delivers to every other subscriber in publish order and waits
//!   for every ack until its timeout; results in node order, negative acks with their
//!   reason, silent ones "no answer within …", a recipient whose session ended while
//!   waiting "left the channel" (ok, not answered);
//! - **a killed session** ([`MemLock::kill`], as a lease expiry): its locks are released,
//!   each waiter queued behind one of them gets `HolderExpired` (and the grant names the
//!   node in `expired_holders`), its subscriptions end, it leaves the node registry, its
//!   fence deadline empties and the session is told `Lost`; a session closed on purpose
//!   releases the same without telling anyone of an expiry.
//!
//! Notifications go through a bounded outbox per session that can hold each one back
//! for a chosen delay ([`MemLock::set_delay`]) while keeping their order, so a test
//! can vary how deliveries to different nodes interleave.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mdcluster_agent::lockport::{
    AckOutcome, Delivery, FenceDeadline, Grant, LockClientError, LockPort, LockValue, Mode,
    NodeEntry, Notification, Opened, PortFuture, PortResult, PublishOutcome, SessionOpener,
    SessionState, Wait,
};
use mdcluster_proto::v1::Errno;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use tonic::Code;

/// Largest value block.
pub const MAX_VALUE: usize = 1024;
/// Capacity of each session's notification channel (and its outbox).
pub const NOTIFICATION_CAPACITY: usize = 1024;
/// How far ahead a live session's fence deadline is kept.
const LIVE_AHEAD: Duration = Duration::from_secs(3600);

/// Picks a delivery delay for a notification to a node (see [`MemLock::set_delay`]).
pub type DelayFn = Arc<dyn Fn(&str, &Notification) -> Duration + Send + Sync>;

/// One request in a lock's queue.
#[derive(Debug, Clone)]
struct Req {
    session: i64,
    node: String,
    mode: Mode,
    token: u64,
}

#[derive(Debug)]
struct Sess {
    node: String,
    agent_addr: String,
    outbox: mpsc::Sender<(Duration, Notification)>,
    deadline: FenceDeadline,
    state: SessionState,
    lost: Option<String>,
}

/// A publish waiting for its acks.
#[derive(Debug)]
struct Pending {
    recipients: Vec<(i64, String)>,
    answers: HashMap<i64, (bool, String)>,
    left: HashSet<i64>,
}

#[derive(Default)]
struct State {
    next_session: i64,
    next_token: u64,
    next_msg: u64,
    sessions: HashMap<i64, Sess>,
    /// Node → its live session.
    nodes: BTreeMap<String, i64>,
    queues: HashMap<String, Vec<Req>>,
    values: HashMap<String, Vec<u8>>,
    subs: HashMap<String, Vec<i64>>,
    pending: HashMap<String, Pending>,
    /// Per waiting request (session, resource): nodes that expired ahead of it.
    expired_seen: HashMap<(i64, String), Vec<String>>,
    delay: Option<DelayFn>,
    dropped: u64,
    /// ReadValues answers `Unimplemented`, as an mdserver before that call.
    no_read_values: bool,
}

struct Shared {
    state: Mutex<State>,
    changed: Notify,
    publishes: AtomicU64,
}

/// The in-memory lock service. Cheap to clone (one shared state).
#[derive(Clone)]
pub struct MemLock(Arc<Shared>);

impl std::fmt::Debug for MemLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemLock").finish_non_exhaustive()
    }
}

impl Default for MemLock {
    fn default() -> Self {
        Self::new()
    }
}

fn err(code: Code, errno: Errno, resource: &str, message: String) -> LockClientError {
    LockClientError::Service {
        code,
        errno,
        resource: resource.to_string(),
        message,
    }
}

fn names(q: &[&Req]) -> String {
    if q.is_empty() {
        "nobody".into()
    } else {
        q.iter()
            .map(|r| r.node.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn is_granted(q: &[Req], i: usize) -> bool {
    match q[i].mode {
        Mode::Exclusive => i == 0,
        Mode::Shared => q[..i].iter().all(|e| e.mode == Mode::Shared),
    }
}

fn holders(q: &[Req]) -> Vec<&Req> {
    (0..q.len())
        .filter(|&i| is_granted(q, i))
        .map(|i| &q[i])
        .collect()
}

impl State {
    fn live(&self, sid: i64) -> Result<&Sess, LockClientError> {
        match self.sessions.get(&sid) {
            Some(s) if s.lost.is_none() && s.state != SessionState::Closed => Ok(s),
            Some(s) => Err(LockClientError::SessionLost {
                reason: s.lost.clone().unwrap_or_else(|| "session closed".into()),
            }),
            None => Err(LockClientError::SessionLost {
                reason: format!("no session {sid:x}"),
            }),
        }
    }

    fn notify(&mut self, sid: i64, n: Notification) {
        let delay = match (&self.delay, self.sessions.get(&sid)) {
            (Some(f), Some(s)) => f(&s.node, &n),
            _ => Duration::ZERO,
        };
        if let Some(s) = self.sessions.get(&sid) {
            if s.outbox.try_send((delay, n)).is_err() {
                self.dropped += 1;
            }
        }
    }

    /// The value block of `resource` and its holders' node names (queue order).
    fn value_of(&self, resource: &str) -> (Vec<u8>, Vec<String>) {
        let value = self.values.get(resource).cloned().unwrap_or_default();
        let hs = self
            .queues
            .get(resource)
            .map(|q| holders(q).iter().map(|r| r.node.clone()).collect())
            .unwrap_or_default();
        (value, hs)
    }

    /// Ends session `sid`: `expired` (a lease expiry: waiters told) or closed.
    fn end(&mut self, sid: i64, why: &str, expired: bool) {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        if s.lost.is_some() || s.state == SessionState::Closed {
            return;
        }
        let node = s.node.clone();
        s.deadline.move_to(None);
        if expired {
            s.state = SessionState::Lost;
            s.lost = Some(why.to_string());
        } else {
            s.state = SessionState::Closed;
            s.lost = Some("session closed".into());
        }
        if self.nodes.get(&node) == Some(&sid) {
            self.nodes.remove(&node);
        }
        let resources: Vec<String> = self.queues.keys().cloned().collect();
        for res in resources {
            let Some(q) = self.queues.get_mut(&res) else {
                continue;
            };
            let Some(pos) = q.iter().position(|r| r.session == sid) else {
                continue;
            };
            q.remove(pos);
            if expired {
                let waiters: Vec<i64> = q.iter().skip(pos).map(|r| r.session).collect();
                for w in waiters {
                    self.expired_seen
                        .entry((w, res.clone()))
                        .or_default()
                        .push(node.clone());
                    self.notify(
                        w,
                        Notification::HolderExpired {
                            resource: res.clone(),
                            node: node.clone(),
                            session_id: sid,
                        },
                    );
                }
            }
        }
        self.queues.retain(|_, q| !q.is_empty());
        for subs in self.subs.values_mut() {
            subs.retain(|x| *x != sid);
        }
        for p in self.pending.values_mut() {
            if p.recipients.iter().any(|(x, _)| *x == sid) {
                p.left.insert(sid);
            }
        }
        if expired {
            self.notify(
                sid,
                Notification::Lost {
                    reason: why.to_string(),
                },
            );
        }
    }
}

impl MemLock {
    /// An empty service.
    pub fn new() -> MemLock {
        MemLock(Arc::new(Shared {
            state: Mutex::new(State {
                next_session: 0x1000,
                ..State::default()
            }),
            changed: Notify::new(),
            publishes: AtomicU64::new(0),
        }))
    }

    fn st(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn changed(&self) {
        self.0.changed.notify_waiters();
    }

    /// Opens a session for `node`; EBUSY (AlreadyExists) while the node has a live one.
    pub fn open(&self, node: &str, agent_addr: &str, ttl: Duration) -> PortResult<Opened> {
        let (s, rx) = self.open_session(node, agent_addr, ttl)?;
        Ok((Arc::new(s), rx))
    }

    /// [`MemLock::open`] with the concrete session type.
    pub fn open_session(
        &self,
        node: &str,
        agent_addr: &str,
        ttl: Duration,
    ) -> PortResult<(MemSession, mpsc::Receiver<Notification>)> {
        let mut st = self.st();
        if let Some(old) = st.nodes.get(node) {
            return Err(err(
                Code::AlreadyExists,
                Errno::Ebusy,
                &format!("node {node}"),
                format!("node {node} already has a live session {old:x}; wait for it to expire"),
            ));
        }
        st.next_session += 1;
        let id = st.next_session;
        let (otx, mut orx) = mpsc::channel::<(Duration, Notification)>(NOTIFICATION_CAPACITY);
        let (ntx, nrx) = mpsc::channel(NOTIFICATION_CAPACITY);
        // The outbox keeps the order and holds each notification back for its delay.
        tokio::spawn(async move {
            while let Some((d, n)) = orx.recv().await {
                if !d.is_zero() {
                    tokio::time::sleep(d).await;
                }
                if ntx.send(n).await.is_err() {
                    return;
                }
            }
        });
        let deadline = FenceDeadline::manual(std::time::Instant::now() + LIVE_AHEAD);
        st.sessions.insert(
            id,
            Sess {
                node: node.to_string(),
                agent_addr: agent_addr.to_string(),
                outbox: otx,
                deadline: deadline.clone(),
                state: SessionState::Connected,
                lost: None,
            },
        );
        st.nodes.insert(node.to_string(), id);
        drop(st);
        Ok((
            MemSession {
                svc: self.clone(),
                id,
                node: node.to_string(),
                ttl,
                deadline,
            },
            nrx,
        ))
    }

    /// An opener for `node` (what the agent's runtime takes).
    pub fn opener(&self, node: &str, ttl: Duration) -> Arc<dyn SessionOpener> {
        Arc::new(MemOpener {
            svc: self.clone(),
            node: node.to_string(),
            ttl,
        })
    }

    /// Expires `node`'s live session as etcd would expire its lease: false if it has
    /// none.
    pub fn kill(&self, node: &str) -> bool {
        let mut st = self.st();
        let Some(&sid) = st.nodes.get(node) else {
            return false;
        };
        st.end(sid, &format!("the lease of node {node} expired"), true);
        drop(st);
        self.changed();
        true
    }

    /// Suspends `node`'s session (no replica can renew it): the fence deadline is
    /// moved into the past and the session told `Suspended`.
    pub fn suspend(&self, node: &str) -> bool {
        let mut st = self.st();
        let Some(&sid) = st.nodes.get(node) else {
            return false;
        };
        if let Some(s) = st.sessions.get_mut(&sid) {
            s.state = SessionState::Suspended;
            s.deadline.move_to(Some(std::time::Instant::now()));
        }
        st.notify(
            sid,
            Notification::Suspended {
                reason: "memlock: suspended by the test".into(),
            },
        );
        true
    }

    /// Moves `node`'s session to `state` without telling the node, as when the lock
    /// client's notification was dropped from a full channel. `Suspended` also moves
    /// the fence deadline into the past; `Connected` moves it ahead again.
    pub fn set_state_untold(&self, node: &str, state: SessionState) -> bool {
        let mut st = self.st();
        let Some(&sid) = st.nodes.get(node) else {
            return false;
        };
        let Some(s) = st.sessions.get_mut(&sid) else {
            return false;
        };
        s.state = state;
        let deadline = match state {
            SessionState::Suspended => Some(std::time::Instant::now()),
            SessionState::Connected => Some(std::time::Instant::now() + LIVE_AHEAD),
            _ => None,
        };
        if deadline.is_some() {
            s.deadline.move_to(deadline);
        }
        true
    }

    /// Makes ReadValues answer `Unimplemented` (`off`), as an mdserver older than that
    /// call does, or answer again.
    pub fn set_read_values_off(&self, off: bool) {
        self.st().no_read_values = off;
    }

    /// Resumes a suspended session of `node`.
    pub fn resume(&self, node: &str) -> bool {
        let mut st = self.st();
        let Some(&sid) = st.nodes.get(node) else {
            return false;
        };
        if let Some(s) = st.sessions.get_mut(&sid) {
            s.state = SessionState::Connected;
            s.deadline
                .move_to(Some(std::time::Instant::now() + LIVE_AHEAD));
        }
        st.notify(
            sid,
            Notification::Resumed {
                endpoint: "memlock".into(),
                suspended_for: Duration::ZERO,
            },
        );
        true
    }

    /// Sets (or clears) the delay each notification is held back before delivery,
    /// chosen per recipient node and notification; order per session is kept.
    pub fn set_delay(&self, f: Option<DelayFn>) {
        self.st().delay = f;
    }

    /// The live session of `node`.
    pub fn session_of(&self, node: &str) -> Option<i64> {
        self.st().nodes.get(node).copied()
    }

    /// The holders of `resource` (node names, queue order).
    pub fn holders(&self, resource: &str) -> Vec<String> {
        let st = self.st();
        st.queues
            .get(resource)
            .map(|q| holders(q).iter().map(|r| r.node.clone()).collect())
            .unwrap_or_default()
    }

    /// Every resource with a request, and its holders.
    pub fn locks(&self) -> BTreeMap<String, Vec<String>> {
        let st = self.st();
        st.queues
            .iter()
            .map(|(k, q)| {
                (
                    k.clone(),
                    holders(q).iter().map(|r| r.node.clone()).collect(),
                )
            })
            .collect()
    }

    /// Publishes made so far.
    pub fn publishes(&self) -> u64 {
        self.0.publishes.load(Ordering::Relaxed)
    }

    /// Notifications dropped because an outbox was full.
    pub fn dropped(&self) -> u64 {
        self.st().dropped
    }

    async fn acquire(&self, sid: i64, resource: &str, mode: Mode, wait: Wait) -> PortResult<Grant> {
        let deadline = match wait {
            Wait::NoQueue => None,
            Wait::Queue(d) => Some(Instant::now() + d),
        };
        let token = {
            let mut st = self.st();
            let node = st.live(sid)?.node.clone();
            let q = st.queues.entry(resource.to_string()).or_default();
            match q.iter().find(|r| r.session == sid) {
                Some(r) if r.mode == mode => r.token,
                Some(r) => {
                    let had = r.mode;
                    return Err(err(
                        Code::FailedPrecondition,
                        Errno::Eperm,
                        &format!("lock {resource}"),
                        format!(
                            "lock {resource}: session {sid:x} already has a {had:?} request; convert it"
                        ),
                    ));
                }
                None => {
                    st.next_token += 1;
                    let token = st.next_token;
                    st.queues
                        .get_mut(resource)
                        .expect("queue made above")
                        .push(Req {
                            session: sid,
                            node,
                            mode,
                            token,
                        });
                    st.expired_seen.remove(&(sid, resource.to_string()));
                    token
                }
            }
        };
        // Withdraws the request unless it was granted (also when the caller goes away).
        let mut guard = Withdraw {
            svc: self.clone(),
            sid,
            resource: resource.to_string(),
            token,
            armed: true,
        };
        let mut waited = false;
        loop {
            let notified = self.0.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.st();
                st.live(sid)?;
                let q = st.queues.get(resource).cloned().unwrap_or_default();
                let Some(i) = q.iter().position(|r| r.session == sid && r.token == token) else {
                    guard.armed = false;
                    return Err(err(
                        Code::Aborted,
                        Errno::Enoent,
                        &format!("lock {resource}"),
                        format!("lock {resource}: the waiting request was cancelled"),
                    ));
                };
                if is_granted(&q, i) {
                    guard.armed = false;
                    let expired = st
                        .expired_seen
                        .remove(&(sid, resource.to_string()))
                        .unwrap_or_default();
                    if waited {
                        st.notify(
                            sid,
                            Notification::Granted {
                                resource: resource.to_string(),
                                mode,
                                token,
                            },
                        );
                    }
                    return Ok(Grant {
                        resource: resource.to_string(),
                        mode,
                        token,
                        value: st.values.get(resource).cloned().unwrap_or_default(),
                        expired_holders: expired,
                    });
                }
                let holding: Vec<&Req> = holders(&q);
                let who = names(&holding);
                let Some(deadline) = deadline else {
                    return Err(err(
                        Code::Aborted,
                        Errno::Ebusy,
                        &format!("lock {resource}"),
                        format!("lock {resource} is held by {who}"),
                    ));
                };
                if Instant::now() >= deadline {
                    return Err(err(
                        Code::DeadlineExceeded,
                        Errno::Etimedout,
                        &format!("lock {resource}"),
                        format!("lock {resource}: still held by {who} at the wait's deadline; the request was withdrawn"),
                    ));
                }
                if !waited {
                    waited = true;
                    let node = q[i].node.clone();
                    let hs: Vec<i64> = holding
                        .iter()
                        .map(|h| h.session)
                        .filter(|h| *h != sid)
                        .collect();
                    for h in hs {
                        st.notify(
                            h,
                            Notification::Blocking {
                                resource: resource.to_string(),
                                waiter_node: node.clone(),
                                waiter_mode: mode,
                            },
                        );
                    }
                }
            }
            let _ = tokio::time::timeout_at(deadline.unwrap_or_else(Instant::now), notified).await;
        }
    }

    fn release(&self, sid: i64, resource: &str, token: u64) -> PortResult<()> {
        let mut st = self.st();
        st.live(sid)?;
        let q = st.queues.get_mut(resource);
        let pos = q.as_ref().and_then(|q| {
            q.iter()
                .position(|r| r.session == sid && (token == 0 || r.token == token))
        });
        match (q, pos) {
            (Some(q), Some(i)) => {
                q.remove(i);
                if q.is_empty() {
                    st.queues.remove(resource);
                }
                drop(st);
                self.changed();
                Ok(())
            }
            _ => Err(err(
                Code::NotFound,
                Errno::Enoent,
                &format!("lock {resource}"),
                format!("lock {resource}: session {sid:x} holds no request with token {token}"),
            )),
        }
    }

    async fn convert(
        &self,
        sid: i64,
        resource: &str,
        token: u64,
        mode: Mode,
        wait: Wait,
    ) -> PortResult<Mode> {
        let deadline = match wait {
            Wait::NoQueue => None,
            Wait::Queue(d) => Some(Instant::now() + d),
        };
        loop {
            let notified = self.0.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.st();
                st.live(sid)?;
                let q = st.queues.get_mut(resource);
                let Some(q) = q else {
                    return Err(not_held(resource, sid));
                };
                let Some(i) = q.iter().position(|r| r.session == sid && r.token == token) else {
                    return Err(not_held(resource, sid));
                };
                if !is_granted(q, i) {
                    return Err(err(
                        Code::FailedPrecondition,
                        Errno::Eperm,
                        &format!("lock {resource}"),
                        format!("lock {resource}: the request is still waiting"),
                    ));
                }
                let ok = match mode {
                    Mode::Shared => true,
                    Mode::Exclusive => i == 0 && q.get(1).is_none_or(|n| n.mode != Mode::Shared),
                };
                if ok {
                    q[i].mode = mode;
                    drop(st);
                    self.changed();
                    return Ok(mode);
                }
                let others: Vec<&Req> = holders(q)
                    .into_iter()
                    .filter(|r| r.session != sid)
                    .collect();
                let who = names(&others);
                match deadline {
                    None => {
                        return Err(err(
                            Code::Aborted,
                            Errno::Ebusy,
                            &format!("lock {resource}"),
                            format!("lock {resource}: upgrade blocked by {who}"),
                        ))
                    }
                    Some(d) if Instant::now() >= d => {
                        return Err(err(
                            Code::DeadlineExceeded,
                            Errno::Etimedout,
                            &format!("lock {resource}"),
                            format!(
                                "lock {resource}: upgrade still blocked by {who} at its deadline"
                            ),
                        ))
                    }
                    Some(_) => {}
                }
            }
            let _ = tokio::time::timeout_at(deadline.unwrap_or_else(Instant::now), notified).await;
        }
    }

    fn write_value(&self, sid: i64, resource: &str, token: u64, value: &[u8]) -> PortResult<()> {
        let mut st = self.st();
        st.live(sid)?;
        if value.len() > MAX_VALUE {
            return Err(err(
                Code::InvalidArgument,
                Errno::Einval,
                &format!("lock {resource}"),
                format!(
                    "lock {resource}: value of {} bytes is over {MAX_VALUE}",
                    value.len()
                ),
            ));
        }
        let q = st.queues.get(resource).cloned().unwrap_or_default();
        let Some(i) = q.iter().position(|r| r.session == sid && r.token == token) else {
            return Err(not_held(resource, sid));
        };
        if q[i].mode != Mode::Exclusive || !is_granted(&q, i) {
            return Err(err(
                Code::FailedPrecondition,
                Errno::Eperm,
                &format!("lock {resource}"),
                format!("lock {resource}: the value is written only by an exclusive holder"),
            ));
        }
        st.values.insert(resource.to_string(), value.to_vec());
        Ok(())
    }

    fn read_value(&self, resource: &str) -> (Vec<u8>, Vec<String>) {
        self.st().value_of(resource)
    }

    fn read_values(&self, prefix: &str) -> PortResult<Vec<LockValue>> {
        let st = self.st();
        if st.no_read_values {
            return Err(LockClientError::Service {
                code: tonic::Code::Unimplemented,
                errno: Errno::Eio,
                resource: String::new(),
                message: "memlock: ReadValues is switched off".into(),
            });
        }
        // As mdserver: a lock is listed when it has a value block or a request.
        let mut names: Vec<&String> = st
            .values
            .keys()
            .chain(
                st.queues
                    .iter()
                    .filter(|(_, q)| !q.is_empty())
                    .map(|(r, _)| r),
            )
            .filter(|r| r.starts_with(prefix))
            .collect();
        names.sort();
        names.dedup();
        Ok(names
            .into_iter()
            .map(|r| {
                let (value, holders) = st.value_of(r);
                LockValue {
                    resource: r.clone(),
                    value,
                    holders,
                }
            })
            .collect())
    }

    fn subscribe(&self, sid: i64, channel: &str) -> PortResult<()> {
        let mut st = self.st();
        st.live(sid)?;
        let subs = st.subs.entry(channel.to_string()).or_default();
        if !subs.contains(&sid) {
            subs.push(sid);
        }
        Ok(())
    }

    fn unsubscribe(&self, sid: i64, channel: &str) -> PortResult<()> {
        let mut st = self.st();
        st.live(sid)?;
        if let Some(subs) = st.subs.get_mut(channel) {
            subs.retain(|x| *x != sid);
        }
        for p in st.pending.values_mut() {
            if p.recipients.iter().any(|(x, _)| *x == sid) {
                p.left.insert(sid);
            }
        }
        drop(st);
        self.changed();
        Ok(())
    }

    async fn publish(
        &self,
        sid: i64,
        channel: &str,
        payload: &[u8],
        timeout: Duration,
    ) -> PortResult<PublishOutcome> {
        self.0.publishes.fetch_add(1, Ordering::Relaxed);
        let end = Instant::now() + timeout;
        let message_id = {
            let mut st = self.st();
            let publisher = st.live(sid)?.node.clone();
            st.next_msg += 1;
            let message_id = format!("{sid:016x}-{:016x}", st.next_msg);
            let mut recipients: Vec<(i64, String)> = st
                .subs
                .get(channel)
                .map(|s| s.iter().copied().filter(|x| *x != sid).collect::<Vec<_>>())
                .unwrap_or_default()
                .into_iter()
                .filter_map(|x| st.sessions.get(&x).map(|s| (x, s.node.clone())))
                .collect();
            recipients.sort_by(|a, b| a.1.cmp(&b.1));
            for (r, _) in &recipients {
                st.notify(
                    *r,
                    Notification::Message(Delivery {
                        channel: channel.to_string(),
                        message_id: message_id.clone(),
                        publisher_node: publisher.clone(),
                        payload: payload.to_vec(),
                    }),
                );
            }
            st.pending.insert(
                message_id.clone(),
                Pending {
                    recipients,
                    answers: HashMap::new(),
                    left: HashSet::new(),
                },
            );
            message_id
        };
        let _cleanup = Cleanup {
            svc: self.clone(),
            message_id: message_id.clone(),
        };
        loop {
            let notified = self.0.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = self.st();
                let p = st.pending.get(&message_id).expect("pending until cleanup");
                let done = p
                    .recipients
                    .iter()
                    .all(|(r, _)| p.answers.contains_key(r) || p.left.contains(r));
                if done || Instant::now() >= end {
                    let results: Vec<AckOutcome> = p
                        .recipients
                        .iter()
                        .map(|(r, n)| match p.answers.get(r) {
                            Some((ok, reason)) => AckOutcome {
                                node: n.clone(),
                                session_id: *r,
                                answered: true,
                                ok: *ok,
                                reason: reason.clone(),
                            },
                            None if p.left.contains(r) => AckOutcome {
                                node: n.clone(),
                                session_id: *r,
                                answered: false,
                                ok: true,
                                reason: "left the channel before answering (its session ended or it unsubscribed); not waited for".into(),
                            },
                            None => AckOutcome {
                                node: n.clone(),
                                session_id: *r,
                                answered: false,
                                ok: false,
                                reason: format!("no answer within {timeout:?}"),
                            },
                        })
                        .collect();
                    let all_ok = results.iter().all(|r| r.ok);
                    return Ok(PublishOutcome {
                        message_id,
                        results,
                        all_ok,
                    });
                }
            }
            let _ = tokio::time::timeout_at(end, notified).await;
        }
    }

    fn ack(&self, sid: i64, message_id: &str, result: Result<(), String>) -> PortResult<()> {
        let mut st = self.st();
        st.live(sid)?;
        let Some(p) = st.pending.get_mut(message_id) else {
            return Err(err(
                Code::NotFound,
                Errno::Enoent,
                &format!("message {message_id}"),
                format!("message {message_id} is no longer pending (its publish ended)"),
            ));
        };
        if !p.recipients.iter().any(|(r, _)| *r == sid) {
            return Err(err(
                Code::NotFound,
                Errno::Enoent,
                &format!("message {message_id}"),
                format!("message {message_id} was not sent to session {sid:x}"),
            ));
        }
        let a = match result {
            Ok(()) => (true, String::new()),
            Err(r) => (false, r),
        };
        p.answers.entry(sid).or_insert(a);
        drop(st);
        self.changed();
        Ok(())
    }

    fn nodes(&self) -> Vec<NodeEntry> {
        let st = self.st();
        st.nodes
            .iter()
            .map(|(n, id)| NodeEntry {
                node: n.clone(),
                agent_addr: st
                    .sessions
                    .get(id)
                    .map(|s| s.agent_addr.clone())
                    .unwrap_or_default(),
                session_id: *id,
            })
            .collect()
    }

    fn close(&self, sid: i64) {
        self.st().end(sid, "closed", false);
        self.changed();
    }
}

fn not_held(resource: &str, sid: i64) -> LockClientError {
    err(
        Code::NotFound,
        Errno::Enoent,
        &format!("lock {resource}"),
        format!("lock {resource}: session {sid:x} holds no such request"),
    )
}

/// Withdraws a lock request that was not granted.
struct Withdraw {
    svc: MemLock,
    sid: i64,
    resource: String,
    token: u64,
    armed: bool,
}

impl Drop for Withdraw {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut st = self.svc.st();
        if let Some(q) = st.queues.get_mut(&self.resource) {
            q.retain(|r| !(r.session == self.sid && r.token == self.token));
            if q.is_empty() {
                st.queues.remove(&self.resource);
            }
        }
        drop(st);
        self.svc.changed();
    }
}

/// Forgets a publish once it answered (or its caller went away).
struct Cleanup {
    svc: MemLock,
    message_id: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        self.svc.st().pending.remove(&self.message_id);
    }
}

/// A session of the in-memory service. Dropping it changes nothing: a test ends a
/// session with [`MemLock::kill`] (an expiry) or [`LockPort::close`].
#[derive(Debug)]
pub struct MemSession {
    svc: MemLock,
    id: i64,
    node: String,
    ttl: Duration,
    deadline: FenceDeadline,
}

impl MemSession {
    /// A second handle on the same session (for tests that call it from two tasks).
    pub fn clone_port(&self) -> Arc<MemSession> {
        Arc::new(MemSession {
            svc: self.svc.clone(),
            id: self.id,
            node: self.node.clone(),
            ttl: self.ttl,
            deadline: self.deadline.clone(),
        })
    }
}

impl LockPort for MemSession {
    fn id(&self) -> i64 {
        self.id
    }
    fn node(&self) -> &str {
        &self.node
    }
    fn ttl(&self) -> Duration {
        self.ttl
    }
    fn state(&self) -> SessionState {
        self.svc
            .st()
            .sessions
            .get(&self.id)
            .map(|s| s.state)
            .unwrap_or(SessionState::Lost)
    }
    fn is_live(&self) -> bool {
        self.svc.st().live(self.id).is_ok()
            && self
                .deadline
                .get()
                .is_some_and(|d| std::time::Instant::now() < d)
    }
    fn fence_deadline(&self) -> Instant {
        Instant::from_std(self.deadline.get().unwrap_or_else(std::time::Instant::now))
    }
    fn fence_deadline_handle(&self) -> FenceDeadline {
        self.deadline.clone()
    }
    fn acquire<'a>(
        &'a self,
        resource: &'a str,
        mode: Mode,
        wait: Wait,
    ) -> PortFuture<'a, PortResult<Grant>> {
        Box::pin(self.svc.acquire(self.id, resource, mode, wait))
    }
    fn release<'a>(&'a self, resource: &'a str, token: u64) -> PortFuture<'a, PortResult<()>> {
        let r = self.svc.release(self.id, resource, token);
        Box::pin(async move { r })
    }
    fn convert<'a>(
        &'a self,
        resource: &'a str,
        token: u64,
        mode: Mode,
        wait: Wait,
    ) -> PortFuture<'a, PortResult<Mode>> {
        Box::pin(self.svc.convert(self.id, resource, token, mode, wait))
    }
    fn write_value<'a>(
        &'a self,
        resource: &'a str,
        token: u64,
        value: &'a [u8],
    ) -> PortFuture<'a, PortResult<()>> {
        let r = self.svc.write_value(self.id, resource, token, value);
        Box::pin(async move { r })
    }
    fn read_value<'a>(
        &'a self,
        resource: &'a str,
    ) -> PortFuture<'a, PortResult<(Vec<u8>, Vec<String>)>> {
        let r = self.svc.read_value(resource);
        Box::pin(async move { Ok(r) })
    }
    fn read_values<'a>(&'a self, prefix: &'a str) -> PortFuture<'a, PortResult<Vec<LockValue>>> {
        let r = self.svc.read_values(prefix);
        Box::pin(async move { r })
    }
    fn subscribe<'a>(&'a self, channel: &'a str) -> PortFuture<'a, PortResult<()>> {
        let r = self.svc.subscribe(self.id, channel);
        Box::pin(async move { r })
    }
    fn unsubscribe<'a>(&'a self, channel: &'a str) -> PortFuture<'a, PortResult<()>> {
        let r = self.svc.unsubscribe(self.id, channel);
        Box::pin(async move { r })
    }
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: &'a [u8],
        timeout: Duration,
    ) -> PortFuture<'a, PortResult<PublishOutcome>> {
        Box::pin(self.svc.publish(self.id, channel, payload, timeout))
    }
    fn ack<'a>(
        &'a self,
        message_id: &'a str,
        result: Result<(), String>,
    ) -> PortFuture<'a, PortResult<()>> {
        let r = self.svc.ack(self.id, message_id, result);
        Box::pin(async move { r })
    }
    fn nodes(&self) -> PortFuture<'_, PortResult<Vec<NodeEntry>>> {
        let r = self.svc.st().live(self.id).map(|_| ());
        let n = self.svc.nodes();
        Box::pin(async move { r.map(|_| n) })
    }
    fn close(&self) -> PortFuture<'_, PortResult<()>> {
        self.svc.close(self.id);
        Box::pin(async { Ok(()) })
    }
}

/// Opens sessions of one node on a [`MemLock`].
struct MemOpener {
    svc: MemLock,
    node: String,
    ttl: Duration,
}

impl SessionOpener for MemOpener {
    fn open(&self) -> PortFuture<'_, PortResult<Opened>> {
        let r = self
            .svc
            .open(&self.node, &format!("memlock://{}", self.node), self.ttl);
        Box::pin(async move { r })
    }
}

#[cfg(test)]
mod tests;
