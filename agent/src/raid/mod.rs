//! The RAID1 engine: one array's members, write fan-out, read balancing, member
//! failure, and the background resync/recovery worker ([`sync`]).
//!
//! Owns: which member is in sync, recovering, spare or faulty, and the I/O paths over
//! them. It does not own the on-disk superblock: every metadata change (a member
//! failed, a spare took a role, the array became dirty, a sync checkpoint) goes
//! through the [`MetaStore`] the array gives it, and it is written before the I/O that
//! caused it is acknowledged.
//!
//! Rules (`docs/ARCHITECTURE.md`, "The RAID1 engine, bitmap and lifecycle"):
//! - a write goes to every in-sync and recovering member in parallel; it fails only if
//!   no in-sync member took it; a member that failed it is marked faulty first;
//! - a member failure is durable in the superblocks before any write (or flush) that
//!   completes after it is acknowledged — the one that hit the error and those that
//!   skipped the member (md's `MD_SB_CHANGE_PENDING`); if that superblock update
//!   fails, those writes fail with EIO, and so does every write until an update
//!   succeeds;
//! - a read goes to the in-sync member with the fewest reads in flight (round-robin on
//!   ties), to the in-sync member with the lowest role (the resync source, the same
//!   device on every node) while a resync runs here or inside the window another node
//!   is resyncing (whose overlapping writes wait), and is retried on another in-sync
//!   member after an error (the failing member is failed);
//! - a node acknowledges another node's resync window only after its own writes in
//!   flight into it have ended and while none of its member failures is owed to the
//!   superblocks; a write registers before its window check, so one that starts later
//!   sees the window (md's `remote_sync` quiesce), and waits while the window moves;
//! - every superblock write carries the engine's failed members (md's
//!   `super_1_sync`); a failure is recorded only by a successful write that carried
//!   it. The update of a failure hit by a write or a sync step runs after that I/O
//!   left the barrier and the window registry;
//! - the last in-sync member is never failed: its errors go to the caller;
//! - in-flight I/O is bounded ([`MAX_INFLIGHT`]) and drained at stop.
//!
//! Clustered arrays (md-cluster's `metadata_update_start/finish` around
//! `md_update_sb`): every superblock write this engine starts goes through the array's
//! [`MetaGate`] — under the `token` lock, followed by METADATA_UPDATED to the other
//! nodes. The caller of every engine call that may write superblocks says how
//! ([`MetaWrite`]): a sender's round that already holds the token writes directly
//! ([`MetaWrite::UnderToken`]); applying what another node wrote (a received
//! message, [`MetaWrite::Following`]) changes the engine's state and writes nothing.
//!
//! # Layout
//! - [`member`]: positional I/O on one member (O_DIRECT where allowed).
//! - [`sync`]: the resync/recovery worker, speed limits, progress.

pub mod member;
pub mod sync;

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mdcluster_proto::v1::Errno;
use serde::Serialize;
use tokio::sync::Semaphore;

use crate::bitmap::{BitmapStats, WriteIntent};
use crate::blockdev::{BlockDevice, IoFuture};
use crate::fence::{is_fenced, FenceTicket};
use member::MemberIo;
pub use sync::{
    GateDecision, GateFuture, SpeedLimits, SyncGate, SyncKind, SyncProgress, WorkerState,
    GATE_WINDOW,
};

/// At most this many array I/Os are in flight; more wait for a slot.
pub const MAX_INFLIGHT: u32 = 4096;
/// A write inside another node's resync window waits while the window moves; it
/// fails (ETIMEDOUT) once the window has not moved for this long (the resyncing node
/// is stuck or gone without clearing it).
pub const REMOTE_STALL: Duration = Duration::from_secs(30);
/// Longest a write waits for another node's resync window in all, moving or not.
pub const REMOTE_WAIT_MAX: Duration = Duration::from_secs(600);
/// Longest a completed write waits for a member failure to be recorded in the
/// superblocks (md's `MD_SB_CHANGE_PENDING`) before it fails with ETIMEDOUT. Above the
/// cluster token's deadline, so a clustered update can finish its round.
pub const SB_CHANGE_WAIT: Duration = Duration::from_secs(45);
/// Largest piece of a write-zeroes request.
const ZERO_PIECE: u32 = 1 << 20;

/// Errors of the RAID engine.
#[derive(Debug, thiserror::Error)]
pub enum RaidError {
    /// In-flight I/O did not finish within the drain bound.
    #[error("array {array}: in-flight I/O did not drain within {timeout:?}")]
    DrainTimeout {
        /// The array.
        array: String,
        /// The bound.
        timeout: Duration,
    },
    /// The bitmap could not be written at stop.
    #[error("array {array}: {source}")]
    Bitmap {
        /// The array.
        array: String,
        /// The cause.
        source: crate::bitmap::BitmapError,
    },
    /// A metadata update failed on every member.
    #[error("array {array}: update superblocks ({what}): {source}")]
    Meta {
        /// The array.
        array: String,
        /// The update.
        what: String,
        /// The cause.
        source: io::Error,
    },
    /// Writes in flight into a new remote resync window did not finish in time.
    #[error("array {array}: writes in flight into the resync window {window:?} (bytes) did not finish within {timeout:?}: {writes:?}; the window is installed, new writes there wait")]
    Quiesce {
        /// The array.
        array: String,
        /// The window, array bytes `[lo, hi)`.
        window: (u64, u64),
        /// The ranges of the writes still in flight.
        writes: Vec<(u64, u64)>,
        /// The bound.
        timeout: Duration,
    },
    /// A member failure of this node is not yet in the superblocks: a write that
    /// skipped the member may hold data the failed member lacks, so another node must
    /// not copy from it yet.
    #[error("array {array}: the failure of member {member} is not yet recorded in the superblocks; the resync window {window:?} (bytes) is not acknowledged until it is (the resyncing node retries)")]
    FailurePending {
        /// The array.
        array: String,
        /// The window, array bytes `[lo, hi)`.
        window: (u64, u64),
        /// The failed member (path), or how many are pending.
        member: String,
    },
    /// No member can serve the array.
    #[error("array {array}: no in-sync member")]
    NoMembers {
        /// The array.
        array: String,
    },
    /// A request names a member the array does not have.
    #[error("array {array}: no member {member}")]
    NoSuchMember {
        /// The array.
        array: String,
        /// What was asked.
        member: String,
    },
}

impl RaidError {
    /// The errno of the error: a bound that passed ETIMEDOUT, a failure not yet
    /// recorded EBUSY (retry), an unknown member ENOENT, everything else EIO.
    pub fn errno(&self) -> Errno {
        match self {
            RaidError::DrainTimeout { .. } | RaidError::Quiesce { .. } => Errno::Etimedout,
            RaidError::FailurePending { .. } => Errno::Ebusy,
            RaidError::NoSuchMember { .. } => Errno::Enoent,
            RaidError::Bitmap { .. } | RaidError::Meta { .. } | RaidError::NoMembers { .. } => {
                Errno::Eio
            }
        }
    }
}

/// What one member is to the array.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemberState {
    /// Holds a full copy; serves reads and takes writes.
    InSync,
    /// Takes writes; its data is copied by recovery, which has reached `offset` (array
    /// bytes). With `bitmap_only` only the chunks the bitmap marks needed are copied (a
    /// re-added member).
    Recovering {
        /// Recovery checkpoint, array bytes.
        offset: u64,
        /// Copy only the chunks marked needed.
        bitmap_only: bool,
    },
    /// Waits to take a failed member's role.
    Spare,
    /// Failed: no I/O goes to it.
    Faulty,
}

impl MemberState {
    /// Its name in messages: `in_sync`, `recovering`, `spare` or `faulty`.
    pub fn name(&self) -> &'static str {
        match self {
            MemberState::InSync => "in_sync",
            MemberState::Recovering { .. } => "recovering",
            MemberState::Spare => "spare",
            MemberState::Faulty => "faulty",
        }
    }
}

/// One metadata change, applied by the [`MetaStore`] to every member's superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MetaEvent {
    /// Set `resync_offset` (sectors; `u64::MAX` = clean).
    ResyncOffset(u64),
    /// Member `member` failed: role 0xfffe.
    Faulty {
        /// Index of the member.
        member: usize,
    },
    /// Member `member` was added (its superblock is written); it is a spare until
    /// [`MetaEvent::SpareActive`].
    Added {
        /// Index of the member.
        member: usize,
    },
    /// Spare `member` takes role `role` and starts recovery from 0.
    SpareActive {
        /// Index of the member.
        member: usize,
        /// The role it takes.
        role: u16,
    },
    /// Recovery onto `member` reached `sectors`.
    RecoveryCheckpoint {
        /// Index of the member.
        member: usize,
        /// Checkpoint, sectors of the array.
        sectors: u64,
    },
    /// Recovery onto `member` finished: it is in sync.
    RecoveryDone {
        /// Index of the member.
        member: usize,
    },
    /// The number of roles grew to this.
    RaidDisks(u32),
    /// The used size per member (= the array size) became this many sectors; when it
    /// grew, `resync_offset` drops to the old end (the new area is resynced).
    Size(u64),
    /// Member `member` was removed: its role becomes unused (0xffff).
    Removed {
        /// Index of the member.
        member: usize,
    },
}

