//! Crash-consistency checking of the RAID1 engine (the CrashMonkey / ALICE idea): record
//! every write and flush the agent sends to the members during a workload, rebuild the
//! members as a crash at many points of that order could leave them, recover them with
//! the real join merge and assemble code, and check what a client was promised.
//!
//! # The crash-state model
//! - **Per device, in order.** The log is the order in which the agent's `pwrite`s
//!   returned and its `fdatasync`s started and ended, per member file
//!   ([`mdcluster_agent::iotrace`]). The engine never has two writes to one block of a
//!   member in flight at once (user writes of one node are serialised per range, the
//!   resync holds the write barrier, one bitmap flush at a time per node, superblocks
//!   under the token), so the log order of two writes to one block is their order on
//!   the device.
//! - **Flush semantics.** A write is durable once an `fdatasync` of the same device
//!   that *started after the write returned* has ended. Every other write before the
//!   crash point is uncertain: present or absent, independently of the other devices
//!   and of the other uncertain writes of the same device (a volatile disk cache or the
//!   page cache may write back in any order). Overlapping uncertain writes are applied
//!   in log order, so a block never goes back to an older version than one it held.
//! - **Torn writes** at 4 KiB granularity, in one of the modes: a multi-block write may
//!   be partly present, block by block; a 4 KiB block is atomic (the superblock and a
//!   bitmap page are single 4 KiB writes; md assumes the same of a sector).
//! - Modes per crash state ([`Mode`]): all uncertain writes present, none present, a
//!   random subset of whole writes, a random subset of 4 KiB pieces, or every metadata
//!   write present with the data of only some members (the cache wrote the metadata
//!   back first; checked wherever both are uncertain).
//! - **Crash points**: just before every flush starts (everything since the previous
//!   flush of that device uncertain) and just after every flush ends, a point whose
//!   state equals the previous one skipped, plus random points in between; a crash
//!   stops every node at once (the whole cluster loses power), which is the worst
//!   case for the other nodes' slots too.
//! - The checker checks itself: a crash state holding data of a write issued after
//!   the crash point is a bug of the checker and fails the test.
//!
//! # What is checked after recovery
//! Every member's superblock parses; the first node to come back joins (takes slot 0
//! and merges every other dirty slot with [`mdcluster_agent::service::join::merge_slots`],
//! as `join` does), assembles with [`Registry::assemble`] and resyncs to the end; then
//! the in-sync members' data areas are byte-identical and every 4 KiB block holds a
//! version the client may see: the last write acknowledged as durable (a FUA write, or a
//! write acknowledged before a client flush that was acknowledged) or a later one; a
//! block nobody wrote durably may also hold zeroes.
//!
//! # What is not modelled
//! The lock service: the two nodes run in one process with an in-process token
//! ([`InProcGate`], the `MetaGate` with the real receiver code of METADATA_UPDATED) and
//! write disjoint halves of the array, so no cross-node range locking is needed; only
//! one node resyncs at a time by construction (the resync lock is not exercised).
//! Crashes of one node while the others run (takeover) are not modelled: every crash
//! stops all nodes. Reads and the NBD layer are not involved. Sub-4 KiB tearing, lost
//! or misdirected writes and media errors are not modelled.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use bytes::Bytes;
use mdcluster_agent::array::assemble::AssembleOptions;
use mdcluster_agent::array::{Registry, RegistryConfig};
use mdcluster_agent::blockdev::{BlockDevice, IoFuture};
use mdcluster_agent::cluster::{ClusterMsg, MsgType};
use mdcluster_agent::format::bitmap::count_set;
use mdcluster_agent::format::create::{BitmapMode, CreateSpec};
use mdcluster_agent::format::io::read_member;
use mdcluster_agent::iotrace::IoTracer;
use mdcluster_agent::raid::{MemberState, MetaGate, MetaWrite, Raid1, SpeedLimits};

/// Granularity of the model (and of tearing).
pub const BLOCK: usize = 4096;

/// The name of the array in every registry.
const ARRAY: &str = "crash";

/// SplitMix64: small, deterministic across platforms and crate versions.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
}

/// A workload step recorded in the same order as the member I/O.
#[derive(Debug, Clone)]
pub enum Mark {
    /// A new phase of the workload starts.
    Phase(String),
    /// Client write `k` of `node` is about to be sent to the engine.
    Issue {
        /// Write number.
        k: usize,
        /// Node 0 or 1.
        node: usize,
        /// Array byte offset.
        offset: u64,
        /// Bytes.
        len: u64,
        /// Sent with FUA.
        fua: bool,
    },
    /// The engine acknowledged write `k`.
    Ack {
        /// Write number.
        k: usize,
    },
    /// The engine failed write `k`.
    Failed {
        /// Write number.
        k: usize,
        /// The error.
        error: String,
    },
    /// Client flush `f` of `node` is about to be sent.
    FlushIssue {
        /// Node.
        node: usize,
        /// Flush number.
        f: usize,
    },
    /// The engine acknowledged flush `f` of `node`.
    FlushAck {
        /// Node.
        node: usize,
        /// Flush number.
        f: usize,
    },
}

/// One entry of the log.
#[derive(Debug, Clone)]
pub enum Event {
    /// A `pwrite` of member `dev` returned.
    Write {
        /// Member index.
        dev: usize,
        /// Byte offset in the member.
        offset: u64,
        /// The bytes.
        data: Arc<[u8]>,
    },
    /// An `fdatasync` of member `dev` started.
    FlushBegin {
        /// Member index.
        dev: usize,
        /// Flush id.
        id: u64,
    },
    /// The `fdatasync` `id` of member `dev` returned successfully.
    FlushEnd {
        /// Member index.
        dev: usize,
        /// Flush id.
        id: u64,
    },
    /// A workload step.
    Mark(Mark),
}

