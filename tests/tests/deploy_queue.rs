//! How deployments of one environment queue up, how the image's own health
//! check decides, and what happens when the deployer dies mid-deployment.

use std::time::Duration;

use gantry_proto::v1::deployments_client::DeploymentsClient;
use gantry_proto::v1::{DeployRequest, ListDeploymentsRequest};
use gantry_tests::repo::{SERVE, dockerfile};
use gantry_tests::stack::ProjectSpec;
use gantry_tests::{EnvSpec, SampleRepo, Stack, StackOptions, docker};

const TIMEOUT: Duration = Duration::from_secs(180);

async fn stack(repo: &SampleRepo, env: &EnvSpec, lease_secs: u64) -> (Stack, ProjectSpec) {
    let project = ProjectSpec::new("web", &repo.url());
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone()],
        environments: vec![env.clone()],
        lease_secs,
        ..Default::default()
    })
    .await;
    (stack, project)
}

async fn body(url: &str) -> Option<String> {
    reqwest::get(url).await.ok()?.text().await.ok()
}

/// Position of the first event `key` of `pipeline` in the broker's order.
fn position(stack: &Stack, pipeline: &str, key: &str) -> Option<usize> {
    stack
        .events()
        .iter()
        .position(|s| s.event.pipeline_id == pipeline && s.routing_key == key)
}

