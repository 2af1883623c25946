//! The `builds` table, a leased queue ([`BUILDS`], with the rules of
//! `gantry-queue`): storing requests, claiming a build with its
//! `build.started`, and finishing it with its verdict event, only while the
//! claim holds.

use std::time::Duration;

use gantry_proto::v1::event::Payload;
use gantry_proto::v1::{
    BuildFailed, BuildStarted, BuildSucceeded, Event, PipelineRequested, StepResult,
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

/// A build a worker holds.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: Uuid,
    pub pipeline_id: String,
    pub project: String,
    pub request: PipelineRequested,
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

/// Stores a `pipeline.requested` event as a queued build, once per event id.
/// Returns `false` for a redelivery.
pub async fn enqueue_request(
    pool: &PgPool,
    event: &Event,
    request: &PipelineRequested,
) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    if !gantry_store::first_delivery(&mut tx, &event.id).await? {
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO builds (id, pipeline_id, project, event_id, request, traceparent)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (event_id) DO NOTHING",
    )
    .bind(Uuid::now_v7())
    .bind(&event.pipeline_id)
    .bind(&event.project)
    .bind(&event.id)
    .bind(request.encode_to_vec())
    .bind(gantry_telemetry::current_traceparent())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// pipeline_id, project, request, traceparent
type ClaimRow = (String, String, Vec<u8>, Option<String>);

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
    let (pipeline_id, project, request, traceparent): ClaimRow = sqlx::query_as(
        "SELECT pipeline_id, project, request, traceparent FROM builds WHERE id = $1",
    )
    .bind(claim.id)
    .fetch_one(&mut *tx)
    .await?;
    let request = PipelineRequested::decode(request.as_slice())?;
    let id = claim.id;
    let span = tracing::info_span!("build.claim", build_id = %id, pipeline_id = %pipeline_id);
    if let Some(tp) = &traceparent {
        gantry_telemetry::set_parent(&span, tp);
    }
    let event = Event::new(
        &pipeline_id,
        &project,
        Payload::BuildStarted(BuildStarted {
            revision: request.revision.clone(),
            build_id: id.to_string(),
            worker: worker.to_owned(),
            attempt: claim.attempt as u32,
        }),
    );
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
        request,
        attempt: claim.attempt,
        traceparent,
        claim,
    }))
}

/// Records the verdict and emits `build.succeeded` or `build.failed`, unless
/// this worker lost the build meanwhile (then nothing is written: `false`).
pub async fn finish(pool: &PgPool, build: &Claimed, verdict: Verdict) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    let (state, image_id, step, exit_code, reason) = match &verdict {
        Verdict::Succeeded { image_id, .. } => (
            BuildState::Succeeded,
            Some(image_id.as_str()),
            None,
            None,
            None,
        ),
        Verdict::Failed {
            step,
            exit_code,
            reason,
            ..
        } => (
            BuildState::Failed,
            None,
            Some(step.as_str()),
            Some(*exit_code),
            Some(reason.as_str()),
        ),
    };
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
    .bind(step)
    .bind(exit_code)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    let revision = build.request.revision.clone();
    let build_id = build.id.to_string();
    let payload = match verdict {
        Verdict::Succeeded {
            image_id,
            repository,
            digest,
            steps,
        } => Payload::BuildSucceeded(BuildSucceeded {
            revision,
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
            revision,
            build_id,
            step,
            exit_code,
            reason,
            steps,
        }),
    };
    gantry_bus::enqueue(
        &mut tx,
        &Event::new(&build.pipeline_id, &build.project, payload),
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}
