//! The in-process cluster: several agent `Node`s in one process, each driven by the
//! agent's own runtime ([`Driver`]: notifications, message receivers, takeover,
//! rejoin after a lost session), over one in-memory lock service ([`MemLock`]), on
//! real member files in a temporary directory. No sockets, no child processes: a
//! scenario of the real-process tiers runs here in about a second.
//!
//! Storage: every member is one file under `disks/`; each node sees it under its own
//! path (`nodeN/dK`, a hard link: another path to the same bytes, as two hosts see one
//! LUN), and its device allow-list admits only its own directory, so assembling from
//! another node's recorded paths finds the members by array UUID as on real
//! multi-view storage. Member I/O goes through the real engine (`O_DIRECT` where the
//! filesystem takes it, buffered otherwise: all nodes share this process's page
//! cache, so they stay coherent either way).
//!
//! A crash ([`InProc::crash`]) stops the node's driver, expires its session in the lock
//! service (its locks go, waiters are told, its fence gate closes so none of its member
//! I/O passes any more) and tears its arrays down without writing metadata, as the
//! process would have left them; [`InProc::start`] then brings the node back with the
//! same run directory (its saved array list), like a restarted `mdagent`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use mdcluster_agent::allow::{DeviceAllow, EmptyList};
use mdcluster_agent::array::assemble::AssembleOptions;
use mdcluster_agent::array::RegistryConfig;
use mdcluster_agent::cluster::Timings;
use mdcluster_agent::nbd::ServerConfig;
use mdcluster_agent::service::runtime::{open_session, Driver, Health};
use mdcluster_agent::service::{Node, NodeConfig};
use mdcluster_proto::status::WireError;
use mdcluster_proto::v1 as pb;

use crate::memlock::MemLock;

/// The session TTL the nodes are given (reported only: sessions of the in-memory
/// service end when a test kills them).
pub const TTL: Duration = Duration::from_secs(4);
/// The fence margin the drivers' watchdogs use.
pub const FENCE_MARGIN: Duration = Duration::from_millis(400);

/// The protocol timings of the in-process nodes: the agent's defaults with the polling
/// periods shrunk (failure detection, resync and recovery polls); every deadline stays
/// as in production.
pub fn timings() -> Timings {
    Timings {
        takeover_period: Duration::from_millis(100),
        resync_poll: Duration::from_millis(20),
        remote_recovery_poll: Duration::from_millis(50),
        ..Timings::default()
    }
}

/// One node of the in-process cluster.
pub struct InNode {
    /// Its name (`node1`, ...).
    pub name: String,
    cfg: NodeConfig,
    driver: Option<Driver>,
}

/// Several nodes in one process over one in-memory lock service.
pub struct InProc {
    /// The lock service.
    pub lock: MemLock,
    dir: tempfile::TempDir,
    disks: Vec<PathBuf>,
    nodes: Vec<InNode>,
}

impl Drop for InProc {
    /// A test that ends early (a failed check, a panic) leaves nodes running: their
    /// drivers are told to stop, and the directory is removed once their last writes
    /// (the final mdstat file, a saved list) are done, again if one of them recreated
    /// part of it (bounded: about 2 s).
    fn drop(&mut self) {
        let running: Vec<_> = self
            .nodes
            .iter()
            .filter_map(|n| n.driver.as_ref().map(Driver::stop_token))
            .collect();
        if running.is_empty() {
            return;
        }
        for t in &running {
            t.cancel();
        }
        let path = self.dir.path().to_owned();
        for _ in 0..10 {
            std::thread::sleep(Duration::from_millis(100));
            let _ = std::fs::remove_dir_all(&path);
            std::thread::sleep(Duration::from_millis(100));
            if !path.exists() {
                break;
            }
        }
    }
}

