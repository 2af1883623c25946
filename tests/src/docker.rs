//! The Docker engine as tests see it, through the `docker` command.

use std::process::Command;

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker runs");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Ids of the containers (running or not) carrying `label` (`key=value`).
pub fn labelled(label: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-aq",
        "--no-trunc",
        "--filter",
        &format!("label={label}"),
    ])
    .lines()
    .map(str::to_owned)
    .collect()
}

/// Waits (up to a minute) until no container carries `label`.
pub async fn wait_none_labelled(label: &str) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let left = labelled(label);
        if left.is_empty() {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "containers labelled {label} are still there: {left:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// Removes every container carrying `label`.
pub fn remove_labelled(label: &str) {
    for id in labelled(label) {
        docker(&["rm", "-f", &id]);
    }
}

/// A container's label value.
pub fn label(container: &str, key: &str) -> String {
    docker(&[
        "inspect",
        "-f",
        &format!("{{{{index .Config.Labels \"{key}\"}}}}"),
        container,
    ])
}

/// A container's IP address on the default bridge network.
pub fn ip(container: &str) -> String {
    docker(&[
        "inspect",
        "-f",
        "{{.NetworkSettings.Networks.bridge.IPAddress}}",
        container,
    ])
}

/// Kills a container as a person would (`docker kill`: its restart policy
/// does not bring it back).
pub fn kill(container: &str) {
    docker(&["kill", container]);
}

/// Starts a stopped container again.
pub fn start(container: &str) {
    docker(&["start", container]);
}

/// Whether a container is running.
pub fn running(container: &str) -> bool {
    docker(&["inspect", "-f", "{{.State.Running}}", container]) == "true"
}

/// Removes an image with all its tags.
pub fn remove_image(image: &str) {
    docker(&["rmi", "-f", image]);
}

/// The id of a local image.
pub fn image_id(reference: &str) -> String {
    docker(&["image", "inspect", "-f", "{{.Id}}", reference])
}

/// Ids of the local images carrying `label` (`key=value`).
pub fn images_labelled(label: &str) -> Vec<String> {
    docker(&["images", "-q", "--filter", &format!("label={label}")])
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Names of the networks carrying `label` (`key` or `key=value`).
pub fn networks_labelled(label: &str) -> Vec<String> {
    docker(&["network", "ls", "-q", "--filter", &format!("label={label}")])
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Names of the volumes carrying `label` (`key` or `key=value`).
pub fn volumes_labelled(label: &str) -> Vec<String> {
    docker(&["volume", "ls", "-q", "--filter", &format!("label={label}")])
        .lines()
        .map(str::to_owned)
        .collect()
}

/// Runs a command in a running container; whether it succeeded.
pub fn exec(container: &str, cmd: &[&str]) -> bool {
    Command::new("docker")
        .arg("exec")
        .arg(container)
        .args(cmd)
        .status()
        .is_ok_and(|s| s.success())
}

/// Builds `tag` from a context holding the static busybox (installed in
/// `/bin`) and nothing else: `FROM scratch`, no registry needed.
pub fn build_busybox_image(tag: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy("/bin/busybox", dir.path().join("busybox"))
        .expect("static busybox (busybox-static) at /bin/busybox");
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
    )
    .expect("write Dockerfile");
    let out = Command::new("docker")
        .args(["build", "-q", "-t", tag])
        .arg(dir.path())
        .output()
        .expect("docker runs");
    assert!(
        out.status.success(),
        "docker build {tag}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds `tag` — the static busybox serving `page` over HTTP on port 8080
/// (`FROM scratch`, nothing pulled) — and pushes it to its registry.
pub fn push_http_service_image(tag: &str, page: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::copy("/bin/busybox", dir.path().join("busybox"))
        .expect("static busybox (busybox-static) at /bin/busybox");
    std::fs::create_dir(dir.path().join("www")).expect("mkdir");
    std::fs::write(dir.path().join("www/index.html"), page).expect("write page");
    std::fs::write(
        dir.path().join("Dockerfile"),
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nCOPY www /www\nCMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n",
    )
    .expect("write Dockerfile");
    let context = dir.path().display().to_string();
    for args in [
        vec!["build", "-q", "-t", tag, &context],
        vec!["push", "-q", tag],
    ] {
        let out = Command::new("docker")
            .args(&args)
            .output()
            .expect("docker runs");
        assert!(
            out.status.success(),
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The build must pull it from the registry, not find it here.
    docker(&["rmi", tag]);
}

/// A container's name (without the leading `/`).
pub fn name(container: &str) -> String {
    docker(&["inspect", "-f", "{{.Name}}", container])
        .trim_start_matches('/')
        .to_owned()
}
