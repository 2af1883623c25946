//! deployer: follows `image.published` (queue `deployer`) and keeps the
//! catalogue of deployable images per project — repository, digest, tags,
//! commit and ref — that environments and their rules select from.
//!
//! Schema `deployer`: `images`, `processed_events`.

use gantry_bus::{Handler, Outcome};
use gantry_config::{GantryConfig, Infra};
use gantry_proto::v1::Event;
use gantry_proto::v1::event::Payload;
use gantry_runtime::Base;
use sqlx::PgPool;
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
    base: Base,
    docker: bollard::Docker,
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
        let docker = bollard::Docker::connect_with_defaults()?;
        Ok(Self { base, docker })
    }

    pub async fn run_until_stopped(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let pool = self.base.pool.clone();
        self.base.consume(
            gantry_bus::queues::DEPLOYER,
            8,
            Catalogue { pool },
            &shutdown,
        );
        let readiness = self.base.readiness().docker(self.docker.clone());
        self.base
            .serve(
                "deployer",
                axum::Router::new(),
                gantry_runtime::Grpc::none(),
                readiness,
                shutdown,
            )
            .await
    }
}