impl InProc {
    /// `nodes` nodes (not started) and `disks` member files of `size` bytes.
    pub fn new(nodes: usize, disks: usize, size: u64) -> anyhow::Result<InProc> {
        let dir = tempfile::Builder::new()
            .prefix("mdc-inproc-")
            .tempdir_in(std::env::var_os("MDC_INPROC_DIR").unwrap_or_else(|| "/var/tmp".into()))
            .context("temporary directory")?;
        let mut paths = Vec::new();
        std::fs::create_dir_all(dir.path().join("disks"))?;
        for k in 0..disks {
            let p = dir.path().join("disks").join(format!("d{k}"));
            std::fs::File::create(&p)?.set_len(size)?;
            paths.push(p);
        }
        let mut ns = Vec::new();
        for i in 1..=nodes {
            let name = format!("node{i}");
            let nd = dir.path().join(&name);
            std::fs::create_dir_all(nd.join("run"))?;
            for (k, p) in paths.iter().enumerate() {
                std::fs::hard_link(p, nd.join(format!("d{k}")))?;
            }
            let allow = DeviceAllow::new(
                vec![format!("{}/d*", nd.display())],
                EmptyList::AllowsNothing,
            )
            .map_err(|e| anyhow!("allow-list: {e}"))?;
            let cfg = NodeConfig {
                node: name.clone(),
                run_dir: nd.join("run"),
                registry: RegistryConfig {
                    stop_grace: Duration::from_millis(200),
                    device_allow: allow,
                    // As `mdagent` in cluster mode: clustered arrays sync one node at a
                    // time, idle arrays are marked clean after a second.
                    assemble: AssembleOptions {
                        sync_gate: true,
                        safe_mode: Some(Duration::from_secs(1)),
                        ..AssembleOptions::default()
                    },
                    ..RegistryConfig::default()
                },
                nbd: ServerConfig::default(),
                nbd_tcp: None,
                suspend_io_timeout: Duration::from_secs(2),
                timings: timings(),
            };
            ns.push(InNode {
                name,
                cfg,
                driver: None,
            });
        }
        Ok(InProc {
            lock: MemLock::new(),
            dir,
            disks: paths,
            nodes: ns,
        })
    }

    /// Node `i` runs with `timings` instead of [`timings`] from its next start.
    pub fn set_timings(&mut self, i: usize, timings: Timings) {
        self.nodes[i - 1].cfg.timings = timings;
    }

    /// The member files (for on-disk checks).
    pub fn disks(&self) -> &[PathBuf] {
        &self.disks
    }

    /// Node `i`'s (1-based) path of disk `k`.
    pub fn member(&self, i: usize, k: usize) -> PathBuf {
        self.dir
            .path()
            .join(format!("node{i}"))
            .join(format!("d{k}"))
    }

    /// Node `i`'s paths of disks `ks`.
    pub fn members(&self, i: usize, ks: std::ops::Range<usize>) -> Vec<PathBuf> {
        ks.map(|k| self.member(i, k)).collect()
    }

