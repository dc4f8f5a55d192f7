//! The node registry: nodes with a live session and their agent addresses
//! (`nodes/<node>`, tied to the session lease, so a dead node drops out by itself).

use etcd_client::GetOptions;
use mdcluster_proto::v1::{ListNodesResponse, NodeInfo};

use crate::error::LockError;
use crate::records::{decode, NodeRecord};
use crate::Ctx;

/// The live nodes in name order.
pub async fn list(ctx: &Ctx) -> Result<ListNodesResponse, LockError> {
    let prefix = ctx.keys.nodes_prefix();
    let r = ctx
        .etcd
        .get(
            "list nodes",
            prefix.clone(),
            Some(GetOptions::new().with_prefix()),
        )
        .await?;
    let mut nodes = Vec::with_capacity(r.kvs().len());
    for kv in r.kvs() {
        let rec: NodeRecord = decode(kv.key(), kv.value())?;
        let node = String::from_utf8_lossy(&kv.key()[prefix.len()..]).into_owned();
        nodes.push(NodeInfo {
            node,
            agent_addr: rec.agent_addr,
            session_id: rec.session_id,
        });
    }
    Ok(ListNodesResponse { nodes })
}
