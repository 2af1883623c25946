//! The `.gantry.yml` of a service repository: how it asks to be built and
//! tested.
//!
//! ```yaml
//! image:
//!   dockerfile: Dockerfile      # path from the repository root (default: Dockerfile)
//!   context: .                  # build context directory (default: .)
//!   target: runtime             # optional multi-stage target
//!   args: { VERSION: "1.2" }    # optional build arguments
//! test:                         # optional; run in order in containers of the built image
//!   - name: unit
//!     run: ./run-tests.sh       # a shell command (sh -c), or a list for exec form
//!     timeout: 600              # seconds (default 1800)
//!     network: true             # the step needs the network (default: none)
//! only: {branches: [main], changes: ["src/**"]}   # optional; see `filter`
//! except: {changes: ["docs/**"]}
//! ```
//!
//! Steps run without any network unless they ask for it, and a project's
//! configuration can forbid that (`limits.allow_network: false`; see
//! [`PipelineFile::check_limits`]).
//!
//! Every problem is a [`LocatedError`] naming the file, line, column and what
//! was expected.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use gantry_config::yaml::{self, LocatedError, Spanned, error_at};
use serde::Deserialize;

use crate::filter::{Filter, Rules};
use crate::{FILE, check_version, inside_repo, seconds};

/// Step names used by the builder itself.
pub const RESERVED_STEPS: [&str; 5] = ["checkout", "config", "build", "services", "cancel"];
/// Most path patterns in `only.changes` or `except.changes`.
pub const MAX_PATTERNS: usize = 100;
/// Most service containers a build may start.
pub const MAX_SERVICES: usize = 5;
/// Default time a service container has to become ready.
pub const DEFAULT_SERVICE_WAIT: Duration = Duration::from_secs(120);
/// Default time limit of one test step.
pub const DEFAULT_STEP_TIMEOUT: Duration = Duration::from_secs(30 * 60);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    version: Option<Spanned<u32>>,
    #[serde(default)]
    image: RawImage,
    #[serde(default)]
    test: Vec<RawStep>,
    #[serde(default)]
    services: Vec<Spanned<RawService>>,
    #[serde(default)]
    only: RawFilter,
    #[serde(default)]
    except: RawFilter,
}

/// One entry of `services:`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    image: Spanned<String>,
    #[serde(default)]
    alias: Option<Spanned<String>>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    command: Option<Spanned<Command>>,
    #[serde(default)]
    health: Option<Spanned<String>>,
    #[serde(default)]
    wait: Option<Spanned<u64>>,
}

/// A container the test steps talk to by its alias, started before them on
/// the build's own network and removed after them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceSpec {
    /// `host[:port]/path[:tag|@digest]`, from a configured registry.
    pub image: String,
    /// Its host name on the build's network.
    pub alias: String,
    pub env: BTreeMap<String, String>,
    /// The container's command, if not the image's.
    pub command: Option<Vec<String>>,
    /// A shell command that exits 0 once the service is ready (else the
    /// image's own health check, else running is ready).
    pub health: Option<String>,
    /// How long it may take to become ready.
    pub wait: Duration,
}

/// The container command of `key`: `sh -c` for a shell command, the list
/// itself for exec form; neither may be empty.
fn argv(c: &Spanned<Command>, key: &str) -> Result<Vec<String>, LocatedError> {
    match &c.value {
        Command::Shell(s) if !s.trim().is_empty() => Ok(vec!["sh".into(), "-c".into(), s.clone()]),
        Command::Exec(v) if !v.is_empty() && !v[0].is_empty() => Ok(v.clone()),
        _ => Err(error_at(
            FILE,
            c,
            format!("`{key}` must be a non-empty command string or list"),
        )),
    }
}

/// A host name: lowercase letters, digits and `-`, starting with a letter.
fn valid_alias(alias: &str) -> bool {
    (1..=63).contains(&alias.len())
        && alias.as_bytes()[0].is_ascii_lowercase()
        && alias
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !alias.ends_with('-')
}

/// The default alias of an image: its last path segment without tag or digest.
fn default_alias(image: &str) -> String {
    let name = image.split('@').next().unwrap_or_default();
    let last = name.rsplit('/').next().unwrap_or_default();
    let last = match last.split_once(':') {
        Some((n, _)) => n,
        None => last,
    };
    last.to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect()
}