/// The [`IoTracer`] of the checker: an ordered log of the member I/O of the given
/// devices, plus the workload's [`Mark`]s.
#[derive(Debug)]
pub struct Recorder {
    devices: Vec<PathBuf>,
    log: Mutex<Vec<Event>>,
    next_id: AtomicU64,
    on: AtomicBool,
}

impl Recorder {
    /// Records I/O to `devices` (member index = position).
    pub fn new(devices: Vec<PathBuf>) -> Arc<Recorder> {
        Arc::new(Recorder {
            devices,
            log: Mutex::new(Vec::new()),
            next_id: AtomicU64::new(1),
            on: AtomicBool::new(true),
        })
    }

    fn push(&self, e: Event) {
        if self.on.load(Ordering::Acquire) {
            self.log.lock().unwrap_or_else(|e| e.into_inner()).push(e);
        }
    }

    /// Appends a workload step.
    pub fn mark(&self, m: Mark) {
        self.push(Event::Mark(m));
    }

    /// Stops recording and hands the log out.
    pub fn finish(&self) -> Vec<Event> {
        self.on.store(false, Ordering::Release);
        std::mem::take(&mut *self.log.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn dev(&self, path: &Path) -> Option<usize> {
        self.devices.iter().position(|p| p == path)
    }
}

impl IoTracer for Recorder {
    fn write(&self, path: &Path, offset: u64, data: &[u8]) {
        if let Some(dev) = self.dev(path) {
            self.push(Event::Write {
                dev,
                offset,
                data: Arc::from(data),
            });
        }
    }

    fn flush_begin(&self, path: &Path) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        if let Some(dev) = self.dev(path) {
            self.push(Event::FlushBegin { dev, id });
        }
        id
    }

    fn flush_end(&self, path: &Path, id: u64) {
        if let Some(dev) = self.dev(path) {
            self.push(Event::FlushEnd { dev, id });
        }
    }
}

/// What a 4 KiB block of the array holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    /// Zeroes (never written).
    Zero,
    /// The data of client write `k` for this offset.
    Write(usize),
    /// Anything else.
    Garbage,
}

impl std::fmt::Display for Content {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Content::Zero => write!(f, "zeroes"),
            Content::Write(k) => write!(f, "write #{k}"),
            Content::Garbage => write!(f, "garbage"),
        }
    }
}

const MAGIC: &[u8; 8] = b"CRASHCHK";

fn header(seed: u64, k: usize, offset: u64) -> [u8; 32] {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(MAGIC);
    h[8..16].copy_from_slice(&seed.to_le_bytes());
    h[16..24].copy_from_slice(&(k as u64).to_le_bytes());
    h[24..].copy_from_slice(&offset.to_le_bytes());
    h
}

/// The data of client write `k` at array `offset`: every 4 KiB block names the write
/// and its own offset (so a block found on a member says where it came from).
pub fn pattern(seed: u64, k: usize, offset: u64, len: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(len as usize);
    for b in 0..len / BLOCK as u64 {
        let h = header(seed, k, offset + b * BLOCK as u64);
        for _ in 0..BLOCK / 32 {
            v.extend_from_slice(&h);
        }
    }
    v
}

/// What `block` (4 KiB read at array `offset`) holds.
pub fn identify(seed: u64, block: &[u8], offset: u64) -> Content {
    static ZERO: [u8; BLOCK] = [0; BLOCK];
    if block == &ZERO[..] {
        return Content::Zero;
    }
    let h = &block[..32];
    if &h[..8] != MAGIC || h[8..16] != seed.to_le_bytes() || h[24..] != offset.to_le_bytes() {
        return Content::Garbage;
    }
    if !block.chunks_exact(32).all(|c| c == h) {
        return Content::Garbage;
    }
    let mut k = [0u8; 8];
    k.copy_from_slice(&h[16..24]);
    Content::Write(u64::from_le_bytes(k) as usize)
}

/// The cluster's `token` and METADATA_UPDATED, in one process: every superblock write
/// of a node's engine runs under one mutex, starts from the superblocks on disk (as
/// `MetaRound` re-reads them) and is followed by the other nodes with the real receiver
/// code ([`mdcluster_agent::service::message::apply`], which changes the engine
/// without writing: [`MetaWrite::Following`]).
#[derive(Default)]
pub struct GateHub {
    token: tokio::sync::Mutex<()>,
    nodes: Mutex<Vec<Option<GateNode>>>,
}

#[derive(Clone)]
struct GateNode {
    name: String,
    slot: u32,
    registry: Arc<Registry>,
    members: Vec<PathBuf>,
}

impl GateHub {
    fn set(&self, i: usize, node: Option<GateNode>) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if nodes.len() <= i {
            nodes.resize(i + 1, None);
        }
        nodes[i] = node;
    }

    fn nodes(&self) -> Vec<Option<GateNode>> {
        self.nodes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

async fn reload(node: &GateNode) {
    if let Some(att) = node.registry.attachment(ARRAY) {
        // As the agent's gate does: members this engine has as failed are not re-read.
        let faulty: Vec<usize> = node
            .registry
            .device(ARRAY)
            .map(|raid| {
                raid.status()
                    .members
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| m.state == MemberState::Faulty || m.removed)
                    .map(|(i, _)| i)
                    .collect()
            })
            .unwrap_or_default();
        match tokio::task::spawn_blocking(move || att.reload(&faulty)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("{}: reload: {e}", node.name),
            Err(e) => eprintln!("{}: reload task: {e}", node.name),
        }
    }
}

/// One node's [`MetaGate`] on a [`GateHub`].
pub struct InProcGate {
    hub: Arc<GateHub>,
    me: usize,
}

