//! `runtime.v1.ImageService`.

use k8s_cri::v1::image_service_server::ImageService;
use k8s_cri::v1::*;
use tonic::{Request, Response, Status};

use super::error::not_built;

const IMAGES: &str = "the image store (registry pull, content store, snapshots)";

/// Holds nothing yet: every RPC answers `Unimplemented` until the image
/// store exists.
pub struct Images;

#[tonic::async_trait]
impl ImageService for Images {
    async fn list_images(
        &self,
        _request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        Err(not_built("ListImages", IMAGES))
    }

    async fn image_status(
        &self,
        _request: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        Err(not_built("ImageStatus", IMAGES))
    }

    async fn pull_image(
        &self,
        _request: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        Err(not_built("PullImage", IMAGES))
    }

    async fn remove_image(
        &self,
        _request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        Err(not_built("RemoveImage", IMAGES))
    }

    async fn image_fs_info(
        &self,
        _request: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        Err(not_built("ImageFsInfo", IMAGES))
    }
}
