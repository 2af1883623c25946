//! A pushed repository is hostile. Each branch of one sample repository
//! tries something a builder must not allow — a build context or
//! `.gantry.yml` that leads out of the checkout, a root user under another
//! spelling, the network, a fork bomb, a flood of output, a link to the
//! host's `/etc/shadow` — and each is refused or contained, with the reason
//! in the pipeline's failure or its log.

use std::collections::HashMap;
use std::time::Duration;

use gantry_proto::v1::event::Payload;
use gantry_tests::stack::ProjectSpec;
use gantry_tests::{SampleRepo, Stack, StackOptions, docker, registry};
use sqlx::Row as _;

const TIMEOUT: Duration = Duration::from_secs(240);

/// The sample's Dockerfile with an account file naming uid 0 twice.
fn dockerfile_with_users(user: &str) -> String {
    gantry_tests::repo::dockerfile(
        &format!(
            "RUN echo 'root:x:0:0::/:/bin/sh' > /etc/passwd && echo 'toor:x:0:0::/:/bin/sh' >> /etc/passwd && echo 'root:x:0:' > /etc/group\nUSER {user}\n"
        ),
        gantry_tests::repo::SERVE,
    )
}

struct Case {
    branch: &'static str,
    sha: String,
}

/// Commits a variant of the sample on its own branch off `main`.
fn case(
    repo: &SampleRepo,
    branch: &'static str,
    files: &[(&str, String)],
    links: &[(&str, &str)],
) -> Case {
    repo.switch("main");
    repo.branch(branch);
    for (path, content) in files {
        repo.write(path, content);
    }
    for (target, link) in links {
        repo.symlink(target, link);
    }
    let sha = repo.commit(branch);
    repo.switch("main");
    Case {
        branch,
        sha: sha.to_owned(),
    }
}

fn pipeline_file(steps: &str) -> String {
    format!("image:\n  dockerfile: Dockerfile\ntest:\n{steps}")
}

/// The stored log of a pipeline's build: (step, stream) → text.
async fn log_of(stack: &Stack, pipeline: &str) -> (HashMap<(String, String), String>, i64) {
    let mut db = stack.db().await;
    let rows = sqlx::query(
        "SELECT l.step, l.stream, l.data FROM builder.build_logs l
         JOIN builder.builds b ON b.id = l.build_id WHERE b.pipeline_id = $1 ORDER BY l.seq",
    )
    .bind(pipeline)
    .fetch_all(&mut db)
    .await
    .expect("log rows");
    let count = rows.len() as i64;
    let mut log: HashMap<(String, String), String> = HashMap::new();
    for row in rows {
        let data: Vec<u8> = row.get("data");
        log.entry((row.get("step"), row.get("stream")))
            .or_default()
            .push_str(&String::from_utf8_lossy(&data));
    }
    (log, count)
}

fn all_text(log: &HashMap<(String, String), String>) -> String {
    log.values().cloned().collect::<Vec<_>>().join("")
}

