//! Cluster-mode `mdagent`: binds the agent service, opens this node's lock-service
//! session with its address (so mdserver can route to it), and serves until shutdown.
//!
//! Two layers: [`Driver`] runs a [`Node`] on a session from a
//! [`SessionOpener`](crate::lockport::SessionOpener) (notifications, rejoin after a lost
//! session, fence watchdog, takeover, engine watcher, mdstat file) and binds nothing;
//! [`run`] adds the gRPC listener, TLS, the health service and the NBD TCP listener
//! around it, with the real lock client ([`ServerOpener`]).
//!
//! ```text
//! bind --listen ──▶ open session (retry with backoff until --connect-timeout;
//!                   a previous session of this node still alive: wait for its TTL)
//!   ──▶ serve AgentService (+ NBD TCP) ──shutdown──▶ stop every array (leave the
//!       cluster for each) ──▶ close the session
//! ```
//!
//! Health: the standard `grpc.health.v1.Health` service is served beside the agent
//! service (Kubernetes `grpc:` probes). It is served from the moment the first session is
//! open, so the overall status (service `""`) answers SERVING while the process serves
//! (liveness); `mdcluster.v1.AgentService` is SERVING while the node holds a live session
//! and NOT_SERVING while the session is suspended, while a lost session is being
//! replaced and its arrays rejoined, and from the start of shutdown (readiness).
//!
//!
//! What runs beside the listener (notifications, the lost-session rejoin, the fence
//! watchdog) is [`super::driver`].

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use mdcluster_proto::v1::agent_service_server::AgentServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::grpc::AgentSvc;
use super::{Node, NodeConfig};
use crate::lockport::{LockClientError, ServerOpener, SessionConfig, SessionOpener};
use crate::nbd::Exports;

pub(super) use super::driver::fence_now;
pub use super::driver::{open_session, Driver, Health, FENCE_EXIT_CODE};
use super::driver::{set_health, Readiness};

/// How cluster mode runs.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    /// The node.
    pub node: NodeConfig,
    /// mdserver replicas.
    pub servers: Vec<String>,
    /// Address the agent service binds (port 0: any).
    pub listen: String,
    /// Address registered for mdserver to call (default: the bound address).
    pub advertise: Option<String>,
    /// Session lease TTL.
    pub session_ttl: Duration,
    /// Self-fencing margin before the lease deadline.
    pub fence_margin: Duration,
    /// How long past the lease deadline a suspended session keeps trying to resume
    /// before it counts as lost ([`SessionConfig::suspend_max`]).
    pub suspend_max: Duration,
    /// How long to keep trying to open the session at start.
    pub connect_timeout: Duration,
    /// gRPC transport: mutual TLS (the agent service, the session to mdserver) or plain
    /// text.
    pub transport: mdcluster_proto::tls::Transport,
    /// Where to serve only the gRPC health service in plain text (for probes that
    /// cannot do mutual TLS, e.g. the kubelet's); None: nowhere.
    pub health_listen: Option<String>,
    /// Where to serve `/metrics` (Prometheus); None: nowhere.
    pub metrics_listen: Option<String>,
}

/// Errors that stop the agent.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// Binding the listener failed.
    #[error("bind the agent service on {addr}: {source}")]
    Bind {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Binding the metrics endpoint failed.
    #[error(transparent)]
    Metrics(#[from] mdcluster_proto::metrics_http::BindError),
    /// No session could be opened in time.
    #[error(
        "open a session with mdserver ({servers}) for node {node} within {timeout:?}: {source}"
    )]
    Session {
        /// The servers.
        servers: String,
        /// The node.
        node: String,
        /// The bound.
        timeout: Duration,
        /// The last error.
        source: LockClientError,
    },
    /// The gRPC server failed.
    #[error("agent gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// Binding the NBD TCP listener failed.
    #[error("bind the NBD TCP listener on {addr}: {source}")]
    Nbd {
        /// The address.
        addr: String,
        /// The cause.
        source: std::io::Error,
    },
}

/// Who may call the agent's gRPC methods: the agent service only mdserver
/// (`O=mdcluster:server`; every change is audited), health every authenticated caller;
/// without TLS everyone.
pub fn agent_policy(
    method: &str,
    caller: &mdcluster_proto::tls::Caller,
) -> Result<mdcluster_proto::tls::Access, String> {
    use mdcluster_proto::tls::{Access, Caller};
    if matches!(caller, Caller::Insecure) || method.starts_with("/grpc.health.v1.Health/") {
        return Ok(Access::Read);
    }
    if let Some(m) = method.strip_prefix("/mdcluster.v1.AgentService/") {
        return match caller {
            Caller::Server(_) if ["Get", "List", "Mdstat", "Watch"].contains(&m) => {
                Ok(Access::Read)
            }
            Caller::Server(_) => Ok(Access::Admin),
            _ => Err("the agent service accepts only mdserver's certificate \
                      (O=mdcluster:server); operators go through mdserver"
                .into()),
        };
    }
    Err("no such method on mdagent".into())
}

