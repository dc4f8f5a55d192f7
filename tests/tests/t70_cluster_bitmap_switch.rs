//! t70: `mdctl grow --bitmap` on a real cluster (etcd, mdserver, two cluster-mode
//! agents) over multi-view storage (each node reaches each member through its own loop
//! device and path), after mdadm's `clustermd_tests/01r1_Grow_bitmap-switch`: clustered → none
//! → internal → none → clustered, checked through `mdctl mdstat`, `mdadm --examine`
//! and `mdadm -X`, with the data read back after every switch:
//! - to none while node2 has the array assembled: refused (EPERM), nothing changed;
//! - with a client connected: refused (EBUSY) like `stop`;
//! - internal → clustered directly: refused (EINVAL), the way is through none;
//! - after the switch back to clustered node2 assembles the array again (a slot each).

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mdcluster_tests::cluster::{ClusterBuilder, TestCluster};
use mdcluster_tests::tools::{key_values, run_ok, value_of, LoopDevice};

const WAIT: Duration = Duration::from_secs(30);

fn uri(sock: &Path) -> String {
    format!("nbd+unix:///md0?socket={}", sock.display())
}

fn qemu_io(sock: &Path, cmd: &str) -> String {
    run_ok(Command::new("qemu-io").args(["-f", "raw", "-c", cmd, &uri(sock)]))
}

fn feature_map(member: &Path) -> String {
    let ex = run_ok(Command::new("mdadm").arg("--examine").arg(member));
    value_of(&key_values(&ex), "Feature Map")
        .unwrap_or_default()
        .to_owned()
}

fn mdadm_x(member: &Path) -> std::process::Output {
    let lo = LoopDevice::attach_ro(member);
    Command::new("mdadm")
        .arg("-X")
        .arg(&lo.path)
        .output()
        .expect("mdadm -X")
}

/// The data written at the start is still there, read through node1.
fn data_intact(c: &TestCluster) {
    let r = qemu_io(&c.agents[0].sock("md0"), "read -P 0x6b 0 8M");
    assert!(
        !r.contains("fail") && r.contains("read 8388608/8388608"),
        "{r}"
    );
}

fn grow_bitmap(c: &TestCluster, kind: &str) -> (i32, String) {
    c.code(&["--node", "node1", "grow", "md0", "--bitmap", kind])
}

#[test]
fn bitmap_switch_clustered_none_internal_none_clustered() {
    let c = ClusterBuilder::new(2)
        .shared_storage(2, 32 << 20)
        .start()
        .expect("cluster");
    // On-disk checks read the shared disks; node1 creates through its own paths.
    let m = c.disks(2);
    let n1 = c.members_of(1, 2);
    let ms: Vec<&str> = n1.iter().map(String::as_str).collect();
    c.mirror_on_two_nodes("md0", ms[0], ms[1]);
    qemu_io(&c.agents[0].sock("md0"), "write -P 0x6b 0 8M");
    assert_eq!(feature_map(&m[0]), "0x101");

    eprintln!("--- to none while node2 has the array: EPERM");
    let (code, err) = grow_bitmap(&c, "none");
    assert_eq!(code, 9, "{err}");
    assert!(err.contains("more than one node"), "{err}");
    assert_eq!(feature_map(&m[0]), "0x101", "nothing changed");
    for n in ["node1", "node2"] {
        assert!(c.mdstat(n).contains("bitmap:"), "{}", c.mdstat(n));
    }

    eprintln!("--- with a client connected: EBUSY, the array stays");
    c.mdctl_ok(&["--node", "node2", "stop", "md0"]);
    let mut holder = Command::new("qemu-io")
        .args(["-r", "-f", "raw", "-c", "sleep 30000"])
        .arg(uri(&c.agents[0].sock("md0")))
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io");
    let deadline = Instant::now() + WAIT;
    while c.node_status("md0", "node1")["clients"]
        .as_array()
        .is_none_or(|a| a.is_empty())
    {
        assert!(Instant::now() < deadline, "the NBD client did not connect");
        std::thread::sleep(Duration::from_millis(50));
    }
    let (code, err) = grow_bitmap(&c, "none");
    let _ = holder.kill();
    let _ = holder.wait();
    assert_eq!(code, 4, "{err}");
    assert_eq!(feature_map(&m[0]), "0x101", "nothing changed");
    assert!(
        c.mdstat("node1").contains("active raid1"),
        "{}",
        c.mdstat("node1")
    );
    let deadline = Instant::now() + WAIT;
    while c.node_status("md0", "node1")["clients"]
        .as_array()
        .is_some_and(|a| !a.is_empty())
    {
        assert!(Instant::now() < deadline, "the NBD client did not leave");
        std::thread::sleep(Duration::from_millis(50));
    }

    eprintln!("--- clustered → none");
    let (code, err) = grow_bitmap(&c, "none");
    assert_eq!(code, 0, "{err}");
    assert_eq!(feature_map(&m[0]), "0x0");
    assert_eq!(feature_map(&m[1]), "0x0");
    let t = c.mdstat("node1");
    assert!(t.contains("active raid1") && !t.contains("bitmap:"), "{t}");
    data_intact(&c);

    eprintln!("--- none → internal");
    let (code, err) = grow_bitmap(&c, "internal");
    assert_eq!(code, 0, "{err}");
    assert_eq!(feature_map(&m[1]), "0x1");
    let x = mdadm_x(&m[1]);
    let xs = String::from_utf8_lossy(&x.stdout);
    assert!(x.status.success() && xs.contains("Version : 4"), "{xs}");
    assert!(
        c.mdstat("node1").contains("bitmap:"),
        "{}",
        c.mdstat("node1")
    );
    data_intact(&c);
    let st = c.node_status("md0", "node1");
    assert_eq!(st["bitmap"]["kind"], "internal", "{st}");

    eprintln!("--- internal → clustered directly: EINVAL");
    let (code, err) = grow_bitmap(&c, "clustered");
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("through none"), "{err}");

    eprintln!("--- internal → none → clustered; node2 joins again");
    assert_eq!(grow_bitmap(&c, "none").0, 0);
    assert_eq!(feature_map(&m[0]), "0x0");
    let (code, err) = grow_bitmap(&c, "clustered");
    assert_eq!(code, 0, "{err}");
    assert_eq!(feature_map(&m[0]), "0x101");
    let x = mdadm_x(&m[0]);
    let xs = String::from_utf8_lossy(&x.stdout);
    assert!(
        x.status.success() && xs.contains("Version : 5") && xs.contains("Cluster nodes : 4"),
        "{xs}"
    );
    c.mdctl_ok(&["--node", "node2", "assemble", "md0"]);
    for n in ["node1", "node2"] {
        c.wait_mdstat(WAIT, n, "bitmap line", |t| {
            t.contains("active raid1") && t.contains("bitmap:")
        });
    }
    let r = qemu_io(&c.agents[1].sock("md0"), "read -P 0x6b 0 8M");
    assert!(!r.contains("fail"), "{r}");
    let st1 = c.node_status("md0", "node1");
    let st2 = c.node_status("md0", "node2");
    assert_eq!(st1["bitmap"]["kind"], "clustered", "{st1}");
    assert_ne!(
        st1["bitmap"]["slot"], st2["bitmap"]["slot"],
        "a slot each: {st1} {st2}"
    );
    for n in ["node2", "node1"] {
        c.mdctl_ok(&["--node", n, "stop", "md0"]);
    }
    assert!(
        c.etcd_keys("locks/").is_empty(),
        "{:?}",
        c.etcd_keys("locks/")
    );
}
