//! The standalone array service of one node: the [`Registry`], one NBD unix socket per
//! array (`<run-dir>/<name>.nbd`), an optional TCP NBD listener, and a local control
//! socket. It is what `mdagent` runs before the cluster exists, and what the tests
//! drive.
//!
//! Control protocol (`<run-dir>/mdagent.ctl`, unix stream, owner-only): one JSON
//! request per line, one JSON answer per line:
//!
//! ```text
//! {"op":"create","name":"md0","members":["/a","/b"],"raid_devices":2,"spare_devices":0,
//!  "bitmap":"internal","chunk_kib":64,"assume_clean":true,"force":false}
//! {"op":"assemble","name":"md0","members":["/a","/b"]}
//! {"op":"stop","name":"md0","force":false}
//! {"op":"status","name":"md0"}        {"op":"list"}        {"op":"mdstat"}
//! {"op":"speed","name":"md0","min_kib_s":1000,"max_kib_s":200000}
//! {"op":"fail","name":"md0","member":"/a"}   {"op":"remove","name":"md0","member":"/a"}
//! {"op":"add","name":"md0","member":"/c"}    (a member not removed, faulty too: EBUSY)
//! → {"ok":true,"result":...}  or  {"ok":false,"errno":"EBUSY","error":"..."}
//! ```
//!
//! Assemble, create and stop are serialised (one control operation at a time), so an
//! array's NBD socket is bound before it is assembling (opens answer EBUSY, never
//! "connection refused") and removed only after it is gone (opens answer ENOENT).
//! A socket is bound under a hidden name and renamed into place once it listens (no
//! window where the file exists but refuses connections). At a stop the socket file
//! is unlinked first, then the listener keeps answering, in the background, for
//! [`LINGER`] so that connections already queued get their ENOENT, then it closes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use mdcluster_proto::status::errno_name;
use mdcluster_proto::v1::Errno;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{valid_name, ArrayError, ArrayInfo, Registry};
use crate::format::create::{BitmapMode, CreateSpec};
use crate::mdstat::ArrayStat;
use crate::nbd::{Exports, NbdUnixListener, Scope, ServerConfig};
use crate::raid::Raid1;
use crate::raid::SpeedLimits;

/// How long the listener of a removed socket keeps answering connections that were
/// queued before the unlink (in the background; the stop does not wait for it).
pub const LINGER: Duration = Duration::from_secs(2);
/// Longest control request line.
const MAX_LINE: usize = 64 << 10;
/// Control connections served at once.
const MAX_CONTROL_CONNECTIONS: usize = 64;

/// Errors of the service.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Binding the control socket failed.
    #[error("bind control socket {path}: {source}")]
    Control {
        /// The path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// Binding an array's NBD socket failed.
    #[error("EIO: NBD socket of array {name}: {source}")]
    Nbd {
        /// The array.
        name: String,
        /// The cause.
        source: crate::nbd::ServeError,
    },
    /// A registry operation failed.
    #[error(transparent)]
    Array(#[from] ArrayError),
}

impl ServiceError {
    /// The errno of the error (a registry error gives its own, the rest is EIO).
    pub fn errno(&self) -> Errno {
        match self {
            ServiceError::Array(e) => e.errno(),
            _ => Errno::Eio,
        }
    }
}

struct Served {
    cancel: CancellationToken,
    task: JoinHandle<()>,
    path: PathBuf,
}

/// The standalone service.
pub struct Service {
    registry: Arc<Registry>,
    run_dir: PathBuf,
    nbd: ServerConfig,
    /// One control operation (assemble/create/stop) at a time.
    ops: tokio::sync::Mutex<HashMap<String, Served>>,
    /// Listeners of stopped arrays, unlinked, still answering queued connections.
    lingering: std::sync::Mutex<Vec<(CancellationToken, JoinHandle<()>)>>,
}

/// A `create` request.
#[derive(Debug, Deserialize)]
pub struct CreateRequest {
    /// Array name.
    pub name: String,
    /// Member paths.
    pub members: Vec<PathBuf>,
    /// `--raid-devices`.
    pub raid_devices: u32,
    /// `--spare-devices`.
    #[serde(default)]
    pub spare_devices: u32,
    /// `--bitmap`.
    #[serde(default = "default_bitmap")]
    pub bitmap: BitmapMode,
    /// Bitmap chunk in KiB.
    #[serde(default)]
    pub chunk_kib: Option<u32>,
    /// Bitmap `daemon_sleep` in seconds.
    #[serde(default)]
    pub daemon_sleep: Option<u32>,
    /// `--assume-clean`.
    #[serde(default)]
    pub assume_clean: bool,
    /// `--size` in KiB.
    #[serde(default)]
    pub size_kib: Option<u64>,
    /// Overwrite existing superblocks.
    #[serde(default)]
    pub force: bool,
}

fn default_bitmap() -> BitmapMode {
    BitmapMode::Internal
}

#[derive(Debug, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Request {
    Create(CreateRequest),
    Assemble {
        name: String,
        members: Vec<PathBuf>,
    },
    Stop {
        name: String,
        #[serde(default)]
        force: bool,
    },
    Status {
        name: String,
    },
    List,
    Mdstat,
    Speed {
        name: String,
        min_kib_s: u64,
        max_kib_s: u64,
    },
    Fail {
        name: String,
        member: PathBuf,
    },
    Add {
        name: String,
        member: PathBuf,
    },
    Remove {
        name: String,
        member: PathBuf,
    },
}

