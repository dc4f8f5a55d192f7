//! The agent's Prometheus metrics (served on `--metrics-listen`, see
//! `mdcluster_proto::metrics_http`; every name in `docs/METRICS.md`).
//!
//! Two kinds:
//! - **event metrics** (NBD requests, member I/O errors, sync bytes copied, heartbeats,
//!   token rounds, takeovers, lock waits, fence refusals) live in one process-wide
//!   [`AgentMetrics`] ([`agent`]): an agent process is one node, and each is counted at
//!   one place in the code that does the work;
//! - **status metrics** (array state, members by state, sync progress, bitmap dirty
//!   chunks, session state and fence margin) are computed at scrape time from the
//!   node's status ([`ArraySource`], [`SessionSource`]), so they cannot drift from what
//!   `mdctl detail` and `mdstat` show.
//!
//! [`registry`] puts both into one [`Registry`]; [`render`] encodes it in the format
//! the scraper asked for.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use mdcluster_proto::v1 as pb;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::array::{ArrayInfo, ArrayState};
use crate::raid::{MemberState, WorkerState};

/// `{array}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ArrayLabel {
    /// The array's name on this node.
    pub array: String,
}

/// `{array, op}` of NBD requests.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// The export (array name).
    pub array: String,
    /// The operation ([`Op::name`]).
    pub op: &'static str,
}

/// `{array, device}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeviceLabels {
    /// The array.
    pub array: String,
    /// The member's path.
    pub device: String,
}

/// `{array, kind}` of syncs.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    /// The array.
    pub array: String,
    /// resync, recovery or check.
    pub kind: &'static str,
}

/// `{array, result}` of token rounds.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoundLabels {
    /// The array.
    pub array: String,
    /// ok, nack, timeout or error.
    pub result: &'static str,
}

/// `{array, reason}` of negative acknowledgements.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NackLabels {
    /// The array.
    pub array: String,
    /// [`nack_reason`] of the receiver's answer.
    pub reason: &'static str,
}

/// `{result}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// ok or error.
    pub result: &'static str,
}

/// `{lock}`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LockLabel {
    /// token, resync, slot or other.
    pub lock: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Buckets of NBD request latency: 50 µs to about 7.5 s.
fn nbd_histogram() -> Histogram {
    Histogram::new(exponential_buckets(50e-6, 2.5, 14))
}

/// Buckets of cluster round trips and lock waits: 1 ms to about 65 s.
fn cluster_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1e-3, 2.0, 17))
}

/// The agent's event metrics (one per process: see the module doc).
#[derive(Debug)]
pub struct AgentMetrics {
    nbd_requests: Family<OpLabels, Counter>,
    nbd_bytes: Family<OpLabels, Counter>,
    nbd_duration: HistogramFamily<OpLabels>,
    nbd_errors: Family<OpLabels, Counter>,
    nbd_in_flight: Family<ArrayLabel, Gauge>,
    nbd_connections: Family<ArrayLabel, Gauge>,
    member_io_errors: Family<DeviceLabels, Counter>,
    sync_done_bytes: Family<KindLabels, Counter>,
    heartbeats: Family<ResultLabel, Counter>,
    heartbeat_duration: Histogram,
    token_rounds: Family<RoundLabels, Counter>,
    token_round_duration: HistogramFamily<ArrayLabel>,
    token_nacks: Family<NackLabels, Counter>,
    slot_takeovers: Family<ArrayLabel, Counter>,
    lock_wait: HistogramFamily<LockLabel>,
    /// Per-request NBD metrics are kept (the process serves its metrics).
    enabled: std::sync::atomic::AtomicBool,
}