    /// The temporary directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn slot(&self, i: usize) -> &InNode {
        &self.nodes[i - 1]
    }

    /// Starts node `i` (1-based): opens its session and drives it; the arrays it had
    /// assembled (its saved list) are assembled again, as at an agent start.
    pub async fn start(&mut self, i: usize) -> anyhow::Result<Arc<Node>> {
        let n = &mut self.nodes[i - 1];
        if n.driver.is_some() {
            bail!("{} is already running", n.name);
        }
        let node = Node::new(n.cfg.clone());
        let opener = self.lock.opener(&n.name, TTL);
        let opened = open_session(opener.as_ref(), Duration::from_secs(5))
            .await
            .with_context(|| format!("open the session of {}", n.name))?;
        let driver = Driver::start(
            node.clone(),
            opener,
            opened,
            FENCE_MARGIN,
            Health::new(None),
        );
        n.driver = Some(driver);
        Ok(node)
    }

    /// Whether node `i` runs.
    pub fn running(&self, i: usize) -> bool {
        self.slot(i).driver.is_some()
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True without nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// The running node `i`.
    pub fn node(&self, i: usize) -> Arc<Node> {
        self.slot(i)
            .driver
            .as_ref()
            .unwrap_or_else(|| panic!("node{i} is not running"))
            .node()
            .clone()
    }

    /// The readiness of the running node `i`.
    pub fn health(&self, i: usize) -> Arc<Health> {
        self.slot(i)
            .driver
            .as_ref()
            .unwrap_or_else(|| panic!("node{i} is not running"))
            .health()
            .clone()
    }

    /// Node `i` crashes: see the module doc. Returns the arrays it had joined.
    pub async fn crash(&mut self, i: usize) -> anyhow::Result<Vec<String>> {
        let n = &mut self.nodes[i - 1];
        let driver = n
            .driver
            .take()
            .ok_or_else(|| anyhow!("{} is not running", n.name))?;
        let node = driver.node().clone();
        driver.abandon().await;
        self.lock.kill(&n.name);
        node.set_session(None);
        node.drop_lost_arrays("the node crashed (test)")
            .await
            .map_err(|stuck| anyhow!("{}: arrays not torn down: {stuck}", n.name))
    }

    /// Stops node `i` cleanly (every array stopped, leaving the cluster; session closed).
    pub async fn shutdown(&mut self, i: usize) {
        if let Some(d) = self.nodes[i - 1].driver.take() {
            d.shutdown().await;
        }
    }

    /// Stops every running node cleanly.
    pub async fn shutdown_all(&mut self) {
        for i in 1..=self.nodes.len() {
            self.shutdown(i).await;
        }
    }

    /// Starts nodes 1 and 2 and gives them the clean clustered mirror `md0` over disks
    /// 0 and 1 with `slots` bitmap slots: created on node1, assembled on node2.
    pub async fn mirror_on_two_nodes(&mut self, slots: u32) {
        self.start(1).await.expect("start node1");
        self.start(2).await.expect("start node2");
        self.create(1, "md0", 0..2, slots, true)
            .await
            .expect("create md0 on node1");
        self.assemble_from(2, 1, "md0")
            .await
            .expect("assemble md0 on node2");
    }

    /// Creates clustered RAID1 `name` on node `i` over its paths of `disks`, `slots`
    /// bitmap slots of 1 MiB chunks, clean (`--assume-clean`) or with an initial
    /// resync.
    pub async fn create(
        &self,
        i: usize,
        name: &str,
        disks: std::ops::Range<usize>,
        slots: u32,
        assume_clean: bool,
    ) -> Result<pb::ArrayStatus, WireError> {
        let members = self.members(i, disks);
        self.node(i)
            .create(pb::CreateArrayRequest {
                name: name.into(),
                level: 1,
                raid_devices: members.len() as u32,
                bitmap: "clustered".into(),
                nodes: slots,
                assume_clean,
                bitmap_chunk_kib: 1024,
                members: members.iter().map(|p| p.display().to_string()).collect(),
                ..Default::default()
            })
            .await
    }

    /// Assembles `name` on node `i` from node `from`'s recorded paths (found here by
    /// the array UUID, as `mdctl assemble` from the cluster's record).
    pub async fn assemble_from(
        &self,
        i: usize,
        from: usize,
        name: &str,
    ) -> Result<pb::ArrayStatus, WireError> {
        let st = self.node(from).get(name)?;
        let recorded: Vec<PathBuf> = st
            .members
            .iter()
            .filter(|m| m.role.is_some())
            .map(|m| PathBuf::from(&m.path))
            .collect();
        self.node(i)
            .assemble_recorded(name, recorded, &st.uuid)
            .await
    }

    /// Writes `data` at `offset` of `name` through node `i`'s engine.
    pub async fn write(
        &self,
        i: usize,
        name: &str,
        offset: u64,
        data: Vec<u8>,
    ) -> anyhow::Result<()> {
        use mdcluster_agent::blockdev::BlockDevice;
        let (raid, _) = self
            .node(i)
            .raid_of(name)
            .ok_or_else(|| anyhow!("{name} is not active on node{i}"))?;
        raid.write(offset, data.into(), false)
            .await
            .with_context(|| format!("node{i}: write {name} at {offset}"))
    }

    /// Reads `len` bytes at `offset` of `name` through node `i`'s engine.
    pub async fn read(
        &self,
        i: usize,
        name: &str,
        offset: u64,
        len: u32,
    ) -> anyhow::Result<Vec<u8>> {
        use mdcluster_agent::blockdev::BlockDevice;
        let (raid, _) = self
            .node(i)
            .raid_of(name)
            .ok_or_else(|| anyhow!("{name} is not active on node{i}"))?;
        Ok(raid
            .read(offset, len)
            .await
            .with_context(|| format!("node{i}: read {name} at {offset}"))?
            .to_vec())
    }

    /// Node `i`'s status of `name`.
    pub fn status(&self, i: usize, name: &str) -> Result<pb::ArrayStatus, WireError> {
        self.node(i).get(name)
    }

    /// Waits until `cond` holds of node `i`'s status of `name`, for at most `timeout`.
    pub async fn wait_status(
        &self,
        i: usize,
        name: &str,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&pb::ArrayStatus) -> bool,
    ) -> pb::ArrayStatus {
        let end = Instant::now() + timeout;
        loop {
            let st = self.status(i, name);
            if let Ok(st) = &st {
                if cond(st) {
                    return st.clone();
                }
            }
            assert!(
                Instant::now() < end,
                "node{i}, {name}: {what} not within {timeout:?}: {st:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl InProc {
    /// Sync speed min = max = `kib` KiB/s on every running node (`mdctl tune`).
    pub fn tune(&self, kib: u64) {
        for n in &self.nodes {
            if let Some(d) = &n.driver {
                d.node()
                    .set_speed(
                        "",
                        mdcluster_agent::raid::SpeedLimits {
                            min_kib_s: kib,
                            max_kib_s: kib,
                        },
                    )
                    .expect("set speed");
            }
        }
    }

    /// Node `i`'s mdstat block of `name` (its lines up to the next blank line).
    pub fn mdstat(&self, i: usize, name: &str) -> String {
        let text = self.node(i).mdstat();
        let mut out = String::new();
        let mut inside = false;
        for l in text.lines() {
            if l.starts_with(&format!("{name} :")) {
                inside = true;
            } else if l.trim().is_empty() || (inside && !l.starts_with(' ')) {
                if inside {
                    break;
                }
                continue;
            }
            if inside {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    /// Waits until node `i`'s mdstat block of `name` satisfies `cond`.
    pub async fn wait_mdstat(
        &self,
        i: usize,
        name: &str,
        timeout: Duration,
        what: &str,
        cond: impl Fn(&str) -> bool,
    ) -> String {
        let end = Instant::now() + timeout;
        loop {
            let t = self.mdstat(i, name);
            if cond(&t) {
                return t;
            }
            assert!(
                Instant::now() < end,
                "node{i}, {name}: {what} not within {timeout:?}:\n{t}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Member operations on `name` through node `i` (`mdctl manage`).
    pub async fn manage(
        &self,
        i: usize,
        name: &str,
        ops: &[(&str, &Path)],
    ) -> Result<pb::ArrayStatus, WireError> {
        let ops = ops
            .iter()
            .map(|(action, dev)| pb::ManageOp {
                action: action.to_string(),
                device: dev.display().to_string(),
            })
            .collect();
        self.node(i).manage(name, ops).await
    }
}

/// The state of the member at `path` in a status (`None`: not a member).
pub fn member_state(st: &pb::ArrayStatus, path: &Path) -> Option<String> {
    let p = path.display().to_string();
    st.members
        .iter()
        .find(|m| m.path == p)
        .map(|m| m.state.clone())
}

/// The bitmap of a status (clustered arrays have one).
pub fn bitmap(st: &pb::ArrayStatus) -> &pb::BitmapInfo {
    st.bitmap.as_ref().expect("a bitmap")
}

/// The sync info of a status.
pub fn sync(st: &pb::ArrayStatus) -> &pb::SyncInfo {
    st.sync.as_ref().expect("sync info")
}

/// True when nothing is syncing and nothing is needed.
pub fn settled(st: &pb::ArrayStatus) -> bool {
    let s = sync(st);
    !matches!(s.state.as_str(), "busy" | "throttled") && bitmap(st).needed == 0
}
