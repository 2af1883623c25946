//! Outgoing calls: commit statuses on GitLab, GitHub and Gitea, the one
//! comment of each merge request's pipelines (created once, then edited),
//! and chat messages (Slack-compatible incoming webhooks, which Mattermost
//! and Rocket.Chat accept too, and a generic JSON webhook).
//!
//! Calls are rows of `outbound`, written with the projection change that
//! caused them; [`send_loop`] delivers them with retries and backoff, in order
//! per key (one commit status context, one chat channel), and never inside the
//! event consumer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use gantry_config::{ChatKind, GantryConfig};
use gantry_proto::v1::Revision;
use gantry_queue::{Claim, Queue};
use gantry_retry::Policy;
use gantry_states::PipelineState;
use reqwest::Method;
use serde_json::{Value, json};
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Timeout of one outgoing call (GitLab itself gives webhooks 10 s).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts before a call is given up (waiting as `Policy::Outbound` says:
/// about an hour and a half in all).
const MAX_ATTEMPTS: i32 = 15;
/// How long a claimed call is not picked again by another loop (longer
/// than a call may take).
const CLAIM: Duration = Duration::from_secs(60);
/// How often the table is looked at without a wake-up.
const POLL: Duration = Duration::from_secs(1);
/// Calls sent at once.
const BATCH: i64 = 32;

/// Links to a pipeline's pages (when `public_url` is configured).
#[derive(Debug, Clone, Default)]
pub struct Links {
    pub pipeline: Option<String>,
    pub log: Option<String>,
}

impl Links {
    pub fn new(config: &GantryConfig, pipeline_id: &str) -> Self {
        match &config.public_url {
            Some(base) => Self {
                pipeline: Some(format!("{base}/pipelines/{pipeline_id}")),
                log: Some(format!("{base}/pipelines/{pipeline_id}/log")),
            },
            None => Self::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusState {
    Pending,
    Running,
    Success,
    Failed,
    Canceled,
    Skipped,
}

impl StatusState {
    pub fn from_pipeline(state: PipelineState) -> Self {
        match state {
            PipelineState::Pending => Self::Pending,
            PipelineState::Running => Self::Running,
            PipelineState::Success => Self::Success,
            PipelineState::Failed => Self::Failed,
            PipelineState::Canceled => Self::Canceled,
            PipelineState::Skipped => Self::Skipped,
        }
    }

    fn gitlab(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Success => "success",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
            Self::Skipped => "skipped",
        }
    }

    /// GitHub (and Gitea) has no "running" (a running pipeline stays
    /// pending there), no "canceled" (a canceled one is an "error") and no
    /// "skipped" (a skipped one is a "success": nothing failed); the
    /// description says why.
    fn github(self) -> &'static str {
        match self {
            Self::Pending | Self::Running => "pending",
            Self::Success => "success",
            Self::Failed => "failure",
            Self::Canceled => "error",
            Self::Skipped => "success",
        }
    }
}

/// The status context of a pipeline: `gantry`, or `gantry/merge-request`
/// for a merge request's (whose head commit may also be built as a push to
/// its branch: the two statuses stay apart).
pub fn pipeline_context(rev: &Revision) -> &'static str {
    if rev.merge_request.is_some() {
        "gantry/merge-request"
    } else {
        "gantry"
    }
}

/// A commit status for one context.
#[derive(Debug, Clone)]
pub struct Status {
    pub context: String,
    pub state: StatusState,
    pub description: String,
    pub target_url: Option<String>,
}

async fn insert(
    tx: &mut Transaction<'_, Postgres>,
    key: &str,
    destination: &str,
    path: &str,
    body: &Value,
) -> sqlx::Result<()> {
    insert_call(tx, key, destination, path, None, body).await
}

async fn insert_call(
    tx: &mut Transaction<'_, Postgres>,
    key: &str,
    destination: &str,
    path: &str,
    edit_path: Option<&str>,
    body: &Value,
) -> sqlx::Result<()> {
    sqlx::query!(
        "INSERT INTO outbound (key, destination, path, edit_path, body) VALUES ($1, $2, $3, $4, $5)",
        key,
        destination,
        path,
        edit_path,
        body,
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// Whether a pipeline that came from `source` reports to `forge`: a push or
/// merge request reports only to the forge it came from (another forge may
/// never have seen the commit); a manual trigger or a stack's run, to every
/// forge the project is on.
fn reports_to(source: &str, forge: &str) -> bool {
    source == forge || !matches!(source, "gitlab" | "github" | "gitea")
}

/// Queues `status` on the forges the pipeline reports to (see
/// [`reports_to`]); returns whether any was queued.
pub async fn queue_status(
    tx: &mut Transaction<'_, Postgres>,
    config: &GantryConfig,
    project: &str,
    rev: &Revision,
    status: &Status,
) -> sqlx::Result<bool> {
    let Some(p) = config.project(project) else {
        return Ok(false);
    };
    if rev.commit_sha.is_empty() {
        return Ok(false);
    }
    let mut queued = false;
    let description: String = status.description.chars().take(140).collect();
    if let (Some(path), Some(_)) = (&p.gitlab, &config.gitlab)
        && reports_to(&rev.source, "gitlab")
    {
        // A merge request's commit may be on no branch of the project (a
        // fork's): GitLab then wants the merge request's ref.
        let git_ref = if rev.merge_request.is_some() {
            &rev.git_ref
        } else if rev.tag.is_empty() {
            &rev.branch
        } else {
            &rev.tag
        };
        let mut body = json!({
            "state": status.state.gitlab(),
            "name": status.context,
            "description": description,
        });
        if !git_ref.is_empty() {
            body["ref"] = json!(git_ref);
        }
        if let Some(url) = &status.target_url {
            body["target_url"] = json!(url);
        }
        let api = format!(
            "/api/v4/projects/{}/statuses/{}",
            gantry_config::git::percent_encode(path),
            rev.commit_sha
        );
        let key = format!("gitlab:{path}:{}:{}", rev.commit_sha, status.context);
        insert(tx, &key, "gitlab", &api, &body).await?;
        queued = true;
    }
    // Gitea's statuses API is GitHub's, under `/api/v1`.
    let hubs = [
        ("github", &p.github, &config.github, "/repos"),
        ("gitea", &p.gitea, &config.gitea, "/api/v1/repos"),
    ];
    for (forge, name, api, base) in hubs {
        let (Some(full_name), Some(_)) = (name, api) else {
            continue;
        };
        if !reports_to(&rev.source, forge) {
            continue;
        }
        let mut body = json!({
            "state": status.state.github(),
            "context": status.context,
            "description": description,
        });
        if let Some(url) = &status.target_url {
            body["target_url"] = json!(url);
        }
        let api = format!("{base}/{full_name}/statuses/{}", rev.commit_sha);
        let key = format!("{forge}:{full_name}:{}:{}", rev.commit_sha, status.context);
        insert(tx, &key, forge, &api, &body).await?;
        queued = true;
    }
    Ok(queued)
}

/// The text of a merge request's comment for its pipeline's `status`.
fn comment_text(rev: &Revision, status: &Status) -> String {
    let mark = match status.state {
        StatusState::Pending => ":hourglass: queued",
        StatusState::Running => ":arrows_counterclockwise: running",
        StatusState::Success => ":white_check_mark: passed",
        StatusState::Failed => ":x: failed",
        StatusState::Canceled => ":no_entry_sign: canceled",
        StatusState::Skipped => ":fast_forward: skipped",
    };
    let mut text = format!("**Gantry** pipeline of {}: {mark}", short(&rev.commit_sha));
    if !status.description.is_empty() {
        text.push_str(&format!(" — {}", code_span(&status.description)));
    }
    if let Some(url) = &status.target_url {
        text.push_str(&format!(" ([pipeline]({url}), [log]({url}/log))"));
    }
    text.push_str(
        "\n\n<sub>Gantry edits this comment as new commits of the merge request are built.</sub>",
    );
    text
}

/// `text` (which may come from a fork: a step name, a branch) as a
/// Markdown code span, where nothing mentions, links or references:
/// backticks and control characters replaced, cut to [`MAX_FIELD`]
/// characters.
fn code_span(text: &str) -> String {
    let inner: String = text
        .chars()
        .take(MAX_FIELD)
        .map(|c| match c {
            '`' => '\'',
            c if c.is_control() => ' ',
            c => c,
        })
        .collect();
    format!("`{}`", inner.trim())
}

/// Queues the edit of the merge request's comment (its creation the first
/// time) with the state of the pipeline `pipeline_id` of `rev`, unless a
/// newer pipeline of the merge request exists: its state is what the
/// comment shows. Returns whether a call was queued.
pub async fn queue_comment(
    tx: &mut Transaction<'_, Postgres>,
    config: &GantryConfig,
    pipeline_id: &str,
    rev: &Revision,
    status: &Status,
) -> sqlx::Result<bool> {
    let Some(mr) = &rev.merge_request else {
        return Ok(false);
    };
    let project = &rev.forge_project;
    let (create, edit) = match rev.source.as_str() {
        "gitlab" if config.gitlab.is_some() => {
            let base = format!(
                "/api/v4/projects/{}/merge_requests/{}/notes",
                gantry_config::git::percent_encode(project),
                mr.number
            );
            (base.clone(), format!("{base}/"))
        }
        "github" if config.github.is_some() => (
            format!("/repos/{project}/issues/{}/comments", mr.number),
            format!("/repos/{project}/issues/comments/"),
        ),
        "gitea" if config.gitea.is_some() => (
            format!("/api/v1/repos/{project}/issues/{}/comments", mr.number),
            format!("/api/v1/repos/{project}/issues/comments/"),
        ),
        _ => return Ok(false),
    };
    let key = format!("comment:{}:{project}:{}", rev.source, mr.number);
    // Pipeline ids are UUIDv7: in text order, the newest is the greatest.
    let latest = sqlx::query_scalar!(
        "INSERT INTO merge_request_comments (key, latest_pipeline) VALUES ($1, $2)
         ON CONFLICT (key) DO UPDATE
           SET latest_pipeline = GREATEST(merge_request_comments.latest_pipeline, EXCLUDED.latest_pipeline),
               updated_at = now()
         RETURNING latest_pipeline",
        key,
        pipeline_id,
    )
    .fetch_one(&mut **tx)
    .await?;
    if latest != pipeline_id {
        return Ok(false);
    }
    let body = json!({ "body": comment_text(rev, status) });
    insert_call(tx, &key, &rev.source, &create, Some(&edit), &body).await?;
    Ok(true)
}

/// Something the team hears about.
#[derive(Debug, Clone)]
pub enum ChatEvent {
    /// The ref was green (or new) and is now red.
    Failed { step: String, reason: String },
    /// The ref was red and is green again.
    Recovered,
    /// A new version runs in an environment.
    Deployed {
        environment: String,
        endpoint: String,
    },
    /// A deployment waits for someone's approval (`gantry approve ENV`).
    AwaitingApproval { environment: String, digest: String },
    /// What runs in an environment stopped being healthy after its deployment.
    Unhealthy { environment: String, reason: String },
    /// It is healthy again.
    Healthy { environment: String },
    /// A first deployment to an environment failed (nothing to go back to).
    DeployFailed { environment: String, reason: String },
    /// A deployment failed and the previous version kept running.
    RolledBack {
        environment: String,
        reason: String,
        kept: String,
    },
    /// A stack's run failed after a green one (or as its first): what came
    /// in (`project commit by author`) and where it failed.
    StackFailed {
        number: u64,
        step: String,
        reason: String,
        changes: Vec<String>,
    },
    /// A stack's run passed after a red one.
    StackRecovered { number: u64 },
    /// A new release of a stack runs in one of its environments.
    StackDeployed {
        environment: String,
        release: u64,
        endpoint: String,
    },
    /// A release failed in an environment, which went back to `kept`.
    StackRolledBack {
        environment: String,
        release: u64,
        kept: u64,
        reason: String,
    },
    /// A stack's first deployment to an environment failed.
    StackDeployFailed {
        environment: String,
        release: u64,
        reason: String,
    },
}

#[derive(Debug, Clone)]
pub struct Chat {
    pub project: String,
    pub pipeline_id: String,
    pub revision: Revision,
    pub links: Links,
    pub what: ChatEvent,
}

fn short(s: &str) -> &str {
    let s = s.strip_prefix("sha256:").unwrap_or(s);
    &s[..s.len().min(12)]
}

/// Longest text of one chat message, in characters.
pub const MAX_TEXT: usize = 2000;
/// Longest value taken from a push or a failure into a message.
const MAX_FIELD: usize = 300;

/// A value from outside (an author name, a ref, a failure reason) made safe
/// for a chat message: cut to [`MAX_FIELD`] characters, Slack's control
/// characters escaped (`<!channel>` pings nobody, `<url|label>` links
/// nothing), `@` mentions and Markdown links (`[label](url)`) broken
/// (Mattermost and Rocket.Chat ping on a plain `@channel` and link on
/// Markdown).
pub fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len().min(MAX_FIELD) + 8);
    let mut previous = ' ';
    for (i, c) in value.chars().enumerate() {
        if i == MAX_FIELD {
            out.push('…');
            break;
        }
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            // A word joiner after an `@` that starts a word keeps the text
            // readable but makes no mention (an e-mail address is kept).
            '@' if !previous.is_alphanumeric() => out.push_str("@\u{2060}"),
            // `[label](url)` is a link in Mattermost's and Rocket.Chat's Markdown.
            '(' if previous == ']' => out.push_str("\u{2060}("),
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
        previous = c;
    }
    out
}

/// A raw value of the generic webhook, cut to [`MAX_FIELD`] characters.
fn clip(value: &str) -> String {
    value.chars().take(MAX_FIELD).collect()
}

/// Cuts `text` to [`MAX_TEXT`] characters.
fn cap(text: String) -> String {
    if text.chars().count() <= MAX_TEXT {
        return text;
    }
    let mut cut: String = text.chars().take(MAX_TEXT - 1).collect();
    cut.push('…');
    cut
}

impl Chat {
    fn git_ref(&self) -> &str {
        let r = &self.revision;
        if !r.tag.is_empty() {
            &r.tag
        } else if !r.branch.is_empty() {
            &r.branch
        } else {
            &r.git_ref
        }
    }

    /// The commit's author, escaped for a message.
    fn author(&self) -> String {
        let r = &self.revision;
        match (r.author_name.is_empty(), r.author_email.is_empty()) {
            (false, false) => format!(
                "{} &lt;{}&gt;",
                escape(&r.author_name),
                escape(&r.author_email)
            ),
            (false, true) => escape(&r.author_name),
            (true, false) => escape(&r.author_email),
            (true, true) => "unknown author".into(),
        }
    }

    /// The event name of the generic webhook.
    fn kind(&self) -> &'static str {
        match self.what {
            ChatEvent::Failed { .. } => "pipeline.failed",
            ChatEvent::Recovered => "pipeline.recovered",
            ChatEvent::Deployed { .. } => "deploy.succeeded",
            ChatEvent::DeployFailed { .. } => "deploy.failed",
            ChatEvent::AwaitingApproval { .. } => "deploy.awaiting_approval",
            ChatEvent::Unhealthy { .. } => "environment.unhealthy",
            ChatEvent::Healthy { .. } => "environment.recovered",
            ChatEvent::RolledBack { .. } => "deploy.rolled_back",
            ChatEvent::StackFailed { .. } => "stack.failed",
            ChatEvent::StackRecovered { .. } => "stack.recovered",
            ChatEvent::StackDeployed { .. } => "stack.deployed",
            ChatEvent::StackRolledBack { .. } => "stack.rolled_back",
            ChatEvent::StackDeployFailed { .. } => "stack.deploy_failed",
        }
    }

    /// The message as one line of text (Slack markdown links), every value
    /// from outside escaped, at most [`MAX_TEXT`] characters.
    pub fn text(&self) -> String {
        cap(self.raw_text())
    }

    fn raw_text(&self) -> String {
        let at = format!(
            "{} `{}` at {}",
            escape(&self.project),
            escape(self.git_ref()),
            escape(short(&self.revision.commit_sha))
        );
        let link = |label: &str, url: &Option<String>| match url {
            Some(u) => format!(" <{u}|{label}>"),
            None => String::new(),
        };
        match &self.what {
            ChatEvent::Failed { step, reason } => format!(
                ":red_circle: {at} failed at step *{}* (commit by {}): {}.{}",
                escape(step),
                self.author(),
                escape(reason),
                link("log", &self.links.log)
            ),
            ChatEvent::Recovered => format!(
                ":large_green_circle: {at} is green again (commit by {}).{}",
                self.author(),
                link("pipeline", &self.links.pipeline)
            ),
            ChatEvent::Deployed {
                environment,
                endpoint,
            } => format!(
                ":rocket: {at} now runs in *{}*{}.{}",
                escape(environment),
                if endpoint.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", escape(endpoint))
                },
                link("pipeline", &self.links.pipeline)
            ),
            ChatEvent::AwaitingApproval {
                environment,
                digest,
            } => format!(
                ":raised_hand: {at} ({}) awaits approval to run in *{}*: `gantry approve {}` or `gantry reject {}`.{}",
                escape(short(digest)),
                escape(environment),
                escape(environment),
                escape(environment),
                link("pipeline", &self.links.pipeline)
            ),
            ChatEvent::Unhealthy {
                environment,
                reason,
            } => format!(
                ":warning: {at} in *{}* is unhealthy: {}.{}",
                escape(environment),
                escape(reason),
                link("pipeline", &self.links.pipeline)
            ),
            ChatEvent::Healthy { environment } => format!(
                ":white_check_mark: {at} in *{}* is healthy again.{}",
                escape(environment),
                link("pipeline", &self.links.pipeline)
            ),
            ChatEvent::DeployFailed {
                environment,
                reason,
            } => format!(
                ":red_circle: deploying {at} to *{}* failed: {}.{}",
                escape(environment),
                escape(reason),
                link("pipeline", &self.links.pipeline)
            ),
            ChatEvent::RolledBack {
                environment,
                reason,
                kept,
            } => format!(
                ":leftwards_arrow_with_hook: {at} was rolled back in *{}*: {}; {} keeps running.{}",
                escape(environment),
                escape(reason),
                escape(short(kept)),
                link("pipeline", &self.links.pipeline)
            ),
            ChatEvent::StackFailed {
                number,
                step,
                reason,
                changes,
            } => format!(
                ":red_circle: stack *{}* broke: run {number} failed at *{}*: {}. Came in: {}.{}",
                escape(&self.project),
                escape(step),
                escape(reason),
                changes
                    .iter()
                    .map(|c| escape(c))
                    .collect::<Vec<_>>()
                    .join(", "),
                link("pipeline", &self.links.pipeline)
            ),
            ChatEvent::StackRecovered { number } => format!(
                ":large_green_circle: stack *{}* is green again: run {number} passed.{}",
                escape(&self.project),
                link("pipeline", &self.links.pipeline)
            ),
            ChatEvent::StackDeployed {
                environment,
                release,
                endpoint,
            } => format!(
                ":rocket: release {release} of stack *{}* now runs in *{}*{}.",
                escape(&self.project),
                escape(environment),
                if endpoint.is_empty() {
                    String::new()
                } else {
                    format!(" ({})", escape(endpoint))
                },
            ),
            ChatEvent::StackRolledBack {
                environment,
                release,
                kept,
                reason,
            } => format!(
                ":leftwards_arrow_with_hook: release {release} of stack *{}* was rolled back in *{}*: {}; release {kept} keeps running.",
                escape(&self.project),
                escape(environment),
                escape(reason),
            ),
            ChatEvent::StackDeployFailed {
                environment,
                release,
                reason,
            } => format!(
                ":red_circle: deploying release {release} of stack *{}* to *{}* failed: {}.",
                escape(&self.project),
                escape(environment),
                escape(reason),
            ),
        }
    }

    /// The body for a channel of `kind`.
    pub fn body(&self, kind: ChatKind) -> Value {
        match kind {
            ChatKind::Slack => json!({ "text": self.text() }),
            ChatKind::Webhook => {
                let mut body = json!({
                    "event": self.kind(),
                    "project": self.project,
                    "pipeline_id": self.pipeline_id,
                    "ref": self.git_ref(),
                    "commit": self.revision.commit_sha,
                    "author": clip(&self.revision.author_name),
                    "author_email": clip(&self.revision.author_email),
                    "text": self.text(),
                    "url": self.links.pipeline,
                });
                match &self.what {
                    ChatEvent::Failed { step, reason } => {
                        body["step"] = json!(clip(step));
                        body["reason"] = json!(clip(reason));
                        body["log_url"] = json!(self.links.log);
                    }
                    ChatEvent::Deployed {
                        environment,
                        endpoint,
                    } => {
                        body["environment"] = json!(environment);
                        body["endpoint"] = json!(endpoint);
                    }
                    ChatEvent::AwaitingApproval {
                        environment,
                        digest,
                    } => {
                        body["environment"] = json!(environment);
                        body["digest"] = json!(digest);
                    }
                    ChatEvent::Healthy { environment } => {
                        body["environment"] = json!(environment);
                    }
                    ChatEvent::DeployFailed {
                        environment,
                        reason,
                    }
                    | ChatEvent::Unhealthy {
                        environment,
                        reason,
                    }
                    | ChatEvent::RolledBack {
                        environment,
                        reason,
                        ..
                    } => {
                        body["environment"] = json!(environment);
                        body["reason"] = json!(clip(reason));
                    }
                    ChatEvent::StackFailed {
                        number,
                        step,
                        reason,
                        changes,
                    } => {
                        body["run"] = json!(number);
                        body["step"] = json!(clip(step));
                        body["reason"] = json!(clip(reason));
                        body["changes"] =
                            json!(changes.iter().map(|c| clip(c)).collect::<Vec<_>>());
                    }
                    ChatEvent::StackRecovered { number } => body["run"] = json!(number),
                    ChatEvent::StackDeployed {
                        environment,
                        release,
                        endpoint,
                    } => {
                        body["environment"] = json!(environment);
                        body["release"] = json!(release);
                        body["endpoint"] = json!(endpoint);
                    }
                    ChatEvent::StackRolledBack {
                        environment,
                        release,
                        kept,
                        reason,
                    } => {
                        body["environment"] = json!(environment);
                        body["release"] = json!(release);
                        body["kept"] = json!(kept);
                        body["reason"] = json!(clip(reason));
                    }
                    ChatEvent::StackDeployFailed {
                        environment,
                        release,
                        reason,
                    } => {
                        body["environment"] = json!(environment);
                        body["release"] = json!(release);
                        body["reason"] = json!(clip(reason));
                    }
                    ChatEvent::Recovered => {}
                }
                body
            }
        }
    }
}

