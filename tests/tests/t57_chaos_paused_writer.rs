//! t57: a paused writer never writes after its slot was taken over. Two nodes on
//! multi-view shared storage (a loop device per node and member), a clustered mirror
//! assembled on both, a 4 s session TTL. A client (a small NBD client over node2's unix
//! socket) keeps 16 writes of 64 KiB in flight over a 4 MiB region when node2's agent
//! is frozen (SIGSTOP, like a paused VM); more writes and a flush are queued on the
//! socket during the pause. node1 takes node2's slot over after the TTL, writes its
//! own pattern over the region and flushes; node2 is thawed (SIGCONT).
//!
//! Asserted: each node reports its two loop-device members as fenced by the gate only
//! (no persistent reservations); the region reads node1's pattern only, on every member (scanned on the
//! shared disks directly); the members end identical; node2's client got no success
//! for anything sent during the pause (writes and the flush). Printed: the takeover and
//! resume times.
//!
//! `T57_ROUNDS` (default 3) sets how many independent rounds run (a fresh cluster each).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mdcluster_tests::cluster::{ClusterBuilder, TestCluster};
use mdcluster_tests::standalone::assert_members_identical;

const MIB: u64 = 1 << 20;
const TTL: Duration = Duration::from_secs(4);
/// The region both nodes write, array bytes `[REGION, REGION + REGION_LEN)`.
const REGION: u64 = 8 * MIB;
const REGION_LEN: u64 = 4 * MIB;
const WRITE: u64 = 64 * 1024;
/// Writes node2's client keeps in flight.
const IN_FLIGHT: usize = 16;
/// Writes (and then a flush) queued on node2's socket during the pause.
const QUEUED: u64 = 24;
const NODE1_BYTE: u8 = 0x1a;

const NBD_REQUEST_MAGIC: u32 = 0x2560_9513;
const NBD_SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
const NBD_CMD_WRITE: u16 = 1;
const NBD_CMD_FLUSH: u16 = 3;
const NBD_CMD_DISC: u16 = 2;

/// A fixed-newstyle NBD client (simple replies) whose requests and replies go through
/// separate halves of one socket, so requests can be queued while replies are awaited.
struct Nbd {
    tx: UnixStream,
}

/// One reply: (cookie, NBD error, when it arrived).
type Reply = (u64, u32, Instant);

impl Nbd {
    /// Connects to `sock`, opens export `name` (NBD_OPT_EXPORT_NAME, no zeroes) and
    /// starts a thread that collects replies into the returned list.
    fn connect(
        sock: &Path,
        name: &str,
    ) -> (Nbd, Arc<Mutex<Vec<Reply>>>, std::thread::JoinHandle<()>) {
        let mut s = UnixStream::connect(sock).expect("connect NBD socket");
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        s.set_write_timeout(Some(Duration::from_secs(120))).unwrap();
        let mut hello = [0u8; 18];
        s.read_exact(&mut hello).expect("NBD greeting");
        assert_eq!(&hello[..8], b"NBDMAGIC");
        // Client flags: FIXED_NEWSTYLE | NO_ZEROES.
        s.write_all(&3u32.to_be_bytes()).unwrap();
        let mut opt = Vec::new();
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name.as_bytes());
        s.write_all(&opt).unwrap();
        let mut info = [0u8; 10];
        s.read_exact(&mut info).expect("export info");
        let replies = Arc::new(Mutex::new(Vec::new()));
        let mut rx = s.try_clone().unwrap();
        let r = replies.clone();
        let reader = std::thread::spawn(move || loop {
            let mut h = [0u8; 16];
            if rx.read_exact(&mut h).is_err() {
                return; // closed (or the bounded read timed out)
            }
            let magic = u32::from_be_bytes(h[..4].try_into().unwrap());
            assert_eq!(magic, NBD_SIMPLE_REPLY_MAGIC, "reply magic");
            let error = u32::from_be_bytes(h[4..8].try_into().unwrap());
            let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
            r.lock().unwrap().push((cookie, error, Instant::now()));
        });
        (Nbd { tx: s }, replies, reader)
    }

    fn request(&mut self, cmd: u16, cookie: u64, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut m = Vec::with_capacity(28 + data.len());
        m.extend_from_slice(&NBD_REQUEST_MAGIC.to_be_bytes());
        m.extend_from_slice(&0u16.to_be_bytes());
        m.extend_from_slice(&cmd.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        let len = if cmd == NBD_CMD_WRITE {
            data.len() as u32
        } else {
            0
        };
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(data);
        self.tx.write_all(&m)
    }
}

