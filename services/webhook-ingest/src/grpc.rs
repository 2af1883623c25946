//! `gantry.v1.Ingest`: manual triggers. The ref is resolved to a commit with
//! `git ls-remote` against the project's clone URL.

use std::sync::Arc;
use std::time::Duration;

use gantry_proto::v1::ingest_server::Ingest;
use gantry_proto::v1::{TriggerRequest, TriggerResponse};
use gantry_runtime::ApiError;
use tonic::{Request, Response, Status};

use crate::AppState;
use crate::forge::revision_for_ref;
use crate::pipelines::{self, Delivery, Started};

/// How long resolving a ref may take.
const LS_REMOTE_TIMEOUT: Duration = Duration::from_secs(30);

pub struct IngestService {
    pub state: Arc<AppState>,
}

/// Resolves `wanted` (a branch, a tag, or a full ref) at `url` to `(full
/// ref, sha)`, with the project's clone `credentials` if it has any.
pub async fn resolve_ref(
    url: &str,
    credentials: Option<&gantry_config::GitCredentials>,
    wanted: &str,
) -> anyhow::Result<Option<(String, String)>> {
    let candidates: Vec<String> = if wanted.starts_with("refs/") {
        vec![wanted.to_owned()]
    } else {
        vec![
            format!("refs/heads/{wanted}"),
            format!("refs/tags/{wanted}"),
        ]
    };
    let out = tokio::time::timeout(
        LS_REMOTE_TIMEOUT,
        tokio::process::Command::new("git")
            .arg("ls-remote")
            .arg("--")
            .arg(url)
            .args(&candidates)
            .env("GIT_TERMINAL_PROMPT", "0")
            .envs(credentials.map(|c| c.helper_env(url)).unwrap_or_default())
            .kill_on_drop(true)
            .output(),
    )
    .await??;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let stderr = match credentials {
            Some(c) => c.scrub(&stderr),
            None => stderr.into_owned(),
        };
        anyhow::bail!("git ls-remote failed: {}", stderr.trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let refs: Vec<(&str, &str)> = text
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(sha, r)| (r, sha))
        .collect();
    for c in &candidates {
        // An annotated tag's peeled commit ("^{}") wins over the tag object.
        let peeled = format!("{c}^{{}}");
        if let Some((_, sha)) = refs
            .iter()
            .find(|(r, _)| *r == peeled)
            .or_else(|| refs.iter().find(|(r, _)| r == c))
        {
            return Ok(Some((c.clone(), (*sha).to_owned())));
        }
    }
    Ok(None)
}

#[tonic::async_trait]
impl Ingest for IngestService {
    #[tracing::instrument(name = "grpc.Ingest.Trigger", skip_all, fields(otel.kind = "server", project, git_ref, pipeline_id))]
    async fn trigger(
        &self,
        request: Request<TriggerRequest>,
    ) -> Result<Response<TriggerResponse>, Status> {
        if let Some(tp) = request
            .metadata()
            .get("traceparent")
            .and_then(|v| v.to_str().ok())
        {
            gantry_telemetry::set_parent(&tracing::Span::current(), tp);
        }
        let idempotency = request
            .metadata()
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let req = request.into_inner();
        let project = self
            .state
            .config
            .project(&req.project)
            .ok_or_else(|| ApiError::NotFound(format!("unknown project {:?}", req.project)))?;
        if req.r#ref.is_empty() {
            return Err(ApiError::InvalidArgument("ref is empty".into()).into());
        }
        let (full_ref, sha) = resolve_ref(
            &project.clone_url,
            project.clone_credentials.as_ref(),
            &req.r#ref,
        )
        .await
        .map_err(|e| ApiError::Upstream(format!("cannot read refs of {}: {e:#}", project.name)))?
        .ok_or_else(|| {
            ApiError::NotFound(format!(
                "no branch or tag {:?} in {}",
                req.r#ref, project.name
            ))
        })?;
        let mut revision = revision_for_ref(&full_ref, &sha);
        revision.clone_url = project.clone_url.clone();
        revision.default_branch = project.default_branch.clone();
        revision.source = "manual".into();
        let key = idempotency.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
        let body = format!("{{\"project\":{:?},\"ref\":{:?}}}", project.name, full_ref);
        let delivery = Delivery {
            source: "manual",
            key: &key,
            event: "trigger",
            body: body.as_bytes(),
        };
        let started = pipelines::start(&self.state.pool, &project.name, &delivery, revision)
            .await
            .map_err(ApiError::store)?;
        if matches!(started, Started::New(_)) {
            self.state.relay_wake.notify_one();
        }
        tracing::Span::current().record("pipeline_id", started.pipeline_id().to_string());
        Ok(Response::new(TriggerResponse {
            pipeline_id: started.pipeline_id().to_string(),
            commit_sha: sha,
            git_ref: full_ref,
        }))
    }
}
