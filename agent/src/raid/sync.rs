//! The resync/recovery worker of one array: one background task that copies data
//! from the first in-sync member onto the others (resync) or onto recovering members
//! (recovery), a step at a time, throttled and checkpointed.
//!
//! - **Resync** runs after an unclean stop or for a new array: with a bitmap only the
//!   chunks marked needed, without one everything from the `resync_offset` checkpoint.
//! - **Recovery** copies onto members in [`MemberState::Recovering`]: everything from
//!   their `recovery_offset`, or only the needed chunks for a re-added member.
//!   It runs before a pending resync; when the array is dirty too, the same run does
//!   the resync: its ranges go onto the other in-sync members as well (`plan`).
//! - Each step (at most [`STEP`] bytes) holds the array's write barrier exclusively, so
//!   no user write into the step's range is in flight while it is copied.
//! - Speed: like md's `speed_limit_min/max` (KiB/s). The worker runs at `max` while the
//!   array is idle and at `min` while user I/O happened within the last 500 ms. Both can
//!   be changed at any time; the worker picks the change up at once.
//! - Checkpoints go to the superblocks about every second and at stop
//!   (`resync_offset`, or `recovery_offset` of the recovering member), so an
//!   interrupted run continues where it stopped. Exception: once the array has been
//!   written (dirty), `resync_offset` stays 0 until a clean stop writes the checkpoint,
//!   since after a crash a write in flight below the checkpoint must be resynced too
//!   (with a bitmap the dirty bits decide what is resynced anyway).
//!
//! - **Cluster gate** ([`SyncGate`], md-cluster's `resync` lock and RESYNCING): when
//!   the array is assembled with a gate required, every run first waits for the gate
//!   (status `pending`, mdstat `resync=PENDING`), tells it each window it is about to
//!   copy (sized by [`WINDOW_SECS`], at most [`GATE_WINDOW`]) and copies it only once
//!   the gate says every node acknowledged it (else it asks again, bounded by
//!   [`WINDOW_RETRY_FOR`]), and tells it when the run ends. The gate may answer that the work
//!   was done elsewhere ([`GateDecision::Done`]): the pending resync is dropped.
//!
//! Worker states follow garage's `Worker`: [`WorkerState::Busy`], `Throttled`, `Idle`,
//! and `Done` once the worker has exited.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Notify};

use super::{MemberState, MetaEvent, Raid1};

/// The largest window a gated run announces before copying into it (md-cluster's
/// `CLUSTER_RESYNC_WINDOW`, 32 MiB). A window is sized to pass in about
/// [`WINDOW_SECS`] at the speed in effect (at least [`STEP`]), so another node's
/// writes held by it wait seconds, not the 33 s a 32 MiB window takes at md's default
/// minimum speed.
pub const GATE_WINDOW: u64 = 32 << 20;
/// How long a window should last at the speed in effect when it is announced; a
/// window whose rest would last over twice as long at the current speed (the array
/// became busy: the minimum speed applies) is announced again, smaller.
pub const WINDOW_SECS: u64 = 4;
/// A window not acknowledged by every node is announced again after a pause growing
/// from 200 ms to [`WINDOW_RETRY_MAX_PAUSE`]; nothing is copied meanwhile. After
/// [`WINDOW_RETRY_FOR`] without an acknowledgement the run fails (and is planned
/// again later, as after a member failure).
pub const WINDOW_RETRY_FOR: Duration = Duration::from_secs(120);
/// Longest pause between two announcements of an unacknowledged window.
pub const WINDOW_RETRY_MAX_PAUSE: Duration = Duration::from_secs(5);

/// A boxed future of a [`SyncGate`] call.
pub type GateFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What a gate says before a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateDecision {
    /// Run now (the gate is held until [`SyncGate::end`]).
    Run,
    /// The resync was finished elsewhere: drop the pending resync (needed chunks stay
    /// needed; no `end` follows).
    Done,
    /// Not now: the worker tries again after a pause (no `end` follows).
    Later,
}

