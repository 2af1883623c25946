//! A stack repository (a meta-project): the `stack:` section of its
//! `.gantry.yml` and the team's own compose file, turned into the compose
//! file of one integration run.
//!
//! ```yaml
//! # .gantry.yml of the stack repository
//! stack:
//!   compose: docker-compose.yml   # default
//!   rancher_compose: rancher-compose.yml  # default, read when present
//!   members:                      # compose service -> Gantry project it follows
//!     web: hello-web
//!     api: hello-api
//!   tests: [tests]                # the services whose exit code decides
//!   timeout: 600                  # seconds the whole run may take (default 600)
//! ```
//!
//! The compose file is the one the team runs by hand, but the repository is
//! hostile: the run gets a compose file written here from the parts of the
//! team's file that cannot reach the host. Known keys are either kept
//! (`image`, `command`, `entrypoint`, `environment`, `healthcheck`,
//! `depends_on`, named and anonymous `volumes`, `tmpfs` mounts, …) or
//! ignored with a note (`ports`, `restart`, `deploy`, `container_name`,
//! `networks`, `labels`, `build` of a member); anything else —
//! `privileged`, host paths, host namespaces, devices, capabilities,
//! `env_file`, a `build` of a service that is not a member — fails the run,
//! located. Members may only be projects the configuration lets the stack
//! follow, and no other service may run an image of a project it does not
//! follow (the engine may hold one). The written file pins every member to
//! `repository@digest`, labels every container, network and volume with the
//! stack, run and pipeline, puts the services on the run's own network —
//! `internal`, and with no address of the host on its bridge, so no way
//! out, not even to the host —, and gives every container the project's
//! memory, pids and CPU limits, a capped log, `no-new-privileges` and only
//! the capabilities an ordinary service needs.
//!
//! Values are read as docker-compose reads them with an empty environment
//! (`$$` is `$`, `${X:-d}` is `d`, `$X` is empty): the plan holds the literal
//! values a release deploys, and docker-compose gets them escaped.

use std::collections::BTreeMap;

use gantry_config::yaml::{self, LocatedError, Spanned, error_at};
use gantry_proto::v1::{ReleasedImage, StackService};
use serde::Deserialize;
use serde_json::{Value, json};

use gantry_pipeline::FILE;
pub use gantry_pipeline::stack::{MAX_SERVICES, StackFile, escaped, map_strings};

/// One service of the team's compose file: the keys a run keeps, the keys
/// it ignores, and nothing else.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    #[serde(default)]
    image: Option<Spanned<String>>,
    // Kept as written.
    #[serde(default)]
    command: Option<Value>,
    #[serde(default)]
    entrypoint: Option<Value>,
    #[serde(default)]
    environment: Option<Value>,
    #[serde(default)]
    healthcheck: Option<Value>,
    #[serde(default)]
    depends_on: Option<Value>,
    #[serde(default)]
    labels: Option<Value>,
    #[serde(default)]
    working_dir: Option<Value>,
    #[serde(default)]
    user: Option<Value>,
    #[serde(default)]
    expose: Option<Value>,
    #[serde(default)]
    tmpfs: Option<Spanned<Value>>,
    #[serde(default)]
    init: Option<bool>,
    #[serde(default)]
    read_only: Option<Value>,
    #[serde(default)]
    stop_signal: Option<Value>,
    #[serde(default)]
    stop_grace_period: Option<Value>,
    #[serde(default)]
    hostname: Option<Value>,
    #[serde(default)]
    volumes: Vec<Spanned<String>>,
    // Ignored, with a note.
    #[serde(default)]
    build: Option<Spanned<Value>>,
    #[serde(default)]
    ports: Option<Value>,
    #[serde(default)]
    restart: Option<Value>,
    #[serde(default)]
    deploy: Option<Value>,
    #[serde(default)]
    container_name: Option<Value>,
    #[serde(default)]
    networks: Option<Value>,
}

