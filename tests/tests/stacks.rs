//! Stacks end to end: a three-service stack (`web` fetches from `api`,
//! `tests` checks the answer through `web`) whose members are Gantry
//! projects. A push to the stack repository runs it and makes release 1; a
//! release of `api` runs it again with the new `api` (release 2); an `api`
//! that breaks the contract fails the run and makes no release; a fix makes
//! release 3. Two member releases while a run is going make exactly one more
//! run, which tests both. Nothing of any run stays in the engine. Every
//! release is deployed to the stack's environment (only the services that
//! changed are replaced); a release whose `web` fails in the environment
//! takes the whole environment back to the previous release, and a manual
//! rollback goes back one more.

use std::time::Duration;

use gantry_proto::v1::event::Payload;
use gantry_proto::v1::stacks_client::StacksClient;
use gantry_proto::v1::{
    GetStackRequest, ListStackReleasesRequest, ListStackRunsRequest, RollbackStackRequest,
    StackRunInfo,
};
use gantry_tests::recorder::{Call, Recorder};
use gantry_tests::stack::ProjectSpec;
use gantry_tests::stack_sample::{Shop, member_dockerfile, release};
use gantry_tests::{EnvSpec, SampleRepo, Stack, StackOptions, docker};

const TIMEOUT: Duration = Duration::from_secs(240);

