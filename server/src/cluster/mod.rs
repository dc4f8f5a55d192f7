//! The cluster service: what `mdctl` calls (`docs/ARCHITECTURE.md`, "The cluster API" and
//! "Requests").
//!
//! - **nodes**: the live sessions of the lock service's node registry, each with the
//!   agent address it registered;
//! - **arrays**: name → UUID, members, bitmap kind and creating node, stored in etcd
//!   under `<root>arrays/<name>` (JSON, no lease: it outlives every node) — see
//!   [`records`];
//! - **routing**: every per-node operation goes to the named node's agent (empty node:
//!   the first live node in name order), through one cached channel per agent address,
//!   each call bounded ([`READ_TIMEOUT`], [`OP_TIMEOUT`]);
//! - **detail** asks every live node and merges the answers;
//! - **watch** merges every node's event stream with node joined/left/failed events
//!   ([`watch`]).
//!
//! Errors keep their errno across the hop ([`mdcluster_proto::status`]); transport
//! failures to an agent read as EIO ("node X at ADDR did not answer") or ETIMEDOUT.
//!
//! # Layout
//! - [`records`]: the array records in etcd.
//! - [`watch`]: the merged event stream.

pub mod records;
pub mod watch;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mdcluster_proto::status::WireError;
use mdcluster_proto::tls::Caller;
use mdcluster_proto::v1 as pb;
use mdcluster_proto::v1::agent_service_client::AgentServiceClient;
use mdcluster_proto::v1::cluster_service_server::ClusterService;
use mdcluster_proto::v1::{Errno, NodeInfo};
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::Ctx;

/// Bound of a read-only call to an agent.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound of a create, assemble or stop on an agent (stop grace, drain, join).
pub const OP_TIMEOUT: Duration = Duration::from_secs(90);
/// Bound of connecting to an agent.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Most cached agent channels.
const MAX_CHANNELS: usize = 4096;

