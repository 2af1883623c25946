//! notifier: follows every event (queue `notifier`, bound to `#`) and tells
//! the outside what happened.
//!
//! - The timeline (one row per event) and the pipeline projection
//!   ([`projection`]): state, stage, failure, image, deployments.
//! - Commit statuses on GitLab and GitHub, and chat messages with noise
//!   control, queued with the projection change and sent by [`outbound`];
//!   for stacks' integration runs, `gantry/stack/<stack>` statuses on the
//!   commits that triggered them and chat when a stack changes colour
//!   ([`stacks`]).
//! - gRPC `Pipelines` ([`grpc`]) and the pages links point at ([`http`]).
//!
//! Schema `notifier`: `timeline`, `pipelines`, `pipeline_deployments`,
//! `ref_state`, `environment_state`, `outbound`, `merge_request_comments`,
//! `processed_events`.

pub mod grpc;
pub mod http;
pub mod outbound;
pub mod projection;
pub mod stacks;

use std::sync::Arc;

use gantry_bus::{Handler, Outcome};
use gantry_config::GantryConfig;
use gantry_proto::v1::Event;
use gantry_proto::v1::event::Payload;
use gantry_runtime::{Base, Common, Parts};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub const SCHEMA: &str = "notifier";
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Command line and environment of the notifier.
#[derive(clap::Parser, Debug, Clone)]
#[command(name = "notifier", version, about = "Gantry notifier service")]
pub struct Settings {
    #[command(flatten)]
    pub common: Common,
    /// The builder's gRPC URL, for the build logs that links point at.
    #[arg(long, env = "GANTRY_BUILDER_URL")]
    pub builder_url: Option<String>,
    /// A token with the `read` scope, for reading logs from the builder.
    #[arg(long, env = "GANTRY_BUILDER_TOKEN", hide_env_values = true)]
    pub builder_token: Option<String>,
    /// A PEM CA certificate to trust when the builder's URL is https://.
    #[arg(long, env = "GANTRY_CA_CERT")]
    pub ca_cert: Option<std::path::PathBuf>,
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
        Some(Payload::BuildCanceled(b)) => format!("build {} canceled: {}", b.build_id, b.reason),
        Some(Payload::BuildSkipped(b)) => format!("build {} skipped: {}", b.build_id, b.reason),
        Some(Payload::ImagePublished(i)) => format!(
            "published {}:{} ({})",
            i.repository,
            i.tags.join(","),
            i.digest
        ),
        Some(Payload::PublishFailed(f)) => {
            format!("publishing {} failed: {}", f.repository, f.reason)
        }
        Some(Payload::DeployStarted(d)) => {
            let d = d.deployment.clone().unwrap_or_default();
            format!(
                "deploying {} to {} ({})",
                d.digest, d.environment, d.trigger
            )
        }
        Some(Payload::DeploySucceeded(s)) => {
            let d = s.deployment.clone().unwrap_or_default();
            format!(
                "{} runs in {} (container {})",
                d.digest, d.environment, s.container_id
            )
        }
        Some(Payload::DeployFailed(f)) => {
            let d = f.deployment.clone().unwrap_or_default();
            format!(
                "deploying {} to {} failed: {}",
                d.digest, d.environment, f.reason
            )
        }
        Some(Payload::DeployRolledBack(r)) => {
            let d = r.deployment.clone().unwrap_or_default();
            format!(
                "rolled back in {}: {} keeps running ({})",
                d.environment, d.previous_digest, r.reason
            )
        }
        Some(Payload::DeployAwaitingApproval(a)) => {
            let d = a.deployment.clone().unwrap_or_default();
            format!("{} awaits approval for {}", d.digest, d.environment)
        }
        Some(Payload::DeployApproved(a)) => {
            let d = a.deployment.clone().unwrap_or_default();
            format!("{} approved by {} for {}", d.digest, a.by, d.environment)
        }
        Some(Payload::DeployRejected(r)) => {
            let d = r.deployment.clone().unwrap_or_default();
            format!("{} rejected for {}: {}", d.digest, d.environment, r.reason)
        }
        Some(Payload::EnvironmentUnhealthy(u)) => {
            let d = u.deployment.clone().unwrap_or_default();
            format!(
                "{} in {} is unhealthy: {}",
                d.digest, d.environment, u.reason
            )
        }
        Some(Payload::EnvironmentRecovered(r)) => {
            let d = r.deployment.clone().unwrap_or_default();
            format!("{} in {} is healthy again", d.digest, d.environment)
        }
        Some(Payload::StackRunRequested(r)) => {
            let run = r.run.clone().unwrap_or_default();
            format!(
                "run {} of stack {} requested ({} trigger(s))",
                run.number,
                run.stack,
                run.triggers.len()
            )
        }
        Some(Payload::StackRunStarted(r)) => {
            let run = r.run.clone().unwrap_or_default();
            format!(
                "run {} of stack {} started: build {} (attempt {})",
                run.number, run.stack, r.build_id, r.attempt
            )
        }
        Some(Payload::StackRunPassed(r)) => {
            let run = r.run.clone().unwrap_or_default();
            format!("run {} of stack {} passed", run.number, run.stack)
        }
        Some(Payload::StackRunFailed(r)) => {
            let run = r.run.clone().unwrap_or_default();
            format!(
                "run {} of stack {} failed at {:?}: {}",
                run.number, run.stack, r.step, r.reason
            )
        }
        Some(Payload::StackReleased(r)) => {
            format!("stack {} release {} made", r.stack, r.release)
        }
        Some(Payload::StackDeployStarted(d)) => {
            let d = d.deployment.clone().unwrap_or_default();
            format!(
                "deploying release {} of stack {} to {} ({})",
                d.release, d.stack, d.environment, d.trigger
            )
        }
        Some(Payload::StackDeploySucceeded(s)) => {
            let d = s.deployment.clone().unwrap_or_default();
            format!(
                "release {} of stack {} runs in {} (replaced: {})",
                d.release,
                d.stack,
                d.environment,
                s.changed.join(", ")
            )
        }
        Some(Payload::StackDeployFailed(f)) => {
            let d = f.deployment.clone().unwrap_or_default();
            format!(
                "deploying release {} of stack {} to {} failed: {}",
                d.release, d.stack, d.environment, f.reason
            )
        }
        Some(Payload::StackDeployRolledBack(r)) => {
            let d = r.deployment.clone().unwrap_or_default();
            format!(
                "{} went back to release {} of stack {}: {}",
                d.environment, d.previous_release, d.stack, r.reason
            )
        }
        None => "event without payload".to_owned(),
    }
}