/// Queues `message` for every channel that follows its project.
pub async fn queue_chat(
    tx: &mut Transaction<'_, Postgres>,
    config: &GantryConfig,
    message: &Chat,
) -> sqlx::Result<bool> {
    let mut queued = false;
    for channel in config.chat.iter().filter(|c| c.wants(&message.project)) {
        let destination = format!("chat:{}", channel.name);
        insert(
            tx,
            &destination,
            &destination,
            "",
            &message.body(channel.kind),
        )
        .await?;
        queued = true;
    }
    Ok(queued)
}

struct Call {
    key: String,
    destination: String,
    path: String,
    /// Of a comment's call: where it is edited once created.
    edit_path: Option<String>,
    body: Value,
    /// This try's number (1 for the first).
    attempt: i32,
    claim: Claim<i64>,
}

/// The outgoing calls, a leased queue (`gantry-queue`): a call is ready
/// once its retry time has come and every earlier call with its key (status
/// context, channel) is sent or given up, so each key's calls go in order.
pub const OUTBOUND: Queue = Queue {
    table: "outbound",
    waiting: "waiting",
    running: "running",
    ready: "q.next_at <= now() AND NOT EXISTS (SELECT 1 FROM outbound e
                WHERE e.key = q.key AND e.id < q.id AND e.state IN ('waiting', 'running'))",
    order: "q.id",
    on_claim: "",
};

