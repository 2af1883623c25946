//! Deploying stack releases to a stack's environments (Docker target).
//!
//! A release is queued for every environment of its stack whose rules take
//! the stack's default branch (and by hand: `Stacks.Deploy`,
//! `Stacks.Rollback`) as a row of the `stack_deployments` leased queue
//! ([`STACK_DEPLOYMENTS`]): one running per environment, the newest waiting
//! release supersedes older ones, a dead deployer's work is taken over.
//!
//! A deployment touches only the services whose image changed, one at a
//! time, dependencies first, start-first: the new container starts beside
//! the old one on the environment's network (both answer to the service's
//! name for a moment), must become healthy (the service's health check; the
//! environment's HTTP probe for the service behind its endpoint), then the
//! endpoint switches and the old container is stopped — kept until the whole
//! release runs. If any service fails, every service already switched goes
//! back to its old container (started again), the new containers are
//! removed, and the release is blocked in that environment: the whole
//! environment is back on the previous release. Services the release no
//! longer has are removed once it runs.
//!
//! Every state change writes its `stack.deploy_*` event in the same transaction.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use gantry_config::{Environment, GantryConfig, HealthCheck, Project};
use gantry_proto::v1::event::Payload;
use gantry_proto::v1::{
    Event, StackDeployFailed, StackDeployRolledBack, StackDeployStarted, StackDeploySucceeded,
    StackDeployment, StackServices,
};
use gantry_queue::{Claim, Queue};
use gantry_retry::Policy;
use prost::Message as _;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use uuid::Uuid;

use crate::docker::{DRAIN, DockerTarget};
use crate::edge::Backends;
use crate::queue::Trigger;
use crate::stack_target::{self, Placement, Running, ServiceSpec};

/// The stack deployments queue: waiting deployments of environments where
/// none runs, oldest first, and running ones whose lease ran out. A claim
/// notes the release that runs there now.
pub const STACK_DEPLOYMENTS: Queue = Queue {
    table: "stack_deployments",
    waiting: "waiting",
    running: "running",
    ready: "NOT EXISTS (SELECT 1 FROM stack_deployments r
                        WHERE r.environment = q.environment AND r.state = 'running')",
    order: "q.created_at",
    on_claim: "started_at = now(),
               previous_release = (SELECT l.release FROM stack_live l
                                   WHERE l.environment = stack_deployments.environment)",
};

/// How often the queue is looked at without a wake-up.
const POLL: Duration = Duration::from_secs(2);

/// One row of `stack_deployments`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Row {
    pub id: Uuid,
    pub environment: String,
    pub stack: String,
    pub release: i64,
    pub pipeline_id: String,
    pub trigger: String,
    pub state: String,
    pub reason: Option<String>,
    pub previous_release: Option<i64>,
    pub traceparent: Option<String>,
    pub attempt: i32,
    pub created_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

pub const COLUMNS: &str = "id, environment, stack, release, pipeline_id, trigger, state, reason, previous_release, traceparent, attempt, created_at, finished_at";

impl Row {
    fn message(&self, stack_commit: &str) -> StackDeployment {
        StackDeployment {
            deployment_id: self.id.to_string(),
            environment: self.environment.clone(),
            stack: self.stack.clone(),
            release: self.release as u64,
            previous_release: self.previous_release.unwrap_or_default() as u64,
            trigger: self.trigger.clone(),
            stack_commit: stack_commit.to_owned(),
        }
    }

    fn event(&self, payload: Payload) -> Event {
        Event::new(&self.pipeline_id, &self.stack, payload)
    }

    fn claim(&self, owner: &str) -> Claim<Uuid> {
        Claim {
            id: self.id,
            owner: owner.to_owned(),
            attempt: self.attempt,
        }
    }
}