/// The cluster service of one replica.
#[derive(Debug, Clone)]
pub struct ClusterSvc {
    ctx: Arc<Ctx>,
    transport: mdcluster_proto::tls::Transport,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

/// `md0` for `/dev/md0`.
pub fn short_name(name: &str) -> &str {
    name.strip_prefix("/dev/").unwrap_or(name)
}

/// An array name from a request, `/dev/` prefix read off: 1..=32 of `[A-Za-z0-9_.-]`,
/// not starting with `.` (the agents' rule), checked before it reaches etcd or an
/// agent; EINVAL quoting it cut short otherwise.
pub fn array_name(name: &str) -> Result<String, WireError> {
    let n = short_name(name);
    let ok = !n.is_empty()
        && n.len() <= 32
        && !n.starts_with('.')
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
    if ok {
        Ok(n.to_owned())
    } else {
        Err(WireError::new(
            Errno::Einval,
            "request",
            format!(
                "invalid array name {}: use 1-32 of [A-Za-z0-9_.-], like md0",
                mdcluster_proto::quote::quoted(n)
            ),
        ))
    }
}

fn lock_err(e: crate::error::LockError) -> WireError {
    WireError::from_status(&Status::from(e))
}

impl ClusterSvc {
    /// The service over the replica's shared state.
    pub fn new(ctx: Arc<Ctx>, transport: mdcluster_proto::tls::Transport) -> Self {
        ClusterSvc {
            ctx,
            transport,
            channels: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// The replica's shared state.
    pub fn ctx(&self) -> &Arc<Ctx> {
        &self.ctx
    }

    /// The live nodes in name order.
    pub async fn live_nodes(&self) -> Result<Vec<NodeInfo>, WireError> {
        let mut nodes = crate::registry::list(&self.ctx)
            .await
            .map_err(lock_err)?
            .nodes;
        nodes.sort_by(|a, b| a.node.cmp(&b.node));
        Ok(nodes)
    }

    /// The node an operation runs on: `node`, or the first live node when empty.
    pub async fn resolve(&self, node: &str) -> Result<NodeInfo, WireError> {
        let nodes = self.live_nodes().await?;
        if nodes.is_empty() {
            return Err(WireError::new(
                Errno::Enoent,
                "nodes",
                "no node is connected to mdserver: start mdagent --server on the nodes",
            ));
        }
        if node.is_empty() {
            return Ok(nodes[0].clone());
        }
        nodes
            .iter()
            .find(|n| n.node == node)
            .cloned()
            .ok_or_else(|| {
                let known: Vec<&str> = nodes.iter().map(|n| n.node.as_str()).collect();
                WireError::new(
                    Errno::Enoent,
                    format!("node {node}"),
                    format!(
                        "node {node} is not connected to mdserver (live nodes: {})",
                        known.join(", ")
                    ),
                )
            })
    }

    /// A client of `node`'s agent at the address it registered.
    pub fn agent(&self, node: &NodeInfo) -> Result<AgentServiceClient<Channel>, WireError> {
        let (name, addr) = (node.node.as_str(), node.agent_addr.as_str());
        let key = format!("{name}@{addr}");
        let mut map = self.channels.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = map.get(&key) {
            return Ok(AgentServiceClient::new(c.clone()));
        }
        let ep = self
            .transport
            .endpoint(addr)
            .map_err(|e| {
                WireError::new(
                    Errno::Einval,
                    format!("agent {addr}"),
                    format!("invalid agent address {addr:?}: {e}"),
                )
            })?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true);
        // With TLS the agent must prove it is `node`: its certificate names the node.
        let ch = self.transport.channel(&ep, Some(name));
        if map.len() >= MAX_CHANNELS {
            map.clear();
        }
        map.insert(key, ch.clone());
        Ok(AgentServiceClient::new(ch))
    }

    /// Runs one call on `node`'s agent with `timeout`; errors keep their errno and get
    /// the node named.
    pub async fn call<T, F, Fut>(
        &self,
        node: &NodeInfo,
        timeout: Duration,
        f: F,
    ) -> Result<T, WireError>
    where
        F: FnOnce(AgentServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        let client = self.agent(node)?;
        match tokio::time::timeout(timeout, f(client)).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => {
                let e = WireError::from_status(&s);
                if s.details().is_empty() {
                    // A transport failure: the agent itself did not answer.
                    Err(WireError::new(
                        e.errno,
                        format!("node {}", node.node),
                        format!(
                            "node {} (agent at {}) did not answer: {}",
                            node.node,
                            node.agent_addr,
                            s.message()
                        ),
                    ))
                } else {
                    Err(e)
                }
            }
            Err(_) => Err(WireError::new(
                Errno::Etimedout,
                format!("node {}", node.node),
                format!(
                    "node {} (agent at {}) did not answer within {timeout:?}",
                    node.node, node.agent_addr
                ),
            )),
        }
    }

    async fn create_impl(&self, r: pb::ClusterCreateRequest) -> Result<pb::ArrayStatus, WireError> {
        let mut create = r.create.ok_or_else(|| {
            WireError::new(
                Errno::Einval,
                "request",
                "create: the array description is missing",
            )
        })?;
        create.name = array_name(&create.name)?;
        let node = self.resolve(&r.node).await?;
        // A recorded array that runs somewhere is not re-created.
        if let Some(rec) = records::get(&self.ctx, &create.name).await? {
            for n in self.live_nodes().await? {
                let name = create.name.clone();
                if let Ok(st) = self
                    .call(&n, READ_TIMEOUT, |mut c| async move {
                        c.get(pb::GetArrayRequest { name }).await
                    })
                    .await
                {
                    return Err(WireError::new(
                        Errno::Eexist,
                        format!("array {}", create.name),
                        format!("array {} (uuid {}) already exists and is {} on node {}; stop it on every node first", create.name, rec.uuid, state_word(st.state), n.node),
                    ));
                }
            }
        }
        let req = create.clone();
        let st = self
            .call(
                &node,
                OP_TIMEOUT,
                |mut c| async move { c.create(req).await },
            )
            .await?;
        let rec = pb::ArrayRecord {
            name: create.name.clone(),
            uuid: st.uuid.clone(),
            members: create.members.clone(),
            bitmap: if create.bitmap.is_empty() {
                "internal".into()
            } else {
                create.bitmap.clone()
            },
            created_on: node.node.clone(),
        };
        records::put(&self.ctx, &rec).await?;
        Ok(st)
    }

