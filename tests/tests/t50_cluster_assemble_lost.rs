//! t50: a session lost in the middle of a clustered assemble — after the bitmap slot
//! lock was taken, before the engine is active — makes the assemble fail and leaves
//! nothing running on the node without its slot lock (real etcd and mdserver; the
//! node's service runs in-process so the test can hold the assemble at a real member
//! write: the stale member's superblock, written after the join). The engine started
//! without its slot lock stops without writing any superblock or bitmap page.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use mdcluster_agent::array::RegistryConfig;
use mdcluster_agent::format::io::{read_member, write_superblock, MetaDev};
use mdcluster_agent::format::SB_OFFSET_BYTES;
use mdcluster_agent::iotrace::IoTracer;
use mdcluster_agent::nbd::ServerConfig;
use mdcluster_agent::service::{Node, NodeConfig};
use mdcluster_proto::lock_client::{Session, SessionConfig};
use mdcluster_proto::v1 as pb;
use mdcluster_proto::v1::Errno;
use mdcluster_tests::etcd::Etcd;
use mdcluster_tests::server::{MdServer, ServerOpts};
use mdcluster_tests::standalone::member_files;

/// Holds the first superblock write to `path` (after it returned) until released;
/// from then on records every metadata write (below `data_start`) to the members.
struct HoldSbWrite {
    path: PathBuf,
    armed: AtomicBool,
    hit: AtomicBool,
    released: Mutex<bool>,
    cv: Condvar,
    data_start: u64,
    after: Mutex<Vec<(PathBuf, u64)>>,
}

impl IoTracer for HoldSbWrite {
    fn write(&self, path: &Path, offset: u64, _data: &[u8]) {
        if offset < self.data_start && *self.released.lock().unwrap() {
            self.after.lock().unwrap().push((path.to_owned(), offset));
        }
        if path != self.path
            || offset != SB_OFFSET_BYTES
            || !self.armed.swap(false, Ordering::SeqCst)
        {
            return;
        }
        self.hit.store(true, Ordering::SeqCst);
        let g = self.released.lock().unwrap();
        let _ = self
            .cv
            .wait_timeout_while(g, Duration::from_secs(30), |r| !*r)
            .unwrap();
    }
    fn flush_begin(&self, _path: &Path) -> u64 {
        0
    }
    fn flush_end(&self, _path: &Path, _id: u64) {}
}

async fn open_session(url: &str) -> Arc<Session> {
    let mut cfg = SessionConfig::new(vec![url.to_owned()], "node1", "127.0.0.1:1");
    cfg.ttl = Duration::from_secs(3);
    let (s, _rx) = Session::open(cfg).await.expect("session");
    Arc::new(s)
}

