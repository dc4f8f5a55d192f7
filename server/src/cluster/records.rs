//! The array records: name → UUID, members, bitmap kind, creating node, one JSON value
//! per array at `<root>arrays/<name>` (no lease: a record outlives every node). The
//! root is the key layout's cluster root ([`crate::keys::Keys`]).

use mdcluster_proto::status::WireError;
use mdcluster_proto::v1::{ArrayRecord, Errno};
use serde::{Deserialize, Serialize};

use crate::Ctx;

#[derive(Debug, Serialize, Deserialize)]
struct Record {
    name: String,
    uuid: String,
    members: Vec<String>,
    bitmap: String,
    created_on: String,
}

/// The key of array `name`'s record.
pub fn key(ctx: &Ctx, name: &str) -> String {
    let nodes = ctx.keys.nodes_prefix();
    let root = nodes.strip_suffix("nodes/").unwrap_or(&nodes);
    format!("{root}arrays/{name}")
}

fn etcd_err(e: crate::error::LockError) -> WireError {
    WireError::from_status(&tonic::Status::from(e))
}

/// The record of `name`, if any.
pub async fn get(ctx: &Ctx, name: &str) -> Result<Option<ArrayRecord>, WireError> {
    let r = ctx
        .etcd
        .get("read array record", key(ctx, name), None)
        .await
        .map_err(etcd_err)?;
    let Some(kv) = r.kvs().first() else {
        return Ok(None);
    };
    let rec: Record = serde_json::from_slice(kv.value()).map_err(|e| {
        WireError::new(
            Errno::Eio,
            format!("array {name}"),
            format!("the record of array {name} in etcd is corrupt: {e}"),
        )
    })?;
    Ok(Some(ArrayRecord {
        name: rec.name,
        uuid: rec.uuid,
        members: rec.members,
        bitmap: rec.bitmap,
        created_on: rec.created_on,
    }))
}

/// Writes the record of `rec.name`.
pub async fn put(ctx: &Ctx, rec: &ArrayRecord) -> Result<(), WireError> {
    let v = serde_json::to_vec(&Record {
        name: rec.name.clone(),
        uuid: rec.uuid.clone(),
        members: rec.members.clone(),
        bitmap: rec.bitmap.clone(),
        created_on: rec.created_on.clone(),
    })
    .map_err(|e| {
        WireError::new(
            Errno::Eio,
            format!("array {}", rec.name),
            format!("encode record: {e}"),
        )
    })?;
    ctx.etcd
        .put("write array record", key(ctx, &rec.name), v, None)
        .await
        .map_err(etcd_err)?;
    Ok(())
}
