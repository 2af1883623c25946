//! The webhook endpoints: `POST /hooks/gitlab` and `POST /hooks/github`, and
//! per project `POST /hooks/gitlab/{project}` and `/hooks/github/{project}`.
//!
//! Order of checks: declared body size (413, before the body is read), body
//! size (413), the secret (401), JSON (400; GitHub's form-encoded deliveries
//! are read from their `payload` field, other content types are refused
//! naming theirs), a GitHub `ping` (200 "pong", with or without a
//! repository), the project the payload names (401), event type (202
//! "ignored"), payload shape (400 naming the field),
//! then the delivery is stored with its event in the outbox and answered 202
//! with the pipeline id (200 "duplicate" for a delivery seen before).
//!
//! The secret is checked before the body is parsed: GitLab's token against
//! every project's secret, GitHub's HMAC over the raw body likewise (each
//! comparison in constant time). An unknown project and a wrong secret get
//! the same 401, so nobody learns which projects exist.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
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
        .route("/hooks/gitlab/{project}", post(gitlab))
        .route("/hooks/github", post(github))
        .route("/hooks/github/{project}", post(github))
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(axum::middleware::from_fn_with_state(
            body_limit,
            refuse_declared_oversize,
        ))
        .with_state(state)
}

/// Answers 413 at once to a request whose `Content-Length` is over the
/// limit, without reading its body.
async fn refuse_declared_oversize(
    State(limit): State<usize>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let declared = request
        .headers()
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return HookError::TooLarge(limit).into_response();
    }
    next.run(request).await
}

/// The projects that may have sent a delivery: those on the forge (`on`),
/// only `only` when the URL names one, whose secret `matches`. Every
/// candidate's secret is checked, whatever the outcome.
fn authenticated<'a>(
    state: &'a AppState,
    only: Option<&str>,
    on: impl Fn(&Project) -> bool,
    matches: impl Fn(&str) -> bool,
) -> Result<Vec<&'a Project>, HookError> {
    let candidates: Vec<&Project> = state
        .config
        .projects
        .iter()
        .filter(|p| on(p) && only.is_none_or(|name| p.name == name))
        .filter(|p| {
            p.webhook_secret
                .as_ref()
                .is_some_and(|s| matches(s.expose()))
        })
        .collect();
    if candidates.is_empty() {
        Err(HookError::Unauthorized)
    } else {
        Ok(candidates)
    }
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

/// `POST /hooks/gitlab` and `/hooks/gitlab/{project}`.
#[tracing::instrument(name = "webhook.gitlab", skip_all, fields(otel.kind = "server", project, commit, pipeline_id))]
async fn gitlab(
    State(hooks): State<Arc<Hooks>>,
    only: Option<UrlPath<String>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HookError> {
    let only = only.map(|UrlPath(p)| p);
    let only = only.as_deref();
    let headers = &headers;
    record_parent(headers);
    let body = body_or_error(&hooks, body)?;
    let state = &hooks.app;
    let token = headers
        .get("x-gitlab-token")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    let candidates = authenticated(
        state,
        only,
        |p| p.gitlab.is_some(),
        |secret| forge::gitlab_token_matches(token, secret),
    )?;
    let value = parse_json(&body)?;
    let path = str_at(&value, "/project/path_with_namespace")?;
    let project = candidates
        .into_iter()
        .find(|p| p.is_gitlab(path))
        .ok_or(HookError::Unauthorized)?;
    tracing::Span::current().record("project", project.name.as_str());
    let event = header(headers, "x-gitlab-event")
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
    let key = delivery_key(headers, "x-gitlab-event-uuid", &body);
    let delivery = Delivery {
        source: "gitlab",
        key: &key,
        event: &event,
        body: &body,
    };
    accept(state, project, outcome, delivery).await
}

/// `POST /hooks/github` and `/hooks/github/{project}`.
#[tracing::instrument(name = "webhook.github", skip_all, fields(otel.kind = "server", project, commit, pipeline_id))]
async fn github(
    State(hooks): State<Arc<Hooks>>,
    only: Option<UrlPath<String>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HookError> {
    let only = only.map(|UrlPath(p)| p);
    let only = only.as_deref();
    let headers = &headers;
    record_parent(headers);
    let body = body_or_error(&hooks, body)?;
    let state = &hooks.app;
    let signature = headers
        .get("x-hub-signature-256")
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    // The HMAC covers the raw body: nothing is parsed before it checks out.
    let candidates = authenticated(
        state,
        only,
        |p| p.github.is_some(),
        |secret| forge::github_signature_matches(signature, &body, secret),
    )?;
    let value = parse_json(&github_json(headers, &body)?)?;
    let event = header(headers, "x-github-event")
        .unwrap_or_default()
        .to_owned();
    // A new hook's ping; an organisation's or an app's names no repository.
    if event == "ping" {
        return Ok((StatusCode::OK, Json(json!({ "status": "pong" }))).into_response());
    }
    let name = str_at(&value, "/repository/full_name")?;
    let project = candidates
        .into_iter()
        .find(|p| p.is_github(name))
        .ok_or(HookError::Unauthorized)?;
    tracing::Span::current().record("project", project.name.as_str());
    if event != "push" {
        return Err(HookError::Ignored(format!(
            "event {event:?} does not start pipelines"
        )));
    }
    let push: forge::GithubPush = typed(value, "GitHub push")?;
    let outcome = push.outcome().map_err(HookError::BadPayload)?;
    let key = delivery_key(headers, "x-github-delivery", &body);
    let delivery = Delivery {
        source: "github",
        key: &key,
        event: &event,
        body: &body,
    };
    accept(state, project, outcome, delivery).await
}

/// The JSON of a GitHub delivery: the body, or the `payload` field of a
/// hook set to the `application/x-www-form-urlencoded` content type (the
/// signature covers the body as sent, so it is checked before this).
fn github_json<'a>(
    headers: &HeaderMap,
    body: &'a [u8],
) -> Result<std::borrow::Cow<'a, [u8]>, HookError> {
    let content_type = header(headers, "content-type").unwrap_or("application/json");
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" | "" => Ok(body.into()),
        "application/x-www-form-urlencoded" => form_urlencoded::parse(body)
            .find(|(k, _)| k == "payload")
            .map(|(_, v)| v.into_owned().into_bytes().into())
            .ok_or_else(|| {
                HookError::BadPayload(
                    "a form-encoded delivery (application/x-www-form-urlencoded) must carry the event in its `payload` field".into(),
                )
            }),
        other => Err(HookError::BadPayload(format!(
            "content type {other:?} is not supported; set the hook's content type to application/json (or application/x-www-form-urlencoded)"
        ))),
    }
}

/// Joins the caller's trace when the request carries a `traceparent`.
fn record_parent(headers: &HeaderMap) {
    if let Some(tp) = gantry_telemetry::traceparent_from_headers(headers) {
        gantry_telemetry::set_parent(&tracing::Span::current(), tp);
    }
}
