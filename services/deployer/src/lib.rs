//! deployer: follows `image.published` (queue `deployer`) and keeps the
//! catalogue of deployable images per project — repository, digest, tags,
//! commit and ref — that environments and their rules select from.
//!
//! Schema `deployer`: `images`, `processed_events`.

use std::sync::Arc;

use gantry_bus::{Handler, Link, Outcome};
use gantry_config::{GantryConfig, Infra};
use gantry_proto::v1::Event;
use gantry_proto::v1::event::Payload;
use gantry_runtime::Readiness;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub const SCHEMA: &str = "deployer";
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Command line and environment of the deployer.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "deployer", version, about = "Gantry deployer service")]
pub struct Settings {
    #[command(flatten)]
    pub infra: Infra,
    #[arg(long, env = "GANTRY_HTTP_ADDR", default_value = "0.0.0.0:8083")]
    pub http_addr: String,
    #[arg(long, env = "GANTRY_GRPC_ADDR", default_value = "0.0.0.0:9093")]
    pub grpc_addr: String,
}

struct Catalogue {
    pool: PgPool,
}

impl Handler for Catalogue {
    async fn handle(&self, event: Event) -> Outcome {
        let Some(Payload::ImagePublished(image)) = &event.payload else {
            return Outcome::Reject(anyhow::anyhow!(
                "deployer queue got a {:?} event",
                event.routing_key()
            ));
        };
        let rev = image.revision.clone().unwrap_or_default();
        let write = async {
            let mut tx = self.pool.begin().await?;
            if gantry_store::first_delivery(&mut tx, &event.id).await? {
                sqlx::query(
                    "INSERT INTO images (event_id, pipeline_id, project, repository, digest, tags, commit_sha, git_ref)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&event.id)
                .bind(&event.pipeline_id)
                .bind(&event.project)
                .bind(&image.repository)
                .bind(&image.digest)
                .bind(&image.tags)
                .bind(&rev.commit_sha)
                .bind(&rev.git_ref)
                .execute(&mut *tx)
                .await?;
                tracing::info!(repository = %image.repository, digest = %image.digest, "image deployable");
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

/// A connected, bound, not yet running deployer.
pub struct Service {
    settings: Settings,
    pool: PgPool,
    docker: bollard::Docker,
    http: TcpListener,
    grpc: TcpListener,
}

impl Service {
    pub async fn build(settings: Settings, _config: GantryConfig) -> anyhow::Result<Self> {
        let pool = gantry_store::connect(&settings.infra.database_url, SCHEMA, &MIGRATOR).await?;
        let docker = bollard::Docker::connect_with_defaults()?;
        let http = gantry_runtime::bind(&settings.http_addr).await?;
        let grpc = gantry_runtime::bind(&settings.grpc_addr).await?;
        Ok(Self {
            settings,
            pool,
            docker,
            http,
            grpc,
        })
    }

    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let link = Link::default();
        let consumer = tokio::spawn(gantry_bus::consume(
            self.settings.infra.amqp_url.clone(),
            gantry_bus::queues::DEPLOYER,
            8,
            Arc::new(Catalogue {
                pool: self.pool.clone(),
            }),
            link.clone(),
            shutdown.clone(),
        ));
        let readiness = Readiness::new()
            .database(self.pool.clone())
            .broker(vec![link])
            .docker(self.docker.clone());
        tracing::info!("deployer started");
        let served = gantry_runtime::serve(
            self.http,
            axum::Router::new(),
            self.grpc,
            tonic::service::Routes::default(),
            readiness,
            shutdown.clone(),
        )
        .await;
        let _ = consumer.await;
        served
    }
}
