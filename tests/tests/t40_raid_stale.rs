//! t40: a member that missed writes is never taken as in sync at assemble (md's event
//! count check, `super_1_validate`: a member more than one event behind the freshest is
//! not fresh).
//!
//! The array runs on m0 alone (assembled degraded), data is written, then it is
//! assembled with m0 and m1: m1 is recovered in full (with or without a bitmap: a
//! bitmap-only catch-up is what `--re-add` is for) and the members end identical.
//!
//! Reads after the assemble never return m1's stale bytes (checked with `qemu-io -P`
//! over the whole written range, several times so both members would be read).

use std::time::Duration;

use mdcluster_tests::standalone::{assert_members_identical, member_files, sh, Agent};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn stale_member_is_recovered(bitmap: &str, chunk_kib: u64) -> serde_json::Value {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let members = member_files(d, "m", 2, 32 * MIB);
    let agent = Agent::start(&d.join("run"), &[]);
    agent.ok(json!({
        "op": "create", "name": "md0", "members": members, "raid_devices": 2,
        "bitmap": bitmap, "chunk_kib": chunk_kib, "assume_clean": true, "force": true,
    }));
    agent.ok(json!({"op": "stop", "name": "md0"}));
    // m1 is away: the array runs degraded on m0 and takes writes.
    agent.ok(json!({"op": "assemble", "name": "md0", "members": [&members[0]]}));
    let uri = agent.uri("md0");
    sh(&["qemu-io", "-f", "raw", "-c", "write -P 0x77 2M 3M", &uri]);
    agent.ok(json!({"op": "stop", "name": "md0"}));
    // Both again: m1's superblock is behind.
    agent.ok(json!({"op": "assemble", "name": "md0", "members": members}));
    for _ in 0..4 {
        let r = sh(&["qemu-io", "-f", "raw", "-c", "read -P 0x77 2M 3M", &uri]);
        assert!(!r.contains("fail"), "stale bytes read: {r}");
    }
    let s = agent.wait_status("md0", Duration::from_secs(30), |s| {
        s["raid"]["sync"]["completed"]
            .as_array()
            .is_some_and(|c| !c.is_empty())
            && s["raid"]["degraded"] == false
    });
    agent.ok(json!({"op": "stop", "name": "md0"}));
    assert_members_identical(&members);
    s
}

#[test]
fn stale_member_with_bitmap_is_recovered_in_full() {
    let s = stale_member_is_recovered("internal", 1024);
    let run = &s["raid"]["sync"]["completed"][0];
    assert_eq!(run["kind"], "recovery", "{s}");
    assert_eq!(run["bytes"], s["raid"]["size"], "{s}");
}

#[test]
fn stale_member_without_bitmap_is_recovered_in_full() {
    let s = stale_member_is_recovered("none", 64);
    let run = &s["raid"]["sync"]["completed"][0];
    assert_eq!(run["kind"], "recovery", "{s}");
    assert_eq!(run["bytes"], s["raid"]["size"], "{s}");
}
