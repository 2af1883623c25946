//! Stacks (meta-projects): when each is integration-tested, with which
//! images, and the numbered releases its green runs make.
//!
//! A run is started by a **trigger**: a release of a member (an
//! `image.published` on the member's default branch or a `v*` tag; the
//! members are those the stack's last finished run read from its
//! `.gantry.yml`), or a push to the stack repository (`pipeline.requested`
//! of the stack project, which the builder leaves to the deployer). A
//! stack's runs are serialized: a trigger joins the stack's waiting run, or
//! makes one; the waiting run is started ([`dispatch`]) only when no run of
//! the stack is active, and only then are the images pinned — the newest
//! release of every project — so a run started after two members released
//! tests both. Starting is one transaction: the run becomes `requested` and
//! `stack.run_requested` goes to the builder through the outbox.
//!
//! The builder's `stack.run_started`, `stack.run_passed` and
//! `stack.run_failed` come back here ([`record_started`], [`record_end`]):
//! the run's members are learned, a green run of the default branch becomes
//! the next numbered, immutable release (`stack.released`), and the next
//! waiting run, if any, starts. Every step is idempotent by event id.

use gantry_config::{GantryConfig, Project};
use gantry_proto::v1::event::Payload;
use gantry_proto::v1::{
    Event, ReleasedImage, Revision, StackReleased, StackRun, StackRunRequested, StackService,
    StackServices, StackTrigger,
};
use prost::Message as _;
use sqlx::{PgPool, Postgres, Transaction};
use uuid::Uuid;

/// Run states, in the `stack_runs.state` column.
pub mod state {
    pub const WAITING: &str = "waiting";
    pub const REQUESTED: &str = "requested";
    pub const RUNNING: &str = "running";
    pub const PASSED: &str = "passed";
    pub const FAILED: &str = "failed";
}

/// Makes sure every configured stack has its row.
pub async fn sync_stacks(pool: &PgPool, config: &GantryConfig) -> sqlx::Result<()> {
    let names: Vec<String> = config
        .projects
        .iter()
        .filter(|p| p.is_stack())
        .map(|p| p.name.clone())
        .collect();
    sqlx::query!(
        "INSERT INTO stacks (name) SELECT unnest($1::text[]) ON CONFLICT DO NOTHING",
        &names
    )
    .execute(pool)
    .await?;
    Ok(())
}

/// Whether an image of `project` built from `revision` is a release: of the
/// project's default branch, or of a `v*` tag.
pub fn is_release(project: &Project, revision: &Revision) -> bool {
    let default = if revision.default_branch.is_empty() {
        project.default_branch.as_str()
    } else {
        revision.default_branch.as_str()
    };
    (!revision.branch.is_empty() && revision.branch == default) || revision.tag.starts_with('v')
}

/// The stacks whose members include `project`.
pub async fn following(
    tx: &mut Transaction<'_, Postgres>,
    project: &str,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar!(
        "SELECT name FROM stacks WHERE $1 = ANY(members) ORDER BY name",
        project
    )
    .fetch_all(&mut **tx)
    .await
}