/// A top-level named volume: only labels may be set (no driver, no options:
/// a `local` volume with options can bind any host path).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVolume {
    /// Accepted and not used: only Gantry's labels are set.
    #[serde(default, rename = "labels")]
    _labels: Option<Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCompose {
    #[serde(default)]
    version: Option<Value>,
    services: BTreeMap<String, Spanned<RawService>>,
    #[serde(default)]
    volumes: BTreeMap<String, Option<RawVolume>>,
    /// Ignored: the run has its own network.
    #[serde(default)]
    networks: Option<Value>,
}

/// What the run needs to know to write its compose file.
pub struct RunContext<'a> {
    /// The newest release of every project.
    pub releases: &'a [ReleasedImage],
    /// Labels every container, network and volume of the run gets.
    pub labels: &'a BTreeMap<String, String>,
    /// Limits of every container (the stack project's).
    pub limits: &'a gantry_config::Limits,
    /// The projects the configuration lets this stack follow.
    pub follows: &'a [String],
    /// The project whose registry repository an image reference is in,
    /// if it is one of a configured project.
    pub project_of_image: &'a dyn Fn(&str) -> Option<String>,
}

/// The compose file of one run, and what it runs.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The compose file to hand to `docker-compose` (JSON is YAML).
    pub compose: Value,
    /// Every service with the image it runs.
    pub services: Vec<StackService>,
    /// Started first, and waited for until healthy.
    pub up: Vec<String>,
    /// Started once the others are healthy; their exit codes decide.
    pub tests: Vec<String>,
    /// Things of the team's file the run ignores, for the log.
    pub notes: Vec<String>,
    /// The stack's rancher-compose file (JSON), when it has one: what a
    /// Rancher environment gets with the release.
    pub rancher_compose: Option<Value>,
}

/// Names of compose services and volumes: a letter or digit, then letters,
/// digits, `-` or `_` — never an option (`-…`) or a path (`.`, `..`).
fn valid_name(name: &str) -> bool {
    name.as_bytes()
        .first()
        .is_some_and(u8::is_ascii_alphanumeric)
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_".contains(&b))
}

/// Checks `tmpfs` (a path or a list of them, optionally `:size=…,mode=…`).
fn check_tmpfs(file: &str, t: &Spanned<Value>) -> Result<(), LocatedError> {
    let entries: Vec<&Value> = match &t.value {
        Value::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    let ok = entries.iter().all(|e| {
        e.as_str().is_some_and(|s| {
            let (path, options) = s.split_once(':').unwrap_or((s, ""));
            path.starts_with('/')
                && options.split(',').filter(|o| !o.is_empty()).all(|o| {
                    o.starts_with("size=")
                        || o.starts_with("mode=")
                        || ["ro", "rw", "noexec", "nosuid", "nodev"].contains(&o)
                })
        })
    });
    if ok {
        Ok(())
    } else {
        Err(error_at(
            file,
            t,
            "tmpfs: absolute paths, with only size=, mode=, ro, rw, noexec, nosuid or nodev",
        ))
    }
}

/// A value of the compose file as docker-compose reads it with an empty
/// environment (the run's): `$$` is a `$`, `${NAME:-default}` and
/// `${NAME-default}` are the default, `${NAME}` and `$NAME` are empty. The
/// plan holds these literal values — what a release deploys — and the run
/// hands docker-compose an escaped copy ([`escaped`]).
pub fn interpolate(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(braced) = after.strip_prefix('{') {
            match braced.find('}') {
                Some(end) => {
                    let inner = &braced[..end];
                    if let Some((_, default)) =
                        inner.split_once(":-").or_else(|| inner.split_once('-'))
                    {
                        out.push_str(default);
                    }
                    rest = &braced[end + 1..];
                }
                None => {
                    out.push('$');
                    rest = after;
                }
            }
        } else {
            let name_len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            if name_len == 0 {
                out.push('$');
            }
            rest = &after[name_len..];
        }
    }
    out.push_str(rest);
    out
}

