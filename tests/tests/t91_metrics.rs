//! t91: the Prometheus endpoints (`--metrics-listen`) of two cluster-mode agents and
//! mdserver, and of a standalone agent, scraped over HTTP while a workload runs: NBD
//! request counters grow by exactly the requests `qemu-io` sent, a failed member shows
//! as degraded with a faulty disk, its re-add's recovery copies bytes, the session and
//! token rounds are counted, mdserver counts its sessions, locks, publishes, etcd and
//! gRPC calls; every scrape passes `promtool check metrics` (Debian's `prometheus`).
//! The standalone agent also keeps `<run-dir>/proc/mdstat` equal to its `mdstat`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mdcluster_tests::cluster::{ClusterBuilder, TestCluster};
use mdcluster_tests::etcd::free_port;
use mdcluster_tests::tools::run_timeout;

const WAIT: Duration = Duration::from_secs(30);

/// One scrape of `http://addr/metrics` in the text format; None while it does not
/// answer.
fn scrape(addr: &str) -> Option<String> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.set_write_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .ok()?;
    let mut all = String::new();
    s.read_to_string(&mut all).ok()?;
    let (head, body) = all.split_once("\r\n\r\n")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    Some(body.to_owned())
}

/// The value of the series written exactly as `key` (name and labels in the order
/// the endpoint prints them), if present.
fn value(metrics: &str, key: &str) -> Option<f64> {
    metrics.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == key).then(|| v.parse().ok()).flatten()
    })
}

/// The sum of every series of `name` whose labels contain each of `labels`
/// (`k="v"` strings); 0 when there is none.
fn sum(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            let (n, rest) = k.split_once('{').unwrap_or((k, ""));
            (n == name && labels.iter().all(|x| rest.contains(x)))
                .then(|| v.parse::<f64>().ok())
                .flatten()
        })
        .sum()
}

