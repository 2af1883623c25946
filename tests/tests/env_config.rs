//! An environment's configuration, versioned: `gantry config set` makes a
//! new version and redeploys what runs there with it (the container sees
//! it); a secret value is sealed at rest and masked everywhere; a value
//! that breaks the service fails its health check and the previous image
//! and configuration keep running (the version is marked failed);
//! `history` and `diff` show the versions; a rollback restores image and
//! configuration together.

use std::process::Command;
use std::time::Duration;

use gantry_tests::docker;
use gantry_tests::stack::{ProjectSpec, Seen};
use gantry_tests::{EnvSpec, SampleRepo, Stack, StackOptions};

const TIMEOUT: Duration = Duration::from_secs(180);
const KEY: &str = "0d1c2b3a4f5e6d7c8b9a0f1e2d3c4b5a6f7e8d9c0b1a2f3e4d5c6b7a8f9e0d1c";
const API_KEY: &str = "s3cr3t-api-key-value-77";

/// The environment variables of the environment's one live container.
async fn live_env(env: &EnvSpec) -> Vec<String> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    loop {
        let list = docker::labelled(&format!("io.gantry.environment={}", env.name));
        if list.len() == 1 {
            let out = Command::new("docker")
                .args(["inspect", "--format", "{{json .Config.Env}}", &list[0]])
                .output()
                .expect("docker inspect");
            return serde_json::from_slice(&out.stdout).expect("env list");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "containers: {list:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The `nth` (from 0) end of a deployment to `environment`: `expected`.
async fn nth_end(stack: &Stack, environment: &str, nth: usize, expected: &str) -> Seen {
    let ends = ["deploy.succeeded", "deploy.rolled_back"];
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let seen: Vec<Seen> = stack
            .events()
            .into_iter()
            .filter(|s| ends.contains(&s.routing_key.as_str()))
            .filter(|s| s.deployment().is_some_and(|d| d.environment == environment))
            .collect();
        if let Some(s) = seen.get(nth) {
            assert_eq!(s.routing_key, expected, "{s:?}");
            return s.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no deployment end #{nth}: {seen:#?}\n{}",
            stack.log_tail("deployer")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn out(o: &std::process::Output) -> String {
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[tokio::test]
async fn configuration_versions_are_deployed_rolled_back_and_kept_secret() {
    let repo = SampleRepo::new();
    // The service listens on $PORT: a wrong value breaks it.
    repo.commit_file(
        "Dockerfile",
        &gantry_tests::repo::dockerfile(
            "",
            "[\"sh\", \"-c\", \"exec httpd -f -p ${PORT:-8080} -h /www\"]",
        ),
        "listen on $PORT",
    );
    let project = ProjectSpec::new("web", &repo.url());
    let env = EnvSpec::new("web");
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone()],
        environments: vec![env.clone()],
        config_extra: format!("secrets_key: {{value: '{KEY}'}}\n"),
        lease_secs: 60,
        ..Default::default()
    })
    .await;
    let name = env.name.as_str();

    let p1 = stack.push(&project, "refs/heads/main", &repo.head()).await;
    nth_end(&stack, name, 0, "deploy.succeeded").await;
    assert_eq!(
        out(&stack.cli(&["config", "history", name])).trim(),
        "no configuration yet"
    );

    // v1: plain values, deployed at once.
    let set = out(&stack.cli(&["config", "set", name, "GREETING=hello", "LOG_LEVEL=debug"]));
    assert!(
        set.contains("configuration v1") && set.contains("deployment"),
        "{set}"
    );
    nth_end(&stack, name, 1, "deploy.succeeded").await;
    let vars = live_env(&env).await;
    assert!(vars.contains(&"GREETING=hello".to_owned()), "{vars:?}");

    // v2: a secret, from standard input.
    let secret = stack.cli_with_input(
        &["config", "set", name, "--secret", "API_KEY"],
        format!("{API_KEY}\n").as_bytes(),
    );
    let secret = out(&secret);
    assert!(
        secret.contains("API_KEY=[MASKED]") && !secret.contains(API_KEY),
        "{secret}"
    );
    nth_end(&stack, name, 2, "deploy.succeeded").await;
    let vars = live_env(&env).await;
    assert!(vars.contains(&format!("API_KEY={API_KEY}")), "{vars:?}");
    assert!(vars.contains(&"GREETING=hello".to_owned()), "{vars:?}");
    let show = out(&stack.cli(&["config", "show", name]));
    assert!(
        show.contains("API_KEY=[MASKED]") && show.contains("GREETING=hello"),
        "{show}"
    );
    assert!(!show.contains(API_KEY), "{show}");

    // A secret stays secret, and a change that changes nothing is refused.
    for (args, refusal) in [
        (vec!["config", "set", name, "API_KEY=in-clear"], "is secret"),
        (
            vec!["config", "unset", name, "NOT_THERE"],
            "nothing changes",
        ),
        (
            vec!["config", "set", name, "GREETING=hello"],
            "nothing changes",
        ),
    ] {
        let refused = stack.cli(&args);
        let stderr = String::from_utf8_lossy(&refused.stderr);
        assert!(
            !refused.status.success() && stderr.contains(refusal),
            "{args:?}: {stderr}"
        );
    }

    // v3 breaks the service: rolled back to v2's image and configuration.
    out(&stack.cli(&["config", "set", name, "PORT=9999"]));
    let back = nth_end(&stack, name, 3, "deploy.rolled_back").await;
    assert_eq!(back.event.pipeline_id, p1);
    let vars = live_env(&env).await;
    assert!(vars.contains(&format!("API_KEY={API_KEY}")), "{vars:?}");
    assert!(!vars.iter().any(|v| v.starts_with("PORT=")), "{vars:?}");
    let history = out(&stack.cli(&["config", "history", name]));
    let lines: Vec<&str> = history.lines().collect();
    assert_eq!(lines.len(), 3, "{history}");
    assert!(
        lines[0].starts_with("v3") && lines[0].contains("FAILED"),
        "{history}"
    );
    assert!(
        lines[1].starts_with("v2") && lines[1].contains("API_KEY=[MASKED]"),
        "{history}"
    );
    let show = out(&stack.cli(&["config", "show", name]));
    assert!(
        show.starts_with("v2"),
        "the current version is the last that worked: {show}"
    );
    let diff = out(&stack.cli(&["config", "diff", name, "1", "3"]));
    assert_eq!(diff.trim(), "+ API_KEY=[MASKED]\n+ PORT=9999", "{diff}");
    // The image was not to blame: it is not blocked.
    let mut db = stack.db().await;
    let blocked: i64 =
        sqlx::query_scalar("SELECT count(*) FROM deployer.blocked WHERE environment = $1")
            .bind(name)
            .fetch_one(&mut db)
            .await
            .expect("blocked");
    assert_eq!(blocked, 0);

    // A rollback takes image and configuration back together (v1).
    out(&stack.cli(&["rollback", name]));
    nth_end(&stack, name, 4, "deploy.succeeded").await;
    let vars = live_env(&env).await;
    assert!(vars.contains(&"GREETING=hello".to_owned()), "{vars:?}");
    assert!(!vars.iter().any(|v| v.starts_with("API_KEY=")), "{vars:?}");

    // The secret value is nowhere in clear: the database, the events, the logs.
    let sealed: Vec<u8> = sqlx::query_scalar(
        "SELECT sealed FROM deployer.env_config_versions WHERE environment = $1 AND version = 2",
    )
    .bind(name)
    .fetch_one(&mut db)
    .await
    .expect("v2");
    assert!(
        !sealed
            .windows(API_KEY.len())
            .any(|w| w == API_KEY.as_bytes())
    );
    let dump = format!("{:?}", stack.events());
    assert!(!dump.contains(API_KEY));
    for service in gantry_tests::stack::SERVICES {
        let log = std::fs::read_to_string(stack.log_path(service)).unwrap_or_default();
        assert!(!log.contains(API_KEY), "{service}");
    }
}
