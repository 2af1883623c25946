//! `gantry stacks` and `gantry stack …`: stacks (meta-projects), their
//! integration runs and their releases, from the deployer's `Stacks` API.
//! A run's log is the builder's: `gantry logs BUILD_ID`.

use clap::Subcommand;
use gantry_proto::v1::stacks_client::StacksClient;
use gantry_proto::v1::{
    DeployStackRequest, ListStackReleasesRequest, ListStackRunsRequest, ListStacksRequest,
    RollbackStackRequest, StackDeploymentInfo, StackEnvironmentInfo, StackInfo, StackReleaseInfo,
    StackRunInfo, StackService,
};
use serde_json::{Value, json};

use crate::{Cli, channel, print_json, short, time};

#[derive(Subcommand, Debug, Clone)]
pub(crate) enum StackCommand {
    /// Integration runs of a stack, newest first.
    Runs {
        stack: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Releases of a stack, newest first.
    Releases {
        stack: String,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// Deploys a release of a stack to one of its environments.
    Deploy { environment: String, release: u64 },
    /// Takes a stack's environment back to the release before the current one.
    Rollback { environment: String },
}

fn service_json(s: &StackService) -> Value {
    json!({
        "service": s.service, "project": s.project, "image": s.image, "digest": s.digest,
        "commit": s.commit_sha, "test": s.test,
    })
}

fn run_json(r: &StackRunInfo) -> Value {
    json!({
        "run_id": r.run_id, "stack": r.stack, "number": r.number, "state": r.state,
        "stack_commit": r.stack_commit, "ref": r.git_ref, "build_id": r.build_id,
        "failed_step": r.failed_step, "reason": r.reason, "release": r.release,
        "pipeline_id": r.pipeline_id,
        "triggers": r.triggers.iter().map(|t| json!({
            "project": t.project, "kind": t.kind, "commit": t.commit_sha, "ref": t.git_ref,
            "pipeline_id": t.pipeline_id,
        })).collect::<Vec<_>>(),
        "services": r.services.iter().map(service_json).collect::<Vec<_>>(),
        "created_at": time(&r.created_at), "finished_at": time(&r.finished_at),
    })
}

fn release_json(r: &StackReleaseInfo) -> Value {
    json!({
        "stack": r.stack, "number": r.number, "run_id": r.run_id,
        "stack_commit": r.stack_commit,
        "services": r.services.iter().map(service_json).collect::<Vec<_>>(),
        "created_at": time(&r.created_at),
    })
}

fn deployment_json(d: &StackDeploymentInfo) -> Value {
    json!({
        "deployment_id": d.deployment_id, "environment": d.environment, "stack": d.stack,
        "release": d.release, "state": d.state, "trigger": d.trigger, "reason": d.reason,
        "previous_release": d.previous_release, "created_at": time(&d.created_at),
        "finished_at": time(&d.finished_at),
    })
}

fn environment_json(e: &StackEnvironmentInfo) -> Value {
    json!({
        "name": e.name, "endpoint": e.endpoint, "service": e.service, "rules": e.rules,
        "release": e.release, "since": time(&e.since),
        "pending": e.pending.as_ref().map(deployment_json),
        "last": e.last.as_ref().map(deployment_json),
    })
}

fn stack_json(s: &StackInfo) -> Value {
    json!({
        "name": s.name, "clone_url": s.clone_url, "default_branch": s.default_branch,
        "members": s.members,
        "last_run": s.last_run.as_ref().map(run_json),
        "latest_release": s.latest_release.as_ref().map(release_json),
        "environments": s.environments.iter().map(environment_json).collect::<Vec<_>>(),
    })
}

fn environment_lines(e: &StackEnvironmentInfo) -> String {
    let mut out = format!(
        "    environment {} ({}){}: ",
        e.name,
        if e.rules.is_empty() {
            "manual".to_owned()
        } else {
            e.rules.join("; ")
        },
        if e.endpoint.is_empty() {
            String::new()
        } else {
            format!(" at {} ({})", e.endpoint, e.service)
        }
    );
    if e.release == 0 {
        out.push_str("nothing deployed yet");
    } else {
        out.push_str(&format!("release {} since {}", e.release, time(&e.since)));
    }
    if let Some(p) = &e.pending {
        out.push_str(&format!(
            "\n      {} release {} ({})",
            p.state, p.release, p.trigger
        ));
    }
    if let Some(l) = e.last.as_ref().filter(|l| l.state != "succeeded") {
        out.push_str(&format!(
            "\n      last: release {} {}: {}",
            l.release, l.state, l.reason
        ));
    }
    out
}

fn queued_line(d: &StackDeploymentInfo) -> String {
    format!(
        "release {} of {} queued for {} ({}, deployment {})",
        d.release, d.stack, d.environment, d.trigger, d.deployment_id
    )
}

fn run_line(r: &StackRunInfo) -> String {
    let triggers: Vec<String> = r
        .triggers
        .iter()
        .map(|t| format!("{} {} {}", t.kind, t.project, short(&t.commit_sha, 10)))
        .collect();
    let mut line = format!(
        "#{:<4} {:<9} {}  stack {}  {}",
        r.number,
        r.state,
        time(&r.created_at),
        short(&r.stack_commit, 10),
        triggers.join(", ")
    );
    if r.release > 0 {
        line.push_str(&format!("  -> release {}", r.release));
    }
    if !r.build_id.is_empty() {
        line.push_str(&format!("\n      log: gantry logs {}", r.build_id));
    }
    if !r.reason.is_empty() {
        line.push_str(&format!(
            "\n      failed at {}: {}",
            r.failed_step, r.reason
        ));
    }
    line
}

fn services_lines(services: &[StackService]) -> String {
    services
        .iter()
        .filter(|s| !s.test)
        .map(|s| {
            let from = if s.project.is_empty() {
                String::new()
            } else {
                format!(" ({} {})", s.project, short(&s.commit_sha, 10))
            };
            format!("      {:<12} {}{from}", s.service, s.image)
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `gantry stacks`.
pub(crate) async fn list(cli: &Cli) -> anyhow::Result<()> {
    let mut client = StacksClient::new(channel(cli, &cli.deployer).await?);
    let stacks = client.list(ListStacksRequest {}).await?.into_inner().stacks;
    if cli.json {
        print_json(&Value::Array(stacks.iter().map(stack_json).collect()));
        return Ok(());
    }
    if stacks.is_empty() {
        println!("no stacks are configured");
    }
    for s in &stacks {
        println!("{} ({}, {})", s.name, s.clone_url, s.default_branch);
        if s.members.is_empty() {
            println!("    members: not known yet (a push to the stack repository runs it)");
        } else {
            println!("    members: {}", s.members.join(", "));
        }
        match &s.last_run {
            Some(r) => println!("    last run {}", run_line(r).replace('\n', "\n    ")),
            None => println!("    never run"),
        }
        match &s.latest_release {
            Some(r) => println!(
                "    release {} (stack {}, {})\n{}",
                r.number,
                short(&r.stack_commit, 10),
                time(&r.created_at),
                services_lines(&r.services)
            ),
            None => println!("    no release yet"),
        }
        for e in &s.environments {
            println!("{}", environment_lines(e));
        }
    }
    Ok(())
}

/// `gantry stack …`.
pub(crate) async fn run(cli: &Cli, command: StackCommand) -> anyhow::Result<()> {
    let mut client = StacksClient::new(channel(cli, &cli.deployer).await?);
    match command {
        StackCommand::Runs { stack, limit } => {
            let runs = client
                .list_runs(ListStackRunsRequest { stack, limit })
                .await?
                .into_inner()
                .runs;
            if cli.json {
                print_json(&Value::Array(runs.iter().map(run_json).collect()));
            } else if runs.is_empty() {
                println!("no runs yet");
            } else {
                for r in &runs {
                    println!("{}", run_line(r));
                }
            }
        }
        StackCommand::Deploy {
            environment,
            release,
        } => {
            let d = client
                .deploy(DeployStackRequest {
                    environment,
                    release,
                })
                .await?
                .into_inner();
            if cli.json {
                print_json(&deployment_json(&d));
            } else {
                println!("{}", queued_line(&d));
            }
        }
        StackCommand::Rollback { environment } => {
            let d = client
                .rollback(RollbackStackRequest { environment })
                .await?
                .into_inner();
            if cli.json {
                print_json(&deployment_json(&d));
            } else {
                println!("{}", queued_line(&d));
            }
        }
        StackCommand::Releases { stack, limit } => {
            let releases = client
                .list_releases(ListStackReleasesRequest { stack, limit })
                .await?
                .into_inner()
                .releases;
            if cli.json {
                print_json(&Value::Array(releases.iter().map(release_json).collect()));
            } else if releases.is_empty() {
                println!("no releases yet");
            } else {
                for r in &releases {
                    println!(
                        "release {}  stack {}  {}\n{}",
                        r.number,
                        short(&r.stack_commit, 10),
                        time(&r.created_at),
                        services_lines(&r.services)
                    );
                }
            }
        }
    }
    Ok(())
}
