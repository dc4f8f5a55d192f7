//! How the NBD server *opens* an export, and how the owner of the exports (the array
//! registry) learns which clients are connected and disconnects them.
//!
//! The contract follows `docs/LIFECYCLE.md` §2:
//! - [`Exports::open`] only **looks up**; it never creates an array. An absent export
//!   answers [`OpenError::NotFound`] (ENOENT), an assembling or stopping one
//!   [`OpenError::Busy`] (EBUSY), at once; the server never retries.
//! - Each successful open returns an [`OpenExport`]: the device, a token the owner cancels
//!   to force the client off, and a guard whose drop tells the owner the client has left
//!   **and** none of its requests is still in flight.
//! - [`ClientSet`] is the ready-made bookkeeping for one export: `attach` in `open`,
//!   `list`/`wait_empty`/`disconnect_all` in stop. [`MapExports`] is a simple
//!   [`Exports`] over a map (tests, and an example for the registry).

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use thiserror::Error;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::blockdev::BlockDevice;

/// Who is connecting: shown in logs and in "clients still connected" answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientInfo {
    /// Unique (per process) connection id.
    pub id: u64,
    /// Peer description: `unix:pid=123,uid=0` or `tcp:127.0.0.1:40000`.
    pub peer: String,
}

impl ClientInfo {
    /// A client with a fresh process-unique id.
    pub fn new(peer: impl Into<String>) -> Self {
        static NEXT: AtomicU64 = AtomicU64::new(1);
        ClientInfo {
            id: NEXT.fetch_add(1, Ordering::Relaxed),
            peer: peer.into(),
        }
    }
}

impl fmt::Display for ClientInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client #{} ({})", self.id, self.peer)
    }
}

/// Why an export could not be opened. Answered at once, never retried by the server.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
pub enum OpenError {
    /// ENOENT: no array of that name is active on this node.
    #[error("ENOENT: no array named {name:?} on this node")]
    NotFound {
        /// The requested name.
        name: String,
    },
    /// EBUSY: the array exists but is not active (assembling, stopping).
    #[error("EBUSY: array {name:?} is {state}, try again later")]
    Busy {
        /// The requested name.
        name: String,
        /// Its current state, e.g. "stopping".
        state: String,
    },
}

/// A successful open: what one client connection serves, until it ends or is told to go.
pub struct OpenExport {
    /// The device to serve.
    pub device: Arc<dyn BlockDevice>,
    /// Cancelled by the owner to force this client off (the server closes the
    /// connection at once; requests already in flight still complete before `guard`
    /// drops).
    pub disconnect: CancellationToken,
    /// Dropped when the client has left and none of its requests is in flight.
    pub guard: Box<dyn Send + Sync>,
}

impl fmt::Debug for OpenExport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenExport")
            .field("size", &self.device.size())
            .field("disconnected", &self.disconnect.is_cancelled())
            .finish_non_exhaustive()
    }
}

/// The set of exports a server serves. Implemented by the array registry.
pub trait Exports: Send + Sync {
    /// Names for `NBD_OPT_LIST`: only active exports.
    fn list(&self) -> Vec<String>;
    /// Looks up (never allocates) and opens the named export for one client connection.
    ///
    /// Must decide under the same lock that a stop uses to mark the export stopping, so
    /// no client can attach after the stop has started (see [`ClientSet`]). Called on the
    /// async runtime: must not block beyond taking that (short-held) lock.
    fn open(&self, name: &str, client: &ClientInfo) -> Result<OpenExport, OpenError>;
}

/// The clients connected to one export, with a way to wait for them to leave and to
/// force them off. Cheap to clone (shared state).
///
/// How a stop uses it, with `open` and the state change under one registry lock:
/// 1. under the lock: state := stopping (new opens now answer `Busy` at once);
/// 2. `wait_empty(grace)`; on `Err(clients)` without `--force`: under the lock, state :=
///    active, answer EBUSY naming `clients`;
/// 3. with `--force`: `disconnect_all()`, then `wait_empty(bound)` again;
/// 4. once empty, no request of any client is in flight: drain, flush, close.
#[derive(Clone)]
pub struct ClientSet {
    clients: Arc<watch::Sender<BTreeMap<u64, Attached>>>,
}

