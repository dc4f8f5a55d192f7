//! Pieces of the chaos tests (t58): a client writing through a node's NBD export while
//! a fault is injected, with every answer timed; checks of what it was told against the
//! members themselves; the cluster's events and sessions as `mdctl` shows them.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::cluster::MDCTL_TIMEOUT;
use crate::tools::{bin, run_timeout};

/// Size of one client write.
pub const WRITE: u64 = 64 * 1024;

/// The pattern byte of write `i` (never 0, so an unwritten block never matches).
pub fn pattern(i: u64) -> u8 {
    (i % 250 + 1) as u8
}

/// What the client was told about one write.
#[derive(Debug, Clone, Copy)]
pub struct Answer {
    /// Index of the write (its offset is `base + i * WRITE`).
    pub i: u64,
    /// When the answer arrived.
    pub at: Instant,
    /// Success (false: the client got an error).
    pub ok: bool,
}

/// A `qemu-io` client writing `writes` blocks of [`WRITE`] bytes from `base` on (write
/// `i` at `base + i * WRITE` with [`pattern`]`(i)`), `gap_ms` apart, through an NBD
/// export; every answer is collected with its time. Killed on drop.
pub struct Writer {
    child: Child,
    answers: Arc<Mutex<Vec<Answer>>>,
    reader: Option<std::thread::JoinHandle<()>>,
    /// The first offset.
    pub base: u64,
    /// How many writes it was given.
    pub writes: u64,
}

impl Writer {
    /// Starts the client on the unix socket `sock` (export `name`); it gives up after
    /// `limit` in all.
    pub fn start(
        sock: &Path,
        name: &str,
        base: u64,
        writes: u64,
        gap_ms: u64,
        limit: Duration,
    ) -> Writer {
        let uri = format!("nbd+unix:///{name}?socket={}", sock.display());
        // `sh -c 'exec "$@" 2>&1'`: answers and errors on one pipe, in order; `stdbuf`:
        // each line as it is written, so its arrival time is the answer's.
        let mut args: Vec<String> = ["-c", "exec \"$@\" 2>&1", "sh", "timeout", "-k", "2"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.push(limit.as_secs().max(1).to_string());
        for a in ["stdbuf", "-oL", "-eL", "qemu-io", "-f", "raw"] {
            args.push(a.into());
        }
        for i in 0..writes {
            args.push("-c".into());
            args.push(format!(
                "write -P {} {} {WRITE}",
                pattern(i),
                base + i * WRITE
            ));
            if gap_ms > 0 {
                args.push("-c".into());
                args.push(format!("sleep {gap_ms}"));
            }
        }
        args.push(uri);
        let mut child = Command::new("sh")
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start qemu-io");
        let out = child.stdout.take().expect("qemu-io stdout");
        let answers = Arc::new(Mutex::new(Vec::new()));
        let a = answers.clone();
        // qemu-io runs its commands in order and answers each write ("wrote ..." or
        // "write failed: ..."): the n-th answer is write n.
        let reader = std::thread::spawn(move || {
            let mut i = 0;
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let ok = if l.starts_with(&format!("wrote {WRITE}/{WRITE} bytes")) {
                    true
                } else if l.starts_with("write failed") {
                    false
                } else {
                    continue;
                };
                a.lock().unwrap().push(Answer {
                    i,
                    at: Instant::now(),
                    ok,
                });
                i += 1;
            }
        });
        Writer {
            child,
            answers,
            reader: Some(reader),
            base,
            writes,
        }
    }

    /// The answers so far.
    pub fn answers(&self) -> Vec<Answer> {
        self.answers.lock().unwrap().clone()
    }

    /// Waits (bounded by the client's own limit) for the end; every answer.
    pub fn finish(mut self) -> Vec<Answer> {
        let _ = self.child.wait();
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        self.answers()
    }

    /// Ends the client now; every answer so far.
    pub fn kill(mut self) -> Vec<Answer> {
        let _ = self.child.kill();
        self.finish()
    }