/// Cluster-wide coordination of sync runs (implemented by the cluster agent).
pub trait SyncGate: Send + Sync {
    /// Waits until this node may run a `kind` run of `bytes` (0: a resync with no
    /// chunk needed here); may take long (cancelled when the array stops).
    fn begin(&self, kind: SyncKind, bytes: u64) -> GateFuture<'_, GateDecision>;
    /// The run is about to copy inside `[lo, hi)` (array bytes). `Ok` only once every
    /// node acknowledged that no write of its own is in flight there (and that none of
    /// its member failures is unrecorded); `Err` (the reason): nothing may be copied
    /// there yet.
    fn window(&self, lo: u64, hi: u64) -> GateFuture<'_, Result<(), String>>;
    /// The run ended; `finished`: it completed.
    fn end(&self, kind: SyncKind, finished: bool) -> GateFuture<'_, ()>;
}

/// Largest piece copied in one step.
pub const STEP: u64 = 1 << 20;
/// How often a checkpoint is written while a sync runs.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);
/// User I/O within this window makes the worker run at the minimum speed.
const BUSY_WINDOW: Duration = Duration::from_millis(500);
/// Failed runs in a row after which the worker waits for a change instead of retrying.
const MAX_FAILED_RUNS: u32 = 5;
/// Completed runs kept for status.
const HISTORY: usize = 8;

/// Speed limits of resync and recovery, KiB/s (md's `speed_limit_min/max`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SpeedLimits {
    /// Guaranteed even while the array is busy.
    pub min_kib_s: u64,
    /// Never exceeded.
    pub max_kib_s: u64,
}

impl Default for SpeedLimits {
    fn default() -> Self {
        // md's defaults.
        SpeedLimits {
            min_kib_s: 1_000,
            max_kib_s: 200_000,
        }
    }
}

/// What a sync run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SyncKind {
    /// Makes the in-sync members identical.
    Resync,
    /// Copies onto a new or re-added member.
    Recovery,
}

/// What the worker is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Nothing to do.
    #[default]
    Idle,
    /// Copying.
    Busy,
    /// Waiting for the speed limit.
    Throttled,
    /// Exited (the array is stopping).
    Done,
}

/// A finished (or interrupted) run.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompletedSync {
    /// Resync or recovery.
    pub kind: SyncKind,
    /// Bytes copied.
    pub bytes: u64,
    /// Bitmap chunks copied (0 when the run was not driven by the bitmap).
    pub chunks: u64,
    /// Whether the run was driven by the bitmap.
    pub bitmap: bool,
    /// Whether it was interrupted (stop) rather than finished.
    pub interrupted: bool,
    /// Duration in seconds.
    pub secs: f64,
}

/// Progress of the current run, and the recent finished ones.
#[derive(Debug, Clone, Default, Serialize)]
pub struct SyncProgress {
    /// What runs now, if anything.
    pub kind: Option<SyncKind>,
    /// Worker state.
    pub state: WorkerState,
    /// Bytes copied in this run.
    pub done_bytes: u64,
    /// Bytes this run has to copy.
    pub total_bytes: u64,
    /// Bitmap chunks copied in this run.
    pub chunks_done: u64,
    /// Bitmap chunks this run has to copy.
    pub chunks_total: u64,
    /// Average speed of this run, KiB/s.
    pub rate_kib_s: u64,
    /// Current limits.
    pub speed: SpeedLimits,
    /// Runs that ended in an error (a member failed under them).
    pub errors: u64,
    /// Recent runs, oldest first.
    pub completed: Vec<CompletedSync>,
}

