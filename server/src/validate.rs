//! Validation of every request field before anything reaches etcd.

use std::time::Duration;

use crate::error::LockError;

/// Longest lock or channel name.
pub const MAX_NAME: usize = 200;
/// Longest node name.
pub const MAX_NODE: usize = 63;
/// Longest agent address.
pub const MAX_ADDR: usize = 256;
/// Largest lock value block.
pub const MAX_VALUE: usize = 1024;
/// Largest message payload.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Longest negative-ack reason.
pub const MAX_REASON: usize = 1024;
/// Longest wait or publish timeout.
pub const MAX_WAIT: Duration = Duration::from_secs(600);
/// Most subscribers one publish delivers to.
pub const MAX_SUBSCRIBERS: usize = 64;

fn invalid(field: &'static str, reason: impl Into<String>) -> LockError {
    LockError::Invalid {
        field,
        reason: reason.into(),
    }
}

/// A lock or channel name: 1..=200 of `[A-Za-z0-9._:/-]`, no empty `/` component.
pub fn name(field: &'static str, s: &str) -> Result<(), LockError> {
    if s.is_empty() || s.len() > MAX_NAME {
        return Err(invalid(
            field,
            format!("{s:?} must be 1..={MAX_NAME} characters"),
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._:/-".contains(*c)))
    {
        return Err(invalid(
            field,
            format!("{s:?} contains {c:?}; allowed: A-Z a-z 0-9 . _ : / -"),
        ));
    }
    if s.starts_with('/') || s.ends_with('/') || s.contains("//") {
        return Err(invalid(field, format!("{s:?} has an empty '/' component")));
    }
    Ok(())
}

/// A node name: 1..=63 of `[A-Za-z0-9._-]`.
pub fn node(s: &str) -> Result<(), LockError> {
    if s.is_empty() || s.len() > MAX_NODE {
        return Err(invalid(
            "node",
            format!("{s:?} must be 1..={MAX_NODE} characters"),
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "._-".contains(*c)))
    {
        return Err(invalid(
            "node",
            format!("{s:?} contains {c:?}; allowed: A-Z a-z 0-9 . _ -"),
        ));
    }
    Ok(())
}

/// An agent address: at most 256 printable ASCII characters (may be empty).
pub fn agent_addr(s: &str) -> Result<(), LockError> {
    if s.len() > MAX_ADDR || s.chars().any(|c| !c.is_ascii_graphic()) {
        return Err(invalid(
            "agent_addr",
            format!("must be at most {MAX_ADDR} printable characters"),
        ));
    }
    Ok(())
}

/// A session id: non-zero.
pub fn session_id(id: i64) -> Result<(), LockError> {
    if id == 0 {
        return Err(invalid(
            "session_id",
            "0 is not a session; open a session first",
        ));
    }
    Ok(())
}

/// A wait or timeout in milliseconds: 1..=600000.
pub fn wait(field: &'static str, ms: u64) -> Result<Duration, LockError> {
    let d = Duration::from_millis(ms);
    if ms == 0 || d > MAX_WAIT {
        return Err(invalid(
            field,
            format!("{ms} ms must be within 1..={} ms", MAX_WAIT.as_millis()),
        ));
    }
    Ok(d)
}

/// A byte string of at most `max` bytes.
pub fn size(field: &'static str, len: usize, max: usize) -> Result<(), LockError> {
    if len > max {
        return Err(invalid(
            field,
            format!("{len} bytes is more than the limit of {max}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert!(name("resource", "md0/slot/1").is_ok());
        assert!(name("resource", "").is_err());
        assert!(name("resource", "a#b").is_err());
        assert!(name("resource", "a//b").is_err());
        assert!(name("resource", "/a").is_err());
        assert!(name("resource", &"x".repeat(201)).is_err());
        assert!(node("node-1.a_b").is_ok());
        assert!(node("node/1").is_err());
        assert!(wait("wait_ms", 0).is_err());
        assert!(wait("wait_ms", 600_001).is_err());
        assert!(wait("wait_ms", 10).is_ok());
    }
}
