//! The build worker: claims builds from the `builds` table, keeps their lease
//! alive while it works, runs checkout → `.gantry.yml` → image build → test
//! steps, and records the verdict with its event. Several replicas (and
//! several builds per replica) share the table safely.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::Docker;
use gantry_proto::v1::StepResult;
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::docker::{self, BUILD_LABEL, StepEnd};
use crate::jobs::{self, Claimed, Verdict};
use crate::logs::LogSink;
use crate::pipeline_file::{self, PipelineFile};

/// How often an idle worker looks for builds whose lease ran out.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Tries at recording a verdict before leaving the build to be run again.
const FINISH_TRIES: u32 = 12;
/// A build taken over this many times fails instead of running again.
const MAX_ATTEMPTS: i32 = 3;

/// What a worker needs.
#[derive(Clone)]
pub struct Worker {
    pub pool: PgPool,
    pub docker: Docker,
    /// This replica's name in `builds.worker`.
    pub name: String,
    /// How long a claim holds without renewal; renewed every third of it.
    pub lease: Duration,
    /// Builds this replica runs at once.
    pub concurrency: usize,
    /// Woken when a new build is queued.
    pub wake: Arc<Notify>,
    /// Woken when a verdict is in the outbox.
    pub relay_wake: Arc<Notify>,
    /// Projects (their image repository) and registry credentials.
    pub config: Arc<gantry_config::GantryConfig>,
    /// Pushes of a tested image before the build fails at step "push".
    pub push_attempts: u32,
}

