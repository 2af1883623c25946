//! What the services that talk to a Docker engine (the builder and the
//! deployer) share: the engine's credentials for a registry, an engine
//! error's message, whether the engine answers, pulling by digest, the
//! confinement of service containers and how ready one is, and finding and
//! removing containers, networks and volumes by label (every
//! container Gantry starts is labelled `io.gantry.*`, and is found again
//! that way after any crash).

use std::time::Duration;

/// The capabilities a container of a stack keeps, in integration runs and
/// in environments: Docker's default set without `FSETID`, `MKNOD`,
/// `NET_RAW`, `SETFCAP`, `SETPCAP`, `SYS_CHROOT` and `AUDIT_WRITE` — enough
/// for services that start as root and drop to their own user.
pub const SERVICE_CAPABILITIES: [&str; 7] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "SETGID",
    "SETUID",
    "NET_BIND_SERVICE",
    "KILL",
];

/// The host configuration of a long-running service container (a stack's,
/// or a service beside a build's tests) on `network`: the project's memory,
/// pids and CPU limits, only [`SERVICE_CAPABILITIES`], `no-new-privileges`,
/// not privileged, no bind mounts, and a log capped at 10 MiB. Callers add
/// what is theirs (restart policy, tmpfs, volumes).
pub fn confined_host_config(
    limits: &gantry_config::Limits,
    network: &str,
) -> bollard::models::HostConfig {
    use bollard::models::{HostConfig, HostConfigLogConfig};
    HostConfig {
        network_mode: Some(network.to_owned()),
        privileged: Some(false),
        memory: Some(
            i64::try_from(limits.memory_mb)
                .unwrap_or(i64::MAX)
                .saturating_mul(1024 * 1024),
        ),
        pids_limit: Some(limits.pids),
        nano_cpus: Some((limits.cpus * 1e9) as i64),
        cap_drop: Some(vec!["ALL".into()]),
        cap_add: Some(SERVICE_CAPABILITIES.iter().map(|c| c.to_string()).collect()),
        security_opt: Some(vec!["no-new-privileges:true".into()]),
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".into()),
            config: Some(std::collections::HashMap::from([
                ("max-size".to_owned(), "10m".to_owned()),
                ("max-file".to_owned(), "1".to_owned()),
            ])),
        }),
        ..Default::default()
    }
}

/// Creates the container `name` from `body`; its id. The error says which
/// container could not be made, and keeps the engine's error as its source.
pub async fn create_container(
    docker: &bollard::Docker,
    name: &str,
    body: bollard::models::ContainerCreateBody,
) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let created = docker
        .create_container(
            Some(bollard::query_parameters::CreateContainerOptions {
                name: Some(name.to_owned()),
                ..Default::default()
            }),
            body,
        )
        .await
        .map_err(EngineError)
        .with_context(|| format!("creating container {name}"))?;
    Ok(created.id)
}

/// Where a started service container is on its way to serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readiness {
    /// Running, and healthy (`checked`) or without a health check.
    Ready { checked: bool },
    /// Created or restarting, or its health check has not passed yet.
    Starting,
    /// Its health check failed.
    Unhealthy,
    /// It exited (or died) with this code.
    Stopped(i64),
}

/// How far `container` is (see [`Readiness`]).
pub async fn readiness(
    docker: &bollard::Docker,
    container: &str,
) -> Result<Readiness, bollard::errors::Error> {
    use bollard::models::{ContainerStateStatusEnum as S, HealthStatusEnum as H};
    let state = docker
        .inspect_container(
            container,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await?
        .state
        .unwrap_or_default();
    let health = state.health.as_ref().and_then(|h| h.status);
    Ok(match (state.status, health) {
        (Some(S::EXITED | S::DEAD), _) => Readiness::Stopped(state.exit_code.unwrap_or_default()),
        (_, Some(H::UNHEALTHY)) => Readiness::Unhealthy,
        (Some(S::RUNNING), Some(H::HEALTHY)) => Readiness::Ready { checked: true },
        (Some(S::RUNNING), None | Some(H::NONE | H::EMPTY)) => Readiness::Ready { checked: false },
        _ => Readiness::Starting,
    })
}

/// Credentials the Docker engine uses for `registry` (none when it needs no login).
pub fn credentials(registry: &gantry_config::Registry) -> Option<bollard::auth::DockerCredentials> {
    registry
        .username
        .as_ref()
        .map(|u| bollard::auth::DockerCredentials {
            username: Some(u.clone()),
            password: registry.password.as_ref().map(|p| p.expose().to_owned()),
            serveraddress: Some(registry.host.clone()),
            ..Default::default()
        })
}

/// An error of the Docker engine (or of reaching it), shown as the engine's
/// own message (without bollard's wrapping) and keeping the chain of what
/// caused it (an I/O error, say) for `{:#}` and downcasting.
#[derive(Debug)]
pub struct EngineError(pub bollard::errors::Error);

impl std::fmt::Display for EngineError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&error_text(&self.0))
    }
}

impl std::error::Error for EngineError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        std::error::Error::source(&self.0)
    }
}