fn check_services(raw: Vec<Spanned<RawService>>) -> Result<Vec<ServiceSpec>, LocatedError> {
    if let Some(extra) = raw.get(MAX_SERVICES) {
        return Err(error_at(
            FILE,
            extra,
            format!("at most {MAX_SERVICES} services may run beside the tests"),
        ));
    }
    let mut out: Vec<ServiceSpec> = Vec::new();
    for entry in raw {
        let r = entry.value;
        let image = r.image.value.trim().to_owned();
        if image.is_empty() || image.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(error_at(
                FILE,
                &r.image,
                format!("{:?} is not an image reference", r.image.value),
            ));
        }
        let alias = match &r.alias {
            Some(a) => a.value.clone(),
            None => default_alias(&image),
        };
        let alias_at = r.alias.as_ref().map_or_else(
            || (r.image.defined.line(), r.image.defined.column()),
            |a| (a.defined.line(), a.defined.column()),
        );
        if !valid_alias(&alias) || alias == "localhost" {
            return Err(LocatedError::new(
                FILE,
                alias_at.0,
                alias_at.1,
                format!(
                    "alias {alias:?} is not a host name (lowercase letters, digits and -, starting with a letter)"
                ),
            ));
        }
        if out.iter().any(|s| s.alias == alias) {
            return Err(LocatedError::new(
                FILE,
                alias_at.0,
                alias_at.1,
                format!("two services are called {alias:?}; give one an `alias`"),
            ));
        }
        if let Some(key) = r.env.keys().find(|k| {
            k.is_empty()
                || k.contains('=')
                || k.chars().any(|c| c.is_whitespace() || c.is_control())
        }) {
            return Err(error_at(
                FILE,
                &r.image,
                format!("environment variable name {key:?} is not valid"),
            ));
        }
        let command = r.command.as_ref().map(|c| argv(c, "command")).transpose()?;
        let wait = seconds(r.wait.as_ref(), "wait", DEFAULT_SERVICE_WAIT)?;
        out.push(ServiceSpec {
            image,
            alias,
            env: r.env,
            command,
            health: r.health.map(|h| h.value).filter(|h| !h.trim().is_empty()),
            wait,
        });
    }
    Ok(out)
}

/// `only:` / `except:` (see [`crate::filter`]).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFilter {
    #[serde(default)]
    branches: Vec<String>,
    #[serde(default)]
    tags: Vec<String>,
    #[serde(default)]
    changes: Vec<Spanned<String>>,
}

