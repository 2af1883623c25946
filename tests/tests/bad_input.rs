//! Bad input gets a clear status and loses nothing: wrong secrets, unknown
//! projects, malformed or oversized bodies, unsupported events, and a broken
//! configuration file at start.

use gantry_tests::stack::SECRET;
use gantry_tests::{SampleRepo, Stack, forge};

#[tokio::test]
async fn each_bad_webhook_gets_its_status_code() {
    let repo = SampleRepo::new();
    let (stack, project) = Stack::with_project(&repo, "hello", 60).await;
    let sha = repo.head();
    let push = forge::gitlab_push(&project.gitlab, "refs/heads/main", &sha, "main");

    let cases: Vec<(&str, reqwest::Response, u16, &str)> = vec![
        (
            "wrong GitLab token",
            stack
                .post_gitlab(&push, Some("wrong"), "Push Hook", None)
                .await,
            401,
            "secret",
        ),
        (
            "missing GitLab token",
            stack.post_gitlab(&push, None, "Push Hook", None).await,
            401,
            "secret",
        ),
        (
            "unknown GitLab project",
            stack
                .post_gitlab(
                    &forge::gitlab_push("team/unknown", "refs/heads/main", &sha, "main"),
                    Some(SECRET),
                    "Push Hook",
                    None,
                )
                .await,
            401,
            "secret",
        ),
        (
            "push without ref",
            {
                let mut p = push.clone();
                p.as_object_mut().expect("object").remove("ref");
                stack.post_gitlab(&p, Some(SECRET), "Push Hook", None).await
            },
            400,
            "ref",
        ),
        (
            "sha that is not a sha",
            {
                let mut p = push.clone();
                p["checkout_sha"] = "main".into();
                stack.post_gitlab(&p, Some(SECRET), "Push Hook", None).await
            },
            400,
            "commit sha",
        ),
        (
            "unsupported GitLab event",
            stack
                .post_gitlab(&push, Some(SECRET), "Issue Hook", None)
                .await,
            202,
            "ignored",
        ),
        (
            "branch deletion",
            {
                let mut p = push.clone();
                p["after"] = "0000000000000000000000000000000000000000".into();
                p["checkout_sha"] = serde_json::Value::Null;
                stack.post_gitlab(&p, Some(SECRET), "Push Hook", None).await
            },
            202,
            "deleted",
        ),
    ];
    let gh = serde_json::to_vec(&forge::github_push(
        &project.github,
        "refs/heads/main",
        &sha,
        "main",
    ))
    .expect("json");
    let org_ping = serde_json::to_vec(&serde_json::json!({
        "zen": "Design for failure.",
        "hook_id": 12345678,
        "hook": {"type": "Organization", "id": 12345678, "name": "web", "active": true,
                 "events": ["push", "pull_request"],
                 "config": {"content_type": "json", "insecure_ssl": "0", "url": "https://ci.example/hooks/github"}},
        "organization": {"login": "team", "id": 1},
        "sender": {"login": "octocat", "id": 1}
    }))
    .expect("json");
    let mut gh_cases: Vec<(&str, reqwest::Response, u16, &str)> = vec![
        (
            "GitHub signature by another secret",
            stack.post_github(&gh, Some("other"), "push", "d1").await,
            401,
            "secret",
        ),
        (
            "unsigned GitHub delivery",
            stack.post_github(&gh, None, "push", "d2").await,
            401,
            "secret",
        ),
        (
            "GitHub ping of a repository hook",
            stack.post_github(&gh, Some(SECRET), "ping", "d3").await,
            200,
            "pong",
        ),
        (
            // As GitHub documents an organisation hook's ping: no `repository`.
            "GitHub ping of an organisation hook",
            stack
                .post_github(&org_ping, Some(SECRET), "ping", "d3-org")
                .await,
            200,
            "pong",
        ),
        (
            "GitHub ping with a wrong signature",
            stack
                .post_github(&org_ping, Some("other"), "ping", "d3-bad")
                .await,
            401,
            "secret",
        ),
        (
            "form-encoded delivery without a payload field",
            stack
                .post_github_as(
                    "application/x-www-form-urlencoded",
                    b"event=push",
                    Some(SECRET),
                    "push",
                    "d6",
                )
                .await,
            400,
            "application/x-www-form-urlencoded",
        ),
        (
            "a content type GitHub does not send",
            stack
                .post_github_as("text/plain", &gh, Some(SECRET), "push", "d7")
                .await,
            400,
            "is not supported",
        ),
        (
            "truncated JSON",
            stack
                .post_github(&gh[..gh.len() / 2], Some(SECRET), "push", "d4")
                .await,
            400,
            "not valid JSON",
        ),
        (
            "JSON without repository",
            stack
                .post_github(b"{\"ref\":\"x\"}", Some(SECRET), "push", "d5")
                .await,
            400,
            "repository.full_name",
        ),
    ];
    let mut all = cases;
    all.append(&mut gh_cases);
    for (what, resp, status, needle) in all {
        let got = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        assert_eq!(got, status, "{what}: {text}");
        assert!(
            text.contains(needle),
            "{what}: {text:?} should mention {needle:?}"
        );
    }

    // Over the documented 25 MiB limit: 413 from the declared length, before
    // the body is read, and the service goes on. (The answer may come while
    // the client still writes; then the client sees the connection close.)
    let huge = vec![b' '; 26 * 1024 * 1024];
    let sent = stack
        .http_client()
        .post(stack.ingest_url("/hooks/github"))
        .header("content-type", "application/json")
        .header("x-github-event", "push")
        .body(huge)
        .send()
        .await;
    match sent {
        Ok(resp) => {
            assert_eq!(resp.status(), 413);
            let text = resp.text().await.unwrap_or_default();
            assert!(
                text.contains("larger than the limit of 26214400 bytes"),
                "{text}"
            );
        }
        Err(e) => assert!(e.is_request() || e.is_body(), "{e:?}"),
    }

    // None of it started a pipeline, and the service still accepts good
    // deliveries, a form-encoded GitHub one (signed as sent) among them.
    let resp = stack
        .post_gitlab(&push, Some(SECRET), "Push Hook", None)
        .await;
    assert_eq!(resp.status(), 202);
    let form: String = form_urlencoded::Serializer::new(String::new())
        .append_pair("payload", std::str::from_utf8(&gh).expect("utf-8"))
        .finish();
    let resp = stack
        .post_github_as(
            "application/x-www-form-urlencoded",
            form.as_bytes(),
            Some(SECRET),
            "push",
            "d8",
        )
        .await;
    let status = resp.status();
    let text = resp.text().await.unwrap_or_default();
    assert_eq!(status, 202, "{text}");
    assert!(text.contains("accepted"), "{text}");
    use sqlx::Row as _;
    let mut db = stack.db().await;
    let n: i64 = sqlx::query("SELECT count(*) AS n FROM ingest.pipelines")
        .fetch_one(&mut db)
        .await
        .expect("count")
        .get("n");
    assert_eq!(n, 2);
}