/// Writes metadata changes to the members' superblocks.
pub trait MetaStore: Send + Sync {
    /// Applies `event` to every member's superblock (events + 1) and writes it durably
    /// to the members in `live`; succeeds if at least one of them took it. Every
    /// member in `faulty` (the engine's failed members, removed ones excepted) is
    /// written as faulty too, whatever the store's copies say (md's `super_1_sync`
    /// builds the superblock from the in-memory member states): a copy re-read from
    /// disk never drops a failure the engine has.
    fn update(&self, event: MetaEvent, live: Vec<usize>, faulty: Vec<usize>) -> IoFuture<'_, ()>;
}

/// How to build one member of a [`Raid1`].
#[derive(Debug)]
pub struct MemberSpec {
    /// The opened device.
    pub io: Arc<MemberIo>,
    /// Byte offset of the array data on the member.
    pub data_offset: u64,
    /// The member's `dev_number` (index in `dev_roles`).
    pub dev_number: u32,
    /// Its role (slot) if it has one.
    pub role: Option<u16>,
    /// Its state at start.
    pub state: MemberState,
}

/// How to build a [`Raid1`].
pub struct Raid1Config {
    /// Array name (for errors and logs).
    pub name: String,
    /// Array size in bytes.
    pub size: u64,
    /// Number of roles (`raid_disks`).
    pub raid_disks: u32,
    /// The members, spares included.
    pub members: Vec<MemberSpec>,
    /// This node's write-intent bitmap, if the array has one.
    pub bitmap: Option<Arc<WriteIntent>>,
    /// Where metadata changes go.
    pub meta: Arc<dyn MetaStore>,
    /// Resync to do at start: `Some(from)` (array bytes) after an unclean stop or for a
    /// new array; with a bitmap only the needed chunks are resynced.
    pub resync_from: Option<u64>,
    /// Initial speed limits.
    pub speed: SpeedLimits,
    /// Every resync/recovery run waits for a [`SyncGate`] ([`Raid1::set_sync_gate`]):
    /// cluster mode, one node syncs at a time.
    pub gated: bool,
    /// md's `safe_mode_delay`: the superblocks are marked clean again once no write
    /// has been in flight for this long (`None`: only at stop).
    pub safe_mode: Option<Duration>,
}

struct Member {
    io: Arc<MemberIo>,
    data_offset: u64,
    dev_number: u32,
    /// Reads in flight, for balancing.
    reads: AtomicU32,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    state: MemberState,
    role: Option<u16>,
}

/// A member as shown in status.
#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    /// Path of the device.
    pub path: String,
    /// Its `dev_number`.
    pub dev_number: u32,
    /// Its role, if any.
    pub role: Option<u16>,
    /// Its state.
    pub state: MemberState,
    /// Whether it is opened with O_DIRECT.
    pub direct: bool,
    /// Removed (`mdadm --remove`): kept only as a tombstone, not shown.
    pub removed: bool,
}

/// The state of a [`Raid1`] as shown in status.
#[derive(Debug, Clone, Serialize)]
pub struct RaidStatus {
    /// Array name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// Number of roles.
    pub raid_disks: u32,
    /// Fewer in-sync members than roles.
    pub degraded: bool,
    /// The members.
    pub members: Vec<MemberStatus>,
    /// Resync / recovery.
    pub sync: SyncProgress,
    /// The bitmap, if any.
    pub bitmap: Option<BitmapStats>,
}

/// A RAID1 array over N members. Implements [`BlockDevice`].
pub struct Raid1 {
    name: String,
    /// Array size in bytes (the capacity clients see); changes with [`Raid1::set_size`].
    size: AtomicU64,
    raid_disks: AtomicU32,
    /// Grows when a member is added; indexes never change.
    members: std::sync::RwLock<Vec<Arc<Member>>>,
    slots: Mutex<Vec<Slot>>,
    /// This node's write-intent bitmap; replaced by [`Raid1::set_bitmap`] (`grow
    /// --bitmap`) while writes are held off.
    bitmap: std::sync::RwLock<Option<Arc<WriteIntent>>>,
    meta: Arc<dyn MetaStore>,
    /// Serialises metadata updates.
    meta_lock: tokio::sync::Mutex<()>,
    /// Clustered arrays: every superblock write goes through it ([`MetaGate`]).
    meta_gate: std::sync::RwLock<Option<Arc<dyn MetaGate>>>,
    /// Fires when the gate is installed.
    meta_gate_set: tokio::sync::Notify,
    /// Whether the superblocks say "dirty" (written before the first write).
    dirty: AtomicBool,
    /// Writes past `mark_dirty` and not yet ended: safemode does not mark clean under
    /// them.
    writes: AtomicUsize,
    /// Milliseconds since `epoch` of the last write's end.
    last_write_ms: AtomicU64,
    /// Times safemode marked the superblocks clean.
    clean_marks: AtomicU64,
    /// User writes hold it shared; a sync step holds it exclusive.
    barrier: tokio::sync::RwLock<()>,
    /// In-flight limit; closed (all permits taken) at stop.
    gate: Semaphore,
    rr: AtomicUsize,
    epoch: Instant,
    /// Milliseconds since `epoch` of the last user I/O (sync throttling).
    last_io_ms: AtomicU64,
    sync: sync::SyncShared,
    /// The range (array bytes) another node is resyncing (reads there go to the
    /// lowest-role in-sync member, writes there wait until the window moves on), and
    /// the writes past their window check.
    remote: Mutex<Remote>,
    /// Fires when a write registered in `remote` ends.
    write_left: tokio::sync::Notify,
    /// Indexes of removed members (tombstones: indexes stay stable).
    removed: Mutex<std::collections::BTreeSet<usize>>,
    remote_changed: tokio::sync::Notify,
    /// Member failures not yet durable in the superblocks (md's
    /// `MD_SB_CHANGE_PENDING`): writes are not acknowledged while any is.
    sb_change: Mutex<SbChange>,
    /// Fires when `sb_change` changes.
    sb_changed: tokio::sync::Notify,
    tasks: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    stop_tx: tokio::sync::watch::Sender<bool>,
    /// Set by [`Raid1::fence`]: no superblock or bitmap write is started any more.
    fenced: AtomicBool,
    /// The array's pass through the node's fence gate (clustered arrays,
    /// [`Raid1::set_fence_ticket`]): requests wait at it while the node is fenced.
    fence_ticket: std::sync::OnceLock<FenceTicket>,
}

impl std::fmt::Debug for Raid1 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Raid1")
            .field("name", &self.name)
            .field("size", &self.size())
            .finish()
    }
}

/// Of members `cands`, the one with the lowest role (members without one last, then by
/// index).
fn lowest_role(slots: &[Slot], cands: &[usize]) -> Option<usize> {
    cands
        .iter()
        .copied()
        .min_by_key(|&i| (slots[i].role.unwrap_or(u16::MAX), i))
}

fn eio(msg: String) -> io::Error {
    io::Error::other(msg)
}

/// Another node's resync window and the writes that passed the window check.
#[derive(Debug, Default)]
struct Remote {
    window: Option<(u64, u64)>,
    /// Writes registered before their window check, until their member writes ended:
    /// id → range `[lo, hi)` in array bytes.
    writes: std::collections::HashMap<u64, (u64, u64)>,
    next_id: u64,
}

fn overlaps((lo, hi): (u64, u64), offset: u64, len: u64) -> bool {
    offset < hi && offset + len.max(1) > lo
}

/// A write registered in [`Remote::writes`]; unregistered on drop.
struct WindowEntry<'a> {
    raid: &'a Raid1,
    id: u64,
}

impl Drop for WindowEntry<'_> {
    fn drop(&mut self) {
        self.raid.remote_lock().writes.remove(&self.id);
        self.raid.write_left.notify_waiters();
    }
}

/// Longest [`Raid1::set_remote_resync_window`] waits for the writes in flight into a
/// new window to finish before it fails (a negative ack to RESYNCING).
pub const REMOTE_QUIESCE: Duration = Duration::from_secs(10);

/// Member failures and their superblock update (md's `MD_SB_CHANGE_PENDING`).
#[derive(Debug, Default)]
struct SbChange {
    /// Failures whose Faulty update is being written.
    writing: usize,
    /// Members whose Faulty update failed and no update succeeded since, with the
    /// error: every write fails until one does.
    unrecorded: Vec<(usize, String)>,
}

