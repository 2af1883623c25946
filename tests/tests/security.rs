//! The control plane as a network neighbour sees it: every gRPC method of
//! every service wants a token with its scope, the pages want a `read`
//! token, TLS when configured; webhooks reveal nothing about which projects
//! exist, refuse oversized bodies before reading them, keep idempotency keys
//! per project, and a branch cannot take the tags of releases.

use std::time::Duration;

use gantry_proto::v1::builds_client::BuildsClient;
use gantry_proto::v1::deployments_client::DeploymentsClient;
use gantry_proto::v1::ingest_client::IngestClient;
use gantry_proto::v1::pipelines_client::PipelinesClient;
use gantry_proto::v1::secrets_client::SecretsClient;
use gantry_proto::v1::{
    DeployRequest, GetBuildsRequest, GetPipelineRequest, ListDeploymentsRequest,
    ListEnvironmentsRequest, ListPipelinesRequest, ListSecretsRequest, RollbackRequest,
    SetSecretRequest, StreamLogsRequest, TriggerRequest, UnsetSecretRequest, WatchPipelinesRequest,
};
use gantry_tests::stack::{ProjectSpec, SECRET, bin_dir, tokens};
use gantry_tests::{SampleRepo, Stack, StackOptions, accepted_pipeline, forge, registry};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tonic::Code;

/// Calls `method` of `service` with `token`; the status it ended with.
async fn call(stack: &Stack, service: &str, method: &str, token: Option<&str>) -> Code {
    let ch = stack.grpc_as(service, token).await;
    let id = "01a22493-0000-7000-8000-000000000000".to_owned();
    let result = match method {
        "Trigger" => IngestClient::new(ch)
            .trigger(TriggerRequest {
                project: "hello".into(),
                r#ref: "main".into(),
            })
            .await
            .map(drop),
        "StreamLogs" => BuildsClient::new(ch)
            .stream_logs(StreamLogsRequest {
                build_id: id,
                ..Default::default()
            })
            .await
            .map(drop),
        "GetBuilds" => BuildsClient::new(ch)
            .get_builds(GetBuildsRequest { pipeline_id: id })
            .await
            .map(drop),
        "ListEnvironments" => DeploymentsClient::new(ch)
            .list_environments(ListEnvironmentsRequest {})
            .await
            .map(drop),
        "ListDeployments" => DeploymentsClient::new(ch)
            .list_deployments(ListDeploymentsRequest::default())
            .await
            .map(drop),
        "Deploy" => DeploymentsClient::new(ch)
            .deploy(DeployRequest {
                environment: "nowhere".into(),
                image: "abc".into(),
            })
            .await
            .map(drop),
        "Rollback" => DeploymentsClient::new(ch)
            .rollback(RollbackRequest {
                environment: "nowhere".into(),
            })
            .await
            .map(drop),
        "List" => PipelinesClient::new(ch)
            .list(ListPipelinesRequest::default())
            .await
            .map(drop),
        "Get" => PipelinesClient::new(ch)
            .get(GetPipelineRequest { pipeline_id: id })
            .await
            .map(drop),
        "Watch" => PipelinesClient::new(ch)
            .watch(WatchPipelinesRequest {
                pipeline_id: id,
                project: String::new(),
            })
            .await
            .map(drop),
        "SetSecret" => SecretsClient::new(ch)
            .set(SetSecretRequest {
                project: "hello".into(),
                name: "API_TOKEN".into(),
                value: "a-long-enough-value".into(),
                protected: false,
            })
            .await
            .map(drop),
        "UnsetSecret" => SecretsClient::new(ch)
            .unset(UnsetSecretRequest {
                project: "hello".into(),
                name: "API_TOKEN".into(),
            })
            .await
            .map(drop),
        "ListSecrets" => SecretsClient::new(ch)
            .list(ListSecretsRequest {
                project: "hello".into(),
            })
            .await
            .map(drop),
        other => panic!("no call for {other}"),
    };
    match result {
        Ok(()) => Code::Ok,
        Err(status) => status.code(),
    }
}