impl RawFilter {
    fn check(self) -> Result<Filter, LocatedError> {
        let mut changes = Vec::new();
        if let Some(extra) = self.changes.get(MAX_PATTERNS) {
            return Err(error_at(
                FILE,
                extra,
                format!("at most {MAX_PATTERNS} path patterns"),
            ));
        }
        for c in self.changes {
            if c.value.len() > 1024 {
                return Err(error_at(
                    FILE,
                    &c,
                    "a path pattern may be 1024 bytes long at most",
                ));
            }
            if c.value.trim().is_empty() || c.value.split('/').any(|s| s == "..") {
                return Err(error_at(
                    FILE,
                    &c,
                    format!("{:?} is not a path pattern inside the repository", c.value),
                ));
            }
            changes.push(c.value);
        }
        Ok(Filter {
            branches: self.branches,
            tags: self.tags,
            changes,
        })
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawImage {
    #[serde(default)]
    dockerfile: Option<Spanned<String>>,
    #[serde(default)]
    context: Option<Spanned<String>>,
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    args: BTreeMap<String, String>,
}

#[derive(Debug)]
enum Command {
    Shell(String),
    Exec(Vec<String>),
}

impl<'de> Deserialize<'de> for Command {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Command;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a command string or a list of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Command, E> {
                Ok(Command::Shell(v.to_owned()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Command, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(Command::Exec(out))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: Spanned<String>,
    run: Spanned<Command>,
    #[serde(default)]
    timeout: Option<Spanned<u64>>,
    #[serde(default)]
    network: Option<Spanned<bool>>,
}

/// A validated pipeline file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PipelineFile {
    pub image: ImageSpec,
    pub test: Vec<TestStep>,
    /// Containers started before the test steps (`services:`).
    pub services: Vec<ServiceSpec>,
    /// When the pipeline runs (`only:`, `except:`).
    pub rules: Rules,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpec {
    /// Relative to the repository root.
    pub dockerfile: String,
    /// Relative to the repository root.
    pub context: String,
    pub target: Option<String>,
    pub args: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestStep {
    pub name: String,
    /// The container command (`["sh", "-c", run]` for a shell command).
    pub cmd: Vec<String>,
    pub timeout: Duration,
    /// Whether the step runs with a network (on the builder's step network).
    pub network: bool,
    /// Where `network: true` was written (line, column), for errors.
    pub network_at: Option<(u64, u64)>,
}

impl PipelineFile {
    /// Parses and validates the text of `.gantry.yml`.
    pub fn parse(text: &str) -> Result<Self, LocatedError> {
        if text.trim().is_empty() {
            return Err(LocatedError::new(
                FILE,
                1,
                1,
                "the file is empty; expected a mapping with `image` and `test`",
            ));
        }
        let raw: Raw = yaml::from_str(FILE, text)?;
        check_version(raw.version.as_ref())?;
        let mut image = ImageSpec {
            dockerfile: "Dockerfile".into(),
            context: ".".into(),
            target: raw.image.target.filter(|t| !t.is_empty()),
            args: raw.image.args,
        };
        for (field, slot) in [
            (&raw.image.dockerfile, &mut image.dockerfile),
            (&raw.image.context, &mut image.context),
        ] {
            if let Some(v) = field {
                if !inside_repo(&v.value) {
                    return Err(error_at(
                        FILE,
                        v,
                        format!(
                            "{:?} must be a relative path inside the repository",
                            v.value
                        ),
                    ));
                }
                *slot = v.value.clone();
            }
        }
        let mut names = HashSet::new();
        let mut test = Vec::new();
        for step in raw.test {
            let name = step.name.value.trim();
            if name.is_empty() {
                return Err(error_at(
                    FILE,
                    &step.name,
                    "a test step name must not be empty",
                ));
            }
            if RESERVED_STEPS.contains(&name) {
                return Err(error_at(
                    FILE,
                    &step.name,
                    format!("step name {name:?} is reserved; expected another name"),
                ));
            }
            if !names.insert(name.to_owned()) {
                return Err(error_at(
                    FILE,
                    &step.name,
                    format!("duplicate test step name {name:?}"),
                ));
            }
            let cmd = argv(&step.run, "run")?;
            let timeout = seconds(step.timeout.as_ref(), "timeout", DEFAULT_STEP_TIMEOUT)?;
            let network = step.network.as_ref().is_some_and(|n| n.value);
            test.push(TestStep {
                name: name.to_owned(),
                cmd,
                timeout,
                network,
                network_at: step
                    .network
                    .as_ref()
                    .filter(|n| n.value)
                    .map(|n| (n.defined.line(), n.defined.column())),
            });
        }
        let rules = Rules {
            only: raw.only.check()?,
            except: raw.except.check()?,
        };
        let services = check_services(raw.services)?;
        Ok(Self {
            image,
            test,
            services,
            rules,
        })
    }

    /// Checks the file against what the project allows: a step may ask for
    /// the network only where the project's configuration allows it.
    pub fn check_limits(&self, limits: &gantry_config::Limits) -> Result<(), LocatedError> {
        if limits.allow_network {
            return Ok(());
        }
        match self.test.iter().find(|s| s.network) {
            Some(step) => {
                let (line, column) = step.network_at.unwrap_or((0, 0));
                Err(LocatedError::new(
                    FILE,
                    line,
                    column,
                    format!(
                        "test step {:?} asks for the network, which this project's configuration forbids (limits.allow_network: false)",
                        step.name
                    ),
                ))
            }
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_file() {
        let f = PipelineFile::parse(
            "image:\n  dockerfile: docker/Dockerfile\n  target: app\n  args: {A: b}\ntest:\n  - name: unit\n    run: ./t.sh\n  - name: lint\n    run: [lint, --strict]\n    timeout: 5\n",
        )
        .expect("valid");
        assert_eq!(f.image.dockerfile, "docker/Dockerfile");
        assert_eq!(f.image.context, ".");
        assert_eq!(f.image.target.as_deref(), Some("app"));
        assert_eq!(f.test[0].cmd, ["sh", "-c", "./t.sh"]);
        assert_eq!(f.test[1].cmd, ["lint", "--strict"]);
        assert_eq!(f.test[1].timeout, Duration::from_secs(5));
        assert!(!f.test[0].network);
    }

    #[test]
    fn network_is_asked_for_and_can_be_forbidden() {
        let f = PipelineFile::parse(
            "test:\n  - name: offline\n    run: make\n  - name: fetch\n    run: make deps\n    network: true\n",
        )
        .expect("valid");
        assert!(!f.test[0].network && f.test[1].network);
        assert!(f.check_limits(&gantry_config::Limits::default()).is_ok());
        let forbid = gantry_config::Limits {
            allow_network: false,
            ..Default::default()
        };
        let e = f.check_limits(&forbid).expect_err("forbidden");
        assert_eq!((e.line, e.column), (6, 14), "{e}");
        assert!(e.message.contains("\"fetch\""), "{e}");
    }

    #[test]
    fn only_and_except() {
        let f = PipelineFile::parse(
            "image: {}\nonly:\n  branches: [main]\n  changes: [\"src/**\"]\nexcept:\n  tags: [\"v0*\"]\n",
        )
        .expect("valid");
        assert_eq!(f.rules.only.branches, ["main"]);
        assert_eq!(f.rules.only.changes, ["src/**"]);
        assert_eq!(f.rules.except.tags, ["v0*"]);
        let e = err("only:\n  changes: [\"../x/**\"]\n");
        assert_eq!((e.line, e.column), (2, 13), "{e}");
        let e = err("only:\n  branch: [main]\n");
        assert!(e.message.contains("did you mean `branches`?"), "{e}");
    }

    #[test]
    fn services_are_checked() {
        let f = PipelineFile::parse(
            "services:\n  - image: 127.0.0.1:5000/team/postgres:15\n    env: {POSTGRES_PASSWORD: x}\n    health: pg_isready\n  - image: reg.example/cache@sha256:abc\n    alias: cache\n    command: [redis-server, --save, '']\n    wait: 30\n",
        )
        .expect("valid");
        assert_eq!(f.services[0].alias, "postgres");
        assert_eq!(f.services[0].health.as_deref(), Some("pg_isready"));
        assert_eq!(f.services[0].wait, DEFAULT_SERVICE_WAIT);
        assert_eq!(f.services[1].alias, "cache");
        assert_eq!(f.services[1].wait, Duration::from_secs(30));
        let e = err("services:\n  - image: a/db\n  - image: b/db\n");
        assert_eq!(e.line, 3, "{e}");
        assert!(e.message.contains("two services"), "{e}");
        let e = err("services:\n  - image: a/db\n    alias: Not_A_Host\n");
        assert_eq!((e.line, e.column), (3, 12), "{e}");
        let e = err("services:\n  - image: 'a b'\n");
        assert_eq!(e.line, 2, "{e}");
        let e = err("test:\n  - name: services\n    run: x\n");
        assert!(e.message.contains("reserved"), "{e}");
    }

    #[test]
    fn defaults_when_only_image() {
        let f = PipelineFile::parse("image: {}\n").expect("valid");
        assert_eq!(f.image.dockerfile, "Dockerfile");
        assert!(f.test.is_empty());
    }

    fn err(text: &str) -> LocatedError {
        PipelineFile::parse(text).expect_err("must be rejected")
    }

    #[test]
    fn errors_name_line_and_column() {
        let e = err("image:\n  dockerfil: x\n");
        assert_eq!((e.file.as_str(), e.line), (".gantry.yml", 2), "{e}");
        assert!(e.message.contains("dockerfil"), "{e}");

        let e = err("test:\n  - name: build\n    run: x\n");
        assert_eq!((e.line, e.column), (2, 11), "{e}");
        assert!(e.message.contains("reserved"), "{e}");

        let e = err("test:\n  - name: a\n    run: echo one\n  - name: a\n    run: echo two\n");
        assert_eq!(e.line, 4, "{e}");

        let e = err("image:\n  context: ../outside\n");
        assert_eq!(e.line, 2, "{e}");

        let e = err("test:\n  - name: a\n    run: ''\n");
        assert_eq!(e.line, 3, "{e}");

        let e = err("test: [\n");
        assert!(e.line >= 1, "{e}");

        let e = err("");
        assert_eq!((e.line, e.column), (1, 1));
    }
}
