//! `mdserver`: the only component of mdcluster that talks to etcd.
//!
//! It hosts the lock service (sessions, locks, notifications, messages, node registry).
//! It keeps no state of its own: every fact lives in etcd, so any number of replicas run
//! side by side. This file only parses arguments and calls [`mdcluster_server::serve`].

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;

/// The mdcluster lock service (the only component that talks to etcd).
#[derive(Debug, Parser)]
#[command(name = "mdserver", version, about, long_about = None)]
struct Args {
    /// Address to serve gRPC on (port 0: pick a free one; the address is logged).
    #[arg(long, env = "MDSERVER_LISTEN", default_value = "127.0.0.1:7480")]
    listen: String,
    /// etcd endpoints, comma-separated (e.g. http://127.0.0.1:2379).
    #[arg(
        long,
        env = "MDSERVER_ETCD",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    etcd: Vec<String>,
    /// PEM file of the CA that signed the etcd members' certificates: connect to etcd
    /// over TLS, trusting this CA only (the endpoints must be https://).
    #[arg(long, env = "MDSERVER_ETCD_CACERT", value_name = "FILE")]
    etcd_cacert: Option<PathBuf>,
    /// PEM file of mdserver's client certificate, for an etcd that checks clients
    /// (--client-cert-auth). Needs --etcd-key and --etcd-cacert.
    #[arg(
        long,
        env = "MDSERVER_ETCD_CERT",
        value_name = "FILE",
        requires_all = ["etcd_key", "etcd_cacert"]
    )]
    etcd_cert: Option<PathBuf>,
    /// PEM file of the private key of --etcd-cert.
    #[arg(
        long,
        env = "MDSERVER_ETCD_KEY",
        value_name = "FILE",
        requires = "etcd_cert"
    )]
    etcd_key: Option<PathBuf>,
    /// etcd user, for an etcd with authentication enabled; its password comes from
    /// --etcd-password-file or --etcd-password.
    #[arg(long, env = "MDSERVER_ETCD_USER")]
    etcd_user: Option<String>,
    /// File holding the etcd user's password (one trailing newline is ignored), e.g. a
    /// mounted Kubernetes Secret.
    #[arg(
        long,
        env = "MDSERVER_ETCD_PASSWORD_FILE",
        value_name = "FILE",
        requires = "etcd_user",
        conflicts_with = "etcd_password"
    )]
    etcd_password_file: Option<PathBuf>,
    /// The etcd user's password. Prefer --etcd-password-file or the environment
    /// variable: a command line is visible to every user of the machine.
    #[arg(
        long,
        env = "MDSERVER_ETCD_PASSWORD",
        hide_env_values = true,
        requires = "etcd_user"
    )]
    etcd_password: Option<String>,
    /// Name of this cluster; every etcd key lives under /mdcluster/<cluster-name>/.
    #[arg(long, env = "MDSERVER_CLUSTER_NAME", default_value = "mdcluster")]
    cluster_name: String,
    /// Lease TTL of a session that does not ask for one.
    #[arg(long, env = "MDSERVER_SESSION_TTL", default_value = "10s")]
    session_ttl: humantime::Duration,
    /// Bound on each single etcd call.
    #[arg(long, env = "MDSERVER_ETCD_TIMEOUT", default_value = "5s")]
    etcd_timeout: humantime::Duration,
    /// How long to keep trying to reach etcd at start.
    #[arg(long, env = "MDSERVER_ETCD_CONNECT_TIMEOUT", default_value = "30s")]
    etcd_connect_timeout: humantime::Duration,
    /// Most session streams this replica serves at once (beyond: EBUSY, use another).
    #[arg(long, env = "MDSERVER_MAX_SESSIONS", default_value_t = 10_000)]
    max_sessions: usize,
    /// Most calls waiting at once on this replica (queued locks, publishes).
    #[arg(long, env = "MDSERVER_MAX_WAITS", default_value_t = 10_000)]
    max_waits: usize,
    /// PEM file of the cluster CA: agents and operators must present certificates it
    /// signed (mutual TLS on the gRPC port); mdserver trusts only it when calling agents.
    #[arg(long, env = "MDSERVER_TLS_CA", value_name = "FILE", requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// PEM file of mdserver's certificate (O=mdcluster:server; SAN: the names and
    /// addresses clients dial). Served to clients and presented to agents. Reloaded when
    /// the file changes or on SIGHUP.
    #[arg(long, env = "MDSERVER_TLS_CERT", value_name = "FILE", requires_all = ["tls_ca", "tls_key"])]
    tls_cert: Option<PathBuf>,
    /// PEM file of the private key of --tls-cert.
    #[arg(long, env = "MDSERVER_TLS_KEY", value_name = "FILE", requires_all = ["tls_ca", "tls_cert"])]
    tls_key: Option<PathBuf>,
    /// Serve and call gRPC in plain text, without authentication (tests, trusted
    /// networks only; a warning is logged). Without it the --tls-* files are required.
    #[arg(long, env = "MDSERVER_INSECURE", conflicts_with_all = ["tls_ca", "tls_cert", "tls_key"])]
    insecure: bool,
    /// Also serve the gRPC health service alone, in plain text, on this address: for
    /// probes that cannot present a certificate (the kubelet's grpc probes).
    #[arg(long, env = "MDSERVER_HEALTH_LISTEN", value_name = "ADDR")]
    health_listen: Option<String>,
    /// Serve Prometheus metrics on http://ADDR/metrics (plain HTTP: metrics carry no
    /// secrets). Off when not given.
    #[arg(long, env = "MDSERVER_METRICS_LISTEN", value_name = "ADDR")]
    metrics_listen: Option<String>,
    /// On SIGTERM/SIGINT, how long to let calls in flight finish before exiting. Session
    /// streams do not end by themselves: their agents resume on another replica.
    #[arg(long, env = "MDSERVER_SHUTDOWN_GRACE", default_value = "5s")]
    shutdown_grace: humantime::Duration,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let etcd_tls = args
        .etcd_cacert
        .clone()
        .map(|ca| mdcluster_server::EtcdTls {
            ca,
            identity: args.etcd_cert.clone().zip(args.etcd_key.clone()),
        });
    let etcd_auth = match (
        &args.etcd_user,
        &args.etcd_password_file,
        &args.etcd_password,
    ) {
        (None, _, _) => None,
        (Some(user), Some(file), _) => {
            let text = std::fs::read_to_string(file).with_context(|| {
                format!(
                    "read the etcd password of user {user} from {} (--etcd-password-file)",
                    file.display()
                )
            })?;
            let password = text
                .strip_suffix('\n')
                .map(|t| t.strip_suffix('\r').unwrap_or(t))
                .unwrap_or(&text)
                .to_string();
            Some(mdcluster_server::EtcdAuth {
                user: user.clone(),
                password,
            })
        }
        (Some(user), None, Some(password)) => Some(mdcluster_server::EtcdAuth {
            user: user.clone(),
            password: password.clone(),
        }),
        (Some(user), None, None) => anyhow::bail!(
            "--etcd-user {user} needs a password: --etcd-password-file FILE \
             (MDSERVER_ETCD_PASSWORD_FILE) or MDSERVER_ETCD_PASSWORD"
        ),
    };
    if etcd_auth.is_some() {
        if let Some(plain) = args.etcd.iter().find(|e| !e.starts_with("https://")) {
            anyhow::bail!(
                "refusing to send the etcd password of user {} to {plain} in plain text: \
                 use https:// endpoints with --etcd-cacert",
                args.etcd_user.as_deref().unwrap_or_default()
            );
        }
    }
    let transport = mdcluster_proto::tls::Transport::from_flags(
        "mdserver",
        args.tls_ca.clone(),
        args.tls_cert.clone(),
        args.tls_key.clone(),
        args.insecure,
    )
    .map_err(anyhow::Error::msg)?;
    let config = mdcluster_server::Config {
        transport,
        health_listen: args.health_listen.clone(),
        metrics_listen: args.metrics_listen.clone(),
        etcd: args.etcd,
        etcd_tls,
        etcd_auth,
        cluster_name: args.cluster_name,
        session_ttl: args.session_ttl.into(),
        etcd_timeout: args.etcd_timeout.into(),
        etcd_connect_timeout: args.etcd_connect_timeout.into(),
        max_sessions: args.max_sessions,
        max_waits: args.max_waits,
    };
    let rt = tokio::runtime::Runtime::new().context("start the tokio runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen)
            .await
            .with_context(|| format!("bind gRPC listener on {}", args.listen))?;
        let addr = listener.local_addr().context("read the listener address")?;
        // Announced on stdout so that a harness that asked for port 0 learns the port.
        println!("mdserver listening on {addr}");
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let serve = mdcluster_server::serve(listener, config, async {
            let _ = stop_rx.await;
        });
        tokio::pin!(serve);
        tokio::select! {
            r = &mut serve => r.context("serve the lock service"),
            () = shutdown_signal() => {
                let _ = stop_tx.send(());
                let grace: std::time::Duration = args.shutdown_grace.into();
                match tokio::time::timeout(grace, serve).await {
                    Ok(r) => r.context("serve the lock service"),
                    Err(_) => {
                        tracing::info!("calls still open after {grace:?}; exiting");
                        Ok(())
                    }
                }
            }
        }
    })
}

/// Completes on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
    tracing::info!("shutting down");
}
