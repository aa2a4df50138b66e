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
    let rows = Rows::new("");
    let mut listed: Vec<Option<Counts>> = vec![None; targets.len()];
    for i in 0..ctx.iterations {
        for t in order(i, targets.len()) {
            let target = &mut targets[t];
            if !target.active() {
                continue;
            }
            match round(target, &rows).await {
                Ok(counts) => {
                    if listed[t].is_some_and(|seen| seen != counts) {
                        target.notes.push(format!(
                            "round {i}: {counts:?} (pods, containers), where the first round \
                             listed {:?}",
                            listed[t]
                        ));
                    }
                    listed[t].get_or_insert(counts);
                }
                Err(f) => target.fail(f),
            }
        }
    }
    for (target, counts) in targets.iter_mut().zip(listed) {
        match counts {
            Some((pods, Some(containers))) => target
                .notes
                .push(format!("listed {pods} pods and {containers} containers")),
            Some((pods, None)) => target.notes.push(format!(
                "listed {pods} pods; containers not listed (not implemented yet)"
            )),
            None => {}
        }
    }
}

/// The rows one relist is recorded in: `ListPodSandbox<label>`,
/// `ListContainers<label>`, and each again with `, decoded`.
pub struct Rows {
    pods: String,
    pods_decoded: String,
    containers: String,
    containers_decoded: String,
}

impl Rows {
    pub fn new(label: &str) -> Rows {
        Rows {
            pods: format!("ListPodSandbox{label}"),
            pods_decoded: format!("ListPodSandbox{label}, decoded"),
            containers: format!("ListContainers{label}"),
            containers_decoded: format!("ListContainers{label}, decoded"),
        }
    }
}

/// Pods listed, and containers unless the endpoint does not implement them.
pub type Counts = (usize, Option<usize>);

/// One relist, timed to each answer's last byte and again with its
/// decoding; what it listed. ListContainers is left out for an endpoint
/// whose containers are not implemented yet.
pub async fn round(target: &mut Target, rows: &Rows) -> Result<Counts, Failure> {
    let pods = target.conn.list_pods().await?;
    target.record(&rows.pods, pods.received);
    target.record(&rows.pods_decoded, pods.decoded);
    if !target.with_containers() {
        return Ok((pods.count, None));
    }
    let containers = target.conn.list_containers().await?;
    target.record(&rows.containers, containers.received);
    target.record(&rows.containers_decoded, containers.decoded);
    Ok((pods.count, Some(containers.count)))
}