/// The lock keys under the cluster's root in etcd.
async fn lock_keys(etcd: &str) -> Vec<String> {
    mdcluster_tests::etcd::range(etcd, "/mdcluster/test/locks/")
        .await
        .into_iter()
        .map(|kv| kv.key)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_lost_during_assemble_fails_it_and_leaves_nothing_running() {
    let etcd = Etcd::start().expect("etcd");
    let server = MdServer::start(&etcd.url(), ServerOpts::default()).expect("mdserver");
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    let node = Node::new(NodeConfig {
        node: "node1".into(),
        run_dir: dir.path().join("run"),
        registry: RegistryConfig {
            stop_grace: Duration::from_millis(200),
            ..RegistryConfig::default()
        },
        nbd: ServerConfig::default(),
        nbd_tcp: None,
        suspend_io_timeout: mdcluster_agent::fence::DEFAULT_SUSPEND_TIMEOUT,
        timings: mdcluster_agent::cluster::Timings::default(),
    });
    let first = open_session(&server.url()).await;
    node.set_session(Some(first.clone()));
    let m = member_files(dir.path(), "l", 2, 32 << 20);
    node.create(pb::CreateArrayRequest {
        name: "md0".into(),
        raid_devices: 2,
        bitmap: "clustered".into(),
        nodes: 2,
        assume_clean: true,
        members: m.iter().map(|p| p.display().to_string()).collect(),
        ..Default::default()
    })
    .await
    .expect("create");
    node.stop("md0", false).await.expect("stop");
    assert!(lock_keys(&etcd.url()).await.is_empty());

    eprintln!("--- member 1 made stale: the assemble writes its superblock after the join");
    let mut sb = read_member(&m[0]).unwrap().sb;
    // Two updates ahead: a member one behind and active in its own superblock would be
    // current (the margin of one), not stale.
    sb.events += 2;
    let dev = MetaDev::open(&m[0], true).unwrap();
    write_superblock(&dev, &sb).unwrap();
    drop(dev);
    let hold = Arc::new(HoldSbWrite {
        path: m[1].clone(),
        armed: AtomicBool::new(true),
        hit: AtomicBool::new(false),
        released: Mutex::new(false),
        cv: Condvar::new(),
        data_start: sb.data_offset * 512,
        after: Mutex::new(Vec::new()),
    });
    mdcluster_agent::iotrace::install(Some(hold.clone()));

    let n = node.clone();
    let members = m.clone();
    let assemble = tokio::spawn(async move { n.assemble("md0", members).await });
    let deadline = Instant::now() + Duration::from_secs(20);
    while !hold.hit.load(Ordering::SeqCst) {
        assert!(
            Instant::now() < deadline,
            "the assemble never wrote the stale superblock"
        );
        assert!(
            !assemble.is_finished(),
            "assemble ended early: {:?}",
            assemble.await
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let held = lock_keys(&etcd.url()).await;
    assert!(
        held.iter().any(|k| k.contains("/slot/")),
        "no slot lock held mid-assemble: {held:?}"
    );

    eprintln!(
        "--- the session is lost (its locks with it) and replaced, as the agent's keeper does"
    );
    node.set_session(None);
    let dropped = node
        .drop_lost_arrays("closed by the test")
        .await
        .expect("nothing stuck");
    assert!(dropped.is_empty(), "not joined yet: {dropped:?}");
    match Arc::try_unwrap(first) {
        Ok(s) => s.close().await.expect("close session"),
        Err(s) => drop(s),
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    while !lock_keys(&etcd.url()).await.is_empty() {
        assert!(
            Instant::now() < deadline,
            "the lost session's slot lock stayed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let second = open_session(&server.url()).await;
    node.set_session(Some(second.clone()));
    *hold.released.lock().unwrap() = true;
    hold.cv.notify_all();

    let r = tokio::time::timeout(Duration::from_secs(30), assemble)
        .await
        .expect("assemble hung")
        .unwrap();
    mdcluster_agent::iotrace::install(None);
    let e = match r {
        Ok(st) => panic!(
            "the assemble succeeded without its slot lock (locks now: {:?}): {st:?}",
            lock_keys(&etcd.url()).await
        ),
        Err(e) => e,
    };
    assert_eq!(e.errno, Errno::Eio, "{e:?}");
    assert!(e.message.contains("session"), "{e:?}");
    assert!(node.names().is_empty(), "left running: {:?}", node.names());
    assert!(lock_keys(&etcd.url()).await.is_empty());
    let after = std::mem::take(&mut *hold.after.lock().unwrap());
    assert!(
        after.is_empty(),
        "superblock or bitmap written after the slot lock was lost (path, offset): {after:?}"
    );

    eprintln!("--- on the new session the assemble works, with its slot lock");
    node.assemble("md0", m.clone())
        .await
        .expect("assemble again");
    let held = lock_keys(&etcd.url()).await;
    assert!(held.iter().any(|k| k.contains("/slot/")), "{held:?}");
    node.stop("md0", false).await.expect("stop");
    node.set_session(None);
    if let Ok(s) = Arc::try_unwrap(second) {
        let _ = s.close().await;
    }
}
