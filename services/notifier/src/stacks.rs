//! What a stack's integration run says to the outside: the commit status
//! `gantry/stack/<stack>` on every commit that triggered the run (a member's
//! release, so a service's author sees that their change broke the stack,
//! or a push to the stack repository) and on the stack commit that ran; and
//! chat only when the stack changes colour — its first red run, naming the
//! members and commits that came in, and its recovery.
//!
//! A run that answers several pushes of the stack repository ends each of
//! their pipelines ([`per_pipeline`]).

use gantry_config::GantryConfig;
use gantry_proto::v1::event::Payload;
use gantry_proto::v1::{Event, Revision, StackRun, StackTrigger};
use sqlx::{Postgres, Transaction};

use crate::outbound::{self, Chat, ChatEvent, Links, Status, StatusState};

/// The run a stack event is about, if it is a run event.
fn run_of(event: &Event) -> Option<&StackRun> {
    match event.payload.as_ref()? {
        Payload::StackRunRequested(r) => r.run.as_ref(),
        Payload::StackRunStarted(r) => r.run.as_ref(),
        Payload::StackRunPassed(r) => r.run.as_ref(),
        Payload::StackRunFailed(r) => r.run.as_ref(),
        _ => None,
    }
}

/// The event as seen by each pipeline it concerns: itself, and for a run
/// that answers several pushes of the stack repository, one copy for each
/// other push's pipeline, with that push's commit.
pub fn per_pipeline(event: &Event) -> Vec<Event> {
    let mut all = vec![event.clone()];
    let Some(run) = run_of(event) else {
        return all;
    };
    for t in run
        .triggers
        .iter()
        .filter(|t| t.kind == "push" && t.pipeline_id != event.pipeline_id)
    {
        let mut copy = event.clone();
        copy.pipeline_id = t.pipeline_id.clone();
        let run = match copy.payload.as_mut() {
            Some(Payload::StackRunStarted(r)) => r.run.as_mut(),
            Some(Payload::StackRunPassed(r)) => r.run.as_mut(),
            Some(Payload::StackRunFailed(r)) => r.run.as_mut(),
            _ => None,
        };
        let Some(run) = run else {
            continue;
        };
        if let Some(rev) = run.revision.as_mut() {
            rev.commit_sha = t.commit_sha.clone();
            rev.git_ref = t.git_ref.clone();
        }
        all.push(copy);
    }
    all
}

/// The revision of a trigger's commit, as statuses need it.
fn revision_of(t: &StackTrigger) -> Revision {
    let (branch, tag) = match (
        t.git_ref.strip_prefix("refs/heads/"),
        t.git_ref.strip_prefix("refs/tags/"),
    ) {
        (Some(b), _) => (b.to_owned(), String::new()),
        (_, Some(tag)) => (String::new(), tag.to_owned()),
        _ => (String::new(), String::new()),
    };
    Revision {
        commit_sha: t.commit_sha.clone(),
        git_ref: t.git_ref.clone(),
        branch,
        tag,
        author_name: t.author.clone(),
        ..Default::default()
    }
}

/// Chat of a stack deploy event: a new release running in an environment
/// (once per release), a rollback (always), a first deployment that failed.
async fn deploy_effects(
    tx: &mut Transaction<'_, Postgres>,
    config: &GantryConfig,
    event: &Event,
) -> anyhow::Result<bool> {
    let (d, what) = match event.payload.as_ref() {
        Some(Payload::StackDeploySucceeded(s)) => {
            let Some(d) = s.deployment.as_ref() else {
                return Ok(false);
            };
            let current = format!("stack-release:{}", d.release);
            if !crate::projection::announce_version(tx, &d.environment, &current).await? {
                return Ok(false);
            }
            (
                d,
                ChatEvent::StackDeployed {
                    environment: d.environment.clone(),
                    release: d.release,
                    endpoint: s.endpoint.clone(),
                },
            )
        }
        Some(Payload::StackDeployRolledBack(r)) => {
            let Some(d) = r.deployment.as_ref() else {
                return Ok(false);
            };
            (
                d,
                ChatEvent::StackRolledBack {
                    environment: d.environment.clone(),
                    release: d.release,
                    kept: d.previous_release,
                    reason: r.reason.clone(),
                },
            )
        }
        Some(Payload::StackDeployFailed(f)) => {
            let Some(d) = f.deployment.as_ref().filter(|d| d.previous_release == 0) else {
                return Ok(false);
            };
            (
                d,
                ChatEvent::StackDeployFailed {
                    environment: d.environment.clone(),
                    release: d.release,
                    reason: f.reason.clone(),
                },
            )
        }
        _ => return Ok(false),
    };
    let message = Chat {
        project: d.stack.clone(),
        pipeline_id: event.pipeline_id.clone(),
        revision: Revision {
            commit_sha: d.stack_commit.clone(),
            ..Default::default()
        },
        links: Links::new(config, &event.pipeline_id),
        what,
    };
    Ok(outbound::queue_chat(tx, config, &message).await?)
}

