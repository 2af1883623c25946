//! A project's secrets reach its test steps as environment variables and
//! never its logs: printed plainly, base64-encoded, URL-encoded or split
//! across two chunks of output, they are `[MASKED]` in the stored log and in
//! `StreamLogs`. A protected secret reaches only the default branch (and
//! tags); elsewhere the log says it was withheld. Secrets set with
//! `gantry secrets set` are stored sealed and work the same way.

use std::time::Duration;

use base64::Engine as _;
use gantry_tests::stack::ProjectSpec;
use gantry_tests::{SampleRepo, Stack, StackOptions};
use sqlx::Row as _;

const TIMEOUT: Duration = Duration::from_secs(180);
const TOKEN: &str = "gty s3cr3t/value-42!";
const DEPLOY_KEY: &str = "deploy-key-0123456789";

/// The sample's pipeline file with these test steps.
fn pipeline(steps: &str) -> String {
    format!("image:\n  dockerfile: Dockerfile\ntest:\n{steps}")
}

/// The stored log of a pipeline's build, all rows in order.
async fn stored_log(stack: &Stack, pipeline: &str) -> String {
    let mut db = stack.db().await;
    let rows = sqlx::query(
        "SELECT l.data FROM builder.build_logs l JOIN builder.builds b ON b.id = l.build_id
         WHERE b.pipeline_id = $1 ORDER BY l.seq",
    )
    .bind(pipeline)
    .fetch_all(&mut db)
    .await
    .expect("log rows");
    let bytes: Vec<u8> = rows
        .iter()
        .flat_map(|r| r.get::<Vec<u8>, _>("data"))
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

#[tokio::test]
async fn secrets_reach_the_steps_and_never_the_logs() {
    let repo = SampleRepo::new();
    let project = ProjectSpec::new("web", &repo.url());
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone()],
        lease_secs: 60,
        project_extra: format!(
            "    secrets:\n      - {{name: API_TOKEN, value: {{value: '{TOKEN}'}}}}\n      - {{name: DEPLOY_KEY, value: {{value: '{DEPLOY_KEY}'}}, protected: true}}\n"
        ),
        ..Default::default()
    })
    .await;

    // On the default branch: both secrets, printed every way.
    let steps = concat!(
        "  - name: plain\n    run: echo \"token is $API_TOKEN\"\n",
        "  - name: base64\n    run: printf %s \"$API_TOKEN\" | base64\n",
        "  - name: url\n    run: printf %s \"$API_TOKEN\" | sed -e 's/ /%20/g' -e 's|/|%2F|g' -e 's/!/%21/g'\n",
        // The engine cuts a line at 16 KiB: the token straddles the cut.
        "  - name: split\n    run: head -c 16380 /dev/zero | tr '\\0' x; printf '%s\\n' \"$API_TOKEN\"\n",
        "  - name: protected\n    run: test \"$DEPLOY_KEY\" = 'deploy-key-0123456789'\n",
    );
    let c1 = repo.commit_file(".gantry.yml", &pipeline(steps), "print the secrets");
    let p1 = stack.push(&project, "refs/heads/main", &c1).await;
    let end = stack.wait_outcome(&p1, TIMEOUT).await;
    let stored = stored_log(&stack, &p1).await;
    assert_eq!(end.routing_key, "image.published", "{end:?}\n{stored}");
    let streamed = String::from_utf8_lossy(&stack.cli(&["logs", &p1]).stdout).into_owned();
    let b64 = base64::engine::general_purpose::STANDARD.encode(TOKEN);
    let url = "gty%20s3cr3t%2Fvalue-42%21";
    for (what, log) in [("stored", &stored), ("streamed", &streamed)] {
        for leak in [
            TOKEN,
            b64.as_str(),
            b64.trim_end_matches('='),
            url,
            DEPLOY_KEY,
        ] {
            assert!(!log.contains(leak), "{what} log holds {leak:?}:\n{log}");
        }
        assert!(log.contains("token is [MASKED]"), "{what}:\n{log}");
        assert!(log.matches("[MASKED]").count() >= 4, "{what}:\n{log}");
        assert!(
            log.contains("xxxx[MASKED]"),
            "{what}: the split token\n{log}"
        );
    }

    // Elsewhere: the protected secret is withheld, and the log says so.
    repo.branch("feature/x");
    let steps = concat!(
        "  - name: unprotected\n    run: test -n \"$API_TOKEN\"\n",
        "  - name: protected\n    run: test -z \"$DEPLOY_KEY\"\n",
    );
    let c2 = repo.commit_file(".gantry.yml", &pipeline(steps), "no deploy key here");
    let p2 = stack.push(&project, "refs/heads/feature/x", &c2).await;
    let end = stack.wait_outcome(&p2, TIMEOUT).await;
    let stored = stored_log(&stack, &p2).await;
    assert_eq!(end.routing_key, "image.published", "{end:?}\n{stored}");
    assert!(
        stored.contains("secrets withheld from this pipeline (protected: only the default branch and tags get them): DEPLOY_KEY"),
        "{stored}"
    );
}

