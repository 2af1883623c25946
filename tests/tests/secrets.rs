//! No leaks: a project whose repository, registry, forge and chat all need
//! credentials goes through its whole path — a passing push deployed, a
//! failing push told to chat, manual triggers, logs read with the CLI — and
//! then every place Gantry writes to is searched for every configured
//! secret, in clear, in base64 and URL-encoded: the service logs, the
//! database (build logs, timeline, outbox and deliveries included), the
//! events on the bus, and the calls the forge and chat received.

use std::time::Duration;

use base64::Engine as _;
use gantry_proto::v1::TriggerRequest;
use gantry_proto::v1::ingest_client::IngestClient;
use gantry_tests::auth_registry::start_registry;
use gantry_tests::git_http::GitServer;
use gantry_tests::recorder::Recorder;
use gantry_tests::stack::{
    GITEA_TOKEN, GITHUB_TOKEN, GITLAB_TOKEN, ProjectSpec, SECRET, SERVICES, bin_dir, tokens,
};
use gantry_tests::{EnvSpec, SampleRepo, Stack, StackOptions, accepted_pipeline, forge};

const CLONE_PASSWORD: &str = "clone-pw-7d3e9a1b";
const REGISTRY_PASSWORD: &str = "registry-pw-5c2f8e0d";
const CHAT_SECRET: &str = "T0CHAT-secret-91b4c6e2";
const TIMEOUT: Duration = Duration::from_secs(180);

/// The forms a secret could leak in.
fn forms(secret: &str) -> Vec<String> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let b64url = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    vec![
        secret.to_owned(),
        b64.encode(secret),
        b64.encode(secret).trim_end_matches('=').to_owned(),
        b64url.encode(secret),
        gantry_config::git::percent_encode(secret),
    ]
}

