//! The build worker: claims builds from the `builds` table, keeps their lease
//! alive while it works, runs checkout → `.gantry.yml` → image build → test
//! steps → push, and records the verdict with its event. Several replicas
//! (and several builds per replica) share the table safely. What a build
//! leaves in the engine is removed: its step containers whatever the outcome
//! (and, every [`SWEEP_EVERY`], those of builds no worker holds any more),
//! its image once pushed or failed. A build canceled while it runs
//! (`jobs::cancel`) is stopped at once: the worker listens for
//! cancellations on a Postgres channel; if it missed one, its next lease
//! renewal fails instead.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bollard::Docker;
use gantry_proto::v1::StepResult;
use gantry_queue::Held;
use gantry_retry::Policy;
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::context::{self, Context};
use crate::docker::{self, ATTEMPT_LABEL, BUILD_LABEL, Sandbox, StepEnd};
use crate::jobs::{self, Claimed, End, Job, Verdict};
use crate::logs::LogSink;
use crate::{services, stack_run};
use gantry_pipeline::{self as pipeline_file, PipelineFile};

/// How often an idle worker looks for builds whose lease ran out.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// A build taken over this many times fails instead of running again.
pub const MAX_ATTEMPTS: i32 = 3;
/// How often the engine is swept for step containers of builds that no
/// worker holds (left by a builder that was killed).
pub const SWEEP_EVERY: Duration = Duration::from_secs(60);

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
    /// The Docker network of test steps that ask for one.
    pub step_network: String,
    /// The builds this replica runs, with what stops each when it is canceled.
    pub running: Arc<std::sync::Mutex<HashMap<uuid::Uuid, CancellationToken>>>,
}

