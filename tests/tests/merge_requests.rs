//! Merge requests and Gitea, end to end on one stack:
//!
//! - a GitLab merge request (branch with a slash and non-ASCII letters,
//!   unicode author) builds its head commit with the project's unprotected
//!   secrets, publishes only `mr-<iid>`, deploys only where an environment
//!   says `merge_request: true`, reports its status on the head commit and
//!   one comment on the merge request, which a second push edits; a title
//!   edit starts nothing;
//! - a GitHub pull request from a fork is fetched from the fork, gets no
//!   secrets (its log says so), is tagged `mr-<number>` and deployed
//!   nowhere, not even where merge requests go; a fork on another server
//!   is refused with the reason;
//! - a Gitea push with a valid signature builds and reports its status to
//!   Gitea; one with a wrong signature gets 401.

use std::time::Duration;

use gantry_proto::v1::event::Payload;
use gantry_tests::recorder::{Call, Recorder};
use gantry_tests::stack::{ProjectSpec, SECRET};
use gantry_tests::{EnvSpec, SampleRepo, Stack, StackOptions, accepted_pipeline, forge, registry};
use sqlx::Row as _;

const TIMEOUT: Duration = Duration::from_secs(180);
const TOKEN: &str = "mr-token-0b7c1e9f44";

/// The sample's pipeline file with one test step running `check`.
fn pipeline(check: &str) -> String {
    format!("image:\n  dockerfile: Dockerfile\ntest:\n  - name: secrets\n    run: {check}\n")
}

fn posts(calls: &[Call]) -> usize {
    calls.iter().filter(|c| c.method == "POST").count()
}

fn comment_says(call: &Call, sha: &str, what: &str) -> bool {
    let text = call.body["body"].as_str().unwrap_or_default();
    text.contains(&sha[..12]) && text.contains(what)
}

async fn environments_of(stack: &Stack, pipeline: &str) -> Vec<String> {
    let mut db = stack.db().await;
    sqlx::query("SELECT environment FROM deployer.deployments WHERE pipeline_id = $1")
        .bind(pipeline)
        .fetch_all(&mut db)
        .await
        .expect("deployments")
        .iter()
        .map(|r| r.get::<String, _>("environment"))
        .collect()
}