/// Checks a short-syntax volume: a declared named volume or an anonymous one,
/// never a host path.
fn check_volume(
    file: &str,
    v: &Spanned<String>,
    declared: &BTreeMap<String, Option<RawVolume>>,
) -> Result<(), LocatedError> {
    let parts: Vec<&str> = v.value.split(':').collect();
    let ok = match parts.as_slice() {
        [target] => target.starts_with('/'),
        [source, target] | [source, target, "ro" | "rw"] => {
            target.starts_with('/') && valid_name(source) && declared.contains_key(*source)
        }
        _ => false,
    };
    if ok {
        return Ok(());
    }
    Err(error_at(
        file,
        v,
        format!(
            "volume {:?}: an integration run mounts only named volumes declared under `volumes:` (name:/path) or anonymous ones (/path), never a host path",
            v.value
        ),
    ))
}

/// Turns the team's compose file into the compose file of one run.
pub fn plan(
    stack: &StackFile,
    compose_text: &str,
    cx: &RunContext<'_>,
) -> Result<Plan, LocatedError> {
    let file = stack.compose.as_str();
    let raw: RawCompose = yaml::from_str(file, compose_text)?;
    let _ = (&raw.version, &raw.networks);
    if raw.services.len() > MAX_SERVICES {
        return Err(LocatedError::new(
            file,
            1,
            1,
            format!(
                "{} services; an integration run starts at most {MAX_SERVICES}",
                raw.services.len()
            ),
        ));
    }
    if let Some(name) = raw.volumes.keys().find(|n| !valid_name(n)) {
        return Err(LocatedError::new(
            file,
            1,
            1,
            format!("volume name {name:?}: a letter or digit, then letters, digits, '-' or '_'"),
        ));
    }
    for (service, (project, (line, column))) in &stack.members {
        if !raw.services.contains_key(service) {
            return Err(LocatedError::new(
                FILE,
                *line,
                *column,
                format!("member {service:?} is not a service of {file}"),
            ));
        }
        if !cx.follows.contains(project) {
            return Err(LocatedError::new(
                FILE,
                *line,
                *column,
                format!(
                    "member {service:?} follows {project:?}, which the Gantry configuration does not let this stack follow (`follows:` of the stack)"
                ),
            ));
        }
    }
    for (test, (line, column)) in &stack.tests {
        if !raw.services.contains_key(test) {
            return Err(LocatedError::new(
                FILE,
                *line,
                *column,
                format!("test service {test:?} is not a service of {file}"),
            ));
        }
    }
    let mut out_services = serde_json::Map::new();
    let mut services = Vec::new();
    let mut notes = Vec::new();
    for (name, sp) in &raw.services {
        if !valid_name(name) {
            return Err(error_at(
                file,
                sp,
                format!(
                    "service name {name:?}: a letter or digit, then letters, digits, '-' or '_'"
                ),
            ));
        }
        let s = &sp.value;
        let member = stack.members.get(name).map(|(p, _)| p.as_str());
        let (image, digest, commit) = match member {
            Some(project) => match cx.releases.iter().find(|r| r.project == project) {
                Some(r) => (
                    format!("{}@{}", r.repository, r.digest),
                    r.digest.clone(),
                    r.commit_sha.clone(),
                ),
                None => match &s.image {
                    Some(i) => {
                        notes.push(format!(
                            "{name}: {project} has no release yet; running {} as the compose file says",
                            i.value
                        ));
                        (i.value.clone(), String::new(), String::new())
                    }
                    None => {
                        return Err(error_at(
                            file,
                            sp,
                            format!(
                                "service {name:?} follows {project:?}, which has no release yet, and names no image"
                            ),
                        ));
                    }
                },
            },
            None => {
                if let Some(b) = &s.build {
                    return Err(error_at(
                        file,
                        b,
                        format!(
                            "service {name:?} is built here, but an integration run builds nothing: make it a member (its project's releases) or name an image"
                        ),
                    ));
                }
                match &s.image {
                    Some(i) if !i.value.trim().is_empty() => {
                        if let Some(other) =
                            (cx.project_of_image)(&i.value).filter(|p| !cx.follows.contains(p))
                        {
                            return Err(error_at(
                                file,
                                i,
                                format!(
                                    "image {:?} is of project {other:?}, which this stack does not follow",
                                    i.value
                                ),
                            ));
                        }
                        (i.value.clone(), String::new(), String::new())
                    }
                    _ => {
                        return Err(error_at(
                            file,
                            sp,
                            format!("service {name:?} names no image"),
                        ));
                    }
                }
            }
        };
        for (key, present) in [
            ("build", member.is_some() && s.build.is_some()),
            ("ports", s.ports.is_some()),
            ("restart", s.restart.is_some()),
            ("deploy", s.deploy.is_some()),
            ("container_name", s.container_name.is_some()),
            ("networks", s.networks.is_some()),
            ("labels", s.labels.is_some()),
        ] {
            if present {
                notes.push(format!("{name}: `{key}` is ignored in an integration run"));
            }
        }
        for v in &s.volumes {
            check_volume(file, v, &raw.volumes)?;
        }
        if let Some(t) = &s.tmpfs {
            check_tmpfs(file, t)?;
        }
        // Only Gantry's labels: other tools on the host act on labels.
        let labels: serde_json::Map<String, Value> = cx
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), Value::String(v.clone())))
            .collect();
        let mut out = serde_json::Map::new();
        out.insert("image".into(), Value::String(image.clone()));
        for (key, value) in [
            ("command", &s.command),
            ("entrypoint", &s.entrypoint),
            ("environment", &s.environment),
            ("healthcheck", &s.healthcheck),
            ("depends_on", &s.depends_on),
            ("working_dir", &s.working_dir),
            ("user", &s.user),
            ("expose", &s.expose),
            ("read_only", &s.read_only),
            ("stop_signal", &s.stop_signal),
            ("stop_grace_period", &s.stop_grace_period),
            ("hostname", &s.hostname),
        ] {
            if let Some(v) = value {
                out.insert(key.into(), map_strings(v, &interpolate));
            }
        }
        if let Some(t) = &s.tmpfs {
            out.insert("tmpfs".into(), t.value.clone());
        }
        if let Some(init) = s.init {
            out.insert("init".into(), Value::Bool(init));
        }
        if !s.volumes.is_empty() {
            out.insert(
                "volumes".into(),
                s.volumes
                    .iter()
                    .map(|v| Value::String(v.value.clone()))
                    .collect(),
            );
        }
        out.insert("labels".into(), Value::Object(labels));
        out.insert(
            "mem_limit".into(),
            Value::String(format!("{}m", cx.limits.memory_mb)),
        );
        out.insert("pids_limit".into(), json!(cx.limits.pids));
        out.insert("cpus".into(), json!(cx.limits.cpus));
        out.insert("security_opt".into(), json!(["no-new-privileges:true"]));
        out.insert("cap_drop".into(), json!(["ALL"]));
        out.insert("cap_add".into(), json!(gantry_docker::SERVICE_CAPABILITIES));
        out.insert(
            "logging".into(),
            json!({"driver": "json-file", "options": {"max-size": "10m", "max-file": "1"}}),
        );
        out_services.insert(name.clone(), Value::Object(out));
        services.push(StackService {
            service: name.clone(),
            project: member.unwrap_or_default().to_owned(),
            image,
            digest,
            commit_sha: commit,
            test: stack.tests.iter().any(|(t, _)| t == name),
        });
    }
    if raw.networks.is_some() {
        notes.push("top-level `networks` are ignored: the run has its own network".into());
    }
    let labels: serde_json::Map<String, Value> = cx
        .labels
        .iter()
        .map(|(k, v)| (k.clone(), Value::String(v.clone())))
        .collect();
    let volumes: serde_json::Map<String, Value> = raw
        .volumes
        .keys()
        .map(|name| (name.clone(), json!({ "labels": labels })))
        .collect();
    let compose = json!({
        "version": "2.4",
        "services": out_services,
        "networks": { "default": {
            "internal": true,
            // No address of the host on the bridge: the host is out of reach.
            "driver_opts": { "com.docker.network.bridge.inhibit_ipv4": "true" },
            "labels": labels,
        } },
        "volumes": volumes,
    });
    let tests: Vec<String> = stack.tests.iter().map(|(t, _)| t.clone()).collect();
    let up = raw
        .services
        .keys()
        .filter(|s| !tests.contains(s))
        .cloned()
        .collect();
    Ok(Plan {
        compose,
        services,
        up,
        tests,
        notes,
        rancher_compose: None,
    })
}

