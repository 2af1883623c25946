//! The Rancher 1.6 target against a server that speaks the v2-beta API of
//! services (`gantry_tests::rancher`): a healthy upgrade ends with
//! `finishupgrade` and the launch configuration sent keeps every field but
//! the image (sidekicks included); an unhealthy one ends with `rollback`,
//! the old image still the service's; a refused API key (401) and a refused
//! upgrade (422 with Rancher's code) are failures that say so, and a
//! service someone else is upgrading is left alone. A stack's releases
//! create the Rancher stack from the release's compose file and the stack
//! repository's rancher-compose file, then upgrade it (finished when
//! healthy, rolled back when not).

use std::time::Duration;

use gantry_proto::v1::GetStackRequest;
use gantry_proto::v1::event::Payload;
use gantry_proto::v1::stacks_client::StacksClient;
use gantry_tests::rancher::FakeRancher;
use gantry_tests::stack::ProjectSpec;
use gantry_tests::stack_sample::{Shop, release};
use gantry_tests::{SampleRepo, Stack, StackOptions, docker};
use serde_json::{Value, json};

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

/// The stack repository's rancher-compose file, with `web`'s scale.
fn rancher_compose(scale: u32) -> String {
    format!(
        "version: '2'\nservices:\n  web:\n    scale: {scale}\n    health_check:\n      port: 8080\n      request_line: GET /index.html HTTP/1.0\n      interval: 2000\n      response_timeout: 2000\n      healthy_threshold: 2\n      unhealthy_threshold: 3\n    upgrade_strategy: {{start_first: true}}\n"
    )
}

fn yaml(v: &Value) -> Value {
    serde_saphyr::from_str(v.as_str().unwrap_or_default()).expect("YAML")
}

#[tokio::test]
async fn rancher_stacks_are_created_upgraded_and_rolled_back() {
    const TIMEOUT: Duration = Duration::from_secs(240);
    let rancher = FakeRancher::start("other", "other", launch_config()).await;
    let Shop {
        tests_image,
        api,
        web,
        shop,
        api_spec,
        web_spec,
        shop_spec,
    } = Shop::new("gantry-e2e");
    shop.commit_file("rancher-compose.yml", &rancher_compose(2), "scale 2");
    let stack = Stack::start(StackOptions {
        projects: vec![api_spec.clone(), web_spec.clone(), shop_spec.clone()],
        lease_secs: 10,
        config_extra: format!(
            "environments:\n  - name: shop-production\n    project: shop\n    target: rancher\n    rules: [{{branch: main}}]\n    health: {{timeout_secs: 10}}\n    rancher:\n      url: {}\n      project: 1a5\n      stack: shop-production\n      access_key: {}\n      secret_key: {{value: '{}'}}\n",
            rancher.url, rancher.access_key, rancher.secret_key
        ),
        ..Default::default()
    })
    .await;
    let (_, api_v1) = release(&stack, &api_spec, &api, "api v1\n").await;
    let (_, web_v1) = release(&stack, &web_spec, &web, "web v1\n").await;

    // 1. Release 1: the Rancher stack is created from it.
    let p1 = stack
        .push(&shop_spec, "refs/heads/main", &shop.head())
        .await;
    let end = stack
        .wait_event(&p1, "stack.deploy_succeeded", TIMEOUT)
        .await;
    let Some(Payload::StackDeploySucceeded(d1)) = end.event.payload else {
        unreachable!()
    };
    let mut changed = d1.changed.clone();
    changed.sort();
    assert_eq!(changed, ["api", "web"]);
    let calls = rancher.calls();
    let created = calls
        .iter()
        .find(|c| c.method == "POST" && c.uri == "/v2-beta/projects/1a5/stacks")
        .expect("the stack is created");
    assert_eq!(created.body["name"], "shop-production");
    assert_eq!(created.body["startOnCreate"], true);
    let compose = yaml(&created.body["dockerCompose"]);
    assert_eq!(compose["version"], "2");
    let services = compose["services"].as_object().expect("services");
    assert_eq!(
        services.keys().collect::<Vec<_>>(),
        ["api", "web"],
        "no test service: {compose}"
    );
    assert_eq!(
        services["api"]["image"],
        format!("{}@{api_v1}", api_spec.image())
    );
    assert_eq!(
        services["web"]["image"],
        format!("{}@{web_v1}", web_spec.image())
    );
    assert_eq!(services["web"]["depends_on"], json!(["api"]));
    assert_eq!(services["web"]["labels"]["io.gantry.stack-release"], "1");
    for gone in ["networks", "healthcheck", "init", "ports"] {
        assert!(services["web"].get(gone).is_none(), "{gone}: {compose}");
    }
    assert_eq!(
        yaml(&created.body["rancherCompose"])["services"]["web"]["scale"],
        2
    );
    let live = rancher.stack("shop-production").expect("created");
    assert_eq!(
        (live["state"].as_str(), live["healthState"].as_str()),
        (Some("active"), Some("healthy"))
    );

    // 2. Release 2 (the stack repository scales web): an upgrade, finished.
    shop.commit_file("rancher-compose.yml", &rancher_compose(3), "scale 3");
    let p2 = stack
        .push(&shop_spec, "refs/heads/main", &shop.head())
        .await;
    let end = stack
        .wait_event(&p2, "stack.deploy_succeeded", TIMEOUT)
        .await;
    let Some(Payload::StackDeploySucceeded(d2)) = end.event.payload else {
        unreachable!()
    };
    assert!(d2.changed.is_empty(), "no image changed: {:?}", d2.changed);
    let id = live["id"].as_str().unwrap_or_default().to_owned();
    let actions = |rancher: &FakeRancher| -> Vec<String> {
        rancher
            .calls()
            .iter()
            .filter(|c| {
                c.uri
                    .starts_with(&format!("/v2-beta/projects/1a5/stacks/{id}?action="))
            })
            .filter_map(|c| c.uri.split("?action=").nth(1).map(str::to_owned))
            .collect()
    };
    assert_eq!(actions(&rancher), ["upgrade", "finishupgrade"]);
    let live = rancher.stack("shop-production").expect("stack");
    assert_eq!(yaml(&live["rancherCompose"])["services"]["web"]["scale"], 3);
    assert_eq!(
        yaml(&live["dockerCompose"])["services"]["web"]["labels"]["io.gantry.stack-release"],
        "2"
    );

    // 3. Release 3 turns the stack unhealthy: rolled back to release 2.
    rancher.fail_next_stack();
    shop.commit_file("rancher-compose.yml", &rancher_compose(4), "scale 4");
    let p3 = stack
        .push(&shop_spec, "refs/heads/main", &shop.head())
        .await;
    let end = stack
        .wait_event(&p3, "stack.deploy_rolled_back", TIMEOUT)
        .await;
    let Some(Payload::StackDeployRolledBack(d3)) = end.event.payload else {
        unreachable!()
    };
    assert!(d3.reason.contains("unhealthy"), "{d3:?}");
    assert!(
        d3.reason.contains("Rancher rolled the stack back"),
        "{d3:?}"
    );
    assert_eq!(
        actions(&rancher),
        ["upgrade", "finishupgrade", "upgrade", "rollback"]
    );
    let live = rancher.stack("shop-production").expect("stack");
    assert_eq!(yaml(&live["rancherCompose"])["services"]["web"]["scale"], 3);
    let info = StacksClient::new(stack.grpc("deployer").await)
        .get(GetStackRequest {
            stack: "shop".into(),
        })
        .await
        .expect("Get")
        .into_inner();
    assert_eq!(info.environments.first().map(|e| e.release), Some(2));
    docker::remove_image(&tests_image);
}