#[tokio::test]
async fn hostile_repositories_are_refused_or_contained() {
    let repo = SampleRepo::new();
    let project = ProjectSpec::new("hostile", &repo.url());
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone()],
        lease_secs: 60,
        project_extra: "    limits: {memory_mb: 256, pids: 64, cpus: 1}\n".into(),
        ..Default::default()
    })
    .await;

    let cases = vec![
        case(
            &repo,
            "ctx-etc",
            &[(
                ".gantry.yml",
                "image:\n  context: ctx\n  dockerfile: Dockerfile\n".into(),
            )],
            &[("/etc", "ctx")],
        ),
        case(
            &repo,
            "ctx-up",
            &[(
                ".gantry.yml",
                "image:\n  context: ctx\n  dockerfile: Dockerfile\n".into(),
            )],
            &[("..", "ctx")],
        ),
        case(
            &repo,
            "pipeline-outside",
            &[],
            &[("/etc/hostname", ".gantry.yml")],
        ),
        case(
            &repo,
            "root-user",
            &[
                ("Dockerfile", dockerfile_with_users("root:root")),
                (
                    ".gantry.yml",
                    pipeline_file(
                        "  - name: who\n    run: 'echo \"runs as $(id -u):$(id -g)\"; test \"$(id -u):$(id -g)\" = 65534:65534'\n",
                    ),
                ),
            ],
            &[],
        ),
        case(
            &repo,
            "alias-user",
            &[
                ("Dockerfile", dockerfile_with_users("toor")),
                (
                    ".gantry.yml",
                    pipeline_file(
                        "  - name: who\n    run: 'test \"$(id -u):$(id -g)\" = 65534:65534'\n",
                    ),
                ),
            ],
            &[],
        ),
        case(
            &repo,
            "network",
            &[(
                ".gantry.yml",
                pipeline_file(concat!(
                    "  - name: offline\n",
                    "    run: 'if grep -v -e \"lo:\" -e \"|\" /proc/net/dev; then echo has-interface; exit 1; fi; if nc -w 3 172.17.0.1 5672 </dev/null; then echo reached; exit 1; fi; echo contained-offline'\n",
                    "  - name: online\n",
                    "    network: true\n",
                    "    run: 'gw=$(route -n | awk \"\\$1 == \\\"0.0.0.0\\\" {print \\$2}\"); test -n \"$gw\" || exit 2; if nc -w 3 $gw 5672 </dev/null; then echo reached-host-$gw; exit 1; fi; echo contained-online $gw'\n",
                )),
            )],
            &[],
        ),
        case(
            &repo,
            "fork-bomb",
            &[(
                ".gantry.yml",
                pipeline_file(concat!(
                    "  - name: limits\n",
                    "    run: 'p=$(cat /sys/fs/cgroup/pids.max 2>/dev/null || cat /sys/fs/cgroup/pids/pids.max); m=$(cat /sys/fs/cgroup/memory.max 2>/dev/null || cat /sys/fs/cgroup/memory/memory.limit_in_bytes); echo \"pids=$p memory=$m\"; test \"$p\" = 64 && test \"$m\" = 268435456'\n",
                    "  - name: fork-bomb\n",
                    "    timeout: 15\n",
                    "    run: 'bomb() { bomb | bomb & }; bomb; wait; sleep 600'\n",
                )),
            )],
            &[],
        ),
        case(
            &repo,
            "chatty",
            &[(
                ".gantry.yml",
                pipeline_file(
                    "  - name: chatty\n    run: 'head -c 10485760 /dev/zero | tr \"\\\\000\" a; echo; echo done'\n",
                ),
            )],
            &[],
        ),
        case(
            &repo,
            "inner-link",
            &[
                (
                    "Dockerfile",
                    gantry_tests::repo::dockerfile(
                        "COPY shadow /copied\n",
                        gantry_tests::repo::SERVE,
                    ),
                ),
                (
                    ".gantry.yml",
                    pipeline_file("  - name: never\n    run: 'cat /copied'\n"),
                ),
            ],
            &[("/etc/shadow", "shadow")],
        ),
    ];

    let mut pipelines = Vec::new();
    for c in &cases {
        let p = stack
            .push(&project, &format!("refs/heads/{}", c.branch), &c.sha)
            .await;
        pipelines.push(p);
    }
    let mut outcomes = HashMap::new();
    for (c, p) in cases.iter().zip(&pipelines) {
        let seen = stack.wait_outcome(p, TIMEOUT).await;
        outcomes.insert(c.branch, (p.clone(), seen.event.payload));
    }
    let failed = |branch: &str| -> (String, String, i32) {
        match &outcomes[branch].1 {
            Some(Payload::BuildFailed(f)) => (f.step.clone(), f.reason.clone(), f.exit_code),
            other => panic!("{branch}: expected build.failed, got {other:?}"),
        }
    };
    let published = |branch: &str| match &outcomes[branch].1 {
        Some(Payload::ImagePublished(_)) => {}
        other => panic!("{branch}: expected image.published, got {other:?}"),
    };

    // Paths out of the checkout are refused, naming the path.
    for branch in ["ctx-etc", "ctx-up"] {
        let (step, reason, _) = failed(branch);
        assert_eq!(step, "build", "{branch}: {reason}");
        assert!(
            reason.contains("build context \"ctx\" leads outside the repository"),
            "{branch}: {reason}"
        );
    }
    let (step, reason, _) = failed("pipeline-outside");
    assert_eq!(step, "config", "{reason}");
    assert!(
        reason.contains(".gantry.yml") && reason.contains("outside the repository"),
        "{reason}"
    );
    // Nothing of them reached the registry.
    let tags = registry::tags(&project.image_path).await;
    for c in &cases[..3] {
        assert!(!tags.contains(&c.sha), "{} was pushed: {tags:?}", c.branch);
    }

    // uid 0 under another spelling runs as nobody, and the log says so.
    for branch in ["root-user", "alias-user"] {
        published(branch);
        let (log, _) = log_of(&stack, &outcomes[branch].0).await;
        let text = all_text(&log);
        assert!(text.contains("is uid 0 (root)"), "{branch}: {text}");
    }

    // No network unless asked for; with it, still not the host's services.
    published("network");
    let (log, _) = log_of(&stack, &outcomes["network"].0).await;
    let text = all_text(&log);
    assert!(text.contains("contained-offline"), "{text}");
    assert!(text.contains("contained-online"), "{text}");

    // Limits are applied; a fork bomb is cut off by its timeout.
    let (step, reason, _) = failed("fork-bomb");
    assert_eq!(step, "fork-bomb", "{reason}");
    let (log, _) = log_of(&stack, &outcomes["fork-bomb"].0).await;
    assert!(
        all_text(&log).contains("pids=64 memory=268435456"),
        "{}",
        all_text(&log)
    );

    // 10 MiB of output: 4 MiB kept in few rows, a line saying so, and the
    // exit code (0) decides.
    published("chatty");
    let (log, rows) = log_of(&stack, &outcomes["chatty"].0).await;
    let stdout = log
        .get(&("chatty".to_owned(), "stdout".to_owned()))
        .cloned()
        .unwrap_or_default();
    // The build's own output counts towards the limit too.
    let limit = 4 * 1024 * 1024;
    assert!(
        stdout.len() <= limit && stdout.len() > limit - 64 * 1024,
        "kept {} bytes of output",
        stdout.len()
    );
    let text = all_text(&log);
    assert!(text.contains("reached its limit of 4 MiB"), "notice");
    assert!(text.contains("log cut: 6."), "closing line");
    assert!(rows < 200, "{rows} rows for 4 MiB");

    // A link to a host file travels as a link: the engine resolves it inside
    // the context, where it leads nowhere, and the build fails.
    let (step, reason, _) = failed("inner-link");
    assert_eq!(step, "build", "{reason}");
    assert!(reason.contains("not found in build context"), "{reason}");

    // Whatever happened, no step container is left, and the engine keeps
    // no image of a published build.
    for (c, p) in cases.iter().zip(&pipelines) {
        let left = docker::labelled(&format!("io.gantry.pipeline={p}"));
        assert!(left.is_empty(), "{}: containers left: {left:?}", c.branch);
    }
    for branch in ["root-user", "alias-user", "network", "chatty"] {
        let sha = &cases.iter().find(|c| c.branch == branch).expect("case").sha;
        let images = docker::images_labelled(&format!("io.gantry.commit={sha}"));
        assert!(images.is_empty(), "{branch}: images kept: {images:?}");
    }
}
