//! The `stack:` section of a stack repository's `.gantry.yml`: which compose
//! file, which compose services follow which projects, which services are the
//! tests, and how long a run may take.
//!
//! ```yaml
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
//! The compose file itself is checked by the builder, which writes the run's
//! own compose file from it.

use std::collections::BTreeMap;
use std::time::Duration;

use gantry_config::yaml::{self, LocatedError, Spanned, error_at};
use serde::Deserialize;
use serde_json::Value;

use crate::{FILE, check_version, inside_repo, seconds};

/// Default time a whole run may take.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);
/// Default compose file of a stack repository.
pub const DEFAULT_COMPOSE: &str = "docker-compose.yml";
/// Default rancher-compose file of a stack repository (read when present).
pub const DEFAULT_RANCHER_COMPOSE: &str = "rancher-compose.yml";
/// Most services a stack may have.
pub const MAX_SERVICES: usize = 30;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    version: Option<Spanned<u32>>,
    stack: Spanned<RawStack>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStack {
    #[serde(default)]
    compose: Option<Spanned<String>>,
    #[serde(default)]
    rancher_compose: Option<Spanned<String>>,
    #[serde(default)]
    members: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    tests: Vec<Spanned<String>>,
    #[serde(default)]
    timeout: Option<Spanned<u64>>,
}

/// The `stack:` section, checked.
#[derive(Debug, Clone)]
pub struct StackFile {
    /// Relative to the repository root.
    pub compose: String,
    /// The rancher-compose file (relative to the repository root), for
    /// Rancher environments: scale, health checks, upgrade strategy.
    pub rancher_compose: String,
    /// Whether `.gantry.yml` names it (then it must exist).
    pub rancher_compose_named: bool,
    /// Compose service → project, with where each was written (line, column).
    pub members: BTreeMap<String, (String, (u64, u64))>,
    /// The integration-test services, in order, with where each was written.
    pub tests: Vec<(String, (u64, u64))>,
    pub timeout: Duration,
}

fn at<T>(s: &Spanned<T>) -> (u64, u64) {
    (s.defined.line(), s.defined.column())
}

impl StackFile {
    /// Parses the `.gantry.yml` of a stack repository.
    pub fn parse(text: &str) -> Result<Self, LocatedError> {
        if text.trim().is_empty() {
            return Err(LocatedError::new(
                FILE,
                1,
                1,
                "the file is empty; a stack repository needs a `stack:` section",
            ));
        }
        let raw: Raw = yaml::from_str(FILE, text)?;
        check_version(raw.version.as_ref())?;
        let stack_at = LocatedError::new(
            FILE,
            raw.stack.defined.line(),
            raw.stack.defined.column(),
            "`stack.tests` is missing: name the compose service(s) whose exit code decides the run",
        );
        let stack = raw.stack.value;
        let path = |named: Option<Spanned<String>>, default: &str| match named {
            Some(c) if !inside_repo(&c.value) => Err(error_at(
                FILE,
                &c,
                format!(
                    "{:?} must be a relative path inside the repository",
                    c.value
                ),
            )),
            Some(c) => Ok(c.value),
            None => Ok(default.to_owned()),
        };
        let rancher_compose_named = stack.rancher_compose.is_some();
        let compose = path(stack.compose, DEFAULT_COMPOSE)?;
        let rancher_compose = path(stack.rancher_compose, DEFAULT_RANCHER_COMPOSE)?;
        if stack.tests.is_empty() {
            return Err(stack_at);
        }
        let mut tests = Vec::new();
        for t in &stack.tests {
            if tests.iter().any(|(n, _)| n == &t.value) {
                return Err(error_at(
                    FILE,
                    t,
                    format!("test service {:?} is listed twice", t.value),
                ));
            }
            if stack.members.contains_key(&t.value) {
                return Err(error_at(
                    FILE,
                    t,
                    format!(
                        "{:?} is a member: a test service runs a test image, not a released one",
                        t.value
                    ),
                ));
            }
            tests.push((t.value.clone(), at(t)));
        }
        let timeout = seconds(stack.timeout.as_ref(), "timeout", DEFAULT_TIMEOUT)?;
        Ok(Self {
            compose,
            rancher_compose,
            rancher_compose_named,
            members: stack
                .members
                .iter()
                .map(|(service, project)| (service.clone(), (project.value.clone(), at(project))))
                .collect(),
            tests,
            timeout,
        })
    }
}

/// Every string of `v` (not the keys) through `f`.
pub fn map_strings(v: &Value, f: &dyn Fn(&str) -> String) -> Value {
    match v {
        Value::String(s) => Value::String(f(s)),
        Value::Array(items) => items.iter().map(|i| map_strings(i, f)).collect(),
        Value::Object(map) => map
            .iter()
            .map(|(k, v)| (k.clone(), map_strings(v, f)))
            .collect(),
        other => other.clone(),
    }
}

/// A compose file as docker-compose (or Rancher) must be given it: every
/// `$` escaped, so that it runs the literal values.
pub fn escaped(compose: &Value) -> Value {
    map_strings(compose, &|s| s.replace('$', "$$"))
}
