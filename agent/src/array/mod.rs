//! The arrays of this node and their lifecycle (`docs/LIFECYCLE.md` §2, the lesson of
//! the md_open race, `docs/LIFECYCLE.md` §1).
//!
//! Owns: the registry of arrays by name, each in one explicit state
//! ([`ArrayState::Assembling`] → [`ArrayState::Active`] → [`ArrayState::Stopping`] →
//! gone), changed only under the registry's one lock, and the [`Exports`] the NBD
//! server opens arrays through.
//!
//! Rules:
//! 1. lookup and allocation are different functions: [`Registry::lookup`],
//!    [`Registry::open`] (and [`Exports::open`]) never create an entry; only
//!    [`Registry::assemble`] (or [`Registry::assemble_in_slot`]) and
//!    [`Registry::create`] do;
//! 2. an open of an assembling or stopping array fails at once with EBUSY, of an
//!    absent one with ENOENT; nothing retries inside;
//! 3. [`Registry::stop`] marks the array stopping (new opens fail), waits a bounded
//!    grace for connected clients to leave, and if some stay returns the array to
//!    active and answers EBUSY naming them (with `force` disconnects them instead);
//!    then drains I/O, flushes the bitmap, marks the superblocks clean, closes the
//!    members and removes the entry; if in-flight I/O does not drain in time the
//!    entry stays stopping with its claim (and, in cluster mode, the node's slot),
//!    the stop answers EBUSY and may be tried again;
//! 4. every wait has a bound;
//! 5. one array (by array UUID) is assembled at most once on a node: a second assemble
//!    of its members under another name is EBUSY naming the first ([`Claims`], shared
//!    by every registry of the node).
//!
//! # Layout
//! - [`assemble`]: members → a running [`Raid1`] (superblocks, bitmap slot, writers).
//! - [`reshape`]: changing a running array's size (`grow --size`).
//! - [`service`]: the standalone service: registry + per-array NBD sockets + control
//!   socket (what `mdagent` runs without a cluster).

pub mod assemble;
pub mod reshape;
pub mod scan;
pub mod service;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use mdcluster_proto::v1::Errno;
use serde::Serialize;
use tokio::sync::broadcast;

pub use assemble::{ArrayIdentity, AssembleError, AssembleOptions};

use crate::allow::DeviceAllow;
use crate::format::create::CreateSpec;
use crate::format::io::DeviceError;
use crate::nbd::{ClientInfo, ClientSet, Exports, OpenError, OpenExport};
use crate::raid::{MetaWrite, Raid1, RaidError, RaidStatus, SpeedLimits};