impl Default for AgentMetrics {
    fn default() -> Self {
        AgentMetrics {
            nbd_requests: Family::default(),
            nbd_bytes: Family::default(),
            nbd_duration: Family::new_with_constructor(nbd_histogram),
            nbd_errors: Family::default(),
            nbd_in_flight: Family::default(),
            nbd_connections: Family::default(),
            member_io_errors: Family::default(),
            sync_done_bytes: Family::default(),
            heartbeats: Family::default(),
            heartbeat_duration: cluster_histogram(),
            token_rounds: Family::default(),
            token_round_duration: Family::new_with_constructor(cluster_histogram),
            token_nacks: Family::default(),
            slot_takeovers: Family::default(),
            lock_wait: Family::new_with_constructor(cluster_histogram),
            enabled: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// This process's event metrics.
pub fn agent() -> &'static AgentMetrics {
    static M: OnceLock<AgentMetrics> = OnceLock::new();
    M.get_or_init(AgentMetrics::default)
}

/// An NBD operation, as the `op` label names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// NBD_CMD_READ.
    Read,
    /// NBD_CMD_WRITE.
    Write,
    /// NBD_CMD_FLUSH.
    Flush,
    /// NBD_CMD_TRIM.
    Trim,
    /// NBD_CMD_WRITE_ZEROES.
    WriteZeroes,
    /// Any other command (refused).
    Other,
}

impl Op {
    const ALL: [Op; 6] = [
        Op::Read,
        Op::Write,
        Op::Flush,
        Op::Trim,
        Op::WriteZeroes,
        Op::Other,
    ];

    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
            Op::Flush => "flush",
            Op::Trim => "trim",
            Op::WriteZeroes => "write_zeroes",
            Op::Other => "other",
        }
    }

    /// The operation of an NBD command number.
    pub fn of_command(command: u16) -> Op {
        match command {
            0 => Op::Read,
            1 => Op::Write,
            3 => Op::Flush,
            4 => Op::Trim,
            6 => Op::WriteZeroes,
            _ => Op::Other,
        }
    }
}

#[derive(Debug, Clone)]
struct OpHandles {
    requests: Counter,
    bytes: Counter,
    duration: Histogram,
    errors: Counter,
}

/// The NBD metrics of one export, resolved once per connection so that a request
/// touches only atomics and its histogram. Inert (nothing counted, no clock read)
/// unless the process serves its metrics ([`AgentMetrics::enable`]).
#[derive(Debug, Clone)]
pub struct NbdExport(Option<Arc<ExportHandles>>);

#[derive(Debug)]
struct ExportHandles {
    ops: [OpHandles; 6],
    in_flight: Gauge,
    connections: Gauge,
}

impl NbdExport {
    /// The handles of export `array` in `m`.
    pub fn new(m: &AgentMetrics, array: &str) -> NbdExport {
        if !m.enabled.load(std::sync::atomic::Ordering::Relaxed) {
            return NbdExport(None);
        }
        let op = |op: Op| {
            let l = OpLabels {
                array: array.to_owned(),
                op: op.name(),
            };
            OpHandles {
                requests: m.nbd_requests.get_or_create(&l).clone(),
                bytes: m.nbd_bytes.get_or_create(&l).clone(),
                duration: m.nbd_duration.get_or_create(&l).clone(),
                errors: m.nbd_errors.get_or_create(&l).clone(),
            }
        };
        let a = ArrayLabel {
            array: array.to_owned(),
        };
        NbdExport(Some(Arc::new(ExportHandles {
            ops: Op::ALL.map(op),
            in_flight: m.nbd_in_flight.get_or_create(&a).clone(),
            connections: m.nbd_connections.get_or_create(&a).clone(),
        })))
    }

    /// Counts a connection open until the guard drops.
    pub fn connected(&self) -> ConnectionGuard {
        if let Some(h) = &self.0 {
            h.connections.inc();
        }
        ConnectionGuard(self.0.clone())
    }

    /// A request of `bytes` payload starts; [`RequestTimer::done`] ends it.
    pub fn start(&self, op: Op, bytes: u32) -> RequestTimer {
        let started = self.0.as_ref().map(|h| {
            h.in_flight.inc();
            (Arc::clone(h), Instant::now())
        });
        RequestTimer { started, op, bytes }
    }
}

/// An open NBD connection (see [`NbdExport::connected`]).
#[derive(Debug)]
pub struct ConnectionGuard(Option<Arc<ExportHandles>>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        if let Some(h) = &self.0 {
            h.connections.dec();
        }
    }
}

/// One NBD request in flight; dropped without [`RequestTimer::done`] it counts as an
/// error (its task ended without an answer).
#[derive(Debug)]
pub struct RequestTimer {
    /// The export's handles and the start; None once ended (or when inert).
    started: Option<(Arc<ExportHandles>, Instant)>,
    op: Op,
    bytes: u32,
}

impl RequestTimer {
    /// The request was answered, with an error or not.
    pub fn done(mut self, ok: bool) {
        self.end(ok);
    }

    fn end(&mut self, ok: bool) {
        let Some((h, started)) = self.started.take() else {
            return;
        };
        h.in_flight.dec();
        let op = &h.ops[self.op as usize];
        op.requests.inc();
        op.bytes.inc_by(u64::from(self.bytes));
        op.duration.observe(started.elapsed().as_secs_f64());
        if !ok {
            op.errors.inc();
        }
    }
}

