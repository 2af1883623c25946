//! `gantry demo`: Gantry's main job on an embedded default, with nothing to
//! set up. `demo init` makes a small service repository under the Gantry
//! home (`.gantry/demo/repo`, a `FROM scratch` image with the static busybox
//! that serves a page showing its version, and a `.gantry.yml` whose test
//! checks that page) and, for `scripts/run.sh`, the configuration that builds
//! it as project `demo` and deploys it to `staging` at 127.0.0.1:18080.
//! `demo push` commits a new version and sends the signed GitLab push
//! webhook a forge would, then follows the pipeline to the end; `--break`
//! makes a version whose health check fails (rolled back) or whose test
//! fails.

use std::path::{Path, PathBuf};
use std::process::Command;

use clap::{Subcommand, ValueEnum};
use gantry_proto::v1::PipelineSummary;
use gantry_states::{DeploymentState, PipelineState};
use serde_json::json;

use crate::Cli;

/// The demo project's GitLab path, as its webhooks name it.
const FORGE_PATH: &str = "demo/demo";
/// Where staging answers when Gantry runs on the host.
pub const ENDPOINT: &str = "127.0.0.1:18080";
/// Who commits the demo's versions.
const AUTHOR: (&str, &str) = ("Gantry demo", "demo@gantry.invalid");

#[derive(Subcommand, Debug, Clone)]
pub enum DemoCommand {
    /// Makes the demo repository (once) and, unless --repo-only, the
    /// configuration and API tokens scripts/run.sh runs with.
    Init {
        /// Gantry's home: the demo lives in HOME/demo.
        #[arg(long, env = "GANTRY_HOME", default_value = ".gantry")]
        home: PathBuf,
        /// Only the repository (docker-compose.yml brings its own configuration).
        #[arg(long)]
        repo_only: bool,
    },
    /// Commits a new version of the demo service, pushes it as GitLab would,
    /// and follows its pipeline and deployment to the end.
    Push {
        #[arg(long, env = "GANTRY_HOME", default_value = ".gantry")]
        home: PathBuf,
        /// Make a broken version: `health` (the default) starts but never
        /// answers, so staging rolls back; `test` fails its test step.
        #[arg(long = "break", value_enum, num_args = 0..=1, default_missing_value = "health")]
        broken: Option<Break>,
        /// Where webhook-ingest takes GitLab's webhooks.
        #[arg(
            long,
            env = "GANTRY_WEBHOOK_URL",
            default_value = "http://127.0.0.1:8080/hooks/gitlab"
        )]
        webhook_url: String,
        /// The demo project's webhook secret (default: HOME/demo/webhook-secret).
        #[arg(long, env = "GANTRY_WEBHOOK_SECRET", hide_env_values = true)]
        secret: Option<String>,
        /// Return once the push is accepted, without following it.
        #[arg(long)]
        no_watch: bool,
    },
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Break {
    /// The new version listens on the wrong port: its health check fails.
    Health,
    /// The page does not show the version the test expects.
    Test,
}

pub async fn run(cli: &Cli, command: DemoCommand) -> anyhow::Result<()> {
    match command {
        DemoCommand::Init { home, repo_only } => {
            let repo = init_repo(&home)?;
            if !repo_only {
                let config = write_config(&home, &repo)?;
                println!("demo configuration: {}", config.display());
            }
            println!("demo repository: {}", repo.display());
            Ok(())
        }
        DemoCommand::Push {
            home,
            broken,
            webhook_url,
            secret,
            no_watch,
        } => push(cli, &home, broken, &webhook_url, secret, no_watch).await,
    }
}

