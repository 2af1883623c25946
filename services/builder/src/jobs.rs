//! The `builds` table: storing requests, claiming work under a lease,
//! renewing it, and finishing a build together with its outgoing event.

use std::time::Duration;

use gantry_proto::v1::event::Payload;
use gantry_proto::v1::{
    BuildFailed, BuildStarted, BuildSucceeded, Event, PipelineRequested, StepResult,
};
use prost::Message as _;
use sqlx::PgPool;
use uuid::Uuid;

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

/// id, pipeline_id, project, request, attempt, traceparent
type ClaimRow = (Uuid, String, String, Vec<u8>, i32, Option<String>);

/// Takes the oldest queued build, or a running one whose lease ran out, and
/// emits `build.started` in the same transaction.
pub async fn claim(
    pool: &PgPool,
    worker: &str,
    lease: Duration,
) -> anyhow::Result<Option<Claimed>> {
    let mut tx = pool.begin().await?;
    let row: Option<ClaimRow> = sqlx::query_as(
        "UPDATE builds SET state = 'running', worker = $1, attempt = attempt + 1,
                lease_until = now() + make_interval(secs => $2), started_at = now()
         WHERE id = (SELECT id FROM builds
                     WHERE state = 'queued' OR (state = 'running' AND lease_until < now())
                     ORDER BY created_at FOR UPDATE SKIP LOCKED LIMIT 1)
         RETURNING id, pipeline_id, project, request, attempt, traceparent",
    )
    .bind(worker)
    .bind(lease.as_secs_f64())
    .fetch_optional(&mut *tx)
    .await?;
    let Some((id, pipeline_id, project, request, attempt, traceparent)) = row else {
        return Ok(None);
    };
    let request = PipelineRequested::decode(request.as_slice())?;
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
            attempt: attempt as u32,
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
        attempt,
        traceparent,
    }))
}

/// Extends the lease; `false` if this worker no longer holds the build.
pub async fn renew(
    pool: &PgPool,
    build: &Claimed,
    worker: &str,
    lease: Duration,
) -> anyhow::Result<bool> {
    let done = sqlx::query(
        "UPDATE builds SET lease_until = now() + make_interval(secs => $4)
         WHERE id = $1 AND worker = $2 AND attempt = $3 AND state = 'running'",
    )
    .bind(build.id)
    .bind(worker)
    .bind(build.attempt)
    .bind(lease.as_secs_f64())
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Gives a build back to the queue (graceful shutdown of its worker).
pub async fn release(pool: &PgPool, build: &Claimed, worker: &str) -> anyhow::Result<()> {
    sqlx::query(
        "UPDATE builds SET state = 'queued', worker = NULL, lease_until = NULL, attempt = attempt - 1
         WHERE id = $1 AND worker = $2 AND attempt = $3 AND state = 'running'",
    )
    .bind(build.id)
    .bind(worker)
    .bind(build.attempt)
    .execute(pool)
    .await?;
    Ok(())
}

/// Records the verdict and emits `build.succeeded` or `build.failed`, unless
/// this worker lost the build meanwhile (then nothing is written: `false`).
pub async fn finish(
    pool: &PgPool,
    build: &Claimed,
    worker: &str,
    verdict: Verdict,
) -> anyhow::Result<bool> {
    let mut tx = pool.begin().await?;
    let (state, image_id, step, exit_code, reason) = match &verdict {
        Verdict::Succeeded { image_id, .. } => {
            ("succeeded", Some(image_id.as_str()), None, None, None)
        }
        Verdict::Failed {
            step,
            exit_code,
            reason,
            ..
        } => (
            "failed",
            None,
            Some(step.as_str()),
            Some(*exit_code),
            Some(reason.as_str()),
        ),
    };
    let done = sqlx::query(
        "UPDATE builds SET state = $4, image_id = $5, failed_step = $6, exit_code = $7, reason = $8,
                finished_at = now(), lease_until = NULL
         WHERE id = $1 AND worker = $2 AND attempt = $3 AND state = 'running'",
    )
    .bind(build.id)
    .bind(worker)
    .bind(build.attempt)
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