impl Drop for RequestTimer {
    fn drop(&mut self) {
        self.end(false);
    }
}

impl AgentMetrics {
    /// Keeps the per-request NBD metrics from now on (connections opened later count);
    /// called when the process serves `/metrics`. Without it an NBD request costs no
    /// metrics work at all.
    pub fn enable(&self) {
        self.enabled
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// A member I/O error on `device` of `array`.
    pub fn member_io_error(&self, array: &str, device: &std::path::Path) {
        self.member_io_errors
            .get_or_create(&DeviceLabels {
                array: array.to_owned(),
                device: device.display().to_string(),
            })
            .inc();
    }

    /// The member I/O errors counted for `device` of `array` (tests).
    #[cfg(test)]
    pub(crate) fn member_io_errors_of(&self, array: &str, device: &std::path::Path) -> u64 {
        self.member_io_errors
            .get(&DeviceLabels {
                array: array.to_owned(),
                device: device.display().to_string(),
            })
            .map_or(0, |c| c.get())
    }

    /// `bytes` copied by a sync of `kind` on `array`.
    pub fn sync_copied(&self, array: &str, kind: crate::raid::SyncKind, bytes: u64) {
        self.sync_done_bytes
            .get_or_create(&KindLabels {
                array: array.to_owned(),
                kind: sync_kind(kind),
            })
            .inc_by(bytes);
    }

    /// A heartbeat (session renewal) that took `took`.
    pub fn heartbeat(&self, ok: bool, took: Duration) {
        let result = if ok { "ok" } else { "error" };
        self.heartbeats.get_or_create(&ResultLabel { result }).inc();
        self.heartbeat_duration.observe(took.as_secs_f64());
    }

    /// A token round (acknowledged message) on `array` ended with `result` (ok, nack,
    /// timeout or error) after `took`.
    pub fn token_round(&self, array: &str, result: &'static str, took: Duration) {
        let array = array.to_owned();
        self.token_round_duration
            .get_or_create(&ArrayLabel {
                array: array.clone(),
            })
            .observe(took.as_secs_f64());
        self.token_rounds
            .get_or_create(&RoundLabels { array, result })
            .inc();
    }

    /// The outcome of publishing one acknowledged message of `array` (a token round):
    /// ok when every joined node acknowledged, nack when one refused (each refusal
    /// counted by [`nack_reason`]), timeout when one did not answer, error when the
    /// publish failed.
    pub fn token_round_outcome(
        &self,
        array: &str,
        outcome: &Result<
            mdcluster_proto::lock_client::PublishOutcome,
            mdcluster_proto::lock_client::LockClientError,
        >,
        took: Duration,
    ) {
        let result = match outcome {
            Ok(o) if o.all_ok => "ok",
            Ok(o) => {
                for r in o.results.iter().filter(|r| !r.ok && r.answered) {
                    self.token_nack(array, nack_reason(&r.reason));
                }
                if o.results.iter().any(|r| !r.ok && r.answered) {
                    "nack"
                } else {
                    "timeout"
                }
            }
            Err(e) if e.errno() == mdcluster_proto::v1::Errno::Etimedout => "timeout",
            Err(_) => "error",
        };
        self.token_round(array, result, took);
    }

    /// A negative acknowledgement with `reason` on `array`.
    pub fn token_nack(&self, array: &str, reason: &'static str) {
        self.token_nacks
            .get_or_create(&NackLabels {
                array: array.to_owned(),
                reason,
            })
            .inc();
    }

    /// A dead node's slot of `array` taken over.
    pub fn slot_takeover(&self, array: &str) {
        self.slot_takeovers
            .get_or_create(&ArrayLabel {
                array: array.to_owned(),
            })
            .inc();
    }

    /// A wait of `took` for a `lock` (token, resync, slot or other).
    pub fn lock_wait(&self, lock: &'static str, took: Duration) {
        self.lock_wait
            .get_or_create(&LockLabel { lock })
            .observe(took.as_secs_f64());
    }
}

/// The `reason` label of a negative acknowledgement: its errno name when the reason
/// starts with one (`EBUSY: ...`), else `refused` (free text would make a series per
/// sentence).
pub fn nack_reason(reason: &str) -> &'static str {
    const NAMES: [&str; 7] = [
        "EBUSY",
        "ENOENT",
        "EINVAL",
        "EIO",
        "ETIMEDOUT",
        "EEXIST",
        "EPERM",
    ];
    NAMES
        .into_iter()
        .find(|n| {
            reason
                .strip_prefix(n)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with([':', ' ']))
        })
        .unwrap_or("refused")
}

