//! The NBD server's I/O: listeners (one unix socket per array, an optional TCP listener),
//! the accept loop with its connection cap, the negotiation phase, and the transmission
//! phase with many requests in flight per connection.
//!
//! # Tasks and bounds
//! - The accept loop owns one task per connection (a `JoinSet`); at most
//!   [`ServerConfig::max_connections`] at a time; a connection over the cap is closed at
//!   once. On shutdown it stops accepting, tells every connection to close, waits at most
//!   [`ServerConfig::shutdown_timeout`] for them, then aborts the rest.
//! - Negotiation is bounded by [`ServerConfig::handshake_timeout`], option data by 64 KiB.
//! - A connection in transmission has one reader (itself), one writer task, and one task
//!   per request. Requests are capped by count ([`ServerConfig::max_inflight_requests`])
//!   and by payload bytes ([`ServerConfig::max_inflight_bytes`]), and a request holds its
//!   share from the moment the reader takes it until its reply has been written to the
//!   socket (or the connection is gone). When a cap is reached the reader stops reading
//!   the socket, so a client that does not read its replies stops being served instead
//!   of making the server queue them. Replies go to the writer through a channel that
//!   the count cap bounds, and are written in completion order (cookies let the client
//!   match them).
//! - Memory of one connection: the payloads of its requests — write data being read or
//!   written to the device, read data being read, queued or written as a reply (copied
//!   into a batch or not) — total at most `max(max_inflight_bytes, max_payload)` bytes,
//!   each request counted by its length in whole KiB (at least 1 KiB). On top come fixed
//!   costs: the 256 KiB request read buffer and 16 bytes of reply header per request in
//!   flight.
//! - A request that is out of range or too large gets an error reply and the connection
//!   goes on (a write's payload is read and discarded first, up to
//!   [`ServerConfig::max_drain`]; beyond that the connection is closed, as the payload
//!   cannot be skipped cheaply). A protocol violation (bad magic, malformed header)
//!   closes that connection only.
//! - When the client leaves (`NBD_CMD_DISC`, EOF), in-flight requests complete and their
//!   replies are written (bounded by [`ServerConfig::drain_timeout`]). When the owner
//!   cancels [`OpenExport::disconnect`], or the server shuts down, the socket is closed at
//!   once; the [`OpenExport::guard`] is dropped only when the last in-flight request has
//!   finished, so "the client left" always means "no request of it is still running".

use std::collections::VecDeque;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use thiserror::Error;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use super::exports::{ClientInfo, Exports, OpenError, OpenExport};
use super::proto::{self, Action, ProtoError};
use crate::blockdev::BlockDevice;
use crate::iobuf;
use crate::metrics::{Op, RequestTimer};

/// Largest option data accepted in negotiation (export names are at most 4 KiB).
const MAX_OPTION_DATA: u32 = 64 << 10;
/// Most options one negotiation may send.
const MAX_OPTIONS: usize = 1024;
/// Preferred block size advertised in `NBD_INFO_BLOCK_SIZE`.
const PREFERRED_BLOCK: u32 = 4096;
/// Pause after a failed `accept` (e.g. EMFILE) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How long the bind waits to learn whether an existing socket file has a live server.
const STALE_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Limits and timeouts of an NBD server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Connections served at once by one listener; more are closed at accept.
    pub max_connections: usize,
    /// Requests in flight per connection.
    pub max_inflight_requests: usize,
    /// Payload bytes (read and write data) in flight per connection; at least
    /// `max_payload`.
    pub max_inflight_bytes: usize,
    /// Largest READ/WRITE payload (advertised as the maximum block size); larger requests
    /// get `EINVAL`.
    pub max_payload: u32,
    /// Largest payload of a rejected write that is read and discarded to keep the
    /// connection; a rejected write with a larger payload closes the connection.
    pub max_drain: u32,
    /// Bound of the whole negotiation phase.
    pub handshake_timeout: Duration,
    /// How long a leaving client's in-flight requests may take to complete and be
    /// answered before the connection is closed anyway.
    pub drain_timeout: Duration,
    /// How long shutdown waits for connections to end before aborting them.
    pub shutdown_timeout: Duration,
    /// The payload bytes in flight across every connection of every listener whose
    /// configuration is a clone of this one (the agent makes one and clones it). A
    /// request beyond it waits, at most [`ServerConfig::drain_timeout`]; then its
    /// connection is closed.
    pub payload_budget: PayloadBudget,
    /// TLS of the TCP listener ([`super::tls`]): when set, a TCP client must negotiate
    /// `NBD_OPT_STARTTLS` with a certificate signed by its CA before anything else.
    /// Unix sockets never use it (local, file permissions).
    pub tls: Option<super::tls::NbdTls>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_connections: 128,
            max_inflight_requests: 128,
            max_inflight_bytes: 128 << 20,
            max_payload: 32 << 20,
            max_drain: 64 << 20,
            handshake_timeout: Duration::from_secs(10),
            drain_timeout: Duration::from_secs(30),
            shutdown_timeout: Duration::from_secs(10),
            payload_budget: PayloadBudget::new(DEFAULT_PAYLOAD_BUDGET),
            tls: None,
        }
    }
}

/// Default of [`ServerConfig::payload_budget`]: 1 GiB.
pub const DEFAULT_PAYLOAD_BUDGET: usize = 1 << 30;

/// One cap on the payload bytes (read and write data) in flight across connections,
/// counted in whole KiB. Cloning shares it.
#[derive(Debug, Clone)]
pub struct PayloadBudget {
    kib: Arc<Semaphore>,
    kib_total: u32,
}

impl PayloadBudget {
    /// A budget of `bytes` (at least 1 KiB).
    pub fn new(bytes: usize) -> Self {
        let kib_total =
            (bytes / 1024).clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize)) as u32;
        PayloadBudget {
            kib: Arc::new(Semaphore::new(kib_total as usize)),
            kib_total,
        }
    }

    /// The budget, in bytes.
    pub fn total_bytes(&self) -> u64 {
        u64::from(self.kib_total) * 1024
    }

    /// Bytes not held by any request now.
    pub fn available_bytes(&self) -> u64 {
        self.kib.available_permits() as u64 * 1024
    }

    /// Takes `len` bytes' worth (whole KiB, at most the whole budget), waiting at most
    /// `wait`; `None` when the wait ran out.
    async fn take(&self, len: u32, wait: Duration) -> Option<OwnedSemaphorePermit> {
        let kib = len.div_ceil(1024).clamp(1, self.kib_total);
        tokio::time::timeout(wait, Arc::clone(&self.kib).acquire_many_owned(kib))
            .await
            .ok()
            .map(|p| p.expect("the payload budget semaphore is never closed"))
    }
}

/// Which exports a listener serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    /// Every export of [`Exports`], by name (the TCP listener). An empty name is refused.
    All,
    /// Only the named export (the per-array unix socket). The empty name means it.
    Only(String),
}

impl Scope {
    fn resolve(&self, requested: &str) -> Result<String, OpenError> {
        match self {
            Scope::Only(name) if requested.is_empty() || requested == name => Ok(name.clone()),
            Scope::All if !requested.is_empty() => Ok(requested.to_owned()),
            _ => Err(OpenError::NotFound {
                name: requested.to_owned(),
            }),
        }
    }

    fn admits(&self, name: &str) -> bool {
        match self {
            Scope::All => true,
            Scope::Only(only) => only == name,
        }
    }
}

/// Errors that end a listener.
#[derive(Debug, Error)]
pub enum ServeError {
    /// Binding the unix socket failed.
    #[error("bind NBD socket {path}: {source}")]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// A live server already listens on the socket path.
    #[error("NBD socket {path} is in use by a live server")]
    InUse {
        /// The socket path.
        path: PathBuf,
    },
    /// Something other than a socket sits at the socket path; it is not removed.
    #[error("{path} exists and is not a socket; not replacing it")]
    NotASocket {
        /// The path.
        path: PathBuf,
    },
}

