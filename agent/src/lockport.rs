//! The lock-service port: the exact surface of the lock service the agent uses, as an
//! object-safe trait ([`LockPort`]), and how the agent opens a session
//! ([`SessionOpener`]).
//!
//! The agent never names the gRPC client type: it holds `Arc<Session>` / `&Session`
//! where [`Session`] is `dyn LockPort`. The real implementation is
//! [`mdcluster_proto::lock_client::Session`] (a session with `mdserver`, see
//! docs/LOCKS.md); the test crate has an in-memory one for the in-process test tier.
//! An implementation keeps the lock service's semantics: sessions with a TTL and a
//! fence deadline, shared/exclusive locks with queued waits and deadlines, fencing
//! tokens that only grow, value blocks, acknowledged messages, and the notifications
//! ([`Notification`]) on the receiver handed out when the session was opened.
//!
//! Futures are boxed (`Send`), so the trait is object safe and every call site keeps
//! `session.acquire(..).await`.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

pub use mdcluster_proto::lock_client::{
    AckOutcome, Delivery, FenceDeadline, Grant, LockClientError, Mode, NodeEntry, Notification,
    PublishOutcome, SessionConfig, SessionState, Wait,
};
pub use mdcluster_proto::v1::LockValue;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// A boxed, `Send` future borrowing the port for `'a`.
pub type PortFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a lock call returns.
pub type PortResult<T> = Result<T, LockClientError>;

/// The agent's view of its lock-service session: what the agent calls, nothing more.
/// See [`mdcluster_proto::lock_client::Session`] for the meaning of each call.
pub trait LockPort: Send + Sync + std::fmt::Debug {
    /// The session id (the etcd lease id for the real service).
    fn id(&self) -> i64;
    /// The node this session belongs to.
    fn node(&self) -> &str;
    /// The lease TTL the service granted.
    fn ttl(&self) -> Duration;
    /// Where the session stands now.
    fn state(&self) -> SessionState;
    /// True while the fence deadline is ahead and the session is not lost.
    fn is_live(&self) -> bool;
    /// The self-fencing deadline: member I/O stops at this instant unless renewed.
    fn fence_deadline(&self) -> Instant;
    /// The same deadline as a handle any thread reads without awaiting; empty once
    /// the session is lost or closed.
    fn fence_deadline_handle(&self) -> FenceDeadline;
    /// Acquires `resource` in `mode` (idempotent per session and lock).
    fn acquire<'a>(
        &'a self,
        resource: &'a str,
        mode: Mode,
        wait: Wait,
    ) -> PortFuture<'a, PortResult<Grant>>;
    /// Releases `resource` (token 0: whatever request this session has, also a wait).
    fn release<'a>(&'a self, resource: &'a str, token: u64) -> PortFuture<'a, PortResult<()>>;
    /// Converts a granted lock to `mode`.
    fn convert<'a>(
        &'a self,
        resource: &'a str,
        token: u64,
        mode: Mode,
        wait: Wait,
    ) -> PortFuture<'a, PortResult<Mode>>;
    /// Writes the value block of a lock held exclusive (fenced by `token`).
    fn write_value<'a>(
        &'a self,
        resource: &'a str,
        token: u64,
        value: &'a [u8],
    ) -> PortFuture<'a, PortResult<()>>;
    /// Reads the value block and the current holders' node names (queue order).
    fn read_value<'a>(
        &'a self,
        resource: &'a str,
    ) -> PortFuture<'a, PortResult<(Vec<u8>, Vec<String>)>>;
    /// Reads the value block and holders of every lock whose name starts with
    /// `prefix`, in one call, sorted by resource (locks with neither not listed).
    fn read_values<'a>(&'a self, prefix: &'a str) -> PortFuture<'a, PortResult<Vec<LockValue>>>;
    /// Subscribes to `channel`.
    fn subscribe<'a>(&'a self, channel: &'a str) -> PortFuture<'a, PortResult<()>>;
    /// Unsubscribes from `channel`.
    fn unsubscribe<'a>(&'a self, channel: &'a str) -> PortFuture<'a, PortResult<()>>;
    /// Publishes `payload` on `channel` and waits for every other subscriber's ack (or
    /// `timeout`).
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: &'a [u8],
        timeout: Duration,
    ) -> PortFuture<'a, PortResult<PublishOutcome>>;
    /// Acks a delivered message: `Ok(())` positive, `Err(reason)` negative.
    fn ack<'a>(
        &'a self,
        message_id: &'a str,
        result: Result<(), String>,
    ) -> PortFuture<'a, PortResult<()>>;
    /// The nodes with a live session.
    fn nodes(&self) -> PortFuture<'_, PortResult<Vec<NodeEntry>>>;
    /// Closes the session on purpose: its locks are released at once.
    fn close(&self) -> PortFuture<'_, PortResult<()>>;
}