fn series(metrics: &str, prefix: &str) -> String {
    metrics
        .lines()
        .filter(|l| l.starts_with(prefix) && !l.contains("_bucket"))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Scrapes `addr` until `ok` holds; panics with the last scrape's `prefix` series.
fn wait_for(addr: &str, what: &str, prefix: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    let mut last = String::new();
    loop {
        if let Some(m) = scrape(addr) {
            if ok(&m) {
                return m;
            }
            last = m;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: not seen on {addr} within {WAIT:?}; last scrape:\n{}",
            series(&last, prefix)
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `promtool check metrics` on `text`: clean (exit 0, nothing printed).
fn promtool_clean(what: &str, text: &str, dir: &Path) {
    let file = dir.join(format!("{what}.prom"));
    std::fs::write(&file, text).expect("write scrape");
    let out = run_timeout(
        Command::new("sh")
            .arg("-c")
            .arg(format!("promtool check metrics < '{}'", file.display())),
        Duration::from_secs(30),
    );
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool check metrics on {what} ({}): {said}",
        file.display()
    );
}

/// Runs `qemu-io` commands against the NBD unix socket `sock` (export `md0`).
fn qemu_io(sock: &Path, cmds: &[String]) {
    let uri = format!("nbd+unix:///md0?socket={}", sock.display());
    let mut c = Command::new("qemu-io");
    c.args(["-f", "raw"]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    c.arg(&uri).stdin(Stdio::null());
    let out = run_timeout(&mut c, Duration::from_secs(60));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("failed"),
        "qemu-io {cmds:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes of 64 KiB at distinct offsets, then reads of 4 KiB.
fn workload(writes: usize, reads: usize, base: u64) -> Vec<String> {
    let mut v: Vec<String> = (0..writes as u64)
        .map(|i| format!("write -P 0x5a {} 64k", base + i * 65536))
        .collect();
    v.extend((0..reads as u64).map(|i| format!("read {} 4k", base + i * 65536)));
    v
}

fn nbd(m: &str, name: &str, op: &str) -> f64 {
    value(m, &format!(r#"{name}{{array="md0",op="{op}"}}"#)).unwrap_or(0.0)
}

fn state_is(m: &str, state: &str) -> bool {
    value(
        m,
        &format!(r#"mdcluster_array_state{{array="md0",state="{state}"}}"#),
    ) == Some(1.0)
}

fn disks(m: &str, state: &str) -> Option<f64> {
    value(
        m,
        &format!(r#"mdcluster_array_disks{{array="md0",state="{state}"}}"#),
    )
}

#[test]
fn cluster_endpoints_follow_a_workload_a_failure_and_a_recovery() {
    let ports: Vec<String> = (0..3)
        .map(|_| format!("127.0.0.1:{}", free_port().expect("free port")))
        .collect();
    let (a1, a2, srv) = (ports[0].as_str(), ports[1].as_str(), ports[2].as_str());
    let c: TestCluster = ClusterBuilder::new(2)
        .shared_storage(2, 32 << 20)
        .node_args(1, &["--metrics-listen", a1])
        .node_args(2, &["--metrics-listen", a2])
        .server_args(&["--metrics-listen", srv])
        .start()
        .expect("cluster");
    let (n1, n2) = (c.members_of(1, 2), c.members_of(2, 2));

    eprintln!("--- both agents and mdserver answer; sessions connected, heartbeats counted");
    for a in [a1, a2] {
        let m = wait_for(a, "session connected", "mdcluster_", |m| {
            value(m, r#"mdcluster_session_state{state="connected"}"#) == Some(1.0)
                && value(m, r#"mdcluster_heartbeats_total{result="ok"}"#).is_some_and(|v| v > 0.0)
        });
        assert_eq!(
            value(&m, r#"mdcluster_build_info{version="0.1.0"}"#),
            Some(1.0)
        );
        let margin = value(&m, "mdcluster_session_fence_margin_seconds").expect("margin");
        assert!(margin > 0.0 && margin <= 4.0, "fence margin {margin}");
        assert!(!m.contains("mdcluster_array_state{"), "no array yet");
    }
    wait_for(srv, "two sessions", "mdcluster_server_", |m| {
        value(m, "mdcluster_server_sessions") == Some(2.0)
    });

    eprintln!("--- a clustered mirror on both nodes: active, two disks in sync");
    c.mirror_on_two_nodes("md0", &n1[0], &n1[1]);
    for a in [a1, a2] {
        let m = wait_for(a, "md0 active", "mdcluster_array", |m| {
            state_is(m, "active") && disks(m, "in_sync") == Some(2.0)
        });
        assert_eq!(
            value(&m, r#"mdcluster_array_disks_required{array="md0"}"#),
            Some(2.0)
        );
        assert!(
            m.lines().any(|l| l.starts_with("mdcluster_array_info{")
                && l.contains(r#"bitmap="clustered""#)
                && l.contains(r#"level="raid1""#)),
            "{}",
            series(&m, "mdcluster_array_info")
        );
        assert!(value(&m, r#"mdcluster_array_size_bytes{array="md0"}"#).is_some_and(|v| v > 0.0));
    }

    eprintln!("--- NBD workload on node1: the counters grow by exactly what qemu-io sent");
    let before = scrape(a1).expect("scrape node1");
    let (w0, r0) = (
        nbd(&before, "mdcluster_nbd_requests_total", "write"),
        nbd(&before, "mdcluster_nbd_requests_total", "read"),
    );
    let wb0 = nbd(&before, "mdcluster_nbd_request_bytes_total", "write");
    qemu_io(&c.agents[0].sock("md0"), &workload(12, 5, 0));
    let m = wait_for(a1, "write counters", "mdcluster_nbd", |m| {
        nbd(m, "mdcluster_nbd_requests_total", "write") >= w0 + 12.0
    });
    assert_eq!(nbd(&m, "mdcluster_nbd_requests_total", "write"), w0 + 12.0);
    assert_eq!(nbd(&m, "mdcluster_nbd_requests_total", "read"), r0 + 5.0);
    assert_eq!(
        nbd(&m, "mdcluster_nbd_request_bytes_total", "write"),
        wb0 + 12.0 * 65536.0
    );
    assert_eq!(
        nbd(&m, "mdcluster_nbd_request_duration_seconds_count", "write"),
        w0 + 12.0
    );
    assert_eq!(nbd(&m, "mdcluster_nbd_request_errors_total", "write"), 0.0);
    assert_eq!(
        value(&m, r#"mdcluster_nbd_requests_in_flight{array="md0"}"#),
        Some(0.0)
    );
    let m = wait_for(a1, "client gone", "mdcluster_nbd", |m| {
        value(m, r#"mdcluster_nbd_connections{array="md0"}"#) == Some(0.0)
    });
    promtool_clean("node1-after-io", &m, c.path());

    eprintln!("--- fail m1 from node2: both nodes degraded, one faulty disk, token rounds counted");
    c.mdctl_ok(&["--node", "node2", "manage", "md0", "--fail", &n2[1]]);
    for a in [a1, a2] {
        wait_for(a, "degraded", "mdcluster_array", |m| {
            state_is(m, "degraded")
                && disks(m, "faulty") == Some(1.0)
                && disks(m, "in_sync") == Some(1.0)
        });
    }
    let m2 = scrape(a2).expect("scrape node2");
    assert!(
        sum(&m2, "mdcluster_token_rounds_total", &[r#"result="ok""#]) >= 1.0,
        "{}",
        series(&m2, "mdcluster_token_round")
    );
    assert!(
        sum(
            &m2,
            "mdcluster_lock_wait_seconds_count",
            &[r#"lock="token""#]
        ) >= 1.0,
        "{}",
        series(&m2, "mdcluster_lock_wait")
    );
    eprintln!("--- writes while degraded dirty the bitmap of node1's slot");
    qemu_io(&c.agents[0].sock("md0"), &workload(4, 0, 4 << 20));
    let m = scrape(a1).expect("scrape node1");
    assert!(
        sum(&m, "mdcluster_bitmap_dirty_chunks", &[r#"array="md0""#]) >= 1.0,
        "{}",
        series(&m, "mdcluster_bitmap")
    );

    eprintln!("--- remove and re-add: recovery copies bytes, then active with two in sync");
    let synced_before: f64 = [a1, a2]
        .iter()
        .map(|a| {
            sum(
                &scrape(a).expect("scrape"),
                "mdcluster_array_sync_done_bytes_total",
                &[r#"kind="recovery""#],
            )
        })
        .sum();
    c.mdctl_ok(&["--node", "node2", "manage", "md0", "--remove", &n2[1]]);
    c.mdctl_ok(&["--node", "node2", "manage", "md0", "--re-add", &n2[1]]);
    for a in [a1, a2] {
        wait_for(a, "in sync again", "mdcluster_array", |m| {
            state_is(m, "active")
                && disks(m, "in_sync") == Some(2.0)
                && disks(m, "faulty") == Some(0.0)
                && !m.contains("mdcluster_array_sync_completed_ratio{")
        });
    }
    let synced_after: f64 = [a1, a2]
        .iter()
        .map(|a| {
            sum(
                &scrape(a).expect("scrape"),
                "mdcluster_array_sync_done_bytes_total",
                &[r#"kind="recovery""#],
            )
        })
        .sum();
    assert!(
        synced_after >= synced_before + 4.0 * 65536.0,
        "recovery copied {} bytes, want at least the 256 KiB written while degraded",
        synced_after - synced_before
    );

    eprintln!("--- mdserver: locks, publishes, etcd and gRPC calls counted");
    let m = wait_for(srv, "locks snapshot", "mdcluster_server_", |m| {
        value(m, r#"mdcluster_server_locks_held{mode="exclusive"}"#).is_some_and(|v| v >= 2.0)
    });
    assert_eq!(value(&m, "mdcluster_server_sessions"), Some(2.0));
    assert!(
        value(&m, r#"mdcluster_server_publishes_total{result="ok"}"#).is_some_and(|v| v >= 1.0),
        "{}",
        series(&m, "mdcluster_server_publish")
    );
    assert!(
        value(&m, "mdcluster_server_publish_ack_duration_seconds_count").is_some_and(|v| v >= 1.0)
    );
    assert!(
        sum(
            &m,
            "mdcluster_server_etcd_request_duration_seconds_count",
            &[r#"op="txn""#]
        ) >= 1.0,
        "{}",
        series(&m, "mdcluster_server_etcd")
    );
    assert!(
        sum(
            &m,
            "mdcluster_server_grpc_requests_total",
            &[
                r#"service="mdcluster.v1.LockService""#,
                r#"method="Publish""#,
                r#"code="OK""#
            ]
        ) >= 1.0,
        "{}",
        series(&m, "mdcluster_server_grpc_requests")
    );
    assert!(
        sum(
            &m,
            "mdcluster_server_grpc_requests_total",
            &[r#"service="mdcluster.v1.ClusterService""#]
        ) >= 1.0,
        "{}",
        series(&m, "mdcluster_server_grpc_requests")
    );
    promtool_clean("mdserver", &m, c.path());
    for (n, a) in [("node1", a1), ("node2", a2)] {
        promtool_clean(n, &scrape(a).expect("scrape"), c.path());
    }

    eprintln!("--- only GET /metrics is served");
    let mut s = TcpStream::connect(a1).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /debug HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut r = String::new();
    let _ = s.read_to_string(&mut r);
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
}

#[test]
fn standalone_agent_serves_metrics_and_keeps_its_mdstat_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    let m = mdcluster_tests::standalone::member_files(dir.path(), "m", 2, 32 << 20);
    let addr = format!("127.0.0.1:{}", free_port().expect("free port"));
    let run = dir.path().join("run");
    let agent = mdcluster_tests::standalone::Agent::start(&run, &["--metrics-listen", &addr]);
    let file = run.join("proc").join("mdstat");
    let matches = |what: &str| {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let want = agent
                .ok(serde_json::json!({"op": "mdstat"}))
                .as_str()
                .expect("mdstat text")
                .to_owned();
            let disk = std::fs::read_to_string(&file).unwrap_or_default();
            if disk == want {
                return disk;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: {} differs from the agent's mdstat:\n--- file\n{disk}\n--- agent\n{want}",
                file.display()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    eprintln!("--- no array: no array series, an empty mdstat file");
    let t = matches("no array");
    assert!(!t.contains("md0"), "{t}");
    let s = wait_for(&addr, "first scrape", "mdcluster_", |_| true);
    assert!(!s.contains("mdcluster_array_state{"), "{s}");
    assert!(!s.contains("mdcluster_session_state"), "standalone: {s}");

    eprintln!("--- a mirror with an internal bitmap: active, in the file and the metrics");
    agent.ok(serde_json::json!({
        "op": "create", "name": "md0",
        "members": [m[0], m[1]], "raid_devices": 2, "spare_devices": 0,
        "bitmap": "internal", "chunk_kib": 64, "assume_clean": true
    }));
    let t = matches("created");
    assert!(
        t.contains("md0 : active raid1") && t.contains("[2/2] [UU]"),
        "{t}"
    );
    let s = wait_for(&addr, "md0 active", "mdcluster_array", |m| {
        state_is(m, "active") && disks(m, "in_sync") == Some(2.0)
    });
    assert!(
        s.lines()
            .any(|l| l.starts_with("mdcluster_array_info{") && l.contains(r#"bitmap="internal""#)),
        "{}",
        series(&s, "mdcluster_array_info")
    );

    eprintln!("--- NBD workload: exact request counts");
    qemu_io(&agent.sock("md0"), &workload(7, 3, 0));
    let s = wait_for(&addr, "counters", "mdcluster_nbd", |m| {
        nbd(m, "mdcluster_nbd_requests_total", "write") >= 7.0
    });
    assert_eq!(nbd(&s, "mdcluster_nbd_requests_total", "write"), 7.0);
    assert_eq!(nbd(&s, "mdcluster_nbd_requests_total", "read"), 3.0);
    assert_eq!(
        nbd(&s, "mdcluster_nbd_request_bytes_total", "read"),
        3.0 * 4096.0
    );

    eprintln!("--- a failed member: degraded in the file and the metrics");
    agent.ok(serde_json::json!({"op": "fail", "name": "md0", "member": m[1]}));
    let t = matches("degraded");
    assert!(t.contains("(F)") && t.contains("[2/1] [U_]"), "{t}");
    let s = wait_for(&addr, "degraded", "mdcluster_array", |m| {
        state_is(m, "degraded") && disks(m, "faulty") == Some(1.0)
    });
    promtool_clean("standalone", &s, dir.path());
}
