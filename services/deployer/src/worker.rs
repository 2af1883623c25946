//! The deployment loop: claims waiting deployments (one per environment at a
//! time, several environments at once) and carries each through the
//! environment's [`Target`](crate::target::Target): the new version rolled
//! out beside the old one until healthy, then it takes over (the endpoint
//! switches, the old version is retired) — or it is taken away and the old
//! one keeps running. Everything but the rollout itself is here, the same
//! for every target.

use std::sync::Arc;
use std::time::Duration;

use gantry_config::GantryConfig;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::edge::Backends;
use crate::queue::{self, Row};
use crate::target::{Failure, Targets};
use gantry_retry::Policy;

/// How often the queue is looked at without a wake-up (another replica's
/// work, expired leases).
const POLL: Duration = Duration::from_secs(2);

pub struct Worker {
    pub pool: PgPool,
    pub targets: Targets,
    pub config: Arc<GantryConfig>,
    pub backends: Backends,
    /// This replica's name in `deployments.owner`.
    pub owner: String,
    /// Wakes the loop when a deployment was queued.
    pub wake: Arc<Notify>,
    /// Wakes the outbox relay when a deploy event was written.
    pub relay_wake: Arc<Notify>,
    /// Deployments of different environments running at once.
    pub concurrency: usize,
    /// How long a claimed deployment stays ours without renewal; a deployer
    /// that dies mid-deployment is taken over once it runs out.
    pub lease: Duration,
}

/// A deployment loop's own parts: how it claims work and carries it out.
/// One loop ([`run`]) serves image deployments ([`Worker`]) and stack
/// deployments (`stack_deploy::StackWorker`).
pub trait Claims: Send + Sync + 'static {
    type Row: Send + 'static;
    /// What is claimed, for logs.
    const WHAT: &'static str;
    /// Work done once per turn before claiming.
    fn tidy(&self) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// Claims the next piece of work (its start event written with it).
    fn claim(&self) -> impl Future<Output = anyhow::Result<Option<Self::Row>>> + Send;
    /// Carries a claimed piece of work out, holding its lease.
    fn work(self: Arc<Self>, row: Self::Row) -> impl Future<Output = ()> + Send + 'static;
    fn concurrency(&self) -> usize;
    /// Woken when work was queued.
    fn wake(&self) -> &Notify;
    /// Woken when an event is in the outbox.
    fn relay_wake(&self) -> &Notify;
}

