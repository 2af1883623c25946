//! notifier: follows every event (queue `notifier`, bound to `#`) and keeps
//! the pipeline timeline, a projection of what happened to each pipeline.
//! Commit statuses and chat messages are built on this timeline.
//!
//! Schema `notifier`: `timeline`, `processed_events`.

use gantry_bus::{Handler, Outcome};
use gantry_config::{GantryConfig, Infra};
use gantry_proto::v1::Event;
use gantry_proto::v1::event::Payload;
use gantry_runtime::Base;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub const SCHEMA: &str = "notifier";
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Command line and environment of the notifier.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "notifier", version, about = "Gantry notifier service")]
pub struct Settings {
    #[command(flatten)]
    pub infra: Infra,
    #[arg(long, env = "GANTRY_HTTP_ADDR", default_value = "0.0.0.0:8084")]
    pub http_addr: String,
    #[arg(long, env = "GANTRY_GRPC_ADDR", default_value = "0.0.0.0:9094")]
    pub grpc_addr: String,
}

/// One line saying what an event means for its pipeline.
pub fn summary(event: &Event) -> String {
    let sha = |r: &Option<gantry_proto::v1::Revision>| {
        r.as_ref()
            .map(|r| r.commit_sha.chars().take(12).collect::<String>())
            .unwrap_or_default()
    };
    match &event.payload {
        Some(Payload::PipelineRequested(p)) => format!(
            "pipeline requested for {} at {}",
            p.revision
                .as_ref()
                .map(|r| r.git_ref.as_str())
                .unwrap_or_default(),
            sha(&p.revision)
        ),
        Some(Payload::BuildStarted(b)) => {
            format!("build {} started (attempt {})", b.build_id, b.attempt)
        }
        Some(Payload::BuildSucceeded(b)) => {
            format!("build {} succeeded: {}", b.build_id, b.image_id)
        }
        Some(Payload::BuildFailed(b)) => format!(
            "build {} failed at step {:?}: {}",
            b.build_id, b.step, b.reason
        ),
        Some(Payload::ImagePublished(i)) => format!(
            "published {}:{} ({})",
            i.repository,
            i.tags.join(","),
            i.digest
        ),
        Some(Payload::PublishFailed(f)) => {
            format!("publishing {} failed: {}", f.repository, f.reason)
        }
        None => "event without payload".to_owned(),
    }
}

struct Timeline {
    pool: PgPool,
}

impl Handler for Timeline {
    async fn handle(&self, event: Event) -> Outcome {
        let Some(kind) = event.routing_key() else {
            return Outcome::Reject(anyhow::anyhow!("event without payload"));
        };
        let at = event
            .occurred_at
            .as_ref()
            .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
            .unwrap_or_else(chrono::Utc::now);
        let write = async {
            let mut tx = self.pool.begin().await?;
            if gantry_store::first_delivery(&mut tx, &event.id).await? {
                sqlx::query(
                    "INSERT INTO timeline (event_id, pipeline_id, project, kind, occurred_at, summary)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                )
                .bind(&event.id)
                .bind(&event.pipeline_id)
                .bind(&event.project)
                .bind(kind)
                .bind(at)
                .bind(summary(&event))
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await?;
            Ok::<_, anyhow::Error>(())
        };
        match write.await {
            Ok(()) => Outcome::Done,
            Err(e) => Outcome::Retry(e),
        }
    }
}

/// A connected, bound, not yet running notifier.
pub struct Service {
    base: Base,
}

impl Service {
    pub async fn build(settings: Settings, _config: GantryConfig) -> anyhow::Result<Self> {
        let base = Base::connect(
            &settings.infra,
            SCHEMA,
            &MIGRATOR,
            &settings.http_addr,
            &settings.grpc_addr,
        )
        .await?;
        Ok(Self { base })
    }

    pub async fn run_until_stopped(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let pool = self.base.pool.clone();
        self.base.consume(
            gantry_bus::queues::NOTIFIER,
            32,
            Timeline { pool },
            &shutdown,
        );
        let readiness = self.base.readiness();
        self.base
            .serve(
                "notifier",
                axum::Router::new(),
                gantry_runtime::Grpc::none(),
                readiness,
                shutdown,
            )
            .await
    }
}
