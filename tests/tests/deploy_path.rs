//! The deploy and feedback path end to end: push → build → publish → a
//! healthy container behind the environment's endpoint, with commit statuses
//! on the forge and chat messages only when something changed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use gantry_proto::v1::deployments_client::DeploymentsClient;
use gantry_proto::v1::event::Payload;
use gantry_proto::v1::pipelines_client::PipelinesClient;
use gantry_proto::v1::{
    GetPipelineRequest, ListDeploymentsRequest, ListEnvironmentsRequest, ListPipelinesRequest,
    RollbackRequest,
};
use gantry_tests::metrics;
use gantry_tests::recorder::{Call, Recorder};
use gantry_tests::stack::ProjectSpec;
use gantry_tests::{EnvSpec, SampleRepo, Stack, StackOptions, docker};

const TIMEOUT: Duration = Duration::from_secs(180);

/// GETs the environment's endpoint with a fresh connection.
async fn answer(url: &str) -> Result<String, String> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()
        .map_err(|e| e.to_string())?;
    let r = client.get(url).send().await.map_err(|e| e.to_string())?;
    if !r.status().is_success() {
        return Err(format!("status {}", r.status()));
    }
    r.text().await.map_err(|e| e.to_string())
}

/// The gantry-managed containers of an environment.
fn containers(env: &EnvSpec) -> Vec<String> {
    docker::labelled(&format!("io.gantry.environment={}", env.name))
}

/// The environment's containers once only one is left (the old version gets
/// `docker stop`'s grace period; busybox httpd as PID 1 ignores SIGTERM).
async fn single_container(env: &EnvSpec) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let list = containers(env);
        if list.len() == 1 {
            return list[0].clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "containers left: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn start(
    repo: &SampleRepo,
    recorder: &Recorder,
    health: &str,
) -> (Stack, ProjectSpec, EnvSpec) {
    let project = ProjectSpec::new("web", &repo.url());
    let mut env = EnvSpec::new("web");
    env.health_http = Some(health.to_owned());
    env.timeout_secs = 10;
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone()],
        environments: vec![env.clone()],
        forge: Some(recorder.url.clone()),
        chat: vec![
            (
                "team".into(),
                "slack".into(),
                format!("{}/chat/slack", recorder.url),
            ),
            (
                "bot".into(),
                "webhook".into(),
                format!("{}/chat/hook", recorder.url),
            ),
        ],
        lease_secs: 60,
        ..Default::default()
    })
    .await;
    (stack, project, env)
}

/// The sample's Dockerfile, with or without the page the health check asks for.
fn with_health_page(health: bool) -> String {
    let extra = if health {
        "COPY health.html /www/health.html\n"
    } else {
        ""
    };
    gantry_tests::repo::dockerfile(extra, gantry_tests::repo::SERVE)
}

fn states(calls: &[Call], sha: &str, context: &str) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c.path.ends_with(sha) && c.body["name"] == context)
        .map(|c| c.body["state"].as_str().unwrap_or_default().to_owned())
        .collect()
}

