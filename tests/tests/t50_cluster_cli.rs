//! t50: the cluster API through `mdctl` on a real cluster (etcd, mdserver, three
//! cluster-mode agents on 127.0.0.1-3):
//! - every error reason keeps its errno across agent → mdserver → mdctl and gives its
//!   own exit code and a sentence naming node and array (EIO: see
//!   `t70_cluster_manage_add`);
//! - `mdctl create` writes members that the real `mdadm --examine` reads as the same
//!   array; `mdctl mdstat` parses with the `mdstat` parser from PyPI; `detail` merges
//!   every node (and names each member's fencing: files are fenced by the gate only);
//!   `monitor --program` runs the program per event; `tune` reaches every array;
//! - clustered join/leave with slot locks: each node takes its own slot, a node finds no
//!   free slot (EBUSY), a stopped node's slot is free again (and its next holder
//!   publishes a reservation key of its own in the slot lock's value block), and a dirty
//!   unused slot's bits are merged and resynced at join (exactly those chunks).

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use mdcluster_tests::cluster::{ClusterBuilder, TestCluster};
use mdcluster_tests::standalone::{data_area, member_files, nbd_probe, noise, Probe};
use mdcluster_tests::tools::{key_values, path_strs, run_ok, run_timeout, value_of, CMD_TIMEOUT};
use serde_json::Value;

fn detail(c: &TestCluster, name: &str) -> Value {
    serde_json::from_str(&c.mdctl_ok(&["--json", "detail", name])).expect("detail json")
}

