//! [`ClusterArray`]: the handle of one clustered array joined on this node, holding its
//! cluster state (its slot lock membership, the receiver [`Engine`], the watch of the
//! other slots, this node's turn on the `token` lock). The node keeps one per joined
//! array (created at join, dropped at leave); the message receiver, the metadata gate
//! ([`super::message::MetaRound`]), the resync gate ([`super::resync::ClusterGate`])
//! and the takeover loop hold it directly instead of looking state up by name.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use super::join::Membership;
use super::message::Target;
use crate::cluster::takeover::SlotWatch;
use crate::cluster::Engine;
use crate::lockport::Session;

/// One clustered array joined here. Shared (`Arc`).
#[derive(Debug)]
pub struct ClusterArray {
    name: String,
    membership: Membership,
    /// Bitmap slots (nodes) of the array.
    slots: u32,
    /// The member paths, as assembled here.
    members: Vec<PathBuf>,
    engine: Mutex<Engine>,
    watch: Mutex<SlotWatch>,
    /// This node's turn on the `token` lock: the lock service grants a second acquire
    /// of the same session at once, so two tasks of this node are serialized here.
    turn: Arc<tokio::sync::Mutex<()>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl ClusterArray {
    /// The handle of array `name` joined by node `node` with `membership`.
    pub fn new(
        node: &str,
        name: &str,
        membership: Membership,
        slots: u32,
        members: Vec<PathBuf>,
    ) -> Arc<ClusterArray> {
        Arc::new(ClusterArray {
            name: name.to_owned(),
            engine: Mutex::new(Engine::new(node, name)),
            membership,
            slots,
            members,
            watch: Mutex::new(SlotWatch::default()),
            turn: Arc::new(tokio::sync::Mutex::new(())),
        })
    }

    /// The array's name here.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its UUID.
    pub fn uuid(&self) -> &[u8; 16] {
        &self.membership.uuid
    }

    /// This node's bitmap slot.
    pub fn slot(&self) -> u32 {
        self.membership.slot
    }

    /// How many slots (nodes) the array has.
    pub fn slots(&self) -> u32 {
        self.slots
    }

    /// The member paths as assembled here.
    pub fn members(&self) -> &[PathBuf] {
        &self.members
    }

    /// What this node holds in the lock service for the array.
    pub fn membership(&self) -> &Membership {
        &self.membership
    }

    /// The receiver engine (never held across an await).
    pub fn engine(&self) -> MutexGuard<'_, Engine> {
        lock(&self.engine)
    }

    /// The watch of the other slots' holders (never held across an await).
    pub fn watch(&self) -> MutexGuard<'_, SlotWatch> {
        lock(&self.watch)
    }

    /// This node's turn on the `token` lock.
    pub fn turn(&self) -> &Arc<tokio::sync::Mutex<()>> {
        &self.turn
    }

    /// The sender's view of this array for a message round through `session`.
    pub fn target<'a>(&'a self, session: &'a Session, node: &'a str) -> Target<'a> {
        Target {
            session,
            node,
            array: self,
        }
    }
}
