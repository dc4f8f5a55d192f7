//! The in-process tier: the md-cluster scenarios of t50/t70 with several agent nodes in
//! one process (the agent's own runtime driver, message receivers, takeover and rejoin
//! code) over the in-memory lock service (`mdcluster_tests::memlock`, a test double of
//! mdserver + etcd), on real member files. Real time with the agent's own timings (the
//! blocking member I/O runs on real threads, so tokio's paused clock cannot drive it);
//! every scenario takes about a second. The real-process twins stay the reference.
//!
//! Run: `cargo test -p mdcluster-tests --test t46_inprocess` (no binaries needed).

use std::time::Duration;

use mdcluster_proto::v1 as pb;
use mdcluster_tests::inproc::{bitmap, settled, sync, InProc};
use mdcluster_tests::standalone::{assert_members_identical, dirty_bits};

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(20);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .with_test_writer()
        .try_init();
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| seed.wrapping_add((i / 512) as u8))
        .collect()
}

/// Events of `kind` about `array` seen on `rx` so far.
fn drain_events(
    rx: &mut tokio::sync::broadcast::Receiver<pb::ArrayEvent>,
    into: &mut Vec<pb::ArrayEvent>,
) {
    while let Ok(ev) = rx.try_recv() {
        into.push(ev);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_join_one_clustered_mirror_each_on_its_own_slot() {
    init_tracing();
    let mut c = InProc::new(3, 2, 16 * MIB).unwrap();
    for i in 1..=3 {
        c.start(i).await.unwrap();
    }
    let st = c
        .create(1, "md0", 0..2, 4, true)
        .await
        .expect("create on node1");
    assert_eq!(bitmap(&st).slot, 0);
    assert_eq!(bitmap(&st).slots, 4);
    for i in 2..=3 {
        let st = c.assemble_from(i, 1, "md0").await.expect("assemble");
        assert_eq!(bitmap(&st).kind, "clustered");
        let mut paths: Vec<_> = st.members.iter().map(|m| m.path.clone()).collect();
        paths.sort();
        let want: Vec<_> = c
            .members(i, 0..2)
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        assert_eq!(
            paths, want,
            "node{i} found its own paths of the members by UUID"
        );
    }
    let slots: Vec<u32> = (1..=3)
        .map(|i| bitmap(&c.status(i, "md0").unwrap()).slot)
        .collect();
    assert_eq!(slots, [0, 1, 2], "one slot per node");
    // The slot locks are held by their nodes.
    let locks = c.lock.locks();
    let held: Vec<_> = locks
        .iter()
        .filter(|(k, _)| k.contains("/slot/"))
        .map(|(_, v)| v.join(","))
        .collect();
    assert_eq!(held.len(), 3, "{locks:?}");

    // Data written through one node reads back through the others.
    c.write(1, "md0", 0, pattern(1, 256 << 10)).await.unwrap();
    c.write(2, "md0", 4 * MIB, pattern(2, 256 << 10))
        .await
        .unwrap();
    c.write(3, "md0", 8 * MIB, pattern(3, 256 << 10))
        .await
        .unwrap();
    for i in 1..=3 {
        assert_eq!(
            c.read(i, "md0", 0, 256 << 10).await.unwrap(),
            pattern(1, 256 << 10)
        );
        assert_eq!(
            c.read(i, "md0", 4 * MIB, 256 << 10).await.unwrap(),
            pattern(2, 256 << 10)
        );
        assert_eq!(
            c.read(i, "md0", 8 * MIB, 256 << 10).await.unwrap(),
            pattern(3, 256 << 10)
        );
    }
    c.shutdown_all().await;
    assert!(c.lock.locks().is_empty(), "{:?}", c.lock.locks());
    assert_members_identical(c.disks());
    for s in 0..3 {
        assert_eq!(
            dirty_bits(&c.disks()[0], s),
            0,
            "slot {s} clean after the stops"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_of_a_writing_node_survivor_recovers_its_slot_then_it_rejoins() {
    init_tracing();
    let mut c = InProc::new(2, 2, 32 * MIB).unwrap();
    c.start(1).await.unwrap();
    c.start(2).await.unwrap();
    c.create(1, "md0", 0..2, 4, true).await.unwrap();
    c.assemble_from(2, 1, "md0").await.unwrap();
    let mut events = c.node(1).subscribe();
    // The survivors learn a slot's holder by polling (takeover::PERIOD); a holder they
    // never saw is recovered at the next join instead (t50 runs its writers this long).
    tokio::time::sleep(2 * mdcluster_agent::service::takeover::PERIOD).await;

    // node2 writes chunks 24..27 (1 MiB chunks) and crashes before its bits are
    // cleared.
    assert_eq!(bitmap(&c.status(2, "md0").unwrap()).chunk_bytes, MIB);
    let off = 24 * MIB;
    c.write(2, "md0", off, pattern(0x80, 3 * MIB as usize))
        .await
        .unwrap();
    let dirty = dirty_bits(&c.disks()[0], 1).max(dirty_bits(&c.disks()[1], 1));
    assert!(
        dirty > 0 && dirty <= 3,
        "node2 wrote only chunks 24..27: {dirty}"
    );
    let left = c.crash(2).await.unwrap();
    assert_eq!(left, ["md0"]);
    assert_eq!(
        dirty_bits(&c.disks()[0], 1).max(dirty_bits(&c.disks()[1], 1)),
        dirty,
        "a crash writes nothing"
    );

    // node1 takes over slot 1 and resyncs exactly its dirty chunks.
    let st = c
        .wait_status(1, "md0", LONG, "the recovery of slot 1", |st| {
            sync(st).runs >= 1 && settled(st)
        })
        .await;
    assert_eq!(sync(&st).last_kind, "resync", "{st:?}");
    assert!(!sync(&st).last_interrupted, "{st:?}");
    assert_eq!(
        sync(&st).last_chunks,
        dirty,
        "exactly node2's dirty chunks: {st:?}"
    );
    assert_eq!(sync(&st).runs, 1, "one resync run: {st:?}");
    assert_eq!(
        dirty_bits(&c.disks()[0], 1) + dirty_bits(&c.disks()[1], 1),
        0,
        "node2's slot is cleared on disk"
    );
    let mut seen = Vec::new();
    let end = std::time::Instant::now() + LONG;
    loop {
        drain_events(&mut events, &mut seen);
        if seen.iter().any(|e| e.event == "SlotRecovered") {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "no SlotRecovered: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let taken = seen
        .iter()
        .find(|e| e.event == "SlotTakenOver")
        .unwrap_or_else(|| panic!("no SlotTakenOver: {seen:?}"));
    assert_eq!(taken.component, "slot1");
    assert!(
        taken
            .detail
            .contains(&format!(": {dirty} dirty chunks to resync")),
        "{taken:?}"
    );
    let rec = seen.iter().find(|e| e.event == "SlotRecovered").unwrap();
    assert!(
        rec.detail
            .contains(&format!(": {dirty} dirty chunks resynced")),
        "{rec:?}"
    );

    // node2 comes back: its saved list assembles md0 again, slot clean.
    c.start(2).await.unwrap();
    let st = c
        .wait_status(2, "md0", LONG, "the rejoin of node2", |st| {
            st.state == pb::ArrayRunState::Active as i32
        })
        .await;
    assert_eq!(bitmap(&st).slot, 1, "{st:?}");
    assert_eq!(bitmap(&st).needed, 0, "{st:?}");
    assert_eq!(sync(&st).last_chunks, 0, "{st:?}");
    assert_eq!(
        c.read(2, "md0", off, 4096).await.unwrap(),
        pattern(0x80, 4096),
        "node2's acknowledged write survived its crash"
    );
    c.shutdown_all().await;
    assert_members_identical(c.disks());
    assert!(c.lock.locks().is_empty(), "{:?}", c.lock.locks());
}
