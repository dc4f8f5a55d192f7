//! The agent service of cluster mode: this node's arrays behind the gRPC
//! `AgentService` that mdserver routes per-node operations to (`docs/ARCHITECTURE.md`,
//! "The agent service" and "Requests").
//!
//! [`Node`] sits on top of the standalone [`Service`] (registry, lifecycle, per-array NBD
//! sockets) and adds what the cluster needs:
//! - **one operation per array at a time**: a create, assemble or stop of an array while
//!   another of these runs on it answers EBUSY at once (the first request wins), so two
//!   `mdctl` runs racing on one array never queue behind each other;
//! - **lookups never allocate** ([`Node::get`], [`Node::list`], [`Node::mdstat`], the
//!   NBD [`Exports`](crate::nbd::Exports) of the node): they read what exists; only
//!   create and assemble reserve a name;
//! - **the bitmap slot of a clustered array** comes from its slot lock in the lock
//!   service ([`join`]), held for the whole membership and released at stop;
//! - **events** ([`events`]) for `mdctl monitor`, from the registry's lifecycle events
//!   and the engines' status changes;
//! - handlers run their critical section on a spawned task, so a client that cancels
//!   its call never leaves an array half assembled or half stopped.
//!
//! The node keeps one [`Service`] (one registry, created on first use): each array is
//! assembled with its own bitmap slot ([`Registry::assemble_in_slot`]), 0 for an
//! internal bitmap, the slot of its slot lock for a clustered one.
//!
//! # Layout
//! This file holds [`Node`] itself: its state, the session and fence gate, event
//! emission, the one-operation-per-array guard and the lookup helpers the other files
//! share. The operations are `impl Node` blocks in:
//! - `lifecycle.rs`: create, assemble (also of a recorded array), stop, shutdown.
//! - `manage.rs`: member operations (`mdctl manage`) and grow of the role count.
//! - `status.rs`: lookups (get, list, mdstat), speed limits, and the NBD
//!   [`Exports`](crate::nbd::Exports).
//! - `stamp.rs`: the superblock of a device about to be added.
//! - `saved.rs`: the state file of the arrays assembled here, rejoin at start, and
//!   teardown of the arrays of a lost session.
//! - `reshape.rs`: size and bitmap changes (`mdctl grow --size`, `--bitmap`).
//! - [`grpc`]: the tonic `AgentService` over a [`Node`].
//! - [`cluster_array`]: [`ClusterArray`], the handle of one joined clustered array
//!   (membership, the cluster engine's state, the token turn); the node keeps one per
//!   joined array.
//! - [`join`]: clustered join/leave with slot locks (RFC 0001 "Join", "Leave").
//! - [`message`]: the token lock and the acknowledged message round, sender side
//!   (RFC 0001 "Messages"); `receive`: the receiver, which carries out the
//!   [`crate::cluster::Engine`]'s commands.
//! - [`events`]: the event stream.
//! - [`mdstat_file`]: `<run-dir>/proc/mdstat` kept current for node_exporter.
//! - [`resync`]: one node resyncs at a time (the `resync` lock and RESYNCING windows).
//! - [`runtime`]: cluster-mode `mdagent`: listener, TLS, health, NBD TCP around the
//!   `driver` (notifications, rejoin after a lost session, fence watchdog, takeover,
//!   engine watcher, mdstat file; binds no socket).
//! - [`takeover`]: a survivor recovers a failed node's bitmap slot (RFC 0001 "Node
//!   failure and slot recovery").
//! - `slot_reads.rs`: how the takeover watch reads the other nodes' slot locks each
//!   period (one `ReadValues` call for every array, or lock by lock).

pub mod cluster_array;
mod driver;
pub mod events;
pub mod grpc;
pub mod join;
mod lifecycle;
mod manage;
pub mod mdstat_file;
pub mod message;
mod metrics;
mod receive;
mod reshape;
pub mod resync;
pub mod runtime;
mod saved;
mod slot_reads;
mod stamp;
mod status;
pub mod takeover;

pub use saved::NotTornDown;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use crate::lockport::Session;
use mdcluster_proto::status::WireError;
use mdcluster_proto::v1 as pb;
use mdcluster_proto::v1::Errno;
use tokio::sync::broadcast;

use crate::array::service::Service;
use crate::array::{valid_name, ArrayInfo, AssembleOptions, Registry, RegistryConfig};
use crate::fence::FenceGate;
use crate::format::io::{read_member, Member};
use crate::nbd::ServerConfig;
use crate::raid::SpeedLimits;
use cluster_array::ClusterArray;

