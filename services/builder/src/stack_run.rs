//! A stack's integration run, as the deployer asked for it
//! (`stack.run_requested`): check out the stack repository (the pushed
//! commit, or the head of its default branch), read the `stack:` section
//! and the compose file ([`crate::stack_file`]), write the run's own compose
//! file (members pinned by digest, everything labelled and confined), pull
//! the members' images, `docker-compose up` the services, wait for their
//! health checks, start the test services and wait for their exit codes,
//! collect every container's log into the run's log, and always tear down.
//!
//! The run is a compose project of its own, `gantry-stack-<build id>`, on
//! its own `internal` network. Its containers, network and volumes carry
//! the build's labels (`io.gantry.build`, `io.gantry.attempt`, plus
//! `io.gantry.stack`, `io.gantry.stack-run`, `io.gantry.pipeline`), so
//! whatever a killed builder left is found again: by the worker that takes
//! the run over (before it starts again), by the worker when the run ends
//! in any way, and by the builder's periodic sweep ([`sweep`]).
//!
//! `docker-compose` (Debian's 1.29) runs the file as users run theirs; it
//! gets a clean environment (no variable of the builder's can be
//! interpolated into the stack) and a directory holding only the written
//! file.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use bollard::Docker;
use bollard::container::LogOutput;
use bollard::models::ContainerStateStatusEnum;
use bollard::query_parameters::{InspectContainerOptions, LogsOptions};
use futures::StreamExt as _;
use gantry_config::Project;
use gantry_docker::Readiness;
use gantry_proto::v1::StackRun;
use uuid::Uuid;

use crate::context;
use crate::docker::{ATTEMPT_LABEL, BUILD_LABEL};
use crate::jobs::{Claimed, StackVerdict};
use crate::logs::LogSink;
use crate::stack_file::{self, Plan, RunContext, StackFile};
use crate::worker::{MAX_ATTEMPTS, Worker};
use gantry_pipeline::FILE;

/// Label of everything a stack run starts: the run's id.
pub const RUN_LABEL: &str = "io.gantry.stack-run";
/// Label of everything a stack run starts: the stack's name.
pub const STACK_LABEL: &str = "io.gantry.stack";
/// docker-compose's own labels.
const COMPOSE_PROJECT: &str = "com.docker.compose.project";
const COMPOSE_SERVICE: &str = "com.docker.compose.service";
/// How long one docker-compose command may take.
const COMPOSE_TIMEOUT: Duration = Duration::from_secs(300);
/// How often health and exits are looked at.
const POLL: Duration = Duration::from_millis(500);
/// How long collecting the containers' logs may take, and how many of the
/// last lines of each are kept.
const LOGS_TIMEOUT: Duration = Duration::from_secs(60);
const LOG_TAIL: &str = "5000";

/// The compose project name of a run.
pub fn compose_project(build_id: Uuid) -> String {
    format!("gantry-stack-{}", build_id.simple())
}

/// Why a run failed: step, exit code, reason.
type Failure = (String, i32, String);

fn failure(step: &str, reason: impl Into<String>) -> Failure {
    (step.to_owned(), 0, reason.into())
}

/// Runs one attempt of a stack run and says how it ended.
pub async fn run(
    w: &Worker,
    build: &Claimed,
    run: &StackRun,
    project: &Project,
    log: &LogSink,
) -> StackVerdict {
    let mut verdict = StackVerdict {
        stack_commit: String::new(),
        failure: None,
        services: Vec::new(),
        compose: String::new(),
        rancher_compose: String::new(),
    };
    if let Err((step, code, reason)) = attempt(w, build, run, project, log, &mut verdict).await {
        log.system(&step, &reason).await;
        verdict.failure = Some((step, code, reason));
    } else {
        log.system("run", "the integration tests passed").await;
    }
    verdict
}