/// A member marked Faulty whose superblock update is owed ([`Raid1::mark_failed`]).
/// Dropped without [`PendingFailure::record`] (the I/O was cancelled), the failure
/// stays unrecorded: the next write writes it before it is acknowledged.
struct PendingFailure<'a> {
    raid: &'a Raid1,
    member: usize,
    done: bool,
}

impl PendingFailure<'_> {
    /// Writes the Faulty update (as `how` says), then gives the member's role to a
    /// spare if there is one.
    async fn record(mut self, how: MetaWrite) {
        let raid = self.raid;
        let i = self.member;
        let r = raid.meta_update(MetaEvent::Faulty { member: i }, how).await;
        {
            let mut ch = raid.sb_change_lock();
            ch.writing -= 1;
            // A success was cleared by `store`; applying another node's update
            // (`MetaWrite::Following`) writes nothing and clears nothing.
            if let Err(e) = &r {
                tracing::error!(array = %raid.name, member = %raid.member(i).io.path().display(),
                    "failed to record the failed member; writes fail until a superblock update succeeds: {e}");
                ch.unrecorded.push((i, e.to_string()));
            }
        }
        self.done = true;
        raid.sb_changed.notify_waiters();
        raid.activate_spares(how).await;
        raid.sync.wake();
    }
}

impl Drop for PendingFailure<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        {
            let mut ch = self.raid.sb_change_lock();
            ch.writing -= 1;
            ch.unrecorded.push((
                self.member,
                "its superblock update was not written (the I/O was cancelled)".into(),
            ));
        }
        self.raid.sb_changed.notify_waiters();
    }
}

/// A write counted from before its dirty check to its end (safemode).
struct WriteCount<'a>(&'a Raid1);

impl<'a> WriteCount<'a> {
    fn new(raid: &'a Raid1) -> Self {
        raid.writes.fetch_add(1, Ordering::SeqCst);
        WriteCount(raid)
    }
}

impl Drop for WriteCount<'_> {
    fn drop(&mut self) {
        let now = self.0.epoch.elapsed().as_millis() as u64;
        self.0.last_write_ms.store(now, Ordering::Release);
        self.0.writes.fetch_sub(1, Ordering::SeqCst);
    }
}

/// How long a superblock write of a clustered array waits for its [`MetaGate`] to be
/// installed after start.
pub const META_GATE_WAIT: Duration = Duration::from_secs(5);

/// How the superblock writes of an engine call go out: the caller of every call that
/// may write superblocks (a metadata change, a failed, removed, added or recovered
/// member, spares taking roles) states it. The engine's own writes (dirty marks,
/// safemode, sync checkpoints, failures met by I/O, stop) are [`MetaWrite::Local`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetaWrite {
    /// This node's own change: written through the array's [`MetaGate`] if it has one
    /// (a clustered array: under the `token` lock, announced with METADATA_UPDATED).
    Local,
    /// The caller holds the array's `token` lock and announces the change itself (a
    /// sender's round): written directly, without the [`MetaGate`].
    UnderToken,
    /// The application of a change another node already wrote to the superblocks (a
    /// received message): the engine changes, nothing is written.
    Following,
}

/// The cluster's wrapper around a clustered array's superblock writes.
pub trait MetaGate: Send + Sync {
    /// Runs `write` (the superblock write of `what`) under the array's `token` lock,
    /// then tells every other joined node (METADATA_UPDATED). If the token cannot be
    /// had within its deadline the write still happens (as md's `md_update_sb` does)
    /// and the failure is logged: the members must not lag behind the engine.
    fn round<'a>(&'a self, what: String, write: IoFuture<'a, ()>) -> IoFuture<'a, ()>;
}

impl Raid1 {
    /// Builds the array and starts its bitmap daemon and sync worker. Must be called
    /// inside a tokio runtime.
    pub fn start(cfg: Raid1Config) -> Result<Arc<Raid1>, RaidError> {
        let slots: Vec<Slot> = cfg
            .members
            .iter()
            .map(|m| Slot {
                state: m.state,
                role: m.role,
            })
            .collect();
        if !slots.iter().any(|s| s.state == MemberState::InSync) {
            return Err(RaidError::NoMembers { array: cfg.name });
        }
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let members = cfg
            .members
            .into_iter()
            .map(|m| {
                Arc::new(Member {
                    io: m.io,
                    data_offset: m.data_offset,
                    dev_number: m.dev_number,
                    reads: AtomicU32::new(0),
                })
            })
            .collect();
        let raid = Arc::new(Raid1 {
            name: cfg.name,
            size: AtomicU64::new(cfg.size),
            raid_disks: AtomicU32::new(cfg.raid_disks),
            members: std::sync::RwLock::new(members),
            slots: Mutex::new(slots),
            bitmap: std::sync::RwLock::new(cfg.bitmap),
            meta: cfg.meta,
            meta_lock: tokio::sync::Mutex::new(()),
            meta_gate: std::sync::RwLock::new(None),
            meta_gate_set: tokio::sync::Notify::new(),
            dirty: AtomicBool::new(false),
            writes: AtomicUsize::new(0),
            last_write_ms: AtomicU64::new(0),
            clean_marks: AtomicU64::new(0),
            barrier: tokio::sync::RwLock::new(()),
            gate: Semaphore::new(MAX_INFLIGHT as usize),
            rr: AtomicUsize::new(0),
            epoch: Instant::now(),
            last_io_ms: AtomicU64::new(0),
            sync: sync::SyncShared::new(cfg.speed, cfg.resync_from, cfg.gated),
            remote: Mutex::new(Remote::default()),
            write_left: tokio::sync::Notify::new(),
            removed: Mutex::new(std::collections::BTreeSet::new()),
            remote_changed: tokio::sync::Notify::new(),
            sb_change: Mutex::new(SbChange::default()),
            sb_changed: tokio::sync::Notify::new(),
            tasks: Mutex::new(Vec::new()),
            stop_tx,
            fenced: AtomicBool::new(false),
            fence_ticket: std::sync::OnceLock::new(),
        });
        let mut tasks = Vec::new();
        if let Some(bm) = raid.bitmap() {
            tasks.push(bm.spawn_daemon(stop_rx.clone()));
        }
        if let Some(delay) = cfg.safe_mode.filter(|d| !d.is_zero()) {
            tasks.push(tokio::spawn(Raid1::safe_mode(
                Arc::downgrade(&raid),
                delay,
                stop_rx.clone(),
            )));
        }
        tasks.push(tokio::spawn(sync::run_worker(raid.clone(), stop_rx)));
        *raid.tasks.lock().unwrap_or_else(|e| e.into_inner()) = tasks;
        raid.activate_spare_if_degraded_soon();
        Ok(raid)
    }

    fn activate_spare_if_degraded_soon(self: &Arc<Self>) {
        let me = self.clone();
        let task = tokio::spawn(async move { me.activate_spares(MetaWrite::Local).await });
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(task);
    }