/// Waits (bounded) until `cond` holds; on timeout panics with `context()`.
fn wait_for(
    what: &str,
    timeout: Duration,
    mut cond: impl FnMut() -> bool,
    context: impl Fn() -> String,
) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}; {}",
            context()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// The state letter of every thread of process `pid` (`/proc/PID/task/*/stat`).
fn thread_states(pid: u32) -> Vec<char> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.filter_map(|t| t.ok())
        .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
        // "TID (comm) S ...": the state follows the last ')'.
        .filter_map(|st| {
            st.rsplit_once(')')
                .and_then(|(_, r)| r.trim().chars().next())
        })
        .collect()
}

/// Whether every thread of `pid` is stopped (`T`, or `t` under a tracer).
fn all_stopped(pid: u32) -> bool {
    let st = thread_states(pid);
    !st.is_empty() && st.iter().all(|&c| c == 'T' || c == 't')
}

/// ANSI colour codes removed (the agents log in colour).
fn plain(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut esc = false;
    for ch in s.chars() {
        match (esc, ch) {
            (false, '\x1b') => esc = true,
            (true, 'm') => esc = false,
            (true, _) => {}
            (false, c) => out.push(c),
        }
    }
    out
}

/// Bytes `[off, off + len)` of the array's data area on member disk `disk`.
fn region_on_disk(disk: &Path, off: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let m = mdcluster_agent::format::io::read_member(disk).expect("read member");
    let f = std::fs::File::open(disk).expect("open disk");
    let mut buf = vec![0u8; len as usize];
    f.read_exact_at(&mut buf, m.sb.data_offset * 512 + off)
        .expect("read region");
    buf
}

/// The last "slowest member I/O so far" an agent logged (its slowest gated member
/// system call), as logged.
fn slowest_io(log: &str) -> String {
    plain(log)
        .lines()
        .filter_map(|l| l.split("slowest member I/O so far: ").nth(1))
        .filter_map(|rest| rest.split(' ').next())
        .next_back()
        .unwrap_or("under 1 ms")
        .to_owned()
}

/// A guard that thaws a frozen agent if the test fails while it is stopped (so the
/// cluster guard can kill and reap it).
struct Thaw(Option<u32>);

impl Drop for Thaw {
    fn drop(&mut self) {
        if let Some(pid) = self.0.take() {
            let _ = Command::new("kill")
                .arg("-CONT")
                .arg(pid.to_string())
                .status();
        }
    }
}

