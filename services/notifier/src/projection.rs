//! The pipeline projection and what it says to the outside: every event
//! updates the pipeline's row (its state only moves forward, so events that
//! arrive out of order change nothing), and a state change queues commit
//! statuses and — only when something changed for the team — a chat message.

use gantry_config::GantryConfig;
use gantry_proto::v1::event::Payload;
use gantry_proto::v1::{Event, Revision};
use gantry_states::{DeploymentState, PipelineState, Stage};
use sqlx::{Postgres, Transaction};

use crate::outbound::{self, Chat, ChatEvent, Status, StatusState};

/// The revision every pipeline event carries.
pub fn revision(event: &Event) -> Option<&Revision> {
    match event.payload.as_ref()? {
        Payload::PipelineRequested(p) => p.revision.as_ref(),
        Payload::BuildStarted(p) => p.revision.as_ref(),
        Payload::BuildSucceeded(p) => p.revision.as_ref(),
        Payload::BuildFailed(p) => p.revision.as_ref(),
        Payload::BuildCanceled(p) => p.revision.as_ref(),
        Payload::BuildSkipped(p) => p.revision.as_ref(),
        Payload::ImagePublished(p) => p.revision.as_ref(),
        Payload::PublishFailed(p) => p.revision.as_ref(),
        Payload::DeployStarted(p) => p.deployment.as_ref()?.revision.as_ref(),
        Payload::DeploySucceeded(p) => p.deployment.as_ref()?.revision.as_ref(),
        Payload::DeployFailed(p) => p.deployment.as_ref()?.revision.as_ref(),
        Payload::DeployRolledBack(p) => p.deployment.as_ref()?.revision.as_ref(),
        Payload::DeployAwaitingApproval(p) => p.deployment.as_ref()?.revision.as_ref(),
        Payload::DeployApproved(p) => p.deployment.as_ref()?.revision.as_ref(),
        Payload::DeployRejected(p) => p.deployment.as_ref()?.revision.as_ref(),
        Payload::EnvironmentUnhealthy(p) => p.deployment.as_ref()?.revision.as_ref(),
        Payload::EnvironmentRecovered(p) => p.deployment.as_ref()?.revision.as_ref(),
        Payload::StackRunRequested(p) => p.run.as_ref()?.revision.as_ref(),
        Payload::StackRunStarted(p) => p.run.as_ref()?.revision.as_ref(),
        Payload::StackRunPassed(p) => p.run.as_ref()?.revision.as_ref(),
        Payload::StackRunFailed(p) => p.run.as_ref()?.revision.as_ref(),
        Payload::StackReleased(_)
        | Payload::StackDeployStarted(_)
        | Payload::StackDeploySucceeded(_)
        | Payload::StackDeployFailed(_)
        | Payload::StackDeployRolledBack(_) => None,
    }
}

/// Whether a stack run's event is about the pipeline it names (a push to
/// the stack repository), rather than a member's pipeline that is already
/// over.
fn is_stack_push(event: &Event, run: Option<&gantry_proto::v1::StackRun>) -> bool {
    run.is_some_and(|r| {
        r.triggers
            .iter()
            .any(|t| t.kind == "push" && t.pipeline_id == event.pipeline_id)
    })
}

/// What the pipeline row becomes after an event.
struct Change {
    state: Option<PipelineState>,
    stage: Option<Stage>,
    failure: Option<String>,
    failed_step: Option<String>,
    build_id: Option<String>,
    digest: Option<String>,
    description: String,
}

