//! The etcd key layout: every key mdserver reads or writes is built here.
//!
//! All keys live under `/mdcluster/<cluster-name>/`. Lock and channel names may contain
//! `/`, so their per-session sub-keys are separated by `#/` (`#` is not allowed in
//! names): the prefix of lock `a` never matches the keys of lock `a/b`.
//!
//! | key | value | lease |
//! |---|---|---|
//! | `sessions/<id>` | [`crate::records::SessionRecord`] | the session |
//! | `nodes/<node>` | [`crate::records::NodeRecord`] | the session |
//! | `closed/<id>` | node name: the session was closed on purpose | a short lease of its own |
//! | `locks/<resource>#/<id>` | [`crate::records::LockRecord`] (one request per session) | the session |
//! | `values/<resource>` | the lock value block | none (persists) |
//! | `subs/<channel>#/<id>` | [`crate::records::SubRecord`] | the subscriber's session |
//! | `inbox/<id>/m-<msg-id>` | an encoded `SessionEvent` (a message) | the publisher's session |
//! | `inbox/<id>/n-<rand>` | an encoded `SessionEvent` (a notification) | the recipient's session |
//! | `acks/<msg-id>/<id>` | [`crate::records::AckRecord`] | the publisher's session |
//!
//! `<id>` is a session id (etcd lease id) as 16 hex digits; `<msg-id>` is
//! `<publisher-id>-<16 random hex digits>`.

/// Builds the keys of one cluster.
#[derive(Debug, Clone)]
pub struct Keys {
    /// `/mdcluster/<cluster-name>/`.
    root: String,
}

/// A session id as it appears in keys.
pub fn hex_id(id: i64) -> String {
    format!("{:016x}", id as u64)
}

/// Parses a session id from its key form.
pub fn parse_hex_id(s: &str) -> Option<i64> {
    u64::from_str_radix(s, 16).ok().map(|v| v as i64)
}

impl Keys {
    /// The key layout of cluster `cluster_name`.
    pub fn new(cluster_name: &str) -> Self {
        Keys {
            root: format!("/mdcluster/{cluster_name}/"),
        }
    }

    /// The session record of session `id`.
    pub fn session(&self, id: i64) -> String {
        format!("{}sessions/{}", self.root, hex_id(id))
    }

    /// The prefix of the node registry.
    pub fn nodes_prefix(&self) -> String {
        format!("{}nodes/", self.root)
    }

    /// The registry entry of node `node`.
    pub fn node(&self, node: &str) -> String {
        format!("{}nodes/{node}", self.root)
    }

    /// The marker that session `id` was closed on purpose (not expired).
    pub fn closed(&self, id: i64) -> String {
        format!("{}closed/{}", self.root, hex_id(id))
    }

    /// The prefix of every request on every lock.
    pub fn locks_root(&self) -> String {
        format!("{}locks/", self.root)
    }

    /// The prefix of every request on lock `resource`.
    pub fn lock_prefix(&self, resource: &str) -> String {
        format!("{}locks/{resource}#/", self.root)
    }

    /// The request of session `id` on lock `resource`.
    pub fn lock(&self, resource: &str, id: i64) -> String {
        format!("{}{}", self.lock_prefix(resource), hex_id(id))
    }

    /// The value block of lock `resource`.
    pub fn value(&self, resource: &str) -> String {
        format!("{}values/{resource}", self.root)
    }

    /// The prefix of the subscribers of `channel`.
    pub fn subs_prefix(&self, channel: &str) -> String {
        format!("{}subs/{channel}#/", self.root)
    }

    /// The subscription of session `id` to `channel`.
    pub fn sub(&self, channel: &str, id: i64) -> String {
        format!("{}{}", self.subs_prefix(channel), hex_id(id))
    }

    /// The inbox of session `id`.
    pub fn inbox_prefix(&self, id: i64) -> String {
        format!("{}inbox/{}/", self.root, hex_id(id))
    }

    /// Message `msg_id` in the inbox of session `id`.
    pub fn inbox_message(&self, id: i64, msg_id: &str) -> String {
        format!("{}m-{msg_id}", self.inbox_prefix(id))
    }

    /// A notification in the inbox of session `id`.
    pub fn inbox_notification(&self, id: i64, nonce: u64) -> String {
        format!("{}n-{nonce:016x}", self.inbox_prefix(id))
    }

    /// The prefix of the acks of message `msg_id`.
    pub fn acks_prefix(&self, msg_id: &str) -> String {
        format!("{}acks/{msg_id}/", self.root)
    }

    /// The ack of session `id` to message `msg_id`.
    pub fn ack(&self, msg_id: &str, id: i64) -> String {
        format!("{}{}", self.acks_prefix(msg_id), hex_id(id))
    }
}

/// The last `/`-separated component of a key.
pub fn last_component(key: &[u8]) -> &str {
    let s = std::str::from_utf8(key).unwrap_or("");
    s.rsplit('/').next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_prefixes_do_not_nest() {
        let k = Keys::new("c");
        let a = k.lock_prefix("a");
        let ab = k.lock("a/b", 1);
        assert!(!ab.starts_with(&a), "{ab} must not start with {a}");
        assert_eq!(k.lock("a", 255), "/mdcluster/c/locks/a#/00000000000000ff");
    }

    #[test]
    fn hex_ids_round_trip() {
        for id in [1i64, 0x7fff_ffff_ffff_ffff, 42] {
            assert_eq!(parse_hex_id(&hex_id(id)), Some(id));
        }
        assert_eq!(last_component(b"/x/y/00000000000000ff"), "00000000000000ff");
    }
}