/// State shared between the array and its worker.
pub(crate) struct SyncShared {
    speed: Mutex<SpeedLimits>,
    speed_changed: Notify,
    wake: Notify,
    progress: Mutex<SyncProgress>,
    /// A resync to do from this array byte offset.
    resync: Mutex<Option<u64>>,
    resync_running: AtomicBool,
    /// A resync was requested while one ran: plan another once it ends.
    pending_rerun: AtomicBool,
    /// Runs wait for a [`SyncGate`] (cluster mode).
    pub(crate) gated: bool,
    gate: Mutex<Option<Arc<dyn SyncGate>>>,
    gate_set: Notify,
    /// A run waits for its gate.
    pending: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Plain data: a panicking holder leaves it usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl SyncShared {
    pub(crate) fn new(speed: SpeedLimits, resync_from: Option<u64>, gated: bool) -> SyncShared {
        SyncShared {
            speed: Mutex::new(speed),
            speed_changed: Notify::new(),
            wake: Notify::new(),
            progress: Mutex::new(SyncProgress {
                speed,
                ..Default::default()
            }),
            resync: Mutex::new(resync_from),
            resync_running: AtomicBool::new(false),
            pending_rerun: AtomicBool::new(false),
            gated,
            gate: Mutex::new(None),
            gate_set: Notify::new(),
            pending: AtomicBool::new(false),
        }
    }

    pub(crate) fn set_gate(&self, gate: Option<Arc<dyn SyncGate>>) {
        *lock(&self.gate) = gate;
        self.gate_set.notify_waiters();
        self.wake();
    }

    pub(crate) fn pending(&self) -> bool {
        self.pending.load(Ordering::Acquire)
    }

    pub(crate) fn set_speed(&self, limits: SpeedLimits) {
        *lock(&self.speed) = limits;
        lock(&self.progress).speed = limits;
        self.speed_changed.notify_one();
    }

    pub(crate) fn request_resync(&self) {
        let mut r = lock(&self.resync);
        if r.is_none() {
            *r = Some(0);
        }
        drop(r);
        self.pending_rerun.store(true, Ordering::Release);
        self.wake();
    }

    pub(crate) fn request_resync_from(&self, from: u64) {
        let mut r = lock(&self.resync);
        *r = Some(r.map_or(from, |x| x.min(from)));
        drop(r);
        self.pending_rerun.store(true, Ordering::Release);
        self.wake();
    }

    pub(crate) fn wake(&self) {
        self.wake.notify_one();
    }

    pub(crate) fn progress(&self) -> SyncProgress {
        lock(&self.progress).clone()
    }

    /// The resync checkpoint in sectors, if a resync is pending.
    pub(crate) fn resync_checkpoint_sectors(&self) -> Option<u64> {
        lock(&self.resync).map(|b| b / 512)
    }

    pub(crate) fn resync_running(&self) -> bool {
        self.resync_running.load(Ordering::Acquire)
    }

    fn set_state(&self, s: WorkerState) {
        lock(&self.progress).state = s;
    }
}

/// One range to copy; `chunk` when it is a bitmap chunk.
#[derive(Debug, Clone, Copy)]
struct Range {
    start: u64,
    end: u64,
    chunk: Option<u64>,
    /// Written to the recovering members ([`Job::targets`]).
    recover: bool,
    /// Written to the in-sync members other than the source ([`Job::resync_targets`]).
    resync: bool,
}

#[derive(Debug)]
pub(super) struct Job {
    kind: SyncKind,
    pub(super) source: usize,
    /// Recovering members (a recovery).
    targets: Vec<usize>,
    /// In-sync members other than the source (a resync, also one covered by a
    /// recovery of a dirty array).
    resync_targets: Vec<usize>,
    /// The job also does the pending resync: when it finishes, the resync is done.
    covers_resync: bool,
    ranges: Vec<Range>,
    bitmap: bool,
}

enum Outcome {
    Finished,
    Interrupted,
    Failed,
}

/// What the next run does (`None`: nothing to do).
///
/// A recovery comes first, as in md. If the array is also dirty (a resync pending,
/// e.g. after a crash that left a member recovering), the recovery run does the resync
/// of the in-sync members in the same pass, the way md's resync writes every in-sync
/// member but the one it reads: it copies the resync's ranges (the needed chunks, or
/// everything from the resync checkpoint) onto the other in-sync members too.
/// Otherwise a recovery would clear the needed marks (chunk by chunk, or all at once
/// after a full recovery) while the in-sync members still differ there.
pub(super) fn plan(raid: &Raid1) -> Option<Job> {
    // The lowest-role in-sync member, the same device on every node.
    let source = raid.sync_source()?;
    let slots = raid.slots().clone();
    let in_sync: Vec<usize> = (0..slots.len())
        .filter(|&i| slots[i].state == MemberState::InSync)
        .collect();
    let recovering: Vec<(usize, u64, bool)> = slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s.state {
            MemberState::Recovering {
                offset,
                bitmap_only,
            } => Some((i, offset, bitmap_only)),
            _ => None,
        })
        .collect();
    let size = raid.size();
    let bitmap = raid.bitmap();
    let needed_ranges = |recover: bool, resync: bool| -> Vec<Range> {
        let Some(bm) = bitmap.as_ref() else {
            return Vec::new();
        };
        let cb = bm.geometry().chunk_bytes;
        bm.needed_chunks()
            .into_iter()
            .map(|c| Range {
                start: c * cb,
                end: ((c + 1) * cb).min(size),
                chunk: Some(c),
                recover,
                resync,
            })
            .filter(|r| r.start < r.end)
            .collect()
    };
    let extras: Vec<usize> = in_sync.iter().copied().filter(|&i| i != source).collect();
    let resync_from = *lock(&raid.sync.resync);
    if resync_from.is_some() && extras.is_empty() && recovering.is_empty() {
        // Nothing to make identical; a degraded array's needed chunks stay for recovery.
        *lock(&raid.sync.resync) = None;
        return None;
    }
    if resync_from.is_some() {
        // Requests from now on need another run (their chunks may be missed by this one).
        raid.sync.pending_rerun.store(false, Ordering::Release);
    }
    if !recovering.is_empty() {
        let from = recovering.iter().map(|r| r.1).min().unwrap_or(0);
        let bitmap_only = bitmap.is_some() && recovering.iter().all(|r| r.2);
        let covers_resync = resync_from.is_some();
        // The resync's ranges go to the recovering members too: below its recovery
        // offset a recovering member took the same writes as the in-sync ones.
        let ranges = match (bitmap_only, resync_from) {
            // Both are the needed chunks.
            (true, _) => needed_ranges(true, covers_resync),
            (false, None) => vec![Range {
                start: from,
                end: size,
                chunk: None,
                recover: true,
                resync: false,
            }],
            // With a bitmap the needed chunks are resynced (whole chunks, so that no
            // mark is cleared before its chunk is copied onto every in-sync member),
            // then the recovering members are copied in full.
            (false, Some(_)) if bitmap.is_some() => {
                let mut r = needed_ranges(true, true);
                r.push(Range {
                    start: from,
                    end: size,
                    chunk: None,
                    recover: true,
                    resync: false,
                });
                r
            }
            // Without one: the recovering members from the lower of the two offsets,
            // the other in-sync members from the resync checkpoint.
            (false, Some(rfrom)) => {
                let lo = from.min(rfrom);
                let hi = from.max(rfrom).min(size);
                let mut r = Vec::new();
                if lo < hi {
                    r.push(Range {
                        start: lo,
                        end: hi,
                        chunk: None,
                        recover: true,
                        resync: rfrom == lo,
                    });
                }
                if hi < size {
                    r.push(Range {
                        start: hi,
                        end: size,
                        chunk: None,
                        recover: true,
                        resync: true,
                    });
                }
                r
            }
        };
        return Some(Job {
            kind: SyncKind::Recovery,
            source,
            targets: recovering.iter().map(|r| r.0).collect(),
            resync_targets: if covers_resync { extras } else { Vec::new() },
            covers_resync,
            ranges,
            bitmap: bitmap_only,
        });
    }
    let from = resync_from?;
    let (ranges, bitmap) = match &bitmap {
        Some(_) => (needed_ranges(false, true), true),
        None => (
            vec![Range {
                start: from,
                end: size,
                chunk: None,
                recover: false,
                resync: true,
            }],
            false,
        ),
    };
    Some(Job {
        kind: SyncKind::Resync,
        source,
        targets: Vec::new(),
        resync_targets: extras,
        covers_resync: true,
        ranges,
        bitmap,
    })
}