/// Why one connection ended badly (logged, never returned).
#[derive(Debug, Error)]
enum ConnError {
    #[error("socket I/O: {0}")]
    Io(#[from] io::Error),
    #[error("protocol violation: {0}")]
    Proto(#[from] ProtoError),
    #[error("option data of {0} bytes exceeds the limit of {MAX_OPTION_DATA}")]
    OptionTooLarge(u32),
    #[error("more than {MAX_OPTIONS} options in negotiation")]
    TooManyOptions,
    #[error("negotiation took longer than {0:?}")]
    HandshakeTimeout(Duration),
    #[error("TLS handshake: {0}")]
    Tls(io::Error),
    #[error("the agent's NBD payload budget of {budget} bytes stayed in use by other requests for {waited:?}")]
    BudgetWait { budget: u64, waited: Duration },
    #[error("rejected write carries {len} payload bytes, more than the drain limit {limit}")]
    PayloadTooLarge { len: u32, limit: u32 },
}

/// What a listener's connections share.
struct Ctx {
    exports: Arc<dyn Exports>,
    scope: Scope,
    config: ServerConfig,
    /// Listener name for logs: the socket path or TCP address.
    listener: String,
    /// TLS required before any other option (the TCP listener with TLS configured).
    tls: Option<super::tls::NbdTls>,
}

impl Ctx {
    fn open(
        &self,
        requested: &str,
        client: &ClientInfo,
    ) -> Result<(String, OpenExport), OpenError> {
        let name = self.scope.resolve(requested)?;
        let open = self.exports.open(&name, client)?;
        Ok((name, open))
    }

    fn list(&self) -> Vec<String> {
        let mut names = self.exports.list();
        names.retain(|n| self.scope.admits(n));
        names
    }
}

/// A bound unix socket for NBD, mode 0600, removed when the listener is dropped (if it is
/// still the same socket file).
pub struct NbdUnixListener {
    listener: UnixListener,
    file: SocketFile,
}

struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        // Remove only our own socket: a newer server may have replaced the file.
        if let Ok(md) = std::fs::symlink_metadata(&self.path) {
            if md.dev() == self.dev && md.ino() == self.ino {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    warn!(path = %self.path.display(), "failed to remove NBD socket: {e}");
                }
            }
        }
    }
}

impl NbdUnixListener {
    /// Binds `path`: a stale socket file (no live server behind it) is replaced; a live
    /// one or a non-socket file is an error. The socket is made owner-only (0600);
    /// peers of another uid (other than root) are also refused at accept.
    pub async fn bind(path: &Path) -> Result<Self, ServeError> {
        let bind_err = |source| ServeError::Bind {
            path: path.to_owned(),
            source,
        };
        match std::fs::symlink_metadata(path) {
            Ok(md) if md.file_type().is_socket() => {
                let probe = tokio::time::timeout(STALE_PROBE_TIMEOUT, UnixStream::connect(path));
                if let Ok(Ok(_)) = probe.await {
                    return Err(ServeError::InUse {
                        path: path.to_owned(),
                    });
                }
                match std::fs::remove_file(path) {
                    Ok(()) => info!(path = %path.display(), "replaced stale NBD socket"),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(bind_err(e)),
                }
            }
            Ok(_) => {
                return Err(ServeError::NotASocket {
                    path: path.to_owned(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(bind_err(e)),
        }
        let listener = UnixListener::bind(path).map_err(bind_err)?;
        let md = std::fs::symlink_metadata(path).map_err(bind_err)?;
        let file = SocketFile {
            path: path.to_owned(),
            dev: md.dev(),
            ino: md.ino(),
        };
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(bind_err)?;
        Ok(NbdUnixListener { listener, file })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.file.path
    }

    /// Serves connections until `shutdown` is cancelled, then closes them (bounded) and
    /// removes the socket file.
    pub async fn serve(
        self,
        scope: Scope,
        exports: Arc<dyn Exports>,
        config: ServerConfig,
        shutdown: CancellationToken,
    ) -> Result<(), ServeError> {
        let ctx = Arc::new(Ctx {
            exports,
            scope,
            config,
            listener: self.file.path.display().to_string(),
            tls: None,
        });
        let NbdUnixListener { listener, file } = self;
        accept_loop(Listener::Unix(listener), ctx, shutdown).await;
        drop(file);
        Ok(())
    }
}

/// Binds `path` (see [`NbdUnixListener::bind`]) and serves until `shutdown`.
pub async fn serve_unix(
    path: &Path,
    scope: Scope,
    exports: Arc<dyn Exports>,
    config: ServerConfig,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    NbdUnixListener::bind(path)
        .await?
        .serve(scope, exports, config, shutdown)
        .await
}

/// Serves every export (by name) on a bound TCP listener until `shutdown`.
pub async fn serve_tcp(
    listener: TcpListener,
    exports: Arc<dyn Exports>,
    config: ServerConfig,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    let name = match listener.local_addr() {
        Ok(a) => format!("tcp:{a}"),
        Err(_) => "tcp".to_owned(),
    };
    let ctx = Arc::new(Ctx {
        exports,
        scope: Scope::All,
        tls: config.tls.clone(),
        config,
        listener: name,
    });
    accept_loop(Listener::Tcp(listener), ctx, shutdown).await;
    Ok(())
}

/// A listener running in its own task: [`ServerHandle::stop`] ends it (bounded).
#[derive(Debug)]
pub struct ServerHandle {
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), ServeError>>,
    stop_timeout: Duration,
}

impl ServerHandle {
    /// Stops accepting, closes every connection (see [`ServerConfig::shutdown_timeout`])
    /// and, for a unix socket, removes the socket file. Waits at most the shutdown
    /// timeout plus one second, then aborts the task.
    pub async fn stop(mut self) -> Result<(), ServeError> {
        self.shutdown.cancel();
        let bound = self.stop_timeout + Duration::from_secs(1);
        match tokio::time::timeout(bound, &mut self.task).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                warn!("NBD listener task failed: {e}");
                Ok(())
            }
            Err(_) => {
                warn!("NBD listener did not stop in {bound:?}; aborted");
                self.task.abort();
                Ok(())
            }
        }
    }

    /// Whether the listener task has ended.
    pub fn is_finished(&self) -> bool {
        self.task.is_finished()
    }
}

/// Binds `path` (see [`NbdUnixListener::bind`]) and serves it in a new task until the
/// handle is stopped or `parent` is cancelled. The socket accepts connections when this
/// returns. This is what the agent runs per active array, with
/// `Scope::Only(array name)` and `path = <run-dir>/<array>.nbd`.
pub async fn spawn_unix(
    path: &Path,
    scope: Scope,
    exports: Arc<dyn Exports>,
    config: ServerConfig,
    parent: &CancellationToken,
) -> Result<ServerHandle, ServeError> {
    let listener = NbdUnixListener::bind(path).await?;
    let shutdown = parent.child_token();
    let stop_timeout = config.shutdown_timeout;
    let task = tokio::spawn(listener.serve(scope, exports, config, shutdown.clone()));
    Ok(ServerHandle {
        shutdown,
        task,
        stop_timeout,
    })
}

/// Serves every export on a bound TCP listener in a new task (see [`spawn_unix`]).
pub fn spawn_tcp(
    listener: TcpListener,
    exports: Arc<dyn Exports>,
    config: ServerConfig,
    parent: &CancellationToken,
) -> ServerHandle {
    let shutdown = parent.child_token();
    let stop_timeout = config.shutdown_timeout;
    let task = tokio::spawn(serve_tcp(listener, exports, config, shutdown.clone()));
    ServerHandle {
        shutdown,
        task,
        stop_timeout,
    }
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

enum Stream {
    Unix(UnixStream),
    Tcp(tokio::net::TcpStream),
}

impl Listener {
    /// Accepts one connection; `Ok(None)` for a peer refused by policy.
    async fn accept(&self) -> io::Result<Option<(Stream, ClientInfo)>> {
        match self {
            Listener::Unix(l) => {
                let (s, _) = l.accept().await?;
                let cred = s.peer_cred()?;
                // SAFETY: geteuid has no preconditions and cannot fail.
                let euid = unsafe { libc::geteuid() };
                if cred.uid() != euid && cred.uid() != 0 {
                    warn!(uid = cred.uid(), "refused NBD client of another user");
                    return Ok(None);
                }
                let pid = cred.pid().map_or_else(|| "?".to_owned(), |p| p.to_string());
                let info = ClientInfo::new(format!("unix:pid={pid},uid={}", cred.uid()));
                Ok(Some((Stream::Unix(s), info)))
            }
            Listener::Tcp(l) => {
                let (s, addr) = l.accept().await?;
                s.set_nodelay(true)?;
                Ok(Some((
                    Stream::Tcp(s),
                    ClientInfo::new(format!("tcp:{addr}")),
                )))
            }
        }
    }
}

async fn accept_loop(listener: Listener, ctx: Arc<Ctx>, shutdown: CancellationToken) {
    let limit = Arc::new(Semaphore::new(ctx.config.max_connections));
    let mut tasks = JoinSet::new();
    info!(listener = %ctx.listener, "NBD server listening");
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(done) = tasks.join_next(), if !tasks.is_empty() => {
                if let Err(e) = done {
                    if e.is_panic() {
                        warn!(listener = %ctx.listener, "NBD connection task panicked: {e}");
                    }
                }
            }
            accepted = listener.accept() => match accepted {
                Ok(Some((stream, client))) => {
                    let Ok(permit) = Arc::clone(&limit).try_acquire_owned() else {
                        warn!(listener = %ctx.listener, %client,
                            "refused NBD connection: {} connections already",
                            ctx.config.max_connections);
                        continue;
                    };
                    let span = tracing::info_span!("nbd", client = %client);
                    let ctx = Arc::clone(&ctx);
                    let shutdown = shutdown.clone();
                    tasks.spawn(
                        async move {
                            let _permit = permit;
                            match stream {
                                Stream::Unix(s) => connection(s, client, ctx, shutdown).await,
                                Stream::Tcp(s) => connection(s, client, ctx, shutdown).await,
                            }
                        }
                        .instrument(span),
                    );
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(listener = %ctx.listener, "failed to accept an NBD connection: {e}");
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                }
            },
        }
    }
    drop(listener);
    let drain = async { while tasks.join_next().await.is_some() {} };
    if tokio::time::timeout(ctx.config.shutdown_timeout, drain)
        .await
        .is_err()
    {
        warn!(listener = %ctx.listener, remaining = tasks.len(),
            "NBD connections did not close in {:?}; aborting them", ctx.config.shutdown_timeout);
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
    }
    info!(listener = %ctx.listener, "NBD server stopped");
}

