//! `mdctl`: the one command-line interface of mdcluster.
//!
//! Cluster commands talk gRPC to an `mdserver`; the misc commands (`examine`,
//! `examine-bitmap`, `zero-superblock`) read and write devices on this machine directly,
//! like mdadm's misc mode. Exit codes: see [`exit`].

mod cluster;
mod exit;
mod local;
mod render;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Manage mdcluster arrays: cluster-aware software RAID (mirrors over shared disks).
///
/// Cluster commands go to an mdserver (--server or MDCTL_SERVER); examine,
/// examine-bitmap and zero-superblock work on local devices without a server.
///
/// Exit codes: 0 ok, 1 failure, 2 usage, 3 ENOENT (not found), 4 EBUSY, 5 EINVAL,
/// 6 EIO, 7 ETIMEDOUT, 8 EEXIST, 9 EPERM, 10 corrupt or unknown metadata,
/// 11 mdserver unreachable.
#[derive(Debug, Parser)]
#[command(name = "mdctl", version, about, long_about)]
struct Cli {
    /// URL of an mdserver, e.g. https://127.0.0.1:7480 (http:// with --insecure), or
    /// several replicas comma-separated (https://a:7480,https://b:7480): a call goes to
    /// the next one when one does not answer (refused, unreachable, or hung past a few
    /// seconds).
    #[arg(long, global = true, env = "MDCTL_SERVER")]
    server: Option<String>,
    /// Node an operation runs on (default: the first node).
    #[arg(long, global = true)]
    node: Option<String>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// PEM file of the cluster CA (mdserver's certificate must chain to it).
    #[arg(long, global = true, env = "MDCTL_TLS_CA", value_name = "FILE")]
    tls_ca: Option<PathBuf>,
    /// PEM file of your operator certificate (O=mdcluster:admin or O=mdcluster:viewer).
    #[arg(long, global = true, env = "MDCTL_TLS_CERT", value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM file of the private key of --tls-cert.
    #[arg(long, global = true, env = "MDCTL_TLS_KEY", value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Talk to mdserver in plain text, unauthenticated (only for a server started with
    /// --insecure). Without it cluster commands need --tls-ca, --tls-cert and --tls-key.
    #[arg(long, global = true, env = "MDCTL_INSECURE")]
    insecure: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Create an array (write md v1.2 members, like mdadm --create) and start it on the
    /// chosen node.
    Create {
        /// Array name: md0 or /dev/md0.
        array: String,
        /// RAID level (only 1, mirror).
        #[arg(long, short = 'l', default_value = "1", value_parser = parse_level)]
        level: i32,
        /// Active member devices.
        #[arg(long = "raid-devices", short = 'n')]
        raid_devices: u32,
        /// Spare devices (the devices after the active ones).
        #[arg(long = "spare-devices", short = 'x', default_value_t = 0)]
        spare_devices: u32,
        /// Write-intent bitmap: none, internal or clustered (one slot per node).
        #[arg(long, short = 'b', value_parser = ["none", "internal", "clustered"])]
        bitmap: String,
        /// Node slots of a clustered bitmap (default 4).
        #[arg(long)]
        nodes: Option<u32>,
        /// Cluster name recorded in a clustered bitmap.
        #[arg(long = "cluster-name")]
        cluster_name: Option<String>,
        /// Name stored in the superblock (default: the array name).
        #[arg(long = "name", short = 'N')]
        md_name: Option<String>,
        /// Used size per member in KiB, or "max" (the default).
        #[arg(long, short = 'z', value_parser = parse_size)]
        size: Option<Size>,
        /// Declare the members identical: no initial resync.
        #[arg(long = "assume-clean")]
        assume_clean: bool,
        /// Overwrite devices that already hold an md superblock.
        #[arg(long)]
        force: bool,
        /// Bitmap chunk in KiB.
        #[arg(long = "bitmap-chunk")]
        bitmap_chunk: Option<u32>,
        /// Wait for the initial resync, with a progress bar.
        #[arg(long)]
        wait: bool,
        /// Member devices (raid-devices active, then spare-devices spares).
        #[arg(required = true)]
        devices: Vec<PathBuf>,
    },
    /// Assemble an array on the chosen node; without devices, from the members recorded
    /// for it in the cluster.
    Assemble {
        /// Array name: md0 or /dev/md0.
        array: String,
        /// Wait for any resync or recovery, with a progress bar.
        #[arg(long)]
        wait: bool,
        /// Member devices.
        devices: Vec<PathBuf>,
    },
    /// Stop an array on the chosen node (EBUSY while clients stay connected), or with
    /// --scan every array of the node.
    Stop {
        /// Array name: md0 or /dev/md0.
        #[arg(required_unless_present = "scan", conflicts_with = "scan")]
        array: Option<String>,
        /// Stop every array of the node.
        #[arg(long)]
        scan: bool,
        /// Disconnect NBD clients instead of answering EBUSY.
        #[arg(long)]
        force: bool,
    },
    /// Show an array across every node, in the shape of mdadm --detail, plus each node's
    /// state and NBD address.
    Detail {
        /// Array name: md0 or /dev/md0.
        array: String,
    },
    /// Print the chosen node's arrays in the exact /proc/mdstat format.
    Mdstat,
    /// List the live nodes, their agents and arrays.
    Nodes,
    /// Stream events (arrays assembled/stopped, member failed, degraded, resync/recovery,
    /// nodes joined/left/failed) from every node, or only --node's.
    Monitor {
        /// Run PROGRAM EVENT DEVICE [COMPONENT] per event, like mdadm --monitor --program
        /// (env MDCTL_EVENT_NODE, MDCTL_EVENT_DETAIL).
        #[arg(long)]
        program: Option<String>,
        /// Exit after this many events.
        #[arg(long)]
        count: Option<u64>,
        /// When the event stream breaks, keep reconnecting this long before giving up.
        #[arg(long = "reconnect-timeout", default_value = "60s")]
        reconnect_timeout: humantime::Duration,
    },
    /// Set the resync/recovery speed limits (md's speed_limit_min/max) of every array on
    /// the chosen node, or on every node without --node.
    Tune {
        /// Minimum speed, KiB/s.
        #[arg(long = "sync-speed-min")]
        sync_speed_min: u64,
        /// Maximum speed, KiB/s.
        #[arg(long = "sync-speed-max")]
        sync_speed_max: u64,
    },
    /// Change an array's members cluster-wide, like mdadm --manage: the operations run
    /// in the order given, each agreed by every node that has the array (a new device
    /// is accepted only when every node confirms it can open it).
    Manage {
        /// Array name: md0 or /dev/md0.
        array: String,
        /// Mark DEV faulty on every node.
        #[arg(long, value_name = "DEV")]
        fail: Vec<String>,
        /// Remove a faulty or spare DEV.
        #[arg(long, value_name = "DEV")]
        remove: Vec<String>,
        /// Add DEV (a former member is re-added, a new one recovers into a free role).
        #[arg(long, value_name = "DEV")]
        add: Vec<String>,
        /// Add DEV as a spare.
        #[arg(long = "add-spare", value_name = "DEV")]
        add_spare: Vec<String>,
        /// Re-add a former member DEV (recovers only what changed).
        #[arg(long = "re-add", value_name = "DEV")]
        re_add: Vec<String>,
    },
    /// Grow an array cluster-wide, like mdadm --grow (RAID1), in this order: add the
    /// --add devices; grow the number of active devices (spares take the new roles, one
    /// node recovers them); change the size (a grown area is resynced by one node);
    /// change the bitmap (internal and clustered switch through none; to none only
    /// while no other node has the array assembled).
    #[command(arg_required_else_help = true)]
    Grow {
        /// Array name: md0 or /dev/md0.
        array: String,
        /// The new number of active devices (larger than now).
        #[arg(
            long = "raid-devices",
            short = 'n',
            default_value_t = 0,
            hide_default_value = true
        )]
        raid_devices: u32,
        /// Devices to add first.
        #[arg(long, value_name = "DEV")]
        add: Vec<String>,
        /// New size used on each device, in KiB (a multiple of 4), or max: the most
        /// every member holds. Growing resyncs the new area on one node; shrinking cuts
        /// off the end (move data away first).
        #[arg(long, short = 'z', value_name = "KIB|max", value_parser = parse_size)]
        size: Option<Size>,
        /// New write-intent bitmap: none, internal or clustered.
        #[arg(long, short = 'b', value_parser = ["none", "internal", "clustered"])]
        bitmap: Option<String>,
        /// Slots of a new clustered bitmap (nodes that may assemble the array; default 4).
        #[arg(long, requires = "bitmap")]
        nodes: Option<u32>,
        /// Cluster name recorded in a new clustered bitmap.
        #[arg(long = "cluster-name", requires = "bitmap")]
        cluster_name: Option<String>,
    },
    /// Print the md superblock of each DEVICE (the facts of `mdadm --examine`).
    #[command(alias = "-E")]
    Examine {
        /// Member devices or files.
        #[arg(required = true)]
        devices: Vec<PathBuf>,
    },
    /// Print the write-intent bitmap of each DEVICE, every node slot of a clustered
    /// bitmap with its dirty count (the facts of `mdadm --examine-bitmap`).
    #[command(name = "examine-bitmap", alias = "-X")]
    ExamineBitmap {
        /// Member devices or files.
        #[arg(required = true)]
        devices: Vec<PathBuf>,
    },
    /// Erase the md superblock of each DEVICE so it no longer belongs to an array.
    ///
    /// With a server (--server / MDCTL_SERVER) it first asks the cluster and refuses
    /// (EBUSY) a member of an array assembled on any node, or when the server cannot be
    /// reached. Refuses a device without a valid superblock. --force skips both checks.
    #[command(name = "zero-superblock")]
    ZeroSuperblock {
        /// Erase without asking the cluster, even when the superblock is missing or
        /// invalid.
        #[arg(long)]
        force: bool,
        /// Member devices or files.
        #[arg(required = true)]
        devices: Vec<PathBuf>,
    },
}