/// A database dump with every `\x…` bytea value decoded next to it.
fn dump(database_url: &str) -> String {
    let out = std::process::Command::new("pg_dump")
        .args(["--data-only", "--no-owner", database_url])
        .output()
        .expect("pg_dump runs");
    assert!(
        out.status.success(),
        "pg_dump: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut decoded = String::new();
    for part in text.split("\\\\x").skip(1) {
        let hex: String = part.chars().take_while(|c| c.is_ascii_hexdigit()).collect();
        if let Ok(bytes) = hex::decode(&hex[..hex.len() / 2 * 2]) {
            decoded.push_str(&String::from_utf8_lossy(&bytes));
            decoded.push('\n');
        }
    }
    assert!(text.contains("build_logs"), "the dump holds the build logs");
    format!("{text}\n{decoded}")
}

#[tokio::test]
async fn no_configured_secret_reaches_any_log_record_or_call() {
    let repo = SampleRepo::new();
    let root = repo.path().parent().expect("repo parent").to_owned();
    let name = repo
        .path()
        .file_name()
        .expect("repo name")
        .to_string_lossy()
        .into_owned();
    let git = GitServer::start(&root, "gantry", CLONE_PASSWORD).await;
    let registry = start_registry("ci", REGISTRY_PASSWORD).await;
    let recorder = Recorder::start().await;
    let chat_url = format!("{}/chat/{CHAT_SECRET}", recorder.url);

    let clone_url = format!(
        "{}/{name}",
        git.url
            .replace("http://", &format!("http://gantry:{CLONE_PASSWORD}@"))
    );
    let mut project = ProjectSpec::new("private", &clone_url);
    project.registry = registry.host.clone();
    let env = EnvSpec::new("private");
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone()],
        environments: vec![env.clone()],
        lease_secs: 60,
        logins: vec![(registry.host.clone(), "ci".into(), REGISTRY_PASSWORD.into())],
        forge: Some(recorder.url.clone()),
        chat: vec![("team".into(), "slack".into(), chat_url.clone())],
        ..Default::default()
    })
    .await;

    // 1. A passing push: cloned with the credentials, pushed and pulled with
    //    the registry login, deployed, reported.
    let good = repo.head();
    let p1 = stack.push(&project, "refs/heads/main", &good).await;
    stack.wait_event(&p1, "deploy.succeeded", TIMEOUT).await;
    assert!(
        git.refused.load(std::sync::atomic::Ordering::SeqCst) > 0,
        "the git server asked for credentials"
    );
    assert!(git.served.load(std::sync::atomic::Ordering::SeqCst) > 0);

    // 2. A failing push by an author who would ping the whole channel.
    let bad = repo.commit_file(
        ".gantry.yml",
        "test:\n  - name: smoke\n    run: 'echo failing on purpose; exit 3'\n",
        "break it",
    );
    let mut body = forge::gitlab_push(&project.gitlab, "refs/heads/main", &bad, "main");
    body["commits"][0]["author"]["name"] = "<!channel> Mallory".into();
    let p2 = accepted_pipeline(
        stack
            .post_gitlab(&body, Some(SECRET), "Push Hook", None)
            .await,
    )
    .await;
    stack.wait_event(&p2, "build.failed", TIMEOUT).await;

    // 3. Manual triggers resolve refs with the clone credentials too.
    let mut ingest =
        IngestClient::new(stack.grpc_as("webhook-ingest", Some(tokens::TRIGGER)).await);
    let triggered = ingest
        .trigger(TriggerRequest {
            project: "private".into(),
            r#ref: "main".into(),
        })
        .await
        .expect("trigger main")
        .into_inner();
    assert_eq!(triggered.commit_sha, bad);
    let missing = ingest
        .trigger(TriggerRequest {
            project: "private".into(),
            r#ref: "no-such-branch".into(),
        })
        .await
        .expect_err("unknown ref");
    assert_eq!(missing.code(), tonic::Code::NotFound);
    stack.wait_outcome(&triggered.pipeline_id, TIMEOUT).await;

    // 4. The CLI reads a log with its token.
    let out = std::process::Command::new(bin_dir().join("gantry"))
        .args(["logs", &p1])
        .env(
            "GANTRY_BUILDER_URL",
            format!("http://127.0.0.1:{}", stack.grpc_port("builder")),
        )
        .env("GANTRY_TOKEN", tokens::READ)
        .output()
        .expect("gantry runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("fetching"));

    // The failure reached chat, and the author's name pings nobody.
    let chat = recorder
        .wait_for(&format!("/chat/{CHAT_SECRET}"), TIMEOUT, |calls| {
            calls
                .iter()
                .any(|c| c.body.to_string().contains("failed at step"))
        })
        .await;
    let failure = chat
        .iter()
        .map(|c| c.body["text"].as_str().unwrap_or_default().to_owned())
        .find(|t| t.contains("failed at step"))
        .expect("failure message");
    assert!(!failure.contains("<!channel>"), "{failure}");
    assert!(failure.contains("&lt;!channel&gt; Mallory"), "{failure}");
    recorder
        .wait_for("/api/v4/", TIMEOUT, |calls| !calls.is_empty())
        .await;

    // Everything Gantry wrote.
    let mut haystacks: Vec<(String, String)> = Vec::new();
    for service in SERVICES {
        let text = std::fs::read_to_string(stack.log_path(service)).unwrap_or_default();
        assert!(!text.is_empty(), "{service} wrote a log");
        haystacks.push((format!("{service} log"), text));
    }
    haystacks.push(("database".into(), dump(&stack.database_url)));
    let events: Vec<String> = stack
        .events()
        .iter()
        .map(|s| format!("{:?}", s.event))
        .collect();
    haystacks.push(("events".into(), events.join("\n")));
    for call in recorder.calls("/") {
        let mut text = call.body.to_string();
        if !call.path.starts_with("/chat/") {
            text.push_str(&call.path);
        }
        haystacks.push((format!("call {} {}", call.method, call.path), text));
    }

    let secrets = [
        ("webhook secret", SECRET.to_owned()),
        ("clone password", CLONE_PASSWORD.to_owned()),
        ("registry password", REGISTRY_PASSWORD.to_owned()),
        ("GitLab token", GITLAB_TOKEN.to_owned()),
        ("GitHub token", GITHUB_TOKEN.to_owned()),
        ("Gitea token", GITEA_TOKEN.to_owned()),
        ("chat URL", chat_url.clone()),
        ("chat URL secret", CHAT_SECRET.to_owned()),
        ("admin API token", tokens::ADMIN.to_owned()),
        ("read API token", tokens::READ.to_owned()),
        ("trigger API token", tokens::TRIGGER.to_owned()),
    ];
    let mut hits = Vec::new();
    for (what, secret) in &secrets {
        for form in forms(secret) {
            for (place, text) in &haystacks {
                if text.contains(&form) {
                    hits.push(format!("{what} as {form:?} in {place}"));
                }
            }
        }
    }
    assert!(hits.is_empty(), "secrets leaked:\n{}", hits.join("\n"));
}
