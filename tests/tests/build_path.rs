//! The build path end to end: webhook → build → test → publish, across the
//! real services, RabbitMQ, Postgres, Docker engine and registry.

use std::time::Duration;

use gantry_proto::v1::event::Payload;
use gantry_tests::stack::{ProjectSpec, SECRET};
use gantry_tests::{SampleRepo, Stack, StackOptions, accepted_pipeline, forge, registry};

const PIPELINE_TIMEOUT: Duration = Duration::from_secs(180);

/// The registry holds exactly `tags` (besides others) for the image, all at `digest`.
async fn assert_published(project: &ProjectSpec, tags: &[&str], digest: &str) {
    let present = registry::tags(&project.image_path).await;
    for tag in tags {
        assert!(
            present.iter().any(|t| t == tag),
            "tag {tag} missing from {present:?}"
        );
        assert_eq!(
            registry::digest(&project.image_path, tag).await.as_deref(),
            Some(digest),
            "digest of {tag}"
        );
    }
}

#[tokio::test]
async fn gitlab_push_publishes_sha_branch_and_latest_in_one_trace() {
    let repo = SampleRepo::new();
    let (stack, project) = Stack::with_project(&repo, "hello", 60).await;
    let sha = repo.head();
    let body = forge::gitlab_push(&project.gitlab, "refs/heads/main", &sha, "main");
    let pipeline = accepted_pipeline(
        stack
            .post_gitlab(&body, Some(SECRET), "Push Hook", Some("uuid-main-1"))
            .await,
    )
    .await;

    let seen = stack.wait_outcome(&pipeline, PIPELINE_TIMEOUT).await;
    let Some(Payload::ImagePublished(published)) = &seen.event.payload else {
        panic!("expected image.published, got {seen:?}");
    };
    assert_eq!(published.repository, project.image());
    assert_eq!(
        published.tags,
        vec![sha.clone(), "main".into(), "latest".into()]
    );
    assert!(
        published.digest.starts_with("sha256:"),
        "{}",
        published.digest
    );
    assert_published(&project, &[&sha, "main", "latest"], &published.digest).await;

    // Every hop carried the pipeline id and one trace.
    let events = stack.pipeline_events(&pipeline);
    let kinds: Vec<&str> = events.iter().map(|s| s.routing_key.as_str()).collect();
    for k in [
        "pipeline.requested",
        "build.started",
        "build.succeeded",
        "image.published",
    ] {
        assert!(kinds.contains(&k), "{k} missing from {kinds:?}");
    }
    let trace_ids: std::collections::HashSet<String> = events
        .iter()
        .map(|s| {
            assert_eq!(s.correlation_id.as_deref(), Some(pipeline.as_str()));
            assert_eq!(s.message_id.as_deref(), Some(s.event.id.as_str()));
            let tp = s
                .traceparent
                .as_deref()
                .unwrap_or_else(|| panic!("{} has no traceparent", s.routing_key));
            gantry_telemetry::trace_id(tp)
                .expect("valid traceparent")
                .to_owned()
        })
        .collect();
    assert_eq!(
        trace_ids.len(),
        1,
        "one trace per pipeline, got {trace_ids:?}"
    );

    // The test steps' output is stored and served by Builds.StreamLogs.
    let mut client =
        gantry_proto::v1::builds_client::BuildsClient::new(stack.grpc("builder").await);
    let mut stream = client
        .stream_logs(gantry_proto::v1::StreamLogsRequest {
            pipeline_id: pipeline.clone(),
            follow: true,
            ..Default::default()
        })
        .await
        .expect("StreamLogs")
        .into_inner();
    let mut steps = std::collections::BTreeSet::new();
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(30), stream.message())
        .await
        .expect("stream ends for a finished build")
        .expect("chunk")
    {
        steps.insert(chunk.step);
    }
    for s in ["checkout", "build", "content", "unprivileged"] {
        assert!(steps.contains(s), "no log of step {s}: {steps:?}");
    }
}

