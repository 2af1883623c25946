//! The Rancher 1.6 target against a server that speaks the v2-beta API of
//! services (`gantry_tests::rancher`): a healthy upgrade ends with
//! `finishupgrade` and the launch configuration sent keeps every field but
//! the image (sidekicks included); an unhealthy one ends with `rollback`,
//! the old image still the service's; a refused API key (401) and a refused
//! upgrade (422 with Rancher's code) are failures that say so, and a
//! service someone else is upgrading is left alone.

use gantry_proto::v1::event::Payload;
use gantry_tests::rancher::FakeRancher;
use gantry_tests::stack::ProjectSpec;
use gantry_tests::{SampleRepo, Stack, StackOptions};
use serde_json::json;

/// The launch configuration the service has before Gantry touches it.
fn launch_config() -> serde_json::Value {
    json!({
        "imageUuid": "docker:registry.example.com/team/hello:2026-11-01",
        "environment": { "DATABASE_URL": "postgres://db/hello", "LOG_LEVEL": "info" },
        "labels": { "io.rancher.container.pull_image": "always", "team": "web" },
        "ports": ["8080:8080/tcp"],
        "healthCheck": {
            "port": 8080, "requestLine": "GET /health HTTP/1.0", "interval": 2000,
            "responseTimeout": 2000, "healthyThreshold": 2, "unhealthyThreshold": 3,
            "strategy": "recreate"
        },
        "dataVolumes": ["/srv/hello:/data"],
        "memory": 268435456,
        "networkMode": "managed",
        "tty": false
    })
}

