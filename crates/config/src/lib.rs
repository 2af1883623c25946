//! Gantry's configuration.
//!
//! - [`GantryConfig`]: the one declarative file (`GANTRY_CONFIG`, YAML) that
//!   lists projects (clone URL, webhook secret, forge paths, image repository)
//!   and registries (credentials from env or files). It is parsed and fully
//!   validated at start ([`GantryConfig::load`]); every problem names the file,
//!   line and column, and the service exits non-zero before binding anything.
//! - [`Infra`]: infrastructure URLs from the environment (`DATABASE_URL`,
//!   `AMQP_URL`), shared by the services' command lines.
//! - [`yaml`]: YAML parsing with located, user-facing errors, also used for
//!   `.gantry.yml` pipeline files.

pub mod yaml;

use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use yaml::LocatedError;

/// Infrastructure settings every service needs, from flags or the environment.
#[derive(clap::Args, Debug, Clone)]
pub struct Infra {
    /// Postgres URL; each service works in its own schema of this database.
    #[arg(long, env = "DATABASE_URL")]
    pub database_url: String,
    /// RabbitMQ URL, e.g. amqp://user:pass@host:5672/%2f
    #[arg(long, env = "AMQP_URL")]
    pub amqp_url: String,
    /// The Gantry configuration file (projects, registries).
    #[arg(long, env = "GANTRY_CONFIG")]
    pub config: PathBuf,
}

/// A secret value; never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Where a secret comes from in the configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum SecretSource {
    /// The value of an environment variable.
    Env(String),
    /// The content of a file (trailing newline removed), e.g. a Docker secret.
    File(PathBuf),
    /// The value itself (for development only).
    Value(String),
}