fn change(event: &Event) -> Change {
    let mut c = Change {
        state: None,
        stage: None,
        failure: None,
        failed_step: None,
        build_id: None,
        digest: None,
        description: String::new(),
    };
    match event.payload.as_ref() {
        Some(Payload::PipelineRequested(_)) => {
            c.state = Some(PipelineState::Pending);
            c.description = "Pipeline queued".into();
        }
        Some(Payload::BuildStarted(b)) => {
            c.state = Some(PipelineState::Running);
            c.stage = Some(Stage::Build);
            c.build_id = Some(b.build_id.clone());
            c.description = "Building and testing".into();
        }
        Some(Payload::BuildSucceeded(b)) => {
            c.state = Some(PipelineState::Running);
            c.stage = Some(Stage::Publish);
            c.build_id = Some(b.build_id.clone());
        }
        Some(Payload::BuildFailed(b)) => {
            c.state = Some(PipelineState::Failed);
            c.build_id = Some(b.build_id.clone());
            c.failed_step = Some(b.step.clone());
            c.failure = Some(b.reason.clone());
            c.description = format!("Failed at step {}", b.step);
        }
        Some(Payload::BuildSkipped(b)) => {
            c.state = Some(PipelineState::Skipped);
            c.build_id = Some(b.build_id.clone());
            c.failure = Some(b.reason.clone());
            c.description = format!("Skipped: {}", b.reason);
        }
        Some(Payload::BuildCanceled(b)) => {
            c.state = Some(PipelineState::Canceled);
            c.build_id = Some(b.build_id.clone());
            c.failure = Some(b.reason.clone());
            c.description = format!("Canceled: {}", b.reason);
        }
        Some(Payload::ImagePublished(i)) => {
            c.state = Some(PipelineState::Success);
            c.stage = Some(Stage::Publish);
            c.digest = Some(i.digest.clone());
            c.description = format!("Image published: {}", i.tags.join(", "));
        }
        Some(Payload::PublishFailed(f)) => {
            c.state = Some(PipelineState::Failed);
            c.stage = Some(Stage::Publish);
            c.failed_step = Some("publish".into());
            c.failure = Some(f.reason.clone());
            c.description = "Publishing the image failed".into();
        }
        Some(
            Payload::DeployStarted(_)
            | Payload::DeploySucceeded(_)
            | Payload::DeployFailed(_)
            | Payload::DeployRolledBack(_)
            | Payload::DeployAwaitingApproval(_)
            | Payload::DeployApproved(_)
            | Payload::DeployRejected(_),
        ) => c.stage = Some(Stage::Deploy),
        Some(Payload::StackRunStarted(r)) if is_stack_push(event, r.run.as_ref()) => {
            c.state = Some(PipelineState::Running);
            c.stage = Some(Stage::Build);
            c.build_id = Some(r.build_id.clone());
            c.description = "Running the stack's integration tests".into();
        }
        Some(Payload::StackRunPassed(r)) if is_stack_push(event, r.run.as_ref()) => {
            c.state = Some(PipelineState::Success);
            c.build_id = Some(r.build_id.clone());
            c.description = "Integration tests passed".into();
        }
        Some(Payload::StackRunFailed(r)) if is_stack_push(event, r.run.as_ref()) => {
            c.state = Some(PipelineState::Failed);
            c.build_id = Some(r.build_id.clone());
            c.failed_step = Some(r.step.clone());
            c.failure = Some(r.reason.clone());
            c.description = format!("Integration run failed at {}", r.step);
        }
        Some(
            Payload::StackRunRequested(_)
            | Payload::StackRunStarted(_)
            | Payload::StackRunPassed(_)
            | Payload::StackRunFailed(_)
            | Payload::StackReleased(_)
            | Payload::StackDeployStarted(_)
            | Payload::StackDeploySucceeded(_)
            | Payload::StackDeployFailed(_)
            | Payload::StackDeployRolledBack(_)
            // A version's health after its deployment: news, not the pipeline's state.
            | Payload::EnvironmentUnhealthy(_)
            | Payload::EnvironmentRecovered(_),
        )
        | None => {}
    }
    c
}