#[test]
fn invalid_configuration_exits_non_zero_naming_file_line_and_column() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gantry.yml");
    std::fs::write(&path, "projects:\n  - name: a\n    clone_url: file:///x\n    webhook_secret: {value: s}\n    image: 127.0.0.1:5000/a\n    imgae: typo\n").expect("write");
    for service in gantry_tests::stack::SERVICES {
        let out = std::process::Command::new(gantry_tests::stack::bin_dir().join(service))
            .env("GANTRY_CONFIG", &path)
            .env("DATABASE_URL", "postgres://unused@127.0.0.1:1/x")
            .env("AMQP_URL", "amqp://127.0.0.1:1/%2f")
            .output()
            .expect("service binary runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{service}: {stderr}");
        assert!(
            stderr.contains(&format!("{}:6:5", path.display())),
            "{service}: {stderr}"
        );
        assert!(stderr.contains("imgae"), "{service}: {stderr}");
    }
}

/// Random bodies and mangled real deliveries: never a 5xx, never a crash.
#[tokio::test]
async fn random_and_mangled_bodies_never_get_a_server_error() {
    let repo = SampleRepo::new();
    let (stack, project) = Stack::with_project(&repo, "hello", 60).await;
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let push = serde_json::to_vec(&forge::gitlab_push(
        &project.gitlab,
        "refs/heads/main",
        &repo.head(),
        "main",
    ))
    .expect("json");
    let gh = serde_json::to_vec(&forge::github_push(
        &project.github,
        "refs/heads/main",
        &repo.head(),
        "main",
    ))
    .expect("json");
    for i in 0..150 {
        let base = if i % 2 == 0 { &push } else { &gh };
        let mut body = base.clone();
        match i % 3 {
            // Flip bytes of a real delivery.
            0 => {
                for _ in 0..(1 + next() % 8) {
                    let at = (next() as usize) % body.len();
                    body[at] = (next() % 256) as u8;
                }
            }
            // Cut it short.
            1 => body.truncate((next() as usize) % body.len()),
            // Pure noise.
            _ => body = (0..(next() % 512)).map(|_| (next() % 256) as u8).collect(),
        }
        let resp = if i % 2 == 0 {
            gantry_tests::http()
                .post(stack.ingest_url("/hooks/gitlab"))
                .header("x-gitlab-event", "Push Hook")
                .header("x-gitlab-token", SECRET)
                .body(body)
                .send()
                .await
        } else {
            let sig = forge::github_signature(SECRET, &body);
            gantry_tests::http()
                .post(stack.ingest_url("/hooks/github"))
                .header("x-github-event", "push")
                .header("x-hub-signature-256", sig)
                .body(body)
                .send()
                .await
        }
        .expect("the service answers");
        let status = resp.status().as_u16();
        assert!(
            [200, 202, 400, 401, 404].contains(&status),
            "case {i}: unexpected {status}: {}",
            resp.text().await.unwrap_or_default()
        );
    }
    assert!(
        stack.pid("webhook-ingest").is_some(),
        "webhook-ingest is still running"
    );
}