/// Queues `release` of `stack` for `environment`; deployments still waiting
/// there are superseded. The caller's transaction writes it.
pub async fn enqueue(
    tx: &mut Transaction<'_, Postgres>,
    environment: &str,
    stack: &str,
    release: i64,
    pipeline_id: &str,
    trigger: Trigger,
) -> sqlx::Result<Row> {
    sqlx::query("SELECT name FROM environments WHERE name = $1 FOR UPDATE")
        .bind(environment)
        .fetch_optional(&mut **tx)
        .await?;
    sqlx::query(
        "UPDATE stack_deployments SET state = 'superseded', finished_at = now(),
                reason = 'a newer release was queued for this environment'
         WHERE environment = $1 AND state = 'waiting'",
    )
    .bind(environment)
    .execute(&mut **tx)
    .await?;
    sqlx::query_as::<_, Row>(sqlx::AssertSqlSafe(format!(
        "INSERT INTO stack_deployments (id, environment, stack, release, pipeline_id, trigger, traceparent)
         VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING {COLUMNS}"
    )))
    .bind(Uuid::now_v7())
    .bind(environment)
    .bind(stack)
    .bind(release)
    .bind(pipeline_id)
    .bind(trigger.as_str())
    .bind(gantry_telemetry::current_traceparent())
    .fetch_one(&mut **tx)
    .await
}

/// Whether `release` failed in `environment` before.
pub async fn is_blocked(
    tx: &mut Transaction<'_, Postgres>,
    environment: &str,
    release: i64,
) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM stack_blocked WHERE environment = $1 AND release = $2)",
    )
    .bind(environment)
    .bind(release)
    .fetch_one(&mut **tx)
    .await
}

/// Blocks `release` in `environment` (it failed, or was rolled back by hand).
pub async fn block(
    tx: &mut Transaction<'_, Postgres>,
    environment: &str,
    release: i64,
    reason: &str,
) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO stack_blocked (environment, release, reason) VALUES ($1, $2, $3)
         ON CONFLICT (environment, release) DO NOTHING",
    )
    .bind(environment)
    .bind(release)
    .bind(reason)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The environments of `stack` that take a new release automatically.
pub fn auto_environments<'a>(
    config: &'a GantryConfig,
    stack: &'a Project,
) -> impl Iterator<Item = &'a Environment> + 'a {
    config
        .environments
        .iter()
        .filter(move |e| e.project == stack.name && e.matches(&stack.default_branch, ""))
}

/// Every stack environment's live address (for the endpoints at start).
pub async fn live_addresses(pool: &PgPool) -> sqlx::Result<Vec<(String, Option<String>)>> {
    sqlx::query_as("SELECT environment, address FROM stack_live")
        .fetch_all(pool)
        .await
}

/// The release that runs in `environment`, with its deployment.
pub async fn live_release(
    pool: &PgPool,
    environment: &str,
) -> sqlx::Result<Option<(i64, chrono::DateTime<chrono::Utc>)>> {
    sqlx::query_as("SELECT release, since FROM stack_live WHERE environment = $1")
        .bind(environment)
        .fetch_optional(pool)
        .await
}

pub struct StackWorker {
    pub pool: PgPool,
    pub target: Arc<DockerTarget>,
    pub config: Arc<GantryConfig>,
    pub backends: Backends,
    pub owner: String,
    pub wake: Arc<Notify>,
    pub relay_wake: Arc<Notify>,
    pub concurrency: usize,
    pub lease: Duration,
}

/// Why a deployment did not take: the reason, and whether the release
/// itself failed (then the environment rolled back and it is blocked).
struct Failed {
    reason: String,
    release_fault: bool,
}

