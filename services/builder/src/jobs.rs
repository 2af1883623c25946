//! The `builds` table, a leased queue ([`BUILDS`], with the rules of
//! `gantry-queue`): storing requests, claiming a build with its
//! `build.started` (`stack.run_started` for a stack's integration run),
//! finishing it with its verdict event, only while the claim holds, and
//! canceling it ([`cancel`]): superseded by a newer push to its branch, or
//! by hand.
//!
//! A cancellation is one transaction: the row becomes `canceled` (so the
//! holder's next renewal fails and nothing it finds later is recorded), a
//! line in the build's log says why, `build.canceled` goes to the outbox,
//! and a notification on [`CANCELED_CHANNEL`] tells the replica running the
//! build to stop it now rather than at its next renewal.

use std::time::Duration;

use gantry_proto::v1::event::Payload;
use gantry_proto::v1::{
    BuildCanceled, BuildFailed, BuildSkipped, BuildStarted, BuildSucceeded, Event,
    PipelineRequested, Revision, StackRun, StackRunFailed, StackRunPassed, StackRunStarted,
    StackService, StepResult,
};
use gantry_queue::{Claim, Queue};
use gantry_states::BuildState;
use prost::Message as _;
use sqlx::PgPool;
use uuid::Uuid;

/// The builds queue: queued builds in the order they came, and running
/// ones whose lease ran out.
pub const BUILDS: Queue = Queue {
    table: "builds",
    waiting: BuildState::Queued.as_str(),
    running: BuildState::Running.as_str(),
    ready: "TRUE",
    order: "q.created_at",
    on_claim: "started_at = now()",
};

/// What a row of the queue asks for.
#[derive(Debug, Clone)]
pub enum Job {
    /// A service's pipeline: build, test, push.
    Build(PipelineRequested),
    /// A stack's integration run.
    Stack(StackRun),
}

impl Job {
    /// The `kind` column of the job.
    pub fn kind(&self) -> &'static str {
        match self {
            Job::Build(_) => "build",
            Job::Stack(_) => "stack",
        }
    }

    /// Decodes the `request` column of a row of `kind`.
    pub fn decode(kind: &str, request: &[u8]) -> anyhow::Result<Self> {
        Ok(match kind {
            "stack" => Job::Stack(StackRun::decode(request)?),
            _ => Job::Build(PipelineRequested::decode(request)?),
        })
    }

    fn encode(&self) -> Vec<u8> {
        match self {
            Job::Build(r) => r.encode_to_vec(),
            Job::Stack(r) => r.encode_to_vec(),
        }
    }

    /// The revision worked on (for a stack: the stack repository's).
    pub fn revision(&self) -> Revision {
        match self {
            Job::Build(r) => r.revision.clone(),
            Job::Stack(r) => r.revision.clone(),
        }
        .unwrap_or_default()
    }
}

/// A build a worker holds.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: Uuid,
    pub pipeline_id: String,
    pub project: String,
    pub job: Job,
    pub attempt: i32,
    /// The pipeline's trace context, so the build joins its trace.
    pub traceparent: Option<String>,
    /// What the worker shows to renew or finish it.
    pub claim: Claim<Uuid>,
}

/// How a build ended.
#[derive(Debug, Clone)]
pub enum Verdict {
    Succeeded {
        image_id: String,
        repository: String,
        digest: String,
        steps: Vec<StepResult>,
    },
    Failed {
        step: String,
        exit_code: i32,
        reason: String,
        steps: Vec<StepResult>,
    },
    /// The pipeline file's rules exclude the push; nothing was built.
    Skipped {
        reason: String,
        steps: Vec<StepResult>,
    },
}

/// The Postgres notification channel of cancellations (payload: the build
/// id), listened to by every worker.
pub const CANCELED_CHANNEL: &str = "gantry_build_canceled";