fn round(n: usize) {
    eprintln!("=== round {n}");
    let mut c: TestCluster = ClusterBuilder::new(2)
        .shared_storage(2, 64 * MIB)
        .agent_ttl(TTL)
        .start()
        .expect("cluster");
    let a = c.members_of(1, 2);
    c.mirror_on_two_nodes("md0", &a[0], &a[1]);
    // Loop devices take no persistent reservations: each node says so once per member.
    for agent in &c.agents {
        let log = plain(&agent.log_text());
        assert_eq!(
            log.matches("fenced by the fence gate only").count(),
            2,
            "{}: every member reported once as fenced by the gate only; log:\n{log}",
            agent.node
        );
    }

    eprintln!("--- node2's client keeps {IN_FLIGHT} writes of {WRITE} bytes in flight");
    let (w2, replies2, reader2) = Nbd::connect(&c.agents[1].sock("md0"), "md0");
    let slots = REGION_LEN / WRITE;
    // The writer sends under this lock; the pause is taken under it too, so every
    // request is sent either before the pause or after it.
    let wr = Arc::new(Mutex::new((w2, 0u64, false)));
    let writer = {
        let wr = wr.clone();
        let replies = replies2.clone();
        std::thread::spawn(move || {
            let mut queued = 0u64;
            loop {
                let mut g = wr.lock().unwrap();
                let (ref mut w, ref mut cookie, paused) = *g;
                let ck = *cookie;
                if paused {
                    // During the pause: QUEUED more writes, then a flush, then done.
                    let r = if queued < QUEUED {
                        let b = 0xc0 | (queued % 16) as u8;
                        w.request(
                            NBD_CMD_WRITE,
                            ck,
                            REGION + (ck % slots) * WRITE,
                            &vec![b; WRITE as usize],
                        )
                    } else {
                        w.request(NBD_CMD_FLUSH, ck, 0, &[])
                    };
                    *cookie += 1;
                    queued += 1;
                    if r.is_err() || queued > QUEUED {
                        return;
                    }
                    continue;
                }
                let done = replies.lock().unwrap().len() as u64;
                if ck < done + IN_FLIGHT as u64 {
                    let b = 0xb0 | (ck % 16) as u8;
                    w.request(
                        NBD_CMD_WRITE,
                        ck,
                        REGION + (ck % slots) * WRITE,
                        &vec![b; WRITE as usize],
                    )
                    .expect("send write");
                    *cookie += 1;
                } else {
                    drop(g);
                    std::thread::sleep(Duration::from_micros(100));
                }
            }
        })
    };
    // The client runs at full depth for a while before the pause.
    std::thread::sleep(Duration::from_millis(1500));
    let early: Vec<_> = replies2.lock().unwrap().clone();
    assert!(
        early.len() > IN_FLIGHT,
        "node2's client made no progress: {} replies",
        early.len()
    );
    assert!(
        early.iter().all(|r| r.1 == 0),
        "a write failed before the pause: {early:?}"
    );

    let pid2 = c.agents[1].pid().expect("node2 runs");
    let mut thaw = Thaw(None);
    // Paused when the client has its full window unanswered (bounded wait for one).
    let deadline = Instant::now() + Duration::from_secs(10);
    let (first_queued, in_flight, paused) = loop {
        let mut g = wr.lock().unwrap();
        let answered = replies2.lock().unwrap().len() as u64;
        if g.1 - answered == IN_FLIGHT as u64 {
            // SAFETY: kill(2) on our own child's pid.
            let rc = unsafe { libc::kill(pid2 as i32, libc::SIGSTOP) };
            assert_eq!(rc, 0, "SIGSTOP node2");
            thaw.0 = Some(pid2);
            // The stop takes effect thread by thread (one in a system call stops when
            // it returns): nothing is queued before every thread is stopped.
            wait_for(
                "every thread of node2 to stop",
                Duration::from_secs(10),
                || all_stopped(pid2),
                || format!("threads of node2: {:?}", thread_states(pid2)),
            );
            let paused = Instant::now();
            g.2 = true;
            break (g.1, g.1 - answered, paused);
        }
        drop(g);
        assert!(
            Instant::now() < deadline,
            "node2's client never had {IN_FLIGHT} writes unanswered"
        );
        std::thread::sleep(Duration::from_micros(50));
    };
    eprintln!(
        "--- node2 paused with {in_flight} writes unanswered (some may have completed in \
         the kernel or have their reply on the way); {QUEUED} writes and a flush queued"
    );
    let flush_cookie = first_queued + QUEUED;
    let queue = writer;

    eprintln!("--- node1 takes node2's slot over");
    let n1 = &c.agents[0];
    wait_for(
        "node1 to recover node2's slot",
        Duration::from_secs(40),
        || {
            plain(&n1.log_text())
                .lines()
                .any(|l| l.contains("slot recovered") && l.contains("slot=1"))
        },
        || {
            format!(
                "log of node1:\n{}\nlog of node2:\n{}",
                n1.log_text(),
                c.agents[1].log_text()
            )
        },
    );
    let took_over = paused.elapsed();
    eprintln!("node1 recovered node2's slot {took_over:?} after the pause");

    eprintln!("--- node1 writes its pattern over the region and flushes");
    let (mut w1, replies1, reader1) = Nbd::connect(&n1.sock("md0"), "md0");
    for i in 0..slots {
        w1.request(
            NBD_CMD_WRITE,
            i,
            REGION + i * WRITE,
            &vec![NODE1_BYTE; WRITE as usize],
        )
        .expect("node1 write");
    }
    w1.request(NBD_CMD_FLUSH, slots, 0, &[])
        .expect("node1 flush");
    wait_for(
        "node1's writes and flush",
        Duration::from_secs(60),
        || replies1.lock().unwrap().len() as u64 == slots + 1,
        || format!("log of node1:\n{}", n1.log_text()),
    );
    assert!(
        replies1.lock().unwrap().iter().all(|r| r.1 == 0),
        "node1's writes failed: {:?}",
        replies1.lock().unwrap()
    );
    let _ = w1.request(NBD_CMD_DISC, slots + 1, 0, &[]);
    let _ = reader1.join();
    for k in 0..2 {
        assert!(
            region_on_disk(&c.disk(k), REGION, REGION_LEN)
                .iter()
                .all(|&b| b == NODE1_BYTE),
            "node1's flushed write is not on member {k}"
        );
    }

    eprintln!("--- node2 thawed");
    // SAFETY: kill(2) on our own child's pid.
    let rc = unsafe { libc::kill(pid2 as i32, libc::SIGCONT) };
    assert_eq!(rc, 0, "SIGCONT node2");
    thaw.0 = None;
    let resumed = Instant::now();
    // node2 finds its session lost: it stops md0 without writing metadata and assembles
    // it again on a new session, in the same process.
    let deadline = resumed + TTL * 4;
    loop {
        let log = plain(&c.agents[1].log_text());
        if log.contains("arrays of the lost session stopped without writing metadata") {
            break;
        }
        assert_eq!(
            c.agents[1].wait_exit(Duration::ZERO),
            None,
            "node2 exited; log:\n{log}"
        );
        assert!(
            Instant::now() < deadline,
            "node2 did not stop the md0 of its lost session {:?} after the thaw; log:\n{log}",
            resumed.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let gone = resumed.elapsed();
    eprintln!("node2 stopped the md0 of its lost session {gone:?} after it was thawed");
    let log2 = plain(&c.agents[1].log_text());
    let _ = queue.join();
    let _ = reader2.join();

    // Nothing node2 was asked during the pause succeeded.
    let replies = replies2.lock().unwrap().clone();
    let bad: Vec<_> = replies
        .iter()
        .filter(|r| r.0 >= first_queued && r.1 == 0)
        .map(|r| {
            if r.0 == flush_cookie {
                "the flush".to_owned()
            } else {
                format!("write {}", r.0)
            }
        })
        .collect();
    assert!(
        bad.is_empty(),
        "node2 acknowledged requests sent during its pause: {bad:?}; log:\n{log2}"
    );
    let thawed: Vec<_> = replies
        .iter()
        .filter(|r| r.2 >= resumed && r.0 < first_queued)
        .collect();
    let after_thaw = format!(
        "{} ok, {} failed",
        thawed.iter().filter(|r| r.1 == 0).count(),
        thawed.iter().filter(|r| r.1 != 0).count()
    );
    for l in log2
        .lines()
        .filter(|l| l.contains("suspended") || l.contains("SELF-FENCING") || l.contains("lease of"))
    {
        eprintln!("node2: {l}");
    }

    // The region holds node1's data only, on every member.
    for k in 0..2 {
        let r = region_on_disk(&c.disk(k), REGION, REGION_LEN);
        if let Some(pos) = r.iter().position(|&b| b != NODE1_BYTE) {
            panic!(
                "member {k}: byte {} of the region is {:#x} (node2's stale write landed over \
                 node1's acknowledged write); log of node2:\n{log2}",
                REGION + pos as u64,
                r[pos]
            );
        }
    }

    // node1 finishes resyncing node2's dirty chunks; then the members are identical.
    wait_for(
        "node1's resync of node2's chunks",
        Duration::from_secs(60),
        || {
            let st = c.node_status("md0", "node1");
            st["bitmap"]["needed"] == 0 && st["sync"]["runs"].as_u64() >= Some(1)
        },
        || format!("status of node1: {}", c.node_status("md0", "node1")),
    );
    // node2 assembled md0 again on its new session (same process): stopped too before
    // the members are compared.
    let node2_active = || {
        let d: serde_json::Value =
            serde_json::from_str(&c.mdctl_ok(&["--json", "detail", "md0"])).expect("detail");
        d["nodes"].as_array().is_some_and(|v| {
            v.iter()
                .any(|n| n["node"] == "node2" && n["state"] == "active")
        })
    };
    wait_for(
        "node2's md0 again",
        Duration::from_secs(60),
        node2_active,
        || c.mdctl_ok(&["--json", "detail", "md0"]),
    );
    assert_eq!(c.agents[1].wait_exit(Duration::ZERO), None, "node2 exited");
    c.mdctl_ok(&["--node", "node2", "stop", "md0"]);
    c.mdctl_ok(&["--node", "node1", "stop", "md0"]);
    assert_members_identical(&c.disks(2));
    eprintln!(
        "slowest member system call: node1 {}, node2 {}",
        slowest_io(&c.agents[0].log_text()),
        slowest_io(&log2)
    );
    eprintln!(
        "round {n}: pause {in_flight} in flight + {QUEUED} writes and a flush queued; takeover \
         {took_over:?} after the pause; node2's old md0 stopped {gone:?} after the thaw (no exit); \
         writes in flight at the pause answered after the thaw: {after_thaw}; members identical"
    );
    drop(c);
}

#[test]
fn a_paused_writer_never_writes_after_its_slot_was_taken_over() {
    let rounds: usize = std::env::var("T57_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    for n in 1..=rounds {
        round(n);
    }
    eprintln!("{rounds}/{rounds} rounds passed");
}