/// `--size`: KiB, or max.
#[derive(Debug, Clone, Copy)]
enum Size {
    Max,
    Kib(u64),
}

fn parse_size(s: &str) -> Result<Size, String> {
    if s == "max" {
        return Ok(Size::Max);
    }
    let digits = s.trim_end_matches(['K', 'k']);
    digits
        .parse::<u64>()
        .map(Size::Kib)
        .map_err(|_| format!("{s:?}: give a size in KiB or \"max\""))
}

fn parse_level(s: &str) -> Result<i32, String> {
    match s {
        "1" | "raid1" | "mirror" => Ok(1),
        _ => Err(format!("level {s:?}: only 1 (raid1, mirror) is supported")),
    }
}

/// The `manage` operations in command-line order (clap keeps each flag's values apart,
/// mdadm applies them in the order written): `--fail DEV` or `--fail=DEV`, ...
fn manage_ops(args: impl Iterator<Item = String>) -> Vec<(String, String)> {
    const ACTIONS: [&str; 5] = ["fail", "remove", "add", "add-spare", "re-add"];
    let args: Vec<String> = args.collect();
    let mut ops = Vec::new();
    let mut i = 0;
    while i < args.len() {
        if let Some(flag) = args[i].strip_prefix("--") {
            let (name, inline) = match flag.split_once('=') {
                Some((n, v)) => (n, Some(v.to_owned())),
                None => (flag, None),
            };
            if ACTIONS.contains(&name) {
                let value = match inline {
                    Some(v) => Some(v),
                    None => {
                        i += 1;
                        args.get(i).cloned()
                    }
                };
                if let Some(v) = value {
                    ops.push((name.to_owned(), v));
                }
            }
        }
        i += 1;
    }
    ops
}

