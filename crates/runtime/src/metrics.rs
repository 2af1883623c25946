//! Prometheus metrics of a service, served at `/metrics` (a token with the
//! `read` scope, as Prometheus's `authorization` sends it). One recorder
//! per process, installed when the service starts ([`install`]); what every
//! service has is recorded here — HTTP answers by route and status with
//! their latency, the outbox's backlog and age, the depth of its leased
//! work queues —, and each service records its own work with the `metrics`
//! macros (`gantry_builds_total`, `gantry_deployments_total`,
//! `gantry_outbound_calls_total`, …).
//!
//! Names and labels stay bounded: routes are the router's patterns, never
//! the paths asked; no project, branch or commit is a label.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use gantry_config::{ApiToken, Scope};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio_util::sync::CancellationToken;

/// How often queue depths and the outbox are sampled.
const SAMPLE_EVERY: Duration = Duration::from_secs(5);

/// Bucket bounds (seconds) of every `*_seconds` histogram.
const BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    120.0, 300.0, 600.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// The process's recorder, installed on first use.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let builder = builder
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed");
            }
            handle
        })
        .clone()
}

/// `/metrics`, for a token with the `read` scope.
pub fn routes(tokens: Vec<ApiToken>) -> axum::Router {
    let handle = install();
    axum::Router::new().route(
        "/metrics",
        get(move |headers: HeaderMap| {
            let handle = handle.clone();
            let tokens = tokens.clone();
            async move {
                if let Err(denied) = crate::auth::authorize(&tokens, &headers, Scope::Read) {
                    let status = match denied {
                        crate::auth::Denied::Scope { .. } => StatusCode::FORBIDDEN,
                        _ => StatusCode::UNAUTHORIZED,
                    };
                    return (status, denied.to_string()).into_response();
                }
                (
                    [(
                        header::CONTENT_TYPE,
                        "text/plain; version=0.0.4; charset=utf-8",
                    )],
                    handle.render(),
                )
                    .into_response()
            }
        }),
    )
}

/// Counts every answer of a route (`route`, `status`) and its latency.
pub async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("gantry_http_requests_total", "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("gantry_http_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Samples the outbox (`gantry_outbox_pending`, `gantry_outbox_lag_seconds`:
/// the age of the oldest event not yet published) and each of `queues`
/// (`gantry_queue_depth{queue, state}`, waiting and running) until
/// `shutdown`; keeps the recorder's histograms trimmed.
pub async fn sample(
    pool: sqlx::PgPool,
    queues: Vec<gantry_queue::Queue>,
    shutdown: CancellationToken,
) {
    let handle = install();
    loop {
        let outbox: Result<(i64, f64), sqlx::Error> = sqlx::query_as(
            "SELECT count(*), COALESCE(EXTRACT(EPOCH FROM now() - min(created_at)), 0)::float8
             FROM outbox",
        )
        .fetch_one(&pool)
        .await;
        if let Ok((pending, lag)) = outbox {
            metrics::gauge!("gantry_outbox_pending").set(pending as f64);
            metrics::gauge!("gantry_outbox_lag_seconds").set(lag);
        }
        for q in &queues {
            // The table and states are the queue's constants, not input.
            let sql = format!(
                "SELECT count(*) FILTER (WHERE state = '{}'), count(*) FILTER (WHERE state = '{}') FROM {}",
                q.waiting, q.running, q.table
            );
            let depth: Result<(i64, i64), sqlx::Error> = sqlx::query_as(sqlx::AssertSqlSafe(sql))
                .fetch_one(&pool)
                .await;
            if let Ok((waiting, running)) = depth {
                metrics::gauge!("gantry_queue_depth", "queue" => q.table, "state" => "waiting")
                    .set(waiting as f64);
                metrics::gauge!("gantry_queue_depth", "queue" => q.table, "state" => "running")
                    .set(running as f64);
            }
        }
        handle.run_upkeep();
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(SAMPLE_EVERY) => {}
        }
    }
}
