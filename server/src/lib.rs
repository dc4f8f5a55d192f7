//! `mdserver`: the etcd-backed lock service of mdcluster (DLM semantics), stateless so
//! that any number of replicas run side by side. The protocol is specified in
//! `docs/LOCKS.md`.
//!
//! # Layout
//! - [`keys`]: the etcd key layout (one place).
//! - [`records`]: the JSON records stored as etcd values.
//! - [`etcd`]: etcd calls, each bounded by a timeout.
//! - [`session`]: session streams, lease renewal, resume, the inbox.
//! - [`lock`]: acquire, release, convert, value block, fencing.
//! - [`message`]: subscribe, publish, ack.
//! - [`registry`]: the live nodes.
//! - [`notify`]: delivery of notifications to a session's stream.
//! - [`cluster`]: the cluster service mdctl calls (nodes, array records, routing to
//!   agents, merged detail and events).
//! - [`authz`]: who may call what (from the caller's certificate).
//! - [`service`]: the tonic service; [`validate`]: request checks; [`error`]: errors.

pub mod authz;
pub mod cluster;
pub mod error;
pub mod etcd;
pub mod keys;
pub mod lock;
pub mod message;
pub mod metrics;
pub mod notify;
pub mod records;
pub mod registry;
pub mod service;
pub mod session;
pub mod validate;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mdcluster_proto::v1::lock_service_server::LockServiceServer;
use tokio::net::TcpListener;

use crate::error::LockError;
use crate::records::{decode, SessionRecord};

/// Most session → node mappings cached per replica.
const NODE_CACHE: usize = 65536;

/// TLS to etcd: PEM files, like etcdctl's `--cacert`, `--cert` and `--key`.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    /// The CA that signed the etcd members' server certificates (the only one trusted).
    pub ca: PathBuf,
    /// mdserver's client certificate and its private key, for an etcd that checks
    /// clients (`--client-cert-auth`).
    pub identity: Option<(PathBuf, PathBuf)>,
}

/// etcd authentication (`etcdctl auth enable`): a user and its password.
#[derive(Clone)]
pub struct EtcdAuth {
    /// The etcd user.
    pub user: String,
    /// Its password (never printed).
    pub password: String,
}

impl std::fmt::Debug for EtcdAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdAuth")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// How mdserver runs.
#[derive(Debug, Clone)]
pub struct Config {
    /// etcd endpoints.
    pub etcd: Vec<String>,
    /// TLS to etcd (endpoints must then be `https://`); None: plain HTTP/2.
    pub etcd_tls: Option<EtcdTls>,
    /// etcd authentication; None: etcd has auth disabled.
    pub etcd_auth: Option<EtcdAuth>,
    /// Every key lives under `/mdcluster/<cluster_name>/`.
    pub cluster_name: String,
    /// Lease TTL of a session that does not ask for one.
    pub session_ttl: Duration,
    /// Bound on each single etcd call.
    pub etcd_timeout: Duration,
    /// How long to keep trying to reach etcd at start.
    pub etcd_connect_timeout: Duration,
    /// Most session streams this replica serves at once.
    pub max_sessions: usize,
    /// Most calls waiting at once on this replica (queued acquires and converts,
    /// publishes waiting for acks).
    pub max_waits: usize,
    /// gRPC transport: mutual TLS (served to agents and mdctl, and used to call agents)
    /// or plain text.
    pub transport: mdcluster_proto::tls::Transport,
    /// Where to serve only the gRPC health service in plain text (for probes that
    /// cannot do mutual TLS, e.g. the kubelet's); None: nowhere.
    pub health_listen: Option<String>,
    /// Where to serve `/metrics` (Prometheus, plain HTTP); None: nowhere.
    pub metrics_listen: Option<String>,
}