#[tokio::test]
async fn every_grpc_method_wants_a_token_with_its_scope_and_pages_a_read_token() {
    let repo = SampleRepo::new();
    let (stack, _project) = Stack::with_project(&repo, "hello", 60).await;

    // (service, method, the token with the right scope, one without it)
    let methods = [
        ("webhook-ingest", "Trigger", tokens::TRIGGER, tokens::READ),
        ("builder", "StreamLogs", tokens::READ, tokens::TRIGGER),
        ("builder", "GetBuilds", tokens::READ, tokens::DEPLOY),
        ("builder", "SetSecret", tokens::ADMIN, tokens::TRIGGER),
        ("builder", "UnsetSecret", tokens::ADMIN, tokens::DEPLOY),
        ("builder", "ListSecrets", tokens::READ, tokens::TRIGGER),
        (
            "deployer",
            "ListEnvironments",
            tokens::READ,
            tokens::TRIGGER,
        ),
        ("deployer", "ListDeployments", tokens::READ, tokens::TRIGGER),
        ("deployer", "Deploy", tokens::DEPLOY, tokens::READ),
        ("deployer", "Rollback", tokens::DEPLOY, tokens::TRIGGER),
        ("notifier", "List", tokens::READ, tokens::DEPLOY),
        ("notifier", "Get", tokens::READ, tokens::TRIGGER),
        ("notifier", "Watch", tokens::READ, tokens::TRIGGER),
    ];
    for (service, method, right, lacking) in methods {
        let what = format!("{service} {method}");
        assert_eq!(
            call(&stack, service, method, None).await,
            Code::Unauthenticated,
            "{what} without a token"
        );
        assert_eq!(
            call(&stack, service, method, Some("gty_not-configured")).await,
            Code::Unauthenticated,
            "{what} with an unknown token"
        );
        assert_eq!(
            call(&stack, service, method, Some(lacking)).await,
            Code::PermissionDenied,
            "{what} with a token lacking the scope"
        );
        for token in [right, tokens::ADMIN] {
            let code = call(&stack, service, method, Some(token)).await;
            assert!(
                ![Code::Unauthenticated, Code::PermissionDenied].contains(&code),
                "{what} with the right token: {code:?}"
            );
        }
    }
    // Reflection tells the API only to a reader; health stays open.
    for service in gantry_tests::stack::SERVICES {
        let mut reflection =
            tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient::new(
                stack.grpc_as(service, None).await,
            );
        let request = tonic_reflection::pb::v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(
                tonic_reflection::pb::v1::server_reflection_request::MessageRequest::ListServices(
                    String::new(),
                ),
            ),
        };
        let refused = reflection
            .server_reflection_info(futures::stream::iter([request]))
            .await
            .expect_err("reflection without a token");
        assert_eq!(refused.code(), Code::Unauthenticated, "{service}");
        let mut health =
            tonic_health::pb::health_client::HealthClient::new(stack.grpc_as(service, None).await);
        health
            .check(tonic_health::pb::HealthCheckRequest::default())
            .await
            .unwrap_or_else(|e| panic!("{service}: health without a token: {e}"));
    }

    // The pages: 401 asking for Basic, 403 for a token without read, then
    // through with a read token as Bearer or as Basic's password.
    let page = stack.http_url("notifier", "/pipelines/nope");
    let client = stack.http_client();
    let resp = client.get(&page).send().await.expect("page");
    assert_eq!(resp.status(), 401);
    assert!(
        resp.headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("Basic")),
        "{:?}",
        resp.headers()
    );
    let resp = client
        .get(&page)
        .bearer_auth(tokens::TRIGGER)
        .send()
        .await
        .expect("page");
    assert_eq!(resp.status(), 403);
    let resp = client
        .get(&page)
        .bearer_auth(tokens::READ)
        .send()
        .await
        .expect("page");
    assert_eq!(resp.status(), 404, "past authentication: no such pipeline");
    let resp = client
        .get(&page)
        .basic_auth("anyone", Some(tokens::READ))
        .send()
        .await
        .expect("page");
    assert_eq!(resp.status(), 404);

    // The CLI without a token says what to do.
    let out = std::process::Command::new(bin_dir().join("gantry"))
        .args(["pipelines"])
        .env(
            "GANTRY_NOTIFIER_URL",
            format!("http://127.0.0.1:{}", stack.grpc_port("notifier")),
        )
        .env_remove("GANTRY_TOKEN")
        .output()
        .expect("gantry runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("GANTRY_TOKEN"), "{err}");
}