/// `mdctl zero-superblock`: with a server configured (--server / MDCTL_SERVER), a
/// member of an array assembled on any node is refused (EBUSY) and an unreachable
/// server refuses too; --force skips the check.
fn zero_superblock(cli: &Cli, devices: &[PathBuf], force: bool) -> local::Outcome {
    let Some(url) = cli.server.clone() else {
        if !force {
            eprintln!(
                "mdctl: no mdserver given (--server / MDCTL_SERVER): not checking whether \
                 the arrays are assembled on some node"
            );
        }
        return local::zero(devices, force, cli.json, |_, _| Ok(()));
    };
    let refuse = |exit, message| local::LocalError::Refused { exit, message };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let message = format!("start the tokio runtime: {e}");
            return local::zero(devices, force, cli.json, |_, _| {
                Err(refuse(exit::Exit::Other, message.clone()))
            });
        }
    };
    // The lazy channel needs the runtime to exist around it.
    let _entered = rt.enter();
    let client = transport(cli).and_then(|t| cluster::Client::new(&url, &t));
    local::zero(devices, force, cli.json, |dev, member| {
        let client = client
            .as_ref()
            .map_err(|f| refuse(f.exit, f.message.clone()))?;
        let uuid = mdcluster_agent::format::fmt_uuid(&member.sb.set_uuid);
        // The cluster knows the array by its name: the superblock's name, or the part
        // after "host:".
        let full = member.sb.name();
        let mut names = vec![full.clone()];
        if let Some((_, short)) = full.split_once(':') {
            names.push(short.to_owned());
        }
        let on = rt
            .block_on(cluster::assembled_on(client, &uuid, &names))
            .map_err(|f| {
                refuse(
                    f.exit,
                    format!(
                        "cannot check whether {} is in use: {}; use --force to erase it anyway",
                        dev.display(),
                        f.message
                    ),
                )
            })?;
        if let Some((node, name)) = on.first() {
            let nodes: Vec<&str> = on.iter().map(|(n, _)| n.as_str()).collect();
            return Err(refuse(
                exit::Exit::Busy,
                format!(
                    "{} is a member of array {name} ({uuid}), assembled on {}; stop it there \
                     first (mdctl --node {node} stop {name})",
                    dev.display(),
                    nodes.join(", ")
                ),
            ));
        }
        Ok(())
    })
}

