//! Service containers beside the test steps (`services:` of `.gantry.yml`):
//! a step reaches its service by alias on the build's own network, which
//! has no way out; the service is waited for until ready; an image from an
//! unconfigured registry or of a repository pipelines push to, and a
//! service that never gets ready, fail the build at step `services`, saying
//! why; nothing of them stays in the engine.

use std::time::Duration;

use gantry_proto::v1::event::Payload;
use gantry_tests::infra::registry;
use gantry_tests::stack::ProjectSpec;
use gantry_tests::{SampleRepo, Stack, StackOptions, docker};

const TIMEOUT: Duration = Duration::from_secs(180);

/// A step's script that fails if the host answers on RabbitMQ's port (it
/// listens on all the host's addresses) at the network's gateway or
/// Docker's default bridge.
const NO_WAY_OUT: &str = "      for host in $(ip route | awk '/default/ {print $3}') 172.17.0.1; do\n        if nc -w 1 $host 5672 </dev/null; then echo \"reached $host\"; exit 3; fi\n      done\n";

/// The sample's pipeline file with `services` and test steps of its own.
fn pipeline(services: &str, steps: &str) -> String {
    format!("image:\n  dockerfile: Dockerfile\nservices:\n{services}test:\n{steps}")
}

/// The failure of a pipeline that failed: (step, reason).
async fn failure(stack: &Stack, pipeline: &str) -> (String, String) {
    let end = stack.wait_outcome(pipeline, TIMEOUT).await;
    match end.event.payload {
        Some(Payload::BuildFailed(f)) => (f.step, f.reason),
        other => panic!("not build.failed: {other:?}"),
    }
}

/// Waits until nothing labelled with the pipeline is left in the engine.
async fn nothing_left(pipeline: &str) {
    docker::wait_none_labelled(&format!("io.gantry.pipeline={pipeline}")).await;
}

#[tokio::test]
async fn test_steps_talk_to_service_containers_by_alias_and_nothing_stays() {
    let image = format!(
        "{}/e2e/http-service-{}:1",
        registry(),
        &uuid::Uuid::new_v4().simple().to_string()[..8]
    );
    docker::push_http_service_image(&image, "service ready\n");
    let repo = SampleRepo::new();
    let project = ProjectSpec::new("web", &repo.url());
    let stack = Stack::start(StackOptions {
        projects: vec![project.clone()],
        lease_secs: 60,
        ..Default::default()
    })
    .await;
    let main = "refs/heads/main";

    // A step talks to the service by its alias; the network has no way out,
    // not even to the host.
    let good = pipeline(
        &format!(
            "  - image: {image}\n    alias: db\n    env: {{GREETING: hello}}\n    health: wget -q -O- http://127.0.0.1:8080/ | grep -q ready\n"
        ),
        &format!(
            "  - name: talks-to-db\n    run: wget -q -O- http://db:8080/ | grep -q 'service ready'\n  - name: no-way-out\n    run: |\n{NO_WAY_OUT}"
        ),
    );
    let c1 = repo.commit_file(".gantry.yml", &good, "with a service");
    let p1 = stack.push(&project, main, &c1).await;
    let end = stack.wait_outcome(&p1, TIMEOUT).await;
    let logs = stack.cli(&["logs", &p1]);
    let log = String::from_utf8_lossy(&logs.stdout);
    assert_eq!(end.routing_key, "image.published", "{end:?}\n{log}");
    assert!(log.contains("db is healthy"), "{log}");
    nothing_left(&p1).await;
    let build_id = match stack
        .wait_event(&p1, "build.started", TIMEOUT)
        .await
        .event
        .payload
    {
        Some(Payload::BuildStarted(b)) => b.build_id,
        other => panic!("{other:?}"),
    };
    assert!(
        docker::networks_labelled(&format!("io.gantry.build={build_id}")).is_empty(),
        "the build's network is left"
    );

    // An image of a registry the configuration does not name.
    let foreign = pipeline(
        "  - image: docker.io/library/postgres:15\n",
        "  - name: t\n    run: 'true'\n",
    );
    let c2 = repo.commit_file(".gantry.yml", &foreign, "foreign image");
    let p2 = stack.push(&project, main, &c2).await;
    let (step, reason) = failure(&stack, &p2).await;
    assert_eq!(step, "services");
    assert!(
        reason.contains("is not in a registry of the Gantry configuration"),
        "{reason}"
    );

    // The project's own image: any branch's pipeline pushes there.
    let own = pipeline(
        &format!("  - image: {}:latest\n", project.image()),
        "  - name: t\n    run: 'true'\n",
    );
    let c4 = repo.commit_file(".gantry.yml", &own, "own image as a service");
    let p4 = stack.push(&project, main, &c4).await;
    let (step, reason) = failure(&stack, &p4).await;
    assert_eq!(step, "services");
    assert!(reason.contains("is this project's own"), "{reason}");

    // A service that never gets ready: the build fails within its wait,
    // with the service's own log.
    let never = pipeline(
        &format!("  - image: {image}\n    alias: slow\n    health: 'false'\n    wait: 3\n"),
        "  - name: t\n    run: 'true'\n",
    );
    let c3 = repo.commit_file(".gantry.yml", &never, "never ready");
    let p3 = stack.push(&project, main, &c3).await;
    let (step, reason) = failure(&stack, &p3).await;
    assert_eq!(step, "services");
    assert_eq!(reason, "service slow was not ready within 3s");
    let logs = stack.cli(&["logs", &p3]);
    let log = String::from_utf8_lossy(&logs.stdout);
    assert!(log.contains("last lines of slow's log"), "{log}");
    nothing_left(&p3).await;
}