/// The session type the agent holds (`Arc<Session>`, `&Session`).
pub type Session = dyn LockPort;

/// An open session and its notifications.
pub type Opened = (Arc<Session>, mpsc::Receiver<Notification>);

/// Opens this node's session: once at start and again after a session was lost.
pub trait SessionOpener: Send + Sync {
    /// Makes one attempt to open a new session (the caller retries with backoff).
    fn open(&self) -> PortFuture<'_, PortResult<Opened>>;
}

/// Opens sessions with `mdserver` through the gRPC lock client.
#[derive(Debug, Clone)]
pub struct ServerOpener(pub SessionConfig);

impl SessionOpener for ServerOpener {
    fn open(&self) -> PortFuture<'_, PortResult<Opened>> {
        Box::pin(async move {
            let (s, rx) = mdcluster_proto::lock_client::Session::open(self.0.clone()).await?;
            let s: Arc<Session> = Arc::new(s);
            Ok((s, rx))
        })
    }
}

impl LockPort for mdcluster_proto::lock_client::Session {
    fn id(&self) -> i64 {
        mdcluster_proto::lock_client::Session::id(self)
    }
    fn node(&self) -> &str {
        mdcluster_proto::lock_client::Session::node(self)
    }
    fn ttl(&self) -> Duration {
        mdcluster_proto::lock_client::Session::ttl(self)
    }
    fn state(&self) -> SessionState {
        mdcluster_proto::lock_client::Session::state(self)
    }
    fn is_live(&self) -> bool {
        mdcluster_proto::lock_client::Session::is_live(self)
    }
    fn fence_deadline(&self) -> Instant {
        mdcluster_proto::lock_client::Session::fence_deadline(self)
    }
    fn fence_deadline_handle(&self) -> FenceDeadline {
        mdcluster_proto::lock_client::Session::fence_deadline_handle(self)
    }
    fn acquire<'a>(
        &'a self,
        resource: &'a str,
        mode: Mode,
        wait: Wait,
    ) -> PortFuture<'a, PortResult<Grant>> {
        Box::pin(mdcluster_proto::lock_client::Session::acquire(
            self, resource, mode, wait,
        ))
    }
    fn release<'a>(&'a self, resource: &'a str, token: u64) -> PortFuture<'a, PortResult<()>> {
        Box::pin(mdcluster_proto::lock_client::Session::release(
            self, resource, token,
        ))
    }
    fn convert<'a>(
        &'a self,
        resource: &'a str,
        token: u64,
        mode: Mode,
        wait: Wait,
    ) -> PortFuture<'a, PortResult<Mode>> {
        Box::pin(mdcluster_proto::lock_client::Session::convert(
            self, resource, token, mode, wait,
        ))
    }
    fn write_value<'a>(
        &'a self,
        resource: &'a str,
        token: u64,
        value: &'a [u8],
    ) -> PortFuture<'a, PortResult<()>> {
        Box::pin(mdcluster_proto::lock_client::Session::write_value(
            self, resource, token, value,
        ))
    }
    fn read_value<'a>(
        &'a self,
        resource: &'a str,
    ) -> PortFuture<'a, PortResult<(Vec<u8>, Vec<String>)>> {
        Box::pin(mdcluster_proto::lock_client::Session::read_value(
            self, resource,
        ))
    }
    fn read_values<'a>(&'a self, prefix: &'a str) -> PortFuture<'a, PortResult<Vec<LockValue>>> {
        Box::pin(mdcluster_proto::lock_client::Session::read_values(
            self, prefix,
        ))
    }
    fn subscribe<'a>(&'a self, channel: &'a str) -> PortFuture<'a, PortResult<()>> {
        Box::pin(mdcluster_proto::lock_client::Session::subscribe(
            self, channel,
        ))
    }
    fn unsubscribe<'a>(&'a self, channel: &'a str) -> PortFuture<'a, PortResult<()>> {
        Box::pin(mdcluster_proto::lock_client::Session::unsubscribe(
            self, channel,
        ))
    }
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: &'a [u8],
        timeout: Duration,
    ) -> PortFuture<'a, PortResult<PublishOutcome>> {
        Box::pin(mdcluster_proto::lock_client::Session::publish(
            self, channel, payload, timeout,
        ))
    }
    fn ack<'a>(
        &'a self,
        message_id: &'a str,
        result: Result<(), String>,
    ) -> PortFuture<'a, PortResult<()>> {
        Box::pin(mdcluster_proto::lock_client::Session::ack(
            self, message_id, result,
        ))
    }
    fn nodes(&self) -> PortFuture<'_, PortResult<Vec<NodeEntry>>> {
        Box::pin(mdcluster_proto::lock_client::Session::nodes(self))
    }
    fn close(&self) -> PortFuture<'_, PortResult<()>> {
        Box::pin(mdcluster_proto::lock_client::Session::close(self))
    }
}

