//! The commands that work on this machine without a server, like mdadm's misc mode:
//! `examine`, `examine-bitmap`, `zero-superblock`.

use std::path::PathBuf;

use mdcluster_agent::format::examine::{Examine, ExamineBitmap};
use mdcluster_agent::format::io::{read_member, zero_superblock, DeviceError, Member};
use mdcluster_agent::format::FormatError;
use serde::Serialize;

use crate::exit::Exit;

/// Result of a command over several devices: each device's outcome, and the worst exit.
pub struct Outcome {
    /// What to print on stdout.
    pub stdout: String,
    /// The exit code: success only if every device succeeded.
    pub exit: Option<Exit>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum JsonItem<T> {
    Ok(T),
    Err {
        device: String,
        error: String,
        exit_code: i32,
    },
}

/// Why one device failed: a device error, or a refusal with its own exit code.
pub enum LocalError {
    /// Reading or writing the device failed.
    Device(DeviceError),
    /// The operation was refused (e.g. the array is assembled on some node).
    Refused {
        /// The exit code.
        exit: Exit,
        /// The sentence to print.
        message: String,
    },
}

impl From<DeviceError> for LocalError {
    fn from(e: DeviceError) -> Self {
        LocalError::Device(e)
    }
}

impl LocalError {
    fn exit(&self) -> Exit {
        match self {
            LocalError::Device(e) => Exit::of_device_error(e),
            LocalError::Refused { exit, .. } => *exit,
        }
    }
}

impl std::fmt::Display for LocalError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LocalError::Device(e) => e.fmt(f),
            LocalError::Refused { message, .. } => f.write_str(message),
        }
    }
}

fn run_each<T: Serialize>(
    devices: &[PathBuf],
    json: bool,
    f: impl Fn(&PathBuf) -> Result<T, LocalError>,
    render: impl Fn(&T) -> String,
) -> Outcome {
    let mut exit = None;
    let mut items = Vec::new();
    let mut text = String::new();
    for dev in devices {
        match f(dev) {
            Ok(report) => {
                if !json {
                    text.push_str(&render(&report));
                }
                items.push(JsonItem::Ok(report));
            }
            Err(e) => {
                let code = e.exit();
                eprintln!("mdctl: {e}");
                exit.get_or_insert(code);
                items.push(JsonItem::Err {
                    device: dev.display().to_string(),
                    error: e.to_string(),
                    exit_code: code.code(),
                });
            }
        }
    }
    let stdout = if json {
        serde_json::to_string_pretty(&items).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
            + "\n"
    } else {
        text
    };
    Outcome { stdout, exit }
}

/// `mdctl examine DEVICE...`
pub fn examine(devices: &[PathBuf], json: bool) -> Outcome {
    run_each(
        devices,
        json,
        |d| Ok(Examine::of(&read_member(d)?)),
        |r| r.render() + "\n",
    )
}

/// `mdctl examine-bitmap DEVICE...`
pub fn examine_bitmap(devices: &[PathBuf], json: bool) -> Outcome {
    run_each(
        devices,
        json,
        |d| {
            let m = read_member(d)?;
            ExamineBitmap::of(&m).ok_or(LocalError::Device(DeviceError::Format {
                path: d.clone(),
                source: FormatError::NoBitmap,
            }))
        },
        |r| r.render() + "\n",
    )
}

#[derive(Serialize)]
struct Zeroed {
    device: String,
    zeroed: bool,
}

/// `mdctl zero-superblock DEVICE...`. `in_use` is asked about every device that holds
/// a valid member before it is erased (the cluster check); an error refuses that device.
pub fn zero(
    devices: &[PathBuf],
    force: bool,
    json: bool,
    in_use: impl Fn(&PathBuf, &Member) -> Result<(), LocalError>,
) -> Outcome {
    run_each(
        devices,
        json,
        |d| {
            if !force {
                in_use(d, &read_member(d)?)?;
            }
            zero_superblock(d, force)?;
            Ok(Zeroed {
                device: d.display().to_string(),
                zeroed: true,
            })
        },
        |z| format!("mdctl: zeroed the md superblock of {}\n", z.device),
    )
}
