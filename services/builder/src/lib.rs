//! builder: turns a requested pipeline into a tested image.
//!
//! - the `pipeline.requested` handler (here): takes requests from the
//!   `builder` queue and stores each as a queued build (then acks: the database owns the work, so
//!   no broker consumer timeout can cut a long build);
//! - `worker`: claims builds under a renewable lease and runs them —
//!   `checkout` (git at the exact commit), `context` (what is read from the
//!   hostile checkout, confined to it), `.gantry.yml` read with
//!   `gantry-pipeline`,
//!   `docker` (image build and sandboxed test containers), `services`
//!   (containers the test steps talk to, on the build's network), `push` (the
//!   tested image to the registry under its commit sha, a merge request's
//!   under `mr-<number>`), `logs` (batched, capped, with the project's
//!   secrets masked by `mask`);
//! - `secrets`: the projects' secrets stored sealed (`gantry.v1.Secrets`),
//!   opened when a build starts;
//! - `stack_file` and `stack_run`: a stack's integration run (the
//!   `stack:` section of its `.gantry.yml` from `gantry-pipeline`, its compose file made safe and
//!   pinned, `docker-compose` up, health, test services, logs, always torn
//!   down);
//! - `jobs`: the `builds` table (service builds and stack runs) and the
//!   verdict events (`build.*`, `stack.run_*`) written through the outbox;
//! - `grpc`: `gantry.v1.Builds` (StreamLogs with follow, GetBuilds, Cancel).
//!
//! Schema `builder`: `builds`, `build_logs`, `project_secrets`, `outbox`,
//! `processed_events`.

pub mod checkout;
pub mod context;
pub mod docker;
pub mod grpc;
pub mod jobs;
pub mod logs;
pub mod mask;
pub mod push;
pub mod secrets;
pub mod services;
pub mod stack_file;
pub mod stack_run;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use gantry_bus::{Handler, Outcome};
use gantry_config::GantryConfig;
use gantry_proto::v1::Event;
use gantry_proto::v1::event::Payload;
use gantry_runtime::{Base, Common, Parts, Readiness};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The Postgres schema this service owns.
pub const SCHEMA: &str = "builder";
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Command line and environment of the builder.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "builder", version, about = "Gantry builder service")]
pub struct Settings {
    #[command(flatten)]
    pub common: Common,
    /// Builds this replica runs at once.
    #[arg(long, env = "GANTRY_BUILDER_CONCURRENCY", default_value_t = 2)]
    pub concurrency: usize,
    /// Seconds a build stays claimed without renewal (renewed every third);
    /// a build whose builder died is taken over after this.
    #[arg(long, env = "GANTRY_BUILD_LEASE_SECS", default_value_t = 60)]
    pub lease_secs: u64,
    /// This replica's name (defaults to host name and process id).
    #[arg(long, env = "GANTRY_WORKER_NAME")]
    pub worker_name: Option<String>,
    /// Pushes of a tested image (with backoff) before its build fails at step "push".
    #[arg(long, env = "GANTRY_PUSH_ATTEMPTS", default_value_t = 5)]
    pub push_attempts: u32,
    /// The Docker network of test steps that ask for one (`network: true`):
    /// a bridge made by the builder, whose interface has this name so the
    /// host's firewall can keep it from the host (see scripts/infra.sh).
    #[arg(long, env = "GANTRY_STEP_NETWORK", default_value = "gantry-steps")]
    pub step_network: String,
}

/// Stores each `pipeline.requested` of a service, and each
/// `stack.run_requested`, as a queued build. (A push to a stack repository
/// is the deployer's to turn into a run: it knows the members' releases.)
struct RequestHandler {
    pool: PgPool,
    wake: Arc<Notify>,
    /// Woken when a request canceled superseded builds (their events wait
    /// in the outbox).
    relay_wake: Arc<Notify>,
    config: Arc<GantryConfig>,
}

