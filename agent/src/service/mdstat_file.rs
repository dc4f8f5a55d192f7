//! `<run-dir>/proc/mdstat`: this node's `/proc/mdstat` ([`Node::mdstat`], the bytes
//! `mdctl mdstat` prints) kept current on disk, so that a stock node_exporter started
//! with `--collector.mdadm --path.procfs=<run-dir>/proc` exports the node's arrays as
//! `node_md_*` series.
//!
//! A task renders the text every [`PERIOD`] and, when it changed, rewrites the file
//! atomically (a temp file in the same directory, then a rename; a reader sees the old
//! or the new text, never a mix): at once when an array appeared or went or changed its
//! state or members; when only the figures of a running sync moved, at most once per
//! [`PROGRESS_PERIOD`].

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Node;

/// How often the text is rendered and compared.
pub const PERIOD: Duration = Duration::from_millis(250);
/// At most one rewrite per this period for sync progress alone.
pub const PROGRESS_PERIOD: Duration = Duration::from_secs(1);

/// Where the file of the node with run directory `run_dir` lives.
pub fn path(run_dir: &Path) -> PathBuf {
    run_dir.join("proc").join("mdstat")
}

/// The text without the figures of a running sync (its `[==>...] resync = ...` line
/// reduced to the kind): what must reach the file at once when it changes.
fn shape(text: &str) -> String {
    text.lines()
        .map(|l| {
            if l.trim_start().starts_with('[') {
                ["resync", "recovery", "check"]
                    .into_iter()
                    .find(|k| l.contains(k))
                    .unwrap_or("sync")
            } else {
                l
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Writes `text` to `path` atomically (temp file beside it, then rename).
pub fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// Whether the text `now` is to be written, given the last written text and when.
fn due(last: Option<&(String, Instant)>, now: &str, at: Instant) -> bool {
    match last {
        None => true,
        Some((text, _)) if text == now => false,
        Some((text, when)) => shape(text) != shape(now) || at >= *when + PROGRESS_PERIOD,
    }
}

/// Keeps [`path`] of `node` current until `stop`; the last write after `stop` shows
/// the arrays still there (none after a clean shutdown).
pub fn spawn(node: Arc<Node>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
    let file = path(&node.cfg.run_dir);
    spawn_with(file, move || node.mdstat(), stop)
}

/// Keeps `file` holding what `render` returns (a node's `/proc/mdstat`; a standalone
/// agent renders its registry's) until `stop`, as [`spawn`] does.
pub fn spawn_with(
    file: PathBuf,
    render: impl Fn() -> String + Send + 'static,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if let Some(dir) = file.parent() {
            if let Err(e) = std::fs::create_dir_all(dir) {
                tracing::error!(dir = %dir.display(), "cannot create the mdstat directory; node_exporter will not see this node's arrays: {e}");
                return;
            }
        }
        let mut last: Option<(String, Instant)> = None;
        let mut failed = false;
        let mut tick = tokio::time::interval(PERIOD);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stopping = tokio::select! {
                _ = tick.tick() => false,
                _ = stop.cancelled() => true,
            };
            let text = render();
            let at = Instant::now();
            if stopping || due(last.as_ref(), &text, at) {
                match write_atomic(&file, &text) {
                    Ok(()) => {
                        failed = false;
                        last = Some((text, at));
                    }
                    // Logged once per failure streak, retried every period.
                    Err(e) if !failed => {
                        failed = true;
                        tracing::warn!(path = %file.display(), "writing the mdstat file: {e}");
                    }
                    Err(_) => {}
                }
            }
            if stopping {
                return;
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const IDLE: &str = "Personalities : [raid1] \nmd0 : active raid1 b[1] a[0]\n      1024 blocks super 1.2 [2/2] [UU]\n      \nunused devices: <none>\n";

    fn syncing(pct: &str) -> String {
        format!("Personalities : [raid1] \nmd0 : active raid1 b[1] a[0]\n      1024 blocks super 1.2 [2/1] [U_]\n      [=>...................]  recovery = {pct}% (1/1024) finish=0.1min speed=10K/sec\n      \nunused devices: <none>\n")
    }

    #[test]
    fn state_changes_are_due_at_once_progress_once_a_period() {
        let t0 = Instant::now();
        assert!(due(None, IDLE, t0));
        let last = (IDLE.to_owned(), t0);
        assert!(!due(Some(&last), IDLE, t0 + Duration::from_secs(5)));
        // A sync starting changes the shape: at once.
        assert!(due(Some(&last), &syncing("5.0"), t0));
        let last = (syncing("5.0"), t0);
        // Only the figures moved: not before PROGRESS_PERIOD.
        assert!(!due(Some(&last), &syncing("7.5"), t0 + PERIOD));
        assert!(due(Some(&last), &syncing("7.5"), t0 + PROGRESS_PERIOD));
        // The sync ending: at once.
        assert!(due(Some(&last), IDLE, t0 + PERIOD));
    }

    #[test]
    fn atomic_write_replaces_the_file() {
        let dir = std::env::temp_dir().join(format!("mdstat-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("mdstat");
        write_atomic(&p, "one\n").unwrap();
        write_atomic(&p, IDLE).unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), IDLE);
        assert!(!p.with_extension("tmp").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
