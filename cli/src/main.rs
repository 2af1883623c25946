//! `gantry`: the command line of Gantry. It talks gRPC to the services —
//! the notifier for pipelines, the builder for logs, webhook-ingest for
//! triggers, the deployer for environments and stacks — and prints for humans, or JSON
//! with `--json`. Every call carries the bearer token of `--token` /
//! `GANTRY_TOKEN`; `https://` URLs use TLS (`--ca-cert` for a private CA).
//! `gantry token new` and `gantry token hash` make tokens and the hashes the
//! configuration holds.

use std::io::Write as _;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use gantry_proto::client::{Authed, Bearer};
use gantry_proto::v1::builds_client::BuildsClient;
use gantry_proto::v1::deployments_client::DeploymentsClient;
use gantry_proto::v1::ingest_client::IngestClient;
use gantry_proto::v1::pipelines_client::PipelinesClient;
use gantry_proto::v1::{
    ApproveRequest, CancelRequest, DeployRequest, DeploymentInfo, EnvironmentInfo,
    ListEnvironmentsRequest, ListPipelinesRequest, PipelineSummary, RejectRequest, RollbackRequest,
    StreamLogsRequest, TriggerRequest, WatchPipelinesRequest,
};
use gantry_states::{DeploymentState, PipelineState};
use serde_json::{Value, json};

/// How long a finished pipeline is still watched for deployments that follow it.
const SETTLE: Duration = Duration::from_secs(3);

mod config;
mod demo;
mod lint;
mod secrets;
mod stacks;

#[derive(Parser, Debug)]
#[command(name = "gantry", version, about = "Gantry from the command line")]
pub(crate) struct Cli {
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    json: bool,
    /// gRPC URL of the notifier (pipelines).
    #[arg(
        long,
        global = true,
        env = "GANTRY_NOTIFIER_URL",
        default_value = "http://127.0.0.1:9094"
    )]
    notifier: String,
    /// gRPC URL of the builder (logs).
    #[arg(
        long,
        global = true,
        env = "GANTRY_BUILDER_URL",
        default_value = "http://127.0.0.1:9091"
    )]
    builder: String,
    /// gRPC URL of webhook-ingest (triggers).
    #[arg(
        long,
        global = true,
        env = "GANTRY_INGEST_URL",
        default_value = "http://127.0.0.1:9090"
    )]
    ingest: String,
    /// gRPC URL of the deployer (environments).
    #[arg(
        long,
        global = true,
        env = "GANTRY_DEPLOYER_URL",
        default_value = "http://127.0.0.1:9093"
    )]
    deployer: String,
    /// API token (its scopes decide what it may do).
    #[arg(long, global = true, env = "GANTRY_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// PEM certificate of a CA to trust for https:// URLs (besides the system's).
    #[arg(long, global = true, env = "GANTRY_CA_CERT")]
    ca_cert: Option<std::path::PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug, Clone)]