#[tokio::test]
async fn secrets_set_with_the_cli_are_sealed_given_to_steps_and_masked() {
    const KEY: &str = "6f1c2a9e0d4b7c3a5e8f1d2c4b6a8e0f9d7c5b3a1e2f4d6c8b0a9e7d5c3b1a2f";
    const STORED: &str = "stored-Secret/value+7f3a";
    let repo = SampleRepo::new();
    let project = ProjectSpec::new("web", &repo.url());
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone()],
        lease_secs: 60,
        project_extra: format!(
            "    secrets:\n      - {{name: API_TOKEN, value: {{value: '{TOKEN}'}}}}\n"
        ),
        config_extra: format!("secrets_key: {{value: '{KEY}'}}\n"),
        ..Default::default()
    })
    .await;

    let key = stack.cli(&["secrets", "key"]);
    let key = String::from_utf8_lossy(&key.stdout);
    assert!(
        key.trim().len() == 64 && key.trim().bytes().all(|b| b.is_ascii_hexdigit()),
        "{key}"
    );

    // The value comes on standard input.
    let set = stack.cli_with_input(
        &["secrets", "set", "web", "STORED_TOKEN"],
        format!("{STORED}\n").as_bytes(),
    );
    assert!(set.status.success(), "{set:?}");
    for (args, input, refusal) in [
        (["secrets", "set", "web", "SHORT"], "abc", "8 characters"),
        (
            ["secrets", "set", "web", "API_TOKEN"],
            "another-long-value",
            "configuration file",
        ),
        (
            ["secrets", "set", "web", "not a name"],
            "long-enough-value",
            "environment variable name",
        ),
        (
            ["secrets", "set", "nowhere", "X_TOKEN"],
            "long-enough-value",
            "no service project",
        ),
    ] {
        let out = stack.cli_with_input(&args, input.as_bytes());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && stderr.contains(refusal),
            "{args:?}: {stderr}"
        );
    }
    let list = stack.cli(&["secrets", "list", "web"]);
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(
        list.contains("API_TOKEN") && list.contains("from the configuration file"),
        "{list}"
    );
    assert!(
        list.contains("STORED_TOKEN") && list.contains("stored by"),
        "{list}"
    );
    assert!(!list.contains(STORED), "{list}");

    // Sealed at rest: the database holds no trace of the value.
    let mut db = stack.db().await;
    let sealed: Vec<u8> = sqlx::query_scalar(
        "SELECT sealed FROM builder.project_secrets WHERE project = 'web' AND name = 'STORED_TOKEN'",
    )
    .fetch_one(&mut db)
    .await
    .expect("the stored secret");
    let b64 = base64::engine::general_purpose::STANDARD.encode(STORED);
    for form in [STORED.as_bytes(), b64.as_bytes(), b"stored-Secret"] {
        assert!(!sealed.windows(form.len()).any(|w| w == form));
    }

    // A build's steps get it, and its log masks it.
    let steps = "  - name: stored\n    run: test \"$STORED_TOKEN\" = 'stored-Secret/value+7f3a' && echo \"stored is $STORED_TOKEN\"\n";
    let c1 = repo.commit_file(".gantry.yml", &pipeline(steps), "use the stored secret");
    let p1 = stack.push(&project, "refs/heads/main", &c1).await;
    let end = stack.wait_outcome(&p1, TIMEOUT).await;
    let stored = stored_log(&stack, &p1).await;
    assert_eq!(end.routing_key, "image.published", "{end:?}\n{stored}");
    assert!(stored.contains("stored is [MASKED]"), "{stored}");
    assert!(!stored.contains(STORED), "{stored}");

    // Removed: listed no more.
    let unset = stack.cli(&["secrets", "unset", "web", "STORED_TOKEN"]);
    assert!(unset.status.success(), "{unset:?}");
    let list = stack.cli(&["secrets", "list", "web"]);
    assert!(!String::from_utf8_lossy(&list.stdout).contains("STORED_TOKEN"));
    let again = stack.cli(&["secrets", "unset", "web", "STORED_TOKEN"]);
    assert!(!again.status.success());
}
