//! deployer: rolls published images out to the configured environments.
//!
//! - Follows `image.published` (queue `deployer`): the image joins the
//!   catalogue, and every environment of its project whose rules match its
//!   branch or tag gets a deployment queued ([`queue`]) — unless that digest
//!   failed there before.
//! - The deployment loop ([`worker`]) runs one deployment per environment at
//!   a time through the environment's target ([`target`]: [`docker`], a
//!   Docker engine; [`rancher`], a Rancher 1.6 service upgraded in place;
//!   [`kubernetes`], a Deployment whose container image is set):
//!   start-first, health check, take over or roll back, with `deploy.*`
//!   events.
//! - Environments with an `endpoint` are served by [`edge`], which forwards
//!   to the live version, so a replacement has no gap in answers.
//! - gRPC `Deployments` ([`grpc`]): environments and what runs there,
//!   `Deploy` an image, `Rollback`.
//! - Stacks ([`stacks`]): member releases and pushes to stack repositories
//!   start integration runs (run by the builder), one at a time per stack,
//!   with the newest release of every member; green runs become numbered
//!   stack releases, rolled out to the stack's environments
//!   ([`stack_deploy`], Docker side in [`stack_target`]). gRPC `Stacks`
//!   ([`stacks_grpc`]).
//!
//! - Environments' configuration, versioned ([`config`], gRPC
//!   `EnvironmentConfig`).
//! - What runs is watched after its deployment ([`watch`]):
//!   `environment.unhealthy` and `environment.recovered`, once per change.
//!
//! Schema `deployer`: `images`, `environments`, `deployments`, `live`,
//! `blocked`, `env_config_versions`, `environment_health`, `stacks`, `stack_runs`,
//! `stack_releases`, plus the outbox and `processed_events`.

pub mod config;
pub mod docker;
pub mod edge;
pub mod grpc;
pub mod kubernetes;
pub mod queue;
pub mod rancher;
pub mod rancher_stack;
pub mod stack_deploy;
pub mod stack_target;
pub mod stacks;
pub mod stacks_grpc;
pub mod target;
pub mod watch;
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

/// Follows the deployer's queue: `image.published` (the catalogue,
/// deployments, stack triggers), pushes to stack repositories, and the
/// builder's stack run events.
struct Events {
    pool: PgPool,
    config: Arc<GantryConfig>,
    /// Wakes the deployment loop.
    wake: Arc<Notify>,
    /// Wakes the stack deployment loop.
    stack_wake: Arc<Notify>,
}

impl Handler for Events {
    async fn handle(&self, event: Event) -> Outcome {
        match &event.payload {
            Some(Payload::ImagePublished(published)) => self.published(&event, published).await,
            Some(Payload::PipelineRequested(req)) => self.stack_push(&event, req).await,
            Some(Payload::StackRunStarted(started)) => {
                let Some(run) = &started.run else {
                    return Outcome::Reject(anyhow::anyhow!("stack.run_started without a run"));
                };
                let write = async {
                    if let Some(mut tx) = self.first(&event).await? {
                        stacks::record_started(&mut tx, run, &started.build_id).await?;
                        tx.commit().await?;
                    }
                    anyhow::Ok(())
                };
                outcome(write.await)
            }
            Some(Payload::StackRunPassed(passed)) => {
                let Some(run) = &passed.run else {
                    return Outcome::Reject(anyhow::anyhow!("stack.run_passed without a run"));
                };
                self.stack_end(
                    &event,
                    stacks::RunEnd {
                        run,
                        build_id: &passed.build_id,
                        stack_commit: &passed.stack_commit,
                        failure: None,
                        services: &passed.services,
                        compose: &passed.compose,
                        rancher_compose: &passed.rancher_compose,
                    },
                )
                .await
            }
            Some(Payload::StackRunFailed(failed)) => {
                let Some(run) = &failed.run else {
                    return Outcome::Reject(anyhow::anyhow!("stack.run_failed without a run"));
                };
                self.stack_end(
                    &event,
                    stacks::RunEnd {
                        run,
                        build_id: &failed.build_id,
                        stack_commit: &failed.stack_commit,
                        failure: Some((&failed.step, &failed.reason)),
                        services: &failed.services,
                        compose: "",
                        rancher_compose: "",
                    },
                )
                .await
            }
            _ => Outcome::Reject(anyhow::anyhow!(
                "deployer queue got a {:?} event",
                event.routing_key()
            )),
        }
    }
}

