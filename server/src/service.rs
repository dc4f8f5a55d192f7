//! The tonic `LockService` implementation: each handler validates, calls the module that
//! does the work, and maps its [`LockError`](crate::error::LockError) to a status.
//!
//! Cancel-safety: tonic drops a handler's future when the client goes away. The only
//! handlers that leave state behind while waiting (acquire, publish) clean it up from a
//! drop guard; every other handler is a single etcd transaction.
//!
//! Authorization ([`crate::authz`]): a node opens and resumes only its own sessions and
//! presents only session ids it owns; another node's session id is never shown to it.

use std::sync::Arc;

use mdcluster_proto::v1::lock_service_server::LockService;
use mdcluster_proto::v1::{
    AckRequest, AckResponse, AcquireRequest, AcquireResponse, ConvertRequest, ConvertResponse,
    ListNodesRequest, ListNodesResponse, PublishRequest, PublishResponse, ReadValueRequest,
    ReadValueResponse, ReadValuesRequest, ReadValuesResponse, ReleaseRequest, ReleaseResponse,
    SessionEvent, SessionRequest, SubscribeRequest, SubscribeResponse, UnsubscribeRequest,
    UnsubscribeResponse, WriteValueRequest, WriteValueResponse,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::authz::{caller, may_be_node, may_see_session, owns_session};
use crate::{lock, message, registry, session, Ctx};

/// The lock service of one replica.
#[derive(Debug, Clone)]
pub struct LockSvc {
    /// Shared state: etcd, key layout, local session streams.
    pub ctx: Arc<Ctx>,
}

type Res<T> = Result<Response<T>, Status>;

#[tonic::async_trait]
impl LockService for LockSvc {
    type SessionStream = ReceiverStream<Result<SessionEvent, Status>>;

    async fn session(&self, req: Request<Streaming<SessionRequest>>) -> Res<Self::SessionStream> {
        let who = caller(&req)?;
        let rx = session::open(self.ctx.clone(), req.into_inner(), move |node: &str| {
            may_be_node(&who, node)
        })
        .await?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn acquire(&self, req: Request<AcquireRequest>) -> Res<AcquireResponse> {
        owns_session(&self.ctx, &caller(&req)?, req.get_ref().session_id).await?;
        Ok(Response::new(
            lock::acquire(&self.ctx, req.into_inner()).await?,
        ))
    }

    async fn release(&self, req: Request<ReleaseRequest>) -> Res<ReleaseResponse> {
        owns_session(&self.ctx, &caller(&req)?, req.get_ref().session_id).await?;
        lock::release(&self.ctx, req.into_inner()).await?;
        Ok(Response::new(ReleaseResponse {}))
    }

    async fn convert(&self, req: Request<ConvertRequest>) -> Res<ConvertResponse> {
        owns_session(&self.ctx, &caller(&req)?, req.get_ref().session_id).await?;
        Ok(Response::new(
            lock::convert(&self.ctx, req.into_inner()).await?,
        ))
    }

    async fn write_value(&self, req: Request<WriteValueRequest>) -> Res<WriteValueResponse> {
        owns_session(&self.ctx, &caller(&req)?, req.get_ref().session_id).await?;
        lock::write_value(&self.ctx, req.into_inner()).await?;
        Ok(Response::new(WriteValueResponse {}))
    }

    async fn read_value(&self, req: Request<ReadValueRequest>) -> Res<ReadValueResponse> {
        Ok(Response::new(
            lock::read_value(&self.ctx, req.into_inner()).await?,
        ))
    }

    async fn read_values(&self, req: Request<ReadValuesRequest>) -> Res<ReadValuesResponse> {
        Ok(Response::new(
            lock::read_values(&self.ctx, req.into_inner()).await?,
        ))
    }

    async fn subscribe(&self, req: Request<SubscribeRequest>) -> Res<SubscribeResponse> {
        owns_session(&self.ctx, &caller(&req)?, req.get_ref().session_id).await?;
        message::subscribe(&self.ctx, req.into_inner()).await?;
        Ok(Response::new(SubscribeResponse {}))
    }

    async fn unsubscribe(&self, req: Request<UnsubscribeRequest>) -> Res<UnsubscribeResponse> {
        owns_session(&self.ctx, &caller(&req)?, req.get_ref().session_id).await?;
        message::unsubscribe(&self.ctx, req.into_inner()).await?;
        Ok(Response::new(UnsubscribeResponse {}))
    }

    async fn publish(&self, req: Request<PublishRequest>) -> Res<PublishResponse> {
        owns_session(&self.ctx, &caller(&req)?, req.get_ref().session_id).await?;
        let who = caller(&req)?;
        let mut r = message::publish(&self.ctx, req.into_inner()).await?;
        for a in &mut r.results {
            if !may_see_session(&who, &a.node) {
                a.session_id = 0;
            }
        }
        Ok(Response::new(r))
    }

    async fn ack(&self, req: Request<AckRequest>) -> Res<AckResponse> {
        owns_session(&self.ctx, &caller(&req)?, req.get_ref().session_id).await?;
        message::ack(&self.ctx, req.into_inner()).await?;
        Ok(Response::new(AckResponse {}))
    }

    async fn list_nodes(&self, req: Request<ListNodesRequest>) -> Res<ListNodesResponse> {
        let who = caller(&req)?;
        let mut r = registry::list(&self.ctx).await?;
        for n in &mut r.nodes {
            if !may_see_session(&who, &n.node) {
                n.session_id = 0;
            }
        }
        Ok(Response::new(r))
    }
}
