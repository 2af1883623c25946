//! The Docker side of a stack's environment: each service of a release runs
//! as a container of its own on the environment's network (reachable by
//! the service's name), made from the service as the release's compose file
//! has it — the file the integration run wrote and tested, so only the keys
//! it kept are there — with the stack's limits, `no-new-privileges`, the
//! short capability list and a capped log. Every container is labelled with
//! the environment, stack, release, service and deployment.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::Context as _;
use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, EndpointSettings, HealthConfig, HostConfig, NetworkCreateRequest,
    NetworkingConfig, RestartPolicy, RestartPolicyNameEnum,
};
use gantry_config::{Environment, Limits};
use gantry_docker::EngineError;
use gantry_proto::v1::StackService;
use serde_json::Value;

use crate::docker::labels;

/// Labels of a stack environment's containers (besides the deployer's own).
pub mod stack_labels {
    pub const STACK: &str = "io.gantry.stack";
    pub const RELEASE: &str = "io.gantry.stack-release";
    pub const SERVICE: &str = "io.gantry.stack-service";
    pub const IMAGE: &str = "io.gantry.image";
}

/// One service of a release, as it is deployed.
#[derive(Debug, Clone)]
pub struct ServiceSpec {
    pub name: String,
    /// `repository@digest` for members, else the compose file's image.
    pub image: String,
    /// Whether it is a member (pulled by digest with the registry's credentials).
    pub member: bool,
    /// The service as the release's compose file has it.
    pub def: Value,
}

/// The services of a release that run in an environment (not the test
/// services), dependencies first.
pub fn services_of(compose: &Value, services: &[StackService]) -> Vec<ServiceSpec> {
    let mut specs: BTreeMap<String, ServiceSpec> = services
        .iter()
        .filter(|s| !s.test)
        .map(|s| {
            (
                s.service.clone(),
                ServiceSpec {
                    name: s.service.clone(),
                    image: s.image.clone(),
                    member: !s.digest.is_empty(),
                    // Without the run's own labels (its run, build and attempt).
                    def: {
                        let mut def = compose["services"][&s.service].clone();
                        if let Some(d) = def.as_object_mut() {
                            d.remove("labels");
                        }
                        def
                    },
                },
            )
        })
        .collect();
    let deps = |def: &Value| -> Vec<String> {
        match &def["depends_on"] {
            Value::Array(items) => items
                .iter()
                .filter_map(|i| i.as_str().map(str::to_owned))
                .collect(),
            Value::Object(map) => map.keys().cloned().collect(),
            _ => Vec::new(),
        }
    };
    // Dependencies first; a cycle (compose refuses those) ends in name order.
    let mut ordered = Vec::new();
    while !specs.is_empty() {
        let next = specs
            .iter()
            .find(|(_, s)| {
                deps(&s.def)
                    .iter()
                    .all(|d| !specs.contains_key(d) || d == &s.name)
            })
            .map(|(name, _)| name.clone())
            .or_else(|| specs.keys().next().cloned());
        let Some(name) = next else { break };
        if let Some(spec) = specs.remove(&name) {
            ordered.push(spec);
        }
    }
    ordered
}

/// A compose duration (`1m30s`, `500ms`, `10s`, `1h`) in nanoseconds.
pub fn duration_ns(text: &str) -> Option<i64> {
    let mut total = Duration::ZERO;
    let mut rest = text.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(rest.len());
        let (number, tail) = rest.split_at(digits);
        let number: f64 = number.parse().ok()?;
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(tail.len());
        let (unit, tail) = tail.split_at(unit_len);
        let seconds = match unit {
            "h" => number * 3600.0,
            "m" => number * 60.0,
            "s" => number,
            "ms" => number / 1000.0,
            "us" => number / 1_000_000.0,
            _ => return None,
        };
        total += Duration::from_secs_f64(seconds);
        rest = tail;
    }
    i64::try_from(total.as_nanos()).ok()
}

/// A command as compose has it: a list, or a string split on whitespace.
fn command(v: &Value) -> Option<Vec<String>> {
    match v {
        Value::Array(items) => Some(items.iter().map(scalar).collect()),
        Value::String(s) => Some(s.split_whitespace().map(str::to_owned).collect()),
        _ => None,
    }
}

/// A scalar as text (`environment` values may be numbers or booleans).
fn scalar(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `environment` as `KEY=value` (from a map or a list).
fn environment(v: &Value) -> Vec<String> {
    match v {
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| format!("{k}={}", scalar(v)))
            .collect(),
        Value::Array(items) => items.iter().map(scalar).collect(),
        _ => Vec::new(),
    }
}

