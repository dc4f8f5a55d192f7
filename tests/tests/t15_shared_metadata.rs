//! Shared storage seen from two hosts with their own page caches: two loop devices
//! (`--direct-io=on`, so nothing is cached below them) over one backing file stand for
//! the same disk on host A and host B. Each loop device has its own page cache, as each
//! host does; a descriptor held open on B (a running agent there) keeps B's cache alive.
//!
//! - Metadata (`format::io`, and `mdctl examine` / `examine-bitmap`, which use it): a
//!   superblock and bitmap slot changed through A read back new through B while a
//!   buffered read through B still shows the old bytes.
//! - Data (`MemberIo`): an unaligned write through B into a block that A just wrote
//!   keeps A's bytes around it, although B's page cache holds the block from before.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use bytes::Bytes;
use mdcluster_agent::format::bitmap::{set_bit, test_bit};
use mdcluster_agent::format::create::{BitmapMode, CreateSpec};
use mdcluster_agent::format::io::{
    create_members, read_member, write_bitmap_slot, write_superblock, zero_superblock, MetaDev,
};
use mdcluster_agent::format::superblock::Superblock;
use mdcluster_agent::format::FormatError;
use mdcluster_agent::raid::member::{aligned_copy, MemberIo};
use mdcluster_tests::tools::{bin, run_ok, LoopDevice};
use serde_json::Value;

const MIB: u64 = 1 << 20;

fn blank(dir: &Path, name: &str, bytes: u64) -> PathBuf {
    let p = dir.join(name);
    File::create(&p).unwrap().set_len(bytes).unwrap();
    p
}

/// A loop device over `file` that does direct I/O to it (detached on drop).
fn attach_direct(file: &Path) -> LoopDevice {
    let out = run_ok(
        Command::new("losetup")
            .args(["--direct-io=on", "-f", "--show"])
            .arg(file),
    );
    let dev = LoopDevice {
        path: PathBuf::from(out.trim()),
    };
    let name = dev.path.file_name().unwrap().to_str().unwrap().to_owned();
    let dio = std::fs::read_to_string(format!("/sys/block/{name}/loop/dio")).unwrap();
    assert_eq!(
        dio.trim(),
        "1",
        "{} does not do direct I/O",
        dev.path.display()
    );
    dev
}

/// `len` bytes at `offset` of `dev` read through a fresh buffered descriptor (the page
/// cache).
fn buffered_read(dev: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    File::open(dev)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

fn mdctl_json(cmd: &str, dev: &Path) -> Value {
    let out = run_ok(Command::new(bin("mdctl")).args(["--json", cmd]).arg(dev));
    let v: Value = serde_json::from_str(&out).unwrap();
    v[0].clone()
}

#[test]
fn metadata_read_through_another_host_bypasses_its_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let backing = blank(dir.path(), "shared.img", 64 * MIB);
    let a = attach_direct(&backing);
    let b = attach_direct(&backing);

    let mut spec = CreateSpec::new("h:shared", 1, 0, BitmapMode::Clustered);
    spec.cluster_name = "c1".into();
    spec.nodes = Some(2);
    create_members(&spec, std::slice::from_ref(&a.path), false).unwrap();

    // Host B: a running agent holds the device open; something read it buffered.
    let _hold = File::open(&b.path).unwrap();
    let before = read_member(&b.path).unwrap();
    assert_eq!(before.sb.name(), "h:shared");
    let _ = buffered_read(&b.path, 0, MIB as usize);
    let slot1 = before.bitmap[1].offset;
    assert!(!test_bit(&before.bitmap[1].bits, 0));

    // Host A: a newer superblock and a dirty bit in slot 1, through format::io.
    let on_a = read_member(&a.path).unwrap();
    let mut sb = on_a.sb.clone();
    sb.events += 7;
    let dev = MetaDev::open(&a.path, true).unwrap();
    assert!(dev.is_direct(), "a loop device takes O_DIRECT");
    let mut bits = on_a.bitmap[1].bits.clone();
    set_bit(&mut bits, 0);
    write_bitmap_slot(&dev, &sb, 1, &on_a.bitmap[1].sb, &bits).unwrap();
    write_superblock(&dev, &sb).unwrap();
    drop(dev);

    // B's page cache still has the old bytes...
    let stale = Superblock::parse(&buffered_read(&b.path, 4096, 4096)).unwrap();
    assert_eq!(
        stale.events, before.sb.events,
        "B's page cache was not stale"
    );
    let stale_bits = buffered_read(&b.path, slot1 + 256, bits.len());
    assert!(!test_bit(&stale_bits, 0));

    // ...and format::io through B does not see them.
    let after = read_member(&b.path).unwrap();
    assert_eq!(
        after.sb.events, sb.events,
        "read_member through B returned a cached superblock"
    );
    assert!(
        test_bit(&after.bitmap[1].bits, 0),
        "read_member through B returned a cached bitmap slot"
    );
    assert_eq!(
        mdctl_json("examine", &b.path)["events"],
        sb.events,
        "mdctl examine"
    );
    let slots = &mdctl_json("examine-bitmap", &b.path)["slots"];
    assert_eq!(slots[1]["dirty"], 1, "mdctl examine-bitmap: {slots}");

    // A zeroed superblock through A is gone through B too.
    zero_superblock(&a.path, false).unwrap();
    assert!(Superblock::parse(&buffered_read(&b.path, 4096, 4096)).is_ok());
    let err = read_member(&b.path).unwrap_err();
    assert_eq!(
        err.format_error(),
        Some(&FormatError::NoSuperblock),
        "{err}"
    );
}

#[tokio::test]
async fn unaligned_data_write_keeps_another_hosts_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let backing = blank(dir.path(), "shared.img", 16 * MIB);
    let a = attach_direct(&backing);
    let b = attach_direct(&backing);
    let on_a = MemberIo::open(&a.path).unwrap();
    let on_b = MemberIo::open(&b.path).unwrap();
    assert!(on_a.is_direct() && on_b.is_direct());
    const X: u64 = MIB;

    // B has the block cached (an unaligned read of its own, and a buffered reader).
    let _hold = File::open(&b.path).unwrap();
    assert!(on_b
        .read_at(X + 100, 100)
        .await
        .unwrap()
        .iter()
        .all(|&x| x == 0));
    assert!(buffered_read(&b.path, X, 4096).iter().all(|&x| x == 0));

    // A writes the whole block.
    let pattern: Vec<u8> = (0..4096).map(|i| (i % 251) as u8 + 1).collect();
    on_a.write_at(X, aligned_copy(&Bytes::from(pattern.clone())))
        .await
        .unwrap();
    on_a.sync().await.unwrap();

    // B writes 100 bytes inside it.
    on_b.write_at(X + 100, Bytes::from(vec![0xbb; 100]))
        .await
        .unwrap();
    on_b.sync().await.unwrap();

    let mut want = pattern;
    want[100..200].fill(0xbb);
    let got = on_a.read_at(X, 4096).await.unwrap();
    let lost = got.iter().zip(&want).filter(|(g, w)| g != w).count();
    assert_eq!(
        lost, 0,
        "{lost} bytes of A's write were overwritten by B's stale cache"
    );
    let through_b = on_b.read_at(X + 50, 200).await.unwrap();
    assert_eq!(&through_b[..], &want[50..250]);
}
