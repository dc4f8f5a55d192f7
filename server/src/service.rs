//! The tonic `LockService` implementation: each handler validates, calls the module that
//! does the work, and maps its [`LockError`](crate::error::LockError) to a status.
//!
//! Cancel-safety: tonic drops a handler's future when the client goes away. The only
//! handlers that leave state behind while waiting (acquire, publish) clean it up from a
//! drop guard; every other handler is a single etcd transaction.

use std::sync::Arc;

use mdcluster_proto::v1::lock_service_server::LockService;
use mdcluster_proto::v1::{
    AckRequest, AckResponse, AcquireRequest, AcquireResponse, ConvertRequest, ConvertResponse,
    ListNodesRequest, ListNodesResponse, PublishRequest, PublishResponse, ReadValueRequest,
    ReadValueResponse, ReleaseRequest, ReleaseResponse, SessionEvent, SessionRequest,
    SubscribeRequest, SubscribeResponse, UnsubscribeRequest, UnsubscribeResponse,
    WriteValueRequest, WriteValueResponse,
};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

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
        let rx = session::open(self.ctx.clone(), req.into_inner()).await?;
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn acquire(&self, req: Request<AcquireRequest>) -> Res<AcquireResponse> {
        Ok(Response::new(
            lock::acquire(&self.ctx, req.into_inner()).await?,
        ))
    }

    async fn release(&self, req: Request<ReleaseRequest>) -> Res<ReleaseResponse> {
        lock::release(&self.ctx, req.into_inner()).await?;
        Ok(Response::new(ReleaseResponse {}))
    }

    async fn convert(&self, req: Request<ConvertRequest>) -> Res<ConvertResponse> {
        Ok(Response::new(
            lock::convert(&self.ctx, req.into_inner()).await?,
        ))
    }

    async fn write_value(&self, req: Request<WriteValueRequest>) -> Res<WriteValueResponse> {
        lock::write_value(&self.ctx, req.into_inner()).await?;
        Ok(Response::new(WriteValueResponse {}))
    }

    async fn read_value(&self, req: Request<ReadValueRequest>) -> Res<ReadValueResponse> {
        Ok(Response::new(
            lock::read_value(&self.ctx, req.into_inner()).await?,
        ))
    }

    async fn subscribe(&self, req: Request<SubscribeRequest>) -> Res<SubscribeResponse> {
        message::subscribe(&self.ctx, req.into_inner()).await?;
        Ok(Response::new(SubscribeResponse {}))
    }

    async fn unsubscribe(&self, req: Request<UnsubscribeRequest>) -> Res<UnsubscribeResponse> {
        message::unsubscribe(&self.ctx, req.into_inner()).await?;
        Ok(Response::new(UnsubscribeResponse {}))
    }

    async fn publish(&self, req: Request<PublishRequest>) -> Res<PublishResponse> {
        Ok(Response::new(
            message::publish(&self.ctx, req.into_inner()).await?,
        ))
    }

    async fn ack(&self, req: Request<AckRequest>) -> Res<AckResponse> {
        message::ack(&self.ctx, req.into_inner()).await?;
        Ok(Response::new(AckResponse {}))
    }

    async fn list_nodes(&self, _req: Request<ListNodesRequest>) -> Res<ListNodesResponse> {
        Ok(Response::new(registry::list(&self.ctx).await?))
    }
}