/// Claims and carries out work (several at once) until `shutdown`; a
/// piece cut there is taken over when its lease runs out, so the running
/// ones get the grace period to finish first.
pub async fn run<C: Claims>(me: Arc<C>, shutdown: CancellationToken) {
    let mut running = tokio::task::JoinSet::new();
    while !shutdown.is_cancelled() {
        me.tidy().await;
        while running.len() < me.concurrency() {
            match me.claim().await {
                Ok(Some(row)) => {
                    me.relay_wake().notify_one();
                    running.spawn(me.clone().work(row));
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = format!("{e:#}"), "cannot claim a {}", C::WHAT);
                    break;
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = me.wake().notified() => {}
            _ = tokio::time::sleep(POLL) => {}
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
    }
    let _ = tokio::time::timeout(gantry_runtime::GRACE_PERIOD, async {
        while running.join_next().await.is_some() {}
    })
    .await;
}

impl Claims for Worker {
    type Row = Row;
    const WHAT: &'static str = "deployment";

    async fn tidy(&self) {
        if let Err(e) = queue::supersede_expired(&self.pool).await {
            tracing::warn!(error = %e, "cannot look for expired deployments");
        }
    }

    async fn claim(&self) -> anyhow::Result<Option<Row>> {
        queue::claim(&self.pool, &self.owner, self.lease).await
    }

    fn work(self: Arc<Self>, row: Row) -> impl Future<Output = ()> + Send + 'static {
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

impl Worker {
    async fn deploy(self: Arc<Self>, row: Row) {
        let span = tracing::info_span!(
            "deploy",
            deployment = %row.id,
            environment = %row.environment,
            digest = %row.digest,
            attempt = row.attempt
        );
        if let Some(tp) = &row.traceparent {
            gantry_telemetry::set_parent(&span, tp);
        }
        // A deployment is not given back on shutdown: the worker lets it
        // finish within the grace period, or it is taken over later.
        gantry_queue::hold(
            &queue::DEPLOYMENTS,
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
        let Some(env) = self.config.environment(&row.environment).cloned() else {
            self.record_failure(row, "the environment is no longer configured", false, false)
                .await;
            return;
        };
        // Whatever queued it, only the project's own repository is deployed.
        let own = self
            .config
            .project(&env.project)
            .is_some_and(|p| p.image == row.repository);
        if !own {
            self.record_failure(
                row,
                &format!(
                    "{} is not the image repository of project {}; refused",
                    row.repository, env.project
                ),
                false,
                false,
            )
            .await;
            return;
        }
        let live = match queue::live(&self.pool, &env.name).await {
            Ok(l) => l,
            Err(e) => {
                // Leave it running: the lease runs out and it is tried again.
                tracing::warn!(error = %e, "cannot read what runs in the environment");
                return;
            }
        };
        let Some(target) = self.targets.of(&env) else {
            self.record_failure(
                row,
                &format!("target {:?} is not known to this deployer", env.target),
                false,
                false,
            )
            .await;
            return;
        };
        target.prepare(&env, row, live.as_ref()).await;
        tracing::info!(target = %env.target, previous = ?live.as_ref().map(|l| &l.digest), "deploying");
        let registry = self.config.registry_for(&row.repository);
        // The environment's `env`, then its configuration version's.
        let mut vars = env.env.clone();
        match crate::config::resolve(&self.pool, &self.config, &env.name, row.config_version).await
        {
            Ok(config) => vars.extend(config),
            Err(why) => {
                self.record_failure(row, &why, false, false).await;
                return;
            }
        }
        match target
            .roll_out(&env, row, &vars, &registry, live.as_ref())
            .await
        {
            Ok(running) => {
                let endpoint = env.endpoint.clone().unwrap_or_default();
                let address = running.address.map(|a| a.to_string());
                let promote_to: Vec<&gantry_config::Environment> = self
                    .config
                    .environments
                    .iter()
                    .filter(|e| e.promote_from.as_deref() == Some(env.name.as_str()))
                    .collect();
                let recorded = self
                    .record(|| {
                        queue::succeed(
                            &self.pool,
                            row,
                            &self.owner,
                            &running.id,
                            address.as_deref(),
                            &endpoint,
                            &promote_to,
                        )
                    })
                    .await;
                if !recorded {
                    return;
                }
                if env.endpoint.is_some() {
                    self.backends.set(&env.name, running.address);
                }
                self.relay_wake.notify_one();
                deployed(&env.target, "succeeded");
                tracing::info!(id = %running.id, "deployed");
                if let Some(old) = live.filter(|l| l.container_id != running.id) {
                    target.retire(&env, &old).await;
                }
            }
            Err(Failure::Refused(e)) => {
                let reason = format!("{e:#}");
                tracing::warn!(reason, "deployment refused");
                deployed(&env.target, "refused");
                self.record_failure(row, &reason, false, false).await;
            }
            Err(Failure::Failed { error, rolled_back }) => {
                let reason = format!("{error:#}");
                tracing::warn!(reason, rolled_back, "deployment failed");
                deployed(
                    &env.target,
                    if rolled_back { "rolled_back" } else { "failed" },
                );
                self.record_failure(row, &reason, rolled_back, true).await;
            }
        }
    }

    async fn record_failure(&self, row: &Row, reason: &str, rolled_back: bool, block: bool) {
        if self
            .record(|| queue::fail(&self.pool, row, &self.owner, reason, rolled_back, block))
            .await
        {
            self.relay_wake.notify_one();
        }
    }

    /// Retries writing a deployment's end while the database is away.
    async fn record<F, Fut>(&self, write: F) -> bool
    where
        F: Fn() -> Fut,
        Fut: Future<Output = anyhow::Result<()>>,
    {
        match Policy::Record.retry("record the deployment", write).await {
            Ok(()) => true,
            Err(gave_up) => {
                tracing::error!(
                    error = format!("{:#}", gave_up.error),
                    "deployment outcome not recorded"
                );
                false
            }
        }
    }
}

/// Counts a deployment's end (`gantry_deployments_total{target, outcome}`).
fn deployed(target: &str, outcome: &'static str) {
    metrics::counter!("gantry_deployments_total", "target" => target.to_owned(), "outcome" => outcome)
        .increment(1);
}
