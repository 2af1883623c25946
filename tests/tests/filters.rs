//! `only:`/`except:` of `.gantry.yml`: a push that changed only excluded
//! paths is skipped, recorded with its reason and reported as skipped (no
//! status left pending); the changed files are those of the whole push, so
//! a push whose last commit touches only docs still builds when an earlier
//! one touched code.

use std::time::Duration;

use gantry_proto::v1::GetPipelineRequest;
use gantry_proto::v1::event::Payload;
use gantry_proto::v1::pipelines_client::PipelinesClient;
use gantry_tests::recorder::Recorder;
use gantry_tests::repo::PASSING_PIPELINE;
use gantry_tests::stack::ProjectSpec;
use gantry_tests::{SampleRepo, Stack, StackOptions};

const TIMEOUT: Duration = Duration::from_secs(180);

#[tokio::test]
async fn a_push_that_changes_only_excluded_paths_is_skipped_and_says_why() {
    let repo = SampleRepo::new();
    let recorder = Recorder::start().await;
    let project = ProjectSpec::new("web", &repo.url());
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone()],
        forge: Some(recorder.url.clone()),
        lease_secs: 60,
        ..Default::default()
    })
    .await;
    let main = "refs/heads/main";

    // The first push of the branch: nothing to compare with, so it builds.
    let rules = format!("{PASSING_PIPELINE}except:\n  changes: [\"docs/**\", \"*.md\"]\n");
    let c0 = repo.commit_file(".gantry.yml", &rules, "build unless only docs change");
    let p0 = stack.push(&project, main, &c0).await;
    let end = stack.wait_outcome(&p0, TIMEOUT).await;
    assert_eq!(end.routing_key, "image.published", "{end:?}");

    // Only documentation: skipped, with the rule that said so.
    repo.write("docs/guide.md", "How to use it\n");
    repo.write("README.md", "Read me\n");
    let c1 = repo.commit("docs");
    let p1 = stack.push_from(&project, main, &c0, &c1).await;
    let end = stack.wait_outcome(&p1, TIMEOUT).await;
    let reason = match end.event.payload {
        Some(Payload::BuildSkipped(s)) => s.reason,
        other => panic!("not skipped: {other:?}"),
    };
    assert_eq!(
        reason,
        "every file the push changed matches `except.changes` (2 files changed)"
    );
    assert!(
        !stack
            .pipeline_events(&p1)
            .iter()
            .any(|s| s.routing_key == "image.published"),
        "a skipped pipeline published an image"
    );
    let mut pipelines = PipelinesClient::new(stack.grpc("notifier").await);
    let got = pipelines
        .get(GetPipelineRequest {
            pipeline_id: p1.clone(),
        })
        .await
        .expect("get pipeline")
        .into_inner();
    let summary = got.pipeline.expect("pipeline");
    assert_eq!(summary.state, "skipped");
    assert!(summary.failure.contains("except.changes"), "{summary:?}");
    // GitLab hears "skipped" last for the commit: nothing stays pending.
    let statuses = format!("/api/v4/projects/team%2Fweb/statuses/{c1}");
    let calls = recorder
        .wait_for(&statuses, TIMEOUT, |calls| {
            calls.iter().any(|c| c.body["state"] == "skipped")
        })
        .await;
    let last = calls
        .iter()
        .rfind(|c| c.body["name"] == "gantry")
        .expect("a status");
    assert_eq!(last.body["state"], "skipped");
    assert!(
        last.body["description"]
            .as_str()
            .unwrap_or_default()
            .starts_with("Skipped: every file"),
        "{:?}",
        last.body
    );
    let logs = stack.cli(&["logs", &p1]);
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(text.contains(&format!("skipped: {reason}")), "{text}");

    // Two commits in one push: code, then docs only. The push changed code,
    // so it builds (the last commit alone would have been skipped).
    std::fs::write(repo.path().join("index.html"), "hello again\n").expect("page");
    let c2 = repo.commit("code");
    repo.write("docs/more.md", "More\n");
    let c3 = repo.commit("more docs");
    let p2 = stack.push_from(&project, main, &c1, &c3).await;
    let end = stack.wait_outcome(&p2, TIMEOUT).await;
    assert_eq!(end.routing_key, "image.published", "{end:?}");
    assert_ne!(c2, c3);
}
