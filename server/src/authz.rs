//! Who may call what on mdserver, decided from the caller's verified certificate
//! ([`mdcluster_proto::tls::Caller`]).
//!
//! - **Lock service**: only agents (`O=mdcluster:nodes`). A node opens and resumes only
//!   sessions of its own name and presents only session ids it owns (checked in
//!   [`crate::service`] against the session record); `ListNodes` answers every
//!   authenticated caller but shows a session id only to the node that owns it.
//! - **Cluster API**: `admin` everything; `viewer` the reads (nodes, detail, mdstat,
//!   monitor); every other caller nothing. Each admin operation leaves one audit line.
//! - **Health**: every authenticated caller.
//!
//! Without TLS (`--insecure`) every call is allowed.

use mdcluster_proto::tls::{Access, Caller};

use crate::error::LockError;
use crate::Ctx;

const LOCK: &str = "/mdcluster.v1.LockService/";
const CLUSTER: &str = "/mdcluster.v1.ClusterService/";
const HEALTH: &str = "/grpc.health.v1.Health/";
/// Cluster API methods a viewer may call.
const CLUSTER_READS: [&str; 4] = ["Nodes", "Detail", "Mdstat", "Watch"];

/// The policy of mdserver's gRPC methods (see the module docs).
pub fn policy(method: &str, caller: &Caller) -> Result<Access, String> {
    if *caller == Caller::Insecure || method.starts_with(HEALTH) {
        return Ok(Access::Read);
    }
    if let Some(m) = method.strip_prefix(LOCK) {
        return match caller {
            Caller::Node(_) => Ok(Access::Read),
            Caller::Admin(_) | Caller::Viewer(_) | Caller::Server(_) if m == "ListNodes" => {
                Ok(Access::Read)
            }
            _ => Err("the lock service serves only node certificates (O=mdcluster:nodes)".into()),
        };
    }
    if let Some(m) = method.strip_prefix(CLUSTER) {
        let read = CLUSTER_READS.contains(&m);
        return match caller {
            Caller::Admin(_) if read => Ok(Access::Read),
            Caller::Admin(_) => Ok(Access::Admin),
            Caller::Viewer(_) if read => Ok(Access::Read),
            Caller::Viewer(_) => Err(format!(
                "a viewer certificate allows only {}; {m} needs an admin certificate \
                 (O=mdcluster:admin)",
                CLUSTER_READS.join(", ")
            )),
            _ => Err("the cluster API serves only operator certificates \
                      (O=mdcluster:admin or O=mdcluster:viewer)"
                .into()),
        };
    }
    Err("no such method on mdserver".into())
}

/// The caller of a lock-service request (set by the authorization layer).
pub fn caller<T>(req: &tonic::Request<T>) -> Result<Caller, LockError> {
    Caller::of_request(req)
        .cloned()
        .ok_or_else(|| LockError::Denied {
            reason: "the call did not pass the authorization layer".into(),
        })
}

/// Checks that `caller` may open or resume a session of `node`.
pub fn may_be_node(caller: &Caller, node: &str) -> Result<(), LockError> {
    match caller {
        Caller::Insecure => Ok(()),
        Caller::Node(n) if n == node => Ok(()),
        other => Err(LockError::Denied {
            reason: format!("{other} may not open or resume a session of node {node}"),
        }),
    }
}

/// Checks that `caller` owns session `id` (its record names the caller's node).
pub async fn owns_session(ctx: &Ctx, caller: &Caller, id: i64) -> Result<(), LockError> {
    let Some(mine) = caller.node() else {
        return match caller {
            Caller::Insecure => Ok(()),
            other => Err(LockError::Denied {
                reason: format!("{other} owns no session"),
            }),
        };
    };
    let owner = ctx.session_node(id).await?;
    if owner == mine {
        Ok(())
    } else {
        Err(LockError::Denied {
            reason: format!(
                "node {mine} presented session {id:x}, which is not its own: a node acts \
                 only through its own sessions"
            ),
        })
    }
}

/// True when `caller` may see the session id of `node`.
pub fn may_see_session(caller: &Caller, node: &str) -> bool {
    match caller {
        Caller::Insecure => true,
        Caller::Node(n) => n == node,
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn viewers_read_admins_write_nodes_lock() {
        let v = Caller::Viewer("v".into());
        let a = Caller::Admin("a".into());
        let n = Caller::Node("node1".into());
        let s = Caller::Server("mdserver".into());
        assert_eq!(
            policy("/mdcluster.v1.ClusterService/Mdstat", &v),
            Ok(Access::Read)
        );
        let e = policy("/mdcluster.v1.ClusterService/Stop", &v).unwrap_err();
        assert!(e.contains("admin"), "{e}");
        assert_eq!(
            policy("/mdcluster.v1.ClusterService/Stop", &a),
            Ok(Access::Admin)
        );
        assert!(policy("/mdcluster.v1.ClusterService/Nodes", &n).is_err());
        assert!(policy("/mdcluster.v1.ClusterService/Nodes", &s).is_err());
        assert_eq!(
            policy("/mdcluster.v1.LockService/Acquire", &n),
            Ok(Access::Read)
        );
        assert!(policy("/mdcluster.v1.LockService/Acquire", &a).is_err());
        assert_eq!(
            policy("/mdcluster.v1.LockService/ListNodes", &v),
            Ok(Access::Read)
        );
        assert!(policy("/grpc.health.v1.Health/Check", &v).is_ok());
        assert!(policy("/x.Y/Z", &a).is_err());
        assert_eq!(
            policy("/mdcluster.v1.ClusterService/Stop", &Caller::Insecure),
            Ok(Access::Read)
        );
    }

    #[test]
    fn sessions_belong_to_their_node() {
        let n = Caller::Node("node1".into());
        assert!(may_be_node(&n, "node1").is_ok());
        assert!(may_be_node(&n, "node2").is_err());
        assert!(may_be_node(&Caller::Admin("a".into()), "node1").is_err());
        assert!(may_see_session(&n, "node1"));
        assert!(!may_see_session(&n, "node2"));
        assert!(!may_see_session(&Caller::Admin("a".into()), "node1"));
    }
}