    /// The array's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn slots(&self) -> MutexGuard<'_, Vec<Slot>> {
        // Slot updates are single assignments: a panicking holder leaves them valid.
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live(&self) -> Vec<usize> {
        self.slots()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state != MemberState::Faulty)
            .map(|(i, _)| i)
            .collect()
    }

    /// Member `i` (indexes are stable: members are only ever added).
    fn member(&self, i: usize) -> Arc<Member> {
        self.members.read().unwrap_or_else(|e| e.into_inner())[i].clone()
    }

    fn members_snapshot(&self) -> Vec<Arc<Member>> {
        self.members
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Adds a member (a new spare, or a re-added member that recovers only the chunks
    /// the bitmap marks needed). Returns its index. The caller has written its
    /// superblock and registered it with the [`MetaStore`] under the same index.
    pub fn add_member(&self, spec: MemberSpec) -> usize {
        let index = {
            let mut members = self.members.write().unwrap_or_else(|e| e.into_inner());
            let mut slots = self.slots();
            members.push(Arc::new(Member {
                io: spec.io,
                data_offset: spec.data_offset,
                dev_number: spec.dev_number,
                reads: AtomicU32::new(0),
            }));
            slots.push(Slot {
                state: spec.state,
                role: spec.role,
            });
            members.len() - 1
        };
        self.sync.wake();
        index
    }

    /// Whether an in-sync or recovering member holds `role`.
    pub fn role_in_use(&self, role: u16) -> bool {
        self.slots().iter().any(|s| {
            s.role == Some(role)
                && matches!(
                    s.state,
                    MemberState::InSync | MemberState::Recovering { .. }
                )
        })
    }

    /// The number of members (the index the next added member gets).
    pub fn member_count(&self) -> usize {
        self.members.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Writes a metadata change to the members' superblocks as `how` says (serialised
    /// with the engine's own updates).
    pub async fn record(&self, event: MetaEvent, how: MetaWrite) -> Result<(), RaidError> {
        self.meta_update(event, how).await
    }

    /// Gives free roles to spares (after a member was added); their superblock updates
    /// go out as `how` says.
    pub async fn use_spares(&self, how: MetaWrite) {
        self.activate_spares(how).await;
    }

    /// Indexes of the members that are not faulty.
    pub fn live_members(&self) -> Vec<usize> {
        self.live()
    }

    fn in_sync_count(&self) -> usize {
        self.slots()
            .iter()
            .filter(|s| s.state == MemberState::InSync)
            .count()
    }

    fn note_io(&self) {
        self.last_io_ms
            .store(self.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Whether user I/O happened within the last `window`.
    fn recently_busy(&self, window: Duration) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        let last = self.last_io_ms.load(Ordering::Relaxed);
        last != 0 && now.saturating_sub(last) < window.as_millis() as u64
    }

    fn check_range(&self, offset: u64, len: u64) -> io::Result<()> {
        let size = self.size();
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "array {}: range {offset}+{len} beyond size {}",
                    self.name, size
                ),
            ));
        }
        Ok(())
    }

    async fn permit(&self) -> io::Result<tokio::sync::SemaphorePermit<'_>> {
        self.gate
            .acquire()
            .await
            .map_err(|_| eio(format!("array {} is stopping", self.name)))
    }

    /// Installs (or removes) the gate every superblock write of a clustered array
    /// goes through.
    pub fn set_meta_gate(&self, gate: Option<Arc<dyn MetaGate>>) {
        *self.meta_gate.write().unwrap_or_else(|e| e.into_inner()) = gate;
        self.meta_gate_set.notify_waiters();
    }

    /// From now on no superblock or bitmap write is started (each fails at once,
    /// naming the array), and [`Raid1::shutdown`] stops the engine without writing
    /// metadata: the node lost the slot lock these writes need (another node may be
    /// taking the slot over). Member data I/O in flight ends as it would; new I/O
    /// fails once its metadata (dirty mark, bitmap bit) cannot be written.
    pub fn fence(&self) {
        if !self.fenced.swap(true, Ordering::SeqCst) {
            tracing::error!(array = %self.name, "fenced: no superblock or bitmap write from now on");
        }
    }

    /// Gates this array's requests with `ticket` (a clustered array; its members carry
    /// the same ticket, [`MemberIo::set_fence`]): a read, write or flush waits while the
    /// node is fenced, at most the gate's suspend timeout (then EIO), and one that
    /// failed because of the gate (refused at a member, or any failure while the gate
    /// is closed) is run again once it opens within that bound. Set once; false if it
    /// was set already.
    pub fn set_fence_ticket(&self, ticket: FenceTicket) -> bool {
        self.fence_ticket.set(ticket).is_ok()
    }

    /// The ticket of [`Raid1::set_fence_ticket`], for members added later and for
    /// metadata written beside the engine.
    pub fn fence_ticket(&self) -> Option<FenceTicket> {
        self.fence_ticket.get().cloned()
    }

    /// Runs `op` (a request) through the fence gate: see [`Raid1::set_fence_ticket`].
    async fn suspendable<T, F, Fut>(&self, op: F) -> io::Result<T>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = io::Result<T>>,
    {
        let Some(t) = self.fence_ticket.get() else {
            return op().await;
        };
        let until = tokio::time::Instant::now() + t.gate().suspend_timeout();
        loop {
            t.wait_open(&self.name, until).await?;
            match op().await {
                // Refused at a member, or failed while the gate closed (a superblock or
                // bitmap write the gate refused, reported as EIO): run again once the
                // gate opens, within the bound.
                Err(e)
                    if (is_fenced(&e) || !t.is_open()) && tokio::time::Instant::now() < until =>
                {
                    continue
                }
                r => return r,
            }
        }
    }

    /// Whether [`Raid1::fence`] was called.
    pub fn is_fenced(&self) -> bool {
        self.fenced.load(Ordering::SeqCst)
    }

    fn fenced_error(&self) -> io::Error {
        eio(format!(
            "array {}: fenced (this node lost its slot lock); no metadata is written",
            self.name
        ))
    }

    /// Runs the superblock write `write` (of `what`): through the array's gate for a
    /// [`MetaWrite::Local`] write of an array that has one, directly otherwise.
    async fn write_sb(
        &self,
        what: String,
        write: IoFuture<'_, ()>,
        how: MetaWrite,
    ) -> io::Result<()> {
        if self.is_fenced() {
            return Err(self.fenced_error());
        }
        match self.gate_for_write(how).await {
            Some(g) => g.round(what, write).await,
            None => write.await,
        }
    }

    /// The gate a superblock write goes through, if any (none under the token). A
    /// clustered array (a gated one) gets its gate right after it starts: a write in
    /// between (a spare activated at start, the first client's dirty mark) waits for
    /// it, at most [`META_GATE_WAIT`], then writes without it (logged).
    async fn gate_for_write(&self, how: MetaWrite) -> Option<Arc<dyn MetaGate>> {
        if how != MetaWrite::Local {
            return None;
        }
        let current = || {
            self.meta_gate
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone()
        };
        if !self.sync.gated {
            return current();
        }
        let deadline = tokio::time::Instant::now() + META_GATE_WAIT;
        loop {
            let set = self.meta_gate_set.notified();
            tokio::pin!(set);
            set.as_mut().enable();
            if let Some(g) = current() {
                return Some(g);
            }
            if tokio::time::timeout_at(deadline, set).await.is_err() {
                tracing::warn!(array = %self.name, "superblock write of a clustered array without its gate after {META_GATE_WAIT:?}");
                return current();
            }
        }
    }

    async fn meta_update(&self, event: MetaEvent, how: MetaWrite) -> Result<(), RaidError> {
        if how == MetaWrite::Following {
            return Ok(());
        }
        let write: IoFuture<'_, ()> = Box::pin(async {
            let _one = self.meta_lock.lock().await;
            self.store(event.clone()).await
        });
        let done = self.write_sb(format!("{event:?}"), write, how).await;
        done.map_err(|source| RaidError::Meta {
            array: self.name.clone(),
            what: format!("{event:?}"),
            source,
        })
    }

    /// The failed members every superblock write carries (removed ones are written
    /// as unused by their own update and stay so).
    fn faulty_members(&self) -> Vec<usize> {
        let removed = self
            .removed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        self.slots()
            .iter()
            .enumerate()
            .filter(|(i, s)| s.state == MemberState::Faulty && !removed.contains(i))
            .map(|(i, _)| i)
            .collect()
    }

    /// Writes `event` with the engine's full member state (the caller holds
    /// `meta_lock`). A write that succeeded carried every failure the engine had when
    /// it was built: those are on disk now and no longer unrecorded; failures that
    /// came later stay until a later write carries them.
    async fn store(&self, event: MetaEvent) -> io::Result<()> {
        if self.is_fenced() {
            return Err(self.fenced_error());
        }
        let live = self.live();
        let faulty = self.faulty_members();
        let mut carried = faulty.clone();
        if let MetaEvent::Removed { member } = event {
            // Written as unused: nothing about it is owed any more.
            carried.push(member);
        }
        self.meta.update(event, live, faulty).await?;
        let cleared = {
            let mut ch = self.sb_change_lock();
            let before = ch.unrecorded.len();
            ch.unrecorded.retain(|(m, _)| !carried.contains(m));
            ch.unrecorded.len() != before
        };
        if cleared {
            self.sb_changed.notify_waiters();
        }
        Ok(())
    }

    /// md's safemode: every half `delay`, once the array is dirty, no write is in
    /// flight, none ended within `delay` and no resync owns `resync_offset`, the
    /// members are flushed and the superblocks marked clean (through the cluster gate
    /// for a clustered array); the next write marks them dirty again. A crash while
    /// idle then needs no resync.
    async fn safe_mode(
        raid: std::sync::Weak<Raid1>,
        delay: Duration,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        let period = (delay / 2).max(Duration::from_millis(10));
        loop {
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = stop.changed() => return,
            }
            if *stop.borrow() {
                return;
            }
            let Some(raid) = raid.upgrade() else { return };
            if raid.idle_for(delay) {
                if let Err(e) = raid.mark_clean(delay).await {
                    tracing::warn!(array = %raid.name, "safemode: {e}");
                }
            }
        }
    }

    /// Dirty, no write in flight, none ended within `delay`, no resync pending.
    fn idle_for(&self, delay: Duration) -> bool {
        let now = self.epoch.elapsed().as_millis() as u64;
        self.dirty.load(Ordering::Acquire)
            && self.writes.load(Ordering::SeqCst) == 0
            && now.saturating_sub(self.last_write_ms.load(Ordering::Acquire))
                >= delay.as_millis() as u64
            && self.sync.resync_checkpoint_sectors().is_none()
            && !self.sync.resync_running()
    }

    /// How often safemode marked the superblocks clean.
    pub fn clean_marks(&self) -> u64 {
        self.clean_marks.load(Ordering::Relaxed)
    }

    async fn mark_clean(&self, delay: Duration) -> io::Result<()> {
        let write: IoFuture<'_, ()> = Box::pin(async {
            let _one = self.meta_lock.lock().await;
            if !self.idle_for(delay) {
                return Ok(());
            }
            self.dirty.store(false, Ordering::SeqCst);
            if self.writes.load(Ordering::SeqCst) > 0 {
                // A write came in between: it saw "dirty" and goes on under it.
                self.dirty.store(true, Ordering::SeqCst);
                return Ok(());
            }
            // Every completed write durable before the superblock says clean.
            for i in self.live() {
                if let Err(e) = self.member(i).io.sync().await {
                    self.dirty.store(true, Ordering::SeqCst);
                    return Err(e);
                }
            }
            if let Err(e) = self.store(MetaEvent::ResyncOffset(u64::MAX)).await {
                self.dirty.store(true, Ordering::SeqCst);
                return Err(e);
            }
            self.clean_marks.fetch_add(1, Ordering::Relaxed);
            Ok(())
        });
        self.write_sb("mark clean (safemode)".into(), write, MetaWrite::Local)
            .await
    }

    /// Writes `resync_offset` for the sync worker, decided under the metadata lock
    /// (where `mark_dirty` and safemode change the dirty flag): while the array is
    /// dirty a checkpoint (`keep_if_dirty`) is not written and an end of resync writes
    /// 0, so a write's dirty mark is never overwritten.
    pub(crate) async fn record_resync_offset(
        &self,
        sectors: u64,
        keep_if_dirty: bool,
    ) -> Result<(), RaidError> {
        let write: IoFuture<'_, ()> = Box::pin(async {
            let _one = self.meta_lock.lock().await;
            let value = if self.dirty.load(Ordering::Acquire) {
                if keep_if_dirty {
                    return Ok(());
                }
                0
            } else {
                sectors
            };
            self.store(MetaEvent::ResyncOffset(value)).await
        });
        let done = self
            .write_sb("resync offset".into(), write, MetaWrite::Local)
            .await;
        done.map_err(|source| RaidError::Meta {
            array: self.name.clone(),
            what: "ResyncOffset".into(),
            source,
        })
    }

    /// Marks the superblocks dirty before the first write.
    async fn mark_dirty(&self) -> io::Result<()> {
        if self.dirty.load(Ordering::Acquire) {
            return Ok(());
        }
        let write: IoFuture<'_, ()> = Box::pin(async {
            let _one = self.meta_lock.lock().await;
            if self.dirty.load(Ordering::Acquire) {
                return Ok(());
            }
            // Dirty = a crash from now on needs a resync from the start (a write in
            // flight below a resync checkpoint would otherwise be missed; with a bitmap
            // the dirty bits decide anyway).
            self.store(MetaEvent::ResyncOffset(0)).await?;
            self.dirty.store(true, Ordering::Release);
            Ok(())
        });
        let done = self
            .write_sb("mark dirty".into(), write, MetaWrite::Local)
            .await;
        done.map_err(|e| eio(format!("array {}: mark dirty: {e}", self.name)))
    }

    /// Counts an I/O error of member `i` (`mdcluster_member_io_errors_total`).
    pub(crate) fn count_io_error(&self, i: usize) {
        crate::metrics::agent().member_io_error(&self.name, self.member(i).io.path());
    }

    /// Fails member `i` (superblocks updated on the others before this returns, as
    /// `how` says), unless it is the last in-sync member. Returns whether it was failed
    /// now.
    pub async fn fail_member(&self, i: usize, why: &str, how: MetaWrite) -> bool {
        match self.mark_failed(i, why) {
            Some(p) => {
                p.record(how).await;
                true
            }
            None => false,
        }
    }

    /// The synchronous half of a member failure: member `i` is Faulty from now on (no
    /// I/O goes to it) and its superblock update is owed — every write that completes
    /// from now on waits for it ([`Raid1::wait_sb_recorded`]). The update itself
    /// ([`PendingFailure::record`]) may need the cluster token: a write or a sync step
    /// runs it only after it left the barrier and the window registry, so another
    /// node's round holding the token never waits on it. `None`: not failed (already
    /// faulty, or the last in-sync member).
    fn mark_failed(&self, i: usize, why: &str) -> Option<PendingFailure<'_>> {
        {
            let mut slots = self.slots();
            let s = slots.get(i)?;
            if s.state == MemberState::Faulty {
                return None;
            }
            let in_sync = slots
                .iter()
                .filter(|s| s.state == MemberState::InSync)
                .count();
            if s.state == MemberState::InSync && in_sync <= 1 {
                tracing::error!(array = %self.name, member = %self.member(i).io.path().display(),
                    "I/O error on the last in-sync member, not failing it: {why}");
                return None;
            }
            // Pending before any write can skip the member: a write that skips it
            // waits for the update.
            self.sb_change_lock().writing += 1;
            slots[i].state = MemberState::Faulty;
        }
        tracing::warn!(array = %self.name, member = %self.member(i).io.path().display(),
            "member failed: {why}");
        Some(PendingFailure {
            raid: self,
            member: i,
            done: false,
        })
    }

    fn sb_change_lock(&self) -> MutexGuard<'_, SbChange> {
        self.sb_change.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// md's `md_write_start` wait on `MD_SB_CHANGE_PENDING`, at a write's (or flush's)
    /// end: returns once every member failure so far is durable in the superblocks
    /// (at most [`SB_CHANGE_WAIT`], then ETIMEDOUT). A failure whose update failed is
    /// written again once (serialised: one success serves every waiter); if that
    /// fails too the caller's I/O fails with EIO — it is never acknowledged while the
    /// superblocks still show the failed member in sync.
    async fn wait_sb_recorded(&self) -> io::Result<()> {
        let deadline = tokio::time::Instant::now() + SB_CHANGE_WAIT;
        let mut retried = false;
        loop {
            let changed = self.sb_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (writing, unrecorded) = {
                let ch = self.sb_change_lock();
                (ch.writing, ch.unrecorded.first().cloned())
            };
            match (writing, unrecorded) {
                (0, None) => return Ok(()),
                (0, Some((member, why))) => {
                    if retried {
                        return Err(eio(format!(
                            "array {}: the failure of member {} could not be recorded in the superblocks ({why}); the write is not acknowledged — check the members' devices",
                            self.name,
                            self.member(member).io.path().display()
                        )));
                    }
                    retried = true;
                    self.rerecord_failures().await;
                    continue;
                }
                _ => {}
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "array {}: a member failure was not recorded in the superblocks within {SB_CHANGE_WAIT:?}; the write is not acknowledged",
                        self.name
                    ),
                ));
            }
        }
    }

    /// Writes the superblocks again for failures whose update failed; the write carries
    /// every failed member, so on success none of them is unrecorded any more.
    async fn rerecord_failures(&self) {
        let write: IoFuture<'_, ()> = Box::pin(async {
            let _one = self.meta_lock.lock().await;
            let Some(&(member, _)) = self.sb_change_lock().unrecorded.first() else {
                return Ok(());
            };
            self.store(MetaEvent::Faulty { member }).await
        });
        // A success cleared what it carried (`store`).
        if let Err(e) = self
            .write_sb("record failed members".into(), write, MetaWrite::Local)
            .await
        {
            let mut ch = self.sb_change_lock();
            if let Some(u) = ch.unrecorded.first_mut() {
                u.1 = e.to_string();
            }
        }
        self.sb_changed.notify_waiters();
    }

    /// Gives free roles (missing or failed members) to spares, which start recovery;
    /// their superblock updates go out as `how` says.
    async fn activate_spares(&self, how: MetaWrite) {
        loop {
            let pick = {
                let mut slots = self.slots();
                let taken: Vec<u16> = slots
                    .iter()
                    .filter(|s| s.state != MemberState::Faulty && s.state != MemberState::Spare)
                    .filter_map(|s| s.role)
                    .collect();
                let free = (0..self.raid_disks() as u16).find(|r| !taken.contains(r));
                let spare = slots.iter().position(|s| s.state == MemberState::Spare);
                match (free, spare) {
                    (Some(role), Some(i)) => {
                        slots[i] = Slot {
                            state: MemberState::Recovering {
                                offset: 0,
                                bitmap_only: false,
                            },
                            role: Some(role),
                        };
                        Some((i, role))
                    }
                    _ => None,
                }
            };
            let Some((member, role)) = pick else { return };
            tracing::info!(array = %self.name, member = %self.member(member).io.path().display(),
                role, "spare takes the role, recovery starts");
            if let Err(e) = self
                .meta_update(MetaEvent::SpareActive { member, role }, how)
                .await
            {
                tracing::error!("failed to record the spare's new role: {e}");
            }
            self.sync.wake();
        }
    }

    /// Marks member `path` faulty (operator request, like `mdadm --fail`; or another
    /// node's, followed with [`MetaWrite::Following`]).
    pub async fn fail_by_path(
        &self,
        path: &std::path::Path,
        how: MetaWrite,
    ) -> Result<(), RaidError> {
        let i = self
            .members_snapshot()
            .iter()
            .position(|m| m.io.path() == path)
            .ok_or_else(|| RaidError::NoSuchMember {
                array: self.name.clone(),
                member: path.display().to_string(),
            })?;
        self.fail_member(i, "failed by request", how).await;
        Ok(())
    }

    /// Per member that is not faulty or removed: its path and the bytes it holds after
    /// its data offset.
    pub fn member_room_bytes(&self) -> Vec<(String, u64)> {
        let members = self.members_snapshot();
        let slots = self.slots().clone();
        let removed = self
            .removed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        members
            .iter()
            .enumerate()
            .filter(|(i, _)| {
                !removed.contains(i)
                    && slots
                        .get(*i)
                        .is_some_and(|s| s.state != MemberState::Faulty)
            })
            .map(|(_, m)| {
                (
                    m.io.path().display().to_string(),
                    m.io.size().saturating_sub(m.data_offset),
                )
            })
            .collect()
    }

    /// The number of roles (`raid_disks`).
    pub fn raid_disks(&self) -> u32 {
        self.raid_disks.load(Ordering::Acquire)
    }

    /// Grows the number of roles to `n` (like `mdadm --grow --raid-devices`, RAID1):
    /// the superblocks record it, and spares take the new roles at once (recovery).
    /// Shrinking is refused (`Ok(false)`), as is a change to the same count.
    pub async fn grow_raid_disks(&self, n: u32, how: MetaWrite) -> Result<bool, RaidError> {
        let cur = self.raid_disks();
        if n <= cur {
            return Ok(false);
        }
        self.raid_disks.store(n, Ordering::Release);
        tracing::info!(array = %self.name, from = cur, to = n, "raid disks grown");
        self.meta_update(MetaEvent::RaidDisks(n), how).await?;
        self.activate_spares(how).await;
        self.sync.wake();
        Ok(true)
    }

    /// Marks the recovering member at `path` in sync without copying: another node
    /// recovered it (its superblock says so); this node's superblock copies record it
    /// too (written as `how` says: [`MetaWrite::Following`] when the recovering node
    /// wrote them). Returns whether it changed.
    pub async fn mark_recovered(&self, path: &std::path::Path, how: MetaWrite) -> bool {
        let changed = {
            // Members before slots: the lock order of `add_member`.
            let members = self.members_snapshot();
            let mut slots = self.slots();
            let mut changed = None;
            for (i, s) in slots.iter_mut().enumerate() {
                let here = members.get(i).is_some_and(|m| m.io.path() == path);
                if here && matches!(s.state, MemberState::Recovering { .. }) {
                    s.state = MemberState::InSync;
                    changed = Some(i);
                    break;
                }
            }
            changed
        };
        let Some(i) = changed else {
            return false;
        };
        tracing::info!(array = %self.name, member = %path.display(), "recovered by another node");
        if self.in_sync_count() >= self.raid_disks() as usize {
            // The recovering node copied every chunk this node had marked (a re-add
            // gathers every slot's bits): nothing is owed any more.
            if let Some(bm) = self.bitmap() {
                bm.clear_all_needed();
            }
        }
        if let Err(e) = self
            .meta_update(MetaEvent::RecoveryDone { member: i }, how)
            .await
        {
            tracing::warn!("failed to record the recovered member: {e}");
        }
        true
    }

    /// Removes a faulty or spare member (like `mdadm --remove`): no I/O goes to it,
    /// its role in the other members' superblocks becomes unused (0xffff), and status
    /// marks it removed. `Ok(false)`: the member is active (fail it first); nothing done.
    pub async fn remove_by_path(
        &self,
        path: &std::path::Path,
        how: MetaWrite,
    ) -> Result<bool, RaidError> {
        let removed = self
            .removed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let i = self
            .members_snapshot()
            .iter()
            .enumerate()
            .position(|(i, m)| m.io.path() == path && !removed.contains(&i))
            .ok_or_else(|| RaidError::NoSuchMember {
                array: self.name.clone(),
                member: path.display().to_string(),
            })?;
        {
            let mut slots = self.slots();
            match slots[i].state {
                MemberState::Faulty => {}
                MemberState::Spare => slots[i].state = MemberState::Faulty,
                _ => return Ok(false),
            }
        }
        self.removed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(i);
        tracing::info!(array = %self.name, member = %path.display(), "member removed");
        self.meta_update(MetaEvent::Removed { member: i }, how)
            .await?;
        Ok(true)
    }

    /// The in-sync member a resync copies from and reads use while members may differ:
    /// the one with the lowest role (md's raid1 reads the mirrors in role order), so
    /// every node picks the same device whatever order the members were given in. In-sync
    /// members of a running array share one event count (a member with fewer events
    /// is recovered, never in sync), so the role alone decides.
    pub(crate) fn sync_source(&self) -> Option<usize> {
        let slots = self.slots();
        let cands: Vec<usize> = (0..slots.len())
            .filter(|&i| slots[i].state == MemberState::InSync)
            .collect();
        lowest_role(&slots, &cands)
    }

    fn pick_reader(&self, tried: &[usize], offset: u64, len: u64) -> Option<usize> {
        let slots = self.slots();
        let cands: Vec<usize> = slots
            .iter()
            .enumerate()
            .filter(|(i, s)| s.state == MemberState::InSync && !tried.contains(i))
            .map(|(i, _)| i)
            .collect();
        if cands.is_empty() {
            return None;
        }
        if self.sync.resync_running() || self.in_remote_window(offset, len) {
            // Members may differ here: read the copy the resync copies from.
            return lowest_role(&slots, &cands);
        }
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        let n = cands.len();
        (0..n)
            .map(|k| cands[(start + k) % n])
            .min_by_key(|&i| self.member(i).reads.load(Ordering::Relaxed))
    }

    async fn read_impl(&self, offset: u64, len: u32) -> io::Result<Bytes> {
        self.check_range(offset, len as u64)?;
        let _p = self.permit().await?;
        self.note_io();
        let mut tried = Vec::new();
        loop {
            let Some(i) = self.pick_reader(&tried, offset, len as u64) else {
                return Err(eio(format!(
                    "array {}: read at {offset}: no member could serve it",
                    self.name
                )));
            };
            let m = self.member(i);
            m.reads.fetch_add(1, Ordering::Relaxed);
            let r = m.io.read_at(m.data_offset + offset, len as usize).await;
            m.reads.fetch_sub(1, Ordering::Relaxed);
            match r {
                Ok(b) => return Ok(b),
                // Fenced: no member failed; the request waits or fails.
                Err(e) if is_fenced(&e) => return Err(e),
                Err(e) => {
                    tried.push(i);
                    self.count_io_error(i);
                    if !self
                        .fail_member(i, &format!("read at {offset}: {e}"), MetaWrite::Local)
                        .await
                        && self.pick_reader(&tried, offset, len as u64).is_none()
                    {
                        return Err(e);
                    }
                }
            }
        }
    }

    /// Writes `data` to members `targets` (at array `offset`); marks those that fail
    /// Faulty (their superblock updates are returned, for the caller to run once it
    /// left the barrier). Returns (in-sync members that took it, all members that took
    /// it, the last error, the owed updates).
    async fn fan_out(
        &self,
        targets: &[(usize, MemberState)],
        offset: u64,
        data: Bytes,
        fua: bool,
    ) -> FanOut<'_> {
        let ops = targets.iter().map(|&(i, _)| {
            let m = self.member(i);
            let data = data.clone();
            async move {
                m.io.write_at(m.data_offset + offset, data).await?;
                if fua {
                    m.io.sync().await?;
                }
                Ok::<(), io::Error>(())
            }
        });
        let results = futures::future::join_all(ops).await;
        let mut out = FanOut {
            in_sync_ok: 0,
            ok: 0,
            err: None,
            fenced: None,
            owed: Vec::new(),
        };
        for (&(i, state), r) in targets.iter().zip(results) {
            match r {
                Ok(()) => {
                    out.ok += 1;
                    if state == MemberState::InSync {
                        out.in_sync_ok += 1;
                    }
                }
                // Refused by the fence gate: the member is fine, the node is not.
                Err(e) if is_fenced(&e) => out.fenced = Some(e),
                Err(e) => {
                    self.count_io_error(i);
                    out.owed
                        .extend(self.mark_failed(i, &format!("write at {offset}: {e}")));
                    out.err = Some(e);
                }
            }
        }
        out
    }

    fn write_targets(&self) -> Vec<(usize, MemberState)> {
        self.slots()
            .iter()
            .enumerate()
            .filter(|(_, s)| {
                matches!(
                    s.state,
                    MemberState::InSync | MemberState::Recovering { .. }
                )
            })
            .map(|(i, s)| (i, s.state))
            .collect()
    }

    async fn write_impl(&self, offset: u64, data: Bytes, fua: bool) -> io::Result<()> {
        let len = data.len() as u64;
        self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let _p = self.permit().await?;
        self.note_io();
        // Counted before the dirty check: safemode re-checks this count after it
        // cleared the flag, so a write never runs under a clean superblock.
        let _w = WriteCount::new(self);
        self.mark_dirty().await?;
        let window = self.enter_outside_remote_window(offset, len).await?;
        let barrier = self.barrier.read().await;
        // The bitmap is replaced only under the exclusive barrier: this one ends it too.
        let bitmap = self.bitmap();
        if let Some(bm) = &bitmap {
            bm.start_write(offset, len)
                .await
                .map_err(|e| eio(e.to_string()))?;
        }
        let targets = self.write_targets();
        let data = member::aligned_copy(&data);
        let FanOut {
            in_sync_ok,
            ok,
            err,
            fenced,
            owed,
        } = self.fan_out(&targets, offset, data, fua).await;
        // A member the gate refused keeps the chunks' bits too (not on every member).
        let degraded = ok < self.raid_disks() as usize;
        if let Some(bm) = &bitmap {
            bm.end_write(offset, len, degraded);
        }
        // The data is on the members: a resync step or a window being installed need
        // not wait for the superblock updates below (which may need the cluster token
        // another node's round holds). The failed members are Faulty already, so no
        // later write goes to them, and a window is not acknowledged while their
        // update is owed (`set_remote_resync_window`).
        drop(barrier);
        drop(window);
        for failure in owed {
            failure.record(MetaWrite::Local).await;
        }
        if let Some(e) = fenced {
            // Never acknowledged while a member did not take it because of the fence.
            return Err(e);
        }
        if in_sync_ok == 0 {
            return Err(
                err.unwrap_or_else(|| eio(format!("array {}: no in-sync member", self.name)))
            );
        }
        self.wait_sb_recorded().await
    }

    async fn flush_impl(&self) -> io::Result<()> {
        let _p = self.permit().await?;
        let targets = self.write_targets();
        let members: Vec<Arc<Member>> = targets.iter().map(|&(i, _)| self.member(i)).collect();
        let ops = members.iter().map(|m| m.io.sync());
        let results = futures::future::join_all(ops).await;
        let mut in_sync_ok = 0;
        let mut last_err = None;
        let mut fenced = None;
        for (&(i, state), r) in targets.iter().zip(results) {
            match r {
                Ok(()) if state == MemberState::InSync => in_sync_ok += 1,
                Ok(()) => {}
                Err(e) if is_fenced(&e) => fenced = Some(e),
                Err(e) => {
                    self.count_io_error(i);
                    self.fail_member(i, &format!("flush: {e}"), MetaWrite::Local)
                        .await;
                    last_err = Some(e);
                }
            }
        }
        if let Some(e) = fenced {
            return Err(e);
        }
        if in_sync_ok == 0 {
            return Err(
                last_err.unwrap_or_else(|| eio(format!("array {}: no in-sync member", self.name)))
            );
        }
        self.wait_sb_recorded().await
    }

    /// Flushes every member that takes writes (in sync and recovering), so every data
    /// write completed so far is durable on each; fails naming the first member that
    /// could not (nothing is failed here: the bitmap calls this under its flush lock,
    /// which a member failure's superblock update also takes).
    pub(crate) async fn sync_members(&self) -> io::Result<()> {
        let targets = self.write_targets();
        let members: Vec<Arc<Member>> = targets.iter().map(|&(i, _)| self.member(i)).collect();
        let results = futures::future::join_all(members.iter().map(|m| m.io.sync())).await;
        for (m, r) in members.iter().zip(results) {
            if let Err(e) = r {
                return Err(io::Error::new(
                    e.kind(),
                    format!(
                        "array {}: flush member {}: {e}",
                        self.name,
                        m.io.path().display()
                    ),
                ));
            }
        }
        Ok(())
    }

    async fn write_zeroes_impl(&self, offset: u64, len: u32, fua: bool) -> io::Result<()> {
        self.check_range(offset, len as u64)?;
        let mut done = 0u32;
        let zeroes = member::aligned_zeroes(ZERO_PIECE.min(len) as usize);
        while done < len {
            let n = (len - done).min(ZERO_PIECE);
            self.write_impl(offset + done as u64, zeroes.slice(..n as usize), fua)
                .await?;
            done += n;
        }
        Ok(())
    }

    /// The array's state now.
    pub fn status(&self) -> RaidStatus {
        let slots = self.slots().clone();
        let in_sync = slots
            .iter()
            .filter(|s| s.state == MemberState::InSync)
            .count();
        let removed = self
            .removed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        RaidStatus {
            name: self.name.clone(),
            size: self.size(),
            raid_disks: self.raid_disks(),
            degraded: in_sync < self.raid_disks() as usize,
            members: self
                .members_snapshot()
                .iter()
                .zip(slots)
                .enumerate()
                .map(|(i, (m, s))| MemberStatus {
                    path: m.io.path().display().to_string(),
                    dev_number: m.dev_number,
                    role: s.role,
                    state: s.state,
                    direct: m.io.is_direct(),
                    removed: removed.contains(&i),
                })
                .collect(),
            sync: self.sync.progress(),
            bitmap: self.bitmap().map(|b| b.stats()),
        }
    }

    /// The bitmap, if any.
    pub fn bitmap(&self) -> Option<Arc<WriteIntent>> {
        self.bitmap
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The array's logical block size: the largest among its members (see
    /// [`MemberIo::block_size`]). Writes of whole blocks reach every member without a
    /// read-modify-write.
    pub fn block_size(&self) -> u32 {
        let members = self.members.read().unwrap_or_else(|e| e.into_inner());
        let max = members
            .iter()
            .map(|m| m.io.block_size())
            .max()
            .unwrap_or(crate::directio::SECTOR);
        u32::try_from(max).unwrap_or(u32::MAX)
    }

    /// Array size in bytes.
    pub fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    /// Sets the capacity clients see (`grow --size`, after the superblocks and the
    /// bitmap cover it). Connected NBD clients keep the size they were given; I/O past
    /// a smaller end is refused from now on.
    pub fn set_size(&self, bytes: u64) {
        let old = self.size.swap(bytes, Ordering::AcqRel);
        if old != bytes {
            tracing::info!(array = %self.name, from = old, to = bytes, "capacity changed");
        }
    }

    /// Whether a resync or recovery is running, pending, or owed (a member
    /// recovering): the array's shape must not change now.
    pub fn sync_busy(&self) -> bool {
        self.sync.resync_running()
            || self.sync.pending()
            || self.sync.resync_checkpoint_sectors().is_some()
            || self
                .slots()
                .iter()
                .any(|s| matches!(s.state, MemberState::Recovering { .. }))
    }

    /// Asks for a resync of everything from `from` (array bytes) on, as after growing
    /// an array without a bitmap (with a bitmap the chunks marked needed decide).
    pub fn request_resync_from(&self, from: u64) {
        self.sync.request_resync_from(from);
    }

    /// Asks for a resync: with a bitmap, of the chunks marked needed (e.g. a survivor
    /// merged a dead node's dirty chunks into this node's bitmap with
    /// `WriteIntent::start_write` + `end_write(.., degraded = true)`, as
    /// `service/takeover.rs` does); without one, of everything. Runs in the background; a
    /// resync already pending or running is not restarted (it picks up chunks marked
    /// needed before it reaches them; later ones are taken by the next run, which this
    /// call also queues).
    pub fn request_resync(&self) {
        self.sync.request_resync();
    }

    /// Installs (or removes) the cluster gate every sync run of a gated array waits for.
    pub fn set_sync_gate(&self, gate: Option<Arc<dyn sync::SyncGate>>) {
        self.sync.set_gate(gate);
    }

    /// Whether a sync run waits for its gate (mdstat `resync=PENDING`).
    pub fn sync_pending(&self) -> bool {
        self.sync.pending()
    }

    /// The range another node resyncs now, if any ([`Raid1::set_remote_resync_window`]).
    pub fn remote_resync_window(&self) -> Option<(u64, u64)> {
        self.remote_lock().window
    }

    fn remote_lock(&self) -> MutexGuard<'_, Remote> {
        self.remote.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sets (or clears with `None`) the range, in array bytes `[lo, hi)`, that another
    /// node is resyncing (md-cluster RESYNCING): reads there go to the lowest-role
    /// in-sync member; writes there wait until the window moves past them (ETIMEDOUT
    /// once it has not moved for [`REMOTE_STALL`], or after [`REMOTE_WAIT_MAX`]). Returns once every write that passed its
    /// window check before and overlaps the new window has finished (md's
    /// `remote_sync` quiesce), so an acknowledgement means no write of this node lands
    /// inside the window any more; after [`REMOTE_QUIESCE`] it fails, naming the
    /// writes still in flight (the window stays installed).
    pub async fn set_remote_resync_window(
        &self,
        window: Option<(u64, u64)>,
    ) -> Result<(), RaidError> {
        let window = window.filter(|(lo, hi)| lo < hi);
        self.remote_lock().window = window;
        self.remote_changed.notify_waiters();
        let Some(w) = window else { return Ok(()) };
        let deadline = tokio::time::Instant::now() + REMOTE_QUIESCE;
        loop {
            let left = self.write_left.notified();
            tokio::pin!(left);
            left.as_mut().enable();
            let busy: Vec<(u64, u64)> = self
                .remote_lock()
                .writes
                .values()
                .filter(|&&(lo, hi)| overlaps(w, lo, hi - lo))
                .copied()
                .collect();
            if busy.is_empty() {
                return self.no_failure_pending(w);
            }
            if tokio::time::timeout_at(deadline, left).await.is_err() {
                return Err(RaidError::Quiesce {
                    array: self.name.clone(),
                    window: w,
                    writes: busy,
                    timeout: REMOTE_QUIESCE,
                });
            }
        }
    }

    /// A window is acknowledged only while no member failure of this node is owed to
    /// the superblocks: a write that skipped (or failed on) a member marks it Faulty
    /// before it leaves the window registry, so once the writes into the window have
    /// ended, every such failure is visible here. Its update may need the token the
    /// resyncing node holds for this round: refused at once (no wait), the resyncing
    /// node retries after its round released the token, and learns of the failure
    /// from the METADATA_UPDATED that follows.
    fn no_failure_pending(&self, window: (u64, u64)) -> Result<(), RaidError> {
        let (writing, unrecorded) = {
            let ch = self.sb_change_lock();
            (ch.writing, ch.unrecorded.first().map(|u| u.0))
        };
        // Slots are locked before `sb_change` elsewhere (`mark_failed`): not nested here.
        let member = match (writing, unrecorded) {
            (0, None) => return Ok(()),
            (_, Some(m)) => self.member(m).io.path().display().to_string(),
            (n, None) => {
                let slots = self.slots();
                let faulty: Vec<String> = (0..slots.len())
                    .filter(|&i| slots[i].state == MemberState::Faulty)
                    .map(|i| self.member(i).io.path().display().to_string())
                    .collect();
                format!("{} ({n} update(s) being written)", faulty.join(", "))
            }
        };
        Err(RaidError::FailurePending {
            array: self.name.clone(),
            window,
            member,
        })
    }

    fn in_remote_window(&self, offset: u64, len: u64) -> bool {
        self.remote_lock()
            .window
            .is_some_and(|w| overlaps(w, offset, len))
    }

    /// Registers a write of `len` bytes at `offset` as in flight once it is outside
    /// another node's resync window, waiting for the window to move past it: while the
    /// window moves the write waits on (at most [`REMOTE_WAIT_MAX`]); once it has not
    /// moved for [`REMOTE_STALL`] the write fails. Registration and the check are one
    /// step under the window's lock: a window installed later waits for this write; a
    /// write registered later sees the window.
    async fn enter_outside_remote_window(
        &self,
        offset: u64,
        len: u64,
    ) -> io::Result<WindowEntry<'_>> {
        let start = tokio::time::Instant::now();
        let limit = start + REMOTE_WAIT_MAX;
        let mut stall = start + REMOTE_STALL;
        let mut seen: Option<(u64, u64)> = None;
        loop {
            let changed = self.remote_changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut r = self.remote_lock();
                match r.window {
                    Some(w) if overlaps(w, offset, len) => {
                        if seen.is_some_and(|s| s != w) {
                            // The window moved: the resync makes progress.
                            stall = tokio::time::Instant::now() + REMOTE_STALL;
                        }
                        seen = Some(w);
                    }
                    _ => {
                        let id = r.next_id;
                        r.next_id += 1;
                        r.writes.insert(id, (offset, offset + len.max(1)));
                        return Ok(WindowEntry { raid: self, id });
                    }
                }
            }
            if tokio::time::timeout_at(stall.min(limit), changed)
                .await
                .is_err()
            {
                let (lo, hi) = seen.unwrap_or_default();
                let why = if tokio::time::Instant::now() >= limit {
                    format!("waited {REMOTE_WAIT_MAX:?} in all")
                } else {
                    format!("the window has not moved for {REMOTE_STALL:?}")
                };
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!(
                        "array {}: write at {offset}+{len} is inside another node's resync window [{lo}, {hi}) (bytes) and {why}; check the resyncing node (mdctl status)",
                        self.name
                    ),
                ));
            }
        }
    }

    /// Changes the sync speed limits (KiB/s) while the array runs.
    pub fn set_speed(&self, limits: SpeedLimits) {
        self.sync.set_speed(limits);
    }

    /// Stops the array's work: the sync worker (its checkpoint written), then waits at
    /// most `timeout` for in-flight I/O and closes the I/O gate, writes the bitmap
    /// (idle bits cleared), syncs the members and marks the superblocks clean (or with
    /// the resync checkpoint if a resync is unfinished). Fenced ([`Raid1::fence`]):
    /// the same without any metadata write.
    pub async fn shutdown(&self, timeout: Duration) -> Result<(), RaidError> {
        let _ = self.stop_tx.send(true);
        let tasks = std::mem::take(&mut *self.tasks.lock().unwrap_or_else(|e| e.into_inner()));
        for t in tasks {
            if tokio::time::timeout(timeout, t).await.is_err() {
                tracing::warn!(array = %self.name, "a background task did not stop within {timeout:?}");
            }
        }
        match tokio::time::timeout(timeout, self.gate.acquire_many(MAX_INFLIGHT)).await {
            Ok(Ok(p)) => p.forget(),
            Ok(Err(_)) => {}
            Err(_) => {
                return Err(RaidError::DrainTimeout {
                    array: self.name.clone(),
                    timeout,
                });
            }
        }
        self.gate.close();
        if self.is_fenced() {
            // Fenced: the members keep the metadata as it is (no bitmap pages, no
            // superblock); whoever holds the slot next resyncs what it marks.
            tracing::warn!(array = %self.name, "stopped fenced: no metadata written");
            return Ok(());
        }
        if let Some(bm) = self.bitmap() {
            bm.clear_idle_and_flush()
                .await
                .map_err(|source| RaidError::Bitmap {
                    array: self.name.clone(),
                    source,
                })?;
        }
        for i in self.live() {
            if let Err(e) = self.member(i).io.sync().await {
                tracing::warn!(array = %self.name, member = %self.member(i).io.path().display(),
                    "failed to sync at stop: {e}");
            }
        }
        let resync = self.sync.resync_checkpoint_sectors().unwrap_or(u64::MAX);
        self.meta_update(MetaEvent::ResyncOffset(resync), MetaWrite::Local)
            .await
    }
}