impl Events {
    /// A transaction for handling `event`, or `None` when it was handled before.
    async fn first(
        &self,
        event: &Event,
    ) -> anyhow::Result<Option<sqlx::Transaction<'static, sqlx::Postgres>>> {
        let mut tx = self.pool.begin().await?;
        Ok(gantry_store::first_delivery(&mut tx, &event.id)
            .await?
            .then_some(tx))
    }

    /// A push to a stack repository starts (or joins) a run of that commit;
    /// pushes of services are the builder's.
    async fn stack_push(
        &self,
        event: &Event,
        req: &gantry_proto::v1::PipelineRequested,
    ) -> Outcome {
        let Some(stack) = self.config.project(&event.project).filter(|p| p.is_stack()) else {
            return Outcome::Done;
        };
        let mut rev = req.revision.clone().unwrap_or_default();
        // The configuration, not the event, says where the stack lives.
        rev.clone_url = stack.clone_url.clone();
        let trigger = gantry_proto::v1::StackTrigger {
            project: stack.name.clone(),
            commit_sha: rev.commit_sha.clone(),
            git_ref: rev.git_ref.clone(),
            pipeline_id: event.pipeline_id.clone(),
            kind: "push".into(),
            author: rev.author_name.clone(),
        };
        let write = async {
            if let Some(mut tx) = self.first(event).await? {
                stacks::trigger(&mut tx, stack, trigger, Some(rev)).await?;
                tx.commit().await?;
            }
            anyhow::Ok(())
        };
        outcome(write.await)
    }

    async fn stack_end(&self, event: &Event, end: stacks::RunEnd<'_>) -> Outcome {
        let Some(stack) = self.config.project(&event.project).filter(|p| p.is_stack()) else {
            tracing::warn!(stack = %event.project, "a run of a stack that is not configured any more");
            return Outcome::Done;
        };
        let write = async {
            if let Some(mut tx) = self.first(event).await? {
                let release =
                    stacks::record_end(&mut tx, &self.config, stack, &event.pipeline_id, end)
                        .await?;
                tx.commit().await?;
                if release.is_some() {
                    self.stack_wake.notify_one();
                }
            }
            anyhow::Ok(())
        };
        outcome(write.await)
    }

    /// Takes `image.published` into the catalogue, queues matching
    /// deployments, and triggers the stacks that follow the project when
    /// the image is a release.
    async fn published(
        &self,
        event: &Event,
        published: &gantry_proto::v1::ImagePublished,
    ) -> Outcome {
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
        let released = self
            .config
            .project(&event.project)
            .is_some_and(|p| stacks::is_release(p, &rev));
        let write = async {
            let mut tx = self.pool.begin().await?;
            let mut queued = 0;
            if gantry_store::first_delivery(&mut tx, &event.id).await? {
                sqlx::query!(
                    "INSERT INTO images (event_id, pipeline_id, project, repository, digest, tags, commit_sha, git_ref, revision, released)
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
                    event.id,
                    event.pipeline_id,
                    event.project,
                    published.repository,
                    published.digest,
                    &published.tags,
                    rev.commit_sha,
                    rev.git_ref,
                    rev.encode_to_vec(),
                    released,
                )
                .execute(&mut *tx)
                .await?;
                if released {
                    for name in stacks::following(&mut tx, &event.project).await? {
                        let Some(stack) = self.config.project(&name).filter(|p| p.is_stack())
                        else {
                            continue;
                        };
                        let trigger = gantry_proto::v1::StackTrigger {
                            project: event.project.clone(),
                            commit_sha: rev.commit_sha.clone(),
                            git_ref: rev.git_ref.clone(),
                            pipeline_id: event.pipeline_id.clone(),
                            kind: "release".into(),
                            author: rev.author_name.clone(),
                        };
                        stacks::trigger(&mut tx, stack, trigger, None).await?;
                    }
                }
                let origin = gantry_config::Origin {
                    branch: &rev.branch,
                    tag: &rev.tag,
                    // A fork's merge request is deployed by hand or not at all.
                    merge_request: rev.merge_request.as_ref().is_some_and(|mr| !mr.from_fork),
                };
                for env in self
                    .config
                    .environments
                    .iter()
                    .filter(|e| e.project == event.project && e.matches(origin))
                {
                    if queue::is_blocked(&mut tx, &env.name, &image).await? {
                        tracing::info!(environment = %env.name, digest = %image.digest,
                            "not deployed: this image (or its commit) failed in the environment before");
                        continue;
                    }
                    queue::enqueue(
                        &mut tx,
                        env,
                        &image,
                        Trigger::Auto,
                        queue::ConfigPick::Current,
                    )
                    .await?;
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

/// Done, or retried when the write failed (the database may be restarting).
fn outcome(written: anyhow::Result<()>) -> Outcome {
    match written {
        Ok(()) => Outcome::Done,
        Err(e) => Outcome::Retry(e),
    }
}

/// The deployer service.
pub struct Service;

impl gantry_runtime::Service for Service {
    gantry_runtime::service_identity!("deployer", (8083, 9093), [Registry, Target, Seal]);

    async fn start(
        s: Settings,
        config: Arc<GantryConfig>,
        base: &mut Base,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Parts> {
        let pool = base.pool.clone();
        let names: Vec<String> = config.environments.iter().map(|e| e.name.clone()).collect();
        queue::sync_environments(&pool, &names).await?;
        stacks::sync_stacks(&pool, &config).await?;
        let docker = bollard::Docker::connect_with_defaults()?;
        let wake = Arc::new(Notify::new());
        let stack_wake = Arc::new(Notify::new());
        let backends = edge::Backends::default();
        for (env, address) in queue::live_addresses(&pool).await? {
            backends.set(&env, address.and_then(|a| a.parse().ok()));
        }
        for (env, address) in stack_deploy::live_addresses(&pool).await? {
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
        base.sample(
            vec![queue::DEPLOYMENTS, stack_deploy::STACK_DEPLOYMENTS],
            shutdown,
        );
        base.consume(
            gantry_bus::queues::DEPLOYER,
            8,
            Events {
                pool: pool.clone(),
                config: config.clone(),
                wake: wake.clone(),
                stack_wake: stack_wake.clone(),
            },
            shutdown,
        );
        base.spawn(watch::watch(
            pool.clone(),
            docker.clone(),
            config.clone(),
            backends.clone(),
            base.relay_wake.clone(),
            shutdown.clone(),
        ));
        let stack_worker = Arc::new(stack_deploy::StackWorker {
            pool: pool.clone(),
            target: Arc::new(docker::DockerTarget::new(docker.clone())?),
            rancher: rancher::client()?,
            config: config.clone(),
            backends: backends.clone(),
            owner: format!("deployer-{}", uuid::Uuid::new_v4().simple()),
            wake: stack_wake.clone(),
            relay_wake: base.relay_wake.clone(),
            concurrency: s.concurrency.max(1),
            lease: std::time::Duration::from_secs(s.lease_secs.max(4)),
        });
        base.spawn(worker::run(stack_worker, shutdown.clone()));
        let worker = Arc::new(worker::Worker {
            pool: pool.clone(),
            targets: target::Targets::new(docker::DockerTarget::new(docker.clone())?)?,
            config: config.clone(),
            backends,
            owner: format!("deployer-{}", uuid::Uuid::new_v4().simple()),
            wake: wake.clone(),
            relay_wake: base.relay_wake.clone(),
            concurrency: s.concurrency.max(1),
            lease: std::time::Duration::from_secs(s.lease_secs.max(4)),
        });
        base.spawn(worker::run(worker, shutdown.clone()));
        let stacks = stacks_grpc::StacksService {
            pool: pool.clone(),
            config: config.clone(),
            wake: stack_wake.clone(),
        };
        let env_config = config::ConfigService {
            pool: pool.clone(),
            config: config.clone(),
            wake: wake.clone(),
        };
        let grpc = grpc::DeploymentsService { pool, config, wake };
        Ok(Parts {
            grpc: gantry_runtime::Grpc::one(
                gantry_proto::v1::deployments_server::DeploymentsServer::new(grpc),
                gantry_proto::v1::deployments_server::SERVICE_NAME,
            )
            .and(
                gantry_proto::v1::stacks_server::StacksServer::new(stacks),
                gantry_proto::v1::stacks_server::SERVICE_NAME,
            )
            .and(
                gantry_proto::v1::environment_config_server::EnvironmentConfigServer::new(
                    env_config,
                ),
                gantry_proto::v1::environment_config_server::SERVICE_NAME,
            ),
            readiness: Readiness::new().check("docker", move || {
                let docker = docker.clone();
                async move { gantry_docker::answers(&docker).await }
            }),
            ..Parts::default()
        })
    }
}
