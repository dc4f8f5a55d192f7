//! The cluster commands: each is one or a few calls to mdserver's `ClusterService`.
//! Errors come back with their errno ([`mdcluster_proto::status`]); the command prints
//! the sentence and exits with the errno's code ([`crate::exit`]).

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use mdcluster_proto::status::WireError;
use mdcluster_proto::tls::Transport;
use mdcluster_proto::v1 as pb;
use mdcluster_proto::v1::cluster_service_client::ClusterServiceClient;
use tonic::transport::Channel;
use tonic::Status;

use crate::exit::Exit;
use crate::render;

/// Bound of connecting to mdserver.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Bound of a read-only call.
const READ_TIMEOUT: Duration = Duration::from_secs(15);
/// Bound of a create, assemble or stop (the server bounds its own hop below this).
const OP_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one `--program` run may take.
const PROGRAM_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound of the question that checks a replica answers before a call is sent to it
/// (only with more than one replica).
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// HTTP/2 keep-alive period and timeout towards mdserver.
const KEEPALIVE: Duration = Duration::from_secs(2);
/// Default mdserver when neither --server nor MDCTL_SERVER is given.
/// (scheme-less: https with the TLS flags, http with --insecure).
pub const DEFAULT_SERVER: &str = "127.0.0.1:7480";

/// A failed command: exit code and sentence.
#[derive(Debug)]
pub struct Failure {
    /// The exit code.
    pub exit: Exit,
    /// What to print.
    pub message: String,
}

impl Failure {
    fn new(exit: Exit, message: impl Into<String>) -> Self {
        Failure {
            exit,
            message: message.into(),
        }
    }
}

/// What `mdctl create` asks for.
#[derive(Debug, Clone)]
pub struct CreateArgs {
    /// Array name.
    pub array: String,
    /// `--level`.
    pub level: i32,
    /// `--raid-devices`.
    pub raid_devices: u32,
    /// `--spare-devices`.
    pub spare_devices: u32,
    /// `--bitmap`.
    pub bitmap: String,
    /// `--nodes`.
    pub nodes: Option<u32>,
    /// `--cluster-name`.
    pub cluster_name: Option<String>,
    /// `--name`.
    pub name: Option<String>,
    /// `--size` in KiB (`None`: max).
    pub size_kib: Option<u64>,
    /// `--assume-clean`.
    pub assume_clean: bool,
    /// `--force`.
    pub force: bool,
    /// `--bitmap-chunk` in KiB.
    pub bitmap_chunk_kib: Option<u32>,
    /// Members.
    pub devices: Vec<PathBuf>,
}

/// One mdserver replica as the client sees it.
struct Server {
    url: String,
    client: ClusterServiceClient<Channel>,
    /// It answered a probe (or a call) and has not failed since.
    verified: AtomicBool,
}

/// A connection to mdserver: one or more replicas (`--server A,B`). Calls go to the
/// replica in use; one that does not answer (refused, unreachable, or hung: no answer
/// within the bound) is left for the next one, each tried at most once per call.
pub struct Client {
    servers: Vec<Server>,
    /// Index of the replica in use.
    current: AtomicUsize,
}

