//! `gantry.v1.Deployments`: what runs where, and deployments on demand
//! (a given image, or back to the previous version).

use std::sync::Arc;

use gantry_config::GantryConfig;
use gantry_proto::v1::deployments_server::Deployments;
use gantry_proto::v1::{
    ApproveRequest, DeployRequest, DeployResponse, DeploymentInfo, EnvironmentInfo,
    ListDeploymentsRequest, ListDeploymentsResponse, ListEnvironmentsRequest,
    ListEnvironmentsResponse, RejectRequest, Revision, RollbackRequest,
};
use gantry_runtime::ApiError;
use prost::Message as _;
use sqlx::PgPool;
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::queue::{self, Image, Row, Trigger};

pub struct DeploymentsService {
    pub pool: PgPool,
    pub config: Arc<GantryConfig>,
    /// Wakes the deployment loop.
    pub wake: Arc<Notify>,
}

pub use gantry_proto::timestamp;

impl From<Row> for DeploymentInfo {
    fn from(r: Row) -> Self {
        let rev = r.revision();
        DeploymentInfo {
            deployment_id: r.id.to_string(),
            environment: r.environment,
            project: r.project,
            repository: r.repository,
            digest: r.digest,
            commit_sha: rev.commit_sha,
            git_ref: rev.git_ref,
            pipeline_id: r.pipeline_id,
            state: r.state.into(),
            trigger: r.trigger,
            reason: r.reason.unwrap_or_default(),
            container_id: r.container_id.unwrap_or_default(),
            created_at: Some(timestamp(r.created_at)),
            finished_at: r.finished_at.map(timestamp),
            decided_by: r.decided_by.unwrap_or_default(),
            decided_at: r.decided_at.map(timestamp),
            config_version: r.config_version.unwrap_or_default().max(0) as u32,
        }
    }
}

struct ImageRow {
    pipeline_id: String,
    project: String,
    repository: String,
    digest: String,
    revision: Option<Vec<u8>>,
}

impl From<ImageRow> for Image {
    fn from(i: ImageRow) -> Self {
        Image {
            pipeline_id: i.pipeline_id,
            project: i.project,
            repository: i.repository,
            digest: i.digest,
            revision: i
                .revision
                .and_then(|b| Revision::decode(b.as_slice()).ok())
                .unwrap_or_default(),
        }
    }
}

impl DeploymentsService {
    fn environment(&self, name: &str) -> Result<&gantry_config::Environment, Status> {
        self.config.environment(name).ok_or_else(|| {
            ApiError::NotFound(format!("no environment {name:?} is configured")).into()
        })
    }

    /// Approves or rejects what awaits approval in `environment`, as `who`.
    async fn decide(
        &self,
        environment: &str,
        deployment_id: &str,
        decision: queue::Decision,
        who: &str,
        reason: &str,
    ) -> Result<Response<DeployResponse>, Status> {
        let env = self.environment(environment)?;
        let expected = match deployment_id.trim() {
            "" => None,
            id => Some(id.parse::<uuid::Uuid>().map_err(|_| {
                ApiError::InvalidArgument(format!("deployment_id {id:?} is not a deployment id"))
            })?),
        };
        let Some(approval) = &env.approval else {
            return Err(ApiError::FailedPrecondition(format!(
                "{} does not require approval: its deployments do not wait",
                env.name
            ))
            .into());
        };
        if !approval.allows(who) {
            return Err(Status::permission_denied(format!(
                "the token {who:?} may not decide on deployments to {} (approval.by: {})",
                env.name,
                approval.by.join(", ")
            )));
        }
        let row = queue::decide(&self.pool, &env.name, expected, decision, who, reason)
            .await
            .map_err(ApiError::store)?
            .ok_or_else(|| match expected {
                Some(id) => ApiError::FailedPrecondition(format!(
                    "deployment {id} is not the one awaiting approval in {} (superseded or decided): look again with `gantry envs`",
                    env.name
                )),
                None => ApiError::NotFound(format!("no deployment awaits approval in {}", env.name)),
            })?;
        if decision == queue::Decision::Approve {
            self.wake.notify_one();
        }
        tracing::info!(environment = %env.name, digest = %row.digest, by = who, ?decision, "deployment decided");
        Ok(Response::new(DeployResponse {
            deployment: Some(row.into()),
        }))
    }