/// The states of the `gantry/stack/shop` statuses among GitLab status calls.
fn stack_states(calls: &[Call]) -> Vec<String> {
    calls
        .iter()
        .filter(|c| c.body["name"] == "gantry/stack/shop")
        .map(|c| c.body["state"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// The text of a Slack-style chat call.
fn text(call: &Call) -> String {
    call.body["text"].as_str().unwrap_or_default().to_owned()
}

/// What the environment's endpoint answers at `/cgi-bin/v`, once it answers.
async fn answer(env: &EnvSpec) -> String {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let url = format!("{}cgi-bin/v", env.endpoint_url());
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        match client.get(&url).send().await {
            Ok(r) if r.status().is_success() => {
                return r.text().await.unwrap_or_default().trim().to_owned();
            }
            other => assert!(
                tokio::time::Instant::now() < deadline,
                "{url} does not answer: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The release running in the stack's environment, as `Stacks.Get` says.
async fn environment_release(stack: &Stack) -> u64 {
    StacksClient::new(stack.grpc("deployer").await)
        .get(GetStackRequest {
            stack: "shop".into(),
        })
        .await
        .expect("Get")
        .into_inner()
        .environments
        .first()
        .map(|e| e.release)
        .unwrap_or_default()
}

/// Waits for the stack event `key` on `pipeline_id` and returns its payload.
async fn stack_event(stack: &Stack, pipeline_id: &str, key: &str) -> Payload {
    stack
        .wait_event(pipeline_id, key, TIMEOUT)
        .await
        .event
        .payload
        .expect("payload")
}

async fn runs(stack: &Stack) -> Vec<StackRunInfo> {
    StacksClient::new(stack.grpc("deployer").await)
        .list_runs(ListStackRunsRequest {
            stack: "shop".into(),
            limit: 50,
        })
        .await
        .expect("ListRuns")
        .into_inner()
        .runs
}

/// The deployer's record of a run once it has recorded the run's end.
async fn ended(stack: &Stack, run_id: &str) -> StackRunInfo {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        if let Some(r) = runs(stack)
            .await
            .into_iter()
            .find(|r| r.run_id == run_id && (r.state == "passed" || r.state == "failed"))
        {
            return r;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "run {run_id} never ended"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Nothing of the run remains in the engine: containers, network, volumes.
fn assert_torn_down(run_id: &str) {
    let label = format!("io.gantry.stack-run={run_id}");
    assert_eq!(
        docker::labelled(&label),
        Vec::<String>::new(),
        "containers of run {run_id}"
    );
    assert_eq!(
        docker::networks_labelled(&label),
        Vec::<String>::new(),
        "networks of run {run_id}"
    );
    assert_eq!(
        docker::volumes_labelled(&label),
        Vec::<String>::new(),
        "volumes of run {run_id}"
    );
}

#[tokio::test]
async fn a_stack_is_tested_released_and_never_left_behind() {
    let Shop {
        tests_image,
        api,
        web,
        shop,
        api_spec,
        web_spec,
        shop_spec,
    } = Shop::new("gantry-e2e");
    let recorder = Recorder::start().await;
    let mut env = EnvSpec::new("shop");
    env.service = Some("web".into());
    env.health_http = Some("/cgi-bin/v".into());
    // Only in the environment: a `web` that reads it refuses to start.
    env.vars = vec![("DEPLOYED".into(), "1".into())];
    let stack = Stack::start(StackOptions {
        projects: vec![api_spec.clone(), web_spec.clone(), shop_spec.clone()],
        environments: vec![env.clone()],
        forge: Some(recorder.url.clone()),
        chat: vec![(
            "team".into(),
            "slack".into(),
            format!("{}/chat/slack", recorder.url),
        )],
        lease_secs: 10,
        // A run that waits must not keep the members' builds waiting.
        env: vec![("GANTRY_BUILDER_CONCURRENCY".into(), "3".into())],
        ..Default::default()
    })
    .await;

    // Both members publish; the stack follows nobody yet.
    let (_, api_v1) = release(&stack, &api_spec, &api, "api v1\n").await;
    let (_, web_v1) = release(&stack, &web_spec, &web, "web v1\n").await;

    // A push to the stack repository runs it with the members' releases.
    let pushed = stack
        .push(&shop_spec, "refs/heads/main", &shop.head())
        .await;
    let Payload::StackRunPassed(passed) = stack_event(&stack, &pushed, "stack.run_passed").await
    else {
        unreachable!()
    };
    let Payload::StackReleased(r1) = stack_event(&stack, &pushed, "stack.released").await else {
        unreachable!()
    };
    assert_eq!(r1.release, 1);
    assert_eq!(passed.stack_commit, shop.head());
    let image_of = |services: &[gantry_proto::v1::StackService], name: &str| {
        services
            .iter()
            .find(|s| s.service == name)
            .map(|s| s.image.clone())
            .unwrap_or_default()
    };
    assert_eq!(
        image_of(&r1.services, "api"),
        format!("{}@{api_v1}", api_spec.image())
    );
    assert_eq!(
        image_of(&r1.services, "web"),
        format!("{}@{web_v1}", web_spec.image())
    );
    assert_eq!(image_of(&r1.services, "tests"), tests_image);
    let run1 = passed.run.clone().expect("run");
    assert_torn_down(&run1.run_id);
    // Release 1 is deployed: web answers through the endpoint with api v1.
    let Payload::StackDeploySucceeded(d1) =
        stack_event(&stack, &pushed, "stack.deploy_succeeded").await
    else {
        unreachable!()
    };
    assert_eq!(d1.deployment.as_ref().map(|d| d.release), Some(1));
    assert_eq!(answer(&env).await, "web sees: api v1");
    // The run's log has every service's output, the test's included.
    let log: Vec<u8> = {
        let mut db = stack.db().await;
        sqlx::query_scalar::<_, Vec<u8>>(
            "SELECT data FROM builder.build_logs WHERE build_id = $1::uuid ORDER BY seq",
        )
        .bind(&passed.build_id)
        .fetch_all(&mut db)
        .await
        .expect("log")
        .concat()
    };
    let log = String::from_utf8_lossy(&log);
    assert!(log.contains("web sees: api v1"), "{log}");
    assert!(log.contains("`ports` is ignored"), "{log}");

    // api v2 is released: the stack runs with it and makes release 2.
    let (p2, api_v2) = release(&stack, &api_spec, &api, "api v2\n").await;
    let Payload::StackReleased(r2) = stack_event(&stack, &p2, "stack.released").await else {
        unreachable!()
    };
    assert_eq!(r2.release, 2);
    let Payload::StackDeploySucceeded(d2) =
        stack_event(&stack, &p2, "stack.deploy_succeeded").await
    else {
        unreachable!()
    };
    assert_eq!(d2.changed, ["api"], "only what changed is replaced");
    assert_eq!(answer(&env).await, "web sees: api v2");
    assert_eq!(
        image_of(&r2.services, "api"),
        format!("{}@{api_v2}", api_spec.image())
    );
    assert_eq!(
        image_of(&r2.services, "web"),
        format!("{}@{web_v1}", web_spec.image())
    );

    // api v3 breaks the contract: the run fails at the tests, no release.
    let (p3, _) = release(&stack, &api_spec, &api, "API-3\n").await;
    let Payload::StackRunFailed(failed) = stack_event(&stack, &p3, "stack.run_failed").await else {
        unreachable!()
    };
    assert_eq!(
        (failed.step.as_str(), failed.exit_code),
        ("tests", 1),
        "{failed:?}"
    );
    let last = &ended(&stack, &failed.run.clone().expect("run").run_id).await;
    assert_eq!(runs(&stack).await[0].run_id, last.run_id, "the newest run");
    assert_eq!(
        environment_release(&stack).await,
        2,
        "the environment stays on release 2"
    );
    assert_eq!(
        (last.state.as_str(), last.release),
        ("failed", 0),
        "{last:?}"
    );
    assert!(
        last.triggers
            .iter()
            .any(|t| t.project == "api" && t.pipeline_id == p3),
        "{last:?}"
    );
    assert_torn_down(&last.run_id);

    // The forge hears of it on api's commit, and chat once, naming it.
    let api_v3_commit = api.head();
    let statuses = format!("/api/v4/projects/team%2Fapi/statuses/{api_v3_commit}");
    let calls = recorder
        .wait_for(&statuses, TIMEOUT, |c| {
            stack_states(c).contains(&"failed".to_owned())
        })
        .await;
    assert_eq!(stack_states(&calls), ["running", "failed"]);
    let chat = recorder
        .wait_for("/chat/slack", TIMEOUT, |c| {
            c.iter().any(|c| text(c).contains("broke"))
        })
        .await;
    let broke: Vec<String> = chat
        .iter()
        .map(text)
        .filter(|t| t.contains("broke"))
        .collect();
    assert_eq!(broke.len(), 1, "{broke:?}");
    assert!(
        broke[0].contains(&format!("api {}", &api_v3_commit[..12])) && broke[0].contains("tests"),
        "{broke:?}"
    );

    // The fix makes release 3, and chat says the stack recovered.
    let (p4, _) = release(&stack, &api_spec, &api, "api v4\n").await;
    let Payload::StackReleased(r3) = stack_event(&stack, &p4, "stack.released").await else {
        unreachable!()
    };
    assert_eq!(r3.release, 3);
    stack_event(&stack, &p4, "stack.deploy_succeeded").await;
    assert_eq!(answer(&env).await, "web sees: api v4");
    let chat = recorder
        .wait_for("/chat/slack", TIMEOUT, |c| {
            c.iter().any(|c| text(c).contains("green again"))
        })
        .await;
    let colours: Vec<String> = chat
        .iter()
        .map(text)
        .filter(|t| t.contains("broke") || t.contains("green again"))
        .collect();
    assert_eq!(colours.len(), 2, "one failure, one recovery: {colours:?}");
    let releases = StacksClient::new(stack.grpc("deployer").await)
        .list_releases(ListStackReleasesRequest {
            stack: "shop".into(),
            limit: 0,
        })
        .await
        .expect("ListReleases")
        .into_inner()
        .releases;
    assert_eq!(
        releases.iter().map(|r| r.number).collect::<Vec<_>>(),
        [3, 2, 1]
    );
    let info = StacksClient::new(stack.grpc("deployer").await)
        .get(GetStackRequest {
            stack: "shop".into(),
        })
        .await
        .expect("Get")
        .into_inner();
    assert_eq!(info.members, ["api=api", "web=web"]);
    assert_eq!(info.latest_release.map(|r| r.number), Some(3));

    two_releases_during_a_run_make_one_run(
        &stack,
        &shop,
        &shop_spec,
        (&api, &api_spec),
        (&web, &web_spec),
    )
    .await;
    a_killed_runner_leaves_nothing(&stack, &shop, &shop_spec).await;
    a_release_that_fails_in_the_environment_is_rolled_back(
        &stack,
        &env,
        &recorder,
        (&shop, &shop_spec),
        (&api, &api_spec),
        (&web, &web_spec),
    )
    .await;
    a_deployer_killed_mid_deployment_is_taken_over(
        &stack,
        &env,
        (&shop, &shop_spec),
        (&web, &web_spec),
    )
    .await;
    docker::remove_image(&tests_image);
}

/// Commits `content` to `file` on the stack's `gate` branch, pushes it and
/// waits until its run started; the push's pipeline, the run's id and its
/// build id.
async fn gated_run(
    stack: &Stack,
    shop: &SampleRepo,
    shop_spec: &ProjectSpec,
    (file, content, message): (&str, &str, &str),
) -> (String, String, String) {
    shop.switch("gate");
    let sha = shop.commit_file(file, content, message);
    shop.switch("main");
    let pushed = stack.push(shop_spec, "refs/heads/gate", &sha).await;
    let Payload::StackRunStarted(started) = stack_event(stack, &pushed, "stack.run_started").await
    else {
        unreachable!()
    };
    (pushed, started.run.expect("run").run_id, started.build_id)
}

/// The runs once two member releases joined one waiting run.
async fn joined_run(stack: &Stack) -> Vec<StackRunInfo> {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let now = runs(stack).await;
        if now
            .iter()
            .any(|r| r.state == "waiting" && r.triggers.len() == 2)
        {
            return now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no waiting run with both releases: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The gated tests container of `run_id` at `attempt`, once it runs.
async fn gated_tests(run_id: &str, attempt: u32) -> String {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let found = docker::labelled(&format!("io.gantry.stack-run={run_id}"))
            .into_iter()
            .find(|c| {
                docker::label(c, "com.docker.compose.service") == "tests"
                    && docker::label(c, "io.gantry.attempt") == attempt.to_string()
                    && docker::running(c)
            });
        if let Some(c) = found {
            return c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gated tests of attempt {attempt} never started"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The builder is killed while a run's services are up: the run is taken
/// over (attempt 2) once the lease runs out, attempt 1's containers are
/// removed first, and nothing of either attempt remains at the end.
async fn a_killed_runner_leaves_nothing(stack: &Stack, shop: &SampleRepo, shop_spec: &ProjectSpec) {
    let (pushed, run_id, build_id) = gated_run(
        stack,
        shop,
        shop_spec,
        ("notes.txt", "killed mid-run\n", "another gated run"),
    )
    .await;
    let first = gated_tests(&run_id, 1).await;
    let up = docker::labelled(&format!("io.gantry.stack-run={run_id}"));
    assert!(up.len() >= 3, "api, web and tests are up: {up:?}");
    stack.kill("builder");
    stack.start_service("builder");
    let second = gated_tests(&run_id, 2).await;
    assert_ne!(first, second);
    for c in &up {
        assert!(
            !docker::labelled(&format!("io.gantry.stack-run={run_id}")).contains(c),
            "attempt 1's container {c} was removed before attempt 2 started"
        );
    }
    assert!(docker::exec(&second, &["touch", "/go"]));
    let Payload::StackRunPassed(passed) = stack_event(stack, &pushed, "stack.run_passed").await
    else {
        unreachable!()
    };
    assert_eq!(passed.build_id, build_id, "the same run, taken over");
    assert_torn_down(&run_id);
}

/// A run that waits (a push to a branch whose tests wait for a signal),
/// two member releases meanwhile, then exactly one more run with both.
async fn two_releases_during_a_run_make_one_run(
    stack: &Stack,
    shop: &SampleRepo,
    shop_spec: &ProjectSpec,
    (api, api_spec): (&SampleRepo, &ProjectSpec),
    (web, web_spec): (&SampleRepo, &ProjectSpec),
) {
    shop.branch("gate");
    shop.switch("main");
    let compose = std::fs::read_to_string(shop.path().join("docker-compose.yml")).expect("compose");
    let gated = compose.replace(
        "command: [sh, -c, \"",
        "command: [sh, -c, \"until [ -f /go ]; do sleep 0.2; done; ",
    );
    assert_ne!(gated, compose);
    let (pushed, gate_run, _) = gated_run(
        stack,
        shop,
        shop_spec,
        ("docker-compose.yml", &gated, "wait for a signal"),
    )
    .await;
    let before = runs(stack).await.len();

    let (pa, api_v5) = release(stack, api_spec, api, "api v5\n").await;
    let (pw, web_v2) = release(stack, web_spec, web, "web v2\n").await;
    // Both releases joined one waiting run; the gated run still runs.
    let now = joined_run(stack).await;
    let gate = now.iter().find(|r| r.run_id == gate_run).expect("gate run");
    assert_eq!(gate.state, "running", "{gate:?}");
    assert_eq!(now.len(), before + 1, "one waiting run: {now:?}");

    // Let the gated run finish.
    let tests = gated_tests(&gate_run, 1).await;
    assert!(docker::exec(&tests, &["touch", "/go"]));
    let Payload::StackRunPassed(_) = stack_event(stack, &pushed, "stack.run_passed").await else {
        unreachable!()
    };

    // The one more run has both releases and the default branch.
    let Payload::StackRunPassed(both) = stack_event(stack, &pw, "stack.run_passed").await else {
        unreachable!()
    };
    let Payload::StackReleased(_) = stack_event(stack, &pw, "stack.released").await else {
        unreachable!()
    };
    let run = both.run.expect("run");
    let kinds: Vec<(&str, &str)> = run
        .triggers
        .iter()
        .map(|t| (t.project.as_str(), t.pipeline_id.as_str()))
        .collect();
    assert_eq!(kinds, [("api", pa.as_str()), ("web", pw.as_str())]);
    let pinned = |name: &str| {
        both.services
            .iter()
            .find(|s| s.service == name)
            .map(|s| s.digest.clone())
            .unwrap_or_default()
    };
    assert_eq!((pinned("api"), pinned("web")), (api_v5, web_v2));
    assert_eq!(
        both.stack_commit,
        shop.head(),
        "member releases run the default branch"
    );
    let all = runs(stack).await;
    assert_eq!(all.len(), before + 1, "exactly one more run: {all:?}");
    assert!(
        all.iter()
            .all(|r| r.state == "passed" || r.state == "failed"),
        "{all:?}"
    );
    let gate = all.iter().find(|r| r.run_id == gate_run).expect("gate run");
    assert_eq!(
        gate.release, 0,
        "a branch other than the default makes no release"
    );
    for r in &all {
        assert_torn_down(&r.run_id);
    }
}

/// A release whose `api` is fine but whose `web` refuses to start in the
/// environment: `api` is replaced first, `web` fails its health check, and
/// the whole environment goes back to the previous release (`api`'s old
/// container runs again); the release is blocked there. A manual rollback
/// then goes back one more release.
async fn a_release_that_fails_in_the_environment_is_rolled_back(
    stack: &Stack,
    env: &EnvSpec,
    recorder: &Recorder,
    (shop, shop_spec): (&SampleRepo, &ProjectSpec),
    (api, api_spec): (&SampleRepo, &ProjectSpec),
    (web, web_spec): (&SampleRepo, &ProjectSpec),
) {
    let before = environment_release(stack).await;
    let answered = answer(env).await;
    // Both changes come in while a gated run holds the stack, so one run
    // (and one release) has them both.
    let (_, run_id, _) = gated_run(
        stack,
        shop,
        shop_spec,
        ("notes.txt", "one more gated run\n", "gated"),
    )
    .await;
    let gated = gated_tests(&run_id, 1).await;
    release(stack, api_spec, api, "api v6\n").await;
    web.write(
        "Dockerfile",
        &member_dockerfile(
            "COPY v /www/cgi-bin/v\nRUN [\"/bin/chmod\", \"755\", \"/www/cgi-bin/v\"]\nCMD [\"sh\", \"-c\", \"if [ -n \\\"$DEPLOYED\\\" ]; then echo broken here; exit 1; fi; exec httpd -f -p 8080 -h /www\"]\n",
        )
        .replace("CMD [\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]\n", ""),
    );
    let (pw, _) = release(stack, web_spec, web, "web v3\n").await;
    joined_run(stack).await;
    assert!(docker::exec(&gated, &["touch", "/go"]));

    let Payload::StackReleased(bad) = stack_event(stack, &pw, "stack.released").await else {
        unreachable!()
    };
    let Payload::StackDeployRolledBack(back) =
        stack_event(stack, &pw, "stack.deploy_rolled_back").await
    else {
        unreachable!()
    };
    assert!(back.reason.contains("service web"), "{back:?}");
    assert_eq!(
        back.deployment
            .as_ref()
            .map(|d| (d.release, d.previous_release)),
        Some((bad.release, before))
    );
    assert_eq!(answer(env).await, answered, "the previous release answers");
    assert_eq!(environment_release(stack).await, before);
    let label = format!("io.gantry.environment={}", env.name);
    let releases: Vec<String> = docker::labelled(&label)
        .iter()
        .map(|c| docker::label(c, "io.gantry.stack-release"))
        .collect();
    assert_eq!(
        releases,
        vec![before.to_string(); 2],
        "api and web of release {before}, nothing of release {}",
        bad.release
    );
    recorder
        .wait_for("/chat/slack", TIMEOUT, |c| {
            c.iter().any(|c| text(c).contains("was rolled back"))
        })
        .await;

    // By hand: back one more release.
    let queued = StacksClient::new(stack.grpc("deployer").await)
        .rollback(RollbackStackRequest {
            environment: env.name.clone(),
        })
        .await
        .expect("Rollback")
        .into_inner();
    assert_eq!(
        (queued.trigger.as_str(), queued.release),
        ("rollback", before - 1)
    );
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    while environment_release(stack).await != before - 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the manual rollback never ran"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(answer(env).await, "web sees: api v4");
}

/// The deployer is killed while a release's new `api` waits for its health
/// check (gated: healthy only once the test says so, and only in the
/// environment): the deployment is taken over, the first attempt's container
/// is removed, and the release ends up running with one container per
/// service.
async fn a_deployer_killed_mid_deployment_is_taken_over(
    stack: &Stack,
    env: &EnvSpec,
    (shop, shop_spec): (&SampleRepo, &ProjectSpec),
    (web, web_spec): (&SampleRepo, &ProjectSpec),
) {
    // A good web again (the last one refused to start in the environment).
    web.write(
        "Dockerfile",
        &member_dockerfile(
            "COPY v /www/cgi-bin/v\nRUN [\"/bin/chmod\", \"755\", \"/www/cgi-bin/v\"]\n",
        ),
    );
    let (pw, _) = release(stack, web_spec, web, "web v4\n").await;
    stack_event(stack, &pw, "stack.deploy_succeeded").await;

    let compose = std::fs::read_to_string(shop.path().join("docker-compose.yml")).expect("compose");
    let gated = compose.replacen(
        "test: [CMD, wget, -q, -O, /dev/null, 'http://localhost:8080/']",
        "test: [CMD-SHELL, 'test -z \"$$DEPLOYED\" || test -f /www/go']",
        1,
    );
    assert_ne!(gated, compose);
    let sha = shop.commit_file(
        "docker-compose.yml",
        &gated,
        "api: healthy in the environment on a signal",
    );
    let pushed = stack.push(shop_spec, "refs/heads/main", &sha).await;
    let Payload::StackDeployStarted(started) =
        stack_event(stack, &pushed, "stack.deploy_started").await
    else {
        unreachable!()
    };
    let deployment = started.deployment.expect("deployment");
    let of_attempt = |attempt: u32| {
        docker::labelled(&format!(
            "io.gantry.deployment={}",
            deployment.deployment_id
        ))
        .into_iter()
        .find(|c| docker::name(c).ends_with(&format!("-{attempt}")))
    };
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let first = loop {
        if let Some(c) = of_attempt(1) {
            break c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "attempt 1 never started api"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stack.kill("deployer");
    stack.start_service("deployer");
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let second = loop {
        if let Some(c) = of_attempt(2) {
            break c;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the deployment was never taken over"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        !docker::labelled(&format!("io.gantry.environment={}", env.name)).contains(&first),
        "attempt 1's container is gone"
    );
    assert!(docker::exec(&second, &["touch", "/www/go"]));
    let Payload::StackDeploySucceeded(done) =
        stack_event(stack, &pushed, "stack.deploy_succeeded").await
    else {
        unreachable!()
    };
    assert_eq!(done.changed, ["api"]);
    let left = docker::labelled(&format!("io.gantry.environment={}", env.name));
    assert_eq!(left.len(), 2, "one container per service: {left:?}");
    assert!(left.contains(&second));
    assert_eq!(answer(env).await, "web sees: api v6");
}