impl BlockDevice for Raid1 {
    fn size(&self) -> u64 {
        Raid1::size(self)
    }
    fn block_size(&self) -> u32 {
        Raid1::block_size(self)
    }
    fn read(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
        Box::pin(self.suspendable(move || self.read_impl(offset, len)))
    }
    fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(self.suspendable(move || self.write_impl(offset, data.clone(), fua)))
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        Box::pin(self.suspendable(move || self.flush_impl()))
    }
    fn trim(&self, offset: u64, len: u32) -> IoFuture<'_, ()> {
        // A hint: RAID1 members keep their data, so they stay identical.
        Box::pin(async move { self.check_range(offset, len as u64) })
    }
    fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> IoFuture<'_, ()> {
        Box::pin(self.suspendable(move || self.write_zeroes_impl(offset, len, fua)))
    }
}

/// What a write's fan-out to the members did.
struct FanOut<'a> {
    /// In-sync members that took it.
    in_sync_ok: usize,
    /// Members that took it.
    ok: usize,
    /// The last member error (those members are marked Faulty).
    err: Option<io::Error>,
    /// A refusal of the fence gate (no member failed for it).
    fenced: Option<io::Error>,
    /// Superblock updates owed for the members marked Faulty.
    owed: Vec<PendingFailure<'a>>,
}

#[cfg(test)]
mod tests;