    async fn assemble_impl(
        &self,
        r: pb::ClusterAssembleRequest,
    ) -> Result<pb::ArrayStatus, WireError> {
        let name = array_name(&r.name)?;
        let node = self.resolve(&r.node).await?;
        let rec = records::get(&self.ctx, &name).await?;
        let mut uuid = String::new();
        let members = if r.members.is_empty() {
            match &rec {
                Some(rec) => {
                    // Recorded paths are another node's view: the agent finds its own
                    // by the UUID where they do not fit.
                    uuid = rec.uuid.clone();
                    rec.members.clone()
                }
                None => {
                    return Err(WireError::new(
                        Errno::Enoent,
                        format!("array {name}"),
                        format!(
                            "array {name} is not recorded in the cluster: give its member devices"
                        ),
                    ))
                }
            }
        } else {
            r.members.clone()
        };
        let req = pb::AssembleArrayRequest {
            name: name.clone(),
            members: members.clone(),
            uuid,
        };
        let st = self
            .call(
                &node,
                OP_TIMEOUT,
                |mut c| async move { c.assemble(req).await },
            )
            .await?;
        if rec.is_none() {
            let bitmap = st
                .bitmap
                .as_ref()
                .map_or_else(|| "none".to_owned(), |b| b.kind.clone());
            records::put(
                &self.ctx,
                &pb::ArrayRecord {
                    name,
                    uuid: st.uuid.clone(),
                    members,
                    bitmap,
                    created_on: node.node.clone(),
                },
            )
            .await?;
        }
        Ok(st)
    }

    async fn stop_impl(
        &self,
        r: pb::ClusterStopRequest,
    ) -> Result<pb::ClusterStopResponse, WireError> {
        let node = self.resolve(&r.node).await?;
        let names = if r.scan {
            let l = self
                .call(&node, READ_TIMEOUT, |mut c| async move {
                    c.list(pb::ListArraysRequest {}).await
                })
                .await?;
            l.arrays.into_iter().map(|a| a.name).collect()
        } else if r.name.is_empty() {
            return Err(WireError::new(
                Errno::Einval,
                "request",
                "stop: name an array or give --scan",
            ));
        } else {
            vec![array_name(&r.name)?]
        };
        let mut stopped = Vec::new();
        let mut first_err = None;
        for name in names {
            let req = pb::StopArrayRequest {
                name: name.clone(),
                force: r.force,
            };
            match self
                .call(&node, OP_TIMEOUT, |mut c| async move { c.stop(req).await })
                .await
            {
                Ok(_) => stopped.push(name),
                Err(e) => {
                    first_err.get_or_insert(e);
                }
            }
        }
        match first_err {
            Some(e) if !stopped.is_empty() => {
                Err(e.context(&format!("stopped {} but", stopped.join(", "))))
            }
            Some(e) => Err(e),
            None => Ok(pb::ClusterStopResponse {
                node: node.node,
                stopped,
            }),
        }
    }

