//! t40: resync and recovery in the background, with progress, speed limits changed
//! while they run, and a checkpoint that lets an interrupted resync continue.
//!
//! 1. A new array (no `--assume-clean`, no bitmap) over members with different
//!    contents: the resync runs throttled at `--speed-max`, is stopped midway (its
//!    checkpoint lands in `resync_offset`), continues after the next assemble from that
//!    checkpoint, finishes once the limit is raised at run time; members identical.
//! 2. A member failed by request: the spare takes its role and recovery copies the
//!    array onto it; members identical.

use std::time::Duration;

use mdcluster_tests::standalone::{assert_members_identical, member_files, noise, sh, Agent};
use serde_json::json;

const MIB: u64 = 1 << 20;

#[test]
fn resync_throttled_checkpointed_resumed_and_sped_up() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let members = member_files(d, "m", 2, 32 * MIB);
    std::fs::write(&members[0], noise(32 * MIB as usize, 5)).unwrap();
    let agent = Agent::start(
        &d.join("run"),
        &["--speed-min", "512", "--speed-max", "2048"],
    );
    let info = agent.ok(json!({
        "op": "create", "name": "md0", "members": members, "raid_devices": 2,
        "bitmap": "none", "force": true,
    }));
    let size = info["raid"]["size"].as_u64().unwrap();
    // Progress shows, at about the limit (2 MiB/s).
    let s = agent.wait_status("md0", Duration::from_secs(10), |s| {
        s["raid"]["sync"]["kind"] == "resync"
            && s["raid"]["sync"]["done_bytes"].as_u64() >= Some(2 * MIB)
    });
    assert_eq!(s["raid"]["sync"]["total_bytes"].as_u64(), Some(size), "{s}");
    std::thread::sleep(Duration::from_secs(1));
    let s = agent.status("md0");
    let rate = s["raid"]["sync"]["rate_kib_s"].as_u64().unwrap();
    assert!(
        rate <= 2048 + 1024,
        "throttled to ~2048 KiB/s, got {rate}: {s}"
    );
    // Stop midway: the checkpoint is in the superblock.
    agent.ok(json!({"op": "stop", "name": "md0"}));
    let ckpt = mdcluster_agent::format::io::read_member(&members[1])
        .unwrap()
        .sb
        .resync_offset;
    assert!(ckpt > 0 && ckpt * 512 < size, "checkpoint {ckpt}");
    // Continue from it; raise the limit while it runs.
    agent.ok(json!({"op": "assemble", "name": "md0", "members": members}));
    agent.wait_status("md0", Duration::from_secs(10), |s| {
        s["raid"]["sync"]["kind"] == "resync"
    });
    agent.ok(json!({"op": "speed", "name": "md0", "min_kib_s": 1000, "max_kib_s": 1_000_000}));
    let s = agent.wait_status("md0", Duration::from_secs(30), |s| {
        s["raid"]["sync"]["completed"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
    });
    let run = &s["raid"]["sync"]["completed"][0];
    assert_eq!(run["interrupted"], false, "{s}");
    assert_eq!(
        run["bytes"].as_u64(),
        Some(size - ckpt * 512),
        "resumed at the checkpoint: {s}"
    );
    agent.ok(json!({"op": "stop", "name": "md0"}));
    assert_members_identical(&members);
    let ex = sh(&["mdadm", "--examine", members[0].to_str().unwrap()]);
    assert!(ex.contains("State : clean"), "{ex}");
}

#[test]
fn failed_member_replaced_by_spare_through_recovery() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let members = member_files(d, "m", 3, 32 * MIB);
    let agent = Agent::start(&d.join("run"), &[]);
    agent.ok(json!({
        "op": "create", "name": "md0", "members": members, "raid_devices": 2,
        "spare_devices": 1, "bitmap": "internal", "chunk_kib": 512, "assume_clean": true,
    }));
    let uri = agent.uri("md0");
    sh(&["qemu-io", "-f", "raw", "-c", "write -P 0x6c 0 16M", &uri]);
    agent.ok(json!({"op": "fail", "name": "md0", "member": members[0]}));
    let s = agent.wait_status("md0", Duration::from_secs(30), |s| {
        s["raid"]["members"][2]["state"] == "in_sync"
    });
    assert_eq!(s["raid"]["members"][0]["state"], "faulty", "{s}");
    assert_eq!(s["raid"]["degraded"], false, "{s}");
    let run = &s["raid"]["sync"]["completed"][0];
    assert_eq!(run["kind"], "recovery", "{s}");
    sh(&["qemu-io", "-f", "raw", "-c", "read -P 0x6c 0 16M", &uri]);
    agent.ok(json!({"op": "stop", "name": "md0"}));
    assert_members_identical(&members[1..]);
    let ex = sh(&["mdadm", "--examine", members[2].to_str().unwrap()]);
    assert!(ex.contains("Active device 0"), "{ex}");
}

