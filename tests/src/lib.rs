//! The mdcluster test harness: starts real processes (etcd, `mdserver`, `mdagent`) and
//! runs real clients (`mdadm`, `qemu-io`, `nbdinfo`, ...) against them.
//!
//! # Layout
//! - [`tools`]: locate the workspace binaries and run external tools with a timeout.

pub mod tools;
