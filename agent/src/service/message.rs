//! The acknowledged message round of a clustered array (RFC 0001 "Messages"): the
//! sender side under the `token` lock, and the runtime of the receiver, which carries
//! out what the array's [`crate::cluster::Engine`] decides a message means here.
//!
//! Sender ([`round`], its steps decided by [`crate::cluster::round::Round`]):
//! 1. take `md/<uuid>/token` exclusive, queued for at most the deadline (ETIMEDOUT
//!    names the holder), this node's turn ([`ClusterArray::turn`]) first: one sender
//!    per array at a time, as md-cluster's token;
//! 2. run the caller's change (e.g. mark a member faulty and write the superblocks);
//!    it may answer "nothing to do" (the re-check under the token);
//! 3. publish the [`ClusterMsg`] on the array's channel with the time left of the
//!    deadline;
//! 4. every joined node acked positively: done. A negative ack or a missing ack: the
//!    caller's rollback runs and the result is EIO naming every node and its reason;
//! 5. release `token` (always, also on errors).
//!
//! The receiver side is [`super::receive`] (re-exported here: [`on_delivery`],
//! [`apply_on`], [`apply`]).

use std::collections::VecDeque;
use std::future::Future;
use std::sync::{Arc, Weak};
use std::time::Duration;

use crate::lockport::{LockClientError, Mode, Session, Wait};
use mdcluster_proto::status::WireError;
use mdcluster_proto::v1::Errno;
use tokio::time::Instant;

use super::cluster_array::ClusterArray;
use super::Node;
use crate::cluster::engine::ArrayView;
use crate::cluster::round::{ChangeOutcome, Round, RoundEvent, RoundResult, RoundStep};
use crate::cluster::{channel, token_lock, ClusterMsg, MsgType};

pub use super::receive::{apply, apply_on, on_delivery};

/// What the change under the token decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Applied locally: publish the message.
    Applied,
    /// Nothing to change (the re-check under the token): no message.
    Unchanged,
}

/// A lock-service error met while doing `what`, as the wire error of the operation:
/// the lock client's errno (EIO when it has none) and `what` in the message.
pub fn lock_error(e: LockClientError, what: &str) -> WireError {
    let errno = match e.errno() {
        Errno::Unspecified => Errno::Eio,
        x => x,
    };
    WireError::new(errno, what.to_owned(), format!("{what}: {e}"))
}

/// Who sends, for which array.
#[derive(Debug, Clone, Copy)]
pub struct Target<'a> {
    /// This node's lock-service session.
    pub session: &'a Session,
    /// This node's name.
    pub node: &'a str,
    /// The array.
    pub array: &'a ClusterArray,
}

/// The `token` lock held by this node: the fencing token and this node's turn.
#[derive(Debug)]
pub struct TokenHold {
    /// The fencing token.
    pub token: u64,
    _local: tokio::sync::OwnedMutexGuard<()>,
}

/// Takes `to`'s array's `token` lock exclusive (this node's turn first), queued for at
/// most `deadline` in all; ETIMEDOUT names the holder.
pub async fn take_token(to: Target<'_>, deadline: Duration) -> Result<TokenHold, WireError> {
    let end = Instant::now() + deadline;
    let name = to.array.name();
    let res = token_lock(to.array.uuid());
    let local = tokio::time::timeout(deadline, to.array.turn().clone().lock_owned())
        .await
        .map_err(|_| {
            WireError::new(
                Errno::Etimedout,
                format!("array {name}"),
                format!(
                    "node {}: another operation of this node held the token lock {res} of array {name} for {deadline:?}; retry",
                    to.node
                ),
            )
        })?;
    let g = to
        .session
        .acquire(&res, Mode::Exclusive, Wait::Queue(left(end)))
        .await
        .map_err(|e| {
            lock_error(
                e,
                &format!(
                    "node {}: taking the token lock {res} of array {name}",
                    to.node
                ),
            )
        })?;
    crate::metrics::agent().lock_wait(
        "token",
        deadline.saturating_sub(end.saturating_duration_since(Instant::now())),
    );
    Ok(TokenHold {
        token: g.token,
        _local: local,
    })
}