/// Paces the copy at the current speed limit.
struct Throttle {
    next_at: Instant,
}

impl Throttle {
    /// Waits for the turn of `n` bytes; false if the worker must stop.
    async fn wait(&mut self, raid: &Raid1, n: u64, stop: &mut watch::Receiver<bool>) -> bool {
        loop {
            let now = Instant::now();
            if self.next_at <= now {
                break;
            }
            raid.sync.set_state(WorkerState::Throttled);
            tokio::select! {
                _ = tokio::time::sleep_until(self.next_at.into()) => {}
                _ = raid.sync.speed_changed.notified() => { self.next_at = Instant::now(); }
                _ = stop.changed() => return false,
            }
            if *stop.borrow() {
                return false;
            }
        }
        raid.sync.set_state(WorkerState::Busy);
        let limits = *lock(&raid.sync.speed);
        let rate = if raid.recently_busy(BUSY_WINDOW) {
            limits.min_kib_s
        } else {
            limits.max_kib_s
        };
        let cost = Duration::from_secs_f64(n as f64 / (rate.max(1) as f64 * 1024.0));
        self.next_at = self.next_at.max(Instant::now()) + cost;
        true
    }
}

/// The worker task: plans a job, runs it, repeats; idles until woken.
pub(crate) async fn run_worker(raid: Arc<Raid1>, mut stop: watch::Receiver<bool>) {
    let mut failures = 0u32;
    loop {
        if *stop.borrow() {
            break;
        }
        let job = if failures >= MAX_FAILED_RUNS {
            None
        } else {
            plan(&raid)
        };
        let Some(job) = job else {
            if failures >= MAX_FAILED_RUNS {
                tracing::error!(array = %raid.name, failures,
                    "sync failed {failures} times in a row; waiting for a change (member added or failed)");
            }
            raid.sync.set_state(WorkerState::Idle);
            tokio::select! {
                _ = raid.sync.wake.notified() => failures = 0,
                _ = stop.changed() => {}
            }
            continue;
        };
        // Gated: every run, also an empty one (a node without needed chunks must not
        // mark the array or a member in sync while another node copies it).
        let bytes: u64 = job.ranges.iter().map(|r| r.end - r.start).sum();
        let gate = if raid.sync.gated {
            match wait_gate(&raid, job.kind, bytes, &mut stop).await {
                None => break,
                Some((_, GateDecision::Done)) => {
                    if job.kind == SyncKind::Resync {
                        *lock(&raid.sync.resync) = None;
                        tracing::info!(array = %raid.name, "resync was finished by another node");
                    }
                    continue;
                }
                Some((_, GateDecision::Later)) => {
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                        _ = stop.changed() => {}
                    }
                    continue;
                }
                Some((g, GateDecision::Run)) => Some(g),
            }
        } else {
            None
        };
        // The plan may be stale after a wait for the gate.
        let job = match (&gate, plan(&raid)) {
            (None, _) => job,
            (Some(_), Some(j)) if j.kind == job.kind => j,
            (Some(g), _) => {
                g.end(job.kind, false).await;
                continue;
            }
        };
        let outcome = run_job(&raid, &job, &mut stop, gate.as_deref()).await;
        if let Some(g) = &gate {
            g.end(job.kind, matches!(outcome, Outcome::Finished)).await;
        }
        match outcome {
            Outcome::Finished => failures = 0,
            Outcome::Interrupted => break,
            Outcome::Failed => {
                failures += 1;
                lock(&raid.sync.progress).errors += 1;
                // A member failed under the job: replan after a pause growing with the
                // failures; after MAX_FAILED_RUNS in a row, wait for a change instead.
                let pause = Duration::from_millis(100) * 2u32.pow(failures.min(5));
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
    raid.sync.set_state(WorkerState::Done);
}

/// Waits for the installed gate's decision (pending meanwhile); `None`: stop.
async fn wait_gate(
    raid: &Raid1,
    kind: SyncKind,
    bytes: u64,
    stop: &mut watch::Receiver<bool>,
) -> Option<(Arc<dyn SyncGate>, GateDecision)> {
    raid.sync.pending.store(true, Ordering::Release);
    let r = loop {
        let gate = lock(&raid.sync.gate).clone();
        let Some(gate) = gate else {
            let set = raid.sync.gate_set.notified();
            tokio::select! {
                _ = set => continue,
                _ = tokio::time::sleep(Duration::from_millis(200)) => continue,
                _ = stop.changed() => break None,
            }
        };
        tokio::select! {
            d = gate.begin(kind, bytes) => break Some((gate.clone(), d)),
            _ = stop.changed() => break None,
        }
    };
    raid.sync.pending.store(false, Ordering::Release);
    r
}

async fn run_job(
    raid: &Raid1,
    job: &Job,
    stop: &mut watch::Receiver<bool>,
    gate: Option<&dyn SyncGate>,
) -> Outcome {
    // The window announced last, array bytes `[lo, hi)`.
    let mut window = (0u64, 0u64);
    let total: u64 = job.ranges.iter().map(|r| r.end - r.start).sum();
    let chunks_total = job.ranges.iter().filter(|r| r.chunk.is_some()).count() as u64;
    let started = Instant::now();
    {
        let mut p = lock(&raid.sync.progress);
        p.kind = Some(job.kind);
        p.done_bytes = 0;
        p.total_bytes = total;
        p.chunks_done = 0;
        p.chunks_total = chunks_total;
        p.rate_kib_s = 0;
    }
    tracing::info!(array = %raid.name, kind = ?job.kind, bytes = total, chunks = chunks_total,
        bitmap = job.bitmap, "sync starts");
    if job.covers_resync {
        raid.sync.resync_running.store(true, Ordering::Release);
    }
    let mut throttle = Throttle {
        next_at: Instant::now(),
    };
    let mut last_ckpt = Instant::now();
    let mut done = 0u64;
    let mut chunks_done = 0u64;
    let mut outcome = Outcome::Finished;
    'ranges: for r in &job.ranges {
        if let (Some(c), Some(bm)) = (r.chunk, raid.bitmap().as_ref()) {
            if !bm.start_sync(c) {
                done += r.end - r.start;
                chunks_done += 1;
                continue;
            }
        }
        let mut pos = r.start;
        while pos < r.end {
            let n = STEP.min(r.end - pos);
            if let Some(g) = gate {
                let want = window_bytes(raid);
                if pos < window.0 || pos + n > window.1 || window.1 - pos > 2 * want {
                    let w = (pos, (pos + want.max(n)).min(raid.size()));
                    match announce(raid, job, g, w, stop).await {
                        Ok(()) => window = w,
                        Err(o) => outcome = o,
                    }
                }
            }
            if !matches!(outcome, Outcome::Finished) {
                // Not acknowledged: nothing copied.
            } else if *stop.borrow() || !throttle.wait(raid, n, stop).await {
                outcome = Outcome::Interrupted;
            } else {
                if !copy_step(raid, job, r, pos, n).await {
                    outcome = Outcome::Failed;
                } else {
                    pos += n;
                    done += n;
                }
            }
            if !matches!(outcome, Outcome::Finished) {
                if let (Some(c), Some(bm)) = (r.chunk, raid.bitmap().as_ref()) {
                    bm.end_sync(c, false);
                }
                if r.chunk.is_none() {
                    checkpoint(raid, job, pos).await;
                }
                break 'ranges;
            }
            if r.chunk.is_none() && (r.recover || job.kind == SyncKind::Resync) {
                note_position(raid, job, pos);
                if last_ckpt.elapsed() >= CHECKPOINT_EVERY {
                    checkpoint(raid, job, pos).await;
                    last_ckpt = Instant::now();
                }
            }
            let secs = started.elapsed().as_secs_f64().max(1e-3);
            let mut p = lock(&raid.sync.progress);
            p.done_bytes = done;
            p.rate_kib_s = (done as f64 / 1024.0 / secs) as u64;
        }
        if let (Some(c), Some(bm)) = (r.chunk, raid.bitmap().as_ref()) {
            bm.end_sync(c, true);
            chunks_done += 1;
            lock(&raid.sync.progress).chunks_done = chunks_done;
        }
    }
    raid.sync.resync_running.store(false, Ordering::Release);
    let finished = matches!(outcome, Outcome::Finished);
    // File the run before `finish` marks the targets in sync, so that a status showing
    // a recovered member always shows the run that recovered it.
    {
        let mut p = lock(&raid.sync.progress);
        p.done_bytes = done;
        p.chunks_done = chunks_done;
        if !matches!(outcome, Outcome::Failed) {
            if p.completed.len() >= HISTORY {
                p.completed.remove(0);
            }
            p.completed.push(CompletedSync {
                kind: job.kind,
                bytes: done,
                chunks: chunks_done,
                bitmap: job.bitmap,
                interrupted: !finished,
                secs: started.elapsed().as_secs_f64(),
            });
        }
    }
    if finished {
        finish(raid, job).await;
    }
    lock(&raid.sync.progress).kind = None;
    tracing::info!(array = %raid.name, kind = ?job.kind, bytes = done, chunks = chunks_done,
        finished, "sync ends");
    outcome
}

/// The window size for the speed in effect now (see [`WINDOW_SECS`]).
fn window_bytes(raid: &Raid1) -> u64 {
    let limits = *lock(&raid.sync.speed);
    let rate = if raid.recently_busy(BUSY_WINDOW) {
        limits.min_kib_s
    } else {
        limits.max_kib_s
    };
    (rate.max(1) * 1024 * WINDOW_SECS).clamp(STEP, GATE_WINDOW)
}

/// Announces window `w` through the gate until every node acknowledged it (md's resync
/// waits for the remote ack): a refusal or a missing ack is retried after a pause, as
/// long as the job's source and a target are still usable, at most
/// [`WINDOW_RETRY_FOR`]. `Err`: the outcome of the run (stop, or failed).
async fn announce(
    raid: &Raid1,
    job: &Job,
    g: &dyn SyncGate,
    w: (u64, u64),
    stop: &mut watch::Receiver<bool>,
) -> Result<(), Outcome> {
    let give_up = Instant::now() + WINDOW_RETRY_FOR;
    let mut pause = Duration::from_millis(200);
    loop {
        let e = tokio::select! {
            r = g.window(w.0, w.1) => match r {
                Ok(()) => return Ok(()),
                Err(e) => e,
            },
            _ = stop.changed() => return Err(Outcome::Interrupted),
        };
        if Instant::now() + pause > give_up {
            tracing::error!(array = %raid.name, window = ?w,
                "resync window not acknowledged by every node within {WINDOW_RETRY_FOR:?}; nothing copied, the run is planned again later: {e}");
            return Err(Outcome::Failed);
        }
        tracing::warn!(array = %raid.name, window = ?w,
            "resync window not acknowledged; nothing copied, announcing it again in {pause:?}: {e}");
        tokio::select! {
            _ = tokio::time::sleep(pause) => {}
            _ = stop.changed() => return Err(Outcome::Interrupted),
        }
        if *stop.borrow() {
            return Err(Outcome::Interrupted);
        }
        // A member failure learnt meanwhile (e.g. the node that refused recorded one):
        // plan again rather than copy from or onto a failed member.
        let usable = {
            let slots = raid.slots();
            let ok = |i: usize| slots.get(i).is_some_and(|s| s.state != MemberState::Faulty);
            ok(job.source)
                && job
                    .targets
                    .iter()
                    .chain(&job.resync_targets)
                    .any(|&t| ok(t))
        };
        if !usable {
            return Err(Outcome::Failed);
        }
        pause = (pause * 2).min(WINDOW_RETRY_MAX_PAUSE);
    }
}

/// Copies `n` bytes at `pos` of range `r` from the source to its live targets under
/// the barrier. False if the source or every target failed. A member that fails here is marked
/// Faulty under the barrier; its superblock update (which may need the cluster token)
/// is written after the barrier is released, so user writes never wait behind it.
async fn copy_step(raid: &Raid1, job: &Job, r: &Range, pos: u64, n: u64) -> bool {
    let barrier = raid.barrier.write().await;
    let mut owed = Vec::new();
    let ok = copy_locked(raid, job, r, pos, n, &mut owed).await;
    drop(barrier);
    for failure in owed {
        failure.record(super::MetaWrite::Local).await;
    }
    ok
}

async fn copy_locked<'a>(
    raid: &'a Raid1,
    job: &Job,
    r: &Range,
    pos: u64,
    n: u64,
    owed: &mut Vec<super::PendingFailure<'a>>,
) -> bool {
    let src = raid.member(job.source);
    let data = match src.io.read_at(src.data_offset + pos, n as usize).await {
        Ok(d) => d,
        // Fenced: the node stops, not the member.
        Err(e) if crate::fence::is_fenced(&e) => return false,
        Err(e) => {
            owed.extend(raid.mark_failed(job.source, &format!("sync read at {pos}: {e}")));
            return false;
        }
    };
    let live: Vec<usize> = {
        let slots = raid.slots();
        let recover = job.targets.iter().filter(|_| r.recover);
        let resync = job.resync_targets.iter().filter(|_| r.resync);
        recover
            .chain(resync)
            .copied()
            .filter(|&t| slots[t].state != MemberState::Faulty)
            .collect()
    };
    let targets: Vec<_> = live.iter().map(|&t| raid.member(t)).collect();
    let ops = targets
        .iter()
        .map(|m| m.io.write_at(m.data_offset + pos, data.clone()));
    let results = futures::future::join_all(ops).await;
    let mut ok = 0;
    let mut fenced = false;
    for (&t, r) in live.iter().zip(results) {
        match r {
            Ok(()) => ok += 1,
            Err(e) if crate::fence::is_fenced(&e) => fenced = true,
            Err(e) => owed.extend(raid.mark_failed(t, &format!("sync write at {pos}: {e}"))),
        }
    }
    ok > 0 && !fenced
}

