//! The CRI services. Handlers only translate: validate the request, call the
//! domain module, build the response. One file per RPC group.

mod container;
mod error;
mod image;
mod list;
mod metrics;
mod runtime;
mod sandbox;
mod service;
mod stats;
mod streaming;

use std::sync::Arc;

use k8s_cri::v1::image_service_server::ImageServiceServer;
use tonic::transport::server::Router;
use tower::layer::util::{Identity, Stack};

use crate::daemon::Daemon;
use crate::idle::{Activity, ActivityLayer};

/// The tonic router with both CRI services, ready to serve. Every call
/// counts as `activity` while it runs.
pub fn router(daemon: Arc<Daemon>, activity: &Activity) -> Router<Stack<ActivityLayer, Identity>> {
    tonic::transport::Server::builder()
        .layer(activity.layer())
        .add_service(service::RuntimeServer::new(daemon.clone()))
        .add_service(ImageServiceServer::new(image::Images::new(
            daemon.images.clone(),
        )))
}