enum Command {
    /// Recent pipelines with their state.
    Pipelines {
        /// Only this project.
        #[arg(long)]
        project: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Follows a pipeline until it is done (or every pipeline, without an id).
    Watch { pipeline: Option<String> },
    /// The build log of a pipeline or a build.
    Logs {
        /// A pipeline id or a build id.
        id: String,
        /// Keep following the log while the build runs.
        #[arg(short, long)]
        follow: bool,
    },
    /// Starts a pipeline for a project at a branch or tag.
    Trigger { project: String, git_ref: String },
    /// Cancels a pipeline's queued or running build (its containers stop).
    Cancel { pipeline: String },
    /// Environments and what runs in each.
    Envs,
    /// Deploys a published image (digest, commit, tag or pipeline id) to an environment.
    Deploy { environment: String, image: String },
    /// Takes an environment back to the version before the current one.
    Rollback { environment: String },
    /// Approves the deployment awaiting approval in an environment.
    Approve {
        environment: String,
        /// Only this deployment (as `gantry envs --json` shows it): refused
        /// if a newer one awaits now.
        #[arg(long)]
        deployment: Option<String>,
    },
    /// Rejects the deployment awaiting approval in an environment.
    Reject {
        environment: String,
        /// Why, for the record and the team.
        #[arg(long)]
        reason: Option<String>,
        /// Only this deployment.
        #[arg(long)]
        deployment: Option<String>,
    },
    /// Stacks with their members, last run and latest release.
    Stacks,
    /// A stack's integration runs and releases.
    #[command(subcommand)]
    Stack(stacks::StackCommand),
    /// An environment's configuration, versioned: set, unset, show, history, diff.
    #[command(subcommand)]
    Config(config::ConfigCommand),
    /// A project's secrets for its test steps: set (value on stdin), unset, list; a new key.
    #[command(subcommand)]
    Secrets(secrets::SecretsCommand),
    /// API tokens: make one, or hash one for the configuration.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The demo project: set it up, and push new versions of it.
    #[command(subcommand)]
    Demo(demo::DemoCommand),
    /// Checks a `.gantry.yml` as the builder will (exit 1 and FILE:LINE:COLUMN when it is wrong).
    Lint {
        /// The file (default: ./.gantry.yml).
        file: Option<std::path::PathBuf>,
    },
}

#[derive(Subcommand, Debug, Clone)]
enum TokenCommand {
    /// Prints a new random token and the line to paste under `tokens:`.
    New {
        /// Name of the token in the configuration.
        #[arg(long, default_value = "cli")]
        name: String,
        /// Scopes: read, trigger, deploy, admin.
        #[arg(long, value_delimiter = ',', default_value = "read")]
        scopes: Vec<String>,
    },
    /// Prints the SHA-256 of a token (given, or read from stdin) for `tokens:`.
    Hash { token: Option<String> },
}

pub(crate) async fn channel(cli: &Cli, url: &str) -> anyhow::Result<Authed> {
    let ca = match &cli.ca_cert {
        Some(path) => Some(
            std::fs::read(path)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", path.display()))?,
        ),
        None => None,
    };
    let channel = gantry_proto::client::endpoint(url, ca.as_deref())
        .map_err(|e| anyhow::anyhow!("{url}: {e}"))?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach {url}: {e}"))?;
    let bearer = Bearer::new(cli.token.as_deref()).map_err(|e| anyhow::anyhow!("--token: {e}"))?;
    Ok(gantry_proto::client::authed(channel, bearer))
}

fn token_command(command: &TokenCommand) -> anyhow::Result<()> {
    match command {
        TokenCommand::New { name, scopes } => {
            let token = demo::random("gty_")?;
            println!("token:  {token}");
            println!(
                "config: - {{name: {name}, sha256: {}, scopes: [{}]}}",
                gantry_config::token_hash(&token),
                scopes.join(", ")
            );
        }
        TokenCommand::Hash { token } => {
            let token = match token {
                Some(t) => t.clone(),
                None => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line
                }
            };
            anyhow::ensure!(!token.trim().is_empty(), "no token given");
            println!("{}", gantry_config::token_hash(&token));
        }
    }
    Ok(())
}

pub(crate) fn time(t: &Option<prost_types::Timestamp>) -> String {
    t.as_ref()
        .and_then(|t| chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32))
        .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
        .unwrap_or_default()
}

pub(crate) fn short(s: &str, n: usize) -> &str {
    let s = s.strip_prefix("sha256:").unwrap_or(s);
    &s[..s.len().min(n)]
}

fn pipeline_json(p: &PipelineSummary) -> Value {
    json!({
        "pipeline_id": p.pipeline_id, "project": p.project, "ref": p.git_ref,
        "commit": p.commit_sha, "author": p.author, "state": p.state, "stage": p.stage,
        "failure": p.failure, "digest": p.digest, "deployments": p.deployments,
        "created_at": time(&p.created_at), "updated_at": time(&p.updated_at), "url": p.url,
    })
}

fn pipeline_line(p: &PipelineSummary) -> String {
    let mut line = format!(
        "{}  {:<8} {:<8} {:<16} {:<20} {}  {}",
        p.pipeline_id,
        p.state,
        p.stage,
        p.project,
        p.git_ref.trim_start_matches("refs/heads/"),
        short(&p.commit_sha, 10),
        time(&p.created_at)
    );
    if !p.deployments.is_empty() {
        line.push_str(&format!("  [{}]", p.deployments.join(", ")));
    }
    if !p.failure.is_empty() {
        line.push_str(&format!("\n    {}", p.failure));
    }
    line
}

