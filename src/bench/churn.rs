//! Scenario `churn`: K clients, each on its own connection, at once create a
//! pod with a sleeping container and delete it again; a round is one pod per
//! client, and rounds alternate between the endpoints. Pod start is
//! RunPodSandbox + CreateContainer + StartContainer as one client sees it
//! under that contention.

use std::time::{Duration, Instant};

use futures_util::future::join_all;

use super::client::{Conn, Failure, connect};
use super::pods::Naming;
use super::target::Target;
use super::{Ctx, order};

pub const POD_START: &str = "pod start (run+create+start)";
pub const POD_DELETE: &str = "pod delete (stop+remove)";
/// Where the endpoint has no containers yet: not comparable with POD_DELETE.
pub const EMPTY_POD_DELETE: &str = "pod delete, no container (stop+remove)";

struct Timings {
    run: Duration,
    /// run + create + start, with a container.
    start: Option<Duration>,
    delete: Duration,
}

pub async fn run(targets: &mut [Target], ctx: &Ctx) {
    let k = ctx.clients.max(1) as usize;
    // One connection per client, as separate kubelets or controllers would have.
    let mut clients: Vec<Vec<Conn>> = Vec::new();
    for target in targets.iter_mut() {
        let mut conns = Vec::new();
        if target.active() {
            for _ in 0..k {
                match connect(&target.socket).await {
                    Ok(channel) => conns.push(target.conn.with_channel(channel)),
                    Err(e) => {
                        target.fail(Failure::other("connect", e.to_string()));
                        break;
                    }
                }
            }
        }
        clients.push(conns);
    }

    let round_op = format!("round of {k} concurrent pods (wall)");
    let empty_round_op = format!("round of {k} concurrent empty pods (wall)");
    for round in 0..ctx.iterations {
        for t in order(round, targets.len()) {
            let target = &mut targets[t];
            if !target.active() {
                continue;
            }
            let seqs: Vec<u64> = (0..k).map(|_| target.next_seq()).collect();
            let with_containers = target.with_containers();
            let cycles = clients[t].iter().zip(seqs).map(|(conn, seq)| {
                let mut conn = conn.clone();
                let naming = ctx.naming.clone();
                let image = with_containers.then(|| ctx.image.clone());
                let index = target.index;
                async move { pod_cycle(&mut conn, &naming, index, seq, image.as_deref()).await }
            });
            let began = Instant::now();
            let results = join_all(cycles).await;
            let wall = began.elapsed();
            let mut failed = None;
            for result in results {
                match result {
                    Ok(t) => {
                        target.record("RunPodSandbox", t.run);
                        match t.start {
                            Some(start) => {
                                target.record(POD_START, start);
                                target.record(POD_DELETE, t.delete);
                            }
                            None => target.record(EMPTY_POD_DELETE, t.delete),
                        }
                    }
                    Err(f) => failed = failed.or(Some(f)),
                }
            }
            match failed {
                None if with_containers => target.record(&round_op, wall),
                None => target.record(&empty_round_op, wall),
                Some(f) => target.fail(f),
            }
        }
    }
}

/// One pod's life; with an image, a container from it runs in the pod.
async fn pod_cycle(
    conn: &mut Conn,
    naming: &Naming,
    index: usize,
    seq: u64,
    image: Option<&str>,
) -> Result<Timings, Failure> {
    let pod_config = naming.pod_config(index, seq);
    let (pod, run) = conn.run_pod(&pod_config).await?;
    let mut start = None;
    if let Some(image) = image {
        let (ctr, create) = conn
            .create_container(&pod, &naming.sleeper(image), &pod_config)
            .await?;
        start = Some(run + create + conn.start_container(&ctr).await?);
    }
    let stop = conn.stop_pod(&pod).await?;
    let remove = conn.remove_pod(&pod).await?;
    Ok(Timings {
        run,
        start,
        delete: stop + remove,
    })
}
