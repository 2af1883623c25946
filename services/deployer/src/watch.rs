//! Watching what runs, after its deployment: every [`EVERY`] the deployer
//! looks at the live container of each Docker environment — running, its
//! image's health check not `unhealthy`, and the environment's HTTP probe
//! answering when it has one. Two bad looks in a row make it unhealthy,
//! one good look healthy again. A change is an event,
//! `environment.unhealthy` (with why) or `environment.recovered`, written
//! with the environment's new state (`environment_health`) in one
//! transaction that first locks that state: told once, whatever the number
//! of deployer replicas. An engine that cannot be asked says nothing about
//! the application. A healthy container that came back at another address
//! (started again) is recorded there, and the endpoint follows it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bollard::Docker;
use bollard::models::HealthStatusEnum;
use gantry_config::{Environment, GantryConfig};
use gantry_proto::v1::event::Payload;
use gantry_proto::v1::{EnvironmentRecovered, EnvironmentUnhealthy, Event};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::edge::Backends;
use crate::queue::{self, Live};

/// How often each environment is looked at.
pub const EVERY: Duration = Duration::from_secs(2);
/// Bad looks in a row before an environment is unhealthy.
const BAD_LOOKS: u32 = 2;
/// How long the HTTP probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// What a look found: `None` healthy, `Some(why)` not; no verdict when the
/// container is still starting or the engine could not be asked. With it,
/// the service's address in the container now.
async fn look(
    docker: &Docker,
    http: &reqwest::Client,
    env: &Environment,
    live: &Live,
) -> Option<(Option<String>, Option<SocketAddr>)> {
    let info = match docker.inspect_container(&live.container_id, None).await {
        Ok(info) => info,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => return Some((Some("its container is gone".into()), None)),
        Err(e) => {
            tracing::debug!(error = %e, "cannot inspect the live container");
            return None;
        }
    };
    let state = info.state.clone().unwrap_or_default();
    let address = crate::docker::address_in(&info, env);
    let unhealthy = |why: String| Some((Some(why), address));
    if state.running != Some(true) || state.restarting == Some(true) {
        return unhealthy(format!(
            "its container {} (exit code {})",
            state
                .status
                .map_or_else(|| "stopped".to_owned(), |s| format!("is {s}")),
            state.exit_code.unwrap_or_default()
        ));
    }
    match state.health.as_ref().and_then(|h| h.status) {
        Some(HealthStatusEnum::UNHEALTHY) => {
            return unhealthy(format!(
                "its health check fails: {}",
                crate::target::clip(&crate::docker::last_check_output(&state))
            ));
        }
        Some(HealthStatusEnum::STARTING) => return None,
        _ => {}
    }
    // The address it has now (a container started again may have another).
    if let (Some(path), Some(at)) = (&env.health.http, address) {
        let url = format!("http://{at}{path}");
        match http.get(&url).timeout(PROBE_TIMEOUT).send().await {
            Ok(r) if r.status().is_success() || r.status().is_redirection() => {}
            Ok(r) => return unhealthy(format!("GET {path} answers {}", r.status())),
            Err(e) => {
                return unhealthy(format!("GET {path} gets no answer ({})", e.without_url()));
            }
        }
    }
    Some((None, address))
}

