//! The deployment queue, a leased queue ([`DEPLOYMENTS`], with the rules of
//! `gantry-queue`). A published image that matches an environment becomes a
//! `waiting` deployment — `awaiting_approval` first where the environment
//! requires approval, until someone approves ([`approve`]) or rejects it;
//! queuing one supersedes the deployments still awaiting or waiting for
//! that environment, so only the newest image waits behind a running one.
//! A deployment that succeeds queues the same image for the environments
//! promoted from its own (`promote_from`). A waiting deployment is claimed only when its environment
//! has none running — a unique partial index makes "one running deployment
//! per environment" a database guarantee — and held under a lease, so a dead
//! deployer's work is taken over; one whose lease ran out while a newer
//! image waits is superseded instead ([`supersede_expired`]).
//!
//! Every state change writes its `deploy.*` event in the same transaction.

use std::time::Duration;

use chrono::{DateTime, Utc};
use gantry_proto::v1::event::Payload;
use gantry_proto::v1::{
    DeployApproved, DeployAwaitingApproval, DeployFailed, DeployRejected, DeployRolledBack,
    DeployStarted, DeploySucceeded, Deployment, Event, Revision,
};
use gantry_queue::{Claim, Queue};
use gantry_states::DeploymentState;
use prost::Message as _;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

/// A published image the deployer can roll out.
#[derive(Debug, Clone)]
pub struct Image {
    pub pipeline_id: String,
    pub project: String,
    pub repository: String,
    pub digest: String,
    pub revision: Revision,
}

/// How a deployment was asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Auto,
    Manual,
    Rollback,
    /// It succeeded in the environment this one is promoted from.
    Promotion,
    /// The environment's configuration changed: what runs, with the new one.
    Config,
}

/// Which configuration version a queued deployment applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigPick {
    /// The environment's current one (its newest that did not fail).
    Current,
    /// This one (a rollback's: the one that ran with the image; a change's).
    Version(Option<i32>),
}

impl Trigger {
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Auto => "auto",
            Trigger::Manual => "manual",
            Trigger::Rollback => "rollback",
            Trigger::Promotion => "promotion",
            Trigger::Config => "config",
        }
    }
}

/// `query_as!` of [`Row`]s: `SELECT` of every column `FROM deployments`, then
/// the rest of the statement (a literal, checked with the rest) and its
/// arguments.
macro_rules! deployment_rows {
    ($rest:literal $(, $arg:expr)* $(,)?) => {
        sqlx::query_as!(
            $crate::queue::Row,
            r#"SELECT id, environment, project, pipeline_id, repository, digest, revision, trigger,
                      state AS "state: gantry_states::DeploymentState", reason, previous_digest,
                      container_id, traceparent, attempt, created_at, finished_at,
                      decided_by, decided_at, config_version, target
               FROM deployments "# + $rest
            $(, $arg)*
        )
    };
}
pub(crate) use deployment_rows;

/// One row of `deployments`.
#[derive(Debug, Clone)]
pub struct Row {
    pub id: Uuid,
    pub environment: String,
    pub project: String,
    pub pipeline_id: String,
    pub repository: String,
    pub digest: String,
    pub revision: Vec<u8>,
    pub trigger: String,
    pub state: DeploymentState,
    pub reason: Option<String>,
    pub previous_digest: Option<String>,
    pub container_id: Option<String>,
    pub traceparent: Option<String>,
    pub attempt: i32,
    pub created_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Who approved or rejected it, and when.
    pub decided_by: Option<String>,
    pub decided_at: Option<DateTime<Utc>>,
    /// The environment's configuration version it applies.
    pub config_version: Option<i32>,
    /// The environment's target when it was queued (`docker`, `rancher`).
    pub target: String,
}

impl Row {
    pub fn revision(&self) -> Revision {
        Revision::decode(self.revision.as_slice()).unwrap_or_default()
    }

