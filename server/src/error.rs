//! Errors of the lock service and their mapping to gRPC.
//!
//! Every error names what failed on which lock, session or node and what to do about it
//! (the `Display` text), and carries an errno-style reason plus the resource in the
//! `details` of the [`tonic::Status`] as an encoded [`ErrorDetail`], so that a client can
//! tell EBUSY from ENOENT without parsing text.

use std::time::Duration;

use mdcluster_proto::v1::{Errno, ErrorDetail};
use prost::Message;
use tonic::{Code, Status};

/// An error that fails one lock-service call.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// A request field is malformed or out of range.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// A no-queue request met an incompatible holder.
    #[error("lock {resource} is busy: held by {holders}; retry later or queue with a wait")]
    Busy {
        /// The lock.
        resource: String,
        /// Node names of the holders.
        holders: String,
    },
    /// A queued request was not granted before its deadline.
    #[error(
        "timed out after {waited:?} waiting for lock {resource} held by {holders}; \
         the request was withdrawn, retry or find out why {holders} keeps it"
    )]
    Timeout {
        /// The lock.
        resource: String,
        /// How long the request waited.
        waited: Duration,
        /// Node names of the holders at the deadline.
        holders: String,
    },
    /// The session's lease expired or was revoked.
    #[error(
        "session {session_id:x} is gone (its lease expired or was revoked); open a new session"
    )]
    SessionGone {
        /// The session id (etcd lease id).
        session_id: i64,
    },
    /// A node tried to open a second live session.
    #[error(
        "node {node} already has live session {session_id:x}; resume it, or wait for its \
         lease to expire (at most its TTL)"
    )]
    NodeBusy {
        /// The node.
        node: String,
        /// Its live session.
        session_id: i64,
    },
    /// The caller's certificate does not allow this call.
    #[error("permission denied: {reason}")]
    Denied {
        /// What was refused and why.
        reason: String,
    },
    /// A session tried to resume a session of another node.
    #[error("session {session_id:x} belongs to node {owner}, not to node {node}")]
    WrongNode {
        /// The session.
        session_id: i64,
        /// The node it belongs to.
        owner: String,
        /// The node that asked.
        node: String,
    },
    /// The session holds no (matching) request on the lock.
    #[error(
        "session {session_id:x} holds no request on lock {resource} with token {token}; \
         it was released, or lost when the session expired"
    )]
    NotHeld {
        /// The lock.
        resource: String,
        /// The session.
        session_id: i64,
        /// The token given (0: any).
        token: u64,
    },
    /// The session's request on the lock is in another state or mode than the call needs.
    #[error("{action} on lock {resource} by session {session_id:x} is not allowed: {reason}")]
    NotAllowed {
        /// What was attempted.
        action: &'static str,
        /// The lock.
        resource: String,
        /// The session.
        session_id: i64,
        /// Why not.
        reason: String,
    },
    /// A waiting request's key vanished (cancelled by a release with token 0).
    #[error("the request of session {session_id:x} on lock {resource} was cancelled; retry")]
    Cancelled {
        /// The lock.
        resource: String,
        /// The session.
        session_id: i64,
    },
    /// An ack came for a message that no longer waits for acks.
    #[error(
        "message {message_id} is no longer pending for this session: its publish ended \
         (deadline) or its publisher's session expired"
    )]
    MessageGone {
        /// The message id.
        message_id: String,
    },
    /// The replica is at one of its bounds.
    #[error(
        "this mdserver replica is at its limit of {limit} {what}; use another replica or \
         raise the limit"
    )]
    Overloaded {
        /// What is bounded.
        what: &'static str,
        /// The bound.
        limit: usize,
    },
    /// etcd failed or could not be reached.
    #[error("etcd {op} failed: {source}; check that etcd is reachable from mdserver")]
    Etcd {
        /// The etcd operation.
        op: &'static str,
        /// The client error.
        source: etcd_client::Error,
    },
    /// An etcd call did not answer in time.
    #[error("etcd {op} did not answer within {timeout:?}; check that etcd is up and has a leader")]
    EtcdTimeout {
        /// The etcd operation.
        op: &'static str,
        /// The bound.
        timeout: Duration,
    },
    /// A record in etcd could not be decoded.
    #[error("corrupt record at etcd key {key}: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// The decoding error.
        reason: String,
    },
}

