//! Starting a pipeline: the delivery, the pipeline row and the
//! `pipeline.requested` event are written in one transaction, so that what
//! was acknowledged is never lost and a repeated delivery starts nothing.

use gantry_proto::v1::event::Payload;
use gantry_proto::v1::{Event, PipelineRequested, Revision};
use sqlx::PgPool;
use uuid::Uuid;

/// The result of offering a delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Started {
    /// A new pipeline was started.
    New(Uuid),
    /// This delivery was seen before; its pipeline is this one.
    Duplicate(Uuid),
}

impl Started {
    pub fn pipeline_id(&self) -> Uuid {
        match self {
            Started::New(id) | Started::Duplicate(id) => *id,
        }
    }
}

/// What identifies a delivery for deduplication (within its project: two
/// projects may use the same key).
pub struct Delivery<'a> {
    pub source: &'a str,
    pub key: &'a str,
    pub event: &'a str,
    pub body: &'a [u8],
}

/// Stores the delivery and starts a pipeline for `revision` unless the
/// delivery was already accepted.
pub async fn start(
    pool: &PgPool,
    project: &str,
    delivery: &Delivery<'_>,
    revision: Revision,
) -> anyhow::Result<Started> {
    let pipeline_id = Uuid::now_v7();
    let mut tx = pool.begin().await?;
    sqlx::query!(
        "INSERT INTO pipelines (id, project, source, commit_sha, git_ref) VALUES ($1, $2, $3, $4, $5)",
        pipeline_id,
        project,
        delivery.source,
        revision.commit_sha,
        revision.git_ref,
    )
    .execute(&mut *tx)
    .await?;
    let inserted = sqlx::query!(
        "INSERT INTO deliveries (source, delivery_key, event, project, pipeline_id, body)
         VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT DO NOTHING",
        delivery.source,
        delivery.key,
        delivery.event,
        project,
        pipeline_id,
        delivery.body,
    )
    .execute(&mut *tx)
    .await?;
    if inserted.rows_affected() == 0 {
        tx.rollback().await?;
        let existing = sqlx::query_scalar!(
            "SELECT pipeline_id FROM deliveries WHERE project = $1 AND source = $2 AND delivery_key = $3",
            project,
            delivery.source,
            delivery.key,
        )
        .fetch_one(pool)
        .await?;
        return Ok(Started::Duplicate(existing));
    }
    let event = Event::new(
        &pipeline_id.to_string(),
        project,
        Payload::PipelineRequested(PipelineRequested {
            revision: Some(revision),
            delivery_id: delivery.key.to_owned(),
        }),
    );
    gantry_bus::enqueue(&mut tx, &event).await?;
    tx.commit().await?;
    Ok(Started::New(pipeline_id))
}