#[tokio::test]
async fn rancher_services_are_upgraded_finished_or_rolled_back() {
    let rancher = FakeRancher::start("shop", "hello", launch_config()).await;
    let repo = SampleRepo::new();
    let project = ProjectSpec::new("web", &repo.url());
    let env = |name: &str, rules: &str, secret: &str| {
        format!(
            "  - name: {name}\n    project: web\n    target: rancher\n    rules: {rules}\n    health: {{timeout_secs: 5}}\n    rancher:\n      url: {}\n      project: 1a5\n      stack: shop\n      service: hello\n      access_key: {}\n      secret_key: {{value: '{secret}'}}\n      batch_size: 2\n      interval_millis: 500\n",
            rancher.url, rancher.access_key
        )
    };
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone()],
        lease_secs: 60,
        config_extra: format!(
            "environments:\n{}{}",
            env("production", "[{branch: main}]", &rancher.secret_key),
            env("wrong-key", "[{tag: 'v*'}]", "not-the-secret-key"),
        ),
        ..Default::default()
    })
    .await;

    // 1. A healthy upgrade: upgrade, wait, finish.
    let c1 = repo.head();
    let p1 = stack.push(&project, "refs/heads/main", &c1).await;
    let end = stack.deploy_end("production", 0, "deploy.succeeded").await;
    assert_eq!(end.event.pipeline_id, p1);
    let Some(Payload::DeploySucceeded(ok)) = &end.event.payload else {
        unreachable!()
    };
    let digest = ok.deployment.clone().unwrap_or_default().digest;
    assert_eq!(ok.deployment.clone().unwrap_or_default().target, "rancher");
    let calls = rancher.calls();
    let upgrades: Vec<_> = calls
        .iter()
        .filter(|c| c.uri.ends_with("?action=upgrade"))
        .collect();
    assert_eq!(upgrades.len(), 1, "{calls:#?}");
    assert_eq!(
        upgrades[0].uri,
        "/v2-beta/projects/1a5/services/1s12?action=upgrade"
    );
    let strategy = &upgrades[0].body["inServiceStrategy"];
    let image = format!("docker:{}@{digest}", project.image());
    let mut expected = launch_config();
    expected["imageUuid"] = json!(image);
    assert_eq!(
        strategy["launchConfig"], expected,
        "every field kept but the image"
    );
    assert_eq!(strategy["secondaryLaunchConfigs"][0]["name"], "log-shipper");
    assert_eq!(strategy["startFirst"], true);
    assert_eq!(strategy["batchSize"], 2);
    assert_eq!(strategy["intervalMillis"], 500);
    let actions: Vec<&str> = calls
        .iter()
        .filter_map(|c| c.uri.split("?action=").nth(1))
        .collect();
    assert_eq!(actions, ["upgrade", "finishupgrade"]);
    assert_eq!(rancher.service()["state"], "active");
    assert_eq!(rancher.service()["launchConfig"]["imageUuid"], image);

    // 2. The new containers fail Rancher's health checks: rolled back.
    rancher.fail_next_upgrade();
    let c2 = repo.commit_file("index.html", "hello v2\n", "v2");
    stack.push(&project, "refs/heads/main", &c2).await;
    let end = stack
        .deploy_end("production", 1, "deploy.rolled_back")
        .await;
    assert!(end.reason().contains("unhealthy"), "{end:?}");
    assert!(end.reason().contains("rolled the service back"), "{end:?}");
    let actions: Vec<String> = rancher
        .calls()
        .iter()
        .filter_map(|c| c.uri.split("?action=").nth(1).map(str::to_owned))
        .collect();
    assert_eq!(actions, ["upgrade", "finishupgrade", "upgrade", "rollback"]);
    assert_eq!(
        rancher.service()["launchConfig"]["imageUuid"],
        image,
        "the old image runs"
    );

    // An upgrade that never settles: canceled (Cattle rolls back only an
    // upgraded or canceled upgrade), then rolled back.
    rancher.stall_next_upgrade();
    let c3 = repo.commit_file("index.html", "hello v3\n", "v3");
    stack.push(&project, "refs/heads/main", &c3).await;
    let end = stack
        .deploy_end("production", 2, "deploy.rolled_back")
        .await;
    assert!(end.reason().contains("within 5s"), "{end:?}");
    let actions: Vec<String> = rancher
        .calls()
        .iter()
        .filter_map(|c| c.uri.split("?action=").nth(1).map(str::to_owned))
        .collect();
    assert_eq!(
        actions[4..],
        ["upgrade", "cancelupgrade", "rollback"],
        "{actions:?}"
    );
    assert_eq!(rancher.service()["launchConfig"]["imageUuid"], image);

    // 3. Rancher refuses the upgrade (422): a failure naming its code.
    rancher.refuse_next_upgrade("InvalidReference", "Image docker:… not found");
    let deploy = stack.cli(&["deploy", "production", &c1]);
    assert!(deploy.status.success(), "{deploy:?}");
    let end = stack.deploy_end("production", 3, "deploy.failed").await;
    assert!(
        end.reason()
            .contains("422 InvalidReference: Image docker:… not found"),
        "{end:?}"
    );

    // 4. Someone else's upgrade is under way: left alone.
    rancher.set_state("upgrading");
    let before = rancher.calls().len();
    let deploy = stack.cli(&["deploy", "production", &c1]);
    assert!(deploy.status.success(), "{deploy:?}");
    let end = stack.deploy_end("production", 4, "deploy.failed").await;
    assert!(end.reason().contains("is upgrading, not active"), "{end:?}");
    assert!(
        rancher.calls()[before..].iter().all(|c| c.method == "GET"),
        "nothing changed on Rancher"
    );
    rancher.set_state("active");

    // 5. A wrong API key: 401, said plainly.
    let deploy = stack.cli(&["deploy", "wrong-key", &c1]);
    assert!(deploy.status.success(), "{deploy:?}");
    let end = stack.deploy_end("wrong-key", 0, "deploy.failed").await;
    assert!(end.reason().contains("refused the API key"), "{end:?}");

    // 6. The environment's configuration reaches the launch configuration;
    // a key unset is removed, the service's own ones stay.
    let set = stack.cli(&["config", "set", "production", "FEATURE=on"]);
    assert!(set.status.success(), "{set:?}");
    stack.deploy_end("production", 5, "deploy.succeeded").await;
    let environment = rancher.service()["launchConfig"]["environment"].clone();
    assert_eq!(environment["FEATURE"], "on", "{environment}");
    assert_eq!(environment["DATABASE_URL"], "postgres://db/hello");
    let unset = stack.cli(&["config", "unset", "production", "FEATURE"]);
    assert!(unset.status.success(), "{unset:?}");
    stack.deploy_end("production", 6, "deploy.succeeded").await;
    let environment = rancher.service()["launchConfig"]["environment"].clone();
    assert!(environment.get("FEATURE").is_none(), "{environment}");
    assert_eq!(environment["DATABASE_URL"], "postgres://db/hello");
    assert_eq!(rancher.service()["launchConfig"]["imageUuid"], image);
}
