//! Approvals and promotion: `production` is fed by `staging`
//! (`promote_from`) and requires the approval of the `deployer` token.
//! Whatever succeeds in staging waits there (visible in `gantry envs`,
//! announced once in chat) and runs nothing until approved; approved, it
//! runs exactly the digest staging ran; rejected, it never runs and
//! production keeps its version. A token the approval does not name may
//! not decide.

use std::time::Duration;

use gantry_proto::v1::event::Payload;
use gantry_tests::recorder::Recorder;
use gantry_tests::stack::{ProjectSpec, Seen, tokens};
use gantry_tests::{EnvSpec, SampleRepo, Stack, StackOptions};

const TIMEOUT: Duration = Duration::from_secs(180);

fn deployment(s: &Seen) -> gantry_proto::v1::Deployment {
    s.deployment().unwrap_or_default()
}

/// The first `key` event of `pipeline` in `environment`.
async fn wait_in(stack: &Stack, pipeline: &str, key: &str, environment: &str) -> Seen {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(s) = stack
            .pipeline_events(pipeline)
            .into_iter()
            .find(|s| s.routing_key == key && deployment(s).environment == environment)
        {
            return s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no {key} of {pipeline} in {environment}\n{}",
            stack.log_tail("deployer")
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn text(out: &std::process::Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn production_waits_for_approval_and_runs_exactly_what_staging_ran() {
    let repo = SampleRepo::new();
    let project = ProjectSpec::new("web", &repo.url());
    let chat = Recorder::start().await;
    let staging = EnvSpec::new("web");
    let mut production = EnvSpec::new("web");
    production.name = format!("production-{}", &staging.name["staging-".len()..]);
    production.rules = "[]".into();
    production.extra = format!(
        "    promote_from: {}\n    approval: {{by: [deployer]}}\n",
        staging.name
    );
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone()],
        environments: vec![staging.clone(), production.clone()],
        chat: vec![(
            "team".into(),
            "slack".into(),
            format!("{}/chat/slack", chat.url),
        )],
        lease_secs: 60,
        ..Default::default()
    })
    .await;
    let prod = production.name.as_str();

    // 1. Staging runs the push; production gets the same digest to approve.
    let c1 = repo.head();
    let p1 = stack.push(&project, "refs/heads/main", &c1).await;
    let staged = wait_in(&stack, &p1, "deploy.succeeded", &staging.name).await;
    let digest = deployment(&staged).digest;
    let waiting = wait_in(&stack, &p1, "deploy.awaiting_approval", prod).await;
    let w = deployment(&waiting);
    assert_eq!(
        (w.digest.as_str(), w.trigger.as_str()),
        (digest.as_str(), "promotion")
    );
    // Nothing runs there while it waits.
    assert!(
        !stack
            .pipeline_events(&p1)
            .iter()
            .any(|s| s.routing_key == "deploy.started" && deployment(s).environment == prod)
    );
    let (envs, _) = text(&stack.cli(&["envs"]));
    assert!(
        envs.contains(&format!(
            "{prod} (docker web, promoted from {}; approval required, by deployer)",
            staging.name
        )),
        "{envs}"
    );
    assert!(
        envs.contains(&format!("AWAITING APPROVAL (gantry approve {prod}")),
        "{envs}"
    );
    chat.wait_for("/chat/slack", TIMEOUT, |calls| {
        calls.iter().any(|c| {
            c.body["text"]
                .as_str()
                .is_some_and(|t| t.contains("awaits approval") && t.contains(prod))
        })
    })
    .await;

    // Only the tokens the approval names decide.
    let denied = stack.cli(&["approve", prod]);
    let (_, err) = text(&denied);
    assert!(
        !denied.status.success() && err.contains("may not decide"),
        "{err}"
    );
    // Approving another deployment than the one awaiting is refused.
    let stale = stack.cli(&[
        "--token",
        tokens::DEPLOY,
        "approve",
        prod,
        "--deployment",
        "01a22691-0000-7000-8000-000000000000",
    ]);
    let (_, err) = text(&stale);
    assert!(
        !stale.status.success() && err.contains("is not the one awaiting approval"),
        "{err}"
    );
    let approved = stack.cli(&[
        "--token",
        tokens::DEPLOY,
        "approve",
        prod,
        "--deployment",
        &w.deployment_id,
    ]);
    let (out, err) = text(&approved);
    assert!(approved.status.success(), "{err}");
    assert!(out.contains("approved by deployer"), "{out}");
    let done = wait_in(&stack, &p1, "deploy.succeeded", prod).await;
    assert_eq!(deployment(&done).digest, digest, "exactly what staging ran");
    let answer = reqwest::get(production.endpoint_url())
        .await
        .expect("production answers")
        .text()
        .await
        .expect("body");
    assert_eq!(answer, "hello v1\n");

    // 2. The next version is rejected: it never runs, v1 stays.
    let c2 = repo.commit_file("index.html", "hello v2\n", "v2");
    let p2 = stack.push(&project, "refs/heads/main", &c2).await;
    wait_in(&stack, &p2, "deploy.succeeded", &staging.name).await;
    wait_in(&stack, &p2, "deploy.awaiting_approval", prod).await;
    let rejected = stack.cli(&[
        "--token",
        tokens::DEPLOY,
        "reject",
        prod,
        "--reason",
        "not on a Friday",
    ]);
    let (out, err) = text(&rejected);
    assert!(rejected.status.success(), "{err}");
    assert!(out.contains("rejected by deployer"), "{out}");
    let event = wait_in(&stack, &p2, "deploy.rejected", prod).await;
    let Some(Payload::DeployRejected(r)) = &event.event.payload else {
        unreachable!()
    };
    assert_eq!(r.reason, "rejected by deployer: not on a Friday");
    let (envs, _) = text(&stack.cli(&["--json", "envs"]));
    let envs: serde_json::Value = serde_json::from_str(&envs).expect("json");
    let production_now = envs
        .as_array()
        .and_then(|a| a.iter().find(|e| e["name"] == prod))
        .expect("production listed");
    assert_eq!(production_now["current"]["digest"], digest.as_str());
    assert!(production_now["pending"].is_null(), "{production_now}");
    assert_eq!(
        reqwest::get(production.endpoint_url())
            .await
            .expect("production answers")
            .text()
            .await
            .expect("body"),
        "hello v1\n"
    );

    // Nothing awaits now.
    let nothing = stack.cli(&["--token", tokens::DEPLOY, "approve", prod]);
    let (_, err) = text(&nothing);
    assert!(
        !nothing.status.success() && err.contains("no deployment awaits approval"),
        "{err}"
    );

    // One chat message per deployment that waited.
    let calls = chat
        .wait_for("/chat/slack", TIMEOUT, |calls| {
            calls
                .iter()
                .filter(|c| {
                    c.body["text"]
                        .as_str()
                        .is_some_and(|t| t.contains("awaits approval"))
                })
                .count()
                >= 2
        })
        .await;
    let awaiting: Vec<&str> = calls
        .iter()
        .filter_map(|c| c.body["text"].as_str())
        .filter(|t| t.contains("awaits approval"))
        .collect();
    assert_eq!(awaiting.len(), 2, "{awaiting:#?}");
}