#[tokio::test]
async fn gitlab_tag_push_publishes_semver() {
    let repo = SampleRepo::new();
    let (stack, project) = Stack::with_project(&repo, "hello", 60).await;
    repo.tag("v1.4.2");
    let sha = repo.head();
    let body = forge::gitlab_push(&project.gitlab, "refs/tags/v1.4.2", &sha, "main");
    let pipeline = accepted_pipeline(
        stack
            .post_gitlab(&body, Some(SECRET), "Tag Push Hook", Some("uuid-tag-1"))
            .await,
    )
    .await;
    let seen = stack.wait_outcome(&pipeline, PIPELINE_TIMEOUT).await;
    let Some(Payload::ImagePublished(published)) = &seen.event.payload else {
        panic!("expected image.published, got {seen:?}");
    };
    assert_eq!(published.tags, vec![sha.clone(), "1.4.2".into()]);
    assert_published(&project, &[&sha, "1.4.2"], &published.digest).await;
    assert!(
        !registry::tags(&project.image_path)
            .await
            .contains(&"latest".to_owned())
    );
}

#[tokio::test]
async fn github_push_of_a_feature_branch_publishes_sanitised_branch_tag() {
    let repo = SampleRepo::new();
    let (stack, project) = Stack::with_project(&repo, "hello", 60).await;
    repo.branch("feature/login");
    let sha = repo.commit_file("index.html", "hello login\n", "login page");
    let body = serde_json::to_vec(&forge::github_push(
        &project.github,
        "refs/heads/feature/login",
        &sha,
        "main",
    ))
    .expect("json");
    let pipeline = accepted_pipeline(
        stack
            .post_github(&body, Some(SECRET), "push", "gh-delivery-1")
            .await,
    )
    .await;
    let seen = stack.wait_outcome(&pipeline, PIPELINE_TIMEOUT).await;
    let Some(Payload::ImagePublished(published)) = &seen.event.payload else {
        panic!("expected image.published, got {seen:?}");
    };
    assert_eq!(published.tags, vec![sha.clone(), "feature-login".into()]);
    assert_published(&project, &[&sha, "feature-login"], &published.digest).await;
    let requested = stack
        .wait_event(&pipeline, "pipeline.requested", Duration::from_secs(5))
        .await;
    let Some(Payload::PipelineRequested(req)) = requested.event.payload else {
        panic!()
    };
    let rev = req.revision.expect("revision");
    assert_eq!(
        (rev.source.as_str(), rev.author_name.as_str()),
        ("github", "Grace Hopper")
    );
}

#[tokio::test]
async fn failing_test_step_publishes_nothing_and_names_the_step() {
    let repo = SampleRepo::new();
    let (stack, project) = Stack::with_project(&repo, "hello", 60).await;
    let sha = repo.commit_file(
        ".gantry.yml",
        "image:\n  dockerfile: Dockerfile\ntest:\n  - name: content\n    run: grep -q hello /www/index.html\n  - name: smoke\n    run: echo checking; exit 3\n",
        "break the smoke test",
    );
    let pipeline = stack.push(&project, "refs/heads/main", &sha).await;
    let seen = stack.wait_outcome(&pipeline, PIPELINE_TIMEOUT).await;
    let Some(Payload::BuildFailed(failed)) = &seen.event.payload else {
        panic!("expected build.failed, got {seen:?}");
    };
    assert_eq!(
        (failed.step.as_str(), failed.exit_code),
        ("smoke", 3),
        "{failed:?}"
    );
    // The failed image is untagged locally, so the engine can prune it.
    let tag = format!("gantry-build/hello:{}", failed.build_id);
    let inspect = std::process::Command::new("docker")
        .args(["image", "inspect", &tag])
        .output()
        .expect("docker");
    assert!(!inspect.status.success(), "{tag} should be gone");
    // Nothing reaches the registry, even after the publisher had time to act.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(registry::tags(&project.image_path).await.is_empty());
    assert!(
        stack
            .pipeline_events(&pipeline)
            .iter()
            .all(|s| s.routing_key != "image.published")
    );
}

