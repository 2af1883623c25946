//! Stack releases on Rancher 1.6: a stack's environment with `target:
//! rancher` names a Rancher stack, which Gantry creates from the release
//! (`POST …/stacks` with `dockerCompose`, `rancherCompose`,
//! `startOnCreate`) or upgrades (`…/stacks/{id}?action=upgrade`; Rancher
//! upgrades each changed service in place), then follows as it follows a
//! service: `upgraded` and healthy within the environment's timeout →
//! `finishupgrade`; unhealthy, in error or too slow → `rollback` (after
//! `cancelupgrade` while still `upgrading`), and the previous release runs
//! again.
//!
//! The docker-compose file is the release's — the one its integration run
//! tested, members pinned to `repository@digest` — without what belongs to
//! the run (its network, test services, Docker health checks: Rancher's are
//! in rancher-compose) and only with keys of compose file version 2, which
//! Rancher 1.6 reads, every `$` escaped (Rancher interpolates as
//! docker-compose does; the values are literal); every service is labelled
//! with the stack, release and service. The rancher-compose file is the stack repository's (scale,
//! health checks, upgrade strategy), as the release carries it.

use gantry_config::Environment;
use gantry_proto::v1::StackService;
use serde_json::{Map, Value, json};

use crate::rancher::{self, RancherTarget, healthy, text};
use crate::stack_target::{self, stack_labels};
use crate::target::Failure;

/// The service keys of a release's compose file that Rancher 1.6 gets
/// (compose file version 2).
const KEPT: &[&str] = &[
    "image",
    "command",
    "entrypoint",
    "environment",
    "working_dir",
    "user",
    "expose",
    "read_only",
    "stop_signal",
    "stop_grace_period",
    "hostname",
    "tmpfs",
    "volumes",
    "mem_limit",
    "security_opt",
    "cap_drop",
    "cap_add",
    "logging",
];

/// A stack release, as Rancher gets it.
pub struct Release<'a> {
    pub stack: &'a str,
    pub number: i64,
    /// The release's compose file (JSON) and services.
    pub compose: &'a Value,
    pub services: &'a [StackService],
    /// The stack's rancher-compose file (JSON), or empty.
    pub rancher_compose: &'a str,
}

/// The docker-compose file Rancher gets for `release`.
pub fn docker_compose(release: &Release<'_>) -> Value {
    let specs = stack_target::services_of(release.compose, release.services);
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let mut services = Map::new();
    for spec in &specs {
        let mut out = Map::new();
        for key in KEPT {
            if let Some(v) = spec.def.get(*key) {
                out.insert((*key).to_owned(), v.clone());
            }
        }
        out.insert("image".into(), Value::String(spec.image.clone()));
        // Names only (version 2 has no conditions), of services deployed.
        let depends: Vec<&str> = match &spec.def["depends_on"] {
            Value::Array(items) => items.iter().filter_map(Value::as_str).collect(),
            Value::Object(map) => map.keys().map(String::as_str).collect(),
            _ => Vec::new(),
        };
        let depends: Vec<&str> = depends.into_iter().filter(|d| names.contains(d)).collect();
        if !depends.is_empty() {
            out.insert("depends_on".into(), json!(depends));
        }
        out.insert(
            "labels".into(),
            json!({
                stack_labels::STACK: release.stack,
                stack_labels::RELEASE: release.number.to_string(),
                stack_labels::SERVICE: spec.name,
            }),
        );
        services.insert(spec.name.clone(), Value::Object(out));
    }
    let volumes: Map<String, Value> = release.compose["volumes"]
        .as_object()
        .map(|v| v.keys().map(|k| (k.clone(), json!({}))).collect())
        .unwrap_or_default();
    let mut file = json!({ "version": "2", "services": services });
    if !volumes.is_empty() {
        file["volumes"] = Value::Object(volumes);
    }
    // Rancher reads `$VAR` as docker-compose does: the values are literal.
    gantry_pipeline::stack::escaped(&file)
}

fn yaml(v: &Value) -> Result<String, Failure> {
    serde_saphyr::to_string(v)
        .map_err(|e| Failure::Refused(anyhow::anyhow!("cannot write a compose file: {e}")))
}

