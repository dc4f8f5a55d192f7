//! The commands that work on this machine without a server, like mdadm's misc mode:
//! `examine`, `examine-bitmap`, `zero-superblock`.

use std::path::PathBuf;

use mdcluster_agent::format::examine::{Examine, ExamineBitmap};
use mdcluster_agent::format::io::{read_member, zero_superblock, DeviceError};
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

fn run_each<T: Serialize>(
    devices: &[PathBuf],
    json: bool,
    f: impl Fn(&PathBuf) -> Result<T, DeviceError>,
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
                let code = Exit::of_device_error(&e);
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
        |d| read_member(d).map(|m| Examine::of(&m)),
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
            ExamineBitmap::of(&m).ok_or(DeviceError::Format {
                path: d.clone(),
                source: FormatError::NoBitmap,
            })
        },
        |r| r.render() + "\n",
    )
}

#[derive(Serialize)]
struct Zeroed {
    device: String,
    zeroed: bool,
}

/// `mdctl zero-superblock DEVICE...`
pub fn zero(devices: &[PathBuf], force: bool, json: bool) -> Outcome {
    run_each(
        devices,
        json,
        |d| {
            zero_superblock(d, force)?;
            Ok(Zeroed {
                device: d.display().to_string(),
                zeroed: true,
            })
        },
        |z| format!("mdctl: zeroed the md superblock of {}\n", z.device),
    )
}
