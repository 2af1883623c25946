//! Service containers beside a build's test steps (`services:` of
//! `.gantry.yml`): a database or a cache the tests talk to by alias.
//!
//! - **Network.** Each attempt of a build gets its own network, `internal`
//!   (no route out) and without an address of the host on its bridge (so
//!   not even the host is reachable), labelled with the build and attempt.
//!   The services join it under their alias; every test step joins it too
//!   (a step that asks for the network also keeps the step network).
//! - **Images** come only from registries of the Gantry configuration, and
//!   never from the repository of a configured project, this one included:
//!   pipelines push those from any branch, so a branch could choose what
//!   runs (as root) beside the tests, and another team's may hold what it
//!   does not share. They are pulled with the registry's credentials every
//!   time: an image already in the engine is not trusted.
//! - **Confinement**: a service runs as its image says (databases start as
//!   root and drop to their own user), with only the capabilities such
//!   services need, `no-new-privileges`, the project's limits and a capped
//!   log (`gantry_docker::confined_host_config`).
//! - **Ready** means its `health` command passes (run by the engine as a
//!   health check), else the image's own health check, else running; a
//!   service that stops, turns unhealthy or is not ready within its `wait`
//!   fails the build at step `services`, with its log in the build's log.
//! - **Always removed**: containers and network carry the build's labels,
//!   so the worker's removal of a build's leftovers (after any end, at a
//!   takeover, and by the periodic sweep) removes them too, and the worker
//!   does it as soon as the tests are over.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HealthConfig, NetworkCreateRequest, NetworkingConfig,
};
use bollard::query_parameters::LogsOptions;
use futures::StreamExt as _;
use gantry_config::{GantryConfig, Project};
use gantry_docker::Readiness;
use gantry_pipeline::service::ServiceSpec;

use crate::docker::{ATTEMPT_LABEL, BUILD_LABEL};
use crate::logs::LogSink;

/// The log step of everything about service containers.
pub const STEP: &str = "services";
/// How often a starting service is looked at.
const POLL: Duration = Duration::from_millis(500);
/// How much of a failed service's own log goes into the build's log.
const LOG_TAIL: &str = "200";

/// The network of one attempt of a build.
pub fn network_name(build_id: &str, attempt: i32) -> String {
    format!("gantry-build-{build_id}-{attempt}")
}

/// Why an image may not run as a service, if it may not.
pub fn refuse_image(config: &GantryConfig, project: &Project, image: &str) -> Option<String> {
    let host = gantry_config::registry_host(image);
    if !image.contains('/') || !config.registries.iter().any(|r| r.host == host) {
        let hosts: Vec<&str> = config.registries.iter().map(|r| r.host.as_str()).collect();
        return Some(format!(
            "image {image:?} is not in a registry of the Gantry configuration ({})",
            if hosts.is_empty() {
                "none is configured".to_owned()
            } else {
                hosts.join(", ")
            }
        ));
    }
    let repository = repository_of(image);
    config
        .projects
        .iter()
        .find(|p| !p.image.is_empty() && p.image == repository)
        .map(|built| {
            let whose = if built.name == project.name {
                "this project's own".to_owned()
            } else {
                format!("project {:?}'s", built.name)
            };
            format!(
                "image {image:?} is {whose}: images that pipelines push (from any branch) do not run as services"
            )
        })
}

/// `host/path` of a reference, without tag or digest.
fn repository_of(image: &str) -> &str {
    let name = image.split('@').next().unwrap_or_default();
    match name.rsplit_once(':') {
        // A colon after the last slash is a tag; before it, a port.
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => name,
    }
}

