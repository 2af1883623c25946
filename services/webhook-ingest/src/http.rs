//! The webhook endpoints: `POST /hooks/gitlab`, `/hooks/github` and
//! `/hooks/gitea`, and per project `POST /hooks/<forge>/{project}`. Pushes
//! and merge requests (GitLab's `Merge Request Hook`, GitHub's and Gitea's
//! `pull_request`) start pipelines.
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
//! every project's secret, GitHub's and Gitea's HMAC over the raw body
//! likewise (each comparison in constant time). An unknown project and a wrong secret get
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
        .route("/hooks/gitea", post(gitea))
        .route("/hooks/gitea/{project}", post(gitea))
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
    let (mut revision, forks) = match outcome {
        PushOutcome::Ignore(why) => return Err(HookError::Ignored(why)),
        PushOutcome::Build(rev, forks) => (*rev, forks),
    };
    if let Some(mr) = &mut revision.merge_request {
        if project.is_stack() {
            return Err(HookError::Ignored(
                "merge requests of a stack project start no pipeline".into(),
            ));
        }
        // The builder checks it again and fails the pipeline, with the
        // reason, when none of the fork's URLs is on the project's server.
        mr.head_clone_url = forks
            .iter()
            .find(|url| gantry_config::git::fork_url_refusal(&project.clone_url, url).is_none())
            .or(forks.first())
            .cloned()
            .unwrap_or_default();
    }
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
    let (kinds, outcome): (&[&str], _) = match event.as_str() {
        "Push Hook" | "Tag Push Hook" => {
            let push: forge::GitlabPush = typed(value, "GitLab push")?;
            (
                &["push", "tag_push"],
                (push.object_kind.clone(), push.outcome()),
            )
        }
        "Merge Request Hook" => {
            let mr: forge::GitlabMergeRequest = typed(value, "GitLab merge request")?;
            (&["merge_request"], (mr.object_kind.clone(), mr.outcome()))
        }
        _ => {
            return Err(HookError::Ignored(format!(
                "event {event:?} does not start pipelines"
            )));
        }
    };
    let (object_kind, outcome) = outcome;
    if !kinds.contains(&object_kind.as_str()) {
        return Err(HookError::BadPayload(format!(
            "object_kind {object_kind:?} does not match event {event:?}"
        )));
    }
    let outcome = outcome.map_err(HookError::BadPayload)?;
    let key = delivery_key(headers, "x-gitlab-event-uuid", &body);
    let delivery = Delivery {
        source: "gitlab",
        key: &key,
        event: &event,
        body: &body,
    };
    accept(state, project, outcome, delivery).await
}

/// What tells GitHub's deliveries from Gitea's (their payloads are alike).
struct Hub {
    source: &'static str,
    signature_header: &'static str,
    signature_matches: fn(&[u8], &[u8], &str) -> bool,
    event_header: &'static str,
    delivery_header: &'static str,
    on: fn(&Project) -> bool,
    is: fn(&Project, &str) -> bool,
}

const GITHUB: Hub = Hub {
    source: "github",
    signature_header: "x-hub-signature-256",
    signature_matches: forge::github_signature_matches,
    event_header: "x-github-event",
    delivery_header: "x-github-delivery",
    on: |p| p.github.is_some(),
    is: Project::is_github,
};

const GITEA: Hub = Hub {
    source: "gitea",
    signature_header: "x-gitea-signature",
    signature_matches: forge::gitea_signature_matches,
    event_header: "x-gitea-event",
    delivery_header: "x-gitea-delivery",
    on: |p| p.gitea.is_some(),
    is: Project::is_gitea,
};

/// `POST /hooks/github` and `/hooks/github/{project}`.
#[tracing::instrument(name = "webhook.github", skip_all, fields(otel.kind = "server", project, commit, pipeline_id))]
async fn github(
    State(hooks): State<Arc<Hooks>>,
    only: Option<UrlPath<String>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HookError> {
    hub(&GITHUB, &hooks, only, &headers, body).await
}

/// `POST /hooks/gitea` and `/hooks/gitea/{project}`.
#[tracing::instrument(name = "webhook.gitea", skip_all, fields(otel.kind = "server", project, commit, pipeline_id))]
async fn gitea(
    State(hooks): State<Arc<Hooks>>,
    only: Option<UrlPath<String>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HookError> {
    hub(&GITEA, &hooks, only, &headers, body).await
}

/// A GitHub or Gitea delivery: `push` and `pull_request` start pipelines.
async fn hub(
    forge: &Hub,
    hooks: &Hooks,
    only: Option<UrlPath<String>>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, HookError> {
    let only = only.map(|UrlPath(p)| p);
    let only = only.as_deref();
    record_parent(headers);
    let body = body_or_error(hooks, body)?;
    let state = &hooks.app;
    let signature = headers
        .get(forge.signature_header)
        .map(|v| v.as_bytes())
        .unwrap_or_default();
    // The HMAC covers the raw body: nothing is parsed before it checks out.
    let candidates = authenticated(state, only, forge.on, |secret| {
        (forge.signature_matches)(signature, &body, secret)
    })?;
    let value = parse_json(&github_json(headers, &body)?)?;
    let event = header(headers, forge.event_header)
        .unwrap_or_default()
        .to_owned();
    // A new hook's ping; an organisation's or an app's names no repository.
    if event == "ping" {
        return Ok((StatusCode::OK, Json(json!({ "status": "pong" }))).into_response());
    }
    let name = str_at(&value, "/repository/full_name")?;
    let project = candidates
        .into_iter()
        .find(|p| (forge.is)(p, name))
        .ok_or(HookError::Unauthorized)?;
    tracing::Span::current().record("project", project.name.as_str());
    let outcome = match event.as_str() {
        "push" => typed::<forge::GithubPush>(value, "push")?.outcome(forge.source),
        "pull_request" => {
            typed::<forge::PullRequestEvent>(value, "pull_request")?.outcome(forge.source)
        }
        _ => {
            return Err(HookError::Ignored(format!(
                "event {event:?} does not start pipelines"
            )));
        }
    };
    let outcome = outcome.map_err(HookError::BadPayload)?;
    let key = delivery_key(headers, forge.delivery_header, &body);
    let delivery = Delivery {
        source: forge.source,
        key: &key,
        event: &event,
        body: &body,
    };
    accept(state, project, outcome, delivery).await
}

/// The JSON of a GitHub or Gitea delivery: the body, or the `payload` field
/// of a hook set to the `application/x-www-form-urlencoded` content type (the
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