/// Adds `trigger` to the waiting run of `stack` (making one if none waits),
/// then starts it if nothing of the stack is active. A push names the
/// stack revision to run (the newest push wins); a member's release runs the
/// head of the stack's default branch unless a push said otherwise.
pub async fn trigger(
    tx: &mut Transaction<'_, Postgres>,
    stack: &Project,
    trigger: StackTrigger,
    push: Option<Revision>,
) -> anyhow::Result<()> {
    sqlx::query_scalar!(
        "SELECT name FROM stacks WHERE name = $1 FOR UPDATE",
        stack.name
    )
    .fetch_optional(&mut **tx)
    .await?
    .ok_or_else(|| anyhow::anyhow!("stack {} has no row", stack.name))?;
    let traceparent = gantry_telemetry::current_traceparent();
    let waiting = sqlx::query!(
        "SELECT id, run FROM stack_runs WHERE stack = $1 AND state = 'waiting'",
        stack.name
    )
    .fetch_optional(&mut **tx)
    .await?;
    let pipeline_id = trigger.pipeline_id.clone();
    match waiting {
        Some(waiting) => {
            let id = waiting.id;
            let mut run = StackRun::decode(waiting.run.as_slice())?;
            if let Some(rev) = push {
                run.revision = Some(rev);
            }
            run.triggers.push(trigger);
            sqlx::query!(
                "UPDATE stack_runs SET run = $2, pipeline_id = $3, traceparent = $4 WHERE id = $1",
                id,
                run.encode_to_vec(),
                pipeline_id,
                traceparent,
            )
            .execute(&mut **tx)
            .await?;
            tracing::info!(stack = %stack.name, number = run.number, "trigger joined the waiting run");
        }
        None => {
            let number = sqlx::query_scalar!(
                r#"SELECT COALESCE(MAX(number), 0) + 1 AS "number!" FROM stack_runs WHERE stack = $1"#,
                stack.name
            )
            .fetch_one(&mut **tx)
            .await?;
            let id = Uuid::now_v7();
            let run = StackRun {
                run_id: id.to_string(),
                stack: stack.name.clone(),
                number: number as u64,
                revision: Some(push.unwrap_or_else(|| Revision {
                    clone_url: stack.clone_url.clone(),
                    git_ref: format!("refs/heads/{}", stack.default_branch),
                    branch: stack.default_branch.clone(),
                    default_branch: stack.default_branch.clone(),
                    source: "manual".into(),
                    ..Default::default()
                })),
                releases: Vec::new(),
                triggers: vec![trigger],
            };
            sqlx::query!(
                "INSERT INTO stack_runs (id, stack, number, run, pipeline_id, traceparent)
                 VALUES ($1, $2, $3, $4, $5, $6)",
                id,
                stack.name,
                number,
                run.encode_to_vec(),
                pipeline_id,
                traceparent,
            )
            .execute(&mut **tx)
            .await?;
            tracing::info!(stack = %stack.name, number, "stack run waiting");
        }
    }
    dispatch(tx, &stack.name).await?;
    Ok(())
}

/// Starts the waiting run of `stack` when none of its runs is active: pins
/// the newest release of every project and writes `stack.run_requested`.
/// The caller holds the stack's row lock.
async fn dispatch(tx: &mut Transaction<'_, Postgres>, stack: &str) -> anyhow::Result<bool> {
    let active = sqlx::query_scalar!(
        "SELECT id FROM stack_runs WHERE stack = $1 AND state IN ('requested', 'running')",
        stack
    )
    .fetch_optional(&mut **tx)
    .await?;
    if active.is_some() {
        return Ok(false);
    }
    let waiting = sqlx::query!(
        "SELECT id, run, pipeline_id, traceparent FROM stack_runs WHERE stack = $1 AND state = 'waiting'",
        stack
    )
    .fetch_optional(&mut **tx)
    .await?;
    let Some(waiting) = waiting else {
        return Ok(false);
    };
    let mut run = StackRun::decode(waiting.run.as_slice())?;
    run.releases = newest_releases(tx).await?;
    sqlx::query!(
        "UPDATE stack_runs SET state = 'requested', run = $2, requested_at = now() WHERE id = $1",
        waiting.id,
        run.encode_to_vec(),
    )
    .execute(&mut **tx)
    .await?;
    let event = Event::new(
        &waiting.pipeline_id,
        stack,
        Payload::StackRunRequested(StackRunRequested {
            run: Some(run.clone()),
        }),
    );
    gantry_bus::enqueue_traced(tx, &event, waiting.traceparent.as_deref()).await?;
    tracing::info!(stack, number = run.number, "stack run requested");
    Ok(true)
}

/// The newest release of every project.
async fn newest_releases(tx: &mut Transaction<'_, Postgres>) -> sqlx::Result<Vec<ReleasedImage>> {
    sqlx::query_as!(
        ReleasedImage,
        "SELECT DISTINCT ON (project) project, repository, digest, commit_sha, git_ref, pipeline_id
         FROM images WHERE released ORDER BY project, published_at DESC",
    )
    .fetch_all(&mut **tx)
    .await
}