#[tokio::test]
async fn broken_or_missing_pipeline_file_fails_with_file_line_and_column() {
    let repo = SampleRepo::new();
    let (stack, project) = Stack::with_project(&repo, "hello", 60).await;
    let sha = repo.commit_file(
        ".gantry.yml",
        "image:\n  dockerfile: Dockerfile\ntest:\n  - name: unit\n    command: true\n",
        "typo",
    );
    let pipeline = stack.push(&project, "refs/heads/main", &sha).await;
    let seen = stack.wait_outcome(&pipeline, PIPELINE_TIMEOUT).await;
    let Some(Payload::BuildFailed(failed)) = &seen.event.payload else {
        panic!("expected build.failed, got {seen:?}");
    };
    assert_eq!(failed.step, "config");
    assert!(
        failed.reason.starts_with(".gantry.yml:5:5: "),
        "{}",
        failed.reason
    );
    assert!(failed.reason.contains("command"), "{}", failed.reason);

    std::fs::remove_file(repo.path().join(".gantry.yml")).expect("rm");
    let sha = repo.commit_file("index.html", "hello again\n", "drop the pipeline file");
    let pipeline = stack.push(&project, "refs/heads/main", &sha).await;
    let Some(Payload::BuildFailed(failed)) = stack
        .wait_outcome(&pipeline, PIPELINE_TIMEOUT)
        .await
        .event
        .payload
    else {
        panic!("expected build.failed");
    };
    assert_eq!(failed.step, "config");
    assert!(
        failed.reason.starts_with(".gantry.yml:1:1: not found"),
        "{}",
        failed.reason
    );
}

#[tokio::test]
async fn repeated_delivery_starts_no_second_pipeline() {
    let repo = SampleRepo::new();
    let (stack, project) = Stack::with_project(&repo, "hello", 60).await;
    let body = forge::gitlab_push(&project.gitlab, "refs/heads/main", &repo.head(), "main");
    let first = accepted_pipeline(
        stack
            .post_gitlab(&body, Some(SECRET), "Push Hook", Some("same-uuid"))
            .await,
    )
    .await;
    for _ in 0..3 {
        let resp = stack
            .post_gitlab(&body, Some(SECRET), "Push Hook", Some("same-uuid"))
            .await;
        assert_eq!(resp.status(), 200);
        let answer: serde_json::Value = resp.json().await.expect("json");
        assert_eq!(
            (answer["status"].as_str(), answer["pipeline_id"].as_str()),
            (Some("duplicate"), Some(first.as_str()))
        );
    }
    // An Idempotency-Key deduplicates too, whatever the forge headers say.
    let keyed = |uuid: &'static str| {
        gantry_tests::http()
            .post(stack.ingest_url("/hooks/gitlab"))
            .header("x-gitlab-event", "Push Hook")
            .header("x-gitlab-token", SECRET)
            .header("x-gitlab-event-uuid", uuid)
            .header("idempotency-key", "retry-of-delivery-7")
            .json(&body)
            .send()
    };
    let k = accepted_pipeline(keyed("uuid-a").await.expect("post")).await;
    let again = keyed("uuid-b").await.expect("post");
    assert_eq!(again.status(), 200);
    // GitHub deliveries are deduplicated by X-GitHub-Delivery.
    let gh = serde_json::to_vec(&forge::github_push(
        &project.github,
        "refs/heads/main",
        &repo.head(),
        "main",
    ))
    .expect("json");
    let a = accepted_pipeline(stack.post_github(&gh, Some(SECRET), "push", "gh-1").await).await;
    let again = stack.post_github(&gh, Some(SECRET), "push", "gh-1").await;
    assert_eq!(again.status(), 200);

    for p in [&first, &k, &a] {
        stack.wait_outcome(p, PIPELINE_TIMEOUT).await;
    }
    let requested = stack
        .events()
        .iter()
        .filter(|s| s.routing_key == "pipeline.requested")
        .count();
    assert_eq!(requested, 3, "one pipeline per distinct delivery");
    use sqlx::Row as _;
    let mut db = stack.db().await;
    let row = sqlx::query("SELECT count(*) AS n FROM ingest.pipelines")
        .fetch_one(&mut db)
        .await
        .expect("count");
    assert_eq!(row.get::<i64, _>("n"), 3);
    let builds = sqlx::query("SELECT count(*) AS n FROM builder.builds")
        .fetch_one(&mut db)
        .await
        .expect("count");
    assert_eq!(builds.get::<i64, _>("n"), 3);
}