#[tokio::test]
async fn with_tls_every_listener_speaks_https_and_the_cli_follows() {
    let repo = SampleRepo::new();
    let project = ProjectSpec::new("hello", &repo.url());
    // Stack::start waits for every /ready over https.
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone()],
        lease_secs: 60,
        tls: true,
        public_pages: true,
        ..Default::default()
    })
    .await;
    let pipeline = stack.push(&project, "refs/heads/main", &repo.head()).await;
    stack
        .wait_outcome(&pipeline, Duration::from_secs(180))
        .await;

    // Plain HTTP is not answered as HTTP on a TLS listener.
    let plain = gantry_tests::http()
        .get(format!(
            "http://127.0.0.1:{}/ready",
            stack.http_port("webhook-ingest")
        ))
        .send()
        .await;
    assert!(
        plain.is_err() || !plain.as_ref().is_ok_and(|r| r.status().is_success()),
        "{plain:?}"
    );
    // Public pages answer without a token (over https), and the build log
    // comes from the builder over TLS with the notifier's read token.
    let client = stack.http_client();
    let resp = client
        .get(stack.http_url("notifier", &format!("/pipelines/{pipeline}/log")))
        .send()
        .await
        .expect("log page");
    assert_eq!(resp.status(), 200);
    let log = resp.text().await.expect("log");
    assert!(log.contains("fetching"), "{log}");

    let out = std::process::Command::new(bin_dir().join("gantry"))
        .args(["pipelines", "--json"])
        .env(
            "GANTRY_NOTIFIER_URL",
            format!("https://127.0.0.1:{}", stack.grpc_port("notifier")),
        )
        .env("GANTRY_CA_CERT", stack.dir().join("tls.crt"))
        .env("GANTRY_TOKEN", tokens::READ)
        .output()
        .expect("gantry runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(list[0]["pipeline_id"], pipeline.as_str());
}

/// Status and body of a response.
async fn answer(resp: reqwest::Response) -> (u16, String) {
    let status = resp.status().as_u16();
    (status, resp.text().await.unwrap_or_default())
}

#[tokio::test]
async fn webhooks_reveal_no_project_and_keep_keys_per_project() {
    let (repo_a, repo_b) = (SampleRepo::new(), SampleRepo::new());
    let alpha = ProjectSpec::new("alpha", &repo_a.url());
    let beta = ProjectSpec::new("beta", &repo_b.url());
    let stack = Stack::start(StackOptions {
        projects: vec![alpha.clone(), beta.clone()],
        lease_secs: 60,
        ..Default::default()
    })
    .await;
    let sha = repo_a.head();

    // An unknown project and a wrong secret get the very same answer.
    let unknown = forge::gitlab_push("team/unknown", "refs/heads/main", &sha, "main");
    let known = forge::gitlab_push(&alpha.gitlab, "refs/heads/main", &sha, "main");
    let a = answer(
        stack
            .post_gitlab(&unknown, Some(SECRET), "Push Hook", None)
            .await,
    )
    .await;
    let b = answer(
        stack
            .post_gitlab(&known, Some("wrong"), "Push Hook", None)
            .await,
    )
    .await;
    assert_eq!(a, b);
    assert_eq!(a.0, 401);
    let gh_unknown = serde_json::to_vec(&forge::github_push(
        "team/unknown",
        "refs/heads/main",
        &sha,
        "main",
    ))
    .expect("json");
    let gh_known = serde_json::to_vec(&forge::github_push(
        &alpha.github,
        "refs/heads/main",
        &sha,
        "main",
    ))
    .expect("json");
    let c = answer(
        stack
            .post_github(&gh_unknown, Some(SECRET), "push", "g1")
            .await,
    )
    .await;
    let d = answer(
        stack
            .post_github(&gh_known, Some("wrong"), "push", "g2")
            .await,
    )
    .await;
    assert_eq!(c, d);
    assert_eq!((c.0, &c.1), (a.0, &a.1));
    // Nothing is parsed before the secret checks out: garbage with a wrong
    // secret is the same 401, not a 400 about JSON.
    let e = answer(
        stack
            .post_github(b"{not json", Some("wrong"), "push", "g3")
            .await,
    )
    .await;
    assert_eq!(e, c);

    // Per-project URLs: the project named in the URL, and only it.
    let client = stack.http_client();
    let post = |path: String, body: &serde_json::Value, key: &str| {
        client
            .post(stack.ingest_url(&path))
            .header("x-gitlab-event", "Push Hook")
            .header("x-gitlab-token", SECRET)
            .header("idempotency-key", key)
            .json(body)
    };
    let beta_push = forge::gitlab_push(&beta.gitlab, "refs/heads/main", &repo_b.head(), "main");
    let (status, _) = answer(
        post("/hooks/gitlab/alpha".into(), &beta_push, "k0")
            .send()
            .await
            .expect("answer"),
    )
    .await;
    assert_eq!(status, 401, "beta's payload on alpha's URL");
    let (status, _) = answer(
        post("/hooks/gitlab/nobody".into(), &known, "k0")
            .send()
            .await
            .expect("answer"),
    )
    .await;
    assert_eq!(status, 401, "a URL of no project");

    // One idempotency key, two projects: two pipelines; again on alpha: a duplicate.
    let p_alpha = accepted_pipeline(
        post("/hooks/gitlab/alpha".into(), &known, "shared-key")
            .send()
            .await
            .expect("answer"),
    )
    .await;
    let p_beta = accepted_pipeline(
        post("/hooks/gitlab".into(), &beta_push, "shared-key")
            .send()
            .await
            .expect("answer"),
    )
    .await;
    assert_ne!(p_alpha, p_beta);
    let again: serde_json::Value = post("/hooks/gitlab".into(), &known, "shared-key")
        .send()
        .await
        .expect("answer")
        .json()
        .await
        .expect("json");
    assert_eq!(again["status"], "duplicate");
    assert_eq!(again["pipeline_id"], p_alpha.as_str());

    // A body declared over the limit is refused before it is sent.
    let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", stack.http_port("webhook-ingest")))
        .await
        .expect("connect");
    tcp.write_all(
        b"POST /hooks/gitlab HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 1000000000\r\n\r\n",
    )
    .await
    .expect("headers");
    let mut buf = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf))
        .await
        .expect("answered without the body")
        .expect("read");
    let head = String::from_utf8_lossy(&buf[..n]);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.contains("larger than the limit"), "{head}");

    // A branch named `latest` does not move `latest`.
    let main_published = stack.wait_outcome(&p_alpha, Duration::from_secs(180)).await;
    let Some(gantry_proto::v1::event::Payload::ImagePublished(main)) = main_published.event.payload
    else {
        panic!("alpha main was not published");
    };
    assert!(main.tags.contains(&"latest".to_owned()), "{:?}", main.tags);
    repo_a.branch("latest");
    let other = repo_a.commit_file(
        "index.html",
        "hello from a branch called latest\n",
        "latest",
    );
    let p = stack.push(&alpha, "refs/heads/latest", &other).await;
    let seen = stack.wait_outcome(&p, Duration::from_secs(180)).await;
    let Some(gantry_proto::v1::event::Payload::ImagePublished(branch)) = &seen.event.payload else {
        panic!("branch latest was not published: {seen:?}");
    };
    assert_eq!(branch.tags, vec![other.clone(), "branch-latest".to_owned()]);
    assert_eq!(
        registry::digest(&alpha.image_path, "latest")
            .await
            .as_deref(),
        Some(main.digest.as_str()),
        "latest still points at main's image"
    );
}