/// Runs a cluster-mode agent until `shutdown` completes. Prints one line
/// `mdagent ready: node NAME listening on ADDR` on stdout when serving.
pub async fn run(
    cfg: RuntimeConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), RuntimeError> {
    std::fs::create_dir_all(&cfg.node.run_dir).map_err(|source| RuntimeError::Bind {
        addr: cfg.node.run_dir.display().to_string(),
        source,
    })?;
    let listener = TcpListener::bind(&cfg.listen)
        .await
        .map_err(|source| RuntimeError::Bind {
            addr: cfg.listen.clone(),
            source,
        })?;
    let bound = listener.local_addr().map_err(|source| RuntimeError::Bind {
        addr: cfg.listen.clone(),
        source,
    })?;
    let advertise = cfg.advertise.clone().unwrap_or_else(|| bound.to_string());
    let mut node_cfg = cfg.node.clone();
    let nbd_tcp = match &node_cfg.nbd_tcp {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| RuntimeError::Nbd {
                    addr: addr.clone(),
                    source,
                })?;
            node_cfg.nbd_tcp = l.local_addr().ok().map(|a| a.to_string());
            Some(l)
        }
        None => None,
    };
    let metrics = match &cfg.metrics_listen {
        Some(addr) => Some(mdcluster_proto::metrics_http::bind(addr).await?),
        None => None,
    };
    let node = Node::new(node_cfg);
    let mut scfg = SessionConfig::new(cfg.servers.clone(), node.name(), advertise.clone());
    scfg.ttl = cfg.session_ttl;
    scfg.fence_margin = cfg.fence_margin;
    scfg.transport = cfg.transport.clone();
    scfg.suspend_max = cfg.suspend_max;
    scfg.observer = Some(mdcluster_proto::lock_client::HeartbeatObserver(Arc::new(
        |ok, took| crate::metrics::agent().heartbeat(ok, took),
    )));
    let opener: Arc<dyn SessionOpener> = Arc::new(ServerOpener(scfg));
    let opened = open_session(opener.as_ref(), cfg.connect_timeout)
        .await
        .map_err(|source| RuntimeError::Session {
            servers: cfg.servers.join(","),
            node: node.name().to_owned(),
            timeout: cfg.connect_timeout,
            source,
        })?;
    tracing::info!(node = node.name(), addr = %advertise, session = format_args!("{:x}", opened.0.id()), "session open");

    let (reporter, health_svc) = tonic_health::server::health_reporter();
    let health_svc_plain = health_svc.clone();
    set_health(&reporter, true).await;
    let health = Health::new(Some(reporter));
    let driver = Driver::start(
        node.clone(),
        opener,
        opened,
        cfg.fence_margin,
        health.clone(),
    );
    let stop = driver.stop_token();
    let metrics = metrics.map(|l| {
        let registry = crate::metrics::registry(node.clone(), Some(node.clone()));
        let stop = stop.clone();
        tokio::spawn(crate::metrics::serve(l, registry, async move {
            stop.cancelled().await
        }))
    });
    let tcp = nbd_tcp.map(|l| {
        let exports: Arc<dyn Exports> = node.clone();
        tokio::spawn(crate::nbd::serve_tcp(
            l,
            exports,
            cfg.node.nbd.clone(),
            stop.clone(),
        ))
    });

    let streams_end = CancellationToken::new();
    let shutdown = {
        let streams_end = streams_end.clone();
        let health = health.clone();
        async move {
            shutdown.await;
            health.set(Readiness::Stopping, true).await;
            // Graceful shutdown waits for open calls: end the event streams first.
            streams_end.cancel();
        }
    };
    let router = tonic::transport::Server::builder()
        .layer(mdcluster_proto::tls::AuthLayer::new(
            "mdagent",
            cfg.transport.is_tls(),
            agent_policy,
        ))
        .add_service(health_svc)
        .add_service(AgentServiceServer::new(AgentSvc {
            node: node.clone(),
            streams_end,
        }));
    let (plain_health, health_stop) = match &cfg.health_listen {
        Some(addr) => {
            let l = TcpListener::bind(addr)
                .await
                .map_err(|source| RuntimeError::Bind {
                    addr: addr.clone(),
                    source,
                })?;
            let stop_health = CancellationToken::new();
            let done = stop_health.clone();
            let h = tokio::spawn(mdcluster_proto::tls::serve_plain_health(
                l,
                health_svc_plain,
                async move { done.cancelled().await },
            ));
            (Some(h), stop_health)
        }
        None => (None, CancellationToken::new()),
    };
    // Ready once every listener is bound (a probe right after this line connects).
    println!(
        "mdagent ready: node {} listening on {advertise}",
        node.name()
    );
    let served = match &cfg.transport {
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
            let incoming =
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
            router
                .serve_with_incoming_shutdown(incoming, shutdown)
                .await
        }
    };
    health_stop.cancel();
    if let Some(h) = plain_health {
        let _ = h.await;
    }
    tracing::info!(node = node.name(), "shutting down: stopping every array");
    driver.shutdown().await;
    if let Some(m) = metrics {
        let _ = m.await;
    }
    if let Some(t) = tcp {
        let _ = t.await;
    }
    Ok(served?)
}
