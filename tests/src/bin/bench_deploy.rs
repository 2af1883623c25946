//! Push-to-deployment benchmark: how much Gantry adds to the Docker work.
//!
//! For each run, a new commit of the sample service (a new page) goes two ways,
//! alternately:
//! - **Gantry**: a GitLab push webhook to the five real services (against the
//!   real Postgres, RabbitMQ, Docker engine and registry of scripts/infra.sh);
//!   timed from the POST until the environment's endpoint answers the new page.
//! - **direct**: the same Docker work by hand with the `docker` and `git`
//!   commands — clone at the commit, build, run the two test steps as the
//!   unprivileged user, push, start the new container, wait until it answers
//!   HTTP, remove the old one.
//!
//! It prints each run and the ratio of the medians. The service binaries must
//! be built with the same profile first:
//!
//!     cargo build --release --bins && target/release/bench-deploy --runs 5

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use gantry_tests::stack::ProjectSpec;
use gantry_tests::{EnvSpec, SampleRepo, Stack, StackOptions};

#[derive(Parser)]
struct Args {
    /// Runs of each path (bounded: at most 20).
    #[arg(long, default_value_t = 5)]
    runs: u32,
}

/// How long one path may take before the run is abandoned.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn docker(args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("docker").args(args))
}

/// Polls `url` until it answers `expected`.
async fn wait_for(url: &str, expected: &str) -> anyhow::Result<()> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()?;
    let deadline = Instant::now() + RUN_TIMEOUT;
    loop {
        if let Ok(r) = client.get(url).send().await
            && r.text().await.ok().as_deref() == Some(expected)
        {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{url} never answered {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The same Docker work without Gantry; returns the new container.
async fn direct(
    repo: &Path,
    sha: &str,
    image: &str,
    old: Option<&str>,
    page: &str,
) -> anyhow::Result<String> {
    let dir = tempfile::tempdir()?;
    let work = dir.path().join("src");
    run(Command::new("git")
        .args(["clone", "-q", "--no-checkout"])
        .arg(repo)
        .arg(&work))?;
    run(Command::new("git")
        .arg("-C")
        .arg(&work)
        .args(["checkout", "-q", sha]))?;
    let tag = format!("{image}:{sha}");
    docker(&["build", "-q", "-t", &tag, &work.display().to_string()])?;
    for step in ["grep -q hello /www/index.html", "test \"$(id -u)\" = 65534"] {
        docker(&[
            "run",
            "--rm",
            "--user",
            "65534:65534",
            "--cap-drop",
            "ALL",
            "--security-opt",
            "no-new-privileges",
            &tag,
            "sh",
            "-c",
            step,
        ])?;
    }
    docker(&["push", "-q", &tag])?;
    let id = docker(&["run", "-d", "--label", "io.gantry.bench=direct", &tag])?;
    let ip = docker(&["inspect", "-f", "{{.NetworkSettings.IPAddress}}", &id])?;
    wait_for(&format!("http://{ip}:8080/"), page).await?;
    if let Some(old) = old {
        docker(&["rm", "-f", old])?;
    }
    Ok(id)
}

fn median(v: &mut [Duration]) -> Duration {
    v.sort();
    v[v.len() / 2]
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runs = args.runs.clamp(1, 20);
    let _ = rustls::crypto::ring::default_provider().install_default();
    let repo = SampleRepo::new();
    let project = ProjectSpec::new("bench", &repo.url());
    let mut env = EnvSpec::new("bench");
    env.timeout_secs = 60;
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone()],
        environments: vec![env.clone()],
        lease_secs: 60,
        ..Default::default()
    })
    .await;
    let direct_image = format!("{}-direct", project.image());

    println!("run  gantry (webhook → healthy deployment)  direct (same Docker work)  ratio");
    let (mut gantry_times, mut direct_times) = (Vec::new(), Vec::new());
    let mut old: Option<String> = None;
    for i in 1..=runs {
        let page = format!("hello gantry {i}\n");
        let sha = repo.commit_file("index.html", &page, &format!("run {i}"));
        let started = Instant::now();
        let pipeline = stack.push(&project, "refs/heads/main", &sha).await;
        tokio::time::timeout(RUN_TIMEOUT, wait_for(&env.endpoint_url(), &page)).await??;
        let g = started.elapsed();
        let _ = pipeline;

        let page = format!("hello direct {i}\n");
        let sha = repo.commit_file("index.html", &page, &format!("direct run {i}"));
        let started = Instant::now();
        let id = direct(repo.path(), &sha, &direct_image, old.as_deref(), &page).await?;
        let d = started.elapsed();
        old = Some(id);

        println!(
            "{i:>3}  {:>10.2} s                          {:>10.2} s             {:.2}",
            g.as_secs_f64(),
            d.as_secs_f64(),
            g.as_secs_f64() / d.as_secs_f64()
        );
        gantry_times.push(g);
        direct_times.push(d);
    }
    if let Some(old) = old {
        let _ = docker(&["rm", "-f", &old]);
    }
    let (g, d) = (median(&mut gantry_times), median(&mut direct_times));
    println!(
        "median: gantry {:.2} s, direct {:.2} s, ratio {:.2} ({} runs)",
        g.as_secs_f64(),
        d.as_secs_f64(),
        g.as_secs_f64() / d.as_secs_f64(),
        runs
    );
    Ok(())
}
