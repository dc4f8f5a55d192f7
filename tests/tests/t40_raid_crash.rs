//! t40: kill -9 of the agent, then assemble: exactly the chunks the write-intent bitmap
//! marks dirty are resynced (the count is asserted against the bits on disk), and the
//! members end byte-identical.
//!
//! 1. Writes into a known set of chunks, kill -9, a torn write faked on one member:
//!    the resync copies exactly those chunks.
//! 2. kill -9 in the middle of a random-write load (fio over NBD): the resync count
//!    equals the dirty bits found on disk after the kill.

use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use mdcluster_tests::standalone::{
    assert_members_identical, dirty_bits, dirty_bits_union, member_files, sh, Agent,
};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const CHUNK: u64 = 64 << 10;

fn create(agent: &Agent, members: &[PathBuf]) {
    agent.ok(json!({
        "op": "create", "name": "md0", "members": members, "raid_devices": 2,
        "bitmap": "internal", "chunk_kib": CHUNK / 1024, "assume_clean": true,
    }));
}

/// Assembles in a fresh agent and waits for the resync; returns the finished run.
fn reassemble_and_resync(dir: &std::path::Path, members: &[PathBuf]) -> (Agent, Value) {
    let agent = Agent::start(&dir.join("run2"), &["--stop-grace", "2s"]);
    let info = agent.ok(json!({"op": "assemble", "name": "md0", "members": members}));
    assert_eq!(info["state"], "active");
    let s = agent.wait_status("md0", Duration::from_secs(60), |s| {
        s["raid"]["sync"]["completed"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
    });
    let run = s["raid"]["sync"]["completed"][0].clone();
    assert_eq!(run["kind"], "resync", "{run}");
    assert_eq!(run["bitmap"], true, "{run}");
    assert_eq!(run["interrupted"], false, "{run}");
    (agent, run)
}

#[test]
fn kill9_then_exactly_the_dirty_chunks_are_resynced() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let members = member_files(d, "m", 2, 48 * MIB);
    // The daemon must not clear bits before the kill.
    let mut agent = Agent::start(&d.join("run"), &["--daemon-sleep", "1h"]);
    create(&agent, &members);
    // Chunks 3, 10 (two writes), 20 and 21 (one write across the boundary): 4 chunks.
    sh(&[
        "qemu-io",
        "-f",
        "raw",
        "-c",
        &format!("write -P 0x11 {} 4096", 3 * CHUNK),
        "-c",
        &format!("write -P 0x22 {} 4096", 10 * CHUNK + 4096),
        "-c",
        &format!("write -P 0x33 {} 8192", 10 * CHUNK + 32768),
        "-c",
        &format!("write -P 0x44 {} 131072", 20 * CHUNK),
        &agent.uri("md0"),
    ]);
    agent.kill9();
    for m in &members {
        assert_eq!(dirty_bits(m, 0), 4, "bits on {} after kill -9", m.display());
        let sb = mdcluster_agent::format::io::read_member(m).unwrap().sb;
        assert_ne!(sb.resync_offset, u64::MAX, "superblock must say dirty");
    }
    // A torn write: member 1 missed part of the write into chunk 10.
    let data_off = mdcluster_agent::format::io::read_member(&members[1])
        .unwrap()
        .sb
        .data_offset
        * 512;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&members[1])
        .unwrap();
    f.write_all_at(&[0xee; 4096], data_off + 10 * CHUNK + 32768)
        .unwrap();
    drop(f);

    let (agent2, run) = reassemble_and_resync(d, &members);
    assert_eq!(run["chunks"], 4, "{run}");
    assert_eq!(run["bytes"].as_u64(), Some(4 * CHUNK), "{run}");
    sh(&[
        "qemu-io",
        "-f",
        "raw",
        "-c",
        &format!("read -P 0x33 {} 8192", 10 * CHUNK + 32768),
        &agent2.uri("md0"),
    ]);
    agent2.ok(json!({"op": "stop", "name": "md0"}));
    assert_members_identical(&members);
    for m in &members {
        assert_eq!(
            dirty_bits(m, 0),
            0,
            "clean stop leaves no bits on {}",
            m.display()
        );
    }
    drop(agent);
}

#[test]
fn kill9_during_random_writes_resyncs_the_dirty_bits() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let members = member_files(d, "m", 2, 96 * MIB);
    let mut agent = Agent::start(&d.join("run"), &[]);
    create(&agent, &members);
    let uri = agent.uri("md0");
    let mut fio = Command::new("timeout")
        .args([
            "-k",
            "5",
            "60",
            "fio",
            "--name=load",
            "--ioengine=nbd",
            "--rw=randwrite",
            "--bs=4k",
        ])
        .args([
            "--iodepth=16",
            "--time_based",
            "--runtime=30",
            "--size=32m",
            "--offset=8m",
        ])
        .arg(format!("--uri={uri}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fio");
    // Kill once the load is writing (bits on disk), in the middle of it.
    agent.wait_status("md0", Duration::from_secs(30), |s| {
        s["raid"]["bitmap"]["dirty_bits"].as_u64() > Some(8)
    });
    std::thread::sleep(Duration::from_millis(500));
    agent.kill9();
    let _ = fio.kill();
    let _ = fio.wait();
    // Each member carries the bitmap; the kill may fall between the writes of one
    // flush to the two members, so they can differ by that flush. Assembly resyncs the
    // union of their bits.
    let dirty: Vec<u64> = members.iter().map(|m| dirty_bits(m, 0)).collect();
    let union = dirty_bits_union(&members, 0);
    assert!(
        dirty[0] > 0 && dirty[1] > 0,
        "writes were in progress, some bits must be set: {dirty:?}"
    );
    assert!(union >= dirty[0].max(dirty[1]), "{dirty:?} union {union}");
    // The load stayed inside 8..40 MiB: at most 512 chunks of 64 KiB.
    assert!(union <= 512, "{dirty:?} union {union}");
    let (agent2, run) = reassemble_and_resync(d, &members);
    assert_eq!(run["chunks"].as_u64(), Some(union), "{run}");
    agent2.ok(json!({"op": "stop", "name": "md0"}));
    assert_members_identical(&members);
}