impl LockError {
    /// The errno-style reason, gRPC code and resource of this error.
    pub fn parts(&self) -> (Errno, Code, String) {
        match self {
            LockError::Invalid { field, .. } => {
                (Errno::Einval, Code::InvalidArgument, (*field).into())
            }
            LockError::Busy { resource, .. } => (Errno::Ebusy, Code::Aborted, lock(resource)),
            LockError::Timeout { resource, .. } => {
                (Errno::Etimedout, Code::DeadlineExceeded, lock(resource))
            }
            LockError::SessionGone { session_id } => (
                Errno::Enoent,
                Code::FailedPrecondition,
                session(*session_id),
            ),
            LockError::NodeBusy { node, .. } => {
                (Errno::Ebusy, Code::AlreadyExists, format!("node {node}"))
            }
            LockError::Denied { .. } => (Errno::Eperm, Code::PermissionDenied, "caller".into()),
            LockError::WrongNode { session_id, .. } => {
                (Errno::Eperm, Code::PermissionDenied, session(*session_id))
            }
            LockError::NotHeld { resource, .. } => (Errno::Enoent, Code::NotFound, lock(resource)),
            LockError::NotAllowed { resource, .. } => {
                (Errno::Eperm, Code::FailedPrecondition, lock(resource))
            }
            LockError::Cancelled { resource, .. } => (Errno::Enoent, Code::Aborted, lock(resource)),
            LockError::MessageGone { message_id } => (
                Errno::Enoent,
                Code::NotFound,
                format!("message {message_id}"),
            ),
            LockError::Overloaded { what, .. } => (
                Errno::Ebusy,
                Code::ResourceExhausted,
                format!("replica {what}"),
            ),
            LockError::Etcd { .. } | LockError::EtcdTimeout { .. } => {
                (Errno::Eio, Code::Unavailable, "etcd".into())
            }
            LockError::Corrupt { key, .. } => (Errno::Eio, Code::Internal, key.clone()),
        }
    }
}

fn lock(resource: &str) -> String {
    format!("lock {resource}")
}

fn session(id: i64) -> String {
    format!("session {id:x}")
}

impl From<LockError> for Status {
    fn from(e: LockError) -> Status {
        let (errno, code, resource) = e.parts();
        let detail = ErrorDetail {
            errno: errno as i32,
            resource,
        };
        Status::with_details(code, e.to_string(), detail.encode_to_vec().into())
    }
}

/// True when an etcd error says the lease a write referred to does not exist.
pub fn is_lease_not_found(e: &etcd_client::Error) -> bool {
    e.to_string().contains("requested lease not found")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_carry_errno_resource_and_sentence() {
        let e = LockError::Busy {
            resource: "md0/token".into(),
            holders: "node1".into(),
        };
        let s: Status = e.into();
        assert_eq!(s.code(), Code::Aborted);
        assert!(s.message().contains("held by node1"), "{}", s.message());
        let d = ErrorDetail::decode(s.details()).expect("detail");
        assert_eq!(d.errno, Errno::Ebusy as i32);
        assert_eq!(d.resource, "lock md0/token");

        let s: Status = LockError::SessionGone { session_id: 255 }.into();
        assert_eq!(s.code(), Code::FailedPrecondition);
        assert!(s.message().contains("session ff"), "{}", s.message());
        assert_eq!(
            ErrorDetail::decode(s.details()).expect("detail").errno,
            Errno::Enoent as i32
        );
    }
}
