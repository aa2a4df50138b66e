//! ImageService against the test rig's real registry: pulls by tag and
//! digest, manifest lists, zstd, whiteouts, users, mirrors, single-flight,
//! removal and filesystem usage.

mod common;

use std::path::PathBuf;

use common::{CountingProxy, LOOPBACK_REGISTRY_CONFIG, Options, TestDaemon, TestImages};
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::*;
use tonic::transport::Channel;

fn spec(name: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: name.to_string(),
        ..ImageSpec::default()
    })
}

async fn pull(
    client: &mut ImageServiceClient<Channel>,
    name: &str,
) -> Result<String, tonic::Status> {
    client
        .pull_image(PullImageRequest {
            image: spec(name),
            ..PullImageRequest::default()
        })
        .await
        .map(|r| r.into_inner().image_ref)
}

async fn status(client: &mut ImageServiceClient<Channel>, name: &str) -> Option<Image> {
    client
        .image_status(ImageStatusRequest {
            image: spec(name),
            verbose: false,
        })
        .await
        .expect("ImageStatus")
        .into_inner()
        .image
}

async fn remove(client: &mut ImageServiceClient<Channel>, name: &str) -> Result<(), tonic::Status> {
    client
        .remove_image(RemoveImageRequest { image: spec(name) })
        .await
        .map(|_| ())
}

async fn image_fs_bytes(client: &mut ImageServiceClient<Channel>) -> u64 {
    let info = client
        .image_fs_info(ImageFsInfoRequest {})
        .await
        .expect("ImageFsInfo")
        .into_inner();
    info.image_filesystems[0]
        .used_bytes
        .expect("used bytes")
        .value
}

fn loopback_daemon() -> TestDaemon {
    TestDaemon::start_with(Options {
        config_toml: LOOPBACK_REGISTRY_CONFIG.into(),
        ..Options::default()
    })
}

/// Unmounts on drop, also when an assertion fails.
struct Mount(PathBuf);

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.0, nix::mount::MntFlags::MNT_DETACH);
    }
}

fn layer_dir(daemon: &TestDaemon, chain_id: &str) -> PathBuf {
    daemon
        .root
        .join("layers")
        .join(chain_id.trim_start_matches("sha256:"))
}

async fn chain_ids(client: &mut ImageServiceClient<Channel>, name: &str) -> Vec<String> {
    let response = client
        .image_status(ImageStatusRequest {
            image: spec(name),
            verbose: true,
        })
        .await
        .expect("ImageStatus")
        .into_inner();
    let info: serde_json::Value =
        serde_json::from_str(response.info.get("info").expect("verbose info")).expect("JSON");
    info["chainIDs"]
        .as_array()
        .expect("chainIDs")
        .iter()
        .map(|v| v.as_str().expect("string").to_string())
        .collect()
}

#[tokio::test]
async fn pull_by_tag_records_tag_repo_digest_user_and_size() {
    let Some(rig) = TestImages::load() else {
        return;
    };
    let daemon = loopback_daemon();
    let mut client = daemon.images().await;
    let reference = rig.reference("busybox");
    let image_ref = pull(&mut client, &reference).await.expect("pull");
    assert_eq!(
        image_ref,
        rig.str("busybox", "image_id"),
        "PullImage answers the image ID"
    );

    let image = status(&mut client, &reference)
        .await
        .expect("image present");
    assert_eq!(image.id, rig.str("busybox", "image_id"));
    assert_eq!(image.repo_tags, vec![reference.clone()]);
    assert_eq!(image.repo_digests, vec![rig.str("busybox", "repo_digest")]);
    let expected_size = rig.u64("busybox", "manifest_size")
        + rig.u64("busybox", "config_size")
        + rig.u64("busybox", "layers_size");
    assert_eq!(image.size, expected_size);
    assert_eq!(image.uid.map(|u| u.value), None);

    let listed = client
        .list_images(ListImagesRequest::default())
        .await
        .expect("ListImages")
        .into_inner()
        .images;
    assert_eq!(listed.len(), 1);
    // By ID, by truncated ID and by repo digest, as crictl names images.
    for name in [
        image.id.clone(),
        image.id["sha256:".len()..][..12].to_string(),
        rig.str("busybox", "repo_digest"),
    ] {
        assert_eq!(
            status(&mut client, &name).await.map(|i| i.id),
            Some(image.id.clone()),
            "{name}"
        );
    }
    assert!(
        status(&mut client, "docker.io/library/not-pulled:1")
            .await
            .is_none(),
        "absent is empty, not an error"
    );
}