/// `healthcheck` as the engine wants it.
fn healthcheck(v: &Value) -> Option<HealthConfig> {
    if !v.is_object() {
        return None;
    }
    if v["disable"] == Value::Bool(true) {
        return Some(HealthConfig {
            test: Some(vec!["NONE".into()]),
            ..Default::default()
        });
    }
    let test = match &v["test"] {
        Value::String(s) => Some(vec!["CMD-SHELL".to_owned(), s.clone()]),
        Value::Array(items) => Some(items.iter().map(scalar).collect()),
        _ => None,
    };
    let duration = |key: &str| v[key].as_str().and_then(duration_ns);
    Some(HealthConfig {
        test,
        interval: duration("interval"),
        timeout: duration("timeout"),
        retries: v["retries"].as_i64(),
        start_period: duration("start_period"),
        ..Default::default()
    })
}

/// Makes sure the environment's network exists (labelled with it).
pub async fn ensure_network(docker: &Docker, env: &Environment) -> anyhow::Result<()> {
    if docker
        .inspect_network(
            &env.network,
            None::<bollard::query_parameters::InspectNetworkOptions>,
        )
        .await
        .is_ok()
    {
        return Ok(());
    }
    let request = NetworkCreateRequest {
        name: env.network.clone(),
        driver: Some("bridge".into()),
        labels: Some(HashMap::from([
            (labels::MANAGED.to_owned(), "true".to_owned()),
            (labels::ENVIRONMENT.to_owned(), env.name.clone()),
        ])),
        ..Default::default()
    };
    match docker.create_network(request).await {
        Ok(_) => Ok(()),
        // Another replica made it meanwhile.
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 409, ..
        }) => Ok(()),
        Err(e) => Err(EngineError(e)).context("creating the environment's network"),
    }
}

/// What a new container is made for.
pub struct Placement<'a> {
    pub env: &'a Environment,
    pub limits: &'a Limits,
    pub stack: &'a str,
    pub release: u64,
    pub deployment: &'a str,
    pub attempt: i32,
}

/// Label of a container: the hash of what it was made from (the service's
/// definition and image, the environment's variables and network, the
/// stack's limits). A service whose hash is unchanged is left running.
pub const SPEC_LABEL: &str = "io.gantry.spec";

/// The hash of what `spec`'s container is made from at `at`.
pub fn spec_hash(at: &Placement<'_>, spec: &ServiceSpec) -> String {
    use sha2::Digest as _;
    let what = serde_json::json!({
        "image": spec.image,
        "def": spec.def,
        "env": at.env.env,
        "network": at.env.network,
        "limits": [at.limits.memory_mb.to_string(), at.limits.pids.to_string(), at.limits.cpus.to_string()],
    });
    hex::encode(sha2::Sha256::digest(what.to_string().as_bytes()))
}

/// The spec hash a container was made from, if it has one.
pub async fn hash_of(docker: &Docker, container: &str) -> Option<String> {
    docker
        .inspect_container(
            container,
            None::<bollard::query_parameters::InspectContainerOptions>,
        )
        .await
        .ok()?
        .config?
        .labels?
        .get(SPEC_LABEL)
        .cloned()
}