fn deployment_json(d: &DeploymentInfo) -> Value {
    json!({
        "deployment_id": d.deployment_id, "environment": d.environment, "project": d.project,
        "repository": d.repository, "digest": d.digest, "commit": d.commit_sha, "ref": d.git_ref,
        "pipeline_id": d.pipeline_id, "state": d.state, "trigger": d.trigger, "reason": d.reason,
        "container_id": d.container_id, "created_at": time(&d.created_at),
        "finished_at": time(&d.finished_at), "decided_by": d.decided_by,
        "decided_at": time(&d.decided_at),
    })
}

fn environment_json(e: &EnvironmentInfo) -> Value {
    json!({
        "name": e.name, "project": e.project, "target": e.target, "rules": e.rules,
        "endpoint": e.endpoint,
        "current": e.current.as_ref().map(deployment_json),
        "pending": e.pending.as_ref().map(deployment_json),
        "approval": e.approval, "promote_from": e.promote_from,
        "health": e.health, "health_reason": e.health_reason,
    })
}

pub(crate) fn print_json(v: &Value) {
    println!("{v}");
}

/// A pipeline's state as the API sends it.
pub(crate) fn state_of(p: &PipelineSummary) -> Option<PipelineState> {
    p.state.parse().ok()
}

/// Each deployment of a pipeline: environment and state (`staging=running`).
pub(crate) fn deployments_of(p: &PipelineSummary) -> Vec<(&str, Option<DeploymentState>)> {
    p.deployments
        .iter()
        .filter_map(|d| d.split_once('='))
        .map(|(env, state)| (env, state.parse().ok()))
        .collect()
}

/// A pipeline is done when it failed, or succeeded with no deployment still going.
fn finished(p: &PipelineSummary) -> bool {
    match state_of(p) {
        Some(PipelineState::Failed | PipelineState::Canceled | PipelineState::Skipped) => true,
        Some(PipelineState::Success) => !deployments_of(p)
            .iter()
            .any(|(_, s)| s.is_none_or(DeploymentState::is_pending)),
        _ => false,
    }
}

/// Prints a pipeline (or every pipeline) each time it changes; a single
/// pipeline until it and its deployments are done. Returns its last state.
pub(crate) async fn watch(
    cli: &Cli,
    pipeline: Option<String>,
) -> anyhow::Result<Option<PipelineSummary>> {
    let mut client = PipelinesClient::new(channel(cli, &cli.notifier).await?);
    let one = pipeline.is_some();
    let mut stream = client
        .watch(WatchPipelinesRequest {
            pipeline_id: pipeline.unwrap_or_default(),
            project: String::new(),
        })
        .await?
        .into_inner();
    let mut last: Option<PipelineSummary> = None;
    loop {
        let wait = match &last {
            Some(p) if one && finished(p) => SETTLE,
            _ => Duration::from_secs(24 * 3600),
        };
        let next = match tokio::time::timeout(wait, stream.message()).await {
            Err(_) => break,
            Ok(next) => next?,
        };
        let Some(p) = next else { break };
        if cli.json {
            print_json(&pipeline_json(&p));
        } else {
            println!("{}", pipeline_line(&p));
        }
        let _ = std::io::stdout().flush();
        last = Some(p);
    }
    Ok(last)
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command.clone() {
        Command::Token(t) => token_command(&t)?,
        Command::Pipelines { project, limit } => pipelines(&cli, project, limit).await?,
        Command::Watch { pipeline } => {
            let one = pipeline.is_some();
            if let Some(p) = watch(&cli, pipeline).await?
                && one
            {
                match state_of(&p) {
                    Some(PipelineState::Failed) => {
                        anyhow::bail!("pipeline {} failed", p.pipeline_id)
                    }
                    Some(PipelineState::Canceled) => {
                        anyhow::bail!("pipeline {} was canceled: {}", p.pipeline_id, p.failure)
                    }
                    _ => {}
                }
            }
        }
        Command::Demo(d) => demo::run(&cli, d).await?,
        Command::Logs { id, follow } => logs(&cli, id, follow).await?,
        Command::Trigger { project, git_ref } => trigger(&cli, project, git_ref).await?,
        Command::Cancel { pipeline } => cancel(&cli, pipeline).await?,
        Command::Envs => envs(&cli).await?,
        Command::Stacks => stacks::list(&cli).await?,
        Command::Stack(command) => stacks::run(&cli, command.clone()).await?,
        Command::Secrets(command) => secrets::run(&cli, command.clone()).await?,
        Command::Config(command) => config::run(&cli, command.clone()).await?,
        Command::Deploy { environment, image } => deploy(&cli, environment, image).await?,
        Command::Rollback { environment } => rollback(&cli, environment).await?,
        Command::Approve {
            environment,
            deployment,
        } => decide(&cli, environment, deployment, None).await?,
        Command::Reject {
            environment,
            reason,
            deployment,
        } => {
            let reason = Some(reason.unwrap_or_default());
            decide(&cli, environment, deployment, reason).await?
        }
        // Answered in `main`: it needs no service and has its own exit codes.
        Command::Lint { .. } => {}
    }
    Ok(())
}