/// One client connection: negotiation (upgraded to TLS by `NBD_OPT_STARTTLS` where
/// the listener has TLS), then transmission.
async fn connection<S>(
    mut stream: S,
    client: ClientInfo,
    ctx: Arc<Ctx>,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timeout = ctx.config.handshake_timeout;
    // One bound for the whole negotiation, TLS handshake included.
    let deadline = tokio::time::Instant::now() + timeout;
    let mut options = 0usize;
    let negotiated = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = tokio::time::timeout_at(deadline, negotiate(&mut stream, &client, &ctx, None, &mut options)) => {
            r.unwrap_or(Err(ConnError::HandshakeTimeout(timeout)))
        }
    };
    let flags = match negotiated {
        Ok(Negotiated::Export(name, open)) => {
            info!(export = %name, listener = %ctx.listener, "NBD client connected");
            transmission(stream, name, open, &ctx, shutdown).await;
            return;
        }
        Ok(Negotiated::Left) => {
            debug!(listener = %ctx.listener, "NBD client ended negotiation");
            return;
        }
        Err(e) => {
            info!(listener = %ctx.listener, "NBD negotiation failed: {e}");
            return;
        }
        Ok(Negotiated::StartTls(flags)) => flags,
    };
    let Some(tls) = ctx.tls.clone() else {
        return;
    };
    let client = ClientInfo::new(format!("{client}+tls"));
    let upgraded = async {
        let mut s = tls
            .acceptor()
            .accept(stream)
            .await
            .map_err(ConnError::Tls)?;
        let n = negotiate(&mut s, &client, &ctx, Some(flags), &mut options).await?;
        Ok::<_, ConnError>((s, n))
    };
    let negotiated = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = tokio::time::timeout_at(deadline, upgraded) => {
            r.unwrap_or(Err(ConnError::HandshakeTimeout(timeout)))
        }
    };
    match negotiated {
        Ok((s, Negotiated::Export(name, open))) => {
            info!(export = %name, listener = %ctx.listener, "NBD client connected over TLS");
            transmission(s, name, open, &ctx, shutdown).await;
        }
        Ok(_) => debug!(listener = %ctx.listener, "NBD client ended negotiation"),
        Err(e) => info!(listener = %ctx.listener, "NBD negotiation failed: {e}"),
    }
}

/// How a negotiation phase ended.
enum Negotiated {
    /// An export was chosen: transmission follows.
    Export(String, OpenExport),
    /// The client left (ABORT, EOF, or a refused EXPORT_NAME).
    Left,
    /// `NBD_OPT_STARTTLS` was acknowledged: the TLS handshake follows, then
    /// negotiation goes on over TLS with these client flags.
    StartTls(proto::ClientFlags),
}

/// The negotiation phase: from the greeting, or (`resumed`: the client flags) over
/// TLS after `NBD_OPT_STARTTLS`. `options` counts the options of both phases.
async fn negotiate<S>(
    stream: &mut S,
    client: &ClientInfo,
    ctx: &Ctx,
    resumed: Option<proto::ClientFlags>,
    options: &mut usize,
) -> Result<Negotiated, ConnError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let tls_active = resumed.is_some();
    let flags = match resumed {
        Some(f) => f,
        None => {
            stream.write_all(&proto::greeting()).await?;
            let mut raw = [0u8; 4];
            stream.read_exact(&mut raw).await?;
            proto::parse_client_flags(raw)?
        }
    };
    let tls_required = ctx.tls.is_some() && !tls_active;
    while *options < MAX_OPTIONS {
        *options += 1;
        let mut hdr = [0u8; proto::OPTION_HEADER_LEN];
        match stream.read_exact(&mut hdr).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Negotiated::Left),
            Err(e) => return Err(e.into()),
        }
        let opt = proto::parse_option_header(&hdr)?;
        let mut out = Vec::new();
        if opt.len > MAX_OPTION_DATA {
            proto::encode_option_error(
                &mut out,
                opt.option,
                proto::REP_ERR_TOO_BIG,
                "option data too large",
            );
            stream.write_all(&out).await?;
            return Err(ConnError::OptionTooLarge(opt.len));
        }
        let mut data = vec![0u8; opt.len as usize];
        stream.read_exact(&mut data).await?;
        if tls_required && opt.option != proto::OPT_STARTTLS && opt.option != proto::OPT_ABORT {
            if opt.option == proto::OPT_EXPORT_NAME {
                // EXPORT_NAME has no error reply: closing is the answer.
                info!(listener = %ctx.listener, "refused NBD export: TLS is required");
                return Ok(Negotiated::Left);
            }
            proto::encode_option_error(
                &mut out,
                opt.option,
                proto::REP_ERR_TLS_REQD,
                "this server requires TLS: negotiate NBD_OPT_STARTTLS first",
            );
            stream.write_all(&out).await?;
            continue;
        }
        match opt.option {
            proto::OPT_STARTTLS if ctx.tls.is_some() => {
                if tls_active {
                    proto::encode_option_error(
                        &mut out,
                        opt.option,
                        proto::REP_ERR_INVALID,
                        "TLS is already active",
                    );
                } else if !data.is_empty() {
                    proto::encode_option_error(
                        &mut out,
                        opt.option,
                        proto::REP_ERR_INVALID,
                        "NBD_OPT_STARTTLS carries no data",
                    );
                } else {
                    proto::encode_option_reply(&mut out, opt.option, proto::REP_ACK, &[]);
                    stream.write_all(&out).await?;
                    stream.flush().await?;
                    return Ok(Negotiated::StartTls(flags));
                }
            }
            proto::OPT_EXPORT_NAME => {
                let requested = proto::parse_name(&data).ok_or(ProtoError::BadOption {
                    option: "NBD_OPT_EXPORT_NAME",
                    reason: "export name is not valid UTF-8 without NUL",
                })?;
                return match ctx.open(&requested, client) {
                    Ok((name, open)) => {
                        let reply = proto::export_name_reply(
                            open.device.size(),
                            proto::EXPORT_FLAGS,
                            flags.no_zeroes,
                        );
                        stream.write_all(&reply).await?;
                        Ok(Negotiated::Export(name, open))
                    }
                    Err(e) => {
                        // EXPORT_NAME has no error reply: closing is the answer.
                        info!(listener = %ctx.listener, "refused NBD export: {e}");
                        Ok(Negotiated::Left)
                    }
                };
            }
            proto::OPT_ABORT => {
                proto::encode_option_reply(&mut out, opt.option, proto::REP_ACK, &[]);
                // The client may already have closed; that is fine.
                let _ = stream.write_all(&out).await;
                return Ok(Negotiated::Left);
            }
            proto::OPT_LIST if !data.is_empty() => proto::encode_option_error(
                &mut out,
                opt.option,
                proto::REP_ERR_INVALID,
                "NBD_OPT_LIST carries no data",
            ),
            proto::OPT_LIST => {
                for name in ctx.list() {
                    proto::encode_list_entry(&mut out, &name);
                }
                proto::encode_option_reply(&mut out, opt.option, proto::REP_ACK, &[]);
            }
            proto::OPT_INFO | proto::OPT_GO => match proto::parse_info_request(&data) {
                Err(e) => proto::encode_option_error(
                    &mut out,
                    opt.option,
                    proto::REP_ERR_INVALID,
                    &e.to_string(),
                ),
                Ok(req) => match ctx.open(&req.name, client) {
                    Err(e) => {
                        info!(listener = %ctx.listener, "refused NBD export: {e}");
                        proto::encode_option_error(
                            &mut out,
                            opt.option,
                            refusal_reply(&e),
                            &e.to_string(),
                        );
                    }
                    Ok((name, open)) => {
                        let size = open.device.size();
                        let export = proto::info_export(size, proto::EXPORT_FLAGS);
                        proto::encode_option_reply(&mut out, opt.option, proto::REP_INFO, &export);
                        // The minimum is the device's logical block size, so clients
                        // that honour it never make the engine read-modify-write.
                        let min = open.device.block_size().max(1);
                        let bs = proto::info_block_size(
                            min,
                            PREFERRED_BLOCK.max(min),
                            ctx.config.max_payload,
                        );
                        proto::encode_option_reply(&mut out, opt.option, proto::REP_INFO, &bs);
                        if req.items.contains(&proto::INFO_NAME) {
                            let n = proto::info_name(&name);
                            proto::encode_option_reply(&mut out, opt.option, proto::REP_INFO, &n);
                        }
                        proto::encode_option_reply(&mut out, opt.option, proto::REP_ACK, &[]);
                        stream.write_all(&out).await?;
                        if opt.option == proto::OPT_GO {
                            return Ok(Negotiated::Export(name, open));
                        }
                        // NBD_OPT_INFO: the export was only probed; `open` drops here.
                        continue;
                    }
                },
            },
            other => {
                let msg = format!("{} ({other}) is not supported", proto::option_name(other));
                proto::encode_option_error(&mut out, other, proto::REP_ERR_UNSUP, &msg);
            }
        }
        stream.write_all(&out).await?;
    }
    Err(ConnError::TooManyOptions)
}

