//! t93: a real Prometheus (Debian's `prometheus`) scrapes a test cluster — etcd, mdserver
//! and two cluster-mode agents, each with `--metrics-listen` — every second, with
//! `deploy/monitoring/mdcluster.rules.yml` loaded (only the `for:` of
//! MdclusterArrayDegraded and MdclusterMemberFaulty shortened to 4 s, so the test sees
//! them pending and firing; everything else as shipped). Read back through Prometheus'
//! HTTP API (`/api/v1/query`, `/api/v1/alerts`, `/api/v1/rules`):
//!
//! - the three targets are up; a clustered mirror assembled on both nodes is `active`
//!   with two in-sync members of two required, on both; both sessions are connected with
//!   a positive fence margin; mdserver counts their sessions;
//! - a qemu-io workload of N writes and M reads on node1 moves node1's NBD counters by
//!   exactly N and M (requests, bytes, latency histogram counts), node2's not at all;
//! - `manage --fail` of a member: both nodes report the array `degraded` with one faulty
//!   member, and MdclusterArrayDegraded and MdclusterMemberFaulty go pending, then firing;
//!   node1 counts a successful token round (and its latency), mdserver an acknowledged
//!   publish;
//! - data written while degraded, then `--remove` and `--re-add` (throttled recovery):
//!   the array is seen `recovering` with its completed ratio rising and a sync speed,
//!   the synced-bytes counter grows by at least what was written meanwhile, and the
//!   array ends `active` with two in-sync members on both nodes, the ratio gone, and no
//!   alert active; no rule evaluation errors;
//! - every query of the Grafana dashboard runs on this Prometheus without error, and
//!   every metric it names is exported by the endpoints (but for the counters of events
//!   this test does not cause, [`EVENT_ONLY`]).

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::time::{Duration, Instant};

use mdcluster_tests::cluster::{ClusterBuilder, TestCluster};
use mdcluster_tests::etcd::free_port;
use mdcluster_tests::monitoring::{
    dashboard, dashboard_exprs, documented_metrics, exported_metrics, family_of, grafana_to_promql,
    load_yaml, metric_names, monitoring_dir, scrape, Prometheus,
};
use mdcluster_tests::tools::{run_timeout, CMD_TIMEOUT};

/// Bound of every wait on Prometheus.
const WAIT: Duration = Duration::from_secs(60);
/// Bound of the recovery (16 MiB at 2 MiB/s, plus the cluster's rounds).
const RECOVERY_WAIT: Duration = Duration::from_secs(120);
/// The shortened `for:` of the two alerts the test waits for.
const SHORT_FOR: &str = "4s";
/// Requests of the workload: 64 KiB writes and reads on node1.
const WRITES: u64 = 40;
const READS: u64 = 25;
const BLOCK: u64 = 64 << 10;
/// Written while degraded: 16 chunks of 1 MiB (the mirror's bitmap chunk).
const DEGRADED_MIB: u64 = 16;

/// Counters whose series appear only once their event happened (a labelled family with
/// no series yet is not in a scrape), and that this test does not cause: the dashboard
/// may name them while the endpoints do not export them yet.
const EVENT_ONLY: &[(&str, &str)] = &[
    ("mdcluster_member_io_errors_total", "a member I/O error"),
    ("mdcluster_token_round_nacks_total", "a negative ack"),
    (
        "mdcluster_slot_takeovers_total",
        "a takeover of a dead node's slot",
    ),
    (
        "mdcluster_server_etcd_errors_total",
        "an etcd request failing",
    ),
];

/// The shipped rule file with the `for:` of `short` alerts replaced.
fn test_rules(short: &[&str]) -> String {
    let mut rules = load_yaml(&monitoring_dir().join("mdcluster.rules.yml"));
    let mut replaced = 0;
    for g in rules["groups"].as_sequence_mut().expect("groups") {
        for r in g["rules"].as_sequence_mut().expect("rules") {
            if short.iter().any(|s| r["alert"] == *s) {
                r["for"] = SHORT_FOR.into();
                replaced += 1;
            }
        }
    }
    assert_eq!(
        replaced,
        short.len(),
        "alerts {short:?} not all in the rule file"
    );
    serde_yaml::to_string(&rules).expect("rules yaml")
}