impl Worker {
    /// Claims and runs builds until `shutdown`; running builds are given back.
    pub async fn run(self, shutdown: CancellationToken) {
        let slots = Arc::new(Semaphore::new(self.concurrency));
        let mut running = tokio::task::JoinSet::new();
        let listener = {
            let (me, stop) = (self.clone(), shutdown.clone());
            tokio::spawn(async move { me.listen_for_cancellations(stop).await })
        };
        let sweeper = {
            let (me, stop) = (self.clone(), shutdown.clone());
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(SWEEP_EVERY);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tick.tick() => {
                            me.sweep().await;
                            stack_run::sweep(&me.docker, &me.pool).await;
                        }
                    }
                }
            })
        };
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
        sweeper.abort();
        listener.abort();
    }

    /// Stops the builds of this replica that are canceled, as their
    /// notifications arrive (see `jobs::CANCELED_CHANNEL`). A notification
    /// lost while the connection was down is made up for by the lease: the
    /// canceled build's next renewal fails.
    async fn listen_for_cancellations(&self, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                ended = self.stop_canceled() => {
                    let Err(e) = ended;
                    tracing::warn!(error = %e, "cannot listen for cancellations; retrying");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(IDLE_POLL) => {}
            }
        }
    }

    /// Listens on `jobs::CANCELED_CHANNEL` and stops the canceled builds it
    /// runs; returns only when it cannot listen.
    async fn stop_canceled(&self) -> Result<std::convert::Infallible, sqlx::Error> {
        let mut listener = sqlx::postgres::PgListener::connect_with(&self.pool).await?;
        listener.listen(jobs::CANCELED_CHANNEL).await?;
        loop {
            // `recv` reconnects by itself after a lost connection.
            let n = listener.recv().await?;
            let Ok(id) = n.payload().parse::<uuid::Uuid>() else {
                continue;
            };
            let token = self
                .running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .cloned();
            if let Some(token) = token {
                tracing::info!(build_id = %id, "build canceled; stopping it");
                token.cancel();
            }
        }
    }

    /// Runs one claimed build while renewing its lease; stops the work if the
    /// lease is lost, gives the build back on shutdown.
    async fn hold(&self, build: Claimed, shutdown: CancellationToken) {
        let span = tracing::info_span!("build", build_id = %build.id, pipeline_id = %build.pipeline_id, project = %build.project, attempt = build.attempt);
        if let Some(tp) = &build.traceparent {
            gantry_telemetry::set_parent(&span, tp);
        }
        async {
            let canceled = CancellationToken::new();
            self.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(build.id, canceled.clone());
            let work = async {
                tokio::select! {
                    end = self.execute(&build) => Some(end),
                    () = canceled.cancelled() => None,
                }
            };
            let held = gantry_queue::hold(
                &jobs::BUILDS,
                &self.pool,
                &build.claim,
                self.lease,
                work,
                Some(&shutdown),
            )
            .await;
            self.running
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&build.id);
            let end = match held {
                Held::Done(Some(v)) => Some(v),
                // Canceled: its end (and why) is already recorded.
                Held::Done(None) | Held::Lost | Held::GivenBack => None,
            };
            docker::remove_leftovers(&self.docker, &build.id.to_string()).await;
            if matches!(build.job, Job::Stack(_)) {
                // Also when the run was cut off: nothing of it stays.
                stack_run::teardown(&self.docker, build.id).await;
            }
            let Some(end) = end else {
                // Cut off: the engine keeps nothing of this attempt.
                docker::untag(&self.docker, &self.image_tags(&build)).await;
                return;
            };
            let ok = end.succeeded();
            // The database may be restarting: retry recording the verdict a
            // while (safe: `finish` writes only while this worker holds the build).
            let recorded = Policy::Record
                .retry("record the verdict", || {
                    jobs::finish(&self.pool, &build, end.clone())
                })
                .await;
            match recorded {
                Ok(true) => {
                    self.relay_wake.notify_one();
                    tracing::info!(succeeded = ok, "build finished");
                }
                Ok(false) => {
                    tracing::warn!("build finished after its lease was lost; verdict dropped");
                }
                Err(gave_up) => tracing::error!(
                    error = format!("{:#}", gave_up.error),
                    "cannot record the verdict; the build will run again"
                ),
            }
        }
        .instrument(span)
        .await
    }

    /// Removes step containers of builds this database knows that no
    /// attempt uses any more: the build is finished, or the container is of
    /// an earlier attempt than the build's. (A build whose lease ran out is
    /// cleaned by the worker that takes it over.) Containers of builds it
    /// does not know belong to another Gantry and are left alone.
    async fn sweep(&self) {
        let list = gantry_docker::labelled_containers(&self.docker, BUILD_LABEL).await;
        // (container id, build id, attempt of the container)
        let found: Vec<(String, uuid::Uuid, i32)> = list
            .iter()
            .filter_map(|c| {
                let labels = c.labels.as_ref()?;
                Some((
                    c.id.clone()?,
                    labels.get(BUILD_LABEL)?.parse().ok()?,
                    labels.get(ATTEMPT_LABEL)?.parse().ok()?,
                ))
            })
            .collect();
        if found.is_empty() {
            return;
        }
        let ids: Vec<uuid::Uuid> = found.iter().map(|(_, b, _)| *b).collect();
        let builds = match sqlx::query!(
            r#"SELECT id, attempt, state AS "state: gantry_states::BuildState"
               FROM builds WHERE id = ANY($1)"#,
            &ids
        )
        .fetch_all(&self.pool)
        .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::debug!(error = %e, "cannot sweep step containers now");
                return;
            }
        };
        for (container, build, attempt) in found {
            let stale = builds
                .iter()
                .any(|b| b.id == build && (b.state.is_finished() || attempt < b.attempt));
            if stale {
                tracing::info!(build_id = %build, attempt, "removing a step container no build uses");
                docker::remove_container(&self.docker, &container).await;
            }
        }
    }

    async fn execute(&self, build: &Claimed) -> End {
        let Some(project) = self.config.project(&build.project) else {
            return End::stopped(
                &build.job,
                "checkout",
                format!("project {} is not configured", build.project),
            );
        };
        // The secrets stored with `gantry secrets set` join the
        // configuration's, masked alike.
        let mut project = project.clone();
        if matches!(build.job, Job::Build(_)) {
            match crate::secrets::stored_for(&self.pool, &self.config, &project.name).await {
                Ok(stored) => project.secrets.extend(stored),
                Err(why) => return End::stopped(&build.job, "config", why),
            }
        }
        let project = &project;
        let log = LogSink::new(
            self.pool.clone(),
            build.id,
            build.attempt,
            project.limits.log_bytes,
            project
                .secrets
                .iter()
                .filter_map(|s| s.value.as_ref().map(|v| v.expose())),
        );
        let end = match &build.job {
            Job::Build(_) => End::Build(self.run_build(build, project, &log).await),
            Job::Stack(run) => End::Stack(stack_run::run(self, build, run, project, &log).await),
        };
        log.close().await;
        end
    }

    /// Runs the phases of a build — checkout, pipeline file, image build,
    /// test steps, push — and says how it ended.
    async fn run_build(
        &self,
        build: &Claimed,
        project: &gantry_config::Project,
        log: &LogSink,
    ) -> Verdict {
        let mut steps = Vec::new();
        match self.phases(build, project, log, &mut steps).await {
            Ok(verdict) => verdict,
            Err(Ended::Stopped { step, reason }) => {
                log.system(step, &reason).await;
                fail(step, 0, reason, steps)
            }
            Err(Ended::Failed(verdict)) => verdict,
        }
    }

    async fn phases(
        &self,
        build: &Claimed,
        project: &gantry_config::Project,
        log: &LogSink,
        steps: &mut Vec<StepResult>,
    ) -> Result<Verdict, Ended> {
        self.begin_attempt(build, log).await?;
        let revision = build.job.revision();
        let dir = tempfile::Builder::new()
            .prefix("gantry-build-")
            .tempdir()
            .map_err(|e| Ended::stop("checkout", format!("cannot create a work directory: {e}")))?;

        let started = Instant::now();
        let url = fetch_url(project, &revision).map_err(|why| Ended::stop("checkout", why))?;
        crate::checkout::checkout(
            url,
            project.clone_credentials.as_ref(),
            &revision.commit_sha,
            dir.path(),
            log,
        )
        .await
        .map_err(|e| Ended::stop("checkout", format!("{e:#}")))?;
        steps.push(result("checkout", 0, started));

        let file = read_pipeline(dir.path(), project, &revision.commit_sha).await?;
        if let Some(reason) = self
            .skip_reason(&file, &revision, project, dir.path(), log)
            .await
        {
            log.system("config", format!("skipped: {reason}")).await;
            return Ok(Verdict::Skipped {
                reason,
                steps: steps.clone(),
            });
        }

        // The image carries only what is true of the commit, so rebuilding a
        // commit yields the same image; containers also name build and pipeline.
        let image_labels = HashMap::from([
            ("io.gantry.project".to_owned(), build.project.clone()),
            ("io.gantry.commit".to_owned(), revision.commit_sha.clone()),
        ]);
        let mut labels = image_labels.clone();
        labels.insert(BUILD_LABEL.to_owned(), build.id.to_string());
        labels.insert(ATTEMPT_LABEL.to_owned(), build.attempt.to_string());
        labels.insert("io.gantry.pipeline".to_owned(), build.pipeline_id.clone());
        let [tag, pushed_tag] = self.image_tags(build);

        let started = Instant::now();
        let image_id = self
            .build_image(
                dir.path(),
                project,
                &revision,
                &file,
                &tag,
                image_labels,
                log,
            )
            .await?;
        steps.push(result("build", 0, started));
        log.system("build", format!("built {image_id}")).await;
        drop(dir);

        let tested = self
            .run_tests(build, project, &file, &image_id, &labels, log, steps)
            .await;
        if !file.services.is_empty() {
            // The services (and their network) go as soon as the tests end.
            docker::remove_leftovers(&self.docker, &build.id.to_string()).await;
        }
        if let Err(failed) = tested {
            // A failed image is never published: untag it so the engine can prune it.
            docker::untag(&self.docker, std::slice::from_ref(&tag)).await;
            return Err(Ended::Failed(failed));
        }

        let started = Instant::now();
        let pushed = self
            .push(project, &image_id, &pushed_tag_of(&revision), log)
            .await;
        // The registry holds the image now (or it failed): the engine keeps
        // nothing of it, so builds do not fill it up.
        docker::untag(&self.docker, &[tag, pushed_tag]).await;
        let (repository, digest) = pushed.map_err(|e| Ended::stop("push", format!("{e:#}")))?;
        steps.push(result("push", 0, started));
        Ok(Verdict::Succeeded {
            image_id,
            repository,
            digest,
            steps: steps.clone(),
        })
    }

    /// Why the pipeline file's `only`/`except` rules exclude this push, if
    /// they do; the changed files are computed only when a rule needs them.
    async fn skip_reason(
        &self,
        file: &PipelineFile,
        revision: &gantry_proto::v1::Revision,
        project: &gantry_config::Project,
        dir: &std::path::Path,
        log: &LogSink,
    ) -> Option<String> {
        let rules = &file.rules;
        let changed = if rules.uses_changes() && !revision.before_sha.is_empty() {
            crate::checkout::changed_files(
                fetch_url(project, revision).ok()?,
                project.clone_credentials.as_ref(),
                &revision.before_sha,
                &revision.commit_sha,
                dir,
                log,
            )
            .await
        } else {
            None
        };
        // A merge request is filtered by the branch it comes from.
        let branch = match &revision.merge_request {
            Some(mr) => &mr.source_branch,
            None => &revision.branch,
        };
        rules.skip_reason(branch, &revision.tag, changed.as_deref())
    }

    /// Refuses a build taken over too often; cleans what an earlier attempt left.
    async fn begin_attempt(&self, build: &Claimed, log: &LogSink) -> Result<(), Ended> {
        if build.attempt > MAX_ATTEMPTS {
            return Err(Ended::stop(
                "build",
                format!(
                    "the builder stopped {} times while running this build",
                    build.attempt - 1
                ),
            ));
        }
        if build.attempt > 1 {
            log.system(
                "checkout",
                format!("attempt {} (an earlier builder stopped)", build.attempt),
            )
            .await;
            docker::remove_leftovers(&self.docker, &build.id.to_string()).await;
        }
        Ok(())
    }

    /// Builds the image from the checked, confined context.
    #[allow(clippy::too_many_arguments)]
    async fn build_image(
        &self,
        checkout: &std::path::Path,
        project: &gantry_config::Project,
        revision: &gantry_proto::v1::Revision,
        file: &PipelineFile,
        tag: &str,
        labels: HashMap<String, String>,
        log: &LogSink,
    ) -> Result<String, Ended> {
        let (root, spec) = (checkout.to_owned(), file.image.clone());
        let context = tokio::task::spawn_blocking(move || Context::resolve(&root, &spec))
            .await
            .unwrap_or_else(|e| Err(context::Refused(format!("{e}"))))
            .map_err(|refused| Ended::stop("build", refused.to_string()))?;
        let cache = self.pull_cache(project, revision, log).await;
        let built = docker::build_image(
            &self.docker,
            context,
            &file.image,
            tag,
            labels,
            &project.limits,
            &self.step_network,
            &cache,
            log,
        )
        .await;
        // The registry keeps them: the engine does not.
        docker::untag(&self.docker, &cache).await;
        built.map_err(|e| Ended::stop("build", format!("image build failed: {e:#}")))
    }

    /// Pulls the project's last published images of this branch and of the
    /// default branch (`:<branch tag>`, `:latest`), whose layers the image
    /// build may reuse: the registry is the build cache, so every builder
    /// replica, on any host, has the same one. Returns those it got.
    async fn pull_cache(
        &self,
        project: &gantry_config::Project,
        revision: &gantry_proto::v1::Revision,
        log: &LogSink,
    ) -> Vec<String> {
        let mut wanted = Vec::new();
        // A merge request's image (perhaps a fork's) is never anyone's cache.
        if revision.merge_request.is_none() && !revision.branch.is_empty() {
            wanted.push(format!(
                "{}:{}",
                project.image,
                gantry_config::tags::branch_tag(&revision.branch)
            ));
        }
        wanted.push(format!("{}:latest", project.image));
        wanted.dedup();
        let registry = self.config.registry_for(&project.image);
        let mut pulled = Vec::new();
        for reference in wanted {
            if gantry_docker::pull(&self.docker, &reference, &registry)
                .await
                .is_ok()
            {
                log.system("build", format!("build cache: {reference}"))
                    .await;
                pulled.push(reference);
            }
        }
        pulled
    }

    /// The engine's tags of a build's image: the builder's own, and the one
    /// it pushes (see [`pushed_tag_of`]).
    fn image_tags(&self, build: &Claimed) -> [String; 2] {
        let pushed = pushed_tag_of(&build.job.revision());
        let repository = self
            .config
            .project(&build.project)
            .map(|p| p.image.clone())
            .unwrap_or_default();
        [
            format!(
                "gantry-build/{}:{}",
                build.project.to_ascii_lowercase(),
                build.id
            ),
            format!("{repository}:{pushed}"),
        ]
    }

    /// Pushes the tested image as `<project image>:<tag>`, retrying
    /// with backoff; returns the repository and the manifest digest.
    async fn push(
        &self,
        project: &gantry_config::Project,
        image_id: &str,
        sha: &str,
        log: &LogSink,
    ) -> anyhow::Result<(String, String)> {
        let registry = self.config.registry_for(&project.image);
        let tags = [sha.to_owned()];
        let mut delays = Policy::Push(self.push_attempts).delays();
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
                Err(e) => match delays.next() {
                    Some(pause) => {
                        log.system("push", format!("attempt {attempt} failed: {e:#}"))
                            .await;
                        tokio::time::sleep(pause).await;
                        attempt += 1;
                    }
                    None => {
                        return Err(
                            e.context(format!("{attempt} pushes to {} failed", project.image))
                        );
                    }
                },
            }
        }
    }
}