/// How long an array listed for rejoin keeps retrying a transient EBUSY at start.
pub const REJOIN_RETRY: Duration = Duration::from_secs(15);

/// Events kept for slow watchers before they see `EventsDropped`.
pub const EVENT_CAPACITY: usize = 1024;
/// Events kept for a watcher that asks for the recent ones (`WatchRequest.recent`).
pub const RECENT_CAPACITY: usize = 256;
/// How far back `WatchRequest.recent` reaches.
pub const RECENT_WINDOW: Duration = Duration::from_secs(10);

/// How a node runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// This node's name.
    pub node: String,
    /// Directory of the per-array NBD sockets.
    pub run_dir: PathBuf,
    /// The registry's configuration (the node sets its fence gate and its current speed
    /// limits; each clustered array is assembled in its own slot).
    pub registry: RegistryConfig,
    /// NBD server limits.
    pub nbd: ServerConfig,
    /// The NBD TCP address this node serves, if any (shown in status).
    pub nbd_tcp: Option<String>,
    /// How long I/O of a fenced clustered array waits for the session to be renewed
    /// before it fails with EIO ([`crate::fence`]).
    pub suspend_io_timeout: Duration,
    /// The cluster protocol's deadlines and periods.
    pub timings: crate::cluster::Timings,
}

/// What the superblock said when an array was assembled here.
#[derive(Debug, Clone, Default)]
struct Meta {
    level: i32,
    ctime: u64,
    events: u64,
    utime: u64,
    /// "internal" or "clustered"; `None` without a bitmap.
    bitmap_kind: Option<&'static str>,
    slots: u32,
    slot: u32,
    chunk_bytes: u64,
    chunks: u64,
    cluster_name: String,
}

/// This node's arrays in cluster mode. Cheap to share (`Arc`).
pub struct Node {
    cfg: NodeConfig,
    /// The standalone service (registry, NBD sockets) of every array here, created on
    /// the first create or assemble.
    service: OnceLock<Arc<Service>>,
    /// Arrays with a create/assemble/stop running, and which.
    busy: Mutex<HashMap<String, &'static str>>,
    meta: Mutex<HashMap<String, Meta>>,
    /// The clustered arrays joined here (each holds its slot lock's membership and
    /// its cluster state), by name.
    clustered: Mutex<HashMap<String, Arc<ClusterArray>>>,
    /// What the engine watcher last saw per array ([`events`]).
    seen: Mutex<HashMap<String, events::Seen>>,
    speed: Mutex<SpeedLimits>,
    events: broadcast::Sender<pb::ArrayEvent>,
    /// The last [`RECENT_CAPACITY`] events, for a watcher asking for recent ones.
    recent: Mutex<std::collections::VecDeque<pb::ArrayEvent>>,
    /// The lock-service session (cluster mode); `None`: clustered arrays are refused.
    session: Mutex<Option<Arc<Session>>>,
    /// The fence gate of every clustered array's member I/O, fed from `session`.
    fence: Arc<FenceGate>,
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("node", &self.cfg.node)
            .finish()
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Marks an array busy with one operation; dropping it ends the operation.
struct OpGuard {
    node: Arc<Node>,
    name: String,
}

impl Drop for OpGuard {
    fn drop(&mut self) {
        lock(&self.node.busy).remove(&self.name);
    }
}

/// Milliseconds since the epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Reads the `/dev/` prefix off an array name: `/dev/md0` → `md0`.
pub fn short_name(name: &str) -> &str {
    name.strip_prefix("/dev/").unwrap_or(name)
}

impl Node {
    /// A node with no arrays.
    pub fn new(cfg: NodeConfig) -> Arc<Node> {
        let speed = cfg.registry.assemble.speed;
        let fence = FenceGate::new(cfg.node.clone(), cfg.suspend_io_timeout);
        Arc::new(Node {
            fence,
            cfg,
            service: OnceLock::new(),
            busy: Mutex::new(HashMap::new()),
            meta: Mutex::new(HashMap::new()),
            clustered: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            speed: Mutex::new(speed),
            events: broadcast::channel(EVENT_CAPACITY).0,
            recent: Mutex::new(std::collections::VecDeque::with_capacity(RECENT_CAPACITY)),
            session: Mutex::new(None),
        })
    }

    /// This node's name.
    pub fn name(&self) -> &str {
        &self.cfg.node
    }

