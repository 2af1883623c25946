//! registry-publisher: gives tested images their names.
//!
//! It consumes `build.succeeded` (queue `registry-publisher`) — the builder
//! has pushed the tested image under its commit sha — computes the tags by
//! policy (`tags`), puts the same manifest under each through the registry's
//! HTTP API (`registry`; no Docker engine needed), records the publication and
//! emits `image.published` (repository, tags, manifest digest) through its
//! outbox, in one transaction.
//!
//! Schema `publisher`: `publications`, `outbox`, `processed_events`.

pub mod registry;
pub mod tags;

use std::sync::Arc;

use gantry_bus::{Handler, Outcome};
use gantry_config::GantryConfig;
use gantry_proto::v1::event::Payload;
use gantry_proto::v1::{BuildSucceeded, Event, ImagePublished, PublishFailed};
use gantry_runtime::{Base, Common, Parts, Readiness};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

pub const SCHEMA: &str = "publisher";
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// Command line and environment of registry-publisher.
#[derive(clap::Parser, Debug, Clone)]
#[command(
    name = "registry-publisher",
    version,
    about = "Gantry registry-publisher service"
)]
pub struct Settings {
    #[command(flatten)]
    pub common: Common,
    /// Failed taggings of one image in a row (each retried with backoff)
    /// before the pipeline ends with `image.publish_failed`.
    #[arg(long, env = "GANTRY_PUBLISH_ATTEMPTS", default_value_t = 8)]
    pub publish_attempts: i32,
}

struct Publisher {
    config: Arc<GantryConfig>,
    /// Failed pushes of one image in a row before the pipeline fails.
    max_attempts: i32,
    pool: PgPool,
    relay_wake: Arc<Notify>,
}

impl Handler for Publisher {
    async fn handle(&self, event: Event) -> Outcome {
        let Some(Payload::BuildSucceeded(built)) = &event.payload else {
            return Outcome::Reject(anyhow::anyhow!(
                "publisher queue got a {:?} event",
                event.routing_key()
            ));
        };
        if self.config.project(&event.project).is_none() {
            return Outcome::Reject(anyhow::anyhow!(
                "project {:?} is not configured",
                event.project
            ));
        };
        let already = sqlx::query_scalar!(
            "SELECT event_id FROM processed_events WHERE event_id = $1",
            event.id
        )
        .fetch_optional(&self.pool)
        .await;
        match already {
            Ok(Some(_)) => return Outcome::Done,
            Ok(None) => {}
            Err(e) => return Outcome::Retry(e.into()),
        }
        if built.repository.is_empty() || built.digest.is_empty() {
            return Outcome::Reject(anyhow::anyhow!(
                "build.succeeded without the pushed repository and digest"
            ));
        }
        let revision = built.revision.clone().unwrap_or_default();
        let tags = tags::tags_for(&revision);
        let registry = self.config.registry_for(&built.repository);
        let digest = built.digest.clone();
        if let Err(e) = registry::tag(&registry, &built.repository, &digest, &tags).await {
            return self.push_failed(&event, built, &built.repository, e).await;
        }
        tracing::info!(repository = %built.repository, ?tags, %digest, "image tagged");
        let published = ImagePublished {
            revision: Some(revision),
            build_id: built.build_id.clone(),
            repository: built.repository.clone(),
            tags: tags.clone(),
            digest: digest.clone(),
        };
        let record = async {
            let mut tx = self.pool.begin().await?;
            if !gantry_store::first_delivery(&mut tx, &event.id).await? {
                return Ok::<_, anyhow::Error>(());
            }
            sqlx::query!(
                "INSERT INTO publications (event_id, pipeline_id, project, build_id, image_id, repository, tags, digest)
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                event.id,
                event.pipeline_id,
                event.project,
                built.build_id,
                built.image_id,
                built.repository,
                &tags,
                digest,
            )
            .execute(&mut *tx)
            .await?;
            let out = Event::new(
                &event.pipeline_id,
                &event.project,
                Payload::ImagePublished(published),
            );
            gantry_bus::enqueue(&mut tx, &out).await?;
            tx.commit().await?;
            Ok(())
        };
        self.settled(record.await)
    }
}

