//! The arrays this node keeps across restarts and sessions: the state file
//! (`<run-dir>/arrays.json`) listing the arrays assembled here, assembling them again at
//! start or on a new session ([`Node::reassemble_saved`]), and tearing down the clustered
//! arrays of a lost session without touching their metadata ([`Node::drop_lost_arrays`]).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mdcluster_proto::v1::Errno;

use super::{lock, Node, REJOIN_RETRY};

impl Node {
    /// The session that held the slot locks of the clustered arrays joined here is lost
    /// (a replica that reached etcd said its lease is gone, or it stayed suspended
    /// longer than the agent's `--suspend-max`): another node may already hold those
    /// slots. Each such array is fenced for good (no superblock or bitmap write from
    /// now on, its member I/O stopped), its clients are forced off and it is torn
    /// down here without writing metadata and without releasing a lock (they went with
    /// the session). The array list in [`Node::state_path`] is kept, so
    /// [`Node::reassemble_saved`] on a new session assembles them again (a rejoin: the
    /// members are read afresh, a free slot is taken, dirty bits are merged).
    ///
    /// `Err` names the arrays that could not be torn down (their member I/O did not
    /// drain): the caller cannot guarantee the I/O stopped and must end the process
    /// ([`super::runtime::fence_now`]).
    pub async fn drop_lost_arrays(&self, why: &str) -> Result<Vec<String>, NotTornDown> {
        let joined = self.memberships();
        let mut dropped = Vec::new();
        let mut stuck = Vec::new();
        for (name, m, _) in joined {
            let Some(service) = self.find(&name) else {
                lock(&self.clustered).remove(&name);
                continue;
            };
            if let Ok(raid) = service.registry().device(&name) {
                raid.fence();
            }
            tracing::error!(array = %name, slot = m.slot, "session lost ({why}): stopping the array for good without writing metadata");
            let r = service.stop_now(&name).await;
            if service.registry().lookup(&name).is_ok() {
                let e = r.err().map(|e| e.to_string()).unwrap_or_default();
                stuck.push(format!("{name} (slot {}): {e}", m.slot));
                continue;
            }
            lock(&self.clustered).remove(&name);
            lock(&self.meta).remove(&name);
            self.emit(
                "SlotLost",
                &name,
                "",
                format!(
                    "node {}: the session holding bitmap slot {} of {name} was lost ({why}); the array was stopped here without writing metadata and is assembled again on a new session",
                    self.cfg.node, m.slot
                ),
            );
            dropped.push(name);
        }
        if stuck.is_empty() {
            Ok(dropped)
        } else {
            Err(NotTornDown { stuck })
        }
    }

    /// The file listing the arrays assembled here (`<run-dir>/arrays.json`), read at
    /// start to assemble them again (rejoin after a crash or a self-fence).
    pub fn state_path(&self) -> PathBuf {
        self.cfg.run_dir.join("arrays.json")
    }

    /// Writes the assembled arrays and their members to [`Node::state_path`]
    /// (atomically: temp file + rename).
    pub(super) fn save_state(&self) {
        let mut arrays = serde_json::Map::new();
        for name in self.names() {
            if let Some((info, _)) = self.info(&name) {
                if let Some(id) = info.identity {
                    arrays.insert(name, serde_json::json!(id.members));
                }
            }
        }
        let path = self.state_path();
        let tmp = path.with_extension("json.tmp");
        let body = serde_json::Value::Object(arrays).to_string();
        if let Err(e) = std::fs::write(&tmp, body).and_then(|()| std::fs::rename(&tmp, &path)) {
            tracing::warn!(path = %path.display(), "saving the assembled arrays: {e}");
        }
    }

    /// Assembles again every array [`Node::state_path`] lists that is not assembled here
    /// (agent start in cluster mode, and a new session after a lost one). Failures are
    /// logged and reported as `RejoinFailed` events.
    pub async fn reassemble_saved(self: &Arc<Self>) {
        let path = self.state_path();
        let Ok(text) = std::fs::read_to_string(&path) else {
            return;
        };
        let saved: std::collections::BTreeMap<String, Vec<PathBuf>> =
            match serde_json::from_str(&text) {
                Ok(v) => v,
                Err(e) => {
                    tracing::warn!(path = %path.display(), "ignoring unreadable array list: {e}");
                    return;
                }
            };
        for (name, members) in saved {
            if self.find(&name).is_some() {
                // Still assembled here (a rejoin after a lost session keeps the arrays
                // that did not depend on it).
                continue;
            }
            // EBUSY can be transient: a survivor holds our old slot for a moment while
            // it recovers it. Retry with backoff for a bounded time.
            let deadline = tokio::time::Instant::now() + REJOIN_RETRY;
            let mut backoff = Duration::from_millis(200);
            loop {
                match self.assemble(&name, members.clone()).await {
                    Ok(_) => {
                        tracing::info!(array = %name, "assembled again at start (rejoined)");
                        break;
                    }
                    Err(e)
                        if e.errno == Errno::Ebusy
                            && tokio::time::Instant::now() + backoff < deadline =>
                    {
                        tracing::info!(array = %name, "rejoin: {e}; retrying in {backoff:?}");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(2));
                    }
                    Err(e) => {
                        tracing::error!(array = %name, "assembling again at start failed: {e}");
                        self.emit("RejoinFailed", &name, "", e.message.clone());
                        break;
                    }
                }
            }
        }
        self.save_state();
    }
}

/// The arrays of a lost session [`Node::drop_lost_arrays`] could not tear down (their
/// member I/O did not drain), each with its slot and why.
#[derive(Debug, thiserror::Error)]
#[error("{}", .stuck.join("; "))]
pub struct NotTornDown {
    /// Per array: "name (slot N): reason".
    pub stuck: Vec<String>,
}