/// Stores a `pipeline.requested` or `stack.run_requested` event as a
/// queued build, once per event id. Returns `false` for a redelivery.
///
/// With `supersede` (the project cancels superseded builds of this
/// branch), only the newest pipeline of the branch keeps an unfinished
/// build: the others still queued or running are canceled, "superseded by"
/// the newest one's commit. Newest is by pipeline id (time-ordered, given
/// when the push was accepted), so a request that arrives late cancels
/// itself rather than the newer build.
pub async fn enqueue_request(
    pool: &PgPool,
    event: &Event,
    job: &Job,
    supersede: bool,
) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    if !gantry_store::first_delivery(&mut tx, &event.id).await? {
        return Ok(false);
    }
    let rev = job.revision();
    let (git_ref, commit_sha) = match job {
        Job::Build(_) => (Some(rev.git_ref.as_str()), Some(rev.commit_sha.as_str())),
        Job::Stack(_) => (None, None),
    };
    sqlx::query!(
        "INSERT INTO builds (id, pipeline_id, project, event_id, kind, request, traceparent, git_ref, commit_sha)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9) ON CONFLICT (event_id) DO NOTHING",
        Uuid::now_v7(),
        event.pipeline_id,
        event.project,
        event.id,
        job.kind(),
        job.encode(),
        gantry_telemetry::current_traceparent(),
        git_ref,
        commit_sha,
    )
    .execute(&mut *tx)
    .await?;
    if supersede && matches!(job, Job::Build(_)) && !rev.git_ref.is_empty() {
        supersede_older(&mut tx, &event.project, &rev.git_ref).await?;
    }
    tx.commit().await?;
    Ok(true)
}

/// Cancels the unfinished builds of `project` at `git_ref` but the newest
/// pipeline's.
async fn supersede_older(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    project: &str,
    git_ref: &str,
) -> anyhow::Result<()> {
    // Serialises the pushes of one branch: of two arriving together, the
    // second sees the first. (Runtime statement: it returns `void`.)
    sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1 || ' ' || $2))")
        .bind(project)
        .bind(git_ref)
        .execute(&mut **tx)
        .await?;
    let open = sqlx::query!(
        "SELECT id, pipeline_id, commit_sha FROM builds
         WHERE project = $1 AND git_ref = $2 AND kind = 'build' AND state IN ('queued', 'running')
         ORDER BY pipeline_id DESC",
        project,
        git_ref,
    )
    .fetch_all(&mut **tx)
    .await?;
    let Some((newest, older)) = open.split_first() else {
        return Ok(());
    };
    let sha = newest.commit_sha.clone().unwrap_or_default();
    let older: Vec<Uuid> = older.iter().map(|b| b.id).collect();
    if older.is_empty() {
        return Ok(());
    }
    let why = Cancellation {
        reason: format!("superseded by {}", short_sha(&sha)),
        superseded_by: sha,
    };
    let canceled = cancel(tx, &older, &why).await?;
    if !canceled.is_empty() {
        tracing::info!(project, git_ref, canceled = canceled.len(), reason = %why.reason, "superseded builds canceled");
    }
    Ok(())
}

fn short_sha(sha: &str) -> &str {
    sha.get(..12).unwrap_or(sha)
}

/// Why builds are canceled.
#[derive(Debug, Clone)]
pub struct Cancellation {
    /// For humans, in the log, the event and the commit status.
    pub reason: String,
    /// The commit of the push that superseded the builds, if one did.
    pub superseded_by: String,
}

/// Cancels those of the service builds `ids` that are still queued or
/// running, in `tx` (see the module doc); returns the ids it canceled.
/// Stack runs are not canceled: their run is the deployer's to close.
pub async fn cancel(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    ids: &[Uuid],
    why: &Cancellation,
) -> anyhow::Result<Vec<Uuid>> {
    let rows = sqlx::query!(
        "UPDATE builds SET state = 'canceled', reason = $2, finished_at = now(), lease_until = NULL
         WHERE id = ANY($1) AND kind = 'build' AND state IN ('queued', 'running')
         RETURNING id, pipeline_id, project, kind, request, attempt",
        ids,
        why.reason,
    )
    .fetch_all(&mut **tx)
    .await?;
    let mut canceled = Vec::with_capacity(rows.len());
    for row in rows {
        let job = Job::decode(&row.kind, &row.request)?;
        sqlx::query!(
            "INSERT INTO build_logs (build_id, attempt, step, stream, data)
             VALUES ($1, $2, 'cancel', 'system', $3)",
            row.id,
            row.attempt,
            format!("canceled: {}\n", why.reason).into_bytes(),
        )
        .execute(&mut **tx)
        .await?;
        let event = Event::new(
            &row.pipeline_id,
            &row.project,
            Payload::BuildCanceled(BuildCanceled {
                revision: Some(job.revision()),
                build_id: row.id.to_string(),
                reason: why.reason.clone(),
                superseded_by: why.superseded_by.clone(),
            }),
        );
        gantry_bus::enqueue(tx, &event).await?;
        // A runtime statement: pg_notify returns `void`, which the checked
        // macros cannot type.
        sqlx::query("SELECT pg_notify($1, $2)")
            .bind(CANCELED_CHANNEL)
            .bind(row.id.to_string())
            .execute(&mut **tx)
            .await?;
        canceled.push(row.id);
    }
    Ok(canceled)
}