/// Creates the container of `spec` for `at`; returns its id.
pub async fn create(
    docker: &Docker,
    at: &Placement<'_>,
    spec: &ServiceSpec,
) -> anyhow::Result<String> {
    let def = &spec.def;
    let short: String = at
        .deployment
        .chars()
        .filter(|c| *c != '-')
        .take(12)
        .collect();
    let name = format!(
        "gantry-{}-{}-{short}-{}",
        at.env.name, spec.name, at.attempt
    );
    let labels = HashMap::from([
        (labels::MANAGED.to_owned(), "true".to_owned()),
        (labels::ENVIRONMENT.to_owned(), at.env.name.clone()),
        (labels::DEPLOYMENT.to_owned(), at.deployment.to_owned()),
        (stack_labels::STACK.to_owned(), at.stack.to_owned()),
        (stack_labels::RELEASE.to_owned(), at.release.to_string()),
        (stack_labels::SERVICE.to_owned(), spec.name.clone()),
        (stack_labels::IMAGE.to_owned(), spec.image.clone()),
        (SPEC_LABEL.to_owned(), spec_hash(at, spec)),
    ]);
    let mut vars = environment(&def["environment"]);
    vars.extend(at.env.env.iter().map(|(k, v)| format!("{k}={v}")));
    vars.push(format!("GANTRY_ENVIRONMENT={}", at.env.name));
    let mut binds = Vec::new();
    for volume in def["volumes"].as_array().into_iter().flatten() {
        let Some(v) = volume.as_str() else { continue };
        // Named volumes are the environment's own; anonymous ones stay as they are.
        binds.push(match v.split_once(':') {
            Some((source, rest)) => format!("gantry-{}-{source}:{rest}", at.env.name),
            None => v.to_owned(),
        });
    }
    let tmpfs: HashMap<String, String> = match &def["tmpfs"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => items.iter().map(scalar).collect(),
        _ => Vec::new(),
    }
    .into_iter()
    .map(|t| match t.split_once(':') {
        Some((path, options)) => (path.to_owned(), options.to_owned()),
        None => (t, String::new()),
    })
    .collect();
    let body = ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: command(&def["command"]),
        entrypoint: command(&def["entrypoint"]),
        env: Some(vars),
        labels: Some(labels),
        healthcheck: healthcheck(&def["healthcheck"]),
        working_dir: def["working_dir"].as_str().map(str::to_owned),
        user: def["user"].as_str().map(str::to_owned),
        hostname: def["hostname"].as_str().map(str::to_owned),
        stop_signal: def["stop_signal"].as_str().map(str::to_owned),
        host_config: Some(HostConfig {
            restart_policy: Some(RestartPolicy {
                name: Some(RestartPolicyNameEnum::UNLESS_STOPPED),
                maximum_retry_count: None,
            }),
            init: def["init"].as_bool(),
            readonly_rootfs: def["read_only"].as_bool(),
            tmpfs: (!tmpfs.is_empty()).then_some(tmpfs),
            binds: (!binds.is_empty()).then_some(binds),
            ..gantry_docker::confined_host_config(at.limits, &at.env.network)
        }),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(
                at.env.network.clone(),
                EndpointSettings {
                    aliases: Some(vec![spec.name.clone()]),
                    ..Default::default()
                },
            )])),
        }),
        ..Default::default()
    };
    gantry_docker::create_container(docker, &name, body).await
}

/// A service's container in the environment, as found by its labels.
#[derive(Debug, Clone)]
pub struct Running {
    pub container: String,
    pub image: String,
    pub deployment: String,
}

/// The environment's service containers, by service (all of them, running
/// or not); an error when the engine cannot be asked.
pub async fn containers(docker: &Docker, env: &str) -> anyhow::Result<Vec<(String, Running)>> {
    use bollard::query_parameters::ListContainersOptions;
    let filters = HashMap::from([(
        "label".to_owned(),
        vec![format!("{}={env}", labels::ENVIRONMENT)],
    )]);
    let list = docker
        .list_containers(Some(ListContainersOptions {
            all: true,
            filters: Some(filters),
            ..Default::default()
        }))
        .await
        .map_err(EngineError)
        .context("listing the environment's containers")?;
    Ok(list
        .into_iter()
        .filter_map(|c| {
            let labels = c.labels?;
            Some((
                labels.get(stack_labels::SERVICE)?.clone(),
                Running {
                    container: c.id?,
                    image: labels.get(stack_labels::IMAGE).cloned().unwrap_or_default(),
                    deployment: labels.get(labels::DEPLOYMENT).cloned().unwrap_or_default(),
                },
            ))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn compose_durations() {
        assert_eq!(duration_ns("1s"), Some(1_000_000_000));
        assert_eq!(duration_ns("1m30s"), Some(90_000_000_000));
        assert_eq!(duration_ns("500ms"), Some(500_000_000));
        assert_eq!(duration_ns("2x"), None);
        assert_eq!(duration_ns(""), None);
    }

    #[test]
    fn dependencies_come_first_and_tests_stay_out() {
        let compose = json!({"services": {
            "web": {"depends_on": ["api"]},
            "api": {"depends_on": {"db": {"condition": "service_healthy"}}},
            "db": {},
            "tests": {"depends_on": ["web"]},
        }});
        let services: Vec<StackService> = ["web", "api", "db", "tests"]
            .iter()
            .map(|s| StackService {
                service: s.to_string(),
                test: *s == "tests",
                ..Default::default()
            })
            .collect();
        let order: Vec<String> = services_of(&compose, &services)
            .into_iter()
            .map(|s| s.name)
            .collect();
        assert_eq!(order, ["db", "api", "web"]);
    }

    #[test]
    fn healthchecks_become_the_engines() {
        let h = healthcheck(&json!({"test": ["CMD", "true"], "interval": "1s", "retries": 3}))
            .expect("health");
        assert_eq!(h.test, Some(vec!["CMD".to_owned(), "true".to_owned()]));
        assert_eq!((h.interval, h.retries), (Some(1_000_000_000), Some(3)));
        let h = healthcheck(&json!({"test": "curl -f x"})).expect("health");
        assert_eq!(
            h.test,
            Some(vec!["CMD-SHELL".to_owned(), "curl -f x".to_owned()])
        );
    }
}