/// Applies `event` to the projection inside `tx`; queues the outbound calls it
/// causes. Returns whether anything was queued.
pub async fn apply(
    tx: &mut Transaction<'_, Postgres>,
    config: &GantryConfig,
    event: &Event,
) -> anyhow::Result<bool> {
    let rev = revision(event).cloned().unwrap_or_default();
    sqlx::query!(
        "INSERT INTO pipelines (pipeline_id, project, git_ref, branch, tag, commit_sha, author, forge_project)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
         ON CONFLICT (pipeline_id) DO NOTHING",
        event.pipeline_id,
        event.project,
        rev.git_ref,
        rev.branch,
        rev.tag,
        rev.commit_sha,
        rev.author_name,
        rev.forge_project,
    )
    .execute(&mut **tx)
    .await?;
    let old = sqlx::query!(
        r#"SELECT state AS "state: PipelineState", rank FROM pipelines WHERE pipeline_id = $1 FOR UPDATE"#,
        event.pipeline_id,
    )
    .fetch_one(&mut **tx)
    .await?;
    let (old_state, old_rank) = (old.state, old.rank);
    let c = change(event);
    let advanced = c.state.filter(|s| s.rank() > old_rank);
    sqlx::query!(
        "UPDATE pipelines SET
            state = COALESCE($2, state),
            rank = COALESCE($3, rank),
            stage = CASE WHEN $4::text IS NULL OR stage = $9 THEN stage ELSE $4 END,
            failure = COALESCE($5, failure),
            failed_step = COALESCE($6, failed_step),
            build_id = COALESCE($7, build_id),
            digest = COALESCE($8, digest),
            updated_at = clock_timestamp()
         WHERE pipeline_id = $1",
        event.pipeline_id,
        advanced as Option<PipelineState>,
        advanced.map(PipelineState::rank),
        c.stage as Option<Stage>,
        advanced.and(c.failure.clone()),
        advanced.and(c.failed_step.clone()),
        c.build_id.clone(),
        c.digest.clone(),
        Stage::Deploy as Stage,
    )
    .execute(&mut **tx)
    .await?;

    let links = outbound::Links::new(config, &event.pipeline_id);
    let mut queued = false;
    if let Some(state) = advanced {
        let status = Status {
            context: outbound::pipeline_context(&rev).into(),
            state: StatusState::from_pipeline(state),
            description: c.description.clone(),
            target_url: links.pipeline.clone(),
        };
        queued |= outbound::queue_status(tx, config, &event.project, &rev, &status).await?;
        queued |= outbound::queue_comment(tx, config, &event.pipeline_id, &rev, &status).await?;
        tracing::debug!(from = %old_state, to = %state, "pipeline state changed");
    }

    // Chat: only when the state of the project's ref changes; a merge
    // request's pipelines speak on the merge request (its comment), not to
    // the team's channels, which a fork's author could otherwise flood.
    let merge_request = rev.merge_request.is_some();
    let chat = match event.payload.as_ref() {
        Some(Payload::BuildFailed(_) | Payload::PublishFailed(_) | Payload::ImagePublished(_))
            if merge_request =>
        {
            None
        }
        Some(Payload::BuildFailed(_) | Payload::PublishFailed(_)) if advanced.is_some() => {
            if set_ref_state(tx, event, &rev, "red").await?.is_some() {
                Some(ChatEvent::Failed {
                    step: c.failed_step.clone().unwrap_or_default(),
                    reason: c.failure.clone().unwrap_or_default(),
                })
            } else {
                None
            }
        }
        Some(Payload::ImagePublished(_)) if advanced.is_some() => {
            (set_ref_state(tx, event, &rev, "green").await? == Some("red"))
                .then_some(ChatEvent::Recovered)
        }
        Some(
            Payload::DeployStarted(_)
            | Payload::DeploySucceeded(_)
            | Payload::DeployFailed(_)
            | Payload::DeployRolledBack(_)
            | Payload::DeployAwaitingApproval(_)
            | Payload::DeployApproved(_)
            | Payload::DeployRejected(_),
        ) => {
            let (status_queued, chat) = deployment_effects(tx, config, event, &rev, &links).await?;
            queued |= status_queued;
            chat
        }
        // The deployer tells each change once.
        Some(Payload::EnvironmentUnhealthy(u)) => Some(ChatEvent::Unhealthy {
            environment: u.deployment.clone().unwrap_or_default().environment,
            reason: u.reason.clone(),
        }),
        Some(Payload::EnvironmentRecovered(r)) => Some(ChatEvent::Healthy {
            environment: r.deployment.clone().unwrap_or_default().environment,
        }),
        _ => None,
    };
    if let Some(what) = chat {
        let message = Chat {
            project: event.project.clone(),
            pipeline_id: event.pipeline_id.clone(),
            revision: rev.clone(),
            links,
            what,
        };
        queued |= outbound::queue_chat(tx, config, &message).await?;
    }
    Ok(queued)
}

