//! A standalone `mdagent` process (no cluster) for the RAID tests: start it on a run
//! dir, drive it through its control socket, kill it with -9 or stop it with SIGTERM;
//! plus checks on members (data areas identical) and a raw NBD open probe that tells
//! success, EBUSY and ENOENT apart and times them.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::tools::bin;

/// Bound of one control request (a stop waits for its grace and drain).
pub const CTL_TIMEOUT: Duration = Duration::from_secs(60);

/// A running `mdagent` in standalone mode; killed (-9) on drop if still running.
pub struct Agent {
    child: Option<Child>,
    /// Its run dir (sockets).
    pub run_dir: PathBuf,
    /// Its log file (stderr).
    pub log: PathBuf,
}

impl Agent {
    /// Starts `mdagent --run-dir <run_dir> <args>` and waits (≤ 20 s) for its control
    /// socket.
    pub fn start(run_dir: &Path, args: &[&str]) -> Agent {
        Agent::start_with(&mut Command::new(bin("mdagent")), run_dir, args)
    }

    /// Like [`Agent::start`] through `cmd`, which runs the agent in its own process
    /// (e.g. `prlimit ... mdagent`, which execs it); the arguments follow.
    pub fn start_with(cmd: &mut Command, run_dir: &Path, args: &[&str]) -> Agent {
        std::fs::create_dir_all(run_dir).expect("create run dir");
        let log = run_dir.with_extension(format!("log.{}", std::process::id()));
        let logf = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let child = cmd
            .arg("--run-dir")
            .arg(run_dir)
            .args(args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(logf)
            .spawn()
            .expect("start mdagent");
        let agent = Agent {
            child: Some(child),
            run_dir: run_dir.to_owned(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while UnixStream::connect(agent.control()).is_err() {
            assert!(
                Instant::now() < deadline,
                "mdagent did not come up; log:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        agent
    }

    /// The control socket.
    pub fn control(&self) -> PathBuf {
        self.run_dir.join("mdagent.ctl")
    }

    /// The agent's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Its log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The NBD socket of array `name`.
    pub fn sock(&self, name: &str) -> PathBuf {
        self.run_dir.join(format!("{name}.nbd"))
    }

    /// The NBD URI of array `name`.
    pub fn uri(&self, name: &str) -> String {
        format!("nbd+unix:///?socket={}", self.sock(name).display())
    }

    /// Sends one control request; returns the answer.
    pub fn ctl(&self, req: Value) -> Value {
        let mut s = UnixStream::connect(self.control()).expect("connect control socket");
        s.set_read_timeout(Some(CTL_TIMEOUT)).expect("timeout");
        s.set_write_timeout(Some(CTL_TIMEOUT)).expect("timeout");
        let mut line = req.to_string();
        line.push('\n');
        s.write_all(line.as_bytes()).expect("send control request");
        let mut answer = String::new();
        BufReader::new(s)
            .read_line(&mut answer)
            .expect("read control answer");
        serde_json::from_str(&answer).unwrap_or_else(|e| panic!("bad answer {answer:?}: {e}"))
    }

    /// Sends a request that must succeed; returns its result.
    pub fn ok(&self, req: Value) -> Value {
        let a = self.ctl(req.clone());
        assert_eq!(
            a["ok"],
            true,
            "request {req} failed: {a}\nagent log:\n{}",
            self.log_text()
        );
        a["result"].clone()
    }

    /// Status of array `name` (the registry's `ArrayInfo`).
    pub fn status(&self, name: &str) -> Value {
        self.ok(serde_json::json!({"op": "status", "name": name}))
    }

    /// Waits (bounded) until `cond(status)` holds; returns that status.
    pub fn wait_status(
        &self,
        name: &str,
        timeout: Duration,
        cond: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.status(name);
            if cond(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting on {name}; last status {s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9, and reap.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait (≤ 60 s) for a clean exit.
    pub fn term(&mut self) -> ExitStatus {
        let mut c = self.child.take().expect("agent running");
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(st) = c.try_wait().expect("wait") {
                return st;
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                let _ = c.wait();
                panic!(
                    "mdagent did not exit after SIGTERM; log:\n{}",
                    self.log_text()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Paths the agent process has open (from /proc).
    pub fn open_files(&self) -> Vec<PathBuf> {
        let Ok(rd) = std::fs::read_dir(format!("/proc/{}/fd", self.pid())) else {
            return vec![];
        };
        rd.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Sparse files of `bytes` each, `<dir>/<prefix><i>`.
pub fn member_files(dir: &Path, prefix: &str, n: usize, bytes: u64) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let p = dir.join(format!("{prefix}{i}"));
            std::fs::File::create(&p)
                .expect("create member")
                .set_len(bytes)
                .expect("size member");
            p
        })
        .collect()
}

/// The data area of a member (`data_offset`, `size` from its superblock).
pub fn data_area(path: &Path) -> Vec<u8> {
    let m = mdcluster_agent::format::io::read_member(path).expect("read member");
    let mut f = std::fs::File::open(path).expect("open member");
    let mut all = Vec::new();
    f.read_to_end(&mut all).expect("read member");
    let start = (m.sb.data_offset * 512) as usize;
    all[start..start + (m.sb.size * 512) as usize].to_vec()
}

/// Panics unless the data areas of all `paths` are byte-identical.
pub fn assert_members_identical(paths: &[PathBuf]) {
    let first = data_area(&paths[0]);
    for p in &paths[1..] {
        let d = data_area(p);
        assert_eq!(first.len(), d.len(), "{} has another size", p.display());
        if let Some(pos) = first.iter().zip(&d).position(|(a, b)| a != b) {
            panic!(
                "{} differs from {} at data byte {pos}",
                p.display(),
                paths[0].display()
            );
        }
    }
}

/// Set bits of bitmap slot `slot` on a member.
pub fn dirty_bits(path: &Path, slot: usize) -> u64 {
    let m = mdcluster_agent::format::io::read_member(path).expect("read member");
    let s = &m.bitmap[slot];
    mdcluster_agent::format::bitmap::count_set(&s.bits, s.sb.chunks())
}

/// Number of chunks dirty in slot `slot` of any of `paths` (the union of their bits):
/// what an assemble resyncs. A kill -9 in the middle of a bitmap flush can leave the
/// members' copies one flush apart.
pub fn dirty_bits_union(paths: &[PathBuf], slot: usize) -> u64 {
    let members: Vec<_> = paths
        .iter()
        .map(|p| mdcluster_agent::format::io::read_member(p).expect("read member"))
        .collect();
    let chunks = members[0].bitmap[slot].sb.chunks();
    (0..chunks)
        .filter(|&i| {
            members
                .iter()
                .any(|m| mdcluster_agent::format::bitmap::test_bit(&m.bitmap[slot].bits, i))
        })
        .count() as u64
}

/// Outcome of one NBD open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Probe {
    /// `NBD_OPT_GO` succeeded.
    Ok,
    /// Refused with `NBD_REP_ERR_SHUTDOWN` and a message starting with EBUSY.
    Busy,
    /// Refused with `NBD_REP_ERR_UNKNOWN` and ENOENT, or the socket does not exist.
    NotFound,
    /// Anything else (a failure of the test).
    Other(String),
}

fn read_exact(s: &mut UnixStream, n: usize) -> std::io::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn be_u32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// Opens export `name` on `sock` with `NBD_OPT_GO` and says how it ended, closing at
/// once (`NBD_CMD_DISC` after success, `NBD_OPT_ABORT` after a refusal).
pub fn nbd_probe(sock: &Path, name: &str, timeout: Duration) -> Probe {
    nbd_open(sock, name, timeout, false).0
}

/// Opens export `name` and keeps the connection (in transmission) until the returned
/// stream is dropped; `None` unless the open succeeded.
pub fn nbd_hold(sock: &Path, name: &str, timeout: Duration) -> Option<UnixStream> {
    match nbd_open(sock, name, timeout, true) {
        (Probe::Ok, s) => s,
        _ => None,
    }
}

fn nbd_open(sock: &Path, name: &str, timeout: Duration, keep: bool) -> (Probe, Option<UnixStream>) {
    let mut s = match UnixStream::connect(sock) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (Probe::NotFound, None),
        Err(e) => return (Probe::Other(format!("connect: {e}")), None),
    };
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let r = (|| -> std::io::Result<Probe> {
        let hello = read_exact(&mut s, 18)?;
        if &hello[..8] != b"NBDMAGIC" || &hello[8..16] != b"IHAVEOPT" {
            return Ok(Probe::Other("bad greeting".into()));
        }
        s.write_all(&3u32.to_be_bytes())?; // FIXED_NEWSTYLE | NO_ZEROES
        let mut opt = Vec::new();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&7u32.to_be_bytes()); // NBD_OPT_GO
        opt.extend_from_slice(&((4 + name.len() + 2) as u32).to_be_bytes());
        opt.extend_from_slice(&(name.len() as u32).to_be_bytes());
        opt.extend_from_slice(name.as_bytes());
        opt.extend_from_slice(&0u16.to_be_bytes());
        s.write_all(&opt)?;
        loop {
            let h = read_exact(&mut s, 20)?;
            let rtype = be_u32(&h[12..16]);
            let len = be_u32(&h[16..20]) as usize;
            let data = read_exact(&mut s, len.min(1 << 16))?;
            match rtype {
                1 if keep => return Ok(Probe::Ok),
                1 => {
                    // ACK: transmission; NBD_CMD_DISC.
                    let mut req = Vec::new();
                    req.extend_from_slice(&0x2560_9513u32.to_be_bytes());
                    req.extend_from_slice(&0u16.to_be_bytes());
                    req.extend_from_slice(&2u16.to_be_bytes());
                    req.extend_from_slice(&[0u8; 8 + 8 + 4]);
                    let _ = s.write_all(&req);
                    return Ok(Probe::Ok);
                }
                3 => continue, // NBD_REP_INFO
                t if t & 0x8000_0000 != 0 => {
                    let mut abort = Vec::new();
                    abort.extend_from_slice(b"IHAVEOPT");
                    abort.extend_from_slice(&2u32.to_be_bytes());
                    abort.extend_from_slice(&0u32.to_be_bytes());
                    let _ = s.write_all(&abort);
                    let msg = String::from_utf8_lossy(&data).into_owned();
                    // NBD_REP_ERR_SHUTDOWN = EBUSY, NBD_REP_ERR_UNKNOWN = ENOENT.
                    return Ok(match t {
                        0x8000_0007 if msg.starts_with("EBUSY") => Probe::Busy,
                        0x8000_0006 if msg.starts_with("ENOENT") => Probe::NotFound,
                        _ => Probe::Other(format!("error reply {t:#x}: {msg}")),
                    });
                }
                t => return Ok(Probe::Other(format!("unexpected reply {t}"))),
            }
        }
    })();
    match r {
        Ok(Probe::Ok) if keep => (Probe::Ok, Some(s)),
        Ok(p) => (p, None),
        Err(e) => (Probe::Other(format!("I/O: {e}")), None),
    }
}

/// Runs `args[0] args[1..]` under `timeout -k 5 <secs>`; returns the output.
pub fn run_for(secs: u64, args: &[&str]) -> std::process::Output {
    crate::tools::run_timeout(
        Command::new("timeout")
            .args(["-k", "5", &secs.to_string()])
            .args(args),
        Duration::from_secs(secs + 10),
    )
}

/// Runs a command (bounded, 120 s) that must succeed; returns its stdout.
pub fn sh(args: &[&str]) -> String {
    let out = run_for(120, args);
    assert!(
        out.status.success(),
        "{args:?} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a command on drop (undo: `losetup -d`, `umount`), bounded, errors ignored.
pub struct Cleanup(pub Vec<String>);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let args: Vec<&str> = self.0.iter().map(String::as_str).collect();
        let _ = Command::new("timeout")
            .args(["-k", "5", "30"])
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// An `nbdfuse` mount of an NBD socket as `<dir>/disk`; unmounted and reaped on drop.
pub struct FuseMount {
    child: Child,
    /// The FUSE mount point.
    pub dir: PathBuf,
}

impl FuseMount {
    /// Mounts `sock` at `dir/disk` and waits (≤ 20 s) until it is there.
    pub fn mount(sock: &Path, dir: &Path) -> FuseMount {
        std::fs::create_dir_all(dir).expect("fuse dir");
        let pidfile = dir.with_extension("pid");
        let _ = std::fs::remove_file(&pidfile);
        let child = Command::new("timeout")
            .args(["-k", "5", "600", "nbdfuse", "-P"])
            .arg(&pidfile)
            .arg(dir.join("disk"))
            .arg("--unix")
            .arg(sock)
            .stdin(Stdio::null())
            .spawn()
            .expect("start nbdfuse");
        let fuse = FuseMount {
            child,
            dir: dir.to_owned(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !pidfile.exists() {
            assert!(Instant::now() < deadline, "nbdfuse not ready in 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        fuse
    }

    /// The exported disk file.
    pub fn disk(&self) -> PathBuf {
        self.dir.join("disk")
    }
}

impl Drop for FuseMount {
    fn drop(&mut self) {
        drop(Cleanup(vec![
            "fusermount3".into(),
            "-u".into(),
            self.dir.display().to_string(),
        ]));
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic pseudo-random bytes.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}
