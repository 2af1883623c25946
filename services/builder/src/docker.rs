//! The Docker work of a build through bollard: building the image from the
//! checked-out context, and running each test step in a container of it —
//! as an unprivileged user, with every capability dropped, no new privileges
//! and no Docker socket.

use std::collections::HashMap;
use std::path::Path;

use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig};
use bollard::query_parameters::{
    BuildImageOptions, CreateContainerOptions, LogsOptions, RemoveContainerOptions,
    WaitContainerOptions,
};
use futures::StreamExt;

use crate::logs::LogSink;
use crate::pipeline_file::{ImageSpec, TestStep};

/// Label on every image and container a build creates: the build id.
pub const BUILD_LABEL: &str = "io.gantry.build";
/// The user test steps run as when the image would run them as root.
const UNPRIVILEGED_USER: &str = "65534:65534";
/// Name, inside the build context, of a Dockerfile that lives outside it.
const OUTSIDE_DOCKERFILE: &str = ".gantry.Dockerfile";

/// Packs the build context; a Dockerfile outside the context is added to it.
fn context_tar(repo: &Path, spec: &ImageSpec) -> anyhow::Result<(Vec<u8>, String)> {
    let context = repo.join(&spec.context);
    anyhow::ensure!(
        context.is_dir(),
        "build context {:?} is not a directory",
        spec.context
    );
    let dockerfile = repo.join(&spec.dockerfile);
    anyhow::ensure!(
        dockerfile.is_file(),
        "Dockerfile {:?} does not exist",
        spec.dockerfile
    );
    let mut tar = tar::Builder::new(Vec::new());
    tar.follow_symlinks(false);
    tar.append_dir_all(".", &context)?;
    let name = match dockerfile.strip_prefix(&context) {
        Ok(rel) => rel.to_string_lossy().into_owned(),
        Err(_) => {
            tar.append_path_with_name(&dockerfile, OUTSIDE_DOCKERFILE)?;
            OUTSIDE_DOCKERFILE.to_owned()
        }
    };
    Ok((tar.into_inner()?, name))
}

/// Builds the image; returns its id (`sha256:...`).
pub async fn build_image(
    docker: &Docker,
    repo: &Path,
    spec: &ImageSpec,
    tag: &str,
    labels: HashMap<String, String>,
    log: &LogSink,
) -> anyhow::Result<String> {
    let (tar, dockerfile) = context_tar(repo, spec)?;
    let options = BuildImageOptions {
        dockerfile,
        t: Some(tag.to_owned()),
        rm: true,
        forcerm: true,
        buildargs: Some(spec.args.clone().into_iter().collect()),
        labels: Some(labels),
        target: spec.target.clone().unwrap_or_default(),
        ..Default::default()
    };
    let mut stream = docker.build_image(options, None, Some(bollard::body_full(tar.into())));
    let mut image_id = None;
    while let Some(item) = stream.next().await {
        let info = item.map_err(|e| anyhow::anyhow!("{}", docker_error(&e)))?;
        if let Some(s) = &info.stream {
            log.write("build", "stdout", s.as_bytes()).await;
        }
        if let Some(s) = &info.status {
            log.write("build", "stdout", format!("{s}\n").as_bytes())
                .await;
        }
        if let Some(err) = info.error_detail.and_then(|d| d.message) {
            log.write("build", "stderr", format!("{err}\n").as_bytes())
                .await;
            anyhow::bail!("{err}");
        }
        if let Some(id) = info.aux.and_then(|aux| aux.id) {
            image_id = Some(id);
        }
    }
    match image_id {
        Some(id) => Ok(id),
        None => docker
            .inspect_image(tag)
            .await?
            .id
            .ok_or_else(|| anyhow::anyhow!("built image {tag} has no id")),
    }
}

pub use gantry_runtime::docker_error;

/// How a test step ended.
#[derive(Debug, PartialEq, Eq)]
pub enum StepEnd {
    Exited(i64),
    TimedOut,
}

/// Runs one test step in a fresh container of `image`, streaming its output
/// to the log; the container is removed afterwards whatever happened.
pub async fn run_step(
    docker: &Docker,
    image: &str,
    step: &TestStep,
    name: &str,
    labels: HashMap<String, String>,
    log: &LogSink,
) -> anyhow::Result<StepEnd> {
    let image_user = docker
        .inspect_image(image)
        .await?
        .config
        .and_then(|c| c.user)
        .unwrap_or_default();
    let user = if image_user.is_empty()
        || image_user == "root"
        || image_user == "0"
        || image_user.starts_with("0:")
    {
        UNPRIVILEGED_USER.to_owned()
    } else {
        image_user
    };
    let body = ContainerCreateBody {
        image: Some(image.to_owned()),
        cmd: Some(step.cmd.clone()),
        user: Some(user),
        labels: Some(labels),
        tty: Some(false),
        host_config: Some(HostConfig {
            privileged: Some(false),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            binds: Some(vec![]),
            ..Default::default()
        }),
        ..Default::default()
    };
    docker
        .create_container(
            Some(CreateContainerOptions {
                name: Some(name.to_owned()),
                ..Default::default()
            }),
            body,
        )
        .await?;
    let result = run_created(docker, name, step, log).await;
    let _ = docker
        .remove_container(
            name,
            Some(RemoveContainerOptions {
                force: true,
                ..Default::default()
            }),
        )
        .await;
    result
}

async fn run_created(
    docker: &Docker,
    name: &str,
    step: &TestStep,
    log: &LogSink,
) -> anyhow::Result<StepEnd> {
    docker.start_container(name, None).await?;
    let logs = async {
        let mut stream = docker.logs(
            name,
            Some(LogsOptions {
                follow: true,
                stdout: true,
                stderr: true,
                ..Default::default()
            }),
        );
        while let Some(Ok(chunk)) = stream.next().await {
            match chunk {
                bollard::container::LogOutput::StdErr { message } => {
                    log.write(&step.name, "stderr", &message).await
                }
                other => log.write(&step.name, "stdout", &other.into_bytes()).await,
            }
        }
    };
    let wait = async {
        let mut stream = docker.wait_container(name, None::<WaitContainerOptions>);
        match stream.next().await {
            Some(Ok(r)) => Ok(r.status_code),
            Some(Err(bollard::errors::Error::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(e)) => Err(anyhow::Error::new(e)),
            None => anyhow::bail!("container wait ended without a status"),
        }
    };
    let work = async {
        let (_, code) = tokio::join!(logs, wait);
        code
    };
    match tokio::time::timeout(step.timeout, work).await {
        Ok(code) => Ok(StepEnd::Exited(code?)),
        Err(_) => {
            let _ = docker.kill_container(name, None).await;
            Ok(StepEnd::TimedOut)
        }
    }
}

/// Removes the containers an earlier attempt of `build_id` left behind.
pub async fn remove_leftovers(docker: &Docker, build_id: &str) {
    gantry_runtime::remove_containers(docker, &format!("{BUILD_LABEL}={build_id}"), None).await;
}