impl Worker {
    /// Claims and runs builds until `shutdown`; running builds are given back.
    pub async fn run(self, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.concurrency));
        let mut running = tokio::task::JoinSet::new();
        loop {
            let permit = tokio::select! {
                _ = shutdown.cancelled() => break,
                p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            };
            match jobs::claim(&self.pool, &self.name, self.lease).await {
                Ok(Some(build)) => {
                    self.relay_wake.notify_one();
                    let me = self.clone();
                    let stop = shutdown.clone();
                    running.spawn(async move {
                        me.hold(build, stop).await;
                        drop(permit);
                    });
                    continue;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = format!("{e:#}"), "cannot claim builds"),
            }
            drop(permit);
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = self.wake.notified() => {}
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
            while running.try_join_next().is_some() {}
        }
        while running.join_next().await.is_some() {}
    }

    /// Runs one claimed build while renewing its lease; stops the work if the
    /// lease is lost, gives the build back on shutdown.
    async fn hold(&self, build: Claimed, shutdown: CancellationToken) {
        let span = tracing::info_span!("build", build_id = %build.id, pipeline_id = %build.pipeline_id, project = %build.project, attempt = build.attempt);
        if let Some(tp) = &build.traceparent {
            gantry_telemetry::set_parent(&span, tp);
        }
        async {
            let lost = CancellationToken::new();
            let renew = {
                let (me, b, lost) = (self.clone(), build.clone(), lost.clone());
                async move {
                    let mut tick = tokio::time::interval(me.lease / 3);
                    tick.tick().await;
                    loop {
                        tick.tick().await;
                        match jobs::renew(&me.pool, &b, &me.name, me.lease).await {
                            Ok(true) => {}
                            Ok(false) => {
                                tracing::warn!("lease lost; another worker has the build");
                                lost.cancel();
                                return;
                            }
                            Err(e) => tracing::warn!(error = %e, "cannot renew lease"),
                        }
                    }
                }
            };
            let verdict = tokio::select! {
                v = self.execute(&build) => Some(v),
                _ = renew => None,
                _ = lost.cancelled() => None,
                _ = shutdown.cancelled() => {
                    if let Err(e) = jobs::release(&self.pool, &build, &self.name).await {
                        tracing::warn!(error = %e, "cannot give the build back; its lease will run out");
                    }
                    tracing::info!("shutting down; build given back to the queue");
                    None
                }
            };
            docker::remove_leftovers(&self.docker, &build.id.to_string()).await;
            let Some(verdict) = verdict else { return };
            let ok = matches!(verdict, Verdict::Succeeded { .. });
            // The database may be restarting: retry recording the verdict a
            // while (safe: `finish` writes only while this worker holds the build).
            let mut backoff = Duration::from_millis(250);
            for attempt in 1..=FINISH_TRIES {
                match jobs::finish(&self.pool, &build, &self.name, verdict.clone()).await {
                    Ok(true) => {
                        self.relay_wake.notify_one();
                        tracing::info!(succeeded = ok, "build finished");
                        return;
                    }
                    Ok(false) => {
                        tracing::warn!("build finished after its lease was lost; verdict dropped");
                        return;
                    }
                    Err(e) if attempt < FINISH_TRIES => {
                        tracing::warn!(error = format!("{e:#}"), "cannot record the verdict yet; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                    Err(e) => tracing::error!(error = format!("{e:#}"), "cannot record the verdict; the build will run again"),
                }
            }
        }
        .instrument(span)
        .await
    }

    async fn execute(&self, build: &Claimed) -> Verdict {
        let log = LogSink::new(self.pool.clone(), build.id, build.attempt);
        let mut steps = Vec::new();
        if build.attempt > MAX_ATTEMPTS {
            return fail(
                "build",
                0,
                format!(
                    "the builder stopped {} times while running this build",
                    build.attempt - 1
                ),
                steps,
            );
        }
        if build.attempt > 1 {
            log.system(
                "checkout",
                format!("attempt {} (an earlier builder stopped)", build.attempt),
            )
            .await;
            docker::remove_leftovers(&self.docker, &build.id.to_string()).await;
        }
        let revision = build.request.revision.clone().unwrap_or_default();
        let dir = match tempfile::Builder::new().prefix("gantry-build-").tempdir() {
            Ok(d) => d,
            Err(e) => {
                return fail(
                    "checkout",
                    0,
                    format!("cannot create a work directory: {e}"),
                    steps,
                );
            }
        };
        let started = Instant::now();
        if let Err(e) =
            crate::checkout::checkout(&revision.clone_url, &revision.commit_sha, dir.path(), &log)
                .await
        {
            log.system("checkout", format!("{e:#}")).await;
            return fail("checkout", 0, format!("{e:#}"), steps);
        }
        steps.push(result("checkout", 0, started));

        let text = match std::fs::read_to_string(dir.path().join(pipeline_file::FILE)) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let reason = format!(
                    "{}:1:1: not found at commit {}; expected a {} at the repository root",
                    pipeline_file::FILE,
                    revision.commit_sha,
                    pipeline_file::FILE
                );
                log.system("config", &reason).await;
                return fail("config", 0, reason, steps);
            }
            Err(e) => {
                return fail(
                    "config",
                    0,
                    format!("{}: cannot read: {e}", pipeline_file::FILE),
                    steps,
                );
            }
        };
        let file = match PipelineFile::parse(&text) {
            Ok(f) => f,
            Err(e) => {
                log.system("config", e.to_string()).await;
                return fail("config", 0, e.to_string(), steps);
            }
        };

        let build_id = build.id.to_string();
        // The image carries only what is true of the commit, so rebuilding a
        // commit yields the same image; containers also name build and pipeline.
        let image_labels = HashMap::from([
            ("io.gantry.project".to_owned(), build.project.clone()),
            ("io.gantry.commit".to_owned(), revision.commit_sha.clone()),
        ]);
        let mut labels = image_labels.clone();
        labels.insert(BUILD_LABEL.to_owned(), build_id.clone());
        labels.insert("io.gantry.pipeline".to_owned(), build.pipeline_id.clone());
        let started = Instant::now();
        let tag = format!(
            "gantry-build/{}:{}",
            build.project.to_ascii_lowercase(),
            build_id
        );
        let image_id = match docker::build_image(
            &self.docker,
            dir.path(),
            &file.image,
            &tag,
            image_labels,
            &log,
        )
        .await
        {
            Ok(id) => id,
            Err(e) => {
                log.system("build", format!("image build failed: {e:#}"))
                    .await;
                return fail("build", 0, format!("image build failed: {e:#}"), steps);
            }
        };
        steps.push(result("build", 0, started));
        log.system("build", format!("built {image_id}")).await;
        drop(dir);

        if let Err(failed) = self
            .run_tests(build, &file, &image_id, &labels, &log, &mut steps)
            .await
        {
            // A failed image is never published: untag it so the engine can prune it.
            let _ = self
                .docker
                .remove_image(
                    &tag,
                    None::<bollard::query_parameters::RemoveImageOptions>,
                    None,
                )
                .await;
            return failed;
        }

        let started = Instant::now();
        match self
            .push(build, &image_id, &revision.commit_sha, &log)
            .await
        {
            Ok((repository, digest)) => {
                steps.push(result("push", 0, started));
                Verdict::Succeeded {
                    image_id,
                    repository,
                    digest,
                    steps,
                }
            }
            Err(e) => {
                log.system("push", format!("{e:#}")).await;
                fail("push", 0, format!("{e:#}"), steps)
            }
        }
    }

    /// Pushes the tested image as `<project image>:<commit sha>`, retrying
    /// with backoff; returns the repository and the manifest digest.
    async fn push(
        &self,
        build: &Claimed,
        image_id: &str,
        sha: &str,
        log: &LogSink,
    ) -> anyhow::Result<(String, String)> {
        let project = self
            .config
            .project(&build.project)
            .ok_or_else(|| anyhow::anyhow!("project {} is not configured", build.project))?;
        let registry = self.config.registry_for(&project.image);
        let tags = [sha.to_owned()];
        let mut pause = Duration::from_secs(1);
        let mut attempt = 1;
        loop {
            log.system("push", format!("pushing {}:{sha}", project.image))
                .await;
            match crate::push::push(&self.docker, image_id, &project.image, &tags, &registry).await
            {
                Ok(digest) => {
                    log.system("push", format!("pushed {}@{digest}", project.image))
                        .await;
                    return Ok((project.image.clone(), digest));
                }
                Err(e) if attempt < self.push_attempts => {
                    log.system("push", format!("attempt {attempt} failed: {e:#}"))
                        .await;
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(30));
                    attempt += 1;
                }
                Err(e) => {
                    return Err(e.context(format!("{attempt} pushes to {} failed", project.image)));
                }
            }
        }
    }
}

