//! The pods and containers the bench asks for: the same configuration on
//! every endpoint, with names and UIDs unique to the run, and a label that
//! finds them all again for the clean-up.

use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ImageSpec, LinuxContainerConfig,
    LinuxContainerSecurityContext, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
};

/// The label on every pod and container of a run; its value is the run ID.
pub const RUN_LABEL: &str = "bench.berth.io/run";
/// The Kubernetes namespace the bench's pods claim to be in.
pub const NAMESPACE: &str = "berth-bench";
/// StopContainer's timeout: 0 is "kill now" in the CRI, which is what a
/// `sleep` that ignores SIGTERM as PID 1 gets after any grace period anyway.
pub const STOP_TIMEOUT_S: i64 = 0;

/// Namespaces as kubelet asks for an ordinary pod: network and IPC shared
/// by the pod, a PID namespace per container (no shareProcessNamespace).
fn kubelet_namespaces() -> Option<NamespaceOption> {
    Some(NamespaceOption {
        network: NamespaceMode::Pod as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    })
}

/// Names for one run: `<scenario>-<run>-<endpoint>-<seq>`.
#[derive(Debug, Clone)]
pub struct Naming {
    pub scenario: &'static str,
    pub run_id: String,
}

impl Naming {
    /// A pod's name, also its hostname: at most 63 characters of
    /// `[a-z0-9-]`.
    pub fn pod_name(&self, endpoint: usize, seq: u64) -> String {
        let name = format!("bench-{}-{}-{endpoint}-{seq}", self.scenario, self.run_id);
        name.chars().take(63).collect()
    }

    pub fn pod_config(&self, endpoint: usize, seq: u64) -> PodSandboxConfig {
        let name = self.pod_name(endpoint, seq);
        PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.clone(),
                uid: format!("{}-{endpoint}-{seq}", self.run_id),
                namespace: NAMESPACE.to_string(),
                attempt: 0,
            }),
            hostname: name,
            labels: [(RUN_LABEL.to_string(), self.run_id.clone())].into(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: kubelet_namespaces(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// A container that sleeps until it is stopped (`sleep` and `true` must
    /// be in the image, as in busybox).
    pub fn sleeper(&self, image: &str) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "sleep".to_string(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: image.to_string(),
                ..Default::default()
            }),
            command: vec!["sleep".to_string(), "3600".to_string()],
            labels: [(RUN_LABEL.to_string(), self.run_id.clone())].into(),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: kubelet_namespaces(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }
    }
}

/// What a chatty container runs: every 100 ms a line of about 110 bytes on
/// stdout, and every second one on stderr plus a burst of 600 such lines
/// (66 KB, more than a pipe holds) on stdout. So a helper that streams the
/// log meets both a trickle and full reads, the steady state a pod that logs
/// puts it in.
pub const CHATTY_SCRIPT: &str = "\
l='chatty: the quick brown fox jumps over the lazy dog 0123456789 the quick brown fox jumps over the lazy dog'
i=0
while :; do
  echo \"$i $l\"
  if [ $((i % 10)) = 0 ]; then
    echo \"$i $l\" >&2
    yes \"$i $l\" | head -n 600
  fi
  i=$((i + 1))
  sleep 0.1
done";

impl Naming {
    /// A container that writes logs until it is stopped (`sh`, `sleep`,
    /// `yes` and `head` must be in the image, as in busybox), to
    /// `chatty.log` in its pod's log directory.
    pub fn chatty(&self, image: &str) -> ContainerConfig {
        ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: "chatty".to_string(),
                attempt: 0,
            }),
            command: vec![
                "sh".to_string(),
                "-c".to_string(),
                CHATTY_SCRIPT.to_string(),
            ],
            log_path: "chatty.log".to_string(),
            ..self.sleeper(image)
        }
    }
}

/// A run ID: short, lowercase, different for every run on a machine.
pub fn run_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mixed = (nanos as u64) ^ (u64::from(std::process::id()) << 40);
    format!("{:08x}", (mixed ^ (mixed >> 29)) as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naming() -> Naming {
        Naming {
            scenario: "lifecycle",
            run_id: "0a1b2c3d".to_string(),
        }
    }

    #[test]
    fn pods_of_a_run_are_unique_and_labelled() {
        let n = naming();
        let a = n.pod_config(0, 1);
        let b = n.pod_config(1, 1);
        let c = n.pod_config(0, 2);
        let uid = |p: &PodSandboxConfig| p.metadata.as_ref().expect("metadata").uid.clone();
        let name = |p: &PodSandboxConfig| p.metadata.as_ref().expect("metadata").name.clone();
        assert_ne!(uid(&a), uid(&b));
        assert_ne!(uid(&a), uid(&c));
        assert_ne!(name(&a), name(&b));
        assert_eq!(name(&a), "bench-lifecycle-0a1b2c3d-0-1");
        assert_eq!(a.hostname, name(&a));
        assert_eq!(a.labels[RUN_LABEL], "0a1b2c3d");
        assert_eq!(n.sleeper("img").labels[RUN_LABEL], "0a1b2c3d");
        let chatty = n.chatty("img");
        assert_eq!(chatty.labels[RUN_LABEL], "0a1b2c3d");
        assert_eq!(chatty.command[..2], ["sh", "-c"]);
        assert_eq!(chatty.log_path, "chatty.log");
        let pid_mode = a
            .linux
            .and_then(|l| l.security_context)
            .and_then(|s| s.namespace_options)
            .map(|n| n.pid);
        assert_eq!(pid_mode, Some(NamespaceMode::Container as i32));
    }

    #[test]
    fn pod_names_fit_a_hostname() {
        let n = naming();
        let name = n.pod_name(1, u64::MAX);
        assert!(name.len() <= 63, "{name}");
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        );
    }

    #[test]
    fn run_ids_are_short_hex() {
        let id = run_id();
        assert_eq!(id.len(), 8);
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