/// Records the environment's state if it changed, with its event; whether
/// an event was written.
async fn record(
    pool: &PgPool,
    env: &Environment,
    live: &Live,
    unhealthy: Option<&str>,
) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    sqlx::query!(
        "INSERT INTO environment_health (environment, healthy, deployment_id)
         VALUES ($1, TRUE, $2) ON CONFLICT (environment) DO NOTHING",
        env.name,
        live.deployment_id,
    )
    .execute(&mut *tx)
    .await?;
    let was = sqlx::query!(
        "SELECT healthy, deployment_id FROM environment_health WHERE environment = $1 FOR UPDATE",
        env.name
    )
    .fetch_one(&mut *tx)
    .await?;
    // What runs may have changed since it was read: a deployment switched.
    let still_live = sqlx::query_scalar!(
        "SELECT deployment_id FROM live WHERE environment = $1",
        env.name
    )
    .fetch_optional(&mut *tx)
    .await?
        == Some(live.deployment_id);
    let healthy = unhealthy.is_none();
    if !still_live {
        return Ok(false);
    }
    if was.healthy == healthy {
        // No change to tell; a new version in the same state is noted as
        // the one the state is about (`gantry envs` shows it).
        if was.deployment_id != live.deployment_id {
            sqlx::query!(
                "UPDATE environment_health SET deployment_id = $2, reason = $3, since = now()
                 WHERE environment = $1",
                env.name,
                live.deployment_id,
                unhealthy,
            )
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
        }
        return Ok(false);
    }
    sqlx::query!(
        "UPDATE environment_health SET healthy = $2, deployment_id = $3, reason = $4, since = now()
         WHERE environment = $1",
        env.name,
        healthy,
        live.deployment_id,
        unhealthy,
    )
    .execute(&mut *tx)
    .await?;
    let row = queue::deployment_rows!("WHERE id = $1", live.deployment_id)
        .fetch_one(&mut *tx)
        .await?;
    let payload = match unhealthy {
        Some(reason) => Payload::EnvironmentUnhealthy(EnvironmentUnhealthy {
            deployment: Some(row.message()),
            reason: reason.to_owned(),
        }),
        None => Payload::EnvironmentRecovered(EnvironmentRecovered {
            deployment: Some(row.message()),
        }),
    };
    let event = Event::new(&row.pipeline_id, &row.project, payload);
    gantry_bus::enqueue_traced(&mut tx, &event, None).await?;
    tx.commit().await?;
    match unhealthy {
        Some(reason) => tracing::warn!(environment = %env.name, reason, "environment unhealthy"),
        None => tracing::info!(environment = %env.name, "environment healthy again"),
    }
    Ok(true)
}

/// Records `at` as the live container's address if it moved, and points
/// this deployer's endpoint of the environment at it.
async fn follow_address(
    pool: &PgPool,
    backends: &Backends,
    env: &Environment,
    live: &Live,
    at: SocketAddr,
) {
    let address = at.to_string();
    if live.address.as_deref() != Some(address.as_str()) {
        let moved = sqlx::query!(
            "UPDATE live SET address = $3 WHERE environment = $1 AND deployment_id = $2",
            env.name,
            live.deployment_id,
            address,
        )
        .execute(pool)
        .await;
        match moved {
            Ok(_) => {
                tracing::info!(environment = %env.name, %address, "the live container's address moved")
            }
            Err(e) => tracing::warn!(error = %e, "cannot record the live container's address"),
        }
    }
    if env.endpoint.is_some() && backends.get(&env.name) != Some(at) {
        backends.set(&env.name, Some(at));
    }
}

/// Watches every Docker environment of a service project until `shutdown`.
pub async fn watch(
    pool: PgPool,
    docker: Docker,
    config: Arc<GantryConfig>,
    backends: Backends,
    relay_wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let http = reqwest::Client::new();
    let mut bad: HashMap<String, u32> = HashMap::new();
    let watched: Vec<&Environment> = config
        .environments
        .iter()
        .filter(|e| e.target == "docker")
        .filter(|e| config.project(&e.project).is_some_and(|p| !p.is_stack()))
        .collect();
    loop {
        let mut told = false;
        for env in &watched {
            let live = match queue::live(&pool, &env.name).await {
                Ok(Some(live)) => live,
                Ok(None) => continue,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read what runs");
                    continue;
                }
            };
            let Some((verdict, address)) = look(&docker, &http, env, &live).await else {
                continue;
            };
            // A container started again may have another address: what
            // runs is recorded there, and this deployer's endpoint follows.
            if verdict.is_none()
                && let Some(at) = address
            {
                follow_address(&pool, &backends, env, &live, at).await;
            }
            let count = bad.entry(env.name.clone()).or_default();
            *count = if verdict.is_some() { *count + 1 } else { 0 };
            if verdict.is_some() && *count < BAD_LOOKS {
                continue;
            }
            match record(&pool, env, &live, verdict.as_deref()).await {
                Ok(wrote) => told |= wrote,
                Err(e) => {
                    tracing::warn!(error = %e, environment = %env.name, "cannot record the environment's health")
                }
            }
        }
        if told {
            relay_wake.notify_one();
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}
