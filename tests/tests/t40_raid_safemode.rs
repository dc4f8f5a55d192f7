//! t40: md's safemode — an array that stops being written is marked clean again after
//! `--safe-mode-delay`, so a crash (kill -9) while idle needs no resync; a crash while
//! dirty still resyncs exactly the dirty chunks.
//!
//! 1. Writes: the superblocks say dirty (`mdadm --examine` "active"). Idle past the
//!    delay: clean ("clean", `resync_offset` MaxSector) while the agent still runs; the
//!    next write marks them dirty again.
//!    kill -9 while idle and clean, assemble: no resync run; members identical.
//! 2. With safemode off (`--safe-mode-delay 0`) the same kill -9 leaves the superblocks
//!    dirty and the next assemble resyncs the dirty chunks.

use std::time::{Duration, Instant};

use mdcluster_agent::format::io::read_member;
use mdcluster_tests::standalone::{assert_members_identical, member_files, sh, Agent};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn resync_offset(p: &std::path::Path) -> u64 {
    read_member(p).expect("read member").sb.resync_offset
}

/// Writes 2 chunks, idles (up to 5 s, until clean if safemode is on), kill -9, assembles
/// again; the status once the array is settled.
fn crash_after_idle(safe_mode: &str) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let members = member_files(d, "m", 2, 32 * MIB);
    let args = ["--safe-mode-delay", safe_mode, "--daemon-sleep", "1h"];
    let mut agent = Agent::start(&d.join("run"), &args);
    agent.ok(json!({
        "op": "create", "name": "md0", "members": members, "raid_devices": 2,
        "bitmap": "internal", "chunk_kib": 1024, "assume_clean": true, "force": true,
    }));
    assert_eq!(resync_offset(&members[0]), u64::MAX);
    sh(&[
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 0x21 3M 2M",
        &agent.uri("md0"),
    ]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while resync_offset(&members[0]) != u64::MAX && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    agent.kill9();
    let agent = Agent::start(&d.join("run2"), &args);
    agent.ok(json!({"op": "assemble", "name": "md0", "members": members}));
    agent.wait_status("md0", Duration::from_secs(20), |s| {
        s["raid"]["sync"]["kind"].is_null() || s["raid"]["sync"]["kind"] == ""
    });
    std::thread::sleep(Duration::from_millis(300));
    let s = agent.status("md0");
    agent.ok(json!({"op": "stop", "name": "md0"}));
    assert_members_identical(&members);
    s
}

#[test]
fn idle_array_is_marked_clean_and_a_crash_needs_no_resync() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let members = member_files(d, "m", 2, 32 * MIB);
    let agent = Agent::start(&d.join("run"), &["--safe-mode-delay", "2s"]);
    agent.ok(json!({
        "op": "create", "name": "md0", "members": members, "raid_devices": 2,
        "bitmap": "internal", "chunk_kib": 1024, "assume_clean": true, "force": true,
    }));
    // A stream of writes keeps it dirty: sampled while qemu-io writes for ~1 s.
    let uri = agent.uri("md0");
    let cmds: Vec<String> = (0..40)
        .map(|i| format!("-c write -P 0x11 {}k 64k", i * 64))
        .collect();
    let mut args: Vec<&str> = vec!["qemu-io", "-f", "raw"];
    for c in &cmds {
        let (flag, rest) = c.split_at(2);
        args.push(flag.trim());
        args.push(rest.trim());
    }
    args.push(&uri);
    sh(&args);
    let ex = sh(&["mdadm", "--examine", members[0].to_str().unwrap()]);
    assert!(
        ex.contains("State : active"),
        "dirty right after writing:\n{ex}"
    );
    let deadline = Instant::now() + Duration::from_secs(8);
    while resync_offset(&members[0]) != u64::MAX {
        assert!(
            Instant::now() < deadline,
            "not marked clean within 8 s of idling (delay 2 s)"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let ex = sh(&["mdadm", "--examine", members[1].to_str().unwrap()]);
    assert!(ex.contains("State : clean"), "clean while running:\n{ex}");
    // Writing again marks it dirty again.
    sh(&["qemu-io", "-f", "raw", "-c", "write -P 0x12 8M 4k", &uri]);
    assert_eq!(
        resync_offset(&members[0]),
        0,
        "dirty again on the next write"
    );
    agent.ok(json!({"op": "stop", "name": "md0"}));
}

#[test]
fn crash_while_idle_needs_no_resync_unless_safemode_is_off() {
    let s = crash_after_idle("300ms");
    assert_eq!(
        s["raid"]["sync"]["completed"].as_array().map(Vec::len),
        Some(0),
        "clean before the crash: nothing resynced: {s}"
    );
    let s = crash_after_idle("0");
    let runs = s["raid"]["sync"]["completed"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    assert_eq!(runs.len(), 1, "dirty at the crash: one resync: {s}");
    assert_eq!(
        runs[0]["chunks"].as_u64(),
        Some(2),
        "the 2 written chunks: {s}"
    );
}
