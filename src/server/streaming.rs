//! `Exec`, `Attach` and `PortForward`: validate as kubelet's streaming
//! server does, check the container or pod, and answer with a single-use URL
//! on the streaming server.

use k8s_cri::v1::{
    AttachRequest, AttachResponse, ExecRequest, ExecResponse, PortForwardRequest,
    PortForwardResponse,
};
use tonic::Status;

use super::error::invalid;
use crate::daemon::Daemon;
use crate::sandbox::PodState;
use crate::streaming::{Pending, Stdio};

/// Ports one port-forward URL may name (two WebSocket channels each).
const MAX_PORTS: usize = 64;

fn stdio(stdin: bool, stdout: bool, stderr: bool, tty: bool) -> Result<Stdio, Status> {
    if tty && stderr {
        return Err(invalid(
            "stderr",
            "tty and stderr cannot both be true (a terminal has one output)",
        ));
    }
    if !stdin && !stdout && !stderr {
        return Err(invalid(
            "stdin",
            "one of stdin, stdout, or stderr must be set",
        ));
    }
    Ok(Stdio {
        stdin,
        stdout,
        stderr,
        tty,
    })
}

fn container_id(id: &str) -> Result<(), Status> {
    if id.is_empty() {
        return Err(invalid("container_id", "missing required container_id"));
    }
    Ok(())
}

pub async fn exec(daemon: &Daemon, request: ExecRequest) -> Result<ExecResponse, Status> {
    container_id(&request.container_id)?;
    if request.cmd.is_empty() {
        return Err(invalid("cmd", "a command is required"));
    }
    let stdio = stdio(request.stdin, request.stdout, request.stderr, request.tty)?;
    let container = daemon
        .containers
        .running(&request.container_id, "exec")
        .await?;
    let url = daemon.streaming.url_for(Pending::Exec {
        container_id: container.id,
        cmd: request.cmd,
        stdio,
    })?;
    Ok(ExecResponse { url })
}

pub async fn attach(daemon: &Daemon, request: AttachRequest) -> Result<AttachResponse, Status> {
    container_id(&request.container_id)?;
    let stdio = stdio(request.stdin, request.stdout, request.stderr, request.tty)?;
    let container = daemon
        .containers
        .running(&request.container_id, "attach")
        .await?;
    let url = daemon.streaming.url_for(Pending::Attach {
        container_id: container.id,
        stdio,
    })?;
    Ok(AttachResponse { url })
}

pub async fn port_forward(
    daemon: &Daemon,
    request: PortForwardRequest,
) -> Result<PortForwardResponse, Status> {
    if request.pod_sandbox_id.is_empty() {
        return Err(invalid("pod_sandbox_id", "missing required pod_sandbox_id"));
    }
    if request.port.len() > MAX_PORTS {
        return Err(invalid(
            "port",
            format!("{} ports; at most {MAX_PORTS}", request.port.len()),
        ));
    }
    let ports = request
        .port
        .iter()
        .map(|&p| {
            u16::try_from(p)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| invalid("port", format!("{p} is not a port (1 to 65535)")))
        })
        .collect::<Result<Vec<u16>, Status>>()?;
    let pod = daemon.sandboxes.get(&request.pod_sandbox_id).await?;
    if pod.state != PodState::Ready {
        return Err(Status::failed_precondition(format!(
            "pod sandbox {} is not ready",
            pod.id
        )));
    }
    let url = daemon.streaming.url_for(Pending::PortForward {
        pod_id: pod.id,
        ports,
    })?;
    Ok(PortForwardResponse { url })
}