/// Creates or upgrades the environment's Rancher stack with `release`.
pub async fn roll_out(
    http: &reqwest::Client,
    env: &Environment,
    release: &Release<'_>,
) -> Result<(), Failure> {
    let (api, r) = rancher::api(http, env)?;
    let docker_compose = yaml(&docker_compose(release))?;
    let rancher_compose = match release.rancher_compose {
        "" => String::new(),
        text => yaml(&serde_json::from_str(text).map_err(|e| {
            Failure::Refused(anyhow::anyhow!("the release's rancher-compose file: {e}"))
        })?)?,
    };
    let found = api
        .first(&format!(
            "/stacks?name={}",
            gantry_config::git::percent_encode(&r.stack)
        ))
        .await?;
    let Some(stack) = found else {
        let created = api
            .call(
                reqwest::Method::POST,
                "/stacks",
                Some(&json!({
                    "name": r.stack,
                    "description": format!("{} (deployed by Gantry)", release.stack),
                    "dockerCompose": docker_compose,
                    "rancherCompose": rancher_compose,
                    "environment": {},
                    "startOnCreate": true,
                })),
            )
            .await?;
        let path = format!(
            "/stacks/{}",
            gantry_config::git::percent_encode(text(&created, "id"))
        );
        // A new stack has nothing to go back to: one that does not come up
        // healthy stays as it is, for a person to look at.
        let up = RancherTarget::wait(&api, &path, env.health.timeout, |s| {
            match text(s, "state") {
                "active" if healthy(s) => Some(true),
                "error" => Some(false),
                _ if text(s, "healthState") == "unhealthy" => Some(false),
                _ => None,
            }
        })
        .await
        .unwrap_or_else(|f| Err(format!("Rancher could not be followed: {}", f.text())));
        return up.map(drop).map_err(|why| Failure::Failed {
            error: anyhow::anyhow!(
                "the new Rancher stack {}: {}; it is left as it is",
                r.stack,
                why.replace("not upgraded and healthy", "not active and healthy")
            ),
            rolled_back: false,
        });
    };
    let path = format!(
        "/stacks/{}",
        gantry_config::git::percent_encode(text(&stack, "id"))
    );
    let state = text(&stack, "state");
    if state != "active" {
        return Err(Failure::Refused(anyhow::anyhow!(
            "the Rancher stack {} is {state}, not active: finish or roll back that upgrade in Rancher first",
            r.stack
        )));
    }
    api.action(
        &path,
        "upgrade",
        &json!({
            "dockerCompose": docker_compose,
            "rancherCompose": rancher_compose,
            "environment": {},
        }),
    )
    .await?;
    rancher::follow_upgrade(&api, &path, env.health.timeout, "stack").await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_docker_compose_file_is_the_releases_deployed_part_in_version_2() {
        let compose = json!({
            "version": "2.4",
            "services": {
                "api": {
                    "image": "r/api@sha256:aa", "init": true, "cpus": 1.0, "pids_limit": 256,
                    "healthcheck": { "test": ["CMD", "true"] }, "mem_limit": "512m",
                    "environment": { "MODE": "prod", "PASSWORD": "pa$word" }, "labels": { "io.gantry.stack-run": "x" },
                    "networks": ["default"], "cap_drop": ["ALL"]
                },
                "web": {
                    "image": "r/web@sha256:bb",
                    "depends_on": { "api": { "condition": "service_healthy" } },
                    "volumes": ["cache:/var/cache"]
                },
                "tests": { "image": "t:1", "depends_on": ["web"] }
            },
            "networks": { "default": { "internal": true } },
            "volumes": { "cache": { "labels": { "io.gantry.stack-run": "x" } } }
        });
        let service = |name: &str, image: &str, digest: &str, test: bool| StackService {
            service: name.into(),
            image: image.into(),
            digest: digest.into(),
            test,
            ..Default::default()
        };
        let services = [
            service("api", "r/api@sha256:aa", "sha256:aa", false),
            service("web", "r/web@sha256:bb", "sha256:bb", false),
            service("tests", "t:1", "", true),
        ];
        let file = docker_compose(&Release {
            stack: "shop",
            number: 7,
            compose: &compose,
            services: &services,
            rancher_compose: "",
        });
        assert_eq!(
            file,
            json!({
                "version": "2",
                "services": {
                    "api": {
                        "image": "r/api@sha256:aa", "mem_limit": "512m",
                        "environment": { "MODE": "prod", "PASSWORD": "pa$$word" }, "cap_drop": ["ALL"],
                        "labels": { "io.gantry.stack": "shop", "io.gantry.stack-release": "7", "io.gantry.stack-service": "api" }
                    },
                    "web": {
                        "image": "r/web@sha256:bb", "depends_on": ["api"], "volumes": ["cache:/var/cache"],
                        "labels": { "io.gantry.stack": "shop", "io.gantry.stack-release": "7", "io.gantry.stack-service": "web" }
                    }
                },
                "volumes": { "cache": {} }
            })
        );
        let text = yaml(&file).expect("yaml");
        let back: Value = serde_saphyr::from_str(&text).expect("reads back");
        assert_eq!(back, file);
    }
}