#[tokio::test]
async fn pull_by_digest_and_docker_schema2_image() {
    let Some(rig) = TestImages::load() else {
        return;
    };
    let daemon = loopback_daemon();
    let mut client = daemon.images().await;
    let by_digest = rig.str("busybox", "repo_digest");
    assert_eq!(
        pull(&mut client, &by_digest).await.expect("pull by digest"),
        rig.str("busybox", "image_id")
    );
    let image = status(&mut client, &by_digest).await.expect("present");
    assert!(
        image.repo_tags.is_empty(),
        "a digest pull adds no tag: {:?}",
        image.repo_tags
    );
    assert_eq!(image.repo_digests, vec![by_digest]);

    let docker = rig.reference("busybox-docker");
    assert_eq!(
        pull(&mut client, &docker).await.expect("docker pull"),
        rig.str("busybox-docker", "image_id")
    );
}

#[tokio::test]
async fn manifest_list_resolves_to_this_node_platform() {
    let Some(rig) = TestImages::load() else {
        return;
    };
    let daemon = loopback_daemon();
    let mut client = daemon.images().await;
    let reference = rig.reference("multiarch");
    let id = pull(&mut client, &reference).await.expect("pull index");
    assert_eq!(
        id,
        rig.str("multiarch", "image_id"),
        "the amd64 image's config"
    );
    let image = status(&mut client, &reference).await.expect("present");
    assert_eq!(
        image.repo_digests,
        vec![rig.str("multiarch", "repo_digest")],
        "the repo digest is the index's"
    );
    let chains = chain_ids(&mut client, &reference).await;
    let top = layer_dir(&daemon, chains.last().expect("layers"));
    assert_eq!(
        std::fs::read_to_string(top.join("arch")).expect("/arch"),
        "amd64\n"
    );
}

#[tokio::test]
async fn zstd_layer_is_unpacked() {
    let Some(rig) = TestImages::load() else {
        return;
    };
    let daemon = loopback_daemon();
    let mut client = daemon.images().await;
    let reference = rig.reference("zstd");
    pull(&mut client, &reference).await.expect("pull zstd");
    let chains = chain_ids(&mut client, &reference).await;
    assert!(layer_dir(&daemon, &chains[0]).join("zstd-marker").exists());
    assert!(layer_dir(&daemon, &chains[0]).join("bin/busybox").exists());
}

#[tokio::test]
async fn whiteouts_and_opaque_dirs_give_the_expected_merged_view() {
    let Some(rig) = TestImages::load() else {
        return;
    };
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipping: mounting overlayfs needs root");
        return;
    }
    let daemon = loopback_daemon();
    let mut client = daemon.images().await;
    let reference = rig.reference("layers");
    pull(&mut client, &reference).await.expect("pull layers");
    let chains = chain_ids(&mut client, &reference).await;
    assert!(chains.len() >= 3);
    // overlay's lowerdir lists the top layer first.
    let lower: Vec<String> = chains
        .iter()
        .rev()
        .map(|c| layer_dir(&daemon, c).display().to_string())
        .collect();
    let merged = daemon.dir.path().join("merged");
    std::fs::create_dir(&merged).expect("mkdir merged");
    nix::mount::mount(
        Some("overlay"),
        &merged,
        Some("overlay"),
        nix::mount::MsFlags::MS_RDONLY,
        Some(format!("lowerdir={}", lower.join(":")).as_str()),
    )
    .expect("mount overlay");
    let _mount = Mount(merged.clone());
    let expected = &rig.image("layers")["expected"];
    let inside = |p: &str| merged.join(p.trim_start_matches('/'));
    for path in expected["exist"].as_array().expect("exist") {
        let path = path.as_str().expect("path");
        assert!(
            inside(path).symlink_metadata().is_ok(),
            "{path} should exist"
        );
    }
    for path in expected["absent"].as_array().expect("absent") {
        let path = path.as_str().expect("path");
        assert!(
            inside(path).symlink_metadata().is_err(),
            "{path} should be hidden"
        );
    }
    for (dir, entries) in expected["dirs"].as_object().expect("dirs") {
        let mut listed: Vec<String> = std::fs::read_dir(inside(dir))
            .expect("read dir")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        listed.sort();
        let mut wanted: Vec<String> = entries
            .as_array()
            .expect("entries")
            .iter()
            .map(|e| e.as_str().expect("name").to_string())
            .collect();
        wanted.sort();
        assert_eq!(listed, wanted, "contents of {dir}");
    }
    for (path, content) in expected["files"].as_object().expect("files") {
        assert_eq!(
            std::fs::read_to_string(inside(path)).expect("read file"),
            content.as_str().expect("content"),
            "{path}"
        );
    }
}

