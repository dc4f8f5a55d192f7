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
use mdcluster_proto::v1::Errno;
use mdcluster_tests::inproc::{bitmap, member_state, settled, sync, InProc};
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

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_node_resyncs_the_other_is_pending_and_takes_over() {
    init_tracing();
    let mut c = InProc::new(2, 4, 24 * MIB).unwrap();
    c.start(1).await.unwrap();
    c.start(2).await.unwrap();

    // md0: resync on node1, PENDING on node2.
    c.tune(2048);
    c.create(1, "md0", 0..2, 2, false).await.unwrap();
    c.assemble_from(2, 1, "md0").await.unwrap();
    c.wait_mdstat(1, "md0", LONG, "node1 resyncing", |t| {
        t.contains("resync =")
    })
    .await;
    c.wait_mdstat(2, "md0", LONG, "node2 pending", |t| {
        t.contains("resync=PENDING")
    })
    .await;
    let t = c.mdstat(1, "md0");
    assert!(
        t.contains("resync =") && !t.contains("PENDING"),
        "node1 must be the one resyncing:\n{t}"
    );

    // node1 finishes; node2 drops its resync without running it.
    c.tune(500_000);
    for i in 1..=2 {
        c.wait_mdstat(i, "md0", LONG, "in sync", |t| {
            t.contains("[UU]") && !t.contains("resync")
        })
        .await;
    }
    let st = c.status(2, "md0").unwrap();
    assert_eq!(sync(&st).runs, 0, "node2 ran a resync of its own: {st:?}");
    assert_eq!(bitmap(&st).needed, 0, "{st:?}");
    assert!(sync(&c.status(1, "md0").unwrap()).runs >= 1);

    // md1: node1 resyncs, node2 pending; node1 stops mid-resync: node2 takes over.
    c.tune(2048);
    c.create(1, "md1", 2..4, 2, false).await.unwrap();
    c.assemble_from(2, 1, "md1").await.unwrap();
    c.wait_mdstat(1, "md1", LONG, "node1 resyncing md1", |t| {
        t.contains("resync =")
    })
    .await;
    c.wait_mdstat(2, "md1", LONG, "node2 pending on md1", |t| {
        t.contains("resync=PENDING")
    })
    .await;
    c.node(1).stop("md1", false).await.unwrap();
    let t = c
        .wait_mdstat(2, "md1", LONG, "node2 takes over the resync", |t| {
            t.contains("resync =")
        })
        .await;
    assert!(!t.contains("PENDING"), "{t}");
    c.tune(500_000);
    c.wait_mdstat(2, "md1", LONG, "md1 in sync on node2", |t| {
        t.contains("[UU]") && !t.contains("resync")
    })
    .await;
    let st = c.status(2, "md1").unwrap();
    assert!(sync(&st).runs >= 1, "{st:?}");
    assert_eq!(bitmap(&st).needed, 0, "{st:?}");
    assert!(
        !c.lock.locks().keys().any(|k| k.ends_with("/resync")),
        "resync lock left held: {:?}",
        c.lock.locks()
    );
    c.shutdown_all().await;
    assert_members_identical(&c.disks()[0..2]);
    assert_members_identical(&c.disks()[2..4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manage_fail_remove_re_add_is_agreed_by_every_node() {
    init_tracing();
    let mut c = InProc::new(2, 3, 16 * MIB).unwrap();
    c.start(1).await.unwrap();
    c.start(2).await.unwrap();
    c.create(1, "md0", 0..2, 2, true).await.unwrap();
    c.assemble_from(2, 1, "md0").await.unwrap();
    let (m0, m1) = (c.member(1, 0), c.member(1, 1));
    let (n2m0, n2m1) = (c.member(2, 0), c.member(2, 1));

    // --fail on node1: both nodes show the member faulty when it returns.
    c.manage(1, "md0", &[("fail", &m1)]).await.expect("fail m1");
    assert_eq!(
        member_state(&c.status(1, "md0").unwrap(), &m1).as_deref(),
        Some("faulty")
    );
    assert_eq!(
        member_state(&c.status(2, "md0").unwrap(), &n2m1).as_deref(),
        Some("faulty"),
        "node2 acked the failure before the call returned"
    );
    // A repeated fail is a no-op; the last in-sync member is refused (EBUSY).
    c.manage(2, "md0", &[("fail", &n2m1)])
        .await
        .expect("repeated fail");
    let e = c.manage(2, "md0", &[("fail", &n2m0)]).await.unwrap_err();
    assert_eq!(e.errno, Errno::Ebusy, "{e:?}");
    assert!(
        e.message.contains("last in-sync") && e.message.contains("node2"),
        "{e:?}"
    );
    // An active member cannot be removed.
    let e = c.manage(1, "md0", &[("remove", &m0)]).await.unwrap_err();
    assert_eq!(e.errno, Errno::Ebusy, "{e:?}");
    assert!(e.message.contains("fail it first"), "{e:?}");
    // --remove on node1: gone on both nodes.
    c.manage(1, "md0", &[("remove", &m1)])
        .await
        .expect("remove m1");
    for (i, p) in [(1, &m1), (2, &n2m1)] {
        assert_eq!(
            member_state(&c.status(i, "md0").unwrap(), p),
            None,
            "node{i}: m1 must be gone"
        );
    }
    let e = c.manage(2, "md0", &[("remove", &n2m1)]).await.unwrap_err();
    assert_eq!(
        e.errno,
        Errno::Enoent,
        "a removed member is not a member any more: {e:?}"
    );

    // While m1 is out both nodes write: node1 chunk 3, node2 chunk 9.
    c.write(1, "md0", 3 * MIB, vec![0x31; 65536]).await.unwrap();
    c.write(2, "md0", 9 * MIB, vec![0x32; 65536]).await.unwrap();

    // --re-add m1 on node2: back in its role on both nodes, only the bitmap's chunks.
    c.manage(2, "md0", &[("re-add", &n2m1)])
        .await
        .expect("re-add m1");
    for (i, p) in [(1, &m1), (2, &n2m1)] {
        c.wait_status(i, "md0", LONG, "m1 back in sync", |st| {
            member_state(st, p).as_deref() == Some("in_sync") && settled(st)
        })
        .await;
    }
    let runs: Vec<pb::ArrayStatus> = (1..=2)
        .map(|i| c.status(i, "md0").unwrap())
        .filter(|st| sync(st).last_kind == "recovery")
        .collect();
    assert_eq!(runs.len(), 1, "exactly one node recovers: {runs:?}");
    assert_eq!(
        sync(&runs[0]).last_chunks,
        2,
        "the re-add recovers exactly the chunks both nodes wrote while m1 was out: {:?}",
        runs[0]
    );
    c.shutdown_all().await;
    assert_members_identical(&c.disks()[0..2]);

    // A third disk joins as a new member through add after fail+remove (NEWDISK confirmed
    // by every node).
    c.start(1).await.unwrap();
    c.start(2).await.unwrap();
    c.wait_status(2, "md0", LONG, "md0 back on node2", |st| {
        st.state == pb::ArrayRunState::Active as i32
    })
    .await;
    c.wait_status(1, "md0", LONG, "md0 back on node1", |st| {
        st.state == pb::ArrayRunState::Active as i32
    })
    .await;
    c.manage(
        1,
        "md0",
        &[("fail", &m1), ("remove", &m1), ("add", &c.member(1, 2))],
    )
    .await
    .expect("fail, remove, add");
    for (i, p) in [(1, c.member(1, 2)), (2, c.member(2, 2))] {
        c.wait_status(i, "md0", LONG, "the new member in sync", |st| {
            member_state(st, &p).as_deref() == Some("in_sync") && settled(st)
        })
        .await;
    }
    c.shutdown_all().await;
    assert_members_identical(&[c.disks()[0].clone(), c.disks()[2].clone()]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grow_with_add_one_node_recovers_the_other_waits() {
    init_tracing();
    let mut c = InProc::new(2, 3, 16 * MIB).unwrap();
    c.start(1).await.unwrap();
    c.start(2).await.unwrap();
    c.create(1, "md0", 0..2, 2, true).await.unwrap();
    c.assemble_from(2, 1, "md0").await.unwrap();
    c.write(1, "md0", MIB, vec![0x5a; 1 << 20]).await.unwrap();
    c.node(1)
        .grow(pb::GrowRequest {
            name: "md0".into(),
            raid_devices: 3,
            add: vec![c.member(1, 2).display().to_string()],
            ..Default::default()
        })
        .await
        .expect("grow --raid-devices 3 --add d2");
    for (i, p) in [(1, c.member(1, 2)), (2, c.member(2, 2))] {
        let st = c
            .wait_status(i, "md0", LONG, "the third member in sync", |st| {
                member_state(st, &p).as_deref() == Some("in_sync") && settled(st)
            })
            .await;
        assert_eq!(st.raid_disks, 3, "{st:?}");
    }
    let recovered: Vec<usize> = (1..=2)
        .filter(|&i| sync(&c.status(i, "md0").unwrap()).last_kind == "recovery")
        .collect();
    assert_eq!(
        recovered.len(),
        1,
        "exactly one node recovers the new member: {recovered:?}"
    );
    // Shrinking is refused.
    let e = c
        .node(2)
        .grow(pb::GrowRequest {
            name: "md0".into(),
            raid_devices: 2,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert!(e.message.contains("shrinking"), "{e:?}");
    c.shutdown_all().await;
    assert_members_identical(c.disks());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_session_stops_its_arrays_and_rejoins_on_a_new_one() {
    init_tracing();
    let mut c = InProc::new(2, 2, 16 * MIB).unwrap();
    c.start(1).await.unwrap();
    c.start(2).await.unwrap();
    c.create(1, "md0", 0..2, 2, true).await.unwrap();
    c.assemble_from(2, 1, "md0").await.unwrap();
    let old = c.lock.session_of("node2").unwrap();
    let health = c.health(2);
    let mut ready = health.watch();
    assert!(health.is_ready());
    // node2's session expires while its agent runs (a partition longer than the TTL).
    assert!(c.lock.kill("node2"));
    tokio::time::timeout(LONG, ready.wait_for(|r| !*r))
        .await
        .expect("not ready")
        .unwrap();
    tokio::time::timeout(LONG, ready.wait_for(|r| *r))
        .await
        .expect("ready again")
        .unwrap();
    let new = c.lock.session_of("node2").expect("a new session");
    assert_ne!(new, old);
    let st = c
        .wait_status(2, "md0", LONG, "md0 assembled again", |st| {
            st.state == pb::ArrayRunState::Active as i32
        })
        .await;
    assert_eq!(bitmap(&st).slot, 1, "{st:?}");
    c.write(2, "md0", 0, vec![7; 4096]).await.unwrap();
    assert_eq!(c.read(1, "md0", 0, 4096).await.unwrap(), vec![7; 4096]);
    c.shutdown_all().await;
    assert_members_identical(c.disks());
}
