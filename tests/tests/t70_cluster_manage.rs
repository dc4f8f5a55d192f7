//! t70: md-cluster operations through the token lock and acknowledged messages, on a
//! real cluster (etcd, mdserver, two cluster-mode agents) over multi-view storage (each
//! node reaches each member through its own loop device and path, so every command
//! names a member by the path its node sees), modelled on mdadm's `clustermd_tests`
//! (the manage part of `02r1_Manage_*`):
//! - `mdctl manage md0 --fail DEV` on node1 is applied on node2 as well before the
//!   command returns (METADATA_UPDATED, acknowledged by every joined node): both
//!   nodes' `mdctl mdstat` show the member `(F)`, and the real `mdadm --examine` of the
//!   surviving member shows it missing from the array state;
//! - the sender takes the array's `token` lock: while another session holds it, the
//!   manage call waits (and node2 sees nothing), and goes through once it is released;
//! - a repeated fail is a no-op (the re-check under the token); failing the last
//!   in-sync member is EBUSY, removing an active one too; `--fail DEV --remove DEV`
//!   runs in order and the member is gone on both nodes (`02r1_Manage_*`'s first
//!   steps); a refused operation (`--re-add` of a stranger) names what was applied;
//! - `--re-add` of the removed member brings it back in its role on both nodes; one
//!   node recovers it, exactly the chunks both nodes wrote while it was out (RE_ADD,
//!   then the sender gathers every slot's bits) (`02r1_Manage_re-add`);
//! - receivers answer every message: an unknown type and a type whose receiver is not
//!   built get a negative ack naming the node and the reason (never silence), while
//!   METADATA_UPDATED is acknowledged positively.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mdcluster_agent::cluster::{channel, token_lock, ClusterMsg, MsgType};
use mdcluster_proto::lock_client::{Mode, Wait};
use mdcluster_tests::cluster::ClusterBuilder;
use mdcluster_tests::tools::{key_values, run_ok, value_of};
use serde_json::Value;

/// Bound of every cluster wait here.
const WAIT: Duration = Duration::from_secs(30);

/// Kills a spawned mdctl that is still running when the test ends early.
struct ChildGuard(std::process::Child);

