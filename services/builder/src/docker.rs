//! The Docker work of a build through bollard: building the image from the
//! checked context (streamed, with a timeout and a memory limit), and running
//! each test step in a container of it, sandboxed:
//!
//! - as a non-root numeric uid and gid: the image's `USER` is resolved
//!   against its own `/etc/passwd` and `/etc/group`, and uid 0 (whatever its
//!   spelling: `root`, `0`, `00`, `root:root`, a name mapped to 0) or a user
//!   the image does not know is replaced by 65534:65534, which the log says;
//! - every capability dropped, no new privileges, no Docker socket;
//! - the project's limits: memory (no swap beyond it), processes, CPUs;
//! - no network at all, unless the step asks for it: then the builder's step
//!   network, a bridge of its own whose containers cannot reach each other;
//!   and the build's own network when it has service containers (`services`).

use std::collections::HashMap;

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, HostConfig, NetworkConnectRequest, NetworkCreateRequest,
};
use bollard::query_parameters::{
    BuildImageOptions, DownloadFromContainerOptions, LogsOptions, WaitContainerOptions,
};
use futures::StreamExt;
use gantry_config::Limits;

use crate::context::Context;
use crate::logs::LogSink;
use gantry_pipeline::service::{ImageSpec, TestStep};

/// Label on every image and container a build creates: the build id.
pub const BUILD_LABEL: &str = "io.gantry.build";
/// Label on every container of a build: the attempt that made it.
pub const ATTEMPT_LABEL: &str = "io.gantry.attempt";
/// The uid and gid test steps run as when the image's user cannot be used.
pub const NOBODY: u32 = 65534;
/// Largest `/etc/passwd` or `/etc/group` read from an image.
const MAX_ACCOUNT_FILE: usize = 1024 * 1024;
const MIB: u64 = 1024 * 1024;

/// Builds the image; returns its id (`sha256:...`). The `RUN` instructions
/// are root in their containers: they get the project's memory and CPU
/// limits, and the step network (firewalled off the host) when the project
/// allows the network, else none. Layers of `cache_from` (images already
/// in the engine) are reused where the Dockerfile's steps match.
#[allow(clippy::too_many_arguments)]
pub async fn build_image(
    docker: &Docker,
    context: Context,
    spec: &ImageSpec,
    tag: &str,
    labels: HashMap<String, String>,
    limits: &Limits,
    step_network: &str,
    cache_from: &[String],
    log: &LogSink,
) -> anyhow::Result<String> {
    // The engine takes the build containers' memory as a 32-bit number.
    let memory = (limits.memory_mb * MIB).min(i32::MAX as u64) as i32;
    const CPU_PERIOD: i32 = 100_000;
    let options = BuildImageOptions {
        dockerfile: context.dockerfile.clone(),
        t: Some(tag.to_owned()),
        rm: true,
        forcerm: true,
        buildargs: Some(spec.args.clone().into_iter().collect()),
        labels: Some(labels),
        target: spec.target.clone().unwrap_or_default(),
        memory: Some(memory),
        memswap: Some(memory),
        cpuperiod: Some(CPU_PERIOD),
        cpuquota: Some((limits.cpus * f64::from(CPU_PERIOD)).min(f64::from(i32::MAX)) as i32),
        networkmode: Some(if limits.allow_network {
            step_network.to_owned()
        } else {
            "none".to_owned()
        }),
        cachefrom: (!cache_from.is_empty()).then(|| cache_from.to_vec()),
        ..Default::default()
    };
    if limits.allow_network {
        ensure_step_network(docker, step_network).await?;
    }
    let body = bollard::body_try_stream(context.stream());
    let mut stream = docker.build_image(options, None, Some(body));
    let mut image_id = None;
    let build = async {
        while let Some(item) = stream.next().await {
            let info = item.map_err(EngineError)?;
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
        Ok(())
    };
    // Dropping the request stops the engine's build.
    tokio::time::timeout(limits.build_timeout, build)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the image build timed out after {}s (limits.build_timeout_secs)",
                limits.build_timeout.as_secs()
            )
        })??;
    match image_id {
        Some(id) => Ok(id),
        None => docker
            .inspect_image(tag)
            .await?
            .id
            .ok_or_else(|| anyhow::anyhow!("built image {tag} has no id")),
    }
}

