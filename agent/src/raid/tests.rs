//! Engine ordering tests over real files: member failures recorded before writes are
//! acknowledged, RESYNCING windows quiesced before they are acknowledged, sources
//! chosen by role.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::AtomicBool;

use super::*;

const MIB: u64 = 1 << 20;

/// A tmpfs mounted for one test, filled up so writes into the holes of a sparse file
/// on it fail with ENOSPC; unmounted on drop.
struct FullTmpfs {
    dir: tempfile::TempDir,
}

impl FullTmpfs {
    /// Mounts a 1 MiB tmpfs with a sparse member file of `bytes`, then fills it.
    fn with_member(bytes: u64) -> (FullTmpfs, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
            .arg(dir.path())
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs on {}", dir.path().display());
        let fs = FullTmpfs { dir };
        let member = fs.dir.path().join("member");
        std::fs::File::create(&member)
            .unwrap()
            .set_len(bytes)
            .unwrap();
        // Fill the rest: writes into the member's holes now fail.
        let filler = fs.dir.path().join("filler");
        let chunk = vec![0xaau8; 64 * 1024];
        let mut f = std::fs::File::create(&filler).unwrap();
        use std::io::Write;
        while f.write_all(&chunk).is_ok() {}
        (fs, member)
    }
}

impl Drop for FullTmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}

fn file(dir: &Path, name: &str, bytes: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(bytes).unwrap();
    p
}

fn member_spec(path: &Path, role: u16) -> MemberSpec {
    MemberSpec {
        io: Arc::new(MemberIo::open(path).unwrap()),
        data_offset: 0,
        dev_number: role as u32,
        role: Some(role),
        state: MemberState::InSync,
    }
}

/// A metadata store that records events and, for [`MetaEvent::Faulty`], waits for the
/// test to release it (`hold`) and fails when `fail` is set.
struct TestMeta {
    hold: AtomicBool,
    release: tokio::sync::Semaphore,
    fail: AtomicBool,
    faulty_seen: AtomicUsize,
    events: Mutex<Vec<MetaEvent>>,
}

impl Default for TestMeta {
    fn default() -> Self {
        TestMeta {
            hold: AtomicBool::new(false),
            release: tokio::sync::Semaphore::new(0),
            fail: AtomicBool::new(false),
            faulty_seen: AtomicUsize::new(0),
            events: Mutex::new(Vec::new()),
        }
    }
}

impl MetaStore for TestMeta {
    fn update(&self, event: MetaEvent, _live: Vec<usize>, _faulty: Vec<usize>) -> IoFuture<'_, ()> {
        Box::pin(async move {
            self.events.lock().unwrap().push(event.clone());
            if let MetaEvent::Faulty { .. } = event {
                self.faulty_seen.fetch_add(1, Ordering::SeqCst);
                if self.hold.load(Ordering::SeqCst) {
                    self.release.acquire().await.unwrap().forget();
                }
                if self.fail.load(Ordering::SeqCst) {
                    return Err(io::Error::other("superblock write refused by the test"));
                }
            }
            Ok(())
        })
    }
}

fn engine(name: &str, members: Vec<MemberSpec>, size: u64, meta: Arc<dyn MetaStore>) -> Arc<Raid1> {
    Raid1::start(Raid1Config {
        name: name.into(),
        size,
        raid_disks: members.len() as u32,
        members,
        bitmap: None,
        meta,
        resync_from: None,
        speed: SpeedLimits::default(),
        gated: false,
        safe_mode: None,
    })
    .unwrap()
}

