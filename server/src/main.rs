//! `mdserver`: the only component of mdcluster that talks to etcd.
//!
//! It will host the lock service and the cluster API that `mdctl` uses; for now it only
//! parses its arguments.

use clap::Parser;

/// The mdcluster lock service and cluster API (the only component that talks to etcd).
#[derive(Debug, Parser)]
#[command(name = "mdserver", version, about, long_about = None)]
struct Args {
    /// Address to serve gRPC on.
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
    /// Name of this cluster; every etcd key lives under /mdcluster/<cluster-name>/.
    #[arg(long, env = "MDSERVER_CLUSTER_NAME", default_value = "mdcluster")]
    cluster_name: String,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    tracing::info!(?args, "mdserver starting");
    anyhow::bail!("mdserver: the lock service is not built yet")
}