    /// The image it deploys, to queue it again (elsewhere, or with another
    /// configuration).
    pub fn image(&self) -> Image {
        Image {
            pipeline_id: self.pipeline_id.clone(),
            project: self.project.clone(),
            repository: self.repository.clone(),
            digest: self.digest.clone(),
            revision: self.revision(),
        }
    }

    /// The `Deployment` message of deploy events.
    pub fn message(&self) -> Deployment {
        Deployment {
            deployment_id: self.id.to_string(),
            environment: self.environment.clone(),
            target: self.target.clone(),
            repository: self.repository.clone(),
            digest: self.digest.clone(),
            trigger: self.trigger.clone(),
            revision: Some(self.revision()),
            previous_digest: self.previous_digest.clone().unwrap_or_default(),
        }
    }

    fn event(&self, payload: Payload) -> Event {
        Event::new(&self.pipeline_id, &self.project, payload)
    }

    /// The claim its holder (`owner`) shows to renew or finish it.
    pub fn claim(&self, owner: &str) -> Claim<Uuid> {
        Claim {
            id: self.id,
            owner: owner.to_owned(),
            attempt: self.attempt,
        }
    }

    /// `repository@digest`, what the engine pulls and runs.
    pub fn reference(&self) -> String {
        format!("{}@{}", self.repository, self.digest)
    }
}

/// What runs in an environment.
#[derive(Debug, Clone)]
pub struct Live {
    pub deployment_id: Uuid,
    pub container_id: String,
    pub address: Option<String>,
    pub digest: String,
    pub since: DateTime<Utc>,
}