/// A rancher-compose file (version 2: `services` by name), as JSON.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRancherCompose {
    #[serde(default)]
    version: Option<Value>,
    #[serde(default)]
    services: BTreeMap<String, Spanned<serde_json::Map<String, Value>>>,
}

/// Most containers a rancher-compose file may ask of a service.
pub const MAX_RANCHER_SCALE: u64 = 100;

/// Reads the stack's rancher-compose file (`file`, for errors): each of its
/// services must be one the release deploys (not a test service), and may
/// only set what concerns itself — scale (at most [`MAX_RANCHER_SCALE`]),
/// health check, upgrade strategy, `retain_ip`, `drain_timeout_ms` — never
/// a load balancer's routes, certificates, metadata or drivers: the
/// repository is not trusted with the rest of the Rancher environment.
pub fn rancher_compose(file: &str, text: &str, plan: &Plan) -> Result<Value, LocatedError> {
    let raw: RawRancherCompose = yaml::from_str(file, text)?;
    let mut services = serde_json::Map::new();
    for (name, settings) in raw.services {
        if !plan.services.iter().any(|s| s.service == name && !s.test) {
            return Err(error_at(
                file,
                &settings,
                format!(
                    "service {name:?} is not one the stack deploys (a service of {} that is not a test)",
                    FILE
                ),
            ));
        }
        for (key, value) in &settings.value {
            let problem = match key.as_str() {
                "scale" => value
                    .as_u64()
                    .is_none_or(|n| n > MAX_RANCHER_SCALE)
                    .then(|| format!("`scale` is a number from 0 to {MAX_RANCHER_SCALE}")),
                "health_check" | "upgrade_strategy" => {
                    (!value.is_object()).then(|| format!("`{key}` is a mapping"))
                }
                "retain_ip" => {
                    (!value.is_boolean()).then(|| "`retain_ip` is true or false".to_owned())
                }
                "drain_timeout_ms" => value
                    .as_u64()
                    .is_none()
                    .then(|| "`drain_timeout_ms` is a number".to_owned()),
                other => Some(format!(
                    "`{other}` is not allowed (a service may set scale, health_check, upgrade_strategy, retain_ip, drain_timeout_ms)"
                )),
            };
            if let Some(problem) = problem {
                return Err(error_at(
                    file,
                    &settings,
                    format!("service {name:?}: {problem}"),
                ));
            }
        }
        services.insert(name, Value::Object(settings.value));
    }
    Ok(json!({
        "version": raw.version.unwrap_or_else(|| json!("2")),
        "services": services,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const STACK: &str =
        "stack:\n  members: {web: web-project, api: api-project}\n  tests: [tests]\n";
    const COMPOSE: &str = "version: '3.8'\nservices:\n  api:\n    image: localhost/api:dev\n    build: ./api\n    healthcheck: {test: [CMD, wget, -q, http://localhost/]}\n  web:\n    image: localhost/web:dev\n    ports: ['8080:80']\n    depends_on: [api]\n    volumes: [cache:/var/cache, /tmp/scratch]\n  tests:\n    image: local/tests:1\n    command: [sh, -c, 'wget -qO- http://web/']\nvolumes:\n  cache:\n";

    fn releases() -> Vec<ReleasedImage> {
        vec![ReleasedImage {
            project: "api-project".into(),
            repository: "localhost:5000/api".into(),
            digest: "sha256:aa".into(),
            commit_sha: "c1".into(),
            ..Default::default()
        }]
    }

    fn plan_of(stack: &str, compose: &str) -> Result<Plan, LocatedError> {
        let file = StackFile::parse(stack)?;
        let labels = BTreeMap::from([("io.gantry.stack".to_owned(), "shop".to_owned())]);
        plan(
            &file,
            compose,
            &RunContext {
                releases: &releases(),
                labels: &labels,
                limits: &gantry_config::Limits::default(),
                follows: &["web-project".to_owned(), "api-project".to_owned()],
                project_of_image: &|i| {
                    i.starts_with("localhost:5000/secret")
                        .then(|| "secret".to_owned())
                },
            },
        )
    }

    #[test]
    fn values_are_read_as_docker_compose_reads_them_with_no_environment() {
        assert_eq!(interpolate("a $$b $${c}"), "a $b ${c}");
        assert_eq!(interpolate("x${HOME}y $PATH/z"), "xy /z");
        assert_eq!(interpolate("${PORT:-8080} ${N-1}"), "8080 1");
        assert_eq!(interpolate("cost: 5$ ${unclosed"), "cost: 5$ ${unclosed");
        let v = serde_json::json!({"command": ["sh", "-c", "echo $$HOME"]});
        assert_eq!(map_strings(&v, &interpolate)["command"][2], "echo $HOME");
        assert_eq!(
            escaped(&map_strings(&v, &interpolate))["command"][2],
            "echo $$HOME"
        );
    }

    #[test]
    fn a_rancher_compose_file_names_deployed_services_only() {
        let p = plan_of(STACK, COMPOSE).expect("valid");
        let ok = rancher_compose(
            "rancher-compose.yml",
            "version: '2'\nservices:\n  web:\n    scale: 3\n    upgrade_strategy: {start_first: true}\n",
            &p,
        )
        .expect("valid");
        assert_eq!(ok["services"]["web"]["scale"], 3);
        assert_eq!(
            ok["services"]["web"]["upgrade_strategy"]["start_first"],
            true
        );
        let err = rancher_compose(
            "rancher-compose.yml",
            "version: '2'\nservices:\n  tests:\n    scale: 1\n",
            &p,
        )
        .expect_err("a test service");
        assert!(
            err.to_string()
                .starts_with("rancher-compose.yml:4:5: service \"tests\" is not one"),
            "{err}"
        );
        for (settings, problem) in [
            ("scale: 1000", "`scale` is a number from 0 to 100"),
            (
                "lb_config: {port_rules: [{target_port: 5432, service: other/db}]}",
                "`lb_config` is not allowed",
            ),
            ("health_check: 8080", "`health_check` is a mapping"),
        ] {
            let err = rancher_compose(
                "rancher-compose.yml",
                &format!("version: '2'\nservices:\n  web:\n    {settings}\n"),
                &p,
            )
            .expect_err(problem);
            assert!(
                err.to_string().starts_with(&format!(
                    "rancher-compose.yml:4:5: service \"web\": {problem}"
                )),
                "{err}"
            );
        }
        let err = rancher_compose("rancher-compose.yml", "web:\n  scale: 2\n", &p)
            .expect_err("version 1");
        assert!(err.to_string().contains("web"), "{err}");
    }

    #[test]
    fn members_are_pinned_and_everything_is_labelled_and_confined() {
        let p = plan_of(STACK, COMPOSE).expect("valid");
        let api = &p.compose["services"]["api"];
        assert_eq!(api["image"], "localhost:5000/api@sha256:aa");
        assert!(api.get("build").is_none());
        assert_eq!(api["labels"]["io.gantry.stack"], "shop");
        assert_eq!(api["security_opt"][0], "no-new-privileges:true");
        assert_eq!(api["cap_drop"][0], "ALL");
        assert_eq!(api["logging"]["options"]["max-size"], "10m");
        assert_eq!(
            p.compose["networks"]["default"]["driver_opts"]["com.docker.network.bridge.inhibit_ipv4"],
            "true"
        );
        let web = &p.compose["services"]["web"];
        assert_eq!(
            web["image"], "localhost/web:dev",
            "no release: the file's image"
        );
        assert!(web.get("ports").is_none());
        assert_eq!(p.compose["networks"]["default"]["internal"], true);
        assert_eq!(
            p.compose["volumes"]["cache"]["labels"]["io.gantry.stack"],
            "shop"
        );
        assert_eq!(p.up, ["api", "web"]);
        assert_eq!(p.tests, ["tests"]);
        assert!(
            p.notes
                .iter()
                .any(|n| n.contains("web-project has no release"))
        );
        assert!(p.notes.iter().any(|n| n.contains("`ports` is ignored")));
        let api = p.services.iter().find(|s| s.service == "api").expect("api");
        assert_eq!(
            (api.project.as_str(), api.digest.as_str()),
            ("api-project", "sha256:aa")
        );
    }

    #[test]
    fn what_reaches_the_host_is_refused_where_it_is_written() {
        for (compose, line, needle) in [
            (
                "services:\n  tests:\n    image: t\n    privileged: true\n",
                4,
                "privileged",
            ),
            (
                "services:\n  tests:\n    image: t\n    volumes: ['/:/host']\n",
                4,
                "host path",
            ),
            (
                "services:\n  tests:\n    image: t\n    volumes: ['./src:/src']\n",
                4,
                "host path",
            ),
            (
                "services:\n  tests:\n    image: t\n    network_mode: host\n",
                4,
                "network_mode",
            ),
            (
                "services:\n  tests:\n    image: t\n    cap_add: [SYS_ADMIN]\n",
                4,
                "cap_add",
            ),
            ("services:\n  tests:\n    build: .\n", 3, "builds nothing"),
            (
                "services:\n  tests:\n    image: t\n    volumes: ['..:/host']\nvolumes:\n  ..: {}\n",
                1,
                "volume name",
            ),
            (
                "services:\n  tests:\n    image: t\n  --no-start:\n    image: t\n",
                5,
                "service name",
            ),
            (
                "services:\n  tests:\n    image: t\n    tmpfs: ['/run:exec,suid,size=1g']\n",
                4,
                "tmpfs",
            ),
            (
                "services:\n  tests:\n    image: t\n    init: /bin/evil\n",
                4,
                "boolean",
            ),
            (
                "services:\n  tests:\n    image: localhost:5000/secret/app:1\n",
                3,
                "does not follow",
            ),
            (
                "services:\n  tests:\n    image: t\nvolumes:\n  v:\n    driver_opts: {o: bind, device: /}\n",
                6,
                "driver_opts",
            ),
        ] {
            let e = plan_of("stack:\n  tests: [tests]\n", compose).expect_err(compose);
            assert_eq!(
                (e.file.as_str(), e.line),
                ("docker-compose.yml", line),
                "{compose}: {e}"
            );
            assert!(e.to_string().contains(needle), "{compose}: {e}");
        }
    }

    #[test]
    fn stack_file_errors_are_located() {
        for (stack, line, needle) in [
            ("stack:\n  members: {web: x}\n", 2, "stack.tests"),
            ("stack:\n  tests: [t]\n  timeout: 0\n", 3, "positive"),
            (
                "stack:\n  tests: [t]\n  compose: ../x.yml\n",
                3,
                "inside the repository",
            ),
            ("stack:\n  tests: [t]\n  colour: red\n", 3, "colour"),
            ("image: {}\n", 1, "stack"),
        ] {
            let e = StackFile::parse(stack).expect_err(stack);
            assert_eq!(
                (e.file.as_str(), e.line),
                (".gantry.yml", line),
                "{stack}: {e}"
            );
            assert!(e.to_string().contains(needle), "{stack}: {e}");
        }
        let e = plan_of(
            "stack:\n  members: {db: db-project}\n  tests: [tests]\n",
            COMPOSE,
        )
        .expect_err("unknown member");
        assert_eq!(e.line, 2, "{e}");
        let e = plan_of(
            "stack:\n  members: {api: nobody}\n  tests: [tests]\n",
            COMPOSE,
        )
        .expect_err("not followed");
        assert!(e.message.contains("does not let this stack follow"), "{e}");
    }
}
