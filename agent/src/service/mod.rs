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
//!   NBD [`Exports`] of the node): they read what exists; only create and assemble
//!   reserve a name;
//! - **the bitmap slot of a clustered array** comes from its slot lock in the lock
//!   service ([`join`]), held for the whole membership and released at stop;
//! - **events** ([`events`]) for `mdctl monitor`, from the registries' lifecycle events
//!   and the engines' status changes;
//! - handlers run their critical section on a spawned task, so a client that cancels
//!   its call never leaves an array half assembled or half stopped.
//!
//! The registry takes the bitmap slot per registry ([`AssembleOptions::slot`]), so the
//! node keeps one [`Service`] per slot in use (created on first use) and keeps array
//! names unique across them.
//!
//! # Layout
//! - [`grpc`]: the tonic `AgentService` over a [`Node`].
//! - [`join`]: clustered join/leave with slot locks (RFC 0001 "Join", "Leave").
//! - [`message`]: the token lock and the acknowledged message round (sender and
//!   receiver; RFC 0001 "Messages").
//! - [`events`]: the event stream.
//! - [`mdstat_file`]: `<run-dir>/proc/mdstat` kept current for node_exporter.
//! - [`resync`]: one node resyncs at a time (the `resync` lock and RESYNCING windows).
//! - [`runtime`]: cluster-mode `mdagent`: listener, lock-service session, serving.
//! - [`takeover`]: a survivor recovers a failed node's bitmap slot (RFC 0001 "Node
//!   failure and slot recovery").

pub mod events;
pub mod grpc;
pub mod join;
pub mod mdstat_file;
pub mod message;
mod reshape;
pub mod resync;
pub mod runtime;
pub mod takeover;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::lockport::Session;
use mdcluster_proto::status::{errno_from_name, WireError};
use mdcluster_proto::v1 as pb;
use mdcluster_proto::v1::Errno;
use tokio::sync::broadcast;

use crate::array::service::Service;
use crate::array::{valid_name, ArrayInfo, ArrayState, AssembleOptions, Registry, RegistryConfig};
use crate::fence::FenceGate;
use crate::format::create::{BitmapMode, CreateSpec};
use crate::format::io::{read_member, DeviceError, Member};
use crate::mdstat::{self, ArrayStat, BitmapStat, MemberStat, RunState, SyncStat};
use crate::nbd::{ClientInfo, Exports, OpenError, OpenExport, ServerConfig};
use crate::raid::{MemberState, SpeedLimits, WorkerState};

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
    /// The registry template (its `assemble.slot` is set per slot).
    pub registry: RegistryConfig,
    /// NBD server limits.
    pub nbd: ServerConfig,
    /// The NBD TCP address this node serves, if any (shown in status).
    pub nbd_tcp: Option<String>,
    /// How long I/O of a fenced clustered array waits for the session to be renewed
    /// before it fails with EIO ([`crate::fence`]).
    pub suspend_io_timeout: Duration,
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
    /// One standalone service per bitmap slot in use.
    services: Mutex<HashMap<u32, Arc<Service>>>,
    /// Arrays with a create/assemble/stop running, and which.
    busy: Mutex<HashMap<String, &'static str>>,
    meta: Mutex<HashMap<String, Meta>>,
    /// Slot locks held by clustered arrays.
    held: Mutex<HashMap<String, join::Membership>>,
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
    /// Per array, a device another node announced with NEWDISK and this node
    /// confirmed; attached at the METADATA_UPDATED that follows.
    pending_disks: Mutex<HashMap<String, PathBuf>>,
    /// Per array, the bitmap slot of the node that added a member attached here as
    /// recovering: that node recovers it while it lives ([`resync`]).
    remote_recovery: Mutex<HashMap<String, u32>>,
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

fn state_pb(s: ArrayState) -> pb::ArrayRunState {
    match s {
        ArrayState::Assembling => pb::ArrayRunState::Assembling,
        ArrayState::Active => pb::ArrayRunState::Active,
        ArrayState::Stopping => pb::ArrayRunState::Stopping,
    }
}