/// The option reply that refuses an open: `NBD_REP_ERR_UNKNOWN` for an absent export
/// (libnbd reports ENOENT), `NBD_REP_ERR_SHUTDOWN` for a busy one (libnbd reports
/// ESHUTDOWN, qemu "server shutting down"), so clients can tell the two apart; the
/// message says EBUSY and names the state.
fn refusal_reply(e: &OpenError) -> u32 {
    match e {
        OpenError::NotFound { .. } => proto::REP_ERR_UNKNOWN,
        OpenError::Busy { .. } => proto::REP_ERR_SHUTDOWN,
    }
}

/// One reply for the writer task.
struct Reply {
    cookie: u64,
    error: u32,
    data: Option<Bytes>,
    /// The request's share of the connection's caps, given back by the writer once the
    /// reply has been written (or when the reply is dropped with the connection).
    /// Declared last so the data is dropped first.
    allowance: Allowance,
}

/// What one request holds of its connection's caps: a request slot and, for a read or
/// a write, its payload bytes.
struct Allowance {
    _request: OwnedSemaphorePermit,
    _bytes: Option<Payload>,
}

/// A request's payload share: of its connection's cap and of the agent's budget.
struct Payload {
    _connection: OwnedSemaphorePermit,
    _agent: OwnedSemaphorePermit,
}

impl Allowance {
    /// A request slot without payload bytes.
    fn slot(request: OwnedSemaphorePermit) -> Self {
        Allowance {
            _request: request,
            _bytes: None,
        }
    }
}

/// Why the reader stopped.
enum ReadEnd {
    /// `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the socket.
    Eof,
}

/// What a request task needs; cloned per request.
#[derive(Clone)]
struct ReqCtx {
    device: Arc<dyn BlockDevice>,
    replies: mpsc::Sender<Reply>,
    /// Keeps the client "connected" for the owner until the last request finishes.
    _guard: Arc<Box<dyn Send + Sync>>,
    export: Arc<str>,
    metrics: crate::metrics::NbdExport,
}

async fn transmission<S>(
    stream: S,
    name: String,
    open: OpenExport,
    ctx: &Ctx,
    shutdown: CancellationToken,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let OpenExport {
        device,
        disconnect,
        guard,
    } = open;
    let cfg = &ctx.config;
    let (rd, wr) = tokio::io::split(stream);
    let (tx, rx) = mpsc::channel(cfg.max_inflight_requests.max(1));
    let mut writer = tokio::spawn(write_replies(wr, rx));
    let req_ctx = ReqCtx {
        device,
        replies: tx,
        _guard: Arc::new(guard),
        export: Arc::from(name.as_str()),
        metrics: crate::metrics::NbdExport::new(crate::metrics::agent(), &name),
    };
    let _connected = req_ctx.metrics.connected();
    let mut rd = BufReader::with_capacity(256 << 10, rd);
    let limits = Limits::new(cfg);
    // `req_ctx` moves into the reader: when the reader ends, only in-flight request
    // tasks still hold the reply sender (and the guard).
    let ended = tokio::select! {
        _ = disconnect.cancelled() => End::Closed("disconnected by the array owner"),
        _ = shutdown.cancelled() => End::Closed("server shutting down"),
        r = &mut writer => End::Writer(r),
        r = read_requests(&mut rd, req_ctx, &limits, cfg) => End::Reader(r),
    };
    match ended {
        End::Closed(why) => {
            writer.abort();
            info!(export = %name, "NBD connection closed: {why}");
        }
        End::Writer(r) => match r {
            Ok(Ok(())) => info!(export = %name, "NBD connection closed"),
            Ok(Err(e)) => info!(export = %name, "NBD connection closed: reply write failed: {e}"),
            Err(e) => warn!(export = %name, "NBD connection closed: reply writer failed: {e}"),
        },
        End::Reader(r) => {
            match r {
                Ok(ReadEnd::Disconnect) => debug!(export = %name, "NBD client sent DISC"),
                Ok(ReadEnd::Eof) => debug!(export = %name, "NBD client closed the socket"),
                Err(e) => warn!(export = %name, "closing NBD connection: {e}"),
            }
            // Let in-flight requests finish and their replies go out, bounded.
            match tokio::time::timeout(cfg.drain_timeout, &mut writer).await {
                Ok(Ok(Err(e))) => debug!(export = %name, "NBD reply write failed: {e}"),
                Ok(_) => {}
                Err(_) => {
                    warn!(export = %name,
                        "NBD requests still in flight after {:?}; closing anyway",
                        cfg.drain_timeout);
                    writer.abort();
                }
            }
            info!(export = %name, "NBD client disconnected");
        }
    }
}

/// How a connection's transmission phase ended.
enum End {
    /// Told to close at once.
    Closed(&'static str),
    /// The reply writer ended first (the client stopped reading or closed).
    Writer(Result<io::Result<()>, tokio::task::JoinError>),
    /// The reader ended (DISC, EOF, protocol violation).
    Reader(Result<ReadEnd, ConnError>),
}

/// Per-connection in-flight caps, and the agent's payload budget.
struct Limits {
    requests: Arc<Semaphore>,
    /// Payload budget in KiB units.
    kib: Arc<Semaphore>,
    kib_total: u32,
    budget: PayloadBudget,
    budget_wait: Duration,
}

impl Limits {
    fn new(cfg: &ServerConfig) -> Self {
        let kib_total = (cfg.max_inflight_bytes / 1024)
            .max(cfg.max_payload.div_ceil(1024) as usize)
            .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize)) as u32;
        Limits {
            requests: Arc::new(Semaphore::new(cfg.max_inflight_requests.max(1))),
            kib: Arc::new(Semaphore::new(kib_total as usize)),
            kib_total,
            budget: cfg.payload_budget.clone(),
            budget_wait: cfg.drain_timeout,
        }
    }

    async fn request(&self) -> OwnedSemaphorePermit {
        Arc::clone(&self.requests)
            .acquire_owned()
            .await
            .expect("the request semaphore is never closed")
    }

    /// The connection's share first (the reader stops reading while it waits), then
    /// the agent's, waiting at most `budget_wait` for it.
    async fn payload(&self, len: u32) -> Result<Payload, ConnError> {
        let kib = len.div_ceil(1024).clamp(1, self.kib_total);
        let connection = Arc::clone(&self.kib)
            .acquire_many_owned(kib)
            .await
            .expect("the payload semaphore is never closed");
        let agent = self
            .budget
            .take(len, self.budget_wait)
            .await
            .ok_or(ConnError::BudgetWait {
                budget: self.budget.total_bytes(),
                waited: self.budget_wait,
            })?;
        Ok(Payload {
            _connection: connection,
            _agent: agent,
        })
    }
}