impl SecretSource {
    fn resolve(&self) -> Result<Secret, String> {
        match self {
            SecretSource::Env(var) => std::env::var(var)
                .map(Secret)
                .map_err(|_| format!("environment variable {var} is not set")),
            SecretSource::File(path) => std::fs::read_to_string(path)
                .map(|s| Secret(s.trim_end_matches(['\n', '\r']).to_owned()))
                .map_err(|e| format!("cannot read secret file {}: {e}", path.display())),
            SecretSource::Value(v) => Ok(Secret(v.clone())),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    projects: Vec<RawProject>,
    #[serde(default)]
    registries: Vec<RawRegistry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProject {
    name: String,
    clone_url: String,
    #[serde(default)]
    gitlab: Option<String>,
    #[serde(default)]
    github: Option<String>,
    #[serde(default)]
    default_branch: Option<String>,
    webhook_secret: SecretSource,
    image: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    host: String,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<SecretSource>,
}

/// A project Gantry builds: one service, one git repository, one image.
#[derive(Debug, Clone)]
pub struct Project {
    pub name: String,
    pub clone_url: String,
    /// Path of the project on GitLab (`path_with_namespace`).
    pub gitlab: Option<String>,
    /// Full name of the repository on GitHub (`owner/repo`).
    pub github: Option<String>,
    /// Default branch when the forge does not say (manual triggers); `main` if unset.
    pub default_branch: String,
    pub webhook_secret: Secret,
    /// Registry repository, e.g. `registry.example.com:5000/team/service`.
    pub image: String,
}

/// Credentials for one registry host.
#[derive(Debug, Clone)]
pub struct Registry {
    pub host: String,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

/// The validated configuration.
#[derive(Debug, Clone, Default)]
pub struct GantryConfig {
    pub projects: Vec<Project>,
    pub registries: Vec<Registry>,
}

/// Everything wrong with a configuration file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Syntax(#[from] LocatedError),
    #[error("{file}: {}", problems.join("; "))]
    Invalid { file: String, problems: Vec<String> },
}

impl GantryConfig {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// Parses and validates `text`; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = yaml::from_str(file, text)?;
        let mut problems = Vec::new();
        let mut names = HashSet::new();
        let mut projects = Vec::new();
        for (i, p) in raw.projects.into_iter().enumerate() {
            let at = format!("projects[{i}] ({})", p.name);
            if p.name.is_empty()
                || !p
                    .name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            {
                problems.push(format!(
                    "{at}: name must be non-empty letters, digits, '-', '_' or '.'"
                ));
            }
            if !names.insert(p.name.clone()) {
                problems.push(format!("{at}: duplicate project name"));
            }
            if p.clone_url.trim().is_empty() {
                problems.push(format!("{at}: clone_url is empty"));
            }
            if let Err(e) = validate_repository(&p.image) {
                problems.push(format!("{at}: image: {e}"));
            }
            let secret = match p.webhook_secret.resolve() {
                Ok(s) if s.0.is_empty() => {
                    problems.push(format!("{at}: webhook_secret is empty"));
                    s
                }
                Ok(s) => s,
                Err(e) => {
                    problems.push(format!("{at}: webhook_secret: {e}"));
                    Secret(String::new())
                }
            };
            projects.push(Project {
                name: p.name,
                clone_url: p.clone_url,
                gitlab: p.gitlab,
                github: p.github,
                default_branch: p.default_branch.unwrap_or_else(|| "main".to_owned()),
                webhook_secret: secret,
                image: p.image,
            });
        }
        let mut registries = Vec::new();
        for (i, r) in raw.registries.into_iter().enumerate() {
            let at = format!("registries[{i}] ({})", r.host);
            if r.host.is_empty() || r.host.contains('/') {
                problems.push(format!("{at}: host must be a host[:port] without a path"));
            }
            let password = match r.password.as_ref().map(SecretSource::resolve) {
                None => None,
                Some(Ok(s)) => Some(s),
                Some(Err(e)) => {
                    problems.push(format!("{at}: password: {e}"));
                    None
                }
            };
            if r.username.is_some() != password.is_some() {
                problems.push(format!("{at}: username and password go together"));
            }
            registries.push(Registry {
                host: r.host,
                username: r.username,
                password,
            });
        }
        if problems.is_empty() {
            Ok(Self {
                projects,
                registries,
            })
        } else {
            Err(ConfigError::Invalid {
                file: file.to_owned(),
                problems,
            })
        }
    }

    pub fn project(&self, name: &str) -> Option<&Project> {
        self.projects.iter().find(|p| p.name == name)
    }

    /// The project whose GitLab path is `path` (case-insensitive, as GitLab paths are).
    pub fn project_by_gitlab(&self, path: &str) -> Option<&Project> {
        self.projects.iter().find(|p| {
            p.gitlab
                .as_deref()
                .is_some_and(|g| g.eq_ignore_ascii_case(path))
        })
    }

    /// The project whose GitHub full name is `full_name` (case-insensitive).
    pub fn project_by_github(&self, full_name: &str) -> Option<&Project> {
        self.projects.iter().find(|p| {
            p.github
                .as_deref()
                .is_some_and(|g| g.eq_ignore_ascii_case(full_name))
        })
    }

    /// Credentials and transport for the registry that holds `repository`.
    pub fn registry_for(&self, repository: &str) -> Registry {
        let host = registry_host(repository);
        self.registries
            .iter()
            .find(|r| r.host == host)
            .cloned()
            .unwrap_or(Registry {
                host: host.to_owned(),
                username: None,
                password: None,
            })
    }
}

/// The registry host of a repository reference (`host[:port]/path`).
pub fn registry_host(repository: &str) -> &str {
    repository.split('/').next().unwrap_or_default()
}

/// Checks a registry repository reference `host[:port]/path` without tag or digest.
pub fn validate_repository(repo: &str) -> Result<(), String> {
    let Some((host, path)) = repo.split_once('/') else {
        return Err(format!("{repo:?} must be host[:port]/path"));
    };
    if host.is_empty() || !(host.contains('.') || host.contains(':') || host == "localhost") {
        return Err(format!(
            "{repo:?} must start with a registry host (with a dot or a port)"
        ));
    }
    let ok_component = |c: &str| {
        !c.is_empty()
            && c.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
            && c.as_bytes()[0].is_ascii_alphanumeric()
    };
    if !path.split('/').all(ok_component) {
        return Err(format!(
            "{repo:?}: path components must be lowercase letters, digits, '.', '_' or '-'"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_file_parses() {
        let cfg = GantryConfig::parse(
            "gantry.yml",
            "projects:\n  - name: hello\n    clone_url: file:///tmp/hello\n    gitlab: team/hello\n    webhook_secret: {value: s3cret}\n    image: 127.0.0.1:5000/team/hello\nregistries:\n  - host: 127.0.0.1:5000\n",
        )
        .expect("valid");
        assert_eq!(cfg.projects[0].webhook_secret.expose(), "s3cret");
        assert_eq!(
            cfg.project_by_gitlab("Team/Hello").map(|p| p.name.as_str()),
            Some("hello")
        );
        assert_eq!(
            cfg.registry_for("127.0.0.1:5000/team/hello").host,
            "127.0.0.1:5000"
        );
    }

    #[test]
    fn syntax_errors_are_located() {
        let err = GantryConfig::parse("gantry.yml", "projects:\n  - name: a\n    colne_url: x\n")
            .expect_err("unknown field");
        let ConfigError::Syntax(e) = err else {
            panic!("expected a located error, got {err}");
        };
        assert_eq!((e.file.as_str(), e.line), ("gantry.yml", 3), "{e}");
        assert!(e.to_string().contains("colne_url"), "{e}");
    }

    #[test]
    fn semantic_problems_are_all_reported() {
        let err = GantryConfig::parse(
            "g.yml",
            "projects:\n  - name: a\n    clone_url: ''\n    webhook_secret: {env: GANTRY_TEST_SURELY_UNSET}\n    image: NotARepo\n",
        )
        .expect_err("invalid");
        let msg = err.to_string();
        for needle in ["clone_url is empty", "GANTRY_TEST_SURELY_UNSET", "image"] {
            assert!(msg.contains(needle), "{msg} lacks {needle}");
        }
    }
}