#[test]
fn readded_member_recovers_only_the_chunks_written_while_it_was_out() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let members = member_files(d, "m", 2, 48 * MIB);
    let agent = Agent::start(&d.join("run"), &[]);
    agent.ok(json!({
        "op": "create", "name": "md0", "members": members, "raid_devices": 2,
        "bitmap": "internal", "chunk_kib": 1024, "assume_clean": true,
    }));
    let uri = agent.uri("md0");
    sh(&["qemu-io", "-f", "raw", "-c", "write -P 0x01 0 8M", &uri]);
    agent.ok(json!({"op": "fail", "name": "md0", "member": members[1]}));
    // While member 1 is out: chunks 10, 11, 12 (1 MiB chunks) and 20.
    sh(&[
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 0x02 10M 3M",
        "-c",
        "write -P 0x03 20M 4k",
        &uri,
    ]);
    // Still a (faulty) member: refused until it is removed, as md does.
    let e = agent.ctl(json!({"op": "add", "name": "md0", "member": members[1]}));
    assert_eq!(e["errno"], "EBUSY", "{e}");
    assert!(
        e["error"].as_str().is_some_and(|m| m.contains("--remove")),
        "{e}"
    );
    agent.ok(json!({"op": "remove", "name": "md0", "member": members[1]}));
    let out = agent.ok(json!({"op": "add", "name": "md0", "member": members[1]}));
    assert_eq!(out["readded"], true, "{out}");
    let s = agent.wait_status("md0", Duration::from_secs(30), |s| {
        s["raid"]["degraded"] == false
    });
    let run = s["raid"]["sync"]["completed"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    assert_eq!(run["kind"], "recovery", "{s}");
    assert_eq!(run["chunks"], 4, "{s}");
    agent.ok(json!({"op": "stop", "name": "md0"}));
    assert_members_identical(&members);
}

/// Random writes (fio over NBD) for `secs` seconds, in the background.
fn fio_load(uri: &str, secs: u64) -> std::process::Child {
    std::process::Command::new("timeout")
        .args([
            "-k",
            "5",
            &(secs + 30).to_string(),
            "fio",
            "--name=load",
            "--ioengine=nbd",
        ])
        .args([
            "--rw=randwrite",
            "--bs=4k",
            "--iodepth=16",
            "--time_based",
            "--size=24m",
        ])
        .arg(format!("--runtime={secs}"))
        .arg(format!("--uri={uri}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start fio")
}

#[test]
fn recovery_and_resync_under_concurrent_writes_end_identical() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let agent = Agent::start(
        &d.join("run"),
        &["--speed-min", "8000", "--speed-max", "16000"],
    );

    // Recovery onto the spare while writes go on.
    let members = member_files(d, "r", 3, 32 * MIB);
    agent.ok(json!({
        "op": "create", "name": "rec", "members": members, "raid_devices": 2,
        "spare_devices": 1, "bitmap": "internal", "chunk_kib": 256, "assume_clean": true,
    }));
    let mut fio = fio_load(&agent.uri("rec"), 5);
    std::thread::sleep(Duration::from_millis(500));
    agent.ok(json!({"op": "fail", "name": "rec", "member": members[0]}));
    let st = fio.wait().unwrap();
    assert!(st.success(), "fio: {st}");
    agent.wait_status("rec", Duration::from_secs(60), |s| {
        s["raid"]["members"][2]["state"] == "in_sync"
    });
    agent.ok(json!({"op": "stop", "name": "rec"}));
    assert_members_identical(&members[1..]);

    // The initial resync of a new array while writes go on.
    let members = member_files(d, "s", 2, 32 * MIB);
    std::fs::write(&members[1], noise(32 * MIB as usize, 11)).unwrap();
    agent.ok(json!({
        "op": "create", "name": "res", "members": members, "raid_devices": 2,
        "bitmap": "internal", "chunk_kib": 256, "force": true,
    }));
    let mut fio = fio_load(&agent.uri("res"), 4);
    let st = fio.wait().unwrap();
    assert!(st.success(), "fio: {st}");
    let s = agent.wait_status("res", Duration::from_secs(60), |s| {
        s["raid"]["sync"]["completed"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
    });
    assert_eq!(
        s["raid"]["sync"]["completed"][0]["interrupted"], false,
        "{s}"
    );
    agent.ok(json!({"op": "stop", "name": "res"}));
    assert_members_identical(&members);
}