impl ChildGuard {
    /// Asserts the child keeps running for 1.5 s (it waits for the token).
    fn assert_waits(&mut self, what: &str) {
        let until = Instant::now() + Duration::from_millis(1500);
        while Instant::now() < until {
            assert!(
                self.0.try_wait().unwrap().is_none(),
                "{what} finished while another session held the token"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits (at most [`WAIT`]) for the child to exit.
    fn wait_exit(&mut self, what: &str) -> std::process::ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{what} did not finish within {WAIT:?} after the token was released"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A tester session of the lock service holding array `uuid`'s `token` lock.
struct TokenHolder {
    rt: tokio::runtime::Runtime,
    session: mdcluster_proto::lock_client::Session,
    /// Kept for the session's lifetime.
    _notes: tokio::sync::mpsc::Receiver<mdcluster_proto::lock_client::Notification>,
    res: String,
    token: u64,
}

impl TokenHolder {
    fn take(c: &mdcluster_tests::cluster::TestCluster, uuid: &[u8; 16]) -> TokenHolder {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (session, notes) = rt
            .block_on(mdcluster_tests::server::session(
                &[c.url()],
                "tester",
                Duration::from_secs(10),
            ))
            .expect("tester session");
        let res = token_lock(uuid);
        let g = rt
            .block_on(session.acquire(&res, Mode::Exclusive, Wait::NoQueue))
            .expect("token free");
        TokenHolder {
            rt,
            session,
            _notes: notes,
            res,
            token: g.token,
        }
    }

    /// Closes the session (its locks and subscriptions end with it).
    fn close(self) {
        let TokenHolder { rt, session, .. } = self;
        rt.block_on(session.close()).unwrap();
    }

    fn release(&self) {
        self.rt
            .block_on(self.session.release(&self.res, self.token))
            .unwrap();
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

#[test]
fn manage_fail_is_agreed_by_every_node_through_the_token() {
    // node1 may also open x0, a device that never was a member (the refused --re-add).
    let c = ClusterBuilder::new(2)
        .shared_storage(2, 32 << 20)
        .node_args(1, &["--device-allow", "{dir}/x*"])
        .start()
        .expect("cluster");
    let m = c.disks(2);
    let x0 = mdcluster_tests::standalone::member_files(c.path(), "x", 1, 32 << 20).remove(0);
    let x0 = x0.display().to_string();
    let (n1, n2) = (c.members_of(1, 2), c.members_of(2, 2));
    let (ms, ms2): (Vec<&str>, Vec<&str>) = (
        n1.iter().map(String::as_str).collect(),
        n2.iter().map(String::as_str).collect(),
    );
    eprintln!("--- create a clustered mirror on node1 (--assume-clean), assemble on node2");
    c.mirror_on_two_nodes("md0", ms[0], ms[1]);
    for n in ["node1", "node2"] {
        let t = c.mdstat(n);
        assert!(t.contains("[2/2] [UU]") && !t.contains("(F)"), "{n}:\n{t}");
    }
    let uuid = mdcluster_agent::format::io::read_member(&m[0])
        .unwrap()
        .sb
        .set_uuid;

    eprintln!("--- a tester session holds the token: manage --fail waits");
    let holder = TokenHolder::take(&c, &uuid);
    let (rt, session) = (&holder.rt, &holder.session);
    let child = Command::new(mdcluster_tests::tools::bin("mdctl"))
        .args(["--server", &c.url(), "--node", "node1", "manage", "md0"])
        .args(["--fail", ms[1]])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn mdctl");
    let mut child = ChildGuard(child);
    // The manage call must still be waiting for the token 1.5 s later.
    child.assert_waits("manage --fail");
    let t = c.mdstat("node2");
    assert!(
        !t.contains("(F)"),
        "node2 failed the member before the token was granted:\n{t}"
    );
    holder.release();
    let exit = child.wait_exit("manage --fail");
    let mut err = String::new();
    if let Some(mut e) = child.0.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    assert!(exit.success(), "manage --fail failed: {err}");

    eprintln!("--- both nodes show the member faulty at once (acked before returning)");
    for n in ["node1", "node2"] {
        let t = c.mdstat(n);
        assert!(
            t.contains("m1[1](F)") && t.contains("[2/1] [U_]"),
            "{n}:\n{t}"
        );
    }
    let ex = run_ok(Command::new("mdadm").arg("--examine").arg(&m[0]));
    let kv = key_values(&ex);
    let state = value_of(&kv, "Array State").unwrap_or_default();
    assert!(state.starts_with("A."), "mdadm --examine {}:\n{ex}", ms[0]);

    eprintln!("--- a repeated fail is a no-op; the last in-sync member is refused (EBUSY)");
    c.mdctl_ok(&["--node", "node2", "manage", "md0", "--fail", ms2[1]]);
    let (rc, err) = c.code(&["--node", "node2", "manage", "md0", "--fail", ms2[0]]);
    assert_eq!(rc, 4, "{err}");
    assert!(
        err.contains("last in-sync") && err.contains("node2"),
        "{err}"
    );
    let t = c.wait_mdstat(WAIT, "node1", "m0 still in sync", |t| {
        t.contains("m0[0]") && !t.contains("m0[0](F)")
    });
    assert!(t.contains("[U_]"), "{t}");

    eprintln!("--- an active member cannot be removed (EBUSY)");
    let (rc, err) = c.code(&["--node", "node1", "manage", "md0", "--remove", ms[0]]);
    assert_eq!(rc, 4, "{err}");
    assert!(err.contains("fail it first"), "{err}");

    eprintln!("--- --fail, --remove run in order on every node; a refused --re-add names them");
    let (rc, err) = c.code(&[
        "--node", "node1", "manage", "md0", "--fail", ms[1], "--remove", ms[1], "--re-add", &x0,
    ]);
    assert_eq!(rc, 5, "{err}");
    assert!(
        err.contains("not a former member") && err.contains("before re-add"),
        "{err}"
    );
    for n in ["node1", "node2"] {
        let t = c.mdstat(n);
        assert!(
            !t.contains("m1[") && t.contains("m0[0]") && t.contains("[2/1] [U_]"),
            "{n}: m1 must be gone:\n{t}"
        );
    }
    let (rc, err) = c.code(&["--node", "node2", "manage", "md0", "--remove", ms2[1]]);
    assert_eq!(rc, 3, "a removed member is not a member any more: {err}");

    eprintln!("--- while m1 is out both nodes write: node1 chunk 3, node2 chunk 9");
    for (i, (at, pat)) in [("3M", "0x31"), ("9M", "0x32")].iter().enumerate() {
        let sock = c.agents[i].sock("md0");
        run_ok(Command::new("qemu-io").args([
            "-f",
            "raw",
            "-c",
            &format!("write -P {pat} {at} 64k"),
            &format!("nbd+unix:///md0?socket={}", sock.display()),
        ]));
    }

    eprintln!("--- --re-add m1 (02r1_Manage_re-add): back in its role on both nodes, only the bitmap's chunks recovered");
    c.mdctl_ok(&["--node", "node2", "manage", "md0", "--re-add", ms2[1]]);
    let deadline = Instant::now() + WAIT;
    loop {
        let t1 = c.mdstat("node1");
        let t2 = c.mdstat("node2");
        if [&t1, &t2].iter().all(|t| {
            t.contains("m1[1]")
                && t.contains("[2/2] [UU]")
                && !t.contains("recovery")
                && !t.contains("PENDING")
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "m1 not back in sync on both nodes within {WAIT:?}:\n{t1}\n{t2}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let runs: Vec<Value> = ["node1", "node2"]
        .iter()
        .map(|n| c.node_status("md0", n))
        .filter(|st| st["sync"]["last_kind"] == "recovery")
        .collect();
    assert_eq!(runs.len(), 1, "exactly one node recovers: {runs:?}");
    let st = &runs[0];
    let total = st["bitmap"]["chunks"].as_u64().unwrap();
    let chunks = st["sync"]["last_chunks"].as_u64().unwrap();
    assert!(
        chunks < total,
        "a re-add recovers only the bitmap's chunks, not all {total}: {st}"
    );
    assert_eq!(
        chunks, 2,
        "the re-add recovers exactly the chunks both nodes wrote while m1 was out \
         (RE_ADD gathers node1's bits too): {st}"
    );
    for n in ["node1", "node2"] {
        let st = c.node_status("md0", n);
        assert_eq!(
            st["bitmap"]["needed"], 0,
            "nothing owed on {n} after the re-add: {st}"
        );
    }
    let data = mdcluster_agent::format::io::read_member(&m[1])
        .unwrap()
        .sb
        .data_offset
        * 512;
    for (at, pat) in [(3u64 << 20, 0x31u8), (9 << 20, 0x32)] {
        let f = std::fs::read(&m[1]).unwrap();
        let got = &f[(data + at) as usize..(data + at + 65536) as usize];
        assert!(
            got.iter().all(|&b| b == pat),
            "m1 holds what was written at {at} while it was out"
        );
    }

    eprintln!("--- receivers answer every message; unknown and unbuilt types are refused");
    let ch = channel(&uuid);
    let mut unknown = ClusterMsg::new(MsgType::MetadataUpdated, 1).encode();
    unknown[0..4].copy_from_slice(&99u32.to_le_bytes());
    let o = rt
        .block_on(session.publish(&ch, &unknown, Duration::from_secs(10)))
        .unwrap();
    assert!(!o.all_ok, "{o:?}");
    assert_eq!(o.results.len(), 2, "{o:?}");
    for r in &o.results {
        assert!(r.answered && !r.ok, "{o:?}");
        assert!(
            r.reason.contains("unknown cluster message type 99") && r.reason.contains(&r.node),
            "{o:?}"
        );
    }
    let resize = ClusterMsg::new(MsgType::BitmapResize, 1).encode();
    let o = rt
        .block_on(session.publish(&ch, &resize, Duration::from_secs(10)))
        .unwrap();
    assert!(
        o.results.len() == 2
            && o.results
                .iter()
                .all(|r| r.answered && !r.ok && r.reason.contains("BitmapResize")),
        "{o:?}"
    );
    let meta = ClusterMsg::new(MsgType::MetadataUpdated, 1).encode();
    let o = rt
        .block_on(session.publish(&ch, &meta, Duration::from_secs(10)))
        .unwrap();
    assert!(o.all_ok && o.results.len() == 2, "{o:?}");
    holder.close();

    eprintln!("--- the token is free again: nothing was left held");
    let locks = c.etcd_keys("locks/");
    assert!(
        !locks.iter().any(|k| k.contains("/token")),
        "token left held: {locks:?}"
    );
    c.mdctl_ok(&["--node", "node2", "stop", "md0"]);
    c.mdctl_ok(&["--node", "node1", "stop", "md0"]);
}

/// The engine's own superblock writes go under the token too (md-cluster's
/// `metadata_update_start`): the first write after assembly marks the array dirty, and
/// while another session holds the token that write waits; once it is released the
/// superblocks say dirty, with one more event, and the other node has re-read them.
#[test]
fn engine_superblock_writes_wait_for_the_token() {
    // Safemode off: the dirty mark must still be there when it is checked.
    let c = ClusterBuilder::new(2)
        .agent_args(&["--safe-mode-delay", "0"])
        .shared_storage(2, 32 << 20)
        .start()
        .expect("cluster");
    let m = c.disks(2);
    let n1 = c.members_of(1, 2);
    let ms: Vec<&str> = n1.iter().map(String::as_str).collect();
    c.mirror_on_two_nodes("md0", ms[0], ms[1]);
    let sb = |i: usize| mdcluster_agent::format::io::read_member(&m[i]).unwrap().sb;
    let before = sb(0);
    assert_eq!(
        before.resync_offset,
        u64::MAX,
        "clean after create and assemble"
    );
    let holder = TokenHolder::take(&c, &before.set_uuid);
    let sock = c.agents[1].sock("md0");
    let child = Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x44 0 64k"])
        .arg(format!("nbd+unix:///md0?socket={}", sock.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("qemu-io");
    let mut child = ChildGuard(child);
    child.assert_waits("the first write");
    assert_eq!(
        sb(0).events,
        before.events,
        "nothing written without the token"
    );
    holder.release();
    let exit = child.wait_exit("the write");
    assert!(exit.success());
    for (i, path) in ms.iter().enumerate() {
        let now = sb(i);
        assert_eq!(now.resync_offset, 0, "{path}: marked dirty");
        assert_eq!(now.events, before.events + 1, "{path}: one more event");
    }
    // node1 re-read the superblocks (METADATA_UPDATED): its copy has the new events.
    let st = c.node_status("md0", "node1");
    assert_eq!(st["events"].as_u64(), Some(before.events + 1), "{st}");
    for n in ["node2", "node1"] {
        c.mdctl_ok(&["--node", n, "stop", "md0"]);
    }
    assert_eq!(sb(0).resync_offset, u64::MAX, "clean after both stopped");
}