impl Publisher {
    fn settled(&self, recorded: anyhow::Result<()>) -> Outcome {
        match recorded {
            Ok(()) => {
                self.relay_wake.notify_one();
                Outcome::Done
            }
            Err(e) => Outcome::Retry(e),
        }
    }

    /// Counts a failed tagging; after [`Publisher::max_attempts`] in a row the
    /// pipeline ends with `image.publish_failed` instead of retrying forever.
    async fn push_failed(
        &self,
        event: &Event,
        built: &BuildSucceeded,
        repository: &str,
        error: anyhow::Error,
    ) -> Outcome {
        let reason = format!("{error:#}");
        let counted = sqlx::query_scalar!(
            "INSERT INTO tag_attempts (event_id, attempts, last_error) VALUES ($1, 1, $2)
             ON CONFLICT (event_id) DO UPDATE SET attempts = tag_attempts.attempts + 1, last_error = $2
             RETURNING attempts",
            event.id,
            reason,
        )
        .fetch_one(&self.pool)
        .await;
        let attempts = match counted {
            Ok(n) => n,
            Err(e) => return Outcome::Retry(anyhow::Error::new(e).context(reason)),
        };
        if attempts < self.max_attempts {
            return Outcome::Retry(error.context(format!("push attempt {attempts}")));
        }
        tracing::warn!(%repository, attempts, %reason, "giving up publishing");
        let record = async {
            let mut tx = self.pool.begin().await?;
            if !gantry_store::first_delivery(&mut tx, &event.id).await? {
                return Ok::<_, anyhow::Error>(());
            }
            let out = Event::new(
                &event.pipeline_id,
                &event.project,
                Payload::PublishFailed(PublishFailed {
                    revision: built.revision.clone(),
                    build_id: built.build_id.clone(),
                    repository: repository.to_owned(),
                    reason: format!("{attempts} attempts at tagging failed; last: {reason}"),
                }),
            );
            gantry_bus::enqueue(&mut tx, &out).await?;
            tx.commit().await?;
            Ok(())
        };
        self.settled(record.await)
    }
}

/// The registry-publisher service.
pub struct Service;

impl gantry_runtime::Service for Service {
    gantry_runtime::service_identity!("registry-publisher", (8082, 9092), [Registry]);

    async fn start(
        s: Settings,
        config: Arc<GantryConfig>,
        base: &mut Base,
        shutdown: &CancellationToken,
    ) -> anyhow::Result<Parts> {
        anyhow::ensure!(
            s.publish_attempts >= 1,
            "GANTRY_PUBLISH_ATTEMPTS must be at least 1"
        );
        // Ready only while every registry the projects push to answers its
        // API (any HTTP answer, a 401 included): without it nothing is tagged.
        let mut apis: Vec<String> = config
            .projects
            .iter()
            .filter(|p| !p.is_stack())
            .map(|p| registry::base_url(&config.registry_for(&p.image)))
            .collect();
        apis.sort();
        apis.dedup();
        let probe = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(2))
            .build()?;
        let publisher = Publisher {
            config,
            max_attempts: s.publish_attempts,
            pool: base.pool.clone(),
            relay_wake: base.relay_wake.clone(),
        };
        base.consume(
            gantry_bus::queues::REGISTRY_PUBLISHER,
            4,
            publisher,
            shutdown,
        );
        base.relay(shutdown);
        base.sample(Vec::new(), shutdown);
        Ok(Parts {
            readiness: Readiness::new().check("registry", move || {
                let (apis, probe) = (apis.clone(), probe.clone());
                async move {
                    for api in apis {
                        if probe.get(format!("{api}/v2/")).send().await.is_err() {
                            return false;
                        }
                    }
                    true
                }
            }),
            ..Parts::default()
        })
    }
}
