//! deployer: rolls published images out to the configured environments.
//!
//! - Follows `image.published` (queue `deployer`): the image joins the
//!   catalogue, and every environment of its project whose rules match its
//!   branch or tag gets a deployment queued ([`queue`]) — unless that digest
//!   failed there before.
//! - The deployment loop ([`worker`]) runs one deployment per environment at
//!   a time through the Docker target ([`docker`]): start-first, health
//!   check, take over or roll back, with `deploy.*` events.
//! - Environments with an `endpoint` are served by [`edge`], which forwards
//!   to the live version, so a replacement has no gap in answers.
//! - gRPC `Deployments` ([`grpc`]): environments and what runs there,
//!   `Deploy` an image, `Rollback`.
//!
//! Schema `deployer`: `images`, `environments`, `deployments`, `live`,
//! `blocked`, plus the outbox and `processed_events`.

pub mod docker;
pub mod edge;
pub mod grpc;
pub mod queue;
pub mod worker;

use std::sync::Arc;

use gantry_bus::{Handler, Outcome};
use gantry_config::GantryConfig;
use gantry_proto::v1::Event;
use gantry_proto::v1::event::Payload;
use gantry_runtime::{Base, Common, Parts, Readiness};
use prost::Message as _;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::queue::{Image, Trigger};

pub const SCHEMA: &str = "deployer";
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Command line and environment of the deployer.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "deployer", version, about = "Gantry deployer service")]
pub struct Settings {
    #[command(flatten)]
    pub common: Common,
    /// Deployments of different environments run at once.
    #[arg(long, env = "GANTRY_DEPLOY_CONCURRENCY", default_value_t = 4)]
    pub concurrency: usize,
    /// Seconds a deployment stays claimed without renewal (taken over after a crash).
    #[arg(long, env = "GANTRY_DEPLOY_LEASE_SECS", default_value_t = 60)]
    pub lease_secs: u64,
}

/// Takes `image.published` into the catalogue and queues matching deployments.
struct Published {
    pool: PgPool,
    config: Arc<GantryConfig>,
    wake: Arc<Notify>,
}

impl Handler for Published {
    async fn handle(&self, event: Event) -> Outcome {
        let Some(Payload::ImagePublished(published)) = &event.payload else {
            return Outcome::Reject(anyhow::anyhow!(
                "deployer queue got a {:?} event",
                event.routing_key()
            ));
        };
        // An event names a repository; only the one configured for its
        // project is taken, so no event can make the deployer run an image
        // from elsewhere.
        let expected = self
            .config
            .project(&event.project)
            .map(|p| p.image.as_str());
        if expected != Some(published.repository.as_str()) {
            return Outcome::Reject(anyhow::anyhow!(
                "image.published of project {:?} names repository {:?}, not the project's {:?}",
                event.project,
                published.repository,
                expected.unwrap_or("(unknown project)")
            ));
        }
        let rev = published.revision.clone().unwrap_or_default();
        let image = Image {
            pipeline_id: event.pipeline_id.clone(),
            project: event.project.clone(),
            repository: published.repository.clone(),
            digest: published.digest.clone(),
            revision: rev.clone(),
        };
        let write = async {
            let mut tx = self.pool.begin().await?;
            let mut queued = 0;
            if gantry_store::first_delivery(&mut tx, &event.id).await? {
                sqlx::query(
                    "INSERT INTO images (event_id, pipeline_id, project, repository, digest, tags, commit_sha, git_ref, revision)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                )
                .bind(&event.id)
                .bind(&event.pipeline_id)
                .bind(&event.project)
                .bind(&published.repository)
                .bind(&published.digest)
                .bind(&published.tags)
                .bind(&rev.commit_sha)
                .bind(&rev.git_ref)
                .bind(rev.encode_to_vec())
                .execute(&mut *tx)
                .await?;
                for env in self
                    .config
                    .environments
                    .iter()
                    .filter(|e| e.project == event.project && e.matches(&rev.branch, &rev.tag))
                {
                    if queue::is_blocked(&mut tx, &env.name, &image).await? {
                        tracing::info!(environment = %env.name, digest = %image.digest,
                            "not deployed: this image (or its commit) failed in the environment before");
                        continue;
                    }
                    queue::enqueue(&mut tx, &env.name, &image, Trigger::Auto).await?;
                    queued += 1;
                }
            }
            tx.commit().await?;
            Ok::<_, anyhow::Error>(queued)
        };
        match write.await {
            Ok(queued) => {
                if queued > 0 {
                    self.wake.notify_one();
                }
                Outcome::Done
            }
            Err(e) => Outcome::Retry(e),
        }
    }
}

/// The deployer service.
pub struct Service;

impl gantry_runtime::Service for Service {
    gantry_runtime::service_identity!("deployer", (8083, 9093), [Registry]);

    async fn start(
        s: Settings,
        config: Arc<GantryConfig>,
        base: &mut Base,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Parts> {
        let pool = base.pool.clone();
        let names: Vec<String> = config.environments.iter().map(|e| e.name.clone()).collect();
        queue::sync_environments(&pool, &names).await?;
        let docker = bollard::Docker::connect_with_defaults()?;
        let wake = Arc::new(Notify::new());
        let backends = edge::Backends::default();
        for (env, address) in queue::live_addresses(&pool).await? {
            backends.set(&env, address.and_then(|a| a.parse().ok()));
        }
        for env in &config.environments {
            if let Some(endpoint) = &env.endpoint {
                let listener = edge::bind(&env.name, endpoint).await?;
                base.spawn(edge::serve(
                    env.name.clone(),
                    listener,
                    backends.clone(),
                    shutdown.clone(),
                ));
            }
        }
        base.relay(shutdown);
        base.consume(
            gantry_bus::queues::DEPLOYER,
            8,
            Published {
                pool: pool.clone(),
                config: config.clone(),
                wake: wake.clone(),
            },
            shutdown,
        );
        let worker = Arc::new(worker::Worker {
            pool: pool.clone(),
            target: docker::DockerTarget::new(docker.clone())?,
            config: config.clone(),
            backends,
            owner: format!("deployer-{}", uuid::Uuid::new_v4().simple()),
            wake: wake.clone(),
            relay_wake: base.relay_wake.clone(),
            concurrency: s.concurrency.max(1),
            lease: std::time::Duration::from_secs(s.lease_secs.max(4)),
        });
        base.spawn(worker.run(shutdown.clone()));
        let grpc = grpc::DeploymentsService { pool, config, wake };
        Ok(Parts {
            grpc: gantry_runtime::Grpc::one(
                gantry_proto::v1::deployments_server::DeploymentsServer::new(grpc),
                gantry_proto::v1::deployments_server::SERVICE_NAME,
            ),
            readiness: Readiness::new().check("docker", move || {
                let docker = docker.clone();
                async move { gantry_docker::answers(&docker).await }
            }),
            ..Parts::default()
        })
    }
}
