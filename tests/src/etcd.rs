//! A real etcd process for tests: free loopback ports, a data directory in a tempdir,
//! a readiness wait with a timeout, kill -9 and restart on the same ports and data;
//! optionally serving clients over TLS only, with client certificates required
//! ([`Etcd::start_tls`]). Dropping the guard kills the process.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

/// How long etcd may take to become healthy.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A free TCP port for a test process to listen on.
///
/// Chosen below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), so no
/// outgoing connection can take it between this call and the caller's bind, and
/// never handed out twice by this process. The probe binds the wildcard address:
/// that fails while any address (127.0.0.1, 127.0.0.2, ...) has the port bound, so
/// an agent listening on 127.0.0.2 keeps its port out of other tests' hands.
pub fn free_port() -> anyhow::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (lo, hi) = port_window();
    let span = u32::from(hi - lo);
    // A per-process start, so test binaries run one after another (or a rerun while an
    // old child lingers) do not walk the same ports in the same order.
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    let _ = NEXT.compare_exchange(0, seed % span + 1, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..span {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = lo + ((n - 1) % span) as u16;
        if TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return Ok(port);
        }
    }
    bail!("no free TCP port in {lo}..{hi}: every port is bound")
}

/// The ports [`free_port`] chooses from: [lo, hi), outside the kernel's ephemeral range.
fn port_window() -> (u16, u16) {
    let eph = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        });
    match eph {
        // The usual case (32768-60999): 20000 up to the range's start.
        Some((elo, _)) if elo >= 22_000 => (20_000, elo),
        // The range starts low: take the ports above it.
        Some((_, ehi)) if ehi <= 63_000 => (ehi + 1, 65_535),
        _ => (20_000, 30_000),
    }
}

/// A running etcd.
pub struct Etcd {
    /// The process (None while killed).
    child: Option<Child>,
    /// Data directory and log.
    dir: tempfile::TempDir,
    /// Client port.
    client_port: u16,
    /// Peer port.
    peer_port: u16,
    /// Skip fsync (fast tests); false for benchmarks.
    no_fsync: bool,
    /// TLS for clients (https only, client certificates signed by the CA required);
    /// /health is then read from a plain-HTTP metrics port.
    tls: Option<(crate::pki::Pki, u16)>,
}

impl Etcd {
    /// Starts etcd with fsync (as in production).
    pub fn start() -> anyhow::Result<Etcd> {
        Self::start_with(false)
    }

    /// Starts etcd; `no_fsync` trades durability for speed (tests on a loaded machine).
    pub fn start_with(no_fsync: bool) -> anyhow::Result<Etcd> {
        let dir = tempfile::Builder::new()
            .prefix("mdcluster-etcd")
            .tempdir()
            .context("create etcd tempdir")?;
        let mut e = Etcd {
            child: None,
            dir,
            client_port: free_port()?,
            peer_port: free_port()?,
            no_fsync,
            tls: None,
        };
        e.spawn()?;
        Ok(e)
    }

    /// Starts etcd (no fsync) serving clients over TLS only with the server certificate
    /// of `pki` (`--cert-file`, `--key-file`), and requiring client certificates signed
    /// by its CA (`--trusted-ca-file`, `--client-cert-auth`).
    pub fn start_tls(pki: &crate::pki::Pki) -> anyhow::Result<Etcd> {
        let dir = tempfile::Builder::new()
            .prefix("mdcluster-etcd")
            .tempdir()
            .context("create etcd tempdir")?;
        let mut e = Etcd {
            child: None,
            dir,
            client_port: free_port()?,
            peer_port: free_port()?,
            no_fsync: true,
            tls: Some((pki.clone(), free_port()?)),
        };
        e.spawn()?;
        Ok(e)
    }

