//! `gantry secrets …`: a project's secrets for its test steps, stored sealed
//! by the builder (`gantry.v1.Secrets`). A value is read from standard
//! input, never from the command line (which `ps` and shell histories show).

use std::io::Read as _;

use clap::Subcommand;
use gantry_proto::v1::secrets_client::SecretsClient;
use gantry_proto::v1::{ListSecretsRequest, SecretInfo, SetSecretRequest, UnsetSecretRequest};
use serde_json::{Value, json};

use crate::{Cli, channel, print_json, time};

#[derive(Subcommand, Debug, Clone)]
pub(crate) enum SecretsCommand {
    /// Stores a secret of a project, its value read from standard input
    /// (one trailing newline removed); replaces one of the same name.
    Set {
        project: String,
        name: String,
        /// Only pipelines of the default branch and of tags get it.
        #[arg(long)]
        protected: bool,
    },
    /// Removes a stored secret.
    Unset { project: String, name: String },
    /// A project's secrets (names, rules, where each comes from; no values).
    List { project: String },
    /// Prints a new random key for `secrets_key:` in the configuration.
    Key,
}

fn secret_json(s: &SecretInfo) -> Value {
    json!({
        "project": s.project, "name": s.name, "protected": s.protected, "source": s.source,
        "set_by": s.set_by, "updated_at": time(&s.updated_at),
    })
}

fn secret_line(s: &SecretInfo) -> String {
    let rule = if s.protected {
        "protected"
    } else {
        "every pipeline"
    };
    let origin = if s.source == "stored" {
        format!("stored by {} at {}", s.set_by, time(&s.updated_at))
    } else {
        "from the configuration file".into()
    };
    format!("{:<24} {:<15} {origin}", s.name, rule)
}

/// The value on standard input, without one trailing newline.
fn read_value() -> anyhow::Result<String> {
    let mut value = String::new();
    std::io::stdin()
        .read_to_string(&mut value)
        .map_err(|e| anyhow::anyhow!("cannot read the value from standard input: {e}"))?;
    if value.ends_with('\n') {
        value.pop();
        if value.ends_with('\r') {
            value.pop();
        }
    }
    anyhow::ensure!(
        !value.is_empty(),
        "give the value on standard input, e.g. `gantry secrets set web API_TOKEN < token.txt`"
    );
    Ok(value)
}

pub(crate) async fn run(cli: &Cli, command: SecretsCommand) -> anyhow::Result<()> {
    if let SecretsCommand::Key = command {
        let key = gantry_seal::SealKey::generate_text().map_err(anyhow::Error::msg)?;
        println!("{key}");
        eprintln!(
            "put it where the builder reads it, e.g. secrets_key: {{env: GANTRY_SECRETS_KEY}}; keep it: without it stored secrets do not open"
        );
        return Ok(());
    }
    let mut client = SecretsClient::new(channel(cli, &cli.builder).await?);
    match command {
        SecretsCommand::Set {
            project,
            name,
            protected,
        } => {
            let value = read_value()?;
            let s = client
                .set(SetSecretRequest {
                    project,
                    name,
                    value,
                    protected,
                })
                .await?
                .into_inner();
            if cli.json {
                print_json(&secret_json(&s));
            } else {
                println!("{}: secret {} stored", s.project, s.name);
            }
        }
        SecretsCommand::Unset { project, name } => {
            client
                .unset(UnsetSecretRequest {
                    project: project.clone(),
                    name: name.clone(),
                })
                .await?;
            if cli.json {
                print_json(&json!({ "project": project, "name": name, "removed": true }));
            } else {
                println!("{project}: secret {name} removed");
            }
        }
        SecretsCommand::List { project } => {
            let secrets = client
                .list(ListSecretsRequest { project })
                .await?
                .into_inner()
                .secrets;
            if cli.json {
                print_json(&Value::Array(secrets.iter().map(secret_json).collect()));
            } else if secrets.is_empty() {
                println!("no secrets");
            } else {
                for s in &secrets {
                    println!("{}", secret_line(s));
                }
            }
        }
        SecretsCommand::Key => {}
    }
    Ok(())
}