fn sync_kind(k: crate::raid::SyncKind) -> &'static str {
    match k {
        crate::raid::SyncKind::Resync => "resync",
        crate::raid::SyncKind::Recovery => "recovery",
    }
}

/// One array as the status metrics show it.
#[derive(Debug, Clone, PartialEq)]
pub struct ArrayView {
    /// The name on this node.
    pub name: String,
    /// Array UUID (mdadm style; empty while assembling).
    pub uuid: String,
    /// RAID level.
    pub level: i32,
    /// none, internal or clustered.
    pub bitmap: String,
    /// One of [`ARRAY_STATES`].
    pub state: &'static str,
    /// Members in sync, faulty, spare, recovering.
    pub disks: [u64; 4],
    /// Raid disks.
    pub raid_disks: u32,
    /// Size in bytes.
    pub size_bytes: u64,
    /// The running sync: kind and fraction done.
    pub sync: Option<(&'static str, f64)>,
    /// Speed of the running sync (0 when none runs).
    pub sync_speed_bytes: u64,
    /// This node's bitmap slot and its dirty chunks.
    pub dirty: Option<(u32, u64)>,
}

/// Every value of `mdcluster_array_state{state}`.
pub const ARRAY_STATES: [&str; 6] = [
    "active",
    "degraded",
    "resyncing",
    "recovering",
    "stopping",
    "inactive",
];
/// Every value of `mdcluster_array_disks{state}`, in [`ArrayView::disks`] order.
pub const DISK_STATES: [&str; 4] = ["in_sync", "faulty", "spare", "recovering"];

/// The one state of an array: stopping, inactive (assembling) before anything; then
/// a running resync or recovery; then degraded (fewer in-sync members than raid
/// disks); else active.
fn array_state(run: ArrayState, sync: Option<&str>, degraded: bool) -> &'static str {
    match (run, sync, degraded) {
        (ArrayState::Stopping, _, _) => "stopping",
        (ArrayState::Assembling, _, _) => "inactive",
        (ArrayState::Active, Some("resync"), _) => "resyncing",
        (ArrayState::Active, Some("recovery"), _) => "recovering",
        (ArrayState::Active, _, true) => "degraded",
        (ArrayState::Active, _, false) => "active",
    }
}

fn ratio(done: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        (done as f64 / total as f64).clamp(0.0, 1.0)
    }
}

impl ArrayView {
    /// From an array's status as `mdctl detail` gets it (cluster mode).
    pub fn from_status(st: &pb::ArrayStatus) -> ArrayView {
        let run = match pb::ArrayRunState::try_from(st.state) {
            Ok(pb::ArrayRunState::Active) => ArrayState::Active,
            Ok(pb::ArrayRunState::Stopping) => ArrayState::Stopping,
            _ => ArrayState::Assembling,
        };
        let mut disks = [0u64; 4];
        for m in &st.members {
            if let Some(i) = DISK_STATES.iter().position(|s| *s == m.state) {
                disks[i] += 1;
            }
        }
        let sync = st.sync.as_ref().and_then(|s| {
            let kind = match s.kind.as_str() {
                "resync" => "resync",
                "recovery" => "recovery",
                "check" => "check",
                _ => return None,
            };
            matches!(s.state.as_str(), "busy" | "throttled")
                .then(|| (kind, ratio(s.done_bytes, s.total_bytes)))
        });
        ArrayView {
            name: st.name.clone(),
            uuid: st.uuid.clone(),
            level: if st.level == 0 { 1 } else { st.level },
            bitmap: st
                .bitmap
                .as_ref()
                .map_or_else(|| "none".to_owned(), |b| b.kind.clone()),
            state: array_state(run, sync.map(|s| s.0), st.degraded),
            disks,
            raid_disks: st.raid_disks,
            size_bytes: st.size_bytes,
            sync,
            sync_speed_bytes: sync
                .and(st.sync.as_ref())
                .map_or(0, |s| s.rate_kib_s * 1024),
            dirty: st.bitmap.as_ref().map(|b| (b.slot, b.dirty_bits)),
        }
    }