impl Client {
    /// A client of `urls` (comma-separated replicas; connected lazily: the first call
    /// reports an unreachable server).
    pub fn new(urls: &str, transport: &Transport) -> Result<Client, Failure> {
        let servers = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|url| {
                let ep = transport
                    .endpoint(url)
                    .map_err(|e| Failure::new(Exit::Invalid, format!("invalid mdserver URL: {e}")))?
                    .connect_timeout(CONNECT_TIMEOUT)
                    // A replica that hangs (stopped, not dead) keeps its TCP connection:
                    // only a missing keep-alive answer shows it (long-lived watch streams).
                    .http2_keep_alive_interval(KEEPALIVE)
                    .keep_alive_timeout(KEEPALIVE)
                    .keep_alive_while_idle(true);
                Ok(Server {
                    url: url.to_owned(),
                    client: ClusterServiceClient::new(transport.channel(&ep, None)),
                    verified: AtomicBool::new(false),
                })
            })
            .collect::<Result<Vec<_>, Failure>>()?;
        if servers.is_empty() {
            return Err(Failure::new(
                Exit::Invalid,
                format!("no mdserver URL in {urls:?}: give --server URL[,URL...]"),
            ));
        }
        Ok(Client {
            servers,
            current: AtomicUsize::new(0),
        })
    }

    /// The URL of the replica in use.
    pub fn url(&self) -> &str {
        &self.servers[self.current.load(Ordering::Relaxed) % self.servers.len()].url
    }

    /// Every replica's URL, comma-separated.
    fn urls(&self) -> String {
        self.servers
            .iter()
            .map(|s| s.url.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    fn fail(&self, url: &str, s: Status) -> Failure {
        if is_transport(&s) {
            return Failure::new(
                Exit::Unreachable,
                format!("cannot reach mdserver at {url}: {}; start it or point --server / MDCTL_SERVER at it", s.message()),
            );
        }
        let e = WireError::from_status(&s);
        Failure::new(Exit::of_errno(e.errno), e.message)
    }

    /// Counts the replica in use as failed (its stream broke): the next call starts
    /// with the next replica.
    fn failed(&self, url: &str) {
        let n = self.servers.len();
        let i = self.current.load(Ordering::Relaxed) % n;
        if self.servers[i].url == url && n > 1 {
            self.servers[i].verified.store(false, Ordering::Relaxed);
            self.current.store((i + 1) % n, Ordering::Relaxed);
        }
    }

    /// With more than one replica, asks replica `i` a cheap question first (bounded by
    /// [`PROBE_TIMEOUT`]), so an operation is only sent to a replica that answers.
    async fn probe(&self, i: usize) -> Result<(), String> {
        let s = &self.servers[i];
        if self.servers.len() == 1 || s.verified.load(Ordering::Relaxed) {
            return Ok(());
        }
        let mut x = s.client.clone();
        match tokio::time::timeout(PROBE_TIMEOUT, x.nodes(pb::ClusterNodesRequest {})).await {
            Ok(Ok(_)) => {
                s.verified.store(true, Ordering::Relaxed);
                Ok(())
            }
            Ok(Err(st)) if !is_transport(&st) => Err(WireError::from_status(&st).message),
            Ok(Err(st)) => Err(st.message().to_owned()),
            Err(_) => Err(format!("no answer within {PROBE_TIMEOUT:?}")),
        }
    }

    /// Runs one call on the replica in use, moving on to the next replica (each at
    /// most once) when one does not answer. `idempotent` calls (reads) also move on
    /// after a transport failure or a timeout of the call itself; an operation does
    /// not, as the replica may have carried it out: only a failed probe before sending
    /// it moves it on.
    async fn run<Q, T, F, Fut>(
        &self,
        timeout: Duration,
        idempotent: bool,
        req: Q,
        f: F,
    ) -> Result<T, Failure>
    where
        Q: Clone,
        F: Fn(ClusterServiceClient<Channel>, Q) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let n = self.servers.len();
        let start = self.current.load(Ordering::Relaxed) % n;
        let mut skipped: Vec<String> = Vec::new();
        for k in 0..n {
            let i = (start + k) % n;
            let s = &self.servers[i];
            if let Err(why) = self.probe(i).await {
                skipped.push(format!("{}: {why}", s.url));
                continue;
            }
            if i != start {
                eprintln!(
                    "mdctl: mdserver at {} did not answer; using {}",
                    self.servers[start].url, s.url
                );
                self.current.store(i, Ordering::Relaxed);
            }
            let last = k + 1 == n;
            match tokio::time::timeout(timeout, f(s.client.clone(), req.clone())).await {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(st)) if idempotent && !last && is_transport(&st) => {
                    s.verified.store(false, Ordering::Relaxed);
                    skipped.push(format!("{}: {}", s.url, st.message()));
                }
                Ok(Err(st)) => return Err(self.fail(&s.url, st)),
                Err(_) if idempotent && !last => {
                    s.verified.store(false, Ordering::Relaxed);
                    skipped.push(format!("{}: no answer within {timeout:?}", s.url));
                }
                Err(_) => {
                    return Err(Failure::new(
                        Exit::TimedOut,
                        format!("mdserver at {} did not answer within {timeout:?}", s.url),
                    ))
                }
            }
        }
        Err(Failure::new(
            Exit::Unreachable,
            format!(
                "no mdserver replica answered ({}): {}; start one or point --server / MDCTL_SERVER at a live one",
                self.urls(),
                skipped.join("; ")
            ),
        ))
    }
}

