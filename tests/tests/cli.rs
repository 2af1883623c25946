//! The `gantry` command against a running Gantry: trigger, watch, pipelines,
//! logs, envs, deploy and rollback, in text and JSON.

use std::process::{Command, Output};

use gantry_tests::stack::{ProjectSpec, bin_dir};
use gantry_tests::{EnvSpec, SampleRepo, Stack, StackOptions};

fn gantry(stack: &Stack, args: &[&str]) -> Output {
    stack.cli(args)
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "gantry failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&ok(out)).expect("JSON output")
}

#[tokio::test]
async fn the_cli_drives_a_pipeline_from_trigger_to_deployment() {
    let repo = SampleRepo::new();
    let project = ProjectSpec::new("web", &repo.url());
    let env = EnvSpec::new("web");
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone()],
        environments: vec![env.clone()],
        lease_secs: 60,
        ..Default::default()
    })
    .await;
    let sha = repo.head();

    let started = json(&gantry(&stack, &["trigger", "web", "main", "--json"]));
    let pipeline = started["pipeline_id"]
        .as_str()
        .expect("pipeline id")
        .to_owned();
    assert_eq!(started["commit"], sha.as_str());

    // watch returns once the pipeline and its deployment are done.
    let watched = ok(&gantry(&stack, &["watch", &pipeline]));
    assert!(watched.contains("success"), "{watched}");
    assert!(
        watched.contains(&format!("{}=succeeded", env.name)),
        "{watched}"
    );

    let list = json(&gantry(&stack, &["pipelines", "--json"]));
    assert_eq!(list[0]["pipeline_id"], pipeline.as_str());
    assert_eq!(list[0]["state"], "success");
    assert_eq!(list[0]["commit"], sha.as_str());
    let text = ok(&gantry(&stack, &["pipelines"]));
    assert!(
        text.contains(&pipeline) && text.contains("success"),
        "{text}"
    );

    let log = ok(&gantry(&stack, &["logs", &pipeline]));
    assert!(log.contains("FROM scratch"), "{log}");

    let envs = json(&gantry(&stack, &["envs", "--json"]));
    assert_eq!(envs[0]["name"], env.name.as_str());
    assert_eq!(envs[0]["current"]["commit"], sha.as_str());
    assert_eq!(envs[0]["current"]["state"], "succeeded");
    let text = ok(&gantry(&stack, &["envs"]));
    assert!(
        text.contains("runs ") && text.contains(&sha[..10]),
        "{text}"
    );

    // Errors are clear and exit non-zero.
    let out = gantry(&stack, &["rollback", &env.name]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no earlier version"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = gantry(&stack, &["deploy", &env.name, "v9.9.9"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no published image"));
    let out = gantry(&stack, &["deploy", "nowhere", "main"]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("no environment"));
    // A prefix is taken literally: LIKE's wildcards match no commit.
    for wildcard in ["%%%%%%%", "_______", &format!("{}%", &sha[..7])] {
        let out = gantry(&stack, &["deploy", &env.name, wildcard]);
        assert!(!out.status.success(), "{wildcard} matched an image");
        assert!(String::from_utf8_lossy(&out.stderr).contains("no published image"));
    }
    assert!(
        gantry(&stack, &["deploy", &env.name, &sha[..7]])
            .status
            .success()
    );

    // The token the configuration holds is the SHA-256 of the token.
    let hashed = ok(&gantry(&stack, &["token", "hash", "abc"]));
    assert_eq!(
        hashed.trim(),
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    );
    let made = ok(&gantry(
        &stack,
        &["token", "new", "--name", "ci", "--scopes", "read,trigger"],
    ));
    let token = made
        .lines()
        .find_map(|l| l.strip_prefix("token:"))
        .expect("token line")
        .trim()
        .to_owned();
    assert!(
        made.contains(&format!(
            "sha256: {}, scopes: [read, trigger]",
            gantry_config::token_hash(&token)
        )),
        "{made}"
    );

    // deploy by tag queues the same image again.
    let queued = json(&gantry(&stack, &["deploy", &env.name, "main", "--json"]));
    assert_eq!(queued["commit"], sha.as_str());
    assert_eq!(queued["trigger"], "manual");
}

/// `gantry lint` checks files with the builder's parser, without any service.
#[test]
fn lint_checks_pipeline_files_like_the_builder() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lint = |name: &str, text: &str, json: bool| -> Output {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        let mut args = vec!["lint".to_owned(), path.display().to_string()];
        if json {
            args.push("--json".into());
        }
        Command::new(bin_dir().join("gantry"))
            .args(&args)
            // No service is reachable: the lint must not need one.
            .env("GANTRY_NOTIFIER_URL", "http://127.0.0.1:1")
            .output()
            .expect("gantry runs")
    };

    let good = lint(
        "good.yml",
        "image:\n  dockerfile: Dockerfile\ntest:\n  - name: unit\n    run: make test\n",
        false,
    );
    let stdout = String::from_utf8_lossy(&good.stdout);
    assert_eq!(good.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("valid") && stdout.contains("1 test step"),
        "{stdout}"
    );

    let stack = lint(
        "stack.yml",
        "stack:\n  members: {web: hello-web}\n  tests: [e2e]\n",
        false,
    );
    let stdout = String::from_utf8_lossy(&stack.stdout);
    assert_eq!(stack.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("a stack: 1 member, tests e2e"), "{stdout}");

    // A misspelt key: the place, what was expected and the closest key.
    let typo = lint("typo.yml", "image:\n  dockerfil: Dockerfile\n", false);
    let stderr = String::from_utf8_lossy(&typo.stderr);
    assert_eq!(typo.status.code(), Some(1), "{stderr}");
    let path = dir.path().join("typo.yml");
    assert!(
        stderr.starts_with(&format!(
            "{}:2:3: unknown field `dockerfil`",
            path.display()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("did you mean `dockerfile`?"), "{stderr}");

    // An error found after parsing keeps its place too, also in JSON.
    let reserved = lint("reserved.yml", "test:\n  - name: build\n    run: x\n", true);
    assert_eq!(reserved.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&reserved.stdout).expect("JSON output");
    assert_eq!(v["valid"], false);
    assert_eq!(
        (v["line"].as_u64(), v["column"].as_u64()),
        (Some(2), Some(11))
    );
    assert!(
        v["message"]
            .as_str()
            .unwrap_or_default()
            .contains("reserved"),
        "{v}"
    );

    // A file that cannot be read is another exit code.
    let missing = Command::new(bin_dir().join("gantry"))
        .args(["lint", "/nonexistent/.gantry.yml"])
        .output()
        .expect("gantry runs");
    assert_eq!(missing.status.code(), Some(2));
}