impl Config {
    /// A config for `etcd` and `cluster_name` with the defaults: session TTL 10 s, etcd
    /// calls 5 s, connecting at start 30 s, 10000 sessions, 10000 waits, plain-text gRPC.
    pub fn new(etcd: Vec<String>, cluster_name: impl Into<String>) -> Config {
        Config {
            etcd,
            etcd_tls: None,
            etcd_auth: None,
            cluster_name: cluster_name.into(),
            session_ttl: Duration::from_secs(10),
            etcd_timeout: Duration::from_secs(5),
            etcd_connect_timeout: Duration::from_secs(30),
            max_sessions: 10_000,
            max_waits: 10_000,
            transport: mdcluster_proto::tls::Transport::Insecure,
            health_listen: None,
            metrics_listen: None,
        }
    }
}

/// Errors that stop the server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// etcd could not be reached at start.
    #[error(
        "failed to connect to etcd at {endpoints} within {timeout:?}: {detail}; check that \
         etcd is reachable from mdserver{hint}"
    )]
    Connect {
        /// The endpoints tried.
        endpoints: String,
        /// The bound.
        timeout: Duration,
        /// The last error with its causes (etcd-client's errors do not chain them).
        detail: String,
        /// What else to check (TLS, authentication), when configured.
        hint: &'static str,
        /// The last error (already in `detail`, so not a `source`).
        last: etcd_client::Error,
    },
    /// The plain-text health port could not be bound.
    #[error("bind the health listener on {addr}: {source}")]
    HealthBind {
        /// The address.
        addr: String,
        /// Why.
        source: std::io::Error,
    },
    /// The etcd connection settings are unusable (endpoint scheme, TLS files).
    #[error("etcd connection to {endpoints}: {reason}")]
    EtcdConfig {
        /// The endpoints.
        endpoints: String,
        /// What is wrong and what to do.
        reason: String,
    },
    /// A TLS file could not be read.
    #[error("read the etcd {what} {}: {source}", path.display())]
    TlsFile {
        /// Which file (`CA certificate (--etcd-cacert)`, ...).
        what: &'static str,
        /// Its path.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The metrics endpoint could not be bound.
    #[error(transparent)]
    MetricsBind(#[from] mdcluster_proto::metrics_http::BindError),
    /// The gRPC server failed.
    #[error("gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// State shared by every handler of one replica.
#[derive(Debug)]
pub struct Ctx {
    /// etcd, every call bounded.
    pub etcd: etcd::Etcd,
    /// The key layout.
    pub keys: keys::Keys,
    /// Default session TTL.
    pub session_ttl: Duration,
    /// Session streams served here.
    pub notifier: notify::Notifier,
    /// Session id → node name (a session's node never changes; liveness is checked by
    /// etcd itself on every write tied to the lease).
    nodes: Mutex<HashMap<i64, String>>,
    /// Publishes waiting for acks on this replica: message id → (recipients, ack
    /// channel). An ack handled by the same replica skips etcd (see [`message`]).
    pub pending: Mutex<HashMap<String, message::Pending>>,
    /// Deletes finished messages in batches.
    pub sweeper: message::Sweeper,
    /// Becomes true when the replica shuts down: session streams end at once so their
    /// agents resume on another replica, while unary calls finish.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// Bounds the session streams served here.
    pub sessions_limit: Limit,
    /// Bounds the calls waiting here.
    pub waits_limit: Limit,
}

/// A bound on something a replica holds many of; a permit is held while it lasts.
#[derive(Debug)]
pub struct Limit {
    /// What is counted, for the error ("session streams").
    what: &'static str,
    /// The bound.
    max: usize,
    /// The permits.
    sem: Arc<tokio::sync::Semaphore>,
}

impl Limit {
    /// A bound of `max` on `what`.
    pub fn new(what: &'static str, max: usize) -> Limit {
        Limit {
            what,
            max,
            sem: Arc::new(tokio::sync::Semaphore::new(max)),
        }
    }

    /// Takes a permit, or fails with EBUSY at once when the replica is at its bound.
    pub fn take(&self) -> Result<tokio::sync::OwnedSemaphorePermit, LockError> {
        self.sem
            .clone()
            .try_acquire_owned()
            .map_err(|_| LockError::Overloaded {
                what: self.what,
                limit: self.max,
            })
    }

    /// Permits held now.
    pub fn in_use(&self) -> usize {
        self.max.saturating_sub(self.sem.available_permits())
    }
}

impl Ctx {
    /// The node of session `id`, from the cache or from etcd.
    pub async fn session_node(&self, id: i64) -> Result<String, LockError> {
        if let Some(n) = self.nodes.lock().ok().and_then(|m| m.get(&id).cloned()) {
            return Ok(n);
        }
        let r = self
            .etcd
            .get("read session", self.keys.session(id), None)
            .await?;
        let Some(kv) = r.kvs().first() else {
            return Err(LockError::SessionGone { session_id: id });
        };
        let rec: SessionRecord = decode(kv.key(), kv.value())?;
        self.remember(id, &rec.node);
        Ok(rec.node)
    }

    /// Caches the node of session `id`.
    pub fn remember(&self, id: i64, node: &str) {
        if let Ok(mut m) = self.nodes.lock() {
            if m.len() >= NODE_CACHE {
                m.clear();
            }
            m.insert(id, node.to_string());
        }
    }

    /// Drops session `id` from the cache.
    pub fn forget(&self, id: i64) {
        if let Ok(mut m) = self.nodes.lock() {
            m.remove(&id);
        }
    }
}

/// An etcd-client error with every cause below it: its `Display` stops at "transport
/// error", which hides what a TLS handshake or a connection refused really said.
pub fn describe_etcd_error(e: &etcd_client::Error) -> String {
    use std::error::Error as _;
    let (mut out, mut next): (String, Option<&dyn std::error::Error>) = match e {
        etcd_client::Error::TransportError(t) => (e.to_string(), t.source()),
        // Status's Display prints its source's Debug form: the code, the message and the
        // causes read better.
        etcd_client::Error::GRpcStatus(s) => {
            (format!("gRPC {:?}: {}", s.code(), s.message()), s.source())
        }
        etcd_client::Error::IoError(io) => (e.to_string(), io.source()),
        _ => (e.to_string(), None),
    };
    while let Some(cause) = next {
        let c = cause.to_string();
        // Wrappers repeat their cause's text or say only "transport error".
        if !out.contains(&c) && c != "transport error" {
            out.push_str(": ");
            out.push_str(&c);
        }
        next = cause.source();
    }
    out
}

/// The etcd client's options from `config`: timeouts, TLS (files read here), user.
/// Endpoint schemes must match: `https://` with TLS, `http://` without.
fn connect_options(config: &Config) -> Result<etcd_client::ConnectOptions, ServerError> {
    let endpoints = config.etcd.join(",");
    let mut opts = etcd_client::ConnectOptions::new()
        .with_connect_timeout(config.etcd_timeout)
        .with_keep_alive(Duration::from_secs(5), config.etcd_timeout);
    for e in &config.etcd {
        let reason = match (&config.etcd_tls, e.starts_with("https://")) {
            (Some(_), false) => format!(
                "endpoint {e} is not https:// but TLS is configured (--etcd-cacert): write \
                 the endpoints as https://HOST:PORT"
            ),
            (None, true) => format!(
                "endpoint {e} is https:// but no CA is given: set --etcd-cacert \
                 (MDSERVER_ETCD_CACERT) to the CA that signed etcd's certificates"
            ),
            _ => continue,
        };
        return Err(ServerError::EtcdConfig { endpoints, reason });
    }
    if let Some(tls) = &config.etcd_tls {
        // The TLS stack skips what is not PEM without a word (an empty CA then rejects
        // every certificate): check the files here.
        let read = |what: &'static str, path: &PathBuf, label: &str| {
            let pem = std::fs::read(path).map_err(|source| ServerError::TlsFile {
                what,
                path: path.clone(),
                source,
            })?;
            let text = String::from_utf8_lossy(&pem);
            let has_block = text.lines().any(|l| {
                l.trim()
                    .strip_prefix("-----BEGIN ")
                    .is_some_and(|rest| rest.ends_with(&format!("{label}-----")))
            });
            if !has_block {
                return Err(ServerError::EtcdConfig {
                    endpoints: endpoints.clone(),
                    reason: format!(
                        "the {what} {} holds no PEM \"{label}\" block",
                        path.display()
                    ),
                });
            }
            Ok(pem)
        };
        let mut t =
            etcd_client::TlsOptions::new().ca_certificate(etcd_client::Certificate::from_pem(
                read("CA certificate (--etcd-cacert)", &tls.ca, "CERTIFICATE")?,
            ));
        if let Some((cert, key)) = &tls.identity {
            t = t.identity(etcd_client::Identity::from_pem(
                read("client certificate (--etcd-cert)", cert, "CERTIFICATE")?,
                read("client key (--etcd-key)", key, "PRIVATE KEY")?,
            ));
        }
        opts = opts.with_tls(t);
    }
    if let Some(auth) = &config.etcd_auth {
        opts = opts.with_user(auth.user.clone(), auth.password.clone());
    }
    Ok(opts)
}

/// Connects to etcd, retrying with bounded backoff until `config.etcd_connect_timeout`.
/// Settings that cannot work (a scheme that does not match the TLS settings, unreadable
/// or unparsable TLS files) fail at once.
pub async fn connect(config: &Config) -> Result<Ctx, ServerError> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(100);
    let opts = connect_options(config)?;
    let endpoints = config.etcd.join(",");
    loop {
        let attempt = async {
            // Building the client parses the TLS settings and, with a user, authenticates
            // (a gRPC call); any other error of this step is a configuration error.
            let mut c = etcd_client::Client::connect(&config.etcd, Some(opts.clone()))
                .await
                .map_err(|e| match e {
                    etcd_client::Error::GRpcStatus(_) => Ok(e),
                    e => Err(e),
                })?;
            c.status().await.map_err(Ok)?;
            Ok::<_, Result<etcd_client::Error, etcd_client::Error>>(c)
        };
        let err = match tokio::time::timeout(config.etcd_timeout, attempt).await {
            Ok(Err(Err(e))) => {
                return Err(ServerError::EtcdConfig {
                    endpoints,
                    reason: format!(
                        "{}; check --etcd-cacert, --etcd-cert and --etcd-key (PEM files)",
                        describe_etcd_error(&e)
                    ),
                })
            }
            Ok(Ok(client)) => {
                let etcd = etcd::Etcd::new(client, config.etcd_timeout);
                return Ok(Ctx {
                    sweeper: message::Sweeper::start(etcd.clone()),
                    stopping: tokio::sync::watch::Sender::new(false),
                    sessions_limit: Limit::new("session streams", config.max_sessions),
                    waits_limit: Limit::new("waiting calls", config.max_waits),
                    etcd,
                    keys: keys::Keys::new(&config.cluster_name),
                    session_ttl: config.session_ttl,
                    notifier: notify::Notifier::default(),
                    nodes: Mutex::new(HashMap::new()),
                    pending: Mutex::new(HashMap::new()),
                });
            }
            Ok(Err(Ok(e))) => e,
            Err(_) => etcd_client::Error::InvalidArgs(format!(
                "no answer within {:?}",
                config.etcd_timeout
            )),
        };
        if started.elapsed() >= config.etcd_connect_timeout {
            let hint = match (&config.etcd_tls, &config.etcd_auth) {
                (Some(_), Some(_)) => {
                    ", that --etcd-cacert is the CA that signed etcd's certificates (issued \
                     for the endpoints' host names), that etcd accepts the client \
                     certificate, and the user and password (--etcd-user)"
                }
                (Some(_), None) => {
                    ", that --etcd-cacert is the CA that signed etcd's certificates (issued \
                     for the endpoints' host names) and that etcd accepts the client \
                     certificate"
                }
                (None, Some(_)) => " and the user and password (--etcd-user)",
                (None, None) => "",
            };
            return Err(ServerError::Connect {
                endpoints,
                timeout: config.etcd_connect_timeout,
                detail: describe_etcd_error(&err),
                hint,
                last: err,
            });
        }
        tracing::warn!(
            "etcd at {endpoints} not reachable yet, retrying in {backoff:?}: {}",
            describe_etcd_error(&err)
        );
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// Serves the lock service and the gRPC health service on `listener` until `shutdown`
/// completes. Health reports NOT_SERVING while etcd does not answer.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServerError> {
    let health_listener = match &config.health_listen {
        Some(addr) => {
            Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServerError::HealthBind {
                        addr: addr.clone(),
                        source,
                    })?,
            )
        }
        None => None,
    };
    let metrics_listener = match &config.metrics_listen {
        Some(addr) => Some(mdcluster_proto::metrics_http::bind(addr).await?),
        None => None,
    };
    let ctx = Arc::new(connect(&config).await?);
    let metrics = metrics_listener.map(|l| {
        let render = mdcluster_proto::metrics_http::registry_render(metrics::registry(ctx.clone()));
        (
            metrics::spawn_lock_snapshot(ctx.clone()),
            tokio::spawn(mdcluster_proto::metrics_http::serve(
                l,
                render,
                mdcluster_proto::metrics_http::Limits::default(),
                std::future::pending(),
            )),
        )
    });
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_serving::<LockServiceServer<service::LockSvc>>()
        .await;
    let probe_ctx = ctx.clone();
    let probe = tokio::spawn(async move {
        let mut serving = true;
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            let ok = probe_ctx
                .etcd
                .get("health probe", probe_ctx.keys.nodes_prefix(), None)
                .await
                .is_ok();
            if ok != serving {
                serving = ok;
                if ok {
                    reporter
                        .set_serving::<LockServiceServer<service::LockSvc>>()
                        .await;
                } else {
                    reporter
                        .set_not_serving::<LockServiceServer<service::LockSvc>>()
                        .await;
                }
                tracing::info!(
                    serving,
                    "health => {}",
                    if ok { "SERVING" } else { "NOT_SERVING" }
                );
            }
        }
    });
    let stopping = ctx.stopping.clone();
    let plain_health = health_listener.map(|l| {
        let mut stopped = stopping.subscribe();
        tokio::spawn(mdcluster_proto::tls::serve_plain_health(
            l,
            health.clone(),
            async move {
                let _ = stopped.wait_for(|s| *s).await;
            },
        ))
    });
    let shutdown = async move {
        shutdown.await;
        stopping.send_replace(true);
    };
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, cluster = %config.cluster_name, "mdserver serving");
    let transport = config.transport.clone();
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(5)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .layer(metrics::GrpcMetricsLayer)
        .layer(mdcluster_proto::tls::AuthLayer::new(
            "mdserver",
            transport.is_tls(),
            authz::policy,
        ))
        .add_service(health)
        .add_service(
            mdcluster_proto::v1::cluster_service_server::ClusterServiceServer::new(
                cluster::ClusterSvc::new(ctx.clone(), transport.clone()),
            ),
        )
        .add_service(LockServiceServer::new(service::LockSvc { ctx }));
    let r = match &transport {
        mdcluster_proto::tls::Transport::Tls(tls) => {
            tls.reload_on_sighup();
            router
                .serve_with_incoming_shutdown(
                    mdcluster_proto::tls::incoming(listener, tls.clone()),
                    shutdown,
                )
                .await
        }
        mdcluster_proto::tls::Transport::Insecure => {
            // No Nagle: notifications and acks are small writes that must leave at once.
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    };
    probe.abort();
    if let Some(h) = plain_health {
        h.abort();
    }
    if let Some((snapshot, endpoint)) = metrics {
        snapshot.abort();
        endpoint.abort();
    }
    Ok(r?)
}