    /// From the registry's view of an array (standalone mode); `bitmap` and `slot`
    /// from its superblocks.
    pub fn from_info(info: &ArrayInfo, bitmap: &str, slot: u32) -> ArrayView {
        let mut v = ArrayView {
            name: info.name.clone(),
            uuid: info
                .identity
                .as_ref()
                .map(|i| i.uuid.clone())
                .unwrap_or_default(),
            level: 1,
            bitmap: bitmap.to_owned(),
            state: array_state(info.state, None, false),
            disks: [0; 4],
            raid_disks: 0,
            size_bytes: 0,
            sync: None,
            sync_speed_bytes: 0,
            dirty: None,
        };
        let Some(r) = &info.raid else {
            return v;
        };
        for m in r.members.iter().filter(|m| !m.removed) {
            let i = match m.state {
                MemberState::InSync => 0,
                MemberState::Faulty => 1,
                MemberState::Spare => 2,
                MemberState::Recovering { .. } => 3,
            };
            v.disks[i] += 1;
        }
        v.raid_disks = r.raid_disks;
        v.size_bytes = r.size;
        let s = &r.sync;
        if let (Some(kind), WorkerState::Busy | WorkerState::Throttled) = (s.kind, s.state) {
            v.sync = Some((sync_kind(kind), ratio(s.done_bytes, s.total_bytes)));
            v.sync_speed_bytes = s.rate_kib_s * 1024;
        }
        v.state = array_state(info.state, v.sync.map(|s| s.0), r.degraded);
        v.dirty = r.bitmap.as_ref().map(|b| (slot, b.dirty_bits));
        v
    }
}

/// Where the status metrics of arrays come from.
pub trait ArraySource: Send + Sync + 'static {
    /// Every array on this node now.
    fn arrays(&self) -> Vec<ArrayView>;
}

/// The session of a cluster-mode agent as the status metrics show it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SessionView {
    /// One of [`SESSION_STATES`].
    pub state: &'static str,
    /// Seconds left to the fence deadline (≤ 0: fenced).
    pub fence_margin_seconds: f64,
    /// Member system calls the fence gate refused so far.
    pub fence_refusals: u64,
}

/// Every value of `mdcluster_session_state{state}`.
pub const SESSION_STATES: [&str; 5] = ["connected", "reconnecting", "suspended", "lost", "closed"];

/// Where the session metrics come from (cluster mode).
pub trait SessionSource: Send + Sync + 'static {
    /// The session now.
    fn session(&self) -> SessionView;
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InfoLabels {
    array: String,
    uuid: String,
    level: String,
    bitmap: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    array: String,
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SlotLabels {
    array: String,
    slot: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SessionLabel {
    state: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: &'static str,
}

/// Encodes one metric family under `name`.
fn family(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    metric: &impl EncodeMetric,
) -> Result<(), std::fmt::Error> {
    let m = enc.encode_descriptor(name, help, None, metric.metric_type())?;
    metric.encode(m)
}

/// The scrape-time array metrics.
struct Arrays(Arc<dyn ArraySource>);

impl std::fmt::Debug for Arrays {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Arrays")
    }
}

impl Collector for Arrays {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let arrays = self.0.arrays();
        let info = Family::<InfoLabels, Gauge>::default();
        let state = Family::<StateLabels, Gauge>::default();
        let disks = Family::<StateLabels, Gauge>::default();
        let required = Family::<ArrayLabel, Gauge>::default();
        let size = Family::<ArrayLabel, Gauge>::default();
        let done = Family::<KindLabels, Gauge<f64, std::sync::atomic::AtomicU64>>::default();
        let speed = Family::<ArrayLabel, Gauge>::default();
        let dirty = Family::<SlotLabels, Gauge>::default();
        for a in &arrays {
            let al = ArrayLabel {
                array: a.name.clone(),
            };
            info.get_or_create(&InfoLabels {
                array: a.name.clone(),
                uuid: a.uuid.clone(),
                level: format!("raid{}", a.level),
                bitmap: a.bitmap.clone(),
            })
            .set(1);
            for s in ARRAY_STATES {
                state
                    .get_or_create(&StateLabels {
                        array: a.name.clone(),
                        state: s,
                    })
                    .set(i64::from(s == a.state));
            }
            for (s, n) in DISK_STATES.iter().zip(a.disks) {
                disks
                    .get_or_create(&StateLabels {
                        array: a.name.clone(),
                        state: s,
                    })
                    .set(n as i64);
            }
            required.get_or_create(&al).set(i64::from(a.raid_disks));
            size.get_or_create(&al).set(a.size_bytes as i64);
            if let Some((kind, r)) = a.sync {
                done.get_or_create(&KindLabels {
                    array: a.name.clone(),
                    kind,
                })
                .set(r);
            }
            speed.get_or_create(&al).set(a.sync_speed_bytes as i64);
            if let Some((slot, n)) = a.dirty {
                dirty
                    .get_or_create(&SlotLabels {
                        array: a.name.clone(),
                        slot: slot.to_string(),
                    })
                    .set(n as i64);
            }
        }
        family(
            &mut enc,
            "mdcluster_array_info",
            "Arrays on this node (1), with UUID, RAID level and bitmap kind (none, internal, clustered)",
            &info,
        )?;
        family(
            &mut enc,
            "mdcluster_array_state",
            "1 for the array's current state, 0 for the others (active, degraded, resyncing, recovering, stopping, inactive)",
            &state,
        )?;
        family(
            &mut enc,
            "mdcluster_array_disks",
            "Members of the array by state (in_sync, faulty, spare, recovering)",
            &disks,
        )?;
        family(
            &mut enc,
            "mdcluster_array_disks_required",
            "Raid disks of the array (members it needs to be in sync)",
            &required,
        )?;
        family(
            &mut enc,
            "mdcluster_array_size_bytes",
            "Size of the array in bytes",
            &size,
        )?;
        family(
            &mut enc,
            "mdcluster_array_sync_completed_ratio",
            "Fraction done (0 to 1) of the resync or recovery running on this node; absent when none runs",
            &done,
        )?;
        family(
            &mut enc,
            "mdcluster_array_sync_speed_bytes_per_second",
            "Average speed of the running resync or recovery, bytes per second (0 when none runs)",
            &speed,
        )?;
        family(
            &mut enc,
            "mdcluster_bitmap_dirty_chunks",
            "Chunks marked dirty in this node's write-intent bitmap slot",
            &dirty,
        )
    }
}