/// Errors of registry operations. [`ArrayError::errno`] gives the errno-style reason
/// that crosses the wire.
#[derive(Debug, thiserror::Error)]
pub enum ArrayError {
    /// No array of that name on this node.
    #[error("ENOENT: no array named {name:?} on this node")]
    NotFound {
        /// The name.
        name: String,
    },
    /// The array is assembling or stopping (or clients are still connected).
    #[error("EBUSY: array {name:?} is {state}{}", fmt_clients(.clients))]
    Busy {
        /// The name.
        name: String,
        /// Its state, or why it is busy.
        state: String,
        /// Clients still connected.
        clients: Vec<String>,
    },
    /// The members belong to an array already assembled here under another name.
    #[error("EBUSY: cannot assemble {name:?}: its members belong to array {holder:?} (UUID {uuid}), already assembled on this node; use {holder:?} or stop it first")]
    Claimed {
        /// The name asked for.
        name: String,
        /// The name the array runs under.
        holder: String,
        /// The array UUID.
        uuid: String,
    },
    /// An array of that name already exists.
    #[error("EEXIST: array {name:?} already exists on this node ({state})")]
    Exists {
        /// The name.
        name: String,
        /// Its state.
        state: ArrayState,
    },
    /// The request is invalid.
    #[error("EINVAL: {0}")]
    Invalid(String),
    /// A device is not under the allow-list.
    #[error("EPERM: {0}")]
    NotAllowed(#[from] crate::allow::Denied),
    /// Assembling failed.
    #[error("EIO: assemble {name:?}: {source}")]
    Assemble {
        /// The name.
        name: String,
        /// The cause.
        source: AssembleError,
    },
    /// Creating members failed.
    #[error("EIO: create {name:?}: {source}")]
    Create {
        /// The name.
        name: String,
        /// The cause.
        source: DeviceError,
    },
    /// The engine failed.
    #[error("EIO: {0}")]
    Raid(#[from] RaidError),
}

fn fmt_clients(c: &[String]) -> String {
    if c.is_empty() {
        String::new()
    } else {
        format!("; still connected: {}", c.join(", "))
    }
}

impl ArrayError {
    /// The errno of the error: ENOENT, EBUSY, EEXIST, EINVAL, EPERM or EIO; an engine
    /// error gives its own ([`RaidError::errno`]).
    pub fn errno(&self) -> Errno {
        match self {
            ArrayError::NotFound { .. } => Errno::Enoent,
            ArrayError::Busy { .. } | ArrayError::Claimed { .. } => Errno::Ebusy,
            ArrayError::Exists { .. } => Errno::Eexist,
            ArrayError::Invalid(_) => Errno::Einval,
            ArrayError::NotAllowed(_) => Errno::Eperm,
            ArrayError::Create {
                source: DeviceError::Duplicate { .. },
                ..
            } => Errno::Einval,
            ArrayError::Raid(e) => e.errno(),
            ArrayError::Assemble {
                source: AssembleError::StillMember { .. },
                ..
            } => Errno::Ebusy,
            ArrayError::Assemble { .. } | ArrayError::Create { .. } => Errno::Eio,
        }
    }
}

/// The one state of an array on this node. Absent from the registry = gone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ArrayState {
    /// Being assembled: opens answer EBUSY.
    Assembling,
    /// Served.
    Active,
    /// Being stopped: opens answer EBUSY.
    Stopping,
}

impl std::fmt::Display for ArrayState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ArrayState::Assembling => "assembling",
            ArrayState::Active => "active",
            ArrayState::Stopping => "stopping",
        })
    }
}

/// A lifecycle event, for event-driven monitoring.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArrayEvent {
    /// The array.
    pub name: String,
    /// Its new state; `None` = gone.
    pub state: Option<ArrayState>,
}

/// What [`Registry::lookup`] answers.
#[derive(Debug, Clone, Serialize)]
pub struct ArrayInfo {
    /// The name.
    pub name: String,
    /// The state.
    pub state: ArrayState,
    /// Identity (absent while assembling).
    pub identity: Option<ArrayIdentity>,
    /// Engine status (absent while assembling).
    pub raid: Option<RaidStatus>,
    /// Connected clients.
    pub clients: Vec<String>,
    /// `events` and `utime` of this node's superblock copies (absent while assembling).
    pub sb_events: Option<(u64, u64)>,
}

/// How [`Registry::add_member_with`] adds a device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AddHow {
    /// `--add`: a former member is re-added, a new one becomes a spare and takes a
    /// free role at once.
    Add,
    /// `--add-spare`: a new device stays a spare.
    Spare,
    /// Cluster mode: another node added it; read its superblock, write nothing.
    Attach,
}

/// Which array (by array UUID) is assembled under which name on this node. Shared by
/// every registry of the node and by whoever must hold an array's members before its
/// assemble starts (cluster mode claims them before it takes a slot lock), so the same
/// members are never assembled twice under two names (md: EBUSY, the devices are
/// claimed by the first array).
#[derive(Debug, Default)]
pub struct Claims {
    map: Mutex<HashMap<[u8; 16], String>>,
}