/// A transport failure: no answer from the service itself.
fn is_transport(s: &Status) -> bool {
    s.details().is_empty() && matches!(s.code(), tonic::Code::Unavailable | tonic::Code::Unknown)
}

fn dev(name: &str) -> String {
    format!("/dev/{}", name.strip_prefix("/dev/").unwrap_or(name))
}

fn json_out(v: &serde_json::Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default() + "\n"
}

/// `mdctl create`.
pub async fn create(
    c: &Client,
    node: &str,
    a: CreateArgs,
    json: bool,
    wait: bool,
) -> Result<String, Failure> {
    let req = pb::ClusterCreateRequest {
        node: node.to_owned(),
        create: Some(pb::CreateArrayRequest {
            name: a.array.clone(),
            level: a.level,
            raid_devices: a.raid_devices,
            spare_devices: a.spare_devices,
            bitmap: a.bitmap.clone(),
            nodes: a.nodes.unwrap_or(0),
            cluster_name: a.cluster_name.clone().unwrap_or_default(),
            md_name: a.name.clone().unwrap_or_default(),
            size_kib: a.size_kib,
            assume_clean: a.assume_clean,
            members: a.devices.iter().map(|d| d.display().to_string()).collect(),
            force: a.force,
            bitmap_chunk_kib: a.bitmap_chunk_kib.unwrap_or(0),
        }),
    };
    let st = c
        .run(OP_TIMEOUT, false, req, |mut x, req| async move {
            x.create(req).await
        })
        .await?;
    eprintln!(
        "mdctl: array {} started on node {} ({} devices, uuid {}).",
        dev(&st.name),
        st.node,
        st.members.len(),
        st.uuid
    );
    started(c, st, json, wait).await
}

/// The end of create and assemble: with `--wait`, follow the first sync; the status as
/// JSON with `--json`.
async fn started(
    c: &Client,
    st: pb::ArrayStatus,
    json: bool,
    wait: bool,
) -> Result<String, Failure> {
    let st = if wait {
        wait_sync(c, &st.node, &st.name).await?
    } else {
        st
    };
    Ok(if json {
        json_out(&render::status_json(&st))
    } else {
        String::new()
    })
}

/// `mdctl assemble`.
pub async fn assemble(
    c: &Client,
    node: &str,
    array: &str,
    devices: &[PathBuf],
    json: bool,
    wait: bool,
) -> Result<String, Failure> {
    let req = pb::ClusterAssembleRequest {
        node: node.to_owned(),
        name: array.to_owned(),
        members: devices.iter().map(|d| d.display().to_string()).collect(),
    };
    let st = c
        .run(OP_TIMEOUT, false, req, |mut x, req| async move {
            x.assemble(req).await
        })
        .await?;
    eprintln!(
        "mdctl: {} has been started on node {} with {} drives.",
        dev(&st.name),
        st.node,
        st.members.len()
    );
    started(c, st, json, wait).await
}

