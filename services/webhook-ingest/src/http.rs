//! The webhook endpoints: `POST /hooks/gitlab` and `POST /hooks/github`.
//!
//! Order of checks: body size (413), JSON (400), project (404), secret (401),
//! event type (202 "ignored"), payload shape (400 naming the field), then the
//! delivery is stored with its event in the outbox and answered 202 with the
//! pipeline id (200 "duplicate" for a delivery seen before).

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use gantry_config::Project;
use serde::de::DeserializeOwned;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::AppState;
use crate::forge::{self, PushOutcome};
use crate::pipelines::{self, Delivery, Started};

/// Everything a webhook call can end in other than acceptance.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("{0}")]
    BadPayload(String),
    #[error("unknown project {0:?}")]
    UnknownProject(String),
    #[error("missing or wrong webhook secret")]
    Unauthorized,
    #[error("ignored: {0}")]
    Ignored(String),
    #[error("the body is larger than the limit of {0} bytes")]
    TooLarge(usize),
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl IntoResponse for HookError {
    fn into_response(self) -> Response {
        let (status, body) = match &self {
            HookError::BadPayload(m) => (StatusCode::BAD_REQUEST, json!({ "error": m })),
            HookError::UnknownProject(_) => {
                (StatusCode::NOT_FOUND, json!({ "error": self.to_string() }))
            }
            HookError::Unauthorized => (
                StatusCode::UNAUTHORIZED,
                json!({ "error": self.to_string() }),
            ),
            HookError::TooLarge(_) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                json!({ "error": self.to_string() }),
            ),
            HookError::Ignored(why) => (
                StatusCode::ACCEPTED,
                json!({ "status": "ignored", "reason": why }),
            ),
            HookError::Internal(e) => {
                tracing::error!(error = format!("{e:#}"), "webhook could not be stored");
                (
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!({ "error": "the delivery could not be stored; retry later" }),
                )
            }
        };
        (status, Json(body)).into_response()
    }
}

/// What the webhook handlers share.
pub struct Hooks {
    app: Arc<AppState>,
    body_limit: usize,
}

/// The raw body, or the answer for one that could not be read.
fn body_or_error(hooks: &Hooks, body: Result<Bytes, BytesRejection>) -> Result<Bytes, HookError> {
    body.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            HookError::TooLarge(hooks.body_limit)
        } else {
            HookError::BadPayload(format!("cannot read the body: {}", rejection.body_text()))
        }
    })
}

/// The webhook routes, with the body limit.
pub fn routes(state: Arc<AppState>, body_limit: usize) -> axum::Router {
    let state = Arc::new(Hooks {
        app: state,
        body_limit,
    });
    axum::Router::new()
        .route("/hooks/gitlab", post(gitlab))
        .route("/hooks/github", post(github))
        .layer(DefaultBodyLimit::max(body_limit))
        .with_state(state)
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

fn parse_json(body: &[u8]) -> Result<serde_json::Value, HookError> {
    serde_json::from_slice(body)
        .map_err(|e| HookError::BadPayload(format!("body is not valid JSON: {e}")))
}

fn typed<T: DeserializeOwned>(value: serde_json::Value, what: &str) -> Result<T, HookError> {
    serde_json::from_value(value)
        .map_err(|e| HookError::BadPayload(format!("not a valid {what} payload: {e}")))
}

fn str_at<'a>(value: &'a serde_json::Value, pointer: &str) -> Result<&'a str, HookError> {
    value
        .pointer(pointer)
        .and_then(|v| v.as_str())
        .ok_or_else(|| {
            HookError::BadPayload(format!(
                "missing string field {}",
                pointer.trim_start_matches('/').replace('/', ".")
            ))
        })
}

/// The delivery key: `Idempotency-Key`, else the forge's delivery id, else a
/// hash of the body (an identical body is the same delivery).
fn delivery_key(headers: &HeaderMap, forge_header: &str, body: &[u8]) -> String {
    header(headers, "idempotency-key")
        .or_else(|| header(headers, forge_header))
        .filter(|k| !k.is_empty())
        .map(str::to_owned)
        .unwrap_or_else(|| format!("sha256:{}", hex::encode(Sha256::digest(body))))
}