    async fn detail_impl(&self, r: pb::DetailRequest) -> Result<pb::DetailResponse, WireError> {
        let name = array_name(&r.name)?;
        let record = records::get(&self.ctx, &name).await?;
        let nodes = self.live_nodes().await?;
        let asks = nodes.iter().map(|n| {
            let name = name.clone();
            async move {
                let r = self
                    .call(n, READ_TIMEOUT, |mut c| async move {
                        c.get(pb::GetArrayRequest { name }).await
                    })
                    .await;
                let mut na = pb::NodeArray {
                    node: n.node.clone(),
                    agent_addr: n.agent_addr.clone(),
                    ..Default::default()
                };
                match r {
                    Ok(st) => {
                        na.state = state_word(st.state).to_owned();
                        na.status = Some(st);
                    }
                    Err(e) if e.errno == Errno::Enoent => na.state = "absent".into(),
                    Err(e) => {
                        na.state = "unreachable".into();
                        na.error = e.message;
                    }
                }
                na
            }
        });
        let per_node = futures::future::join_all(asks).await;
        if record.is_none() && per_node.iter().all(|n| n.status.is_none()) {
            return Err(WireError::new(
                Errno::Enoent,
                format!("array {name}"),
                format!("no array named {name}: it is not recorded and no live node has it"),
            ));
        }
        Ok(pb::DetailResponse {
            record,
            members: member_paths(&per_node),
            nodes: per_node,
        })
    }

    async fn nodes_impl(&self) -> Result<pb::ClusterNodesResponse, WireError> {
        let nodes = self.live_nodes().await?;
        let asks = nodes.iter().map(|n| async move {
            let r = self
                .call(n, READ_TIMEOUT, |mut c| async move {
                    c.list(pb::ListArraysRequest {}).await
                })
                .await;
            let mut cn = pb::ClusterNode {
                node: n.node.clone(),
                agent_addr: n.agent_addr.clone(),
                session_id: n.session_id,
                ..Default::default()
            };
            match r {
                Ok(l) => {
                    cn.reachable = true;
                    cn.arrays = l
                        .arrays
                        .iter()
                        .map(|a| format!("{}:{}", a.name, state_word(a.state)))
                        .collect();
                }
                Err(e) => cn.error = e.message,
            }
            cn
        });
        Ok(pb::ClusterNodesResponse {
            nodes: futures::future::join_all(asks).await,
        })
    }

    /// `node`, or the first live node that has array `name` active.
    async fn node_with(&self, node: &str, name: &str) -> Result<NodeInfo, WireError> {
        if !node.is_empty() {
            return self.resolve(node).await;
        }
        for n in self.live_nodes().await? {
            let req = pb::GetArrayRequest {
                name: name.to_owned(),
            };
            if self
                .call(&n, READ_TIMEOUT, |mut c| async move { c.get(req).await })
                .await
                .is_ok()
            {
                return Ok(n);
            }
        }
        Err(WireError::new(
            Errno::Enoent,
            format!("array {name}"),
            format!("no live node has array {name} assembled; assemble it first"),
        ))
    }

    /// `mdctl manage`: to the named node, or to the first live node that has the array
    /// active (the agent makes the change cluster-wide).
    async fn manage_impl(&self, r: pb::ClusterManageRequest) -> Result<pb::ArrayStatus, WireError> {
        let Some(m) = r.manage else {
            return Err(WireError::new(
                Errno::Einval,
                "request",
                "manage: no operations given",
            ));
        };
        let name = array_name(&m.name)?;
        let node = self.node_with(&r.node, &name).await?;
        let req = pb::ManageRequest { name, ops: m.ops };
        self.call(
            &node,
            OP_TIMEOUT,
            |mut c| async move { c.manage(req).await },
        )
        .await
    }

    /// `mdctl grow`: routed like manage.
    async fn grow_impl(&self, r: pb::ClusterGrowRequest) -> Result<pb::ArrayStatus, WireError> {
        let Some(g) = r.grow else {
            return Err(WireError::new(
                Errno::Einval,
                "request",
                "grow: nothing to change",
            ));
        };
        let name = array_name(&g.name)?;
        let node = self.node_with(&r.node, &name).await?;
        let bitmap_changed = !g.bitmap.is_empty();
        let req = pb::GrowRequest {
            name: name.clone(),
            ..g
        };
        let st = self
            .call(&node, OP_TIMEOUT, |mut c| async move { c.grow(req).await })
            .await?;
        if bitmap_changed {
            // The record names the bitmap kind: keep it true.
            if let Some(mut rec) = records::get(&self.ctx, &name).await? {
                rec.bitmap = st
                    .bitmap
                    .as_ref()
                    .map_or_else(|| "none".to_owned(), |b| b.kind.clone());
                records::put(&self.ctx, &rec).await?;
            }
        }
        Ok(st)
    }

