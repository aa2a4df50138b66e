//! Scenario `lifecycle`: one pod at a time, every step of its life timed:
//! RunPodSandbox, CreateContainer, StartContainer, ExecSync `true`,
//! StopContainer, RemoveContainer, StopPodSandbox, RemovePodSandbox.
//!
//! An endpoint that answers Unimplemented to CreateContainer, StartContainer
//! or ExecSync goes on without that step (and the steps that need it), so
//! that a runtime with pods but no containers yet still gets its pod
//! numbers; the report lists what was skipped.

use std::time::Duration;

use k8s_cri::v1::PodSandboxConfig;

use super::client::Failure;
use super::pods::STOP_TIMEOUT_S;
use super::target::Target;
use super::{Ctx, order};

/// Derived operations: the sums kubelet waits for.
pub const POD_START: &str = "pod start (run+create+start)";
pub const CONTAINER_CYCLE: &str = "container create+start+stop+remove";

pub async fn run(targets: &mut [Target], ctx: &Ctx) {
    for i in 0..ctx.iterations {
        for t in order(i, targets.len()) {
            let target = &mut targets[t];
            if !target.active() {
                continue;
            }
            if let Err(f) = cycle(target, ctx, true, i == 0).await {
                target.fail(f);
            }
        }
    }
}

/// Create, start, stop and remove times of one container.
struct ContainerTimes {
    create: Duration,
    start: Duration,
    stop: Duration,
    remove: Duration,
}

/// One pod's life; `record` false for warm-up. With `sample`, the memory of
/// the endpoint's processes is taken while the pod (and its container) runs.
pub async fn cycle(
    target: &mut Target,
    ctx: &Ctx,
    record: bool,
    sample: bool,
) -> Result<(), Failure> {
    let seq = target.next_seq();
    let pod_config = ctx.naming.pod_config(target.index, seq);
    let (pod, run) = target.conn.run_pod(&pod_config).await?;
    target.keep(record, "RunPodSandbox", run);
    let container = if target.with_containers() {
        container_steps(target, ctx, &pod, &pod_config, record, sample).await?
    } else {
        None
    };
    if sample && container.is_none() {
        let snapshot = target.snapshot_with_infra(std::slice::from_ref(&pod)).await;
        target.memory.one_pod = Some(snapshot);
    }
    let stop_pod = target.conn.stop_pod(&pod).await?;
    target.keep(record, "StopPodSandbox", stop_pod);
    let remove_pod = target.conn.remove_pod(&pod).await?;
    target.keep(record, "RemovePodSandbox", remove_pod);
    if let Some(c) = container {
        target.keep(record, POD_START, run + c.create + c.start);
        target.keep(
            record,
            CONTAINER_CYCLE,
            c.create + c.start + c.stop + c.remove,
        );
    }
    Ok(())
}

/// The container's part of the cycle; `None` if the endpoint does not
/// implement containers yet (remembered, and the container removed).
async fn container_steps(
    target: &mut Target,
    ctx: &Ctx,
    pod: &str,
    pod_config: &PodSandboxConfig,
    record: bool,
    sample: bool,
) -> Result<Option<ContainerTimes>, Failure> {
    let created = target
        .conn
        .create_container(pod, &ctx.naming.sleeper(&ctx.image), pod_config)
        .await;
    let (ctr, create) = match created {
        Ok(v) => v,
        Err(f) if f.is_unimplemented() => {
            target.skip(f);
            return Ok(None);
        }
        Err(f) => return Err(f),
    };
    target.keep(record, "CreateContainer", create);
    let start = match target.conn.start_container(&ctr).await {
        Ok(d) => d,
        Err(f) if f.is_unimplemented() => {
            target.skip(f);
            target.conn.remove_container(&ctr).await?;
            return Ok(None);
        }
        Err(f) => return Err(f),
    };
    target.keep(record, "StartContainer", start);
    if target.implements("ExecSync") {
        match target.conn.exec_sync(&ctr, &["true"]).await {
            Ok(d) => target.keep(record, "ExecSync", d),
            Err(f) if f.is_unimplemented() => target.skip(f),
            Err(f) => return Err(f),
        }
    }
    // After ExecSync: by then the container has certainly exec'd its
    // command, so a runtime whose StartContainer returns before that does
    // not have the container's not-yet-exec'd init counted as a helper.
    if sample {
        let snapshot = target.snapshot_with_infra(&[pod.to_string()]).await;
        target.memory.one_pod = Some(snapshot);
    }
    let stop = target.conn.stop_container(&ctr, STOP_TIMEOUT_S).await?;
    target.keep(record, "StopContainer", stop);
    let remove = target.conn.remove_container(&ctr).await?;
    target.keep(record, "RemoveContainer", remove);
    Ok(Some(ContainerTimes {
        create,
        start,
        stop,
        remove,
    }))
}
