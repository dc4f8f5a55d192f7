//! Running things in tests: the workspace's own binaries and external tools, always
//! with a timeout, and RAII guards for what must be undone (loop devices).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The variables that make mdserver, mdagent and mdctl run without TLS (`--insecure`).
pub const INSECURE_ENV: [&str; 3] = ["MDSERVER_INSECURE", "MDAGENT_INSECURE", "MDCTL_INSECURE"];

/// Default timeout for one external command.
pub const CMD_TIMEOUT: Duration = Duration::from_secs(60);

/// The directory holding the workspace binaries (`target/<profile>`), found from the
/// running test executable (`target/<profile>/deps/<test>`).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Path of a workspace binary (`mdctl`, `mdserver`, `mdagent`). Panics with what to do
/// if it has not been built.
///
/// The first call also sets `MDSERVER_INSECURE`, `MDAGENT_INSECURE` and `MDCTL_INSECURE`
/// in this process's environment: every process a test starts speaks plain-text gRPC
/// unless the test asks for mutual TLS (the rig then removes these from that process's
/// environment and passes `--tls-*`; see [`crate::cluster::ClusterBuilder::tls`]).
pub fn bin(name: &str) -> PathBuf {
    static INSECURE: std::sync::Once = std::sync::Once::new();
    INSECURE.call_once(|| {
        for v in INSECURE_ENV {
            // Set once, before this test starts any process of its own.
            std::env::set_var(v, "true");
        }
    });
    let p = target_dir().join(name);
    assert!(
        p.exists(),
        "{} is not built: run `cargo build --workspace --bins` first (scripts/test does)",
        p.display()
    );
    p
}

/// Runs `cmd` to completion, killing it after `timeout`. Panics on timeout, with the
/// command line, so a hung client fails the test instead of hanging CI.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    // Drain the pipes on threads so a chatty child cannot block on a full pipe.
    let mut out = child.stdout.take().expect("stdout");
    let mut err = child.stderr.take().expect("stderr");
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{desc} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t_out.join().expect("stdout thread"),
        stderr: t_err.join().expect("stderr thread"),
    }
}

/// Runs `cmd` with [`CMD_TIMEOUT`] and returns its stdout; panics (with stderr) unless
/// it succeeded.
pub fn run_ok(cmd: &mut Command) -> String {
    let desc = format!("{cmd:?}");
    let out = run_timeout(cmd, CMD_TIMEOUT);
    assert!(
        out.status.success(),
        "{desc} failed with {}:\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Paths as `&str`, for command lines.
pub fn path_strs(p: &[PathBuf]) -> Vec<&str> {
    p.iter().map(|p| p.to_str().expect("UTF-8 path")).collect()
}

/// A loop device attached to a file; detached on drop.
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub path: PathBuf,
}

impl LoopDevice {
    /// Attaches `file` read-only (`losetup -f --show -r`).
    pub fn attach_ro(file: &Path) -> LoopDevice {
        let out = run_ok(
            Command::new("losetup")
                .arg("-f")
                .arg("--show")
                .arg("-r")
                .arg(file),
        );
        LoopDevice {
            path: PathBuf::from(out.trim()),
        }
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = run_timeout(
            Command::new("losetup").arg("-d").arg(&self.path),
            CMD_TIMEOUT,
        );
    }
}

/// Parses `Key : value` lines (mdadm's output) into pairs, keys trimmed.
pub fn key_values(text: &str) -> Vec<(String, String)> {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(" : ")?;
            Some((k.trim().to_string(), v.trim().to_string()))
        })
        .collect()
}

/// The first value of `key` in mdadm-style output.
pub fn value_of<'a>(kv: &'a [(String, String)], key: &str) -> Option<&'a str> {
    kv.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
}

/// Unpacks a gzip'd fixture from `tests/fixtures/mdadm/` into `dir`.
pub fn unpack_fixture(name: &str, dir: &Path) -> PathBuf {
    let src = fixtures_dir().join(format!("{name}.img.gz"));
    let dst = dir.join(format!("{name}.img"));
    let out = run_timeout(Command::new("gzip").arg("-dc").arg(&src), CMD_TIMEOUT);
    assert!(
        out.status.success(),
        "gunzip {}: {}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&dst, out.stdout).expect("write fixture");
    dst
}

/// The mdadm fixtures: `$MDCLUSTER_FIXTURES`, else `tests/fixtures/mdadm` in the
/// repository (see its README).
pub fn fixtures_dir() -> PathBuf {
    if let Ok(d) = std::env::var("MDCLUSTER_FIXTURES") {
        return PathBuf::from(d);
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/mdadm");
    assert!(
        dir.join("README.md").exists(),
        "mdadm fixtures not found at {}; set MDCLUSTER_FIXTURES",
        dir.display()
    );
    dir
}