/// `mdctl manage`: `ops` are (action, device) in command-line order.
pub async fn manage(
    c: &Client,
    node: &str,
    array: &str,
    ops: Vec<(String, String)>,
    json: bool,
) -> Result<String, Failure> {
    if ops.is_empty() {
        return Err(Failure::new(
            Exit::Invalid,
            "manage: give at least one of --fail/--remove/--add/--add-spare/--re-add DEV",
        ));
    }
    let req = pb::ClusterManageRequest {
        node: node.to_owned(),
        manage: Some(pb::ManageRequest {
            name: array.to_owned(),
            ops: ops
                .iter()
                .map(|(a, d)| pb::ManageOp {
                    action: a.clone(),
                    device: d.clone(),
                })
                .collect(),
        }),
    };
    let st = c
        .run(OP_TIMEOUT, false, req, |mut x, req| async move {
            x.manage(req).await
        })
        .await?;
    for (a, d) in &ops {
        let what = match a.as_str() {
            "fail" => "set faulty in",
            "remove" => "hot removed from",
            "re-add" => "re-added to",
            _ => "added to",
        };
        eprintln!("mdctl: {what} {} {d} (via node {})", dev(&st.name), st.node);
    }
    Ok(if json {
        json_out(&render::status_json(&st))
    } else {
        String::new()
    })
}

/// `mdctl grow`.
pub async fn grow(
    c: &Client,
    node: &str,
    req: pb::GrowRequest,
    json: bool,
) -> Result<String, Failure> {
    let what = req.clone();
    let req = pb::ClusterGrowRequest {
        node: node.to_owned(),
        grow: Some(req),
    };
    let st = c
        .run(OP_TIMEOUT, false, req, |mut x, req| async move {
            x.grow(req).await
        })
        .await?;
    for d in &what.add {
        eprintln!("mdctl: added {d}");
    }
    let md = dev(&st.name);
    if what.raid_devices != 0 {
        eprintln!(
            "mdctl: {md} now has {} raid devices (via node {})",
            st.raid_disks, st.node
        );
    }
    if !what.size.is_empty() {
        eprintln!(
            "mdctl: {md} size is now {} KiB (via node {})",
            st.size_bytes / 1024,
            st.node
        );
    }
    if !what.bitmap.is_empty() {
        eprintln!(
            "mdctl: {md} bitmap is now {} (via node {})",
            what.bitmap, st.node
        );
    }
    Ok(if json {
        json_out(&render::status_json(&st))
    } else {
        String::new()
    })
}

/// `mdctl stop`.
pub async fn stop(
    c: &Client,
    node: &str,
    array: Option<&str>,
    scan: bool,
    force: bool,
    json: bool,
) -> Result<String, Failure> {
    let req = pb::ClusterStopRequest {
        node: node.to_owned(),
        name: array.unwrap_or_default().to_owned(),
        scan,
        force,
    };
    let r = c
        .run(OP_TIMEOUT, false, req, |mut x, req| async move {
            x.stop(req).await
        })
        .await?;
    for a in &r.stopped {
        eprintln!("mdctl: stopped {} on node {}", dev(a), r.node);
    }
    Ok(if json {
        json_out(&serde_json::json!({"node": r.node, "stopped": r.stopped}))
    } else {
        String::new()
    })
}

/// `mdctl detail`.
pub async fn detail(c: &Client, array: &str, json: bool) -> Result<String, Failure> {
    let name = array.strip_prefix("/dev/").unwrap_or(array).to_owned();
    let req = pb::DetailRequest { name: name.clone() };
    let d = c
        .run(READ_TIMEOUT, true, req, |mut x, req| async move {
            x.detail(req).await
        })
        .await?;
    Ok(if json {
        json_out(&render::detail_json(&d))
    } else {
        render::detail_text(&name, &d)
    })
}

/// The nodes on which the array with `uuid` is assembled (active, assembling or
/// stopping), looked up under each of `names` (the names it may have in the cluster):
/// (node, array name) pairs. Names the cluster does not know are skipped.
pub async fn assembled_on(
    c: &Client,
    uuid: &str,
    names: &[String],
) -> Result<Vec<(String, String)>, Failure> {
    let norm = |s: &str| -> String {
        s.chars()
            .filter(char::is_ascii_hexdigit)
            .map(|c| c.to_ascii_lowercase())
            .collect()
    };
    let want = norm(uuid);
    let mut out = Vec::new();
    for name in names {
        let req = pb::DetailRequest { name: name.clone() };
        let d = match c
            .run(READ_TIMEOUT, true, req, |mut x, req| async move {
                x.detail(req).await
            })
            .await
        {
            Ok(d) => d,
            Err(f) if f.exit == Exit::NotFound => continue,
            Err(f) => return Err(f),
        };
        let recorded = d.record.as_ref().is_some_and(|r| norm(&r.uuid) == want);
        for n in &d.nodes {
            let same = match n.status.as_ref() {
                Some(s) if !s.uuid.is_empty() => norm(&s.uuid) == want,
                _ => recorded,
            };
            if same && matches!(n.state.as_str(), "active" | "assembling" | "stopping") {
                out.push((n.node.clone(), name.clone()));
            }
        }
    }
    Ok(out)
}