/// The scrape-time session metrics.
struct Session(Arc<dyn SessionSource>);

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Session")
    }
}

impl Collector for Session {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = self.0.session();
        let state = Family::<SessionLabel, Gauge>::default();
        for s in SESSION_STATES {
            state
                .get_or_create(&SessionLabel { state: s })
                .set(i64::from(s == now.state));
        }
        family(
            &mut enc,
            "mdcluster_session_state",
            "1 for the current state of this node's lock-service session, 0 for the others",
            &state,
        )?;
        let margin = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        margin.set(now.fence_margin_seconds);
        family(
            &mut enc,
            "mdcluster_session_fence_margin_seconds",
            "Seconds left until the fence deadline of this node's session (0 or less: fenced, clustered member I/O suspended)",
            &margin,
        )?;
        family(
            &mut enc,
            "mdcluster_fence_refusals",
            "Member system calls refused by the fence gate (the session was past its fence deadline)",
            &ConstCounter::new(now.fence_refusals),
        )
    }
}

/// The agent's registry (and [`AgentMetrics::enable`]): the event metrics of [`agent`], the array status from
/// `arrays`, and, in cluster mode, the session from `session` and the cluster event
/// metrics.
pub fn registry(arrays: Arc<dyn ArraySource>, session: Option<Arc<dyn SessionSource>>) -> Registry {
    let m = agent();
    // Served from now on: keep the per-request NBD metrics of new connections.
    m.enable();
    let mut r = Registry::default();
    let build = Family::<VersionLabel, Gauge>::default();
    build
        .get_or_create(&VersionLabel {
            version: env!("CARGO_PKG_VERSION"),
        })
        .set(1);
    r.register("mdcluster_build_info", "The agent's version (1)", build);
    r.register_collector(Box::new(Arrays(arrays)));
    r.register(
        "mdcluster_array_sync_done_bytes",
        "Bytes copied by resyncs and recoveries run on this node",
        m.sync_done_bytes.clone(),
    );
    r.register(
        "mdcluster_member_io_errors",
        "I/O errors of member devices (each fails the member unless it is the last in sync)",
        m.member_io_errors.clone(),
    );
    r.register(
        "mdcluster_nbd_requests",
        "NBD requests answered, by export and operation",
        m.nbd_requests.clone(),
    );
    r.register(
        "mdcluster_nbd_request_bytes",
        "Payload bytes of NBD requests (read, write, trim and write_zeroes lengths)",
        m.nbd_bytes.clone(),
    );
    r.register(
        "mdcluster_nbd_request_duration_seconds",
        "Time from reading an NBD request to its answer",
        m.nbd_duration.clone(),
    );
    r.register(
        "mdcluster_nbd_request_errors",
        "NBD requests answered with an error",
        m.nbd_errors.clone(),
    );
    r.register(
        "mdcluster_nbd_requests_in_flight",
        "NBD requests being served now",
        m.nbd_in_flight.clone(),
    );
    r.register(
        "mdcluster_nbd_connections",
        "Open NBD connections in transmission",
        m.nbd_connections.clone(),
    );
    if let Some(s) = session {
        r.register_collector(Box::new(Session(s)));
        // Both results shown from the start (0 until the first heartbeat).
        for result in ["ok", "error"] {
            drop(m.heartbeats.get_or_create(&ResultLabel { result }));
        }
        r.register(
            "mdcluster_heartbeats",
            "Renewals of this node's lock-service session, by result",
            m.heartbeats.clone(),
        );
        r.register(
            "mdcluster_heartbeat_duration_seconds",
            "Round-trip time of session renewals",
            m.heartbeat_duration.clone(),
        );
        r.register(
            "mdcluster_token_rounds",
            "md-cluster token rounds (acknowledged messages) sent by this node, by result",
            m.token_rounds.clone(),
        );
        r.register(
            "mdcluster_token_round_duration_seconds",
            "Time of token rounds from sending to the last acknowledgement",
            m.token_round_duration.clone(),
        );
        r.register(
            "mdcluster_token_round_nacks",
            "Negative acknowledgements received, by reason",
            m.token_nacks.clone(),
        );
        r.register(
            "mdcluster_slot_takeovers",
            "Bitmap slots of dead nodes taken over by this node",
            m.slot_takeovers.clone(),
        );
        r.register(
            "mdcluster_lock_wait_seconds",
            "Time waited for cluster locks, by lock",
            m.lock_wait.clone(),
        );
    }
    r
}

