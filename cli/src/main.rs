//! `mdctl`: the one command-line interface of mdcluster.
//!
//! Cluster commands talk gRPC to an `mdserver`; the misc commands (`examine`,
//! `examine-bitmap`, `zero-superblock`) read and write devices on this machine directly,
//! like mdadm's misc mode. Exit codes: see [`exit`].

mod exit;
mod local;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Manage mdcluster arrays: cluster-aware software RAID (mirrors over shared disks).
///
/// Cluster commands go to an mdserver (--server or MDCTL_SERVER); examine,
/// examine-bitmap and zero-superblock work on local devices without a server.
///
/// Exit codes: 0 ok, 1 failure, 2 usage, 3 ENOENT (not found), 4 EBUSY, 5 EINVAL,
/// 6 EIO, 7 ETIMEDOUT, 8 EEXIST, 9 EPERM, 10 corrupt or unknown metadata.
#[derive(Debug, Parser)]
#[command(name = "mdctl", version, about, long_about)]
struct Cli {
    /// URL of an mdserver, e.g. http://127.0.0.1:7480.
    #[arg(long, global = true, env = "MDCTL_SERVER")]
    server: Option<String>,
    /// Node an operation runs on (default: the first node).
    #[arg(long, global = true)]
    node: Option<String>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
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
    /// Refuses a device without a valid superblock unless --force.
    #[command(name = "zero-superblock")]
    ZeroSuperblock {
        /// Erase even when the superblock is missing or invalid.
        #[arg(long)]
        force: bool,
        /// Member devices or files.
        #[arg(required = true)]
        devices: Vec<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match &cli.command {
        Command::Examine { devices } => local::examine(devices, cli.json),
        Command::ExamineBitmap { devices } => local::examine_bitmap(devices, cli.json),
        Command::ZeroSuperblock { force, devices } => local::zero(devices, *force, cli.json),
    };
    print!("{}", outcome.stdout);
    match outcome.exit {
        None => ExitCode::SUCCESS,
        Some(e) => ExitCode::from(e.code() as u8),
    }
}
