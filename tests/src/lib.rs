//! The end-to-end harness: real Gantry service processes against the real
//! Postgres, RabbitMQ, Docker engine and registry started by
//! `scripts/infra.sh`.
//!
//! Each [`Stack`] gets its own Postgres database and RabbitMQ virtual host,
//! its own configuration file and free loopback ports, so stacks never see
//! each other's data. It records every event on the bus (an extra queue bound
//! to `#`) so tests can wait for what the services emit. [`SampleRepo`] makes
//! a small service repository (a `FROM scratch` image with static busybox),
//! and [`forge`] builds GitLab and GitHub push deliveries as the forges send them.

pub mod auth_registry;
pub mod docker;
pub mod forge;
pub mod git_http;
pub mod kubernetes;
pub mod metrics;
pub mod rancher;
pub mod recorder;
pub mod repo;
pub mod stack;
pub mod stack_sample;

pub use repo::SampleRepo;
pub use stack::{EnvSpec, Stack, StackOptions};

/// Settings of the shared infrastructure (see `.gantry/infra.env`).
pub mod infra {
    /// Admin URL of the Postgres server; stacks create their databases there.
    pub fn database_url() -> String {
        std::env::var("DATABASE_URL")
            .unwrap_or_else(|_| "postgres://gantry:gantry@127.0.0.1:5432/gantry".into())
    }
    /// Base AMQP URL (without vhost).
    pub fn amqp_base() -> String {
        std::env::var("GANTRY_TEST_AMQP_BASE")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
    }
    /// The loopback registry.
    pub fn registry() -> String {
        std::env::var("GANTRY_REGISTRY").unwrap_or_else(|_| "127.0.0.1:5000".into())
    }
}

/// The pipeline id of an accepted delivery (asserting 202 "accepted").
pub async fn accepted_pipeline(resp: reqwest::Response) -> String {
    let status = resp.status();
    let body: serde_json::Value = resp.json().await.expect("JSON answer");
    assert_eq!(status, 202, "{body}");
    assert_eq!(body["status"], "accepted", "{body}");
    body["pipeline_id"]
        .as_str()
        .expect("pipeline id")
        .to_owned()
}

/// Installs the TLS crypto provider once (reqwest needs one).
pub fn init() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// An HTTP client for tests.
pub fn http() -> reqwest::Client {
    init();
    reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(60))
        .build()
        .expect("http client")
}

/// Tags and manifest digests in the registry.
pub mod registry {
    use super::http;

    /// Tags of `name` (repository path without host); empty if the repository does not exist.
    pub async fn tags(name: &str) -> Vec<String> {
        let url = format!("http://{}/v2/{name}/tags/list", super::infra::registry());
        let Ok(resp) = http().get(url).send().await else {
            return vec![];
        };
        if !resp.status().is_success() {
            return vec![];
        }
        let body: serde_json::Value = resp.json().await.unwrap_or_default();
        body["tags"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The manifest digest the registry serves for `name:tag`.
    pub async fn digest(name: &str, tag: &str) -> Option<String> {
        let url = format!(
            "http://{}/v2/{name}/manifests/{tag}",
            super::infra::registry()
        );
        let resp = http()
            .head(url)
            .header(
                "accept",
                "application/vnd.docker.distribution.manifest.v2+json, application/vnd.oci.image.manifest.v1+json",
            )
            .send()
            .await
            .ok()?;
        if !resp.status().is_success() {
            return None;
        }
        resp.headers()
            .get("docker-content-digest")?
            .to_str()
            .ok()
            .map(str::to_owned)
    }
}
