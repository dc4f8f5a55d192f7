//! A whole test cluster from real processes: one etcd, one `mdserver` (or more
//! replicas, see [`ClusterBuilder::replicas`]), N `mdagent`s in
//! cluster mode on 127.0.0.1, 127.0.0.2, ... (loopback addresses, one per node), plus
//! `mdctl` runs against it. Usable from tests and by hand:
//!
//! ```no_run
//! let c = mdcluster_tests::cluster::ClusterBuilder::new(2).start().unwrap();
//! println!("MDCTL_SERVER={}", c.url());
//! ```
//!
//! Every process is killed (-9) when the guard drops; every wait has a deadline.
//!
//! **Multi-view storage** ([`ClusterBuilder::shared_storage`], [`SharedStorage`]): the
//! members are backing files `<dir>/disk<k>`, and every node reaches every member
//! through a loop device of its own (`losetup --direct-io=on`), linked as
//! `<dir>/n<node>/m<k>` ([`TestCluster::member`]). Each loop device has its own page
//! cache and writes the backing file directly, so the nodes see the same bytes under
//! different paths and through different caches, as two hosts on one LUN do; each
//! agent's `--device-allow` covers only its own links. The loop devices are set to
//! autoclear (they go away when the last opener closes them, also when the test process
//! is killed) and detached explicitly on drop.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::etcd::{free_port, Etcd};
use crate::server::{MdServer, ServerOpts};
use crate::tools::{bin, run_timeout};

/// How long an agent may take to announce that it serves.
pub const AGENT_START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound of one `mdctl` run.
pub const MDCTL_TIMEOUT: Duration = Duration::from_secs(120);

/// How to build a cluster.
#[derive(Debug, Clone)]
pub struct ClusterBuilder {
    nodes: usize,
    server: ServerOpts,
    agent_ttl: Duration,
    replicas: usize,
    agent_args: Vec<String>,
    /// Extra flags of single agents (index 0 = node1); `{dir}` = the cluster directory.
    node_args: Vec<(usize, Vec<String>)>,
    /// Multi-view storage: (members, bytes each).
    shared: Option<(usize, u64)>,
    /// Mutual TLS on every gRPC hop with this PKI (None: `--insecure`).
    tls: Option<crate::pki::ClusterPki>,
}

impl ClusterBuilder {
    /// `nodes` agents, mdserver with a 2 s default session TTL, agents asking for 4 s (fence
    /// margin: a quarter of it).
    pub fn new(nodes: usize) -> Self {
        ClusterBuilder {
            nodes,
            server: ServerOpts::default(),
            agent_ttl: Duration::from_secs(4),
            replicas: 1,
            agent_args: Vec::new(),
            node_args: Vec::new(),
            shared: None,
            tls: None,
        }
    }

    /// Multi-view storage: `disks` members of `bytes` each, every node reaching each
    /// through its own loop device (`<dir>/n<node>/m<k>`, see [`TestCluster::member`]);
    /// every agent gets `--device-allow <dir>/n<node>/*`, so a node may open only its own
    /// views.
    pub fn shared_storage(mut self, disks: usize, bytes: u64) -> Self {
        self.shared = Some((disks, bytes));
        self
    }

    /// Extra flags for agent `node` only (1-based: 2 = node2); `{dir}` in them is
    /// replaced by the cluster's directory (e.g. `--device-allow {dir}/m*`).
    pub fn node_args(mut self, node: usize, args: &[&str]) -> Self {
        self.node_args.push((
            node.saturating_sub(1),
            args.iter().map(|s| s.to_string()).collect(),
        ));
        self
    }

    /// The agents' session TTL.
    pub fn agent_ttl(mut self, ttl: Duration) -> Self {
        self.agent_ttl = ttl;
        self
    }

    /// How many mdserver replicas (default 1); the agents get every replica's URL,
    /// the first one first (so they open their sessions there).
    pub fn replicas(mut self, n: usize) -> Self {
        self.replicas = n.max(1);
        self
    }