/// Claims up to [`BATCH`] calls for `owner`.
async fn claim(pool: &PgPool, owner: &str) -> anyhow::Result<Vec<Call>> {
    let mut tx = pool.begin().await?;
    let claims: Vec<Claim<i64>> = OUTBOUND.claim_many(&mut tx, owner, CLAIM, BATCH).await?;
    tx.commit().await?;
    if claims.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = claims.iter().map(|c| c.id).collect();
    let mut rows: HashMap<i64, _> = sqlx::query!(
        "SELECT id, key, destination, path, edit_path, body FROM outbound WHERE id = ANY($1)",
        &ids[..],
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|r| (r.id, r))
    .collect();
    Ok(claims
        .into_iter()
        .filter_map(|claim| {
            let row = rows.remove(&claim.id)?;
            Some(Call {
                key: row.key,
                destination: row.destination,
                path: row.path,
                edit_path: row.edit_path,
                body: row.body,
                attempt: claim.attempt,
                claim,
            })
        })
        .collect())
}

/// Sends queued calls until `shutdown`.
pub async fn send_loop(
    pool: PgPool,
    config: Arc<GantryConfig>,
    wake: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let owner = format!("notifier-{}", uuid::Uuid::new_v4().simple());
    let client = match reqwest::Client::builder()
        .timeout(CALL_TIMEOUT)
        .user_agent(concat!("gantry-notifier/", env!("CARGO_PKG_VERSION")))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the HTTP client: nothing will be sent");
            return;
        }
    };
    while !shutdown.is_cancelled() {
        let calls = match claim(&pool, &owner).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = format!("{e:#}"), "cannot read outgoing calls");
                Vec::new()
            }
        };
        let busy = !calls.is_empty();
        futures::future::join_all(
            calls
                .into_iter()
                .map(|call| deliver(&pool, &client, &config, call)),
        )
        .await;
        if busy {
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = wake.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

async fn deliver(pool: &PgPool, client: &reqwest::Client, config: &GantryConfig, call: Call) {
    let result = match &call.edit_path {
        Some(edit_path) => send_comment(pool, client, config, &call, edit_path).await,
        None => send(
            client,
            config,
            &call.destination,
            Method::POST,
            &call.path,
            &call.body,
        )
        .await
        .map(drop),
    };
    let c = &call.claim;
    // The kind of receiver (`gitlab`, `chat`…), not which one.
    let destination = call
        .destination
        .split(':')
        .next()
        .unwrap_or_default()
        .to_owned();
    let update = match &result {
        Ok(()) => {
            metrics::counter!("gantry_outbound_calls_total", "destination" => destination, "result" => "sent")
                .increment(1);
            let sql = format!(
                "UPDATE outbound SET state = 'sent', sent_at = now(), owner = NULL,
                        lease_until = NULL
                 WHERE {}",
                OUTBOUND.held()
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(c.id)
                .bind(&c.owner)
                .bind(c.attempt)
                .execute(pool)
                .await
        }
        Err(e) => {
            let attempt = call.attempt;
            let next = Policy::Outbound(MAX_ATTEMPTS as u32).delay_of_attempt(attempt as u32);
            let gave_up = next.is_none() || e.permanent;
            let pause = next.unwrap_or_default().as_secs_f64();
            metrics::counter!(
                "gantry_outbound_calls_total",
                "destination" => destination,
                "result" => if gave_up { "gave_up" } else { "failed" }
            )
            .increment(1);
            if gave_up {
                tracing::error!(destination = call.destination, path = call.path, error = %e, attempt, "outgoing call given up");
            } else {
                tracing::warn!(destination = call.destination, path = call.path, error = %e, attempt, "outgoing call failed; will retry");
            }
            let sql = format!(
                "UPDATE outbound SET state = CASE WHEN $5 THEN 'gave_up' ELSE 'waiting' END,
                        gave_up = $5, last_error = $4, owner = NULL, lease_until = NULL,
                        next_at = now() + make_interval(secs => $6)
                 WHERE {}",
                OUTBOUND.held()
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(c.id)
                .bind(&c.owner)
                .bind(c.attempt)
                .bind(e.to_string())
                .bind(gave_up)
                .bind(pause)
                .execute(pool)
                .await
        }
    };
    if let Err(e) = update {
        // The claim runs out and the call is sent again: at-least-once.
        tracing::warn!(error = %e, "cannot record an outgoing call");
    }
}

/// The base URL and token of a configured forge.
fn forge<'a>(
    forge: Option<&'a gantry_config::Forge>,
    name: &str,
) -> Result<(&'a str, &'a str), CallError> {
    let forge = forge.ok_or_else(|| permanent(format!("forges.{name} is no longer configured")))?;
    let token = forge
        .token
        .as_ref()
        .ok_or_else(|| permanent(format!("forges.{name}.token is not resolved")))?;
    Ok((&forge.url, token.expose()))
}

/// Why a call failed, and whether trying again can help.
#[derive(Debug)]
struct CallError {
    message: String,
    /// The receiver refused the call itself (a 4xx other than 408/429), or it
    /// cannot be made any more: sending it again would fail the same way.
    permanent: bool,
    /// The receiver answered 404 (a comment someone deleted).
    not_found: bool,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

fn permanent(message: String) -> CallError {
    CallError {
        message,
        permanent: true,
        not_found: false,
    }
}

fn transient(message: String) -> CallError {
    CallError {
        message,
        permanent: false,
        not_found: false,
    }
}

/// Sends a merge request's comment: edits the one created before or, when
/// there is none yet (or someone deleted it), creates it and records its
/// id. The calls of one merge request go in order (their key), so two
/// creations never race.
async fn send_comment(
    pool: &PgPool,
    client: &reqwest::Client,
    config: &GantryConfig,
    call: &Call,
    edit_path: &str,
) -> Result<(), CallError> {
    let known = sqlx::query_scalar!(
        "SELECT comment_id FROM merge_request_comments WHERE key = $1",
        call.key,
    )
    .fetch_optional(pool)
    .await
    .map_err(|e| transient(format!("cannot read the comment's id: {e}")))?
    .flatten();
    if let Some(id) = known {
        // GitLab edits a note with PUT, GitHub and Gitea a comment with PATCH.
        let method = if call.destination == "gitlab" {
            Method::PUT
        } else {
            Method::PATCH
        };
        let path = format!("{edit_path}{id}");
        match send(client, config, &call.destination, method, &path, &call.body).await {
            Ok(_) => return Ok(()),
            Err(e) if e.not_found => {
                tracing::info!(
                    key = call.key,
                    "the merge request's comment is gone; creating it again"
                );
            }
            Err(e) => return Err(e),
        }
    }
    let created = send(
        client,
        config,
        &call.destination,
        Method::POST,
        &call.path,
        &call.body,
    )
    .await?;
    let Some(id) = created.get("id").and_then(Value::as_i64) else {
        return Err(permanent(
            "the forge created the comment without saying its id".into(),
        ));
    };
    if let Err(e) = sqlx::query!(
        "UPDATE merge_request_comments SET comment_id = $2, updated_at = now() WHERE key = $1",
        call.key,
        id,
    )
    .execute(pool)
    .await
    {
        // Sending it again would make a second comment: the next change
        // creates a new one instead.
        tracing::warn!(key = call.key, error = %e, "cannot record the comment's id");
    }
    Ok(())
}

/// Sends one call to `destination` (a forge, or `chat:<channel>`); returns
/// the JSON the receiver answered (`null` when it is not JSON).
async fn send(
    client: &reqwest::Client,
    config: &GantryConfig,
    destination: &str,
    method: Method,
    path: &str,
    body: &Value,
) -> Result<Value, CallError> {
    let request = match destination {
        "gitlab" => {
            let (url, token) = forge(config.gitlab.as_ref(), "gitlab")?;
            client
                .request(method, format!("{url}{path}"))
                .header("PRIVATE-TOKEN", token)
        }
        "github" => {
            let (url, token) = forge(config.github.as_ref(), "github")?;
            client
                .request(method, format!("{url}{path}"))
                .bearer_auth(token)
                .header("Accept", "application/vnd.github+json")
                .header("X-GitHub-Api-Version", "2022-11-28")
        }
        "gitea" => {
            let (url, token) = forge(config.gitea.as_ref(), "gitea")?;
            client
                .request(method, format!("{url}{path}"))
                .header("Authorization", format!("token {token}"))
        }
        other => {
            let name = other.strip_prefix("chat:").unwrap_or(other);
            let url = config
                .chat
                .iter()
                .find(|c| c.name == name)
                .and_then(|c| c.url.as_ref())
                .ok_or_else(|| {
                    permanent(format!("chat channel {name:?} is no longer configured"))
                })?;
            client.post(url.expose())
        }
    };
    // A chat URL is a credential: errors are recorded and logged without it.
    let response = request
        .json(body)
        .send()
        .await
        .map_err(|e| transient(e.without_url().to_string()))?;
    let status = response.status();
    if status.is_success() {
        let bytes = response.bytes().await.unwrap_or_default();
        return Ok(serde_json::from_slice(&bytes).unwrap_or(Value::Null));
    }
    let text: String = response
        .text()
        .await
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect();
    Err(CallError {
        message: format!("answered {status}: {text}"),
        permanent: status.is_client_error()
            && status != reqwest::StatusCode::REQUEST_TIMEOUT
            && status != reqwest::StatusCode::TOO_MANY_REQUESTS,
        not_found: status == reqwest::StatusCode::NOT_FOUND,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comment_text_neither_mentions_nor_links() {
        let rev = Revision {
            commit_sha: "0123456789abcdef0123".into(),
            ..Default::default()
        };
        let status = Status {
            context: "gantry/merge-request".into(),
            state: StatusState::Failed,
            description: "Failed at step @all `x` [here](http://evil) #1\n/close".into(),
            target_url: None,
        };
        let text = comment_text(&rev, &status);
        assert!(
            text.contains("`Failed at step @all 'x' [here](http://evil) #1 /close`"),
            "{text}"
        );
        assert_eq!(text.matches('`').count(), 2, "{text}");
    }

    #[test]
    fn gitlab_project_ids_are_encoded() {
        // GitLab accepts `group%2Fproject` as `:id`.
        assert_eq!(
            gantry_config::git::percent_encode("team/hello-world"),
            "team%2Fhello-world"
        );
    }

    #[test]
    fn failure_message_names_author_step_and_log() {
        let chat = Chat {
            project: "hello".into(),
            pipeline_id: "p1".into(),
            revision: Revision {
                commit_sha: "0123456789abcdef".into(),
                branch: "main".into(),
                author_name: "Ada".into(),
                author_email: "ada@example.com".into(),
                ..Default::default()
            },
            links: Links {
                pipeline: Some("http://g/pipelines/p1".into()),
                log: Some("http://g/pipelines/p1/log".into()),
            },
            what: ChatEvent::Failed {
                step: "smoke".into(),
                reason: "exit code 3".into(),
            },
        };
        let text = chat.text();
        for needle in [
            "Ada &lt;ada@example.com&gt;",
            "*smoke*",
            "http://g/pipelines/p1/log",
            "0123456789ab",
        ] {
            assert!(text.contains(needle), "{text} lacks {needle}");
        }
        let body = chat.body(ChatKind::Webhook);
        assert_eq!(body["event"], "pipeline.failed");
        assert_eq!(body["author_email"], "ada@example.com");
        assert_eq!(body["step"], "smoke");
        assert_eq!(body["log_url"], "http://g/pipelines/p1/log");
    }

    #[test]
    fn outside_values_cannot_ping_link_or_flood() {
        let chat = Chat {
            project: "hello".into(),
            pipeline_id: "p1".into(),
            revision: Revision {
                commit_sha: "0123456789abcdef".into(),
                branch: "<!here>".into(),
                author_name: "<!channel> @all".into(),
                ..Default::default()
            },
            links: Links::default(),
            what: ChatEvent::Failed {
                step: "<http://evil.example|click> [here](http://evil.example)".into(),
                reason: "x".repeat(10_000),
            },
        };
        let text = chat.text();
        for bad in ["<!channel>", "<!here>", "<http://evil", "@all", "](http"] {
            assert!(!text.contains(bad), "{bad} in {text}");
        }
        assert!(text.contains("&lt;!channel&gt;"), "{text}");
        assert!(text.chars().count() <= MAX_TEXT, "{}", text.len());
        let body = chat.body(ChatKind::Webhook);
        assert!(body["reason"].as_str().map_or(0, |r| r.chars().count()) <= 300);
    }
}