#[tokio::test]
async fn images_published_during_a_deployment_wait_and_only_the_newest_goes_out() {
    let repo = SampleRepo::new();
    let mut env = EnvSpec::new("web");
    env.timeout_secs = 90;
    let (stack, project) = stack(&repo, &env, 60).await;

    // A: slow to come up, so that B and C are published while it deploys.
    let a = repo.commit_file(
        "Dockerfile",
        &dockerfile(
            "",
            "[\"sh\", \"-c\", \"sleep 20; exec httpd -f -p 8080 -h /www\"]",
        ),
        "A starts slowly",
    );
    let pa = stack.push(&project, "refs/heads/main", &a).await;
    stack.wait_event(&pa, "deploy.started", TIMEOUT).await;

    std::fs::write(repo.path().join("index.html"), "hello B\n").expect("page");
    let b = repo.commit_file("Dockerfile", &dockerfile("", SERVE), "B");
    let pb = stack.push(&project, "refs/heads/main", &b).await;
    stack.wait_event(&pb, "image.published", TIMEOUT).await;
    let c = repo.commit_file("index.html", "hello C\n", "C");
    let pc = stack.push(&project, "refs/heads/main", &c).await;
    stack.wait_event(&pc, "image.published", TIMEOUT).await;
    assert!(
        position(&stack, &pa, "deploy.succeeded").is_none(),
        "A finished before B and C were published; the test proves nothing"
    );

    stack.wait_event(&pc, "deploy.succeeded", TIMEOUT).await;
    let a_done = position(&stack, &pa, "deploy.succeeded").expect("A deployed");
    let c_started = position(&stack, &pc, "deploy.started").expect("C started");
    assert!(a_done < c_started, "C started before A finished");
    assert_eq!(
        position(&stack, &pb, "deploy.started"),
        None,
        "B was deployed"
    );
    assert_eq!(
        body(&env.endpoint_url()).await.as_deref(),
        Some("hello C\n")
    );

    // The deployer's own record: B superseded, A and C never overlapping.
    let mut deployments = DeploymentsClient::new(stack.grpc("deployer").await);
    let list = deployments
        .list_deployments(ListDeploymentsRequest {
            environment: env.name.clone(),
            limit: 10,
        })
        .await
        .expect("list deployments")
        .into_inner()
        .deployments;
    let by_commit = |sha: &str| {
        list.iter()
            .find(|d| d.commit_sha == sha)
            .map(|d| d.state.clone())
            .unwrap_or_default()
    };
    assert_eq!(by_commit(&a), "succeeded");
    assert_eq!(by_commit(&b), "superseded");
    assert_eq!(by_commit(&c), "succeeded");
    let mut db = stack.db().await;
    let apart: bool = sqlx::query_scalar(
        "SELECT (SELECT finished_at FROM deployer.deployments WHERE pipeline_id = $1)
             <= (SELECT started_at FROM deployer.deployments WHERE pipeline_id = $2)",
    )
    .bind(&pa)
    .bind(&pc)
    .fetch_one(&mut db)
    .await
    .expect("deployment times");
    assert!(apart, "C started before A finished");

    // A manual deploy of B (never deployed) goes out on request.
    deployments
        .deploy(DeployRequest {
            environment: env.name.clone(),
            image: b[..10].to_owned(),
        })
        .await
        .expect("deploy B");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while body(&env.endpoint_url()).await.as_deref() != Some("hello B\n") {
        assert!(tokio::time::Instant::now() < deadline, "B never answered");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_images_own_healthcheck_decides_without_a_probe() {
    let repo = SampleRepo::new();
    let mut env = EnvSpec::new("web");
    env.health_http = None;
    env.timeout_secs = 30;
    let (stack, project) = stack(&repo, &env, 60).await;
    let check = |path: &str| {
        format!(
            "HEALTHCHECK --interval=1s --timeout=2s --retries=2 CMD [\"wget\", \"-q\", \"-O\", \"/dev/null\", \"http://127.0.0.1:8080/{path}\"]\n"
        )
    };
    let good = repo.commit_file(
        "Dockerfile",
        &dockerfile(&check("index.html"), SERVE),
        "healthy",
    );
    let p1 = stack.push(&project, "refs/heads/main", &good).await;
    stack.wait_event(&p1, "deploy.succeeded", TIMEOUT).await;

    repo.commit_file("index.html", "hello v2\n", "v2");
    let bad = repo.commit_file(
        "Dockerfile",
        &dockerfile(&check("missing.html"), SERVE),
        "unhealthy",
    );
    let p2 = stack.push(&project, "refs/heads/main", &bad).await;
    let back = stack.wait_event(&p2, "deploy.rolled_back", TIMEOUT).await;
    let Some(gantry_proto::v1::event::Payload::DeployRolledBack(rb)) = &back.event.payload else {
        panic!("expected deploy.rolled_back, got {back:?}");
    };
    assert!(rb.reason.contains("unhealthy"), "{}", rb.reason);
    assert_eq!(
        body(&env.endpoint_url()).await.as_deref(),
        Some("hello v1\n")
    );
    let left = docker::labelled(&format!("io.gantry.environment={}", env.name));
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(docker::label(&left[0], "io.gantry.commit"), good);

    // The same image is not deployed again automatically: another delivery
    // (a redelivered hook, say) builds and publishes it, and the deployer leaves it.
    let body = gantry_tests::forge::gitlab_push(&project.gitlab, "refs/heads/main", &bad, "main");
    let p3 = gantry_tests::accepted_pipeline(
        stack
            .post_gitlab(
                &body,
                Some(gantry_tests::stack::SECRET),
                "Push Hook",
                Some("second-delivery"),
            )
            .await,
    )
    .await;
    stack.wait_event(&p3, "image.published", TIMEOUT).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(position(&stack, &p3, "deploy.started"), None);
}

#[tokio::test]
async fn a_deployment_cut_by_a_deployer_crash_is_taken_over() {
    let repo = SampleRepo::new();
    let mut env = EnvSpec::new("web");
    env.timeout_secs = 60;
    let (stack, project) = stack(&repo, &env, 5).await;
    let slow = repo.commit_file(
        "Dockerfile",
        &dockerfile(
            "",
            "[\"sh\", \"-c\", \"sleep 8; exec httpd -f -p 8080 -h /www\"]",
        ),
        "slow start",
    );
    let p = stack.push(&project, "refs/heads/main", &slow).await;
    stack.wait_event(&p, "deploy.started", TIMEOUT).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stack.kill("deployer");
    stack.start_service("deployer");
    stack.wait_ready("deployer").await;

    stack.wait_event(&p, "deploy.succeeded", TIMEOUT).await;
    assert_eq!(
        body(&env.endpoint_url()).await.as_deref(),
        Some("hello v1\n")
    );
    // The first attempt's container was removed before the second started.
    let left = docker::labelled(&format!("io.gantry.environment={}", env.name));
    assert_eq!(left.len(), 1, "{left:?}");
    let attempts = stack
        .events()
        .iter()
        .filter(|s| s.event.pipeline_id == p && s.routing_key == "deploy.started")
        .count();
    assert_eq!(attempts, 2);
}

#[tokio::test]
async fn a_pull_that_fails_does_not_block_the_image() {
    let repo = SampleRepo::new();
    let env = EnvSpec::new("web");
    let (stack, project) = stack(&repo, &env, 60).await;
    // The image is published while no deployer runs, then vanishes from the
    // registry and the engine before the deployer pulls it.
    stack.kill("deployer");
    let sha = repo.head();
    let p1 = stack.push(&project, "refs/heads/main", &sha).await;
    let seen = stack.wait_event(&p1, "image.published", TIMEOUT).await;
    let Some(gantry_proto::v1::event::Payload::ImagePublished(published)) = &seen.event.payload
    else {
        panic!("expected image.published, got {seen:?}");
    };
    let deleted = gantry_tests::http()
        .delete(format!(
            "http://{}/v2/{}/manifests/{}",
            project.registry, project.image_path, published.digest
        ))
        .send()
        .await
        .expect("registry answers");
    assert_eq!(deleted.status(), 202, "manifest deleted");
    let built = docker::image_id(&format!("{}:{sha}", project.image()));
    docker::remove_image(&built);
    stack.start_service("deployer");
    stack.wait_ready("deployer").await;

    let failed = stack.wait_event(&p1, "deploy.failed", TIMEOUT).await;
    let Some(gantry_proto::v1::event::Payload::DeployFailed(f)) = &failed.event.payload else {
        panic!("expected deploy.failed, got {failed:?}");
    };
    assert!(f.reason.contains("4 pulls failed"), "{}", f.reason);
    assert_eq!(position(&stack, &p1, "deploy.rolled_back"), None);

    // Not the image's fault: once it is back, it is deployed automatically.
    let body = gantry_tests::forge::gitlab_push(&project.gitlab, "refs/heads/main", &sha, "main");
    let p2 = gantry_tests::accepted_pipeline(
        stack
            .post_gitlab(
                &body,
                Some(gantry_tests::stack::SECRET),
                "Push Hook",
                Some("again"),
            )
            .await,
    )
    .await;
    stack.wait_event(&p2, "deploy.succeeded", TIMEOUT).await;
    assert_eq!(body_of(&env).await.as_deref(), Some("hello v1\n"));
}

async fn body_of(env: &EnvSpec) -> Option<String> {
    body(&env.endpoint_url()).await
}