impl Claims {
    /// Claims `uuid` for `name`; `Err` carries the name that holds it. Claiming again
    /// under the same name succeeds.
    pub fn claim(&self, uuid: [u8; 16], name: &str) -> Result<(), String> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        match map.get(&uuid) {
            Some(holder) if holder != name => Err(holder.clone()),
            Some(_) => Ok(()),
            None => {
                map.insert(uuid, name.to_owned());
                Ok(())
            }
        }
    }

    /// Releases `uuid` if `name` holds it.
    pub fn release(&self, uuid: [u8; 16], name: &str) {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&uuid).is_some_and(|h| h == name) {
            map.remove(&uuid);
        }
    }

    /// Claims `uuid` for `name` until the returned guard is dropped or kept
    /// ([`ClaimGuard::keep`]); `Err` carries the name that holds it.
    pub fn hold(self: &Arc<Self>, uuid: [u8; 16], name: &str) -> Result<ClaimGuard, String> {
        let fresh = self.holder(uuid).is_none();
        self.claim(uuid, name)?;
        Ok(ClaimGuard {
            claims: self.clone(),
            uuid,
            name: name.to_owned(),
            release: fresh,
        })
    }

    /// The name `uuid` is assembled under, if any.
    pub fn holder(&self, uuid: [u8; 16]) -> Option<String> {
        self.map
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&uuid)
            .cloned()
    }
}

/// A claim taken by [`Claims::hold`]: released on drop unless kept (then the registry
/// entry that claimed the same UUID releases it when the array goes).
#[derive(Debug)]
pub struct ClaimGuard {
    claims: Arc<Claims>,
    uuid: [u8; 16],
    name: String,
    release: bool,
}

impl ClaimGuard {
    /// Keeps the claim: the array is assembled.
    pub fn keep(mut self) {
        self.release = false;
    }
}

impl Drop for ClaimGuard {
    fn drop(&mut self) {
        if self.release {
            self.claims.release(self.uuid, &self.name);
        }
    }
}

/// The EBUSY of a second assemble of an array's members (`uuid`) under `name`.
pub fn claimed_error(name: &str, uuid: &[u8; 16], holder: &str) -> ArrayError {
    ArrayError::Claimed {
        name: name.to_owned(),
        holder: holder.to_owned(),
        uuid: crate::format::fmt_uuid(uuid),
    }
}

/// The array UUID in the superblock of the first readable member, if any.
pub async fn members_uuid(members: &[PathBuf]) -> Option<[u8; 16]> {
    let paths = members.to_vec();
    tokio::task::spawn_blocking(move || {
        paths
            .iter()
            .find_map(|p| crate::format::io::read_member(p).ok())
            .map(|m| m.sb.set_uuid)
    })
    .await
    .ok()
    .flatten()
}

/// The default [`RegistryConfig::drain_timeout`]: longer than a write's wait for a
/// superblock update ([`crate::raid::SB_CHANGE_WAIT`]).
pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(50);

/// Limits and defaults of a registry.
#[derive(Debug, Clone)]
pub struct RegistryConfig {
    /// How long a stop waits for connected clients to leave.
    pub stop_grace: Duration,
    /// Bound of draining in-flight I/O and of forced disconnects at stop. At least
    /// [`crate::raid::SB_CHANGE_WAIT`] (the longest a write waits for a superblock
    /// update) in production, so a drain does not give up on a write that is about to
    /// end; a stop whose drain gives up leaves the array stopping (EBUSY).
    pub drain_timeout: Duration,
    /// Assemble options (speed limits, daemon_sleep override, fence gate), the same for
    /// every array.
    pub assemble: AssembleOptions,
    /// The bitmap slot of arrays assembled by [`Registry::assemble`] and
    /// [`Registry::create`] (standalone mode: `--bitmap-slot`; 0 for an internal
    /// bitmap). Cluster mode gives each clustered array its own slot
    /// ([`Registry::assemble_in_slot`]).
    pub slot: u32,
    /// The member paths that may be opened ([`crate::allow`]).
    pub device_allow: DeviceAllow,
    /// The arrays assembled on this node by UUID (shared by the node's registries).
    pub claims: Arc<Claims>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        RegistryConfig {
            stop_grace: Duration::from_secs(3),
            drain_timeout: DEFAULT_DRAIN_TIMEOUT,
            assemble: AssembleOptions::default(),
            slot: 0,
            device_allow: DeviceAllow::default(),
            claims: Arc::default(),
        }
    }
}