fn data(len: usize, seed: u8) -> Bytes {
    Bytes::from(vec![seed; len])
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_wait_until_the_member_failure_is_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    let good = file(dir.path(), "good", 8 * MIB);
    let (_fs, bad) = FullTmpfs::with_member(8 * MIB);
    let meta = Arc::new(TestMeta::default());
    meta.hold.store(true, Ordering::SeqCst);
    let raid = engine(
        "md-pending",
        vec![member_spec(&good, 0), member_spec(&bad, 1)],
        4 * MIB,
        meta.clone(),
    );
    // The first write fails on the full tmpfs: the member is failed and its
    // superblock update held.
    let r1 = raid.clone();
    let first = tokio::spawn(async move { r1.write(0, data(65536, 1), false).await });
    wait_until("the Faulty update", || {
        meta.faulty_seen.load(Ordering::SeqCst) == 1
    })
    .await;
    assert_eq!(raid.status().members[1].state, MemberState::Faulty);
    // A second write skips the failed member: it must not be acknowledged before the
    // update is durable.
    let r2 = raid.clone();
    let second = tokio::spawn(async move { r2.write(MIB, data(65536, 2), false).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !second.is_finished(),
        "a write that skipped the failed member was acknowledged before the Faulty update was written"
    );
    assert!(
        !first.is_finished(),
        "the failing write was acknowledged early"
    );
    meta.release.add_permits(1);
    first.await.unwrap().unwrap();
    second.await.unwrap().unwrap();
    // The data is on the good member.
    let on_disk = std::fs::read(&good).unwrap();
    assert!(on_disk[MIB as usize..MIB as usize + 65536]
        .iter()
        .all(|&b| b == 2));
    raid.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_member_write_is_counted_as_a_member_io_error() {
    let dir = tempfile::tempdir().unwrap();
    let good = file(dir.path(), "good", 8 * MIB);
    let (_fs, bad) = FullTmpfs::with_member(8 * MIB);
    let raid = engine(
        "md-ioerr",
        vec![member_spec(&good, 0), member_spec(&bad, 1)],
        4 * MIB,
        Arc::new(TestMeta::default()),
    );
    let m = crate::metrics::agent();
    assert_eq!(m.member_io_errors_of("md-ioerr", &bad), 0);
    raid.write(0, data(65536, 1), false).await.unwrap();
    assert_eq!(raid.status().members[1].state, MemberState::Faulty);
    assert_eq!(m.member_io_errors_of("md-ioerr", &bad), 1);
    assert_eq!(m.member_io_errors_of("md-ioerr", &good), 0);
    // Later writes skip the faulty member: no more errors.
    raid.write(MIB, data(65536, 2), false).await.unwrap();
    assert_eq!(m.member_io_errors_of("md-ioerr", &bad), 1);
    raid.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_fail_while_the_member_failure_cannot_be_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let good = file(dir.path(), "good", 8 * MIB);
    let (_fs, bad) = FullTmpfs::with_member(8 * MIB);
    let meta = Arc::new(TestMeta::default());
    meta.fail.store(true, Ordering::SeqCst);
    let raid = engine(
        "md-unrecorded",
        vec![member_spec(&good, 0), member_spec(&bad, 1)],
        4 * MIB,
        meta.clone(),
    );
    let e1 = raid.write(0, data(65536, 1), false).await.unwrap_err();
    assert!(e1.to_string().contains("could not be recorded"), "{e1}");
    // A later write skips the failed member; still not acknowledged.
    let e2 = raid.write(MIB, data(65536, 2), false).await.unwrap_err();
    assert!(e2.to_string().contains("could not be recorded"), "{e2}");
    let e3 = raid.flush().await.unwrap_err();
    assert!(e3.to_string().contains("could not be recorded"), "{e3}");
    // Once a superblock update succeeds, writes are acknowledged again.
    meta.fail.store(false, Ordering::SeqCst);
    raid.write(2 * MIB, data(65536, 3), false).await.unwrap();
    raid.write(3 * MIB, data(65536, 4), false).await.unwrap();
    let faulty = meta
        .events
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, MetaEvent::Faulty { member: 1 }))
        .count();
    assert!(faulty >= 2, "the failed update was not retried");
    raid.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// Bitmap pages go nowhere; while `hold` is set a page write waits for `release`.
struct HeldPages {
    hold: AtomicBool,
    release: tokio::sync::Semaphore,
    waiting: AtomicUsize,
}

impl crate::bitmap::BitmapStore for HeldPages {
    fn write_pages(&self, _pages: Vec<(u64, Bytes)>) -> IoFuture<'_, ()> {
        Box::pin(async move {
            if self.hold.load(Ordering::SeqCst) {
                self.waiting.fetch_add(1, Ordering::SeqCst);
                self.release.acquire().await.unwrap().forget();
            }
            Ok(())
        })
    }
    fn flush_members(&self) -> IoFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}

