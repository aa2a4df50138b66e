//! Scenario `exec`: one running container per endpoint, then ExecSync
//! `true` again and again: what every exec probe of kubelet costs. The pod
//! and container are made and removed untimed.

use super::pods::STOP_TIMEOUT_S;
use super::target::Target;
use super::{Ctx, order};

pub async fn run(targets: &mut [Target], ctx: &Ctx) {
    let mut containers: Vec<Option<(String, String)>> = Vec::new();
    for target in targets.iter_mut() {
        let made = async {
            let seq = target.next_seq();
            let pod_config = ctx.naming.pod_config(target.index, seq);
            let (pod, _) = target.conn.run_pod(&pod_config).await?;
            let (ctr, _) = target
                .conn
                .create_container(&pod, &ctx.naming.sleeper(&ctx.image), &pod_config)
                .await?;
            target.conn.start_container(&ctr).await?;
            Ok((pod, ctr))
        }
        .await;
        match made {
            Ok(ids) => containers.push(Some(ids)),
            Err(f) => {
                target.fail(f);
                containers.push(None);
            }
        }
    }
    for i in 0..ctx.iterations {
        for t in order(i, targets.len()) {
            let target = &mut targets[t];
            let Some((_, ctr)) = &containers[t] else {
                continue;
            };
            if !target.active() {
                continue;
            }
            match target.conn.exec_sync(ctr, &["true"]).await {
                Ok(d) => target.keep(true, "ExecSync", d),
                Err(f) => target.fail(f),
            }
        }
    }
    for (target, ids) in targets.iter_mut().zip(containers) {
        let Some((pod, ctr)) = ids else { continue };
        let _ = target.conn.stop_container(&ctr, STOP_TIMEOUT_S).await;
        let _ = target.conn.remove_container(&ctr).await;
        let _ = target.conn.stop_pod(&pod).await;
        let _ = target.conn.remove_pod(&pod).await;
    }
}