/// Makes sure every configured environment has its row.
pub async fn sync_environments(pool: &PgPool, names: &[String]) -> sqlx::Result<()> {
    sqlx::query!(
        "INSERT INTO environments (name) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
        names
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Whether `image` failed in `environment` before (and so is not deployed
/// there automatically): its digest, or another image of the same commit of
/// the same project. The builder keeps no image once pushed, so a rebuild of
/// a commit has a new digest, but it is the same code.
pub async fn is_blocked(
    tx: &mut Transaction<'_, Postgres>,
    environment: &str,
    image: &Image,
) -> sqlx::Result<bool> {
    sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM blocked b WHERE b.environment = $1
            AND (b.digest = $2 OR ($3 <> '' AND b.digest IN (
                 SELECT digest FROM images WHERE project = $4 AND commit_sha = $3)))) AS "blocked!""#,
        environment,
        image.digest,
        image.revision.commit_sha,
        image.project,
    )
    .fetch_one(&mut **tx)
    .await
}

pub async fn block(
    tx: &mut Transaction<'_, Postgres>,
    environment: &str,
    digest: &str,
    reason: &str,
) -> sqlx::Result<()> {
    sqlx::query!(
        "INSERT INTO blocked (environment, digest, reason) VALUES ($1, $2, $3)
         ON CONFLICT (environment, digest) DO UPDATE SET reason = EXCLUDED.reason, blocked_at = now()",
        environment,
        digest,
        reason,
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Queues `image` for `env` — to await approval there if `env` requires it
/// (a rollback does not wait: it goes back to what ran); deployments still
/// awaiting or waiting there are superseded.
pub async fn enqueue(
    tx: &mut Transaction<'_, Postgres>,
    env: &gantry_config::Environment,
    image: &Image,
    trigger: Trigger,
    config: ConfigPick,
) -> sqlx::Result<Row> {
    let environment = env.name.as_str();
    let awaiting = env.approval.is_some() && trigger != Trigger::Rollback;
    let state = if awaiting {
        DeploymentState::AwaitingApproval
    } else {
        DeploymentState::Waiting
    };
    // Serialises queue changes of one environment.
    sqlx::query!(
        "SELECT name FROM environments WHERE name = $1 FOR UPDATE",
        environment
    )
    .fetch_optional(&mut **tx)
    .await?;
    let superseded = sqlx::query!(
        "UPDATE deployments SET state = 'superseded', finished_at = now(),
                reason = 'a newer image was queued for this environment'
         WHERE environment = $1 AND state IN ('waiting', 'awaiting_approval')",
        environment
    )
    .execute(&mut **tx)
    .await?
    .rows_affected();
    if superseded > 0 {
        tracing::info!(environment, superseded, "waiting deployments superseded");
    }
    let config_version = match config {
        ConfigPick::Version(v) => v,
        ConfigPick::Current => crate::config::current(tx, environment).await?,
    };
    let row = sqlx::query_as!(
        Row,
        r#"INSERT INTO deployments (id, environment, project, pipeline_id, repository, digest, revision, trigger, traceparent, state, config_version, target)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
         RETURNING id, environment, project, pipeline_id, repository, digest, revision, trigger,
                   state AS "state: DeploymentState", reason, previous_digest, container_id,
                   traceparent, attempt, created_at, finished_at, decided_by, decided_at,
                   config_version, target"#,
        Uuid::now_v7(),
        environment,
        image.project,
        image.pipeline_id,
        image.repository,
        image.digest,
        image.revision.encode_to_vec(),
        trigger.as_str(),
        gantry_telemetry::current_traceparent(),
        state as DeploymentState,
        config_version,
        env.target,
    )
    .fetch_one(&mut **tx)
    .await?;
    if awaiting {
        let event = row.event(Payload::DeployAwaitingApproval(DeployAwaitingApproval {
            deployment: Some(row.message()),
        }));
        gantry_bus::enqueue_traced(tx, &event, row.traceparent.as_deref()).await?;
    }
    Ok(row)
}

/// Someone's decision on what awaits approval in an environment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Approve,
    Reject,
}

/// Approves (it is queued: `waiting`) or rejects the deployment awaiting
/// approval in `environment` — only if it is `expected`, when given —,
/// recording `by` and when; `None` when none (or not that one) awaits.
pub async fn decide(
    pool: &PgPool,
    environment: &str,
    expected: Option<Uuid>,
    decision: Decision,
    by: &str,
    reason: &str,
) -> anyhow::Result<Option<Row>> {
    let mut tx = pool.begin().await?;
    let state = match decision {
        Decision::Approve => DeploymentState::Waiting,
        Decision::Reject => DeploymentState::Rejected,
    };
    let decided: Option<Uuid> = sqlx::query_scalar!(
        "UPDATE deployments SET state = $2, decided_by = $3, decided_at = now(),
                reason = CASE WHEN $2 = 'rejected' THEN $4 ELSE reason END,
                finished_at = CASE WHEN $2 = 'rejected' THEN now() ELSE finished_at END
         WHERE id = (SELECT id FROM deployments WHERE environment = $1 AND state = 'awaiting_approval'
                     ORDER BY created_at DESC LIMIT 1 FOR UPDATE)
           AND ($5::uuid IS NULL OR id = $5)
         RETURNING id",
        environment,
        state as DeploymentState,
        by,
        reason,
        expected,
    )
    .fetch_optional(&mut *tx)
    .await?;
    let Some(id) = decided else {
        return Ok(None);
    };
    let row = deployment_rows!("WHERE id = $1", id)
        .fetch_one(&mut *tx)
        .await?;
    let payload = match decision {
        Decision::Approve => Payload::DeployApproved(DeployApproved {
            deployment: Some(row.message()),
            by: by.to_owned(),
        }),
        Decision::Reject => Payload::DeployRejected(DeployRejected {
            deployment: Some(row.message()),
            by: by.to_owned(),
            reason: reason.to_owned(),
        }),
    };
    gantry_bus::enqueue_traced(&mut tx, &row.event(payload), row.traceparent.as_deref()).await?;
    if decision == Decision::Reject && row.trigger == Trigger::Config.as_str() {
        // A rejected configuration is not given to later deployments either.
        crate::config::mark_failed(&mut tx, &row.environment, row.config_version, reason).await?;
    }
    tx.commit().await?;
    Ok(Some(row))
}

/// The deployments queue: waiting deployments of environments where none
/// runs, oldest first, and running ones whose lease ran out. A claim notes
/// what runs in the environment now (`previous_digest`).
pub const DEPLOYMENTS: Queue = Queue {
    table: "deployments",
    waiting: DeploymentState::Waiting.as_str(),
    running: DeploymentState::Running.as_str(),
    ready: "NOT EXISTS (SELECT 1 FROM deployments r
                        WHERE r.environment = q.environment AND r.state = 'running')",
    order: "q.created_at",
    on_claim: "started_at = now(),
               previous_digest = (SELECT p.digest FROM live l JOIN deployments p ON p.id = l.deployment_id
                                  WHERE l.environment = deployments.environment)",
};

/// Deployments whose lease ran out while a newer image waits for their
/// environment are not run again: superseded (their holder, if it still
/// runs, finds out at its next renewal).
pub async fn supersede_expired(pool: &PgPool) -> sqlx::Result<u64> {
    let done = sqlx::query!(
        "UPDATE deployments d SET state = $1, owner = NULL, lease_until = NULL, finished_at = now(),
                reason = 'taken over while a newer image waited for this environment'
         WHERE state = $2 AND lease_until < now()
           AND EXISTS (SELECT 1 FROM deployments w WHERE w.environment = d.environment AND w.state = $3)",
        DeploymentState::Superseded as DeploymentState,
        DeploymentState::Running as DeploymentState,
        DeploymentState::Waiting as DeploymentState,
    )
    .execute(pool)
    .await?;
    Ok(done.rows_affected())
}

/// Claims the next deployment (see [`DEPLOYMENTS`]) and writes
/// `deploy.started`. `None` when there is nothing to do.
pub async fn claim(pool: &PgPool, owner: &str, lease: Duration) -> anyhow::Result<Option<Row>> {
    let mut tx = pool.begin().await?;
    let Some(claim) = DEPLOYMENTS.claim::<Uuid>(&mut tx, owner, lease).await? else {
        return Ok(None);
    };
    let row = deployment_rows!("WHERE id = $1", claim.id)
        .fetch_one(&mut *tx)
        .await?;
    let event = row.event(Payload::DeployStarted(DeployStarted {
        deployment: Some(row.message()),
    }));
    gantry_bus::enqueue_traced(&mut tx, &event, row.traceparent.as_deref()).await?;
    tx.commit().await?;
    Ok(Some(row))
}

/// What runs in `environment`, if anything.
pub async fn live(pool: &PgPool, environment: &str) -> sqlx::Result<Option<Live>> {
    sqlx::query_as!(
        Live,
        "SELECT l.deployment_id, l.container_id, l.address, d.digest, l.since
         FROM live l JOIN deployments d ON d.id = l.deployment_id
         WHERE l.environment = $1",
        environment
    )
    .fetch_optional(pool)
    .await
}

/// Every environment's live address (for the endpoints at start).
pub async fn live_addresses(pool: &PgPool) -> sqlx::Result<Vec<(String, Option<String>)>> {
    let rows = sqlx::query!("SELECT environment, address FROM live")
        .fetch_all(pool)
        .await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.environment, r.address))
        .collect())
}