async fn attempt(
    w: &Worker,
    build: &Claimed,
    run: &StackRun,
    project: &Project,
    log: &LogSink,
    verdict: &mut StackVerdict,
) -> Result<(), Failure> {
    if build.attempt > MAX_ATTEMPTS {
        return Err(failure(
            "run",
            format!(
                "the builder stopped {} times while running this stack",
                build.attempt - 1
            ),
        ));
    }
    if build.attempt > 1 {
        log.system(
            "run",
            format!(
                "attempt {}: removing what the earlier attempt left",
                build.attempt
            ),
        )
        .await;
        teardown(&w.docker, build.id).await;
    }
    let dir = tempfile::Builder::new()
        .prefix("gantry-stack-")
        .tempdir()
        .map_err(|e| failure("checkout", format!("cannot create a work directory: {e}")))?;
    let repo = dir.path().join("repo");
    std::fs::create_dir(&repo)
        .map_err(|e| failure("checkout", format!("cannot create a work directory: {e}")))?;
    verdict.stack_commit = checkout(project, run, &repo, log).await?;
    let (file, plan) = prepare(w, build, run, project, &repo, &verdict.stack_commit).await?;
    verdict.services = plan.services.clone();
    verdict.compose = plan.compose.to_string();
    verdict.rancher_compose = plan
        .rancher_compose
        .as_ref()
        .map(serde_json::Value::to_string)
        .unwrap_or_default();
    for note in &plan.notes {
        log.system("config", note).await;
    }
    for s in &plan.services {
        let role = match (s.test, s.project.as_str()) {
            (true, _) => " (test)".to_owned(),
            (false, "") => String::new(),
            (false, p) => format!(" (member: {p})"),
        };
        log.system("config", format!("{}: {}{role}", s.service, s.image))
            .await;
    }
    let _ = std::fs::remove_dir_all(&repo);
    // The compose file lives beside an empty project directory, which is
    // all docker-compose may resolve relative paths (or a `.env`) against.
    let json = serde_json::to_vec_pretty(&stack_file::escaped(&plan.compose)).unwrap_or_default();
    std::fs::write(dir.path().join("compose.json"), json)
        .and_then(|()| std::fs::create_dir(dir.path().join("project")))
        .map_err(|e| {
            failure(
                "config",
                format!("cannot write the run's compose file: {e}"),
            )
        })?;
    let compose = Compose {
        dir: dir.path(),
        project: compose_project(build.id),
    };
    let limit = file.timeout.min(project.limits.build_timeout);
    let result = tokio::time::timeout(limit, execute(w, &compose, &plan, log))
        .await
        .unwrap_or_else(|_| {
            Err(failure(
                "run",
                format!("the run took longer than {}s", limit.as_secs()),
            ))
        });
    if tokio::time::timeout(LOGS_TIMEOUT, collect_logs(&w.docker, &compose.project, log))
        .await
        .is_err()
    {
        log.system("logs", "collecting the containers' logs took too long; cut")
            .await;
    }
    compose
        .run(&["down", "-v", "--remove-orphans", "-t", "5"], "down", log)
        .await
        .ok();
    teardown(&w.docker, build.id).await;
    result
}

/// Fetches the stack repository: the pushed commit, or the head of the ref.
async fn checkout(
    project: &Project,
    run: &StackRun,
    repo: &Path,
    log: &LogSink,
) -> Result<String, Failure> {
    let rev = run.revision.clone().unwrap_or_default();
    let creds = project.clone_credentials.as_ref();
    // The configuration, not the event, says where the stack lives.
    let fetched = if rev.commit_sha.is_empty() {
        let git_ref = if rev.git_ref.is_empty() {
            format!("refs/heads/{}", project.default_branch)
        } else {
            rev.git_ref.clone()
        };
        crate::checkout::checkout_ref(&project.clone_url, creds, &git_ref, repo, log).await
    } else {
        crate::checkout::checkout(&project.clone_url, creds, &rev.commit_sha, repo, log)
            .await
            .map(|()| rev.commit_sha.clone())
    };
    fetched.map_err(|e| failure("checkout", format!("{e:#}")))
}

