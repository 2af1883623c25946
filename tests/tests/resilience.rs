//! Nothing accepted is lost: a builder killed in the middle of a build, and a
//! RabbitMQ restart (with a delivery accepted while the broker is down).

use std::process::Command;
use std::time::Duration;

use gantry_proto::v1::event::Payload;
use gantry_tests::{SampleRepo, Stack, registry};
use sqlx::Row as _;

const PIPELINE_TIMEOUT: Duration = Duration::from_secs(240);

#[tokio::test]
async fn killed_builder_mid_build_finishes_once_back() {
    let repo = SampleRepo::new();
    let sha = repo.commit_file(
        ".gantry.yml",
        "image:\n  dockerfile: Dockerfile\ntest:\n  - name: slow\n    run: echo slow step started; sleep 6; echo slow step done\n",
        "a slow test",
    );
    let (stack, project) = Stack::with_project(&repo, "slow", 3).await;
    let pipeline = stack.push(&project, "refs/heads/main", &sha).await;

    // Wait until the slow step runs, then crash the builder.
    let mut db = stack.db().await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let build_id: uuid::Uuid = loop {
        let row = sqlx::query(
            "SELECT b.id FROM builder.builds b JOIN builder.build_logs l ON l.build_id = b.id
             WHERE b.pipeline_id = $1 AND l.step = 'slow' AND l.stream = 'stdout' LIMIT 1",
        )
        .bind(&pipeline)
        .fetch_optional(&mut db)
        .await
        .expect("query");
        if let Some(row) = row {
            break row.get("id");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the slow step never started:\n{}",
            stack.log_tail("builder")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stack.kill("builder");
    assert!(
        stack
            .pipeline_events(&pipeline)
            .iter()
            .all(|s| s.routing_key != "build.succeeded"),
        "the build must not have finished before the crash"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.start_service("builder");

    let seen = stack.wait_outcome(&pipeline, PIPELINE_TIMEOUT).await;
    let Some(Payload::ImagePublished(published)) = &seen.event.payload else {
        panic!("expected image.published after the restart, got {seen:?}");
    };
    assert!(registry::tags(&project.image_path).await.contains(&sha));
    assert_eq!(
        registry::digest(&project.image_path, &sha).await.as_deref(),
        Some(published.digest.as_str())
    );
    let attempts: Vec<u32> = stack
        .pipeline_events(&pipeline)
        .iter()
        .filter_map(|s| match &s.event.payload {
            Some(Payload::BuildStarted(b)) => Some(b.attempt),
            _ => None,
        })
        .collect();
    assert_eq!(
        attempts,
        vec![1, 2],
        "the build was taken over by the restarted builder"
    );
    let row = sqlx::query("SELECT state, attempt FROM builder.builds WHERE id = $1")
        .bind(build_id)
        .fetch_one(&mut db)
        .await
        .expect("build row");
    assert_eq!(
        (
            row.get::<String, _>("state").as_str(),
            row.get::<i32, _>("attempt")
        ),
        ("succeeded", 2)
    );
    // The crashed attempt's test container was cleaned up.
    let left = Command::new("docker")
        .args([
            "ps",
            "-aq",
            "--filter",
            &format!("label=io.gantry.build={build_id}"),
        ])
        .output()
        .expect("docker ps");
    assert!(
        String::from_utf8_lossy(&left.stdout).trim().is_empty(),
        "leftover containers"
    );
}

/// Runs an infrastructure command (rabbitmqctl, pg_ctlcluster, ...) and checks it worked.
fn run(args: &[&str]) {
    let out = Command::new(args[0])
        .args(&args[1..])
        .output()
        .expect("rabbitmq command runs");
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn services_reconnect_after_a_rabbitmq_restart_without_losing_deliveries() {
    let repo = SampleRepo::new();
    let (stack, project) = Stack::with_project(&repo, "hello", 60).await;
    let pids: Vec<Option<u32>> = gantry_tests::stack::SERVICES
        .iter()
        .map(|s| stack.pid(s))
        .collect();

    // Stop the broker: deliveries are still accepted (stored in the outbox).
    run(&["rabbitmqctl", "-q", "shutdown"]);
    let sha = repo.commit_file("index.html", "hello while the broker is down\n", "v2");
    let during = stack.push(&project, "refs/heads/main", &sha).await;
    let ready = gantry_tests::http()
        .get(stack.ingest_url("/ready"))
        .send()
        .await
        .expect("ready answers");
    assert_eq!(ready.status(), 503, "not ready without the broker");

    // Start it again; nobody restarts the services.
    run(&["rabbitmq-server", "-detached"]);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    while Command::new("rabbitmqctl")
        .args(["-q", "await_startup", "--timeout", "5"])
        .status()
        .map(|s| !s.success())
        .unwrap_or(true)
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rabbitmq did not come back"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let seen = stack.wait_outcome(&during, PIPELINE_TIMEOUT).await;
    assert_eq!(
        seen.routing_key, "image.published",
        "the delivery accepted while the broker was down went through"
    );

    // And new deliveries flow as before.
    for s in gantry_tests::stack::SERVICES {
        stack.wait_ready(s).await;
    }
    let sha = repo.commit_file("index.html", "hello after the restart\n", "v3");
    let after = stack.push(&project, "refs/heads/main", &sha).await;
    let seen = stack.wait_outcome(&after, PIPELINE_TIMEOUT).await;
    assert_eq!(seen.routing_key, "image.published");
    assert!(registry::tags(&project.image_path).await.contains(&sha));

    let now: Vec<Option<u32>> = gantry_tests::stack::SERVICES
        .iter()
        .map(|s| stack.pid(s))
        .collect();
    assert_eq!(pids, now, "no service was restarted");
}

#[tokio::test]
async fn undecodable_event_is_dead_lettered_and_the_pipeline_goes_on() {
    use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
    let repo = SampleRepo::new();
    let (stack, project) = Stack::with_project(&repo, "hello", 60).await;

    let conn = lapin::Connection::connect(&stack.amqp_url, lapin::ConnectionProperties::default())
        .await
        .expect("amqp");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    ch.basic_publish(
        gantry_bus::EXCHANGE.into(),
        "pipeline.requested".into(),
        BasicPublishOptions::default(),
        b"\xff\xffnot protobuf",
        lapin::BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .expect("publish")
    .await
    .expect("confirmed");

    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let dead = loop {
        if let Some(msg) = ch
            .basic_get(
                gantry_bus::DEAD_LETTER_QUEUE.into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .expect("get")
        {
            break msg;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "nothing reached the dead-letter queue"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(dead.delivery.data, b"\xff\xffnot protobuf");
    assert_eq!(dead.delivery.routing_key.as_str(), "pipeline.requested");

    let pipeline = stack.push(&project, "refs/heads/main", &repo.head()).await;
    assert_eq!(
        stack
            .wait_outcome(&pipeline, PIPELINE_TIMEOUT)
            .await
            .routing_key,
        "image.published"
    );
}

#[tokio::test]
async fn a_database_crash_mid_build_loses_nothing() {
    let repo = SampleRepo::new();
    let sha = repo.commit_file(
        ".gantry.yml",
        "test:\n  - name: slow\n    run: echo slow step started; sleep 5\n",
        "a slow test",
    );
    let (stack, project) = Stack::with_project(&repo, "slow", 3).await;
    let pipeline = stack.push(&project, "refs/heads/main", &sha).await;
    stack
        .wait_event(&pipeline, "build.started", Duration::from_secs(60))
        .await;

    // Crash Postgres (immediate shutdown, no checkpoint) while the build runs.
    run(&["pg_ctlcluster", "15", "main", "stop", "-m", "immediate"]);
    tokio::time::sleep(Duration::from_secs(2)).await;
    run(&["pg_ctlcluster", "15", "main", "start"]);

    let seen = stack.wait_outcome(&pipeline, PIPELINE_TIMEOUT).await;
    assert_eq!(seen.routing_key, "image.published", "{seen:?}");
    assert!(registry::tags(&project.image_path).await.contains(&sha));
    // The accepted delivery and its pipeline survived the crash.
    let mut db = stack.db().await;
    let n: i64 = sqlx::query("SELECT count(*) AS n FROM ingest.deliveries")
        .fetch_one(&mut db)
        .await
        .expect("count")
        .get("n");
    assert_eq!(n, 1);
}
