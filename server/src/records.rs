//! The records mdserver stores as etcd values (JSON, so that `etcdctl get` is readable).
//!
//! Lock records are compared byte-for-byte in fencing transactions, so their encoding
//! must be deterministic: serde_json writes struct fields in declaration order.

use mdcluster_proto::v1::LockMode;
use serde::{Deserialize, Serialize};

use crate::error::LockError;

/// A lock mode as stored in etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Compatible with other shared holders.
    Shared,
    /// Compatible with nothing.
    Exclusive,
}

impl Mode {
    /// The mode of a request, or an EINVAL error.
    pub fn from_proto(m: i32) -> Result<Mode, LockError> {
        match LockMode::try_from(m) {
            Ok(LockMode::Shared) => Ok(Mode::Shared),
            Ok(LockMode::Exclusive) => Ok(Mode::Exclusive),
            _ => Err(LockError::Invalid {
                field: "mode",
                reason: format!("{m} is not SHARED (1) or EXCLUSIVE (2)"),
            }),
        }
    }

    /// The wire form.
    pub fn to_proto(self) -> LockMode {
        match self {
            Mode::Shared => LockMode::Shared,
            Mode::Exclusive => LockMode::Exclusive,
        }
    }
}

/// The value of a lock request key `locks/<resource>#/<session>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LockRecord {
    /// The requesting node, so that waiters can name a holder whose lease expired.
    pub node: String,
    /// The requested (and, once granted, held) mode.
    pub mode: Mode,
}

/// The value of `sessions/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    /// The node that owns the session: only it may resume it.
    pub node: String,
    /// Where the node's agent serves its API.
    pub agent_addr: String,
}

/// The value of `nodes/<node>` (the node registry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The node's live session.
    pub session_id: i64,
    /// Where the node's agent serves its API.
    pub agent_addr: String,
}

/// The value of `subs/<channel>#/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubRecord {
    /// The subscribing node, named in publish results.
    pub node: String,
}

/// The value of `acks/<msg-id>/<id>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckRecord {
    /// The acking node.
    pub node: String,
    /// Positive or negative.
    pub ok: bool,
    /// Why a negative ack refused the message.
    pub reason: String,
}

/// Encodes a record.
pub fn encode<T: Serialize>(r: &T) -> Vec<u8> {
    // Serialising these plain structs cannot fail (no maps with non-string keys).
    serde_json::to_vec(r).unwrap_or_default()
}

/// Decodes the record stored at `key`.
pub fn decode<T: for<'de> Deserialize<'de>>(key: &[u8], value: &[u8]) -> Result<T, LockError> {
    serde_json::from_slice(value).map_err(|e| LockError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: e.to_string(),
    })
}