impl StackWorker {
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut running = tokio::task::JoinSet::new();
        while !shutdown.is_cancelled() {
            while running.len() < self.concurrency {
                match self.claim().await {
                    Ok(Some(row)) => {
                        self.relay_wake.notify_one();
                        running.spawn(self.clone().deploy(row));
                    }
                    Ok(None) => break,
                    Err(e) => {
                        tracing::warn!(error = format!("{e:#}"), "cannot claim a stack deployment");
                        break;
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => {}
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(POLL) => {}
                Some(_) = running.join_next(), if !running.is_empty() => {}
            }
        }
        let _ = tokio::time::timeout(gantry_runtime::GRACE_PERIOD, async {
            while running.join_next().await.is_some() {}
        })
        .await;
    }

    async fn stack_commit(&self, row: &Row) -> String {
        sqlx::query_scalar(
            "SELECT stack_commit FROM stack_releases WHERE stack = $1 AND number = $2",
        )
        .bind(&row.stack)
        .bind(row.release)
        .fetch_optional(&self.pool)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
    }

    /// Claims the next stack deployment and writes `stack.deploy_started`.
    async fn claim(&self) -> anyhow::Result<Option<Row>> {
        let mut tx = self.pool.begin().await?;
        let Some(claim) = STACK_DEPLOYMENTS
            .claim::<Uuid>(&mut tx, &self.owner, self.lease)
            .await?
        else {
            return Ok(None);
        };
        let row = sqlx::query_as::<_, Row>(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM stack_deployments WHERE id = $1"
        )))
        .bind(claim.id)
        .fetch_one(&mut *tx)
        .await?;
        let commit: Option<String> = sqlx::query_scalar(
            "SELECT stack_commit FROM stack_releases WHERE stack = $1 AND number = $2",
        )
        .bind(&row.stack)
        .bind(row.release)
        .fetch_optional(&mut *tx)
        .await?;
        let event = row.event(Payload::StackDeployStarted(StackDeployStarted {
            deployment: Some(row.message(&commit.unwrap_or_default())),
        }));
        gantry_bus::enqueue_traced(&mut tx, &event, row.traceparent.as_deref()).await?;
        tx.commit().await?;
        Ok(Some(row))
    }

    async fn deploy(self: Arc<Self>, row: Row) {
        let span = tracing::info_span!(
            "stack_deploy",
            deployment = %row.id,
            environment = %row.environment,
            stack = %row.stack,
            release = row.release,
            attempt = row.attempt
        );
        if let Some(tp) = &row.traceparent {
            gantry_telemetry::set_parent(&span, tp);
        }
        gantry_queue::hold(
            &STACK_DEPLOYMENTS,
            &self.pool,
            &row.claim(&self.owner),
            self.lease,
            self.execute(&row),
            None,
        )
        .instrument(span)
        .await;
    }

    async fn execute(&self, row: &Row) {
        let commit = self.stack_commit(row).await;
        let env = self
            .config
            .environment(&row.environment)
            .filter(|e| e.project == row.stack)
            .cloned();
        let stack = self
            .config
            .project(&row.stack)
            .filter(|p| p.is_stack())
            .cloned();
        let (Some(env), Some(stack)) = (env, stack) else {
            self.finish(
                row,
                &commit,
                Err(Failed {
                    reason: "the environment or its stack is no longer configured".into(),
                    release_fault: false,
                }),
                Vec::new(),
                None,
            )
            .await;
            return;
        };
        let outcome = self.roll_out(row, &env, &stack).await;
        let (changed, address) = match &outcome {
            Ok((changed, address)) => (changed.clone(), *address),
            Err(_) => (Vec::new(), None),
        };
        let result = outcome.map(|_| ());
        if result.is_ok() && env.endpoint.is_some() && address.is_some() {
            self.backends.set(&env.name, address);
        }
        self.finish(row, &commit, result, changed, address).await;
    }

    /// Rolls the release out; the services it replaced and the address of
    /// the environment's service.
    async fn roll_out(
        &self,
        row: &Row,
        env: &Environment,
        stack: &Project,
    ) -> Result<(Vec<String>, Option<SocketAddr>), Failed> {
        let docker = &self.target.docker;
        let not_release = |reason: String| Failed {
            reason,
            release_fault: false,
        };
        let (compose, services): (String, Vec<u8>) = sqlx::query_as(
            "SELECT compose, services FROM stack_releases WHERE stack = $1 AND number = $2",
        )
        .bind(&row.stack)
        .bind(row.release)
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| not_release(format!("cannot read the release: {e}")))?
        .ok_or_else(|| {
            not_release(format!(
                "release {} of {} does not exist",
                row.release, row.stack
            ))
        })?;
        let compose: serde_json::Value = serde_json::from_str(&compose)
            .map_err(|e| not_release(format!("the release's compose file: {e}")))?;
        let services = StackServices::decode(services.as_slice())
            .map_err(|e| not_release(format!("the release's services: {e}")))?
            .services;
        let specs = stack_target::services_of(&compose, &services);
        stack_target::ensure_network(docker, env)
            .await
            .map_err(|e| not_release(format!("{e:#}")))?;

        // What runs now: the live release's containers; anything an earlier
        // attempt of this deployment left is removed, and what it stopped
        // runs again.
        let mut current: HashMap<String, Running> = HashMap::new();
        for (service, c) in stack_target::containers(docker, &env.name).await {
            if c.deployment == row.id.to_string() {
                self.target.remove(&c.container).await;
            } else {
                let _ = docker.start_container(&c.container, None).await;
                current.insert(service, c);
            }
        }
        let placement = Placement {
            env,
            limits: &stack.limits,
            stack: &stack.name,
            release: row.release as u64,
            deployment: &row.id.to_string(),
        };
        // (service, old container, new container) of the services switched so far.
        let mut switched: Vec<(String, Option<String>, String)> = Vec::new();
        let mut address = None;
        for spec in &specs {
            let exposed = env.service.as_deref() == Some(spec.name.as_str());
            let old = current.get(&spec.name);
            if let Some(old) = old.filter(|o| o.image == spec.image) {
                if exposed {
                    address = self
                        .target
                        .wait_healthy(&service_env(env, exposed), &old.container)
                        .await
                        .ok()
                        .flatten();
                }
                continue;
            }
            tracing::info!(service = %spec.name, image = %spec.image, "replacing");
            match self.start_service(&placement, spec, exposed).await {
                Ok((new, addr)) => {
                    if exposed {
                        address = addr;
                        if env.endpoint.is_some() {
                            self.backends.set(&env.name, addr);
                        }
                    }
                    if let Some(old) = old {
                        tokio::time::sleep(if exposed { DRAIN } else { Duration::ZERO }).await;
                        let _ = docker
                            .stop_container(
                                &old.container,
                                Some(bollard::query_parameters::StopContainerOptions {
                                    t: Some(10),
                                    ..Default::default()
                                }),
                            )
                            .await;
                    }
                    switched.push((spec.name.clone(), old.map(|o| o.container.clone()), new));
                }
                Err((reason, new)) => {
                    if let Some(new) = new {
                        self.target.remove(&new).await;
                    }
                    self.roll_back(env, &current, switched).await;
                    return Err(Failed {
                        reason: format!("service {}: {reason}", spec.name),
                        release_fault: true,
                    });
                }
            }
        }
        // The release runs: the old containers go, and so do services it no longer has.
        for (_, old, _) in &switched {
            if let Some(old) = old {
                self.target.remove(old).await;
            }
        }
        for (service, c) in &current {
            if !specs.iter().any(|s| &s.name == service) {
                self.target.retire(&c.container).await;
            }
        }
        Ok((switched.into_iter().map(|(s, _, _)| s).collect(), address))
    }

    /// Pulls, creates, starts and health-checks a service's new container.
    async fn start_service(
        &self,
        at: &Placement<'_>,
        spec: &ServiceSpec,
        exposed: bool,
    ) -> Result<(String, Option<SocketAddr>), (String, Option<String>)> {
        let docker = &self.target.docker;
        let present = docker.inspect_image(&spec.image).await.is_ok();
        if spec.member || !present {
            let repository = spec.image.split('@').next().unwrap_or_default();
            let registry = self.config.registry_for(repository);
            Policy::Pull(4)
                .retry("pull a stack service's image", || {
                    gantry_docker::pull(docker, &spec.image, &registry)
                })
                .await
                .map_err(|g| (format!("{:#}", g.error), None))?;
        }
        let id = stack_target::create(docker, at, spec)
            .await
            .map_err(|e| (format!("{e:#}"), None))?;
        if let Err(e) = self.target.start(&id).await {
            return Err((format!("{e:#}"), Some(id)));
        }
        match self
            .target
            .wait_healthy(&service_env(at.env, exposed), &id)
            .await
        {
            Ok(addr) => Ok((id, addr)),
            Err(e) => Err((format!("{e:#}"), Some(id))),
        }
    }

    /// Puts the services switched so far back on their old containers.
    async fn roll_back(
        &self,
        env: &Environment,
        current: &HashMap<String, Running>,
        switched: Vec<(String, Option<String>, String)>,
    ) {
        let docker = &self.target.docker;
        for (service, old, new) in switched.into_iter().rev() {
            if let Some(old) = &old {
                let _ = docker.start_container(old, None).await;
                let exposed = env.service.as_deref() == Some(service.as_str());
                if let Ok(addr) = self
                    .target
                    .wait_healthy(&service_env(env, exposed), old)
                    .await
                    && exposed
                    && env.endpoint.is_some()
                {
                    self.backends.set(&env.name, addr);
                }
            }
            self.target.remove(&new).await;
        }
        let _ = current;
    }

    /// Records how the deployment ended, with its events.
    async fn finish(
        &self,
        row: &Row,
        commit: &str,
        result: Result<(), Failed>,
        changed: Vec<String>,
        address: Option<SocketAddr>,
    ) {
        let write = || async {
            let mut tx = self.pool.begin().await?;
            let (state, reason) = match &result {
                Ok(()) => ("succeeded", None),
                Err(f) if f.release_fault && row.previous_release.is_some() => {
                    ("rolled_back", Some(f.reason.as_str()))
                }
                Err(f) => ("failed", Some(f.reason.as_str())),
            };
            let done = sqlx::query(sqlx::AssertSqlSafe(format!(
                "UPDATE stack_deployments SET state = $4, reason = $5, finished_at = now(), lease_until = NULL
                 WHERE {}",
                STACK_DEPLOYMENTS.held()
            )))
            .bind(row.id)
            .bind(&self.owner)
            .bind(row.attempt)
            .bind(state)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
            if done.rows_affected() == 0 {
                return anyhow::Ok(());
            }
            let message = row.message(commit);
            match &result {
                Ok(()) => {
                    sqlx::query(
                        "INSERT INTO stack_live (environment, deployment_id, release, address, since)
                         VALUES ($1, $2, $3, $4, now())
                         ON CONFLICT (environment) DO UPDATE SET deployment_id = EXCLUDED.deployment_id,
                             release = EXCLUDED.release, address = EXCLUDED.address, since = EXCLUDED.since",
                    )
                    .bind(&row.environment)
                    .bind(row.id)
                    .bind(row.release)
                    .bind(address.map(|a| a.to_string()))
                    .execute(&mut *tx)
                    .await?;
                    let endpoint = self
                        .config
                        .environment(&row.environment)
                        .and_then(|e| e.endpoint.clone())
                        .unwrap_or_default();
                    let event = row.event(Payload::StackDeploySucceeded(StackDeploySucceeded {
                        deployment: Some(message),
                        endpoint,
                        changed: changed.clone(),
                    }));
                    gantry_bus::enqueue_traced(&mut tx, &event, row.traceparent.as_deref()).await?;
                }
                Err(f) => {
                    if f.release_fault {
                        block(&mut tx, &row.environment, row.release, &f.reason).await?;
                    }
                    let failed = row.event(Payload::StackDeployFailed(StackDeployFailed {
                        deployment: Some(message.clone()),
                        reason: f.reason.clone(),
                    }));
                    gantry_bus::enqueue_traced(&mut tx, &failed, row.traceparent.as_deref())
                        .await?;
                    if state == "rolled_back" {
                        let back =
                            row.event(Payload::StackDeployRolledBack(StackDeployRolledBack {
                                deployment: Some(message),
                                reason: f.reason.clone(),
                            }));
                        gantry_bus::enqueue_traced(&mut tx, &back, row.traceparent.as_deref())
                            .await?;
                    }
                }
            }
            tx.commit().await?;
            anyhow::Ok(())
        };
        match Policy::Record
            .retry("record the stack deployment", write)
            .await
        {
            Ok(()) => self.relay_wake.notify_one(),
            Err(gave_up) => tracing::error!(
                error = format!("{:#}", gave_up.error),
                "stack deployment outcome not recorded"
            ),
        }
        match &result {
            Ok(()) => tracing::info!(?changed, "stack release deployed"),
            Err(f) => tracing::warn!(reason = %f.reason, "stack deployment failed"),
        }
    }
}

/// The environment as one service sees it: the endpoint's port and HTTP
/// probe only for the service behind the endpoint.
fn service_env(env: &Environment, exposed: bool) -> Environment {
    Environment {
        port: env.port.filter(|_| exposed),
        health: HealthCheck {
            http: env.health.http.clone().filter(|_| exposed),
            timeout: env.health.timeout,
        },
        ..env.clone()
    }
}
