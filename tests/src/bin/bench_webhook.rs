//! Webhook acceptance benchmark.
//!
//! Starts the real webhook-ingest (in-process, against the real Postgres and
//! RabbitMQ of `scripts/infra.sh`, in a fresh database and vhost) and a
//! baseline endpoint that reads the body and stores nothing, then offers each
//! the same GitLab push deliveries at a fixed rate (open loop: request i is
//! sent at start + i/rate whatever happened before) and prints acceptances
//! per second and p50/p99/max latency. Latency is measured from the scheduled
//! send time, so a server that falls behind is charged for the queueing.
//!
//!     cargo run --release -p gantry-tests --bin bench-webhook -- --rate 500 --seconds 10

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use gantry_tests::stack::{ProjectSpec, SECRET};
use gantry_tests::{Stack, StackOptions, forge};

#[derive(Parser)]
struct Args {
    /// Offered requests per second.
    #[arg(long, default_value_t = 300)]
    rate: u32,
    /// Seconds of load per endpoint (bounded: at most 60).
    #[arg(long, default_value_t = 10)]
    seconds: u32,
}

struct Figures {
    sent: usize,
    accepted: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
}

async fn offer(url: &str, rate: u32, seconds: u32, body: Arc<Vec<u8>>) -> Figures {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .build()
        .expect("client");
    let total = (rate * seconds) as usize;
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
    let start = Instant::now() + Duration::from_millis(200);
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..total {
        let scheduled = start + interval * i as u32;
        tokio::time::sleep_until(scheduled.into()).await;
        let (client, body, url) = (client.clone(), body.clone(), url.to_owned());
        tasks.spawn(async move {
            let resp = client
                .post(url)
                .header("content-type", "application/json")
                .header("x-gitlab-event", "Push Hook")
                .header("x-gitlab-token", SECRET)
                .header("x-gitlab-event-uuid", uuid::Uuid::new_v4().to_string())
                .body(body.as_ref().clone())
                .send()
                .await;
            let ok = matches!(&resp, Ok(r) if r.status().is_success());
            (ok, scheduled.elapsed())
        });
    }
    let mut latencies = Vec::with_capacity(total);
    let mut accepted = 0;
    while let Some(r) = tasks.join_next().await {
        let (ok, latency) = r.expect("request task");
        accepted += usize::from(ok);
        latencies.push(latency);
    }
    let elapsed = start.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    Figures {
        sent: total,
        accepted,
        elapsed,
        p50: pct(0.50),
        p99: pct(0.99),
        max: *latencies.last().expect("latencies"),
    }
}

fn print(name: &str, rate: u32, f: &Figures) {
    println!(
        "{name:<38} offered {rate:>5}/s  sent {:>6}  accepted {:>6}  {:>8.1} acceptances/s  p50 {:>8.2} ms  p99 {:>8.2} ms  max {:>8.2} ms",
        f.sent,
        f.accepted,
        f.accepted as f64 / f.elapsed.as_secs_f64(),
        f.p50.as_secs_f64() * 1e3,
        f.p99.as_secs_f64() * 1e3,
        f.max.as_secs_f64() * 1e3,
    );
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.rate > 0 && args.seconds > 0 && args.seconds <= 60,
        "rate > 0 and 0 < seconds <= 60"
    );
    gantry_tests::init();
    let project = ProjectSpec::new("bench", "file:///nonexistent");
    let stack = Stack::prepare(StackOptions {
        projects: vec![project.clone()],
        lease_secs: 60,
        ..Default::default()
    })
    .await;
    let config = gantry_config::GantryConfig::load(&stack.config_path)?;
    let settings = webhook_ingest::Settings {
        common: gantry_runtime::Common {
            infra: gantry_config::Infra {
                database_url: stack.database_url.clone(),
                amqp_url: stack.amqp_url.clone(),
                config: stack.config_path.clone(),
                tls: Default::default(),
            },
            http_addr: Some("127.0.0.1:0".into()),
            grpc_addr: Some("127.0.0.1:0".into()),
        },
        body_limit: 25 * 1024 * 1024,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let ingest = gantry_runtime::Built::<webhook_ingest::Service>::new(settings, config).await?;
    let ingest_url = format!("http://{}/hooks/gitlab", ingest.http_addr());
    let server = tokio::spawn(ingest.run_until_stopped(shutdown.clone()));

    let baseline = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let baseline_url = format!("http://{}/hooks/gitlab", baseline.local_addr()?);
    let router = axum::Router::new().route(
        "/hooks/gitlab",
        axum::routing::post(|_body: axum::body::Bytes| async {
            (
                axum::http::StatusCode::ACCEPTED,
                "{\"status\":\"accepted\"}",
            )
        }),
    );
    tokio::spawn(async move { axum::serve(baseline, router).await });

    let sha = "4b825dc642cb6eb9a060e54bf8d69288fbee4904";
    let body = Arc::new(serde_json::to_vec(&forge::gitlab_push(
        &project.gitlab,
        "refs/heads/main",
        sha,
        "main",
    ))?);
    println!(
        "webhook acceptance, {} s at a fixed offered rate, body {} bytes, {} cores",
        args.seconds,
        body.len(),
        std::thread::available_parallelism()?.get()
    );
    // Warm both up (connections, database pool, prepared statements).
    offer(&baseline_url, 50, 1, body.clone()).await;
    offer(&ingest_url, 50, 1, body.clone()).await;
    let base = offer(&baseline_url, args.rate, args.seconds, body.clone()).await;
    print("baseline (reads body, stores nothing)", args.rate, &base);
    let real = offer(&ingest_url, args.rate, args.seconds, body.clone()).await;
    print("webhook-ingest (stored + outbox)", args.rate, &real);

    shutdown.cancel();
    let _ = server.await;
    Ok(())
}