    /// The offset of write `i`.
    pub fn offset(&self, i: u64) -> u64 {
        self.base + i * WRITE
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Panics unless every acknowledged write of a client that wrote from `base` is on
/// every member (read from the members' data areas directly), naming the first that is
/// not.
pub fn assert_acked_on_members(members: &[PathBuf], base: u64, answers: &[Answer]) {
    for m in members {
        let data = crate::standalone::data_area(m);
        for a in answers.iter().filter(|a| a.ok) {
            let off = (base + a.i * WRITE) as usize;
            let want = pattern(a.i);
            let block = &data[off..off + WRITE as usize];
            if let Some(p) = block.iter().position(|b| *b != want) {
                panic!(
                    "acknowledged write {} (offset {off}, pattern {want}) is not on {}: byte {p} reads {}",
                    a.i,
                    m.display(),
                    block[p]
                );
            }
        }
    }
}

/// The first answer at or after `t` (the time I/O resumed after a fault ended).
pub fn first_answer_after(answers: &[Answer], t: Instant) -> Option<Answer> {
    answers.iter().find(|a| a.at >= t).copied()
}

/// The longest time between two consecutive answers (the longest stall a client saw).
pub fn longest_gap(answers: &[Answer]) -> Duration {
    longest_stall(answers).map_or(Duration::ZERO, |(a, b)| b.saturating_duration_since(a))
}

/// The two consecutive answers furthest apart: (the last before the stall, the first
/// after it).
pub fn longest_stall(answers: &[Answer]) -> Option<(Instant, Instant)> {
    answers
        .windows(2)
        .max_by_key(|w| w[1].at.saturating_duration_since(w[0].at))
        .map(|w| (w[0].at, w[1].at))
}

/// `a - b` in signed milliseconds.
pub fn ms_between(a: Instant, b: Instant) -> i64 {
    if a >= b {
        a.duration_since(b).as_millis() as i64
    } else {
        -(b.duration_since(a).as_millis() as i64)
    }
}

/// `mdctl --server url ARGS`.
pub fn mdctl_at(url: &str, args: &[&str]) -> Output {
    run_timeout(
        Command::new(bin("mdctl"))
            .arg("--server")
            .arg(url)
            .args(args),
        MDCTL_TIMEOUT,
    )
}

/// Like [`mdctl_at`], panicking unless it succeeded; its stdout.
pub fn mdctl_ok_at(url: &str, args: &[&str]) -> String {
    let o = mdctl_at(url, args);
    assert!(
        o.status.success(),
        "mdctl --server {url} {args:?} failed with {}:\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `node -> session id` from `mdctl --json nodes`, sorted by node.
pub fn sessions(url: &str) -> Vec<(String, i64)> {
    let v: Value = serde_json::from_str(&mdctl_ok_at(url, &["--json", "nodes"])).unwrap();
    let mut s: Vec<(String, i64)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            (
                n["node"].as_str().unwrap().to_owned(),
                n["session_id"].as_i64().unwrap(),
            )
        })
        .collect();
    s.sort();
    s
}

/// `text` without ANSI colour sequences (`ESC [ ... m`).
pub fn plain(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut it = text.chars();
    while let Some(ch) = it.next() {
        if ch == '\u{1b}' {
            for c in it.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(ch);
        }
    }
    out
}

/// `mdctl --json monitor` against a list of replicas, its events collected. Killed on
/// drop.
pub struct Monitor {
    child: Child,
    events: Arc<Mutex<Vec<Value>>>,
}

impl Monitor {
    /// Starts the monitor against `url` (one replica or a comma-separated list).
    pub fn start(url: &str) -> Monitor {
        let mut child = Command::new(bin("mdctl"))
            .args(["--server", url, "--json", "monitor"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("monitor");
        let out = child.stdout.take().expect("monitor stdout");
        let events = Arc::new(Mutex::new(Vec::new()));
        let ev = events.clone();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str(&l) {
                    ev.lock().unwrap().push(v);
                }
            }
        });
        Monitor { child, events }
    }

    /// The events so far.
    pub fn events(&self) -> Vec<Value> {
        self.events.lock().unwrap().clone()
    }

    /// Waits up to `timeout` for event `name` of `node`.
    pub fn wait(&self, name: &str, node: &str, timeout: Duration) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(e) = self
                .events()
                .into_iter()
                .find(|e| e["event"] == name && e["node"] == node)
            {
                return e;
            }
            assert!(
                Instant::now() < deadline,
                "no {name} of {node} within {timeout:?}: {:?}",
                self.events()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The readiness of the agent service on `addr` (`host:port`) from its gRPC health
/// service: `Some(true)` SERVING, `Some(false)` anything else, `None` no answer within
/// 2 s.
pub fn agent_ready(addr: &str) -> Option<bool> {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(async {
        let ask = async {
            let ch = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .ok()?
                .connect()
                .await
                .ok()?;
            let r = HealthClient::new(ch)
                .check(HealthCheckRequest {
                    service: "mdcluster.v1.AgentService".into(),
                })
                .await
                .ok()?
                .into_inner();
            Some(r.status == ServingStatus::Serving as i32)
        };
        tokio::time::timeout(Duration::from_secs(2), ask)
            .await
            .ok()
            .flatten()
    })
}

/// Through mdserver `url`: creates the clustered two-way mirror `md0` over `members` on
/// node1 ([`crate::cluster::mirror_create_args`]) and assembles it on node2.
pub fn clustered_mirror(url: &str, members: &[PathBuf]) {
    let ms: Vec<&str> = members.iter().map(|p| p.to_str().unwrap()).collect();
    mdctl_ok_at(
        url,
        &crate::cluster::mirror_create_args("md0", ms[0], ms[1]),
    );
    mdctl_ok_at(url, &["--node", "node2", "assemble", "md0"]);
}

/// The number of rounds a chaos test runs: `$var`, else `default`.
pub fn rounds(var: &str, default: usize) -> usize {
    std::env::var(var)
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(default)
}

/// A two-node cluster on two mdserver replicas with a clustered two-way mirror `md0`
/// assembled on both nodes: what the replica chaos tests (t55, t58_chaos_replica) start
/// each round from.
pub struct MirrorOnReplicas {
    /// The cluster; its `server` is the replica the test takes down.
    pub cluster: crate::cluster::TestCluster,
    /// The replica that stays up; every mdctl call of the test goes there.
    pub live: String,
    /// The replica the test takes down (the one the agents start on).
    pub victim: String,
    /// Each node's session id before the fault.
    pub sessions: Vec<(String, i64)>,
    /// `mdctl monitor` on the live replica, started before the array was made.
    pub monitor: Monitor,
    /// The mirror's two member files.
    pub members: Vec<PathBuf>,
}

/// Starts [`MirrorOnReplicas`]: agents with session TTL `ttl`, members of 80 MiB named
/// `<prefix>0`, `<prefix>1`, bitmap chunk 1 MiB, created `--assume-clean` on node1 and
/// assembled on node2.
pub fn mirror_on_replicas(ttl: Duration, prefix: &str) -> MirrorOnReplicas {
    let cluster = crate::cluster::ClusterBuilder::new(2)
        .replicas(2)
        .agent_ttl(ttl)
        .start()
        .expect("cluster");
    let live = cluster.replicas[0].url();
    let victim = cluster.server.url();
    let sessions = sessions(&live);
    assert_eq!(sessions.len(), 2, "{sessions:?}");
    let monitor = Monitor::start(&live);
    let members = crate::standalone::member_files(cluster.path(), prefix, 2, 80 << 20);
    clustered_mirror(&live, &members);
    MirrorOnReplicas {
        cluster,
        live,
        victim,
        sessions,
        monitor,
        members,
    }
}
