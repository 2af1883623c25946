//! Gantry as users run it: `docker-compose up` of docker-compose.yml with the
//! images scripts/images.sh makes here (no pulls) and its demo configuration,
//! then the demo pushes of the README: a new version answering on staging, a
//! broken one rolled back.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use gantry_tests::docker;
use gantry_tests::stack::free_port;

const SERVICES: [&str; 5] = [
    "webhook-ingest",
    "builder",
    "registry-publisher",
    "deployer",
    "notifier",
];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_owned()
}

/// One docker-compose project, taken down (with its volumes) when dropped.
struct Compose {
    project: String,
    env: Vec<(String, String)>,
    files: Vec<PathBuf>,
    environment: String,
}

impl Compose {
    fn command(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = Command::new("docker-compose");
        cmd.current_dir(root()).arg("-p").arg(&self.project);
        for f in &self.files {
            cmd.arg("-f").arg(f);
        }
        cmd.args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("docker-compose runs")
    }

    fn container(&self, service: &str) -> String {
        let out = self.command(&["ps", "-q", service]);
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn health(&self, service: &str) -> String {
        let id = self.container(service);
        let out = Command::new("docker")
            .args([
                "inspect",
                "-f",
                "{{if .State.Health}}{{.State.Health.Status}}{{else}}{{.State.Status}}{{end}}",
                &id,
            ])
            .output()
            .expect("docker inspect");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn logs(&self) -> String {
        let out = self.command(&["logs", "--no-color", "--tail", "30"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Compose {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- docker-compose logs ---\n{}", self.logs());
        }
        // Deployed containers sit on the project's network: remove them first.
        docker::remove_labelled(&format!("io.gantry.environment={}", self.environment));
        let _ = self.command(&["down", "-v", "--remove-orphans"]);
    }
}

fn image_exists(name: &str) -> bool {
    Command::new("docker")
        .args(["image", "inspect", name])
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test]
async fn docker_compose_up_runs_the_demo_from_push_to_rollback() {
    for image in [
        "gantry-local/postgres:15",
        "gantry-local/rabbitmq:3",
        "gantry-local/registry:2",
        "gantry/webhook-ingest:dev",
        "gantry/builder:dev",
        "gantry/registry-publisher:dev",
        "gantry/deployer:dev",
        "gantry/notifier:dev",
    ] {
        assert!(
            image_exists(image),
            "{image} is missing: run scripts/images.sh (scripts/test.sh does)"
        );
    }
    let id = &uuid::Uuid::new_v4().simple().to_string()[..8];
    // The demo's home (its repository), instead of the checkout's .gantry.
    let home = tempfile::tempdir().expect("tempdir");
    // The registry keeps its documented port: the demo configuration names it.
    assert!(
        std::net::TcpListener::bind("127.0.0.1:5001").is_ok(),
        "127.0.0.1:5001 is taken"
    );
    let ports: Vec<(&str, u16)> = [
        "GANTRY_WEBHOOK_PORT",
        "GANTRY_INGEST_GRPC_PORT",
        "GANTRY_BUILDER_GRPC_PORT",
        "GANTRY_PUBLISHER_GRPC_PORT",
        "GANTRY_DEPLOYER_GRPC_PORT",
        "GANTRY_STAGING_PORT",
        "GANTRY_NOTIFIER_PORT",
        "GANTRY_NOTIFIER_GRPC_PORT",
    ]
    .into_iter()
    .map(|k| (k, free_port()))
    .collect();
    let port = |k: &str| {
        ports
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, p)| *p)
            .expect("port")
    };
    let network = "gantry".to_owned();
    let environment = "staging".to_owned();
    let mut env: Vec<(String, String)> = ports
        .iter()
        .map(|(k, p)| (k.to_string(), p.to_string()))
        .collect();
    env.extend([
        (
            "GANTRY_POSTGRES_IMAGE".into(),
            "gantry-local/postgres:15".into(),
        ),
        (
            "GANTRY_RABBITMQ_IMAGE".into(),
            "gantry-local/rabbitmq:3".into(),
        ),
        (
            "GANTRY_REGISTRY_IMAGE".into(),
            "gantry-local/registry:2".into(),
        ),
        ("GANTRY_HOME".into(), home.path().display().to_string()),
        ("GANTRY_WEBHOOK_SECRET".into(), "compose-secret".into()),
    ]);
    let compose = Compose {
        project: format!("gantrye2e{id}"),
        env,
        files: vec![root().join("docker-compose.yml")],
        environment: environment.clone(),
    };

    let up = compose.command(&["up", "-d", "--no-build"]);
    assert!(
        up.status.success(),
        "docker-compose up failed: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    loop {
        let states: Vec<String> = SERVICES.iter().map(|s| compose.health(s)).collect();
        if states.iter().all(|s| s == "healthy") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "services never became healthy: {states:?}"
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // The one-shot demo service made the demo repository.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !home.path().join("demo/repo/.git").exists() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the demo repository was not made: {}",
            compose.logs()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    // Only the builder and the deployer hold the Docker socket.
    for service in SERVICES {
        let out = Command::new("docker")
            .args([
                "inspect",
                "-f",
                "{{range .Mounts}}{{.Source}} {{end}}",
                &compose.container(service),
            ])
            .output()
            .expect("docker inspect");
        let mounts = String::from_utf8_lossy(&out.stdout).into_owned();
        assert_eq!(
            mounts.contains("/var/run/docker.sock"),
            service == "builder" || service == "deployer",
            "{service} mounts: {mounts}"
        );
    }

    // The demo push, as the README says: version 2 answers on staging.
    let push = compose.command(&["run", "-T", "--rm", "demo", "push"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&push.stdout),
        String::from_utf8_lossy(&push.stderr)
    );
    assert!(push.status.success(), "demo push: {said}");
    assert!(said.contains("version 2 runs in staging"), "{said}");
    let endpoint = format!("http://127.0.0.1:{}/", port("GANTRY_STAGING_PORT"));
    let page = gantry_tests::http()
        .get(&endpoint)
        .send()
        .await
        .expect("staging answers")
        .text()
        .await
        .expect("page");
    assert!(page.contains("version 2<"), "{page}");
    let deployed = docker::labelled(&format!("io.gantry.environment={environment}"));
    assert_eq!(deployed.len(), 1, "{deployed:?}");
    assert_eq!(docker::label(&deployed[0], "io.gantry.project"), "demo");

    // A broken version is rolled back: version 2 keeps answering.
    let broken = compose.command(&["run", "-T", "--rm", "demo", "push", "--break"]);
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&broken.stdout),
        String::from_utf8_lossy(&broken.stderr)
    );
    assert!(!broken.status.success(), "{said}");
    assert!(said.contains("rolled_back"), "{said}");
    let page = gantry_tests::http()
        .get(&endpoint)
        .send()
        .await
        .expect("staging answers")
        .text()
        .await
        .expect("page");
    assert!(page.contains("version 2<"), "{page}");

    // The deployed app shares no network with Postgres or RabbitMQ, and
    // every published port is on loopback only.
    let networks = |id: &str| -> Vec<String> {
        let out = Command::new("docker")
            .args([
                "inspect",
                "-f",
                "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}",
                id,
            ])
            .output()
            .expect("docker inspect");
        String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    };
    let app_networks = networks(&deployed[0]);
    assert_eq!(app_networks, vec![network.clone()]);
    for data in ["postgres", "rabbitmq"] {
        let theirs = networks(&compose.container(data));
        assert!(
            !theirs.iter().any(|n| app_networks.contains(n)),
            "{data} on {theirs:?}, the app on {app_networks:?}"
        );
    }
    for service in SERVICES.iter().chain(&["registry"]) {
        let out = Command::new("docker")
            .args([
                "inspect",
                "-f",
                "{{range $p, $b := .NetworkSettings.Ports}}{{range $b}}{{.HostIp}} {{end}}{{end}}",
                &compose.container(service),
            ])
            .output()
            .expect("docker inspect");
        let ips = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            ips.split_whitespace().all(|ip| ip == "127.0.0.1"),
            "{service} publishes on {ips}"
        );
    }

    // The CLI reads both pipelines from the notifier, with the local token.
    let out = Command::new(gantry_tests::stack::bin_dir().join("gantry"))
        .args(["pipelines", "--json"])
        .env(
            "GANTRY_NOTIFIER_URL",
            format!("http://127.0.0.1:{}", port("GANTRY_NOTIFIER_GRPC_PORT")),
        )
        .env("GANTRY_TOKEN", "gantry-local-dev")
        .output()
        .expect("gantry runs");
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(list[0]["deployments"][0], "staging=rolled_back", "{list}");
    assert_eq!(list[1]["deployments"][0], "staging=succeeded", "{list}");
}