async fn read_requests<R>(
    rd: &mut R,
    ctx: ReqCtx,
    limits: &Limits,
    cfg: &ServerConfig,
) -> Result<ReadEnd, ConnError>
where
    R: AsyncRead + Unpin,
{
    loop {
        let mut hdr = [0u8; proto::REQUEST_LEN];
        match rd.read_exact(&mut hdr).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(ReadEnd::Eof),
            Err(e) => return Err(e.into()),
        }
        let req = proto::parse_request(&hdr)?;
        let action = proto::classify(&req, ctx.device.size(), cfg.max_payload);
        if let Action::Disconnect = action {
            // Needs no slot: a client that leaves is not held up by its own replies.
            return Ok(ReadEnd::Disconnect);
        }
        let permit = limits.request().await;
        let cookie = req.cookie;
        match action {
            // Answered above; kept so the match stays exhaustive.
            Action::Disconnect => return Ok(ReadEnd::Disconnect),
            Action::Reject { error, drain } => {
                if drain > cfg.max_drain {
                    return Err(ConnError::PayloadTooLarge {
                        len: drain,
                        limit: cfg.max_drain,
                    });
                }
                discard(rd, drain).await?;
                debug!(export = %ctx.export, command = req.command, offset = req.offset,
                    len = req.len, error, "NBD request rejected");
                ctx.metrics
                    .start(crate::metrics::Op::of_command(req.command), req.len)
                    .done(false);
                let reply = Reply {
                    cookie,
                    error,
                    data: None,
                    allowance: Allowance {
                        _request: permit,
                        _bytes: None,
                    },
                };
                // Never waits: every reply holds a request slot, and the channel has
                // room for as many replies as there are slots.
                if ctx.replies.send(reply).await.is_err() {
                    // The writer is gone; the connection is ending.
                    return Ok(ReadEnd::Eof);
                }
            }
            Action::Write { offset, len, fua } => {
                let bytes = limits.payload(len).await?;
                // Straight into an aligned buffer: the engine writes it to every member
                // with O_DIRECT, without another copy.
                let mut buf = iobuf::aligned_buf(len as usize);
                rd.read_exact(buf.as_mut()).await?;
                let data = buf.freeze();
                let allowance = Allowance {
                    _request: permit,
                    _bytes: Some(bytes),
                };
                let timer = ctx.metrics.start(Op::Write, len);
                spawn_request(&ctx, cookie, allowance, timer, move |dev| {
                    Box::pin(async move { dev.write(offset, data, fua).await.map(|()| None) })
                });
            }
            Action::Read { offset, len } => {
                let allowance = Allowance {
                    _request: permit,
                    _bytes: Some(limits.payload(len).await?),
                };
                let timer = ctx.metrics.start(Op::Read, len);
                spawn_request(&ctx, cookie, allowance, timer, move |dev| {
                    Box::pin(async move {
                        let data = dev.read(offset, len).await?;
                        if data.len() != len as usize {
                            return Err(io::Error::other(format!(
                                "device returned {} bytes for a read of {len}",
                                data.len()
                            )));
                        }
                        Ok(Some(data))
                    })
                });
            }
            Action::Flush => spawn_request(
                &ctx,
                cookie,
                Allowance::slot(permit),
                ctx.metrics.start(Op::Flush, 0),
                |dev| Box::pin(async move { dev.flush().await.map(|()| None) }),
            ),
            Action::Trim { offset, len } => {
                let step = cfg.max_payload.max(1);
                let timer = ctx.metrics.start(Op::Trim, len);
                spawn_request(&ctx, cookie, Allowance::slot(permit), timer, move |dev| {
                    Box::pin(async move {
                        for (off, n) in pieces(offset, len, step) {
                            dev.trim(off, n).await?;
                        }
                        Ok(None)
                    })
                })
            }
            Action::WriteZeroes { offset, len, fua } => {
                let step = cfg.max_payload.max(1);
                let timer = ctx.metrics.start(Op::WriteZeroes, len);
                spawn_request(&ctx, cookie, Allowance::slot(permit), timer, move |dev| {
                    Box::pin(async move {
                        for (off, n) in pieces(offset, len, step) {
                            dev.write_zeroes(off, n, fua).await?;
                        }
                        Ok(None)
                    })
                })
            }
        }
    }
}

/// Runs one request in its own task and sends its reply, with the request's allowance,
/// to the writer.
fn spawn_request<F>(ctx: &ReqCtx, cookie: u64, allowance: Allowance, timer: RequestTimer, op: F)
where
    F: FnOnce(
            Arc<dyn BlockDevice>,
        ) -> std::pin::Pin<
            Box<dyn std::future::Future<Output = io::Result<Option<Bytes>>> + Send>,
        > + Send
        + 'static,
{
    let ctx = ctx.clone();
    tokio::spawn(
        async move {
            let result = op(Arc::clone(&ctx.device)).await;
            timer.done(result.is_ok());
            let (error, data) = match result {
                Ok(data) => (0, data),
                Err(e) => {
                    warn!(export = %ctx.export, "NBD request failed: {e}");
                    (proto::errno_of(&e), None)
                }
            };
            let reply = Reply {
                cookie,
                error,
                data,
                allowance,
            };
            // Fails only when the connection is gone: nobody to answer, and the
            // allowance goes back with the dropped reply.
            let _ = ctx.replies.send(reply).await;
        }
        .in_current_span(),
    );
}

/// Splits `[offset, offset+len)` into pieces of at most `step` bytes.
fn pieces(offset: u64, len: u32, step: u32) -> impl Iterator<Item = (u64, u32)> {
    let mut done = 0u32;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let n = (len - done).min(step);
        let piece = (offset + u64::from(done), n);
        done += n;
        Some(piece)
    })
}

/// Reads and discards `len` bytes.
async fn discard<R: AsyncRead + Unpin>(rd: &mut R, len: u32) -> io::Result<()> {
    let copied =
        tokio::io::copy(&mut (&mut *rd).take(u64::from(len)), &mut tokio::io::sink()).await?;
    if copied < u64::from(len) {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Payloads up to this size are copied next to their reply header; larger ones are
/// written from their own buffer (one more iovec, no copy).
const COPY_PAYLOAD_MAX: usize = 16 << 10;
/// Bytes of replies gathered into one batch before it is written.
const BATCH_BYTES: usize = 4 << 20;
/// Most iovecs passed to one `writev`.
const MAX_IOV: usize = 64;

/// Writes replies in completion order. What is ready is gathered into one batch
/// (headers and small payloads copied together, large payloads referenced) and written
/// with vectored writes, so a 1 MiB read reply costs no copy and no separate header
/// write. The batch's allowances are given back once the whole batch is written: a
/// request's cap share covers its reply until it has left the process.
async fn write_replies<W>(mut w: W, mut rx: mpsc::Receiver<Reply>) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    let mut segs: VecDeque<Bytes> = VecDeque::new();
    let mut small = BytesMut::new();
    // At most one entry per request slot: bounded by the count cap.
    let mut held: Vec<Allowance> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut batched = 0;
        let mut next = Some(first);
        while let Some(reply) = next {
            batched += add_reply(&mut segs, &mut small, &mut held, reply);
            next = if batched < BATCH_BYTES {
                rx.try_recv().ok()
            } else {
                None
            };
        }
        if !small.is_empty() {
            segs.push_back(small.split().freeze());
        }
        write_all_vectored(&mut w, &mut segs).await?;
        held.clear();
    }
    w.shutdown().await
}

/// Appends one reply to the batch and its allowance to `held`; returns its size on the
/// wire.
fn add_reply(
    segs: &mut VecDeque<Bytes>,
    small: &mut BytesMut,
    held: &mut Vec<Allowance>,
    reply: Reply,
) -> usize {
    let Reply {
        cookie,
        error,
        data,
        allowance,
    } = reply;
    held.push(allowance);
    small.extend_from_slice(&proto::encode_simple_reply(cookie, error));
    let Some(data) = data.filter(|_| error == 0) else {
        return proto::SIMPLE_REPLY_LEN;
    };
    let len = data.len();
    if len <= COPY_PAYLOAD_MAX {
        small.extend_from_slice(&data);
    } else {
        segs.push_back(small.split().freeze());
        segs.push_back(data);
    }
    proto::SIMPLE_REPLY_LEN + len
}

