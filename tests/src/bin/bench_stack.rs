//! Stack-run benchmark: how much Gantry adds to an integration run of a
//! stack over the same work done by hand with docker-compose.
//!
//! The sample stack (`api`, `web`, `tests`; see `gantry_tests::stack_sample`)
//! runs two ways, alternately:
//! - **Gantry**: a push of a new stack commit (a GitLab webhook to the five
//!   real services, against the real Postgres, RabbitMQ, Docker engine and
//!   registry of scripts/infra.sh), timed from the POST until
//!   `stack.run_passed` is on the bus: queueing, checkout, the compose file
//!   checked and written, pulls, up, health, tests, logs, teardown.
//! - **by hand**: `docker-compose` on the compose file of the last release
//!   (the same images, health checks and network), the way a person would:
//!   `up -d` of `api` and `web`, wait until both are healthy (Debian's
//!   docker-compose 1.29 has no `--wait`), `up -d` of `tests`, wait for its
//!   exit code, `down -v`.
//!
//! It prints each run, the medians and their ratio. The service binaries
//! must be built with the same profile first:
//!
//!     cargo build --release --bins && target/release/bench-stack --runs 5

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use clap::Parser;
use gantry_tests::stack::ProjectSpec;
use gantry_tests::stack_sample::{Shop, release};
use gantry_tests::{Stack, StackOptions, docker};

#[derive(Parser)]
struct Args {
    /// Runs of each path (bounded: at most 20).
    #[arg(long, default_value_t = 5)]
    runs: u32,
}

/// How long one run may take before the benchmark gives up.
const RUN_TIMEOUT: Duration = Duration::from_secs(300);
/// How often the by-hand path looks at health and exit (as the builder does).
const POLL: Duration = Duration::from_millis(500);

fn run(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output()?;
    anyhow::ensure!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn compose(file: &Path, project: &str, args: &[&str]) -> anyhow::Result<String> {
    run(Command::new("docker-compose")
        .arg("-p")
        .arg(project)
        .arg("-f")
        .arg(file)
        .args(args))
}

/// The by-hand path; returns how long it took.
async fn by_hand(file: &Path, project: &str) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let outcome = async {
        compose(file, project, &["up", "-d", "--no-color", "api", "web"])?;
        let deadline = Instant::now() + RUN_TIMEOUT;
        for service in ["api", "web"] {
            let id = compose(file, project, &["ps", "-q", service])?;
            loop {
                let health = run(Command::new("docker").args([
                    "inspect",
                    "-f",
                    "{{.State.Health.Status}}",
                    &id,
                ]))?;
                if health == "healthy" {
                    break;
                }
                anyhow::ensure!(
                    health != "unhealthy" && Instant::now() < deadline,
                    "{service} is {health}"
                );
                tokio::time::sleep(POLL).await;
            }
        }
        compose(
            file,
            project,
            &["up", "-d", "--no-color", "--no-deps", "tests"],
        )?;
        let id = compose(file, project, &["ps", "-q", "tests"])?;
        let code = run(Command::new("docker").args(["wait", &id]))?;
        anyhow::ensure!(code == "0", "tests exited with {code}");
        anyhow::Ok(())
    }
    .await;
    compose(file, project, &["down", "-v", "-t", "5"])?;
    outcome?;
    Ok(started.elapsed())
}

/// The Gantry path: a push of a new stack commit until its run passed.
async fn with_gantry(
    stack: &Stack,
    shop: &gantry_tests::SampleRepo,
    spec: &ProjectSpec,
    i: u32,
) -> anyhow::Result<Duration> {
    let sha = shop.commit_file("notes.txt", &format!("run {i}\n"), &format!("run {i}"));
    let started = Instant::now();
    let pipeline = stack.push(spec, "refs/heads/main", &sha).await;
    let seen = stack
        .wait_event(&pipeline, "stack.run_passed", RUN_TIMEOUT)
        .await;
    anyhow::ensure!(seen.routing_key == "stack.run_passed");
    Ok(started.elapsed())
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

/// The last release's compose file without Gantry's labels (the builder's
/// sweep would take containers labelled with a finished build for its own).
async fn release_compose(stack: &Stack) -> anyhow::Result<serde_json::Value> {
    let mut db = stack.db().await;
    let text: String = sqlx::query_scalar(
        "SELECT compose FROM deployer.stack_releases ORDER BY number DESC LIMIT 1",
    )
    .fetch_one(&mut db)
    .await?;
    let mut compose: serde_json::Value = serde_json::from_str(&text)?;
    if let Some(services) = compose["services"].as_object_mut() {
        for service in services.values_mut() {
            if let Some(s) = service.as_object_mut() {
                s.remove("labels");
            }
        }
    }
    if let Some(n) = compose["networks"]["default"].as_object_mut() {
        n.remove("labels");
    }
    Ok(compose)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runs = args.runs.clamp(1, 20);
    let Shop {
        tests_image,
        api,
        web,
        shop,
        api_spec,
        web_spec,
        shop_spec,
    } = Shop::new("gantry-bench");
    let stack = Stack::start(StackOptions {
        projects: vec![api_spec.clone(), web_spec.clone(), shop_spec.clone()],
        lease_secs: 30,
        ..Default::default()
    })
    .await;
    release(&stack, &api_spec, &api, "api v1\n").await;
    release(&stack, &web_spec, &web, "web v1\n").await;
    // Warm-up: the first run learns the members and pulls their images.
    with_gantry(&stack, &shop, &shop_spec, 0).await?;
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("compose.json");
    std::fs::write(
        &file,
        serde_json::to_vec_pretty(&release_compose(&stack).await?)?,
    )?;
    let project = format!(
        "gantry-bench-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    by_hand(&file, &project).await?;

    let (mut gantry, mut hand) = (Vec::new(), Vec::new());
    for i in 1..=runs {
        let g = with_gantry(&stack, &shop, &shop_spec, i).await?;
        let h = by_hand(&file, &project).await?;
        println!(
            "run {i}: gantry {:>6} ms   by hand {:>6} ms",
            g.as_millis(),
            h.as_millis()
        );
        gantry.push(g);
        hand.push(h);
    }
    let (g, h) = (median(gantry), median(hand));
    println!(
        "median of {runs}: gantry {} ms, by hand (docker-compose) {} ms, ratio {:.2} (overhead {} ms)",
        g.as_millis(),
        h.as_millis(),
        g.as_secs_f64() / h.as_secs_f64(),
        g.as_millis() as i64 - h.as_millis() as i64
    );
    docker::remove_image(&tests_image);
    Ok(())
}
