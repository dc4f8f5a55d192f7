//! `mdagent`: the per-node agent of mdcluster. It owns the arrays assembled on its node.
//!
//! With `--server URL[,URL]` (cluster mode) it opens this node's lock-service session,
//! registers its `--listen` address there and serves the gRPC agent service that
//! mdserver routes per-node operations to.
//!
//! Without `--server` it runs standalone: arrays are assembled from `--assemble` flags
//! and through the local control socket, each served on `<run-dir>/<name>.nbd`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use mdcluster_agent::allow::{DeviceAllow, EmptyList};
use mdcluster_agent::array::service::Service;
use mdcluster_agent::array::{AssembleOptions, Registry, RegistryConfig};
use mdcluster_agent::nbd::{NbdTls, PayloadBudget, ServerConfig};
use mdcluster_agent::raid::{SpeedLimits, SB_CHANGE_WAIT};
use tokio_util::sync::CancellationToken;

const LONG_ABOUT: &str = "\
The per-node mdcluster agent: owns this node's arrays and their NBD exports.

Cluster mode (--server URL[,URL] --node NAME --listen ADDR): opens this node's session
with mdserver's lock service, registers ADDR there, and serves the gRPC agent service
that mdserver routes mdctl's per-node operations to (create, assemble, stop, detail,
mdstat, monitor, tune). A clustered array holds its bitmap slot lock while assembled; a
node that dies is taken over by a survivor, which resyncs exactly its dirty chunks. If
the session cannot be renewed before its fence deadline, member I/O of clustered arrays
is suspended (requests wait up to --suspend-io-timeout) while the session keeps trying
to resume (--suspend-max past the lease deadline); once the session turns out lost, its
arrays are stopped without writing metadata and the arrays in <run-dir>/arrays.json are
assembled again on a new session, in this process. Status 75 is the last resort when
such an array cannot be stopped: restart the agent. The control socket is not served.
The standard gRPC health service (grpc.health.v1.Health, for Kubernetes probes) is served
on --listen beside the agent service: the overall status (service \"\") is SERVING while
the agent serves; service mdcluster.v1.AgentService is SERVING while the node holds its
session, NOT_SERVING while it is suspended, while a lost one is replaced and its arrays
assembled again, and once shutdown has begun.
Every gRPC hop runs mutual TLS (--tls-ca, --tls-cert with this node's certificate:
O=mdcluster:nodes, CN and a SAN DNS name = --node; --tls-key); only mdserver's
certificate may call the agent service. --insecure runs plain text instead.

Standalone mode (no --server): arrays given with --assemble NAME=DEV,DEV are assembled
at start; more are created, assembled, stopped and inspected through the control socket
<run-dir>/mdagent.ctl (unix stream, one JSON request per line, one JSON answer per line):

  {\"op\":\"create\",\"name\":\"md0\",\"members\":[\"/a\",\"/b\"],\"raid_devices\":2,
   \"spare_devices\":0,\"bitmap\":\"internal\",\"chunk_kib\":64,\"assume_clean\":true}
  {\"op\":\"assemble\",\"name\":\"md0\",\"members\":[\"/a\",\"/b\"]}
  {\"op\":\"stop\",\"name\":\"md0\",\"force\":false}
  {\"op\":\"status\",\"name\":\"md0\"}   {\"op\":\"list\"}   {\"op\":\"mdstat\"}
  {\"op\":\"speed\",\"name\":\"md0\",\"min_kib_s\":1000,\"max_kib_s\":200000}
  {\"op\":\"fail\",\"name\":\"md0\",\"member\":\"/a\"}   {\"op\":\"remove\",\"name\":\"md0\",\"member\":\"/a\"}
  {\"op\":\"add\",\"name\":\"md0\",\"member\":\"/c\"}
    (add: a former member, once removed, is re-added and recovers only the chunks
    dirtied since it left; a blank device becomes a spare and recovers fully; a device
    still in the array, faulty too, is refused with EBUSY)
  answers: {\"ok\":true,\"result\":...} or {\"ok\":false,\"errno\":\"EBUSY\",\"error\":\"...\"}

Every active array is served over NBD on <run-dir>/<name>.nbd (export name \"\" or the
array name), and on --nbd-tcp if given (export = array name). An open of an assembling or
stopping array is refused at once (EBUSY), of an absent one with ENOENT.

SIGTERM/SIGINT stop every array cleanly (clients disconnected, I/O drained, bitmap
flushed, superblocks marked clean) and exit 0. After kill -9, the next assemble resyncs
exactly the chunks the write-intent bitmap marks dirty.";

/// The per-node mdcluster agent: owns this node's arrays and their NBD exports.
#[derive(Debug, Parser)]
#[command(name = "mdagent", version, about, long_about = LONG_ABOUT)]
struct Args {
    /// This node's name, unique in the cluster.
    #[arg(long, env = "MDAGENT_NODE")]
    node: Option<String>,
    /// URL of an mdserver (e.g. https://127.0.0.1:7480; http:// with --insecure), or
    /// several replicas comma-separated. Without it the agent runs
    /// standalone.
    #[arg(long, env = "MDAGENT_SERVER")]
    server: Option<String>,
    /// Address the agent service listens on.
    #[arg(long, env = "MDAGENT_LISTEN", default_value = "127.0.0.1:7481")]
    listen: String,
    /// Directory for the per-array NBD sockets and runtime state.
    #[arg(long, env = "MDAGENT_RUN_DIR", default_value = "/run/mdcluster")]
    run_dir: PathBuf,
    /// Glob of member paths the agent may open; repeat for several. Nothing else is opened.
    /// `*` and `?` match within one path component; a path is resolved (symlinks, `..`)
    /// before it is matched, and a symlink a pattern names (udev's
    /// /dev/disk/by-id/...) is followed. Empty: standalone opens any path, cluster
    /// mode opens nothing. In cluster mode also where this node looks for members by
    /// UUID when another node's paths do not fit here (assemble from the cluster's
    /// record, NEWDISK).
    #[arg(
        long = "device-allow",
        env = "MDAGENT_DEVICE_ALLOW",
        value_delimiter = ','
    )]
    device_allow: Vec<String>,
    /// Assemble an array at start: NAME=DEV,DEV,... (repeatable).
    #[arg(long = "assemble", value_name = "NAME=DEV,DEV")]
    assemble: Vec<String>,
    /// Also serve every array over NBD on this TCP address (export name = array name).
    /// Needs --nbd-tls-ca/--nbd-tls-cert/--nbd-tls-key (clients negotiate
    /// NBD_OPT_STARTTLS with a certificate signed by that CA), or --nbd-insecure.
    #[arg(long, env = "MDAGENT_NBD_TCP")]
    nbd_tcp: Option<String>,
    /// PEM file of the CA that NBD TCP clients' certificates must be signed by.
    #[arg(long, env = "MDAGENT_NBD_TLS_CA", requires_all = ["nbd_tls_cert", "nbd_tls_key"])]
    nbd_tls_ca: Option<PathBuf>,
    /// PEM file of this agent's NBD TLS certificate (chain).
    #[arg(long, env = "MDAGENT_NBD_TLS_CERT", requires_all = ["nbd_tls_ca", "nbd_tls_key"])]
    nbd_tls_cert: Option<PathBuf>,
    /// PEM file of the private key of --nbd-tls-cert.
    #[arg(long, env = "MDAGENT_NBD_TLS_KEY", requires_all = ["nbd_tls_ca", "nbd_tls_cert"])]
    nbd_tls_key: Option<PathBuf>,
    /// Payload bytes (read and write data) in flight across every NBD connection of this
    /// agent, in MiB; a request beyond it waits (at most 30 s, then its connection is
    /// closed).
    #[arg(long, env = "MDAGENT_NBD_PAYLOAD_BUDGET_MIB", default_value_t = 1024)]
    nbd_payload_budget_mib: usize,
    /// Serve --nbd-tcp without TLS: anyone who reaches the address reads and writes
    /// every array. Only for a network nothing else can reach.
    #[arg(long, env = "MDAGENT_NBD_INSECURE")]
    nbd_insecure: bool,
    /// How long a stop waits for connected NBD clients to leave before answering EBUSY.
    #[arg(long, env = "MDAGENT_STOP_GRACE", default_value = "3s")]
    stop_grace: humantime::Duration,
    /// Bound of draining in-flight I/O at stop; raised to at least the longest wait of
    /// a write for a superblock update (45 s). A stop whose drain gives up answers
    /// EBUSY and leaves the array stopping, its members held.
    #[arg(long, env = "MDAGENT_DRAIN_TIMEOUT", default_value = "50s")]
    drain_timeout: humantime::Duration,
    /// Resync/recovery minimum speed, KiB/s (md's speed_limit_min).
    #[arg(long, env = "MDAGENT_SPEED_MIN", default_value_t = 1000)]
    speed_min: u64,
    /// Resync/recovery maximum speed, KiB/s (md's speed_limit_max).
    #[arg(long, env = "MDAGENT_SPEED_MAX", default_value_t = 200_000)]
    speed_max: u64,
    /// Override the bitmap's daemon_sleep (how long a chunk stays idle before its bit is
    /// cleared), e.g. 500ms.
    #[arg(long, env = "MDAGENT_DAEMON_SLEEP")]
    daemon_sleep: Option<humantime::Duration>,
    /// md's safe_mode_delay: an array's superblocks are marked clean again once no
    /// write has been in flight for this long, so a crash while idle needs no resync
    /// (0 = only at stop).
    #[arg(long, env = "MDAGENT_SAFE_MODE_DELAY", default_value = "1s")]
    safe_mode_delay: humantime::Duration,
    /// This node's bitmap slot (0 for internal bitmaps). Standalone mode only: in cluster
    /// mode a clustered array's slot comes from its slot lock.
    #[arg(long, env = "MDAGENT_BITMAP_SLOT", default_value_t = 0)]
    bitmap_slot: u32,
    /// Cluster mode: the address registered for mdserver to call (default: the bound
    /// --listen address).
    #[arg(long, env = "MDAGENT_ADVERTISE")]
    advertise: Option<String>,
    /// Cluster mode: lease TTL of this node's lock-service session.
    #[arg(long, env = "MDAGENT_SESSION_TTL", default_value = "10s")]
    session_ttl: humantime::Duration,
    /// Cluster mode: self-fencing margin before the session's lease deadline.
    #[arg(long, env = "MDAGENT_FENCE_MARGIN", default_value = "1s")]
    fence_margin: humantime::Duration,
    /// Cluster mode: how long past its lease deadline a session that no mdserver replica
    /// could renew (and none said is gone: etcd or every replica unreachable) stays
    /// suspended, member I/O held, before it counts as lost (its arrays are then
    /// stopped and assembled again on a new session).
    #[arg(long, env = "MDAGENT_SUSPEND_MAX", default_value = "5m")]
    suspend_max: humantime::Duration,
    /// Cluster mode: how long a request of a clustered array waits while the node is
    /// fenced (its session not renewed before the fence deadline) before it fails with
    /// EIO; it goes on at once when the session is renewed.
    #[arg(long, env = "MDAGENT_SUSPEND_IO_TIMEOUT", default_value = "30s")]
    suspend_io_timeout: humantime::Duration,
    /// Cluster mode: how long to keep trying to open the session at start (covers a
    /// previous session of this node that has to expire first).
    #[arg(long, env = "MDAGENT_CONNECT_TIMEOUT", default_value = "60s")]
    connect_timeout: humantime::Duration,
    /// Cluster mode: PEM file of the cluster CA (mutual TLS on the agent service and the
    /// session to mdserver; only mdserver's certificate may call the agent service).
    #[arg(long, env = "MDAGENT_TLS_CA", value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// Cluster mode: PEM file of this node's certificate (O=mdcluster:nodes, CN and a SAN
    /// DNS name = --node). Reloaded when the file changes or on SIGHUP.
    #[arg(long, env = "MDAGENT_TLS_CERT", value_name = "FILE", requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// Cluster mode: PEM file of the private key of --tls-cert.
    #[arg(long, env = "MDAGENT_TLS_KEY", value_name = "FILE", requires_all = ["tls_ca", "tls_cert"])]
    tls_key: Option<PathBuf>,
    /// Cluster mode: gRPC in plain text without authentication (tests, trusted networks
    /// only; a warning is logged). Without it the --tls-* files are required.
    #[arg(long, env = "MDAGENT_INSECURE", conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    insecure: bool,
    /// Cluster mode: also serve the gRPC health service alone, in plain text, on this
    /// address: for probes that cannot present a certificate (the kubelet's grpc probes).
    #[arg(long, env = "MDAGENT_HEALTH_LISTEN", value_name = "ADDR")]
    health_listen: Option<String>,
    /// Serve Prometheus metrics on http://ADDR/metrics (plain HTTP: metrics carry no
    /// secrets). Off when not given.
    #[arg(long, env = "MDAGENT_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<String>,
}

fn parse_assemble(s: &str) -> anyhow::Result<(String, Vec<PathBuf>)> {
    let (name, devs) = s
        .split_once('=')
        .with_context(|| format!("--assemble {s:?}: expected NAME=DEV,DEV"))?;
    let devs: Vec<PathBuf> = devs
        .split(',')
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .collect();
    anyhow::ensure!(!devs.is_empty(), "--assemble {s:?}: no devices");
    Ok((name.to_owned(), devs))
}

/// `--drain-timeout`, at least [`SB_CHANGE_WAIT`]: a drain must not give up on a write
/// still waiting for its superblock update.
fn drain_timeout(args: &Args) -> Duration {
    let asked: Duration = args.drain_timeout.into();
    if asked < SB_CHANGE_WAIT {
        tracing::warn!(
            "--drain-timeout {asked:?} is shorter than a write's wait for a superblock update; using {SB_CHANGE_WAIT:?}"
        );
    }
    asked.max(SB_CHANGE_WAIT)
}

async fn run(args: Args) -> anyhow::Result<()> {
    if let Some(server) = args.server.clone() {
        return run_cluster(args, server).await;
    }
    std::fs::create_dir_all(&args.run_dir)
        .with_context(|| format!("create run dir {}", args.run_dir.display()))?;
    let registry = Registry::new(RegistryConfig {
        stop_grace: args.stop_grace.into(),
        drain_timeout: drain_timeout(&args),
        slot: args.bitmap_slot,
        assemble: AssembleOptions {
            daemon_sleep: args.daemon_sleep.map(Into::into),
            safe_mode: Some(args.safe_mode_delay.into()),
            speed: SpeedLimits {
                min_kib_s: args.speed_min,
                max_kib_s: args.speed_max,
            },
            sync_gate: false,
            // Standalone arrays are never fenced.
            fence: None,
        },
        device_allow: DeviceAllow::new(args.device_allow.clone(), EmptyList::AllowsAny)?,
        claims: Default::default(),
    });
    // One NBD configuration (one payload budget) for the unix sockets and TCP.
    let nbd = nbd_config(&args)?;
    let service = Service::new(registry.clone(), &args.run_dir, nbd.clone());
    let shutdown = CancellationToken::new();
    let control_path = args.run_dir.join("mdagent.ctl");
    let control = {
        let service = service.clone();
        let shutdown = shutdown.clone();
        let path = control_path.clone();
        tokio::spawn(async move { service.serve_control(&path, shutdown).await })
    };
    // <run-dir>/proc/mdstat for node_exporter, as cluster-mode agents keep it.
    let mdstat_file = {
        let service = service.clone();
        mdcluster_agent::service::mdstat_file::spawn_with(
            mdcluster_agent::service::mdstat_file::path(&args.run_dir),
            move || service.mdstat(),
            shutdown.clone(),
        )
    };
    let tcp = match &args.nbd_tcp {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind NBD TCP listener {addr}"))?;
            let exports: Arc<dyn mdcluster_agent::nbd::Exports> = registry.clone();
            Some(tokio::spawn(mdcluster_agent::nbd::serve_tcp(
                listener,
                exports,
                nbd,
                shutdown.clone(),
            )))
        }
        None => None,
    };
    let metrics = match &args.metrics_listen {
        Some(addr) => {
            let l = mdcluster_proto::metrics_http::bind(addr).await?;
            let arrays = Arc::new(mdcluster_agent::metrics::RegistryArrays {
                registry: registry.clone(),
            });
            let registry = mdcluster_agent::metrics::registry(arrays, None);
            let stop = shutdown.clone();
            Some(tokio::spawn(mdcluster_agent::metrics::serve(
                l,
                registry,
                async move { stop.cancelled().await },
            )))
        }
        None => None,
    };
    for spec in &args.assemble {
        let (name, devs) = parse_assemble(spec)?;
        service
            .assemble(&name, &devs)
            .await
            .with_context(|| format!("assemble {name}"))?;
        tracing::info!(array = %name, socket = %service.socket_path(&name).display(), "serving");
    }
    println!("mdagent ready: control socket {}", control_path.display());
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("install SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping every array"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping every array"),
    }
    service.shutdown().await;
    shutdown.cancel();
    let _ = control.await;
    if let Some(t) = tcp {
        let _ = t.await;
    }
    if let Some(m) = metrics {
        let _ = m.await;
    }
    let _ = mdstat_file.await;
    Ok(())
}

/// Cluster mode (`--server`): the agent service, registered in this node's
/// lock-service session (see `mdcluster_agent::service::runtime`).
async fn run_cluster(args: Args, server: String) -> anyhow::Result<()> {
    use mdcluster_agent::service::runtime::{run, RuntimeConfig};
    use mdcluster_agent::service::NodeConfig;
    let node = args
        .node
        .clone()
        .context("cluster mode needs --node NAME (unique in the cluster)")?;
    anyhow::ensure!(
        args.assemble.is_empty(),
        "--assemble is for standalone mode; in cluster mode use mdctl assemble"
    );
    let allow = DeviceAllow::new(args.device_allow.clone(), EmptyList::AllowsNothing)?;
    if allow.allows_nothing() {
        tracing::warn!(
            node = %node,
            "no --device-allow pattern: in cluster mode this agent opens no device at all; give the patterns of this node's shared disks (e.g. --device-allow '/dev/disk/by-id/wwn-*')"
        );
    } else {
        tracing::info!(node = %node, patterns = ?allow.patterns(), "device allow-list");
    }
    let transport = mdcluster_proto::tls::Transport::from_flags(
        &format!("mdagent node {node}"),
        args.tls_ca.clone(),
        args.tls_cert.clone(),
        args.tls_key.clone(),
        args.insecure,
    )
    .map_err(anyhow::Error::msg)?;
    let cfg = RuntimeConfig {
        transport,
        health_listen: args.health_listen.clone(),
        metrics_listen: args.metrics_listen.clone(),
        node: NodeConfig {
            node: node.clone(),
            run_dir: args.run_dir.clone(),
            registry: RegistryConfig {
                stop_grace: args.stop_grace.into(),
                drain_timeout: drain_timeout(&args),
                // Internal bitmaps use slot 0; a clustered array assembles in the
                // slot of its slot lock.
                slot: 0,
                assemble: AssembleOptions {
                    daemon_sleep: args.daemon_sleep.map(Into::into),
                    safe_mode: Some(args.safe_mode_delay.into()),
                    speed: SpeedLimits {
                        min_kib_s: args.speed_min,
                        max_kib_s: args.speed_max,
                    },
                    // Cluster mode: clustered arrays sync one node at a time.
                    sync_gate: true,
                    // Set per node (its fence gate) by the agent service.
                    fence: None,
                },
                device_allow: allow,
                // One for the node: held before a clustered array's join, kept by
                // its registry entry.
                claims: Default::default(),
            },
            nbd: nbd_config(&args)?,
            nbd_tcp: args.nbd_tcp.clone(),
            suspend_io_timeout: args.suspend_io_timeout.into(),
            timings: mdcluster_agent::cluster::Timings::default(),
        },
        servers: server.split(',').map(str::to_owned).collect(),
        listen: args.listen.clone(),
        advertise: args.advertise.clone(),
        session_ttl: args.session_ttl.into(),
        fence_margin: args.fence_margin.into(),
        suspend_max: args.suspend_max.into(),
        connect_timeout: args.connect_timeout.into(),
    };
    let shutdown = async {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(t) => t,
                Err(_) => return std::future::pending::<()>().await,
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: stopping every array"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping every array"),
        }
    };
    run(cfg, shutdown)
        .await
        .with_context(|| format!("mdagent node {node}"))
}

/// The NBD server configuration: TLS for the TCP listener from the --nbd-tls-* files;
/// --nbd-tcp without them needs --nbd-insecure.
fn nbd_config(args: &Args) -> anyhow::Result<ServerConfig> {
    anyhow::ensure!(
        (32..=1 << 20).contains(&args.nbd_payload_budget_mib),
        "--nbd-payload-budget-mib {}: give 32 (the largest request) to 1048576",
        args.nbd_payload_budget_mib
    );
    let mut cfg = ServerConfig {
        payload_budget: PayloadBudget::new(args.nbd_payload_budget_mib << 20),
        ..ServerConfig::default()
    };
    if let (Some(ca), Some(cert), Some(key)) =
        (&args.nbd_tls_ca, &args.nbd_tls_cert, &args.nbd_tls_key)
    {
        cfg.tls = Some(NbdTls::from_files(ca, cert, key)?);
    } else if args.nbd_tcp.is_some() && !args.nbd_insecure {
        anyhow::bail!(
            "--nbd-tcp serves every array over the network: give --nbd-tls-ca, --nbd-tls-cert and --nbd-tls-key (clients then need a certificate signed by that CA), or --nbd-insecure on a network nothing else reaches"
        );
    }
    if args.nbd_tcp.is_some() && cfg.tls.is_none() {
        tracing::warn!("NBD over TCP without TLS (--nbd-insecure): anyone who reaches {:?} reads and writes every array", args.nbd_tcp);
    }
    Ok(cfg)
}

/// The most open files the agent asks for.
const OPEN_FILES_WANTED: u64 = 1 << 20;

/// Raises the soft limit of open files up to the hard one (at most
/// [`OPEN_FILES_WANTED`]): every array keeps a file per member and a listening socket,
/// and every NBD client a connection, so a few hundred arrays pass the soft limit of
/// 1024 a shell or a container often gives (the systemd unit sets 65536 itself).
fn raise_open_files_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the rlimit we own.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!("reading the limit of open files failed: {e}");
        return;
    }
    let want = lim.rlim_max.min(OPEN_FILES_WANTED);
    if lim.rlim_cur >= want {
        return;
    }
    let before = lim.rlim_cur;
    lim.rlim_cur = want;
    // SAFETY: setrlimit only reads the rlimit we own.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        let e = std::io::Error::last_os_error();
        tracing::warn!(
            "raising the soft limit of open files from {before} to {want} failed: {e}; \
             the agent may run out of file descriptors with many arrays (raise it with \
             ulimit -n or LimitNOFILE=)"
        );
    } else {
        tracing::info!(before, after = want, "raised the soft limit of open files");
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    tracing::info!(?args, "mdagent starting");
    raise_open_files_limit();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("start the tokio runtime")?
        .block_on(run(args))
}
