//! t40: a member that starts failing. One member lives on a small tmpfs that fills up
//! (ENOSPC on write): that member is failed (role 0xfffe recorded in the other member's
//! superblock), the array goes on degraded, and no acknowledged write is lost — every
//! pattern reads back, also after a stop and a degraded assemble from the good member
//! alone.

use mdcluster_tests::standalone::{member_files, sh, Agent, Cleanup};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn write_and_verify_cmds(verify_only: bool) -> Vec<String> {
    let mut v = Vec::new();
    for i in 0..40u64 {
        let pat = (i % 250) + 1;
        if !verify_only {
            v.push("-c".into());
            v.push(format!("write -P {pat} {}M 1M", i));
        }
    }
    for i in 0..40u64 {
        let pat = (i % 250) + 1;
        v.push("-c".into());
        v.push(format!("read -P {pat} {}M 1M", i));
    }
    v
}

fn qemu_io(uri: &str, cmds: &[String]) -> String {
    let mut args: Vec<&str> = vec!["qemu-io", "-f", "raw"];
    args.extend(cmds.iter().map(String::as_str));
    args.push(uri);
    let out = sh(&args);
    assert!(
        !out.contains("failed"),
        "qemu-io reported a failure:\n{out}"
    );
    out
}

#[test]
fn member_on_full_tmpfs_fails_array_goes_on_degraded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let small = d.join("small");
    std::fs::create_dir(&small).unwrap();
    sh(&[
        "mount",
        "-t",
        "tmpfs",
        "-o",
        "size=16m",
        "tmpfs",
        small.to_str().unwrap(),
    ]);
    let _umount = Cleanup(vec![
        "umount".into(),
        "-l".into(),
        small.display().to_string(),
    ]);
    let good = member_files(d, "good", 1, 64 * MIB).remove(0);
    let bad = member_files(&small, "bad", 1, 64 * MIB).remove(0);
    let members = vec![good.clone(), bad.clone()];
    let agent = Agent::start(&d.join("run"), &["--stop-grace", "2s"]);
    agent.ok(json!({
        "op": "create", "name": "md0", "members": members, "raid_devices": 2,
        "bitmap": "internal", "chunk_kib": 1024, "assume_clean": true,
    }));
    let uri = agent.uri("md0");
    // 40 MiB of writes: the tmpfs member runs out of space on the way.
    qemu_io(&uri, &write_and_verify_cmds(false));
    let s = agent.status("md0");
    assert_eq!(s["raid"]["degraded"], true, "{s}");
    assert_eq!(s["raid"]["members"][0]["state"], "in_sync", "{s}");
    assert_eq!(s["raid"]["members"][1]["state"], "faulty", "{s}");
    // The failure is recorded on the good member.
    let sb = mdcluster_agent::format::io::read_member(&good).unwrap().sb;
    assert_eq!(sb.dev_roles[1], 0xfffe, "role of the failed member");
    let ex = sh(&["mdadm", "--examine", good.to_str().unwrap()]);
    assert!(ex.contains("Array State : A."), "{ex}");
    // Still writable and readable degraded.
    qemu_io(&uri, &write_and_verify_cmds(true));
    agent.ok(json!({"op": "stop", "name": "md0"}));

    // Degraded assemble from the good member alone: every acknowledged write is there.
    let info = agent.ok(json!({"op": "assemble", "name": "md0", "members": [good]}));
    assert_eq!(info["raid"]["degraded"], true, "{info}");
    qemu_io(&uri, &write_and_verify_cmds(true));
    agent.ok(json!({"op": "stop", "name": "md0"}));
}