/// Statuses and chat of a stack event. Returns whether anything was queued.
pub async fn effects(
    tx: &mut Transaction<'_, Postgres>,
    config: &GantryConfig,
    event: &Event,
) -> anyhow::Result<bool> {
    if matches!(
        event.payload,
        Some(
            Payload::StackDeploySucceeded(_)
                | Payload::StackDeployRolledBack(_)
                | Payload::StackDeployFailed(_)
        )
    ) {
        return deploy_effects(tx, config, event).await;
    }
    let (run, stack_commit, status, chat) = match event.payload.as_ref() {
        Some(Payload::StackRunStarted(r)) => (
            r.run.as_ref(),
            String::new(),
            (StatusState::Running, "Integration run started".to_owned()),
            None,
        ),
        Some(Payload::StackRunPassed(r)) => (
            r.run.as_ref(),
            r.stack_commit.clone(),
            (StatusState::Success, "Integration tests passed".to_owned()),
            Some(None),
        ),
        Some(Payload::StackRunFailed(r)) => (
            r.run.as_ref(),
            r.stack_commit.clone(),
            (
                StatusState::Failed,
                format!("Integration run failed at {}: {}", r.step, r.reason),
            ),
            Some(Some((r.step.clone(), r.reason.clone()))),
        ),
        _ => return Ok(false),
    };
    let Some(run) = run else {
        return Ok(false);
    };
    let links = Links::new(config, &event.pipeline_id);
    let status = Status {
        context: format!("gantry/stack/{}", run.stack),
        state: status.0,
        description: format!("run {}: {}", run.number, status.1),
        target_url: links.pipeline.clone(),
    };
    let mut queued = false;
    let mut told = Vec::new();
    for t in &run.triggers {
        told.push(t.commit_sha.clone());
        queued |= outbound::queue_status(tx, config, &t.project, &revision_of(t), &status).await?;
    }
    let mut stack_rev = run.revision.clone().unwrap_or_default();
    if !stack_commit.is_empty() && !told.contains(&stack_commit) {
        stack_rev.commit_sha = stack_commit;
        queued |= outbound::queue_status(tx, config, &run.stack, &stack_rev, &status).await?;
    }
    let Some(failure) = chat else {
        return Ok(queued);
    };
    let colour = if failure.is_some() { "red" } else { "green" };
    let before: Option<String> = sqlx::query_scalar!(
        "SELECT state FROM ref_state WHERE project = $1 AND git_ref = $2 FOR UPDATE",
        run.stack,
        stack_rev.git_ref,
    )
    .fetch_optional(&mut **tx)
    .await?;
    sqlx::query!(
        "INSERT INTO ref_state (project, git_ref, state, pipeline_id) VALUES ($1, $2, $3, $4)
         ON CONFLICT (project, git_ref) DO UPDATE SET state = EXCLUDED.state,
             pipeline_id = EXCLUDED.pipeline_id, updated_at = now()",
        run.stack,
        stack_rev.git_ref,
        colour,
        event.pipeline_id,
    )
    .execute(&mut **tx)
    .await?;
    let what = match (failure, before.as_deref()) {
        (Some((step, reason)), Some("green") | None) => ChatEvent::StackFailed {
            number: run.number,
            step,
            reason,
            changes: run
                .triggers
                .iter()
                .map(|t| {
                    let by = if t.author.is_empty() {
                        String::new()
                    } else {
                        format!(" by {}", t.author)
                    };
                    format!(
                        "{} {}{by}",
                        t.project,
                        t.commit_sha.chars().take(12).collect::<String>()
                    )
                })
                .collect(),
        },
        (None, Some("red")) => ChatEvent::StackRecovered { number: run.number },
        _ => return Ok(queued),
    };
    let message = Chat {
        project: run.stack.clone(),
        pipeline_id: event.pipeline_id.clone(),
        revision: stack_rev,
        links,
        what,
    };
    queued |= outbound::queue_chat(tx, config, &message).await?;
    Ok(queued)
}