/// Records `version` (an image digest, or `stack-release:<n>`) as what runs
/// in `environment`; whether it differs from what was announced before
/// (a redeploy of the same version is not news for the team).
pub(crate) async fn announce_version(
    tx: &mut Transaction<'_, Postgres>,
    environment: &str,
    version: &str,
) -> sqlx::Result<bool> {
    let announced: Option<String> = sqlx::query_scalar!(
        "SELECT digest FROM environment_state WHERE environment = $1",
        environment,
    )
    .fetch_optional(&mut **tx)
    .await?;
    sqlx::query!(
        "INSERT INTO environment_state (environment, digest) VALUES ($1, $2)
                 ON CONFLICT (environment) DO UPDATE SET digest = EXCLUDED.digest, updated_at = now()",
        environment,
        version,
    )
    .execute(&mut **tx)
    .await?;
    Ok(announced.as_deref() != Some(version))
}

/// What a deploy event says: the deployment's commit status (unless a
/// rollback repeats a failure already told) and, when something changed for
/// the team, a chat message. Returns whether a status was queued, and the
/// message.
async fn deployment_effects(
    tx: &mut Transaction<'_, Postgres>,
    config: &GantryConfig,
    event: &Event,
    rev: &Revision,
    links: &outbound::Links,
) -> anyhow::Result<(bool, Option<ChatEvent>)> {
    let mut queued = false;
    let Some(step) = DeployStep::of(event) else {
        return Ok((queued, None));
    };
    let d = &step.deployment;
    // A rollback after deploy.failed was told says nothing more on the
    // forge; if it comes first, it tells the failure itself.
    let failure_told: bool = sqlx::query_scalar!(
        r#"SELECT EXISTS (SELECT 1 FROM pipeline_deployments
         WHERE pipeline_id = $1 AND environment = $2 AND deployment_id = $3 AND state = $4) AS "exists!""#,
        event.pipeline_id,
        d.environment,
        d.deployment_id,
        DeploymentState::Failed as DeploymentState,
    )
    .fetch_one(&mut **tx)
    .await?;
    if !deployment(tx, event, d, step.state, &step.reason).await? {
        return Ok((queued, None));
    }
    let (status, description) = step.status;
    if step.state != DeploymentState::RolledBack || !failure_told {
        let status = Status {
            context: format!("gantry/deploy/{}", d.environment),
            state: status,
            description: format!("{description} to {}", d.environment),
            target_url: links.pipeline.clone(),
        };
        queued |= outbound::queue_status(tx, config, &event.project, rev, &status).await?;
    }
    let chat = match event.payload.as_ref() {
        Some(Payload::DeploySucceeded(s)) => announce_version(tx, &d.environment, &d.digest)
            .await?
            .then(|| ChatEvent::Deployed {
                environment: d.environment.clone(),
                endpoint: s.endpoint.clone(),
            }),
        // With a previous version, deploy.rolled_back follows and speaks for both.
        Some(Payload::DeployFailed(_)) => {
            d.previous_digest
                .is_empty()
                .then(|| ChatEvent::DeployFailed {
                    environment: d.environment.clone(),
                    reason: step.reason.clone(),
                })
        }
        Some(Payload::DeployRolledBack(_)) => Some(ChatEvent::RolledBack {
            environment: d.environment.clone(),
            reason: step.reason.clone(),
            kept: d.previous_digest.clone(),
        }),
        // Once per deployment: the event is handled once, and a repeat
        // finds the state recorded (`deployment` said false above).
        Some(Payload::DeployAwaitingApproval(_)) => Some(ChatEvent::AwaitingApproval {
            environment: d.environment.clone(),
            digest: d.digest.clone(),
        }),
        _ => None,
    };
    Ok((queued, chat))
}