    async fn queue(
        &self,
        env: &gantry_config::Environment,
        image: &Image,
        trigger: Trigger,
        block: Option<&str>,
        config: queue::ConfigPick,
    ) -> Result<Response<DeployResponse>, Status> {
        let write = async {
            let mut tx = self.pool.begin().await?;
            if let Some(digest) = block {
                queue::block(&mut tx, &env.name, digest, "rolled back on request").await?;
            }
            let row = queue::enqueue(&mut tx, env, image, trigger, config).await?;
            tx.commit().await?;
            Ok::<_, sqlx::Error>(row)
        };
        let row = write.await.map_err(ApiError::store)?;
        self.wake.notify_one();
        tracing::info!(environment = %env.name, digest = %row.digest, trigger = trigger.as_str(), state = %row.state, "deployment queued");
        Ok(Response::new(DeployResponse {
            deployment: Some(row.into()),
        }))
    }
}

#[tonic::async_trait]
impl Deployments for DeploymentsService {
    async fn list_environments(
        &self,
        _request: Request<ListEnvironmentsRequest>,
    ) -> Result<Response<ListEnvironmentsResponse>, Status> {
        let mut environments = Vec::new();
        for env in &self.config.environments {
            let current = crate::queue::deployment_rows!(
                "WHERE id = (SELECT deployment_id FROM live WHERE environment = $1)",
                env.name
            )
            .fetch_optional(&self.pool)
            .await
            .map_err(ApiError::store)?;
            let pending = crate::queue::deployment_rows!(
                "WHERE environment = $1 AND state IN ('running', 'waiting', 'awaiting_approval') ORDER BY (state = 'running') DESC, created_at DESC LIMIT 1",
                env.name
            )
            .fetch_optional(&self.pool)
            .await
            .map_err(ApiError::store)?;
            let health = sqlx::query!(
                "SELECT healthy, reason, since FROM environment_health
                 WHERE environment = $1
                   AND deployment_id = (SELECT deployment_id FROM live WHERE environment = $1)",
                env.name
            )
            .fetch_optional(&self.pool)
            .await
            .map_err(ApiError::store)?;
            environments.push(EnvironmentInfo {
                name: env.name.clone(),
                project: env.project.clone(),
                target: env.target.clone(),
                rules: env.rules.iter().map(ToString::to_string).collect(),
                endpoint: env.endpoint.clone().unwrap_or_default(),
                current: current.map(Into::into),
                pending: pending.map(Into::into),
                approval: match &env.approval {
                    None => String::new(),
                    Some(a) if a.by.is_empty() => "required".into(),
                    Some(a) => format!("required, by {}", a.by.join(", ")),
                },
                promote_from: env.promote_from.clone().unwrap_or_default(),
                health: health
                    .as_ref()
                    .map(|h| if h.healthy { "healthy" } else { "unhealthy" }.to_owned())
                    .unwrap_or_default(),
                health_reason: health
                    .as_ref()
                    .and_then(|h| h.reason.clone())
                    .unwrap_or_default(),
                health_since: health.map(|h| gantry_proto::timestamp(h.since)),
            });
        }
        Ok(Response::new(ListEnvironmentsResponse { environments }))
    }

    async fn deploy(
        &self,
        request: Request<DeployRequest>,
    ) -> Result<Response<DeployResponse>, Status> {
        let req = request.into_inner();
        let env = self.environment(&req.environment)?;
        let wanted = req.image.trim();
        if wanted.is_empty() {
            return Err(ApiError::InvalidArgument(
                "image is empty: give a digest, commit sha, tag or pipeline id".into(),
            )
            .into());
        }
        let image = sqlx::query_as!(
            ImageRow,
            "SELECT pipeline_id, project, repository, digest, revision FROM images
             WHERE project = $1
               AND repository = $3
               AND (digest = $2 OR digest = 'sha256:' || $2 OR $2 = ANY(tags) OR pipeline_id = $2
                    OR (length($2) >= 7 AND $2 ~ '^[0-9a-f]+$' AND starts_with(commit_sha, $2)
                        -- A merge request's commit (perhaps a fork's, whose author can
                        -- mine a short sha) answers only to its full sha.
                        AND (length($2) = 40 OR NOT (git_ref LIKE 'refs/merge-requests/%'
                                                     OR git_ref LIKE 'refs/pull/%'))))
             ORDER BY CASE WHEN digest = $2 OR digest = 'sha256:' || $2 THEN 0
                           WHEN pipeline_id = $2 THEN 1
                           WHEN starts_with(commit_sha, $2) THEN 2
                           ELSE 3 END,
                      published_at DESC
             LIMIT 1",
            env.project,
            wanted,
            self.config
                .project(&env.project)
                .map(|p| p.image.as_str())
                .unwrap_or_default(),
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(ApiError::store)?;
        let Some(image) = image else {
            return Err(ApiError::NotFound(format!(
                "no published image of {} matches {wanted:?}",
                env.project
            ))
            .into());
        };
        self.queue(
            env,
            &image.into(),
            Trigger::Manual,
            None,
            queue::ConfigPick::Current,
        )
        .await
    }