#[tokio::test]
async fn manual_trigger_over_grpc_builds_the_ref() {
    let repo = SampleRepo::new();
    let (stack, project) = Stack::with_project(&repo, "hello", 60).await;
    let mut client =
        gantry_proto::v1::ingest_client::IngestClient::new(stack.grpc("webhook-ingest").await);
    let answer = client
        .trigger(gantry_proto::v1::TriggerRequest {
            project: project.name.clone(),
            r#ref: "main".into(),
        })
        .await
        .expect("Trigger")
        .into_inner();
    assert_eq!(
        (answer.commit_sha.as_str(), answer.git_ref.as_str()),
        (repo.head().as_str(), "refs/heads/main")
    );
    let seen = stack
        .wait_outcome(&answer.pipeline_id, PIPELINE_TIMEOUT)
        .await;
    assert_eq!(seen.routing_key, "image.published");

    let missing = client
        .trigger(gantry_proto::v1::TriggerRequest {
            project: project.name.clone(),
            r#ref: "no-such-branch".into(),
        })
        .await
        .expect_err("unknown ref");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let unknown = client
        .trigger(gantry_proto::v1::TriggerRequest {
            project: "nope".into(),
            r#ref: "main".into(),
        })
        .await
        .expect_err("unknown project");
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn builder_replicas_share_the_work() {
    let repo = SampleRepo::new();
    let (stack, project) = Stack::with_project(&repo, "hello", 60).await;
    stack.start_instance("builder", "builder-2");
    stack.wait_ready("builder-2").await;
    let mut pipelines = Vec::new();
    for i in 0..4 {
        let sha = repo.commit_file(
            ".gantry.yml",
            &format!("test:\n  - name: work\n    run: sleep 2; echo build {i}\n"),
            &format!("change {i}"),
        );
        let body = forge::gitlab_push(&project.gitlab, "refs/heads/main", &sha, "main");
        pipelines.push(
            accepted_pipeline(
                stack
                    .post_gitlab(&body, Some(SECRET), "Push Hook", None)
                    .await,
            )
            .await,
        );
    }
    for p in &pipelines {
        assert_eq!(
            stack.wait_outcome(p, PIPELINE_TIMEOUT).await.routing_key,
            "image.published"
        );
    }
    use sqlx::Row as _;
    let mut db = stack.db().await;
    let rows = sqlx::query("SELECT owner, attempt FROM builder.builds")
        .fetch_all(&mut db)
        .await
        .expect("builds");
    assert_eq!(rows.len(), 4);
    let replicas: std::collections::BTreeSet<String> = rows
        .iter()
        .map(|r| {
            assert_eq!(r.get::<i32, _>("attempt"), 1, "each build ran once");
            let worker: String = r.get("owner");
            worker
                .rsplit_once('-')
                .expect("instance-suffix")
                .0
                .to_owned()
        })
        .collect();
    assert_eq!(
        replicas,
        ["builder".to_owned(), "builder-2".to_owned()].into(),
        "both replicas built"
    );
}

#[tokio::test]
async fn unreachable_registry_fails_the_build_at_its_push_step() {
    let repo = SampleRepo::new();
    let mut project = ProjectSpec::new("hello", &repo.url());
    project.registry = "127.0.0.1:9".into(); // discard port: nothing listens there
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone()],
        lease_secs: 60,
        expect_unready: vec!["registry-publisher"],
        ..Default::default()
    })
    .await;
    // The publisher says it cannot work without its registry.
    let ready = stack
        .http_client()
        .get(stack.http_url("registry-publisher", "/ready"))
        .send()
        .await
        .expect("ready answers");
    assert_eq!(ready.status(), 503);
    let body: serde_json::Value = ready.json().await.expect("json");
    assert_eq!(body["checks"]["registry"], false, "{body}");
    let pipeline = stack.push(&project, "refs/heads/main", &repo.head()).await;
    let seen = stack.wait_outcome(&pipeline, PIPELINE_TIMEOUT).await;
    let Some(Payload::BuildFailed(failed)) = &seen.event.payload else {
        panic!("expected build.failed, got {seen:?}");
    };
    assert_eq!(failed.step, "push");
    assert!(
        failed
            .reason
            .starts_with(&format!("2 pushes to {} failed", project.image())),
        "{}",
        failed.reason
    );
    assert!(
        stack
            .pipeline_events(&pipeline)
            .iter()
            .all(|s| s.routing_key != "image.published")
    );
}

