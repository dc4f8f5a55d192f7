//! Benchmark (not a test) of the lock service against raw etcd, in one run on the same
//! etcd (with fsync, as in production): prints one line per figure,
//! `NAME ours=X baseline=Y ratio=Z`.
//!
//! - `lock_p50`/`lock_p99`: our acquire+release (exclusive, uncontended, through an
//!   mdserver over gRPC on loopback) against etcd-client's `lock`+`unlock` with a lease.
//! - `publish2_p50`/`publish2_p99`: a publish to 2 subscribers until both acked, against
//!   one raw etcd txn (a put).
//!
//! Targets: `lock_p50` ratio ≤ 2, `publish2_p50` ratio ≤ 4.
//!
//! The mdserver runs in this process on its own runtime (same code as the binary, its
//! own threads), so that `cargo run --release -p mdcluster-tests --bin bench-lock` needs
//! nothing else built. `BENCH_ITERS` sets the sample count (default 300).

use std::time::{Duration, Instant};

use anyhow::Context;
use mdcluster_proto::lock_client::{Mode, Notification, Session, SessionConfig, Wait};
use mdcluster_tests::etcd::Etcd;

fn percentile(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn line(name: &str, ours: Duration, base: Duration) {
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "{name} ours={:.3}ms baseline={:.3}ms ratio={:.2}",
        ms(ours),
        ms(base),
        ms(ours) / ms(base)
    );
}

fn main() -> anyhow::Result<()> {
    let iters: usize = std::env::var("BENCH_ITERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let warmup = 20;
    let etcd = Etcd::start().context("start etcd")?;
    let url = etcd.url();

    // The server on its own runtime.
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = server_rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let mut config = mdcluster_server::Config::new(vec![url.clone()], "bench");
    config.session_ttl = Duration::from_secs(10);
    server_rt.spawn(async move {
        if let Err(e) = mdcluster_server::serve(listener, config, std::future::pending()).await {
            eprintln!("mdserver failed: {e}");
        }
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut raw = etcd_client::Client::connect([url.as_str()], None).await?;
        let lease = raw.lease_grant(60, None).await?.id();

        // --- raw etcd lock+unlock
        let mut base_lock = Vec::with_capacity(iters);
        for i in 0..warmup + iters {
            let t = Instant::now();
            let r = raw
                .lock(
                    "bench-raw-lock",
                    Some(etcd_client::LockOptions::new().with_lease(lease)),
                )
                .await?;
            raw.unlock(r.key().to_vec()).await?;
            if i >= warmup {
                base_lock.push(t.elapsed());
            }
        }
        // --- raw etcd txn
        let mut base_txn = Vec::with_capacity(iters);
        for i in 0..warmup + iters {
            let t = Instant::now();
            let txn = etcd_client::Txn::new().and_then([etcd_client::TxnOp::put(
                "bench-raw-txn",
                vec![0u8; 64],
                None,
            )]);
            raw.txn(txn).await?;
            if i >= warmup {
                base_txn.push(t.elapsed());
            }
        }

        // --- ours: acquire+release
        let endpoint = format!("http://{addr}");
        let open = |node: &str| {
            let cfg = SessionConfig::new(vec![endpoint.clone()], node, format!("{node}:1"));
            Session::open(cfg)
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let (s, _rx) = loop {
            match open("bench0").await {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e).context("open a session on the in-process mdserver"),
            }
        };
        let mut ours_lock = Vec::with_capacity(iters);
        for i in 0..warmup + iters {
            let t = Instant::now();
            let g = s
                .acquire("bench/lock", Mode::Exclusive, Wait::NoQueue)
                .await?;
            s.release("bench/lock", g.token).await?;
            if i >= warmup {
                ours_lock.push(t.elapsed());
            }
        }

        // --- ours: publish to 2 subscribers, both ack
        for n in ["sub1", "sub2"] {
            let (sub, mut rx) = open(n).await?;
            sub.subscribe("bench/ch").await?;
            tokio::spawn(async move {
                while let Some(n) = rx.recv().await {
                    if let Notification::Message(m) = n {
                        if let Err(e) = sub.ack(&m.message_id, Ok(())).await {
                            eprintln!("ack failed: {e}");
                        }
                    }
                }
            });
        }
        let mut ours_pub = Vec::with_capacity(iters);
        for i in 0..warmup + iters {
            let t = Instant::now();
            let out = s
                .publish("bench/ch", &[0u8; 64], Duration::from_secs(10))
                .await?;
            anyhow::ensure!(
                out.all_ok && out.results.len() == 2,
                "publish not acked by both: {out:?}"
            );
            if i >= warmup {
                ours_pub.push(t.elapsed());
            }
        }

        line(
            "lock_p50",
            percentile(&mut ours_lock, 0.5),
            percentile(&mut base_lock, 0.5),
        );
        line(
            "lock_p99",
            percentile(&mut ours_lock, 0.99),
            percentile(&mut base_lock, 0.99),
        );
        line(
            "publish2_p50",
            percentile(&mut ours_pub, 0.5),
            percentile(&mut base_txn, 0.5),
        );
        line(
            "publish2_p99",
            percentile(&mut ours_pub, 0.99),
            percentile(&mut base_txn, 0.99),
        );
        anyhow::Ok(())
    })?;
    drop(etcd);
    Ok(())
}
