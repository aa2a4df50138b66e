//! `runtime.v1.RuntimeService` as served: the generated service, with two
//! things in front of it that its generated code cannot do.
//!
//! - The list calls are answered from kept encodings (list.rs).
//! - The calls that change state run to their end even when the client
//!   goes away. tonic drops a call's future when the client's deadline
//!   passes (`grpc-timeout`) or it resets the stream, so a create dropped
//!   halfway left a bundle, a snapshot and a cgroup without a record until
//!   the next restart, and a stop dropped halfway left a pod Ready with its
//!   containers dead. containerd and CRI-O finish such work too; the
//!   client's retry then finds the result (the name taken, the pod gone).

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use k8s_cri::v1::runtime_service_server::RuntimeServiceServer;
use tonic::Status;
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, http};
use tonic::server::NamedService;

use super::list::{ListCall, Lists};
use super::runtime::Runtime;
use crate::daemon::Daemon;

/// The calls of `RuntimeService` that change state.
const RUN_TO_COMPLETION: &[&str] = &[
    "/runtime.v1.RuntimeService/RunPodSandbox",
    "/runtime.v1.RuntimeService/StopPodSandbox",
    "/runtime.v1.RuntimeService/RemovePodSandbox",
    "/runtime.v1.RuntimeService/CreateContainer",
    "/runtime.v1.RuntimeService/StartContainer",
    "/runtime.v1.RuntimeService/StopContainer",
    "/runtime.v1.RuntimeService/RemoveContainer",
    "/runtime.v1.RuntimeService/UpdateContainerResources",
    "/runtime.v1.RuntimeService/ReopenContainerLog",
    "/runtime.v1.RuntimeService/UpdateRuntimeConfig",
];

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

impl Service<http::Request<Body>> for RuntimeServer {
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        if let Some(list) = ListCall::of(request.uri().path()) {
            return list.serve(&self.lists, request);
        }
        if !RUN_TO_COMPLETION.contains(&request.uri().path()) {
            return self.generated.call(request);
        }
        // Spawned, the call goes on if this future is dropped.
        let call = tokio::spawn(self.generated.call(request));
        Box::pin(async move {
            match call.await {
                Ok(response) => response,
                Err(e) => Ok(Status::internal(format!("the call's task ended: {e}")).into_http()),
            }
        })
    }
}
