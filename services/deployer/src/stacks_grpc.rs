//! `gantry.v1.Stacks`: the configured stacks, their integration runs,
//! their releases and their environments; deploying a release, rolling an
//! environment back.

use std::sync::Arc;

use gantry_config::GantryConfig;
use gantry_proto::v1::stacks_server::Stacks;
use gantry_proto::v1::{
    DeployStackRequest, GetStackRequest, ListStackReleasesRequest, ListStackReleasesResponse,
    ListStackRunsRequest, ListStackRunsResponse, ListStacksRequest, ListStacksResponse,
    RollbackStackRequest, StackDeploymentInfo, StackEnvironmentInfo, StackInfo, StackReleaseInfo,
    StackRun, StackRunInfo, StackServices,
};
use gantry_runtime::ApiError;
use prost::Message as _;
use sqlx::PgPool;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::grpc::timestamp;

pub struct StacksService {
    pub pool: PgPool,
    pub config: Arc<GantryConfig>,
    /// Wakes the stack deployment loop.
    pub wake: Arc<tokio::sync::Notify>,
}

impl From<crate::stack_deploy::Row> for StackDeploymentInfo {
    fn from(r: crate::stack_deploy::Row) -> Self {
        StackDeploymentInfo {
            deployment_id: r.id.to_string(),
            environment: r.environment,
            stack: r.stack,
            release: r.release as u64,
            state: r.state,
            trigger: r.trigger,
            reason: r.reason.unwrap_or_default(),
            previous_release: r.previous_release.unwrap_or_default() as u64,
            created_at: Some(timestamp(r.created_at)),
            finished_at: r.finished_at.map(timestamp),
        }
    }
}

struct RunRow {
    id: Uuid,
    stack: String,
    number: i64,
    state: String,
    run: Vec<u8>,
    pipeline_id: String,
    build_id: Option<String>,
    stack_commit: Option<String>,
    failed_step: Option<String>,
    reason: Option<String>,
    services: Option<Vec<u8>>,
    release: Option<i64>,
    created_at: chrono::DateTime<chrono::Utc>,
    finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

fn services(bytes: Option<&[u8]>) -> Vec<gantry_proto::v1::StackService> {
    bytes
        .and_then(|b| StackServices::decode(b).ok())
        .map(|s| s.services)
        .unwrap_or_default()
}

impl From<RunRow> for StackRunInfo {
    fn from(r: RunRow) -> Self {
        let run = StackRun::decode(r.run.as_slice()).unwrap_or_default();
        StackRunInfo {
            run_id: r.id.to_string(),
            stack: r.stack,
            number: r.number as u64,
            state: r.state,
            stack_commit: r.stack_commit.unwrap_or_default(),
            git_ref: run.revision.map(|rev| rev.git_ref).unwrap_or_default(),
            build_id: r.build_id.unwrap_or_default(),
            failed_step: r.failed_step.unwrap_or_default(),
            reason: r.reason.unwrap_or_default(),
            triggers: run.triggers,
            services: services(r.services.as_deref()),
            release: r.release.unwrap_or_default() as u64,
            created_at: Some(timestamp(r.created_at)),
            finished_at: r.finished_at.map(timestamp),
            pipeline_id: r.pipeline_id,
        }
    }
}

struct ReleaseRow {
    stack: String,
    number: i64,
    run_id: Uuid,
    stack_commit: String,
    services: Vec<u8>,
    created_at: chrono::DateTime<chrono::Utc>,
}

impl From<ReleaseRow> for StackReleaseInfo {
    fn from(r: ReleaseRow) -> Self {
        StackReleaseInfo {
            stack: r.stack,
            number: r.number as u64,
            run_id: r.run_id.to_string(),
            stack_commit: r.stack_commit,
            services: services(Some(&r.services)),
            created_at: Some(timestamp(r.created_at)),
        }
    }
}

fn limit(asked: u32) -> i64 {
    match asked {
        0 => 20,
        n => i64::from(n.min(500)),
    }
}

impl StacksService {
    fn stack(&self, name: &str) -> Result<&gantry_config::Project, ApiError> {
        self.config
            .project(name)
            .filter(|p| p.is_stack())
            .ok_or_else(|| ApiError::NotFound(format!("no stack named {name:?}")))
    }