/// qemu-io on node `node`'s NBD socket of md0 with these commands, checked.
fn qemu_io(c: &TestCluster, node: usize, cmds: &[String]) {
    let sock = c.agents[node - 1].sock("md0");
    let mut cmd = Command::new("qemu-io");
    cmd.args(["-f", "raw"]);
    for k in cmds {
        cmd.args(["-c", k]);
    }
    cmd.arg(format!("nbd+unix:///md0?socket={}", sock.display()));
    let out = run_timeout(&mut cmd, CMD_TIMEOUT);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !stdout.contains("failed"),
        "qemu-io {cmds:?}: {}\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The sum of `expr`'s samples (0 when it has none).
fn sum(p: &Prometheus, expr: &str) -> f64 {
    p.values(expr)
        .unwrap_or_else(|e| panic!("{e}"))
        .values()
        .sum()
}

/// Waits until `expr` sums to `want` (it only grows), then checks it stays there for a
/// few scrapes: a counter that overshoots fails.
fn wait_exact(p: &Prometheus, what: &str, expr: &str, want: f64) {
    let deadline = Instant::now() + WAIT;
    loop {
        let v = sum(p, expr);
        assert!(v <= want, "{what}: `{expr}` = {v}, more than {want}");
        if v == want {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: `{expr}` = {v}, not {want} within {WAIT:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    let v = sum(p, expr);
    assert_eq!(v, want, "{what}: `{expr}` moved on to {v}");
}

/// Polls the alerts (every 100 ms) until each of `names` is firing for `instance`; the
/// states each went through, in order.
fn wait_alerts_firing(
    p: &Prometheus,
    names: &[&str],
    instance: &str,
) -> BTreeMap<String, Vec<String>> {
    let deadline = Instant::now() + WAIT;
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    loop {
        for (n, labels, state) in p.alerts() {
            if names.contains(&n.as_str()) && labels["instance"] == instance {
                assert_eq!(labels["array"], "md0", "{n}: {labels}");
                let s = seen.entry(n).or_default();
                if s.last() != Some(&state) {
                    s.push(state);
                }
            }
        }
        if names
            .iter()
            .all(|n| seen.get(*n).and_then(|s| s.last()).map(String::as_str) == Some("firing"))
        {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "{names:?} for {instance} not firing within {WAIT:?}; states seen: {seen:?}; active: {:?}",
            p.alerts()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn prometheus_sees_an_array_degrade_and_recover() {
    let (a1, a2) = (
        format!("127.0.0.1:{}", free_port().unwrap()),
        format!("127.0.0.2:{}", free_port().unwrap()),
    );
    let srv = format!("127.0.0.1:{}", free_port().unwrap());
    let c = ClusterBuilder::new(2)
        .shared_storage(2, 32 << 20)
        .node_args(1, &["--metrics-listen", &a1])
        .node_args(2, &["--metrics-listen", &a2])
        .server_args(&["--metrics-listen", &srv])
        .start()
        .expect("cluster");
    let (n1, _) = (c.members_of(1, 2), c.members_of(2, 2));
    let ms: Vec<&str> = n1.iter().map(String::as_str).collect();

    eprintln!("--- Prometheus scraping mdserver and both agents every second, rules loaded");
    let dir = c.path().join("prometheus");
    std::fs::create_dir_all(&dir).unwrap();
    let rules = dir.join("mdcluster.rules.yml");
    std::fs::write(
        &rules,
        test_rules(&["MdclusterArrayDegraded", "MdclusterMemberFaulty"]),
    )
    .unwrap();
    let config = format!(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
         rule_files:\n  - {}\n\
         scrape_configs:\n\
         \x20 - job_name: mdagent\n    static_configs:\n      - targets: [\"{a1}\", \"{a2}\"]\n\
         \x20 - job_name: mdserver\n    static_configs:\n      - targets: [\"{srv}\"]\n",
        rules.display()
    );
    let p = Prometheus::start(&dir, &config).expect("prometheus");
    p.wait("targets up", "up", WAIT, |v| {
        v.len() == 3 && v.values().all(|x| *x == 1.0)
    });
    let rule_count = p.api("rules").unwrap()["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["rules"].as_array().unwrap().len())
        .sum::<usize>();
    assert_eq!(rule_count, mdcluster_tests::monitoring::rule_exprs().len());

    eprintln!("--- a clustered mirror on both nodes: active, 2 of 2 in sync, sessions connected");
    c.mirror_on_two_nodes("md0", ms[0], ms[1]);
    for (expr, want) in [
        (r#"mdcluster_array_state{array="md0",state="active"}"#, 1.0),
        (
            r#"mdcluster_array_state{array="md0",state="degraded"}"#,
            0.0,
        ),
        (r#"mdcluster_array_disks{array="md0",state="in_sync"}"#, 2.0),
        (r#"mdcluster_array_disks{array="md0",state="faulty"}"#, 0.0),
        (r#"mdcluster_array_disks_required{array="md0"}"#, 2.0),
        (
            r#"mdcluster_array_info{array="md0",level="raid1",bitmap="clustered"}"#,
            1.0,
        ),
        (r#"mdcluster_session_state{state="connected"}"#, 1.0),
    ] {
        p.wait("assembled", expr, WAIT, |v| {
            v.len() == 2 && v.values().all(|x| *x == want)
        });
    }
    p.wait(
        "fence margin",
        "mdcluster_session_fence_margin_seconds",
        WAIT,
        |v| v.len() == 2 && v.values().all(|x| *x > 0.0),
    );
    p.wait("sessions", "mdcluster_server_sessions", WAIT, |v| {
        v.values().any(|x| *x >= 2.0)
    });

    eprintln!("--- {WRITES} writes and {READS} reads of 64 KiB on node1: its NBD counters move by exactly that");
    let sel = |inst: &str, op: &str| format!(r#"{{instance="{inst}",array="md0",op="{op}"}}"#);
    let mut before: BTreeMap<(String, &str, &str), f64> = BTreeMap::new();
    for inst in [&a1, &a2] {
        for m in [
            "mdcluster_nbd_requests_total",
            "mdcluster_nbd_request_bytes_total",
            "mdcluster_nbd_request_duration_seconds_count",
        ] {
            for op in ["write", "read"] {
                let v = sum(&p, &format!("{m}{}", sel(inst, op)));
                before.insert((inst.to_string(), m, op), v);
            }
        }
    }
    let mut cmds: Vec<String> = (0..WRITES)
        .map(|i| format!("write -P 0x{:02x} {} 64k", 0x40 + i % 64, i * BLOCK))
        .collect();
    cmds.extend((0..READS).map(|i| format!("read {} 64k", i * BLOCK)));
    qemu_io(&c, 1, &cmds);
    for ((inst, m, op), b) in &before {
        let delta = if *inst == a1 {
            let n = if *op == "write" { WRITES } else { READS };
            if *m == "mdcluster_nbd_request_bytes_total" {
                n * BLOCK
            } else {
                n
            }
        } else {
            0
        };
        wait_exact(
            &p,
            &format!("{inst} {op}"),
            &format!("{m}{}", sel(inst, op)),
            b + delta as f64,
        );
    }

    eprintln!("--- manage --fail m1: degraded on both nodes, the alerts go pending then firing");
    c.tune(2048);
    let rounds =
        format!(r#"mdcluster_token_rounds_total{{instance="{a1}",array="md0",result="ok"}}"#);
    let rounds_before = sum(&p, &rounds);
    let rounds_count =
        format!(r#"mdcluster_token_round_duration_seconds_count{{instance="{a1}",array="md0"}}"#);
    let rounds_count_before = sum(&p, &rounds_count);
    let publishes = r#"mdcluster_server_publishes_total{result="ok"}"#;
    let publishes_before = sum(&p, publishes);
    c.mdctl_ok(&["--node", "node1", "manage", "md0", "--fail", ms[1]]);
    let alerts = ["MdclusterArrayDegraded", "MdclusterMemberFaulty"];
    let seen = wait_alerts_firing(&p, &alerts, &a1);
    for name in alerts {
        assert_eq!(
            seen[name],
            ["pending", "firing"],
            "{name}: expected pending for {SHORT_FOR}, then firing"
        );
    }
    for (expr, want) in [
        (
            r#"mdcluster_array_state{array="md0",state="degraded"}"#,
            1.0,
        ),
        (r#"mdcluster_array_state{array="md0",state="active"}"#, 0.0),
        (r#"mdcluster_array_disks{array="md0",state="in_sync"}"#, 1.0),
        (r#"mdcluster_array_disks{array="md0",state="faulty"}"#, 1.0),
    ] {
        p.wait("degraded", expr, WAIT, |v| {
            v.len() == 2 && v.values().all(|x| *x == want)
        });
    }

    // The fail went through node1's token round, acknowledged through mdserver.
    p.wait("token round", &rounds, WAIT, |v| {
        v.values().sum::<f64>() > rounds_before
    });
    p.wait("token round latency", &rounds_count, WAIT, |v| {
        v.values().sum::<f64>() > rounds_count_before
    });
    p.wait("publish acked", publishes, WAIT, |v| {
        v.values().sum::<f64>() > publishes_before
    });

    eprintln!("--- {DEGRADED_MIB} MiB written while degraded, then --remove, --re-add: a throttled recovery");
    let done_before = sum(
        &p,
        r#"mdcluster_array_sync_done_bytes_total{array="md0",kind="recovery"}"#,
    );
    let cmds: Vec<String> = (0..DEGRADED_MIB)
        .map(|i| format!("write -P 0x5a {}M 1M", 8 + i))
        .collect();
    qemu_io(&c, 1, &cmds);
    c.mdctl_ok(&["--node", "node1", "manage", "md0", "--remove", ms[1]]);
    c.mdctl_ok(&["--node", "node1", "manage", "md0", "--re-add", ms[1]]);

    let deadline = Instant::now() + RECOVERY_WAIT;
    let mut states = BTreeSet::new();
    let mut ratios: Vec<f64> = Vec::new();
    let mut speed_seen = 0.0f64;
    loop {
        for (labels, _) in p
            .values(r#"mdcluster_array_state{array="md0"} == 1"#)
            .unwrap()
        {
            if let Some(s) = labels.split("state=\"").nth(1) {
                states.insert(s.split('"').next().unwrap_or("").to_string());
            }
        }
        let r = p
            .values(r#"mdcluster_array_sync_completed_ratio{array="md0"}"#)
            .unwrap();
        if let Some(v) = r.values().copied().reduce(f64::max) {
            if ratios.last() != Some(&v) {
                ratios.push(v);
            }
        }
        speed_seen = speed_seen.max(sum(
            &p,
            r#"mdcluster_array_sync_speed_bytes_per_second{array="md0"}"#,
        ));
        let in_sync = p
            .values(r#"mdcluster_array_disks{array="md0",state="in_sync"}"#)
            .unwrap();
        let active = p
            .values(r#"mdcluster_array_state{array="md0",state="active"}"#)
            .unwrap();
        if !ratios.is_empty()
            && r.is_empty()
            && in_sync.len() == 2
            && in_sync.values().all(|v| *v == 2.0)
            && active.values().filter(|v| **v == 1.0).count() == 2
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "recovery not seen through within {RECOVERY_WAIT:?}: states {states:?}, ratios {ratios:?}, in_sync {in_sync:?}, mdstat node1:\n{}",
            c.mdstat("node1")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    eprintln!("    states seen {states:?}; completed ratio samples {ratios:?}; max speed {speed_seen} B/s");
    assert!(
        states.contains("recovering"),
        "never seen recovering: {states:?}"
    );
    assert!(
        ratios.len() >= 2 && ratios.windows(2).all(|w| w[0] < w[1]),
        "the completed ratio did not rise: {ratios:?}"
    );
    assert!(ratios.iter().all(|r| (0.0..=1.0).contains(r)), "{ratios:?}");
    assert!(speed_seen > 0.0, "no sync speed reported");
    let done = sum(
        &p,
        r#"mdcluster_array_sync_done_bytes_total{array="md0",kind="recovery"}"#,
    );
    assert!(
        done - done_before >= (DEGRADED_MIB << 20) as f64
            && done - done_before <= (32 << 20) as f64,
        "recovery synced {} bytes, wrote {DEGRADED_MIB} MiB while degraded",
        done - done_before
    );
    for (expr, want) in [
        (r#"mdcluster_array_state{array="md0",state="active"}"#, 1.0),
        (r#"mdcluster_array_disks{array="md0",state="faulty"}"#, 0.0),
        (
            r#"mdcluster_array_disks{array="md0",state="recovering"}"#,
            0.0,
        ),
    ] {
        p.wait("in sync again", expr, WAIT, |v| {
            v.len() == 2 && v.values().all(|x| *x == want)
        });
    }

    eprintln!("--- no alert left active, no rule evaluation error");
    let deadline = Instant::now() + WAIT;
    loop {
        let a = p.alerts();
        if a.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "alerts still active after the recovery: {a:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    for g in p.api("rules").unwrap()["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            assert_ne!(
                r["health"], "err",
                "rule {} fails: {}",
                r["name"], r["lastError"]
            );
        }
    }

    eprintln!("--- every dashboard query runs, every metric it names is exported");
    let mut exported = BTreeSet::new();
    for addr in [&a1, &a2, &srv] {
        exported.extend(exported_metrics(&scrape(addr)));
    }
    let documented = documented_metrics();
    let d = dashboard();
    let mut missing = BTreeSet::new();
    for (what, expr) in dashboard_exprs(&d) {
        let q = grafana_to_promql(&expr);
        let q = mdcluster_tests::monitoring::variable_selector(&q).to_string();
        if let Err(e) = p.query(&q) {
            panic!("{what}: `{q}` fails on Prometheus: {e}");
        }
        for n in metric_names(&q) {
            let fam = family_of(&n, &documented);
            if !exported.contains(&n) && !exported.contains(&fam) {
                missing.insert(fam);
            }
        }
    }
    let undocumented: Vec<&String> = documented
        .keys()
        .filter(|m| !exported.contains(*m))
        .collect();
    eprintln!("    in docs/METRICS.md, not exported by these endpoints: {undocumented:?}");
    let missing: Vec<&String> = missing
        .iter()
        .filter(|m| !EVENT_ONLY.iter().any(|(e, _)| e == m))
        .collect();
    assert!(
        missing.is_empty(),
        "named by the dashboard, not exported by mdagent or mdserver: {missing:?}"
    );
    drop(p);
}
