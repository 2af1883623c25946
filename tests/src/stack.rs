//! One isolated Gantry: the five service processes with their own database,
//! virtual host, configuration and ports, and a recorder of every event.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use gantry_proto::v1::Event;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use prost::Message as _;
use sqlx::Connection as _;
use tokio_util::sync::CancellationToken;

/// The service binaries, in start order.
pub const SERVICES: [&str; 5] = [
    "notifier",
    "deployer",
    "registry-publisher",
    "builder",
    "webhook-ingest",
];

/// The webhook secret of every test project.
pub const SECRET: &str = "It's a Secret to Everybody";

/// The forge API tokens of stacks with a forge.
pub const GITLAB_TOKEN: &str = "glpat-e2e-4f0c9d2b7a61";
pub const GITHUB_TOKEN: &str = "ghp_e2e5b3a8c1d6f2e9";
pub const GITEA_TOKEN: &str = "gitea-e2e-8a2c4e6f1b3d";

/// API tokens every stack configures, one per scope.
pub mod tokens {
    pub const ADMIN: &str = "gty_e2e-admin-7c1f0a";
    pub const READ: &str = "gty_e2e-read-5b9e22";
    pub const TRIGGER: &str = "gty_e2e-trigger-0d4a61";
    pub const DEPLOY: &str = "gty_e2e-deploy-93c7f8";
    /// (name, token, scopes) as configured.
    pub const ALL: [(&str, &str, &str); 4] = [
        ("admin", ADMIN, "admin"),
        ("reader", READ, "read"),
        ("trigger", TRIGGER, "trigger"),
        ("deployer", DEPLOY, "deploy"),
    ];
}

/// One project of a stack's configuration.
#[derive(Clone, Debug)]
pub struct ProjectSpec {
    pub name: String,
    pub clone_url: String,
    pub gitlab: String,
    pub github: String,
    pub gitea: String,
    /// Repository path in the registry (without the host).
    pub image_path: String,
    /// Registry host (the loopback registry unless a test changes it).
    pub registry: String,
    /// A stack (meta-project) rather than a service.
    pub stack: bool,
    /// The projects a stack may follow.
    pub follows: Vec<String>,
}

impl ProjectSpec {
    /// A project named `name` cloned from `clone_url`, with a unique image path.
    pub fn new(name: &str, clone_url: &str) -> Self {
        let unique = &uuid::Uuid::new_v4().simple().to_string()[..10];
        Self {
            name: name.to_owned(),
            clone_url: clone_url.to_owned(),
            gitlab: format!("team/{name}"),
            github: format!("team/{name}"),
            gitea: format!("team/{name}"),
            image_path: format!("e2e/{unique}/{name}"),
            registry: crate::infra::registry(),
            stack: false,
            follows: Vec::new(),
        }
    }

    /// A stack (meta-project) named `name` cloned from `clone_url`, which
    /// may follow `follows`.
    pub fn stack(name: &str, clone_url: &str, follows: &[&str]) -> Self {
        Self {
            stack: true,
            follows: follows.iter().map(|f| f.to_string()).collect(),
            ..Self::new(name, clone_url)
        }
    }

    pub fn image(&self) -> String {
        format!("{}/{}", self.registry, self.image_path)
    }
}

/// An environment of a stack's configuration (Docker target).
#[derive(Clone, Debug)]
pub struct EnvSpec {
    pub name: String,
    pub project: String,
    /// YAML flow list of rules, e.g. `[{branch: main}]`.
    pub rules: String,
    /// Port of the service in its container.
    pub port: u16,
    /// Loopback port of the environment's endpoint.
    pub endpoint: u16,
    /// HTTP health check path, if any.
    pub health_http: Option<String>,
    pub timeout_secs: u64,
    /// Of a stack's environment: the service behind the endpoint.
    pub service: Option<String>,
    /// Environment variables of the environment's containers.
    pub vars: Vec<(String, String)>,
    /// More YAML of the environment (indented under it), e.g. `approval`.
    pub extra: String,
}