/// `gantry pipelines`.
async fn pipelines(cli: &Cli, project: Option<String>, limit: u32) -> anyhow::Result<()> {
    let mut client = PipelinesClient::new(channel(cli, &cli.notifier).await?);
    let list = client
        .list(ListPipelinesRequest {
            project: project.unwrap_or_default(),
            limit,
        })
        .await?
        .into_inner()
        .pipelines;
    if cli.json {
        print_json(&Value::Array(list.iter().map(pipeline_json).collect()));
    } else if list.is_empty() {
        println!("no pipelines yet");
    } else {
        for p in &list {
            println!("{}", pipeline_line(p));
        }
    }
    Ok(())
}

/// `gantry logs`.
async fn logs(cli: &Cli, id: String, follow: bool) -> anyhow::Result<()> {
    let mut client = BuildsClient::new(channel(cli, &cli.builder).await?);
    let by_build = client
        .stream_logs(StreamLogsRequest {
            build_id: id.clone(),
            pipeline_id: String::new(),
            follow,
        })
        .await;
    let response = match by_build {
        Err(s) if s.code() == tonic::Code::NotFound => {
            client
                .stream_logs(StreamLogsRequest {
                    build_id: String::new(),
                    pipeline_id: id.clone(),
                    follow,
                })
                .await?
        }
        other => other?,
    };
    let mut stream = response.into_inner();
    let mut out = std::io::stdout().lock();
    while let Some(chunk) = stream.message().await? {
        if cli.json {
            let line = json!({
                "build_id": chunk.build_id, "seq": chunk.seq, "step": chunk.step,
                "stream": chunk.stream, "data": String::from_utf8_lossy(&chunk.data),
            });
            writeln!(out, "{line}")?;
        } else {
            out.write_all(&chunk.data)?;
        }
        out.flush()?;
    }
    Ok(())
}

/// `gantry trigger`.
async fn trigger(cli: &Cli, project: String, git_ref: String) -> anyhow::Result<()> {
    let mut client = IngestClient::new(channel(cli, &cli.ingest).await?);
    let r = client
        .trigger(TriggerRequest {
            project,
            r#ref: git_ref,
        })
        .await?
        .into_inner();
    if cli.json {
        print_json(&json!({
            "pipeline_id": r.pipeline_id, "commit": r.commit_sha, "ref": r.git_ref,
        }));
    } else {
        println!(
            "pipeline {} started for {} at {}",
            r.pipeline_id,
            r.git_ref,
            short(&r.commit_sha, 10)
        );
    }
    Ok(())
}

/// `gantry cancel`.
async fn cancel(cli: &Cli, pipeline_id: String) -> anyhow::Result<()> {
    let mut client = BuildsClient::new(channel(cli, &cli.builder).await?);
    let r = client
        .cancel(CancelRequest {
            pipeline_id: pipeline_id.clone(),
        })
        .await?
        .into_inner();
    if cli.json {
        print_json(&json!({
            "pipeline_id": pipeline_id, "build_id": r.build_id, "state": r.state, "reason": r.reason,
        }));
    } else {
        println!(
            "pipeline {pipeline_id}: build {} {} ({})",
            r.build_id, r.state, r.reason
        );
    }
    Ok(())
}