/// Releases the token taken by [`take_token`] (failures are logged: the lock goes
/// with the session at the latest).
pub async fn release_token(to: Target<'_>, hold: TokenHold) {
    let res = token_lock(to.array.uuid());
    if let Err(e) = to.session.release(&res, hold.token).await {
        tracing::warn!(array = to.array.name(), lock = %res, "release token: {e}");
    }
}

/// Publishes `msg` on `to`'s array channel and needs every joined node's positive ack
/// within `timeout`; else EIO naming each node that refused (with its reason) or did
/// not answer.
pub async fn publish_acked(
    to: Target<'_>,
    msg: ClusterMsg,
    timeout: Duration,
) -> Result<(), WireError> {
    let Target {
        session,
        node,
        array,
    } = to;
    let array = array.name();
    let started = Instant::now();
    let o = session
        .publish(&channel(to.array.uuid()), &msg.encode(), timeout)
        .await;
    crate::metrics::agent().token_round_outcome(array, &o, started.elapsed());
    let o = o.map_err(|e| {
        lock_error(
            e,
            &format!("node {node}: publishing {:?} for array {array}", msg.kind),
        )
    })?;
    if o.all_ok {
        tracing::info!(array, kind = ?msg.kind, acks = o.results.len(), "message acknowledged by every joined node");
        return Ok(());
    }
    let refused: Vec<String> = o
        .results
        .iter()
        .filter(|r| !r.ok)
        .map(|r| {
            if r.answered {
                format!("node {} refused: {}", r.node, r.reason)
            } else {
                format!("node {} did not answer within {timeout:?}", r.node)
            }
        })
        .collect();
    Err(WireError::new(
        Errno::Eio,
        format!("array {array}"),
        format!(
            "node {node}: {:?} of array {array} was not acknowledged by every node ({})",
            msg.kind,
            refused.join("; ")
        ),
    ))
}

/// The time left until `end`, at least 100 ms.
pub fn left(end: Instant) -> Duration {
    end.saturating_duration_since(Instant::now())
        .max(Duration::from_millis(100))
}

/// One acknowledged round for `to`'s array: token → `change` → publish `msg` → all
/// acked, or `rollback` and EIO; the steps are [`Round`]'s. See the module doc.
/// `change` runs under the token: its engine calls write with
/// [`crate::raid::MetaWrite::UnderToken`].
pub async fn round<C, R>(
    to: Target<'_>,
    msg: ClusterMsg,
    deadline: Duration,
    change: C,
    rollback: R,
) -> Result<Change, WireError>
where
    C: Future<Output = Result<Change, WireError>>,
    R: Future<Output = ()>,
{
    let end = Instant::now() + deadline;
    let mut state = Round::default();
    let (mut change, mut rollback) = (Some(change), Some(rollback));
    let mut hold = None;
    let mut error: Option<WireError> = None;
    let mut steps: VecDeque<RoundStep> = match take_token(to, deadline).await {
        Ok(h) => {
            hold = Some(h);
            state.step(RoundEvent::Token { granted: true })
        }
        Err(e) => {
            error = Some(e);
            state.step(RoundEvent::Token { granted: false })
        }
    }
    .into();
    while let Some(step) = steps.pop_front() {
        let next = match step {
            RoundStep::RunChange => {
                let outcome = match change.take() {
                    Some(c) => match c.await {
                        Ok(Change::Applied) => ChangeOutcome::Applied,
                        Ok(Change::Unchanged) => ChangeOutcome::Unchanged,
                        Err(e) => {
                            error = Some(e);
                            ChangeOutcome::Failed
                        }
                    },
                    None => ChangeOutcome::Failed,
                };
                state.step(RoundEvent::Change(outcome))
            }
            RoundStep::Publish => {
                let all_acked = match publish_acked(to, msg, left(end)).await {
                    Ok(()) => true,
                    Err(e) => {
                        error = Some(e);
                        false
                    }
                };
                state.step(RoundEvent::Published { all_acked })
            }
            RoundStep::Rollback => {
                if let Some(r) = rollback.take() {
                    r.await;
                }
                if let Some(e) = &mut error {
                    e.message = format!(
                        "{}; the change was rolled back where possible — check those nodes and retry",
                        e.message
                    );
                }
                Vec::new()
            }
            RoundStep::ReleaseToken => {
                if let Some(h) = hold.take() {
                    release_token(to, h).await;
                }
                Vec::new()
            }
            RoundStep::Done(result) => {
                if let Some(h) = hold.take() {
                    // Never reached by the steps' order; released all the same.
                    release_token(to, h).await;
                }
                return match result {
                    RoundResult::Applied => Ok(Change::Applied),
                    RoundResult::Unchanged => Ok(Change::Unchanged),
                    RoundResult::NoToken | RoundResult::ChangeFailed | RoundResult::NotAcked => {
                        Err(error.unwrap_or_else(|| {
                            WireError::new(
                                Errno::Eio,
                                format!("array {}", to.array.name()),
                                format!(
                                    "node {}: the {:?} round of array {} ended as {result:?}",
                                    to.node,
                                    msg.kind,
                                    to.array.name()
                                ),
                            )
                        }))
                    }
                };
            }
        };
        steps.extend(next);
    }
    if let Some(h) = hold.take() {
        release_token(to, h).await;
    }
    Err(error.unwrap_or_else(|| {
        WireError::new(
            Errno::Eio,
            format!("array {}", to.array.name()),
            format!(
                "node {}: the {:?} round ended without a result",
                to.node, msg.kind
            ),
        )
    }))
}

