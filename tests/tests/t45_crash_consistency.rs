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

use mdcluster_tests::crash::{
    check_state, run_workload, Mode, Model, Recorder, Replayer, Rng, Verdict, WorkloadConfig,
};

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
    /// Violating crash states and the workload phase of each.
    violating: Vec<(Verdict, String)>,
}

impl Summary {
    /// Violations of crash states that assembled with every member in sync (no
    /// recovery of a stale or re-added member involved).
    fn in_sync_class(&self) -> usize {
        self.violating
            .iter()
            .filter(|(v, _)| !v.recovering && !v.assemble_failed)
            .count()
    }
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
        members: 3,
        member_bytes: 8 << 20,
        chunk: 64 << 10,
        daemon_sleep: Duration::from_millis(50),
        batches: 2,
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
    let model = Model::new(
        events,
        seed,
        cfg.members,
        workload.member_bytes,
        workload.data_offset,
    );
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
        let mode = match prng.below(3) {
            0 => Mode::Writes,
            _ => Mode::Torn,
        };
        let mut mlist = vec![mode];
        // Metadata written back before data, where both are uncertain.
        if replayer.mixed(point) {
            mlist.push(Mode::MetaFirst);
        }
        // Every twentieth point also gets both extremes.
        if n % 20 == 0 {
            mlist.extend([Mode::All, Mode::None]);
        }
        for mode in mlist {
            let paths = replayer
                .write_state(point, mode, &mut prng, crash_dir.path())
                .expect("writing a crash state");
            let v = check_state(&model, &paths, point, mode)
                .await
                .expect("checking a crash state");
            *modes.entry(mode).or_insert(0usize) += 1;
            if !v.problems.is_empty() {
                let phase = model.phase_at(point);
                violating.push((v, phase));
            }
        }
    }
    let checked: usize = modes.values().sum();
    let summary = Summary { checked, violating };
    let v = &summary.violating;
    println!(
        "{label}: crash points checked: {checked} ({} log positions; modes {modes:?}), violations: {} ({} with every member in sync at assemble, {} with a member recovering, {} failed assembles) in {:?}",
        points.len(),
        v.len(),
        summary.in_sync_class(),
        v.iter().filter(|(v, _)| v.recovering).count(),
        v.iter().filter(|(v, _)| v.assemble_failed).count(),
        t0.elapsed()
    );
    if !v.is_empty() {
        let path = std::env::temp_dir().join(format!("crashcheck-{label}-{seed}.log"));
        std::fs::write(&path, model.dump(model.len())).expect("writing the log");
        println!("{label}: the recorded log is in {}", path.display());
    }
    let mut shown: Vec<&(Verdict, String)> = v.iter().filter(|(v, _)| !v.recovering).collect();
    shown.extend(v.iter().filter(|(v, _)| v.recovering));
    for (v, phase) in shown.into_iter().take(16) {
        println!(
            "  violation at log entry {} ({:?}{}, phase \"{phase}\"):",
            v.point,
            v.mode,
            if v.recovering {
                ", a member recovering"
            } else {
                ""
            }
        );
        for p in &v.problems {
            println!("    {p}");
        }
    }
    summary
}

/// Switches the bitmap's unsafe order off again when the test ends, also on panic.
struct UnsafeOrder;

impl UnsafeOrder {
    fn on() -> UnsafeOrder {
        mdcluster_agent::bitmap::set_unsafe_clear_before_flush(true);
        UnsafeOrder
    }
}

impl Drop for UnsafeOrder {
    fn drop(&mut self) {
        mdcluster_agent::bitmap::set_unsafe_clear_before_flush(false);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_crash_point_recovers_what_was_acknowledged() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let seed = seed();
    let normal = run("normal", seed).await;
    // The same workload with bitmap bits cleared on disk before the data they cover
    // is flushed: the checker must see it.
    let broken = {
        let _unsafe = UnsafeOrder::on();
        run("clear-before-flush", seed).await
    };
    assert!(
        normal.checked >= 200 && broken.checked >= 200,
        "only {} / {} crash states checked",
        normal.checked,
        broken.checked
    );
    assert!(
        broken.in_sync_class() > 0,
        "no violation found with bits cleared before the data is flushed (seed {seed}): the checker is blind to that order"
    );
    assert!(
        normal.violating.is_empty(),
        "{} of {} crash states violate consistency (seed {seed}); see the output above",
        normal.violating.len(),
        normal.checked
    );
}
