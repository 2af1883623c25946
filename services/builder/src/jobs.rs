//! The `builds` table, a leased queue ([`BUILDS`], with the rules of
//! `gantry-queue`): storing requests, claiming a build with its
//! `build.started` (`stack.run_started` for a stack's integration run), and
//! finishing it with its verdict event, only while the claim holds.

use std::time::Duration;

use gantry_proto::v1::event::Payload;
use gantry_proto::v1::{
    BuildFailed, BuildStarted, BuildSucceeded, Event, PipelineRequested, Revision, StackRun,
    StackRunFailed, StackRunPassed, StackRunStarted, StackService, StepResult,
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
}

/// Stores a `pipeline.requested` or `stack.run_requested` event as a
/// queued build, once per event id. Returns `false` for a redelivery.
pub async fn enqueue_request(pool: &PgPool, event: &Event, job: &Job) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    if !gantry_store::first_delivery(&mut tx, &event.id).await? {
        return Ok(false);
    }
    sqlx::query!(
        "INSERT INTO builds (id, pipeline_id, project, event_id, kind, request, traceparent)
         VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (event_id) DO NOTHING",
        Uuid::now_v7(),
        event.pipeline_id,
        event.project,
        event.id,
        job.kind(),
        job.encode(),
        gantry_telemetry::current_traceparent(),
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
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
    match end {
        End::Build(verdict) => finish_build(pool, build, verdict).await,
        End::Stack(verdict) => finish_stack(pool, build, verdict).await,
    }
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
    .bind(failure.map(|f| f.0))
    .bind(failure.map(|f| f.1))
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
