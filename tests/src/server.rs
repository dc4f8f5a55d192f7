//! `mdserver` processes for tests: started from the built binary on a free port against
//! a test etcd, with kill -9 and restart. Dropping the guard kills the process.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context};

/// How long a replica may take to announce its address.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Options of a test replica.
#[derive(Debug, Clone)]
pub struct ServerOpts {
    /// `--cluster-name`.
    pub cluster_name: String,
    /// `--session-ttl`.
    pub session_ttl: Duration,
    /// `--etcd-timeout`.
    pub etcd_timeout: Duration,
    /// More arguments (e.g. `--max-sessions 1`).
    pub extra_args: Vec<String>,
}

impl Default for ServerOpts {
    fn default() -> Self {
        ServerOpts {
            cluster_name: "test".into(),
            session_ttl: Duration::from_secs(2),
            etcd_timeout: Duration::from_secs(1),
            extra_args: Vec::new(),
        }
    }
}

/// A running mdserver replica.
pub struct MdServer {
    /// The process (None while killed).
    child: Option<Child>,
    /// etcd endpoints given to it.
    etcd: String,
    /// Its options.
    opts: ServerOpts,
    /// The port it listens on (kept across restarts).
    port: u16,
}

impl MdServer {
    /// Starts a replica against `etcd_url` on a free port.
    pub fn start(etcd_url: &str, opts: ServerOpts) -> anyhow::Result<MdServer> {
        let mut s = MdServer {
            child: None,
            etcd: etcd_url.into(),
            opts,
            port: 0,
        };
        s.spawn()?;
        Ok(s)
    }