    /// The process id (None while killed).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The client URL (`https://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("etcd.log")
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .context("open etcd log")?;
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new("etcd");
        cmd.arg("--name=t")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={}", self.url()))
            .arg(format!("--advertise-client-urls={}", self.url()))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=t={peer}"))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().context("clone etcd log")?)
            .stderr(log);
        if self.no_fsync {
            cmd.arg("--unsafe-no-fsync");
        }
        if let Some((pki, metrics_port)) = &self.tls {
            cmd.arg(format!("--cert-file={}", pki.server_cert.display()))
                .arg(format!("--key-file={}", pki.server_key.display()))
                .arg(format!("--trusted-ca-file={}", pki.ca.display()))
                .arg("--client-cert-auth")
                .arg(format!(
                    "--listen-metrics-urls=http://127.0.0.1:{metrics_port}"
                ));
        }
        self.child = Some(
            cmd.spawn()
                .context("start etcd (is /usr/bin/etcd installed?)")?,
        );
        self.wait_ready()
    }

    fn wait_ready(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait().context("wait for etcd")? {
                    bail!(
                        "etcd exited with {status} before it was ready; log: {}",
                        self.log_path().display()
                    );
                }
            }
            if self.healthy() {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!(
                    "etcd not healthy within {READY_TIMEOUT:?}; log: {}",
                    self.log_path().display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// One GET /health (on the metrics port with TLS).
    fn healthy(&self) -> bool {
        let port = match &self.tls {
            Some((_, metrics_port)) => *metrics_port,
            None => self.client_port,
        };
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    /// Turns etcd authentication on (a TLS etcd from [`Etcd::start_tls`], reached with
    /// the PKI's client certificate): a root user, a role that may read and write keys
    /// under `prefix` only, and `user` with `password` and that role.
    pub async fn enable_auth(
        &self,
        pki: &crate::pki::Pki,
        user: &str,
        password: &str,
        prefix: &str,
    ) -> anyhow::Result<()> {
        use etcd_client::{Certificate, Client, ConnectOptions, Identity, Permission, TlsOptions};
        let read =
            |p: &std::path::Path| std::fs::read(p).with_context(|| format!("read {}", p.display()));
        let tls = TlsOptions::new()
            .ca_certificate(Certificate::from_pem(read(&pki.ca)?))
            .identity(Identity::from_pem(
                read(&pki.client_cert)?,
                read(&pki.client_key)?,
            ));
        let mut c = Client::connect([self.url()], Some(ConnectOptions::new().with_tls(tls)))
            .await
            .context("connect to the TLS etcd")?;
        c.user_add("root", "root-pw", None)
            .await
            .context("add root")?;
        c.user_grant_role("root", "root")
            .await
            .context("grant root")?;
        c.role_add("prefix-rw").await.context("add role")?;
        c.role_grant_permission("prefix-rw", Permission::read_write(prefix).with_prefix())
            .await
            .context("grant the role")?;
        c.user_add(user, password, None).await.context("add user")?;
        c.user_grant_role(user, "prefix-rw")
            .await
            .context("grant the user")?;
        c.auth_enable().await.context("enable auth")?;
        Ok(())
    }

    /// kill -9, and wait for the process to be gone.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts etcd again on the same ports and data directory.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One key of an etcd range read by [`range`].
#[derive(Debug, Clone)]
pub struct Kv {
    /// The whole key.
    pub key: String,
    /// Its create revision.
    pub create_revision: i64,
    /// Its value.
    pub value: Vec<u8>,
}

/// Every key under `prefix` in the etcd at `url` (connect and read bounded by 10 s each;
/// panics on failure, for tests).
pub async fn range(url: &str, prefix: &str) -> Vec<Kv> {
    let mut c = tokio::time::timeout(
        Duration::from_secs(10),
        etcd_client::Client::connect([url], None),
    )
    .await
    .expect("etcd connect timed out")
    .expect("etcd connect");
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        c.get(prefix, Some(etcd_client::GetOptions::new().with_prefix())),
    )
    .await
    .expect("etcd get timed out")
    .expect("etcd get");
    r.kvs()
        .iter()
        .map(|kv| Kv {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            create_revision: kv.create_revision(),
            value: kv.value().to_vec(),
        })
        .collect()
}

/// [`range`] from synchronous code (not inside a tokio runtime).
pub fn range_blocking(url: &str, prefix: &str) -> Vec<Kv> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(range(url, prefix))
}