impl Worker {
    /// Runs the test steps in order, sandboxed; the first failure ends the build.
    #[allow(clippy::too_many_arguments)]
    async fn run_tests(
        &self,
        build: &Claimed,
        project: &gantry_config::Project,
        file: &PipelineFile,
        image_id: &str,
        labels: &HashMap<String, String>,
        log: &LogSink,
        steps: &mut Vec<StepResult>,
    ) -> Result<(), Verdict> {
        let build_id = build.id.to_string();
        if file.test.is_empty() {
            return Ok(());
        }
        let setup = async {
            let user = docker::step_user(
                &self.docker,
                image_id,
                &format!("gantry-{build_id}-{}-user", build.attempt),
                labels,
            )
            .await?;
            if file.test.iter().any(|s| s.network) {
                docker::ensure_step_network(&self.docker, &self.step_network).await?;
            }
            anyhow::Ok(user)
        };
        let user = match setup.await {
            Ok(u) => u,
            Err(e) => {
                let reason = format!("cannot prepare the test steps: {e:#}");
                log.system("build", &reason).await;
                return Err(fail("build", 0, reason, steps.clone()));
            }
        };
        if let Some(note) = &user.note {
            log.system("build", note).await;
        }
        let services_network = if file.services.is_empty() {
            None
        } else {
            let started = Instant::now();
            match services::start(
                &self.docker,
                &self.config,
                project,
                &build_id,
                build.attempt,
                &file.services,
                labels,
                log,
            )
            .await
            {
                Ok(network) => {
                    steps.push(result(services::STEP, 0, started));
                    Some(network)
                }
                Err(reason) => {
                    log.system(services::STEP, &reason).await;
                    return Err(fail(services::STEP, 0, reason, steps.clone()));
                }
            }
        };
        let env = secrets_for(build, project, log).await;
        let sandbox = Sandbox {
            user: &user,
            limits: &project.limits,
            step_network: &self.step_network,
            services_network: services_network.as_deref(),
            env: &env,
        };
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
                &sandbox,
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

/// The tag a build's image is pushed under: its commit sha, or for a merge
/// request's pipeline `mr-<number>`, the only tag such an image ever gets
/// (a commit of a fork must not take a tag a branch's image could have).
fn pushed_tag_of(revision: &gantry_proto::v1::Revision) -> String {
    match &revision.merge_request {
        Some(mr) => gantry_config::tags::merge_request_tag(mr.number),
        None => revision.commit_sha.clone(),
    }
}

/// Where a revision's commit is fetched from: the project's repository as
/// the configuration (not the event) names it; for a merge request from a
/// fork, the fork, which must be on the same server (see
/// [`gantry_config::git::fork_url_refusal`]). Returns why not.
fn fetch_url<'a>(
    project: &'a gantry_config::Project,
    revision: &'a gantry_proto::v1::Revision,
) -> Result<&'a str, String> {
    match &revision.merge_request {
        Some(mr) if mr.from_fork => {
            match gantry_config::git::fork_url_refusal(&project.clone_url, &mr.head_clone_url) {
                None => Ok(&mr.head_clone_url),
                Some(why) => Err(why),
            }
        }
        _ => Ok(&project.clone_url),
    }
}