#[tokio::test]
async fn non_root_image_reports_its_user() {
    let Some(rig) = TestImages::load() else {
        return;
    };
    let daemon = loopback_daemon();
    let mut client = daemon.images().await;
    let by_name = rig.reference("nonroot");
    pull(&mut client, &by_name).await.expect("pull nonroot");
    let image = status(&mut client, &by_name).await.expect("present");
    assert_eq!(image.username, "berth");
    assert_eq!(image.uid, None);
    let by_uid = rig.reference("nonroot-uid");
    pull(&mut client, &by_uid).await.expect("pull nonroot:uid");
    let image = status(&mut client, &by_uid).await.expect("present");
    assert_eq!(image.uid.map(|u| u.value), Some(1000));
    assert_eq!(image.username, "");
}

#[tokio::test]
async fn mirror_serves_an_unreachable_registry_and_the_name_is_kept() {
    let Some(rig) = TestImages::load() else {
        return;
    };
    // The first mirror refuses connections; the second is the rig; the
    // upstream name does not resolve at all.
    let config = format!(
        "{LOOPBACK_REGISTRY_CONFIG}\n[[registry]]\nprefix = \"unreachable.invalid\"\n\
         [[registry.mirror]]\nlocation = \"127.0.0.1:1/berth-test\"\ninsecure = true\n\
         [[registry.mirror]]\nlocation = \"{}/berth-test\"\ninsecure = true\n",
        rig.registry
    );
    let daemon = TestDaemon::start_with(Options {
        config_toml: config,
        ..Options::default()
    });
    let mut client = daemon.images().await;
    let name = "unreachable.invalid/busybox:latest";
    assert_eq!(
        pull(&mut client, name).await.expect("pull via mirror"),
        rig.str("busybox", "image_id")
    );
    let image = status(&mut client, name)
        .await
        .expect("present under its own name");
    assert_eq!(image.repo_tags, vec![name.to_string()]);
    let digest = rig.str("busybox", "manifest_digest");
    assert_eq!(
        image.repo_digests,
        vec![format!("unreachable.invalid/busybox@{digest}")]
    );
}

#[tokio::test]
async fn concurrent_pulls_of_one_image_fetch_each_blob_once() {
    let Some(rig) = TestImages::load() else {
        return;
    };
    let proxy = CountingProxy::start(&rig.registry).await;
    let daemon = loopback_daemon();
    let reference = rig
        .reference("layers")
        .replacen(&rig.registry, &proxy.address, 1);
    let mut pulls = Vec::new();
    for _ in 0..4 {
        let mut client = daemon.images().await;
        let reference = reference.clone();
        pulls.push(tokio::spawn(
            async move { pull(&mut client, &reference).await },
        ));
    }
    for p in pulls {
        p.await.expect("join").expect("pull");
    }
    for layer in rig.image("layers")["layers"].as_array().expect("layers") {
        let digest = layer["digest"].as_str().expect("digest");
        assert_eq!(
            proxy.count(&format!("/blobs/{digest}")),
            1,
            "layer {digest} fetched once"
        );
    }
}

