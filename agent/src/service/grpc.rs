//! The tonic `AgentService` over a [`Node`]: argument checks and conversions only; the
//! work and the errors (errno + resource + sentence, [`mdcluster_proto::status`]) come
//! from the node.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use mdcluster_proto::v1 as pb;
use mdcluster_proto::v1::agent_service_server::AgentService;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use super::{now_ms, Node};
use crate::raid::SpeedLimits;

/// The gRPC face of a node.
#[derive(Debug, Clone)]
pub struct AgentSvc {
    /// The node.
    pub node: Arc<Node>,
    /// Ends every event stream (agent shutdown: the server waits for open streams).
    pub streams_end: CancellationToken,
}

/// A stream of events.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<pb::ArrayEvent, Status>> + Send>>;

#[tonic::async_trait]
impl AgentService for AgentSvc {
    async fn create(
        &self,
        req: Request<pb::CreateArrayRequest>,
    ) -> Result<Response<pb::ArrayStatus>, Status> {
        Ok(Response::new(self.node.create(req.into_inner()).await?))
    }

    async fn assemble(
        &self,
        req: Request<pb::AssembleArrayRequest>,
    ) -> Result<Response<pb::ArrayStatus>, Status> {
        let r = req.into_inner();
        let members = r.members.iter().map(PathBuf::from).collect();
        if !r.uuid.is_empty() {
            return Ok(Response::new(
                self.node
                    .assemble_recorded(&r.name, members, &r.uuid)
                    .await?,
            ));
        }
        Ok(Response::new(self.node.assemble(&r.name, members).await?))
    }

    async fn stop(
        &self,
        req: Request<pb::StopArrayRequest>,
    ) -> Result<Response<pb::StopArrayResponse>, Status> {
        let r = req.into_inner();
        self.node.stop(&r.name, r.force).await?;
        Ok(Response::new(pb::StopArrayResponse {}))
    }

    async fn get(
        &self,
        req: Request<pb::GetArrayRequest>,
    ) -> Result<Response<pb::ArrayStatus>, Status> {
        Ok(Response::new(self.node.get(&req.into_inner().name)?))
    }

    async fn list(
        &self,
        _req: Request<pb::ListArraysRequest>,
    ) -> Result<Response<pb::ListArraysResponse>, Status> {
        Ok(Response::new(pb::ListArraysResponse {
            node: self.node.name().to_owned(),
            arrays: self.node.list(),
        }))
    }

    async fn mdstat(
        &self,
        _req: Request<pb::MdstatRequest>,
    ) -> Result<Response<pb::MdstatResponse>, Status> {
        Ok(Response::new(pb::MdstatResponse {
            node: self.node.name().to_owned(),
            text: self.node.mdstat(),
        }))
    }

    async fn set_speed(
        &self,
        req: Request<pb::SetSpeedRequest>,
    ) -> Result<Response<pb::SetSpeedResponse>, Status> {
        let r = req.into_inner();
        let arrays = self.node.set_speed(
            &r.name,
            SpeedLimits {
                min_kib_s: r.min_kib_s,
                max_kib_s: r.max_kib_s,
            },
        )?;
        Ok(Response::new(pb::SetSpeedResponse { arrays }))
    }

    async fn manage(
        &self,
        req: Request<pb::ManageRequest>,
    ) -> Result<Response<pb::ArrayStatus>, Status> {
        let r = req.into_inner();
        Ok(Response::new(self.node.manage(&r.name, r.ops).await?))
    }

    async fn grow(
        &self,
        req: Request<pb::GrowRequest>,
    ) -> Result<Response<pb::ArrayStatus>, Status> {
        Ok(Response::new(self.node.grow(req.into_inner()).await?))
    }

    type WatchStream = EventStream;

    async fn watch(
        &self,
        req: Request<pb::WatchRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let (past, mut rx) = if req.get_ref().recent {
            self.node.subscribe_recent()
        } else {
            (Vec::new(), self.node.subscribe())
        };
        let node = self.node.name().to_owned();
        let end = self.streams_end.clone();
        let s = async_stream::stream! {
            for ev in past {
                yield Ok(ev);
            }
            loop {
                let got = tokio::select! {
                    r = rx.recv() => r,
                    _ = end.cancelled() => break,
                };
                match got {
                    Ok(ev) => yield Ok(ev),
                    Err(broadcast::error::RecvError::Lagged(n)) => yield Ok(pb::ArrayEvent {
                        event: "EventsDropped".into(),
                        node: node.clone(),
                        detail: format!("{n} events were dropped: this watcher was too slow"),
                        time_unix_ms: now_ms(),
                        ..Default::default()
                    }),
                    Err(broadcast::error::RecvError::Closed) => break,
                }
            }
        };
        Ok(Response::new(Box::pin(s)))
    }
}
