//! Deploying stack releases to a stack's environments (Docker target; a
//! Rancher environment's stack is Rancher's to change, see
//! [`crate::rancher_stack`]).
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
use tracing::Instrument as _;
use uuid::Uuid;

use crate::docker::{DRAIN, DockerTarget};
use crate::edge::Backends;
use crate::queue::Trigger;
use crate::stack_target::{self, Placement, ServiceSpec};

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

/// The columns of [`Row`], for the one query that picks its condition at
/// run time (`Stacks` environments).
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
    sqlx::query!(
        "SELECT name FROM environments WHERE name = $1 FOR UPDATE",
        environment
    )
    .fetch_optional(&mut **tx)
    .await?;
    sqlx::query!(
        "UPDATE stack_deployments SET state = 'superseded', finished_at = now(),
                reason = 'a newer release was queued for this environment'
         WHERE environment = $1 AND state = 'waiting'",
        environment
    )
    .execute(&mut **tx)
    .await?;
    sqlx::query_as!(
        Row,
        "INSERT INTO stack_deployments (id, environment, stack, release, pipeline_id, trigger, traceparent)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         RETURNING id, environment, stack, release, pipeline_id, trigger, state, reason,
                   previous_release, traceparent, attempt, created_at, finished_at",
        Uuid::now_v7(),
        environment,
        stack,
        release,
        pipeline_id,
        trigger.as_str(),
        gantry_telemetry::current_traceparent(),
    )
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
    sqlx::query!(
        "INSERT INTO stack_blocked (environment, release, reason) VALUES ($1, $2, $3)
         ON CONFLICT (environment, release) DO NOTHING",
        environment,
        release,
        reason,
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The environments of `stack` that take a new release automatically.
pub fn auto_environments<'a>(
    config: &'a GantryConfig,
    stack: &'a Project,
) -> impl Iterator<Item = &'a Environment> + 'a {
    config.environments.iter().filter(move |e| {
        e.project == stack.name
            && e.matches(gantry_config::Origin {
                branch: &stack.default_branch,
                ..Default::default()
            })
    })
}

/// Every stack environment's live address (for the endpoints at start).
pub async fn live_addresses(pool: &PgPool) -> sqlx::Result<Vec<(String, Option<String>)>> {
    let rows = sqlx::query!("SELECT environment, address FROM stack_live")
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.environment, r.address))
        .collect())
}

/// The release that runs in `environment`, with its deployment.
pub async fn live_release(
    pool: &PgPool,
    environment: &str,
) -> sqlx::Result<Option<(i64, chrono::DateTime<chrono::Utc>)>> {
    let row = sqlx::query!(
        "SELECT release, since FROM stack_live WHERE environment = $1",
        environment
    )
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|r| (r.release, r.since)))
}

pub struct StackWorker {
    pub pool: PgPool,
    pub target: Arc<DockerTarget>,
    /// The HTTP client of Rancher environments.
    pub rancher: reqwest::Client,
    pub config: Arc<GantryConfig>,
    pub backends: Backends,
    pub owner: String,
    pub wake: Arc<Notify>,
    pub relay_wake: Arc<Notify>,
    pub concurrency: usize,
    pub lease: Duration,
}

/// A stored stack release.
struct StoredRelease {
    compose: serde_json::Value,
    services: Vec<gantry_proto::v1::StackService>,
    rancher_compose: String,
}

/// Why a deployment did not take: the reason, and whether the release
/// itself failed (then the environment rolled back and it is blocked).
struct Failed {
    reason: String,
    release_fault: bool,
}

impl crate::worker::Claims for StackWorker {
    type Row = Row;
    const WHAT: &'static str = "stack deployment";

    async fn claim(&self) -> anyhow::Result<Option<Row>> {
        self.claim_next().await
    }

    fn work(self: Arc<Self>, row: Row) -> impl std::future::Future<Output = ()> + Send + 'static {
        self.deploy(row)
    }

    fn concurrency(&self) -> usize {
        self.concurrency
    }

    fn wake(&self) -> &Notify {
        &self.wake
    }

    fn relay_wake(&self) -> &Notify {
        &self.relay_wake
    }
}

