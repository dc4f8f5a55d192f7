//! t40: a RAID1 array served by a standalone `mdagent`, checked with real clients:
//! `qemu-io` patterns with verification, `qemu-img convert` in and out, `nbdinfo` (size,
//! minimum block size), `nbdcopy`, and ext4 over `nbdfuse` + `losetup` + `mount` with `fsck -fn`. After each
//! test the data areas of all members are byte-identical. Every external command runs
//! under `timeout`; loops, mounts and processes are undone by drop guards.

use std::path::Path;

use mdcluster_tests::standalone::{
    assert_members_identical, member_files, noise, sh, Agent, Cleanup, FuseMount,
};
use serde_json::json;

const MIB: u64 = 1 << 20;

fn create(agent: &Agent, name: &str, members: &[std::path::PathBuf], bitmap: &str) -> u64 {
    let r = agent.ok(json!({
        "op": "create", "name": name, "members": members, "raid_devices": members.len(),
        "bitmap": bitmap, "chunk_kib": 256, "assume_clean": true,
    }));
    r["raid"]["size"].as_u64().expect("size")
}

fn stop(agent: &Agent, name: &str) {
    agent.ok(json!({"op": "stop", "name": name}));
}

#[test]
fn qemu_io_qemu_img_nbdinfo_nbdcopy() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let members = member_files(d, "m", 2, 64 * MIB);
    let agent = Agent::start(&d.join("run"), &["--stop-grace", "2s"]);
    let size = create(&agent, "md0", &members, "internal");
    let uri = agent.uri("md0");

    // --- qemu-io: patterns written, then verified (aligned, unaligned, across chunks).
    sh(&[
        "qemu-io",
        "-f",
        "raw",
        "-c",
        "write -P 0xa5 0 4M",
        "-c",
        "write -P 0x5a 4M 1M",
        "-c",
        "write -P 0x33 262000 1000",
        "-c",
        "write -z 8M 1M",
        "-c",
        "read -P 0xa5 0 262000",
        "-c",
        "read -P 0x33 262000 1000",
        "-c",
        "read -P 0xa5 263000 3931304",
        "-c",
        "read -P 0x5a 4M 1M",
        "-c",
        "read -P 0 8M 1M",
        "-c",
        "flush",
        &uri,
    ]);
    let out = sh(&["qemu-io", "-f", "raw", "-c", "read -P 0xa5 0 4096", &uri]);
    assert!(!out.contains("Pattern verification failed"), "{out}");

    // --- nbdinfo: the size is the array's; the minimum block size is the members'
    // logical block size (their filesystem's O_DIRECT alignment: 512 on most disks), so
    // clients never send sub-sector writes.
    let info: serde_json::Value = serde_json::from_str(&sh(&["nbdinfo", "--json", &uri])).unwrap();
    assert_eq!(
        info["exports"][0]["export-size"].as_u64(),
        Some(size),
        "{info}"
    );
    let min = info["exports"][0]["block_size_minimum"].as_u64();
    assert!(
        matches!(min, Some(512 | 1024 | 2048 | 4096)),
        "minimum block size {min:?}: {info}"
    );
    let list = sh(&["nbdinfo", "--list", &uri]);
    assert!(list.contains("md0"), "{list}");

    // --- qemu-img convert in and out.
    let src = d.join("src.img");
    std::fs::write(&src, noise(16 * MIB as usize, 7)).unwrap();
    sh(&[
        "qemu-img",
        "convert",
        "-n",
        "-f",
        "raw",
        "-O",
        "raw",
        src.to_str().unwrap(),
        &uri,
    ]);
    let out_img = d.join("out.img");
    sh(&[
        "qemu-img",
        "convert",
        "-f",
        "raw",
        "-O",
        "raw",
        &uri,
        out_img.to_str().unwrap(),
    ]);
    let back = std::fs::read(&out_img).unwrap();
    assert_eq!(back.len() as u64, size);
    assert!(
        back[..16 * MIB as usize] == std::fs::read(&src).unwrap()[..],
        "convert round trip"
    );

    // --- nbdcopy out and in.
    let copy = d.join("copy.img");
    std::fs::File::create(&copy).unwrap().set_len(size).unwrap();
    sh(&["nbdcopy", &uri, copy.to_str().unwrap()]);
    assert!(std::fs::read(&copy).unwrap() == back, "nbdcopy out");
    let src2 = d.join("src2.img");
    let data2 = noise(size as usize, 99);
    std::fs::write(&src2, &data2).unwrap();
    sh(&["nbdcopy", src2.to_str().unwrap(), &uri]);
    sh(&["nbdcopy", &uri, copy.to_str().unwrap()]);
    assert!(std::fs::read(&copy).unwrap() == data2, "nbdcopy in");

    stop(&agent, "md0");
    assert_members_identical(&members);
    assert!(!agent.sock("md0").exists(), "socket removed at stop");
}

#[test]
fn ext4_over_nbdfuse_loop_fsck_clean() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let members = member_files(d, "m", 2, 128 * MIB);
    let agent = Agent::start(&d.join("run"), &["--stop-grace", "2s"]);
    create(&agent, "md0", &members, "internal");
    let mnt = d.join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    {
        let fuse = FuseMount::mount(&agent.sock("md0"), &d.join("fuse"));
        let disk = fuse.disk();
        let lo = sh(&["losetup", "-f", "--show", disk.to_str().unwrap()])
            .trim()
            .to_owned();
        assert!(lo.starts_with("/dev/loop"), "{lo}");
        let lo_guard = Cleanup(vec!["losetup".into(), "-d".into(), lo.clone()]);
        sh(&["mkfs.ext4", "-q", "-F", &lo]);
        sh(&["mount", &lo, mnt.to_str().unwrap()]);
        let mount_guard = Cleanup(vec!["umount".into(), mnt.display().to_string()]);
        let mut files = Vec::new();
        for i in 0..10u64 {
            let data = noise(((i as usize) * 777_777) % (5 * MIB as usize) + 1, 300 + i);
            std::fs::write(mnt.join(format!("f{i}")), &data).unwrap();
            files.push(data);
        }
        sh(&["sync"]);
        for (i, data) in files.iter().enumerate() {
            assert!(
                &std::fs::read(mnt.join(format!("f{i}"))).unwrap() == data,
                "f{i}"
            );
        }
        sh(&["umount", mnt.to_str().unwrap()]);
        std::mem::forget(mount_guard);
        sh(&["fsck.ext4", "-fn", &lo]);
        drop(lo_guard);
        drop(fuse);
    }
    stop(&agent, "md0");
    assert_members_identical(&members);
    // Each member alone holds the filesystem (data at data_offset).
    fsck_member(d, &members[1]);
}

/// `fsck -fn` on a member's data area (through a read-only loop device at data_offset).
fn fsck_member(d: &Path, member: &Path) {
    let m = mdcluster_agent::format::io::read_member(member).unwrap();
    let off = (m.sb.data_offset * 512).to_string();
    let len = (m.sb.size * 512).to_string();
    let lo = sh(&[
        "losetup",
        "-f",
        "--show",
        "-r",
        "-o",
        &off,
        "--sizelimit",
        &len,
        member.to_str().unwrap(),
    ])
    .trim()
    .to_owned();
    let _g = Cleanup(vec!["losetup".into(), "-d".into(), lo.clone()]);
    sh(&["fsck.ext4", "-fn", &lo]);
    let _ = d;
}