impl Handler for RequestHandler {
    async fn handle(&self, event: Event) -> Outcome {
        let job = match &event.payload {
            Some(Payload::PipelineRequested(req)) => {
                if self
                    .config
                    .project(&event.project)
                    .is_some_and(|p| p.is_stack())
                {
                    return Outcome::Done;
                }
                jobs::Job::Build(req.clone())
            }
            Some(Payload::StackRunRequested(req)) => match &req.run {
                Some(run) => jobs::Job::Stack(run.clone()),
                None => {
                    return Outcome::Reject(anyhow::anyhow!("stack.run_requested without a run"));
                }
            },
            _ => {
                return Outcome::Reject(anyhow::anyhow!(
                    "builder queue got a {:?} event",
                    event.routing_key()
                ));
            }
        };
        let rev = job.revision();
        let needs_commit = matches!(job, jobs::Job::Build(_));
        if rev.clone_url.is_empty() || (needs_commit && rev.commit_sha.is_empty()) {
            return Outcome::Reject(anyhow::anyhow!(
                "{} without clone URL or commit",
                event.routing_key().unwrap_or_default()
            ));
        }
        let supersede = self.config.project(&event.project).is_some_and(|p| {
            let default_branch = if rev.default_branch.is_empty() {
                &p.default_branch
            } else {
                &rev.default_branch
            };
            // A merge request's new head supersedes its older ones (its
            // ref is no branch anyone deploys from).
            if rev.merge_request.is_some() {
                p.cancel_superseded != gantry_config::CancelSuperseded::None
            } else {
                p.cancel_superseded.applies_to(&rev.branch, default_branch)
            }
        });
        match jobs::enqueue_request(&self.pool, &event, &job, supersede).await {
            Ok(new) => {
                if new {
                    tracing::info!(kind = job.kind(), "build queued");
                    self.wake.notify_one();
                    self.relay_wake.notify_one();
                }
                Outcome::Done
            }
            Err(e) => Outcome::Retry(e),
        }
    }
}

/// The builder service.
pub struct Service;

impl gantry_runtime::Service for Service {
    gantry_runtime::service_identity!("builder", (8081, 9091), [Clone, Registry, Step, Seal]);

    async fn start(
        s: Settings,
        config: Arc<GantryConfig>,
        base: &mut Base,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Parts> {
        anyhow::ensure!(
            s.concurrency > 0,
            "GANTRY_BUILDER_CONCURRENCY must be at least 1"
        );
        anyhow::ensure!(
            s.lease_secs >= 3,
            "GANTRY_BUILD_LEASE_SECS must be at least 3"
        );
        let docker = bollard::Docker::connect_with_defaults()?;
        let wake = Arc::new(Notify::new());
        let name = s.worker_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname").unwrap_or_default();
            format!("{}-{}", host.trim(), std::process::id())
        });
        let worker = worker::Worker {
            pool: base.pool.clone(),
            docker: docker.clone(),
            name,
            lease: Duration::from_secs(s.lease_secs),
            concurrency: s.concurrency,
            wake: wake.clone(),
            relay_wake: base.relay_wake.clone(),
            config: config.clone(),
            push_attempts: s.push_attempts.max(1),
            step_network: s.step_network.clone(),
            running: Default::default(),
        };
        let secrets_config = config.clone();
        let pool = base.pool.clone();
        base.consume(
            gantry_bus::queues::BUILDER,
            16,
            RequestHandler {
                pool,
                wake,
                relay_wake: base.relay_wake.clone(),
                config,
            },
            shutdown,
        );
        base.relay(shutdown);
        base.sample(vec![jobs::BUILDS], shutdown);
        base.spawn(worker.run(shutdown.clone()));
        Ok(Parts {
            grpc: gantry_runtime::Grpc::one(
                gantry_proto::v1::builds_server::BuildsServer::new(grpc::BuildsService {
                    pool: base.pool.clone(),
                    relay_wake: base.relay_wake.clone(),
                }),
                gantry_proto::v1::builds_server::SERVICE_NAME,
            )
            .and(
                gantry_proto::v1::secrets_server::SecretsServer::new(secrets::SecretsService {
                    pool: base.pool.clone(),
                    config: secrets_config,
                }),
                gantry_proto::v1::secrets_server::SERVICE_NAME,
            ),
            readiness: Readiness::new().check("docker", move || {
                let docker = docker.clone();
                async move { gantry_docker::answers(&docker).await }
            }),
            ..Parts::default()
        })
    }
}
