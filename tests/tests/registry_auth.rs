//! Pushing to a registry that wants a login: the credentials of the
//! configuration are used, and wrong ones end the pipeline with
//! `image.publish_failed`. The registry is a real docker-registry with
//! htpasswd authentication, started on a free loopback port for this test.

use std::time::Duration;

use gantry_proto::v1::event::Payload;
use gantry_tests::auth_registry::{AuthRegistry, start_registry};
use gantry_tests::stack::{ProjectSpec, SECRET};
use gantry_tests::{SampleRepo, Stack, StackOptions, forge};

async fn publish(registry: &AuthRegistry, password: &str) -> (ProjectSpec, Payload) {
    let repo = SampleRepo::new();
    let mut project = ProjectSpec::new("private", &repo.url());
    project.registry = registry.host.clone();
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone()],
        lease_secs: 60,
        logins: vec![(registry.host.clone(), "ci".into(), password.into())],
        ..Default::default()
    })
    .await;
    let body = forge::gitlab_push(&project.gitlab, "refs/heads/main", &repo.head(), "main");
    let resp = stack
        .post_gitlab(&body, Some(SECRET), "Push Hook", None)
        .await;
    assert_eq!(resp.status(), 202);
    let answer: serde_json::Value = resp.json().await.expect("json");
    let pipeline = answer["pipeline_id"].as_str().expect("pipeline").to_owned();
    let seen = stack
        .wait_outcome(&pipeline, Duration::from_secs(180))
        .await;
    (project, seen.event.payload.expect("payload"))
}

#[tokio::test]
async fn pushes_with_the_configured_login_and_fails_clearly_without_it() {
    let registry = start_registry("ci", "s3cret-pass").await;

    let (project, outcome) = publish(&registry, "s3cret-pass").await;
    let Payload::ImagePublished(published) = outcome else {
        panic!("expected image.published, got {outcome:?}");
    };
    let manifest = gantry_tests::http()
        .head(format!(
            "http://{}/v2/{}/manifests/main",
            registry.host, project.image_path
        ))
        .basic_auth("ci", Some("s3cret-pass"))
        .header(
            "accept",
            "application/vnd.docker.distribution.manifest.v2+json",
        )
        .send()
        .await
        .expect("registry answers");
    assert_eq!(manifest.status(), 200);
    let digest = manifest
        .headers()
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    assert_eq!(digest.as_deref(), Some(published.digest.as_str()));

    // The tags other than the commit's were put by the publisher through the
    // registry API, with the same login.
    for tag in [published.tags[0].as_str(), "latest"] {
        let r = gantry_tests::http()
            .head(format!(
                "http://{}/v2/{}/manifests/{tag}",
                registry.host, project.image_path
            ))
            .basic_auth("ci", Some("s3cret-pass"))
            .header(
                "accept",
                "application/vnd.docker.distribution.manifest.v2+json",
            )
            .send()
            .await
            .expect("registry answers");
        assert_eq!(r.status(), 200, "{tag}");
    }

    let (_, outcome) = publish(&registry, "wrong-pass").await;
    let Payload::BuildFailed(failed) = outcome else {
        panic!("expected build.failed at push, got {outcome:?}");
    };
    assert_eq!(failed.step, "push");
    assert!(
        failed.reason.contains("unauthorized")
            || failed.reason.contains("authentication required")
            || failed.reason.contains("no basic auth"),
        "{}",
        failed.reason
    );
}
