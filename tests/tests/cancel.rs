//! Cancellation: a newer push to a branch cancels the older pushes'
//! unfinished builds (their containers stop, their pipelines end canceled
//! with "superseded by <sha>" in the status, the timeline and the log); the
//! default branch builds every push; a build can be canceled by hand. (The
//! builder of these tests runs one build at a time.)

use std::time::Duration;

use gantry_proto::v1::builds_client::BuildsClient;
use gantry_proto::v1::event::Payload;
use gantry_proto::v1::pipelines_client::PipelinesClient;
use gantry_proto::v1::{GetBuildsRequest, GetPipelineRequest};
use gantry_tests::recorder::Recorder;
use gantry_tests::repo::PASSING_PIPELINE;
use gantry_tests::stack::ProjectSpec;
use gantry_tests::{EnvSpec, SampleRepo, Stack, StackOptions, docker};

const TIMEOUT: Duration = Duration::from_secs(180);

/// A pipeline file whose test step runs until it is stopped.
const ENDLESS: &str =
    "image:\n  dockerfile: Dockerfile\ntest:\n  - name: endless\n    run: sleep 600\n";

/// The build id of a pipeline once its build has started.
async fn started(stack: &Stack, pipeline: &str) -> String {
    match stack
        .wait_event(pipeline, "build.started", TIMEOUT)
        .await
        .event
        .payload
    {
        Some(Payload::BuildStarted(b)) => b.build_id,
        other => panic!("not build.started: {other:?}"),
    }
}

/// The `build.canceled` of a pipeline: (build id, reason, superseded by).
async fn canceled(stack: &Stack, pipeline: &str) -> (String, String, String) {
    match stack
        .wait_event(pipeline, "build.canceled", TIMEOUT)
        .await
        .event
        .payload
    {
        Some(Payload::BuildCanceled(c)) => {
            let commit = c.revision.map(|r| r.commit_sha).unwrap_or_default();
            assert!(!commit.is_empty(), "build.canceled without its revision");
            (c.build_id, c.reason, c.superseded_by)
        }
        other => panic!("not build.canceled: {other:?}"),
    }
}

/// Waits until no container of `build` is left.
async fn containers_gone(build: &str) {
    docker::wait_none_labelled(&format!("io.gantry.build={build}")).await;
}

