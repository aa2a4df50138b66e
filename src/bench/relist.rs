//! Scenario `relist`: kubelet's relist (ListPodSandbox and ListContainers
//! without a filter, as its PLEG asks every second) on the pods each
//! endpoint already holds, made by kubelet, crictl or anything else.
//! Nothing is made or removed, so the same populated pair of runtimes can be
//! measured again and again, across restarts of either (`density` makes its
//! N pods each time, which takes minutes at 1000 on containerd).

use super::client::Failure;
use super::target::Target;
use super::{Ctx, order};

pub async fn run(targets: &mut [Target], ctx: &Ctx) {
    let mut listed: Vec<Option<(usize, usize)>> = vec![None; targets.len()];
    for i in 0..ctx.iterations {
        for t in order(i, targets.len()) {
            let target = &mut targets[t];
            if !target.active() {
                continue;
            }
            match round(target).await {
                Ok(counts) => {
                    if listed[t].is_some_and(|seen| seen != counts) {
                        target.notes.push(format!(
                            "round {i}: {} pods and {} containers, where the first round listed {:?}",
                            counts.0, counts.1, listed[t]
                        ));
                    }
                    listed[t].get_or_insert(counts);
                }
                Err(f) => target.fail(f),
            }
        }
    }
    for (target, counts) in targets.iter_mut().zip(listed) {
        if let Some((pods, containers)) = counts {
            target
                .notes
                .push(format!("listed {pods} pods and {containers} containers"));
        }
    }
}

/// One relist, timed to each answer's last byte and with its decoding (as
/// `density` times it); the numbers of pods and containers listed.
async fn round(target: &mut Target) -> Result<(usize, usize), Failure> {
    let pods = target.conn.list_pods().await?;
    target.record("ListPodSandbox", pods.received);
    target.record("ListPodSandbox, decoded", pods.decoded);
    let containers = target.conn.list_containers().await?;
    target.record("ListContainers", containers.received);
    target.record("ListContainers, decoded", containers.decoded);
    Ok((pods.count, containers.count))
}