/// The transport the TLS flags ask for (a warning on stderr with --insecure).
fn transport(cli: &Cli) -> Result<mdcluster_proto::tls::Transport, cluster::Failure> {
    let t = mdcluster_proto::tls::Transport::from_flags(
        "mdctl",
        cli.tls_ca.clone(),
        cli.tls_cert.clone(),
        cli.tls_key.clone(),
        cli.insecure,
    )
    .map_err(|message| cluster::Failure {
        exit: exit::Exit::Invalid,
        message,
    })?;
    if !t.is_tls() {
        eprintln!("mdctl: warning: --insecure: talking to mdserver in plain text, unauthenticated");
    }
    Ok(t)
}

fn cluster_command(cli: &Cli) -> Result<String, cluster::Failure> {
    let url = cli
        .server
        .clone()
        .unwrap_or_else(|| cluster::DEFAULT_SERVER.to_owned());
    let node = cli.node.clone().unwrap_or_default();
    let json = cli.json;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| cluster::Failure {
            exit: exit::Exit::Other,
            message: format!("start the tokio runtime: {e}"),
        })?;
    rt.block_on(async {
        let c = cluster::Client::new(&url, &transport(cli)?)?;
        match &cli.command {
            Command::Create {
                array,
                level,
                raid_devices,
                spare_devices,
                bitmap,
                nodes,
                cluster_name,
                md_name,
                size,
                assume_clean,
                force,
                bitmap_chunk,
                wait,
                devices,
            } => {
                let args = cluster::CreateArgs {
                    array: array.clone(),
                    level: *level,
                    raid_devices: *raid_devices,
                    spare_devices: *spare_devices,
                    bitmap: bitmap.clone(),
                    nodes: *nodes,
                    cluster_name: cluster_name.clone(),
                    name: md_name.clone(),
                    size_kib: match size {
                        Some(Size::Kib(k)) => Some(*k),
                        _ => None,
                    },
                    assume_clean: *assume_clean,
                    force: *force,
                    bitmap_chunk_kib: *bitmap_chunk,
                    devices: devices.clone(),
                };
                cluster::create(&c, &node, args, json, *wait).await
            }
            Command::Assemble {
                array,
                wait,
                devices,
            } => cluster::assemble(&c, &node, array, devices, json, *wait).await,
            Command::Stop { array, scan, force } => {
                cluster::stop(&c, &node, array.as_deref(), *scan, *force, json).await
            }
            Command::Detail { array } => cluster::detail(&c, array, json).await,
            Command::Mdstat => cluster::mdstat(&c, &node, json).await,
            Command::Nodes => cluster::nodes(&c, json).await,
            Command::Monitor {
                program,
                count,
                reconnect_timeout,
            } => {
                cluster::monitor(
                    &c,
                    &node,
                    program.as_deref(),
                    *count,
                    (*reconnect_timeout).into(),
                    json,
                )
                .await
            }
            Command::Tune {
                sync_speed_min,
                sync_speed_max,
            } => cluster::tune(&c, &node, *sync_speed_min, *sync_speed_max, json).await,
            Command::Grow {
                array,
                raid_devices,
                add,
                size,
                bitmap,
                nodes,
                cluster_name,
            } => {
                let req = mdcluster_proto::v1::GrowRequest {
                    name: array.clone(),
                    raid_devices: *raid_devices,
                    add: add.clone(),
                    size: match size {
                        None => String::new(),
                        Some(Size::Max) => "max".into(),
                        Some(Size::Kib(k)) => k.to_string(),
                    },
                    bitmap: bitmap.clone().unwrap_or_default(),
                    nodes: nodes.unwrap_or(0),
                    cluster_name: cluster_name.clone().unwrap_or_default(),
                };
                cluster::grow(&c, &node, req, json).await
            }
            Command::Manage { array, .. } => {
                cluster::manage(&c, &node, array, manage_ops(std::env::args()), json).await
            }
            Command::Examine { .. }
            | Command::ExamineBitmap { .. }
            | Command::ZeroSuperblock { .. } => Ok(String::new()),
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match &cli.command {
        Command::Examine { devices } => local::examine(devices, cli.json),
        Command::ExamineBitmap { devices } => local::examine_bitmap(devices, cli.json),
        Command::ZeroSuperblock { force, devices } => zero_superblock(&cli, devices, *force),
        _ => match cluster_command(&cli) {
            Ok(stdout) => local::Outcome { stdout, exit: None },
            Err(f) => {
                eprintln!("mdctl: {}", f.message);
                local::Outcome {
                    stdout: String::new(),
                    exit: Some(f.exit),
                }
            }
        },
    };
    print!("{}", outcome.stdout);
    match outcome.exit {
        None => ExitCode::SUCCESS,
        Some(e) => ExitCode::from(e.code() as u8),
    }
}

#[cfg(test)]
mod tests {
    use super::manage_ops;

    #[test]
    fn manage_ops_keep_command_line_order() {
        let args = [
            "mdctl",
            "manage",
            "md0",
            "--fail",
            "/a",
            "--remove=/a",
            "--json",
            "--add",
            "/b",
        ];
        let ops = manage_ops(args.iter().map(|s| s.to_string()));
        assert_eq!(
            ops,
            vec![
                ("fail".to_owned(), "/a".to_owned()),
                ("remove".to_owned(), "/a".to_owned()),
                ("add".to_owned(), "/b".to_owned()),
            ]
        );
    }
}