/// `gantry envs`.
async fn envs(cli: &Cli) -> anyhow::Result<()> {
    let mut client = DeploymentsClient::new(channel(cli, &cli.deployer).await?);
    let envs = client
        .list_environments(ListEnvironmentsRequest {})
        .await?
        .into_inner()
        .environments;
    if cli.json {
        print_json(&Value::Array(envs.iter().map(environment_json).collect()));
    } else if envs.is_empty() {
        println!("no environments are configured");
    }
    if !cli.json {
        for e in &envs {
            let endpoint = if e.endpoint.is_empty() {
                String::new()
            } else {
                format!(" at {}", e.endpoint)
            };
            let mut feeds = e.rules.join("; ");
            if !e.promote_from.is_empty() {
                feeds = format!("promoted from {}", e.promote_from);
            }
            if !e.approval.is_empty() {
                feeds.push_str(&format!("; approval {}", e.approval));
            }
            println!("{} ({} {}, {feeds}){endpoint}", e.name, e.target, e.project);
            match &e.current {
                Some(d) => println!(
                    "    runs {}@{} (commit {}, {}) since {}",
                    d.repository,
                    short(&d.digest, 12),
                    short(&d.commit_sha, 10),
                    d.git_ref.trim_start_matches("refs/heads/"),
                    time(&d.finished_at)
                ),
                None => println!("    nothing deployed yet"),
            }
            match e.health.as_str() {
                "unhealthy" => println!(
                    "    UNHEALTHY since {}: {}",
                    time(&e.health_since),
                    e.health_reason
                ),
                "healthy" => println!("    healthy since {}", time(&e.health_since)),
                _ => {}
            }
            if let Some(d) = &e.pending {
                let state = if d.state == "awaiting_approval" {
                    format!(
                        "AWAITING APPROVAL (gantry approve {0} | gantry reject {0}):",
                        e.name
                    )
                } else {
                    d.state.clone()
                };
                println!(
                    "    {state} {} (commit {}, {}, queued {})",
                    short(&d.digest, 12),
                    short(&d.commit_sha, 10),
                    d.trigger,
                    time(&d.created_at)
                );
            }
        }
    }
    Ok(())
}

/// `gantry deploy`.
async fn deploy(cli: &Cli, environment: String, image: String) -> anyhow::Result<()> {
    let mut client = DeploymentsClient::new(channel(cli, &cli.deployer).await?);
    let d = client
        .deploy(DeployRequest { environment, image })
        .await?
        .into_inner()
        .deployment
        .unwrap_or_default();
    report_queued(cli.json, &d);
    Ok(())
}

/// `gantry rollback`.
async fn rollback(cli: &Cli, environment: String) -> anyhow::Result<()> {
    let mut client = DeploymentsClient::new(channel(cli, &cli.deployer).await?);
    let d = client
        .rollback(RollbackRequest { environment })
        .await?
        .into_inner()
        .deployment
        .unwrap_or_default();
    report_queued(cli.json, &d);
    Ok(())
}

/// `gantry approve` and `gantry reject`.
async fn decide(
    cli: &Cli,
    environment: String,
    deployment: Option<String>,
    reject: Option<String>,
) -> anyhow::Result<()> {
    let mut client = DeploymentsClient::new(channel(cli, &cli.deployer).await?);
    let deployment_id = deployment.unwrap_or_default();
    let d = match reject {
        None => {
            client
                .approve(ApproveRequest {
                    environment,
                    deployment_id,
                })
                .await?
        }
        Some(reason) => {
            client
                .reject(RejectRequest {
                    environment,
                    reason,
                    deployment_id,
                })
                .await?
        }
    }
    .into_inner()
    .deployment
    .unwrap_or_default();
    if cli.json {
        print_json(&deployment_json(&d));
    } else {
        println!(
            "deployment {} of {}@{} (commit {}) to {}: {} by {}",
            d.deployment_id,
            d.repository,
            short(&d.digest, 12),
            short(&d.commit_sha, 10),
            d.environment,
            if d.state == "rejected" {
                "rejected"
            } else {
                "approved"
            },
            d.decided_by
        );
    }
    Ok(())
}

fn report_queued(json: bool, d: &DeploymentInfo) {
    if json {
        print_json(&deployment_json(d));
    } else {
        println!(
            "deployment {} queued: {}@{} (commit {}) to {}",
            d.deployment_id,
            d.repository,
            short(&d.digest, 12),
            short(&d.commit_sha, 10),
            d.environment
        );
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cli = Cli::parse();
    if let Command::Lint { file } = &cli.command {
        return lint::run(cli.json, file.clone());
    }
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            match e.downcast_ref::<tonic::Status>() {
                Some(s)
                    if s.code() == tonic::Code::Unauthenticated
                        && !s.message().contains("GANTRY_TOKEN") =>
                {
                    eprintln!("gantry: {} (set GANTRY_TOKEN or pass --token)", s.message())
                }
                Some(s) => eprintln!("gantry: {}", s.message()),
                None => eprintln!("gantry: {e:#}"),
            }
            ExitCode::FAILURE
        }
    }
}