#[tokio::test]
async fn remove_image_by_tag_keeps_other_tags_and_is_idempotent() {
    let Some(rig) = TestImages::load() else {
        return;
    };
    let config = format!(
        "{LOOPBACK_REGISTRY_CONFIG}\n[[registry]]\nprefix = \"mirror.invalid\"\nblocked = true\n\
         [[registry.mirror]]\nlocation = \"{}/berth-test\"\ninsecure = true\n",
        rig.registry
    );
    let daemon = TestDaemon::start_with(Options {
        config_toml: config,
        ..Options::default()
    });
    let mut client = daemon.images().await;
    let direct = rig.reference("busybox");
    let aliased = "mirror.invalid/busybox:latest";
    let before = image_fs_bytes(&mut client).await;
    let id = pull(&mut client, &direct).await.expect("pull");
    assert_eq!(pull(&mut client, aliased).await.expect("pull alias"), id);
    let after_pull = image_fs_bytes(&mut client).await;
    assert!(
        after_pull > before,
        "ImageFsInfo grows with a pull: {before} -> {after_pull}"
    );
    let image = status(&mut client, &id).await.expect("present");
    assert_eq!(image.repo_tags.len(), 2, "{:?}", image.repo_tags);

    remove(&mut client, aliased).await.expect("remove one tag");
    let image = status(&mut client, &id).await.expect("still present");
    assert_eq!(image.repo_tags, vec![direct.clone()]);
    assert!(status(&mut client, aliased).await.is_none());

    remove(&mut client, &direct)
        .await
        .expect("remove the last tag");
    assert!(
        status(&mut client, &id).await.is_none(),
        "the last tag takes the image"
    );
    remove(&mut client, &direct)
        .await
        .expect("removing again is not an error");
    remove(&mut client, "docker.io/library/never-pulled:1")
        .await
        .expect("unknown is not an error");
    let after_remove = image_fs_bytes(&mut client).await;
    assert!(
        after_remove < after_pull,
        "blobs and layers collected: {after_pull} -> {after_remove}"
    );
    assert_eq!(
        std::fs::read_dir(daemon.root.join("layers"))
            .expect("layers dir")
            .count(),
        0
    );
}

#[tokio::test]
async fn remove_by_id_takes_every_name_and_keeps_shared_layers_of_other_images() {
    let Some(rig) = TestImages::load() else {
        return;
    };
    let daemon = loopback_daemon();
    let mut client = daemon.images().await;
    let busybox = pull(&mut client, &rig.reference("busybox"))
        .await
        .expect("pull busybox");
    let nonroot = rig.reference("nonroot");
    pull(&mut client, &nonroot).await.expect("pull nonroot");
    remove(&mut client, &busybox).await.expect("remove by id");
    assert!(status(&mut client, &busybox).await.is_none());
    // nonroot shares busybox's base layer: it must still be there.
    let chains = chain_ids(&mut client, &nonroot).await;
    for chain in chains {
        assert!(
            layer_dir(&daemon, &chain).is_dir(),
            "layer {chain} of nonroot kept"
        );
    }
}

#[tokio::test]
async fn bad_pulls_fail_clearly_and_leave_nothing() {
    let Some(rig) = TestImages::load() else {
        return;
    };
    let daemon = loopback_daemon();
    let mut client = daemon.images().await;

    let err = pull(&mut client, "Not A Reference")
        .await
        .expect_err("malformed");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    let err = pull(&mut client, "").await.expect_err("empty");
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");

    let missing = format!("{}/berth-test/busybox:no-such-tag", rig.registry);
    let err = pull(&mut client, &missing).await.expect_err("404 tag");
    assert!(
        err.message().contains(&missing) && err.message().contains("manifest unknown"),
        "{err:?}"
    );

    let content = daemon.root.join("content/sha256");
    let blobs = std::fs::read_dir(&content).map(|d| d.count()).unwrap_or(0);
    assert_eq!(blobs, 0, "a failed pull leaves no blobs");
    assert_eq!(
        std::fs::read_dir(daemon.root.join("content/ingest"))
            .expect("ingest")
            .count(),
        0
    );
}

#[tokio::test]
async fn a_registry_that_hangs_times_out() {
    let Some(_rig) = TestImages::load() else {
        return;
    };
    // Accepts connections and never answers.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let address = listener.local_addr().expect("address");
    let daemon = TestDaemon::start_with(Options {
        config_toml: format!("{LOOPBACK_REGISTRY_CONFIG}pull_progress_timeout_secs = 1\n"),
        ..Options::default()
    });
    let mut client = daemon.images().await;
    let err = pull(&mut client, &format!("{address}/hangs/forever:1"))
        .await
        .expect_err("hanging registry");
    assert!(err.message().contains("hangs/forever"), "{err:?}");
    drop(listener);
}