#[derive(Clone)]
struct Attached {
    info: ClientInfo,
    disconnect: CancellationToken,
}

impl fmt::Debug for ClientSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.list()).finish()
    }
}

/// Removes its client from the [`ClientSet`] on drop.
struct Detach {
    clients: Arc<watch::Sender<BTreeMap<u64, Attached>>>,
    id: u64,
}

impl Drop for Detach {
    fn drop(&mut self) {
        self.clients.send_modify(|m| {
            m.remove(&self.id);
        });
    }
}

impl Default for ClientSet {
    fn default() -> Self {
        ClientSet {
            clients: Arc::new(watch::channel(BTreeMap::new()).0),
        }
    }
}

impl ClientSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `client` and returns the [`OpenExport`] for it. Call with the registry
    /// lock held, after checking the export is active.
    pub fn attach(&self, device: Arc<dyn BlockDevice>, client: &ClientInfo) -> OpenExport {
        let disconnect = CancellationToken::new();
        self.clients.send_modify(|m| {
            m.insert(
                client.id,
                Attached {
                    info: client.clone(),
                    disconnect: disconnect.clone(),
                },
            );
        });
        OpenExport {
            device,
            disconnect,
            guard: Box::new(Detach {
                clients: Arc::clone(&self.clients),
                id: client.id,
            }),
        }
    }

    /// The clients connected now.
    pub fn list(&self) -> Vec<ClientInfo> {
        self.clients
            .borrow()
            .values()
            .map(|a| a.info.clone())
            .collect()
    }

    /// Number of clients connected now.
    pub fn len(&self) -> usize {
        self.clients.borrow().len()
    }

    /// Whether no client is connected.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tells every connected client's connection to close at once.
    pub fn disconnect_all(&self) {
        for a in self.clients.borrow().values() {
            a.disconnect.cancel();
        }
    }

    /// Waits at most `timeout` until no client is connected (and none of their requests
    /// is in flight). On timeout returns the clients still there.
    pub async fn wait_empty(&self, timeout: Duration) -> Result<(), Vec<ClientInfo>> {
        let mut rx = self.clients.subscribe();
        // The sender lives in `self`, so `wait_for` cannot see it closed: only the
        // timeout ends the wait early.
        let emptied = tokio::time::timeout(timeout, async {
            rx.wait_for(|m| m.is_empty()).await.map(drop)
        })
        .await;
        match emptied {
            Ok(_) => Ok(()),
            Err(_) => {
                let left = self.list();
                if left.is_empty() {
                    Ok(())
                } else {
                    Err(left)
                }
            }
        }
    }
}

/// State of an export in [`MapExports`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportState {
    /// Being assembled: opens answer `Busy`.
    Assembling,
    /// Served.
    Active,
    /// Being stopped: opens answer `Busy`.
    Stopping,
}

impl fmt::Display for ExportState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ExportState::Assembling => "assembling",
            ExportState::Active => "active",
            ExportState::Stopping => "stopping",
        })
    }
}

struct Entry {
    state: ExportState,
    device: Arc<dyn BlockDevice>,
    clients: ClientSet,
}

/// A simple [`Exports`] over a map of named devices, each with a state. For tests, and as
/// the pattern the array registry follows: lookup, state check and attach under one lock.
#[derive(Default)]
pub struct MapExports {
    map: Mutex<HashMap<String, Entry>>,
}

impl MapExports {
    /// An empty map.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        // The map stays consistent even if a holder panicked: every update is one insert
        // or one field assignment.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Adds (or replaces) an export in the given state.
    pub fn insert(&self, name: &str, device: Arc<dyn BlockDevice>, state: ExportState) {
        self.lock().insert(
            name.to_owned(),
            Entry {
                state,
                device,
                clients: ClientSet::new(),
            },
        );
    }