impl EnvSpec {
    /// A uniquely named environment of `project` that takes `main`.
    pub fn new(project: &str) -> Self {
        Self {
            name: format!(
                "staging-{}",
                &uuid::Uuid::new_v4().simple().to_string()[..8]
            ),
            project: project.to_owned(),
            rules: "[{branch: main}]".into(),
            port: 8080,
            endpoint: free_port(),
            health_http: Some("/".into()),
            timeout_secs: 20,
            service: None,
            vars: Vec::new(),
            extra: String::new(),
        }
    }

    pub fn endpoint_url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.endpoint)
    }
}

#[derive(Clone, Debug, Default)]
pub struct StackOptions {
    /// Deploy environments.
    pub environments: Vec<EnvSpec>,
    /// Base URL of a fake forge API (both GitLab and GitHub statuses go there).
    pub forge: Option<String>,
    /// Chat channels: (name, kind, url).
    pub chat: Vec<(String, String, String)>,
    pub projects: Vec<ProjectSpec>,
    /// Builder lease; short so that a killed builder's build is taken over soon.
    pub lease_secs: u64,
    /// More environment for every service.
    pub env: Vec<(String, String)>,
    /// Registries that need a login (host, username, password).
    pub logins: Vec<(String, String, String)>,
    /// Serve every listener over TLS with a certificate made for the stack.
    pub tls: bool,
    /// The notifier's pages answer without a token.
    pub public_pages: bool,
    /// More YAML of each project (indented under the project), e.g. `limits`.
    pub project_extra: String,
    /// More top-level YAML of the Gantry configuration (e.g. `secrets_key`).
    pub config_extra: String,
    /// Services expected not to become ready (a part they need is missing):
    /// the stack waits only for them to be live.
    pub expect_unready: Vec<&'static str>,
}

/// An event as it crossed the broker.
#[derive(Clone, Debug)]
pub struct Seen {
    pub routing_key: String,
    pub event: Event,
    pub message_id: Option<String>,
    pub correlation_id: Option<String>,
    pub traceparent: Option<String>,
}

impl Seen {
    /// The deployment a `deploy.*` event is about.
    pub fn deployment(&self) -> Option<gantry_proto::v1::Deployment> {
        use gantry_proto::v1::event::Payload;
        match &self.event.payload {
            Some(Payload::DeployStarted(e)) => e.deployment.clone(),
            Some(Payload::DeploySucceeded(e)) => e.deployment.clone(),
            Some(Payload::DeployFailed(e)) => e.deployment.clone(),
            Some(Payload::DeployRolledBack(e)) => e.deployment.clone(),
            Some(Payload::DeployAwaitingApproval(e)) => e.deployment.clone(),
            Some(Payload::DeployApproved(e)) => e.deployment.clone(),
            Some(Payload::DeployRejected(e)) => e.deployment.clone(),
            _ => None,
        }
    }

    /// The reason a `deploy.failed` or `deploy.rolled_back` gives.
    pub fn reason(&self) -> String {
        use gantry_proto::v1::event::Payload;
        match &self.event.payload {
            Some(Payload::DeployFailed(e)) => e.reason.clone(),
            Some(Payload::DeployRolledBack(e)) => e.reason.clone(),
            _ => String::new(),
        }
    }
}

pub struct Stack {
    dir: tempfile::TempDir,
    pub database_url: String,
    db_name: String,
    pub vhost: String,
    pub amqp_url: String,
    pub config_path: PathBuf,
    pub options: StackOptions,
    /// HTTP and gRPC ports of each instance (a service, or a named extra replica).
    ports: Mutex<HashMap<String, (u16, u16)>>,
    procs: Mutex<HashMap<String, Child>>,
    events: Arc<Mutex<Vec<Seen>>>,
    tap_stop: CancellationToken,
}

/// A loopback port reserved for this test process until it exits.
///
/// Test processes run side by side (nextest starts one per test), so "free
/// now" is not enough: two of them could pick the same port before either
/// service binds it. A port is therefore reserved with an exclusive lock on
/// `gantry-test-ports/<port>.lock` in the temporary directory, held by this
/// process until it exits (the kernel drops the lock then, even on a crash),
/// and every process skips ports whose lock another one holds. Ports are
/// taken below the kernel's ephemeral range (read from `ip_local_port_range`),
/// so no outgoing connection can take one between now and the moment a
/// service binds it, and one that something else listens on is skipped.
pub fn free_port() -> u16 {
    static HELD: Mutex<Vec<(u16, std::fs::File)>> = Mutex::new(Vec::new());
    let dir = std::env::temp_dir().join("gantry-test-ports");
    std::fs::create_dir_all(&dir).expect("make the port reservation directory");
    let ephemeral_start: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let (low, high) = (20000u16, ephemeral_start.clamp(20001, 32768));
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    loop {
        let port = low + (uuid::Uuid::new_v4().as_u128() % u128::from(high - low)) as u16;
        if held.iter().any(|(p, _)| *p == port) {
            continue;
        }
        let Ok(lock) = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(format!("{port}.lock")))
        else {
            continue;
        };
        if lock.try_lock().is_err() {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        held.push((port, lock));
        return port;
    }
}