/// Waits until the deployer has recorded the image of `pipeline` (the
/// automatic deployments are queued in the same transaction).
async fn deployer_saw(stack: &Stack, pipeline: &str) {
    let mut db = stack.db().await;
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let n: i64 =
            sqlx::query_scalar("SELECT count(*) FROM deployer.images WHERE pipeline_id = $1")
                .bind(pipeline)
                .fetch_one(&mut db)
                .await
                .expect("images");
        if n > 0 {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the deployer never took the image in"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn published_tags(end: &gantry_tests::stack::Seen) -> Vec<String> {
    match &end.event.payload {
        Some(Payload::ImagePublished(p)) => p.tags.clone(),
        other => panic!("expected image.published, got {other:?}"),
    }
}

#[tokio::test]
async fn merge_requests_and_gitea_pushes() {
    let repo = SampleRepo::new();
    let project = ProjectSpec::new("web", &repo.url());
    let recorder = Recorder::start().await;
    let mut review = EnvSpec::new("web");
    review.name = format!("review-{}", &review.name["staging-".len()..]);
    review.rules = "[{merge_request: true}]".into();
    let mut staging = EnvSpec::new("web");
    staging.rules = "[{branch: 'feature/*'}, {tag: '*'}]".into();
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone()],
        forge: Some(recorder.url.clone()),
        environments: vec![review.clone(), staging.clone()],
        lease_secs: 60,
        project_extra: format!(
            "    secrets:\n      - {{name: API_TOKEN, value: {{value: '{TOKEN}'}}}}\n"
        ),
        ..Default::default()
    })
    .await;

    // --- GitLab: a merge request inside the project.
    let branch = "feature/grüße";
    repo.branch(branch);
    let c1 = repo.commit_file(
        ".gantry.yml",
        &pipeline("test \"$API_TOKEN\" = 'mr-token-0b7c1e9f44'"),
        "the merge request's first commit",
    );
    let open = forge::gitlab_merge_request(
        "team/web",
        ("team/web", &repo.url()),
        7,
        branch,
        &c1,
        "open",
        None,
    );
    let p1 = accepted_pipeline(
        stack
            .post_gitlab(&open, Some(SECRET), "Merge Request Hook", None)
            .await,
    )
    .await;
    let end = stack.wait_outcome(&p1, TIMEOUT).await;
    assert_eq!(published_tags(&end), ["mr-7"], "{end:?}");
    let Some(Payload::ImagePublished(published)) = &end.event.payload else {
        unreachable!()
    };
    let rev = published.revision.clone().unwrap_or_default();
    assert_eq!(rev.git_ref, "refs/merge-requests/7/head");
    assert_eq!((rev.branch.as_str(), rev.tag.as_str()), ("", ""));
    assert_eq!(rev.author_name, "Zoë Ångström");
    let mr = rev.merge_request.unwrap_or_default();
    assert_eq!((mr.number, mr.source_branch.as_str()), (7, branch));
    assert!(!mr.from_fork);
    let tags = registry::tags(&project.image_path).await;
    assert_eq!(tags, ["mr-7"], "no commit, branch or latest tag");

    // Deployed where merge requests go, and nowhere else: both environments'
    // deployments would have been queued together.
    stack.wait_event(&p1, "deploy.succeeded", TIMEOUT).await;
    assert_eq!(environments_of(&stack, &p1).await, [review.name.clone()]);

    // The status is on the head commit; the comment is created once.
    let statuses = format!("/api/v4/projects/team%2Fweb/statuses/{c1}");
    recorder
        .wait_for(&statuses, TIMEOUT, |calls| {
            calls
                .iter()
                .any(|c| c.body["name"] == "gantry/merge-request" && c.body["state"] == "success")
        })
        .await;
    let status = recorder.calls(&statuses);
    assert!(
        status
            .iter()
            .all(|c| c.body["ref"] == "refs/merge-requests/7/head"),
        "{status:#?}"
    );
    let notes = "/api/v4/projects/team%2Fweb/merge_requests/7/notes";
    let calls = recorder
        .wait_for(notes, TIMEOUT, |calls| {
            calls.iter().any(|c| comment_says(c, &c1, "passed"))
        })
        .await;
    assert_eq!(posts(&calls), 1, "{calls:#?}");
    assert_eq!(calls[0].method, "POST");
    assert_eq!(
        calls[0].headers.get("private-token").map(|v| v.as_bytes()),
        Some(gantry_tests::stack::GITLAB_TOKEN.as_bytes())
    );

    // A title edit starts nothing.
    let mut edited = open.clone();
    edited["object_attributes"]["action"] = "update".into();
    edited["object_attributes"]["title"] = "Draft: Zoë's change".into();
    let answer = stack
        .post_gitlab(&edited, Some(SECRET), "Merge Request Hook", None)
        .await;
    assert_eq!(answer.status(), 202);
    let body: serde_json::Value = answer.json().await.expect("json");
    assert_eq!(body["status"], "ignored", "{body}");

    // New commits: a new pipeline, and the same comment edited.
    let c2 = repo.commit_file("index.html", "hello from the merge request\n", "second");
    let update = forge::gitlab_merge_request(
        "team/web",
        ("team/web", &repo.url()),
        7,
        branch,
        &c2,
        "update",
        Some(&c1),
    );
    let p2 = accepted_pipeline(
        stack
            .post_gitlab(&update, Some(SECRET), "Merge Request Hook", None)
            .await,
    )
    .await;
    assert_ne!(p1, p2);
    let end = stack.wait_outcome(&p2, TIMEOUT).await;
    assert_eq!(published_tags(&end), ["mr-7"], "{end:?}");
    let calls = recorder
        .wait_for(notes, TIMEOUT, |calls| {
            calls.iter().any(|c| comment_says(c, &c2, "passed"))
        })
        .await;
    assert_eq!(posts(&calls), 1, "one comment, edited: {calls:#?}");
    let edit = calls
        .iter()
        .rfind(|c| comment_says(c, &c2, "passed"))
        .expect("the edit");
    assert_eq!(edit.method, "PUT");
    assert_eq!(edit.path, format!("{notes}/1"));

    // --- GitHub: a pull request from a fork.
    repo.switch("main");
    let fork = repo.fork();
    let fork_branch = "topic/ünïcode";
    fork.branch(fork_branch);
    let c3 = fork.commit_file(
        ".gantry.yml",
        &pipeline("test -z \"$API_TOKEN\""),
        "a fork's change",
    );
    let opened = forge::pull_request(
        "team/web",
        ("zoe/web", &fork.url()),
        12,
        fork_branch,
        &c3,
        "opened",
    );
    let body = serde_json::to_vec(&opened).expect("json");
    let p3 = accepted_pipeline(
        stack
            .post_github(&body, Some(SECRET), "pull_request", "pr-12-opened")
            .await,
    )
    .await;
    let end = stack.wait_outcome(&p3, TIMEOUT).await;
    let log = String::from_utf8_lossy(&stack.cli(&["logs", &p3]).stdout).into_owned();
    assert_eq!(published_tags(&end), ["mr-12"], "{end:?}\n{log}");
    assert!(
        log.contains(
            "secrets withheld from this pipeline (a merge request from a fork gets none): API_TOKEN"
        ),
        "{log}"
    );
    assert!(log.contains(&fork.url()), "fetched from the fork:\n{log}");
    recorder
        .wait_for(
            &format!("/repos/team/web/statuses/{c3}"),
            TIMEOUT,
            |calls| calls.iter().any(|c| c.body["state"] == "success"),
        )
        .await;
    // GitHub edits a comment at /repos/{owner}/{repo}/issues/comments/{id}.
    let comments = recorder
        .wait_for("/repos/team/web/issues/", TIMEOUT, |calls| {
            calls.iter().any(|c| comment_says(c, &c3, "passed"))
        })
        .await;
    let created: Vec<&Call> = comments.iter().filter(|c| c.method == "POST").collect();
    assert_eq!(created.len(), 1, "{comments:#?}");
    assert_eq!(created[0].path, "/repos/team/web/issues/12/comments");
    // The recorder's second comment (GitLab's was the first).
    let last = comments.last().expect("a call");
    assert_eq!(
        (last.method.as_str(), last.path.as_str()),
        ("PATCH", "/repos/team/web/issues/comments/2")
    );
    // A fork's merge request is never deployed automatically: once the
    // deployer has taken its image in, no deployment was queued with it.
    deployer_saw(&stack, &p3).await;
    assert!(environments_of(&stack, &p3).await.is_empty());
    // Nor by hand through a short sha, which a fork's author can mine.
    let short = stack.cli(&["deploy", &staging.name, &c3[..10]]);
    let stderr = String::from_utf8_lossy(&short.stderr);
    assert!(
        !short.status.success() && stderr.contains("no published image"),
        "{stderr}"
    );

    // A fork on another server is never fetched.
    let mut elsewhere = forge::pull_request(
        "team/web",
        ("mallory/web", "https://evil.example.com/mallory/web.git"),
        13,
        "main",
        &c3,
        "opened",
    );
    elsewhere["pull_request"]["head"]["repo"]["ssh_url"] = "git@evil.example.com:m/web.git".into();
    let body = serde_json::to_vec(&elsewhere).expect("json");
    let p4 = accepted_pipeline(
        stack
            .post_github(&body, Some(SECRET), "pull_request", "pr-13-opened")
            .await,
    )
    .await;
    let end = stack.wait_outcome(&p4, TIMEOUT).await;
    let Some(Payload::BuildFailed(failed)) = &end.event.payload else {
        panic!("expected build.failed, got {end:?}");
    };
    assert_eq!(failed.step, "checkout");
    assert!(
        failed
            .reason
            .contains("not on the server of the project's clone URL"),
        "{failed:?}"
    );

    // --- Gitea: pushes signed with the project's secret.
    let gitea_branch = "gitea/naïve";
    repo.branch(gitea_branch);
    let c5 = repo.commit_file("index.html", "hello from gitea\n", "gitea");
    let push = forge::gitea_push("team/web", &format!("refs/heads/{gitea_branch}"), &c5);
    let wrong = stack
        .post_gitea(&push, Some("not the secret"), "push", "gitea-1")
        .await;
    assert_eq!(wrong.status(), 401);
    let unsigned = stack.post_gitea(&push, None, "push", "gitea-1").await;
    assert_eq!(unsigned.status(), 401);
    let p5 = accepted_pipeline(
        stack
            .post_gitea(&push, Some(SECRET), "push", "gitea-1")
            .await,
    )
    .await;
    let end = stack.wait_outcome(&p5, TIMEOUT).await;
    let Some(Payload::ImagePublished(published)) = &end.event.payload else {
        panic!("expected image.published, got {end:?}");
    };
    let rev = published.revision.clone().unwrap_or_default();
    assert_eq!(
        (rev.source.as_str(), rev.branch.as_str()),
        ("gitea", gitea_branch)
    );
    assert_eq!(rev.author_name, "Zoë Ångström");
    let calls = recorder
        .wait_for(
            &format!("/api/v1/repos/team/web/statuses/{c5}"),
            TIMEOUT,
            |calls| calls.iter().any(|c| c.body["state"] == "success"),
        )
        .await;
    assert_eq!(
        calls[0].headers.get("authorization").map(|v| v.as_bytes()),
        Some(format!("token {}", gantry_tests::stack::GITEA_TOKEN).as_bytes())
    );
    // Only the forge the push came from hears about it.
    assert!(
        recorder
            .calls(&format!("/repos/team/web/statuses/{c5}"))
            .is_empty()
    );
    assert!(
        recorder
            .calls(&format!("/api/v4/projects/team%2Fweb/statuses/{c5}"))
            .is_empty()
    );
}
