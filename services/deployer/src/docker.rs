//! The Docker deploy target (a local engine, or a remote one through
//! `DOCKER_HOST`): pull the image by digest, start the new version beside the
//! old one, wait until it is healthy, and retire the old one — or remove the
//! new one when it never becomes healthy.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, HealthStatusEnum, HostConfig, RestartPolicy, RestartPolicyNameEnum,
};
use bollard::query_parameters::{LogsOptions, StopContainerOptions};
use futures::StreamExt;
use gantry_config::{Environment, Registry};

use anyhow::Context as _;
use gantry_docker::EngineError;

use crate::queue::{Live, Row};
use crate::target::{Failure, Running, Target};

/// The service's address in a container (its ip on the environment's
/// network and the environment's port), when the environment has a port.
pub fn address_in(
    info: &bollard::models::ContainerInspectResponse,
    env: &Environment,
) -> Option<SocketAddr> {
    let ip = info
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.as_ref())
        .and_then(|n| n.get(&env.network))
        .and_then(|n| n.ip_address.clone())
        .filter(|ip| !ip.is_empty())?;
    format!("{ip}:{}", env.port?).parse().ok()
}

/// What the image's health check printed last, trimmed.
pub fn last_check_output(state: &bollard::models::ContainerState) -> String {
    state
        .health
        .as_ref()
        .and_then(|h| h.log.as_ref())
        .and_then(|log| log.last().and_then(|r| r.output.clone()))
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// Labels on every container the deployer starts.
pub mod labels {
    pub const MANAGED: &str = "io.gantry.managed";
    pub const PROJECT: &str = "io.gantry.project";
    pub const ENVIRONMENT: &str = "io.gantry.environment";
    pub const COMMIT: &str = "io.gantry.commit";
    pub const PIPELINE: &str = "io.gantry.pipeline";
    pub const DEPLOYMENT: &str = "io.gantry.deployment";
    pub const DIGEST: &str = "io.gantry.digest";
}

/// How long an image without health check must keep running to count as up.
const SETTLE: Duration = Duration::from_secs(3);
/// Pause between two health observations.
const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// How long one HTTP probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// Time the old version keeps serving connections it already has once the new
/// one took over, before it is asked to stop.
pub const DRAIN: Duration = Duration::from_secs(2);
/// Grace period of `docker stop` for the old version.
const STOP_TIMEOUT_SECS: i32 = 10;
/// Pulls of an image (waiting as `Policy::Pull` says) before the deployment fails.
const PULL_ATTEMPTS: u32 = 4;

pub struct DockerTarget {
    pub docker: Docker,
    http: reqwest::Client,
}

impl DockerTarget {
    pub fn new(docker: Docker) -> anyhow::Result<Self> {
        let http = reqwest::Client::builder()
            .timeout(PROBE_TIMEOUT)
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        Ok(Self { docker, http })
    }

    /// Pulls `row`'s image by digest.
    pub async fn pull(&self, row: &Row, registry: &Registry) -> anyhow::Result<()> {
        gantry_docker::pull(&self.docker, &row.reference(), registry).await
    }

    /// Removes what an earlier attempt of this deployment left behind.
    pub async fn remove_leftovers(&self, row: &Row, keep: Option<&str>) {
        let label = format!("{}={}", labels::DEPLOYMENT, row.id);
        gantry_docker::remove_containers(&self.docker, &label, keep).await;
    }

    /// Creates the new version's container with the environment variables
    /// `vars`; returns its id.
    pub async fn create(
        &self,
        env: &Environment,
        row: &Row,
        vars: &std::collections::BTreeMap<String, String>,
    ) -> anyhow::Result<String> {
        let rev = row.revision();
        let short = &row.id.simple().to_string()[..12];
        let name = format!("gantry-{}-{}", env.name, short);
        let labels = HashMap::from([
            (labels::MANAGED.to_owned(), "true".to_owned()),
            (labels::PROJECT.to_owned(), row.project.clone()),
            (labels::ENVIRONMENT.to_owned(), env.name.clone()),
            (labels::COMMIT.to_owned(), rev.commit_sha.clone()),
            (labels::PIPELINE.to_owned(), row.pipeline_id.clone()),
            (labels::DEPLOYMENT.to_owned(), row.id.to_string()),
            (labels::DIGEST.to_owned(), row.digest.clone()),
        ]);
        let mut vars: Vec<String> = vars.iter().map(|(k, v)| format!("{k}={v}")).collect();
        vars.push(format!("GANTRY_ENVIRONMENT={}", env.name));
        vars.push(format!("GANTRY_COMMIT={}", rev.commit_sha));
        let body = ContainerCreateBody {
            image: Some(row.reference()),
            labels: Some(labels),
            env: Some(vars),
            host_config: Some(HostConfig {
                network_mode: Some(env.network.clone()),
                restart_policy: Some(RestartPolicy {
                    name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                    maximum_retry_count: None,
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        gantry_docker::create_container(&self.docker, &name, body).await
    }

    /// Starts a created container.
    pub async fn start(&self, container: &str) -> anyhow::Result<()> {
        self.docker
            .start_container(container, None)
            .await
            .map_err(EngineError)
            .context("starting the new container")
    }

    /// Waits until the container is healthy: the HTTP probe of the
    /// environment answers 2xx/3xx, else the image's `HEALTHCHECK` reports
    /// healthy, else the container keeps running for a few seconds. Returns
    /// the service address (container ip and port) when the environment has a port.
    pub async fn wait_healthy(
        &self,
        env: &Environment,
        container: &str,
    ) -> anyhow::Result<Option<SocketAddr>> {
        let deadline = tokio::time::Instant::now() + env.health.timeout;
        let started = tokio::time::Instant::now();
        let mut last_problem = String::from("no answer yet");
        loop {
            let info = self
                .docker
                .inspect_container(container, None)
                .await
                .map_err(EngineError)
                .context("inspecting the new container")?;
            let state = info.state.clone().unwrap_or_default();
            if state.running != Some(true) || state.restarting == Some(true) {
                let tail = self.log_tail(container).await;
                anyhow::bail!(
                    "the new container exited with code {}{}",
                    state.exit_code.unwrap_or_default(),
                    if tail.is_empty() {
                        String::new()
                    } else {
                        format!(": {tail}")
                    }
                );
            }
            let address = address_in(&info, env);
            let health = state.health.as_ref().and_then(|h| h.status);
            if let Some(path) = &env.health.http {
                if let Some(addr) = address {
                    match self.http.get(format!("http://{addr}{path}")).send().await {
                        Ok(r) if r.status().is_success() || r.status().is_redirection() => {
                            return Ok(Some(addr));
                        }
                        Ok(r) => last_problem = format!("GET {path} answered {}", r.status()),
                        Err(e) => last_problem = format!("GET {path}: {e}"),
                    }
                } else {
                    last_problem =
                        format!("the container has no address on network {}", env.network);
                }
            } else {
                match health {
                    Some(HealthStatusEnum::HEALTHY) => return Ok(address),
                    Some(HealthStatusEnum::UNHEALTHY) => {
                        anyhow::bail!(
                            "the image's health check reports unhealthy: {}",
                            last_check_output(&state)
                        );
                    }
                    Some(HealthStatusEnum::STARTING) => {
                        last_problem = "health check still starting".into()
                    }
                    _ if started.elapsed() >= SETTLE => return Ok(address),
                    _ => {}
                }
            }
            if tokio::time::Instant::now() >= deadline {
                anyhow::bail!(
                    "not healthy within {}s: {last_problem}",
                    env.health.timeout.as_secs()
                );
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }

    /// The last lines the container wrote, for failure reasons.
    async fn log_tail(&self, container: &str) -> String {
        let mut stream = self.docker.logs(
            container,
            Some(LogsOptions {
                stdout: true,
                stderr: true,
                tail: "5".to_owned(),
                ..Default::default()
            }),
        );
        let mut out = Vec::new();
        while let Some(Ok(chunk)) = stream.next().await {
            out.extend_from_slice(&chunk.into_bytes());
        }
        String::from_utf8_lossy(&out).trim().replace('\n', " | ")
    }

    /// Stops the old version gracefully and removes it.
    pub async fn retire(&self, container: &str) {
        let _ = self
            .docker
            .stop_container(
                container,
                Some(StopContainerOptions {
                    t: Some(STOP_TIMEOUT_SECS),
                    ..Default::default()
                }),
            )
            .await;
        self.remove(container).await;
    }

    /// Removes a container at once (a failed new version).
    pub async fn remove(&self, container: &str) {
        gantry_docker::remove_container(&self.docker, container).await;
    }
}

#[tonic::async_trait]
impl Target for DockerTarget {
    async fn prepare(&self, _env: &Environment, row: &Row, live: Option<&Live>) {
        self.remove_leftovers(row, live.map(|l| l.container_id.as_str()))
            .await;
    }

    /// Pulls (retrying while the registry is away), starts the new version
    /// beside the old one and waits until it is healthy; a new version that
    /// never is gets removed, and the old one (if any) keeps running.
    async fn roll_out(
        &self,
        env: &Environment,
        row: &Row,
        vars: &std::collections::BTreeMap<String, String>,
        registry: &Registry,
        live: Option<&Live>,
    ) -> Result<Running, Failure> {
        gantry_retry::Policy::Pull(PULL_ATTEMPTS)
            .retry("pull the image", || self.pull(row, registry))
            .await
            .map_err(|g| Failure::Refused(g.error.context(format!("{} pulls failed", g.tries))))?;
        let id = self
            .create(env, row, vars)
            .await
            .map_err(Failure::Refused)?;
        let started = match self.start(&id).await {
            Ok(()) => self.wait_healthy(env, &id).await,
            Err(e) => Err(e),
        };
        match started {
            Ok(address) => Ok(Running { id, address }),
            Err(error) => {
                self.remove(&id).await;
                Err(Failure::Failed {
                    error,
                    rolled_back: live.is_some(),
                })
            }
        }
    }

    /// Lets the old version drain the connections it has, then stops it.
    async fn retire(&self, _env: &Environment, old: &Live) {
        tokio::time::sleep(DRAIN).await;
        DockerTarget::retire(self, &old.container_id).await;
    }
}