#[tokio::test]
async fn an_event_naming_another_repository_deploys_nothing() {
    use gantry_proto::v1::event::Payload;
    use gantry_proto::v1::{Event, ImagePublished, Revision};
    use lapin::options::{BasicGetOptions, BasicPublishOptions, ConfirmSelectOptions};
    use prost::Message as _;
    use sqlx::Row as _;

    let repo = SampleRepo::new();
    let project = ProjectSpec::new("web", &repo.url());
    let env = gantry_tests::EnvSpec::new("web");
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone()],
        environments: vec![env.clone()],
        lease_secs: 60,
        ..Default::default()
    })
    .await;

    // A well-formed event for the project, but with someone else's image.
    let event = Event::new(
        "forged-pipeline",
        "web",
        Payload::ImagePublished(ImagePublished {
            revision: Some(Revision {
                commit_sha: repo.head(),
                git_ref: "refs/heads/main".into(),
                branch: "main".into(),
                ..Default::default()
            }),
            build_id: "forged".into(),
            repository: format!("{}/evil/miner", gantry_tests::infra::registry()),
            tags: vec!["main".into()],
            digest: format!("sha256:{}", "e".repeat(64)),
        }),
    );
    let conn = lapin::Connection::connect(&stack.amqp_url, lapin::ConnectionProperties::default())
        .await
        .expect("amqp");
    let ch = conn.create_channel().await.expect("channel");
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .expect("confirms");
    ch.basic_publish(
        gantry_bus::EXCHANGE.into(),
        "image.published".into(),
        BasicPublishOptions::default(),
        &event.encode_to_vec(),
        lapin::BasicProperties::default()
            .with_delivery_mode(2)
            .with_message_id(event.id.clone().into()),
    )
    .await
    .expect("publish")
    .await
    .expect("confirmed");

    // The deployer refuses it: it ends in the dead-letter queue...
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(msg) = ch
            .basic_get(
                gantry_bus::DEAD_LETTER_QUEUE.into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .expect("get")
            && Event::decode(msg.delivery.data.as_slice()).is_ok_and(|e| e.id == event.id)
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the forged event was not refused"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // ...and neither the catalogue nor the environment took it.
    let mut db = stack.db().await;
    let images: i64 = sqlx::query("SELECT count(*) AS n FROM deployer.images")
        .fetch_one(&mut db)
        .await
        .expect("images")
        .get("n");
    let deployments: i64 = sqlx::query("SELECT count(*) AS n FROM deployer.deployments")
        .fetch_one(&mut db)
        .await
        .expect("deployments")
        .get("n");
    assert_eq!((images, deployments), (0, 0));
    assert!(
        gantry_tests::docker::labelled(&format!("io.gantry.environment={}", env.name)).is_empty()
    );
}