/// Writes every segment, in order, with as few `writev` calls as the socket allows.
async fn write_all_vectored<W>(w: &mut W, segs: &mut VecDeque<Bytes>) -> io::Result<()>
where
    W: AsyncWrite + Unpin,
{
    segs.retain(|s| !s.is_empty());
    while !segs.is_empty() {
        let mut iov = [io::IoSlice::new(&[]); MAX_IOV];
        let n_iov = segs.len().min(MAX_IOV);
        for (slot, seg) in iov.iter_mut().zip(segs.iter()) {
            *slot = io::IoSlice::new(seg);
        }
        let mut n = w.write_vectored(&iov[..n_iov]).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        while n > 0 {
            let front = segs.front_mut().expect("written bytes come from a segment");
            if n < front.len() {
                bytes::Buf::advance(front, n);
                break;
            }
            n -= front.len();
            segs.pop_front();
        }
    }
    w.flush().await
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use std::time::Instant;

    use tokio::io::DuplexStream;

    use super::*;
    use crate::blockdev::{FileDevice, IoFuture};
    use crate::nbd::exports::{ExportState, MapExports};

    /// A connection task serving `md0` with `cfg`; the test is the client on `c`.
    struct Pipe<C = DuplexStream> {
        c: C,
        /// The connection task.
        task: tokio::task::JoinHandle<()>,
        /// Cancelling it shuts the connection down as a server stop does.
        shutdown: CancellationToken,
        _dir: Option<tempfile::TempDir>,
    }

    impl Pipe {
        /// Over an in-memory pipe, `md0` a 1 MiB file.
        async fn start(cfg: ServerConfig, client_flags: u32) -> Pipe {
            let dir = tempfile::tempdir().unwrap();
            let dev = FileDevice::create(&dir.path().join("md0"), 1 << 20).unwrap();
            let (c, s) = tokio::io::duplex(1 << 20);
            let p = Pipe::serve(c, s, Arc::new(dev), cfg, client_flags).await;
            Pipe {
                _dir: Some(dir),
                ..p
            }
        }
    }

    impl<C: AsyncRead + AsyncWrite + Unpin> Pipe<C> {
        /// Serves `dev` as `md0` on `server`; reads the greeting on `c` and sends the
        /// client flags.
        async fn serve<S>(
            c: C,
            server: S,
            dev: Arc<dyn BlockDevice>,
            cfg: ServerConfig,
            client_flags: u32,
        ) -> Pipe<C>
        where
            S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        {
            let exports = Arc::new(MapExports::new());
            exports.insert("md0", dev, ExportState::Active);
            let ctx = Arc::new(Ctx {
                exports,
                scope: Scope::All,
                tls: cfg.tls.clone(),
                config: cfg,
                listener: "test".into(),
            });
            let client = ClientInfo::new("test");
            let shutdown = CancellationToken::new();
            let task = tokio::spawn(connection(server, client, ctx, shutdown.clone()));
            let mut p = Pipe {
                c,
                task,
                shutdown,
                _dir: None,
            };
            let mut g = [0u8; proto::GREETING_LEN];
            p.c.read_exact(&mut g).await.unwrap();
            assert_eq!(g, proto::greeting());
            p.c.write_all(&client_flags.to_be_bytes()).await.unwrap();
            p
        }

        async fn option(&mut self, option: u32, data: &[u8]) {
            let mut b = proto::IHAVEOPT.to_be_bytes().to_vec();
            b.extend_from_slice(&option.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            self.c.write_all(&b).await.unwrap();
        }

        /// One option reply: (reply type, data).
        async fn reply(&mut self, option: u32) -> (u32, Vec<u8>) {
            let mut h = [0u8; 20];
            self.c.read_exact(&mut h).await.unwrap();
            assert_eq!(&h[0..8], &proto::OPT_REPLY_MAGIC.to_be_bytes());
            assert_eq!(&h[8..12], &option.to_be_bytes());
            let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            let mut d = vec![0u8; len as usize];
            self.c.read_exact(&mut d).await.unwrap();
            (kind, d)
        }

        /// True if the server closes the pipe within 5 s.
        async fn closed(&mut self) -> bool {
            let mut b = [0u8; 64];
            let read = tokio::time::timeout(Duration::from_secs(5), self.c.read(&mut b)).await;
            matches!(read, Ok(Ok(0)) | Ok(Err(_)))
        }

        async fn request(&mut self, command: u16, cookie: u64, offset: u64, len: u32, data: &[u8]) {
            let req = proto::Request {
                flags: 0,
                command,
                cookie,
                offset,
                len,
            };
            self.c
                .write_all(&proto::encode_request(&req))
                .await
                .unwrap();
            self.c.write_all(data).await.unwrap();
        }

        async fn simple_reply(&mut self) -> (u64, u32) {
            let mut h = [0u8; proto::SIMPLE_REPLY_LEN];
            self.c.read_exact(&mut h).await.unwrap();
            assert_eq!(&h[0..4], &proto::SIMPLE_REPLY_MAGIC.to_be_bytes());
            (
                u64::from_be_bytes(h[8..16].try_into().unwrap()),
                u32::from_be_bytes(h[4..8].try_into().unwrap()),
            )
        }
    }

    fn info_data(name: &str, items: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(items.len() as u16).to_be_bytes());
        for i in items {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// A file whose writes must be whole 512-byte sectors.
    struct Sectors(FileDevice);

    impl BlockDevice for Sectors {
        fn size(&self) -> u64 {
            self.0.size()
        }
        fn block_size(&self) -> u32 {
            512
        }
        fn read(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
            self.0.read(offset, len)
        }
        fn write(&self, offset: u64, data: Bytes, fua: bool) -> IoFuture<'_, ()> {
            self.0.write(offset, data, fua)
        }
        fn flush(&self) -> IoFuture<'_, ()> {
            self.0.flush()
        }
        fn trim(&self, offset: u64, len: u32) -> IoFuture<'_, ()> {
            self.0.trim(offset, len)
        }
        fn write_zeroes(&self, offset: u64, len: u32, fua: bool) -> IoFuture<'_, ()> {
            self.0.write_zeroes(offset, len, fua)
        }
    }

    /// Two connections share one payload budget: the second waits for it (not for its
    /// own cap), bounded, and gives its connection share back when it gives up.
    #[tokio::test(start_paused = true)]
    async fn the_payload_budget_is_shared_and_its_wait_bounded() {
        let cfg = ServerConfig {
            payload_budget: PayloadBudget::new(64 << 10),
            drain_timeout: Duration::from_secs(5),
            ..ServerConfig::default()
        };
        let a = Limits::new(&cfg);
        let b = Limits::new(&cfg.clone());
        let held = a.payload(48 << 10).await.expect("within the budget");
        assert_eq!(cfg.payload_budget.available_bytes(), 16 << 10);
        let t = tokio::time::Instant::now();
        let r = b.payload(32 << 10).await;
        assert!(matches!(r, Err(ConnError::BudgetWait { .. })));
        assert!(t.elapsed() >= Duration::from_secs(5));
        assert_eq!(b.kib.available_permits(), b.kib_total as usize);
        drop(held);
        let p = b.payload(32 << 10).await.expect("budget free again");
        assert_eq!(cfg.payload_budget.available_bytes(), 32 << 10);
        drop(p);
        assert_eq!(cfg.payload_budget.available_bytes(), 64 << 10);
    }

    #[tokio::test]
    async fn minimum_block_size_is_the_devices() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Sectors(FileDevice::create(&dir.path().join("md0"), 1 << 20).unwrap());
        let (c, s) = tokio::io::duplex(1 << 20);
        let mut p = Pipe::serve(c, s, Arc::new(dev), ServerConfig::default(), 3).await;
        p.option(proto::OPT_INFO, &info_data("md0", &[])).await;
        let (kind, _export) = p.reply(proto::OPT_INFO).await;
        assert_eq!(kind, proto::REP_INFO);
        let (_, bs) = p.reply(proto::OPT_INFO).await;
        assert_eq!(bs, proto::info_block_size(512, 4096, 32 << 20));
        assert_eq!(p.reply(proto::OPT_INFO).await.0, proto::REP_ACK);
    }

    #[tokio::test]
    async fn negotiation_answers_every_option() {
        let mut p = Pipe::start(ServerConfig::default(), 3).await;
        for opt in [proto::OPT_STRUCTURED_REPLY, proto::OPT_STARTTLS, 99] {
            p.option(opt, &[]).await;
            assert_eq!(p.reply(opt).await.0, proto::REP_ERR_UNSUP);
        }
        p.option(proto::OPT_LIST, b"x").await;
        assert_eq!(p.reply(proto::OPT_LIST).await.0, proto::REP_ERR_INVALID);
        p.option(proto::OPT_LIST, &[]).await;
        let (kind, data) = p.reply(proto::OPT_LIST).await;
        assert_eq!(kind, proto::REP_SERVER);
        assert_eq!(&data[4..], b"md0");
        assert_eq!(p.reply(proto::OPT_LIST).await.0, proto::REP_ACK);
        p.option(proto::OPT_INFO, &[0, 0, 0, 9]).await;
        assert_eq!(p.reply(proto::OPT_INFO).await.0, proto::REP_ERR_INVALID);
        p.option(proto::OPT_INFO, &info_data("md0", &[proto::INFO_NAME]))
            .await;
        let (kind, export) = p.reply(proto::OPT_INFO).await;
        assert_eq!(kind, proto::REP_INFO);
        assert_eq!(export, proto::info_export(1 << 20, proto::EXPORT_FLAGS));
        let (_, bs) = p.reply(proto::OPT_INFO).await;
        assert_eq!(bs, proto::info_block_size(1, 4096, 32 << 20));
        let (_, name) = p.reply(proto::OPT_INFO).await;
        assert_eq!(name, proto::info_name("md0"));
        assert_eq!(p.reply(proto::OPT_INFO).await.0, proto::REP_ACK);
        p.option(proto::OPT_GO, &info_data("nope", &[])).await;
        let (kind, msg) = p.reply(proto::OPT_GO).await;
        assert_eq!(kind, proto::REP_ERR_UNKNOWN);
        assert!(String::from_utf8_lossy(&msg).contains("ENOENT"));
        p.option(proto::OPT_ABORT, &[]).await;
        assert_eq!(p.reply(proto::OPT_ABORT).await.0, proto::REP_ACK);
        assert!(p.closed().await);
    }

    #[tokio::test]
    async fn export_name_serves_with_and_without_zeroes() {
        for (flags, reply_len) in [(1u32, 134usize), (3, 10)] {
            let mut p = Pipe::start(ServerConfig::default(), flags).await;
            p.option(proto::OPT_EXPORT_NAME, b"md0").await;
            let mut r = vec![0u8; reply_len];
            p.c.read_exact(&mut r).await.unwrap();
            assert_eq!(&r[0..8], &(1u64 << 20).to_be_bytes());
            assert_eq!(&r[8..10], &proto::EXPORT_FLAGS.to_be_bytes());
            p.request(proto::CMD_WRITE, 1, 0, 3, b"abc").await;
            assert_eq!(p.simple_reply().await, (1, 0));
            p.request(proto::CMD_READ, 2, 0, 3, &[]).await;
            assert_eq!(p.simple_reply().await, (2, 0));
            let mut d = [0u8; 3];
            p.c.read_exact(&mut d).await.unwrap();
            assert_eq!(&d, b"abc");
        }
        // An unknown export: EXPORT_NAME has no error reply, the server closes.
        let mut p = Pipe::start(ServerConfig::default(), 3).await;
        p.option(proto::OPT_EXPORT_NAME, b"nope").await;
        assert!(p.closed().await);
    }

    #[tokio::test]
    async fn violations_in_negotiation_close_the_connection() {
        // Client flags without FIXED_NEWSTYLE.
        let mut p = Pipe::start(ServerConfig::default(), 0).await;
        assert!(p.closed().await);
        // Bad option magic.
        let mut p = Pipe::start(ServerConfig::default(), 3).await;
        p.c.write_all(&[0u8; 16]).await.unwrap();
        assert!(p.closed().await);
        // Option data over the limit: ERR_TOO_BIG, then closed.
        let mut p = Pipe::start(ServerConfig::default(), 3).await;
        let mut h = proto::IHAVEOPT.to_be_bytes().to_vec();
        h.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        h.extend_from_slice(&(1u32 << 20).to_be_bytes());
        p.c.write_all(&h).await.unwrap();
        assert_eq!(p.reply(proto::OPT_GO).await.0, proto::REP_ERR_TOO_BIG);
        assert!(p.closed().await);
        // A client that says nothing: closed after the handshake timeout.
        let cfg = ServerConfig {
            handshake_timeout: Duration::from_millis(100),
            ..ServerConfig::default()
        };
        let mut p = Pipe::start(cfg, 3).await;
        let t = std::time::Instant::now();
        assert!(p.closed().await);
        assert!(t.elapsed() < Duration::from_secs(2));
    }

    #[tokio::test]
    async fn oversized_writes_are_drained_up_to_the_limit_then_closed() {
        let cfg = ServerConfig {
            max_payload: 4096,
            max_drain: 8192,
            max_inflight_bytes: 4096,
            ..ServerConfig::default()
        };
        let mut p = Pipe::start(cfg, 3).await;
        p.option(proto::OPT_GO, &info_data("md0", &[])).await;
        while p.reply(proto::OPT_GO).await.0 != proto::REP_ACK {}
        p.request(proto::CMD_WRITE, 1, 0, 4097, &[1u8; 4097]).await;
        assert_eq!(p.simple_reply().await, (1, proto::EINVAL));
        // Many writes at the in-flight byte budget all complete.
        for i in 0..20 {
            p.request(proto::CMD_WRITE, 10 + i, i * 4096, 4096, &[2u8; 4096])
                .await;
        }
        let mut cookies: Vec<u64> = Vec::new();
        for _ in 0..20 {
            let (cookie, err) = p.simple_reply().await;
            assert_eq!(err, 0);
            cookies.push(cookie);
        }
        cookies.sort_unstable();
        assert_eq!(cookies, (10..30).collect::<Vec<_>>());
        p.request(proto::CMD_WRITE, 2, 0, 100_000, &[]).await;
        assert!(p.closed().await);
    }

    /// What a [`CountedReads`] device has handed out.
    #[derive(Default)]
    struct Meter {
        /// Reads answered so far.
        served: AtomicUsize,
        /// Bytes of read data still alive (held by the server), and their peak.
        bytes: AtomicUsize,
        peak_bytes: AtomicUsize,
        /// Read buffers still alive, and their peak.
        bufs: AtomicUsize,
        peak_bufs: AtomicUsize,
    }

    /// An in-memory device whose reads return fresh buffers that are counted while they
    /// are alive, so a test sees how much read data the server holds at any time. Byte
    /// `pos` of the device is `pattern(pos)`.
    struct CountedReads {
        size: u64,
        meter: Arc<Meter>,
    }

    /// One read's data; uncounted when dropped.
    struct Counted {
        data: Vec<u8>,
        meter: Arc<Meter>,
    }

    impl AsRef<[u8]> for Counted {
        fn as_ref(&self) -> &[u8] {
            &self.data
        }
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            self.meter.bytes.fetch_sub(self.data.len(), SeqCst);
            self.meter.bufs.fetch_sub(1, SeqCst);
        }
    }

    fn pattern(pos: u64) -> u8 {
        (pos % 251) as u8
    }

    impl BlockDevice for CountedReads {
        fn size(&self) -> u64 {
            self.size
        }

        fn read(&self, offset: u64, len: u32) -> IoFuture<'_, Bytes> {
            let data: Vec<u8> = (offset..offset + u64::from(len)).map(pattern).collect();
            let m = &self.meter;
            let bytes = m.bytes.fetch_add(data.len(), SeqCst) + data.len();
            m.peak_bytes.fetch_max(bytes, SeqCst);
            let bufs = m.bufs.fetch_add(1, SeqCst) + 1;
            m.peak_bufs.fetch_max(bufs, SeqCst);
            m.served.fetch_add(1, SeqCst);
            let meter = Arc::clone(m);
            Box::pin(async move { Ok(Bytes::from_owner(Counted { data, meter })) })
        }

        fn write(&self, _: u64, _: Bytes, _: bool) -> IoFuture<'_, ()> {
            Box::pin(async { Err(io::Error::other("read-only test device")) })
        }

        fn flush(&self) -> IoFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }

        fn trim(&self, _: u64, _: u32) -> IoFuture<'_, ()> {
            Box::pin(async { Ok(()) })
        }

        fn write_zeroes(&self, _: u64, _: u32, _: bool) -> IoFuture<'_, ()> {
            Box::pin(async { Err(io::Error::other("read-only test device")) })
        }
    }

    /// Read size of the slow-reader tests.
    const LEN: u32 = 64 << 10;
    /// Reads the slow-reader tests send: 16 MiB, far more than the caps they set.
    const N: u64 = 256;

    /// A connection over a real unix socket pair to a [`CountedReads`] device of `N`
    /// reads, past negotiation.
    async fn counted_connection(cfg: ServerConfig) -> (Pipe<UnixStream>, Arc<Meter>) {
        let meter = Arc::new(Meter::default());
        let dev = CountedReads {
            size: N * u64::from(LEN),
            meter: Arc::clone(&meter),
        };
        let (c, s) = UnixStream::pair().unwrap();
        let mut p = Pipe::serve(c, s, Arc::new(dev), cfg, 3).await;
        p.option(proto::OPT_GO, &info_data("md0", &[])).await;
        while p.reply(proto::OPT_GO).await.0 != proto::REP_ACK {}
        (p, meter)
    }

    /// Sends the `N` reads at once (7 KiB of requests: the socket takes them all).
    async fn send_all_reads(c: &mut UnixStream) {
        let mut reqs = Vec::new();
        for i in 0..N {
            reqs.extend_from_slice(&proto::encode_request(&proto::Request {
                flags: 0,
                command: proto::CMD_READ,
                cookie: i,
                offset: i * u64::from(LEN),
                len: LEN,
            }));
        }
        c.write_all(&reqs).await.unwrap();
    }

    /// Waits until at least `at_least` reads are served and then no more for 300 ms;
    /// returns how many were served.
    async fn served_when_settled(meter: &Meter, at_least: usize) -> usize {
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut last, mut quiet) = (usize::MAX, 0);
        loop {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let n = meter.served.load(SeqCst);
            quiet = if n >= at_least && n == last {
                quiet + 1
            } else {
                0
            };
            if quiet == 6 {
                return n;
            }
            last = n;
            assert!(Instant::now() < deadline, "served {n} reads, never settled");
        }
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_replies_is_held_to_the_caps() {
        // The byte cap allows 16 reads at once, the count cap 4; a request keeps its
        // share until its reply is on the socket, so read data held by the server never
        // exceeds that, however many requests the client sends.
        let byte_cap = ServerConfig {
            max_inflight_bytes: 1 << 20,
            max_payload: LEN,
            ..ServerConfig::default()
        };
        let count_cap = ServerConfig {
            max_inflight_requests: 4,
            max_payload: LEN,
            ..ServerConfig::default()
        };
        for (cfg, cap) in [(byte_cap, 16), (count_cap, 4)] {
            let (mut p, meter) = counted_connection(cfg).await;
            send_all_reads(&mut p.c).await;
            // The server serves what its caps allow plus what the socket buffer takes,
            // then stops taking requests.
            let served = served_when_settled(&meter, cap).await;
            assert!(
                served < N as usize / 2,
                "cap {cap}: served {served} of {N} reads to a client that reads nothing"
            );
            let check_peaks = |when: &str| {
                let bufs = meter.peak_bufs.load(SeqCst);
                let bytes = meter.peak_bytes.load(SeqCst);
                assert!(
                    bufs <= cap && bytes <= cap * LEN as usize,
                    "cap {cap} ({when}): the server held {bufs} read buffers, {bytes} bytes"
                );
            };
            check_peaks("client not reading");
            // The client reads: every reply arrives, whole and correct.
            let mut seen = vec![false; N as usize];
            let mut data = vec![0u8; LEN as usize];
            for _ in 0..N {
                let (cookie, error) = p.simple_reply().await;
                assert_eq!(error, 0, "reply {cookie}");
                p.c.read_exact(&mut data).await.unwrap();
                let start = cookie * u64::from(LEN);
                assert!(
                    data.iter().zip(start..).all(|(&b, pos)| b == pattern(pos)),
                    "reply {cookie} carries the wrong data"
                );
                assert!(!std::mem::replace(&mut seen[cookie as usize], true));
            }
            assert_eq!(meter.served.load(SeqCst), N as usize);
            check_peaks("client reading");
            p.request(proto::CMD_DISC, 0, 0, 0, &[]).await;
            assert!(p.closed().await);
        }
    }

    #[tokio::test]
    async fn a_stuck_client_that_leaves_or_is_shut_down_releases_everything() {
        for shut_down in [false, true] {
            let cfg = ServerConfig {
                max_inflight_bytes: 1 << 20,
                max_payload: LEN,
                ..ServerConfig::default()
            };
            let (mut p, meter) = counted_connection(cfg).await;
            send_all_reads(&mut p.c).await;
            served_when_settled(&meter, 16).await;
            // Replies are stuck (the socket is full, the caps are taken); the client
            // closes, or the server shuts down while the client stays.
            let Pipe {
                c, task, shutdown, ..
            } = p;
            let _client = if shut_down {
                shutdown.cancel();
                Some(c)
            } else {
                drop(c);
                None
            };
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("the connection ends")
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(5);
            while meter.bufs.load(SeqCst) > 0 {
                assert!(
                    Instant::now() < deadline,
                    "shut down {shut_down}: {} read buffers never freed",
                    meter.bufs.load(SeqCst)
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }

    #[tokio::test]
    async fn connection_cap_refuses_extra_clients_and_stop_removes_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let exports = Arc::new(MapExports::new());
        let dev = FileDevice::create(&dir.path().join("md0"), 1 << 20).unwrap();
        exports.insert("md0", Arc::new(dev), ExportState::Active);
        let path = dir.path().join("md0.nbd");
        let cfg = ServerConfig {
            max_connections: 2,
            ..ServerConfig::default()
        };
        let parent = CancellationToken::new();
        let handle = spawn_unix(&path, Scope::Only("md0".into()), exports, cfg, &parent)
            .await
            .unwrap();
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut c = UnixStream::connect(&path).await.unwrap();
            let mut g = [0u8; proto::GREETING_LEN];
            c.read_exact(&mut g).await.unwrap();
            held.push(c);
        }
        // The third is closed at once, without a greeting.
        let mut c = UnixStream::connect(&path).await.unwrap();
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), c.read(&mut b)).await;
        assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "{n:?}");
        // One leaves: a new client is served again.
        drop(held.pop());
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let mut c = UnixStream::connect(&path).await.unwrap();
            let mut g = [0u8; proto::GREETING_LEN];
            if c.read_exact(&mut g).await.is_ok() {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "slot never freed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        handle.stop().await.unwrap();
        assert!(!path.exists());
        assert_eq!(held[0].read(&mut b).await.unwrap_or(0), 0);
    }

    #[tokio::test]
    async fn replies_are_written_whole_and_in_order_through_partial_writes() {
        // A pipe smaller than one reply: every writev is partial.
        let (mut client, server) = tokio::io::duplex(4096);
        let (tx, rx) = mpsc::channel(64);
        let limits = Limits::new(&ServerConfig::default());
        let writer = tokio::spawn(write_replies(server, rx));
        let sizes = [5usize, 0, 10, 16 << 10, (16 << 10) + 1, 1 << 20, 3, 300_000];
        let mut expected = Vec::new();
        for (i, &n) in sizes.iter().enumerate() {
            let data: Vec<u8> = (0..n).map(|b| (b * 7 + i) as u8).collect();
            // The first reply is an error: its data is not sent.
            let error = if i == 0 { proto::EIO } else { 0 };
            expected.extend_from_slice(&proto::encode_simple_reply(i as u64, error));
            if error == 0 {
                expected.extend_from_slice(&data);
            }
            let reply = Reply {
                cookie: i as u64,
                error,
                data: Some(Bytes::from(data)),
                allowance: Allowance::slot(limits.request().await),
            };
            tx.send(reply).await.unwrap();
        }
        drop(tx);
        let mut got = Vec::new();
        client.read_to_end(&mut got).await.unwrap();
        writer.await.unwrap().unwrap();
        assert_eq!(got.len(), expected.len());
        assert!(got == expected);
        // Every allowance came back with its written reply.
        assert_eq!(
            limits.requests.available_permits(),
            ServerConfig::default().max_inflight_requests
        );
    }

    #[test]
    fn pieces_cover_the_range() {
        assert_eq!(pieces(10, 0, 4).count(), 0);
        assert_eq!(
            pieces(10, 9, 4).collect::<Vec<_>>(),
            vec![(10, 4), (14, 4), (18, 1)]
        );
        assert_eq!(
            pieces(0, u32::MAX, 1 << 31).collect::<Vec<_>>(),
            vec![(0, 1 << 31), (1 << 31, (1 << 31) - 1)]
        );
    }

    #[test]
    fn scope_resolves_names() {
        let only = Scope::Only("md0".into());
        assert_eq!(only.resolve(""), Ok("md0".into()));
        assert_eq!(only.resolve("md0"), Ok("md0".into()));
        assert!(matches!(
            only.resolve("md1"),
            Err(OpenError::NotFound { .. })
        ));
        assert!(matches!(
            Scope::All.resolve(""),
            Err(OpenError::NotFound { .. })
        ));
        assert_eq!(Scope::All.resolve("md1"), Ok("md1".into()));
        assert!(only.admits("md0") && !only.admits("md1") && Scope::All.admits("x"));
    }
}