#[tokio::test]
async fn newer_pushes_cancel_older_builds_of_their_branch_and_builds_cancel_by_hand() {
    let repo = SampleRepo::new();
    let recorder = Recorder::start().await;
    let project = ProjectSpec::new("web", &repo.url());
    let mut env = EnvSpec::new("web");
    env.rules = "[{branch: 'feature/*'}]".into();
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone()],
        environments: vec![env.clone()],
        forge: Some(recorder.url.clone()),
        // Long: a canceled build must stop at once, not at its next renewal.
        lease_secs: 120,
        ..Default::default()
    })
    .await;
    let branch = "refs/heads/feature/lögin";
    repo.branch("feature/lögin");

    // Three quick pushes to a feature branch; the first two never end on
    // their own.
    let c1 = repo.commit_file(".gantry.yml", ENDLESS, "one");
    let p1 = stack.push(&project, branch, &c1).await;
    let b1 = started(&stack, &p1).await;
    std::fs::write(repo.path().join("index.html"), "hello two\n").expect("page");
    let c2 = repo.commit("two");
    let p2 = stack.push(&project, branch, &c2).await;
    let (canceled_b1, reason1, by1) = canceled(&stack, &p1).await;
    assert_eq!(canceled_b1, b1);
    assert_eq!(reason1, format!("superseded by {}", &c2[..12]));
    assert_eq!(by1, c2);
    let c3 = repo.commit_file(".gantry.yml", PASSING_PIPELINE, "three");
    let p3 = stack.push(&project, branch, &c3).await;
    let (b2, reason2, by2) = canceled(&stack, &p2).await;
    assert_eq!(reason2, format!("superseded by {}", &c3[..12]));
    assert_eq!(by2, c3);

    // The last one is built, published and deployed.
    let end = stack.wait_outcome(&p3, TIMEOUT).await;
    assert_eq!(end.routing_key, "image.published", "{end:?}");
    stack.wait_event(&p3, "deploy.succeeded", TIMEOUT).await;
    let page = reqwest::get(env.endpoint_url())
        .await
        .expect("endpoint answers")
        .text()
        .await
        .expect("page");
    assert!(page.contains("hello two"), "{page}");

    // Nothing of the canceled builds is left.
    containers_gone(&b1).await;
    containers_gone(&b2).await;

    // The pipeline says so, its timeline and log say why, and GitLab got
    // "canceled" with the reason as the commit's last status.
    let mut pipelines = PipelinesClient::new(stack.grpc("notifier").await);
    let got = pipelines
        .get(GetPipelineRequest {
            pipeline_id: p1.clone(),
        })
        .await
        .expect("get pipeline")
        .into_inner();
    let summary = got.pipeline.expect("pipeline");
    assert_eq!(summary.state, "canceled");
    assert!(summary.failure.contains("superseded by"), "{summary:?}");
    assert!(
        got.timeline
            .iter()
            .any(|t| t.kind == "build.canceled" && t.summary.contains("superseded by")),
        "{:?}",
        got.timeline
    );
    let logs = stack.cli(&["logs", &p1]);
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(text.contains(&format!("canceled: {reason1}")), "{text}");
    let statuses = format!("/api/v4/projects/team%2Fweb/statuses/{c1}");
    let calls = recorder
        .wait_for(&statuses, TIMEOUT, |calls| {
            calls.iter().any(|c| c.body["state"] == "canceled")
        })
        .await;
    let last = calls
        .iter()
        .rfind(|c| c.body["name"] == "gantry")
        .expect("a status");
    assert_eq!(last.body["state"], "canceled");
    assert_eq!(last.body["ref"], "feature/lögin");
    assert!(
        last.body["description"]
            .as_str()
            .unwrap_or_default()
            .contains("superseded by"),
        "{:?}",
        last.body
    );

    // The default branch builds every push: a second push does not cancel
    // the first one's build...
    repo.switch("main");
    let c4 = repo.commit_file(".gantry.yml", ENDLESS, "four");
    let p4 = stack.push(&project, "refs/heads/main", &c4).await;
    let b4 = started(&stack, &p4).await;
    let c5 = repo.commit_file(".gantry.yml", PASSING_PIPELINE, "five");
    let p5 = stack.push(&project, "refs/heads/main", &c5).await;
    // p5's build is stored (it waits: the builder here runs one build at a
    // time); had its push superseded p4, p4 would have been canceled in the
    // same transaction.
    let mut builds = BuildsClient::new(stack.grpc("builder").await);
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while builds_of(&mut builds, &p5).await.is_empty() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "p5 was never queued"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let p4_builds = builds_of(&mut builds, &p4).await;
    assert_eq!(p4_builds.len(), 1);
    assert_eq!(p4_builds[0].state, "running", "{p4_builds:?}");

    // ... but it can be canceled by hand, once.
    let out = stack.cli(&["cancel", &p4, "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(answer["build_id"], b4.as_str());
    assert_eq!(answer["state"], "canceled");
    let (_, reason4, by4) = canceled(&stack, &p4).await;
    assert_eq!(reason4, "canceled by admin");
    assert!(by4.is_empty());
    containers_gone(&b4).await;
    let again = stack.cli(&["cancel", &p4]);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(stderr.contains("already ended: canceled"), "{stderr}");
    let watch = stack.cli(&["watch", &p4]);
    assert!(!watch.status.success());
    let stderr = String::from_utf8_lossy(&watch.stderr);
    assert!(
        stderr.contains("was canceled: canceled by admin"),
        "{stderr}"
    );

    // The build that waited behind it runs now.
    let end = stack.wait_outcome(&p5, TIMEOUT).await;
    assert_eq!(end.routing_key, "image.published", "{end:?}");
}

async fn builds_of(
    client: &mut BuildsClient<gantry_proto::client::Authed>,
    pipeline: &str,
) -> Vec<gantry_proto::v1::BuildInfo> {
    client
        .get_builds(GetBuildsRequest {
            pipeline_id: pipeline.to_owned(),
        })
        .await
        .expect("get builds")
        .into_inner()
        .builds
}
