//! Unit tests of the node: one operation per array at a time, lookups that never
//! allocate, errno-carrying errors, status and mdstat of real (file) members.

use std::path::PathBuf;
use std::time::Duration;

use mdcluster_proto::v1 as pb;
use mdcluster_proto::v1::Errno;

use super::*;

fn node(dir: &std::path::Path) -> Arc<Node> {
    Node::new(NodeConfig {
        node: "n1".into(),
        run_dir: dir.join("run"),
        registry: RegistryConfig {
            stop_grace: Duration::from_millis(200),
            ..RegistryConfig::default()
        },
        nbd: ServerConfig::default(),
        nbd_tcp: None,
        suspend_io_timeout: crate::fence::DEFAULT_SUSPEND_TIMEOUT,
        timings: crate::cluster::Timings::default(),
    })
}

fn members(dir: &std::path::Path) -> Vec<PathBuf> {
    (0..2)
        .map(|i| {
            let p = dir.join(format!("m{i}"));
            std::fs::File::create(&p)
                .unwrap()
                .set_len(32 << 20)
                .unwrap();
            p
        })
        .collect()
}

fn create_req(name: &str, members: &[PathBuf], bitmap: &str) -> pb::CreateArrayRequest {
    pb::CreateArrayRequest {
        name: name.into(),
        raid_devices: 2,
        bitmap: bitmap.into(),
        assume_clean: true,
        members: members.iter().map(|p| p.display().to_string()).collect(),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_second_operation_on_an_array_answers_ebusy_at_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    let n = node(dir.path());
    let m = members(dir.path());
    let st = n
        .create(create_req("/dev/md0", &m, "internal"))
        .await
        .unwrap();
    assert_eq!(st.name, "md0");
    assert_eq!(st.state, pb::ArrayRunState::Active as i32);
    assert_eq!(st.members.len(), 2);
    assert_eq!(st.bitmap.as_ref().unwrap().kind, "internal");
    assert!(!st.uuid.is_empty());

    // An assemble in progress: a stop and a second assemble are refused at once.
    let guard = n.begin("md0", "assemble").unwrap();
    let t = std::time::Instant::now();
    let e = n.stop("md0", false).await.unwrap_err();
    assert_eq!(e.errno, Errno::Ebusy, "{e}");
    assert!(e.message.contains("assemble of it is in progress"), "{e}");
    let e = n.assemble("md0", m.clone()).await.unwrap_err();
    assert_eq!(e.errno, Errno::Ebusy);
    assert!(t.elapsed() < Duration::from_millis(100));
    drop(guard);

    // Lookups never allocate.
    assert_eq!(n.get("md9").unwrap_err().errno, Errno::Enoent);
    assert_eq!(n.names(), vec!["md0".to_owned()]);
    let text = n.mdstat();
    assert!(
        text.starts_with("Personalities : [raid1] \nmd0 : active raid1 m1[1] m0[0]\n"),
        "{text:?}"
    );

    // Errors keep their reason.
    assert_eq!(
        n.assemble("md0", m.clone()).await.unwrap_err().errno,
        Errno::Eexist
    );
    let bad = SpeedLimits {
        min_kib_s: 10,
        max_kib_s: 5,
    };
    assert_eq!(n.set_speed("", bad).unwrap_err().errno, Errno::Einval);
    let ok = SpeedLimits {
        min_kib_s: 10,
        max_kib_s: 50,
    };
    assert_eq!(n.set_speed("", ok).unwrap(), vec!["md0".to_owned()]);
    assert_eq!(n.get("md0").unwrap().sync.unwrap().speed_max_kib_s, 50);

    n.stop("md0", false).await.unwrap();
    assert_eq!(n.stop("md0", false).await.unwrap_err().errno, Errno::Enoent);
    assert!(n.names().is_empty());
    assert_eq!(
        n.mdstat(),
        "Personalities : [raid1] \nunused devices: <none>\n"
    );
}

#[tokio::test]
async fn clustered_arrays_need_a_session_and_names_are_checked() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    let n = node(dir.path());
    let m = members(dir.path());
    let e = n
        .create(create_req("md1", &m, "clustered"))
        .await
        .unwrap_err();
    assert_eq!(e.errno, Errno::Eio, "{e}");
    assert!(e.message.contains("session with mdserver"), "{e}");
    let e = n
        .create(create_req("../x", &m, "internal"))
        .await
        .unwrap_err();
    assert_eq!(e.errno, Errno::Einval);
    let e = n
        .create(create_req("md1", &m, "sideways"))
        .await
        .unwrap_err();
    assert_eq!(e.errno, Errno::Einval);
    let e = n
        .assemble("md1", vec![dir.path().join("absent")])
        .await
        .unwrap_err();
    assert_eq!(e.errno, Errno::Enoent, "{e}");
    assert!(
        n.names().is_empty(),
        "a failed operation leaves nothing behind"
    );
}