/// Records the position in memory (recovery offsets of the targets, resync point).
fn note_position(raid: &Raid1, job: &Job, pos: u64) {
    match job.kind {
        SyncKind::Resync => *lock(&raid.sync.resync) = Some(pos),
        SyncKind::Recovery => {
            let mut slots = raid.slots();
            for &t in &job.targets {
                if let MemberState::Recovering {
                    offset,
                    bitmap_only,
                } = &mut slots[t].state
                {
                    if !*bitmap_only {
                        *offset = (*offset).max(pos);
                    }
                }
            }
        }
    }
}

async fn checkpoint(raid: &Raid1, job: &Job, pos: u64) {
    note_position(raid, job, pos);
    let result = match job.kind {
        // While the array is dirty the superblock keeps 0 (see `mark_dirty`): the
        // checkpoint is kept in memory and written at a clean stop.
        SyncKind::Resync => raid.record_resync_offset(pos / 512, true).await,
        SyncKind::Recovery => {
            let mut r = Ok(());
            for &t in &job.targets {
                r = r.and(
                    raid.meta_update(
                        MetaEvent::RecoveryCheckpoint {
                            member: t,
                            sectors: pos / 512,
                        },
                        super::MetaWrite::Local,
                    )
                    .await,
                );
            }
            r
        }
    };
    if let Err(e) = result {
        tracing::warn!("failed to write the sync checkpoint: {e}");
    }
}