/// Records the state of the event's ref; returns the state it had before
/// when it changed (`Some("")` when it had none), `None` when unchanged.
async fn set_ref_state(
    tx: &mut Transaction<'_, Postgres>,
    event: &Event,
    rev: &Revision,
    state: &'static str,
) -> sqlx::Result<Option<&'static str>> {
    let before: Option<String> = sqlx::query_scalar!(
        "SELECT state FROM ref_state WHERE project = $1 AND git_ref = $2 FOR UPDATE",
        event.project,
        rev.git_ref,
    )
    .fetch_optional(&mut **tx)
    .await?;
    sqlx::query!(
        "INSERT INTO ref_state (project, git_ref, state, pipeline_id) VALUES ($1, $2, $3, $4)
         ON CONFLICT (project, git_ref) DO UPDATE SET state = EXCLUDED.state,
             pipeline_id = EXCLUDED.pipeline_id, updated_at = now()",
        event.project,
        rev.git_ref,
        state,
        event.pipeline_id,
    )
    .execute(&mut **tx)
    .await?;
    Ok(match before.as_deref() {
        Some(s) if s == state => None,
        Some("red") => Some("red"),
        Some(_) => Some("green"),
        None => Some(""),
    })
}

/// Records a deployment's state for its pipeline; false when the event is
/// older than what is recorded (events of one deployment may be handled out
/// of order), and then nothing is said about it.
async fn deployment(
    tx: &mut Transaction<'_, Postgres>,
    event: &Event,
    d: &gantry_proto::v1::Deployment,
    state: DeploymentState,
    reason: &str,
) -> sqlx::Result<bool> {
    let done = sqlx::query!(
        "INSERT INTO pipeline_deployments (pipeline_id, environment, deployment_id, state, digest, reason, rank)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (pipeline_id, environment) DO UPDATE SET deployment_id = EXCLUDED.deployment_id,
             state = EXCLUDED.state, digest = EXCLUDED.digest, reason = EXCLUDED.reason,
             rank = EXCLUDED.rank, updated_at = clock_timestamp()
         WHERE pipeline_deployments.deployment_id < EXCLUDED.deployment_id
            OR (pipeline_deployments.deployment_id = EXCLUDED.deployment_id
                AND EXCLUDED.rank > pipeline_deployments.rank)",
        event.pipeline_id,
        d.environment,
        d.deployment_id,
        state as DeploymentState,
        d.digest,
        reason,
        state.rank(),
    )
    .execute(&mut **tx)
    .await?;
    if done.rows_affected() == 0 {
        return Ok(false);
    }
    sqlx::query!(
        "UPDATE pipelines SET updated_at = clock_timestamp() WHERE pipeline_id = $1",
        event.pipeline_id,
    )
    .execute(&mut **tx)
    .await?;
    Ok(true)
}

/// What a deploy event means for the pipeline's deployment in its environment.
struct DeployStep {
    deployment: gantry_proto::v1::Deployment,
    state: DeploymentState,
    reason: String,
    /// The commit status of context `gantry/deploy/<environment>`.
    status: (StatusState, &'static str),
}

impl DeployStep {
    fn of(event: &Event) -> Option<Self> {
        let (deployment, state, reason, status) = match event.payload.as_ref()? {
            Payload::DeployStarted(p) => (
                &p.deployment,
                DeploymentState::Running,
                "",
                (StatusState::Running, "Deploying"),
            ),
            Payload::DeploySucceeded(p) => (
                &p.deployment,
                DeploymentState::Succeeded,
                "",
                (StatusState::Success, "Deployed"),
            ),
            Payload::DeployFailed(p) => (
                &p.deployment,
                DeploymentState::Failed,
                p.reason.as_str(),
                (StatusState::Failed, "Deployment failed"),
            ),
            Payload::DeployRolledBack(p) => (
                &p.deployment,
                DeploymentState::RolledBack,
                p.reason.as_str(),
                (StatusState::Failed, "Deployment failed"),
            ),
            Payload::DeployAwaitingApproval(p) => (
                &p.deployment,
                DeploymentState::AwaitingApproval,
                "",
                (StatusState::Pending, "Awaiting approval to deploy"),
            ),
            Payload::DeployApproved(p) => (
                &p.deployment,
                DeploymentState::Waiting,
                "",
                (StatusState::Pending, "Approved; queued"),
            ),
            Payload::DeployRejected(p) => (
                &p.deployment,
                DeploymentState::Rejected,
                p.reason.as_str(),
                (StatusState::Canceled, "Rejected"),
            ),
            _ => return None,
        };
        Some(Self {
            deployment: deployment.clone()?,
            state,
            reason: reason.to_owned(),
            status,
        })
    }
}