/// Debian's docker-registry with htpasswd (basic) auth, serving the test
/// rig's own storage read-only; stopped when dropped.
struct AuthRegistry {
    child: std::process::Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl AuthRegistry {
    const USER: &'static str = "berth";
    const PASSWORD: &'static str = "s3cret-pass";

    fn start() -> AuthRegistry {
        // hack/test-env.sh keeps the registry beside images.json,
        // hack/test.sh in a `registry` directory beside it.
        let images = std::env::var("BERTH_TEST_IMAGES").expect("BERTH_TEST_IMAGES");
        let rig_dir = std::path::Path::new(&images)
            .parent()
            .expect("the rig's directory");
        let storage = [rig_dir.join("storage"), rig_dir.join("registry/storage")]
            .into_iter()
            .find(|s| s.is_dir())
            .unwrap_or_else(|| panic!("no registry storage in {rig_dir:?}"));
        let dir = tempfile::tempdir().expect("tempdir");
        // distribution only accepts bcrypt entries.
        let hash = bcrypt::hash(Self::PASSWORD, 4).expect("bcrypt");
        let htpasswd = dir.path().join("htpasswd");
        std::fs::write(&htpasswd, format!("{}:{hash}\n", Self::USER)).expect("htpasswd");
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}\n  maintenance:\n    readonly:\n      enabled: true\nhttp:\n  addr: {addr}\nauth:\n  htpasswd:\n    realm: berth-test\n    path: {}\n",
                storage.display(),
                htpasswd.display()
            ),
        )
        .expect("config");
        let child = std::process::Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let registry = AuthRegistry {
            child,
            addr,
            _dir: dir,
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::net::TcpStream::connect(&registry.addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "docker-registry with auth did not listen on {}",
                registry.addr
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        registry
    }

    /// `reference` of the rig's registry, on this one.
    fn reference(&self, rig: &TestImages, key: &str) -> String {
        rig.reference(key).replacen(&rig.registry, &self.addr, 1)
    }
}

impl Drop for AuthRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn pull_as(
    client: &mut ImageServiceClient<Channel>,
    name: &str,
    username: &str,
    password: &str,
) -> Result<String, tonic::Status> {
    client
        .pull_image(PullImageRequest {
            image: spec(name),
            auth: Some(AuthConfig {
                username: username.to_string(),
                password: password.to_string(),
                ..AuthConfig::default()
            }),
            ..PullImageRequest::default()
        })
        .await
        .map(|r| r.into_inner().image_ref)
}

#[tokio::test]
async fn a_registry_with_basic_auth_takes_the_right_password_only() {
    let Some(rig) = TestImages::load() else {
        return;
    };
    let registry = AuthRegistry::start();
    let daemon = loopback_daemon();
    let mut client = daemon.images().await;
    let reference = registry.reference(&rig, "busybox");

    let anonymous = pull(&mut client, &reference)
        .await
        .expect_err("no credentials");
    assert_eq!(
        anonymous.code(),
        tonic::Code::Unauthenticated,
        "{anonymous:?}"
    );
    let wrong = pull_as(
        &mut client,
        &reference,
        AuthRegistry::USER,
        "not-the-password-7x",
    )
    .await
    .expect_err("wrong password");
    assert_eq!(wrong.code(), tonic::Code::Unauthenticated, "{wrong:?}");
    assert!(
        wrong.message().contains(&registry.addr),
        "{}",
        wrong.message()
    );
    assert!(
        !wrong.message().contains("not-the-password-7x"),
        "{}",
        wrong.message()
    );
    assert!(status(&mut client, &reference).await.is_none());

    let image_ref = pull_as(
        &mut client,
        &reference,
        AuthRegistry::USER,
        AuthRegistry::PASSWORD,
    )
    .await
    .expect("pull with the right password");
    assert_eq!(image_ref, rig.str("busybox", "image_id"));
    let image = status(&mut client, &reference)
        .await
        .expect("image present");
    assert_eq!(image.repo_tags, vec![reference]);
}