    async fn runs(&self, stack: &str, limit: i64) -> Result<Vec<StackRunInfo>, ApiError> {
        let rows = sqlx::query_as!(
            RunRow,
            r#"SELECT r.id, r.stack, r.number, r.state, r.run, r.pipeline_id, r.build_id, r.stack_commit,
                      r.failed_step, r.reason, r.services, s.number AS "release?", r.created_at, r.finished_at
               FROM stack_runs r LEFT JOIN stack_releases s ON s.run_id = r.id
               WHERE r.stack = $1 ORDER BY r.number DESC LIMIT $2"#,
            stack,
            limit,
        )
        .fetch_all(&self.pool)
        .await
        .map_err(ApiError::store)?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    async fn releases(&self, stack: &str, limit: i64) -> Result<Vec<StackReleaseInfo>, ApiError> {
        let rows = sqlx::query_as!(
            ReleaseRow,
            "SELECT stack, number, run_id, stack_commit, services, created_at
             FROM stack_releases WHERE stack = $1 ORDER BY number DESC LIMIT $2",
            stack,
            limit,
        )
        .fetch_all(&self.pool)
        .await
        .map_err(ApiError::store)?;
        Ok(rows.into_iter().map(Into::into).collect())
    }

    /// The stack environment named `name`, with its stack.
    fn environment(
        &self,
        name: &str,
    ) -> Result<(&gantry_config::Environment, &gantry_config::Project), ApiError> {
        let env = self
            .config
            .environment(name)
            .ok_or_else(|| ApiError::NotFound(format!("no environment named {name:?}")))?;
        let stack = self
            .config
            .project(&env.project)
            .filter(|p| p.is_stack())
            .ok_or_else(|| {
                ApiError::InvalidArgument(format!(
                    "environment {name:?} deploys project {:?}, not a stack (use Deployments)",
                    env.project
                ))
            })?;
        Ok((env, stack))
    }

    async fn deployments(
        &self,
        environment: &str,
        condition: &str,
    ) -> Result<Option<StackDeploymentInfo>, ApiError> {
        let row: Option<crate::stack_deploy::Row> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {} FROM stack_deployments WHERE environment = $1 AND {condition}
             ORDER BY created_at DESC LIMIT 1",
            crate::stack_deploy::COLUMNS
        )))
        .bind(environment)
        .fetch_optional(&self.pool)
        .await
        .map_err(ApiError::store)?;
        Ok(row.map(Into::into))
    }

    async fn environments(
        &self,
        stack: &gantry_config::Project,
    ) -> Result<Vec<StackEnvironmentInfo>, ApiError> {
        let mut out = Vec::new();
        for env in self
            .config
            .environments
            .iter()
            .filter(|e| e.project == stack.name)
        {
            let live = crate::stack_deploy::live_release(&self.pool, &env.name)
                .await
                .map_err(ApiError::store)?;
            out.push(StackEnvironmentInfo {
                name: env.name.clone(),
                endpoint: env.endpoint.clone().unwrap_or_default(),
                service: env.service.clone().unwrap_or_default(),
                rules: env.rules.iter().map(ToString::to_string).collect(),
                release: live.map(|l| l.0 as u64).unwrap_or_default(),
                since: live.map(|l| timestamp(l.1)),
                pending: self
                    .deployments(&env.name, "state IN ('waiting', 'running')")
                    .await?,
                last: self
                    .deployments(&env.name, "state NOT IN ('waiting', 'running')")
                    .await?,
            });
        }
        Ok(out)
    }

    /// Queues `release` for the environment (in one transaction with the
    /// blocking of a rolled-back release).
    async fn queue(
        &self,
        env: &gantry_config::Environment,
        stack: &gantry_config::Project,
        release: i64,
        trigger: crate::queue::Trigger,
        block_current: Option<i64>,
    ) -> Result<StackDeploymentInfo, ApiError> {
        let pipeline_id = sqlx::query_scalar!(
            "SELECT r.pipeline_id FROM stack_releases s JOIN stack_runs r ON r.id = s.run_id
             WHERE s.stack = $1 AND s.number = $2",
            stack.name,
            release,
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(ApiError::store)?;
        let Some(pipeline_id) = pipeline_id else {
            return Err(ApiError::NotFound(format!(
                "stack {} has no release {release}",
                stack.name
            )));
        };
        let mut tx = self.pool.begin().await.map_err(ApiError::store)?;
        if let Some(current) = block_current {
            crate::stack_deploy::block(&mut tx, &env.name, current, "rolled back by hand")
                .await
                .map_err(ApiError::store)?;
        }
        let row = crate::stack_deploy::enqueue(
            &mut tx,
            &env.name,
            &stack.name,
            release,
            &pipeline_id,
            trigger,
        )
        .await
        .map_err(ApiError::store)?;
        tx.commit().await.map_err(ApiError::store)?;
        self.wake.notify_one();
        Ok(row.into())
    }

    async fn info(&self, stack: &gantry_config::Project) -> Result<StackInfo, ApiError> {
        let members = sqlx::query_scalar!("SELECT members FROM stacks WHERE name = $1", stack.name)
            .fetch_optional(&self.pool)
            .await
            .map_err(ApiError::store)?
            .unwrap_or_default();
        let last_run = self.runs(&stack.name, 1).await?.into_iter().next();
        // Members as services of the last run that named them.
        let members = match &last_run {
            Some(run) if !run.services.is_empty() => run
                .services
                .iter()
                .filter(|s| !s.project.is_empty())
                .map(|s| format!("{}={}", s.service, s.project))
                .collect(),
            _ => members,
        };
        Ok(StackInfo {
            name: stack.name.clone(),
            clone_url: stack.clone_url.clone(),
            default_branch: stack.default_branch.clone(),
            members,
            last_run,
            latest_release: self.releases(&stack.name, 1).await?.into_iter().next(),
            environments: self.environments(stack).await?,
        })
    }
}