#[tokio::test]
async fn push_deploys_replaces_without_gap_rolls_back_and_reports_once() {
    let recorder = Recorder::start().await;
    let repo = SampleRepo::new();
    std::fs::write(repo.path().join("health.html"), "ok\n").expect("health page");
    repo.commit_file("Dockerfile", &with_health_page(true), "add a health page");
    // The chat server fails at first: messages are retried, nothing else waits.
    recorder.fail_next("/chat/slack", 2);
    let (stack, project, env) = start(&repo, &recorder, "/health.html").await;
    let gitlab_statuses = format!("/api/v4/projects/team%2F{}/statuses/", "web");

    // 1. First push: deployed, answering v1 through the endpoint.
    let v1 = repo.head();
    let p1 = stack.push(&project, "refs/heads/main", &v1).await;
    let done = stack.wait_event(&p1, "deploy.succeeded", TIMEOUT).await;
    let Some(Payload::DeploySucceeded(ok)) = &done.event.payload else {
        panic!("expected deploy.succeeded, got {done:?}");
    };
    let d = ok.deployment.clone().unwrap_or_default();
    assert_eq!(d.environment, env.name);
    assert_eq!(d.revision.unwrap_or_default().commit_sha, v1);
    assert_eq!(
        answer(&env.endpoint_url()).await.as_deref(),
        Ok("hello v1\n")
    );
    let running = containers(&env);
    assert_eq!(running.len(), 1, "one container: {running:?}");
    assert_eq!(docker::label(&running[0], "io.gantry.commit"), v1);
    assert_eq!(docker::label(&running[0], "io.gantry.pipeline"), p1);
    assert_eq!(docker::label(&running[0], "io.gantry.project"), "web");

    // 2. Second push while a client keeps asking: no failed answer, and the
    // answers move from v1 to v2 once.
    let v2 = repo.commit_file("index.html", "hello v2\n", "v2");
    let stop = Arc::new(AtomicBool::new(false));
    let poller = {
        let (url, stop) = (env.endpoint_url(), stop.clone());
        tokio::spawn(async move {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                seen.push(answer(&url).await);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            seen
        })
    };
    let p2 = stack.push(&project, "refs/heads/main", &v2).await;
    stack.wait_event(&p2, "deploy.succeeded", TIMEOUT).await;
    // Keep asking while the old version drains and stops.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let seen = poller.await.expect("poller");
    let failures: Vec<_> = seen.iter().filter(|r| r.is_err()).collect();
    assert!(
        failures.is_empty(),
        "{} of {} answers failed: {failures:?}",
        failures.len(),
        seen.len()
    );
    let bodies: Vec<&str> = seen.iter().filter_map(|r| r.as_deref().ok()).collect();
    let first_v2 = bodies
        .iter()
        .position(|b| *b == "hello v2\n")
        .expect("v2 answered");
    assert!(
        bodies[..first_v2].iter().all(|b| *b == "hello v1\n"),
        "{bodies:?}"
    );
    assert!(
        bodies[first_v2..].iter().all(|b| *b == "hello v2\n"),
        "v1 came back: {bodies:?}"
    );
    assert!(
        first_v2 > 0,
        "the old version answered during the deployment"
    );
    let running = single_container(&env).await;
    assert_eq!(docker::label(&running, "io.gantry.commit"), v2);
    let direct = format!("http://{}:8080/", docker::ip(&running));
    assert_eq!(answer(&direct).await.as_deref(), Ok("hello v2\n"));

    // 3. An image that fails its health check: rolled back, v2 still answers.
    std::fs::remove_file(repo.path().join("health.html")).expect("rm health page");
    std::fs::write(repo.path().join("Dockerfile"), with_health_page(false)).expect("Dockerfile");
    let v3 = repo.commit_file("index.html", "hello v3\n", "v3 without health page");
    let p3 = stack.push(&project, "refs/heads/main", &v3).await;
    let back = stack.wait_event(&p3, "deploy.rolled_back", TIMEOUT).await;
    let Some(Payload::DeployRolledBack(rb)) = &back.event.payload else {
        panic!("expected deploy.rolled_back, got {back:?}");
    };
    assert!(rb.reason.contains("404"), "{}", rb.reason);
    let failed = stack.wait_event(&p3, "deploy.failed", TIMEOUT).await;
    assert!(matches!(
        failed.event.payload,
        Some(Payload::DeployFailed(_))
    ));
    assert_eq!(
        answer(&env.endpoint_url()).await.as_deref(),
        Ok("hello v2\n")
    );
    let running = containers(&env);
    assert_eq!(
        running.len(),
        1,
        "the failed container is removed: {running:?}"
    );
    assert_eq!(docker::label(&running[0], "io.gantry.commit"), v2);
    assert!(docker::running(&running[0]));

    // Deployments over gRPC: v2 is current; v3 is rolled back.
    let mut deployments = DeploymentsClient::new(stack.grpc("deployer").await);
    let envs = deployments
        .list_environments(ListEnvironmentsRequest {})
        .await
        .expect("list environments")
        .into_inner()
        .environments;
    let staging = envs
        .iter()
        .find(|e| e.name == env.name)
        .expect("environment listed");
    let current = staging.current.clone().expect("something runs");
    assert_eq!(current.commit_sha, v2);
    assert_eq!(staging.endpoint, format!("127.0.0.1:{}", env.endpoint));
    let history = deployments
        .list_deployments(ListDeploymentsRequest {
            environment: env.name.clone(),
            limit: 10,
        })
        .await
        .expect("list deployments")
        .into_inner()
        .deployments;
    let history: Vec<(&str, &str)> = history
        .iter()
        .map(|d| (d.commit_sha.as_str(), d.state.as_str()))
        .collect();
    assert_eq!(
        history,
        vec![
            (v3.as_str(), "rolled_back"),
            (v2.as_str(), "succeeded"),
            (v1.as_str(), "succeeded")
        ]
    );

    // 4. Two failing builds, then a fix: chat hears the first failure and the recovery only.
    let failing = "image:\n  dockerfile: Dockerfile\ntest:\n  - name: smoke\n    run: exit 3\n";
    std::fs::write(repo.path().join("health.html"), "ok\n").expect("health page");
    repo.commit_file(
        "Dockerfile",
        &with_health_page(true),
        "restore the health page",
    );
    let v4 = repo.commit_file(".gantry.yml", failing, "break the smoke test");
    let p4 = stack.push(&project, "refs/heads/main", &v4).await;
    stack.wait_event(&p4, "build.failed", TIMEOUT).await;
    let v5 = repo.commit_file("index.html", "hello v5\n", "still broken");
    let p5 = stack.push(&project, "refs/heads/main", &v5).await;
    stack.wait_event(&p5, "build.failed", TIMEOUT).await;
    let v6 = repo.commit_file(
        ".gantry.yml",
        gantry_tests::repo::PASSING_PIPELINE,
        "fix the smoke test",
    );
    let p6 = stack.push(&project, "refs/heads/main", &v6).await;
    stack.wait_event(&p6, "deploy.succeeded", TIMEOUT).await;
    assert_eq!(
        answer(&env.endpoint_url()).await.as_deref(),
        Ok("hello v5\n")
    );

    // Slack: deployed v1, deployed v2, rolled back v3, failed v4, recovered v6, deployed v6.
    recorder
        .wait_for("/chat/slack", Duration::from_secs(30), |c| c.len() >= 6)
        .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let slack = recorder
        .calls("/chat/slack")
        .into_iter()
        .map(|c| c.body["text"].as_str().unwrap_or_default().to_owned())
        .collect::<Vec<_>>();
    assert_eq!(slack.len(), 6, "{slack:#?}");
    let short = |sha: &str| sha[..12].to_owned();
    let about = |sha: &str, needle: &str| {
        slack
            .iter()
            .filter(|t| t.contains(&short(sha)) && t.contains(needle))
            .count()
    };
    assert_eq!(about(&v1, "now runs in"), 1, "{slack:#?}");
    assert_eq!(about(&v2, "now runs in"), 1, "{slack:#?}");
    assert_eq!(about(&v3, "rolled back"), 1, "{slack:#?}");
    assert_eq!(about(&v4, "failed at step *smoke*"), 1, "{slack:#?}");
    assert_eq!(
        about(&v5, "failed"),
        0,
        "no second failure message: {slack:#?}"
    );
    assert_eq!(about(&v6, "green again"), 1, "{slack:#?}");
    assert_eq!(about(&v6, "now runs in"), 1, "{slack:#?}");
    let failure = slack
        .iter()
        .find(|t| t.contains("failed at step"))
        .expect("failure message");
    assert!(
        failure.contains("Ada Lovelace &lt;ada@example.com&gt;"),
        "{failure}"
    );
    assert!(
        failure.contains(&format!("/pipelines/{p4}/log")),
        "{failure}"
    );
    // The generic webhook got the same six, as structured fields.
    let hook = recorder.calls("/chat/hook");
    let kinds: Vec<&str> = hook
        .iter()
        .map(|c| c.body["event"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(
        kinds,
        [
            "deploy.succeeded",
            "deploy.succeeded",
            "deploy.rolled_back",
            "pipeline.failed",
            "pipeline.recovered",
            "deploy.succeeded"
        ]
    );
    let failed_hook = hook
        .iter()
        .find(|c| c.body["event"] == "pipeline.failed")
        .expect("failure hook");
    assert_eq!(failed_hook.body["step"], "smoke");
    assert_eq!(failed_hook.body["author"], "Ada Lovelace");
    // The log link works and shows the failed step's output.
    let log_url = failed_hook.body["log_url"]
        .as_str()
        .expect("log url")
        .to_owned();
    let log = gantry_tests::http()
        .get(&log_url)
        .bearer_auth(gantry_tests::stack::tokens::READ)
        .send()
        .await
        .expect("log page")
        .text()
        .await
        .expect("log text");
    assert!(log.contains("exit 3") || log.contains("smoke"), "{log}");

    // GitLab commit statuses: pending → running → success/failed, with the pipeline link.
    let calls = recorder
        .wait_for(&gitlab_statuses, Duration::from_secs(30), |c| {
            states(c, &v6, &format!("gantry/deploy/{}", env.name)).contains(&"success".to_owned())
        })
        .await;
    assert_eq!(
        states(&calls, &v1, "gantry"),
        ["pending", "running", "success"]
    );
    assert_eq!(
        states(&calls, &v4, "gantry"),
        ["pending", "running", "failed"]
    );
    assert_eq!(
        states(&calls, &v3, &format!("gantry/deploy/{}", env.name)),
        ["running", "failed"]
    );
    let first = calls
        .iter()
        .find(|c| c.path.ends_with(&v1))
        .expect("a v1 status");
    assert_eq!(
        first
            .headers
            .get("private-token")
            .map(|v| v.to_str().unwrap_or_default()),
        Some(gantry_tests::stack::GITLAB_TOKEN)
    );
    assert!(
        first.body["target_url"]
            .as_str()
            .unwrap_or_default()
            .ends_with(&format!("/pipelines/{p1}")),
        "{:?}",
        first.body
    );
    assert_eq!(first.body["ref"], "main");
    // The project is on GitHub too, but the push came from GitLab: GitHub,
    // which may never have seen the commit, got nothing (its statuses would
    // have been queued with GitLab's, all of which have arrived).
    let github = recorder.calls("/repos/team/web/statuses/");
    assert!(github.is_empty(), "{github:?}");

    // Pipelines over gRPC.
    let mut pipelines = PipelinesClient::new(stack.grpc("notifier").await);
    let list = pipelines
        .list(ListPipelinesRequest {
            project: "web".into(),
            limit: 10,
        })
        .await
        .expect("list pipelines")
        .into_inner()
        .pipelines;
    assert_eq!(list.len(), 6);
    assert_eq!(list[0].pipeline_id, p6);
    assert_eq!(list[0].state, "success");
    let p4_row = list
        .iter()
        .find(|p| p.pipeline_id == p4)
        .expect("p4 listed");
    assert_eq!(p4_row.state, "failed");
    assert!(p4_row.failure.starts_with("smoke"), "{}", p4_row.failure);
    let detail = pipelines
        .get(GetPipelineRequest {
            pipeline_id: p3.clone(),
        })
        .await
        .expect("get pipeline")
        .into_inner();
    let kinds: Vec<&str> = detail.timeline.iter().map(|e| e.kind.as_str()).collect();
    for k in [
        "pipeline.requested",
        "build.started",
        "build.succeeded",
        "image.published",
        "deploy.started",
        "deploy.failed",
        "deploy.rolled_back",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    assert!(
        detail
            .pipeline
            .expect("summary")
            .deployments
            .contains(&format!("{}=rolled_back", env.name))
    );

    // 5. Rollback on request: back to the version before v6, which is v2.
    deployments
        .rollback(RollbackRequest {
            environment: env.name.clone(),
        })
        .await
        .expect("rollback queued");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if answer(&env.endpoint_url()).await.as_deref() == Ok("hello v2\n") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "rollback never answered v2"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 6. Every service's /metrics is Prometheus text, and what happened
    // shows: webhook answers, builds and their stages, deployments by
    // outcome, outgoing calls (the chat server failed twice), the queues.
    let mut all = Vec::new();
    for service in gantry_tests::stack::SERVICES {
        let samples = metrics::scrape(&stack, service).await;
        assert!(
            samples.iter().any(|s| s.name == "gantry_outbox_pending"),
            "{service}: no outbox gauge"
        );
        all.push((service, samples));
    }
    let of = |name: &str| &all.iter().find(|(s, _)| *s == name).expect("a service").1;
    let hooks: f64 = of("webhook-ingest")
        .iter()
        .filter(|s| s.name == "gantry_http_requests_total")
        .filter(|s| {
            s.labels
                .get("route")
                .is_some_and(|r| r.starts_with("/hooks/"))
        })
        .filter(|s| s.labels.get("status").is_some_and(|c| c.starts_with('2')))
        .map(|s| s.value)
        .sum();
    assert!(hooks >= 3.0, "webhook answers: {hooks}");
    assert!(
        metrics::total(
            of("webhook-ingest"),
            "gantry_http_request_duration_seconds_count",
            &[]
        ) >= 3.0
    );
    let builder = of("builder");
    assert!(
        metrics::total(
            builder,
            "gantry_builds_total",
            &[("kind", "build"), ("outcome", "succeeded")]
        ) >= 3.0
    );
    assert!(
        metrics::total(
            builder,
            "gantry_build_stage_duration_seconds_count",
            &[("stage", "build")]
        ) >= 3.0
    );
    assert!(
        builder.iter().any(|s| s.name == "gantry_queue_depth"
            && s.labels.get("queue").is_some_and(|q| q == "builds"))
    );
    let deployer = of("deployer");
    assert!(
        metrics::total(
            deployer,
            "gantry_deployments_total",
            &[("target", "docker"), ("outcome", "succeeded")]
        ) >= 2.0
    );
    assert!(
        metrics::total(
            deployer,
            "gantry_deployments_total",
            &[("outcome", "rolled_back")]
        ) >= 1.0
    );
    let notifier = of("notifier");
    assert!(
        metrics::total(
            notifier,
            "gantry_outbound_calls_total",
            &[("destination", "chat"), ("result", "failed")]
        ) >= 2.0
    );
    assert!(
        metrics::total(
            notifier,
            "gantry_outbound_calls_total",
            &[("result", "sent")]
        ) >= 1.0
    );
}

/// A deployed container killed behind Gantry's back: `environment.unhealthy`
/// and one chat message; started again: `environment.recovered`, one more.
#[tokio::test]
async fn a_deployed_container_that_dies_is_told_once_and_its_recovery_too() {
    let recorder = Recorder::start().await;
    let repo = SampleRepo::new();
    let (stack, project, env) = start(&repo, &recorder, "/index.html").await;
    let p1 = stack.push(&project, "refs/heads/main", &repo.head()).await;
    stack.wait_event(&p1, "deploy.succeeded", TIMEOUT).await;
    let container = single_container(&env).await;

    docker::kill(&container);
    let seen = stack
        .wait_event(&p1, "environment.unhealthy", TIMEOUT)
        .await;
    let Some(Payload::EnvironmentUnhealthy(u)) = &seen.event.payload else {
        panic!("expected environment.unhealthy, got {seen:?}");
    };
    assert_eq!(
        u.deployment.clone().unwrap_or_default().environment,
        env.name
    );
    assert!(u.reason.contains("exited"), "{u:?}");
    let envs = stack.cli(&["envs"]);
    let out = String::from_utf8_lossy(&envs.stdout);
    assert!(
        out.contains("UNHEALTHY since") && out.contains("exited"),
        "{out}"
    );

    docker::start(&container);
    stack
        .wait_event(&p1, "environment.recovered", TIMEOUT)
        .await;
    // The endpoint reaches it again, wherever the engine put it.
    assert_eq!(
        answer(&env.endpoint_url()).await.as_deref(),
        Ok("hello v1\n")
    );
    let said = |calls: &[Call], what: &str| {
        calls
            .iter()
            .filter(|c| c.body["text"].as_str().is_some_and(|t| t.contains(what)))
            .count()
    };
    let chat = recorder
        .wait_for("/chat/slack", TIMEOUT, |c| said(c, "is healthy again") > 0)
        .await;
    assert_eq!(said(&chat, "is unhealthy"), 1, "{chat:#?}");
    assert_eq!(said(&chat, "is healthy again"), 1, "{chat:#?}");
    let hook = recorder
        .wait_for("/chat/hook", TIMEOUT, |c| {
            c.iter().any(|c| c.body["event"] == "environment.recovered")
        })
        .await;
    assert_eq!(
        hook.iter()
            .filter(|c| c.body["event"] == "environment.unhealthy")
            .count(),
        1
    );
    let events: Vec<String> = stack
        .events()
        .into_iter()
        .filter(|s| s.routing_key.starts_with("environment."))
        .map(|s| s.routing_key)
        .collect();
    assert_eq!(events, ["environment.unhealthy", "environment.recovered"]);
    let envs = stack.cli(&["envs"]);
    let out = String::from_utf8_lossy(&envs.stdout);
    assert!(out.contains("    healthy since"), "{out}");

    // A new version is what the health is about once it runs (no event:
    // nothing changed for the team).
    let v2 = repo.commit_file("index.html", "hello v2\n", "v2");
    let p2 = stack.push(&project, "refs/heads/main", &v2).await;
    stack.wait_event(&p2, "deploy.succeeded", TIMEOUT).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let envs = stack.cli(&["envs"]);
        let out = String::from_utf8_lossy(&envs.stdout).into_owned();
        if out.contains(&format!("commit {}", &v2[..10])) && out.contains("    healthy since") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{out}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(
        stack
            .events()
            .iter()
            .filter(|s| s.routing_key.starts_with("environment."))
            .count(),
        2
    );
}