/// Re-reads the members' superblocks into this node's copies (another node wrote
/// them), skipping the engine indexes `skip`.
pub(super) async fn reload(node: &Arc<Node>, name: &str, skip: Vec<usize>) -> Result<(), String> {
    let Some(att) = node
        .find(name)
        .and_then(|service| service.registry().attachment(name))
    else {
        return Err("the array is not here".to_owned());
    };
    tokio::task::spawn_blocking(move || att.reload(&skip))
        .await
        .map_err(|e| format!("reload task failed: {e}"))?
        .map_err(|e| e.to_string())
}

/// [`crate::raid::MetaGate`] of a clustered array: the engine's superblock writes go
/// under the `token` lock, start from the superblocks as they are on disk (re-read
/// once the token is held), and are announced with METADATA_UPDATED (md-cluster's
/// `metadata_update_start/finish`).
pub struct MetaRound {
    node: Weak<Node>,
    array: Weak<ClusterArray>,
}

impl MetaRound {
    /// The gate of clustered array `array` on `node`.
    pub fn new(node: &Arc<Node>, array: &Arc<ClusterArray>) -> MetaRound {
        MetaRound {
            node: Arc::downgrade(node),
            array: Arc::downgrade(array),
        }
    }
}

impl crate::raid::MetaGate for MetaRound {
    fn round<'a>(
        &'a self,
        what: String,
        write: crate::blockdev::IoFuture<'a, ()>,
    ) -> crate::blockdev::IoFuture<'a, ()> {
        Box::pin(async move {
            let (Some(node), Some(arr)) = (self.node.upgrade(), self.array.upgrade()) else {
                return write.await;
            };
            let name = arr.name();
            let Some(session) = node.session() else {
                tracing::warn!(
                    array = name,
                    what,
                    "superblock write without the token: no session"
                );
                return write.await;
            };
            let to = arr.target(&session, node.name());
            let deadline = node.timings().round_deadline;
            let end = Instant::now() + deadline;
            let hold = match take_token(to, deadline).await {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::error!(
                        array = name,
                        what,
                        "superblock write without the token: {e}"
                    );
                    None
                }
            };
            if hold.is_some() {
                // Under the token nobody else writes the superblocks: start from what
                // is on disk (this node may have missed a METADATA_UPDATED).
                let skip = node
                    .raid_of(name)
                    .map(|(raid, _)| ArrayView::of(&raid.status()).out_indexes())
                    .unwrap_or_default();
                if let Err(e) = reload(&node, name, skip).await {
                    tracing::warn!(
                        array = name,
                        what,
                        "re-reading the superblocks before writing: {e}"
                    );
                }
            }
            let out = write.await;
            if let Some(hold) = hold {
                if out.is_ok() {
                    let msg = ClusterMsg::new(MsgType::MetadataUpdated, arr.slot());
                    if let Err(e) = publish_acked(to, msg, left(end)).await {
                        tracing::warn!(array = name, what, "superblock written; {e}");
                    }
                }
                release_token(to, hold).await;
            }
            out
        })
    }
}
