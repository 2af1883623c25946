//! The pages that commit statuses and chat messages link to:
//! `GET /pipelines/{id}` (the pipeline and its timeline, as JSON) and
//! `GET /pipelines/{id}/log` (the build log as text, read from the builder
//! over gRPC).
//!
//! They need a token with the `read` scope (`Authorization: Bearer`, or as
//! the password of Basic authentication so that a browser can ask for it),
//! unless the configuration makes them public (`pages: {public: true}`).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use gantry_config::GantryConfig;
use gantry_proto::v1::StreamLogsRequest;
use gantry_proto::v1::builds_client::BuildsClient;
use sqlx::PgPool;

#[derive(Clone)]
pub struct Pages {
    pub pool: PgPool,
    pub config: Arc<GantryConfig>,
    /// The builder's gRPC address, for logs.
    pub builder: Option<String>,
    /// How the notifier calls the builder: its token and the CA of its certificate.
    pub builder_token: gantry_proto::client::Bearer,
    pub ca_pem: Option<Vec<u8>>,
}

pub fn routes(pages: Pages) -> axum::Router {
    axum::Router::new()
        .route("/pipelines/{id}", get(pipeline))
        .route("/pipelines/{id}/log", get(log))
        .layer(axum::middleware::from_fn_with_state(
            pages.config.clone(),
            require_read,
        ))
        .with_state(pages)
}

/// Lets a request through with a `read` token, or any when pages are public.
async fn require_read(
    State(config): State<Arc<GantryConfig>>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if config.public_pages {
        return next.run(request).await;
    }
    match gantry_runtime::auth::authorize(
        &config.tokens,
        request.headers(),
        gantry_config::Scope::Read,
    ) {
        Ok(_) => next.run(request).await,
        Err(denied) => {
            let status = match denied {
                gantry_runtime::auth::Denied::Scope { .. } => StatusCode::FORBIDDEN,
                _ => StatusCode::UNAUTHORIZED,
            };
            let mut response = problem(status, &denied.to_string());
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Basic realm=\"gantry\", charset=\"UTF-8\""),
            );
            response
        }
    }
}

fn problem(status: StatusCode, message: &str) -> Response {
    (status, axum::Json(serde_json::json!({ "error": message }))).into_response()
}

async fn pipeline(State(pages): State<Pages>, Path(id): Path<String>) -> Response {
    let row = match crate::grpc::pipeline(&pages.pool, &id).await {
        Ok(Some(row)) => row,
        Ok(None) => return problem(StatusCode::NOT_FOUND, "no such pipeline"),
        Err(e) => {
            tracing::error!(error = %e, "pipeline page query failed");
            return problem(
                StatusCode::SERVICE_UNAVAILABLE,
                "the pipeline store is unavailable",
            );
        }
    };
    let timeline = crate::grpc::timeline(&pages.pool, &id)
        .await
        .unwrap_or_default();
    let summary = row.summary(&pages.config);
    let at = |t: &Option<prost_types::Timestamp>| {
        t.as_ref()
            .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
            .map(|t| t.to_rfc3339())
    };
    let body = serde_json::json!({
        "pipeline_id": summary.pipeline_id,
        "project": summary.project,
        "ref": summary.git_ref,
        "commit": summary.commit_sha,
        "author": summary.author,
        "state": summary.state,
        "stage": summary.stage,
        "failure": summary.failure,
        "digest": summary.digest,
        "deployments": summary.deployments,
        "created_at": at(&summary.created_at),
        "updated_at": at(&summary.updated_at),
        "timeline": timeline.iter().map(|e| serde_json::json!({
            "kind": e.kind, "at": at(&e.occurred_at), "summary": e.summary,
        })).collect::<Vec<_>>(),
    });
    axum::Json(body).into_response()
}

async fn log(State(pages): State<Pages>, Path(id): Path<String>) -> Response {
    let Some(builder) = pages.builder.clone() else {
        return problem(
            StatusCode::NOT_FOUND,
            "logs are not available: GANTRY_BUILDER_URL is not set",
        );
    };
    let fetch = async {
        let channel = gantry_proto::client::endpoint(&builder, pages.ca_pem.as_deref())
            .map_err(|e| anyhow::anyhow!(e))?
            .connect()
            .await?;
        let mut client = BuildsClient::new(gantry_proto::client::authed(
            channel,
            pages.builder_token.clone(),
        ));
        let mut stream = client
            .stream_logs(StreamLogsRequest {
                pipeline_id: id.clone(),
                build_id: String::new(),
                follow: false,
            })
            .await?
            .into_inner();
        let mut text = Vec::new();
        while let Some(chunk) = stream.message().await? {
            text.extend_from_slice(&chunk.data);
        }
        Ok::<_, anyhow::Error>(text)
    };
    match fetch.await {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response(),
        Err(e) => {
            if let Some(status) = e.downcast_ref::<tonic::Status>()
                && status.code() == tonic::Code::NotFound
            {
                return problem(StatusCode::NOT_FOUND, "this pipeline has no build log");
            }
            tracing::warn!(error = format!("{e:#}"), "cannot read a build log");
            problem(StatusCode::BAD_GATEWAY, "the builder is unavailable")
        }
    }
}