/// `NAME=value` of the project's secrets a build's test steps get: a
/// protected one only in pipelines of the default branch and of tags, none
/// in a merge request's from a fork. The log names the ones withheld
/// (never a value).
async fn secrets_for(
    build: &Claimed,
    project: &gantry_config::Project,
    log: &LogSink,
) -> Vec<String> {
    let rev = build.job.revision();
    if rev.merge_request.as_ref().is_some_and(|mr| mr.from_fork) {
        if !project.secrets.is_empty() {
            let names: Vec<&str> = project.secrets.iter().map(|s| s.name.as_str()).collect();
            log.system(
                "build",
                format!(
                    "secrets withheld from this pipeline (a merge request from a fork gets none): {}",
                    names.join(", ")
                ),
            )
            .await;
        }
        return Vec::new();
    }
    let default_branch = if rev.default_branch.is_empty() {
        &project.default_branch
    } else {
        &rev.default_branch
    };
    let (given, withheld): (Vec<_>, Vec<_>) = project
        .secrets
        .iter()
        .partition(|s| s.given_to(&rev.branch, &rev.tag, default_branch));
    if !withheld.is_empty() {
        let names: Vec<&str> = withheld.iter().map(|s| s.name.as_str()).collect();
        log.system(
            "build",
            format!(
                "secrets withheld from this pipeline (protected: only the default branch and tags get them): {}",
                names.join(", ")
            ),
        )
        .await;
    }
    given
        .into_iter()
        .filter_map(|s| Some(format!("{}={}", s.name, s.value.as_ref()?.expose())))
        .collect()
}