#[tonic::async_trait]
impl Stacks for StacksService {
    async fn list(
        &self,
        _request: Request<ListStacksRequest>,
    ) -> Result<Response<ListStacksResponse>, Status> {
        let mut stacks = Vec::new();
        for stack in self.config.projects.iter().filter(|p| p.is_stack()) {
            stacks.push(self.info(stack).await?);
        }
        Ok(Response::new(ListStacksResponse { stacks }))
    }

    async fn get(&self, request: Request<GetStackRequest>) -> Result<Response<StackInfo>, Status> {
        let stack = self.stack(&request.into_inner().stack)?;
        Ok(Response::new(self.info(stack).await?))
    }

    async fn list_runs(
        &self,
        request: Request<ListStackRunsRequest>,
    ) -> Result<Response<ListStackRunsResponse>, Status> {
        let req = request.into_inner();
        let stack = self.stack(&req.stack)?;
        Ok(Response::new(ListStackRunsResponse {
            runs: self.runs(&stack.name, limit(req.limit)).await?,
        }))
    }

    async fn list_releases(
        &self,
        request: Request<ListStackReleasesRequest>,
    ) -> Result<Response<ListStackReleasesResponse>, Status> {
        let req = request.into_inner();
        let stack = self.stack(&req.stack)?;
        Ok(Response::new(ListStackReleasesResponse {
            releases: self.releases(&stack.name, limit(req.limit)).await?,
        }))
    }

    async fn deploy(
        &self,
        request: Request<DeployStackRequest>,
    ) -> Result<Response<StackDeploymentInfo>, Status> {
        let req = request.into_inner();
        let (env, stack) = self.environment(&req.environment)?;
        let release = i64::try_from(req.release)
            .ok()
            .filter(|r| *r > 0)
            .ok_or_else(|| ApiError::InvalidArgument("release must be a release number".into()))?;
        let queued = self
            .queue(env, stack, release, crate::queue::Trigger::Manual, None)
            .await?;
        Ok(Response::new(queued))
    }

    async fn rollback(
        &self,
        request: Request<RollbackStackRequest>,
    ) -> Result<Response<StackDeploymentInfo>, Status> {
        let req = request.into_inner();
        let (env, stack) = self.environment(&req.environment)?;
        if let Some(running) = self.deployments(&env.name, "state = 'running'").await? {
            return Err(ApiError::FailedPrecondition(format!(
                "release {} is being deployed to {}; roll back once it ends",
                running.release, env.name
            ))
            .into());
        }
        let current = crate::stack_deploy::live_release(&self.pool, &env.name)
            .await
            .map_err(ApiError::store)?
            .map(|l| l.0)
            .ok_or_else(|| {
                ApiError::FailedPrecondition(format!("nothing runs in {} yet", env.name))
            })?;
        // The release that ran before the current one: the newest succeeded
        // deployment there of another release.
        let previous = sqlx::query_scalar!(
            "SELECT release FROM stack_deployments
             WHERE environment = $1 AND state = 'succeeded' AND release <> $2
               AND release NOT IN (SELECT release FROM stack_blocked WHERE environment = $1)
             ORDER BY finished_at DESC LIMIT 1",
            env.name,
            current,
        )
        .fetch_optional(&self.pool)
        .await
        .map_err(ApiError::store)?;
        let Some(previous) = previous else {
            return Err(ApiError::FailedPrecondition(format!(
                "{} has run no other release to go back to",
                env.name
            ))
            .into());
        };
        let queued = self
            .queue(
                env,
                stack,
                previous,
                crate::queue::Trigger::Rollback,
                Some(current),
            )
            .await?;
        Ok(Response::new(queued))
    }
}
