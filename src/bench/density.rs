//! Scenario `density`: N pods with one sleeping (or, with `--chatty`,
//! logging) container each, made on the endpoints in turn. Reports the memory
//! each pod costs the runtime (the growth of daemon, per-container helpers
//! and pod infra processes, over N), the memory of one helper among N, and
//! the latency of kubelet's relist calls, ListPodSandbox and ListContainers,
//! at N pods (to the answer's last byte, and with the client's decoding of
//! it as a row of its own), and with `--relist-after` again once the
//! runtimes have had time to settle; then removes the pods, timing that too.

use std::time::Duration;

use super::client::Failure;
use super::target::{DensityMemory, Target};
use super::{Ctx, order, relist};

/// Time for helpers to settle (lazy page faults, shim start-up) before the
/// memory is read.
const SETTLE: Duration = Duration::from_secs(2);

pub async fn run(targets: &mut [Target], ctx: &Ctx) {
    let n = ctx.pods as usize;
    let mut pods: Vec<Vec<String>> = vec![Vec::new(); targets.len()];
    let before: Vec<_> = targets.iter().map(Target::snapshot).collect();

    for i in 0..ctx.pods {
        for t in order(i, targets.len()) {
            let target = &mut targets[t];
            if !target.active() {
                continue;
            }
            match add_pod(target, ctx).await {
                Ok(pod) => pods[t].push(pod),
                Err(f) => target.fail(f),
            }
        }
    }

    tokio::time::sleep(SETTLE).await;
    for (t, target) in targets.iter_mut().enumerate() {
        if pods[t].len() == n && target.active() {
            let after = target.snapshot_with_infra(&pods[t]).await;
            target.memory.density = Some(DensityMemory::new(n, before[t], after));
            if !target.with_containers() {
                target.notes.push(
                    "density: its pods have no container (not implemented yet): the per-pod \
                     overhead is of empty pods"
                        .to_string(),
                );
            }
        }
    }

    relist(targets, ctx, "").await;
    if let Some(after) = ctx.relist_after {
        tokio::time::sleep(after).await;
        relist(targets, ctx, &format!(", after {}s", after.as_secs())).await;
    }

    // Tear down in the same interleaved order; an endpoint that failed is
    // left to the final clean-up.
    for i in 0..ctx.pods {
        for t in order(i, targets.len()) {
            let target = &mut targets[t];
            let Some(pod) = pods[t].get(i as usize).cloned() else {
                continue;
            };
            if !target.active() {
                continue;
            }
            // Stopping a pod stops its container: an empty pod's numbers get
            // their own rows.
            let (stop_op, remove_op) = if target.with_containers() {
                ("StopPodSandbox (teardown)", "RemovePodSandbox (teardown)")
            } else {
                (
                    "StopPodSandbox (teardown, empty pods)",
                    "RemovePodSandbox (teardown, empty pods)",
                )
            };
            let removed = async {
                let stop = target.conn.stop_pod(&pod).await?;
                let remove = target.conn.remove_pod(&pod).await?;
                target.record(stop_op, stop);
                target.record(remove_op, remove);
                Ok::<_, Failure>(())
            };
            if let Err(f) = removed.await {
                target.fail(f);
            }
        }
    }
}

/// Times `ctx.iterations` rounds of kubelet's relist calls at N pods; the
/// rows' names end in `suffix`.
async fn relist(targets: &mut [Target], ctx: &Ctx, suffix: &str) {
    let n = ctx.pods as usize;
    let rows = relist::Rows::new(&format!(" @{n} pods{suffix}"));
    for i in 0..ctx.iterations {
        for t in order(i, targets.len()) {
            let target = &mut targets[t];
            if !target.active() {
                continue;
            }
            match relist::round(target, &rows).await {
                Ok((pods, containers)) => {
                    check_count(target, "ListPodSandbox", pods, n, i);
                    if let Some(containers) = containers {
                        check_count(target, "ListContainers", containers, n, i);
                    }
                }
                Err(f) => target.fail(f),
            }
        }
    }
}

async fn add_pod(target: &mut Target, ctx: &Ctx) -> Result<String, Failure> {
    let seq = target.next_seq();
    let mut pod_config = ctx.naming.pod_config(target.index, seq);
    let container = if ctx.chatty {
        let name = ctx.naming.pod_name(target.index, seq);
        pod_config.log_directory = ctx
            .pod_log_dir(target.index, &name)
            .to_string_lossy()
            .into_owned();
        ctx.naming.chatty(&ctx.image)
    } else {
        ctx.naming.sleeper(&ctx.image)
    };
    let (pod, run) = target.conn.run_pod(&pod_config).await?;
    target.record("RunPodSandbox (filling)", run);
    // An endpoint without containers yet fills with empty pods (noted).
    if target.with_containers() {
        let (ctr, create) = target
            .conn
            .create_container(&pod, &container, &pod_config)
            .await?;
        let start = target.conn.start_container(&ctr).await?;
        target.record("CreateContainer (filling)", create);
        target.record("StartContainer (filling)", start);
    }
    Ok(pod)
}

/// Other pods on the endpoint make the lists longer than N: noted once.
fn check_count(target: &mut Target, op: &str, count: usize, n: usize, iteration: u32) {
    if iteration == 0 && count != n {
        target.notes.push(format!(
            "{op} returned {count} items, not {n}: the runtime has other pods"
        ));
    }
}