/// The errno of a device error met while reading members.
fn device_errno(e: &DeviceError) -> Errno {
    match e {
        DeviceError::Open { source, .. } => match source.kind() {
            std::io::ErrorKind::NotFound => Errno::Enoent,
            std::io::ErrorKind::PermissionDenied => Errno::Eperm,
            _ => Errno::Eio,
        },
        DeviceError::InUse { .. } => Errno::Ebusy,
        DeviceError::Duplicate { .. } => Errno::Einval,
        // No superblock, a corrupt one, or a spec the format refuses: the request does
        // not fit the devices.
        DeviceError::Format { .. } => Errno::Einval,
        DeviceError::Io { .. } => Errno::Eio,
        DeviceError::Unresponsive { .. } => Errno::Etimedout,
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
            services: Mutex::new(HashMap::new()),
            busy: Mutex::new(HashMap::new()),
            meta: Mutex::new(HashMap::new()),
            held: Mutex::new(HashMap::new()),
            seen: Mutex::new(HashMap::new()),
            speed: Mutex::new(speed),
            events: broadcast::channel(EVENT_CAPACITY).0,
            recent: Mutex::new(std::collections::VecDeque::with_capacity(RECENT_CAPACITY)),
            session: Mutex::new(None),
            pending_disks: Mutex::new(HashMap::new()),
            remote_recovery: Mutex::new(HashMap::new()),
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

    /// The session that held the slot locks of the clustered arrays joined here is lost
    /// (a replica that reached etcd said its lease is gone, or it stayed suspended
    /// longer than the agent's `--suspend-max`): another node may already hold those
    /// slots. Each such array is fenced for good (no superblock or bitmap write from
    /// now on, its member I/O stopped), its clients are forced off and it is torn
    /// down here without writing metadata and without releasing a lock (they went with
    /// the session). The array list in [`Node::state_path`] is kept, so
    /// [`Node::reassemble_saved`] on a new session assembles them again (a rejoin: the
    /// members are read afresh, a free slot is taken, dirty bits are merged).
    ///
    /// `Err` names the arrays that could not be torn down (their member I/O did not
    /// drain): the caller cannot guarantee the I/O stopped and must end the process
    /// ([`runtime::fence_now`]).
    pub async fn drop_lost_arrays(&self, why: &str) -> Result<Vec<String>, String> {
        let joined = self.memberships();
        let mut dropped = Vec::new();
        let mut stuck = Vec::new();
        for (name, m, _) in joined {
            let Some(service) = self.find(&name) else {
                lock(&self.held).remove(&name);
                continue;
            };
            if let Ok(raid) = service.registry().device(&name) {
                raid.fence();
            }
            tracing::error!(array = %name, slot = m.slot, "session lost ({why}): stopping the array for good without writing metadata");
            let r = service.stop_now(&name).await;
            if service.registry().lookup(&name).is_ok() {
                let e = r.err().map(|e| e.to_string()).unwrap_or_default();
                stuck.push(format!("{name} (slot {}): {e}", m.slot));
                continue;
            }
            lock(&self.held).remove(&name);
            lock(&self.meta).remove(&name);
            self.emit(
                "SlotLost",
                &name,
                "",
                format!(
                    "node {}: the session holding bitmap slot {} of {name} was lost ({why}); the array was stopped here without writing metadata and is assembled again on a new session",
                    self.cfg.node, m.slot
                ),
            );
            dropped.push(name);
        }
        if stuck.is_empty() {
            Ok(dropped)
        } else {
            Err(stuck.join("; "))
        }
    }

    /// The clustered arrays joined here: name, membership, slot count.
    pub fn memberships(&self) -> Vec<(String, join::Membership, u32)> {
        let held = lock(&self.held).clone();
        let meta = lock(&self.meta);
        held.into_iter()
            .map(|(n, m)| {
                let slots = meta.get(&n).map_or(0, |x| x.slots);
                (n, m, slots)
            })
            .collect()
    }

    /// The membership of clustered array `name` here, if joined.
    pub fn membership(&self, name: &str) -> Option<join::Membership> {
        lock(&self.held).get(name).cloned()
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

    /// The file listing the arrays assembled here (`<run-dir>/arrays.json`), read at
    /// start to assemble them again (rejoin after a crash or a self-fence).
    pub fn state_path(&self) -> PathBuf {
        self.cfg.run_dir.join("arrays.json")
    }

    /// Writes the assembled arrays and their members to [`Node::state_path`]
    /// (atomically: temp file + rename).
    fn save_state(&self) {
        let mut arrays = serde_json::Map::new();
        for name in self.names() {
            if let Some((info, _)) = self.info(&name) {
                if let Some(id) = info.identity {
                    arrays.insert(name, serde_json::json!(id.members));
                }
            }
        }
        let path = self.state_path();
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::Value::Object(arrays).to_string();
        if let Err(e) = std::fs::write(&tmp, body).and_then(|()| std::fs::rename(&tmp, &path)) {
            tracing::warn!(path = %path.display(), "saving the assembled arrays: {e}");
        }
    }

    /// Assembles again every array [`Node::state_path`] lists that is not assembled here
    /// (agent start in cluster mode, and a new session after a lost one). Failures are
    /// logged and reported as `RejoinFailed` events.
    pub async fn reassemble_saved(self: &Arc<Self>) {
        let path = self.state_path();
        let Ok(text) = std::fs::read_to_string(&path) else {
            return;
        };
        let saved: std::collections::BTreeMap<String, Vec<PathBuf>> =
            match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(path = %path.display(), "ignoring unreadable array list: {e}");
                    return;
                }
            };
        for (name, members) in saved {
            if self.find(&name).is_some() {
                // Still assembled here (a rejoin after a lost session keeps the arrays
                // that did not depend on it).
                continue;
            }
            // EBUSY can be transient: a survivor holds our old slot for a moment while
            // it recovers it. Retry with backoff for a bounded time.
            let deadline = tokio::time::Instant::now() + REJOIN_RETRY;
            let mut backoff = Duration::from_millis(200);
            loop {
                match self.assemble(&name, members.clone()).await {
                    Ok(_) => {
                        tracing::info!(array = %name, "assembled again at start (rejoined)");
                        break;
                    }
                    Err(e)
                        if e.errno == Errno::Ebusy
                            && tokio::time::Instant::now() + backoff < deadline =>
                    {
                        tracing::info!(array = %name, "rejoin: {e}; retrying in {backoff:?}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                    Err(e) => {
                        tracing::error!(array = %name, "assembling again at start failed: {e}");
                        self.emit("RejoinFailed", &name, "", e.message.clone());
                        break;
                    }
                }
            }
        }
        self.save_state();
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

    /// The service of slot `slot`, created on first use.
    fn service(self: &Arc<Self>, slot: u32) -> Arc<Service> {
        let mut map = lock(&self.services);
        if let Some(s) = map.get(&slot) {
            return s.clone();
        }
        let mut rc = self.cfg.registry.clone();
        rc.assemble = AssembleOptions {
            slot,
            fence: Some(self.fence.clone()),
            ..rc.assemble.clone()
        };
        rc.assemble.speed = *lock(&self.speed);
        let registry = Registry::new(rc);
        events::forward_lifecycle(self.clone(), registry.subscribe());
        let s = Service::new(registry, &self.cfg.run_dir, self.cfg.nbd.clone());
        map.insert(slot, s.clone());
        s
    }

    fn all_services(&self) -> Vec<Arc<Service>> {
        let map = lock(&self.services);
        let mut v: Vec<(u32, Arc<Service>)> = map.iter().map(|(k, s)| (*k, s.clone())).collect();
        v.sort_by_key(|(k, _)| *k);
        v.into_iter().map(|(_, s)| s).collect()
    }

    /// The service whose registry holds `name` (pure lookup).
    fn find(&self, name: &str) -> Option<Arc<Service>> {
        self.all_services()
            .into_iter()
            .find(|s| s.registry().lookup(name).is_ok())
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
            Some(e) => self.err(device_errno(&e), name, e),
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

    /// Writes a new array's members (like `mdadm --create`) and assembles it here.
    pub async fn create(
        self: &Arc<Self>,
        req: pb::CreateArrayRequest,
    ) -> Result<pb::ArrayStatus, WireError> {
        let name = short_name(&req.name).to_owned();
        let guard = self.begin(&name, "create")?;
        let me = self.clone();
        self.detached(&name.clone(), async move {
            let _guard = guard;
            me.create_locked(&name, req).await
        })
        .await
    }

    async fn create_locked(
        self: &Arc<Self>,
        name: &str,
        req: pb::CreateArrayRequest,
    ) -> Result<pb::ArrayStatus, WireError> {
        if let Some(s) = self.find(name) {
            let st = s
                .registry()
                .lookup(name)
                .map(|i| i.state.to_string())
                .unwrap_or_default();
            return Err(self.err(
                Errno::Eexist,
                name,
                format!("array {name} already exists here ({st}); stop it first"),
            ));
        }
        let members: Vec<PathBuf> = req.members.iter().map(PathBuf::from).collect();
        self.check_count(name, members.len())?;
        let resolved = self.check_allowed(name, &members)?;
        let bitmap = match req.bitmap.as_str() {
            "none" => BitmapMode::None,
            "internal" | "" => BitmapMode::Internal,
            "clustered" => BitmapMode::Clustered,
            other => {
                return Err(self.err(
                    Errno::Einval,
                    name,
                    format!("--bitmap {other:?}: use none, internal or clustered"),
                ))
            }
        };
        let mut spec = CreateSpec::new(
            if req.md_name.is_empty() {
                name
            } else {
                &req.md_name
            },
            req.raid_devices,
            req.spare_devices,
            bitmap,
        );
        if req.level != 0 {
            spec.level = req.level;
        }
        if req.nodes != 0 {
            spec.nodes = Some(req.nodes);
        }
        spec.cluster_name = req.cluster_name.clone();
        spec.size_kib = req.size_kib;
        spec.assume_clean = req.assume_clean;
        if req.bitmap_chunk_kib != 0 {
            spec.bitmap_chunk = Some(req.bitmap_chunk_kib.saturating_mul(1024));
        }
        if bitmap == BitmapMode::Clustered && self.session().is_none() {
            return Err(self.err(Errno::Eio, name, "a clustered array needs a session with mdserver, and this agent has none (standalone or disconnected)"));
        }
        // The resolved paths are what gets written (see crate::allow).
        let paths = resolved;
        let force = req.force;
        let written = tokio::task::spawn_blocking(move || {
            crate::format::io::create_members(&spec, &paths, force).map(|_| ())
        })
        .await
        .map_err(|e| self.err(Errno::Eio, name, format!("create task failed: {e}")))?;
        if let Err(e) = written {
            // The error says what to do (DeviceError::InUse carries the hint once).
            return Err(self.err(device_errno(&e), name, format!("create {name}: {e}")));
        }
        self.assemble_locked(name, &members).await
    }

    /// Assembles `name` from `members` here.
    pub async fn assemble(
        self: &Arc<Self>,
        name: &str,
        members: Vec<PathBuf>,
    ) -> Result<pb::ArrayStatus, WireError> {
        let name = short_name(name).to_owned();
        let guard = self.begin(&name, "assemble")?;
        let me = self.clone();
        self.detached(&name.clone(), async move {
            let _guard = guard;
            me.assemble_locked(&name, &members).await
        })
        .await
    }

    /// Assembles `name` from the cluster's record: `recorded` are the paths another
    /// node saw, `uuid` the array UUID. Where a recorded path is not allowed here, does
    /// not exist or holds other data, the members are found by UUID among this node's
    /// `--device-allow` devices ([`crate::array::scan`]).
    pub async fn assemble_recorded(
        self: &Arc<Self>,
        name: &str,
        recorded: Vec<PathBuf>,
        uuid: &str,
    ) -> Result<pb::ArrayStatus, WireError> {
        let members = self.members_here(name, recorded, uuid).await?;
        self.assemble(name, members).await
    }

    /// This node's paths of array `uuid`'s members: `recorded` when each is allowed
    /// here and holds a member of that array, else a scan of the allowed devices.
    async fn members_here(
        &self,
        name: &str,
        recorded: Vec<PathBuf>,
        uuid: &str,
    ) -> Result<Vec<PathBuf>, WireError> {
        let Some(set_uuid) = crate::format::parse_uuid(uuid) else {
            return Err(self.err(
                Errno::Einval,
                name,
                format!(
                    "array UUID {uuid:?} is not of the form xxxxxxxx:xxxxxxxx:xxxxxxxx:xxxxxxxx"
                ),
            ));
        };
        // The record comes from etcd: bounded before each path is probed.
        self.check_count(name, recorded.len())?;
        let allow = self.cfg.registry.device_allow.clone();
        let node = self.cfg.node.clone();
        let found = tokio::task::spawn_blocking(move || {
            let allowed = |p: &Path| allow.check(p).is_ok();
            let fits = recorded.iter().all(|p| {
                allowed(p)
                    && crate::array::scan::read_superblock(p).is_some_and(|sb| sb.set_uuid == set_uuid)
            });
            if fits || allow.allows_any() {
                return Ok(recorded);
            }
            let found = crate::array::scan::find_array(&set_uuid, &allow, &recorded)?;
            tracing::info!(node = %node, recorded = ?recorded, found = ?found, "members found by array UUID");
            let missing = crate::array::scan::missing_active_of(&found);
            if !missing.is_empty() {
                return Err(MembersHere::Missing { found, missing });
            }
            Ok(found)
        })
        .await
        .map_err(|e| self.err(Errno::Eio, name, format!("device scan task failed: {e}")))?;
        found.map_err(|e: MembersHere| {
            self.err(
                e.errno(),
                name,
                format!("assemble {name} from the cluster's record: {e}"),
            )
        })
    }

    async fn assemble_locked(
        self: &Arc<Self>,
        name: &str,
        members: &[PathBuf],
    ) -> Result<pb::ArrayStatus, WireError> {
        if let Some(s) = self.find(name) {
            let st = s
                .registry()
                .lookup(name)
                .map(|i| i.state.to_string())
                .unwrap_or_default();
            return Err(self.err(
                Errno::Eexist,
                name,
                format!("array {name} is already assembled here ({st})"),
            ));
        }
        if members.is_empty() {
            return Err(self.err(Errno::Einval, name, "no member devices given"));
        }
        self.check_count(name, members.len())?;
        self.check_allowed(name, members)?;
        let first = self.read_any(name, members).await?;
        // The same members already assembled under another name (in any slot's
        // registry): EBUSY, before a slot lock is taken for them.
        let claim = self
            .cfg
            .registry
            .claims
            .hold(first.sb.set_uuid, name)
            .map_err(|holder| {
                let e = crate::array::claimed_error(name, &first.sb.set_uuid, &holder);
                self.err(Errno::Ebusy, name, e)
            })?;
        let sb = &first.sb;
        let mut meta = Meta {
            level: sb.level,
            ctime: sb.ctime & 0xff_ffff_ffff,
            events: sb.events,
            utime: sb.utime & 0xff_ffff_ffff,
            ..Meta::default()
        };
        if let Some(b) = first.bitmap.first() {
            meta.bitmap_kind = Some(if b.sb.is_clustered() {
                "clustered"
            } else {
                "internal"
            });
            meta.slots = b.sb.slots();
            meta.chunk_bytes = u64::from(b.sb.chunksize);
            meta.chunks = b.sb.chunks();
            meta.cluster_name = b.sb.cluster_name.clone();
        }
        let clustered = meta.bitmap_kind == Some("clustered");
        let membership = if clustered {
            let Some(session) = self.session() else {
                return Err(self.err(Errno::Eio, name, "a clustered array needs a session with mdserver, and this agent has none; check that mdserver is reachable"));
            };
            let fence = self.fence.ticket();
            let m = join::join(&session, name, &self.cfg.node, members, &first, fence)
                .await
                .map_err(|e| e.context(&format!("node {}: join {name}", self.cfg.node)))?;
            Some((m, session.id()))
        } else {
            None
        };
        meta.slot = membership.as_ref().map_or(0, |(m, _)| m.slot);
        let service = self.service(meta.slot);
        lock(&self.meta).insert(name.to_owned(), meta.clone());
        match service.assemble(name, members).await {
            Ok(_) => {
                if let Some((m, joined_on)) = membership {
                    let uuid = m.uuid;
                    let window = m.remote_window;
                    let slot = m.slot;
                    if !self.hold_if_session(name, m, joined_on) {
                        return Err(self.undo_lost_assemble(&service, name, slot).await);
                    }
                    if let Some((raid, paths)) = self.raid_of(name) {
                        if let Some((lo, hi)) = window {
                            // Just assembled: no write of this node is in flight yet.
                            if let Err(e) = raid
                                .set_remote_resync_window(Some((lo * 512, hi * 512)))
                                .await
                            {
                                tracing::warn!("{e}");
                            }
                        }
                        raid.set_sync_gate(Some(Arc::new(resync::ClusterGate::new(
                            self, name, uuid, paths,
                        ))));
                        raid.set_meta_gate(Some(Arc::new(message::MetaRound::new(self, name))));
                    }
                }
                // The registry's entry holds the claim until the array stops.
                claim.keep();
                let speed = *lock(&self.speed);
                let _ = service.registry().set_speed(name, speed);
                self.save_state();
                self.get(name)
            }
            Err(e) => {
                lock(&self.meta).remove(name);
                if let (Some((m, joined_on)), Some(session)) = (membership, self.session()) {
                    // The slot lock went with a lost session: nothing to release.
                    if session.id() == joined_on {
                        join::leave(&session, m, false).await;
                    }
                }
                Err(self.err(errno_from_name(e.errno()), name, e))
            }
        }
    }

    /// Records `name` as joined with membership `m` if the session its slot lock was
    /// taken on (`joined_on`) is still the node's, unexpired — checked before and after
    /// the record. The session keeper clears the session before it checks the joined
    /// arrays for self-fencing, so an array is either seen by that check (and the node
    /// fences itself) or refused here: never left running without its slot lock.
    fn hold_if_session(&self, name: &str, m: join::Membership, joined_on: i64) -> bool {
        let alive = || {
            self.session().is_some_and(|s| {
                s.id() == joined_on && tokio::time::Instant::now() < s.fence_deadline()
            })
        };
        if !alive() {
            return false;
        }
        lock(&self.held).insert(name.to_owned(), m);
        if alive() {
            return true;
        }
        lock(&self.held).remove(name);
        false
    }

    /// The session that held `name`'s slot lock was lost while the engine started: the
    /// engine is fenced first (no superblock or bitmap write from then on: a survivor
    /// may already be taking the slot over), then stopped with clients forced off. If
    /// it cannot be stopped, the engine would run on unseen by the fencing watchdog
    /// (the array was never recorded as joined): the node fences itself (exit).
    async fn undo_lost_assemble(&self, service: &Service, name: &str, slot: u32) -> WireError {
        tracing::error!(array = %name, slot, "session lost during assemble; stopping the array again without writing metadata");
        if let Some((raid, _)) = self.raid_of(name) {
            raid.fence();
        }
        let stopped = service.stop(name, true).await;
        if let Err(e) = &stopped {
            if service.registry().lookup(name).is_ok() {
                runtime::fence_now(
                    self,
                    &format!("{name} (slot {slot})"),
                    &format!("the session holding the slot lock was lost during the assemble and the array could not be stopped ({e})"),
                );
            }
        }
        lock(&self.meta).remove(name);
        let left = match stopped {
            Ok(_) => "it was stopped again without writing metadata".to_owned(),
            Err(e) => format!("it is gone, its stop reported: {e}"),
        };
        self.err(
            Errno::Eio,
            name,
            format!(
                "assemble {name}: the session with mdserver was lost after bitmap slot {slot} was taken, so the slot lock is gone; {left}; assemble again once the node's session is back"
            ),
        )
    }

    /// Stops `name` here (`docs/LIFECYCLE.md` §2 rule 4), then leaves the cluster for it.
    pub async fn stop(self: &Arc<Self>, name: &str, force: bool) -> Result<(), WireError> {
        let name = short_name(name).to_owned();
        let guard = self.begin(&name, "stop")?;
        let me = self.clone();
        self.detached(&name.clone(), async move {
            let _guard = guard;
            me.stop_locked(&name, force).await
        })
        .await
    }

    async fn stop_locked(self: &Arc<Self>, name: &str, force: bool) -> Result<(), WireError> {
        let Some(service) = self.find(name) else {
            return Err(self.err(
                Errno::Enoent,
                name,
                format!("no array named {name} on this node"),
            ));
        };
        let members: Vec<PathBuf> = service
            .registry()
            .lookup(name)
            .ok()
            .and_then(|i| i.identity)
            .map(|id| id.members)
            .unwrap_or_default();
        // A last look, so a sync that ended just before the stop is still reported.
        self.observe(name);
        let r = service.stop(name, force).await;
        if service.registry().lookup(name).is_err() {
            lock(&self.meta).remove(name);
            self.save_state();
            let held = lock(&self.held).remove(name);
            if let (Some(m), Some(session)) = (held, self.session()) {
                // Whether our slot is still dirty on disk after the engine's stop.
                let slot = m.slot;
                let dirty = tokio::task::spawn_blocking(move || {
                    members
                        .iter()
                        .filter_map(|p| read_member(p).ok())
                        .any(|mm| {
                            mm.bitmap.get(slot as usize).is_some_and(|s| {
                                crate::format::bitmap::count_set(&s.bits, s.sb.chunks()) > 0
                            })
                        })
                })
                .await
                .unwrap_or(true);
                join::leave(&session, m, dirty).await;
            }
        }
        r.map(|_| ())
            .map_err(|e| self.err(errno_from_name(e.errno()), name, e))
    }

    /// Stops every array (agent shutdown), forcing clients off, and leaves the cluster
    /// for each. The array list is kept: a restarted agent assembles them again.
    pub async fn shutdown(self: &Arc<Self>) {
        let saved = std::fs::read(self.state_path()).ok();
        for name in self.names() {
            if let Err(e) = self.stop(&name, true).await {
                tracing::error!(array = %name, "failed to stop at shutdown: {e}");
            }
        }
        for s in self.all_services() {
            s.shutdown().await;
        }
        if let Some(saved) = saved {
            if let Err(e) = std::fs::write(self.state_path(), saved) {
                tracing::warn!("restoring the array list: {e}");
            }
        }
    }

    /// Member operations on `name`, in order (`mdctl manage`, like `mdadm --manage`).
    /// On a clustered array each change goes through the token lock and an
    /// acknowledged METADATA_UPDATED ([`message::round`]); the first failing operation
    /// ends the request (the earlier ones stay applied) with an error naming it.
    pub async fn manage(
        self: &Arc<Self>,
        name: &str,
        ops: Vec<pb::ManageOp>,
    ) -> Result<pb::ArrayStatus, WireError> {
        let name = short_name(name).to_owned();
        if ops.is_empty() {
            return Err(self.err(
                Errno::Einval,
                &name,
                "manage: give at least one of --fail/--remove/--add/--add-spare/--re-add",
            ));
        }
        let guard = self.begin(&name, "manage")?;
        let me = self.clone();
        self.detached(&name.clone(), async move {
            let _guard = guard;
            for (i, op) in ops.iter().enumerate() {
                me.manage_one(&name, op).await.map_err(|e| {
                    if i > 0 {
                        e.context(&format!(
                            "operations before {} {} were applied",
                            op.action, op.device
                        ))
                    } else {
                        e
                    }
                })?;
            }
            me.get(&name)
        })
        .await
    }

    async fn manage_one(self: &Arc<Self>, name: &str, op: &pb::ManageOp) -> Result<(), WireError> {
        let Some((info, service)) = self.info(name) else {
            return Err(self.err(
                Errno::Enoent,
                name,
                format!("no array named {name} on this node"),
            ));
        };
        let dev = PathBuf::from(&op.device);
        let kind = match op.action.as_str() {
            "fail" => crate::cluster::MsgType::MetadataUpdated,
            "remove" => crate::cluster::MsgType::Remove,
            "add" | "add-spare" | "re-add" => return self.manage_add(name, op).await,
            other => {
                return Err(self.err(
                    Errno::Einval,
                    name,
                    format!("manage: unknown operation {other:?}: use fail, remove, add, add-spare or re-add"),
                ))
            }
        };
        let Some(raid) = info.raid.as_ref() else {
            return Err(self.err(
                Errno::Ebusy,
                name,
                format!("array {name} is {}, not active", info.state),
            ));
        };
        let Some(member) = raid
            .members
            .iter()
            .find(|m| Path::new(&m.path) == dev && !m.removed)
        else {
            return Err(self.err(
                Errno::Enoent,
                name,
                format!("{} is not a member of {name} here", op.device),
            ));
        };
        let dev_number = member.dev_number;
        let registry = service.registry().clone();
        let clustered = lock(&self.meta)
            .get(name)
            .is_some_and(|m| m.bitmap_kind == Some("clustered"));
        let membership = lock(&self.held).get(name).cloned();
        let change = {
            let name = name.to_owned();
            let dev = dev.clone();
            let me = self.clone();
            async move {
                // The re-check under the token.
                let state = me.info(&name).and_then(|(i, _)| i.raid).and_then(|r| {
                    r.members
                        .iter()
                        .find(|m| Path::new(&m.path) == dev && !m.removed)
                        .map(|m| m.state)
                });
                let Some(state) = state else {
                    return Ok(message::Change::Unchanged);
                };
                if kind == crate::cluster::MsgType::Remove {
                    let done = registry
                        .remove_member(&name, &dev)
                        .await
                        .map_err(|e| me.err(errno_from_name(e.errno()), &name, e))?;
                    if !done {
                        return Err(me.err(
                            Errno::Ebusy,
                            &name,
                            format!("{} is active in {name} ({state:?}): fail it first (--fail {} --remove {})", dev.display(), dev.display(), dev.display()),
                        ));
                    }
                    return Ok(message::Change::Applied);
                }
                if state == MemberState::Faulty {
                    return Ok(message::Change::Unchanged);
                }
                registry
                    .fail_member(&name, &dev)
                    .await
                    .map_err(|e| me.err(errno_from_name(e.errno()), &name, e))?;
                let now_faulty = me.info(&name).and_then(|(i, _)| i.raid).is_some_and(|r| {
                    r.members.iter().any(|m| {
                        Path::new(&m.path) == dev && !m.removed && m.state == MemberState::Faulty
                    })
                });
                if !now_faulty {
                    return Err(me.err(
                        Errno::Ebusy,
                        &name,
                        format!(
                            "{} is the last in-sync member of {name}: not failing it",
                            dev.display()
                        ),
                    ));
                }
                Ok(message::Change::Applied)
            }
        };
        if !clustered {
            change.await?;
            return Ok(());
        }
        let (Some(m), Some(session)) = (membership, self.session()) else {
            return Err(self.err(
                Errno::Eio,
                name,
                "a clustered array needs a session with mdserver and a bitmap slot; this node has none",
            ));
        };
        let mut msg = crate::cluster::ClusterMsg::new(kind, m.slot);
        msg.raid_slot = dev_number;
        let array = name.to_owned();
        let device = op.device.clone();
        let action = op.action.clone();
        message::round(
            message::Target {
                session: &session,
                node: &self.cfg.node,
                array: name,
                uuid: &m.uuid,
            },
            msg,
            message::ROUND_DEADLINE,
            change,
            async move {
                // A failed or removed member cannot be taken back without a recovery;
                // the nodes that refused keep their view until their next message.
                tracing::error!(array = %array, member = %device, action = %action, "not acknowledged by every node; it stays applied here");
            },
        )
        .await?;
        Ok(())
    }

    /// `mdctl grow ARRAY [--raid-devices N] [--add DEV]... [--size KIB|max]
    /// [--bitmap none|internal|clustered]` (RAID1, like `mdadm --grow`), in that order:
    /// the devices are added first (NEWDISK, as `manage --add`), then the number of
    /// roles grows under the token with METADATA_UPDATED (spares take the new roles and
    /// one node recovers them; shrinking is refused), then the size changes
    /// ([`Node::grow_size`]), then the bitmap ([`Node::grow_bitmap`]).
    pub async fn grow(
        self: &Arc<Self>,
        req: pb::GrowRequest,
    ) -> Result<pb::ArrayStatus, WireError> {
        let pb::GrowRequest {
            name,
            raid_devices,
            add,
            size,
            bitmap,
            nodes,
            cluster_name,
        } = req;
        let name = short_name(&name).to_owned();
        if raid_devices == 0 && add.is_empty() && size.is_empty() && bitmap.is_empty() {
            return Err(self.err(
                Errno::Einval,
                &name,
                "grow: nothing to change; give --raid-devices, --add, --size or --bitmap",
            ));
        }
        let guard = self.begin(&name, "grow")?;
        let me = self.clone();
        self.detached(&name.clone(), async move {
            let _guard = guard;
            for d in &add {
                let op = pb::ManageOp {
                    action: "add".into(),
                    device: d.clone(),
                };
                me.manage_add(&name, &op).await?;
            }
            if raid_devices != 0 {
                me.grow_roles(&name, raid_devices).await.map_err(|e| {
                    if add.is_empty() {
                        e
                    } else {
                        e.context(&format!("{} added", add.join(", ")))
                    }
                })?;
            }
            if !size.is_empty() {
                me.grow_size(&name, &size).await?;
            }
            if !bitmap.is_empty() {
                me.grow_bitmap(&name, &bitmap, nodes, &cluster_name).await?;
            }
            me.get(&name)
        })
        .await
    }

    async fn grow_roles(self: &Arc<Self>, name: &str, n: u32) -> Result<(), WireError> {
        let Some((raid, _)) = self.raid_of(name) else {
            return Err(self.err(
                Errno::Enoent,
                name,
                format!("no active array named {name} on this node"),
            ));
        };
        let cur = raid.raid_disks();
        if n < cur {
            return Err(self.err(
                Errno::Einval,
                name,
                format!("--raid-devices {n}: {name} has {cur}; shrinking is not supported"),
            ));
        }
        let change = {
            let raid = raid.clone();
            let me = self.clone();
            let name = name.to_owned();
            async move {
                match raid.grow_raid_disks(n).await {
                    Ok(true) => Ok(message::Change::Applied),
                    Ok(false) => Ok(message::Change::Unchanged),
                    Err(e) => Err(me.err(Errno::Eio, &name, e)),
                }
            }
        };
        let clustered = lock(&self.meta)
            .get(name)
            .is_some_and(|m| m.bitmap_kind == Some("clustered"));
        if !clustered {
            change.await?;
            return Ok(());
        }
        let (Some(m), Some(session)) = (lock(&self.held).get(name).cloned(), self.session()) else {
            return Err(self.err(
                Errno::Eio,
                name,
                "a clustered array needs a session with mdserver and a bitmap slot; this node has none",
            ));
        };
        let msg = crate::cluster::ClusterMsg::new(crate::cluster::MsgType::MetadataUpdated, m.slot);
        let array = name.to_owned();
        message::round(
            message::Target {
                session: &session,
                node: &self.cfg.node,
                array: name,
                uuid: &m.uuid,
            },
            msg,
            message::ROUND_DEADLINE,
            change,
            async move {
                tracing::error!(array = %array, raid_disks = n, "grow not acknowledged by every node; it stays applied here");
            },
        )
        .await?;
        Ok(())
    }

    /// The identity every node confirms a device to be added by (NEWDISK carries its
    /// device UUID): a device that already holds a superblock of array `name` keeps
    /// its own; a device without a valid superblock gets one now — the array's, copied
    /// from a live member, with a free device number, a new device UUID and no role
    /// (a spare until the add gives it one). Runs under the token.
    async fn identify_new_device(
        &self,
        name: &str,
        dev: &Path,
        members: &[crate::raid::MemberStatus],
    ) -> Result<NewDevice, WireError> {
        let template_from: Vec<PathBuf> = members
            .iter()
            .filter(|m| !m.removed && m.state == MemberState::InSync)
            .map(|m| PathBuf::from(&m.path))
            .collect();
        let used: Vec<u32> = members.iter().map(|m| m.dev_number).collect();
        let uuid_here = self
            .info(name)
            .and_then(|(i, _)| i.identity)
            .map(|i| i.uuid)
            .unwrap_or_default();
        let dev = dev.to_owned();
        // Written under the array's ticket: a fenced node stamps nothing.
        let fence = self.raid_of(name).and_then(|(r, _)| r.fence_ticket());
        let r = tokio::task::spawn_blocking(move || {
            stamp_new_device(&dev, &uuid_here, &template_from, &used, fence)
        })
        .await
        .map_err(|e| {
            self.err(
                Errno::Eio,
                name,
                format!("device identity task failed: {e}"),
            )
        })?;
        r.map_err(|(errno, msg)| self.err(errno, name, msg))
    }

    /// `--add`, `--add-spare`, `--re-add DEV` (md-cluster `add_new_disk`): under the
    /// token, the device path goes into the token's value block and NEWDISK asks every
    /// joined node to confirm it (one refusal rejects the disk, nothing written); then
    /// the device is added here (superblock written; a free role starts a recovery,
    /// which the `resync` lock gives to exactly one node) and METADATA_UPDATED makes
    /// every node attach it.
    async fn manage_add(self: &Arc<Self>, name: &str, op: &pb::ManageOp) -> Result<(), WireError> {
        let Some((info, service)) = self.info(name) else {
            return Err(self.err(
                Errno::Enoent,
                name,
                format!("no array named {name} on this node"),
            ));
        };
        let dev = PathBuf::from(&op.device);
        self.check_allowed(name, std::slice::from_ref(&dev))?;
        let Some(raid) = info.raid.as_ref() else {
            return Err(self.err(
                Errno::Ebusy,
                name,
                format!("array {name} is {}, not active", info.state),
            ));
        };
        if raid
            .members
            .iter()
            .any(|m| !m.removed && m.state != MemberState::Faulty && Path::new(&m.path) == dev)
        {
            return Err(self.err(
                Errno::Ebusy,
                name,
                format!("{} is already a member of {name}", op.device),
            ));
        }
        let uuid_here = info
            .identity
            .as_ref()
            .map(|i| i.uuid.clone())
            .unwrap_or_default();
        let mut former_dev = None;
        if op.action == "re-add" {
            let p = dev.clone();
            let sb = tokio::task::spawn_blocking(move || read_member(&p).map(|m| m.sb))
                .await
                .map_err(|e| self.err(Errno::Eio, name, format!("read task failed: {e}")))?;
            former_dev = sb
                .ok()
                .filter(|sb| crate::format::fmt_uuid(&sb.set_uuid) == uuid_here)
                .map(|sb| sb.dev_number);
            if former_dev.is_none() {
                return Err(self.err(
                    Errno::Einval,
                    name,
                    format!(
                        "--re-add {}: it is not a former member of {name}; use --add",
                        op.device
                    ),
                ));
            }
        }
        let how = if op.action == "add-spare" {
            crate::array::AddHow::Spare
        } else {
            crate::array::AddHow::Add
        };
        let registry = service.registry().clone();
        let clustered = lock(&self.meta)
            .get(name)
            .is_some_and(|m| m.bitmap_kind == Some("clustered"));
        if !clustered {
            registry
                .add_member_with(name, &dev, how)
                .await
                .map_err(|e| self.err(errno_from_name(e.errno()), name, e))?;
            return Ok(());
        }
        let (Some(m), Some(session)) = (lock(&self.held).get(name).cloned(), self.session()) else {
            return Err(self.err(
                Errno::Eio,
                name,
                "a clustered array needs a session with mdserver and a bitmap slot; this node has none",
            ));
        };
        let to = message::Target {
            session: &session,
            node: &self.cfg.node,
            array: name,
            uuid: &m.uuid,
        };
        let end = tokio::time::Instant::now() + message::ROUND_DEADLINE;
        let hold = message::take_token(to, message::ROUND_DEADLINE).await?;
        let token = hold.token;
        let out = crate::raid::under_token(async {
            // Every node finds the device by its device UUID (each may see it under
            // another path): a device new to the array gets its superblock first, as
            // mdadm writes it before md's NEWDISK.
            let ident = self.identify_new_device(name, &dev, &raid.members).await?;
            session
                .write_value(&crate::cluster::token_lock(&m.uuid), token, op.device.as_bytes())
                .await
                .map_err(|e| self.err(Errno::Eio, name, format!("writing the new device's path into the token value: {e}")))?;
            let mut newdisk = crate::cluster::ClusterMsg::new(crate::cluster::MsgType::Newdisk, m.slot);
            newdisk.uuid = ident.device_uuid;
            newdisk.raid_slot = ident.dev_number;
            if let Err(e) = message::publish_acked(to, newdisk, message::left(end)).await {
                let undo = if ident.stamped {
                    let p = dev.clone();
                    match tokio::task::spawn_blocking(move || crate::format::io::zero_superblock(&p, true)).await {
                        Ok(Ok(())) => "nothing was left on it".to_owned(),
                        Ok(Err(z)) => format!("its new superblock could not be erased: {z}"),
                        Err(z) => format!("its new superblock could not be erased: {z}"),
                    }
                } else {
                    "nothing was written".to_owned()
                };
                return Err(e.context(&format!("device {} (device UUID {}) rejected ({undo})", op.device, crate::format::fmt_uuid(&ident.device_uuid))));
            }
            if let Some(dev_number) = former_dev {
                // md-cluster's re-add: RE_ADD, then gather every other node's bits (what
                // they wrote while the member was out) so the recovery copies them too.
                let mut readd = crate::cluster::ClusterMsg::new(crate::cluster::MsgType::ReAdd, m.slot);
                readd.raid_slot = dev_number;
                message::publish_acked(to, readd, message::left(end))
                    .await
                    .map_err(|e| e.context(&format!("re-add of {} refused (nothing was written)", op.device)))?;
                let slots = lock(&self.meta).get(name).map_or(0, |x| x.slots);
                let Some((engine, members)) = self.raid_of(name) else {
                    return Err(self.err(Errno::Enoent, name, format!("array {name} is no longer active here")));
                };
                let marked = takeover::gather_slots(name, &engine, &members, m.slot, slots)
                    .await
                    .map_err(|e| self.err(Errno::Eio, name, format!("gathering the other nodes' bitmaps for the re-add: {e}")))?;
                tracing::info!(array = %name, device = %op.device, chunks = marked, "re-add: other slots' chunks marked for recovery");
            }
            let added = registry
                .add_member_with(name, &dev, how)
                .await
                .map_err(|e| self.err(errno_from_name(e.errno()), name, e))?;
            let dev_number = self
                .info(name)
                .and_then(|(i, _)| i.raid)
                .and_then(|r| r.members.get(added.index).map(|x| x.dev_number))
                .unwrap_or(0);
            let p = dev.clone();
            let device_uuid = tokio::task::spawn_blocking(move || read_member(&p).map(|m| m.sb.device_uuid))
                .await
                .ok()
                .and_then(Result::ok)
                .unwrap_or([0xff; 16]);
            let mut msg = crate::cluster::ClusterMsg::new(crate::cluster::MsgType::MetadataUpdated, m.slot);
            msg.raid_slot = dev_number;
            // Nonzero: this METADATA_UPDATED announces the device NEWDISK confirmed.
            msg.uuid = device_uuid;
            message::publish_acked(to, msg, message::left(end))
                .await
                .map_err(|e| e.context(&format!("{} was added on node {} but not attached on every node; stop and assemble the array there", op.device, self.cfg.node)))?;
            if former_dev.is_some() {
                // Every node writes to the member now; what they wrote between the first
                // gather and attaching it is only in their slots: gather again (the
                // recovery copies it, or a resync right after it).
                if let Some((engine, members)) = self.raid_of(name) {
                    let slots = lock(&self.meta).get(name).map_or(0, |x| x.slots);
                    match takeover::gather_slots(name, &engine, &members, m.slot, slots).await {
                        Ok(n) => {
                            // Marked before the token is released: the recovery, which
                            // needs the token to start, plans with them.
                            tracing::info!(array = %name, device = %op.device, chunks = n, "re-add: gathered again after attach");
                        }
                        Err(e) => tracing::error!(array = %name, "re-add: second gather: {e}"),
                    }
                }
            }
            Ok(())
        })
        .await;
        message::release_token(to, hold).await;
        out
    }

    /// Every array name here, in any state.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .all_services()
            .iter()
            .flat_map(|s| s.registry().names())
            .collect();
        v.sort();
        v
    }

    fn info(&self, name: &str) -> Option<(ArrayInfo, Arc<Service>)> {
        self.all_services()
            .into_iter()
            .find_map(|s| s.registry().lookup(name).ok().map(|i| (i, s)))
    }

    /// The status of `name` here (pure lookup).
    pub fn get(&self, name: &str) -> Result<pb::ArrayStatus, WireError> {
        let name = short_name(name);
        match self.info(name) {
            Some((info, service)) => Ok(self.status_of(&info, &service.socket_path(name))),
            None => Err(self.err(
                Errno::Enoent,
                name,
                format!("no array named {name} on this node"),
            )),
        }
    }

    /// Every array here.
    pub fn list(&self) -> Vec<pb::ArrayStatus> {
        self.names()
            .iter()
            .filter_map(|n| self.get(n).ok())
            .collect()
    }

    /// This node's `/proc/mdstat` (active and stopping arrays).
    pub fn mdstat(&self) -> String {
        let stats: Vec<ArrayStat> = self
            .names()
            .iter()
            .filter_map(|n| self.info(n))
            .filter_map(|(i, _)| self.stat_of(&i))
            .collect();
        mdstat::render(&stats)
    }

    /// Sets the speed limits of `name`, or of every array and the default when `name`
    /// is empty.
    pub fn set_speed(
        self: &Arc<Self>,
        name: &str,
        limits: SpeedLimits,
    ) -> Result<Vec<String>, WireError> {
        let name = short_name(name);
        if limits.min_kib_s == 0 || limits.min_kib_s > limits.max_kib_s {
            return Err(self.err(
                Errno::Einval,
                name,
                format!(
                    "speed limits min {} max {} KiB/s: need 0 < min <= max",
                    limits.min_kib_s, limits.max_kib_s
                ),
            ));
        }
        let names = if name.is_empty() {
            *lock(&self.speed) = limits;
            self.names()
        } else {
            vec![name.to_owned()]
        };
        let mut changed = Vec::new();
        for n in names {
            let Some((_, s)) = self.info(&n) else {
                if !name.is_empty() {
                    return Err(self.err(
                        Errno::Enoent,
                        &n,
                        format!("no array named {n} on this node"),
                    ));
                }
                continue;
            };
            match s.registry().set_speed(&n, limits) {
                Ok(()) => changed.push(n),
                Err(e) if name.is_empty() => tracing::debug!(array = %n, "speed not set: {e}"),
                Err(e) => return Err(self.err(errno_from_name(e.errno()), &n, e)),
            }
        }
        Ok(changed)
    }

    fn status_of(&self, info: &ArrayInfo, socket: &Path) -> pb::ArrayStatus {
        let meta = lock(&self.meta)
            .get(&info.name)
            .cloned()
            .unwrap_or_default();
        let mut st = pb::ArrayStatus {
            name: info.name.clone(),
            node: self.cfg.node.clone(),
            state: state_pb(info.state) as i32,
            uuid: info
                .identity
                .as_ref()
                .map(|i| i.uuid.clone())
                .unwrap_or_default(),
            md_name: info
                .identity
                .as_ref()
                .map(|i| i.md_name.clone())
                .unwrap_or_default(),
            level: meta.level,
            clients: info.clients.clone(),
            nbd_socket: socket.display().to_string(),
            nbd_tcp: self.cfg.nbd_tcp.clone().unwrap_or_default(),
            ctime_secs: meta.ctime,
            events: info.sb_events.map_or(meta.events, |e| e.0),
            utime_secs: info.sb_events.map_or(meta.utime, |e| e.1 & 0xff_ffff_ffff),
            cluster_name: meta.cluster_name.clone(),
            ..Default::default()
        };
        let pr = lock(&self.held).get(&info.name).map(|m| m.pr.clone());
        if let Some(r) = &info.raid {
            st.raid_disks = r.raid_disks;
            st.size_bytes = r.size;
            st.degraded = r.degraded;
            st.members = r
                .members
                .iter()
                .filter(|m| !m.removed)
                .map(|m| {
                    let (state, off) = match m.state {
                        MemberState::InSync => ("in_sync", 0),
                        MemberState::Recovering { offset, .. } => ("recovering", offset),
                        MemberState::Spare => ("spare", 0),
                        MemberState::Faulty => ("faulty", 0),
                    };
                    pb::MemberInfo {
                        path: m.path.clone(),
                        dev_number: m.dev_number,
                        role: m.role.map(u32::from),
                        state: state.to_owned(),
                        recovery_offset: off,
                        fenced_by: pr
                            .as_ref()
                            .map_or("", |pr| pr.fenced_by(Path::new(&m.path)))
                            .to_owned(),
                    }
                })
                .collect();
            let s = &r.sync;
            st.sync = Some(pb::SyncInfo {
                kind: s
                    .kind
                    .map(|k| format!("{k:?}").to_lowercase())
                    .unwrap_or_default(),
                state: format!("{:?}", s.state).to_lowercase(),
                done_bytes: s.done_bytes,
                total_bytes: s.total_bytes,
                rate_kib_s: s.rate_kib_s,
                chunks_done: s.chunks_done,
                chunks_total: s.chunks_total,
                speed_min_kib_s: s.speed.min_kib_s,
                speed_max_kib_s: s.speed.max_kib_s,
                errors: s.errors,
                last_kind: s
                    .completed
                    .last()
                    .map(|c| format!("{:?}", c.kind).to_lowercase())
                    .unwrap_or_default(),
                last_chunks: s.completed.last().map_or(0, |c| c.chunks),
                last_interrupted: s.completed.last().is_some_and(|c| c.interrupted),
                runs: s.completed.len() as u64,
            });
            if let (Some(b), Some(kind)) = (&r.bitmap, meta.bitmap_kind) {
                st.bitmap = Some(pb::BitmapInfo {
                    kind: kind.to_owned(),
                    chunks: meta.chunks,
                    chunk_bytes: meta.chunk_bytes,
                    dirty_bits: b.dirty_bits,
                    needed: b.needed,
                    slot: meta.slot,
                    slots: meta.slots,
                });
            }
        }
        st
    }

    fn stat_of(&self, info: &ArrayInfo) -> Option<ArrayStat> {
        let r = info.raid.as_ref()?;
        let meta = lock(&self.meta)
            .get(&info.name)
            .cloned()
            .unwrap_or_default();
        let members = r
            .members
            .iter()
            .filter(|m| !m.removed)
            .map(|m| MemberStat {
                name: Path::new(&m.path)
                    .file_name()
                    .map_or_else(|| m.path.clone(), |f| f.to_string_lossy().into_owned()),
                desc_nr: m.dev_number,
                slot: match m.state {
                    MemberState::Spare | MemberState::Faulty => None,
                    _ => m.role.map(u32::from),
                },
                in_sync: matches!(m.state, MemberState::InSync),
                faulty: matches!(m.state, MemberState::Faulty),
            })
            .collect();
        let sync = match (r.sync.kind, r.sync.state) {
            (Some(kind), WorkerState::Busy | WorkerState::Throttled) => Some(SyncStat::Running {
                kind: match kind {
                    crate::raid::SyncKind::Resync => mdstat::SyncKind::Resync,
                    crate::raid::SyncKind::Recovery => mdstat::SyncKind::Recovery,
                },
                done_kib: r.sync.done_bytes / 1024,
                total_kib: r.sync.total_bytes / 1024,
                speed_kib: r.sync.rate_kib_s,
            }),
            _ => None,
        };
        // Cluster states: waiting for the resync lock, or another node's window.
        let sync = match (sync, self.raid_of(&info.name).map(|(r, _)| r)) {
            (None, Some(raid)) if raid.sync_pending() => Some(SyncStat::Pending),
            (None, Some(raid)) if raid.remote_resync_window().is_some() => {
                Some(SyncStat::Remote(mdstat::SyncKind::Resync))
            }
            (s, _) => s,
        };
        Some(ArrayStat {
            name: info.name.clone(),
            run_state: RunState::Active,
            level: if meta.level == 0 { 1 } else { meta.level },
            members,
            blocks_kib: r.size / 1024,
            metadata: "1.2".to_owned(),
            raid_disks: r.raid_disks,
            sync,
            bitmap: meta.bitmap_kind.map(|_| BitmapStat {
                chunks: meta.chunks,
                chunk_bytes: meta.chunk_bytes,
            }),
        })
    }
}

impl Exports for Node {
    fn list(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .all_services()
            .iter()
            .flat_map(|s| s.registry().list())
            .collect();
        v.sort();
        v
    }

    fn open(&self, name: &str, client: &ClientInfo) -> Result<OpenExport, OpenError> {
        match self.find(name) {
            Some(s) => Exports::open(&**s.registry(), name, client),
            None => Err(OpenError::NotFound {
                name: name.to_owned(),
            }),
        }
    }
}

#[cfg(test)]
mod tests;

/// A device about to be added, as NEWDISK names it.
#[derive(Debug, Clone, Copy)]
struct NewDevice {
    device_uuid: [u8; 16],
    dev_number: u32,
    /// Its superblock was written just now (erased again when the add is rejected).
    stamped: bool,
}

/// See [`Node::identify_new_device`] (blocking part). `uuid_here` is the array UUID
/// as text, `template_from` the live members to copy the superblock from, `used` the
/// device numbers the array knows; `fence` gates the superblock write.
fn stamp_new_device(
    dev: &Path,
    uuid_here: &str,
    template_from: &[PathBuf],
    used: &[u32],
    fence: Option<crate::fence::FenceTicket>,
) -> Result<NewDevice, (Errno, String)> {
    use crate::format::superblock::{feature, DevRole, MAX_DEV_LIMIT};
    if let Some(sb) = crate::array::scan::read_superblock(dev) {
        if crate::format::fmt_uuid(&sb.set_uuid) == uuid_here {
            return Ok(NewDevice {
                device_uuid: sb.device_uuid,
                dev_number: sb.dev_number,
                stamped: false,
            });
        }
        return Err((
            Errno::Ebusy,
            format!(
                "{} holds a member of another array ({}); zero it first (mdctl zero-superblock) if it is no longer used",
                dev.display(),
                crate::format::fmt_uuid(&sb.set_uuid)
            ),
        ));
    }
    let template = template_from
        .iter()
        .find_map(|p| read_member(p).ok().map(|m| m.sb))
        .ok_or_else(|| {
            (
                Errno::Eio,
                "no live member's superblock could be read to copy for the new device".to_owned(),
            )
        })?;
    let dev_number = (0..MAX_DEV_LIMIT)
        .find(|d| !used.contains(d) && template.role_of(*d) == DevRole::Spare)
        .ok_or_else(|| (Errno::Einval, "no free device number".to_owned()))?;
    let file = crate::format::io::MetaDev::open_fenced(dev, true, fence)
        .map_err(|e| (Errno::Eio, e.to_string()))?;
    let bytes = file.size();
    let mut sb = template.clone();
    sb.dev_number = dev_number;
    sb.device_uuid = *uuid::Uuid::new_v4().as_bytes();
    sb.data_size = (bytes / 512).saturating_sub(sb.data_offset);
    sb.feature_map &= !feature::RECOVERY_OFFSET;
    sb.recovery_offset = 0;
    if sb.data_size < sb.size {
        return Err((
            Errno::Einval,
            format!("{} is too small for the array", dev.display()),
        ));
    }
    crate::format::io::write_superblock(&file, &sb).map_err(|e| (Errno::Eio, e.to_string()))?;
    Ok(NewDevice {
        device_uuid: sb.device_uuid,
        dev_number,
        stamped: true,
    })
}

/// Why the members of a recorded array were not found on this node.
#[derive(Debug, thiserror::Error)]
enum MembersHere {
    /// The scan found nothing usable.
    #[error(transparent)]
    Scan(#[from] crate::array::scan::ScanError),
    /// The scan found some members, not every active one.
    #[error("the devices under this agent's --device-allow patterns hold only {} of its members ({}); active device number(s) {missing:?} are not seen here — not assembling it degraded; give the member devices to do that", found.len(), found.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "))]
    Missing {
        /// What was found.
        found: Vec<PathBuf>,
        /// Active device numbers not found.
        missing: Vec<u32>,
    },
}

impl MembersHere {
    fn errno(&self) -> Errno {
        match self {
            MembersHere::Scan(crate::array::scan::ScanError::Ambiguous { .. }) => Errno::Einval,
            _ => Errno::Enoent,
        }
    }
}