/// Starts `services` for one attempt of a build and waits until each is
/// ready; returns the network the test steps join. On failure, the reason
/// (its parts are removed by the caller's removal of the build's leftovers).
#[allow(clippy::too_many_arguments)]
pub async fn start(
    docker: &Docker,
    config: &GantryConfig,
    project: &Project,
    build_id: &str,
    attempt: i32,
    services: &[ServiceSpec],
    labels: &HashMap<String, String>,
    log: &LogSink,
) -> Result<String, String> {
    for s in services {
        if let Some(why) = refuse_image(config, project, &s.image) {
            return Err(why);
        }
    }
    let network = network_name(build_id, attempt);
    create_network(docker, &network, build_id, attempt).await?;
    for s in services {
        let registry = config.registry_for(&s.image);
        log.system(STEP, format!("pulling {} for {}", s.image, s.alias))
            .await;
        gantry_docker::pull(docker, &s.image, &registry)
            .await
            .map_err(|e| format!("cannot pull {}: {e:#}", s.image))?;
        let name = format!("gantry-{build_id}-{attempt}-svc-{}", s.alias);
        let mut service_labels = labels.clone();
        service_labels.insert("io.gantry.service".to_owned(), s.alias.clone());
        let body = ContainerCreateBody {
            image: Some(s.image.clone()),
            cmd: s.command.clone(),
            env: Some(s.env.iter().map(|(k, v)| format!("{k}={v}")).collect()),
            labels: Some(service_labels),
            healthcheck: s.health.as_ref().map(|cmd| HealthConfig {
                test: Some(vec!["CMD-SHELL".to_owned(), cmd.clone()]),
                interval: Some(1_000_000_000),
                timeout: Some(10_000_000_000),
                retries: Some(i64::MAX),
                ..Default::default()
            }),
            host_config: Some(gantry_docker::confined_host_config(
                &project.limits,
                &network,
            )),
            networking_config: Some(NetworkingConfig {
                endpoints_config: Some(HashMap::from([(
                    network.clone(),
                    EndpointSettings {
                        aliases: Some(vec![s.alias.clone()]),
                        ..Default::default()
                    },
                )])),
            }),
            ..Default::default()
        };
        gantry_docker::create_container(docker, &name, body)
            .await
            .map_err(|e| format!("cannot create service {}: {e:#}", s.alias))?;
        docker.start_container(&name, None).await.map_err(|e| {
            format!(
                "cannot start service {}: {}",
                s.alias,
                gantry_docker::error_text(&e)
            )
        })?;
    }
    for s in services {
        let name = format!("gantry-{build_id}-{attempt}-svc-{}", s.alias);
        if let Err(why) = wait_ready(docker, &name, s, log).await {
            copy_log(docker, &name, &s.alias, log).await;
            return Err(why);
        }
    }
    Ok(network)
}

async fn create_network(
    docker: &Docker,
    network: &str,
    build_id: &str,
    attempt: i32,
) -> Result<(), String> {
    let request = NetworkCreateRequest {
        name: network.to_owned(),
        driver: Some("bridge".into()),
        internal: Some(true),
        labels: Some(HashMap::from([
            (BUILD_LABEL.to_owned(), build_id.to_owned()),
            (ATTEMPT_LABEL.to_owned(), attempt.to_string()),
        ])),
        options: Some(HashMap::from([(
            // The bridge gets no address of the host: containers on it
            // cannot reach the host either.
            "com.docker.network.bridge.inhibit_ipv4".to_owned(),
            "true".to_owned(),
        )])),
        ..Default::default()
    };
    match docker.create_network(request).await {
        Ok(_) => Ok(()),
        Err(e) => Err(format!(
            "cannot create the build's network: {}",
            gantry_docker::error_text(&e)
        )),
    }
}

async fn wait_ready(
    docker: &Docker,
    name: &str,
    s: &ServiceSpec,
    log: &LogSink,
) -> Result<(), String> {
    let started = Instant::now();
    loop {
        match gantry_docker::readiness(docker, name).await {
            Ok(Readiness::Ready { checked }) => {
                let how = if checked {
                    "healthy"
                } else {
                    "running (no health check)"
                };
                log.system(
                    STEP,
                    format!(
                        "{} is {how} after {:.1}s",
                        s.alias,
                        started.elapsed().as_secs_f32()
                    ),
                )
                .await;
                return Ok(());
            }
            Ok(Readiness::Stopped(code)) => {
                return Err(format!(
                    "service {} stopped (exit code {code}) before the tests",
                    s.alias
                ));
            }
            Ok(Readiness::Unhealthy) => return Err(format!("service {} is unhealthy", s.alias)),
            Ok(Readiness::Starting) => {}
            Err(e) => {
                return Err(format!(
                    "cannot inspect service {}: {}",
                    s.alias,
                    gantry_docker::error_text(&e)
                ));
            }
        }
        if started.elapsed() >= s.wait {
            return Err(format!(
                "service {} was not ready within {}s",
                s.alias,
                s.wait.as_secs()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Puts the end of a failed service's own log into the build's log.
async fn copy_log(docker: &Docker, name: &str, alias: &str, log: &LogSink) {
    log.system(STEP, format!("--- last lines of {alias}'s log ---"))
        .await;
    let mut lines = docker.logs(
        name,
        Some(LogsOptions {
            stdout: true,
            stderr: true,
            tail: LOG_TAIL.into(),
            ..Default::default()
        }),
    );
    while let Some(Ok(chunk)) = lines.next().await {
        log.write(STEP, "stdout", &chunk.into_bytes()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repositories_of_references() {
        assert_eq!(
            repository_of("127.0.0.1:5000/team/db:15"),
            "127.0.0.1:5000/team/db"
        );
        assert_eq!(
            repository_of("127.0.0.1:5000/team/db"),
            "127.0.0.1:5000/team/db"
        );
        assert_eq!(repository_of("reg.example/db@sha256:ab"), "reg.example/db");
        assert_eq!(
            repository_of("reg.example/db:1@sha256:ab"),
            "reg.example/db"
        );
    }
}