impl Service {
    /// A service over `registry`, with sockets in `run_dir`.
    pub fn new(registry: Arc<Registry>, run_dir: &Path, nbd: ServerConfig) -> Arc<Service> {
        Arc::new(Service {
            registry,
            run_dir: run_dir.to_owned(),
            nbd,
            ops: tokio::sync::Mutex::new(HashMap::new()),
            lingering: std::sync::Mutex::new(Vec::new()),
        })
    }

    /// The registry.
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The NBD socket path of array `name`.
    pub fn socket_path(&self, name: &str) -> PathBuf {
        self.run_dir.join(format!("{name}.nbd"))
    }

    async fn start_listener(
        &self,
        served: &mut HashMap<String, Served>,
        name: &str,
    ) -> Result<bool, ServiceError> {
        if served.contains_key(name) {
            return Ok(false);
        }
        let path = self.socket_path(name);
        // bind(2) creates the file before listen(2): a client connecting in between
        // would get ECONNREFUSED. So bind under a hidden name and rename into place
        // once listening (array names never start with '.').
        let tmp = self
            .run_dir
            .join(format!(".{name}.nbd.{}.tmp", std::process::id()));
        let listener = NbdUnixListener::bind(&tmp)
            .await
            .map_err(|source| ServiceError::Nbd {
                name: name.to_owned(),
                source,
            })?;
        std::fs::rename(&tmp, &path).map_err(|e| ServiceError::Nbd {
            name: name.to_owned(),
            source: crate::nbd::ServeError::Bind {
                path: path.clone(),
                source: e,
            },
        })?;
        let cancel = CancellationToken::new();
        let exports: Arc<dyn Exports> = self.registry.clone();
        let scope = Scope::Only(name.to_owned());
        let config = self.nbd.clone();
        let c = cancel.clone();
        let n = name.to_owned();
        let task = tokio::spawn(async move {
            if let Err(e) = listener.serve(scope, exports, config, c).await {
                tracing::warn!(array = %n, "NBD listener ended: {e}");
            }
        });
        served.insert(name.to_owned(), Served { cancel, task, path });
        Ok(true)
    }

