//! Scenario `idle`: what kubelet asks a runtime on a node without pods,
//! round after round: Version, Status, ListPodSandbox, ListContainers,
//! ListImages and ImageFsInfo. Nothing is made. The daemon's memory at the
//! end is its idle memory as a node sees it, with kubelet calling; the one
//! at start follows a single Version call.

use std::time::Duration;

use super::client::{Conn, Failure};
use super::target::Target;
use super::{Ctx, order};

pub async fn run(targets: &mut [Target], ctx: &Ctx) {
    for i in 0..ctx.iterations {
        for t in order(i, targets.len()) {
            let target = &mut targets[t];
            if target.active() {
                round(target).await;
            }
        }
    }
}

/// kubelet's periodic calls, in the order of one round.
#[derive(Clone, Copy)]
enum Call {
    Version,
    Status,
    ListPodSandbox,
    ListContainers,
    ListImages,
    ImageFsInfo,
}

impl Call {
    const ROUND: [Call; 6] = [
        Call::Version,
        Call::Status,
        Call::ListPodSandbox,
        Call::ListContainers,
        Call::ListImages,
        Call::ImageFsInfo,
    ];

    fn op(self) -> &'static str {
        match self {
            Call::Version => "Version",
            Call::Status => "Status",
            Call::ListPodSandbox => "ListPodSandbox",
            Call::ListContainers => "ListContainers",
            Call::ListImages => "ListImages",
            Call::ImageFsInfo => "ImageFsInfo",
        }
    }

    async fn make(self, conn: &mut Conn) -> Result<Duration, Failure> {
        match self {
            Call::Version => conn.version_timed().await,
            Call::Status => conn.status().await,
            Call::ListPodSandbox => conn.list_pods().await.map(|l| l.received),
            Call::ListContainers => conn.list_containers().await.map(|l| l.received),
            Call::ListImages => conn.list_images().await,
            Call::ImageFsInfo => conn.image_fs_info().await,
        }
    }
}

/// One round of kubelet's calls. An RPC the runtime does not implement is
/// left out of later rounds; any other failure ends the endpoint's part.
async fn round(target: &mut Target) {
    for call in Call::ROUND {
        if !target.implements(call.op()) {
            continue;
        }
        match call.make(&mut target.conn).await {
            Ok(d) => target.record(call.op(), d),
            Err(f) if f.is_unimplemented() => target.skip(f),
            Err(f) => return target.fail(f),
        }
    }
}