/// `stack.run_started`: the builder took the run.
pub async fn record_started(
    tx: &mut Transaction<'_, Postgres>,
    run: &StackRun,
    build_id: &str,
) -> anyhow::Result<()> {
    sqlx::query!(
        "UPDATE stack_runs SET state = 'running', build_id = $2
         WHERE id = $1 AND state IN ('requested', 'running')",
        run.run_id.parse::<Uuid>()?,
        build_id,
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// How a run ended, as the builder said.
pub struct RunEnd<'a> {
    pub run: &'a StackRun,
    pub build_id: &'a str,
    pub stack_commit: &'a str,
    /// `None` when it passed; else the failed step and the reason.
    pub failure: Option<(&'a str, &'a str)>,
    pub services: &'a [StackService],
    /// The run's compose file (JSON), for a release.
    pub compose: &'a str,
    /// The stack's rancher-compose file (JSON), or empty.
    pub rancher_compose: &'a str,
}

/// `stack.run_passed` / `stack.run_failed`: records the end, learns the
/// members, makes the release of a green run of the default branch (queued
/// for the stack's environments whose rules take it), and starts the next
/// waiting run. Returns the release made, if any.
pub async fn record_end(
    tx: &mut Transaction<'_, Postgres>,
    config: &GantryConfig,
    stack: &Project,
    pipeline_id: &str,
    end: RunEnd<'_>,
) -> anyhow::Result<Option<u64>> {
    sqlx::query!(
        "SELECT name FROM stacks WHERE name = $1 FOR UPDATE",
        stack.name
    )
    .fetch_optional(&mut **tx)
    .await?;
    let id: Uuid = end.run.run_id.parse()?;
    let services = StackServices {
        services: end.services.to_vec(),
    }
    .encode_to_vec();
    let ended = sqlx::query!(
        "UPDATE stack_runs SET state = $2, build_id = $3, stack_commit = $4, failed_step = $5,
                reason = $6, services = $7, finished_at = now()
         WHERE id = $1 AND state IN ('requested', 'running')",
        id,
        if end.failure.is_none() {
            state::PASSED
        } else {
            state::FAILED
        },
        end.build_id,
        end.stack_commit,
        end.failure.map(|f| f.0),
        end.failure.map(|f| f.1),
        services,
    )
    .execute(&mut **tx)
    .await?;
    if ended.rows_affected() == 0 {
        return Ok(None);
    }
    let members: Vec<String> = end
        .services
        .iter()
        .filter(|s| !s.project.is_empty())
        .map(|s| s.project.clone())
        .collect();
    if !members.is_empty() || end.failure.is_none() {
        sqlx::query!(
            "UPDATE stacks SET members = $2 WHERE name = $1",
            stack.name,
            &members,
        )
        .execute(&mut **tx)
        .await?;
    }
    let default_ref = format!("refs/heads/{}", stack.default_branch);
    let of_default = end
        .run
        .revision
        .as_ref()
        .is_none_or(|r| r.git_ref == default_ref);
    let mut release = None;
    if end.failure.is_none() && of_default {
        let number = sqlx::query_scalar!(
            "INSERT INTO stack_releases (stack, number, run_id, stack_commit, services, compose, rancher_compose)
             SELECT $1, COALESCE(MAX(number), 0) + 1, $2, $3, $4, $5, $6 FROM stack_releases WHERE stack = $1
             RETURNING number",
            stack.name,
            id,
            end.stack_commit,
            services,
            end.compose,
            end.rancher_compose,
        )
        .fetch_one(&mut **tx)
        .await?;
        for env in crate::stack_deploy::auto_environments(config, stack) {
            crate::stack_deploy::enqueue(
                tx,
                &env.name,
                &stack.name,
                number,
                pipeline_id,
                crate::queue::Trigger::Auto,
            )
            .await?;
        }
        let event = Event::new(
            pipeline_id,
            &stack.name,
            Payload::StackReleased(StackReleased {
                stack: stack.name.clone(),
                release: number as u64,
                run_id: end.run.run_id.clone(),
                stack_commit: end.stack_commit.to_owned(),
                services: end.services.to_vec(),
                triggers: end.run.triggers.clone(),
            }),
        );
        gantry_bus::enqueue(tx, &event).await?;
        tracing::info!(stack = %stack.name, release = number, "stack released");
        release = Some(number as u64);
    }
    dispatch(tx, &stack.name).await?;
    Ok(release)
}
