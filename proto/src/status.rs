//! The one error model that crosses every hop (agent → mdserver → mdctl): an errno-style
//! reason, the resource it is about, and a sentence for people, carried in a
//! [`tonic::Status`] (code from the errno, [`ErrorDetail`] encoded in the details).
//!
//! [`to_status`] builds the status on the side that fails; [`WireError::from_status`]
//! reads it back on the side that calls. A status without details (a transport failure)
//! reads as EIO, or ETIMEDOUT for a deadline, so the reason is never lost on the way.

use prost::Message as _;
use tonic::{Code, Status};

use crate::v1::{Errno, ErrorDetail};

/// An error as it travels: reason, resource, sentence.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct WireError {
    /// The errno-style reason.
    pub errno: Errno,
    /// What it is about, e.g. "array md0 on node node2".
    pub resource: String,
    /// The sentence: what failed and what to do.
    pub message: String,
}

/// The gRPC code that goes with an errno.
pub fn code_of(errno: Errno) -> Code {
    match errno {
        Errno::Unspecified => Code::Unknown,
        Errno::Ebusy => Code::FailedPrecondition,
        Errno::Enoent => Code::NotFound,
        Errno::Einval => Code::InvalidArgument,
        Errno::Eio => Code::Internal,
        Errno::Etimedout => Code::DeadlineExceeded,
        Errno::Eexist => Code::AlreadyExists,
        Errno::Eperm => Code::PermissionDenied,
    }
}

/// The errno of an errno name ("EBUSY", "ENOENT", ...); unknown names are EIO.
pub fn errno_from_name(name: &str) -> Errno {
    match name {
        "EBUSY" => Errno::Ebusy,
        "ENOENT" => Errno::Enoent,
        "EINVAL" => Errno::Einval,
        "ETIMEDOUT" => Errno::Etimedout,
        "EEXIST" => Errno::Eexist,
        "EPERM" => Errno::Eperm,
        _ => Errno::Eio,
    }
}

/// The errno's name ("EBUSY").
pub fn errno_name(errno: Errno) -> &'static str {
    match errno {
        Errno::Unspecified => "EUNSPECIFIED",
        Errno::Ebusy => "EBUSY",
        Errno::Enoent => "ENOENT",
        Errno::Einval => "EINVAL",
        Errno::Eio => "EIO",
        Errno::Etimedout => "ETIMEDOUT",
        Errno::Eexist => "EEXIST",
        Errno::Eperm => "EPERM",
    }
}

/// Longest sentence a status carries, in bytes: the message travels in an HTTP/2
/// header, and a reply whose headers pass the peer's limit is refused as a protocol
/// error, losing the errno.
pub const MAX_STATUS_MESSAGE: usize = 4096;
/// Longest resource a status carries, in bytes.
pub const MAX_STATUS_RESOURCE: usize = 256;

/// `s` cut to at most `max` bytes (at a character boundary), marked when cut.
fn bounded(s: String, max: usize) -> String {
    if s.len() <= max {
        return s;
    }
    let mut end = max.saturating_sub(32);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…(cut, {} bytes)", &s[..end], s.len())
}

/// A status carrying `errno`, `resource` and `message` (each bounded:
/// [`MAX_STATUS_MESSAGE`], [`MAX_STATUS_RESOURCE`]).
pub fn to_status(errno: Errno, resource: impl Into<String>, message: impl Into<String>) -> Status {
    let detail = ErrorDetail {
        errno: errno as i32,
        resource: bounded(resource.into(), MAX_STATUS_RESOURCE),
    };
    Status::with_details(
        code_of(errno),
        bounded(message.into(), MAX_STATUS_MESSAGE),
        detail.encode_to_vec().into(),
    )
}

impl WireError {
    /// An error.
    pub fn new(errno: Errno, resource: impl Into<String>, message: impl Into<String>) -> Self {
        WireError {
            errno,
            resource: resource.into(),
            message: message.into(),
        }
    }

    /// Reads a status back. Without details (a transport or deadline failure) the errno
    /// comes from the code: DeadlineExceeded → ETIMEDOUT, NotFound → ENOENT, anything
    /// else → EIO.
    pub fn from_status(s: &Status) -> Self {
        let detail = ErrorDetail::decode(s.details())
            .ok()
            .filter(|d| d.errno != 0);
        match detail {
            Some(d) => WireError {
                errno: Errno::try_from(d.errno).unwrap_or(Errno::Eio),
                resource: d.resource,
                message: s.message().to_string(),
            },
            None => WireError {
                errno: match s.code() {
                    Code::DeadlineExceeded => Errno::Etimedout,
                    Code::NotFound => Errno::Enoent,
                    Code::InvalidArgument => Errno::Einval,
                    Code::AlreadyExists => Errno::Eexist,
                    Code::PermissionDenied => Errno::Eperm,
                    _ => Errno::Eio,
                },
                resource: String::new(),
                message: s.message().to_string(),
            },
        }
    }

    /// The same error with `context` put before the sentence (e.g. "node node2: ").
    pub fn context(mut self, context: &str) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// Back into a status (the next hop keeps errno and resource).
    pub fn to_status(&self) -> Status {
        to_status(self.errno, self.resource.clone(), self.message.clone())
    }
}

impl From<WireError> for Status {
    fn from(e: WireError) -> Status {
        e.to_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_messages_are_bounded() {
        let long = "x".repeat(100_000);
        let s = to_status(Errno::Einval, long.clone(), long);
        assert!(
            s.message().len() <= MAX_STATUS_MESSAGE,
            "{}",
            s.message().len()
        );
        assert!(s.message().ends_with("…(cut, 100000 bytes)"));
        let back = WireError::from_status(&s);
        assert_eq!(back.errno, Errno::Einval);
        assert!(back.resource.len() <= MAX_STATUS_RESOURCE);
    }

    #[test]
    fn every_errno_survives_a_round_trip() {
        for e in [
            Errno::Ebusy,
            Errno::Enoent,
            Errno::Einval,
            Errno::Eio,
            Errno::Etimedout,
            Errno::Eexist,
            Errno::Eperm,
        ] {
            let s = to_status(e, "array md0 on node n1", "it failed");
            assert_eq!(s.code(), code_of(e));
            let back = WireError::from_status(&s);
            assert_eq!(back, WireError::new(e, "array md0 on node n1", "it failed"));
            // and across a second hop
            let again = WireError::from_status(&back.context("node n1").to_status());
            assert_eq!(again.errno, e);
            assert_eq!(again.message, "node n1: it failed");
            assert_eq!(errno_from_name(errno_name(e)), e);
        }
    }

    #[test]
    fn transport_failures_keep_a_reason() {
        assert_eq!(
            WireError::from_status(&Status::deadline_exceeded("slow")).errno,
            Errno::Etimedout
        );
        assert_eq!(
            WireError::from_status(&Status::unavailable("down")).errno,
            Errno::Eio
        );
    }
}