use gantry_docker::{EngineError, error_text as docker_error};

/// Who the test steps of an image run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepUser {
    pub uid: u32,
    pub gid: u32,
    /// Why the image's own user was not taken as it is, for the log.
    pub note: Option<String>,
}

impl StepUser {
    /// `uid:gid`, as the engine takes it.
    pub fn spec(&self) -> String {
        format!("{}:{}", self.uid, self.gid)
    }
}

/// Looks a user or group up in the text of `/etc/passwd` or `/etc/group`:
/// `(id, primary gid)` of the first line named `name`.
fn lookup(file: &str, name: &str) -> Option<(u32, Option<u32>)> {
    file.lines().find_map(|line| {
        let mut fields = line.split(':');
        if fields.next()? != name {
            return None;
        }
        let _password = fields.next()?;
        let id = fields.next()?.trim().parse().ok()?;
        let gid = fields.next().and_then(|g| g.trim().parse().ok());
        Some((id, gid))
    })
}

/// Decides the user of test steps from the image's `USER` (`text`) and its
/// account files (`None` when the image has none), on the resolved ids.
pub fn decide_user(text: &str, passwd: Option<&str>, group: Option<&str>) -> StepUser {
    let nobody = |note: String| StepUser {
        uid: NOBODY,
        gid: NOBODY,
        note: Some(note),
    };
    let text = text.trim();
    if text.is_empty() {
        return nobody(format!(
            "the image sets no USER (so root): test steps run as {NOBODY}:{NOBODY}"
        ));
    }
    let (user, group_name) = match text.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (text, None),
    };
    let numeric = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let (uid, primary) = if numeric(user) {
        match user.parse::<u32>() {
            Ok(uid) => (uid, None),
            Err(_) => {
                return nobody(format!(
                    "USER {text:?} is not a valid uid: test steps run as {NOBODY}:{NOBODY}"
                ));
            }
        }
    } else {
        match passwd.and_then(|p| lookup(p, user)) {
            Some((uid, gid)) => (uid, gid),
            None => {
                return nobody(format!(
                    "USER {text:?} is not in the image's /etc/passwd: test steps run as {NOBODY}:{NOBODY}"
                ));
            }
        }
    };
    if uid == 0 {
        return nobody(format!(
            "USER {text:?} is uid 0 (root), which test steps never run as: they run as {NOBODY}:{NOBODY} instead"
        ));
    }
    let gid = match group_name {
        Some(g) if numeric(g) => g.parse::<u32>().ok(),
        Some(g) => group.and_then(|f| lookup(f, g)).map(|(gid, _)| gid),
        None => primary,
    };
    match gid {
        Some(gid) if gid != 0 => StepUser {
            uid,
            gid,
            note: None,
        },
        Some(_) => StepUser {
            uid,
            gid: NOBODY,
            note: Some(format!(
                "USER {text:?} has group 0 (root): test steps run as {uid}:{NOBODY}"
            )),
        },
        None => StepUser {
            uid,
            gid: NOBODY,
            note: Some(format!(
                "USER {text:?} has no group the image knows: test steps run as {uid}:{NOBODY}"
            )),
        },
    }
}

/// Reads a small regular file from `container` (stopped); `None` when it is
/// missing, not a regular file, or too large.
async fn read_file(docker: &Docker, container: &str, path: &str) -> Option<String> {
    let mut stream = docker.download_from_container(
        container,
        Some(DownloadFromContainerOptions {
            path: path.to_owned(),
        }),
    );
    let mut archive = Vec::new();
    while let Some(piece) = stream.next().await {
        archive.extend_from_slice(&piece.ok()?);
        if archive.len() > MAX_ACCOUNT_FILE + 64 * 1024 {
            return None;
        }
    }
    let mut tar = tar::Archive::new(archive.as_slice());
    let mut entry = tar.entries().ok()?.next()?.ok()?;
    if !entry.header().entry_type().is_file() {
        return None;
    }
    let mut text = String::new();
    std::io::Read::read_to_string(&mut entry, &mut text).ok()?;
    Some(text)
}