/// `mdctl mdstat`.
pub async fn mdstat(c: &Client, node: &str, json: bool) -> Result<String, Failure> {
    let req = pb::ClusterMdstatRequest {
        node: node.to_owned(),
    };
    let r = c
        .run(READ_TIMEOUT, true, req, |mut x, req| async move {
            x.mdstat(req).await
        })
        .await?;
    Ok(if json {
        json_out(&serde_json::json!({"node": r.node, "mdstat": r.text}))
    } else {
        r.text
    })
}

/// `mdctl nodes`.
pub async fn nodes(c: &Client, json: bool) -> Result<String, Failure> {
    let r = c
        .run(
            READ_TIMEOUT,
            true,
            pb::ClusterNodesRequest {},
            |mut x, req| async move { x.nodes(req).await },
        )
        .await?;
    Ok(if json {
        json_out(&render::nodes_json(&r))
    } else {
        render::nodes_text(&r)
    })
}

/// `mdctl tune`.
pub async fn tune(
    c: &Client,
    node: &str,
    min: u64,
    max: u64,
    json: bool,
) -> Result<String, Failure> {
    let req = pb::TuneRequest {
        node: node.to_owned(),
        sync_speed_min_kib_s: min,
        sync_speed_max_kib_s: max,
    };
    let r = c
        .run(READ_TIMEOUT, true, req, |mut x, req| async move {
            x.tune(req).await
        })
        .await?;
    eprintln!(
        "mdctl: sync speed {min}..{max} KiB/s on node(s) {} ({} arrays)",
        r.nodes.join(", "),
        r.arrays.len()
    );
    Ok(if json {
        json_out(&serde_json::json!({"nodes": r.nodes, "arrays": r.arrays}))
    } else {
        String::new()
    })
}