    /// Mutual TLS on every gRPC hop: mdserver and node`i` use `pki`'s certificates,
    /// [`TestCluster::mdctl`] the admin's (the PKI needs a certificate per node).
    pub fn tls(mut self, pki: &crate::pki::ClusterPki) -> Self {
        self.server.extra_args.extend(pki.server.args());
        self.tls = Some(pki.clone());
        self
    }

    /// Extra flags for every mdserver replica.
    pub fn server_args(mut self, args: &[&str]) -> Self {
        self.server
            .extra_args
            .extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Extra flags for every agent.
    pub fn agent_args(mut self, args: &[&str]) -> Self {
        self.agent_args.extend(args.iter().map(|s| s.to_string()));
        self
    }

    /// Starts etcd, mdserver and the agents, and waits until every node is live.
    pub fn start(self) -> anyhow::Result<TestCluster> {
        let dir = tempfile::Builder::new()
            .prefix("mdcluster-cluster")
            .tempdir()
            .context("create cluster tempdir")?;
        let etcd = Etcd::start_with(true)?;
        let server = MdServer::start(&etcd.url(), self.server.clone())?;
        let replicas = (1..self.replicas)
            .map(|_| MdServer::start(&etcd.url(), self.server.clone()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let storage = match self.shared {
            Some((disks, bytes)) => {
                Some(SharedStorage::create(dir.path(), self.nodes, disks, bytes)?)
            }
            None => None,
        };
        let mut c = TestCluster {
            agents: Vec::new(),
            server,
            replicas,
            etcd,
            storage,
            dir,
            opts: self.clone(),
        };
        for i in 0..self.nodes {
            let mut args = self.agent_args.clone();
            if let Some(s) = &c.storage {
                args.push("--device-allow".into());
                args.push(format!("{}/*", s.view_dir(i + 1).display()));
            }
            let dir = c.dir.path().display().to_string();
            if let Some(pki) = &self.tls {
                args.extend(pki.nodes[i].args());
            }
            for (n, extra) in &self.node_args {
                if *n == i {
                    args.extend(extra.iter().map(|a| a.replace("{dir}", &dir)));
                }
            }
            let a = AgentProc::start(
                &c.urls(),
                &format!("node{}", i + 1),
                &format!("127.0.0.{}", i + 1),
                c.dir.path(),
                self.agent_ttl,
                &args,
            )?;
            c.agents.push(a);
        }
        c.wait_nodes(self.nodes, Duration::from_secs(20))?;
        Ok(c)
    }
}

/// A running cluster. Drop order: agents, mdserver replicas, etcd, loop devices,
/// tempdir.
pub struct TestCluster {
    /// The agents, node1 first.
    pub agents: Vec<AgentProc>,
    /// mdserver (the first replica).
    pub server: MdServer,
    /// The other replicas (empty unless [`ClusterBuilder::replicas`] asked for more).
    pub replicas: Vec<MdServer>,
    /// etcd.
    pub etcd: Etcd,
    /// Multi-view storage, if the cluster was built with it.
    pub storage: Option<SharedStorage>,
    /// Member files, run dirs and logs.
    pub dir: tempfile::TempDir,
    opts: ClusterBuilder,
}

impl TestCluster {
    /// mdserver's URL (MDCTL_SERVER).
    pub fn url(&self) -> String {
        self.server.url()
    }

    /// Every replica's URL, comma-separated, the first replica first (`--server` of the
    /// agents).
    pub fn urls(&self) -> String {
        std::iter::once(&self.server)
            .chain(&self.replicas)
            .map(MdServer::url)
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The working directory (member files go here).
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Member `k` as node `node` (1-based) sees it: its own view in multi-view mode
    /// (`<dir>/n<node>/m<k>`), else the member file `<dir>/m<k>` every node shares (made
    /// by the test, e.g. with `member_files(dir, "m", ..)`).
    pub fn member(&self, node: usize, k: usize) -> PathBuf {
        match &self.storage {
            Some(s) => s.view(node, k),
            None => self.dir.path().join(format!("m{k}")),
        }
    }

    /// Members `0..n` as node `node` sees them, as strings (for `mdctl` arguments).
    pub fn members_of(&self, node: usize, n: usize) -> Vec<String> {
        (0..n)
            .map(|k| self.member(node, k).display().to_string())
            .collect()
    }

    /// The bytes of member `k` as they are on the shared disk (the backing file in
    /// multi-view mode, read past every node's cache): what on-disk checks read.
    pub fn disk(&self, k: usize) -> PathBuf {
        match &self.storage {
            Some(s) => s.disk(k),
            None => self.dir.path().join(format!("m{k}")),
        }
    }

    /// Disks `0..n` (see [`TestCluster::disk`]).
    pub fn disks(&self, n: usize) -> Vec<PathBuf> {
        (0..n).map(|k| self.disk(k)).collect()
    }

    /// The cluster name mdserver uses (its etcd keys are under `/mdcluster/<name>/`).
    pub fn cluster_name(&self) -> &str {
        &self.opts.server.cluster_name
    }

    /// Runs `mdctl --server URL args...` (bounded); with TLS as the admin.
    pub fn mdctl(&self, args: &[&str]) -> Output {
        match &self.opts.tls {
            Some(pki) => self.mdctl_as(&pki.admin, args),
            None => run_timeout(
                Command::new(bin("mdctl"))
                    .arg("--server")
                    .arg(self.url())
                    .args(args),
                MDCTL_TIMEOUT,
            ),
        }
    }

    /// Runs `mdctl --server URL --tls-* (who) args...` (bounded).
    pub fn mdctl_as(&self, who: &crate::pki::Ident, args: &[&str]) -> Output {
        run_timeout(
            Command::new(bin("mdctl"))
                .env_remove("MDCTL_INSECURE")
                .arg("--server")
                .arg(self.url())
                .args(who.args())
                .args(args),
            MDCTL_TIMEOUT,
        )
    }

    /// Runs mdctl; panics with its output unless it succeeded; returns stdout.
    pub fn mdctl_ok(&self, args: &[&str]) -> String {
        let o = self.mdctl(args);
        assert!(
            o.status.success(),
            "mdctl {args:?} failed with {}:\nstdout: {}\nstderr: {}",
            o.status,
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    /// Runs mdctl; its exit code and stderr.
    pub fn code(&self, args: &[&str]) -> (i32, String) {
        let o = self.mdctl(args);
        (
            o.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    }

    /// `mdctl --node NODE mdstat`.
    pub fn mdstat(&self, node: &str) -> String {
        self.mdctl_ok(&["--node", node, "mdstat"])
    }

    /// Waits until `node`'s mdstat satisfies `pred`; panics with the last text after
    /// `timeout`.
    pub fn wait_mdstat(
        &self,
        timeout: Duration,
        node: &str,
        what: &str,
        pred: impl Fn(&str) -> bool,
    ) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let t = self.mdstat(node);
            if pred(&t) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not seen on {node} within {timeout:?}:\n{t}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The status of array `name` on `node`, from `mdctl --json detail` (null when
    /// absent there).
    pub fn node_status(&self, name: &str, node: &str) -> serde_json::Value {
        let d: serde_json::Value =
            serde_json::from_str(&self.mdctl_ok(&["--json", "detail", name])).expect("detail");
        d["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .find(|n| n["node"] == node)
            .unwrap_or_else(|| panic!("{node} missing from detail: {d}"))["status"]
            .clone()
    }

    /// Creates the clustered 2-disk mirror `name` on node1 over `a` and `b`
    /// ([`mirror_create_args`]), and assembles it on node2.
    pub fn mirror_on_two_nodes(&self, name: &str, a: &str, b: &str) {
        self.mdctl_ok(&mirror_create_args(name, a, b));
        self.mdctl_ok(&["--node", "node2", "assemble", name]);
    }

    /// `mdctl tune` with min = max = `kib` KiB/s.
    pub fn tune(&self, kib: u64) {
        let k = kib.to_string();
        self.mdctl_ok(&["tune", "--sync-speed-min", &k, "--sync-speed-max", &k]);
    }

    /// Waits until `n` nodes are live (`mdctl --json nodes`).
    pub fn wait_nodes(&self, n: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let o = self.mdctl(&["--json", "nodes"]);
            if o.status.success() {
                let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap_or_default();
                if v.as_array().is_some_and(|a| a.len() == n) {
                    return Ok(());
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "{n} nodes not live within {timeout:?}: {}",
                    String::from_utf8_lossy(&o.stdout)
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every etcd key under this cluster's root that starts with `sub` (e.g. "locks/").
    pub fn etcd_keys(&self, sub: &str) -> Vec<String> {
        let prefix = format!("/mdcluster/{}/{sub}", self.cluster_name());
        crate::etcd::range_blocking(&self.etcd.url(), &prefix)
            .into_iter()
            .map(|kv| kv.key)
            .collect()
    }

    /// The lock value blocks whose resource starts with `sub` (`values/<sub>...`):
    /// resource and raw value.
    pub fn lock_values(&self, sub: &str) -> Vec<(String, Vec<u8>)> {
        let base = format!("/mdcluster/{}/values/", self.cluster_name());
        crate::etcd::range_blocking(&self.etcd.url(), &format!("{base}{sub}"))
            .into_iter()
            .map(|kv| (kv.key.trim_start_matches(&base).to_owned(), kv.value))
            .collect()
    }
}

/// The mdctl arguments that create the clustered 2-disk mirror `name` on node1 over `a`
/// and `b`: `--assume-clean`, 2 node slots, 1 MiB bitmap chunks.
pub fn mirror_create_args<'a>(name: &'a str, a: &'a str, b: &'a str) -> [&'a str; 15] {
    [
        "--node",
        "node1",
        "create",
        name,
        "--raid-devices",
        "2",
        "--bitmap",
        "clustered",
        "--nodes",
        "2",
        "--bitmap-chunk",
        "1024",
        "--assume-clean",
        a,
        b,
    ]
}

/// One `mdagent --server` process.
pub struct AgentProc {
    child: Option<Child>,
    /// Node name.
    pub node: String,
    /// The agent service address.
    pub addr: String,
    /// Run dir (NBD sockets).
    pub run_dir: PathBuf,
    /// Log file (stderr).
    pub log: PathBuf,
    server: String,
    ttl: Duration,
    extra: Vec<String>,
    /// Network namespace the agent runs in (`ip netns exec`), if any.
    netns: Option<String>,
}

impl AgentProc {
    /// Starts the agent of `node` on `ip` (free port) and waits for its ready line.
    pub fn start(
        server: &str,
        node: &str,
        ip: &str,
        dir: &Path,
        ttl: Duration,
        extra: &[String],
    ) -> anyhow::Result<AgentProc> {
        let port = free_port()?;
        let mut a = AgentProc {
            child: None,
            node: node.into(),
            addr: format!("{ip}:{port}"),
            run_dir: dir.join(format!("run-{node}")),
            log: dir.join(format!("{node}.log")),
            server: server.into(),
            ttl,
            extra: with_default_allow(extra, dir),
            netns: None,
        };
        a.spawn()?;
        Ok(a)
    }

    /// Like [`AgentProc::start`], inside network namespace `netns` (`ip netns exec`).
    pub fn start_in_netns(
        server: &str,
        node: &str,
        ip: &str,
        dir: &Path,
        ttl: Duration,
        extra: &[String],
        netns: &str,
    ) -> anyhow::Result<AgentProc> {
        let port = free_port()?;
        let mut a = AgentProc {
            child: None,
            node: node.into(),
            addr: format!("{ip}:{port}"),
            run_dir: dir.join(format!("run-{node}")),
            log: dir.join(format!("{node}.log")),
            server: server.into(),
            ttl,
            extra: with_default_allow(extra, dir),
            netns: Some(netns.into()),
        };
        a.spawn()?;
        Ok(a)
    }

    /// Waits (bounded) for the process to end by itself; its exit code, or `None` when
    /// it was still running at the deadline (or not running at all).
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.child.as_mut()?;
            if let Ok(Some(st)) = c.try_wait() {
                self.child = None;
                return Some(st.code().unwrap_or(-1));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The NBD socket of array `name` on this node.
    pub fn sock(&self, name: &str) -> PathBuf {
        self.run_dir.join(format!("{name}.nbd"))
    }

    /// The process id (for `ip netns`/signals), if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .context("agent log")?;
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("mdagent"));
                c
            }
            None => Command::new(bin("mdagent")),
        };
        if self.extra.iter().any(|a| a == "--tls-cert") {
            cmd.env_remove("MDAGENT_INSECURE");
        }
        let mut child = cmd
            .arg("--node")
            .arg(&self.node)
            .arg("--server")
            .arg(&self.server)
            .arg("--listen")
            .arg(&self.addr)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .arg("--session-ttl")
            .arg(humantime::format_duration(self.ttl).to_string())
            .arg("--fence-margin")
            .arg(humantime::format_duration(self.ttl / 4).to_string())
            .args(&self.extra)
            .env(
                "RUST_LOG",
                std::env::var("MDAGENT_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(logf)
            .spawn()
            .context("start mdagent")?;
        let stdout = child.stdout.take().context("mdagent stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        self.child = Some(child);
        match rx.recv_timeout(AGENT_START_TIMEOUT) {
            Ok(l) if l.starts_with("mdagent ready") => Ok(()),
            Ok(l) => {
                self.kill9();
                bail!(
                    "unexpected first line from mdagent {}: {l:?}; log:\n{}",
                    self.node,
                    self.log_text()
                )
            }
            Err(_) => {
                self.kill9();
                bail!(
                    "mdagent {} did not get ready within {AGENT_START_TIMEOUT:?}; log:\n{}",
                    self.node,
                    self.log_text()
                )
            }
        }
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (≤ 60 s, then -9); true if it exited 0.
    pub fn term(&mut self) -> bool {
        let Some(mut c) = self.child.take() else {
            return false;
        };
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(s)) = c.try_wait() {
                return s.success();
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the agent again (same node, address and run dir).
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill9();
        self.spawn()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// `extra`, plus `--device-allow <dir>/*` when it has no `--device-allow` of its own:
/// in cluster mode an empty allow-list allows nothing, and the tests' member files live
/// in the test's directory.
fn with_default_allow(extra: &[String], dir: &Path) -> Vec<String> {
    let mut args = extra.to_vec();
    if !args.iter().any(|a| a == "--device-allow") {
        args.push("--device-allow".into());
        args.push(format!("{}/*", dir.display()));
    }
    args
}

/// A network namespace with a veth pair to the host (`/30`: host `.1`, namespace
/// `.2`), for cutting one node off. Deleted (with its link) on drop.
pub struct NetNs {
    /// The namespace name.
    pub name: String,
    /// The host end of the veth pair.
    pub host_if: String,
    /// The namespace end.
    pub ns_if: String,
    /// The host's address on the link.
    pub host_ip: String,
    /// The namespace's address on the link.
    pub ns_ip: String,
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    let o = run_timeout(Command::new("ip").args(args), Duration::from_secs(20));
    if !o.status.success() {
        bail!("ip {args:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

impl NetNs {
    /// Creates namespace `mdt-<tag>-<pid>` linked to the host by a veth pair.
    pub fn create(tag: &str) -> anyhow::Result<NetNs> {
        let pid = std::process::id();
        let n = pid % 16000;
        let ns = NetNs {
            name: format!("mdt-{tag}-{pid}"),
            host_if: format!("mdh{n}"),
            ns_if: format!("mdn{n}"),
            host_ip: format!("10.{}.{}.1", 200 + (n / 4096) % 50, (n / 16) % 256),
            ns_ip: format!("10.{}.{}.2", 200 + (n / 4096) % 50, (n / 16) % 256),
        };
        let _ = ip(&["netns", "del", &ns.name]);
        let _ = ip(&["link", "del", &ns.host_if]);
        ip(&["netns", "add", &ns.name])?;
        ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_if,
        ])?;
        ip(&["link", "set", &ns.ns_if, "netns", &ns.name])?;
        ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ])?;
        ip(&["link", "set", &ns.host_if, "up"])?;
        ip(&[
            "netns",
            "exec",
            &ns.name,
            "ip",
            "addr",
            "add",
            &format!("{}/30", ns.ns_ip),
            "dev",
            &ns.ns_if,
        ])?;
        ip(&[
            "netns", "exec", &ns.name, "ip", "link", "set", &ns.ns_if, "up",
        ])?;
        ip(&["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Sets the namespace's end of the link up or down (down: the node is cut off).
    pub fn link(&self, up: bool) -> anyhow::Result<()> {
        ip(&[
            "netns",
            "exec",
            &self.name,
            "ip",
            "link",
            "set",
            &self.ns_if,
            if up { "up" } else { "down" },
        ])
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.host_if]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// An `mdserver` listening on `0.0.0.0` (reachable from a network namespace through
/// its veth link), for the partition test. Killed on drop.
pub struct AnyAddrServer {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
}

impl AnyAddrServer {
    /// Starts mdserver against `etcd_url` on `0.0.0.0:<free port>`.
    pub fn start(etcd_url: &str, cluster_name: &str) -> anyhow::Result<AnyAddrServer> {
        let port = free_port()?;
        let mut child = Command::new(bin("mdserver"))
            .arg("--listen")
            .arg(format!("0.0.0.0:{port}"))
            .args([
                "--etcd",
                etcd_url,
                "--cluster-name",
                cluster_name,
                "--session-ttl",
                "2s",
                "--etcd-timeout",
                "1s",
            ])
            .env(
                "RUST_LOG",
                std::env::var("MDSERVER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("start mdserver")?;
        let stdout = child.stdout.take().context("mdserver stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        let s = AnyAddrServer {
            child: Some(child),
            port,
        };
        match rx.recv_timeout(AGENT_START_TIMEOUT) {
            Ok(l) if l.contains("listening") => Ok(s),
            other => bail!("mdserver did not start: {other:?}"),
        }
    }

    /// The URL on `host` (an address of this machine).
    pub fn url(&self, host: &str) -> String {
        format!("http://{host}:{}", self.port)
    }
}

impl Drop for AnyAddrServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Loop devices (`losetup --direct-io=on`) over shared backing files, one per node and
/// member: node `n` reaches member `k` as `<dir>/n<n>/m<k>` → `/dev/loopX`, its own
/// device with its own page cache; the backing file `<dir>/disk<k>` is written directly.
/// Each device is held open by this guard and set to autoclear at once (`losetup -d`
/// on a device in use marks it so), so nothing is left attached once every opener is
/// gone, even when the test process is killed; [`Drop`] closes them and detaches what
/// is still attached to the backing files.
pub struct SharedStorage {
    dir: PathBuf,
    disks: Vec<PathBuf>,
    /// (node 1-based, member, device, the open descriptor that keeps it configured).
    views: Vec<(usize, usize, PathBuf, Option<std::fs::File>)>,
}

impl SharedStorage {
    /// `disks` backing files of `bytes` each in `dir`, and a loop device per node
    /// (`nodes`) and disk.
    pub fn create(
        dir: &Path,
        nodes: usize,
        disks: usize,
        bytes: u64,
    ) -> anyhow::Result<SharedStorage> {
        let mut s = SharedStorage {
            dir: dir.to_owned(),
            disks: Vec::new(),
            views: Vec::new(),
        };
        for k in 0..disks {
            let p = dir.join(format!("disk{k}"));
            std::fs::File::create(&p)
                .and_then(|f| f.set_len(bytes))
                .with_context(|| format!("create {}", p.display()))?;
            s.disks.push(p);
        }
        for n in 1..=nodes {
            let vd = s.view_dir(n);
            std::fs::create_dir_all(&vd).with_context(|| format!("mkdir {}", vd.display()))?;
            for k in 0..disks {
                let dev = attach_dio(&s.disks[k])?;
                // Held open, then marked autoclear: it lives exactly as long as its
                // openers (this guard, the agents).
                let held = std::fs::OpenOptions::new()
                    .read(true)
                    .open(&dev)
                    .with_context(|| format!("open {}", dev.display()));
                let held = match held {
                    Ok(f) => f,
                    Err(e) => {
                        let _ = losetup(&["-d", &dev.display().to_string()]);
                        return Err(e);
                    }
                };
                s.views.push((n, k, dev.clone(), Some(held)));
                losetup(&["-d", &dev.display().to_string()])?;
                let link = vd.join(format!("m{k}"));
                std::os::unix::fs::symlink(&dev, &link)
                    .with_context(|| format!("symlink {} -> {}", link.display(), dev.display()))?;
            }
        }
        Ok(s)
    }

    /// The directory of node `node`'s views (`<dir>/n<node>`).
    pub fn view_dir(&self, node: usize) -> PathBuf {
        self.dir.join(format!("n{node}"))
    }

    /// Member `k` as node `node` (1-based) sees it: `<dir>/n<node>/m<k>`.
    pub fn view(&self, node: usize, k: usize) -> PathBuf {
        self.view_dir(node).join(format!("m{k}"))
    }

    /// The loop device behind node `node`'s view of member `k`.
    pub fn device(&self, node: usize, k: usize) -> PathBuf {
        self.views
            .iter()
            .find(|v| v.0 == node && v.1 == k)
            .map(|v| v.2.clone())
            .unwrap_or_else(|| panic!("no view of member {k} for node{node}"))
    }

    /// The backing file of member `k` (the shared disk itself).
    pub fn disk(&self, k: usize) -> PathBuf {
        self.disks[k].clone()
    }

    /// Every loop device still attached to one of the backing files (`losetup -j`).
    pub fn attached(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for d in &self.disks {
            let o = run_timeout(
                Command::new("losetup")
                    .args(["-n", "-O", "NAME", "-j"])
                    .arg(d),
                Duration::from_secs(20),
            );
            out.extend(
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty())
                    .map(PathBuf::from),
            );
        }
        out
    }
}

fn losetup(args: &[&str]) -> anyhow::Result<String> {
    let o = run_timeout(Command::new("losetup").args(args), Duration::from_secs(20));
    if !o.status.success() {
        bail!(
            "losetup {args:?}: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_owned())
}

/// `losetup --direct-io=on -f --show FILE`, retried (bounded) when another test took the
/// free device between the lookup and the attach.
fn attach_dio(file: &Path) -> anyhow::Result<PathBuf> {
    let f = file.display().to_string();
    let mut last = None;
    for _ in 0..10 {
        match losetup(&["--direct-io=on", "-f", "--show", &f]) {
            Ok(dev) if dev.starts_with("/dev/loop") => {
                let dio = losetup(&["-n", "-O", "DIO", "-l", &dev])?;
                if dio.trim() != "1" {
                    let _ = losetup(&["-d", &dev]);
                    bail!("{dev} over {f}: direct I/O not enabled (DIO={dio}); the backing file's filesystem must support O_DIRECT");
                }
                return Ok(PathBuf::from(dev));
            }
            Ok(other) => bail!("losetup -f --show {f}: unexpected output {other:?}"),
            Err(e) => last = Some(e),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("losetup {f}: no attempt made")))
}

impl Drop for SharedStorage {
    fn drop(&mut self) {
        // Last opener gone: autoclear detaches each device.
        for v in &mut self.views {
            v.3 = None;
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = self.attached();
            if left.is_empty() {
                return;
            }
            if Instant::now() >= deadline {
                // Still open somewhere (an agent that outlived its guard): detach
                // explicitly; every device listed is attached to our own backing files.
                for d in left {
                    let _ = losetup(&["-d", &d.display().to_string()]);
                }
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