    async fn stop_listener(&self, served: &mut HashMap<String, Served>, name: &str) {
        let Some(s) = served.remove(name) else { return };
        // Unlink first: new connects fail with ENOENT at once. Connections already
        // queued or in negotiation are still answered (ENOENT) by the listener, which
        // lingers in the background for [`LINGER`] before it closes.
        if let Err(e) = std::fs::remove_file(&s.path) {
            tracing::debug!(path = %s.path.display(), "remove NBD socket: {e}");
        }
        let bound = self.nbd.shutdown_timeout + Duration::from_secs(1);
        let cancel = s.cancel.clone();
        let n = name.to_owned();
        let task = tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep(LINGER) => {}
                _ = s.cancel.cancelled() => {}
            }
            s.cancel.cancel();
            if tokio::time::timeout(bound, s.task).await.is_err() {
                tracing::warn!(array = %n, "NBD listener did not end in time");
            }
        });
        let mut lingering = self.lingering.lock().unwrap_or_else(|e| e.into_inner());
        lingering.retain(|(_, t)| !t.is_finished());
        lingering.push((cancel, task));
    }

    /// Assembles `name` (in the registry's bitmap slot) and serves it on its NBD socket.
    pub async fn assemble(&self, name: &str, members: &[PathBuf]) -> Result<Value, ServiceError> {
        let slot = self.registry.slot();
        self.assemble_in_slot(name, members, slot).await
    }

    /// Assembles `name` with this node's bitmap in `slot` and serves it on its NBD
    /// socket.
    pub async fn assemble_in_slot(
        &self,
        name: &str,
        members: &[PathBuf],
        slot: u32,
    ) -> Result<Value, ServiceError> {
        if !valid_name(name) {
            return Err(ArrayError::Invalid(format!("invalid array name {name:?}")).into());
        }
        let mut served = self.ops.lock().await;
        let started = self.start_listener(&mut served, name).await?;
        match self.registry.assemble_in_slot(name, members, slot).await {
            Ok(info) => Ok(serde_json::to_value(info).unwrap_or(Value::Null)),
            Err(e) => {
                if started {
                    self.stop_listener(&mut served, name).await;
                }
                Err(e.into())
            }
        }
    }

    /// Creates `name` (writes the members) and serves it.
    pub async fn create(&self, req: CreateRequest) -> Result<Value, ServiceError> {
        let name = req.name.clone();
        if !valid_name(&name) {
            return Err(ArrayError::Invalid(format!("invalid array name {name:?}")).into());
        }
        let mut spec = CreateSpec::new(&name, req.raid_devices, req.spare_devices, req.bitmap);
        spec.assume_clean = req.assume_clean;
        spec.bitmap_chunk = req.chunk_kib.map(|k| k.saturating_mul(1024));
        if let Some(d) = req.daemon_sleep {
            spec.daemon_sleep = d;
        }
        spec.size_kib = req.size_kib;
        let mut served = self.ops.lock().await;
        let started = self.start_listener(&mut served, &name).await?;
        match self
            .registry
            .create(&name, spec, &req.members, req.force)
            .await
        {
            Ok(info) => Ok(serde_json::to_value(info).unwrap_or(Value::Null)),
            Err(e) => {
                if started {
                    self.stop_listener(&mut served, &name).await;
                }
                Err(e.into())
            }
        }
    }

    /// Stops `name` and removes its NBD socket.
    pub async fn stop(&self, name: &str, force: bool) -> Result<Value, ServiceError> {
        self.stop_inner(name, force, false).await
    }

    /// Stops `name` with its clients forced off at once (no grace for them to leave):
    /// for an array whose I/O can no longer succeed (its session was lost).
    pub async fn stop_now(&self, name: &str) -> Result<Value, ServiceError> {
        self.stop_inner(name, true, true).await
    }

    async fn stop_inner(&self, name: &str, force: bool, now: bool) -> Result<Value, ServiceError> {
        let mut served = self.ops.lock().await;
        let result = if now {
            self.registry.stop_now(name).await
        } else {
            self.registry.stop(name, force).await
        };
        if self.registry.lookup(name).is_err() {
            self.stop_listener(&mut served, name).await;
        }
        result.map(|()| Value::Null).map_err(Into::into)
    }

    /// This agent's `/proc/mdstat`: its active and stopping arrays, in the format
    /// `mdctl mdstat` prints for a cluster node.
    pub fn mdstat(&self) -> String {
        let mut names = self.registry.names();
        names.sort();
        let stats: Vec<ArrayStat> = names
            .iter()
            .filter_map(|n| self.registry.lookup(n).ok())
            .filter_map(|i| array_stat(&i, self.registry.device(&i.name).ok().as_deref()))
            .collect();
        crate::mdstat::render(&stats)
    }

    /// Stops every array (forcing clients off) and every listener.
    pub async fn shutdown(&self) {
        let mut served = self.ops.lock().await;
        for (name, e) in self.registry.stop_all().await {
            tracing::error!(array = %name, "failed to stop at shutdown: {e}");
        }
        let names: Vec<String> = served.keys().cloned().collect();
        for n in names {
            self.stop_listener(&mut served, &n).await;
        }
        let lingering =
            std::mem::take(&mut *self.lingering.lock().unwrap_or_else(|e| e.into_inner()));
        for (cancel, task) in lingering {
            cancel.cancel();
            let _ = tokio::time::timeout(self.nbd.shutdown_timeout + Duration::from_secs(1), task)
                .await;
        }
    }

    async fn handle(&self, line: &str) -> Value {
        let req: Request = match serde_json::from_str(line) {
            Ok(r) => r,
            Err(e) => {
                return json!({"ok": false, "errno": "EINVAL", "error": format!("bad request: {e}")})
            }
        };
        let result: Result<Value, ServiceError> = match req {
            Request::Create(c) => self.create(c).await,
            Request::Assemble { name, members } => self.assemble(&name, &members).await,
            Request::Stop { name, force } => self.stop(&name, force).await,
            Request::Status { name } => self
                .registry
                .lookup(&name)
                .map(|i| serde_json::to_value(i).unwrap_or(Value::Null))
                .map_err(Into::into),
            Request::List => Ok(json!(self.registry.names())),
            Request::Mdstat => Ok(json!(self.mdstat())),
            Request::Speed {
                name,
                min_kib_s,
                max_kib_s,
            } => self
                .registry
                .set_speed(
                    &name,
                    SpeedLimits {
                        min_kib_s,
                        max_kib_s,
                    },
                )
                .map(|()| Value::Null)
                .map_err(Into::into),
            Request::Add { name, member } => self
                .registry
                .add_member(&name, &member)
                .await
                .map(|o| serde_json::to_value(o).unwrap_or(Value::Null))
                .map_err(Into::into),
            Request::Remove { name, member } => match self
                .registry
                .remove_member(&name, &member, crate::raid::MetaWrite::Local)
                .await
            {
                Ok(true) => Ok(Value::Null),
                Ok(false) => Err(ArrayError::Busy {
                    state: format!(
                        "using {} as an active member: fail it first",
                        member.display()
                    ),
                    name,
                    clients: Vec::new(),
                }
                .into()),
                Err(e) => Err(e.into()),
            },
            Request::Fail { name, member } => self
                .registry
                .fail_member(&name, &member, crate::raid::MetaWrite::Local)
                .await
                .map(|()| Value::Null)
                .map_err(Into::into),
        };
        match result {
            Ok(v) => json!({"ok": true, "result": v}),
            Err(e) => json!({"ok": false, "errno": errno_name(e.errno()), "error": e.to_string()}),
        }
    }

    /// Serves the control socket at `path` until `shutdown` is cancelled.
    ///
    /// The socket is owner-only (0600) from the moment it can be reached: it is bound
    /// inside a new private directory (0700), made 0600 there, then renamed into place.
    /// Each connection's peer is checked too (SO_PEERCRED): only root and this process's
    /// own user are served; anyone else gets one EPERM answer and is disconnected.
    pub async fn serve_control(
        self: Arc<Self>,
        path: &Path,
        shutdown: CancellationToken,
    ) -> Result<(), ServiceError> {
        let control_err = |source| ServiceError::Control {
            path: path.to_owned(),
            source,
        };
        let _ = std::fs::remove_file(path);
        let listener = bind_owner_only(path).map_err(control_err)?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let me_uid = unsafe { libc::geteuid() };
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONTROL_CONNECTIONS));
        loop {
            let (stream, _) = tokio::select! {
                r = listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("control accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                _ = shutdown.cancelled() => break,
            };
            let Ok(permit) = slots.clone().try_acquire_owned() else {
                drop(stream);
                continue;
            };
            match stream.peer_cred() {
                Ok(c) if c.uid() == 0 || c.uid() == me_uid => {}
                other => {
                    let who = match &other {
                        Ok(c) => match c.pid() {
                            Some(pid) => format!("uid {} (pid {pid})", c.uid()),
                            None => format!("uid {}", c.uid()),
                        },
                        Err(e) => format!("an unknown peer ({e})"),
                    };
                    tracing::warn!(
                        "control socket: refused {who}: only root and uid {me_uid} may use it"
                    );
                    let mut stream = stream;
                    let answer = json!({
                        "ok": false,
                        "errno": "EPERM",
                        "error": format!(
                            "permission denied: the control socket serves only root and uid \
                             {me_uid} (the agent's user); this connection is from {who}"
                        ),
                    });
                    tokio::spawn(async move {
                        // Read (bounded) the request, so the answer is not lost to a
                        // reset, then answer and close.
                        let line = format!("{answer}\n");
                        let _ = tokio::time::timeout(Duration::from_secs(1), async {
                            let mut request = String::new();
                            let (r, mut w) = stream.split();
                            let _ = BufReader::new(r)
                                .take(MAX_LINE as u64)
                                .read_line(&mut request)
                                .await;
                            let _ = w.write_all(line.as_bytes()).await;
                        })
                        .await;
                        drop(permit);
                    });
                    continue;
                }
            }
            let me = self.clone();
            tokio::spawn(async move {
                me.control_connection(stream).await;
                drop(permit);
            });
        }
        let _ = std::fs::remove_file(path);
        Ok(())
    }

    async fn control_connection(&self, stream: UnixStream) {
        let (r, mut w) = stream.into_split();
        let mut reader = BufReader::new(r);
        loop {
            let mut line = String::new();
            match (&mut reader)
                .take(MAX_LINE as u64 + 1)
                .read_line(&mut line)
                .await
            {
                Ok(0) | Err(_) => return,
                Ok(n) if n > MAX_LINE => return,
                Ok(_) => {}
            }
            if line.trim().is_empty() {
                continue;
            }
            let mut answer = self.handle(&line).await.to_string();
            answer.push('\n');
            if w.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
        }
    }
}

