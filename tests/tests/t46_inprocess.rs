//! The in-process tier: the md-cluster scenarios of t50/t70 with several agent nodes in
//! one process (the agent's own runtime driver, message receivers, takeover and rejoin
//! code) over the in-memory lock service (`mdcluster_tests::memlock`, a test double of
//! mdserver + etcd), on real member files. Real time with the agent's own timings (the
//! blocking member I/O runs on real threads, so tokio's paused clock cannot drive it);
//! every scenario takes about a second. The real-process twins stay the reference.
//!
//! Run: `cargo test -p mdcluster-tests --test t46_inprocess` (no binaries needed).

use std::time::Duration;

use mdcluster_agent::cluster::Timings;
use mdcluster_agent::lockport::SessionState;
use mdcluster_proto::v1 as pb;
use mdcluster_proto::v1::Errno;
use mdcluster_tests::inproc::{bitmap, member_state, settled, sync, InProc};
use mdcluster_tests::standalone::{assert_members_identical, dirty_bits};

const MIB: u64 = 1 << 20;
const LONG: Duration = Duration::from_secs(20);

fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            std::env::var("RUST_LOG")
                .unwrap_or_else(|_| "warn,mdcluster_agent::reserve=error".into()),
        )
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

/// Waits up to `within` for node1's `SlotRecovered` on `rx` (`stuck` says what is
/// wrong if it never comes), then checks that the takeover was announced first and
/// that both events name slot 1 and its `dirty` chunks.
async fn expect_slot1_recovered(
    rx: &mut tokio::sync::broadcast::Receiver<pb::ArrayEvent>,
    within: Duration,
    dirty: u64,
    stuck: impl Fn() -> String,
) {
    let mut seen = Vec::new();
    let end = std::time::Instant::now() + within;
    loop {
        drain_events(rx, &mut seen);
        if seen.iter().any(|e| e.event == "SlotRecovered") {
            break;
        }
        assert!(
            std::time::Instant::now() < end,
            "{}; node1's events: {seen:?}",
            stuck()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let taken = seen
        .iter()
        .position(|e| e.event == "SlotTakenOver")
        .unwrap_or_else(|| panic!("no SlotTakenOver: {seen:?}"));
    let rec = seen
        .iter()
        .position(|e| e.event == "SlotRecovered")
        .expect("seen above");
    assert!(taken < rec, "SlotRecovered before SlotTakenOver: {seen:?}");
    let (taken, rec) = (&seen[taken], &seen[rec]);
    assert_eq!(taken.component, "slot1");
    assert!(
        taken
            .detail
            .contains(&format!(": {dirty} dirty chunks to resync")),
        "{taken:?}"
    );
    assert_eq!(rec.component, "slot1");
    assert!(
        rec.detail
            .contains(&format!(": {dirty} dirty chunks resynced")),
        "{rec:?}"
    );
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
    c.mirror_on_two_nodes(4).await;
    let mut events = c.node(1).subscribe();
    // The survivors learn a slot's holder by polling (the takeover period): node1
    // sees node2 hold slot 1 before it crashes (a holder never seen is covered by
    // `a_node_that_dies_between_two_takeover_reads_has_its_slot_recovered`).
    tokio::time::sleep(3 * mdcluster_tests::inproc::timings().takeover_period).await;

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
    expect_slot1_recovered(&mut events, LONG, dirty, || "no SlotRecovered".into()).await;

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
async fn a_node_that_dies_between_two_takeover_reads_has_its_slot_recovered() {
    init_tracing();
    let mut c = InProc::new(2, 2, 32 * MIB).unwrap();
    // node1 reads the slot holders every `period`, its loop starting with its start:
    // its reads fall at t0 + k·period (a little after). node2 joins, writes and
    // crashes between two of them, so node1 never sees it hold slot 1.
    let period = Duration::from_secs(3);
    c.set_timings(
        1,
        Timings {
            takeover_period: period,
            ..mdcluster_tests::inproc::timings()
        },
    );
    let t0 = tokio::time::Instant::now();
    c.start(1).await.unwrap();
    c.start(2).await.unwrap();
    c.create(1, "md0", 0..2, 4, true).await.unwrap();
    let mut events = c.node(1).subscribe();
    // Past the first read of node1 that saw md0 (slot 1 free, never held).
    let k = t0.elapsed().as_millis() / period.as_millis() + 1;
    let read = t0 + period * k as u32;
    tokio::time::sleep_until(read + Duration::from_millis(300)).await;

    c.assemble_from(2, 1, "md0").await.unwrap();
    assert_eq!(bitmap(&c.status(2, "md0").unwrap()).slot, 1);
    let off = 24 * MIB;
    c.write(2, "md0", off, pattern(0x90, 3 * MIB as usize))
        .await
        .unwrap();
    let dirty = dirty_bits(&c.disks()[0], 1).max(dirty_bits(&c.disks()[1], 1));
    assert!(
        dirty > 0 && dirty <= 3,
        "node2 wrote only chunks 24..27: {dirty}"
    );
    assert_eq!(c.crash(2).await.unwrap(), ["md0"]);
    let next = read + period;
    assert!(
        tokio::time::Instant::now() + Duration::from_millis(100) < next,
        "node2's join, write and crash must fall between two reads of node1 (took until {:?} after the read at {:?}); the machine is too slow for this scenario",
        tokio::time::Instant::now() - read,
        read - t0
    );

    // node1's next read finds slot 1 free, as at its last read, but the value block
    // changed (node2's published key): it reads the bits, finds them dirty and
    // recovers the slot as for a dead holder.
    expect_slot1_recovered(&mut events, period + LONG, dirty, || {
        format!(
            "node1 never recovered slot 1 of node2, which died between two takeover reads; slot 1 dirty chunks on disk: {}",
            dirty_bits(&c.disks()[0], 1).max(dirty_bits(&c.disks()[1], 1))
        )
    })
    .await;
    let st = c
        .wait_status(1, "md0", LONG, "the resync of slot 1's chunks", |st| {
            sync(st).runs >= 1 && settled(st)
        })
        .await;
    assert_eq!(sync(&st).last_kind, "resync", "{st:?}");
    assert_eq!(sync(&st).last_chunks, dirty, "{st:?}");
    assert_eq!(
        dirty_bits(&c.disks()[0], 1) + dirty_bits(&c.disks()[1], 1),
        0,
        "node2's slot is cleared on disk"
    );
    assert_eq!(
        c.read(1, "md0", off, 4096).await.unwrap(),
        pattern(0x90, 4096),
        "node2's acknowledged write reads back on node1"
    );
    c.shutdown_all().await;
    assert_members_identical(c.disks());
    for s in 0..4 {
        assert_eq!(dirty_bits(&c.disks()[0], s), 0, "slot {s} clean at the end");
    }
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
    c.mirror_on_two_nodes(2).await;
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
    // A failed member not removed yet cannot be re-added or added (EBUSY, nothing
    // written): it stays listed once, faulty, on both nodes.
    for (node, action, dev) in [(2, "re-add", &n2m1), (1, "add", &m1)] {
        let e = c
            .manage(node, "md0", &[(action, dev)])
            .await
            .expect_err("a failed member not removed must be refused");
        assert_eq!(e.errno, Errno::Ebusy, "{action}: {e:?}");
        let who = format!("node{node}");
        let dev_s = dev.display().to_string();
        assert!(
            e.message.contains(&who)
                && e.message.contains("md0")
                && e.message.contains(&dev_s)
                && e.message.contains("--remove"),
            "{action}: {e:?}"
        );
    }
    for (i, p) in [(1, &m1), (2, &n2m1)] {
        let st = c.status(i, "md0").unwrap();
        let p = p.display().to_string();
        let same: Vec<_> = st.members.iter().filter(|m| m.path == p).collect();
        assert_eq!(same.len(), 1, "node{i}: {st:?}");
        assert_eq!(same[0].state, "faulty", "node{i}: {st:?}");
    }
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
    c.mirror_on_two_nodes(2).await;
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
    c.mirror_on_two_nodes(2).await;
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

// ---------------------------------------------------------------------------------
// The interleaving property: random operation sequences with node crashes and random
// delivery delays of every notification (messages, grants, expiries) per node.

mod prop {
    use std::collections::{BTreeMap, BTreeSet};
    use std::io::Write as _;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use mdcluster_proto::v1 as pb;
    use mdcluster_tests::inproc::{bitmap, member_state, settled, InProc};
    use mdcluster_tests::standalone::assert_members_identical;
    use proptest::prelude::*;

    const MIB: u64 = 1 << 20;
    /// Chunks written (1 MiB bitmap chunks; the write covers the first 64 KiB).
    const CHUNKS: u64 = 5;
    const WRITE: usize = 64 << 10;
    const NODES: usize = 3;
    const SETTLE: Duration = Duration::from_secs(30);

    #[derive(Debug, Clone)]
    pub enum Op {
        /// Node writes a pattern at the start of a chunk.
        Write { node: usize, chunk: u64 },
        /// Node crashes (skipped for the last running node).
        Crash { node: usize },
        /// Node starts again (its saved list assembles the array).
        Restart { node: usize },
        /// Node fails, removes and re-adds member 1 (acked METADATA_UPDATED rounds).
        FailReAdd { node: usize },
    }

    fn op() -> impl Strategy<Value = Op> {
        let node = 1..=NODES;
        prop_oneof![
            4 => (node.clone(), 0..CHUNKS).prop_map(|(node, chunk)| Op::Write { node, chunk }),
            2 => node.clone().prop_map(|node| Op::Crash { node }),
            2 => node.clone().prop_map(|node| Op::Restart { node }),
            1 => node.prop_map(|node| Op::FailReAdd { node }),
        ]
    }

    /// SplitMix64 for the delivery delays.
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// What the checker knows while a case runs.
    struct Checker {
        data_offset: u64,
        /// Per crashed slot, the chunks its node left dirty on disk.
        owed: BTreeMap<u32, BTreeSet<u64>>,
        /// Per chunk, the last pattern a node's write was acknowledged with.
        acked: BTreeMap<u64, u8>,
        max_syncing: usize,
        checks: u64,
    }

    fn bits(c: &InProc) -> Vec<mdcluster_agent::format::io::Member> {
        c.disks()
            .iter()
            .map(|p| mdcluster_agent::format::io::read_member(p).expect("read member"))
            .collect()
    }

    fn slot_bit(ms: &[mdcluster_agent::format::io::Member], slot: u32, chunk: u64) -> bool {
        ms.iter().any(|m| {
            m.bitmap
                .get(slot as usize)
                .is_some_and(|s| mdcluster_agent::format::bitmap::test_bit(&s.bits, chunk))
        })
    }

    fn chunk_data(c: &InProc, k: usize, off: u64) -> Vec<u8> {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&c.disks()[k]).expect("open member");
        let mut b = vec![0; WRITE];
        f.read_exact_at(&mut b, off).expect("read member");
        b
    }

    impl Checker {
        /// The invariants that hold at every instant.
        fn check(&mut self, c: &InProc) -> Result<(), TestCaseError> {
            self.checks += 1;
            // One resync (or recovery) at a time.
            let syncing: Vec<usize> = (1..=c.len())
                .filter(|&i| c.running(i))
                .filter(|&i| {
                    let t = c.mdstat(i, "md0");
                    t.contains("resync =") || t.contains("recovery =")
                })
                .collect();
            self.max_syncing = self.max_syncing.max(syncing.len());
            prop_assert!(syncing.len() <= 1, "two nodes sync at once: {syncing:?}");
            // No slot cleared while its dirty bits are unrecovered: each chunk a dead
            // node left dirty is still marked in some slot, or its data is the same
            // on every member.
            let ms = bits(c);
            let slots = ms[0].bitmap.len() as u32;
            for (slot, chunks) in &self.owed {
                for &chunk in chunks {
                    if (0..slots).any(|s| slot_bit(&ms, s, chunk)) {
                        continue;
                    }
                    let off = self.data_offset + chunk * MIB;
                    let a = chunk_data(c, 0, off);
                    let b = chunk_data(c, 1, off);
                    prop_assert!(
                        a == b,
                        "chunk {chunk} left dirty by slot {slot} is marked nowhere but the members differ"
                    );
                }
            }
            Ok(())
        }
    }

    fn active(c: &InProc, i: usize) -> bool {
        c.running(i)
            && c.status(i, "md0")
                .is_ok_and(|st| st.state == pb::ArrayRunState::Active as i32)
    }

    async fn run_case(ops: Vec<Op>, seed: u64) -> Result<(), TestCaseError> {
        let mut c = InProc::new(NODES, 2, 8 * MIB).expect("cluster");
        let n = Arc::new(AtomicU64::new(seed));
        let n2 = n.clone();
        c.lock.set_delay(Some(Arc::new(move |_node, _note| {
            let r = mix(n2.fetch_add(1, Ordering::Relaxed));
            Duration::from_micros(r % 15_000)
        })));
        for i in 1..=NODES {
            c.start(i).await.expect("start");
        }
        c.create(1, "md0", 0..2, 4, true).await.expect("create");
        for i in 2..=NODES {
            c.assemble_from(i, 1, "md0").await.expect("assemble");
        }
        let data_offset = mdcluster_agent::format::io::read_member(&c.disks()[0])
            .expect("read member")
            .sb
            .data_offset
            * 512;
        let mut k = Checker {
            data_offset,
            owed: BTreeMap::new(),
            acked: BTreeMap::new(),
            max_syncing: 0,
            checks: 0,
        };
        let mut pattern = 0u8;
        for op in ops {
            k.check(&c)?;
            match op {
                Op::Write { node, chunk } => {
                    if !active(&c, node) {
                        continue;
                    }
                    pattern = pattern.wrapping_add(1).max(1);
                    if c.write(node, "md0", chunk * MIB, vec![pattern; WRITE])
                        .await
                        .is_ok()
                    {
                        k.acked.insert(chunk, pattern);
                    }
                }
                Op::Crash { node } => {
                    if !c.running(node) || (1..=NODES).filter(|&i| c.running(i)).count() < 2 {
                        continue;
                    }
                    // A restarted node assembles its saved list in the background: let
                    // that finish first, so that the slot it crashes in is known.
                    let end = Instant::now() + SETTLE;
                    let slot = loop {
                        match c.status(node, "md0") {
                            Err(_) => break None,
                            Ok(st) if st.bitmap.is_some() => break Some(bitmap(&st).slot),
                            Ok(st) if Instant::now() >= end => {
                                return Err(TestCaseError::fail(format!(
                                    "node{node}'s md0 still has no bitmap {SETTLE:?} after its restart: {st:?}"
                                )))
                            }
                            Ok(_) => tokio::time::sleep(Duration::from_millis(10)).await,
                        }
                    };
                    c.crash(node).await.expect("crash");
                    if let Some(slot) = slot {
                        let ms = bits(&c);
                        let dirty: BTreeSet<u64> =
                            (0..CHUNKS).filter(|&ch| slot_bit(&ms, slot, ch)).collect();
                        k.owed.entry(slot).or_default().extend(dirty);
                    }
                }
                Op::Restart { node } => {
                    if c.running(node) {
                        continue;
                    }
                    c.start(node).await.expect("restart");
                }
                Op::FailReAdd { node } => {
                    if !active(&c, node) {
                        continue;
                    }
                    let joined: Vec<usize> = (1..=NODES).filter(|&i| active(&c, i)).collect();
                    let m1 = c.member(node, 1);
                    let failed = c
                        .manage(node, "md0", &[("fail", &m1), ("remove", &m1)])
                        .await;
                    if failed.is_ok() {
                        // Every node joined before and after saw the acked change.
                        for &i in joined.iter().filter(|&&i| active(&c, i)) {
                            let st = c.status(i, "md0").expect("status");
                            let s = member_state(&st, &c.member(i, 1));
                            prop_assert_eq!(
                                s,
                                None,
                                "node{} did not see node{}'s acked fail and remove: {:?}",
                                i,
                                node,
                                st
                            );
                        }
                        let end = Instant::now() + SETTLE;
                        loop {
                            k.check(&c)?;
                            match c
                                .manage(node, "md0", &[("re-add", &c.member(node, 1))])
                                .await
                            {
                                Ok(_) => break,
                                Err(e) if Instant::now() < end => {
                                    eprintln!("re-add refused, retrying: {e:?}");
                                    tokio::time::sleep(Duration::from_millis(100)).await;
                                }
                                Err(e) => {
                                    return Err(TestCaseError::fail(format!("re-add: {e:?}")))
                                }
                            }
                        }
                        for &i in joined.iter().filter(|&&i| active(&c, i)) {
                            let st = c.status(i, "md0").expect("status");
                            let s = member_state(&st, &c.member(i, 1));
                            prop_assert!(
                                matches!(s.as_deref(), Some("in_sync" | "recovering" | "spare")),
                                "node{} did not see node{}'s acked re-add: {:?}",
                                i,
                                node,
                                st
                            );
                        }
                    }
                }
            }
        }
        // Everybody back; everything settles; every acknowledged write is there.
        for i in 1..=NODES {
            if !c.running(i) {
                c.start(i).await.expect("restart");
            }
        }
        // Settled: every node active with both members in sync, nothing needed and no
        // resync or recovery running, pending or remote, for half a second in a row (a
        // node that just rejoined starts the resync of merged bits a moment later).
        let calm = |c: &InProc| {
            (1..=NODES).all(|i| {
                active(c, i)
                    && c.status(i, "md0").is_ok_and(|st| {
                        settled(&st)
                            && st.members.iter().filter(|m| m.state == "in_sync").count() == 2
                    })
                    && !c.mdstat(i, "md0").contains("resync")
                    && !c.mdstat(i, "md0").contains("recovery")
            })
        };
        let end = Instant::now() + SETTLE;
        let mut since: Option<Instant> = None;
        loop {
            k.check(&c)?;
            if calm(&c) {
                let t = *since.get_or_insert_with(Instant::now);
                if t.elapsed() >= Duration::from_millis(500) {
                    break;
                }
            } else {
                since = None;
            }
            prop_assert!(
                Instant::now() < end,
                "the cluster did not settle within {:?}",
                SETTLE
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        for (&chunk, &pat) in &k.acked {
            for i in 1..=NODES {
                let got = c
                    .read(i, "md0", chunk * MIB, WRITE as u32)
                    .await
                    .expect("read");
                prop_assert!(
                    got.iter().all(|&b| b == pat),
                    "node{}: chunk {} lost its acknowledged write {:#x}",
                    i,
                    chunk,
                    pat
                );
            }
        }
        c.shutdown_all().await;
        k.check(&c)?;
        assert_members_identical(c.disks());
        let ms = bits(&c);
        for s in 0..4 {
            prop_assert!(
                (0..CHUNKS).all(|ch| !slot_bit(&ms, s, ch)),
                "slot {} dirty after every node stopped",
                s
            );
        }
        prop_assert!(
            c.lock.locks().is_empty(),
            "locks left: {:?}",
            c.lock.locks()
        );
        eprintln!(
            "case ok: {} checks, at most {} node(s) syncing at once, owed {:?}",
            k.checks, k.max_syncing, k.owed
        );
        Ok(())
    }

    #[test]
    fn interleavings_keep_the_md_cluster_invariants() {
        super::init_tracing();
        let cases: u32 = std::env::var("T46_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(16);
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            cases,
            max_shrink_iters: 8,
            failure_persistence: None,
            ..ProptestConfig::default()
        });
        let ran = std::sync::atomic::AtomicU32::new(0);
        let t = Instant::now();
        let r = runner.run(
            &(proptest::collection::vec(op(), 2..8), any::<u64>()),
            |(ops, seed)| {
                ran.fetch_add(1, Ordering::Relaxed);
                eprintln!("case: seed {seed:#x} ops {ops:?}");
                tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(4)
                    .enable_all()
                    .build()
                    .expect("runtime")
                    .block_on(run_case(ops, seed))
            },
        );
        // Straight to stderr, past the test harness's capture: the count always shows.
        let _ = writeln!(
            std::io::stderr(),
            "interleaving property: {} cases run ({cases} asked, T46_CASES to change) in {:?}",
            ran.load(Ordering::Relaxed),
            t.elapsed()
        );
        if let Err(e) = r {
            panic!("{e}");
        }
    }
}

/// Readiness follows the session's state even when the Suspended or Resumed
/// notification never arrives (the lock client drops one when its channel is full).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_session_when_its_notifications_are_dropped() {
    init_tracing();
    let mut c = InProc::new(1, 0, MIB).unwrap();
    c.start(1).await.unwrap();
    let health = c.health(1);
    let mut ready = health.watch();
    assert!(health.is_ready());
    let within = Duration::from_secs(5);

    assert!(c.lock.set_state_untold("node1", SessionState::Suspended));
    tokio::time::timeout(within, ready.wait_for(|r| !*r))
        .await
        .expect("node1 still ready 5 s after its session was suspended untold")
        .unwrap();

    assert!(c.lock.set_state_untold("node1", SessionState::Connected));
    tokio::time::timeout(within, ready.wait_for(|r| *r))
        .await
        .expect("node1 not ready 5 s after its session was resumed untold")
        .unwrap();
    c.shutdown_all().await;
}

/// Against a lock service without ReadValues (an mdserver older than the agent), the
/// takeover reads each slot lock on its own and still recovers a crashed node's slot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn takeover_reads_lock_by_lock_when_the_service_lacks_read_values() {
    init_tracing();
    let mut c = InProc::new(2, 2, 32 * MIB).unwrap();
    c.lock.set_read_values_off(true);
    c.mirror_on_two_nodes(4).await;
    let mut events = c.node(1).subscribe();
    tokio::time::sleep(3 * mdcluster_tests::inproc::timings().takeover_period).await;
    c.write(2, "md0", 8 * MIB, pattern(0x70, 2 * MIB as usize))
        .await
        .unwrap();
    let dirty = dirty_bits(&c.disks()[0], 1).max(dirty_bits(&c.disks()[1], 1));
    assert!(dirty > 0, "node2's write left no dirty bit in its slot");
    assert_eq!(c.crash(2).await.unwrap(), ["md0"]);
    expect_slot1_recovered(&mut events, LONG, dirty, || {
        "node1 never recovered slot 1 reading the slot locks one by one".into()
    })
    .await;
    assert_eq!(
        c.read(1, "md0", 8 * MIB, 4096).await.unwrap(),
        pattern(0x70, 4096),
        "node2's acknowledged write reads back on node1"
    );
    c.shutdown_all().await;
    assert_members_identical(c.disks());
}