pub use mdcluster_proto::metrics_http::encode as render;

/// Serves `registry` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
    shutdown: impl std::future::Future<Output = ()>,
) {
    mdcluster_proto::metrics_http::serve(
        listener,
        mdcluster_proto::metrics_http::registry_render(registry),
        mdcluster_proto::metrics_http::Limits::default(),
        shutdown,
    )
    .await;
}

/// The standalone agent's arrays: every array of its registry.
pub struct RegistryArrays {
    /// The registry.
    pub registry: Arc<crate::array::Registry>,
}

impl ArraySource for RegistryArrays {
    fn arrays(&self) -> Vec<ArrayView> {
        self.registry
            .names()
            .iter()
            .filter_map(|n| self.registry.lookup(n).ok())
            .map(|info| {
                let (bitmap, slot) = self
                    .registry
                    .attachment(&info.name)
                    .map_or(("none", 0), |a| (a.bitmap_kind(), a.slot()));
                ArrayView::from_info(&info, bitmap, slot)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mdcluster_proto::metrics_http::Format;

    struct Fixed(Vec<ArrayView>);
    impl ArraySource for Fixed {
        fn arrays(&self) -> Vec<ArrayView> {
            self.0.clone()
        }
    }
    struct FixedSession(SessionView);
    impl SessionSource for FixedSession {
        fn session(&self) -> SessionView {
            self.0
        }
    }

    fn view() -> ArrayView {
        ArrayView {
            name: "md0".into(),
            uuid: "a:b:c:d".into(),
            level: 1,
            bitmap: "clustered".into(),
            state: "recovering",
            disks: [1, 0, 0, 1],
            raid_disks: 2,
            size_bytes: 1 << 20,
            sync: Some(("recovery", 0.25)),
            sync_speed_bytes: 4096,
            dirty: Some((1, 7)),
        }
    }

    /// The value of the sample `series` (name and labels as printed) in `text`.
    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn status_metrics_encode_every_state_and_the_sync() {
        let reg = registry(
            Arc::new(Fixed(vec![view()])),
            Some(Arc::new(FixedSession(SessionView {
                state: "suspended",
                fence_margin_seconds: -1.5,
                fence_refusals: 3,
            }))),
        );
        let text = render(&reg, Format::Text);
        assert_eq!(
            sample(
                &text,
                r#"mdcluster_array_state{array="md0",state="recovering"}"#
            ),
            Some(1.0),
            "{text}"
        );
        for s in ARRAY_STATES.iter().filter(|s| **s != "recovering") {
            let series = format!(r#"mdcluster_array_state{{array="md0",state="{s}"}}"#);
            assert_eq!(sample(&text, &series), Some(0.0), "{series}\n{text}");
        }
        assert_eq!(
            sample(
                &text,
                r#"mdcluster_array_disks{array="md0",state="recovering"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"mdcluster_array_disks{array="md0",state="faulty"}"#
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"mdcluster_array_sync_completed_ratio{array="md0",kind="recovery"}"#
            ),
            Some(0.25)
        );
        assert_eq!(
            sample(
                &text,
                r#"mdcluster_bitmap_dirty_chunks{array="md0",slot="1"}"#
            ),
            Some(7.0)
        );
        assert_eq!(
            sample(
                &text,
                r#"mdcluster_array_info{array="md0",uuid="a:b:c:d",level="raid1",bitmap="clustered"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, r#"mdcluster_session_state{state="suspended"}"#),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "mdcluster_session_fence_margin_seconds"),
            Some(-1.5)
        );
        assert_eq!(
            sample(&text, r#"mdcluster_heartbeats_total{result="error"}"#),
            Some(0.0),
            "{text}"
        );
        // OpenMetrics: the same series, and the end marker.
        let om = render(&reg, Format::OpenMetrics);
        assert!(om.ends_with("# EOF\n"), "{om}");
        assert!(om.contains(r#"mdcluster_array_disks_required{array="md0"} 2"#));
    }

    #[test]
    fn without_a_sync_the_ratio_is_absent_and_standalone_has_no_cluster_families() {
        let mut v = view();
        v.sync = None;
        v.state = "degraded";
        let text = render(&registry(Arc::new(Fixed(vec![v])), None), Format::Text);
        assert!(
            !text.contains("mdcluster_array_sync_completed_ratio{"),
            "{text}"
        );
        assert!(!text.contains("mdcluster_session_state"), "{text}");
        assert!(!text.contains("mdcluster_token_rounds"), "{text}");
        assert_eq!(
            sample(
                &text,
                r#"mdcluster_array_state{array="md0",state="degraded"}"#
            ),
            Some(1.0)
        );
    }

    #[test]
    fn a_request_counts_once_with_its_bytes_and_an_unanswered_one_as_an_error() {
        let m = AgentMetrics::default();
        let inert = NbdExport::new(&m, "md9");
        inert.start(Op::Write, 4096).done(true);
        let write = OpLabels {
            array: "md9".into(),
            op: "write",
        };
        assert!(
            m.nbd_requests.get(&write).is_none(),
            "nothing kept before enable"
        );
        m.enable();
        let e = NbdExport::new(&m, "md9");
        let c = e.connected();
        e.start(Op::Write, 4096).done(true);
        e.start(Op::Read, 512).done(false);
        drop(e.start(Op::Flush, 0));
        let l = |op: Op| OpLabels {
            array: "md9".into(),
            op: op.name(),
        };
        assert_eq!(m.nbd_requests.get_or_create(&l(Op::Write)).get(), 1);
        assert_eq!(m.nbd_bytes.get_or_create(&l(Op::Write)).get(), 4096);
        assert_eq!(m.nbd_errors.get_or_create(&l(Op::Write)).get(), 0);
        assert_eq!(m.nbd_errors.get_or_create(&l(Op::Read)).get(), 1);
        assert_eq!(m.nbd_errors.get_or_create(&l(Op::Flush)).get(), 1);
        let a = ArrayLabel {
            array: "md9".into(),
        };
        assert_eq!(m.nbd_in_flight.get_or_create(&a).get(), 0);
        assert_eq!(m.nbd_connections.get_or_create(&a).get(), 1);
        drop(c);
        assert_eq!(m.nbd_connections.get_or_create(&a).get(), 0);
    }

    #[test]
    fn nack_reasons_are_a_bounded_set() {
        assert_eq!(nack_reason("EBUSY: a resync runs"), "EBUSY");
        assert_eq!(nack_reason("EIO"), "EIO");
        assert_eq!(nack_reason("EIOX: no"), "refused");
        assert_eq!(nack_reason("device /dev/x not found on node n2"), "refused");
    }

    #[test]
    fn array_state_priorities() {
        assert_eq!(
            array_state(ArrayState::Stopping, Some("resync"), true),
            "stopping"
        );
        assert_eq!(array_state(ArrayState::Assembling, None, false), "inactive");
        assert_eq!(
            array_state(ArrayState::Active, Some("resync"), true),
            "resyncing"
        );
        assert_eq!(
            array_state(ArrayState::Active, Some("recovery"), true),
            "recovering"
        );
        assert_eq!(array_state(ArrayState::Active, None, true), "degraded");
        assert_eq!(array_state(ArrayState::Active, None, false), "active");
    }
}