#[tokio::test]
async fn the_array_list_survives_a_shutdown_for_rejoin() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    let n = node(dir.path());
    let m = members(dir.path());
    n.create(create_req("md2", &m, "internal")).await.unwrap();
    n.shutdown().await;
    assert!(n.names().is_empty());
    let again = node(dir.path());
    again.reassemble_saved().await;
    assert_eq!(again.names(), vec!["md2".to_owned()]);
    again.stop("md2", false).await.unwrap();
    let saved = std::fs::read_to_string(again.state_path()).unwrap();
    assert_eq!(saved, "{}", "a stopped array is not assembled again");
    again.shutdown().await;
}

#[tokio::test]
async fn resyncing_windows_show_remote_and_manage_fail_remove_works_locally() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    let n = node(dir.path());
    let m = members(dir.path());
    n.create(create_req("md0", &m, "internal")).await.unwrap();
    let (raid, paths) = n.raid_of("md0").unwrap();
    assert!(!n.mdstat().contains("REMOTE"), "{}", n.mdstat());
    // RESYNCING(lo, hi) in sectors installs the window; (0, 0) clears it.
    let mut msg = crate::cluster::ClusterMsg::new(crate::cluster::MsgType::Resyncing, 1);
    msg.low = 0;
    msg.high = 2048;
    message::apply("n1", "md0", &raid, &paths, &msg)
        .await
        .unwrap();
    assert_eq!(raid.remote_resync_window(), Some((0, 2048 * 512)));
    assert!(n.mdstat().contains("\tresync=REMOTE\n"), "{}", n.mdstat());
    msg.high = 0;
    message::apply("n1", "md0", &raid, &paths, &msg)
        .await
        .unwrap();
    assert_eq!(raid.remote_resync_window(), None);
    assert!(!n.mdstat().contains("REMOTE"), "{}", n.mdstat());
    // A window past 64-bit byte offsets is refused with the reason, not multiplied.
    msg.low = u64::MAX / 2;
    msg.high = u64::MAX;
    let e = message::apply("n1", "md0", &raid, &paths, &msg)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("does not fit"), "{e}");
    assert_eq!(raid.remote_resync_window(), None);
    // Types without a receiver yet are refused with the reason.
    let cap = crate::cluster::ClusterMsg::new(crate::cluster::MsgType::BitmapResize, 1);
    let e = message::apply("n1", "md0", &raid, &paths, &cap)
        .await
        .unwrap_err();
    let e = e.to_string();
    assert!(e.contains("n1") && e.contains("BitmapResize"), "{e}");
    // manage on a non-clustered array: fail, then remove, in order.
    let dev = m[1].display().to_string();
    let op = |a: &str| pb::ManageOp {
        action: a.into(),
        device: dev.clone(),
    };
    let e = n.manage("md0", vec![op("remove")]).await.unwrap_err();
    assert_eq!(e.errno, Errno::Ebusy, "{e}");
    let st = n
        .manage("md0", vec![op("fail"), op("remove")])
        .await
        .unwrap();
    assert!(st.members.iter().all(|x| x.path != dev), "{:?}", st.members);
    assert!(!n.mdstat().contains("m1["), "{}", n.mdstat());
    let e = n.manage("md0", vec![op("fail")]).await.unwrap_err();
    assert_eq!(e.errno, Errno::Enoent, "{e}");
    n.stop("md0", true).await.unwrap();
}

#[tokio::test]
async fn a_second_name_for_the_same_members_answers_ebusy() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("run")).unwrap();
    let n = node(dir.path());
    let m = members(dir.path());
    n.create(create_req("md0", &m, "internal")).await.unwrap();
    let e = n.assemble("md1", m.clone()).await.unwrap_err();
    assert_eq!(e.errno, Errno::Ebusy, "{e}");
    assert!(e.message.contains("\"md0\""), "{e}");
    assert_eq!(n.names(), vec!["md0".to_owned()]);
    n.stop("md0", false).await.unwrap();
    n.assemble("md1", m.clone()).await.unwrap();
    n.stop("md1", false).await.unwrap();
}