struct Entry {
    state: ArrayState,
    raid: Option<Arc<Raid1>>,
    /// How to add members (set with `raid`).
    attachment: Option<Arc<assemble::Attachment>>,
    identity: Option<ArrayIdentity>,
    clients: ClientSet,
    /// The array UUID this entry claimed ([`Claims`]), released when it goes.
    claim: Option<[u8; 16]>,
    /// A stop gave up waiting for in-flight I/O: the engine is stopping, and the entry
    /// (stopping), its claim and (cluster mode) the node's slot stay until a later stop
    /// drains it, so no second engine and no other node works on the array meanwhile.
    drain_stalled: bool,
}

/// The arrays of this node. Cheap to share (`Arc`).
pub struct Registry {
    config: RegistryConfig,
    arrays: Mutex<HashMap<String, Entry>>,
    events: broadcast::Sender<ArrayEvent>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("arrays", &self.names())
            .finish()
    }
}

/// Array names: 1..=32 bytes of `[A-Za-z0-9_.-]`, not starting with `.` (they become
/// socket file names).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 32
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Glob match of allow-list patterns ([`crate::allow::glob_match`]).
pub use crate::allow::glob_match;

impl Registry {
    /// An empty registry.
    pub fn new(config: RegistryConfig) -> Arc<Registry> {
        Arc::new(Registry {
            config,
            arrays: Mutex::new(HashMap::new()),
            events: broadcast::channel(256).0,
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // Every change under the lock is one insert, remove or field assignment.
        self.arrays.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn emit(&self, name: &str, state: Option<ArrayState>) {
        // No subscriber is fine.
        let _ = self.events.send(ArrayEvent {
            name: name.to_owned(),
            state,
        });
    }

    /// The bitmap slot of [`Registry::assemble`] ([`RegistryConfig::slot`]).
    pub fn slot(&self) -> u32 {
        self.config.slot
    }

    /// Lifecycle events from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<ArrayEvent> {
        self.events.subscribe()
    }

    /// Names of all arrays, in any state.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.lock().keys().cloned().collect();
        v.sort();
        v
    }

    /// Looks an array up (never creates one).
    pub fn lookup(&self, name: &str) -> Result<ArrayInfo, ArrayError> {
        let (state, raid, identity, clients, att) = {
            let map = self.lock();
            let e = map.get(name).ok_or_else(|| ArrayError::NotFound {
                name: name.to_owned(),
            })?;
            (
                e.state,
                e.raid.clone(),
                e.identity.clone(),
                e.clients.list(),
                e.attachment.clone(),
            )
        };
        Ok(ArrayInfo {
            name: name.to_owned(),
            state,
            identity,
            raid: raid.map(|r| r.status()),
            clients: clients.iter().map(ToString::to_string).collect(),
            sb_events: att.map(|a| a.events()),
        })
    }

    /// The engine of an active array (for direct I/O by the agent itself).
    pub fn device(&self, name: &str) -> Result<Arc<Raid1>, ArrayError> {
        let map = self.lock();
        match map.get(name) {
            None => Err(ArrayError::NotFound {
                name: name.to_owned(),
            }),
            Some(e) => match (&e.raid, e.state) {
                (Some(r), ArrayState::Active) => Ok(r.clone()),
                _ => Err(ArrayError::Busy {
                    name: name.to_owned(),
                    state: e.state.to_string(),
                    clients: vec![],
                }),
            },
        }
    }

    /// Opens an active array for one client (what [`Exports::open`] does).
    pub fn open(&self, name: &str, client: &ClientInfo) -> Result<OpenExport, OpenError> {
        let map = self.lock();
        match map.get(name) {
            None => Err(OpenError::NotFound {
                name: name.to_owned(),
            }),
            Some(e) => match (&e.raid, e.state) {
                (Some(r), ArrayState::Active) => Ok(e.clients.attach(r.clone(), client)),
                _ => Err(OpenError::Busy {
                    name: name.to_owned(),
                    state: e.state.to_string(),
                }),
            },
        }
    }

    /// Checks `paths` against the allow-list; their resolutions (blocking only for
    /// the symlink lookups, which are quick).
    fn check_allowed(&self, paths: &[PathBuf]) -> Result<Vec<PathBuf>, ArrayError> {
        Ok(self.config.device_allow.check_all(paths)?)
    }

    /// Reserves `name` in state assembling (the only place an entry is allocated).
    fn reserve(&self, name: &str) -> Result<(), ArrayError> {
        if !valid_name(name) {
            return Err(ArrayError::Invalid(format!(
                "invalid array name {}: 1-32 of [A-Za-z0-9_.-]",
                crate::quote::quoted(name)
            )));
        }
        let mut map = self.lock();
        if let Some(e) = map.get(name) {
            return Err(ArrayError::Exists {
                name: name.to_owned(),
                state: e.state,
            });
        }
        map.insert(
            name.to_owned(),
            Entry {
                state: ArrayState::Assembling,
                raid: None,
                attachment: None,
                identity: None,
                clients: ClientSet::new(),
                claim: None,
                drain_stalled: false,
            },
        );
        drop(map);
        self.emit(name, Some(ArrayState::Assembling));
        Ok(())
    }

    fn unreserve(&self, name: &str) {
        let removed = {
            let mut map = self.lock();
            match map.get(name) {
                Some(e) if e.state == ArrayState::Assembling => map.remove(name),
                _ => None,
            }
        };
        if let Some(uuid) = removed.as_ref().and_then(|e| e.claim) {
            self.config.claims.release(uuid, name);
        }
        let removed = removed.is_some();
        if removed {
            self.emit(name, None);
        }
    }

    /// Assembles `name` from `members` with this node's bitmap in the registry's slot
    /// ([`RegistryConfig::slot`]) and makes it active.
    pub async fn assemble(&self, name: &str, members: &[PathBuf]) -> Result<ArrayInfo, ArrayError> {
        self.assemble_in_slot(name, members, self.config.slot).await
    }

    /// Assembles `name` from `members` with this node's bitmap in `slot` and makes it
    /// active.
    pub async fn assemble_in_slot(
        &self,
        name: &str,
        members: &[PathBuf],
        slot: u32,
    ) -> Result<ArrayInfo, ArrayError> {
        self.check_allowed(members)?;
        self.reserve(name)?;
        // The same members under another name: EBUSY (rule 5). Unreadable members are
        // left to the assemble's own errors.
        if let Some(uuid) = members_uuid(members).await {
            if let Err(holder) = self.config.claims.claim(uuid, name) {
                self.unreserve(name);
                return Err(claimed_error(name, &uuid, &holder));
            }
            if let Some(e) = self.lock().get_mut(name) {
                e.claim = Some(uuid);
            }
        }
        let result = assemble::assemble(name, members, &self.config.assemble, slot).await;
        match result {
            Ok((raid, identity, attachment)) => {
                {
                    let mut map = self.lock();
                    if let Some(e) = map.get_mut(name) {
                        e.raid = Some(raid);
                        e.attachment = Some(Arc::new(attachment));
                        e.identity = Some(identity);
                        e.state = ArrayState::Active;
                    }
                }
                self.emit(name, Some(ArrayState::Active));
                self.lookup(name)
            }
            Err(source) => {
                self.unreserve(name);
                Err(ArrayError::Assemble {
                    name: name.to_owned(),
                    source,
                })
            }
        }
    }

    /// Writes a new array's members (like `mdadm --create`) and assembles it.
    pub async fn create(
        &self,
        name: &str,
        spec: CreateSpec,
        members: &[PathBuf],
        force: bool,
    ) -> Result<ArrayInfo, ArrayError> {
        let paths = self.check_allowed(members)?;
        self.reserve(name)?;
        let created = tokio::task::spawn_blocking(move || {
            crate::format::io::create_members(&spec, &paths, force).map(|_| ())
        })
        .await;
        let created = match created {
            Ok(r) => r.map_err(|source| ArrayError::Create {
                name: name.to_owned(),
                source,
            }),
            Err(e) => Err(ArrayError::Invalid(format!("create task failed: {e}"))),
        };
        self.unreserve(name);
        created?;
        self.assemble(name, members).await
    }

    /// Stops `name` (see the module doc, rule 3).
    pub async fn stop(&self, name: &str, force: bool) -> Result<(), ArrayError> {
        self.stop_with(name, force, self.config.stop_grace).await
    }

    /// Like [`Registry::stop`] with `force`, without waiting for the clients to leave
    /// first: they are disconnected at once (an array whose I/O can no longer succeed).
    pub async fn stop_now(&self, name: &str) -> Result<(), ArrayError> {
        self.stop_with(name, true, Duration::ZERO).await
    }

    async fn stop_with(&self, name: &str, force: bool, grace: Duration) -> Result<(), ArrayError> {
        let (clients, raid) = {
            let mut map = self.lock();
            let e = map.get_mut(name).ok_or_else(|| ArrayError::NotFound {
                name: name.to_owned(),
            })?;
            // A stop whose drain stalled may be tried again.
            let retry = e.state == ArrayState::Stopping && e.drain_stalled;
            if e.state != ArrayState::Active && !retry {
                return Err(ArrayError::Busy {
                    name: name.to_owned(),
                    state: e.state.to_string(),
                    clients: vec![],
                });
            }
            e.state = ArrayState::Stopping;
            e.drain_stalled = false;
            (e.clients.clone(), e.raid.clone())
        };
        self.emit(name, Some(ArrayState::Stopping));
        let back_to_active = |left: Vec<ClientInfo>, why: &str| {
            if let Some(e) = self.lock().get_mut(name) {
                e.state = ArrayState::Active;
            }
            self.emit(name, Some(ArrayState::Active));
            ArrayError::Busy {
                name: name.to_owned(),
                state: why.to_owned(),
                clients: left.iter().map(ToString::to_string).collect(),
            }
        };
        if let Err(left) = clients.wait_empty(grace).await {
            if !force {
                return Err(back_to_active(left, "in use"));
            }
            tracing::warn!(
                array = name,
                clients = left.len(),
                "stop --force: disconnecting clients"
            );
            clients.disconnect_all();
            if let Err(left) = clients.wait_empty(self.config.drain_timeout).await {
                return Err(back_to_active(
                    left,
                    "in use (clients did not leave after disconnect)",
                ));
            }
        }
        let result = match &raid {
            Some(r) => r.shutdown(self.config.drain_timeout).await,
            None => Ok(()),
        };
        if let Err(RaidError::DrainTimeout { timeout, .. }) = &result {
            // I/O is still in flight (e.g. a write waiting for a superblock update, or
            // the request of a client that was forced off): releasing the claim or the
            // slot now would let a second engine, or another node's takeover resync,
            // run under those writes. The array stays stopping; the operator stops it
            // again.
            tracing::error!(
                array = name,
                ?timeout,
                "stop: in-flight I/O did not drain; the array stays stopping"
            );
            if let Some(e) = self.lock().get_mut(name) {
                e.drain_stalled = true;
            }
            return Err(ArrayError::Busy {
                name: name.to_owned(),
                state: format!(
                    "stopping: in-flight I/O did not finish within {timeout:?}; the array stays stopping with its members held, stop it again once the I/O has drained"
                ),
                clients: vec![],
            });
        }
        let gone = self.lock().remove(name);
        if let Some(uuid) = gone.and_then(|e| e.claim) {
            self.config.claims.release(uuid, name);
        }
        self.emit(name, None);
        drop(raid);
        result.map_err(ArrayError::from)
    }

    /// Changes the resync/recovery speed limits of an array while it runs.
    pub fn set_speed(&self, name: &str, limits: SpeedLimits) -> Result<(), ArrayError> {
        if limits.min_kib_s == 0 || limits.min_kib_s > limits.max_kib_s {
            return Err(ArrayError::Invalid(format!(
                "speed limits min {} max {} KiB/s: need 0 < min <= max",
                limits.min_kib_s, limits.max_kib_s
            )));
        }
        self.device(name)?.set_speed(limits);
        Ok(())
    }

    /// Marks a member faulty (like `mdadm --fail`); the superblocks are written as
    /// `how` says.
    pub async fn fail_member(
        &self,
        name: &str,
        path: &std::path::Path,
        how: MetaWrite,
    ) -> Result<(), ArrayError> {
        Ok(self.device(name)?.fail_by_path(path, how).await?)
    }

    /// Removes a faulty or spare member (like `mdadm --remove`); `Ok(false)`: it is
    /// active, nothing done. The superblocks are written as `how` says.
    pub async fn remove_member(
        &self,
        name: &str,
        path: &std::path::Path,
        how: MetaWrite,
    ) -> Result<bool, ArrayError> {
        Ok(self.device(name)?.remove_by_path(path, how).await?)
    }

    /// Adds a device to an active array (like `mdadm --add` / `--re-add`): a former
    /// member comes back in its role and recovers only the chunks the bitmap marks
    /// needed; a blank device becomes a spare and recovers fully into a free role.
    pub async fn add_member(
        &self,
        name: &str,
        path: &std::path::Path,
    ) -> Result<assemble::AddOutcome, ArrayError> {
        self.add_member_with(name, path, AddHow::Add, MetaWrite::Local)
            .await
    }

    /// [`Registry::add_member`], or as a spare only (`--add-spare`), or attaching a
    /// device another node added (cluster mode: its superblock is read, not written).
    /// The superblock updates of an add are written as `write` says.
    pub async fn add_member_with(
        &self,
        name: &str,
        path: &std::path::Path,
        how: AddHow,
        write: MetaWrite,
    ) -> Result<assemble::AddOutcome, ArrayError> {
        self.check_allowed(&[path.to_owned()])?;
        let (raid, att) = self.active_parts(name)?;
        let r = match how {
            AddHow::Add => assemble::add_member_opts(&raid, &att, path, false, write).await,
            AddHow::Spare => assemble::add_member_opts(&raid, &att, path, true, write).await,
            AddHow::Attach => assemble::attach_member(&raid, &att, path).await,
        };
        r.map_err(|source| ArrayError::Assemble {
            name: name.to_owned(),
            source,
        })
    }

    /// The engine and its metadata writers of active array `name` (for changes of
    /// its shape: [`reshape`]).
    pub fn active_parts(
        &self,
        name: &str,
    ) -> Result<(Arc<Raid1>, Arc<assemble::Attachment>), ArrayError> {
        let map = self.lock();
        let e = map.get(name).ok_or_else(|| ArrayError::NotFound {
            name: name.to_owned(),
        })?;
        match (&e.raid, &e.attachment, e.state) {
            (Some(r), Some(a), ArrayState::Active) => Ok((r.clone(), a.clone())),
            _ => Err(ArrayError::Busy {
                name: name.to_owned(),
                state: e.state.to_string(),
                clients: vec![],
            }),
        }
    }

    /// The metadata writers of array `name` in any state that has them (active or
    /// stopping).
    pub fn attachment(&self, name: &str) -> Option<Arc<assemble::Attachment>> {
        self.lock().get(name).and_then(|e| e.attachment.clone())
    }

    /// Stops every array (agent shutdown), forcing clients off.
    pub async fn stop_all(&self) -> Vec<(String, ArrayError)> {
        let mut errors = Vec::new();
        for name in self.names() {
            if let Err(e) = self.stop(&name, true).await {
                errors.push((name, e));
            }
        }
        errors
    }
}

impl Exports for Registry {
    fn list(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .lock()
            .iter()
            .filter(|(_, e)| e.state == ArrayState::Active)
            .map(|(n, _)| n.clone())
            .collect();
        v.sort();
        v
    }

    fn open(&self, name: &str, client: &ClientInfo) -> Result<OpenExport, OpenError> {
        Registry::open(self, name, client)
    }
}

#[cfg(test)]
mod tests;