fn git(dir: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("git")
        .args([
            "-c",
            &format!("user.name={}", AUTHOR.0),
            "-c",
            &format!("user.email={}", AUTHOR.1),
            "-c",
            "init.defaultBranch=main",
            "-c",
            "commit.gpgSign=false",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .map_err(|e| anyhow::anyhow!("cannot run git (install it): {e}"))?;
    anyhow::ensure!(
        out.status.success(),
        "git {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn page(version: u32) -> String {
    format!(
        "<!doctype html>\n<title>Gantry demo</title>\n<h1>Gantry demo</h1>\n<p>version {version}</p>\n"
    )
}

fn dockerfile(port: u16) -> String {
    format!(
        "# The demo service: busybox's httpd serving www/, from scratch (no image to pull).\n\
         FROM scratch\n\
         COPY busybox /bin/busybox\n\
         RUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n\
         COPY www /www\n\
         USER 65534:65534\n\
         CMD [\"httpd\", \"-f\", \"-p\", \"{port}\", \"-h\", \"/www\"]\n"
    )
}

const PIPELINE_FILE: &str = "# How Gantry builds and tests the demo service.\n\
image:\n  dockerfile: Dockerfile\n\
test:\n  - name: page-shows-its-version\n    run: grep -q \"version $(cat /www/VERSION)<\" /www/index.html\n";

/// The version the repository holds now.
fn current_version(repo: &Path) -> u32 {
    std::fs::read_to_string(repo.join("www/VERSION"))
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

/// Writes version `version` of the service (broken as asked) into `repo`.
fn write_version(repo: &Path, version: u32, broken: Option<Break>) -> anyhow::Result<()> {
    std::fs::create_dir_all(repo.join("www"))?;
    let shown = if broken == Some(Break::Test) {
        version + 1000
    } else {
        version
    };
    std::fs::write(repo.join("www/index.html"), page(shown))?;
    std::fs::write(repo.join("www/VERSION"), format!("{version}\n"))?;
    let port = if broken == Some(Break::Health) {
        8081
    } else {
        8080
    };
    std::fs::write(repo.join("Dockerfile"), dockerfile(port))?;
    std::fs::write(repo.join(".gantry.yml"), PIPELINE_FILE)?;
    Ok(())
}

/// Makes HOME/demo/repo with version 1 on `main`, unless it exists.
fn init_repo(home: &Path) -> anyhow::Result<PathBuf> {
    let repo = home.join("demo/repo");
    if repo.join(".git").exists() {
        return Ok(std::fs::canonicalize(repo)?);
    }
    std::fs::create_dir_all(&repo)?;
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or_else(|| {
            anyhow::anyhow!("the demo needs a static busybox: apt-get install busybox-static")
        })?;
    std::fs::copy(busybox, repo.join("busybox"))?;
    write_version(&repo, 1, None)?;
    git(&repo, &["init", "-q", "-b", "main"])?;
    git(&repo, &["add", "-A"])?;
    git(&repo, &["commit", "-q", "-m", "Demo service, version 1"])?;
    Ok(std::fs::canonicalize(repo)?)
}

/// A secret or token: 32 random bytes in hex, with a prefix.
pub(crate) fn random(prefix: &str) -> anyhow::Result<String> {
    let mut bytes = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    Ok(format!(
        "{prefix}{}",
        bytes.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ))
}

/// `path`'s content, made with `make` (and kept owner-only) when missing.
fn kept(path: &Path, make: impl FnOnce() -> anyhow::Result<String>) -> anyhow::Result<String> {
    if let Ok(text) = std::fs::read_to_string(path)
        && !text.trim().is_empty()
    {
        return Ok(text.trim().to_owned());
    }
    let value = make()?;
    std::fs::write(path, &value)?;
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(value)
}

/// Writes HOME/gantry.yml: the demo project, its registry and staging, and
/// API tokens (HOME/token for the gantry command, HOME/notifier-token).
fn write_config(home: &Path, repo: &Path) -> anyhow::Result<PathBuf> {
    let home_abs = std::fs::canonicalize(home)?;
    let secret_file = home_abs.join("demo/webhook-secret");
    kept(&secret_file, || random("demo-"))?;
    let token = kept(&home_abs.join("token"), || random("gty_"))?;
    let notifier = kept(&home_abs.join("notifier-token"), || random("gty_"))?;
    let config = format!(
        "# The demo Gantry of scripts/run.sh, written by `gantry demo init`: edit\n\
         # ./gantry.yml (or set GANTRY_CONFIG) to build your own projects instead.\n\
         projects:\n\
         \x20 - name: demo\n\
         \x20   clone_url: file://{repo}\n\
         \x20   gitlab: {FORGE_PATH}\n\
         \x20   webhook_secret: {{file: {secret}}}\n\
         \x20   image: 127.0.0.1:5000/demo/demo\n\
         \x20   limits: {{memory_mb: 256, pids: 128, cpus: 1}}\n\
         registries:\n\
         \x20 - host: 127.0.0.1:5000\n\
         environments:\n\
         \x20 - name: staging\n\
         \x20   project: demo\n\
         \x20   rules: [{{branch: main}}]\n\
         \x20   port: 8080\n\
         \x20   endpoint: {ENDPOINT}\n\
         \x20   health: {{http: /, timeout_secs: 15}}\n\
         public_url: http://127.0.0.1:8084\n\
         tokens:\n\
         \x20 - {{name: local-admin, sha256: {admin}, scopes: [admin]}}\n\
         \x20 - {{name: notifier, sha256: {reader}, scopes: [read]}}\n",
        repo = repo.display(),
        secret = secret_file.display(),
        admin = gantry_config::token_hash(&token),
        reader = gantry_config::token_hash(&notifier),
    );
    let path = home_abs.join("gantry.yml");
    std::fs::write(&path, config)?;
    Ok(path)
}

async fn push(
    cli: &Cli,
    home: &Path,
    broken: Option<Break>,
    webhook_url: &str,
    secret: Option<String>,
    no_watch: bool,
) -> anyhow::Result<()> {
    let repo = home.join("demo/repo");
    anyhow::ensure!(
        repo.join(".git").exists(),
        "no demo repository at {}: run `gantry demo init` (scripts/run.sh does)",
        repo.display()
    );
    let secret = match secret {
        Some(s) => s,
        None => std::fs::read_to_string(home.join("demo/webhook-secret"))
            .map(|s| s.trim().to_owned())
            .map_err(|e| {
                anyhow::anyhow!(
                    "cannot read the demo's webhook secret ({e}); give it with --secret"
                )
            })?,
    };
    let before = git(&repo, &["rev-parse", "HEAD"])?;
    let version = current_version(&repo) + 1;
    write_version(&repo, version, broken)?;
    let message = match broken {
        None => format!("Demo service, version {version}"),
        Some(Break::Health) => format!("Demo service, version {version} (never answers)"),
        Some(Break::Test) => format!("Demo service, version {version} (fails its test)"),
    };
    git(&repo, &["add", "-A"])?;
    git(&repo, &["commit", "-q", "-m", &message])?;
    let sha = git(&repo, &["rev-parse", "HEAD"])?;

    // What GitLab sends for a push (its "Push Hook"), signed with the secret.
    let body = json!({
        "object_kind": "push",
        "event_name": "push",
        "before": before,
        "after": sha,
        "ref": "refs/heads/main",
        "checkout_sha": sha,
        "user_name": AUTHOR.0,
        "user_email": AUTHOR.1,
        "project": {
            "name": "demo",
            "path_with_namespace": FORGE_PATH,
            "default_branch": "main",
        },
        "commits": [{
            "id": sha,
            "message": format!("{message}\n"),
            "author": { "name": AUTHOR.0, "email": AUTHOR.1 },
        }],
        "total_commits_count": 1,
    });
    let response = reqwest::Client::new()
        .post(webhook_url)
        .header("X-Gitlab-Event", "Push Hook")
        .header("X-Gitlab-Token", secret)
        .json(&body)
        .send()
        .await
        .map_err(|e| anyhow::anyhow!("cannot reach webhook-ingest at {webhook_url}: {e}"))?;
    let status = response.status();
    let answer: serde_json::Value = response.json().await.unwrap_or_default();
    anyhow::ensure!(
        status.is_success(),
        "webhook-ingest answered {status}: {answer}"
    );
    let pipeline = answer["pipeline_id"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    println!(
        "pushed version {version} ({}) as pipeline {pipeline}",
        &sha[..10]
    );
    if no_watch {
        return Ok(());
    }
    let last = crate::watch(cli, Some(pipeline.clone())).await?;
    report(last.as_ref(), version)
}

/// Says how the push ended; an error when it did not end in staging.
fn report(last: Option<&PipelineSummary>, version: u32) -> anyhow::Result<()> {
    let Some(p) = last else {
        anyhow::bail!("the pipeline was never seen");
    };
    if crate::state_of(p) == Some(PipelineState::Failed) {
        anyhow::bail!("version {version} failed: {}", p.failure);
    }
    let not_live = crate::deployments_of(p)
        .into_iter()
        .find(|(_, state)| *state != Some(DeploymentState::Succeeded));
    if let Some((env, state)) = not_live {
        let state = state.map_or("unknown", DeploymentState::as_str);
        anyhow::bail!(
            "version {version} was built and tested, but its deployment ended {env}={state}: the previous version keeps answering"
        );
    }
    println!("version {version} runs in staging: http://{ENDPOINT}/");
    Ok(())
}