/// A 2-member engine whose bitmap page writes are held (`HeldPages`).
fn engine_with_held_bitmap(dir: &Path) -> ([PathBuf; 2], Arc<HeldPages>, Arc<Raid1>) {
    let paths = [file(dir, "a", 4 * MIB), file(dir, "b", 4 * MIB)];
    let size = 4 * MIB;
    let geom = crate::bitmap::Geometry {
        chunk_bytes: 64 << 10,
        chunks: size / (64 << 10),
        daemon_sleep: Duration::from_secs(60),
    };
    let pages = Arc::new(HeldPages {
        hold: AtomicBool::new(true),
        release: tokio::sync::Semaphore::new(0),
        waiting: AtomicUsize::new(0),
    });
    let bitmap = Arc::new(
        WriteIntent::new(
            "md-q",
            geom,
            vec![0; geom.image_bytes()],
            false,
            pages.clone(),
        )
        .unwrap(),
    );
    let raid = Raid1::start(Raid1Config {
        name: "md-q".into(),
        size,
        raid_disks: 2,
        members: vec![member_spec(&paths[0], 0), member_spec(&paths[1], 1)],
        bitmap: Some(bitmap),
        meta: Arc::new(TestMeta::default()),
        resync_from: None,
        speed: SpeedLimits::default(),
        gated: false,
        safe_mode: None,
    })
    .unwrap();
    (paths, pages, raid)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resync_window_is_acknowledged_after_writes_in_flight_into_it() {
    let dir = tempfile::tempdir().unwrap();
    let (paths, pages, raid) = engine_with_held_bitmap(dir.path());
    // A write past its window check, held in its bitmap flush.
    let r = raid.clone();
    let held = tokio::spawn(async move { r.write(0, data(4096, 7), false).await });
    wait_until("the write to reach its bitmap flush", || {
        pages.waiting.load(Ordering::SeqCst) == 1
    })
    .await;
    // RESYNCING(0, 1 MiB) arrives: not acknowledged while that write is in flight.
    let r = raid.clone();
    let install = tokio::spawn(async move { r.set_remote_resync_window(Some((0, MIB))).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !install.is_finished(),
        "the window was acknowledged while a write into it was in flight"
    );
    // The window is installed already: a write that starts now waits for it to move.
    let r = raid.clone();
    let later = tokio::spawn(async move { r.write(8192, data(4096, 8), false).await });
    // Outside the window: not held by it.
    pages.hold.store(false, Ordering::SeqCst);
    pages.release.add_permits(1);
    install.await.unwrap().unwrap();
    assert!(
        held.is_finished(),
        "acknowledged before the write in flight ended"
    );
    held.await.unwrap().unwrap();
    raid.write(2 * MIB, data(4096, 9), false).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !later.is_finished(),
        "a write inside the installed window went through"
    );
    let a = std::fs::read(&paths[0]).unwrap();
    assert!(
        a[8192..12288].iter().all(|&b| b == 0),
        "the later write reached the disk"
    );
    raid.set_remote_resync_window(Some((MIB, 2 * MIB)))
        .await
        .unwrap();
    later.await.unwrap().unwrap();
    raid.set_remote_resync_window(None).await.unwrap();
    raid.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A clustered array's superblock writes, done directly (no cluster here).
struct Direct;

impl MetaGate for Direct {
    fn round<'a>(&'a self, _what: String, write: IoFuture<'a, ()>) -> IoFuture<'a, ()> {
        write
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sync_source_is_chosen_by_role_whatever_the_member_order() {
    let dir = tempfile::tempdir().unwrap();
    let role0 = file(dir.path(), "role0", 2 * MIB);
    let role1 = file(dir.path(), "role1", 2 * MIB);
    // The mirrors differ (as before a resync): each holds its own pattern.
    std::fs::write(&role0, vec![0x00u8; 2 * MIB as usize]).unwrap();
    std::fs::write(&role1, vec![0x11u8; 2 * MIB as usize]).unwrap();
    // Two nodes, the members given in opposite orders. Gated without a gate: the
    // resync stays pending, its plan can be read.
    let start = |members: Vec<MemberSpec>| {
        Raid1::start(Raid1Config {
            name: "md-role".into(),
            size: MIB,
            raid_disks: 2,
            members,
            bitmap: None,
            meta: Arc::new(TestMeta::default()),
            resync_from: Some(0),
            speed: SpeedLimits::default(),
            gated: true,
            safe_mode: None,
        })
        .unwrap()
    };
    let a = start(vec![member_spec(&role0, 0), member_spec(&role1, 1)]);
    let b = start(vec![member_spec(&role1, 1), member_spec(&role0, 0)]);
    for raid in [&a, &b] {
        raid.set_meta_gate(Some(Arc::new(Direct)));
    }
    for raid in [&a, &b] {
        let job = sync::plan(raid).expect("a resync is owed");
        let src = raid.member(job.source).io.path().to_path_buf();
        assert_eq!(src, role0, "resync source of one node");
        // Inside another node's resync window reads come from the same device.
        raid.set_remote_resync_window(Some((0, MIB))).await.unwrap();
        for _ in 0..4 {
            let got = raid.read(4096, 4096).await.unwrap();
            assert!(
                got.iter().all(|&x| x == 0x00),
                "a read inside the window came from {} (byte {:#x})",
                if got[0] == 0x11 { "role 1" } else { "?" },
                got[0]
            );
        }
        raid.set_remote_resync_window(None).await.unwrap();
    }
    a.shutdown(Duration::from_secs(5)).await.unwrap();
    b.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_whose_writes_do_not_finish_is_refused_in_time() {
    let dir = tempfile::tempdir().unwrap();
    let (_paths, pages, raid) = engine_with_held_bitmap(dir.path());
    let r = raid.clone();
    let held = tokio::spawn(async move { r.write(MIB / 2, data(4096, 7), false).await });
    wait_until("the write to reach its bitmap flush", || {
        pages.waiting.load(Ordering::SeqCst) == 1
    })
    .await;
    let t = Instant::now();
    let e = raid
        .set_remote_resync_window(Some((0, MIB)))
        .await
        .unwrap_err();
    let waited = t.elapsed();
    assert!(
        waited >= REMOTE_QUIESCE && waited < REMOTE_QUIESCE + Duration::from_secs(5),
        "{waited:?}"
    );
    let msg = e.to_string();
    assert!(
        msg.contains("md-q") && msg.contains("did not finish") && msg.contains("524288"),
        "{msg}"
    );
    pages.hold.store(false, Ordering::SeqCst);
    pages.release.add_permits(1);
    held.await.unwrap().unwrap();
    raid.set_remote_resync_window(None).await.unwrap();
    raid.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_waiting_for_its_failure_update_holds_neither_barrier_nor_window() {
    let dir = tempfile::tempdir().unwrap();
    let good = file(dir.path(), "good", 8 * MIB);
    let (_fs, bad) = FullTmpfs::with_member(8 * MIB);
    let meta = Arc::new(TestMeta::default());
    // The Faulty update waits, as for the cluster token another node's round holds.
    meta.hold.store(true, Ordering::SeqCst);
    let raid = engine(
        "md-split",
        vec![member_spec(&good, 0), member_spec(&bad, 1)],
        4 * MIB,
        meta.clone(),
    );
    let r = raid.clone();
    let w = tokio::spawn(async move { r.write(0, data(65536, 5), false).await });
    wait_until("the Faulty update", || {
        meta.faulty_seen.load(Ordering::SeqCst) == 1
    })
    .await;
    // A sync step gets the exclusive barrier.
    let b = tokio::time::timeout(Duration::from_secs(2), raid.barrier.write()).await;
    assert!(
        b.is_ok(),
        "a write waiting for its member failure's superblock update holds the barrier"
    );
    drop(b);
    // RESYNCING over the write's range: answered at once (not after the quiesce
    // bound), and refused while the failure is not on disk.
    let t = Instant::now();
    let e = raid
        .set_remote_resync_window(Some((0, MIB)))
        .await
        .unwrap_err();
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "the window waited {:?} for a write whose data is on the members",
        t.elapsed()
    );
    assert!(
        matches!(e, RaidError::FailurePending { .. }) && e.to_string().contains("not yet recorded"),
        "{e}"
    );
    assert!(
        !w.is_finished(),
        "acknowledged before the update was written"
    );
    meta.release.add_permits(1);
    w.await.unwrap().unwrap();
    // Recorded: the window is acknowledged now.
    raid.set_remote_resync_window(Some((0, MIB))).await.unwrap();
    raid.set_remote_resync_window(None).await.unwrap();
    raid.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A sync gate that runs at once and refuses every window while `refuse` is set.
struct RefusingGate {
    refuse: AtomicBool,
    asked: AtomicUsize,
}

impl SyncGate for RefusingGate {
    fn begin(&self, _kind: SyncKind, _bytes: u64) -> GateFuture<'_, GateDecision> {
        Box::pin(async { GateDecision::Run })
    }
    fn window(&self, lo: u64, hi: u64) -> GateFuture<'_, Result<(), String>> {
        Box::pin(async move {
            self.asked.fetch_add(1, Ordering::SeqCst);
            if self.refuse.load(Ordering::SeqCst) {
                return Err(format!("node b refused RESYNCING({lo}, {hi})"));
            }
            Ok(())
        })
    }
    fn end(&self, _kind: SyncKind, _finished: bool) -> GateFuture<'_, ()> {
        Box::pin(async {})
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_window_not_acknowledged_by_every_node_is_not_copied() {
    let dir = tempfile::tempdir().unwrap();
    let role0 = file(dir.path(), "role0", 2 * MIB);
    let role1 = file(dir.path(), "role1", 2 * MIB);
    std::fs::write(&role0, vec![0x00u8; 2 * MIB as usize]).unwrap();
    std::fs::write(&role1, vec![0x11u8; 2 * MIB as usize]).unwrap();
    let raid = Raid1::start(Raid1Config {
        name: "md-refused".into(),
        size: 2 * MIB,
        raid_disks: 2,
        members: vec![member_spec(&role0, 0), member_spec(&role1, 1)],
        bitmap: None,
        meta: Arc::new(TestMeta::default()),
        resync_from: Some(0),
        speed: SpeedLimits::default(),
        gated: true,
        safe_mode: None,
    })
    .unwrap();
    raid.set_meta_gate(Some(Arc::new(Direct)));
    let gate = Arc::new(RefusingGate {
        refuse: AtomicBool::new(true),
        asked: AtomicUsize::new(0),
    });
    raid.set_sync_gate(Some(gate.clone()));
    wait_until("the window to be announced again", || {
        gate.asked.load(Ordering::SeqCst) >= 3
    })
    .await;
    let b = std::fs::read(&role1).unwrap();
    assert!(
        b.iter().all(|&x| x == 0x11),
        "the resync copied a window another node had not acknowledged"
    );
    gate.refuse.store(false, Ordering::SeqCst);
    wait_until("the resync to finish", || {
        std::fs::read(&role1).unwrap().iter().all(|&x| x == 0x00)
    })
    .await;
    raid.shutdown(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test(start_paused = true)]
async fn a_write_waits_while_the_remote_window_moves() {
    let dir = tempfile::tempdir().unwrap();
    let a = file(dir.path(), "a", 8 * MIB);
    let b = file(dir.path(), "b", 8 * MIB);
    let raid = engine(
        "md-moving",
        vec![member_spec(&a, 0), member_spec(&b, 1)],
        8 * MIB,
        Arc::new(TestMeta::default()),
    );
    // A window over the write that moves every 20 s but keeps covering it for 60 s:
    // longer in all than the stall bound, never still for that long.
    raid.set_remote_resync_window(Some((0, 4 * MIB)))
        .await
        .unwrap();
    let r = raid.clone();
    let w = tokio::spawn(async move { r.write(3 * MIB, data(4096, 3), false).await });
    for k in 1..=3u64 {
        tokio::time::sleep(REMOTE_STALL * 2 / 3).await;
        assert!(!w.is_finished(), "the write went through inside the window");
        let lo = k * 64 * 1024;
        raid.set_remote_resync_window(Some((lo, lo + 4 * MIB)))
            .await
            .unwrap();
    }
    raid.set_remote_resync_window(Some((4 * MIB, 8 * MIB)))
        .await
        .unwrap();
    w.await.unwrap().unwrap();
    // A window that stops moving: the write fails once it was still for the bound.
    let r = raid.clone();
    let stuck = tokio::spawn(async move { r.write(5 * MIB, data(4096, 4), false).await });
    tokio::time::sleep(REMOTE_STALL + Duration::from_secs(1)).await;
    let e = stuck.await.unwrap().unwrap_err();
    assert_eq!(e.kind(), io::ErrorKind::TimedOut);
    assert!(e.to_string().contains("has not moved"), "{e}");
    raid.set_remote_resync_window(None).await.unwrap();
    raid.shutdown(Duration::from_secs(5)).await.unwrap();
}

/// A clustered array whose node is fenced: a write is refused at the members (no
/// member failed, no superblock update, an error to the caller, never success), new
/// requests wait at the gate and go on once the deadline moves forward, or fail with
/// EIO after the suspend timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fenced_node_suspends_member_io_and_resumes_when_renewed() {
    use crate::fence::{is_fenced, FenceGate};
    use mdcluster_proto::lock_client::FenceDeadline;
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        file(dir.path(), "a", 4 * MIB),
        file(dir.path(), "b", 4 * MIB),
    );
    let gate = FenceGate::new("n1", Duration::from_millis(1500));
    let deadline = FenceDeadline::manual(std::time::Instant::now() + Duration::from_secs(60));
    gate.set_session(Some(deadline.clone()));
    let ticket = gate.ticket();
    let specs = vec![member_spec(&a, 0), member_spec(&b, 1)];
    for s in &specs {
        assert!(s.io.set_fence(ticket.clone()));
    }
    let meta = Arc::new(TestMeta::default());
    let raid = engine("md0", specs, 4 * MIB, meta.clone());
    assert!(raid.set_fence_ticket(ticket.clone()));
    raid.write(0, data(65536, 1), false).await.unwrap();
    raid.flush().await.unwrap();

    // Fenced: the member-level check refuses (what a request that got past the
    // array's wait before the deadline meets), and nothing is failed.
    deadline.move_to(Some(std::time::Instant::now()));
    let e = raid.write_impl(0, data(65536, 2), false).await.unwrap_err();
    assert!(is_fenced(&e), "{e}");
    let e = raid.flush_impl().await.unwrap_err();
    assert!(is_fenced(&e), "{e}");
    let e = raid.read_impl(0, 4096).await.unwrap_err();
    assert!(is_fenced(&e), "{e}");
    assert!(raid
        .status()
        .members
        .iter()
        .all(|m| m.state == MemberState::InSync));
    assert_eq!(meta.faulty_seen.load(Ordering::SeqCst), 0);
    assert!(std::fs::read(&a).unwrap()[..65536].iter().all(|&x| x == 1));

    // A request now waits at the gate; renewing the session lets it through.
    let r2 = raid.clone();
    let waiting = tokio::spawn(async move { r2.write(0, data(65536, 3), false).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "a request of a fenced array waits");
    assert!(std::fs::read(&b).unwrap()[..65536].iter().all(|&x| x == 1));
    deadline.move_to(Some(std::time::Instant::now() + Duration::from_secs(60)));
    waiting.await.unwrap().unwrap();
    for m in [&a, &b] {
        assert!(std::fs::read(m).unwrap()[..65536].iter().all(|&x| x == 3));
    }

    // Not renewed within the suspend timeout: EIO, nothing written.
    deadline.move_to(None);
    let started = Instant::now();
    let e = raid.write(0, data(65536, 4), false).await.unwrap_err();
    assert!(started.elapsed() >= Duration::from_millis(1500), "{e}");
    assert!(e.to_string().contains("suspended"), "{e}");
    let e = raid.flush().await.unwrap_err();
    assert!(e.to_string().contains("suspended"), "{e}");
    for m in [&a, &b] {
        assert!(std::fs::read(m).unwrap()[..65536].iter().all(|&x| x == 3));
    }
    assert!(gate.refused() >= 4);
    assert_eq!(meta.faulty_seen.load(Ordering::SeqCst), 0);
    raid.fence();
    let _ = raid.shutdown(Duration::from_secs(5)).await;
}

/// A member write the device itself refuses with a reservation conflict (`EBADE`: a
/// survivor preempted this node's key) is fenced like a gate refusal: an error to the
/// caller, no member failed, no superblock update, nothing written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reservation_conflict_is_fenced_not_a_member_failure() {
    use crate::fence::is_fenced;
    use crate::reserve::{ArrayPr, MemoryDevice, MemoryPr, PrError, PrKey, Reservations};
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        file(dir.path(), "a", 4 * MIB),
        file(dir.path(), "b", 4 * MIB),
    );
    // Both members, shared by this node (n1, slot 0) and a survivor (n2, slot 1).
    let devs = [
        Arc::new(MemoryDevice::default()),
        Arc::new(MemoryDevice::default()),
    ];
    let handles = |node: &str| -> Vec<Arc<dyn Reservations>> {
        devs.iter()
            .map(|d| Arc::new(MemoryPr::new(d.clone(), node)) as Arc<dyn Reservations>)
            .collect()
    };
    let (n1, n2) = (
        ArrayPr::with_devices(handles("n1"), vec![]),
        ArrayPr::with_devices(handles("n2"), vec![]),
    );
    let (k1, k2) = (PrKey::new(0, 5), PrKey::new(1, 6));
    n1.join(k1).unwrap();
    n2.join(k2).unwrap();
    // The device judges each of n1's member writes.
    for (p, d) in [(&a, &devs[0]), (&b, &devs[1])] {
        let h = MemoryPr::new(d.clone(), "n1");
        crate::directio::test_hook::set_judge(
            p,
            Arc::new(move || {
                h.write().map_err(|e| match e {
                    PrError::Conflict { source, .. } | PrError::Unsupported { source, .. } => {
                        source
                    }
                })
            }),
        );
    }
    struct Unhook(Vec<PathBuf>);
    impl Drop for Unhook {
        fn drop(&mut self) {
            for p in &self.0 {
                crate::directio::test_hook::clear(p);
            }
        }
    }
    let _unhook = Unhook(vec![a.clone(), b.clone()]);
    let meta = Arc::new(TestMeta::default());
    let raid = engine(
        "md0",
        vec![member_spec(&a, 0), member_spec(&b, 1)],
        4 * MIB,
        meta.clone(),
    );
    raid.write(0, data(65536, 1), false).await.unwrap();
    raid.flush().await.unwrap();

    // n2 takes n1's slot over: n1's key is preempted on both members.
    n2.take_over(k2, k1).unwrap();
    let e = raid.write_impl(0, data(65536, 2), false).await.unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EBADE), "{e}");
    assert!(is_fenced(&e), "a reservation conflict is fenced: {e}");
    assert!(
        raid.status()
            .members
            .iter()
            .all(|m| m.state == MemberState::InSync),
        "no member failed: {:?}",
        raid.status().members
    );
    assert_eq!(meta.faulty_seen.load(Ordering::SeqCst), 0);
    for m in [&a, &b] {
        assert!(std::fs::read(m).unwrap()[..65536].iter().all(|&x| x == 1));
    }
    raid.fence();
    let _ = raid.shutdown(Duration::from_secs(5)).await;
}