/// The user test steps of `image` run as (see [`decide_user`]).
pub async fn step_user(
    docker: &Docker,
    image: &str,
    name: &str,
    labels: &HashMap<String, String>,
) -> anyhow::Result<StepUser> {
    let text = docker
        .inspect_image(image)
        .await?
        .config
        .and_then(|c| c.user)
        .unwrap_or_default();
    let needs_files = text
        .split(':')
        .any(|part| !part.is_empty() && !part.bytes().all(|b| b.is_ascii_digit()));
    if !needs_files {
        return Ok(decide_user(&text, None, None));
    }
    // Names are resolved with the image's own account files, read from a
    // container that is created, never started.
    let body = ContainerCreateBody {
        image: Some(image.to_owned()),
        labels: Some(labels.clone()),
        network_disabled: Some(true),
        entrypoint: Some(vec!["/nonexistent".into()]),
        host_config: Some(HostConfig {
            network_mode: Some("none".into()),
            ..Default::default()
        }),
        ..Default::default()
    };
    gantry_docker::create_container(docker, name, body).await?;
    let passwd = read_file(docker, name, "/etc/passwd").await;
    let group = read_file(docker, name, "/etc/group").await;
    remove_container(docker, name).await;
    Ok(decide_user(&text, passwd.as_deref(), group.as_deref()))
}

/// Creates the container `name`.
/// Makes sure the network that steps asking for one join exists: a bridge
/// whose Linux interface has the same name (so the host's firewall can
/// refuse its traffic to the host), with no traffic between its containers.
pub async fn ensure_step_network(docker: &Docker, name: &str) -> anyhow::Result<()> {
    let bridge: String = name.chars().take(15).collect();
    if let Ok(existing) = docker
        .inspect_network(
            name,
            None::<bollard::query_parameters::InspectNetworkOptions>,
        )
        .await
    {
        // A network of that name made by someone else would not isolate.
        let options = existing.options.unwrap_or_default();
        let ours = existing.driver.as_deref() == Some("bridge")
            && options.get("com.docker.network.bridge.name") == Some(&bridge)
            && options
                .get("com.docker.network.bridge.enable_icc")
                .is_some_and(|v| v == "false");
        anyhow::ensure!(
            ours,
            "the Docker network {name} exists but is not a step network (a bridge named {bridge} without traffic between containers); remove it and the builder makes its own"
        );
        return Ok(());
    }
    let request = NetworkCreateRequest {
        name: name.to_owned(),
        driver: Some("bridge".into()),
        labels: Some(HashMap::from([(
            "io.gantry.network".to_owned(),
            "steps".to_owned(),
        )])),
        options: Some(HashMap::from([
            ("com.docker.network.bridge.name".to_owned(), bridge),
            (
                "com.docker.network.bridge.enable_icc".to_owned(),
                "false".to_owned(),
            ),
        ])),
        ..Default::default()
    };
    match docker.create_network(request).await {
        Ok(_) => Ok(()),
        // Another builder made it meanwhile.
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 409, ..
        }) => Ok(()),
        Err(e) => Err(anyhow::anyhow!(
            "cannot create the step network {name}: {}",
            docker_error(&e)
        )),
    }
}

/// How a test step ended.
#[derive(Debug, PartialEq, Eq)]
pub enum StepEnd {
    Exited(i64),
    TimedOut,
}

/// Where and as whom a step runs.
pub struct Sandbox<'a> {
    pub user: &'a StepUser,
    pub limits: &'a Limits,
    /// The network of steps that ask for one.
    pub step_network: &'a str,
    /// The build's own network with its service containers, if it has some:
    /// every step joins it.
    pub services_network: Option<&'a str>,
    /// `NAME=value` of the project's secrets this pipeline gets.
    pub env: &'a [String],
}

