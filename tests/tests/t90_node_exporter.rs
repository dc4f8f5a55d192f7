//! t90: a stock node_exporter (Debian's `prometheus-node-exporter`, only its mdadm
//! collector, `--path.procfs=<run-dir>/proc`) exports a cluster-mode agent's arrays
//! from the agent's `<run-dir>/proc/mdstat`: `node_md_disks`, `node_md_disks_required`
//! and `node_md_state` follow the mirror through assemble, a failed member (degraded)
//! and its re-add (in sync again); the file holds the bytes `mdctl mdstat` prints.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mdcluster_tests::cluster::{ClusterBuilder, TestCluster};
use mdcluster_tests::etcd::free_port;

const EXPORTER: &str = "prometheus-node-exporter";
const WAIT: Duration = Duration::from_secs(30);

/// A node_exporter process, killed on drop.
struct Exporter {
    child: Child,
    port: u16,
}

impl Exporter {
    fn start(procfs: &Path, log: &Path) -> Exporter {
        let port = free_port().expect("free port");
        let log = std::fs::File::create(log).expect("exporter log");
        let child = Command::new(EXPORTER)
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--collector.disable-defaults")
            .arg("--collector.mdadm")
            .arg(format!("--path.procfs={}", procfs.display()))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("start {EXPORTER} (apt-get install {EXPORTER}): {e}"));
        Exporter { child, port }
    }

    /// One scrape of /metrics; None while it does not answer.
    fn scrape(&self) -> Option<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(b"GET /metrics HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        let (head, body) = body.split_once("\r\n\r\n")?;
        assert!(
            head.starts_with("HTTP/1.0 200") || head.starts_with("HTTP/1.1 200"),
            "{head}"
        );
        Some(body.to_owned())
    }

    /// Scrapes until every `(series, value)` is there; panics with the last scrape.
    fn wait_for(&self, what: &str, want: &[(&str, f64)]) -> String {
        let deadline = Instant::now() + WAIT;
        let mut last = String::new();
        loop {
            if let Some(m) = self.scrape() {
                if want.iter().all(|(k, v)| value(&m, k) == Some(*v)) {
                    return m;
                }
                last = m;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: node_exporter did not export {want:?} within {WAIT:?}; node_md series:\n{}",
                md_series(&last)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Exporter {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the series written exactly as `key` (name and labels), if exported.
fn value(metrics: &str, key: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

fn md_series(metrics: &str) -> String {
    metrics
        .lines()
        .filter(|l| l.starts_with("node_md_") || l.contains("scrape_collector_success"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Waits until the agent's file holds what `mdctl mdstat` prints (both read close
/// together; a sync's figures may move in between, so equal once within the wait).
fn file_matches_mdctl(c: &TestCluster, file: &Path) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let cli = c.mdstat("node1");
        let disk = std::fs::read_to_string(file).unwrap_or_default();
        if disk == cli {
            return disk;
        }
        assert!(
            Instant::now() < deadline,
            "{} differs from mdctl mdstat:\n--- file\n{disk}\n--- mdctl\n{cli}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn node_exporter_exports_the_arrays_from_the_mdstat_file() {
    let c = ClusterBuilder::new(1).start().expect("cluster");
    let m = mdcluster_tests::standalone::member_files(c.path(), "m", 2, 32 << 20);
    let m = mdcluster_tests::tools::path_strs(&m);
    let procfs = c.agents[0].run_dir.join("proc");
    let file = procfs.join("mdstat");
    let ne = Exporter::start(&procfs, &c.path().join("node_exporter.log"));

    eprintln!("--- the file exists with no array: node_exporter exports no md series");
    let t = file_matches_mdctl(&c, &file);
    assert!(!t.contains("md0"), "{t}");
    let metrics = ne.wait_for(
        "no array",
        &[(r#"node_scrape_collector_success{collector="mdadm"}"#, 1.0)],
    );
    assert!(
        !metrics.contains("node_md_state"),
        "{}",
        md_series(&metrics)
    );

    eprintln!("--- a mirror assembled: two active disks, state active");
    c.mdctl_ok(&[
        "--node",
        "node1",
        "create",
        "md0",
        "--raid-devices",
        "2",
        "--bitmap",
        "internal",
        "--assume-clean",
        m[0],
        m[1],
    ]);
    let t = file_matches_mdctl(&c, &file);
    assert!(t.contains("[2/2] [UU]"), "{t}");
    ne.wait_for(
        "assembled",
        &[
            (r#"node_md_disks{device="md0",state="active"}"#, 2.0),
            (r#"node_md_disks{device="md0",state="failed"}"#, 0.0),
            (r#"node_md_disks_required{device="md0"}"#, 2.0),
            (r#"node_md_state{device="md0",state="active"}"#, 1.0),
            (r#"node_scrape_collector_success{collector="mdadm"}"#, 1.0),
        ],
    );

    eprintln!("--- a member fails: one active, one failed");
    c.mdctl_ok(&["--node", "node1", "manage", "md0", "--fail", m[1]]);
    let t = file_matches_mdctl(&c, &file);
    assert!(t.contains("(F)") && t.contains("[2/1] [U_]"), "{t}");
    ne.wait_for(
        "degraded",
        &[
            (r#"node_md_disks{device="md0",state="active"}"#, 1.0),
            (r#"node_md_disks{device="md0",state="failed"}"#, 1.0),
            (r#"node_md_disks_required{device="md0"}"#, 2.0),
        ],
    );

    eprintln!("--- removed and re-added: in sync again");
    c.mdctl_ok(&["--node", "node1", "manage", "md0", "--remove", m[1]]);
    c.mdctl_ok(&["--node", "node1", "manage", "md0", "--re-add", m[1]]);
    c.wait_mdstat(WAIT, "node1", "in sync again", |t| {
        t.contains("[2/2] [UU]") && !t.contains("(F)") && !t.contains("recovery")
    });
    let t = file_matches_mdctl(&c, &file);
    assert!(t.contains("[2/2] [UU]"), "{t}");
    ne.wait_for(
        "in sync again",
        &[
            (r#"node_md_disks{device="md0",state="active"}"#, 2.0),
            (r#"node_md_disks{device="md0",state="failed"}"#, 0.0),
            (r#"node_md_state{device="md0",state="active"}"#, 1.0),
            (r#"node_md_state{device="md0",state="recovering"}"#, 0.0),
        ],
    );

    eprintln!("--- stopped: the file and node_exporter show no array");
    c.mdctl_ok(&["--node", "node1", "stop", "md0"]);
    let t = file_matches_mdctl(&c, &file);
    assert!(!t.contains("md0"), "{t}");
    let deadline = Instant::now() + WAIT;
    loop {
        let m = ne.scrape().unwrap_or_default();
        if !m.contains(r#"device="md0""#)
            && value(&m, r#"node_scrape_collector_success{collector="mdadm"}"#) == Some(1.0)
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "md0 still exported after stop:\n{}",
            md_series(&m)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