impl MetaGate for InProcGate {
    fn round<'a>(&'a self, what: String, write: IoFuture<'a, ()>) -> IoFuture<'a, ()> {
        Box::pin(async move {
            let _token = self.hub.token.lock().await;
            let nodes = self.hub.nodes();
            let Some(Some(me)) = nodes.get(self.me).cloned() else {
                return write.await;
            };
            reload(&me).await;
            let out = write.await;
            if out.is_ok() {
                for (i, n) in nodes.iter().enumerate() {
                    let Some(n) = n.as_ref().filter(|_| i != self.me) else {
                        continue;
                    };
                    reload(n).await;
                    let Ok(raid) = n.registry.device(ARRAY) else {
                        continue;
                    };
                    let msg = ClusterMsg::new(MsgType::MetadataUpdated, me.slot);
                    let applied = mdcluster_agent::service::message::apply(
                        &n.name, ARRAY, &raid, &n.members, &msg,
                    )
                    .await;
                    if let Err(e) = applied {
                        eprintln!("{}: METADATA_UPDATED after {what} not applied: {e}", n.name);
                    }
                }
            }
            out
        })
    }
}

/// Shape of the workload.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Members.
    pub members: usize,
    /// Bytes per member.
    pub member_bytes: u64,
    /// Bitmap chunk bytes.
    pub chunk: u32,
    /// Bitmap daemon period of the workload's engines.
    pub daemon_sleep: Duration,
    /// Batches of client writes per node and phase.
    pub batches: usize,
}

/// What the workload left for the checker.
#[derive(Debug)]
pub struct Workload {
    /// The member files.
    pub paths: Vec<PathBuf>,
    /// Their size.
    pub member_bytes: u64,
    /// Where the data area starts on every member (bytes).
    pub data_offset: u64,
    /// Client writes issued.
    pub writes: usize,
}

struct Node {
    idx: usize,
    registry: Arc<Registry>,
    raid: Arc<Raid1>,
    /// The node's half of the array (disjoint: no cross-node range locking in-process).
    lo: u64,
    hi: u64,
}

struct Clients {
    rec: Arc<Recorder>,
    seed: u64,
    next_k: AtomicUsize,
    next_f: AtomicUsize,
}

impl Clients {
    /// One batch of 1–4 concurrent, non-overlapping writes of 4–64 KiB into the node's
    /// half; `fua`: `None` = 70 % FUA.
    async fn batch(&self, node: &Node, rng: &mut Rng, fua: Option<bool>) -> anyhow::Result<()> {
        let n = 1 + rng.below(4);
        let blocks_in = (node.hi - node.lo) / BLOCK as u64;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for _ in 0..n {
            let blocks = 1 + rng.below(16);
            let off = node.lo + rng.below(blocks_in - blocks + 1) * BLOCK as u64;
            let len = blocks * BLOCK as u64;
            if ranges.iter().all(|&(o, l)| off + len <= o || o + l <= off) {
                ranges.push((off, len));
            }
        }
        let mut set = tokio::task::JoinSet::new();
        for (offset, len) in ranges {
            let k = self.next_k.fetch_add(1, Ordering::SeqCst);
            let fua = fua.unwrap_or_else(|| rng.chance(7, 10));
            let data = Bytes::from(pattern(self.seed, k, offset, len));
            self.rec.mark(Mark::Issue {
                k,
                node: node.idx,
                offset,
                len,
                fua,
            });
            let raid = node.raid.clone();
            let rec = self.rec.clone();
            set.spawn(async move {
                match BlockDevice::write(&*raid, offset, data, fua).await {
                    Ok(()) => rec.mark(Mark::Ack { k }),
                    Err(e) => rec.mark(Mark::Failed {
                        k,
                        error: e.to_string(),
                    }),
                }
            });
        }
        while let Some(r) = set.join_next().await {
            r.context("write task")?;
        }
        Ok(())
    }

    async fn flush(&self, node: &Node) -> anyhow::Result<()> {
        let f = self.next_f.fetch_add(1, Ordering::SeqCst);
        self.rec.mark(Mark::FlushIssue { node: node.idx, f });
        BlockDevice::flush(&*node.raid)
            .await
            .with_context(|| format!("client flush on node {}", node.idx))?;
        self.rec.mark(Mark::FlushAck { node: node.idx, f });
        Ok(())
    }

    /// `batches` batches with short pauses (so resync, bitmap daemon and the other
    /// node interleave).
    async fn writes(&self, node: &Node, rng: &mut Rng, batches: usize) -> anyhow::Result<()> {
        for _ in 0..batches {
            self.batch(node, rng, None).await?;
            tokio::time::sleep(Duration::from_millis(rng.below(15))).await;
        }
        Ok(())
    }

    /// Writes without FUA, an idle pause long enough for the bitmap daemon to clear
    /// their bits, then a client flush.
    async fn quiet(
        &self,
        node: &Node,
        rng: &mut Rng,
        batches: usize,
        pause: Duration,
    ) -> anyhow::Result<()> {
        for _ in 0..batches {
            self.batch(node, rng, Some(false)).await?;
        }
        tokio::time::sleep(pause).await;
        self.flush(node).await
    }
}

fn registry(slot: u32, daemon_sleep: Duration, speed: SpeedLimits) -> Arc<Registry> {
    Registry::new(RegistryConfig {
        stop_grace: Duration::from_secs(1),
        drain_timeout: Duration::from_secs(20),
        slot,
        assemble: AssembleOptions {
            daemon_sleep: Some(daemon_sleep),
            speed,
            sync_gate: false,
            safe_mode: None,
            fence: None,
        },
        // Each node of the workload is its own node: its own claims.
        ..RegistryConfig::default()
    })
}

