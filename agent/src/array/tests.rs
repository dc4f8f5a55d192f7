//! Registry, lifecycle and engine tests over real temp files.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use mdcluster_proto::v1::Errno;

use super::*;
use crate::blockdev::BlockDevice;
use crate::format::create::BitmapMode;
use crate::format::io::read_member;
use crate::format::superblock::{DevRole, MAX_SECTOR};
use crate::raid::{MemberState, MetaWrite, WorkerState};

const MIB: u64 = 1 << 20;

fn files(dir: &Path, n: usize, bytes: u64) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let p = dir.join(format!("m{i}"));
            std::fs::File::create(&p).unwrap().set_len(bytes).unwrap();
            p
        })
        .collect()
}

fn spec(raid: u32, spares: u32, bitmap: BitmapMode, clean: bool) -> CreateSpec {
    let mut s = CreateSpec::new("test:md0", raid, spares, bitmap);
    s.assume_clean = clean;
    s.bitmap_chunk = Some(64 << 10);
    s
}

fn registry() -> Arc<Registry> {
    Registry::new(RegistryConfig {
        stop_grace: Duration::from_millis(300),
        drain_timeout: Duration::from_secs(5),
        ..Default::default()
    })
}

/// The data areas of the members, compared.
fn assert_identical(paths: &[PathBuf]) {
    let mut first: Option<Vec<u8>> = None;
    for p in paths {
        let m = read_member(p).unwrap();
        let all = std::fs::read(p).unwrap();
        let start = (m.sb.data_offset * 512) as usize;
        let data = all[start..start + (m.sb.size * 512) as usize].to_vec();
        match &first {
            None => first = Some(data),
            Some(f) => assert!(f == &data, "{} differs from the first member", p.display()),
        }
    }
}

async fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn pattern(seed: u8, len: usize) -> Bytes {
    Bytes::from(
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect::<Vec<u8>>(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_read_stop_reassemble() {
    let dir = tempfile::tempdir().unwrap();
    let paths = files(dir.path(), 2, 40 * MIB);
    let reg = registry();
    reg.create("md0", spec(2, 0, BitmapMode::Internal, true), &paths, false)
        .await
        .unwrap();
    let dev = reg.device("md0").unwrap();
    assert!(dev.size() > 30 * MIB);
    dev.write(4096, pattern(1, 65536), false).await.unwrap();
    dev.write(100, Bytes::from_static(b"unaligned"), true)
        .await
        .unwrap();
    dev.flush().await.unwrap();
    for _ in 0..4 {
        assert!(dev.read(4096, 65536).await.unwrap() == pattern(1, 65536));
    }
    assert_eq!(&dev.read(100, 9).await.unwrap()[..], b"unaligned");
    dev.write(MIB, pattern(2, 8192), false).await.unwrap();
    dev.write_zeroes(MIB, 4096, false).await.unwrap();
    assert!(dev.read(MIB, 4096).await.unwrap().iter().all(|&b| b == 0));
    assert!(dev.read(dev.size() - 10, 20).await.is_err());
    drop(dev);
    reg.stop("md0", false).await.unwrap();
    assert!(matches!(
        reg.lookup("md0"),
        Err(ArrayError::NotFound { .. })
    ));
    assert_identical(&paths);
    // Clean stop: superblock clean, no bits left.
    let m = read_member(&paths[0]).unwrap();
    assert_eq!(m.sb.resync_offset, MAX_SECTOR);
    assert_eq!(
        crate::format::bitmap::count_set(&m.bitmap[0].bits, m.bitmap[0].sb.chunks()),
        0
    );
    // Reassemble: the data is there, nothing to resync.
    let info = reg.assemble("md0", &paths).await.unwrap();
    assert_eq!(info.state, ArrayState::Active);
    let dev = reg.device("md0").unwrap();
    assert!(dev.read(4096, 65536).await.unwrap() == pattern(1, 65536));
    assert!(dev.status().sync.completed.is_empty());
    drop(dev);
    reg.stop("md0", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_open_and_stop_rules() {
    let dir = tempfile::tempdir().unwrap();
    let paths = files(dir.path(), 2, 20 * MIB);
    let reg = registry();
    let c = ClientInfo::new("test-client");
    // Lookup never allocates.
    assert!(matches!(
        Registry::open(&reg, "md0", &c),
        Err(OpenError::NotFound { .. })
    ));
    assert!(reg.names().is_empty());
    assert_eq!(
        reg.stop("md0", false).await.unwrap_err().errno(),
        Errno::Enoent
    );
    reg.create("md0", spec(2, 0, BitmapMode::None, true), &paths, false)
        .await
        .unwrap();
    // A second assemble of the same name: EEXIST at once.
    assert_eq!(
        reg.assemble("md0", &paths).await.unwrap_err().errno(),
        Errno::Eexist
    );
    let open = Registry::open(&reg, "md0", &c).unwrap();
    // A client stays: stop answers EBUSY naming it, the array is active again.
    let t = Instant::now();
    let err = reg.stop("md0", false).await.unwrap_err();
    assert!(t.elapsed() < Duration::from_secs(2));
    assert_eq!(err.errno(), Errno::Ebusy);
    assert!(err.to_string().contains("test-client"), "{err}");
    assert_eq!(reg.lookup("md0").unwrap().state, ArrayState::Active);
    // While stopping, opens answer EBUSY at once.
    let reg2 = reg.clone();
    let stopper = tokio::spawn(async move { reg2.stop("md0", true).await });
    wait_for("stopping", Duration::from_secs(2), || {
        reg.lookup("md0")
            .map(|i| i.state == ArrayState::Stopping)
            .unwrap_or(false)
    })
    .await;
    let c2 = ClientInfo::new("late");
    assert!(matches!(
        Registry::open(&reg, "md0", &c2),
        Err(OpenError::Busy { .. })
    ));
    // Forced: the client is told to go; it drops its guard.
    wait_for("disconnect", Duration::from_secs(2), || {
        open.disconnect.is_cancelled()
    })
    .await;
    drop(open.guard);
    stopper.await.unwrap().unwrap();
    assert!(matches!(
        Registry::open(&reg, "md0", &c2),
        Err(OpenError::NotFound { .. })
    ));
    assert_eq!(Exports::list(&*reg), Vec::<String>::new());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unclean_stop_resyncs_exactly_the_dirty_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let paths = files(dir.path(), 2, 40 * MIB);
    let reg = registry();
    reg.create("md0", spec(2, 0, BitmapMode::Internal, true), &paths, false)
        .await
        .unwrap();
    let dev = reg.device("md0").unwrap();
    // Chunks of 64 KiB: touch chunks 3, 10 (two writes), 11 and 12 (one spanning write).
    dev.write(3 * 65536, pattern(3, 4096), false).await.unwrap();
    dev.write(10 * 65536 + 4096, pattern(4, 4096), false)
        .await
        .unwrap();
    dev.write(10 * 65536 + 8192, pattern(5, 4096), false)
        .await
        .unwrap();
    dev.write(12 * 65536 - 4096, pattern(6, 8192), false)
        .await
        .unwrap();
    // The "crash": the members as they are now, with this instance never stopped.
    let m = read_member(&paths[1]).unwrap();
    assert_eq!(m.sb.resync_offset, 0, "dirty while written");
    assert_eq!(
        crate::format::bitmap::count_set(&m.bitmap[0].bits, m.bitmap[0].sb.chunks()),
        4
    );
    // Make member 1 differ inside a dirty chunk (a write that reached only member 0).
    let data_off = m.sb.data_offset * 512;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&paths[1])
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xee; 512], data_off + 10 * 65536).unwrap();
    drop(f);
    let copies: Vec<PathBuf> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let c = dir.path().join(format!("copy{i}"));
            std::fs::copy(p, &c).unwrap();
            c
        })
        .collect();
    let reg2 = registry();
    reg2.assemble("md1", &copies).await.unwrap();
    let dev2 = reg2.device("md1").unwrap();
    wait_for("resync", Duration::from_secs(10), || {
        !dev2.status().sync.completed.is_empty()
    })
    .await;
    let done = dev2.status().sync.completed[0].clone();
    assert_eq!(done.kind, crate::raid::SyncKind::Resync);
    assert!(done.bitmap && !done.interrupted);
    assert_eq!(done.chunks, 4, "{done:?}");
    assert_eq!(done.bytes, 4 * 65536);
    drop(dev2);
    reg2.stop("md1", false).await.unwrap();
    assert_identical(&copies);
    drop(dev);
    reg.stop("md0", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_member_degrades_and_spare_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let paths = files(dir.path(), 3, 20 * MIB);
    let reg = registry();
    reg.create("md0", spec(2, 1, BitmapMode::Internal, true), &paths, false)
        .await
        .unwrap();
    let dev = reg.device("md0").unwrap();
    dev.write(0, pattern(9, 1 << 20), false).await.unwrap();
    reg.fail_member("md0", &paths[0], MetaWrite::Local)
        .await
        .unwrap();
    // Recorded on the others before fail returns.
    let m = read_member(&paths[1]).unwrap();
    assert_eq!(m.sb.role_of(0), DevRole::Faulty);
    assert_eq!(m.sb.role_of(2), DevRole::Active(0));
    dev.write(2 << 20, pattern(7, 65536), false).await.unwrap();
    let t = Instant::now();
    while dev.status().members[2].state != MemberState::InSync {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "recovery: {:?}",
            dev.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(dev.read(0, 1 << 20).await.unwrap() == pattern(9, 1 << 20));
    // The last in-sync member is never failed.
    reg.fail_member("md0", &paths[1], MetaWrite::Local)
        .await
        .unwrap();
    reg.fail_member("md0", &paths[2], MetaWrite::Local)
        .await
        .unwrap();
    assert_eq!(dev.status().members[2].state, MemberState::InSync);
    drop(dev);
    reg.stop("md0", false).await.unwrap();
    assert_identical(&paths[2..]);
    let m = read_member(&paths[2]).unwrap();
    assert_eq!(m.sb.role(), DevRole::Active(0));
    assert_eq!(
        m.sb.feature_map & crate::format::superblock::feature::RECOVERY_OFFSET,
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_resync_throttled_interrupted_and_resumed() {
    let dir = tempfile::tempdir().unwrap();
    let paths = files(dir.path(), 2, 24 * MIB);
    // Different contents so the resync has something to do.
    std::fs::write(&paths[0], vec![0x11u8; 24 * MIB as usize]).unwrap();
    let reg = Registry::new(RegistryConfig {
        stop_grace: Duration::from_millis(300),
        drain_timeout: Duration::from_secs(5),
        assemble: AssembleOptions {
            speed: SpeedLimits {
                min_kib_s: 1000,
                max_kib_s: 2048,
            },
            ..Default::default()
        },
        ..Default::default()
    });
    reg.create("md0", spec(2, 0, BitmapMode::None, false), &paths, true)
        .await
        .unwrap();
    let dev = reg.device("md0").unwrap();
    wait_for("throttled", Duration::from_secs(5), || {
        dev.status().sync.state == WorkerState::Throttled
    })
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let p = dev.status().sync;
    assert!(p.done_bytes > 0 && p.done_bytes < 6 * MIB, "{p:?}");
    drop(dev);
    reg.stop("md0", false).await.unwrap();
    let m = read_member(&paths[0]).unwrap();
    let ckpt = m.sb.resync_offset;
    assert!(ckpt > 0 && ckpt != MAX_SECTOR, "checkpoint {ckpt}");
    // Resume at full speed from the checkpoint.
    reg.assemble("md0", &paths).await.unwrap();
    let dev = reg.device("md0").unwrap();
    reg.set_speed(
        "md0",
        SpeedLimits {
            min_kib_s: 1000,
            max_kib_s: 1 << 30,
        },
    )
    .unwrap();
    wait_for("resync end", Duration::from_secs(10), || {
        !dev.status().sync.completed.is_empty()
    })
    .await;
    let done = dev.status().sync.completed[0].clone();
    assert_eq!(done.bytes, dev.size() - ckpt * 512, "{done:?}");
    drop(dev);
    reg.stop("md0", false).await.unwrap();
    assert_identical(&paths);
    assert_eq!(read_member(&paths[1]).unwrap().sb.resync_offset, MAX_SECTOR);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readded_member_recovers_only_chunks_written_while_away() {
    let dir = tempfile::tempdir().unwrap();
    let paths = files(dir.path(), 2, 40 * MIB);
    let reg = registry();
    reg.create("md0", spec(2, 0, BitmapMode::Internal, true), &paths, false)
        .await
        .unwrap();
    let dev = reg.device("md0").unwrap();
    dev.write(0, pattern(1, 65536), false).await.unwrap();
    reg.fail_member("md0", &paths[1], MetaWrite::Local)
        .await
        .unwrap();
    // Written while member 1 is away: chunks 5, 6 and 7.
    dev.write(5 * 65536, pattern(2, 4096), false).await.unwrap();
    dev.write(6 * 65536 + 8192, pattern(3, 65536), false)
        .await
        .unwrap();
    assert_eq!(dev.bitmap().unwrap().needed_chunks(), vec![5, 6, 7]);
    assert!(reg
        .remove_member("md0", &paths[1], MetaWrite::Local)
        .await
        .unwrap());
    let out = reg.add_member("md0", &paths[1]).await.unwrap();
    assert!(out.readded);
    let t = Instant::now();
    while dev.status().degraded {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "re-add recovery: {:?}",
            dev.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let run = dev.status().sync.completed.last().cloned().unwrap();
    assert_eq!(run.kind, crate::raid::SyncKind::Recovery);
    assert!(run.bitmap);
    assert_eq!(run.chunks, 3, "{run:?}");
    drop(dev);
    reg.stop("md0", false).await.unwrap();
    assert_identical(&paths);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_member_not_removed_cannot_be_added_again() {
    let dir = tempfile::tempdir().unwrap();
    let paths = files(dir.path(), 2, 24 * MIB);
    let reg = registry();
    reg.create("md0", spec(2, 0, BitmapMode::Internal, true), &paths, false)
        .await
        .unwrap();
    let dev = reg.device("md0").unwrap();
    reg.fail_member("md0", &paths[1], MetaWrite::Local)
        .await
        .unwrap();
    dev.write(0, pattern(5, 65536), false).await.unwrap();
    let before = std::fs::read(&paths[1]).unwrap();
    let e = reg.add_member("md0", &paths[1]).await.unwrap_err();
    assert_eq!(e.errno(), Errno::Ebusy, "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("md0")
            && msg.contains(&paths[1].display().to_string())
            && msg.contains("faulty")
            && msg.contains("--remove"),
        "{msg}"
    );
    // Nothing written, and the member is listed once, still faulty.
    assert!(std::fs::read(&paths[1]).unwrap() == before);
    let same: Vec<_> = dev
        .status()
        .members
        .into_iter()
        .filter(|m| m.path == paths[1].display().to_string())
        .collect();
    assert_eq!(same.len(), 1, "{same:?}");
    assert_eq!(same[0].state, MemberState::Faulty);
    // An active member is refused the same way.
    let e = reg.add_member("md0", &paths[0]).await.unwrap_err();
    assert_eq!(e.errno(), Errno::Ebusy, "{e}");
    // Removed first, the re-add is accepted.
    assert!(reg
        .remove_member("md0", &paths[1], MetaWrite::Local)
        .await
        .unwrap());
    assert!(reg.add_member("md0", &paths[1]).await.unwrap().readded);
    drop(dev);
    reg.stop("md0", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blank_member_added_becomes_spare_and_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let paths = files(dir.path(), 3, 24 * MIB);
    let reg = registry();
    reg.create(
        "md0",
        spec(2, 0, BitmapMode::Internal, true),
        &paths[..2],
        false,
    )
    .await
    .unwrap();
    let dev = reg.device("md0").unwrap();
    dev.write(MIB, pattern(4, 1 << 20), false).await.unwrap();
    reg.fail_member("md0", &paths[0], MetaWrite::Local)
        .await
        .unwrap();
    let out = reg.add_member("md0", &paths[2]).await.unwrap();
    assert!(!out.readded);
    let t = Instant::now();
    while dev.status().degraded {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "recovery: {:?}",
            dev.status()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(dev);
    reg.stop("md0", false).await.unwrap();
    assert_identical(&paths[1..]);
    let m = read_member(&paths[2]).unwrap();
    assert_eq!(m.sb.role(), DevRole::Active(0));
    // The new member assembles with the survivor.
    reg.assemble("md0", &paths[1..]).await.unwrap();
    let dev = reg.device("md0").unwrap();
    assert!(!dev.status().degraded);
    assert!(dev.read(MIB, 1 << 20).await.unwrap() == pattern(4, 1 << 20));
    drop(dev);
    reg.stop("md0", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_error_fails_the_member_and_is_served_by_the_other() {
    let dir = tempfile::tempdir().unwrap();
    let paths = files(dir.path(), 2, 24 * MIB);
    let reg = registry();
    reg.create("md0", spec(2, 0, BitmapMode::Internal, true), &paths, false)
        .await
        .unwrap();
    let dev = reg.device("md0").unwrap();
    dev.write(8 * MIB, pattern(5, 1 << 20), false)
        .await
        .unwrap();
    // Member 0 loses its data area under the running array: its reads hit EOF.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&paths[0])
        .unwrap()
        .set_len(4 * MIB)
        .unwrap();
    for _ in 0..8 {
        assert!(dev.read(8 * MIB, 1 << 20).await.unwrap() == pattern(5, 1 << 20));
    }
    let st = dev.status();
    assert_eq!(st.members[0].state, MemberState::Faulty, "{st:?}");
    assert!(st.degraded);
    assert_eq!(
        read_member(&paths[1]).unwrap().sb.role_of(0),
        DevRole::Faulty
    );
    // Writes go on, degraded, and keep their chunks needed for a later recovery.
    dev.write(9 * MIB, pattern(6, 4096), false).await.unwrap();
    assert!(dev
        .bitmap()
        .unwrap()
        .needed_chunks()
        .contains(&(9 * MIB / 65536)));
    drop(dev);
    reg.stop("md0", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requested_resync_copies_the_chunks_marked_needed() {
    let dir = tempfile::tempdir().unwrap();
    let paths = files(dir.path(), 2, 24 * MIB);
    let reg = registry();
    reg.create("md0", spec(2, 0, BitmapMode::Internal, true), &paths, false)
        .await
        .unwrap();
    let dev = reg.device("md0").unwrap();
    // What a survivor does with a dead node's dirty chunks 2 and 9.
    let bm = dev.bitmap().unwrap().clone();
    for c in [2u64, 9] {
        bm.start_write(c * 65536, 65536).await.unwrap();
        bm.end_write(c * 65536, 65536, true);
    }
    dev.request_resync();
    let t = Instant::now();
    while dev.status().sync.completed.is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", dev.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let run = dev.status().sync.completed[0].clone();
    assert_eq!(
        (run.kind, run.chunks),
        (crate::raid::SyncKind::Resync, 2),
        "{run:?}"
    );
    assert!(bm.needed_chunks().is_empty());
    drop(dev);
    reg.stop("md0", false).await.unwrap();
    assert_eq!(read_member(&paths[0]).unwrap().sb.resync_offset, MAX_SECTOR);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_for_a_remote_resync_window_to_move_on() {
    let dir = tempfile::tempdir().unwrap();
    let paths = files(dir.path(), 2, 24 * MIB);
    let reg = registry();
    reg.create("md0", spec(2, 0, BitmapMode::Internal, true), &paths, false)
        .await
        .unwrap();
    let dev = reg.device("md0").unwrap();
    dev.set_remote_resync_window(Some((0, MIB))).await.unwrap();
    // Outside the window: goes through.
    dev.write(2 * MIB, pattern(1, 4096), false).await.unwrap();
    // Inside: waits; reads there still work (from the first member).
    let d2 = dev.clone();
    let w = tokio::spawn(async move { d2.write(512 << 10, pattern(2, 4096), false).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!w.is_finished(), "write inside the window must wait");
    dev.read(0, 4096).await.unwrap();
    dev.set_remote_resync_window(Some((MIB, 2 * MIB)))
        .await
        .unwrap();
    w.await.unwrap().unwrap();
    dev.set_remote_resync_window(None).await.unwrap();
    assert!(dev.read(512 << 10, 4096).await.unwrap() == pattern(2, 4096));
    drop(dev);
    reg.stop("md0", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_members_cannot_be_assembled_twice_under_two_names() {
    let dir = tempfile::tempdir().unwrap();
    let paths = files(dir.path(), 2, 24 * MIB);
    // Two registries sharing the node's claims.
    let claims = Arc::new(Claims::default());
    let reg_with = |slot: u32| {
        Registry::new(RegistryConfig {
            stop_grace: Duration::from_millis(300),
            drain_timeout: Duration::from_secs(5),
            slot,
            claims: claims.clone(),
            ..Default::default()
        })
    };
    let (a, b) = (reg_with(0), reg_with(0));
    a.create("md0", spec(2, 0, BitmapMode::Internal, true), &paths, false)
        .await
        .unwrap();
    for reg in [&a, &b] {
        let e = reg.assemble("md1", &paths).await.unwrap_err();
        assert_eq!(e.errno(), Errno::Ebusy, "{e}");
        let msg = e.to_string();
        assert!(
            msg.contains("\"md0\"") && msg.contains("already assembled"),
            "{msg}"
        );
        assert!(reg.lookup("md1").is_err(), "md1 left behind");
    }
    // One member alone is the same array too.
    let e = b.assemble("md1", &paths[1..]).await.unwrap_err();
    assert_eq!(e.errno(), Errno::Ebusy, "{e}");
    a.stop("md0", false).await.unwrap();
    // Stopped: the members may be assembled under another name.
    b.assemble("md1", &paths).await.unwrap();
    let e = a.assemble("md0", &paths).await.unwrap_err();
    assert_eq!(e.errno(), Errno::Ebusy, "{e}");
    b.stop("md1", false).await.unwrap();
}

/// A clustered array's superblock gate without a cluster: like the real one it re-reads
/// the superblocks from disk before each write (as under the token); while `refuse` is
/// set it fails the write instead (the update reached no member).
struct ReloadingGate {
    att: Arc<assemble::Attachment>,
    refuse: std::sync::atomic::AtomicBool,
}

impl crate::raid::MetaGate for ReloadingGate {
    fn round<'a>(
        &'a self,
        _what: String,
        write: crate::blockdev::IoFuture<'a, ()>,
    ) -> crate::blockdev::IoFuture<'a, ()> {
        Box::pin(async move {
            if self.refuse.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::Error::other(
                    "superblock write refused by the test",
                ));
            }
            let att = self.att.clone();
            tokio::task::spawn_blocking(move || att.reload(&[]))
                .await
                .unwrap()
                .unwrap();
            write.await
        })
    }
}

/// A 3-member array whose first member's failure could not be written: returns the
/// registry, the paths, the engine and the gate (now accepting writes).
async fn array_with_unrecorded_failure(
    dir: &Path,
) -> (Arc<Registry>, Vec<PathBuf>, Arc<Raid1>, Arc<ReloadingGate>) {
    let paths = files(dir, 3, 24 * MIB);
    let reg = registry();
    reg.create("md0", spec(3, 0, BitmapMode::Internal, true), &paths, false)
        .await
        .unwrap();
    let (raid, att) = reg.active_parts("md0").unwrap();
    let gate = Arc::new(ReloadingGate {
        att,
        refuse: false.into(),
    });
    raid.set_meta_gate(Some(gate.clone()));
    // Dirty already: the writes below need no superblock write of their own.
    raid.write(0, pattern(1, 4096), false).await.unwrap();
    gate.refuse.store(true, std::sync::atomic::Ordering::SeqCst);
    raid.fail_by_path(&paths[0], MetaWrite::Local)
        .await
        .unwrap();
    let e = raid.write(0, pattern(1, 4096), false).await.unwrap_err();
    assert!(e.to_string().contains("could not be recorded"), "{e}");
    for p in &paths[1..] {
        assert_eq!(read_member(p).unwrap().sb.role_of(0), DevRole::Active(0));
    }
    gate.refuse
        .store(false, std::sync::atomic::Ordering::SeqCst);
    (reg, paths, raid, gate)
}

/// Every write acknowledged from now on: the failed member is faulty in the
/// superblocks of the members still written.
fn assert_recorded_faulty(paths: &[PathBuf], dev: u32) {
    for p in paths {
        let sb = read_member(p).unwrap().sb;
        assert_eq!(
            sb.role_of(dev),
            DevRole::Faulty,
            "a write was acknowledged while the superblock of {} (events {}) shows member {dev} in sync",
            p.display(),
            sb.events
        );
    }
}

#[test]
fn clustered_bitmap_slots_sharing_a_logical_block_are_refused() {
    use crate::array::assemble::check_clustered_layout;
    let dir = tempfile::tempdir().unwrap();
    let paths = files(dir.path(), 2, 32 << 20);
    let mut s = spec(2, 0, BitmapMode::Clustered, true);
    s.cluster_name = "c1".into();
    s.nodes = Some(4);
    crate::format::io::create_members(&s, &paths, false).unwrap();
    let m = read_member(&paths[0]).unwrap();
    let bsb = m.bitmap[0].sb.clone();
    assert!(bsb.is_clustered());
    // md's layout: bitmap 8 sectors after the superblock, slots 4 KiB multiples apart.
    assert_eq!(m.sb.bitmap_offset, 8);
    for block in [512, 4096] {
        check_clustered_layout(&m.sb, &bsb, block).unwrap();
    }
    // Crafted: the bitmap one sector further on. Fine on 512-byte sectors; on 4 KiB
    // ones every slot shares its first and last block with a neighbour.
    let mut sb = m.sb.clone();
    sb.bitmap_offset = 9;
    check_clustered_layout(&sb, &bsb, 512).unwrap();
    let e = check_clustered_layout(&sb, &bsb, 4096).unwrap_err();
    assert!(e.contains("not aligned to the members' 4096-byte"), "{e}");
    // Crafted: the bitmap inside the superblock's 4 KiB block.
    sb.bitmap_offset = 2;
    for block in [512, 4096] {
        let e = check_clustered_layout(&sb, &bsb, block).unwrap_err();
        assert!(e.contains("with the superblock"), "{e}");
    }
}

use crate::testloop::Loop;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_later_superblock_write_carries_an_unrecorded_failure() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, paths, raid, _gate) = array_with_unrecorded_failure(dir.path()).await;
    // Another failure is written (the copies re-read from disk first, where member 0
    // is still in sync): that write must carry member 0's failure too.
    raid.fail_by_path(&paths[1], MetaWrite::Local)
        .await
        .unwrap();
    raid.write(MIB, pattern(2, 4096), false).await.unwrap();
    assert_recorded_faulty(&paths[2..], 0);
    assert_recorded_faulty(&paths[2..], 1);
    drop(raid);
    reg.stop("md0", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_applied_from_another_node_does_not_clear_an_unrecorded_one() {
    let dir = tempfile::tempdir().unwrap();
    let (reg, paths, raid, _gate) = array_with_unrecorded_failure(dir.path()).await;
    // Another node failed member 1 and wrote it (with member 0 in sync: it did not
    // know); this node applies it without writing.
    raid.fail_by_path(&paths[1], MetaWrite::Following)
        .await
        .unwrap();
    raid.write(MIB, pattern(2, 4096), false).await.unwrap();
    assert_recorded_faulty(&paths[2..], 0);
    drop(raid);
    reg.stop("md0", false).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_size_is_the_largest_members_and_larger_blocks_cannot_be_added() {
    let dir = tempfile::tempdir_in("/var/tmp").unwrap();
    let paths = files(dir.path(), 3, 40 * MIB);
    let small: Vec<Loop> = paths[..2].iter().map(|p| Loop::attach(p, 512)).collect();
    let big = Loop::attach(&paths[2], 4096);
    let devs: Vec<PathBuf> = small.iter().map(|l| l.0.clone()).collect();
    let reg = registry();
    reg.create("md0", spec(2, 0, BitmapMode::Internal, true), &devs, false)
        .await
        .unwrap();
    let dev = reg.device("md0").unwrap();
    assert_eq!(BlockDevice::block_size(&*dev), 512);
    let e = reg.add_member("md0", &big.0).await.unwrap_err();
    assert!(e.to_string().contains("4096-byte logical blocks"), "{e}");
    reg.stop("md0", false).await.unwrap();
}

/// Rewrites the superblock of the member at `path` through `change` (a crash state).
fn edit_superblock(path: &Path, change: impl FnOnce(&mut crate::format::superblock::Superblock)) {
    let mut sb = read_member(path).unwrap().sb;
    change(&mut sb);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &sb.encode(), crate::format::SB_OFFSET_BYTES)
        .unwrap();
}

/// Makes member `path` differ from the others at array offset `at` (a write that
/// reached only some members before a crash).
fn diverge(path: &Path, at: u64) {
    let data_off = read_member(path).unwrap().sb.data_offset * 512;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xee; 4096], data_off + at).unwrap();
}

/// A crash of a dirty array that also leaves a member recovering (stopped mid-recovery
/// at 2 MiB): the recovery must not drop the resync of the in-sync members, neither in
/// the chunks below the recovery offset nor in those above it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recovery_after_a_crash_resyncs_the_in_sync_members_too() {
    let dir = tempfile::tempdir().unwrap();
    let paths = files(dir.path(), 3, 24 * MIB);
    let reg = registry();
    reg.create("md0", spec(3, 0, BitmapMode::Internal, true), &paths, false)
        .await
        .unwrap();
    let dev = reg.device("md0").unwrap();
    // Chunks of 64 KiB: chunk 10 lies below the recovery offset, chunk 40 above it.
    dev.write(10 * 65536, pattern(1, 8192), false)
        .await
        .unwrap();
    dev.write(40 * 65536, pattern(2, 8192), false)
        .await
        .unwrap();
    // The crash: the members as they are now, this instance never stopped.
    let copies: Vec<PathBuf> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let c = dir.path().join(format!("copy{i}"));
            std::fs::copy(p, &c).unwrap();
            c
        })
        .collect();
    drop(dev);
    reg.stop("md0", false).await.unwrap();
    assert_eq!(read_member(&copies[0]).unwrap().sb.resync_offset, 0);
    // The writes in flight reached member 0 only; member 2 was being recovered.
    diverge(&copies[1], 10 * 65536);
    diverge(&copies[1], 40 * 65536);
    diverge(&copies[2], 10 * 65536);
    edit_superblock(&copies[2], |sb| {
        sb.feature_map |= crate::format::superblock::feature::RECOVERY_OFFSET;
        sb.recovery_offset = 2 * MIB / 512;
    });
    let reg2 = registry();
    reg2.assemble("md1", &copies).await.unwrap();
    let dev2 = reg2.device("md1").unwrap();
    wait_for("recovery and resync", Duration::from_secs(20), || {
        let s = dev2.status();
        !s.degraded && s.sync.kind.is_none() && !dev2.sync_busy()
    })
    .await;
    assert_eq!(dev2.status().members[2].state, MemberState::InSync);
    drop(dev2);
    reg2.stop("md1", false).await.unwrap();
    assert_identical(&copies);
    assert_eq!(
        read_member(&copies[1]).unwrap().sb.resync_offset,
        MAX_SECTOR
    );
}

/// A crash between the superblock writes of one update (here: a recovering member got
/// the newest superblock, the in-sync ones did not) leaves members one update behind
/// the freshest: they are current (md's and mdadm's margin of one), take their roles
/// from the freshest superblock, and the array assembles. A member two updates behind
/// is never taken as in sync: it is recovered in full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_one_update_behind_the_freshest_are_current() {
    let dir = tempfile::tempdir().unwrap();
    let paths = files(dir.path(), 3, 24 * MIB);
    let reg = registry();
    reg.create("md0", spec(3, 0, BitmapMode::Internal, true), &paths, false)
        .await
        .unwrap();
    let dev = reg.device("md0").unwrap();
    dev.write(MIB, pattern(7, 65536), false).await.unwrap();
    drop(dev);
    reg.stop("md0", false).await.unwrap();
    let e = read_member(&paths[0]).unwrap().sb.events;
    // Member 2 recovering with the newest superblock; member 1 two updates behind it.
    edit_superblock(&paths[2], |sb| {
        sb.events = e + 1;
        sb.feature_map |= crate::format::superblock::feature::RECOVERY_OFFSET;
        sb.recovery_offset = 0;
    });
    edit_superblock(&paths[1], |sb| sb.events = e - 1);
    diverge(&paths[1], MIB);
    diverge(&paths[2], MIB);
    reg.assemble("md0", &paths).await.unwrap();
    let dev = reg.device("md0").unwrap();
    let st = dev.status();
    assert_eq!(st.members[0].state, MemberState::InSync, "{st:?}");
    assert!(
        matches!(
            st.members[1].state,
            MemberState::Recovering { offset: 0, .. }
        ),
        "{st:?}"
    );
    assert!(
        matches!(st.members[2].state, MemberState::Recovering { .. }),
        "{st:?}"
    );
    assert!(dev.read(MIB, 65536).await.unwrap() == pattern(7, 65536));
    wait_for("recovery", Duration::from_secs(20), || {
        !dev.status().degraded && !dev.sync_busy()
    })
    .await;
    drop(dev);
    reg.stop("md0", false).await.unwrap();
    assert_identical(&paths);
    let m = read_member(&paths[1]).unwrap();
    assert_eq!(m.sb.role(), DevRole::Active(1));
    assert!(m.sb.events > e + 1);
}

/// A stop whose drain gives up (a write still in flight) answers EBUSY and keeps the
/// entry, stopping, and the claim on the members; a later stop, once the write ended,
/// stops the array and releases the claim.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_that_cannot_drain_keeps_the_array_and_its_claim() {
    let dir = tempfile::tempdir().unwrap();
    let paths = files(dir.path(), 2, 24 * MIB);
    let claims = Arc::new(Claims::default());
    let reg = Registry::new(RegistryConfig {
        stop_grace: Duration::from_millis(300),
        drain_timeout: Duration::from_millis(500),
        claims: claims.clone(),
        ..Default::default()
    });
    reg.create("md0", spec(2, 0, BitmapMode::Internal, true), &paths, false)
        .await
        .unwrap();
    let dev = reg.device("md0").unwrap();
    // A write held in flight: it waits for another node's resync window to move on.
    dev.set_remote_resync_window(Some((0, MIB))).await.unwrap();
    let d2 = dev.clone();
    let w = tokio::spawn(async move { d2.write(4096, pattern(3, 4096), false).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!w.is_finished());
    let e = reg.stop("md0", false).await.unwrap_err();
    assert_eq!(e.errno(), Errno::Ebusy, "{e}");
    assert!(e.to_string().contains("did not finish"), "{e}");
    assert_eq!(reg.lookup("md0").unwrap().state, ArrayState::Stopping);
    // The members stay claimed: no second engine over them.
    let other = Registry::new(RegistryConfig {
        claims: claims.clone(),
        ..Default::default()
    });
    let e = other.assemble("md1", &paths).await.unwrap_err();
    assert_eq!(e.errno(), Errno::Ebusy, "{e}");
    // The write ends; stopping again succeeds and releases the claim.
    dev.set_remote_resync_window(None).await.unwrap();
    w.await.unwrap().unwrap();
    drop(dev);
    reg.stop("md0", false).await.unwrap();
    assert!(reg.lookup("md0").is_err());
    other.assemble("md1", &paths).await.unwrap();
    let dev = other.device("md1").unwrap();
    assert!(dev.read(4096, 4096).await.unwrap() == pattern(3, 4096));
    drop(dev);
    other.stop("md1", false).await.unwrap();
}

/// Assembled without a member, written, crashed: the absent member is behind by more
/// than the one-update margin and is recovered, never taken as in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_absent_while_the_array_ran_is_not_current() {
    let dir = tempfile::tempdir().unwrap();
    let paths = files(dir.path(), 2, 24 * MIB);
    let reg = registry();
    reg.create("md0", spec(2, 0, BitmapMode::Internal, true), &paths, false)
        .await
        .unwrap();
    reg.stop("md0", false).await.unwrap();
    reg.assemble("md0", &paths[..1]).await.unwrap();
    let dev = reg.device("md0").unwrap();
    dev.write(MIB, pattern(5, 65536), false).await.unwrap();
    // The crash: member 0 as it is now (dirty, one update on), member 1 as it was.
    let copy0 = dir.path().join("copy0");
    std::fs::copy(&paths[0], &copy0).unwrap();
    drop(dev);
    reg.stop("md0", false).await.unwrap();
    let copies = vec![copy0, paths[1].clone()];
    reg.assemble("md1", &copies).await.unwrap();
    let dev = reg.device("md1").unwrap();
    let st = dev.status();
    assert!(
        matches!(st.members[1].state, MemberState::Recovering { .. }),
        "{st:?}"
    );
    assert!(dev.read(MIB, 65536).await.unwrap() == pattern(5, 65536));
    wait_for("recovery", Duration::from_secs(20), || {
        !dev.status().degraded && !dev.sync_busy()
    })
    .await;
    drop(dev);
    reg.stop("md1", false).await.unwrap();
    assert_identical(&copies);
}

/// One registry assembles each array in the bitmap slot it is given: a write's
/// write-intent bits land in that slot on disk, the array's other slots stay clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_array_assembles_in_the_slot_it_is_given() {
    let dir = tempfile::tempdir().unwrap();
    let reg = Registry::new(RegistryConfig {
        stop_grace: Duration::from_millis(300),
        drain_timeout: Duration::from_secs(5),
        assemble: AssembleOptions {
            // Bits stay set long enough to be seen on disk.
            daemon_sleep: Some(Duration::from_secs(60)),
            ..Default::default()
        },
        ..Default::default()
    });
    let mut arrays = Vec::new();
    for (name, slot) in [("md0", 1u32), ("md1", 2u32)] {
        let sub = dir.path().join(name);
        std::fs::create_dir(&sub).unwrap();
        let paths = files(&sub, 2, 24 * MIB);
        reg.create(name, spec(2, 0, BitmapMode::Clustered, true), &paths, false)
            .await
            .unwrap();
        reg.stop(name, false).await.unwrap();
        reg.assemble_in_slot(name, &paths, slot).await.unwrap();
        arrays.push((name, slot, paths));
    }
    for (name, _, _) in &arrays {
        let dev = reg.device(name).unwrap();
        dev.write(3 * 65536, pattern(7, 4096), false).await.unwrap();
        dev.flush().await.unwrap();
    }
    for (name, slot, paths) in &arrays {
        for p in paths {
            let m = read_member(p).unwrap();
            assert!(
                m.bitmap.len() > 2,
                "{name}: {} bitmap slots",
                m.bitmap.len()
            );
            for (s, b) in m.bitmap.iter().enumerate() {
                let set = crate::format::bitmap::count_set(&b.bits, b.sb.chunks());
                if s == *slot as usize {
                    assert_eq!(set, 1, "{name} in slot {slot}: bits of slot {s}");
                } else {
                    assert_eq!(set, 0, "{name} in slot {slot}: bits of slot {s}");
                }
            }
        }
    }
    for (name, _, _) in &arrays {
        reg.stop(name, false).await.unwrap();
    }
}

/// A superblock gate that counts the writes going through it.
#[derive(Default)]
struct CountingGate(std::sync::atomic::AtomicUsize);

impl crate::raid::MetaGate for CountingGate {
    fn round<'a>(
        &'a self,
        _what: String,
        write: crate::blockdev::IoFuture<'a, ()>,
    ) -> crate::blockdev::IoFuture<'a, ()> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        write
    }
}

/// The caller of an engine change states its superblock route: `Local` goes through
/// the array's gate, `UnderToken` is written directly, `Following` writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_caller_states_how_a_superblock_change_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let paths = files(dir.path(), 2, 24 * MIB);
    let reg = registry();
    reg.create("md0", spec(2, 0, BitmapMode::Internal, true), &paths, false)
        .await
        .unwrap();
    let (raid, att) = reg.active_parts("md0").unwrap();
    let gate = Arc::new(CountingGate::default());
    raid.set_meta_gate(Some(gate.clone()));
    let size = att.size_sectors();
    let count = || gate.0.load(std::sync::atomic::Ordering::SeqCst);
    let events = || read_member(&paths[0]).unwrap().sb.events;
    for (how, through_gate, written) in [
        (MetaWrite::Local, 1, 1),
        (MetaWrite::UnderToken, 0, 1),
        (MetaWrite::Following, 0, 0),
    ] {
        let (c0, e0) = (count(), events());
        raid.record(crate::raid::MetaEvent::Size(size), how)
            .await
            .unwrap();
        assert_eq!(
            count() - c0,
            through_gate,
            "{how:?}: writes through the gate"
        );
        assert_eq!(events() - e0, written, "{how:?}: superblock writes on disk");
    }
    drop(raid);
    reg.stop("md0", false).await.unwrap();
}

/// Library errors carry their errno as the proto enum: the agent never maps names.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_carry_their_errno() {
    let dir = tempfile::tempdir().unwrap();
    let paths = files(dir.path(), 2, 24 * MIB);
    // Device errors: a missing device, a device without a superblock.
    let missing = read_member(&dir.path().join("absent")).unwrap_err();
    assert_eq!(missing.errno(), Errno::Enoent, "{missing}");
    let blank = read_member(&paths[0]).unwrap_err();
    assert_eq!(blank.errno(), Errno::Einval, "{blank}");
    let reg = registry();
    reg.create("md0", spec(2, 0, BitmapMode::Internal, true), &paths, false)
        .await
        .unwrap();
    // An engine error keeps its own errno through the registry: a member the array
    // does not have is ENOENT, not a generic EIO.
    let e = reg
        .fail_member("md0", &dir.path().join("m9"), MetaWrite::Local)
        .await
        .unwrap_err();
    assert!(
        matches!(e, ArrayError::Raid(RaidError::NoSuchMember { .. })),
        "{e}"
    );
    assert_eq!(e.errno(), Errno::Enoent, "{e}");
    reg.stop("md0", false).await.unwrap();
}
