//! `runtime.v1.ImageService`: translates CRI requests to the image store.

use std::collections::HashMap;
use std::sync::Arc;

use k8s_cri::v1::image_service_server::ImageService;
use k8s_cri::v1::*;
use tonic::{Request, Response, Status};

use super::error::invalid;
use crate::image::auth::Credentials;
use crate::image::store::{DiskUsage, ImageRecord, ImageStore};

/// Longer names than this are not image references.
const MAX_NAME_BYTES: usize = 4096;

pub struct Images {
    store: Arc<ImageStore>,
}

impl Images {
    pub fn new(store: Arc<ImageStore>) -> Self {
        Images { store }
    }
}

/// The image name of a request, required and bounded.
fn image_name(spec: Option<&ImageSpec>) -> Result<&str, Status> {
    let name = spec.map(|s| s.image.trim()).unwrap_or_default();
    if name.is_empty() {
        return Err(invalid("image.image", "an image name is required"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(invalid(
            "image.image",
            format!("longer than {MAX_NAME_BYTES} bytes"),
        ));
    }
    Ok(name)
}

fn to_cri(record: &ImageRecord) -> Image {
    let (uid, username) = record.user();
    Image {
        id: record.id.to_string(),
        repo_tags: record.repo_tags.clone(),
        repo_digests: record.repo_digests.clone(),
        size: record.size,
        uid: uid.map(|value| Int64Value { value }),
        username,
        spec: Some(ImageSpec {
            image: record.id.to_string(),
            annotations: record
                .annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            ..ImageSpec::default()
        }),
        pinned: record.pinned,
    }
}

fn filesystem(mountpoint: &std::path::Path, usage: DiskUsage) -> FilesystemUsage {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    FilesystemUsage {
        timestamp: now,
        fs_id: Some(FilesystemIdentifier {
            mountpoint: mountpoint.display().to_string(),
        }),
        used_bytes: Some(UInt64Value { value: usage.bytes }),
        inodes_used: Some(UInt64Value {
            value: usage.inodes,
        }),
    }
}

#[tonic::async_trait]
impl ImageService for Images {
    async fn list_images(
        &self,
        request: Request<ListImagesRequest>,
    ) -> Result<Response<ListImagesResponse>, Status> {
        let filter = request
            .into_inner()
            .filter
            .and_then(|f| f.image)
            .map(|s| s.image)
            .filter(|name| !name.trim().is_empty());
        let images = match filter {
            Some(name) => self
                .store
                .resolve(&name)
                .await?
                .iter()
                .map(to_cri)
                .collect(),
            None => self.store.list().await?.iter().map(to_cri).collect(),
        };
        Ok(Response::new(ListImagesResponse { images }))
    }

    async fn image_status(
        &self,
        request: Request<ImageStatusRequest>,
    ) -> Result<Response<ImageStatusResponse>, Status> {
        let request = request.into_inner();
        let name = image_name(request.image.as_ref())?;
        // CRI: an image that is not present is an empty answer, not an error.
        let Some(record) = self.store.resolve(name).await? else {
            return Ok(Response::new(ImageStatusResponse::default()));
        };
        let mut info = HashMap::new();
        if request.verbose {
            let details = serde_json::json!({
                "imageSpec": record.config,
                "chainIDs": record.layers.iter().map(|l| l.chain_id.to_string()).collect::<Vec<_>>(),
            });
            info.insert("info".to_string(), details.to_string());
        }
        Ok(Response::new(ImageStatusResponse {
            image: Some(to_cri(&record)),
            info,
        }))
    }

    async fn pull_image(
        &self,
        request: Request<PullImageRequest>,
    ) -> Result<Response<PullImageResponse>, Status> {
        let request = request.into_inner();
        let name = image_name(request.image.as_ref())?;
        let credentials = request
            .auth
            .map(|a| Credentials {
                username: a.username,
                password: a.password,
                auth: a.auth,
                identity_token: a.identity_token,
                registry_token: a.registry_token,
            })
            .unwrap_or_default();
        let record = self.store.pull(name, &credentials).await?;
        // As containerd: the image ID is the reference CreateContainer gets.
        Ok(Response::new(PullImageResponse {
            image_ref: record.id.to_string(),
        }))
    }

    async fn remove_image(
        &self,
        request: Request<RemoveImageRequest>,
    ) -> Result<Response<RemoveImageResponse>, Status> {
        let request = request.into_inner();
        let name = image_name(request.image.as_ref())?;
        self.store.remove(name).await?;
        Ok(Response::new(RemoveImageResponse {}))
    }

    async fn image_fs_info(
        &self,
        _request: Request<ImageFsInfoRequest>,
    ) -> Result<Response<ImageFsInfoResponse>, Status> {
        let (images, containers) = self.store.usage().await?;
        let root = self.store.root();
        Ok(Response::new(ImageFsInfoResponse {
            image_filesystems: vec![filesystem(root, images)],
            container_filesystems: vec![filesystem(root, containers)],
        }))
    }
}