    async fn tune_impl(&self, r: pb::TuneRequest) -> Result<pb::TuneResponse, WireError> {
        let nodes = if r.node.is_empty() {
            self.live_nodes().await?
        } else {
            vec![self.resolve(&r.node).await?]
        };
        let mut out = pb::TuneResponse::default();
        for n in &nodes {
            let req = pb::SetSpeedRequest {
                name: String::new(),
                min_kib_s: r.sync_speed_min_kib_s,
                max_kib_s: r.sync_speed_max_kib_s,
            };
            let resp = self
                .call(
                    n,
                    READ_TIMEOUT,
                    |mut c| async move { c.set_speed(req).await },
                )
                .await?;
            out.nodes.push(n.node.clone());
            out.arrays
                .extend(resp.arrays.iter().map(|a| format!("{}/{a}", n.node)));
        }
        Ok(out)
    }
}

/// The word for an array state.
pub fn state_word(s: i32) -> &'static str {
    match pb::ArrayRunState::try_from(s) {
        Ok(pb::ArrayRunState::Assembling) => "assembling",
        Ok(pb::ArrayRunState::Active) => "active",
        Ok(pb::ArrayRunState::Stopping) => "stopping",
        _ => "unknown",
    }
}

#[tonic::async_trait]
impl ClusterService for ClusterSvc {
    async fn nodes(
        &self,
        r: Request<pb::ClusterNodesRequest>,
    ) -> Result<Response<pb::ClusterNodesResponse>, Status> {
        let mut nodes = self.nodes_impl().await?;
        // Session ids are capabilities of their nodes: shown only without TLS.
        if Caller::of_request(&r) != Some(&Caller::Insecure) {
            for n in &mut nodes.nodes {
                n.session_id = 0;
            }
        }
        Ok(Response::new(nodes))
    }

    async fn create(
        &self,
        r: Request<pb::ClusterCreateRequest>,
    ) -> Result<Response<pb::ArrayStatus>, Status> {
        Ok(Response::new(self.create_impl(r.into_inner()).await?))
    }

    async fn assemble(
        &self,
        r: Request<pb::ClusterAssembleRequest>,
    ) -> Result<Response<pb::ArrayStatus>, Status> {
        Ok(Response::new(self.assemble_impl(r.into_inner()).await?))
    }

    async fn stop(
        &self,
        r: Request<pb::ClusterStopRequest>,
    ) -> Result<Response<pb::ClusterStopResponse>, Status> {
        Ok(Response::new(self.stop_impl(r.into_inner()).await?))
    }

    async fn detail(
        &self,
        r: Request<pb::DetailRequest>,
    ) -> Result<Response<pb::DetailResponse>, Status> {
        Ok(Response::new(self.detail_impl(r.into_inner()).await?))
    }

    async fn mdstat(
        &self,
        r: Request<pb::ClusterMdstatRequest>,
    ) -> Result<Response<pb::MdstatResponse>, Status> {
        let node = self.resolve(&r.into_inner().node).await?;
        Ok(Response::new(
            self.call(&node, READ_TIMEOUT, |mut c| async move {
                c.mdstat(pb::MdstatRequest {}).await
            })
            .await?,
        ))
    }

    async fn tune(
        &self,
        r: Request<pb::TuneRequest>,
    ) -> Result<Response<pb::TuneResponse>, Status> {
        Ok(Response::new(self.tune_impl(r.into_inner()).await?))
    }

    async fn manage(
        &self,
        r: Request<pb::ClusterManageRequest>,
    ) -> Result<Response<pb::ArrayStatus>, Status> {
        Ok(Response::new(self.manage_impl(r.into_inner()).await?))
    }