/// A self-signed certificate for 127.0.0.1 and localhost: `tls.crt`, `tls.key` in `dir`.
fn make_certificate(dir: &Path) {
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=gantry-e2e",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            // A server certificate, not a CA (rustls refuses a CA as the peer).
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-addext",
            "extendedKeyUsage=serverAuth",
            "-keyout",
        ])
        .arg(dir.join("tls.key"))
        .arg("-out")
        .arg(dir.join("tls.crt"))
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Where cargo put the service binaries (next to this test's `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

fn rabbitmqctl(args: &[&str]) {
    let out = Command::new("rabbitmqctl")
        .arg("-q")
        .args(args)
        .output()
        .expect("rabbitmqctl runs");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Stack {
    /// The `expected` end event (`deploy.succeeded`, `.failed`,
    /// `.rolled_back`: a rollback also says `failed` first) of the `nth`
    /// deployment (from 0) to `environment`, in the order their ends were
    /// seen; waits up to 3 minutes for it.
    pub async fn deploy_end(&self, environment: &str, nth: usize, expected: &str) -> Seen {
        let ends = ["deploy.succeeded", "deploy.failed", "deploy.rolled_back"];
        let of = |s: &Seen| s.deployment().unwrap_or_default();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        loop {
            let seen: Vec<Seen> = self
                .events()
                .into_iter()
                .filter(|s| ends.contains(&s.routing_key.as_str()))
                .filter(|s| of(s).environment == environment)
                .collect();
            let mut ids: Vec<String> = Vec::new();
            for s in &seen {
                let id = of(s).deployment_id;
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            if let Some(id) = ids.get(nth)
                && let Some(s) = seen
                    .iter()
                    .find(|s| of(s).deployment_id == *id && s.routing_key == expected)
            {
                return s.clone();
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no {expected} for deployment #{nth} in {environment}: {seen:#?}\n{}",
                self.log_tail("deployer")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Creates the database, vhost and configuration and starts every service.
    pub async fn start(options: StackOptions) -> Self {
        let stack = Self::prepare(options).await;
        for name in SERVICES {
            stack.start_service(name);
        }
        for name in SERVICES {
            if stack.options.expect_unready.contains(&name) {
                stack.wait_path(name, "/live").await;
            } else {
                stack.wait_ready(name).await;
            }
        }
        stack
    }

    /// Everything but the service processes.
    pub async fn prepare(options: StackOptions) -> Self {
        crate::init();
        let id = uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        let dir = tempfile::Builder::new()
            .prefix("gantry-stack-")
            .tempdir()
            .expect("tempdir");

        let admin_url = crate::infra::database_url();
        let db_name = format!("e2e_{id}");
        let mut admin = sqlx::PgConnection::connect(&admin_url)
            .await
            .expect("postgres is up (scripts/infra.sh)");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db_name}")))
            .execute(&mut admin)
            .await
            .expect("create database");
        let database_url = match admin_url.rsplit_once('/') {
            Some((base, _)) => format!("{base}/{db_name}"),
            None => panic!("DATABASE_URL has no database name"),
        };

        let vhost = format!("e2e-{id}");
        rabbitmqctl(&["add_vhost", &vhost]);
        rabbitmqctl(&["set_permissions", "-p", &vhost, "guest", ".*", ".*", ".*"]);
        let amqp_url = format!("{}/{vhost}", crate::infra::amqp_base());

        let secret_path = dir.path().join("webhook-secret");
        std::fs::write(&secret_path, SECRET).expect("write secret");
        let mut config = String::from("projects:\n");
        for p in &options.projects {
            config.push_str(&format!(
                "  - name: {}\n    clone_url: {}\n    gitlab: {}\n    github: {}\n    gitea: {}\n    webhook_secret: {{file: {}}}\n",
                p.name,
                p.clone_url,
                p.gitlab,
                p.github,
                p.gitea,
                secret_path.display(),
            ));
            config.push_str(&if p.stack {
                format!("    kind: stack\n    follows: [{}]\n", p.follows.join(", "))
            } else {
                format!("    image: {}\n", p.image())
            });
            config.push_str(&options.project_extra);
        }
        config.push_str(&format!(
            "registries:\n  - host: {}\n",
            crate::infra::registry()
        ));
        for (i, (host, username, password)) in options.logins.iter().enumerate() {
            let file = dir.path().join(format!("registry-password-{i}"));
            std::fs::write(&file, password).expect("write registry password");
            config.push_str(&format!(
                "  - host: {host}\n    username: {username}\n    password: {{file: {}}}\n",
                file.display()
            ));
        }
        if !options.environments.is_empty() {
            config.push_str("environments:\n");
        }
        for e in &options.environments {
            config.push_str(&format!(
                "  - name: {}\n    project: {}\n    rules: {}\n    port: {}\n    endpoint: 127.0.0.1:{}\n    health: {{timeout_secs: {}{}}}\n",
                e.name,
                e.project,
                e.rules,
                e.port,
                e.endpoint,
                e.timeout_secs,
                e.health_http.as_ref().map(|h| format!(", http: {h}")).unwrap_or_default(),
            ));
            if let Some(service) = &e.service {
                config.push_str(&format!("    service: {service}\n"));
            }
            if !e.vars.is_empty() {
                let vars: Vec<String> = e.vars.iter().map(|(k, v)| format!("{k}: '{v}'")).collect();
                config.push_str(&format!("    env: {{{}}}\n", vars.join(", ")));
            }
            config.push_str(&e.extra);
        }
        if let Some(forge) = &options.forge {
            config.push_str(&format!(
                "forges:\n  gitlab: {{url: {forge}, token: {{value: {GITLAB_TOKEN}}}}}\n  github: {{url: {forge}, token: {{value: {GITHUB_TOKEN}}}}}\n  gitea: {{url: {forge}, token: {{value: {GITEA_TOKEN}}}}}\n"
            ));
        }
        if !options.chat.is_empty() {
            config.push_str("chat:\n");
        }
        for (name, kind, url) in &options.chat {
            config.push_str(&format!(
                "  - name: {name}\n    kind: {kind}\n    url: {{value: '{url}'}}\n"
            ));
        }
        let ports: HashMap<String, (u16, u16)> = SERVICES
            .iter()
            .map(|s| (s.to_string(), (free_port(), free_port())))
            .collect();
        let scheme = if options.tls { "https" } else { "http" };
        config.push_str(&format!(
            "public_url: {scheme}://127.0.0.1:{}\n",
            ports["notifier"].0
        ));
        config.push_str(&options.config_extra);
        config.push_str("tokens:\n");
        for (name, token, scope) in tokens::ALL {
            config.push_str(&format!(
                "  - {{name: {name}, sha256: {}, scopes: [{scope}]}}\n",
                gantry_config::token_hash(token)
            ));
        }
        if options.public_pages {
            config.push_str("pages: {public: true}\n");
        }
        if options.tls {
            make_certificate(dir.path());
        }
        let config_path = dir.path().join("gantry.yml");
        std::fs::write(&config_path, config).expect("write config");

        let stack = Self {
            dir,
            database_url,
            db_name,
            vhost,
            amqp_url,
            config_path,
            options,
            ports: Mutex::new(ports),
            procs: Mutex::new(HashMap::new()),
            events: Arc::new(Mutex::new(Vec::new())),
            tap_stop: CancellationToken::new(),
        };
        stack.start_tap().await;
        stack
    }

    /// Records every event of this vhost, reconnecting after broker restarts.
    async fn start_tap(&self) {
        let (url, events, stop) = (
            self.amqp_url.clone(),
            self.events.clone(),
            self.tap_stop.clone(),
        );
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let mut ready_tx = Some(ready_tx);
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                let run = async {
                    let conn =
                        lapin::Connection::connect(&url, lapin::ConnectionProperties::default())
                            .await?;
                    let ch = conn.create_channel().await?;
                    gantry_bus::declare(&ch).await?;
                    ch.queue_declare(
                        "e2e-tap".into(),
                        QueueDeclareOptions::durable(),
                        FieldTable::default(),
                    )
                    .await?;
                    ch.queue_bind(
                        "e2e-tap".into(),
                        gantry_bus::EXCHANGE.into(),
                        "#".into(),
                        QueueBindOptions::default(),
                        FieldTable::default(),
                    )
                    .await?;
                    let mut consumer = ch
                        .basic_consume(
                            "e2e-tap".into(),
                            "".into(),
                            BasicConsumeOptions::default(),
                            FieldTable::default(),
                        )
                        .await?;
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(());
                    }
                    loop {
                        let next = tokio::select! {
                            _ = stop.cancelled() => return Ok(()),
                            n = tokio::time::timeout(Duration::from_secs(1), consumer.next()) => n,
                        };
                        let delivery = match next {
                            Err(_) if conn.status().connected() => continue,
                            Err(_) => anyhow::bail!("tap connection lost"),
                            Ok(Some(d)) => d?,
                            Ok(None) => anyhow::bail!("tap consumer ended"),
                        };
                        let props = &delivery.properties;
                        let traceparent = props.headers().as_ref().and_then(|h| {
                            match h.inner().get("traceparent") {
                                Some(AMQPValue::LongString(s)) => {
                                    Some(String::from_utf8_lossy(s.as_bytes()).into_owned())
                                }
                                _ => None,
                            }
                        });
                        let Ok(event) = Event::decode(delivery.data.as_slice()) else {
                            // Not an event (a test may publish garbage on purpose).
                            delivery.ack(BasicAckOptions::default()).await?;
                            continue;
                        };
                        let seen = Seen {
                            routing_key: delivery.routing_key.as_str().to_owned(),
                            event,
                            message_id: props.message_id().as_ref().map(|s| s.as_str().to_owned()),
                            correlation_id: props
                                .correlation_id()
                                .as_ref()
                                .map(|s| s.as_str().to_owned()),
                            traceparent,
                        };
                        events.lock().expect("events lock").push(seen);
                        delivery.ack(BasicAckOptions::default()).await?;
                    }
                };
                let result: anyhow::Result<()> = run.await;
                if result.is_ok() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        });
        tokio::time::timeout(Duration::from_secs(30), ready_rx)
            .await
            .expect("event recorder connects to RabbitMQ")
            .expect("event recorder started");
    }

    fn ports_of(&self, instance: &str) -> (u16, u16) {
        *self
            .ports
            .lock()
            .expect("ports lock")
            .entry(instance.to_owned())
            .or_insert_with(|| (free_port(), free_port()))
    }

    pub fn http_port(&self, instance: &str) -> u16 {
        self.ports_of(instance).0
    }

    pub fn grpc_port(&self, instance: &str) -> u16 {
        self.ports_of(instance).1
    }

    pub fn log_path(&self, service: &str) -> PathBuf {
        self.dir.path().join(format!("{service}.log"))
    }

    /// Starts (or restarts) one service process.
    pub fn start_service(&self, name: &str) {
        self.start_instance(name, name);
    }

    /// Starts (or restarts) an instance of `service` named `instance` (an extra
    /// replica has its own name, ports and log).
    pub fn start_instance(&self, service: &str, instance: &str) {
        let name = instance;
        let bin = bin_dir().join(service);
        assert!(
            bin.exists(),
            "{} is missing: run `cargo build --workspace --bins` first",
            bin.display()
        );
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path(name))
            .expect("service log");
        let (http, grpc) = self.ports_of(name);
        let mut command = Command::new(bin);
        if service == "notifier" {
            // Reads build logs from the builder with a read-only token.
            command.env("GANTRY_BUILDER_TOKEN", tokens::READ);
        }
        if self.options.tls {
            command
                .env("GANTRY_TLS_CERT", self.dir.path().join("tls.crt"))
                .env("GANTRY_TLS_KEY", self.dir.path().join("tls.key"))
                .env("GANTRY_CA_CERT", self.dir.path().join("tls.crt"));
        }
        let child = command
            .env("DATABASE_URL", &self.database_url)
            .env("AMQP_URL", &self.amqp_url)
            .env("GANTRY_CONFIG", &self.config_path)
            .env("GANTRY_HTTP_ADDR", format!("127.0.0.1:{http}"))
            .env("GANTRY_GRPC_ADDR", format!("127.0.0.1:{grpc}"))
            .env(
                "GANTRY_BUILD_LEASE_SECS",
                self.options.lease_secs.to_string(),
            )
            .env(
                "GANTRY_DEPLOY_LEASE_SECS",
                self.options.lease_secs.to_string(),
            )
            .env(
                "GANTRY_WORKER_NAME",
                format!("{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]),
            )
            .env(
                "RUST_LOG",
                std::env::var("TEST_RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            // One build at a time per replica, so that replicas visibly share the work.
            .env("GANTRY_BUILDER_CONCURRENCY", "1")
            // Give up on an unreachable registry after two pushes.
            .env("GANTRY_PUBLISH_ATTEMPTS", "2")
            .env("GANTRY_PUSH_ATTEMPTS", "2")
            .envs(self.options.env.iter().map(|(k, v)| (k, v)))
            .env(
                "GANTRY_BUILDER_URL",
                format!(
                    "{}://127.0.0.1:{}",
                    self.scheme(),
                    self.grpc_port("builder")
                ),
            )
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("service starts");
        self.procs
            .lock()
            .expect("procs lock")
            .insert(name.to_owned(), child);
    }

    /// SIGKILLs a service, as a crash would.
    pub fn kill(&self, name: &str) {
        if let Some(mut child) = self.procs.lock().expect("procs lock").remove(name) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The process id of a running service.
    pub fn pid(&self, name: &str) -> Option<u32> {
        let mut procs = self.procs.lock().expect("procs lock");
        let child = procs.get_mut(name)?;
        match child.try_wait() {
            Ok(None) => Some(child.id()),
            _ => None,
        }
    }

    /// `https` when the stack serves TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.options.tls { "https" } else { "http" }
    }

    /// The stack's certificate (PEM), when it serves TLS.
    pub fn ca_pem(&self) -> Option<Vec<u8>> {
        self.options
            .tls
            .then(|| std::fs::read(self.dir.path().join("tls.crt")).expect("certificate"))
    }

    /// An HTTP client that trusts the stack's certificate.
    pub fn http_client(&self) -> reqwest::Client {
        crate::init();
        let mut builder = reqwest::Client::builder().timeout(Duration::from_secs(60));
        if let Some(pem) = self.ca_pem() {
            builder = builder
                .tls_certs_only([reqwest::Certificate::from_pem(&pem).expect("certificate")]);
        }
        builder.build().expect("http client")
    }

    /// URL of a path on a service's HTTP listener.
    pub fn http_url(&self, service: &str, path: &str) -> String {
        format!(
            "{}://127.0.0.1:{}{path}",
            self.scheme(),
            self.http_port(service)
        )
    }

    /// Waits until `/ready` answers 200.
    pub async fn wait_ready(&self, name: &str) {
        self.wait_path(name, "/ready").await;
    }

    /// Waits until `path` of a service answers 200.
    pub async fn wait_path(&self, name: &str, path: &str) {
        let url = self.http_url(name, path);
        let client = self.http_client();
        for _ in 0..600 {
            if let Ok(r) = client.get(&url).send().await
                && r.status().is_success()
            {
                return;
            }
            assert!(
                self.pid(name).is_some(),
                "{name} exited:\n{}",
                self.log_tail(name)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{name} never answered {path}:\n{}", self.log_tail(name));
    }

    /// The last lines a service printed.
    pub fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.log_path(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn ingest_url(&self, path: &str) -> String {
        self.http_url("webhook-ingest", path)
    }

    /// POSTs a GitLab delivery.
    pub async fn post_gitlab(
        &self,
        body: &serde_json::Value,
        token: Option<&str>,
        event: &str,
        uuid: Option<&str>,
    ) -> reqwest::Response {
        let mut req = self
            .http_client()
            .post(self.ingest_url("/hooks/gitlab"))
            .header("content-type", "application/json")
            .header("x-gitlab-event", event)
            .body(serde_json::to_vec(body).expect("json"));
        if let Some(t) = token {
            req = req.header("x-gitlab-token", t);
        }
        if let Some(u) = uuid {
            req = req.header("x-gitlab-event-uuid", u);
        }
        req.send().await.expect("webhook-ingest answers")
    }

    /// A stack with one project, `name`, built from `repo`.
    pub async fn with_project(
        repo: &crate::SampleRepo,
        name: &str,
        lease_secs: u64,
    ) -> (Self, ProjectSpec) {
        let project = ProjectSpec::new(name, &repo.url());
        let stack = Self::start(StackOptions {
            projects: vec![project.clone()],
            lease_secs,
            ..Default::default()
        })
        .await;
        (stack, project)
    }

    /// Posts a GitLab push of `sha` on `git_ref` (default branch `main`) and
    /// returns the id of the pipeline it started.
    pub async fn push(&self, project: &ProjectSpec, git_ref: &str, sha: &str) -> String {
        let event = if git_ref.starts_with("refs/tags/") {
            "Tag Push Hook"
        } else {
            "Push Hook"
        };
        let body = crate::forge::gitlab_push(&project.gitlab, git_ref, sha, "main");
        crate::accepted_pipeline(self.post_gitlab(&body, Some(SECRET), event, None).await).await
    }

    /// Like [`Stack::push`], for a push that moved `git_ref` from `before`
    /// to `sha` (GitLab's `before`), returning the pipeline id.
    pub async fn push_from(
        &self,
        project: &ProjectSpec,
        git_ref: &str,
        before: &str,
        sha: &str,
    ) -> String {
        let mut body = crate::forge::gitlab_push(&project.gitlab, git_ref, sha, "main");
        body["before"] = serde_json::json!(before);
        crate::accepted_pipeline(
            self.post_gitlab(&body, Some(SECRET), "Push Hook", None)
                .await,
        )
        .await
    }

    /// POSTs a GitHub delivery signed with `secret` (unsigned when `None`).
    pub async fn post_github(
        &self,
        body: &[u8],
        secret: Option<&str>,
        event: &str,
        delivery: &str,
    ) -> reqwest::Response {
        self.post_github_as("application/json", body, secret, event, delivery)
            .await
    }

    /// POSTs a GitHub delivery with the given content type (GitHub signs
    /// the body as sent, whatever its type).
    pub async fn post_github_as(
        &self,
        content_type: &str,
        body: &[u8],
        secret: Option<&str>,
        event: &str,
        delivery: &str,
    ) -> reqwest::Response {
        let mut req = self
            .http_client()
            .post(self.ingest_url("/hooks/github"))
            .header("content-type", content_type)
            .header("x-github-event", event)
            .header("x-github-delivery", delivery)
            .body(body.to_vec());
        if let Some(s) = secret {
            req = req.header(
                "x-hub-signature-256",
                crate::forge::github_signature(s, body),
            );
        }
        req.send().await.expect("webhook-ingest answers")
    }

    /// POSTs a Gitea delivery signed with `secret` (unsigned when `None`).
    pub async fn post_gitea(
        &self,
        body: &serde_json::Value,
        secret: Option<&str>,
        event: &str,
        delivery: &str,
    ) -> reqwest::Response {
        let body = serde_json::to_vec(body).expect("json");
        let mut req = self
            .http_client()
            .post(self.ingest_url("/hooks/gitea"))
            .header("content-type", "application/json")
            .header("x-gitea-event", event)
            .header("x-gitea-delivery", delivery)
            .body(body.clone());
        if let Some(s) = secret {
            req = req.header("x-gitea-signature", crate::forge::gitea_signature(s, &body));
        }
        req.send().await.expect("webhook-ingest answers")
    }

    /// Every event recorded so far.
    pub fn events(&self) -> Vec<Seen> {
        self.events.lock().expect("events lock").clone()
    }

    /// Events of one pipeline, in the order the broker delivered them.
    pub fn pipeline_events(&self, pipeline_id: &str) -> Vec<Seen> {
        self.events()
            .into_iter()
            .filter(|s| s.event.pipeline_id == pipeline_id)
            .collect()
    }

    /// Waits for an event of `pipeline_id` with routing key `key`.
    pub async fn wait_event(&self, pipeline_id: &str, key: &str, timeout: Duration) -> Seen {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self
                .pipeline_events(pipeline_id)
                .into_iter()
                .find(|s| s.routing_key == key)
            {
                return s;
            }
            if tokio::time::Instant::now() > deadline {
                let seen: Vec<String> = self
                    .pipeline_events(pipeline_id)
                    .iter()
                    .map(|s| s.routing_key.clone())
                    .collect();
                panic!(
                    "no {key} for pipeline {pipeline_id} within {timeout:?}; saw {seen:?}\n--- builder ---\n{}\n--- registry-publisher ---\n{}",
                    self.log_tail("builder"),
                    self.log_tail("registry-publisher")
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for the end of the pipeline: `image.published`, `build.failed` or
    /// `image.publish_failed`, whichever comes first.
    pub async fn wait_outcome(&self, pipeline_id: &str, timeout: Duration) -> Seen {
        let ends = [
            "image.published",
            "build.failed",
            "build.canceled",
            "build.skipped",
            "image.publish_failed",
        ];
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self
                .pipeline_events(pipeline_id)
                .into_iter()
                .find(|s| ends.contains(&s.routing_key.as_str()))
            {
                return s;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "pipeline {pipeline_id} did not end within {timeout:?}\n--- builder ---\n{}",
                self.log_tail("builder")
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Runs the `gantry` command against this stack, with the admin token.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        self.cli_with_input(args, b"")
    }

    /// Runs the CLI against this stack with `input` on its standard input.
    pub fn cli_with_input(&self, args: &[&str], input: &[u8]) -> std::process::Output {
        use std::io::Write as _;
        let url = |service: &str| format!("http://127.0.0.1:{}", self.grpc_port(service));
        let bin = bin_dir().join("gantry");
        assert!(bin.exists(), "{} is missing", bin.display());
        let mut child = Command::new(bin)
            .args(args)
            .env("GANTRY_NOTIFIER_URL", url("notifier"))
            .env("GANTRY_BUILDER_URL", url("builder"))
            .env("GANTRY_INGEST_URL", url("webhook-ingest"))
            .env("GANTRY_DEPLOYER_URL", url("deployer"))
            .env("GANTRY_TOKEN", tokens::ADMIN)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("gantry runs");
        if let Some(mut stdin) = child.stdin.take() {
            stdin.write_all(input).expect("write the CLI's input");
        }
        child.wait_with_output().expect("gantry ends")
    }

    /// A connection to this stack's database.
    pub async fn db(&self) -> sqlx::PgConnection {
        sqlx::PgConnection::connect(&self.database_url)
            .await
            .expect("stack database")
    }

    /// A gRPC channel to a service that calls with the admin token.
    pub async fn grpc(&self, service: &str) -> gantry_proto::client::Authed {
        self.grpc_as(service, Some(tokens::ADMIN)).await
    }

    /// A gRPC channel to a service that calls with `token` (none: no token).
    pub async fn grpc_as(
        &self,
        service: &str,
        token: Option<&str>,
    ) -> gantry_proto::client::Authed {
        let channel = self.grpc_channel(service).await;
        let bearer = gantry_proto::client::Bearer::new(token).expect("token");
        gantry_proto::client::authed(channel, bearer)
    }

    /// The bare channel to a service's gRPC listener.
    pub async fn grpc_channel(&self, service: &str) -> tonic::transport::Channel {
        let url = format!("{}://127.0.0.1:{}", self.scheme(), self.grpc_port(service));
        gantry_proto::client::endpoint(&url, self.ca_pem().as_deref())
            .expect("endpoint")
            .connect()
            .await
            .expect("gRPC connects")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.tap_stop.cancel();
        if std::thread::panicking() {
            for name in SERVICES {
                eprintln!("--- {name} log ---\n{}", self.log_tail(name));
            }
        }
        for (_, mut child) in self
            .procs
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
        {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "delete_vhost", &self.vhost])
            .output();
        for env in &self.options.environments {
            crate::docker::remove_labelled(&format!("io.gantry.environment={}", env.name));
            // A stack's environment has a network of its own.
            let _ = Command::new("docker")
                .args(["network", "rm", &format!("gantry-env-{}", env.name)])
                .output();
        }
        let (admin, db) = (crate::infra::database_url(), self.db_name.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&admin).await.ok()?;
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {db} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await
                .ok()
            })
        })
        .join();
    }
}
