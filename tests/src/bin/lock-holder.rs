//! A stand-in agent for the lock tests, run as its own process so a test can kill -9 it:
//! opens a session, optionally takes a lock and/or subscribes to a channel (acking every
//! message), prints `READY <session-id-hex> <token>` on stdout, then heartbeats forever.
//!
//! `lock-holder ENDPOINTS NODE TTL_MS [lock=RESOURCE] [sub=CHANNEL]`

use std::io::Write;
use std::time::Duration;

use mdcluster_proto::lock_client::{Mode, Notification, Session, SessionConfig, Wait};

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() >= 4,
        "usage: lock-holder ENDPOINTS NODE TTL_MS [lock=R] [sub=C]"
    );
    let endpoints = args[1].split(',').map(String::from).collect();
    let mut cfg = SessionConfig::new(endpoints, args[2].clone(), format!("{}:1", args[2]));
    cfg.ttl = Duration::from_millis(args[3].parse()?);
    let (session, mut notes) = Session::open(cfg).await?;
    let mut token = 0;
    for a in &args[4..] {
        if let Some(r) = a.strip_prefix("lock=") {
            token = session
                .acquire(r, Mode::Exclusive, Wait::Queue(Duration::from_secs(30)))
                .await?
                .token;
        } else if let Some(c) = a.strip_prefix("sub=") {
            session.subscribe(c).await?;
        }
    }
    println!("READY {:x} {token}", session.id());
    std::io::stdout().flush()?;
    while let Some(n) = notes.recv().await {
        match n {
            Notification::Message(m) => session.ack(&m.message_id, Ok(())).await?,
            Notification::Lost { reason } => anyhow::bail!("session lost: {reason}"),
            _ => {}
        }
    }
    Ok(())
}
