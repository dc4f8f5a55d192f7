//! md-cluster on the lock service: the names of an array's locks and channel, and the
//! messages and value blocks that travel through them.
//!
//! Per array (by UUID), as md-cluster has per lockspace (`docs/MD-CLUSTER.md`
//! §2): an exclusive `token` lock (metadata updates and message sends), a `resync`
//! lock (one resyncing node at a time), one `slot/N` lock per bitmap slot held by the
//! slot's node for its whole membership (its value block is the node's [`ResyncInfo`]),
//! and one message channel.
//!
//! The protocol's decisions live here too, as sans-IO code (no async, no I/O, no clock
//! reads: time is an input): events in, commands out. The runtime in `service/`
//! (`message`, `takeover`, `resync`, `join`) executes the commands against the lock
//! client and the RAID engine, so every decision has a unit test here.
//!
//! # Layout
//! - [`msg`]: [`ClusterMsg`] (md-cluster's `struct cluster_msg`) and [`ResyncInfo`].
//! - [`engine`]: [`Engine`], the receiver of one array: a message and this node's view
//!   in, the commands that apply it out (reload, fail, attach, windows, ack/nack).
//! - [`join`]: what a joiner makes of the slots it probes, and of every slot busy.
//! - [`takeover`]: when a dead node's slot is recovered, which key is preempted, when
//!   the recovered chunks count as resynced.
//! - [`resync`]: may a resync/recovery start, what each window and the end publish.
//! - [`round`]: the sender's acknowledged round (token, change, publish, rollback).
//! - [`nack`]: [`Nack`], the typed reason of a negative ack.
//! - [`timings`]: [`Timings`], every deadline and period of the protocol.

pub mod engine;
pub mod join;
pub mod msg;
pub mod nack;
pub mod resync;
pub mod round;
pub mod takeover;
pub mod timings;

pub use engine::{ArrayView, Command, Engine, Event, NewestSuperblock};
pub use msg::{ClusterMsg, MsgType, ResyncInfo};
pub use nack::Nack;
pub use timings::Timings;

/// The lock-service prefix of every array's locks and channels.
pub const ARRAYS_PREFIX: &str = "md/";

/// The lock-service prefix of everything that belongs to array `uuid`:
/// [`ARRAYS_PREFIX`] and the UUID as DLM's lockspace name prints it (lower-case
/// 8-4-4-4-12).
pub fn array_prefix(uuid: &[u8; 16]) -> String {
    format!(
        "{ARRAYS_PREFIX}{}",
        uuid::Uuid::from_bytes(*uuid).hyphenated()
    )
}

/// The `token` lock of array `uuid`.
pub fn token_lock(uuid: &[u8; 16]) -> String {
    format!("{}/token", array_prefix(uuid))
}

/// The `resync` lock of array `uuid`.
pub fn resync_lock(uuid: &[u8; 16]) -> String {
    format!("{}/resync", array_prefix(uuid))
}

/// The lock of bitmap slot `slot` (0-based) of array `uuid`.
pub fn slot_lock(uuid: &[u8; 16], slot: u32) -> String {
    format!("{}/slot/{slot}", array_prefix(uuid))
}

/// The message channel of array `uuid`.
pub fn channel(uuid: &[u8; 16]) -> String {
    format!("{}/msg", array_prefix(uuid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let u = [
            0xe9, 0x49, 0xd4, 0x84, 0xe1, 0x47, 0xbe, 0xef, 0x6f, 0xf3, 0x27, 0xb4, 0x5d, 0x32,
            0x5e, 0xb9,
        ];
        assert_eq!(
            token_lock(&u),
            "md/e949d484-e147-beef-6ff3-27b45d325eb9/token"
        );
        assert_eq!(
            slot_lock(&u, 3),
            "md/e949d484-e147-beef-6ff3-27b45d325eb9/slot/3"
        );
        assert_eq!(
            resync_lock(&u),
            "md/e949d484-e147-beef-6ff3-27b45d325eb9/resync"
        );
        assert_eq!(channel(&u), "md/e949d484-e147-beef-6ff3-27b45d325eb9/msg");
    }
}