/// Runs one test step in a fresh container of `image`, streaming its output
/// to the log; the container is removed afterwards whatever happened.
pub async fn run_step(
    docker: &Docker,
    image: &str,
    step: &TestStep,
    name: &str,
    labels: HashMap<String, String>,
    sandbox: &Sandbox<'_>,
    log: &LogSink,
) -> anyhow::Result<StepEnd> {
    let limits = sandbox.limits;
    let memory = (limits.memory_mb * MIB) as i64;
    let body = ContainerCreateBody {
        image: Some(image.to_owned()),
        cmd: Some(step.cmd.clone()),
        env: Some(sandbox.env.to_vec()),
        user: Some(sandbox.user.spec()),
        labels: Some(labels),
        tty: Some(false),
        network_disabled: Some(!step.network && sandbox.services_network.is_none()),
        host_config: Some(HostConfig {
            privileged: Some(false),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges".into()]),
            binds: Some(vec![]),
            network_mode: Some(match (step.network, sandbox.services_network) {
                (true, _) => sandbox.step_network.to_owned(),
                (false, Some(services)) => services.to_owned(),
                (false, None) => "none".to_owned(),
            }),
            memory: Some(memory),
            memory_swap: Some(memory),
            pids_limit: Some(limits.pids),
            nano_cpus: Some((limits.cpus * 1e9) as i64),
            ..Default::default()
        }),
        ..Default::default()
    };
    gantry_docker::create_container(docker, name, body).await?;
    if let (true, Some(services)) = (step.network, sandbox.services_network) {
        // Also on the services' network, beside the step network.
        let joined = docker
            .connect_network(
                services,
                NetworkConnectRequest {
                    container: name.to_owned(),
                    endpoint_config: None,
                },
            )
            .await;
        if let Err(e) = joined {
            remove_container(docker, name).await;
            anyhow::bail!("cannot join the services' network: {}", docker_error(&e));
        }
    }
    let result = run_created(docker, name, step, log).await;
    remove_container(docker, name).await;
    result
}

pub use gantry_docker::remove_container;

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

/// Removes the containers (test steps, service containers) and networks
/// of `build_id`: what an earlier attempt left behind, or this one's.
pub async fn remove_leftovers(docker: &Docker, build_id: &str) {
    let label = format!("{BUILD_LABEL}={build_id}");
    gantry_docker::remove_containers(docker, &label, None).await;
    gantry_docker::remove_networks(docker, &label).await;
}

/// Removes the builder's own tags of a build's image; the engine deletes the
/// image (and its layers no other image uses) once no tag is left.
pub async fn untag(docker: &Docker, tags: &[String]) {
    for tag in tags {
        match docker
            .remove_image(
                tag,
                None::<bollard::query_parameters::RemoveImageOptions>,
                None,
            )
            .await
        {
            Ok(_)
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(e) => {
                tracing::warn!(tag = %tag, error = %docker_error(&e), "cannot remove a build's image tag")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str = "root:x:0:0:root:/root:/bin/sh\ntoor:x:0:5::/:/bin/sh\napp:x:1000:1000::/app:/bin/sh\nweird:x:1001:0::/:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nwheel:x:10:app\napp:x:1000:\n";

    fn uid_of(text: &str) -> (u32, u32, bool) {
        let u = decide_user(text, Some(PASSWD), Some(GROUP));
        (u.uid, u.gid, u.note.is_some())
    }

    #[test]
    fn uid_zero_never_runs_whatever_its_spelling() {
        for text in [
            "",
            "root",
            "root:root",
            "0",
            "00",
            "0:0",
            "000:1000",
            "toor",
            "toor:wheel",
            " 0 ",
        ] {
            assert_eq!(uid_of(text), (NOBODY, NOBODY, true), "{text:?}");
        }
    }

    #[test]
    fn unknown_or_odd_users_become_nobody() {
        assert_eq!(uid_of("ghost"), (NOBODY, NOBODY, true));
        assert_eq!(uid_of("99999999999"), (NOBODY, NOBODY, true));
        // No account files (a FROM scratch image): names cannot be resolved.
        assert_eq!(decide_user("app", None, None).uid, NOBODY);
    }

    #[test]
    fn non_root_users_are_kept_with_a_non_root_group() {
        assert_eq!(uid_of("app"), (1000, 1000, false));
        assert_eq!(uid_of("app:wheel"), (1000, 10, false));
        assert_eq!(uid_of("1000:1000"), (1000, 1000, false));
        assert_eq!(uid_of("1000"), (1000, NOBODY, true));
        assert_eq!(uid_of("weird"), (1001, NOBODY, true));
        assert_eq!(uid_of("app:0"), (1000, NOBODY, true));
        assert_eq!(uid_of("app:nogroup"), (1000, NOBODY, true));
    }
}