/// Why a build ended before its verdict was success.
enum Ended {
    /// A step of the builder's own stopped it (logged here, exit code 0).
    Stopped { step: &'static str, reason: String },
    /// A test step failed; its verdict is ready (and logged).
    Failed(Verdict),
}

impl Ended {
    fn stop(step: &'static str, reason: String) -> Self {
        Ended::Stopped { step, reason }
    }
}

/// Reads `.gantry.yml` from the checkout (confined to it) and checks it
/// against what the project allows.
async fn read_pipeline(
    checkout: &std::path::Path,
    project: &gantry_config::Project,
    commit: &str,
) -> Result<PipelineFile, Ended> {
    let root = checkout.to_owned();
    let text = tokio::task::spawn_blocking(move || context::read_pipeline_file(&root))
        .await
        .unwrap_or_else(|e| Err(context::Refused(format!("{e}"))))
        .map_err(|refused| Ended::stop("config", refused.to_string()))?
        .ok_or_else(|| {
            Ended::stop(
                "config",
                format!(
                    "{}:1:1: not found at commit {commit}; expected a {} at the repository root",
                    pipeline_file::FILE,
                    pipeline_file::FILE
                ),
            )
        })?;
    PipelineFile::parse(&text)
        .and_then(|f| f.check_limits(&project.limits).map(|()| f))
        .map_err(|e| Ended::stop("config", e.to_string()))
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
