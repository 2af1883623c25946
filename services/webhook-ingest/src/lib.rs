//! webhook-ingest: the front door of Gantry.
//!
//! It receives GitLab and GitHub push webhooks (`http`) and manual triggers
//! (`grpc`, `gantry.v1.Ingest`), checks them against the configured projects
//! (`forge`), and starts a pipeline by storing the delivery and a
//! `pipeline.requested` event in its outbox in one transaction
//! (`pipelines`). The outbox relay publishes the event to the bus.
//!
//! Schema `ingest`: `pipelines`, `deliveries`, `outbox`, `processed_events`.

pub mod forge;
pub mod grpc;
pub mod http;
pub mod pipelines;

use std::sync::Arc;

use gantry_config::GantryConfig;
use gantry_runtime::{Base, Common, Parts};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The Postgres schema this service owns.
pub const SCHEMA: &str = "ingest";
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Command line and environment of webhook-ingest.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "webhook-ingest",
    version,
    about = "Gantry webhook-ingest service"
)]
pub struct Settings {
    #[command(flatten)]
    pub common: Common,
    /// Largest webhook body accepted, in bytes; larger ones get 413.
    #[arg(long, env = "GANTRY_WEBHOOK_BODY_LIMIT", default_value_t = 25 * 1024 * 1024)]
    pub body_limit: usize,
}

/// Shared by the handlers.
pub struct AppState {
    pub config: Arc<GantryConfig>,
    pub pool: PgPool,
    /// Wakes the outbox relay as soon as a pipeline is stored.
    pub relay_wake: Arc<Notify>,
}

/// The webhook-ingest service.
pub struct Service;

impl gantry_runtime::Service for Service {
    gantry_runtime::service_identity!("webhook-ingest", (8080, 9090), [Webhook, Clone]);

    async fn start(
        s: Settings,
        config: Arc<GantryConfig>,
        base: &mut Base,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Parts> {
        let state = Arc::new(AppState {
            config,
            pool: base.pool.clone(),
            relay_wake: base.relay_wake.clone(),
        });
        base.relay(shutdown);
        base.sample(Vec::new(), shutdown);
        Ok(Parts {
            router: http::routes(state.clone(), s.body_limit),
            grpc: gantry_runtime::Grpc::one(
                gantry_proto::v1::ingest_server::IngestServer::new(grpc::IngestService { state }),
                gantry_proto::v1::ingest_server::SERVICE_NAME,
            ),
            ..Parts::default()
        })
    }
}
