//! Crash consistency of the RAID1 engine, its bitmap and its superblock ordering.
//!
//! A two-node workload on a clustered mirror runs in-process over real member files
//! while every member write and flush is recorded ([`mdcluster_agent::iotrace`]); then
//! the members are rebuilt as a crash at each of many points could leave them, recovered
//! with the real join merge and assemble code, resynced, and checked: superblocks
//! parse, assemble succeeds, every write acknowledged as durable reads back, the
//! in-sync members are identical. The crash-state model and what it leaves out are in
//! the module doc of `mdcluster_tests::crash`.
//!
//! `CRASHCHECK_SEED=<n>` replays a run's random choices (workload, crash points,
//! uncertain writes); the recorded interleaving of the two nodes and the background
//! tasks still depends on thread timing. `CRASHCHECK_POINTS=<n>` asks for more random
//! crash points (default: at least 200 crash states in all).
//!
//! The tracer is process-global: this binary has one test function.

use std::time::{Duration, Instant};

use mdcluster_tests::crash::{check_state, run_workload, Mode, Model, Recorder, Replayer, Rng, WorkloadConfig};

/// Removes the process's tracer when the test ends, also on panic.
struct TracerGuard;

impl Drop for TracerGuard {
    fn drop(&mut self) {
        mdcluster_agent::iotrace::install(None);
    }
}

fn seed() -> u64 {
    match std::env::var("CRASHCHECK_SEED") {
        Ok(s) => s.parse().expect("CRASHCHECK_SEED must be a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
    }
}

struct Summary {
    checked: usize,
    violating: Vec<(usize, Mode, String, Vec<String>)>,
}

async fn run(label: &str, seed: u64) -> Summary {
    let t0 = Instant::now();
    println!("{label}: seed {seed} (replay with CRASHCHECK_SEED={seed})");
    let dir = tempfile::tempdir().expect("tempdir");
    let shm = std::path::Path::new("/dev/shm");
    let crash_dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)
    } else {
        tempfile::tempdir()
    }
    .expect("crash tempdir");
    let cfg = WorkloadConfig {
        seed,
        dir: dir.path().to_owned(),
        members: 3,
        member_bytes: 8 << 20,
        chunk: 64 << 10,
        daemon_sleep: Duration::from_millis(50),
        batches: 3,
    };
    let paths: Vec<_> = (0..cfg.members)
        .map(|d| dir.path().join(format!("member{d}")))
        .collect();
    let rec = Recorder::new(paths);
    let guard = TracerGuard;
    mdcluster_agent::iotrace::install(Some(rec.clone()));
    let workload = run_workload(&cfg, &rec).await;
    drop(guard);
    let events = rec.finish();
    let workload = workload.expect("workload");
    let model = Model::new(events, seed, cfg.members, workload.member_bytes);
    let t_work = t0.elapsed();

    let mut rng = Rng::new(seed ^ 0xC0A5_4C4E);
    let want: usize = std::env::var("CRASHCHECK_POINTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    let (_, boundaries) = model.crash_points(&mut rng.clone(), 0);
    let extra = want.saturating_sub(boundaries + 1).max(want / 4);
    let (points, _) = model.crash_points(&mut rng, extra);
    println!(
        "{label}: workload {:?}: {} client writes, {} log entries; {} crash points ({} flush boundaries + random)",
        t_work,
        workload.writes,
        model.len(),
        points.len(),
        boundaries
    );
    let mut replayer = Replayer::new(&model);
    let mut violating = Vec::new();
    let mut modes = std::collections::BTreeMap::new();
    for (n, &point) in points.iter().enumerate() {
        let mut prng = Rng::new(seed ^ (point as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mode = match prng.below(8) {
            0 => Mode::All,
            1 => Mode::None,
            2..=4 => Mode::Writes,
            _ => Mode::Torn,
        };
        // Every tenth point also gets both extremes.
        let mut mlist = vec![mode];
        if n % 10 == 0 {
            mlist.extend([Mode::All, Mode::None].into_iter().filter(|m| *m != mode));
        }
        for mode in mlist {
            let t = Instant::now();
            let paths = replayer
                .write_state(point, mode, &mut prng, crash_dir.path())
                .expect("writing a crash state");
            mdcluster_tests::crash::TIMES[5].fetch_add(t.elapsed().as_micros() as u64, std::sync::atomic::Ordering::Relaxed);
            let v = check_state(&model, &paths, point, mode)
                .await
                .expect("checking a crash state");
            *modes.entry(mode).or_insert(0usize) += 1;
            if !v.problems.is_empty() {
                violating.push((v.point, v.mode, model.phase_at(point), v.problems));
            }
        }
    }
    let checked: usize = modes.values().sum();
    println!("times {:?}", mdcluster_tests::crash::TIMES.iter().map(|t| t.load(std::sync::atomic::Ordering::Relaxed) / 1000).collect::<Vec<_>>());
    println!(
        "{label}: crash points checked: {checked} ({} log positions; modes {modes:?}), violations: {} — {:?}",
        points.len(),
        violating.len(),
        t0.elapsed()
    );
    if !violating.is_empty() {
        let path = std::env::temp_dir().join(format!("crashcheck-{label}-{seed}.log"));
        std::fs::write(&path, model.dump(model.len())).expect("writing the log");
        println!("{label}: the recorded log is in {}", path.display());
    }
    for (point, mode, phase, problems) in violating.iter().take(12) {
        println!("  violation at log entry {point} ({mode:?}, phase \"{phase}\"):");
        for p in problems {
            println!("    {p}");
        }
    }
    Summary { checked, violating }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_crash_point_recovers_what_was_acknowledged() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let seed = seed();
    let normal = run("normal", seed).await;
    assert!(normal.checked >= 200, "only {} crash states checked", normal.checked);
    assert!(
        normal.violating.is_empty(),
        "{} of {} crash states violate consistency (seed {seed}); see the output above",
        normal.violating.len(),
        normal.checked
    );
}
