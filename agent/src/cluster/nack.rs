//! [`Nack`]: why a node refuses a cluster message. It travels back to the sender as the
//! negative ack's reason ([`Nack`]'s `Display` is that text), and the sender's round
//! fails with EIO naming each refusing node and its reason.

use std::path::PathBuf;

use super::msg::{MsgError, MsgType};
use crate::raid::MemberState;

/// A typed negative ack. Every variant names the node and, where known, the array.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Nack {
    /// The message could not be decoded (wrong length, a type this node does not know).
    #[error("node {node}: cannot decode cluster message: {error}")]
    Undecodable {
        /// This node.
        node: String,
        /// Why.
        error: MsgError,
    },
    /// The array is joined but its engine is not running here.
    #[error("node {node}: array {array} is not active here")]
    NotActive {
        /// This node.
        node: String,
        /// The array.
        array: String,
    },
    /// This node has no session with the lock service.
    #[error("node {node}: no session with mdserver")]
    NoSession {
        /// This node.
        node: String,
    },
    /// A type this agent knows but does not apply (BITMAP_RESIZE: RAID10 reshapes).
    #[error("node {node}: array {array}: {kind:?} is not supported by this mdagent yet")]
    Unsupported {
        /// This node.
        node: String,
        /// The array.
        array: String,
        /// The message type.
        kind: MsgType,
    },
    /// A RESYNCING window whose sectors do not fit 64-bit byte offsets.
    #[error("node {node}: array {array}: RESYNCING window {low}..{high} sectors does not fit 64-bit byte offsets")]
    WindowOverflow {
        /// This node.
        node: String,
        /// The array.
        array: String,
        /// Start sector.
        low: u64,
        /// End sector.
        high: u64,
    },
    /// RE_ADD of a member that is active here.
    #[error("node {node}: array {array}: member {} (device {dev_number}) is active here ({state:?}); it cannot be re-added", path.display())]
    ReAddActive {
        /// This node.
        node: String,
        /// The array.
        array: String,
        /// The member's path here.
        path: PathBuf,
        /// Its device number.
        dev_number: u32,
        /// Its state here.
        state: MemberState,
    },
    /// REMOVE of a member that is active here (neither faulty nor a spare).
    #[error("node {node}: array {array}: member {} (device {dev_number}) is active here ({state:?}), not faulty; not removing it", path.display())]
    RemoveActive {
        /// This node.
        node: String,
        /// The array.
        array: String,
        /// The member's path here.
        path: PathBuf,
        /// Its device number.
        dev_number: u32,
        /// Its state here.
        state: MemberState,
    },
    /// NEWDISK of a device that is already an active member here.
    #[error("node {node}: {} is already a member of {array} here", path.display())]
    AlreadyMember {
        /// This node.
        node: String,
        /// The array.
        array: String,
        /// The device's path here.
        path: PathBuf,
    },
    /// Carrying out what the message asks failed here (a read, a write, a lock-service
    /// call): `what` was being done, `error` says why.
    #[error("node {node}: array {array}: {what}: {error}")]
    Failed {
        /// This node.
        node: String,
        /// The array.
        array: String,
        /// What was being done.
        what: String,
        /// Why it failed.
        error: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wire_text_names_node_array_and_reason() {
        let n = Nack::Unsupported {
            node: "n2".into(),
            array: "md0".into(),
            kind: MsgType::BitmapResize,
        };
        assert_eq!(
            n.to_string(),
            "node n2: array md0: BitmapResize is not supported by this mdagent yet"
        );
        let n = Nack::ReAddActive {
            node: "n2".into(),
            array: "md0".into(),
            path: "/dev/loop3".into(),
            dev_number: 1,
            state: MemberState::InSync,
        };
        assert_eq!(
            n.to_string(),
            "node n2: array md0: member /dev/loop3 (device 1) is active here (InSync); it cannot be re-added"
        );
        let n = Nack::Undecodable {
            node: "n1".into(),
            error: MsgError::UnknownType(9),
        };
        assert_eq!(
            n.to_string(),
            "node n1: cannot decode cluster message: unknown cluster message type 9; is a newer mdagent in the cluster?"
        );
    }
}