/// Runs `program EVENT DEVICE [COMPONENT]` like `mdadm --monitor --program`, bounded.
async fn run_program(program: &str, e: &pb::ArrayEvent) {
    let device = if e.array.is_empty() {
        format!("node:{}", e.node)
    } else {
        dev(&e.array)
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.arg(&e.event).arg(&device);
    if !e.component.is_empty() {
        cmd.arg(&e.component);
    }
    cmd.env("MDCTL_EVENT_NODE", &e.node)
        .env("MDCTL_EVENT_DETAIL", &e.detail)
        .kill_on_drop(true)
        .stdin(std::process::Stdio::null());
    match cmd.spawn() {
        Ok(mut child) => match tokio::time::timeout(PROGRAM_TIMEOUT, child.wait()).await {
            Ok(Ok(s)) if !s.success() => {
                eprintln!("mdctl: {program} {} {device}: exited with {s}", e.event)
            }
            Ok(Ok(_)) => {}
            Ok(Err(err)) => eprintln!("mdctl: {program}: {err}"),
            Err(_) => {
                eprintln!(
                    "mdctl: {program} {} {device}: killed after {PROGRAM_TIMEOUT:?}",
                    e.event
                );
                let _ = child.kill().await;
            }
        },
        Err(err) => eprintln!("mdctl: cannot run {program}: {err}"),
    }
}

/// `mdctl monitor`: prints (and with `--program` handles) every event until `count`
/// events were seen. When the stream breaks (mdserver restarted, unreachable, or hung:
/// no HTTP/2 keep-alive answer within a few seconds) it reconnects with backoff for at
/// most `reconnect` before giving up, starting with the next replica of `--server
/// A,B`, and says on stderr which replica it follows now; events in the gap are lost,
/// which it says.
pub async fn monitor(
    c: &Client,
    node: &str,
    program: Option<&str>,
    count: Option<u64>,
    reconnect: Duration,
    json: bool,
) -> Result<String, Failure> {
    use std::io::Write as _;
    let mut seen = 0u64;
    let mut down_since: Option<std::time::Instant> = None;
    let mut backoff = Duration::from_millis(200);
    let mut following: Option<String> = None;
    loop {
        let req = pb::ClusterWatchRequest {
            node: node.to_owned(),
        };
        let mut stream = match c
            .run(READ_TIMEOUT, true, req, |mut x, req| async move {
                x.watch(req).await
            })
            .await
        {
            Ok(s) => s,
            Err(f)
                if f.exit == Exit::Unreachable
                    || f.exit == Exit::TimedOut
                    || f.exit == Exit::Io =>
            {
                let since = *down_since.get_or_insert_with(std::time::Instant::now);
                if since.elapsed() >= reconnect {
                    return Err(f);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
            Err(f) => return Err(f),
        };
        let url = c.url().to_owned();
        if following.as_ref().is_some_and(|f| *f != url) {
            eprintln!("mdctl: now following mdserver at {url}");
        }
        following = Some(url.clone());
        if down_since.take().is_some() {
            eprintln!("mdctl: event stream back; events in the gap were not seen");
        }
        backoff = Duration::from_millis(200);
        let why = loop {
            if count.is_some_and(|n| seen >= n) {
                return Ok(String::new());
            }
            match stream.message().await {
                Ok(Some(e)) => {
                    seen += 1;
                    let line = if json {
                        render::event_json(&e).to_string()
                    } else {
                        render::event_line(&e)
                    };
                    let mut out = std::io::stdout().lock();
                    let _ = writeln!(out, "{line}");
                    let _ = out.flush();
                    drop(out);
                    if let Some(p) = program {
                        run_program(p, &e).await;
                    }
                }
                Ok(None) => break "mdserver ended the event stream".to_owned(),
                Err(s) => break c.fail(&url, s).message,
            }
        };
        // The next attempt starts with the next replica (a hung one keeps its
        // connection: the keep-alive timeout is what ended the stream).
        c.failed(&url);
        eprintln!("mdctl: event stream lost ({why}); reconnecting for up to {reconnect:?}");
        down_since = Some(std::time::Instant::now());
    }
}

/// `--wait`: follows the array's resync/recovery on `node` with a progress bar until
/// nothing is left to sync. Each poll is bounded; the array going away ends the wait
/// with its error.
async fn wait_sync(c: &Client, node: &str, name: &str) -> Result<pb::ArrayStatus, Failure> {
    let bar = ProgressBar::new(0);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:40}] {percent:>3}% {bytes}/{total_bytes} ({bytes_per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    loop {
        let req = pb::DetailRequest {
            name: name.to_owned(),
        };
        let d = c
            .run(READ_TIMEOUT, true, req, |mut x, req| async move {
                x.detail(req).await
            })
            .await?;
        let Some(st) = d
            .nodes
            .into_iter()
            .find(|n| n.node == node)
            .and_then(|n| n.status)
        else {
            bar.abandon();
            return Err(Failure::new(
                Exit::NotFound,
                format!("array {} is no longer on node {node}", dev(name)),
            ));
        };
        let sync = st.sync.clone().unwrap_or_default();
        let running = !sync.kind.is_empty() && (sync.state == "busy" || sync.state == "throttled");
        let needed = st.bitmap.as_ref().map_or(0, |b| b.needed);
        if !running && needed == 0 {
            bar.finish_and_clear();
            eprintln!("mdctl: {} on node {node} is in sync.", dev(name));
            return Ok(st);
        }
        if running {
            bar.set_message(format!("{} {}", dev(name), sync.kind));
            bar.set_length(sync.total_bytes);
            bar.set_position(sync.done_bytes);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