/// The new version took over: it becomes live, `deploy.succeeded` is
/// written, and the same image is queued for the environments promoted
/// from this one (`promote_to`; not where it failed before).
pub async fn succeed(
    pool: &PgPool,
    row: &Row,
    owner: &str,
    container_id: &str,
    address: Option<&str>,
    endpoint: &str,
    promote_to: &[&gantry_config::Environment],
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    // The claim condition comes from `gantry-queue`, so this one is checked at run time.
    let done = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE deployments SET state = $4, container_id = $5, finished_at = now(), lease_until = NULL
         WHERE {}",
        DEPLOYMENTS.held()
    )))
    .bind(row.id)
    .bind(owner)
    .bind(row.attempt)
    .bind(DeploymentState::Succeeded)
    .bind(container_id)
    .execute(&mut *tx)
    .await?;
    anyhow::ensure!(
        done.rows_affected() == 1,
        "deployment {} is no longer ours",
        row.id
    );
    sqlx::query!(
        "INSERT INTO live (environment, deployment_id, container_id, address, since)
         VALUES ($1, $2, $3, $4, now())
         ON CONFLICT (environment) DO UPDATE
         SET deployment_id = EXCLUDED.deployment_id, container_id = EXCLUDED.container_id,
             address = EXCLUDED.address, since = EXCLUDED.since",
        row.environment,
        row.id,
        container_id,
        address,
    )
    .execute(&mut *tx)
    .await?;
    let event = row.event(Payload::DeploySucceeded(DeploySucceeded {
        deployment: Some(row.message()),
        container_id: container_id.to_owned(),
        endpoint: endpoint.to_owned(),
    }));
    gantry_bus::enqueue_traced(&mut tx, &event, row.traceparent.as_deref()).await?;
    let image = row.image();
    // What an environment took by a rollback or a configuration change is
    // not news for the environments promoted from it.
    let promotes = [Trigger::Auto, Trigger::Manual, Trigger::Promotion]
        .iter()
        .any(|t| t.as_str() == row.trigger);
    for next in promote_to.iter().filter(|_| promotes) {
        let runs_there: Option<String> = sqlx::query_scalar!(
            "SELECT d.digest FROM live l JOIN deployments d ON d.id = l.deployment_id WHERE l.environment = $1",
            next.name,
        )
        .fetch_optional(&mut *tx)
        .await?;
        if runs_there.as_deref() == Some(row.digest.as_str()) {
            continue;
        }
        if is_blocked(&mut tx, &next.name, &image).await? {
            tracing::info!(environment = %next.name, "not promoted: this image failed there before");
            continue;
        }
        enqueue(
            &mut tx,
            next,
            &image,
            Trigger::Promotion,
            ConfigPick::Current,
        )
        .await?;
    }
    tx.commit().await?;
    Ok(())
}