/// A shared session is a session: `&Arc<Session>` passes where `&Session` is asked
/// for, as it did when `Session` was the concrete client.
impl<T: LockPort + ?Sized> LockPort for Arc<T> {
    fn id(&self) -> i64 {
        (**self).id()
    }
    fn node(&self) -> &str {
        (**self).node()
    }
    fn ttl(&self) -> Duration {
        (**self).ttl()
    }
    fn state(&self) -> SessionState {
        (**self).state()
    }
    fn is_live(&self) -> bool {
        (**self).is_live()
    }
    fn fence_deadline(&self) -> Instant {
        (**self).fence_deadline()
    }
    fn fence_deadline_handle(&self) -> FenceDeadline {
        (**self).fence_deadline_handle()
    }
    fn acquire<'a>(
        &'a self,
        resource: &'a str,
        mode: Mode,
        wait: Wait,
    ) -> PortFuture<'a, PortResult<Grant>> {
        (**self).acquire(resource, mode, wait)
    }
    fn release<'a>(&'a self, resource: &'a str, token: u64) -> PortFuture<'a, PortResult<()>> {
        (**self).release(resource, token)
    }
    fn convert<'a>(
        &'a self,
        resource: &'a str,
        token: u64,
        mode: Mode,
        wait: Wait,
    ) -> PortFuture<'a, PortResult<Mode>> {
        (**self).convert(resource, token, mode, wait)
    }
    fn write_value<'a>(
        &'a self,
        resource: &'a str,
        token: u64,
        value: &'a [u8],
    ) -> PortFuture<'a, PortResult<()>> {
        (**self).write_value(resource, token, value)
    }
    fn read_value<'a>(
        &'a self,
        resource: &'a str,
    ) -> PortFuture<'a, PortResult<(Vec<u8>, Vec<String>)>> {
        (**self).read_value(resource)
    }
    fn read_values<'a>(&'a self, prefix: &'a str) -> PortFuture<'a, PortResult<Vec<LockValue>>> {
        (**self).read_values(prefix)
    }
    fn subscribe<'a>(&'a self, channel: &'a str) -> PortFuture<'a, PortResult<()>> {
        (**self).subscribe(channel)
    }
    fn unsubscribe<'a>(&'a self, channel: &'a str) -> PortFuture<'a, PortResult<()>> {
        (**self).unsubscribe(channel)
    }
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        payload: &'a [u8],
        timeout: Duration,
    ) -> PortFuture<'a, PortResult<PublishOutcome>> {
        (**self).publish(channel, payload, timeout)
    }
    fn ack<'a>(
        &'a self,
        message_id: &'a str,
        result: Result<(), String>,
    ) -> PortFuture<'a, PortResult<()>> {
        (**self).ack(message_id, result)
    }
    fn nodes(&self) -> PortFuture<'_, PortResult<Vec<NodeEntry>>> {
        (**self).nodes()
    }
    fn close(&self) -> PortFuture<'_, PortResult<()>> {
        (**self).close()
    }
}
