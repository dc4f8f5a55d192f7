//! A thin wrapper over the etcd client: every call is bounded by a timeout and every
//! failure becomes a [`LockError`] naming the operation.

use std::future::Future;
use std::time::Duration;

use etcd_client::{
    Client, DeleteOptions, DeleteResponse, GetOptions, GetResponse, PutOptions, PutResponse,
    SortOrder, SortTarget, Txn, TxnResponse, WatchOptions, WatchStream,
};

use crate::error::{is_lease_not_found, LockError};

/// An etcd client whose calls all have a deadline.
#[derive(Clone)]
pub struct Etcd {
    /// The connection (cheap to clone: a shared channel).
    client: Client,
    /// Bound on each single etcd call.
    timeout: Duration,
}

impl std::fmt::Debug for Etcd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Etcd")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl Etcd {
    /// Wraps a connected client.
    pub fn new(client: Client, timeout: Duration) -> Self {
        Etcd { client, timeout }
    }

    /// The per-call bound.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// A clone of the raw client (for lease keep-alive streams).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs `f` within the timeout; `kind` (get, put, delete, txn, lease_grant, ...)
    /// labels its metrics, `op` says what it was for in errors.
    async fn bounded<T>(
        &self,
        kind: &'static str,
        op: &'static str,
        f: impl Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, LockError> {
        let started = std::time::Instant::now();
        let r = match tokio::time::timeout(self.timeout, f).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(source)) => Err(LockError::Etcd { op, source }),
            Err(_) => Err(LockError::EtcdTimeout {
                op,
                timeout: self.timeout,
            }),
        };
        crate::metrics::server().etcd_call(kind, started.elapsed(), r.is_ok());
        r
    }

    /// Runs a transaction. A write that names a lease that no longer exists becomes
    /// [`LockError::SessionGone`] for `session`.
    pub async fn txn(
        &self,
        op: &'static str,
        session: i64,
        txn: Txn,
    ) -> Result<TxnResponse, LockError> {
        let mut c = self.client.clone();
        match self.bounded("txn", op, c.txn(txn)).await {
            Err(LockError::Etcd { source, .. }) if is_lease_not_found(&source) => {
                Err(LockError::SessionGone {
                    session_id: session,
                })
            }
            r => r,
        }
    }

    /// Reads one key or a prefix.
    pub async fn get(
        &self,
        op: &'static str,
        key: impl Into<Vec<u8>>,
        opts: Option<GetOptions>,
    ) -> Result<GetResponse, LockError> {
        let mut c = self.client.clone();
        self.bounded("get", op, c.get(key, opts)).await
    }

    /// Reads a prefix sorted by create revision (queue order).
    pub async fn get_queue(
        &self,
        op: &'static str,
        prefix: &str,
    ) -> Result<GetResponse, LockError> {
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Create, SortOrder::Ascend);
        self.get(op, prefix, Some(opts)).await
    }

    /// Writes one key.
    pub async fn put(
        &self,
        op: &'static str,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
        opts: Option<PutOptions>,
    ) -> Result<PutResponse, LockError> {
        let mut c = self.client.clone();
        self.bounded("put", op, c.put(key, value, opts)).await
    }

    /// Deletes one key or a prefix.
    pub async fn delete(
        &self,
        op: &'static str,
        key: impl Into<Vec<u8>>,
        opts: Option<DeleteOptions>,
    ) -> Result<DeleteResponse, LockError> {
        let mut c = self.client.clone();
        self.bounded("delete", op, c.delete(key, opts)).await
    }

    /// The remaining TTL of lease `id` in whole seconds, rounded down (0: alive with
    /// less than a second left); `None` when it does not exist. See [`lease_remaining`].
    pub async fn lease_ttl(&self, id: i64) -> Result<Option<i64>, LockError> {
        Ok(self.lease_info(id).await?.map(|(left, _)| left))
    }

    /// (remaining TTL, granted TTL) of lease `id` in seconds; `None` when it does not
    /// exist. The remaining TTL is rounded down: 0 is a live lease with less than a
    /// second left, which a renewal may still save. See [`lease_remaining`].
    pub async fn lease_info(&self, id: i64) -> Result<Option<(i64, i64)>, LockError> {
        let mut c = self.client.clone();
        let r = self
            .bounded(
                "lease_time_to_live",
                "lease time-to-live",
                c.lease_time_to_live(id, None),
            )
            .await?;
        Ok(lease_remaining(r.ttl()).map(|left| (left, r.granted_ttl())))
    }

    /// Grants a lease of `ttl_s` seconds; returns (id, granted ttl).
    pub async fn lease_grant(&self, ttl_s: i64) -> Result<(i64, i64), LockError> {
        let mut c = self.client.clone();
        let r = self
            .bounded("lease_grant", "lease grant", c.lease_grant(ttl_s, None))
            .await?;
        Ok((r.id(), r.ttl()))
    }

    /// Revokes lease `id` (its keys are deleted).
    pub async fn lease_revoke(&self, id: i64) -> Result<(), LockError> {
        let mut c = self.client.clone();
        self.bounded("lease_revoke", "lease revoke", c.lease_revoke(id))
            .await
            .map(|_| ())
    }

    /// Opens a watch.
    pub async fn watch(
        &self,
        key: impl Into<Vec<u8>>,
        opts: WatchOptions,
    ) -> Result<WatchStream, LockError> {
        let mut c = self.client.clone();
        self.bounded("watch", "watch", c.watch(key, Some(opts)))
            .await
    }
}

/// Reads the `TTL` field of a LeaseTimeToLive answer without ever calling a live lease
/// dead: etcd reports -1 for a lease that does not exist and otherwise the remaining
/// time in whole seconds rounded down, so 0 is a live lease with less than a second
/// left (it stays 0 until etcd's expiry pass, up to about half a second after the
/// deadline, deletes it). `None` only for a negative TTL.
pub fn lease_remaining(ttl: i64) -> Option<i64> {
    (ttl >= 0).then_some(ttl)
}

#[cfg(test)]
mod tests {
    use super::lease_remaining;

    #[test]
    fn only_a_negative_ttl_is_a_missing_lease() {
        assert_eq!(lease_remaining(-1), None);
        assert_eq!(lease_remaining(0), Some(0), "under a second left is alive");
        assert_eq!(lease_remaining(5), Some(5));
    }
}