/// Takes the next build (see [`BUILDS`]) and emits `build.started` in the
/// same transaction.
pub async fn claim(
    pool: &PgPool,
    worker: &str,
    lease: Duration,
) -> anyhow::Result<Option<Claimed>> {
    let mut tx = pool.begin().await?;
    let Some(claim) = BUILDS.claim::<Uuid>(&mut tx, worker, lease).await? else {
        return Ok(None);
    };
    let row = sqlx::query!(
        "SELECT pipeline_id, project, kind, request, traceparent FROM builds WHERE id = $1",
        claim.id
    )
    .fetch_one(&mut *tx)
    .await?;
    let (pipeline_id, project, kind, request, traceparent) = (
        row.pipeline_id,
        row.project,
        row.kind,
        row.request,
        row.traceparent,
    );
    let job = Job::decode(&kind, &request)?;
    let id = claim.id;
    let span = tracing::info_span!("build.claim", build_id = %id, pipeline_id = %pipeline_id);
    if let Some(tp) = &traceparent {
        gantry_telemetry::set_parent(&span, tp);
    }
    let payload = match &job {
        Job::Build(request) => Payload::BuildStarted(BuildStarted {
            revision: request.revision.clone(),
            build_id: id.to_string(),
            worker: worker.to_owned(),
            attempt: claim.attempt as u32,
        }),
        Job::Stack(run) => Payload::StackRunStarted(StackRunStarted {
            run: Some(run.clone()),
            build_id: id.to_string(),
            worker: worker.to_owned(),
            attempt: claim.attempt as u32,
        }),
    };
    let event = Event::new(&pipeline_id, &project, payload);
    gantry_bus::enqueue_traced(
        &mut tx,
        &event,
        gantry_telemetry::traceparent_of(&span).as_deref(),
    )
    .await?;
    tx.commit().await?;
    Ok(Some(Claimed {
        id,
        pipeline_id,
        project,
        job,
        attempt: claim.attempt,
        traceparent,
        claim,
    }))
}

/// How a stack's integration run ended.
#[derive(Debug, Clone)]
pub struct StackVerdict {
    /// The stack commit that ran (empty when it could not be fetched).
    pub stack_commit: String,
    /// `None` when the tests passed; else the step, exit code and reason.
    pub failure: Option<(String, i32, String)>,
    pub services: Vec<StackService>,
    /// The run's compose file (JSON).
    pub compose: String,
    /// The stack's rancher-compose file (JSON), or empty.
    pub rancher_compose: String,
}

/// How a job ended: a build's verdict or a stack run's.
#[derive(Debug, Clone)]
pub enum End {
    Build(Verdict),
    Stack(StackVerdict),
}

impl End {
    /// The end of `job` when it could not even start (`step`, `reason`).
    pub fn stopped(job: &Job, step: &str, reason: String) -> Self {
        match job {
            Job::Build(_) => End::Build(Verdict::Failed {
                step: step.to_owned(),
                exit_code: 0,
                reason,
                steps: Vec::new(),
            }),
            Job::Stack(_) => End::Stack(StackVerdict {
                stack_commit: String::new(),
                failure: Some((step.to_owned(), 0, reason)),
                services: Vec::new(),
                compose: String::new(),
                rancher_compose: String::new(),
            }),
        }
    }

    pub fn succeeded(&self) -> bool {
        match self {
            End::Build(v) => matches!(v, Verdict::Succeeded { .. }),
            End::Stack(v) => v.failure.is_none(),
        }
    }
}

/// Records how a job ended with its event, unless this worker lost it
/// meanwhile (then nothing is written: `false`).
pub async fn finish(pool: &PgPool, build: &Claimed, end: End) -> anyhow::Result<bool> {
    let (kind, outcome, steps) = match &end {
        End::Build(Verdict::Succeeded { steps, .. }) => ("build", "succeeded", steps.clone()),
        End::Build(Verdict::Failed { steps, .. }) => ("build", "failed", steps.clone()),
        End::Build(Verdict::Skipped { steps, .. }) => ("build", "skipped", steps.clone()),
        End::Stack(v) => (
            "stack_run",
            if v.failure.is_none() {
                "passed"
            } else {
                "failed"
            },
            Vec::new(),
        ),
    };
    let recorded = match end {
        End::Build(verdict) => finish_build(pool, build, verdict).await,
        End::Stack(verdict) => finish_stack(pool, build, verdict).await,
    };
    if let Ok(true) = recorded {
        metrics::counter!("gantry_builds_total", "kind" => kind, "outcome" => outcome).increment(1);
        for step in steps {
            // The builder's own steps by name; a pipeline's test steps as one.
            let stage = match step.name.as_str() {
                s @ ("checkout" | "config" | "build" | "push") => s.to_owned(),
                _ => "test".to_owned(),
            };
            metrics::histogram!("gantry_build_stage_duration_seconds", "stage" => stage)
                .record(step.duration_ms as f64 / 1000.0);
        }
    }
    recorded
}