async fn wait_synced(raid: &Raid1, what: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    while raid.sync_busy() {
        if Instant::now() > deadline {
            bail!("{what}: resync/recovery not finished after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// Runs the workload on the recorder's devices (created here as files of
/// `cfg.member_bytes`; put them on a real filesystem, where the engine uses O_DIRECT)
/// while `rec` records:
/// 1. create a clustered mirror (2 slots, not `--assume-clean`: slot 0 all dirty);
/// 2. node A (slot 0) assembles and writes during the initial resync;
/// 3. node B (slot 1) assembles; both write; then each in turn, the other idle,
///    writes without FUA, stays idle until the bitmap daemon cleared the bits, and
///    flushes;
/// 4. the last member is failed on A (B follows), both write degraded;
/// 5. B stops cleanly (its slot keeps the degraded chunks);
/// 6. A removes and re-adds the member (gathering B's slot, as `manage --re-add`
///    does) and writes during the bitmap-driven recovery;
/// 7. A writes, writes without FUA + idle + flush, and stops cleanly.
pub async fn run_workload(cfg: &WorkloadConfig, rec: &Arc<Recorder>) -> anyhow::Result<Workload> {
    let mut rng = Rng::new(cfg.seed);
    let paths = rec.devices.clone();
    for p in &paths {
        let f = std::fs::File::create(p).with_context(|| format!("create {}", p.display()))?;
        f.set_len(cfg.member_bytes)?;
    }
    rec.mark(Mark::Phase("create".into()));
    let mut spec = CreateSpec::new("crash:md0", cfg.members as u32, 0, BitmapMode::Clustered);
    spec.nodes = Some(2);
    spec.bitmap_chunk = Some(cfg.chunk);
    spec.cluster_name = "crash".into();
    // UUIDs from the seed too, so a replay creates the same members.
    let mut uuid = || {
        let mut u = [0u8; 16];
        u[..8].copy_from_slice(&rng.next_u64().to_le_bytes());
        u[8..].copy_from_slice(&rng.next_u64().to_le_bytes());
        u
    };
    spec.uuid = uuid();
    for u in spec.device_uuids.iter_mut() {
        *u = uuid();
    }
    {
        let (spec, paths) = (spec.clone(), paths.clone());
        tokio::task::spawn_blocking(move || {
            mdcluster_agent::format::io::create_members(&spec, &paths, false)
        })
        .await??;
    }
    let m = read_member(&paths[0])?;
    let size = m.sb.size * 512;
    let half = (size / 2) / BLOCK as u64 * BLOCK as u64;
    let clients = Clients {
        rec: rec.clone(),
        seed: cfg.seed,
        next_k: AtomicUsize::new(0),
        next_f: AtomicUsize::new(0),
    };
    let hub = Arc::new(GateHub::default());
    let slow = SpeedLimits {
        min_kib_s: 8_000,
        max_kib_s: 8_000,
    };
    let fast = SpeedLimits {
        min_kib_s: 500_000,
        max_kib_s: 1_000_000,
    };
    let start = |idx: usize, speed: SpeedLimits| {
        let hub = hub.clone();
        let paths = paths.clone();
        let daemon = cfg.daemon_sleep;
        async move {
            let registry = registry(idx as u32, daemon, speed);
            registry
                .assemble(ARRAY, &paths)
                .await
                .with_context(|| format!("assemble on node {idx}"))?;
            let raid = registry.device(ARRAY)?;
            hub.set(
                idx,
                Some(GateNode {
                    name: format!("node{idx}"),
                    slot: idx as u32,
                    registry: registry.clone(),
                    members: paths.clone(),
                }),
            );
            raid.set_meta_gate(Some(Arc::new(InProcGate {
                hub: hub.clone(),
                me: idx,
            })));
            anyhow::Ok((registry, raid))
        }
    };

    rec.mark(Mark::Phase(
        "A assembles, writes during the initial resync".into(),
    ));
    let (reg_a, raid_a) = start(0, slow).await?;
    let a = Node {
        idx: 0,
        registry: reg_a,
        raid: raid_a,
        lo: 0,
        hi: half,
    };
    clients.writes(&a, &mut rng, cfg.batches).await?;
    wait_synced(&a.raid, "initial resync", Duration::from_secs(30)).await?;

    rec.mark(Mark::Phase("B assembles, both write".into()));
    let (reg_b, raid_b) = start(1, fast).await?;
    let b = Node {
        idx: 1,
        registry: reg_b,
        raid: raid_b,
        lo: half,
        hi: size,
    };
    let mut rng_b = Rng::new(rng.next_u64());
    let pause = cfg.daemon_sleep * 5;
    let (ra, rb) = tokio::join!(
        clients.writes(&a, &mut rng, cfg.batches),
        clients.writes(&b, &mut rng_b, cfg.batches)
    );
    ra?;
    rb?;
    // One node at a time, the other idle (its bits already cleared), so nothing but
    // the bitmap daemon flushes the members after the last writes.
    tokio::time::sleep(pause).await;
    for _ in 0..2 {
        clients.quiet(&a, &mut rng, 1, pause).await?;
        clients.quiet(&b, &mut rng_b, 1, pause).await?;
    }

    let failed = paths[cfg.members - 1].clone();
    rec.mark(Mark::Phase(format!("fail {} on A", failed.display())));
    a.registry
        .fail_member(ARRAY, &failed, MetaWrite::Local)
        .await?;
    let (ra, rb) = tokio::join!(
        clients.writes(&a, &mut rng, cfg.batches),
        clients.writes(&b, &mut rng_b, cfg.batches)
    );
    ra?;
    rb?;

    rec.mark(Mark::Phase("B stops".into()));
    b.registry.stop(ARRAY, false).await?;
    hub.set(1, None);

    rec.mark(Mark::Phase("A re-adds the failed member".into()));
    if !a
        .registry
        .remove_member(ARRAY, &failed, MetaWrite::Local)
        .await?
    {
        bail!("{} could not be removed", failed.display());
    }
    let marked =
        mdcluster_agent::service::takeover::gather_slots(ARRAY, &a.raid, &paths, 0, 2).await?;
    rec.mark(Mark::Phase(format!(
        "re-add: {marked} chunks of slot 1 gathered"
    )));
    let added = a.registry.add_member(ARRAY, &failed).await?;
    if !added.readded {
        bail!("{} was added, not re-added", failed.display());
    }
    clients.writes(&a, &mut rng, cfg.batches).await?;
    wait_synced(&a.raid, "re-add recovery", Duration::from_secs(30)).await?;

    rec.mark(Mark::Phase("A writes and stops".into()));
    clients.writes(&a, &mut rng, cfg.batches / 2).await?;
    clients.quiet(&a, &mut rng, 2, pause).await?;
    a.registry.stop(ARRAY, false).await?;
    hub.set(0, None);
    rec.mark(Mark::Phase("end".into()));
    Ok(Workload {
        paths,
        member_bytes: cfg.member_bytes,
        data_offset: m.sb.data_offset * 512,
        writes: clients.next_k.load(Ordering::SeqCst),
    })
}

/// How the uncertain writes of a crash state are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mode {
    /// Every uncertain write present.
    All,
    /// None present.
    None,
    /// Each whole write present with probability p.
    Writes,
    /// Each 4 KiB piece of each write present with probability p (torn writes).
    Torn,
    /// Every metadata write (superblock, bitmap: before the data offset) present; per
    /// member either all its data writes or none, not the same choice on every member:
    /// the caches wrote the metadata back first and the data of only some members.
    MetaFirst,
}

struct ClientWrite {
    node: usize,
    offset: u64,
    len: u64,
    fua: bool,
    issue: usize,
    /// Log index from which the write is promised durable.
    durable: Option<usize>,
}

/// The recorded log, indexed for building crash states.
pub struct Model {
    events: Vec<Event>,
    seed: u64,
    devs: usize,
    member_bytes: u64,
    /// Where the data area starts on every member (bytes).
    data_offset: u64,
    begin_of: HashMap<u64, usize>,
    writes: Vec<ClientWrite>,
    /// Array block → client writes covering it, in issue order.
    by_block: HashMap<u64, Vec<usize>>,
    /// First crash point (the members exist).
    first: usize,
}

impl Model {
    /// Indexes `events` of a workload over `devs` members of `member_bytes` whose data
    /// starts at `data_offset`.
    pub fn new(
        events: Vec<Event>,
        seed: u64,
        devs: usize,
        member_bytes: u64,
        data_offset: u64,
    ) -> Model {
        let mut begin_of = HashMap::new();
        let mut writes: Vec<Option<ClientWrite>> = Vec::new();
        let mut acks: HashMap<usize, usize> = HashMap::new();
        let mut flushes: HashMap<(usize, usize), (usize, Option<usize>)> = HashMap::new();
        let mut first = events.len();
        for (i, e) in events.iter().enumerate() {
            match e {
                Event::FlushBegin { id, .. } => {
                    begin_of.insert(*id, i);
                }
                Event::Mark(Mark::Phase(p)) if p.starts_with("A assembles") => {
                    first = first.min(i);
                }
                Event::Mark(Mark::Issue {
                    k,
                    node,
                    offset,
                    len,
                    fua,
                }) => {
                    if writes.len() <= *k {
                        writes.resize_with(k + 1, || None);
                    }
                    writes[*k] = Some(ClientWrite {
                        node: *node,
                        offset: *offset,
                        len: *len,
                        fua: *fua,
                        issue: i,
                        durable: None,
                    });
                }
                Event::Mark(Mark::Ack { k }) => {
                    acks.insert(*k, i);
                }
                Event::Mark(Mark::FlushIssue { node, f }) => {
                    flushes.insert((*node, *f), (i, None));
                }
                Event::Mark(Mark::FlushAck { node, f }) => {
                    if let Some(x) = flushes.get_mut(&(*node, *f)) {
                        x.1 = Some(i);
                    }
                }
                _ => {}
            }
        }
        let writes: Vec<ClientWrite> = writes
            .into_iter()
            .enumerate()
            .map(|(k, w)| {
                let mut w = w.unwrap_or(ClientWrite {
                    node: usize::MAX,
                    offset: 0,
                    len: 0,
                    fua: false,
                    issue: usize::MAX,
                    durable: None,
                });
                if let Some(&ack) = acks.get(&k) {
                    // FUA: durable when acknowledged; otherwise once a flush of the
                    // same node (another node's flush promises nothing) sent after the
                    // acknowledgement was acknowledged.
                    w.durable = if w.fua {
                        Some(ack)
                    } else {
                        flushes
                            .iter()
                            .filter(|((node, _), (issued, _))| *node == w.node && *issued > ack)
                            .filter_map(|(_, (_, done))| *done)
                            .min()
                    };
                }
                w
            })
            .collect();
        let mut by_block: HashMap<u64, Vec<usize>> = HashMap::new();
        let mut order: Vec<usize> = (0..writes.len()).collect();
        order.sort_by_key(|&k| writes[k].issue);
        for k in order {
            let w = &writes[k];
            for b in 0..w.len / BLOCK as u64 {
                by_block
                    .entry(w.offset / BLOCK as u64 + b)
                    .or_default()
                    .push(k);
            }
        }
        Model {
            events,
            seed,
            devs,
            member_bytes,
            data_offset,
            begin_of,
            writes,
            by_block,
            first,
        }
    }

    /// Log entries.
    pub fn len(&self) -> usize {
        self.events.len()
    }

    /// Whether the log is empty.
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
    }

    /// The crash points: before every flush begins and after every flush ends (once
    /// the array exists), plus `extra` random points, sorted.
    pub fn crash_points(&self, rng: &mut Rng, extra: usize) -> (Vec<usize>, usize) {
        let mut pts = BTreeSet::new();
        // A point whose crash state equals the previous point's is skipped: nothing in
        // between but flush starts, issue and phase marks, and flush ends that made no
        // new write durable.
        let mut writes_of: Vec<Vec<usize>> = vec![Vec::new(); self.devs];
        for (i, e) in self.events.iter().enumerate() {
            if let Event::Write { dev, .. } = e {
                writes_of[*dev].push(i);
            }
        }
        let mut durable = vec![0usize; self.devs];
        let mut last: Option<usize> = None;
        let mut changed = true;
        for (i, e) in self.events.iter().enumerate() {
            let at = match e {
                Event::FlushBegin { .. } => Some(i),
                Event::FlushEnd { .. } => Some(i + 1),
                _ => None,
            };
            if i >= self.first {
                if let Some(at) = at {
                    // The state at `at` includes this entry only for a flush end.
                    let ends_here = matches!(e, Event::FlushEnd { .. });
                    let mut c = changed;
                    if ends_here {
                        c |= self.flush_end_changes(e, &durable, &writes_of);
                    }
                    if c || last.is_none() {
                        pts.insert(at);
                        last = Some(at);
                        changed = false;
                        if ends_here {
                            self.apply_flush_end(e, &mut durable);
                        }
                        continue;
                    }
                }
            }
            match e {
                Event::Write { .. }
                | Event::Mark(Mark::Ack { .. })
                | Event::Mark(Mark::Failed { .. })
                | Event::Mark(Mark::FlushAck { .. }) => changed = true,
                Event::FlushEnd { .. } => {
                    changed |= self.flush_end_changes(e, &durable, &writes_of);
                    self.apply_flush_end(e, &mut durable);
                }
                _ => {}
            }
        }
        let boundaries = pts.len();
        let span = (self.events.len() + 1 - self.first) as u64;
        for _ in 0..extra {
            pts.insert(self.first + rng.below(span) as usize);
        }
        pts.insert(self.events.len());
        (pts.into_iter().collect(), boundaries)
    }

    /// Whether flush end `e` makes a write durable that was not before.
    fn flush_end_changes(&self, e: &Event, durable: &[usize], writes_of: &[Vec<usize>]) -> bool {
        let Event::FlushEnd { dev, id } = e else {
            return false;
        };
        let Some(&b) = self.begin_of.get(id) else {
            return false;
        };
        let w = &writes_of[*dev];
        let from = w.partition_point(|&x| x < durable[*dev]);
        w.get(from).is_some_and(|&x| x < b)
    }

    fn apply_flush_end(&self, e: &Event, durable: &mut [usize]) {
        if let Event::FlushEnd { dev, id } = e {
            if let Some(&b) = self.begin_of.get(id) {
                durable[*dev] = durable[*dev].max(b);
            }
        }
    }

    /// The phase the log is in at `i`.
    pub fn phase_at(&self, i: usize) -> String {
        self.events[..i.min(self.events.len())]
            .iter()
            .rev()
            .find_map(|e| match e {
                Event::Mark(Mark::Phase(p)) => Some(p.clone()),
                _ => None,
            })
            .unwrap_or_default()
    }

    /// What array block `b` may hold after a crash at `i`: the allowed contents and
    /// the write promised durable there, if any.
    fn allowed(&self, b: u64, i: usize) -> (Vec<Content>, Option<usize>) {
        let Some(ks) = self.by_block.get(&b) else {
            return (vec![Content::Zero], None);
        };
        let issued: Vec<usize> = ks
            .iter()
            .copied()
            .filter(|&k| self.writes[k].issue < i)
            .collect();
        let last = issued
            .iter()
            .rposition(|&k| self.writes[k].durable.is_some_and(|d| d < i));
        let mut out: Vec<Content> = issued[last.unwrap_or(0)..]
            .iter()
            .map(|&k| Content::Write(k))
            .collect();
        if last.is_none() {
            out.push(Content::Zero);
        }
        (out, last.map(|x| issued[x]))
    }

    fn describe(&self, k: usize) -> String {
        let w = &self.writes[k];
        format!(
            "write #{k} (node {}, array offset {}, {} bytes, {})",
            w.node,
            w.offset,
            w.len,
            if w.fua { "FUA" } else { "flushed" }
        )
    }
}

/// Builds crash states for increasing crash points: the durable image of every member
/// is kept up to date incrementally.
pub struct Replayer<'a> {
    model: &'a Model,
    durable: Vec<Vec<u8>>,
    /// Log position processed for durability.
    cursor: usize,
    /// Per device: writes with a log index below this are durable.
    durable_upto: Vec<usize>,
    /// Per device: log index up to which writes were applied to `durable`.
    applied_upto: Vec<usize>,
}

impl<'a> Replayer<'a> {
    /// Members as before the log (zeroes).
    pub fn new(model: &'a Model) -> Replayer<'a> {
        Replayer {
            model,
            durable: vec![vec![0u8; model.member_bytes as usize]; model.devs],
            cursor: 0,
            durable_upto: vec![0; model.devs],
            applied_upto: vec![0; model.devs],
        }
    }

    fn apply(img: &mut [u8], offset: u64, data: &[u8]) {
        let end = (offset as usize + data.len()).min(img.len());
        if (offset as usize) < end {
            img[offset as usize..end].copy_from_slice(&data[..end - offset as usize]);
        }
    }

    /// Whether a crash at `i` leaves both metadata and data writes uncertain (then a
    /// [`Mode::MetaFirst`] state is worth checking too). Call before
    /// [`Replayer::write_state`] for the same `i`.
    pub fn mixed(&mut self, i: usize) -> bool {
        self.advance(i);
        let (mut meta, mut data) = (false, false);
        for d in 0..self.model.devs {
            for e in &self.model.events[self.applied_upto[d]..i] {
                if let Event::Write { dev, offset, .. } = e {
                    if *dev == d {
                        if *offset < self.model.data_offset {
                            meta = true;
                        } else {
                            data = true;
                        }
                    }
                }
            }
        }
        meta && data
    }

    /// Brings the durable images to a crash at `i`.
    fn advance(&mut self, i: usize) {
        let ev = &self.model.events;
        while self.cursor < i {
            if let Event::FlushEnd { dev, id } = &ev[self.cursor] {
                if let Some(&b) = self.model.begin_of.get(id) {
                    self.durable_upto[*dev] = self.durable_upto[*dev].max(b);
                }
            }
            self.cursor += 1;
        }
        for d in 0..self.model.devs {
            let upto = self.durable_upto[d];
            for e in &ev[self.applied_upto[d]..upto.max(self.applied_upto[d])] {
                if let Event::Write { dev, offset, data } = e {
                    if *dev == d {
                        Self::apply(&mut self.durable[d], *offset, data);
                    }
                }
            }
            self.applied_upto[d] = self.applied_upto[d].max(upto);
        }
    }

    /// Writes the members as a crash at `i` (events `..i` happened) leaves them into
    /// `dir` (`m0`, `m1`, ...), choosing the uncertain writes by `mode` with `rng`.
    /// Crash points must not decrease.
    pub fn write_state(
        &mut self,
        i: usize,
        mode: Mode,
        rng: &mut Rng,
        dir: &Path,
    ) -> anyhow::Result<Vec<PathBuf>> {
        self.advance(i);
        let ev = &self.model.events;
        let p = [1u64, 2, 3][rng.below(3) as usize];
        // MetaFirst: which members keep their data writes (a mix).
        let devs = self.model.devs as u64;
        let keep = 1 + rng.below((1 << devs) - 2);
        let mut paths = Vec::new();
        for d in 0..self.model.devs {
            let path = dir.join(format!("m{d}"));
            let f = std::fs::File::create(&path)
                .with_context(|| format!("create {}", path.display()))?;
            f.set_len(self.model.member_bytes)?;
            // Sparse: only the blocks that are not zero.
            static ZERO: [u8; BLOCK] = [0; BLOCK];
            for (b, block) in self.durable[d].chunks(BLOCK).enumerate() {
                if block != &ZERO[..block.len()] {
                    f.write_all_at(block, (b * BLOCK) as u64)?;
                }
            }
            for e in &ev[self.applied_upto[d]..i] {
                let Event::Write { dev, offset, data } = e else {
                    continue;
                };
                if *dev != d {
                    continue;
                }
                match mode {
                    Mode::All => f.write_all_at(data, *offset)?,
                    Mode::None => {}
                    Mode::Writes => {
                        if rng.chance(p, 4) {
                            f.write_all_at(data, *offset)?;
                        }
                    }
                    Mode::MetaFirst => {
                        if *offset < self.model.data_offset || keep & (1 << d) != 0 {
                            f.write_all_at(data, *offset)?;
                        }
                    }
                    Mode::Torn => {
                        for (n, piece) in data.chunks(BLOCK).enumerate() {
                            if rng.chance(p, 4) {
                                f.write_all_at(piece, offset + (n * BLOCK) as u64)?;
                            }
                        }
                    }
                }
            }
            paths.push(path);
        }
        Ok(paths)
    }
}

/// Recovers the member files `paths` as the first node back after a cluster-wide
/// crash, waits for the resync, stops; returns the members in sync at the end and the
/// array size, or what went wrong (a violation).
static AREAS: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

async fn recover(paths: &[PathBuf], recovering: &mut bool) -> Result<(Vec<usize>, u64), String> {
    let members = {
        let paths = paths.to_vec();
        tokio::task::spawn_blocking(move || {
            paths
                .iter()
                .map(|p| read_member(p).map_err(|e| format!("superblock does not parse: {e}")))
                .collect::<Result<Vec<_>, String>>()
        })
        .await
        .map_err(|e| format!("read task: {e}"))??
    };
    // join: slot 0 for us; every other slot is free (the cluster is down): merge the
    // dirty ones; our own dirty bits also mark the array unclean.
    let first = &members[0];
    let from: Vec<u32> = (1..first.bitmap.len() as u32)
        .filter(|&s| {
            let b = &first.bitmap[s as usize];
            count_set(&b.bits, b.sb.chunks()) > 0
        })
        .collect();
    let own = first
        .bitmap
        .first()
        .map_or(0, |b| count_set(&b.bits, b.sb.chunks()));
    if !from.is_empty() || own > 0 {
        let paths = paths.to_vec();
        tokio::task::spawn_blocking(move || {
            mdcluster_agent::format::slots::merge(&paths, 0, &from, None)
        })
        .await
        .map_err(|e| format!("merge task: {e}"))?
        .map_err(|e| format!("join's slot merge failed: {e}"))?;
    }
    let reg = registry(
        0,
        Duration::from_secs(5),
        SpeedLimits {
            min_kib_s: 1_000_000,
            max_kib_s: 2_000_000,
        },
    );
    reg.assemble(ARRAY, paths)
        .await
        .map_err(|e| format!("assemble failed: {e}"))?;
    let raid = reg.device(ARRAY).map_err(|e| e.to_string())?;
    *recovering = raid
        .status()
        .members
        .iter()
        .any(|m| matches!(m.state, MemberState::Recovering { .. }));
    let waited = wait_synced(&raid, "recovery", Duration::from_secs(20)).await;
    let status = raid.status();
    drop(raid);
    let stopped = reg.stop(ARRAY, true).await;
    waited.map_err(|e| e.to_string())?;
    stopped.map_err(|e| format!("stop after recovery failed: {e}"))?;
    let in_sync = status
        .members
        .iter()
        .enumerate()
        .filter(|(_, m)| m.state == MemberState::InSync && !m.removed)
        .filter_map(|(_, m)| paths.iter().position(|p| p.display().to_string() == m.path))
        .collect();
    Ok((in_sync, status.size))
}

/// Result of checking one crash state.
#[derive(Debug)]
pub struct Verdict {
    /// Log index of the crash.
    pub point: usize,
    /// How the uncertain writes were chosen.
    pub mode: Mode,
    /// What is wrong (empty: consistent).
    pub problems: Vec<String>,
    /// A member was recovering when the array was assembled after the crash.
    pub recovering: bool,
    /// The assemble after the crash failed.
    pub assemble_failed: bool,
}

/// Recovers the crash state in the member files `paths` and checks it.
pub async fn check_state(
    model: &Model,
    paths: &[PathBuf],
    point: usize,
    mode: Mode,
) -> anyhow::Result<Verdict> {
    // The checker's own invariant: a crash state holds no data of a write issued
    // after the crash point.
    for p in paths {
        let f = std::fs::File::open(p)?;
        let mut block = vec![0u8; BLOCK];
        for &b in model.by_block.keys() {
            f.read_exact_at(&mut block, model.data_offset + b * BLOCK as u64)?;
            if let Content::Write(k) = identify(model.seed, &block, b * BLOCK as u64) {
                if model.writes[k].issue >= point {
                    bail!(
                        "crash state at {point} ({mode:?}) holds write #{k} (issued at {}) in {} at array block {b}",
                        model.writes[k].issue,
                        p.display()
                    );
                }
            }
        }
    }
    let mut problems = Vec::new();
    let mut areas_back = Vec::new();
    let mut recovering = false;
    let recovered = recover(paths, &mut recovering).await;
    let assemble_failed = matches!(&recovered, Err(e) if e.starts_with("assemble failed"));
    match recovered {
        Err(e) => problems.push(e),
        Ok((in_sync, size)) => {
            if in_sync.is_empty() {
                problems.push("no member in sync after recovery".into());
            }
            // Buffers reused across crash states (a fresh 8 MiB per member and state
            // costs more in page faults than the reads).
            let mut pool = std::mem::take(&mut *AREAS.lock().unwrap_or_else(|e| e.into_inner()));
            let mut areas = Vec::new();
            for &d in &in_sync {
                let m = read_member(&paths[d])?;
                let f = std::fs::File::open(&paths[d])?;
                let mut area = pool.pop().unwrap_or_default();
                area.resize(size as usize, 0);
                f.read_exact_at(&mut area, m.sb.data_offset * 512)?;
                areas.push((d, area));
            }
            if let Some((d0, a0)) = areas.first() {
                for (d, a) in &areas[1..] {
                    if a != a0 {
                        let b = a
                            .chunks(BLOCK)
                            .zip(a0.chunks(BLOCK))
                            .position(|(x, y)| x != y)
                            .unwrap_or(0);
                        let off = (b * BLOCK) as u64;
                        problems.push(format!(
                            "members m{d0} and m{d} differ at array offset {off}: {} vs {}",
                            identify(model.seed, &a0[b * BLOCK..(b + 1) * BLOCK], off),
                            identify(model.seed, &a[b * BLOCK..(b + 1) * BLOCK], off),
                        ));
                    }
                }
                static ZERO: [u8; BLOCK] = [0; BLOCK];
                for (b, block) in a0.chunks(BLOCK).enumerate() {
                    if !model.by_block.contains_key(&(b as u64)) && block == &ZERO[..] {
                        continue; // never written, zeroes: fine
                    }
                    let off = (b * BLOCK) as u64;
                    let got = identify(model.seed, block, off);
                    let (allowed, promised) = model.allowed(b as u64, point);
                    if !allowed.contains(&got) {
                        problems.push(match promised {
                            Some(k) => format!(
                                "acknowledged {} lost at array offset {off}: m{d0} holds {got}",
                                model.describe(k)
                            ),
                            None => format!(
                                "array offset {off} holds {got}, expected one of {allowed:?}"
                            ),
                        });
                        if problems.len() > 4 {
                            break;
                        }
                    }
                }
            }
            areas_back.extend(areas.into_iter().map(|(_, a)| a));
        }
    }
    AREAS
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(areas_back);
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
    Ok(Verdict {
        point,
        mode,
        problems,
        recovering,
        assemble_failed,
    })
}

impl Model {
    /// The log up to `i`, one line per entry (for replaying a violation by hand).
    pub fn dump(&self, i: usize) -> String {
        let mut out = String::new();
        for (n, e) in self.events[..i.min(self.events.len())].iter().enumerate() {
            let line = match e {
                Event::Write { dev, offset, data } => {
                    format!("{n}: m{dev} write {offset} +{}", data.len())
                }
                Event::FlushBegin { dev, id } => format!("{n}: m{dev} flush {id} begin"),
                Event::FlushEnd { dev, id } => format!("{n}: m{dev} flush {id} end"),
                Event::Mark(m) => format!("{n}: {m:?}"),
            };
            out.push_str(&line);
            out.push('\n');
        }
        out
    }
}
