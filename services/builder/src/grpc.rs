//! `gantry.v1.Builds`: build logs (replayed from the database, then followed
//! while the build runs), the builds of a pipeline, and canceling one.

use std::time::Duration;

use gantry_proto::v1::builds_server::Builds;
use gantry_proto::v1::{
    BuildInfo, CancelRequest, CancelResponse, GetBuildsRequest, GetBuildsResponse, LogChunk,
    StreamLogsRequest,
};
use gantry_runtime::ApiError;
use gantry_states::BuildState;
use sqlx::PgPool;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use uuid::Uuid;

/// How often a followed log looks for new lines.
const FOLLOW_POLL: Duration = Duration::from_millis(200);
/// Log rows fetched per query.
const PAGE: i64 = 500;

pub struct BuildsService {
    pub pool: PgPool,
    /// Woken when an event is in the outbox.
    pub relay_wake: std::sync::Arc<tokio::sync::Notify>,
}

struct BuildRow {
    id: Uuid,
    pipeline_id: String,
    project: String,
    state: BuildState,
    attempt: i32,
    image_id: Option<String>,
    failed_step: Option<String>,
    exit_code: Option<i32>,
    kind: String,
    request: Vec<u8>,
}

impl From<BuildRow> for BuildInfo {
    fn from(r: BuildRow) -> Self {
        let commit_sha = crate::jobs::Job::decode(&r.kind, &r.request)
            .map(|job| job.revision().commit_sha)
            .unwrap_or_default();
        BuildInfo {
            build_id: r.id.to_string(),
            pipeline_id: r.pipeline_id,
            project: r.project,
            state: r.state.into(),
            commit_sha,
            failed_step: r.failed_step.unwrap_or_default(),
            exit_code: r.exit_code.unwrap_or_default(),
            image_id: r.image_id.unwrap_or_default(),
            attempt: r.attempt.max(0) as u32,
        }
    }
}

#[tonic::async_trait]
impl Builds for BuildsService {
    type StreamLogsStream = ReceiverStream<Result<LogChunk, Status>>;

    async fn stream_logs(
        &self,
        request: Request<StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let req = request.into_inner();
        let build_id: Uuid = if !req.build_id.is_empty() {
            req.build_id
                .parse()
                .map_err(|_| ApiError::InvalidArgument("build_id is not a UUID".into()))?
        } else if !req.pipeline_id.is_empty() {
            sqlx::query_scalar!(
                "SELECT id FROM builds WHERE pipeline_id = $1 ORDER BY created_at DESC LIMIT 1",
                req.pipeline_id
            )
            .fetch_optional(&self.pool)
            .await
            .map_err(ApiError::store)?
            .ok_or_else(|| ApiError::NotFound("no build for this pipeline (yet)".into()))?
        } else {
            return Err(
                ApiError::InvalidArgument("give a build_id or a pipeline_id".into()).into(),
            );
        };
        let exists = sqlx::query_scalar!(
            r#"SELECT state AS "state: BuildState" FROM builds WHERE id = $1"#,
            build_id
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(ApiError::store)?;
        if exists.is_none() {
            return Err(ApiError::NotFound("no such build".into()).into());
        }
        let (tx, rx) = tokio::sync::mpsc::channel(64);
        let pool = self.pool.clone();
        tokio::spawn(async move {
            let mut last = 0i64;
            loop {
                // Read the state before the rows: a build seen finished has all its rows.
                let state = sqlx::query_scalar!(
                    r#"SELECT state AS "state: BuildState" FROM builds WHERE id = $1"#,
                    build_id
                )
                .fetch_one(&pool)
                .await;
                let finished = matches!(&state, Ok(s) if s.is_finished());
                let rows = match sqlx::query!(
                    "SELECT seq, step, stream, data FROM build_logs WHERE build_id = $1 AND seq > $2 ORDER BY seq LIMIT $3",
                    build_id,
                    last,
                    PAGE,
                )
                .fetch_all(&pool)
                .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = tx.send(Err(ApiError::store(e).into())).await;
                        return;
                    }
                };
                let full_page = rows.len() as i64 == PAGE;
                for row in rows {
                    last = row.seq;
                    let chunk = LogChunk {
                        build_id: build_id.to_string(),
                        seq: row.seq as u64,
                        step: row.step,
                        stream: row.stream,
                        data: row.data,
                    };
                    if tx.send(Ok(chunk)).await.is_err() {
                        return; // the client went away
                    }
                }
                if full_page {
                    continue;
                }
                if !req.follow || finished {
                    return;
                }
                tokio::select! {
                    _ = tx.closed() => return,
                    _ = tokio::time::sleep(FOLLOW_POLL) => {}
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_builds(
        &self,
        request: Request<GetBuildsRequest>,
    ) -> Result<Response<GetBuildsResponse>, Status> {
        let req = request.into_inner();
        let rows = sqlx::query_as!(
            BuildRow,
            r#"SELECT id, pipeline_id, project, state AS "state: BuildState", attempt, image_id,
                      failed_step, exit_code, kind, request
               FROM builds WHERE pipeline_id = $1 ORDER BY created_at"#,
            req.pipeline_id
        )
        .fetch_all(&self.pool)
        .await
        .map_err(ApiError::store)?;
        Ok(Response::new(GetBuildsResponse {
            builds: rows.into_iter().map(Into::into).collect(),
        }))
    }

    async fn cancel(
        &self,
        request: Request<CancelRequest>,
    ) -> Result<Response<CancelResponse>, Status> {
        let who = gantry_runtime::auth::Caller::name_of(&request);
        let req = request.into_inner();
        if req.pipeline_id.is_empty() {
            return Err(ApiError::InvalidArgument("give a pipeline_id".into()).into());
        }
        let mut tx = self.pool.begin().await.map_err(ApiError::store)?;
        let latest = sqlx::query!(
            r#"SELECT id, kind, state AS "state: BuildState" FROM builds
               WHERE pipeline_id = $1 ORDER BY created_at DESC LIMIT 1 FOR UPDATE"#,
            req.pipeline_id
        )
        .fetch_optional(&mut *tx)
        .await
        .map_err(ApiError::store)?
        .ok_or_else(|| ApiError::NotFound("no build for this pipeline (yet)".into()))?;
        if latest.kind != "build" {
            return Err(ApiError::FailedPrecondition(
                "a stack's integration run cannot be canceled; it ends by its timeout".into(),
            )
            .into());
        }
        if latest.state.is_finished() {
            return Err(ApiError::FailedPrecondition(format!(
                "the pipeline's build already ended: {}",
                latest.state
            ))
            .into());
        }
        let why = crate::jobs::Cancellation {
            reason: format!("canceled by {who}"),
            superseded_by: String::new(),
        };
        crate::jobs::cancel(&mut tx, &[latest.id], &why)
            .await
            .map_err(ApiError::store)?;
        tx.commit().await.map_err(ApiError::store)?;
        self.relay_wake.notify_one();
        Ok(Response::new(CancelResponse {
            build_id: latest.id.to_string(),
            state: BuildState::Canceled.to_string(),
            reason: why.reason,
        }))
    }
}