/// Reads the stack's `.gantry.yml` and compose file and writes the run's plan.
async fn prepare(
    w: &Worker,
    build: &Claimed,
    run: &StackRun,
    project: &Project,
    repo: &Path,
    commit: &str,
) -> Result<(StackFile, Plan), Failure> {
    let root = repo.to_owned();
    let text = tokio::task::spawn_blocking(move || context::read_pipeline_file(&root))
        .await
        .unwrap_or_else(|e| Err(context::Refused(format!("{e}"))))
        .map_err(|refused| failure("config", refused.to_string()))?
        .ok_or_else(|| {
            failure(
                "config",
                format!("{FILE}:1:1: not found at commit {commit}; a stack repository needs one with a `stack:` section"),
            )
        })?;
    let file = StackFile::parse(&text).map_err(|e| failure("config", e.to_string()))?;
    let (root, rel) = (repo.to_owned(), file.compose.clone());
    let compose_text = tokio::task::spawn_blocking(move || {
        context::read_text_file(&root, &rel, "the compose file")
    })
    .await
    .unwrap_or_else(|e| Err(context::Refused(format!("{e}"))))
    .map_err(|refused| failure("config", refused.to_string()))?
    .ok_or_else(|| {
        failure(
            "config",
            format!(
                "{}:1:1: not found at commit {commit} (named by {FILE})",
                file.compose
            ),
        )
    })?;
    let labels = BTreeMap::from([
        (STACK_LABEL.to_owned(), run.stack.clone()),
        (RUN_LABEL.to_owned(), run.run_id.clone()),
        ("io.gantry.pipeline".to_owned(), build.pipeline_id.clone()),
        (BUILD_LABEL.to_owned(), build.id.to_string()),
        (ATTEMPT_LABEL.to_owned(), build.attempt.to_string()),
    ]);
    let project_of_image = |image: &str| {
        // `host/path:tag` or `host/path@digest` -> `host/path`
        let repository = image.split('@').next().unwrap_or_default();
        let repository = match repository.rsplit_once(':') {
            Some((r, tag)) if !tag.contains('/') => r,
            _ => repository,
        };
        w.config
            .projects
            .iter()
            .find(|p| !p.is_stack() && p.image == repository)
            .map(|p| p.name.clone())
    };
    let plan = stack_file::plan(
        &file,
        &compose_text,
        &RunContext {
            releases: &run.releases,
            labels: &labels,
            limits: &project.limits,
            follows: &project.follows,
            project_of_image: &project_of_image,
        },
    )
    .map_err(|e| failure("config", e.to_string()))?;
    let mut plan = plan;
    let (root, rel) = (repo.to_owned(), file.rancher_compose.clone());
    let rancher_text = tokio::task::spawn_blocking(move || {
        context::read_text_file(&root, &rel, "the rancher-compose file")
    })
    .await
    .unwrap_or_else(|e| Err(context::Refused(format!("{e}"))))
    .map_err(|refused| failure("config", refused.to_string()))?;
    match rancher_text {
        Some(text) => {
            plan.rancher_compose = Some(
                stack_file::rancher_compose(&file.rancher_compose, &text, &plan)
                    .map_err(|e| failure("config", e.to_string()))?,
            );
        }
        None if file.rancher_compose_named => {
            return Err(failure(
                "config",
                format!(
                    "{}:1:1: not found at commit {commit} (named by {FILE})",
                    file.rancher_compose
                ),
            ));
        }
        None => {}
    }
    Ok((file, plan))
}

/// Pull, up, health, tests.
async fn execute(
    w: &Worker,
    compose: &Compose<'_>,
    plan: &Plan,
    log: &LogSink,
) -> Result<(), Failure> {
    for s in plan.services.iter().filter(|s| !s.digest.is_empty()) {
        let repository = s.image.split('@').next().unwrap_or_default();
        let registry = w.config.registry_for(repository);
        log.system("pull", format!("pulling {}", s.image)).await;
        gantry_retry::Policy::Pull(3)
            .retry("pull a member's image", || {
                gantry_docker::pull(&w.docker, &s.image, &registry)
            })
            .await
            .map_err(|g| failure("pull", format!("{:#}", g.error)))?;
    }
    if !plan.up.is_empty() {
        let mut args = vec!["up", "-d", "--no-build", "--no-color"];
        args.extend(plan.up.iter().map(String::as_str));
        compose
            .run(&args, "up", log)
            .await
            .map_err(|e| failure("up", format!("{e:#}")))?;
        wait_healthy(&w.docker, &compose.project, &plan.up, log).await?;
    }
    let mut args = vec!["up", "-d", "--no-build", "--no-color", "--no-deps"];
    args.extend(plan.tests.iter().map(String::as_str));
    compose
        .run(&args, "up", log)
        .await
        .map_err(|e| failure("up", format!("{e:#}")))?;
    for test in &plan.tests {
        let code = wait_exit(&w.docker, &compose.project, test).await?;
        log.system(test, format!("test service {test:?} exited with {code}"))
            .await;
        if code != 0 {
            return Err((
                test.clone(),
                code as i32,
                format!("test service {test:?} exited with code {code}"),
            ));
        }
    }
    Ok(())
}

