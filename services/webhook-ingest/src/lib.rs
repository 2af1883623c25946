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

use std::net::SocketAddr;
use std::sync::Arc;

use gantry_config::{GantryConfig, Infra};
use gantry_runtime::Base;
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
    pub infra: Infra,
    /// Address of the webhook and health HTTP server.
    #[arg(long, env = "GANTRY_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    pub http_addr: String,
    /// Address of the gRPC server (Ingest, health, reflection).
    #[arg(long, env = "GANTRY_GRPC_ADDR", default_value = "0.0.0.0:9090")]
    pub grpc_addr: String,
    /// Largest webhook body accepted, in bytes; larger ones get 413.
    #[arg(long, env = "GANTRY_WEBHOOK_BODY_LIMIT", default_value_t = 25 * 1024 * 1024)]
    pub body_limit: usize,
}

/// Shared by the handlers.
pub struct AppState {
    pub config: GantryConfig,
    pub pool: PgPool,
    /// Wakes the outbox relay as soon as a pipeline is stored.
    pub relay_wake: Arc<Notify>,
}

/// A bound, connected, not yet running webhook-ingest.
pub struct Service {
    settings: Settings,
    base: Base,
    state: Arc<AppState>,
}

impl Service {
    /// Connects to the database (running migrations) and binds the listeners.
    pub async fn build(settings: Settings, config: GantryConfig) -> anyhow::Result<Self> {
        let base = Base::connect(
            &settings.infra,
            &config,
            SCHEMA,
            &MIGRATOR,
            &settings.http_addr,
            &settings.grpc_addr,
        )
        .await?;
        let state = Arc::new(AppState {
            config,
            pool: base.pool.clone(),
            relay_wake: base.relay_wake.clone(),
        });
        Ok(Self {
            settings,
            base,
            state,
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.base.http_addr()
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.base.grpc_addr()
    }

    /// Runs the servers and the outbox relay until `shutdown`.
    pub async fn run_until_stopped(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        self.base.relay(&shutdown);
        let readiness = self.base.readiness();
        let router = http::routes(self.state.clone(), self.settings.body_limit);
        let services = gantry_runtime::Grpc::one(
            gantry_proto::v1::ingest_server::IngestServer::new(grpc::IngestService {
                state: self.state.clone(),
            }),
            gantry_proto::v1::ingest_server::SERVICE_NAME,
        );
        self.base
            .serve("webhook-ingest", router, services, readiness, shutdown)
            .await
    }
}
