//! `bench-nbd`: throughput of a 2-member RAID1 served by `mdagent` over NBD, against
//! `qemu-nbd --cache=none` on one member-sized file on the same filesystem, measured in
//! the same run with `fio --ioengine=nbd` (1 MiB sequential read and write, 4 KiB random
//! read and write, iodepth 16). Prints one line per figure:
//!
//! ```text
//! NAME ours=X baseline=Y ratio=Z
//! ```
//!
//! Targets: reads ≥ 1.0× the baseline, writes ≥ 0.5×, and 4 KiB random writes with the
//! bitmap on within 10% of the same array with the bitmap off (that line's baseline is
//! the bitmap-off array). Run: `cargo run --release -p mdcluster-tests --bin bench-nbd`.
//! Each figure is the median of `BENCH_ROUNDS` (default 3) runs of `BENCH_SECS` (default
//! 5) seconds, ours and the baseline alternating (the machine may be shared).
//! Environment: `BENCH_SIZE_MIB` (default 1024), `BENCH_SECS`, `BENCH_ROUNDS`,
//! `BENCH_DIR` (default: a tempdir under the system temp dir).
//!
//! `bench-nbd metrics`: the cost of the Prometheus metrics instead. Two agents, one
//! with `--metrics-listen` (scraped every second while it runs) and one without, each
//! serving a 2-member mirror with an internal bitmap; the same fio jobs (4 KiB random
//! read and write, 1 MiB sequential write) alternate between them. Each line's
//! baseline is the agent without metrics: `ratio` is on/off (target ≥ 0.97).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mdcluster_tests::standalone::{member_files, Agent};
use serde_json::json;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One fio job against `uri`; returns MiB/s for 1M jobs and IOPS for 4k jobs.
fn fio(uri: &str, rw: &str, bs: &str, size_mib: u64, secs: u64) -> Result<f64> {
    let out = Command::new("timeout")
        .args([
            "-k",
            "5",
            &(secs + 60).to_string(),
            "fio",
            "--name=bench",
            "--ioengine=nbd",
        ])
        .arg(format!("--uri={uri}"))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .args([
            "--iodepth=16",
            "--numjobs=1",
            "--time_based",
            "--ramp_time=1",
        ])
        .arg(format!("--runtime={secs}"))
        .arg(format!("--size={size_mib}m"))
        .args(["--output-format=json", "--randrepeat=0"])
        .stdin(Stdio::null())
        .output()
        .context("run fio")?;
    if !out.status.success() {
        bail!(
            "fio {rw} {bs} on {uri} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // fio may print notes before the JSON document.
    let text = String::from_utf8_lossy(&out.stdout);
    let start = text
        .find("\n{")
        .map(|i| i + 1)
        .or_else(|| text.find('{'))
        .unwrap_or(0);
    let v: serde_json::Value = serde_json::from_str(&text[start..])
        .with_context(|| format!("parse fio json output: {text}"))?;
    let job = &v["jobs"][0];
    let side = if rw.contains("read") {
        &job["read"]
    } else {
        &job["write"]
    };
    if bs == "1M" {
        Ok(side["bw_bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64)
    } else {
        Ok(side["iops"].as_f64().unwrap_or(0.0))
    }
}

/// Fills the whole target once (sequential 1 MiB writes), so reads hit real data.
fn fill(uri: &str, size_mib: u64) -> Result<()> {
    let out = Command::new("timeout")
        .args(["-k", "5", "600", "fio", "--name=fill", "--ioengine=nbd"])
        .arg(format!("--uri={uri}"))
        .args(["--rw=write", "--bs=1M", "--iodepth=16"])
        .arg(format!("--size={size_mib}m"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .output()
        .context("run fio fill")?;
    if !out.status.success() {
        bail!(
            "fio fill of {uri} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

struct QemuNbd(Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_qemu_nbd(file: &Path, sock: &Path) -> Result<QemuNbd> {
    let child = Command::new("qemu-nbd")
        .args([
            "--cache=none",
            "--aio=threads",
            "-f",
            "raw",
            "-t",
            "-e",
            "4",
            "-k",
        ])
        .arg(sock)
        .arg(file)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("start qemu-nbd")?;
    let q = QemuNbd(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        if Instant::now() > deadline {
            bail!("qemu-nbd did not come up");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(q)
}

fn line(name: &str, ours: f64, base: f64) {
    let ratio = if base > 0.0 { ours / base } else { 0.0 };
    println!("{name} ours={ours:.1} baseline={base:.1} ratio={ratio:.2}");
}

fn build_agent() -> Result<()> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let st = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "mdcluster-agent",
            "--bin",
            "mdagent",
        ])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
        .status()
        .context("cargo build mdagent")?;
    if !st.success() {
        bail!("building mdagent failed");
    }
    Ok(())
}

/// Scrapes `addr` every second until `stop`; returns the scrapes that succeeded.
fn scraper(
    addr: String,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut ok = 0;
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            let got = (|| -> std::io::Result<bool> {
                let mut s = std::net::TcpStream::connect(&addr)?;
                s.set_read_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
                let mut body = String::new();
                s.read_to_string(&mut body)?;
                Ok(body.starts_with("HTTP/1.1 200")
                    && body.contains("mdcluster_nbd_requests_total"))
            })();
            if matches!(got, Ok(true)) {
                ok += 1;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        ok
    })
}

/// `bench-nbd metrics`: see the module doc.
fn metrics_cost(size_mib: u64, secs: u64, rounds: u64, d: &Path) -> Result<()> {
    let port = mdcluster_tests::etcd::free_port()?;
    let addr = format!("127.0.0.1:{port}");
    let on_members = member_files(d, "on", 2, (size_mib + 16) << 20);
    let off_members = member_files(d, "off", 2, (size_mib + 16) << 20);
    let on_agent = Agent::start(&d.join("run-on"), &["--metrics-listen", &addr]);
    let off_agent = Agent::start(&d.join("run-off"), &[]);
    agent_create(&on_agent, "md0", &on_members, "internal")?;
    agent_create(&off_agent, "md0", &off_members, "internal")?;
    let (on, off) = (on_agent.uri("md0"), off_agent.uri("md0"));
    eprintln!("filling {size_mib} MiB on each array ...");
    fill(&on, size_mib)?;
    fill(&off, size_mib)?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let scrapes = scraper(addr, stop.clone());
    let started = Instant::now();
    eprintln!("measuring, {secs} s per run, metrics scraped every second ...");
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    for (name, rw, bs) in [
        ("metrics_on_vs_off_rand_read_4k_iops", "randread", "4k"),
        ("metrics_on_vs_off_rand_write_4k_iops", "randwrite", "4k"),
        ("metrics_on_vs_off_seq_write_1m_MiBps", "write", "1M"),
    ] {
        let (mut o, mut b) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            if round % 2 == 0 {
                o.push(fio(&on, rw, bs, size_mib, secs)?);
                b.push(fio(&off, rw, bs, size_mib, secs)?);
            } else {
                b.push(fio(&off, rw, bs, size_mib, secs)?);
                o.push(fio(&on, rw, bs, size_mib, secs)?);
            }
        }
        line(name, median(o), median(b));
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let n = scrapes.join().unwrap_or(0);
    let want = started.elapsed().as_secs() / 2;
    if n < want {
        bail!(
            "only {n} scrapes of the metrics agent succeeded in {:?}",
            started.elapsed()
        );
    }
    eprintln!("{n} scrapes during the run");
    on_agent.ok(json!({"op": "stop", "name": "md0"}));
    off_agent.ok(json!({"op": "stop", "name": "md0"}));
    Ok(())
}

fn main() -> Result<()> {
    let size_mib = env_u64("BENCH_SIZE_MIB", 1024);
    let secs = env_u64("BENCH_SECS", 5);
    let rounds = env_u64("BENCH_ROUNDS", 3).max(1);
    build_agent()?;
    if std::env::args().nth(1).as_deref() == Some("metrics") {
        let tmp = match std::env::var("BENCH_DIR") {
            Ok(d) => tempfile::tempdir_in(d)?,
            Err(_) => tempfile::tempdir()?,
        };
        return metrics_cost(size_mib, secs, rounds, tmp.path());
    }
    let tmp = match std::env::var("BENCH_DIR") {
        Ok(d) => tempfile::tempdir_in(d)?,
        Err(_) => tempfile::tempdir()?,
    };
    let d = tmp.path();
    // The array's members and the baseline file: same size, same filesystem.
    let member_bytes = (size_mib + 16) << 20;
    let members = member_files(d, "m", 2, member_bytes);
    let plain = member_files(d, "nb", 2, member_bytes);
    let base_file: PathBuf = member_files(d, "base", 1, member_bytes).remove(0);
    let agent = Agent::start(&d.join("run"), &[]);
    agent_create(&agent, "md0", &members, "internal")?;
    agent_create(&agent, "md1", &plain, "none")?;
    let ours = agent.uri("md0");
    let nobitmap = agent.uri("md1");
    let sock = d.join("qemu.sock");
    let _q = start_qemu_nbd(&base_file, &sock)?;
    let base = format!("nbd+unix:///?socket={}", sock.display());
    eprintln!("filling {size_mib} MiB on each target ...");
    fill(&ours, size_mib)?;
    fill(&nobitmap, size_mib)?;
    fill(&base, size_mib)?;
    eprintln!("measuring, {secs} s per run ...");
    let figures = [
        ("seq_read_1m_MiBps", "read", "1M"),
        ("seq_write_1m_MiBps", "write", "1M"),
        ("rand_read_4k_iops", "randread", "4k"),
        ("rand_write_4k_iops", "randwrite", "4k"),
    ];
    // The machine may be shared: alternate ours and the baseline, `rounds` times, and
    // report the medians.
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let mut rw_bitmap = 0.0;
    for (name, rw, bs) in figures {
        let (mut o, mut b) = (Vec::new(), Vec::new());
        for round in 0..rounds {
            if round % 2 == 0 {
                o.push(fio(&ours, rw, bs, size_mib, secs)?);
                b.push(fio(&base, rw, bs, size_mib, secs)?);
            } else {
                b.push(fio(&base, rw, bs, size_mib, secs)?);
                o.push(fio(&ours, rw, bs, size_mib, secs)?);
            }
        }
        let (o, b) = (median(o), median(b));
        line(name, o, b);
        if rw == "randwrite" {
            rw_bitmap = o;
        }
    }
    let mut on = Vec::new();
    let mut off = Vec::new();
    for _ in 0..rounds {
        off.push(fio(&nobitmap, "randwrite", "4k", size_mib, secs)?);
        on.push(fio(&ours, "randwrite", "4k", size_mib, secs)?);
    }
    on.push(rw_bitmap);
    line(
        "rand_write_4k_bitmap_on_vs_off_iops",
        median(on),
        median(off),
    );
    agent.ok(json!({"op": "stop", "name": "md0"}));
    agent.ok(json!({"op": "stop", "name": "md1"}));
    Ok(())
}

fn agent_create(agent: &Agent, name: &str, members: &[PathBuf], bitmap: &str) -> Result<()> {
    let a = agent.ctl(json!({
        "op": "create", "name": name, "members": members, "raid_devices": 2,
        "bitmap": bitmap, "assume_clean": true,
    }));
    if a["ok"] != true {
        bail!("create {name}: {a}");
    }
    Ok(())
}
