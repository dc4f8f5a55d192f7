//! `mdagent`: the per-node agent of mdcluster. It owns the arrays assembled on its node.

use clap::Parser;

/// The per-node mdcluster agent: owns this node's arrays and their NBD exports.
#[derive(Debug, Parser)]
#[command(name = "mdagent", version, about, long_about = None)]
struct Args {
    /// This node's name, unique in the cluster.
    #[arg(long, env = "MDAGENT_NODE")]
    node: Option<String>,
    /// URL of an mdserver (e.g. http://127.0.0.1:7480).
    #[arg(long, env = "MDAGENT_SERVER")]
    server: Option<String>,
    /// Address the agent service listens on.
    #[arg(long, env = "MDAGENT_LISTEN", default_value = "127.0.0.1:7481")]
    listen: String,
    /// Directory for the per-array NBD sockets and runtime state.
    #[arg(long, env = "MDAGENT_RUN_DIR", default_value = "/run/mdcluster")]
    run_dir: std::path::PathBuf,
    /// Glob of member paths the agent may open; repeat for several. Nothing else is opened.
    #[arg(
        long = "device-allow",
        env = "MDAGENT_DEVICE_ALLOW",
        value_delimiter = ','
    )]
    device_allow: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .init();
    tracing::info!(?args, "mdagent starting");
    anyhow::bail!("mdagent: the agent service is not built yet")
}
