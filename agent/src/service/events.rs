//! The node's event stream for `mdctl monitor`, in the words of `mdadm --monitor`:
//! - lifecycle, from the registry's broadcast (event-driven, never a poll of a status
//!   text): `ArrayAssembling`, `NewArray` (active), `ArrayStopping`,
//!   `DeviceDisappeared` (gone);
//! - engine changes, from a watcher that compares each active array's structured status
//!   every [`WATCH_PERIOD`] and once more right before a stop: `Fail` (member failed,
//!   with the member), `DegradedArray`, `RebuildStarted`, `Rebuild20/40/60/80`,
//!   `RebuildFinished` (`detail` says resync or recovery and the chunk count; a finished
//!   run is recognised by the engine's completed-run record, so a short run between two
//!   looks is still reported).
//!
//! Events go to a bounded broadcast ([`super::EVENT_CAPACITY`]); a watcher that lags
//! gets one `EventsDropped` with the count instead of blocking the node.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::Node;
use crate::array::{ArrayEvent, ArrayState};
use crate::raid::{MemberState, RaidStatus, WorkerState};

/// How often the engine watcher compares statuses.
pub const WATCH_PERIOD: Duration = Duration::from_millis(250);

/// Forwards one registry's lifecycle events to the node's stream, until the registry
/// is dropped.
pub fn forward_lifecycle(node: Arc<Node>, mut rx: broadcast::Receiver<ArrayEvent>) {
    let weak = Arc::downgrade(&node);
    drop(node);
    tokio::spawn(async move {
        loop {
            let ev = match rx.recv().await {
                Ok(ev) => ev,
                Err(broadcast::error::RecvError::Lagged(n)) => {
                    if let Some(node) = weak.upgrade() {
                        node.emit(
                            "EventsDropped",
                            "",
                            "",
                            format!("{n} lifecycle events were dropped"),
                        );
                    }
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return,
            };
            let Some(node) = weak.upgrade() else { return };
            let (event, detail) = match ev.state {
                Some(ArrayState::Assembling) => ("ArrayAssembling", "assembling"),
                Some(ArrayState::Active) => ("NewArray", "active"),
                Some(ArrayState::Stopping) => ("ArrayStopping", "stopping"),
                None => ("DeviceDisappeared", "stopped"),
            };
            node.emit(
                event,
                &ev.name,
                "",
                format!("array {} on node {} is {detail}", ev.name, node.name()),
            );
        }
    });
}

/// What the watcher last saw of one array.
#[derive(Debug, Default)]
pub struct Seen {
    faulty: Vec<String>,
    degraded: bool,
    /// The kind of the running sync and the last 20% step reported.
    sync: Option<(String, u64)>,
    /// Fingerprint of the last completed run (a new one means a run ended).
    last_run: Option<String>,
}

fn fingerprint(r: &RaidStatus) -> Option<String> {
    let p = &r.sync;
    p.completed
        .last()
        .map(|c| format!("{}:{}:{}", p.completed.len(), c.secs.to_bits(), c.bytes))
}

/// Compares `r` with `prev` and emits the changes of array `name`; returns what is
/// seen now. A run that started and ended between two looks still gets its
/// `RebuildStarted` and `RebuildFinished`.
pub fn diff(node: &Node, name: &str, prev: Seen, r: &RaidStatus) -> Seen {
    let me = node.name();
    let mut cur = Seen {
        faulty: r
            .members
            .iter()
            .filter(|m| matches!(m.state, MemberState::Faulty))
            .map(|m| m.path.clone())
            .collect(),
        degraded: r.degraded,
        sync: None,
        last_run: fingerprint(r),
    };
    for f in &cur.faulty {
        if !prev.faulty.contains(f) {
            node.emit(
                "Fail",
                name,
                f,
                format!("member {f} of array {name} failed on node {me}"),
            );
        }
    }
    if cur.degraded && !prev.degraded {
        node.emit(
            "DegradedArray",
            name,
            "",
            format!("array {name} runs degraded on node {me}"),
        );
    }
    let mut prev_sync = prev.sync;
    if cur.last_run.is_some() && cur.last_run != prev.last_run {
        if let Some(c) = r.sync.completed.last() {
            let kind = format!("{:?}", c.kind).to_lowercase();
            if prev_sync.is_none() {
                node.emit(
                    "RebuildStarted",
                    name,
                    "",
                    format!("{kind} of {name} started on node {me}"),
                );
            }
            let how = if c.interrupted {
                "was interrupted"
            } else {
                "finished"
            };
            node.emit(
                "RebuildFinished",
                name,
                "",
                format!(
                    "{kind} of {name} {how} on node {me} ({} bitmap chunks)",
                    c.chunks
                ),
            );
        }
        prev_sync = None;
    }
    let running = matches!(r.sync.state, WorkerState::Busy | WorkerState::Throttled);
    if let Some(kind) = r.sync.kind.filter(|_| running) {
        let kind = format!("{kind:?}").to_lowercase();
        let pct = (r.sync.done_bytes * 100)
            .checked_div(r.sync.total_bytes)
            .unwrap_or(0);
        let step = (pct / 20) * 20;
        match prev_sync {
            Some((k, last)) if k == kind => {
                if step > last && step > 0 && step < 100 {
                    node.emit(
                        &format!("Rebuild{step}"),
                        name,
                        "",
                        format!("{kind} of {name} on node {me} at {pct}%"),
                    );
                }
                cur.sync = Some((kind, step.max(last)));
            }
            _ => {
                node.emit(
                    "RebuildStarted",
                    name,
                    "",
                    format!("{kind} of {name} started on node {me}"),
                );
                cur.sync = Some((kind, 0));
            }
        }
    } else if prev_sync.is_some() {
        // Not running any more and no completed run recorded: it failed; keep waiting
        // for the next run (its errors are counted in the status).
        cur.sync = None;
    }
    cur
}

/// Watches the engines of every active array and emits their changes until `stop`.
pub fn spawn_engine_watcher(
    node: Arc<Node>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(WATCH_PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.cancelled() => return,
            }
            node.observe_all();
        }
    })
}
