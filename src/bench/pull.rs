//! Scenario `pull`: a cold pull of one image, again and again. Each iteration
//! removes the image first (RemoveImage, so that the runtime drops its
//! content and layers too), then times PullImage; the image's size as the
//! endpoint reports it gives the throughput.

use super::client::Failure;
use super::target::Target;
use super::{Ctx, order};

pub async fn run(targets: &mut [Target], ctx: &Ctx) {
    for i in 0..ctx.iterations {
        for t in order(i, targets.len()) {
            let target = &mut targets[t];
            if !target.active() {
                continue;
            }
            if let Err(f) = cold_pull(target, &ctx.image).await {
                target.fail(f);
            }
        }
    }
}

async fn cold_pull(target: &mut Target, image: &str) -> Result<(), Failure> {
    // Timed only when there is something to remove (not before the first pull
    // of an image that was absent).
    if target.conn.image_status(image).await?.is_some() {
        let removed = target.conn.remove_image(image).await?;
        target.record("RemoveImage", removed);
    }
    if target.conn.image_status(image).await?.is_some() {
        return Err(Failure::other(
            "RemoveImage",
            format!("{image} is still there after RemoveImage; the pull would not be cold"),
        ));
    }
    let pulled = target.conn.pull(image).await?;
    let status = target.conn.image_status(image).await?;
    let Some(status) = status else {
        return Err(Failure::other(
            "ImageStatus",
            format!("{image} is missing right after PullImage"),
        ));
    };
    if target.image_size.is_some_and(|s| s != status.size) {
        target.notes.push(format!(
            "the reported image size changed between pulls ({} then {})",
            target.image_size.unwrap_or(0),
            status.size
        ));
    }
    target.image_size = Some(status.size);
    target.record("PullImage", pulled);
    Ok(())
}
