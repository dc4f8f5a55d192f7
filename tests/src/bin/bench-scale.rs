//! Benchmark (not a test) of what many clustered arrays cost a cluster at rest: a real
//! etcd, mdserver and two agents (the binaries in `target/<profile>/`), one clustered
//! two-way mirror on both nodes first (the baseline), then `BENCH_ARRAYS` of them
//! (default 100). For each, the processes are left idle for `BENCH_IDLE_SECS` (default
//! 10) and their CPU time and mdserver's etcd requests are measured. One line per
//! figure, `NAME ours=X baseline=Y ratio=Z`, where ours is with all the arrays and
//! baseline with one:
//!
//! - `idle_cpu_<process>`: CPU time per second of wall time, in percent of a core;
//! - `idle_etcd_requests`: etcd requests per second made by mdserver;
//! - `create_assemble_ms`: time to create an array on node1 and assemble it on node2.
//!
//! Target: `idle_etcd_requests` ratio ≤ 2 (the watch of the other nodes' bitmap slots
//! does not grow with the number of arrays). Build the binaries first in the profile
//! the benchmark runs in, e.g. `cargo build --release --workspace --bins && cargo run
//! --release -p mdcluster-tests --bin bench-scale`.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mdcluster_tests::chaos::mdctl_ok_at;
use mdcluster_tests::cluster::{mirror_create_args, ClusterBuilder, TestCluster};
use mdcluster_tests::etcd::free_port;

/// Clock ticks per second of `/proc/<pid>/stat` times.
const TICKS: f64 = 100.0;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// CPU time (user + system) of `pid` so far, in seconds.
fn cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("read /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat
        .rsplit_once(')')
        .map(|(_, r)| r)
        .context("malformed stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 11 and 12 after ')'.
    let utime: f64 = f.get(11).context("no utime")?.parse()?;
    let stime: f64 = f.get(12).context("no stime")?.parse()?;
    Ok((utime + stime) / TICKS)
}

/// mdserver's etcd requests so far (the sum over operations).
fn etcd_requests(metrics: &str) -> anyhow::Result<f64> {
    let out = std::process::Command::new("curl")
        .args([
            "-sf",
            "--max-time",
            "5",
            &format!("http://{metrics}/metrics"),
        ])
        .output()
        .context("run curl")?;
    if !out.status.success() {
        bail!("scraping mdserver's metrics at {metrics} failed");
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("mdcluster_server_etcd_request_duration_seconds_count"))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum())
}

/// What an idle window measured: per process, percent of a core; etcd requests/s.
struct Idle {
    cpu: Vec<(String, f64)>,
    etcd_per_s: f64,
}

fn idle(c: &TestCluster, metrics: &str, secs: u64) -> anyhow::Result<Idle> {
    let mut procs = vec![
        ("etcd".to_owned(), c.etcd.pid().context("etcd not running")?),
        (
            "mdserver".to_owned(),
            c.server.pid().context("mdserver not running")?,
        ),
    ];
    for a in &c.agents {
        procs.push((
            format!("mdagent_{}", a.node),
            a.pid().context("agent not running")?,
        ));
    }
    let t0 = Instant::now();
    let before: Vec<f64> = procs
        .iter()
        .map(|(_, p)| cpu_secs(*p))
        .collect::<anyhow::Result<_>>()?;
    let e0 = etcd_requests(metrics)?;
    std::thread::sleep(Duration::from_secs(secs));
    let e1 = etcd_requests(metrics)?;
    let wall = t0.elapsed().as_secs_f64();
    let mut cpu = Vec::new();
    for ((name, pid), b) in procs.iter().zip(before) {
        cpu.push((name.clone(), (cpu_secs(*pid)? - b) / wall * 100.0));
    }
    Ok(Idle {
        cpu,
        // The two scrapes are requests of their own: not counted.
        etcd_per_s: (e1 - e0) / wall,
    })
}

/// Creates `md<i>` for i in `range` on node1 over two new member files and assembles
/// it on node2; the mean time per array.
fn arrays(c: &TestCluster, range: std::ops::Range<u64>) -> anyhow::Result<Duration> {
    let url = c.server.url();
    let n = range.end - range.start;
    let t = Instant::now();
    for i in range {
        let mut paths = Vec::new();
        for side in ["a", "b"] {
            let p = c.path().join(format!("{side}{i}"));
            std::fs::File::create(&p)?.set_len(8 << 20)?;
            paths.push(p.to_string_lossy().into_owned());
        }
        let name = format!("md{i}");
        mdctl_ok_at(&url, &mirror_create_args(&name, &paths[0], &paths[1]));
        mdctl_ok_at(&url, &["--node", "node2", "assemble", &name]);
    }
    Ok(t.elapsed() / n.max(1) as u32)
}

fn line(name: &str, ours: f64, base: f64, unit: &str) {
    println!(
        "{name} ours={ours:.2}{unit} baseline={base:.2}{unit} ratio={:.2}",
        ours / base.max(f64::MIN_POSITIVE)
    );
}

fn main() -> anyhow::Result<()> {
    let n = env_or("BENCH_ARRAYS", 100).max(2);
    let secs = env_or("BENCH_IDLE_SECS", 10).max(1);
    let metrics = format!("127.0.0.1:{}", free_port()?);
    let c = ClusterBuilder::new(2)
        .server_args(&["--metrics-listen", &metrics])
        .start()
        .context("start etcd, mdserver and two agents")?;

    let one = arrays(&c, 0..1)?;
    let base = idle(&c, &metrics, secs)?;
    let many = arrays(&c, 1..n)?;
    let all = idle(&c, &metrics, secs)?;

    eprintln!("{n} clustered mirrors on each of 2 nodes, idle {secs} s each time");
    for ((name, ours), (_, b)) in all.cpu.iter().zip(&base.cpu) {
        line(&format!("idle_cpu_{name}"), *ours, *b, "%");
    }
    line("idle_etcd_requests", all.etcd_per_s, base.etcd_per_s, "/s");
    line(
        "create_assemble_ms",
        many.as_secs_f64() * 1000.0,
        one.as_secs_f64() * 1000.0,
        "ms",
    );
    Ok(())
}