    /// Sets the lock-service session clustered arrays join through; it feeds the fence
    /// gate (none: the gate is closed; a new one: arrays assembled under the previous
    /// one stay fenced).
    pub fn set_session(&self, session: Option<Arc<Session>>) {
        let mut s = lock(&self.session);
        let same = match (&*s, &session) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        };
        if !same {
            self.fence
                .set_session(session.as_ref().map(|s| s.fence_deadline_handle()));
        }
        *s = session;
    }

    /// The fence gate of this node's clustered arrays ([`crate::fence`]).
    pub fn fence_gate(&self) -> &Arc<FenceGate> {
        &self.fence
    }

    /// The clustered arrays joined here: name, membership, slot count.
    pub fn memberships(&self) -> Vec<(String, join::Membership, u32)> {
        self.cluster_arrays()
            .into_iter()
            .map(|a| (a.name().to_owned(), a.membership().clone(), a.slots()))
            .collect()
    }

    /// The membership of clustered array `name` here, if joined.
    pub fn membership(&self, name: &str) -> Option<join::Membership> {
        self.cluster(name).map(|a| a.membership().clone())
    }

    /// The handle of clustered array `name`, if joined here.
    pub fn cluster(&self, name: &str) -> Option<Arc<ClusterArray>> {
        lock(&self.clustered).get(name).cloned()
    }

    /// Every clustered array joined here.
    pub fn cluster_arrays(&self) -> Vec<Arc<ClusterArray>> {
        lock(&self.clustered).values().cloned().collect()
    }

    /// The cluster protocol's timings on this node.
    pub fn timings(&self) -> &crate::cluster::Timings {
        &self.cfg.timings
    }

    /// The engine and member paths of an active array.
    pub fn raid_of(&self, name: &str) -> Option<(Arc<crate::raid::Raid1>, Vec<PathBuf>)> {
        let (info, service) = self.info(name)?;
        let raid = service.registry().device(name).ok()?;
        Some((raid, info.identity?.members))
    }

    /// Compares array `name`'s engine status with the last look and emits the changes
    /// ([`events::diff`]).
    pub fn observe(&self, name: &str) {
        let Some(r) = self.info(name).and_then(|(i, _)| i.raid) else {
            return;
        };
        let mut seen = lock(&self.seen);
        let prev = seen.remove(name).unwrap_or_default();
        let cur = events::diff(self, name, prev, &r);
        seen.insert(name.to_owned(), cur);
    }

    /// [`Node::observe`] for every array; forgets arrays that are gone.
    pub fn observe_all(&self) {
        let names = self.names();
        for n in &names {
            self.observe(n);
        }
        lock(&self.seen).retain(|k, _| names.contains(k));
    }

    fn session(&self) -> Option<Arc<Session>> {
        lock(&self.session).clone()
    }