/// One run's compose project.
struct Compose<'a> {
    dir: &'a Path,
    project: String,
}

impl Compose<'_> {
    /// Runs `docker-compose -p <project> -f compose.json <args>`, its output
    /// going to the log under `step`.
    async fn run(&self, args: &[&str], step: &str, log: &LogSink) -> anyhow::Result<()> {
        let mut cmd = tokio::process::Command::new("docker-compose");
        let empty = self.dir.join("project");
        cmd.arg("-p")
            .arg(&self.project)
            .arg("-f")
            .arg(self.dir.join("compose.json"))
            .arg("--project-directory")
            .arg(&empty)
            .args(args)
            .current_dir(&empty)
            .env_clear()
            .env("HOME", &empty)
            .kill_on_drop(true);
        for var in [
            "PATH",
            "DOCKER_HOST",
            "DOCKER_TLS_VERIFY",
            "DOCKER_CERT_PATH",
        ] {
            if let Some(v) = std::env::var_os(var) {
                cmd.env(var, v);
            }
        }
        let out = tokio::time::timeout(COMPOSE_TIMEOUT, cmd.output())
            .await
            .map_err(|_| anyhow::anyhow!("docker-compose {} timed out", args[0]))??;
        log.write(step, "stdout", &out.stdout).await;
        log.write(step, "stderr", &out.stderr).await;
        anyhow::ensure!(
            out.status.success(),
            "docker-compose {} failed ({}): {}",
            args[0],
            out.status,
            String::from_utf8_lossy(&out.stderr)
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty())
                .unwrap_or_default()
                .trim()
        );
        Ok(())
    }
}

/// The run's container of `service`, if it exists.
async fn container_of(docker: &Docker, project: &str, service: &str) -> Option<String> {
    let label = format!("{COMPOSE_PROJECT}={project}");
    gantry_docker::labelled_containers(docker, &label)
        .await
        .into_iter()
        .find(|c| {
            c.labels
                .as_ref()
                .and_then(|l| l.get(COMPOSE_SERVICE))
                .is_some_and(|s| s == service)
        })
        .and_then(|c| c.id)
}

/// Waits until every service of `services` is healthy (running, for those
/// without a health check); one that stops or turns unhealthy fails the run.
async fn wait_healthy(
    docker: &Docker,
    project: &str,
    services: &[String],
    log: &LogSink,
) -> Result<(), Failure> {
    let mut waiting: Vec<&String> = services.iter().collect();
    while !waiting.is_empty() {
        let mut still = Vec::new();
        for service in waiting {
            let Some(id) = container_of(docker, project, service).await else {
                return Err(failure(
                    "health",
                    format!("service {service:?} has no container"),
                ));
            };
            let readiness = gantry_docker::readiness(docker, &id)
                .await
                .map_err(|e| failure("health", gantry_docker::error_text(&e)))?;
            match readiness {
                Readiness::Stopped(code) => {
                    return Err((
                        "health".into(),
                        code as i32,
                        format!("service {service:?} stopped (exit code {code}) before the tests"),
                    ));
                }
                Readiness::Unhealthy => {
                    return Err(failure(
                        "health",
                        format!("service {service:?} is unhealthy"),
                    ));
                }
                Readiness::Ready { checked: true } => {
                    log.system("health", format!("{service} is healthy")).await;
                }
                Readiness::Ready { checked: false } => {
                    log.system("health", format!("{service} is running (no health check)"))
                        .await;
                }
                Readiness::Starting => still.push(service),
            }
        }
        waiting = still;
        if !waiting.is_empty() {
            tokio::time::sleep(POLL).await;
        }
    }
    Ok(())
}