async fn finish(raid: &Raid1, job: &Job) {
    // Chunks marked needed (a resync requested) after the job was planned: this run may
    // have missed them, another one copies them.
    let rerun = job.covers_resync && raid.sync.pending_rerun.swap(false, Ordering::AcqRel);
    if job.kind == SyncKind::Recovery {
        for &t in &job.targets {
            {
                let mut slots = raid.slots();
                if matches!(slots[t].state, MemberState::Recovering { .. }) {
                    slots[t].state = MemberState::InSync;
                } else {
                    continue;
                }
            }
            if let Err(e) = raid
                .meta_update(
                    MetaEvent::RecoveryDone { member: t },
                    super::MetaWrite::Local,
                )
                .await
            {
                tracing::warn!("failed to record the end of recovery: {e}");
            }
        }
        let owed = rerun || (!job.covers_resync && lock(&raid.sync.resync).is_some());
        if !job.bitmap && !owed && raid.in_sync_count() >= raid.raid_disks() as usize {
            // Every member was copied in full (and, with a resync covered, every needed
            // chunk onto every in-sync member).
            if let Some(bm) = raid.bitmap() {
                bm.clear_all_needed();
            }
        } else if raid
            .bitmap()
            .is_some_and(|bm| !bm.needed_chunks().is_empty())
            && (job.bitmap || owed)
        {
            // Chunks marked after this run was planned (e.g. gathered again at a
            // re-add): a resync copies them.
            raid.sync.request_resync();
        }
    }
    if !job.covers_resync {
        return;
    }
    if rerun {
        *lock(&raid.sync.resync) = Some(0);
        return;
    }
    *lock(&raid.sync.resync) = None;
    // 0 while the array is dirty (decided under the metadata lock).
    if let Err(e) = raid.record_resync_offset(u64::MAX, false).await {
        tracing::warn!("failed to record the end of resync: {e}");
    }
}