impl StackWorker {
    async fn stack_commit(&self, row: &Row) -> String {
        sqlx::query_scalar!(
            "SELECT stack_commit FROM stack_releases WHERE stack = $1 AND number = $2",
            row.stack,
            row.release,
        )
        .fetch_optional(&self.pool)
        .await
        .ok()
        .flatten()
        .unwrap_or_default()
    }

    /// Claims the next stack deployment and writes `stack.deploy_started`.
    async fn claim_next(&self) -> anyhow::Result<Option<Row>> {
        let mut tx = self.pool.begin().await?;
        let Some(claim) = STACK_DEPLOYMENTS
            .claim::<Uuid>(&mut tx, &self.owner, self.lease)
            .await?
        else {
            return Ok(None);
        };
        let row = sqlx::query_as!(
            Row,
            "SELECT id, environment, stack, release, pipeline_id, trigger, state, reason,
                    previous_release, traceparent, attempt, created_at, finished_at
             FROM stack_deployments WHERE id = $1",
            claim.id
        )
        .fetch_one(&mut *tx)
        .await?;
        let commit = sqlx::query_scalar!(
            "SELECT stack_commit FROM stack_releases WHERE stack = $1 AND number = $2",
            row.stack,
            row.release,
        )
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
            let failed = Failed {
                reason: "the environment or its stack is no longer configured".into(),
                release_fault: false,
            };
            self.finish(row, &commit, Err(failed), &Rollout::default())
                .await;
            return;
        };
        if env.target == "rancher" {
            let mut rollout = Rollout::default();
            let result = self.roll_out_rancher(row, &env, &mut rollout).await;
            self.finish(row, &commit, result, &rollout).await;
            return;
        }
        let mut rollout = Rollout::default();
        let result = self.roll_out(row, &env, &stack, &mut rollout).await;
        if result.is_err() {
            // The environment is back on what ran: point the endpoint at it.
            if let Some(exposed) = env.service.as_deref()
                && let Some(c) = rollout.live.get(exposed)
                && let Ok(addr) = self.target.wait_healthy(&service_env(&env, true), c).await
            {
                rollout.address = addr;
            }
        }
        let recorded = self.finish(row, &commit, result, &rollout).await;
        if env.endpoint.is_some()
            && rollout.address.is_some()
            && (recorded || rollout.switched.is_empty())
        {
            self.backends.set(&env.name, rollout.address);
        }
        if recorded {
            // Only once the new release is recorded do the old containers go.
            for old in &rollout.remove {
                self.target.remove(old).await;
            }
            for old in &rollout.retire {
                self.target.retire(old).await;
            }
        }
    }

    /// What runs now, from the database; everything else of the
    /// environment (what an interrupted deployment left) is removed, and
    /// what it stopped runs again.
    async fn current(&self, env: &Environment) -> Result<HashMap<String, String>, Failed> {
        let not_release = |reason: String| Failed {
            reason,
            release_fault: false,
        };
        let live = sqlx::query!(
            "SELECT service, container FROM stack_live_services WHERE environment = $1",
            env.name
        )
        .fetch_all(&self.pool)
        .await
        .map_err(|e| not_release(format!("cannot read what runs: {e}")))?;
        let live: HashMap<String, String> =
            live.into_iter().map(|r| (r.service, r.container)).collect();
        let found = stack_target::containers(&self.target.docker, &env.name)
            .await
            .map_err(|e| not_release(format!("{e:#}")))?;
        for (_, c) in found {
            if live.values().any(|id| id == &c.container) {
                let _ = self.target.docker.start_container(&c.container, None).await;
            } else {
                self.target.remove(&c.container).await;
            }
        }
        Ok(live)
    }

    /// Release `number` of `stack`, as stored.
    async fn release(&self, stack: &str, number: i64) -> Result<StoredRelease, Failed> {
        let not_release = |reason: String| Failed {
            reason,
            release_fault: false,
        };
        let release = sqlx::query!(
            "SELECT compose, services, rancher_compose FROM stack_releases
             WHERE stack = $1 AND number = $2",
            stack,
            number,
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(|e| not_release(format!("cannot read the release: {e}")))?
        .ok_or_else(|| not_release(format!("release {number} of {stack} does not exist")))?;
        Ok(StoredRelease {
            compose: serde_json::from_str(&release.compose)
                .map_err(|e| not_release(format!("the release's compose file: {e}")))?,
            services: StackServices::decode(release.services.as_slice())
                .map_err(|e| not_release(format!("the release's services: {e}")))?
                .services,
            rancher_compose: release.rancher_compose,
        })
    }

    /// Creates or upgrades the environment's Rancher stack with the
    /// release ([`crate::rancher_stack`]); notes the services whose image
    /// changed since the release that ran.
    async fn roll_out_rancher(
        &self,
        row: &Row,
        env: &Environment,
        rollout: &mut Rollout,
    ) -> Result<(), Failed> {
        let release = self.release(&row.stack, row.release).await?;
        let before = match row.previous_release {
            Some(n) => self.release(&row.stack, n).await.ok(),
            None => None,
        };
        rollout.replaced = release
            .services
            .iter()
            .filter(|s| !s.test)
            .filter(|s| {
                before.as_ref().is_none_or(|b| {
                    !b.services
                        .iter()
                        .any(|o| o.service == s.service && o.image == s.image)
                })
            })
            .map(|s| s.service.clone())
            .collect();
        crate::rancher_stack::roll_out(
            &self.rancher,
            env,
            &crate::rancher_stack::Release {
                stack: &row.stack,
                number: row.release,
                compose: &release.compose,
                services: &release.services,
                rancher_compose: &release.rancher_compose,
            },
        )
        .await
        .map_err(|f| {
            rollout.not_rolled_back = matches!(
                f,
                crate::target::Failure::Failed {
                    rolled_back: false,
                    ..
                }
            );
            Failed {
                reason: f.text(),
                release_fault: matches!(f, crate::target::Failure::Failed { .. }),
            }
        })
    }

    /// Rolls the release out into `rollout`: start-first, service by
    /// service; on a failure, the services switched so far go back.
    async fn roll_out(
        &self,
        row: &Row,
        env: &Environment,
        stack: &Project,
        rollout: &mut Rollout,
    ) -> Result<(), Failed> {
        let docker = &self.target.docker;
        let not_release = |reason: String| Failed {
            reason,
            release_fault: false,
        };
        let release = self.release(&row.stack, row.release).await?;
        let (compose, services) = (release.compose, release.services);
        let specs = stack_target::services_of(&compose, &services);
        if let Some(s) = specs.iter().find(|s| !s.def.is_object()) {
            return Err(not_release(format!(
                "release {} has no definition of service {} (made before stack deployments); deploy a newer one",
                row.release, s.name
            )));
        }
        stack_target::ensure_network(docker, env)
            .await
            .map_err(|e| not_release(format!("{e:#}")))?;
        rollout.live = self.current(env).await?;
        let placement = Placement {
            env,
            limits: &stack.limits,
            stack: &stack.name,
            release: row.release as u64,
            deployment: &row.id.to_string(),
            attempt: row.attempt,
        };
        let previous = sqlx::query_scalar!(
            "SELECT address FROM stack_live WHERE environment = $1",
            env.name
        )
        .fetch_optional(&self.pool)
        .await
        .ok()
        .flatten()
        .flatten();
        rollout.address = previous.and_then(|a| a.parse().ok());
        for spec in &specs {
            let exposed = env.service.as_deref() == Some(spec.name.as_str());
            let wanted = stack_target::spec_hash(&placement, spec);
            let old = rollout.live.get(&spec.name).cloned();
            let unchanged = match &old {
                Some(old) => {
                    stack_target::hash_of(docker, old).await.as_deref() == Some(wanted.as_str())
                }
                None => false,
            };
            if unchanged {
                rollout
                    .next
                    .insert(spec.name.clone(), old.clone().unwrap_or_default());
                if exposed
                    && let Some(old) = &old
                    && let Ok(Some(addr)) =
                        self.target.wait_healthy(&service_env(env, true), old).await
                {
                    rollout.address = Some(addr);
                }
                continue;
            }
            tracing::info!(service = %spec.name, image = %spec.image, "replacing");
            match self.start_service(&placement, spec, exposed).await {
                Ok((new, addr)) => {
                    if exposed {
                        rollout.address = addr;
                        if env.endpoint.is_some() {
                            // New connections go to the new version; the
                            // old one keeps what it has while it drains.
                            self.backends.set(&env.name, addr);
                            tokio::time::sleep(DRAIN).await;
                        }
                    }
                    if let Some(old) = &old {
                        let _ = docker
                            .stop_container(
                                old,
                                Some(bollard::query_parameters::StopContainerOptions {
                                    t: Some(10),
                                    ..Default::default()
                                }),
                            )
                            .await;
                        rollout.remove.push(old.clone());
                    }
                    rollout.next.insert(spec.name.clone(), new.clone());
                    rollout.switched.push((spec.name.clone(), old, new));
                }
                Err(failed) => {
                    self.roll_back(env, rollout).await;
                    return Err(Failed {
                        reason: format!("service {}: {}", spec.name, failed.reason),
                        release_fault: failed.release_fault,
                    });
                }
            }
        }
        // Services the release no longer has go once it is recorded.
        for (service, c) in &rollout.live {
            if !specs.iter().any(|s| &s.name == service) {
                rollout.retire.push(c.clone());
            }
        }
        Ok(())
    }

    /// Pulls, creates, starts and health-checks a service's new container.
    /// A failure that is not the release's (registry, engine) says so.
    async fn start_service(
        &self,
        at: &Placement<'_>,
        spec: &ServiceSpec,
        exposed: bool,
    ) -> Result<(String, Option<SocketAddr>), Failed> {
        let docker = &self.target.docker;
        let engine = |reason: String| Failed {
            reason,
            release_fault: false,
        };
        let present = docker.inspect_image(&spec.image).await.is_ok();
        if spec.member || !present {
            let repository = spec.image.split('@').next().unwrap_or_default();
            let registry = self.config.registry_for(repository);
            Policy::Pull(4)
                .retry("pull a stack service's image", || {
                    gantry_docker::pull(docker, &spec.image, &registry)
                })
                .await
                .map_err(|g| engine(format!("{:#}", g.error)))?;
        }
        let id = stack_target::create(docker, at, spec)
            .await
            .map_err(|e| engine(format!("{e:#}")))?;
        let started = match self.target.start(&id).await {
            Ok(()) => {
                self.target
                    .wait_healthy(&service_env(at.env, exposed), &id)
                    .await
            }
            Err(e) => Err(e),
        };
        match started {
            Ok(addr) => Ok((id, addr)),
            Err(e) => {
                self.target.remove(&id).await;
                Err(Failed {
                    reason: format!("{e:#}"),
                    release_fault: true,
                })
            }
        }
    }

    /// Puts the services switched so far back on their old containers.
    async fn roll_back(&self, env: &Environment, rollout: &mut Rollout) {
        let docker = &self.target.docker;
        for (service, old, new) in std::mem::take(&mut rollout.switched).into_iter().rev() {
            if let Some(old) = &old {
                let _ = docker.start_container(old, None).await;
                let exposed = env.service.as_deref() == Some(service.as_str());
                if let Ok(addr) = self
                    .target
                    .wait_healthy(&service_env(env, exposed), old)
                    .await
                    && exposed
                {
                    rollout.address = addr;
                    if env.endpoint.is_some() {
                        self.backends.set(&env.name, addr);
                    }
                }
            }
            self.target.remove(&new).await;
        }
        rollout.remove.clear();
        rollout.retire.clear();
        rollout.next.clear();
    }

    /// Records how the deployment ended, with its events; whether it was
    /// recorded (a lost claim, or a database away too long, records nothing).
    async fn finish(
        &self,
        row: &Row,
        commit: &str,
        result: Result<(), Failed>,
        rollout: &Rollout,
    ) -> bool {
        let address = rollout.address.map(|a| a.to_string());
        let changed: Vec<String> = rollout
            .switched
            .iter()
            .map(|(s, _, _)| s.clone())
            .chain(rollout.replaced.iter().cloned())
            .collect();
        let write = || async {
            let mut tx = self.pool.begin().await?;
            let (state, reason) = match &result {
                Ok(()) => ("succeeded", None),
                Err(f)
                    if f.release_fault
                        && row.previous_release.is_some()
                        && !rollout.not_rolled_back =>
                {
                    ("rolled_back", Some(f.reason.as_str()))
                }
                Err(f) => ("failed", Some(f.reason.as_str())),
            };
            // The claim condition comes from `gantry-queue`, so this one is checked at run time.
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
                return anyhow::Ok(false);
            }
            let message = row.message(commit);
            match &result {
                Ok(()) => {
                    sqlx::query!(
                        "INSERT INTO stack_live (environment, deployment_id, release, address, since)
                         VALUES ($1, $2, $3, $4, now())
                         ON CONFLICT (environment) DO UPDATE SET deployment_id = EXCLUDED.deployment_id,
                             release = EXCLUDED.release, address = EXCLUDED.address, since = EXCLUDED.since",
                        row.environment,
                        row.id,
                        row.release,
                        address,
                    )
                    .execute(&mut *tx)
                    .await?;
                    sqlx::query!(
                        "DELETE FROM stack_live_services WHERE environment = $1",
                        row.environment
                    )
                    .execute(&mut *tx)
                    .await?;
                    let (services, containers): (Vec<String>, Vec<String>) = rollout
                        .next
                        .iter()
                        .map(|(s, c)| (s.clone(), c.clone()))
                        .unzip();
                    sqlx::query!(
                        "INSERT INTO stack_live_services (environment, service, container)
                         SELECT $1, s, c FROM unnest($2::text[], $3::text[]) AS t(s, c)",
                        row.environment,
                        &services,
                        &containers,
                    )
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
                    // What runs may answer at another address after a restart.
                    sqlx::query!(
                        "UPDATE stack_live SET address = COALESCE($2, address) WHERE environment = $1",
                        row.environment,
                        address,
                    )
                    .execute(&mut *tx)
                    .await?;
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
            anyhow::Ok(true)
        };
        let recorded = match Policy::Record
            .retry("record the stack deployment", write)
            .await
        {
            Ok(recorded) => recorded,
            Err(gave_up) => {
                tracing::error!(
                    error = format!("{:#}", gave_up.error),
                    "stack deployment outcome not recorded; it is taken over when its lease runs out"
                );
                false
            }
        };
        if recorded {
            self.relay_wake.notify_one();
        }
        match &result {
            Ok(()) => tracing::info!(?changed, recorded, "stack release deployed"),
            Err(f) => tracing::warn!(reason = %f.reason, recorded, "stack deployment failed"),
        }
        recorded
    }
}

/// What a deployment did and has to finish doing once it is recorded.
#[derive(Debug, Default)]
struct Rollout {
    /// Service → container that ran when it started (from the database).
    live: HashMap<String, String>,
    /// Service → container of each service once the release runs.
    next: HashMap<String, String>,
    /// (service, old container, new container) switched so far.
    switched: Vec<(String, Option<String>, String)>,
    /// Stopped old containers, removed once the release is recorded.
    remove: Vec<String>,
    /// Containers of services the release no longer has.
    retire: Vec<String>,
    /// Where the environment's service answers.
    address: Option<SocketAddr>,
    /// Services an orchestrator replaced (Rancher), by name.
    replaced: Vec<String>,
    /// The release failed and the orchestrator could not go back to the
    /// previous one (a new Rancher stack, a rollback that did not end).
    not_rolled_back: bool,
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