/// Records the verdict and emits `build.succeeded` or `build.failed`.
async fn finish_build(pool: &PgPool, build: &Claimed, verdict: Verdict) -> anyhow::Result<bool> {
    let (state, image_id, failure) = match &verdict {
        Verdict::Succeeded { image_id, .. } => {
            (BuildState::Succeeded, Some(image_id.as_str()), None)
        }
        Verdict::Failed {
            step,
            exit_code,
            reason,
            ..
        } => (
            BuildState::Failed,
            None,
            Some((step.as_str(), *exit_code, reason.as_str())),
        ),
        // No step failed: only the reason is recorded.
        Verdict::Skipped { reason, .. } => {
            (BuildState::Skipped, None, Some(("", 0, reason.as_str())))
        }
    };
    let revision = build.job.revision();
    let build_id = build.id.to_string();
    let payload = match verdict.clone() {
        Verdict::Succeeded {
            image_id,
            repository,
            digest,
            steps,
        } => Payload::BuildSucceeded(BuildSucceeded {
            revision: Some(revision),
            build_id,
            image_id,
            steps,
            repository,
            digest,
        }),
        Verdict::Failed {
            step,
            exit_code,
            reason,
            steps,
        } => Payload::BuildFailed(BuildFailed {
            revision: Some(revision),
            build_id,
            step,
            exit_code,
            reason,
            steps,
        }),
        Verdict::Skipped { reason, .. } => Payload::BuildSkipped(BuildSkipped {
            revision: Some(revision),
            build_id,
            reason,
        }),
    };
    record(pool, build, state, image_id, failure, payload).await
}

/// Records a stack run's verdict and emits `stack.run_passed` or
/// `stack.run_failed`.
async fn finish_stack(
    pool: &PgPool,
    build: &Claimed,
    verdict: StackVerdict,
) -> anyhow::Result<bool> {
    let Job::Stack(run) = &build.job else {
        anyhow::bail!("build {} is not a stack run", build.id);
    };
    let build_id = build.id.to_string();
    let StackVerdict {
        stack_commit,
        failure,
        services,
        compose,
        rancher_compose,
    } = verdict;
    let (state, payload) = match &failure {
        None => (
            BuildState::Succeeded,
            Payload::StackRunPassed(StackRunPassed {
                run: Some(run.clone()),
                build_id,
                stack_commit,
                services,
                compose,
                rancher_compose,
            }),
        ),
        Some((step, exit_code, reason)) => (
            BuildState::Failed,
            Payload::StackRunFailed(StackRunFailed {
                run: Some(run.clone()),
                build_id,
                stack_commit,
                step: step.clone(),
                exit_code: *exit_code,
                reason: reason.clone(),
                services,
            }),
        ),
    };
    let failure = failure
        .as_ref()
        .map(|(step, code, reason)| (step.as_str(), *code, reason.as_str()));
    record(pool, build, state, None, failure, payload).await
}

/// Writes the end of a build and its event in one transaction, while the
/// claim holds.
async fn record(
    pool: &PgPool,
    build: &Claimed,
    state: BuildState,
    image_id: Option<&str>,
    failure: Option<(&str, i32, &str)>,
    payload: Payload,
) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    let done = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE builds SET state = $4, image_id = $5, failed_step = $6, exit_code = $7, reason = $8,
                finished_at = now(), lease_until = NULL
         WHERE {}",
        BUILDS.held()
    )))
    .bind(build.claim.id)
    .bind(&build.claim.owner)
    .bind(build.claim.attempt)
    .bind(state)
    .bind(image_id)
    .bind(failure.map(|f| f.0).filter(|step| !step.is_empty()))
    .bind(failure.filter(|f| !f.0.is_empty()).map(|f| f.1))
    .bind(failure.map(|f| f.2))
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    gantry_bus::enqueue(
        &mut tx,
        &Event::new(&build.pipeline_id, &build.project, payload),
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}