    async fn rollback(
        &self,
        request: Request<RollbackRequest>,
    ) -> Result<Response<DeployResponse>, Status> {
        let req = request.into_inner();
        let env = self.environment(&req.environment)?;
        let Some(live) = queue::live(&self.pool, &env.name)
            .await
            .map_err(ApiError::store)?
        else {
            return Err(
                ApiError::FailedPrecondition(format!("nothing runs in {} yet", env.name)).into(),
            );
        };
        let live_config: Option<i32> = sqlx::query_scalar!(
            "SELECT config_version FROM deployments WHERE id = $1",
            live.deployment_id
        )
        .fetch_one(&self.pool)
        .await
        .map_err(ApiError::store)?;
        // The version before is the last other image — or the same image
        // with another configuration.
        let previous = crate::queue::deployment_rows!(
            "WHERE environment = $1 AND state = 'succeeded'
               AND (digest <> $2 OR config_version IS DISTINCT FROM $3)
             ORDER BY finished_at DESC LIMIT 1",
            env.name,
            live.digest,
            live_config,
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(ApiError::store)?;
        let Some(previous) = previous else {
            return Err(ApiError::FailedPrecondition(format!(
                "{} has no earlier version to go back to",
                env.name
            ))
            .into());
        };
        // The image and the configuration it ran with go back together.
        let previous_config = previous.config_version;
        let config = queue::ConfigPick::Version(previous_config);
        let image = previous.image();
        // The image going away is not deployed there again automatically
        // (unless it is the one coming back, with its old configuration),
        // nor is the configuration going away.
        let block = (image.digest != live.digest).then_some(live.digest.as_str());
        if live_config.is_some() && live_config != previous_config {
            let mut tx = self.pool.begin().await.map_err(ApiError::store)?;
            crate::config::mark_failed(&mut tx, &env.name, live_config, "rolled back on request")
                .await
                .map_err(ApiError::store)?;
            tx.commit().await.map_err(ApiError::store)?;
        }
        self.queue(env, &image, Trigger::Rollback, block, config)
            .await
    }

    async fn approve(
        &self,
        request: Request<ApproveRequest>,
    ) -> Result<Response<DeployResponse>, Status> {
        let who = gantry_runtime::auth::Caller::name_of(&request);
        let req = request.into_inner();
        self.decide(
            &req.environment,
            &req.deployment_id,
            queue::Decision::Approve,
            &who,
            "",
        )
        .await
    }

    async fn reject(
        &self,
        request: Request<RejectRequest>,
    ) -> Result<Response<DeployResponse>, Status> {
        let who = gantry_runtime::auth::Caller::name_of(&request);
        let req = request.into_inner();
        let reason = if req.reason.trim().is_empty() {
            format!("rejected by {who}")
        } else {
            format!("rejected by {who}: {}", req.reason.trim())
        };
        self.decide(
            &req.environment,
            &req.deployment_id,
            queue::Decision::Reject,
            &who,
            &reason,
        )
        .await
    }

    async fn list_deployments(
        &self,
        request: Request<ListDeploymentsRequest>,
    ) -> Result<Response<ListDeploymentsResponse>, Status> {
        let req = request.into_inner();
        let limit = i64::from(req.limit.clamp(1, 500));
        let limit = if req.limit == 0 { 50 } else { limit };
        let rows = crate::queue::deployment_rows!(
            "WHERE ($1 = '' OR environment = $1) ORDER BY created_at DESC LIMIT $2",
            req.environment,
            limit,
        )
        .fetch_all(&self.pool)
        .await
        .map_err(ApiError::store)?;
        Ok(Response::new(ListDeploymentsResponse {
            deployments: rows.into_iter().map(Into::into).collect(),
        }))
    }
}