    async fn grow(
        &self,
        r: Request<pb::ClusterGrowRequest>,
    ) -> Result<Response<pb::ArrayStatus>, Status> {
        Ok(Response::new(self.grow_impl(r.into_inner()).await?))
    }

    type WatchStream = watch::EventStream;

    async fn watch(
        &self,
        r: Request<pb::ClusterWatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let filter = r.into_inner().node;
        if !filter.is_empty() {
            self.resolve(&filter).await?;
        }
        Ok(Response::new(watch::merged(self.clone(), filter)))
    }
}

/// Each member (by device number) with the path every node that runs the array opens
/// it by, sorted by role (spares and failed members last), then device number.
pub fn member_paths(nodes: &[pb::NodeArray]) -> Vec<pb::MemberPaths> {
    let mut out: Vec<pb::MemberPaths> = Vec::new();
    for n in nodes {
        let Some(st) = &n.status else { continue };
        for m in &st.members {
            let i = match out.iter().position(|x| x.dev_number == m.dev_number) {
                Some(i) => i,
                None => {
                    out.push(pb::MemberPaths {
                        dev_number: m.dev_number,
                        role: None,
                        paths: Vec::new(),
                    });
                    out.len() - 1
                }
            };
            let e = &mut out[i];
            if e.role.is_none() {
                e.role = m.role;
            }
            e.paths.push(pb::NodePath {
                node: n.node.clone(),
                path: m.path.clone(),
                state: m.state.clone(),
            });
        }
    }
    out.sort_by_key(|m| (m.role.unwrap_or(u32::MAX), m.dev_number));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(path: &str, dev: u32, role: Option<u32>, state: &str) -> pb::MemberInfo {
        pb::MemberInfo {
            path: path.into(),
            dev_number: dev,
            role,
            state: state.into(),
            recovery_offset: 0,
            fenced_by: String::new(),
        }
    }

    fn node(name: &str, members: Option<Vec<pb::MemberInfo>>) -> pb::NodeArray {
        pb::NodeArray {
            node: name.into(),
            state: if members.is_some() {
                "active"
            } else {
                "absent"
            }
            .into(),
            status: members.map(|members| pb::ArrayStatus {
                members,
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn member_paths_merge_every_node_s_path_by_device_number() {
        let nodes = vec![
            node(
                "node1",
                Some(vec![
                    member("/n1/m2", 2, None, "spare"),
                    member("/n1/m1", 1, Some(1), "in_sync"),
                    member("/n1/m0", 0, Some(0), "in_sync"),
                ]),
            ),
            node("node3", None),
            node(
                "node2",
                Some(vec![
                    member("/dev/loop7", 0, Some(0), "in_sync"),
                    member("/dev/loop8", 1, Some(1), "recovering"),
                ]),
            ),
        ];
        let m = member_paths(&nodes);
        type Row = (u32, Option<u32>, Vec<(String, String, String)>);
        let got: Vec<Row> = m
            .iter()
            .map(|x| {
                (
                    x.dev_number,
                    x.role,
                    x.paths
                        .iter()
                        .map(|p| (p.node.clone(), p.path.clone(), p.state.clone()))
                        .collect(),
                )
            })
            .collect();
        let p = |n: &str, path: &str, s: &str| (n.to_owned(), path.to_owned(), s.to_owned());
        assert_eq!(
            got,
            vec![
                (
                    0,
                    Some(0),
                    vec![
                        p("node1", "/n1/m0", "in_sync"),
                        p("node2", "/dev/loop7", "in_sync")
                    ]
                ),
                (
                    1,
                    Some(1),
                    vec![
                        p("node1", "/n1/m1", "in_sync"),
                        p("node2", "/dev/loop8", "recovering")
                    ]
                ),
                (2, None, vec![p("node1", "/n1/m2", "spare")]),
            ]
        );
        assert!(member_paths(&[node("node1", None)]).is_empty());
    }
}