async fn accept(
    state: &AppState,
    project: &Project,
    outcome: PushOutcome,
    delivery: Delivery<'_>,
) -> Result<Response, HookError> {
    let mut revision = match outcome {
        PushOutcome::Ignore(why) => return Err(HookError::Ignored(why.to_owned())),
        PushOutcome::Build(rev) => *rev,
    };
    revision.clone_url = project.clone_url.clone();
    if revision.default_branch.is_empty() {
        revision.default_branch = project.default_branch.clone();
    }
    let span = tracing::Span::current();
    span.record("commit", revision.commit_sha.as_str());
    let started = pipelines::start(&state.pool, &project.name, &delivery, revision).await?;
    span.record("pipeline_id", started.pipeline_id().to_string());
    Ok(match started {
        Started::New(id) => {
            state.relay_wake.notify_one();
            tracing::info!(project = %project.name, pipeline_id = %id, "pipeline requested");
            (
                StatusCode::ACCEPTED,
                Json(json!({ "status": "accepted", "pipeline_id": id })),
            )
                .into_response()
        }
        Started::Duplicate(id) => (
            StatusCode::OK,
            Json(json!({ "status": "duplicate", "pipeline_id": id })),
        )
            .into_response(),
    })
}

#[tracing::instrument(name = "webhook.gitlab", skip_all, fields(otel.kind = "server", project, commit, pipeline_id))]
async fn gitlab(
    State(hooks): State<Arc<Hooks>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HookError> {
    record_parent(&headers);
    let body = body_or_error(&hooks, body)?;
    let state = &hooks.app;
    let value = parse_json(&body)?;
    let path = str_at(&value, "/project/path_with_namespace")?;
    let project = state
        .config
        .project_by_gitlab(path)
        .ok_or_else(|| HookError::UnknownProject(path.to_owned()))?;
    tracing::Span::current().record("project", project.name.as_str());
    let token = headers
        .get("x-gitlab-token")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !forge::gitlab_token_matches(token, project.webhook_secret.expose()) {
        return Err(HookError::Unauthorized);
    }
    let event = header(&headers, "x-gitlab-event")
        .unwrap_or_default()
        .to_owned();
    if event != "Push Hook" && event != "Tag Push Hook" {
        return Err(HookError::Ignored(format!(
            "event {event:?} does not start pipelines"
        )));
    }
    let push: forge::GitlabPush = typed(value, "GitLab push")?;
    if push.object_kind != "push" && push.object_kind != "tag_push" {
        return Err(HookError::BadPayload(format!(
            "object_kind {:?} does not match event {event:?}",
            push.object_kind
        )));
    }
    let outcome = push.outcome().map_err(HookError::BadPayload)?;
    let key = delivery_key(&headers, "x-gitlab-event-uuid", &body);
    let delivery = Delivery {
        source: "gitlab",
        key: &key,
        event: &event,
        body: &body,
    };
    accept(state, project, outcome, delivery).await
}

#[tracing::instrument(name = "webhook.github", skip_all, fields(otel.kind = "server", project, commit, pipeline_id))]
async fn github(
    State(hooks): State<Arc<Hooks>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HookError> {
    record_parent(&headers);
    let body = body_or_error(&hooks, body)?;
    let state = &hooks.app;
    let value = parse_json(&body)?;
    let name = str_at(&value, "/repository/full_name")?;
    let project = state
        .config
        .project_by_github(name)
        .ok_or_else(|| HookError::UnknownProject(name.to_owned()))?;
    tracing::Span::current().record("project", project.name.as_str());
    let signature = headers
        .get("x-hub-signature-256")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    if !forge::github_signature_matches(signature, &body, project.webhook_secret.expose()) {
        return Err(HookError::Unauthorized);
    }
    let event = header(&headers, "x-github-event")
        .unwrap_or_default()
        .to_owned();
    if event != "push" {
        return Err(HookError::Ignored(format!(
            "event {event:?} does not start pipelines"
        )));
    }
    let push: forge::GithubPush = typed(value, "GitHub push")?;
    let outcome = push.outcome().map_err(HookError::BadPayload)?;
    let key = delivery_key(&headers, "x-github-delivery", &body);
    let delivery = Delivery {
        source: "github",
        key: &key,
        event: &event,
        body: &body,
    };
    accept(state, project, outcome, delivery).await
}

/// Joins the caller's trace when the request carries a `traceparent`.
fn record_parent(headers: &HeaderMap) {
    if let Some(tp) = gantry_telemetry::traceparent_from_headers(headers) {
        gantry_telemetry::set_parent(&tracing::Span::current(), tp);
    }
}
