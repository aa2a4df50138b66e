//! GetContainerEvents delivers a pod's container lifecycle in order.

mod common;

use std::time::Duration;

use common::{LOOPBACK_REGISTRY_CONFIG, Options, TestDaemon, TestImages};
use k8s_cri::v1::*;

fn host_network_pod() -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: "events".into(),
            uid: "uid-events".into(),
            namespace: "test".into(),
            attempt: 0,
        }),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Node as i32,
                    pid: NamespaceMode::Container as i32,
                    ..NamespaceOption::default()
                }),
                ..LinuxSandboxSecurityContext::default()
            }),
            ..LinuxPodSandboxConfig::default()
        }),
        ..PodSandboxConfig::default()
    }
}

#[tokio::test]
async fn container_events_follow_the_lifecycle_of_a_pod() {
    let Some(rig) = TestImages::load() else {
        return;
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: containers need root");
        return;
    }
    let daemon = TestDaemon::start_with(Options {
        config_toml: LOOPBACK_REGISTRY_CONFIG.into(),
        ..Options::default()
    });
    let mut images = daemon.images().await;
    let image = rig.reference("busybox");
    images
        .pull_image(PullImageRequest {
            image: Some(ImageSpec {
                image: image.clone(),
                ..ImageSpec::default()
            }),
            ..PullImageRequest::default()
        })
        .await
        .expect("pull");
    let mut runtime = daemon.runtime().await;
    let mut events = runtime
        .get_container_events(GetEventsRequest {})
        .await
        .expect("GetContainerEvents")
        .into_inner();
    let pod = runtime
        .run_pod_sandbox(RunPodSandboxRequest {
            config: Some(host_network_pod()),
            runtime_handler: String::new(),
        })
        .await
        .expect("runp")
        .into_inner()
        .pod_sandbox_id;
    let id = runtime
        .create_container(CreateContainerRequest {
            pod_sandbox_id: pod.clone(),
            config: Some(ContainerConfig {
                metadata: Some(ContainerMetadata {
                    name: "c".into(),
                    attempt: 0,
                }),
                image: Some(ImageSpec {
                    image,
                    ..ImageSpec::default()
                }),
                command: vec!["sleep".into(), "1000".into()],
                ..ContainerConfig::default()
            }),
            sandbox_config: Some(host_network_pod()),
        })
        .await
        .expect("create")
        .into_inner()
        .container_id;
    runtime
        .start_container(StartContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect("start");
    runtime
        .stop_container(StopContainerRequest {
            container_id: id.clone(),
            timeout: 0,
        })
        .await
        .expect("stop");
    runtime
        .remove_container(RemoveContainerRequest {
            container_id: id.clone(),
        })
        .await
        .expect("remove");
    let mut seen = Vec::new();
    while seen.len() < 4 {
        let event = tokio::time::timeout(Duration::from_secs(10), events.message())
            .await
            .expect("an event within 10 s")
            .expect("stream open")
            .expect("an event");
        assert_eq!(event.container_id, id);
        assert_eq!(
            event.pod_sandbox_status.as_ref().map(|s| s.id.clone()),
            Some(pod.clone())
        );
        assert!(event.created_at > 0);
        seen.push(event.container_event_type);
    }
    assert_eq!(
        seen,
        vec![
            ContainerEventType::ContainerCreatedEvent as i32,
            ContainerEventType::ContainerStartedEvent as i32,
            ContainerEventType::ContainerStoppedEvent as i32,
            ContainerEventType::ContainerDeletedEvent as i32,
        ]
    );
    runtime
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: pod,
        })
        .await
        .expect("rmp");
}