/// Waits for the test service's container to exit; its exit code.
async fn wait_exit(docker: &Docker, project: &str, service: &str) -> Result<i64, Failure> {
    let Some(id) = container_of(docker, project, service).await else {
        return Err(failure(
            service,
            format!("test service {service:?} has no container"),
        ));
    };
    loop {
        let state = docker
            .inspect_container(&id, None::<InspectContainerOptions>)
            .await
            .map_err(|e| failure(service, gantry_docker::error_text(&e)))?
            .state
            .unwrap_or_default();
        if matches!(
            state.status,
            Some(ContainerStateStatusEnum::EXITED | ContainerStateStatusEnum::DEAD)
        ) {
            return Ok(state.exit_code.unwrap_or(-1));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Every container's output into the run's log, one step per service.
async fn collect_logs(docker: &Docker, project: &str, log: &LogSink) {
    let label = format!("{COMPOSE_PROJECT}={project}");
    let mut containers: Vec<(String, String)> = gantry_docker::labelled_containers(docker, &label)
        .await
        .into_iter()
        .filter_map(|c| {
            let service = c.labels.as_ref()?.get(COMPOSE_SERVICE)?.clone();
            Some((service, c.id?))
        })
        .collect();
    containers.sort();
    for (service, id) in containers {
        let mut output = docker.logs(
            &id,
            Some(LogsOptions {
                stdout: true,
                stderr: true,
                tail: LOG_TAIL.to_owned(),
                ..Default::default()
            }),
        );
        while let Some(Ok(chunk)) = output.next().await {
            match chunk {
                LogOutput::StdErr { message } => log.write(&service, "stderr", &message).await,
                LogOutput::StdOut { message } | LogOutput::Console { message } => {
                    log.write(&service, "stdout", &message).await
                }
                LogOutput::StdIn { .. } => {}
            }
        }
    }
}

/// Removes every container, network and volume of the run `build_id`, of
/// any attempt.
pub async fn teardown(docker: &Docker, build_id: Uuid) {
    let label = format!("{BUILD_LABEL}={build_id}");
    gantry_docker::remove_containers(docker, &label, None).await;
    gantry_docker::remove_containers(
        docker,
        &format!("{COMPOSE_PROJECT}={}", compose_project(build_id)),
        None,
    )
    .await;
    gantry_docker::remove_networks(docker, &label).await;
    gantry_docker::remove_volumes(docker, &label).await;
}

/// Tears down the runs whose networks or volumes are still in the engine
/// although this database says they ended (their builder was killed after
/// the verdict, or cleaning failed). Runs it does not know belong to
/// another Gantry and are left alone.
pub async fn sweep(docker: &Docker, pool: &sqlx::PgPool) {
    let mut ids = std::collections::BTreeSet::new();
    let filters =
        std::collections::HashMap::from([("label".to_owned(), vec![RUN_LABEL.to_owned()])]);
    let networks = docker
        .list_networks(Some(bollard::query_parameters::ListNetworksOptions {
            filters: Some(filters.clone()),
        }))
        .await
        .unwrap_or_default();
    ids.extend(
        networks
            .into_iter()
            .filter_map(|n| n.labels?.get(BUILD_LABEL)?.parse::<Uuid>().ok()),
    );
    let volumes = docker
        .list_volumes(Some(bollard::query_parameters::ListVolumesOptions {
            filters: Some(filters),
        }))
        .await
        .ok()
        .and_then(|r| r.volumes)
        .unwrap_or_default();
    ids.extend(
        volumes
            .into_iter()
            .filter_map(|v| v.labels.get(BUILD_LABEL)?.parse::<Uuid>().ok()),
    );
    if ids.is_empty() {
        return;
    }
    let ids: Vec<Uuid> = ids.into_iter().collect();
    let ended: Vec<Uuid> = match sqlx::query_scalar!(
        "SELECT id FROM builds WHERE id = ANY($1) AND state IN ('succeeded', 'failed', 'canceled', 'skipped')",
        &ids
    )
    .fetch_all(pool)
    .await
    {
        Ok(rows) => rows,
        Err(e) => {
            tracing::debug!(error = %e, "cannot sweep stack runs now");
            return;
        }
    };
    for id in ended {
        tracing::info!(build_id = %id, "removing what an ended stack run left");
        teardown(docker, id).await;
    }
}