    /// `http://127.0.0.1:<port>` (`https://` when started with `--tls-cert`).
    /// The process id (None while killed).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.port)
    }

    fn scheme(&self) -> &'static str {
        if self.opts.extra_args.iter().any(|a| a == "--tls-cert") {
            "https"
        } else {
            "http"
        }
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let bin = crate::tools::bin("mdserver");
        let mut cmd = Command::new(&bin);
        if self.scheme() == "https" {
            cmd.env_remove("MDSERVER_INSECURE");
        }
        let mut child = cmd
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", self.port))
            .arg("--etcd")
            .arg(&self.etcd)
            .arg("--cluster-name")
            .arg(&self.opts.cluster_name)
            .arg("--session-ttl")
            .arg(humantime::format_duration(self.opts.session_ttl).to_string())
            .arg("--etcd-timeout")
            .arg(humantime::format_duration(self.opts.etcd_timeout).to_string())
            .args(&self.opts.extra_args)
            .env(
                "RUST_LOG",
                std::env::var("MDSERVER_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let stdout = child.stdout.take().context("mdserver stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        self.child = Some(child);
        let line = match rx.recv_timeout(START_TIMEOUT) {
            Ok(l) => l,
            Err(_) => {
                self.kill();
                bail!("mdserver did not announce its address within {START_TIMEOUT:?}");
            }
        };
        let addr = line.rsplit(' ').next().unwrap_or_default();
        let port = addr.rsplit(':').next().and_then(|p| p.parse().ok());
        match port {
            Some(p) => self.port = p,
            None => {
                self.kill();
                bail!("unexpected first line from mdserver: {line:?}");
            }
        }
        Ok(())
    }

    /// kill -9, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM (graceful stop); waits up to `timeout` for the exit and returns whether
    /// the process exited successfully in time (it is killed otherwise).
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<bool> {
        let Some(mut c) = self.child.take() else {
            return Ok(false);
        };
        let status = Command::new("kill")
            .arg("-TERM")
            .arg(c.id().to_string())
            .status();
        status.context("send SIGTERM")?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(st) = c.try_wait().context("wait for mdserver")? {
                return Ok(st.success());
            }
            if std::time::Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                return Ok(false);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (a `kill -s` name: "STOP", "CONT", ...) to the running process.
    /// `SIGSTOP` freezes the replica with its sockets open: to its peers it hangs, it
    /// does not die. Dropping the guard kills a stopped replica too.
    pub fn signal(&self, signal: &str) -> anyhow::Result<()> {
        let c = self.child.as_ref().context("mdserver is not running")?;
        let st = Command::new("kill")
            .arg("-s")
            .arg(signal)
            .arg(c.id().to_string())
            .status()
            .with_context(|| format!("send SIG{signal} to mdserver"))?;
        if !st.success() {
            bail!("kill -s {signal} {} failed: {st}", c.id());
        }
        Ok(())
    }

    /// True while the process runs (it has not exited on its own).
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// Starts the replica again on the same port.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for MdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A test cluster: one etcd and `n` replicas.
pub struct Cluster {
    /// The replicas (drop order: replicas first, then etcd).
    pub servers: Vec<MdServer>,
    /// etcd.
    pub etcd: crate::etcd::Etcd,
}

impl Cluster {
    /// Starts etcd (without fsync: tests) and `n` replicas with `opts`.
    pub fn start(n: usize, opts: ServerOpts) -> anyhow::Result<Cluster> {
        let etcd = crate::etcd::Etcd::start_with(true)?;
        let servers = (0..n)
            .map(|_| MdServer::start(&etcd.url(), opts.clone()))
            .collect::<anyhow::Result<Vec<_>>>()?;
        Ok(Cluster { servers, etcd })
    }

    /// The replicas' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.servers.iter().map(MdServer::url).collect()
    }
}

/// Opens a lock-service session for node `node` on `urls` with lease TTL `ttl`.
pub async fn session(
    urls: &[String],
    node: &str,
    ttl: Duration,
) -> Result<
    (
        mdcluster_proto::lock_client::Session,
        tokio::sync::mpsc::Receiver<mdcluster_proto::lock_client::Notification>,
    ),
    mdcluster_proto::lock_client::LockClientError,
> {
    let mut cfg = mdcluster_proto::lock_client::SessionConfig::new(
        urls.to_vec(),
        node,
        format!("{node}.agent:7481"),
    );
    cfg.ttl = ttl;
    cfg.fence_margin = ttl / 4;
    mdcluster_proto::lock_client::Session::open(cfg).await
}

/// Waits up to `timeout` for a notification matching `pred`; others are skipped.
pub async fn wait_note<F>(
    rx: &mut tokio::sync::mpsc::Receiver<mdcluster_proto::lock_client::Notification>,
    timeout: Duration,
    mut pred: F,
) -> anyhow::Result<mdcluster_proto::lock_client::Notification>
where
    F: FnMut(&mdcluster_proto::lock_client::Notification) -> bool,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Some(n)) if pred(&n) => return Ok(n),
            Ok(Some(_)) => {}
            Ok(None) => bail!("notification channel closed"),
            Err(_) => bail!("no matching notification within {timeout:?}"),
        }
    }
}

/// A `lock-holder` process (a stand-in agent that a test can kill -9).
pub struct Holder {
    /// The process.
    child: Option<Child>,
    /// Its session id.
    pub session_id: i64,
    /// The token of the lock it took (0 if none).
    pub token: u64,
}

impl Holder {
    /// Starts `lock-holder urls node ttl_ms extra...` and waits for its READY line.
    pub fn start(
        urls: &[String],
        node: &str,
        ttl: Duration,
        extra: &[&str],
    ) -> anyhow::Result<Holder> {
        let bin = crate::tools::bin("lock-holder");
        let mut child = Command::new(&bin)
            .arg(urls.join(","))
            .arg(node)
            .arg(ttl.as_millis().to_string())
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("start {}", bin.display()))?;
        let stdout = child.stdout.take().context("lock-holder stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(l)) = lines.next() {
                let _ = tx.send(l);
            }
            for _ in lines {}
        });
        let mut h = Holder {
            child: Some(child),
            session_id: 0,
            token: 0,
        };
        let line = rx
            .recv_timeout(START_TIMEOUT)
            .context("lock-holder did not get ready")?;
        let parts: Vec<&str> = line.split_whitespace().collect();
        match parts.as_slice() {
            ["READY", id, token] => {
                h.session_id = u64::from_str_radix(id, 16)? as i64;
                h.token = token.parse()?;
            }
            _ => {
                h.kill();
                bail!("unexpected line from lock-holder: {line:?}");
            }
        }
        Ok(h)
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.kill();
    }
}