impl From<bollard::errors::Error> for EngineError {
    fn from(e: bollard::errors::Error) -> Self {
        EngineError(e)
    }
}

impl EngineError {
    /// The HTTP status the engine answered, if it answered.
    pub fn status_code(&self) -> Option<u16> {
        match &self.0 {
            bollard::errors::Error::DockerResponseServerError { status_code, .. } => {
                Some(*status_code)
            }
            _ => None,
        }
    }
}

/// The message of a Docker engine error without bollard's wrapping.
pub fn error_text(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerStreamError { error } => error.clone(),
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// Every container (running or not) carrying `label` (`key=value`); none
/// when the engine cannot be asked.
pub async fn labelled_containers(
    docker: &bollard::Docker,
    label: &str,
) -> Vec<bollard::models::ContainerSummary> {
    use bollard::query_parameters::ListContainersOptions;
    let filters = std::collections::HashMap::from([("label".to_owned(), vec![label.to_owned()])]);
    docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .unwrap_or_default()
}

/// Force-removes a container (name or id) with its anonymous volumes (an
/// image's `VOLUME`s), retrying as `Policy::Remove` says while the engine
/// is busy with it; a container that is already gone is fine.
pub async fn remove_container(docker: &bollard::Docker, container: &str) {
    use bollard::query_parameters::RemoveContainerOptions;
    let removed = gantry_retry::Policy::Remove
        .retry("remove a container", || async {
            match docker
                .remove_container(
                    container,
                    Some(RemoveContainerOptions {
                        force: true,
                        v: true,
                        ..Default::default()
                    }),
                )
                .await
            {
                Ok(())
                | Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => Ok(()),
                Err(e) => Err(EngineError(e)),
            }
        })
        .await;
    if let Err(gave_up) = removed {
        tracing::warn!(container, error = %gave_up.error, "cannot remove container");
    }
}

/// Force-removes every container carrying `label` (`key=value`), except
/// `keep`, with its anonymous volumes: what an interrupted build or
/// deployment left behind.
pub async fn remove_containers(docker: &bollard::Docker, label: &str, keep: Option<&str>) {
    for id in labelled_containers(docker, label)
        .await
        .into_iter()
        .filter_map(|c| c.id)
    {
        if Some(id.as_str()) != keep {
            remove_container(docker, &id).await;
        }
    }
}

/// Pulls `reference` (`repository@digest`) with the registry's credentials.
pub async fn pull(
    docker: &bollard::Docker,
    reference: &str,
    registry: &gantry_config::Registry,
) -> anyhow::Result<()> {
    use anyhow::Context as _;
    use bollard::query_parameters::CreateImageOptions;
    use futures::StreamExt as _;
    let mut progress = docker.create_image(
        Some(CreateImageOptions {
            from_image: Some(reference.to_owned()),
            ..Default::default()
        }),
        None,
        credentials(registry),
    );
    while let Some(item) = progress.next().await {
        let info = item
            .map_err(EngineError)
            .with_context(|| format!("pulling {reference}"))?;
        if let Some(msg) = info.error_detail.and_then(|d| d.message) {
            anyhow::bail!("pulling {reference}: {msg}");
        }
    }
    Ok(())
}

/// Removes every network carrying `label` (`key` or `key=value`) whose
/// containers are gone; a network still in use is left (and said).
pub async fn remove_networks(docker: &bollard::Docker, label: &str) {
    use bollard::query_parameters::ListNetworksOptions;
    let filters = std::collections::HashMap::from([("label".to_owned(), vec![label.to_owned()])]);
    let networks = docker
        .list_networks(Some(ListNetworksOptions {
            filters: Some(filters),
        }))
        .await
        .unwrap_or_default();
    for id in networks.into_iter().filter_map(|n| n.id) {
        match docker.remove_network(&id).await {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(e) => {
                tracing::warn!(network = %id, error = %error_text(&e), "cannot remove network")
            }
        }
    }
}

/// Removes every volume carrying `label` (`key` or `key=value`) that no
/// container uses.
pub async fn remove_volumes(docker: &bollard::Docker, label: &str) {
    use bollard::query_parameters::{ListVolumesOptions, RemoveVolumeOptions};
    let filters = std::collections::HashMap::from([("label".to_owned(), vec![label.to_owned()])]);
    let volumes = docker
        .list_volumes(Some(ListVolumesOptions {
            filters: Some(filters),
        }))
        .await
        .ok()
        .and_then(|r| r.volumes)
        .unwrap_or_default();
    for v in volumes {
        match docker
            .remove_volume(&v.name, Some(RemoveVolumeOptions { force: true }))
            .await
        {
            Ok(())
            | Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 404, ..
            }) => {}
            Err(e) => {
                tracing::warn!(volume = %v.name, error = %error_text(&e), "cannot remove volume")
            }
        }
    }
}

/// Whether the engine answers a ping within two seconds.
pub async fn answers(docker: &bollard::Docker) -> bool {
    tokio::time::timeout(Duration::from_secs(2), docker.ping())
        .await
        .is_ok_and(|r| r.is_ok())
}