#[tokio::test]
async fn checkout_build_and_timeout_failures_name_their_step() {
    let repo = SampleRepo::new();
    let gone = ProjectSpec::new("gone", "file:///nonexistent/repository");
    let project = ProjectSpec::new("hello", &repo.url());
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone(), gone.clone()],
        lease_secs: 60,
        ..Default::default()
    })
    .await;
    async fn failure(stack: &Stack, gitlab: &str, sha: &str) -> gantry_proto::v1::BuildFailed {
        let body = forge::gitlab_push(gitlab, "refs/heads/main", sha, "main");
        let pipeline = accepted_pipeline(
            stack
                .post_gitlab(&body, Some(SECRET), "Push Hook", None)
                .await,
        )
        .await;
        match stack
            .wait_outcome(&pipeline, PIPELINE_TIMEOUT)
            .await
            .event
            .payload
        {
            Some(Payload::BuildFailed(f)) => f,
            other => panic!("expected build.failed, got {other:?}"),
        }
    }

    let f = failure(&stack, &gone.gitlab, &repo.head()).await;
    assert_eq!(f.step, "checkout", "{f:?}");
    assert!(f.reason.contains("git fetch failed"), "{}", f.reason);

    let sha = repo.commit_file(
        "Dockerfile",
        "FROM scratch\nCOPY no-such-file /x\n",
        "broken Dockerfile",
    );
    let f = failure(&stack, &project.gitlab, &sha).await;
    assert_eq!(f.step, "build", "{f:?}");
    assert!(f.reason.contains("no-such-file"), "{}", f.reason);

    repo.commit_file(
        "Dockerfile",
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\n",
        "fix Dockerfile",
    );
    let sha = repo.commit_file(
        ".gantry.yml",
        "test:\n  - name: hangs\n    run: sleep 30\n    timeout: 1\n",
        "a step that hangs",
    );
    let f = failure(&stack, &project.gitlab, &sha).await;
    assert_eq!(f.step, "hangs", "{f:?}");
    assert!(f.reason.contains("timed out after 1s"), "{}", f.reason);
}

#[tokio::test]
async fn stream_logs_follows_a_running_build_until_it_ends() {
    let repo = SampleRepo::new();
    let (stack, project) = Stack::with_project(&repo, "hello", 60).await;
    let sha = repo.commit_file(
        ".gantry.yml",
        "test:\n  - name: talk\n    run: echo first line; sleep 3; echo second line\n",
        "a step that talks slowly",
    );
    let pipeline = stack.push(&project, "refs/heads/main", &sha).await;
    stack
        .wait_event(&pipeline, "build.started", Duration::from_secs(60))
        .await;

    let mut client =
        gantry_proto::v1::builds_client::BuildsClient::new(stack.grpc("builder").await);
    let mut stream = client
        .stream_logs(gantry_proto::v1::StreamLogsRequest {
            pipeline_id: pipeline.clone(),
            follow: true,
            ..Default::default()
        })
        .await
        .expect("StreamLogs")
        .into_inner();
    let mut text = String::new();
    let mut finished_when_first_line_came = None;
    while let Some(chunk) = tokio::time::timeout(Duration::from_secs(120), stream.message())
        .await
        .expect("the stream moves")
        .expect("chunk")
    {
        if chunk.step == "talk" {
            text.push_str(&String::from_utf8_lossy(&chunk.data));
        }
        if finished_when_first_line_came.is_none() && text.contains("first line") {
            let done = stack
                .pipeline_events(&pipeline)
                .iter()
                .any(|s| s.routing_key == "build.succeeded");
            finished_when_first_line_came = Some(done);
        }
    }
    assert_eq!(
        finished_when_first_line_came,
        Some(false),
        "the first line arrived while the build ran"
    );
    assert!(text.contains("second line"), "{text}");
    // The stream ended because the build did.
    let done = stack
        .wait_event(&pipeline, "build.succeeded", Duration::from_secs(10))
        .await;
    assert_eq!(done.event.pipeline_id, pipeline);
}
