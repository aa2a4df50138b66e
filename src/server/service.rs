//! `runtime.v1.RuntimeService` as served: the generated service, with the
//! list calls answered in front of it from kept encodings (list.rs), which
//! its generated code cannot send.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use tonic::codegen::{BoxFuture, Service, StdError, http};
use tonic::server::NamedService;

use super::list::{ListCall, Lists};
use super::runtime::Runtime;
use crate::daemon::Daemon;

#[derive(Clone)]
pub struct RuntimeServer {
    lists: Arc<Lists>,
    generated: RuntimeServiceServer<Runtime>,
}

impl RuntimeServer {
    pub fn new(daemon: Arc<Daemon>) -> Self {
        let lists = Arc::new(Lists::new(daemon.clone()));
        RuntimeServer {
            generated: RuntimeServiceServer::new(Runtime::new(daemon, lists.clone())),
            lists,
        }
    }
}

impl NamedService for RuntimeServer {
    const NAME: &'static str = <RuntimeServiceServer<Runtime> as NamedService>::NAME;
}

impl<B> Service<http::Request<B>> for RuntimeServer
where
    B: tonic::codegen::Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if let Some(list) = ListCall::of(request.uri().path()) {
            return list.serve(&self.lists, request);
        }
        self.generated.call(request)
    }
}