    /// Events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<pb::ArrayEvent> {
        self.events.subscribe()
    }

    /// The events of the last [`RECENT_WINDOW`] (at most [`RECENT_CAPACITY`]) and the
    /// events from now on, with none missed or repeated in between: a watcher that has
    /// just seen this node join gets the events of its start.
    pub fn subscribe_recent(&self) -> (Vec<pb::ArrayEvent>, broadcast::Receiver<pb::ArrayEvent>) {
        let recent = lock(&self.recent);
        let since = now_ms() - RECENT_WINDOW.as_millis() as i64;
        let past = recent
            .iter()
            .filter(|e| e.time_unix_ms >= since)
            .cloned()
            .collect();
        (past, self.events.subscribe())
    }

    fn emit(&self, event: &str, array: &str, component: &str, detail: String) {
        let ev = pb::ArrayEvent {
            event: event.to_owned(),
            node: self.cfg.node.clone(),
            array: array.to_owned(),
            component: component.to_owned(),
            detail,
            time_unix_ms: now_ms(),
        };
        // Under the lock: a `subscribe_recent` sees each event either in the past or
        // on its receiver.
        let mut recent = lock(&self.recent);
        if recent.len() >= RECENT_CAPACITY {
            recent.pop_front();
        }
        recent.push_back(ev.clone());
        let _ = self.events.send(ev);
    }

    fn resource(&self, name: &str) -> String {
        format!(
            "array {} on node {}",
            crate::quote::cut(name),
            self.cfg.node
        )
    }

    fn err(&self, errno: Errno, name: &str, message: impl std::fmt::Display) -> WireError {
        WireError::new(
            errno,
            self.resource(name),
            format!("node {}: {message}", self.cfg.node),
        )
    }

    /// The node's service, created on first use (a create or assemble).
    fn service(self: &Arc<Self>) -> Arc<Service> {
        self.service
            .get_or_init(|| {
                let mut rc = self.cfg.registry.clone();
                rc.assemble = AssembleOptions {
                    fence: Some(self.fence.clone()),
                    ..rc.assemble.clone()
                };
                rc.assemble.speed = *lock(&self.speed);
                let registry = Registry::new(rc);
                events::forward_lifecycle(self.clone(), registry.subscribe());
                Service::new(registry, &self.cfg.run_dir, self.cfg.nbd.clone())
            })
            .clone()
    }

    /// The node's registry, if an array was ever created or assembled here (pure
    /// lookup: never creates it).
    fn registry(&self) -> Option<&Arc<Registry>> {
        self.service.get().map(|s| s.registry())
    }

    /// The node's service if its registry holds `name` (pure lookup).
    fn find(&self, name: &str) -> Option<Arc<Service>> {
        self.service
            .get()
            .filter(|s| s.registry().lookup(name).is_ok())
            .cloned()
    }

    fn begin(self: &Arc<Self>, name: &str, op: &'static str) -> Result<OpGuard, WireError> {
        if !valid_name(name) {
            return Err(self.err(
                Errno::Einval,
                name,
                format!(
                    "invalid array name {}: use 1-32 of [A-Za-z0-9_.-], like md0",
                    crate::quote::quoted(name)
                ),
            ));
        }
        let mut busy = lock(&self.busy);
        if let Some(other) = busy.get(name) {
            return Err(self.err(
                Errno::Ebusy,
                name,
                format!("array {name} is busy: a {other} of it is in progress; retry when it has finished"),
            ));
        }
        busy.insert(name.to_owned(), op);
        Ok(OpGuard {
            node: self.clone(),
            name: name.to_owned(),
        })
    }

    /// Refuses more member paths than md can have devices, before any is looked at.
    fn check_count(&self, name: &str, n: usize) -> Result<(), WireError> {
        let max = crate::format::superblock::DEFAULT_MAX_DEV as usize;
        if n > max {
            return Err(self.err(
                Errno::Einval,
                name,
                format!("{n} member devices given: an array has at most {max}"),
            ));
        }
        Ok(())
    }

    /// Checks `paths` against the allow-list ([`crate::allow`]); their resolutions, or
    /// EPERM naming the path, its resolution and the patterns. Nothing is opened.
    fn check_allowed(&self, name: &str, paths: &[PathBuf]) -> Result<Vec<PathBuf>, WireError> {
        self.cfg
            .registry
            .device_allow
            .check_all(paths)
            .map_err(|e| {
                let errno = match e {
                    crate::allow::Denied::Unresolvable { .. } => Errno::Enoent,
                    crate::allow::Denied::NotAllowed { .. } => Errno::Eperm,
                };
                self.err(errno, name, e)
            })
    }

    /// Reads the first member that has a valid superblock.
    async fn read_any(&self, name: &str, paths: &[PathBuf]) -> Result<Member, WireError> {
        let paths = paths.to_vec();
        let r = tokio::task::spawn_blocking(move || {
            let mut first_err = None;
            for p in &paths {
                match read_member(p) {
                    Ok(m) => return Ok(m),
                    Err(e) => {
                        first_err.get_or_insert(e);
                    }
                }
            }
            Err(first_err)
        })
        .await
        .map_err(|e| self.err(Errno::Eio, name, format!("reading members failed: {e}")))?;
        r.map_err(|e| match e {
            Some(e) => self.err(e.errno(), name, e),
            None => self.err(Errno::Einval, name, "no member devices given"),
        })
    }

    /// The run-the-critical-section-on-a-task wrapper: the work completes even when the
    /// caller goes away.
    async fn detached<T: Send + 'static>(
        self: &Arc<Self>,
        name: &str,
        f: impl std::future::Future<Output = Result<T, WireError>> + Send + 'static,
    ) -> Result<T, WireError> {
        tokio::spawn(f)
            .await
            .map_err(|e| self.err(Errno::Eio, name, format!("operation task failed: {e}")))?
    }

    fn info(&self, name: &str) -> Option<(ArrayInfo, Arc<Service>)> {
        let s = self.service.get()?;
        s.registry().lookup(name).ok().map(|i| (i, s.clone()))
    }
}

#[cfg(test)]
mod tests;