/// The deployment failed. With `block` (the new version itself failed: it
/// did not start or never became healthy) the digest is not deployed to this
/// environment again automatically; a failure that is not the image's (the
/// registry or the engine was away) leaves it free. `rolled_back` says that a
/// version started and was removed while the previous one kept running.
pub async fn fail(
    pool: &PgPool,
    row: &Row,
    owner: &str,
    reason: &str,
    rolled_back: bool,
    block_digest: bool,
) -> anyhow::Result<()> {
    let mut tx = pool.begin().await?;
    let state = if rolled_back {
        DeploymentState::RolledBack
    } else {
        DeploymentState::Failed
    };
    // The claim condition comes from `gantry-queue`, so this one is checked at run time.
    let done = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE deployments SET state = $4, reason = $5, finished_at = now(), lease_until = NULL
         WHERE {}",
        DEPLOYMENTS.held()
    )))
    .bind(row.id)
    .bind(owner)
    .bind(row.attempt)
    .bind(state)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    anyhow::ensure!(
        done.rows_affected() == 1,
        "deployment {} is no longer ours",
        row.id
    );
    if row.trigger == Trigger::Config.as_str() {
        // The configuration failed, not the image: later deployments skip
        // that version (only when the new version itself failed: a registry
        // or a target that was away says nothing of it); the image stays free.
        if block_digest {
            crate::config::mark_failed(&mut tx, &row.environment, row.config_version, reason)
                .await?;
        }
    } else if block_digest {
        block(&mut tx, &row.environment, &row.digest, reason).await?;
    }
    let failed = row.event(Payload::DeployFailed(DeployFailed {
        deployment: Some(row.message()),
        reason: reason.to_owned(),
    }));
    gantry_bus::enqueue_traced(&mut tx, &failed, row.traceparent.as_deref()).await?;
    if rolled_back {
        let back = row.event(Payload::DeployRolledBack(DeployRolledBack {
            deployment: Some(row.message()),
            reason: reason.to_owned(),
        }));
        gantry_bus::enqueue_traced(&mut tx, &back, row.traceparent.as_deref()).await?;
    }
    tx.commit().await?;
    Ok(())
}