    /// Changes an export's state; returns false if there is no such export.
    pub fn set_state(&self, name: &str, state: ExportState) -> bool {
        match self.lock().get_mut(name) {
            Some(e) => {
                e.state = state;
                true
            }
            None => false,
        }
    }

    /// Removes an export (its connected clients are not disconnected by this).
    pub fn remove(&self, name: &str) -> bool {
        self.lock().remove(name).is_some()
    }

    /// The client set of an export.
    pub fn clients(&self, name: &str) -> Option<ClientSet> {
        self.lock().get(name).map(|e| e.clients.clone())
    }
}

impl Exports for MapExports {
    fn list(&self) -> Vec<String> {
        let mut names: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, e)| e.state == ExportState::Active)
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        names
    }

    fn open(&self, name: &str, client: &ClientInfo) -> Result<OpenExport, OpenError> {
        let map = self.lock();
        match map.get(name) {
            None => Err(OpenError::NotFound {
                name: name.to_owned(),
            }),
            Some(e) if e.state != ExportState::Active => Err(OpenError::Busy {
                name: name.to_owned(),
                state: e.state.to_string(),
            }),
            Some(e) => Ok(e.clients.attach(Arc::clone(&e.device), client)),
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::blockdev::IoFuture;

    struct Null;
    impl BlockDevice for Null {
        fn size(&self) -> u64 {
            4096
        }
        fn read(&self, _: u64, len: u32) -> IoFuture<'_, Bytes> {
            Box::pin(async move { Ok(Bytes::from(vec![0; len as usize])) })
        }
        fn write(&self, _: u64, _: Bytes, _: bool) -> IoFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn flush(&self) -> IoFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn trim(&self, _: u64, _: u32) -> IoFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
        fn write_zeroes(&self, _: u64, _: u32, _: bool) -> IoFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }
    }

    #[test]
    fn open_looks_up_and_answers_by_state() {
        let ex = MapExports::new();
        let c = ClientInfo::new("test");
        assert_eq!(
            ex.open("md0", &c).unwrap_err(),
            OpenError::NotFound { name: "md0".into() }
        );
        // The failed open did not create anything.
        assert!(ex.clients("md0").is_none());
        ex.insert("md0", Arc::new(Null), ExportState::Assembling);
        let err = ex.open("md0", &c).unwrap_err();
        assert!(err.to_string().starts_with("EBUSY"), "{err}");
        assert!(err.to_string().contains("assembling"), "{err}");
        assert!(ex.list().is_empty());
        ex.set_state("md0", ExportState::Active);
        assert_eq!(ex.list(), vec!["md0".to_string()]);
        let open = ex.open("md0", &c).unwrap();
        assert_eq!(open.device.size(), 4096);
        ex.set_state("md0", ExportState::Stopping);
        assert!(matches!(ex.open("md0", &c), Err(OpenError::Busy { .. })));
    }

    #[tokio::test]
    async fn client_set_tracks_waits_and_disconnects() {
        let set = ClientSet::new();
        let a = ClientInfo::new("a");
        let b = ClientInfo::new("b");
        let oa = set.attach(Arc::new(Null), &a);
        let ob = set.attach(Arc::new(Null), &b);
        assert_eq!(set.len(), 2);
        assert_eq!(set.list(), vec![a.clone(), b.clone()]);
        drop(oa.guard);
        assert_eq!(set.list(), vec![b.clone()]);
        // b stays: the wait times out naming it.
        assert_eq!(
            set.wait_empty(Duration::from_millis(50)).await,
            Err(vec![b.clone()])
        );
        set.disconnect_all();
        assert!(ob.disconnect.is_cancelled());
        assert!(!oa.disconnect.is_cancelled());
        // The connection reacts to the token by dropping the guard.
        let guard = ob.guard;
        let waiter = {
            let set = set.clone();
            tokio::spawn(async move { set.wait_empty(Duration::from_secs(10)).await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(guard);
        assert_eq!(waiter.await.unwrap(), Ok(()));
        assert!(set.is_empty());
    }
}
