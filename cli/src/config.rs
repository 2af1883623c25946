//! `gantry config …`: an environment's configuration, versioned by the
//! deployer (`gantry.v1.EnvironmentConfig`). `set` and `unset` make a new
//! version and redeploy what runs there with it; `show`, `history` and
//! `diff` read them (secret values always masked). A secret value can come
//! on standard input (`KEY` without `=`), out of the shell's history.

use std::collections::HashMap;
use std::io::Read as _;

use clap::Subcommand;
use gantry_proto::v1::environment_config_client::EnvironmentConfigClient;
use gantry_proto::v1::{
    ConfigDiffRequest, ConfigHistoryRequest, ConfigVersion, SetConfigRequest, ShowConfigRequest,
};
use serde_json::{Value, json};

use crate::{Cli, channel, print_json, time};

#[derive(Subcommand, Debug, Clone)]
pub(crate) enum ConfigCommand {
    /// Sets keys (KEY=VALUE; with --secret, a lone KEY reads its value from
    /// standard input): a new version, deployed to what runs there.
    Set {
        environment: String,
        #[arg(required = true)]
        entries: Vec<String>,
        /// The values are secret: sealed at rest, never shown again.
        #[arg(long)]
        secret: bool,
    },
    /// Removes keys: a new version, deployed to what runs there.
    Unset {
        environment: String,
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// The current version (or VERSION) with its values, secrets masked.
    Show {
        environment: String,
        version: Option<u32>,
    },
    /// Every version: who changed what, when, and which failed.
    History { environment: String },
    /// What changed between two versions (0: none).
    Diff {
        environment: String,
        from: u32,
        to: u32,
    },
}

fn version_json(v: &ConfigVersion) -> Value {
    json!({
        "environment": v.environment, "version": v.version, "changed_by": v.changed_by,
        "change": v.change, "failed": v.failed, "created_at": time(&v.created_at),
        "entries": v.entries.iter().map(|e| json!({"key": e.key, "value": e.value, "secret": e.secret})).collect::<Vec<_>>(),
        "deployment": v.deployment.as_ref().map(|d| d.deployment_id.clone()),
    })
}

fn version_line(v: &ConfigVersion) -> String {
    let failed = if v.failed.is_empty() {
        String::new()
    } else {
        format!("  FAILED: {}", v.failed)
    };
    format!(
        "v{:<4} {} by {:<12} {}{failed}",
        v.version,
        time(&v.created_at),
        v.changed_by,
        v.change
    )
}

/// `KEY=VALUE` pairs; with `secret`, a lone `KEY` takes standard input.
fn entries(given: &[String], secret: bool) -> anyhow::Result<HashMap<String, String>> {
    let mut set = HashMap::new();
    for entry in given {
        match entry.split_once('=') {
            Some((k, v)) => {
                set.insert(k.to_owned(), v.to_owned());
            }
            None if secret => {
                let mut value = String::new();
                std::io::stdin().read_to_string(&mut value)?;
                let value = value.strip_suffix('\n').unwrap_or(&value).to_owned();
                anyhow::ensure!(!value.is_empty(), "no value for {entry} on standard input");
                set.insert(entry.clone(), value);
            }
            None => anyhow::bail!(
                "{entry:?}: write KEY=VALUE (or --secret KEY with the value on stdin)"
            ),
        }
    }
    Ok(set)
}

pub(crate) async fn run(cli: &Cli, command: ConfigCommand) -> anyhow::Result<()> {
    let mut client = EnvironmentConfigClient::new(channel(cli, &cli.deployer).await?);
    match command {
        ConfigCommand::Set {
            environment,
            entries: given,
            secret,
        } => {
            let set = entries(&given, secret)?;
            let v = client
                .set(SetConfigRequest {
                    environment,
                    set,
                    unset: Vec::new(),
                    secret,
                })
                .await?
                .into_inner();
            report(cli, &v);
        }
        ConfigCommand::Unset { environment, keys } => {
            let v = client
                .set(SetConfigRequest {
                    environment,
                    set: HashMap::new(),
                    unset: keys,
                    secret: false,
                })
                .await?
                .into_inner();
            report(cli, &v);
        }
        ConfigCommand::Show {
            environment,
            version,
        } => {
            let v = client
                .show(ShowConfigRequest {
                    environment,
                    version: version.unwrap_or(0),
                })
                .await?
                .into_inner();
            if cli.json {
                print_json(&version_json(&v));
            } else {
                println!("{}", version_line(&v));
                for e in &v.entries {
                    println!("  {}={}", e.key, e.value);
                }
            }
        }
        ConfigCommand::History { environment } => {
            let versions = client
                .history(ConfigHistoryRequest { environment })
                .await?
                .into_inner()
                .versions;
            if cli.json {
                print_json(&Value::Array(versions.iter().map(version_json).collect()));
            } else if versions.is_empty() {
                println!("no configuration yet");
            } else {
                for v in &versions {
                    println!("{}", version_line(v));
                }
            }
        }
        ConfigCommand::Diff {
            environment,
            from,
            to,
        } => {
            let changes = client
                .diff(ConfigDiffRequest {
                    environment,
                    from,
                    to,
                })
                .await?
                .into_inner()
                .changes;
            if cli.json {
                print_json(&Value::Array(
                    changes
                        .iter()
                        .map(|c| json!({"key": c.key, "kind": c.kind, "before": c.before, "after": c.after, "secret": c.secret}))
                        .collect(),
                ));
            } else if changes.is_empty() {
                println!("no difference");
            } else {
                for c in &changes {
                    match c.kind.as_str() {
                        "added" => println!("+ {}={}", c.key, c.after),
                        "removed" => println!("- {}={}", c.key, c.before),
                        _ => println!("~ {}: {} -> {}", c.key, c.before, c.after),
                    }
                }
            }
        }
    }
    Ok(())
}

fn report(cli: &Cli, v: &ConfigVersion) {
    if cli.json {
        print_json(&version_json(v));
        return;
    }
    println!(
        "{}: configuration v{} ({})",
        v.environment, v.version, v.change
    );
    match &v.deployment {
        Some(d) => println!(
            "deployment {} queued: what runs there, with v{} ({})",
            d.deployment_id, v.version, d.state
        ),
        None => println!("nothing runs there yet: the next deployment takes it"),
    }
}