impl Worker {
    /// Runs the test steps in order; the first failure ends the build.
    async fn run_tests(
        &self,
        build: &Claimed,
        file: &PipelineFile,
        image_id: &str,
        labels: &HashMap<String, String>,
        log: &LogSink,
        steps: &mut Vec<StepResult>,
    ) -> Result<(), Verdict> {
        let build_id = build.id.to_string();
        for (i, step) in file.test.iter().enumerate() {
            let started = Instant::now();
            log.system(&step.name, format!("$ {}", step.cmd.join(" ")))
                .await;
            let container = format!("gantry-{build_id}-{}-{i}", build.attempt);
            match docker::run_step(
                &self.docker,
                image_id,
                step,
                &container,
                labels.clone(),
                log,
            )
            .await
            {
                Ok(StepEnd::Exited(0)) => steps.push(result(&step.name, 0, started)),
                Ok(StepEnd::Exited(code)) => {
                    let code = code as i32;
                    steps.push(result(&step.name, code, started));
                    log.system(
                        &step.name,
                        format!("step {:?} exited with {code}", step.name),
                    )
                    .await;
                    return Err(fail(
                        &step.name,
                        code,
                        format!("test step {:?} exited with code {code}", step.name),
                        steps.clone(),
                    ));
                }
                Ok(StepEnd::TimedOut) => {
                    log.system(
                        &step.name,
                        format!("step {:?} timed out after {:?}", step.name, step.timeout),
                    )
                    .await;
                    return Err(fail(
                        &step.name,
                        0,
                        format!(
                            "test step {:?} timed out after {}s",
                            step.name,
                            step.timeout.as_secs()
                        ),
                        steps.clone(),
                    ));
                }
                Err(e) => {
                    log.system(&step.name, format!("cannot run step: {e:#}"))
                        .await;
                    return Err(fail(
                        &step.name,
                        0,
                        format!("cannot run test step {:?}: {e:#}", step.name),
                        steps.clone(),
                    ));
                }
            }
        }
        Ok(())
    }
}

fn result(name: &str, exit_code: i32, started: Instant) -> StepResult {
    StepResult {
        name: name.to_owned(),
        exit_code,
        duration_ms: started.elapsed().as_millis() as u64,
    }
}

fn fail(step: &str, exit_code: i32, reason: String, steps: Vec<StepResult>) -> Verdict {
    Verdict::Failed {
        step: step.to_owned(),
        exit_code,
        reason,
        steps,
    }
}