/// Binds a unix socket at `path` that is 0600 before anyone can reach it: bound in a new
/// 0700 directory beside `path`, made 0600 there, then renamed to `path`.
fn bind_owner_only(path: &Path) -> std::io::Result<UnixListener> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let parent = path.parent().unwrap_or(Path::new("."));
    let private = parent.join(format!(".mdagent-ctl.{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let tmp = private.join("ctl");
    let bound = (|| {
        let listener = UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    bound
}

/// An array as `/proc/mdstat` shows it (None while assembling): members, size, the
/// running or pending sync, the bitmap's geometry from the engine. The cluster node
/// adds its own to it (another node's resync window, the record's level and bitmap).
pub fn array_stat(info: &ArrayInfo, raid: Option<&Raid1>) -> Option<ArrayStat> {
    use crate::mdstat::{BitmapStat, RunState, SyncStat};
    let r = info.raid.as_ref()?;
    let members = member_stats(r);
    let sync = running_sync(r).or_else(|| {
        raid.is_some_and(Raid1::sync_pending)
            .then_some(SyncStat::Pending)
    });
    let bitmap = raid.and_then(|x| x.bitmap()).map(|b| {
        let g = b.geometry();
        BitmapStat {
            chunks: g.chunks,
            chunk_bytes: g.chunk_bytes,
        }
    });
    Some(ArrayStat {
        name: info.name.clone(),
        run_state: RunState::Active,
        level: 1,
        members,
        blocks_kib: r.size / 1024,
        metadata: "1.2".to_owned(),
        raid_disks: r.raid_disks,
        sync,
        bitmap,
    })
}

/// The members of running array `r` as `/proc/mdstat` lists them (removed ones left
/// out).
fn member_stats(r: &crate::raid::RaidStatus) -> Vec<crate::mdstat::MemberStat> {
    use crate::raid::MemberState;
    r.members
        .iter()
        .filter(|m| !m.removed)
        .map(|m| crate::mdstat::MemberStat {
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
        .collect()
}

/// The sync running on array `r` now, as `/proc/mdstat` shows it (None when idle).
fn running_sync(r: &crate::raid::RaidStatus) -> Option<crate::mdstat::SyncStat> {
    use crate::raid::WorkerState;
    match (r.sync.kind, r.sync.state) {
        (Some(kind), WorkerState::Busy | WorkerState::Throttled) => {
            Some(crate::mdstat::SyncStat::Running {
                kind: match kind {
                    crate::raid::SyncKind::Resync => crate::mdstat::SyncKind::Resync,
                    crate::raid::SyncKind::Recovery => crate::mdstat::SyncKind::Recovery,
                },
                done_kib: r.sync.done_bytes / 1024,
                total_kib: r.sync.total_bytes / 1024,
                speed_kib: r.sync.rate_kib_s,
            })
        }
        _ => None,
    }
}
