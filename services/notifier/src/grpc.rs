//! `gantry.v1.Pipelines`: the pipeline projection over gRPC — recent
//! pipelines, one pipeline with its timeline, and a stream of changes.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use gantry_config::GantryConfig;
use gantry_proto::v1::pipelines_server::Pipelines;
use gantry_proto::v1::{
    GetPipelineRequest, ListPipelinesRequest, ListPipelinesResponse, PipelineDetail,
    PipelineSummary, TimelineEntry, WatchPipelinesRequest,
};
use gantry_runtime::ApiError;
use gantry_states::PipelineState;
use sqlx::PgPool;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

/// How long a watch waits for a pipeline it does not know yet.
const UNKNOWN_PIPELINE_WAIT: Duration = Duration::from_secs(30);
/// How often a watch looks for changes.
const WATCH_POLL: Duration = Duration::from_millis(250);

pub struct PipelinesService {
    pub pool: PgPool,
    pub config: Arc<GantryConfig>,
}

pub use gantry_proto::timestamp;

pub struct PipelineRow {
    pipeline_id: String,
    project: String,
    git_ref: String,
    commit_sha: String,
    author: String,
    state: PipelineState,
    stage: String,
    failure: String,
    failed_step: String,
    digest: String,
    deployments: Vec<String>,
    created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// A checked `query_as!` of [`PipelineRow`]s: the pipelines (as `p`) that
/// `$rest` (a string literal: conditions, order, limit) selects, with its
/// arguments.
macro_rules! pipeline_rows {
    ($rest:tt $(, $arg:expr)* $(,)?) => {
        sqlx::query_as!(
            PipelineRow,
            r#"SELECT p.pipeline_id, p.project, p.git_ref, p.commit_sha, p.author,
                p.state AS "state: PipelineState", p.stage,
                p.failure, p.failed_step, p.digest, p.created_at, p.updated_at,
                COALESCE((SELECT array_agg(d.environment || '=' || d.state ORDER BY d.environment)
                          FROM pipeline_deployments d WHERE d.pipeline_id = p.pipeline_id), '{}')
                    AS "deployments!"
             FROM pipelines p "# + $rest
            $(, $arg)*
        )
    };
}

impl PipelineRow {
    pub fn summary(self, config: &GantryConfig) -> PipelineSummary {
        let failure = match (self.failed_step.is_empty(), self.failure.is_empty()) {
            (true, _) => self.failure,
            (false, true) => self.failed_step,
            (false, false) => format!("{}: {}", self.failed_step, self.failure),
        };
        PipelineSummary {
            url: crate::outbound::Links::new(config, &self.pipeline_id)
                .pipeline
                .unwrap_or_default(),
            pipeline_id: self.pipeline_id,
            project: self.project,
            git_ref: self.git_ref,
            commit_sha: self.commit_sha,
            author: self.author,
            state: self.state.into(),
            stage: self.stage,
            failure,
            digest: self.digest,
            deployments: self.deployments,
            created_at: Some(timestamp(self.created_at)),
            updated_at: Some(timestamp(self.updated_at)),
        }
    }
}

/// One pipeline's row.
pub async fn pipeline(pool: &PgPool, id: &str) -> sqlx::Result<Option<PipelineRow>> {
    pipeline_rows!("WHERE p.pipeline_id = $1", id)
        .fetch_optional(pool)
        .await
}

/// One pipeline's timeline.
pub async fn timeline(pool: &PgPool, id: &str) -> sqlx::Result<Vec<TimelineEntry>> {
    let rows = sqlx::query!(
        "SELECT kind, occurred_at, summary FROM timeline WHERE pipeline_id = $1 ORDER BY occurred_at, event_id",
        id,
    )
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|r| TimelineEntry {
            kind: r.kind,
            occurred_at: Some(timestamp(r.occurred_at)),
            summary: r.summary,
        })
        .collect())
}

#[tonic::async_trait]
impl Pipelines for PipelinesService {
    async fn list(
        &self,
        request: Request<ListPipelinesRequest>,
    ) -> Result<Response<ListPipelinesResponse>, Status> {
        let req = request.into_inner();
        let limit = if req.limit == 0 {
            20
        } else {
            req.limit.min(500)
        };
        let rows: Vec<PipelineRow> = pipeline_rows!(
            "WHERE ($1 = '' OR p.project = $1) ORDER BY p.created_at DESC LIMIT $2",
            req.project,
            i64::from(limit),
        )
        .fetch_all(&self.pool)
        .await
        .map_err(ApiError::store)?;
        Ok(Response::new(ListPipelinesResponse {
            pipelines: rows.into_iter().map(|r| r.summary(&self.config)).collect(),
        }))
    }

    async fn get(
        &self,
        request: Request<GetPipelineRequest>,
    ) -> Result<Response<PipelineDetail>, Status> {
        let id = request.into_inner().pipeline_id;
        let row = pipeline(&self.pool, &id)
            .await
            .map_err(ApiError::store)?
            .ok_or_else(|| ApiError::NotFound(format!("no pipeline {id}")))?;
        let timeline = timeline(&self.pool, &id).await.map_err(ApiError::store)?;
        Ok(Response::new(PipelineDetail {
            pipeline: Some(row.summary(&self.config)),
            timeline,
        }))
    }

    type WatchStream = ReceiverStream<Result<PipelineSummary, Status>>;

    async fn watch(
        &self,
        request: Request<WatchPipelinesRequest>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let req = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let (pool, config) = (self.pool.clone(), self.config.clone());
        tokio::spawn(async move {
            // A pipeline just triggered may not have reached the notifier yet.
            let unknown_after = tokio::time::Instant::now() + UNKNOWN_PIPELINE_WAIT;
            let mut seen = false;
            // A single pipeline starts with its current state; a watch of all
            // pipelines starts with what changes from now on.
            let mut since: DateTime<Utc> = if req.pipeline_id.is_empty() {
                // The database's clock, which stamps updated_at.
                match sqlx::query_scalar!(r#"SELECT clock_timestamp() AS "now!""#)
                    .fetch_one(&pool)
                    .await
                {
                    Ok(now) => now,
                    Err(e) => {
                        let _ = tx.send(Err(ApiError::store(e).into())).await;
                        return;
                    }
                }
            } else {
                DateTime::<Utc>::UNIX_EPOCH
            };
            loop {
                let rows: Result<Vec<PipelineRow>, _> = pipeline_rows!(
                    "WHERE p.updated_at > $1 AND ($2 = '' OR p.pipeline_id = $2)
                       AND ($3 = '' OR p.project = $3)
                     ORDER BY p.updated_at LIMIT 200",
                    since,
                    req.pipeline_id,
                    req.project,
                )
                .fetch_all(&pool)
                .await;
                match rows {
                    Ok(rows) => {
                        for row in rows {
                            seen = true;
                            since = since.max(row.updated_at);
                            if tx.send(Ok(row.summary(&config))).await.is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "watch query failed"),
                }
                if !seen
                    && !req.pipeline_id.is_empty()
                    && tokio::time::Instant::now() > unknown_after
                {
                    let _ = tx
                        .send(Err(Status::from(ApiError::NotFound(format!(
                            "no pipeline {}",
                            req.pipeline_id
                        )))))
                        .await;
                    return;
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(WATCH_POLL) => {}
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