struct Timeline {
    pool: PgPool,
    config: Arc<GantryConfig>,
    /// Wakes the sender of outgoing calls.
    wake: Arc<tokio::sync::Notify>,
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
            let mut queued = false;
            if gantry_store::first_delivery(&mut tx, &event.id).await? {
                sqlx::query!(
                    "INSERT INTO timeline (event_id, pipeline_id, project, kind, occurred_at, summary)
                     VALUES ($1, $2, $3, $4, $5, $6)",
                    event.id,
                    event.pipeline_id,
                    event.project,
                    kind,
                    at,
                    summary(&event),
                )
                .execute(&mut *tx)
                .await?;
                for seen in stacks::per_pipeline(&event) {
                    queued |= projection::apply(&mut tx, &self.config, &seen).await?;
                }
                queued |= stacks::effects(&mut tx, &self.config, &event).await?;
            }
            tx.commit().await?;
            Ok::<_, anyhow::Error>(queued)
        };
        match write.await {
            Ok(queued) => {
                if queued {
                    self.wake.notify_one();
                }
                Outcome::Done
            }
            Err(e) => Outcome::Retry(e),
        }
    }
}

/// The notifier service.
pub struct Service;

impl gantry_runtime::Service for Service {
    gantry_runtime::service_identity!("notifier", (8084, 9094), [Forge, Chat]);

    async fn start(
        s: Settings,
        config: Arc<GantryConfig>,
        base: &mut Base,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Parts> {
        let builder_token = gantry_proto::client::Bearer::new(s.builder_token.as_deref())
            .map_err(|e| anyhow::anyhow!("GANTRY_BUILDER_TOKEN: {e}"))?;
        let ca_pem = match &s.ca_cert {
            Some(path) => Some(std::fs::read(path).map_err(|e| {
                anyhow::Error::new(e)
                    .context(format!("cannot read GANTRY_CA_CERT {}", path.display()))
            })?),
            None => None,
        };
        let pool = base.pool.clone();
        let wake = Arc::new(tokio::sync::Notify::new());
        base.consume(
            gantry_bus::queues::NOTIFIER,
            32,
            Timeline {
                pool: pool.clone(),
                config: config.clone(),
                wake: wake.clone(),
            },
            shutdown,
        );
        base.sample(vec![outbound::OUTBOUND], shutdown);
        base.spawn(outbound::send_loop(
            pool.clone(),
            config.clone(),
            wake,
            shutdown.clone(),
        ));
        let pages = http::routes(http::Pages {
            pool: pool.clone(),
            config: config.clone(),
            builder: s.builder_url.clone(),
            builder_token,
            ca_pem,
        });
        let grpc = grpc::PipelinesService { pool, config };
        Ok(Parts {
            router: pages,
            grpc: gantry_runtime::Grpc::one(
                gantry_proto::v1::pipelines_server::PipelinesServer::new(grpc),
                gantry_proto::v1::pipelines_server::SERVICE_NAME,
            ),
            ..Parts::default()
        })
    }
}
