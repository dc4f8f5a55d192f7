//! Delivery of notifications (granted, blocking, holder expired) to a session's stream.
//!
//! The stream of a session is served by one replica. When that is this replica, the
//! notification goes straight into the stream's bounded channel; otherwise (or when the
//! channel is full) it is put into the session's etcd inbox (`inbox/<id>/n-…`, tied to
//! the recipient's lease), which the serving replica watches, forwards and deletes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use etcd_client::PutOptions;
use mdcluster_proto::v1::{session_event, SessionEvent};
use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;

use crate::etcd::Etcd;
use crate::keys::Keys;

/// The sending half of a session stream.
pub type StreamTx = mpsc::Sender<Result<SessionEvent, Status>>;

/// The session streams served by this replica.
#[derive(Debug, Default)]
pub struct Notifier {
    /// Session id → (registration number, stream). The number lets a stream that ends
    /// unregister only itself, not a newer stream of the same session (resume).
    local: Mutex<HashMap<i64, (u64, StreamTx)>>,
    /// Source of registration numbers.
    next: AtomicU64,
}

impl Notifier {
    /// Registers the stream of session `id`; returns its registration number.
    pub fn register(&self, id: i64, tx: StreamTx) -> u64 {
        let reg = self.next.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut m) = self.local.lock() {
            m.insert(id, (reg, tx));
        }
        reg
    }

    /// Unregisters the stream `reg` of session `id` (if it is still the current one).
    pub fn unregister(&self, id: i64, reg: u64) {
        if let Ok(mut m) = self.local.lock() {
            if m.get(&id).is_some_and(|(r, _)| *r == reg) {
                m.remove(&id);
            }
        }
    }

    /// Sends `kind` to session `id`, in the background. Best effort: a session that
    /// is gone has no one to tell.
    pub fn send(&self, etcd: &Etcd, keys: &Keys, id: i64, kind: session_event::Kind) {
        let ev = SessionEvent { kind: Some(kind) };
        let tx = self
            .local
            .lock()
            .ok()
            .and_then(|m| m.get(&id).map(|(_, tx)| tx.clone()));
        let ev = match tx {
            Some(tx) => match tx.try_send(Ok(ev)) {
                Ok(()) => return,
                Err(mpsc::error::TrySendError::Full(Ok(ev)))
                | Err(mpsc::error::TrySendError::Closed(Ok(ev))) => ev,
                Err(_) => return,
            },
            None => ev,
        };
        let key = keys.inbox_notification(id, rand::random::<u64>());
        let etcd = etcd.clone();
        tokio::spawn(async move {
            let opts = PutOptions::new().with_lease(id);
            if let Err(e) = etcd
                .put("put notification", key, ev.encode_to_vec(), Some(opts))
                .await
            {
                tracing::debug!(session = id, "notification not delivered: {e}");
            }
        });
    }
}