/// Waits until `name` on `node` has nothing left to sync.
fn wait_in_sync(c: &TestCluster, name: &str, node: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let d = detail(c, name);
        let st = d["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["node"] == node)
            .unwrap()["status"]
            .clone();
        let busy = matches!(st["sync"]["state"].as_str(), Some("busy" | "throttled"));
        if !st.is_null() && !busy && st["bitmap"]["needed"] == 0 {
            return st;
        }
        assert!(
            Instant::now() < deadline,
            "{name} on {node} not in sync in 60 s: {st}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn errors_keep_their_reason_and_exit_code() {
    let c = ClusterBuilder::new(2)
        .agent_args(&["--stop-grace", "500ms"])
        .start()
        .expect("cluster");
    let dir = c.path().to_owned();
    let m = member_files(&dir, "e", 2, 32 << 20);
    let m = path_strs(&m);
    eprintln!("--- ENOENT (3): absent array, unrecorded array, unknown node");
    let (rc, err) = c.code(&["--node", "node2", "stop", "md0"]);
    assert_eq!(rc, 3, "{err}");
    assert!(err.contains("node2") && err.contains("md0"), "{err}");
    assert_eq!(c.code(&["assemble", "md7"]).0, 3);
    assert_eq!(c.code(&["--node", "node9", "mdstat"]).0, 3);
    assert_eq!(c.code(&["detail", "md7"]).0, 3);
    eprintln!("--- EINVAL (5): bad name, bad limits, a file without superblock");
    assert_eq!(c.code(&["assemble", "bad/name", m[0]]).0, 5);
    assert_eq!(
        c.code(&["tune", "--sync-speed-min", "10", "--sync-speed-max", "5"])
            .0,
        5
    );
    assert_eq!(c.code(&["assemble", "md5", m[0], m[1]]).0, 5);
    eprintln!("--- EPERM (9): a directory the allow-list matches is no device");
    let sub = dir.join("sub");
    std::fs::create_dir(&sub).unwrap();
    let (rc, err) = c.code(&[
        "create",
        "md6",
        "--raid-devices",
        "2",
        "--bitmap",
        "internal",
        sub.to_str().unwrap(),
        m[1],
    ]);
    assert_eq!(rc, 9, "a directory as member: {err}");
    assert!(
        err.contains(sub.to_str().unwrap()) && err.contains("neither a block device"),
        "the sentence names the device and why: {err}"
    );
    eprintln!("--- ETIMEDOUT (7): node2's agent does not answer (SIGSTOP)");
    let pid = c.agents[1].pid().unwrap().to_string();
    run_ok(Command::new("kill").args(["-STOP", &pid]));
    let t = Instant::now();
    let (rc, err) = c.code(&["--node", "node2", "mdstat"]);
    run_ok(Command::new("kill").args(["-CONT", &pid]));
    assert_eq!(rc, 7, "{err}");
    assert!(
        err.contains("node2") && err.contains("did not answer"),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    eprintln!("--- create; EEXIST (8): assemble twice, create over a running array");
    c.mdctl_ok(&[
        "create",
        "/dev/md0",
        "--level",
        "1",
        "--raid-devices",
        "2",
        "--bitmap",
        "internal",
        "--assume-clean",
        m[0],
        m[1],
    ]);
    let (rc, err) = c.code(&["--node", "node1", "assemble", "md0"]);
    assert_eq!(rc, 8, "{err}");
    assert_eq!(
        c.code(&[
            "create",
            "md0",
            "--raid-devices",
            "2",
            "--bitmap",
            "internal",
            "--force",
            m[0],
            m[1]
        ])
        .0,
        8
    );
    eprintln!("--- EBUSY (4): stop while an NBD client stays connected");
    let sock = c.agents[0].sock("md0");
    let uri = format!("nbd+unix:///md0?socket={}", sock.display());
    let mut holder = Command::new("timeout")
        .args([
            "-k",
            "2",
            "60",
            "qemu-io",
            "-r",
            "-f",
            "raw",
            "-c",
            "sleep 30000",
            &uri,
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("qemu-io");
    let deadline = Instant::now() + Duration::from_secs(20);
    while detail(&c, "md0")["nodes"][0]["status"]["clients"]
        .as_array()
        .is_none_or(|a| a.is_empty())
    {
        assert!(Instant::now() < deadline, "the NBD client did not connect");
        std::thread::sleep(Duration::from_millis(50));
    }
    let t = Instant::now();
    let (rc, err) = c.code(&["stop", "md0"]);
    assert_eq!(rc, 4, "{err}");
    assert!(err.contains("still connected"), "{err}");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "EBUSY took {:?}",
        t.elapsed()
    );
    let _ = holder.kill();
    let _ = holder.wait();
    eprintln!("--- EPERM (9): outside the agents' --device-allow");
    drop(c);
    let c = ClusterBuilder::new(1)
        .agent_args(&["--device-allow", "/nonexistent/*"])
        .start()
        .expect("cluster");
    let (rc, err) = c.code(&["assemble", "md0", m[0], m[1]]);
    assert_eq!(rc, 9, "{err}");
    assert!(err.contains("--device-allow"), "{err}");
    eprintln!("--- 11: mdserver unreachable");
    let o = run_timeout(
        Command::new(mdcluster_tests::tools::bin("mdctl")).args([
            "--server",
            "http://127.0.0.1:1",
            "nodes",
        ]),
        CMD_TIMEOUT,
    );
    assert_eq!(o.status.code(), Some(11));
}

#[test]
fn create_mdadm_mdstat_detail_monitor_tune() {
    let c = ClusterBuilder::new(2)
        .agent_args(&["--nbd-tcp", "127.0.0.1:0", "--nbd-insecure"])
        .start()
        .expect("cluster");
    let dir = c.path().to_owned();
    let m = member_files(&dir, "m", 2, 48 << 20);
    let ms = path_strs(&m);
    let hook_log = dir.join("hook.log");
    let hook = dir.join("hook.sh");
    std::fs::write(
        &hook,
        format!(
            "#!/bin/sh\necho \"$1 $2 $MDCTL_EVENT_NODE\" >> {}\n",
            hook_log.display()
        ),
    )
    .unwrap();
    run_ok(Command::new("chmod").arg("+x").arg(&hook));
    let mut monitor = Command::new(mdcluster_tests::tools::bin("mdctl"))
        .args([
            "--server",
            &c.url(),
            "monitor",
            "--program",
            hook.to_str().unwrap(),
        ])
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("monitor");
    std::thread::sleep(Duration::from_millis(700)); // the monitor's first node round (not an assertion)

    eprintln!("--- create on node2, clustered, 3 slots");
    let out = c.mdctl_ok(&[
        "--node",
        "node2",
        "--json",
        "create",
        "md3",
        "--level",
        "1",
        "--raid-devices",
        "2",
        "--bitmap",
        "clustered",
        "--nodes",
        "3",
        "--cluster-name",
        "tcl",
        "--name",
        "h:md3",
        "--assume-clean",
        ms[0],
        ms[1],
    ]);
    let st: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(st["node"], "node2");
    let uuid = st["uuid"].as_str().unwrap().to_owned();

    eprintln!("--- mdadm --examine reads the same array");
    for p in &m {
        let text = run_ok(Command::new("mdadm").arg("--examine").arg(p));
        let kv = key_values(&text);
        assert_eq!(value_of(&kv, "Array UUID"), Some(uuid.as_str()), "{text}");
        assert_eq!(value_of(&kv, "Raid Level"), Some("raid1"));
        assert_eq!(value_of(&kv, "Raid Devices"), Some("2"));
        assert_eq!(value_of(&kv, "Cluster Name"), Some("tcl"), "{text}");
        assert_eq!(value_of(&kv, "Name"), Some("h:md3"));
    }

    eprintln!("--- mdstat parses with the PyPI mdstat parser");
    let text = c.mdctl_ok(&["--node", "node2", "mdstat"]);
    assert!(
        text.starts_with("Personalities : [raid1] \nmd3 : active raid1 m1[1] m0[0]\n"),
        "{text:?}"
    );
    let mdstat_txt = dir.join("mdstat.txt");
    std::fs::write(&mdstat_txt, &text).unwrap();
    let py = run_ok(
        Command::new("python3")
            .args([
                "-c",
                "import json,sys,mdstat; print(json.dumps(mdstat.parse_stream(open(sys.argv[1]))))",
            ])
            .arg(&mdstat_txt),
    );
    let parsed: Value = serde_json::from_str(&py).unwrap();
    let d = &parsed["devices"]["md3"];
    assert_eq!(d["personality"], "raid1", "{parsed}");
    assert_eq!(d["status"]["raid_disks"], 2);
    assert_eq!(d["status"]["non_degraded_disks"], 2);
    assert_eq!(
        d["status"]["blocks"],
        st["size_bytes"].as_u64().unwrap() / 1024
    );
    assert!(
        d["disks"]["m0"].is_object() && d["disks"]["m1"].is_object(),
        "{parsed}"
    );
    assert!(d["bitmap"].is_object(), "{parsed}");

    eprintln!("--- assemble on node1 from the record; detail merges both nodes");
    c.mdctl_ok(&["--node", "node1", "assemble", "md3"]);
    let d = detail(&c, "/dev/md3");
    assert_eq!(d["record"]["uuid"], uuid.as_str());
    let nodes = d["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 2);
    let slots: Vec<u64> = nodes
        .iter()
        .map(|n| n["status"]["bitmap"]["slot"].as_u64().unwrap())
        .collect();
    assert_eq!(
        slots,
        vec![1, 0],
        "node2 created first (slot 0), node1 joined second (slot 1)"
    );
    for n in nodes {
        assert_eq!(n["state"], "active");
        assert!(n["status"]["nbd_socket"]
            .as_str()
            .unwrap()
            .ends_with("md3.nbd"));
        assert_eq!(
            nbd_probe(
                Path::new(n["status"]["nbd_socket"].as_str().unwrap()),
                "md3",
                Duration::from_secs(5)
            ),
            Probe::Ok
        );
        // The NBD TCP address each node serves (export = array name) answers nbdinfo.
        let tcp = n["status"]["nbd_tcp"].as_str().unwrap();
        assert!(!tcp.is_empty() && !tcp.ends_with(":0"), "{n}");
        let size = run_ok(Command::new("nbdinfo").args(["--size", &format!("nbd://{tcp}/md3")]));
        assert_eq!(size.trim(), n["status"]["size_bytes"].to_string());
        // Files take no persistent reservations: each member is fenced by the gate only.
        let members = n["status"]["members"].as_array().unwrap();
        assert_eq!(members.len(), 2, "{n}");
        for m in members {
            assert_eq!(m["fenced_by"], "gate only", "{n}");
        }
    }
    let text = c.mdctl_ok(&["detail", "md3"]);
    for want in [
        "/dev/md3:",
        "Raid Level : raid1",
        "Intent Bitmap : Clustered",
        &format!("UUID : {uuid}"),
        "active sync",
        "node1",
        "node2",
        "Fenced By : ",
        " (gate only), ",
    ] {
        assert!(text.contains(want), "detail lacks {want:?}:\n{text}");
    }

    eprintln!("--- tune reaches every array on every node");
    let out = c.mdctl_ok(&[
        "--json",
        "tune",
        "--sync-speed-min",
        "2000",
        "--sync-speed-max",
        "9000",
    ]);
    let t: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(t["arrays"].as_array().unwrap().len(), 2, "{t}");
    for n in detail(&c, "md3")["nodes"].as_array().unwrap() {
        assert_eq!(n["status"]["sync"]["speed_max_kib_s"], 9000);
    }

    eprintln!("--- nodes");
    let nodes: Value = serde_json::from_str(&c.mdctl_ok(&["--json", "nodes"])).unwrap();
    assert!(
        nodes
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["reachable"] == true && n["arrays"][0] == "md3:active"),
        "{nodes}"
    );

    eprintln!("--- create --wait follows the initial resync to its end");
    let w = member_files(&dir, "w", 2, 24 << 20);
    let ws = path_strs(&w);
    c.mdctl_ok(&[
        "--node",
        "node1",
        "create",
        "md4",
        "--raid-devices",
        "2",
        "--bitmap",
        "internal",
        "--wait",
        ws[0],
        ws[1],
    ]);
    let st = detail(&c, "md4")["nodes"][0]["status"].clone();
    assert_eq!(
        st["sync"]["runs"], 1,
        "the resync ran before create returned: {st}"
    );
    assert_eq!(st["sync"]["last_kind"], "resync");
    assert_eq!(st["bitmap"]["needed"], 0);
    assert!(
        !matches!(st["sync"]["state"].as_str(), Some("busy" | "throttled")),
        "{st}"
    );

    eprintln!("--- stop --scan on both; the hook ran per event");
    c.mdctl_ok(&["--node", "node1", "stop", "--scan"]);
    c.mdctl_ok(&["--node", "node2", "stop", "--scan"]);
    assert!(
        c.etcd_keys("locks/").is_empty(),
        "{:?}",
        c.etcd_keys("locks/")
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = std::fs::read_to_string(&hook_log).unwrap_or_default();
        let has = |l: &str| log.lines().any(|x| x == l);
        if has("NewArray /dev/md3 node2")
            && has("NewArray /dev/md3 node1")
            && has("DeviceDisappeared /dev/md3 node1")
            && has("DeviceDisappeared /dev/md3 node2")
            && has("RebuildStarted /dev/md4 node1")
            && has("RebuildFinished /dev/md4 node1")
        {
            break;
        }
        assert!(Instant::now() < deadline, "hook log:\n{log}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = monitor.kill();
    let _ = monitor.wait();
}

/// Writes `data` at array byte `off` of member `p` (its data area).
fn poke(p: &Path, off: u64, data: &[u8]) {
    let mem = mdcluster_agent::format::io::read_member(p).unwrap();
    let mut f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    f.seek(SeekFrom::Start(mem.sb.data_offset * 512 + off))
        .unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

/// Sets bit `chunk` of bitmap slot `slot` on member `p`.
fn set_dirty(p: &Path, slot: u32, chunk: u64) {
    let mem = mdcluster_agent::format::io::read_member(p).unwrap();
    let s = &mem.bitmap[slot as usize];
    let mut bits = s.bits.clone();
    mdcluster_agent::format::bitmap::set_bit(&mut bits, chunk);
    let dev = mdcluster_agent::format::io::MetaDev::open(p, true).unwrap();
    mdcluster_agent::format::io::write_bitmap_slot(&dev, &mem.sb, slot, &s.sb, &bits).unwrap();
}

#[test]
fn slots_are_taken_per_node_and_dirty_free_slots_are_resynced_at_join() {
    let c = ClusterBuilder::new(3).start().expect("cluster");
    let dir = c.path().to_owned();
    let m = member_files(&dir, "s", 2, 40 << 20);
    let ms = path_strs(&m);
    const CHUNK: u64 = 1 << 20;
    c.mirror_on_two_nodes("md1", ms[0], ms[1]);
    eprintln!("--- a third node finds both slots held: EBUSY at once");
    let t = Instant::now();
    let (rc, err) = c.code(&["--node", "node3", "assemble", "md1"]);
    assert_eq!(rc, 4, "{err}");
    assert!(err.contains("all 2 bitmap slots"), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5));
    assert_eq!(
        c.etcd_keys("locks/").len(),
        2,
        "{:?}",
        c.etcd_keys("locks/")
    );
    // Each holder publishes its reservation key (slot + 1 in the high byte, its slot
    // lock's token below) after its resync window, for a survivor to preempt.
    let key_of = |slot: u32| -> u64 {
        let vals = c.lock_values("md/");
        let (_, v) = vals
            .iter()
            .find(|(r, _)| r.ends_with(&format!("/slot/{slot}")))
            .unwrap_or_else(|| panic!("no value block of slot {slot}: {vals:?}"));
        assert_eq!(v.len(), 24, "window (16 bytes) and key (8): {v:?}");
        let key = u64::from_le_bytes(v[16..24].try_into().unwrap());
        assert_eq!(key >> 56, u64::from(slot) + 1, "{key:#x}");
        assert_ne!(key & ((1 << 56) - 1), 0, "a token: {key:#x}");
        key
    };
    let (k0, k1) = (key_of(0), key_of(1));
    eprintln!("--- node2 leaves; node3 gets its slot");
    c.mdctl_ok(&["--node", "node2", "stop", "md1"]);
    let st: Value =
        serde_json::from_str(&c.mdctl_ok(&["--node", "node3", "--json", "assemble", "md1"]))
            .unwrap();
    assert_eq!(st["bitmap"]["slot"], 1);
    assert_eq!(key_of(0), k0, "node1's key is unchanged");
    assert_ne!(
        key_of(1),
        k1,
        "node3 holds slot 1 with a key of its own token"
    );
    c.mdctl_ok(&["--node", "node3", "stop", "md1"]);
    c.mdctl_ok(&["--node", "node1", "stop", "md1"]);
    assert!(c.etcd_keys("locks/").is_empty());

    eprintln!("--- slot 1 left dirty (chunk 5) by a node that is gone; chunks 5 and 9 differ");
    poke(&m[1], 5 * CHUNK + 4096, &noise(8192, 5));
    poke(&m[1], 9 * CHUNK + 4096, &noise(8192, 9));
    for p in &m {
        set_dirty(p, 1, 5);
    }
    let before0 = data_area(&m[0]);
    assert_ne!(before0, data_area(&m[1]));
    eprintln!("--- node2 joins: takes slot 0, finds slot 1 free and dirty, resyncs chunk 5 only");
    let st: Value =
        serde_json::from_str(&c.mdctl_ok(&["--node", "node2", "--json", "assemble", "md1"]))
            .unwrap();
    assert_eq!(st["bitmap"]["slot"], 0);
    wait_in_sync(&c, "md1", "node2");
    c.mdctl_ok(&["--node", "node2", "stop", "md1"]);
    let (a, b) = (data_area(&m[0]), data_area(&m[1]));
    let differs =
        |lo: u64| a[lo as usize..(lo + CHUNK) as usize] != b[lo as usize..(lo + CHUNK) as usize];
    assert!(!differs(5 * CHUNK), "the dirty chunk 5 was resynced");
    assert!(
        differs(9 * CHUNK),
        "chunk 9 was not dirty and must not have been touched"
    );
    let changed: Vec<u64> = (0..a.len() as u64 / CHUNK)
        .filter(|&i| differs(i * CHUNK))
        .collect();
    assert_eq!(changed, vec![9], "exactly the dirty chunk was resynced");
}
