//! Gantry's configuration.
//!
//! - [`GantryConfig`]: the one declarative file (`GANTRY_CONFIG`, YAML) that
//!   lists projects (clone URL, webhook secret, forge paths, image repository)
//!   and registries (credentials from env or files). It is parsed and fully
//!   validated at start ([`GantryConfig::load`]); every problem names the file,
//!   line and column, and the service exits non-zero before binding anything.
//! - [`Infra`]: infrastructure URLs from the environment (`DATABASE_URL`,
//!   `AMQP_URL`) and the optional TLS certificate of every listener, shared
//!   by the services' command lines.
//! - Secrets are resolved only for the kinds a service uses
//!   ([`SecretKind`], [`GantryConfig::load_for`]): the builder, which runs
//!   untrusted code, never reads a forge token, a chat URL or a webhook secret.
//! - [`ApiToken`]s: the bearer tokens of the gRPC API and the pages, kept as
//!   SHA-256 hashes with their [`Scope`]s.
//! - [`yaml`]: YAML parsing with located, user-facing errors, also used for
//!   `.gantry.yml` pipeline files.

pub mod git;
pub mod tags;
pub mod tokens;
pub mod yaml;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use git::GitCredentials;
pub use tokens::{ApiToken, Scope, token_hash};
pub use yaml::LocatedError;
use yaml::Spanned;

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
    #[command(flatten)]
    pub tls: Tls,
}

/// TLS of a service's HTTP and gRPC listeners (both or neither of the files).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct Tls {
    /// PEM certificate chain; with it, HTTP and gRPC are served over TLS.
    #[arg(long = "tls-cert", env = "GANTRY_TLS_CERT", requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key of the certificate.
    #[arg(long = "tls-key", env = "GANTRY_TLS_KEY", requires = "cert")]
    pub key: Option<PathBuf>,
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

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
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

/// The kinds of secrets in the configuration. A service resolves only the
/// kinds it uses ([`GantryConfig::load_for`]); the others stay unread, so a
/// service cannot leak what it never held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SecretKind {
    /// Projects' webhook secrets (webhook-ingest).
    Webhook,
    /// Credentials in or beside projects' clone URLs (webhook-ingest, builder).
    Clone,
    /// Registry passwords (builder, registry-publisher, deployer).
    Registry,
    /// Forge API tokens (notifier).
    Forge,
    /// Chat webhook URLs (notifier).
    Chat,
    /// Projects' secrets for their test steps (builder).
    Step,
    /// Credentials of deploy targets: Rancher API keys (deployer).
    Target,
    /// The key that seals secrets stored in the database: projects' (builder)
    /// and environments' configuration (deployer).
    Seal,
}

impl SecretKind {
    pub const ALL: [SecretKind; 8] = [
        SecretKind::Webhook,
        SecretKind::Clone,
        SecretKind::Registry,
        SecretKind::Forge,
        SecretKind::Chat,
        SecretKind::Step,
        SecretKind::Target,
        SecretKind::Seal,
    ];
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
    projects: Vec<Spanned<RawProject>>,
    #[serde(default)]
    registries: Vec<Spanned<RawRegistry>>,
    #[serde(default)]
    environments: Vec<Spanned<RawEnvironment>>,
    #[serde(default)]
    forges: RawForges,
    #[serde(default)]
    chat: Vec<Spanned<RawChat>>,
    #[serde(default)]
    public_url: Option<String>,
    #[serde(default)]
    tokens: Vec<Spanned<tokens::RawToken>>,
    #[serde(default)]
    pages: RawPages,
    /// Seals the secrets stored with `gantry secrets set` (builder).
    #[serde(default)]
    secrets_key: Option<Spanned<SecretSource>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPages {
    /// Whether the notifier's pages answer without a token.
    #[serde(default)]
    public: bool,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForges {
    #[serde(default)]
    gitlab: Option<Spanned<RawForge>>,
    #[serde(default)]
    github: Option<Spanned<RawForge>>,
    #[serde(default)]
    gitea: Option<Spanned<RawForge>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawForge {
    url: String,
    token: SecretSource,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawChat {
    name: String,
    kind: ChatKind,
    url: SecretSource,
    #[serde(default)]
    projects: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEnvironment {
    name: String,
    project: String,
    #[serde(default = "default_target")]
    target: String,
    #[serde(default)]
    rules: Vec<Rule>,
    #[serde(default)]
    port: Option<u16>,
    #[serde(default)]
    endpoint: Option<String>,
    #[serde(default)]
    network: Option<String>,
    #[serde(default)]
    env: std::collections::BTreeMap<String, String>,
    #[serde(default)]
    health: RawHealth,
    /// Of a stack's environment: the compose service behind the endpoint.
    #[serde(default)]
    service: Option<String>,
    /// Of a `rancher` environment: where its service is.
    #[serde(default)]
    rancher: Option<RawRancher>,
    /// Of a `kubernetes` environment: its Deployment and credentials.
    #[serde(default)]
    kubernetes: Option<RawKubernetes>,
    /// `required`, or `{by: [token names]}`.
    #[serde(default)]
    approval: Option<RawApproval>,
    /// Another environment whose successful deployments this one receives.
    #[serde(default)]
    promote_from: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum RawApproval {
    Word(String),
    By(RawApprovers),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApprovers {
    by: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRancher {
    url: String,
    project: String,
    stack: String,
    #[serde(default)]
    service: Option<String>,
    access_key: String,
    secret_key: SecretSource,
    #[serde(default)]
    batch_size: Option<u32>,
    #[serde(default)]
    interval_millis: Option<u64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKubernetes {
    #[serde(default)]
    namespace: Option<String>,
    deployment: String,
    #[serde(default)]
    container: Option<String>,
    #[serde(default)]
    kubeconfig: Option<String>,
    #[serde(default)]
    context: Option<String>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    token: Option<SecretSource>,
    #[serde(default)]
    ca_file: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    #[serde(default)]
    http: Option<String>,
    #[serde(default)]
    timeout_secs: Option<u64>,
}

fn default_target() -> String {
    "docker".to_owned()
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
    gitea: Option<String>,
    #[serde(default)]
    default_branch: Option<String>,
    webhook_secret: SecretSource,
    #[serde(default)]
    kind: ProjectKind,
    /// A stack's: the projects its `.gantry.yml` may name as members.
    #[serde(default)]
    follows: Vec<String>,
    /// Required for services; a stack has none.
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    clone_credentials: Option<RawCloneCredentials>,
    #[serde(default)]
    limits: RawLimits,
    #[serde(default)]
    cancel_superseded: CancelSuperseded,
    #[serde(default)]
    secrets: Vec<RawStepSecret>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStepSecret {
    name: String,
    value: SecretSource,
    #[serde(default)]
    protected: bool,
}

/// The shortest secret value: shorter ones cannot be masked in logs
/// without masking ordinary text.
pub const MIN_SECRET_LEN: usize = 8;

/// Why `name` cannot name a secret (an environment variable of a test
/// step), if it cannot.
pub fn secret_name_refusal(name: &str) -> Option<String> {
    let valid = name.len() <= 128
        && name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        Some(format!(
            "secret name {name:?} is not an environment variable name"
        ))
    } else if name.starts_with("GANTRY_") {
        Some(format!("secret name {name:?}: GANTRY_ names are Gantry's"))
    } else {
        None
    }
}

/// A secret a project's test steps get as an environment variable.
#[derive(Debug, Clone)]
pub struct StepSecret {
    /// The variable's name.
    pub name: String,
    /// Only in services that resolve [`SecretKind::Step`] (the builder).
    pub value: Option<Secret>,
    /// Only pipelines of the default branch and of tags get it.
    pub protected: bool,
}

impl StepSecret {
    /// Whether a pipeline of `branch` or `tag` (of a repository whose
    /// default branch is `default_branch`) gets it.
    pub fn given_to(&self, branch: &str, tag: &str, default_branch: &str) -> bool {
        !self.protected || !tag.is_empty() || (!branch.is_empty() && branch == default_branch)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCloneCredentials {
    username: String,
    password: SecretSource,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLimits {
    #[serde(default)]
    memory_mb: Option<u64>,
    #[serde(default)]
    pids: Option<i64>,
    #[serde(default)]
    cpus: Option<f64>,
    #[serde(default)]
    allow_network: Option<bool>,
    #[serde(default)]
    build_timeout_secs: Option<u64>,
    #[serde(default)]
    log_kib: Option<u64>,
}

/// What a project's builds may use. Every test step runs under these limits;
/// the image build gets the timeout and the memory limit.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Memory of one test step (and of each image build container), in MiB; no swap beyond it.
    pub memory_mb: u64,
    /// Processes and threads of one test step (a fork bomb stops there).
    pub pids: i64,
    /// CPUs one test step may use (fractions allowed).
    pub cpus: f64,
    /// Whether a test step may ask for `network: true`; steps have no network otherwise.
    pub allow_network: bool,
    /// How long the image build may take.
    pub build_timeout: std::time::Duration,
    /// Bytes of build log kept per build; the rest is cut (the exit code still decides).
    pub log_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            memory_mb: 2048,
            pids: 512,
            cpus: 2.0,
            allow_network: true,
            build_timeout: std::time::Duration::from_secs(30 * 60),
            log_bytes: 4 * 1024 * 1024,
        }
    }
}

impl RawLimits {
    fn validate(self, problems: &mut Vec<String>) -> Limits {
        let d = Limits::default();
        let limits = Limits {
            memory_mb: self.memory_mb.unwrap_or(d.memory_mb),
            pids: self.pids.unwrap_or(d.pids),
            cpus: self.cpus.unwrap_or(d.cpus),
            allow_network: self.allow_network.unwrap_or(d.allow_network),
            build_timeout: self
                .build_timeout_secs
                .map_or(d.build_timeout, std::time::Duration::from_secs),
            log_bytes: self
                .log_kib
                .map_or(d.log_bytes, |k| (k as usize).saturating_mul(1024)),
        };
        if limits.memory_mb < 16 {
            problems.push("limits.memory_mb must be at least 16".to_owned());
        }
        if limits.pids < 8 {
            problems.push("limits.pids must be at least 8".to_owned());
        }
        if !(limits.cpus > 0.0 && limits.cpus <= 1024.0) {
            problems.push("limits.cpus must be above 0".to_owned());
        }
        if limits.build_timeout.is_zero() {
            problems.push("limits.build_timeout_secs must be positive".to_owned());
        }
        if limits.log_bytes == 0 {
            problems.push("limits.log_kib must be positive".to_owned());
        }
        limits
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRegistry {
    host: String,
    #[serde(default)]
    api: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<SecretSource>,
}

/// What a project's repository is.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProjectKind {
    /// One service: built, tested and published as one image.
    #[default]
    Service,
    /// A meta-project: the team's compose file and the `stack:` section of
    /// its `.gantry.yml`; integration-tested whenever a member releases.
    Stack,
}

/// Which pushes cancel the unfinished build of an older push to the same
/// branch ("superseded by <sha>"). Tags are never superseded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelSuperseded {
    /// Pushes to any branch but the default one (whose every commit may be
    /// released and deployed).
    #[default]
    Branches,
    /// Pushes to any branch, the default one included.
    All,
    /// Never: every push is built to its end.
    None,
}

impl CancelSuperseded {
    /// Whether a push to `branch` (of a repository whose default branch is
    /// `default_branch`) cancels older builds of that branch.
    pub fn applies_to(self, branch: &str, default_branch: &str) -> bool {
        !branch.is_empty()
            && match self {
                CancelSuperseded::Branches => branch != default_branch,
                CancelSuperseded::All => true,
                CancelSuperseded::None => false,
            }
    }
}

/// A project Gantry builds: one service, one git repository, one image —
/// or a stack ([`ProjectKind::Stack`]), the meta-project of several.
#[derive(Debug, Clone)]
pub struct Project {
    pub name: String,
    pub kind: ProjectKind,
    /// For a stack: the service projects it may follow (name as members).
    /// The stack repository cannot widen this: it would read their images.
    pub follows: Vec<String>,
    /// Where git fetches from, without credentials (safe to show and to put in events).
    pub clone_url: String,
    /// Credentials for the clone URL, from `clone_credentials` or the URL's
    /// user info; the password only in services that resolve [`SecretKind::Clone`].
    pub clone_credentials: Option<GitCredentials>,
    /// Path of the project on GitLab (`path_with_namespace`).
    pub gitlab: Option<String>,
    /// Full name of the repository on GitHub (`owner/repo`).
    pub github: Option<String>,
    /// Full name of the repository on Gitea (`owner/repo`).
    pub gitea: Option<String>,
    /// Default branch when the forge does not say (manual triggers); `main` if unset.
    pub default_branch: String,
    /// Only in services that resolve [`SecretKind::Webhook`].
    pub webhook_secret: Option<Secret>,
    /// Registry repository, e.g. `registry.example.com:5000/team/service`
    /// (empty for a stack).
    pub image: String,
    /// Build limits of a service; for a stack, the limits of each of its
    /// containers in an integration run (`build_timeout_secs`: of the run).
    pub limits: Limits,
    /// Which newer pushes cancel an unfinished build.
    pub cancel_superseded: CancelSuperseded,
    /// Secrets of its test steps (environment variables, masked in logs).
    pub secrets: Vec<StepSecret>,
}

impl Project {
    pub fn is_stack(&self) -> bool {
        self.kind == ProjectKind::Stack
    }

    /// Whether the project is the GitLab project at `path` (case-insensitive,
    /// as GitLab paths are).
    pub fn is_gitlab(&self, path: &str) -> bool {
        self.gitlab
            .as_deref()
            .is_some_and(|g| g.eq_ignore_ascii_case(path))
    }

    /// Whether the project is the GitHub repository `full_name` (case-insensitive).
    pub fn is_github(&self, full_name: &str) -> bool {
        self.github
            .as_deref()
            .is_some_and(|g| g.eq_ignore_ascii_case(full_name))
    }

    /// Whether the project is the Gitea repository `full_name` (case-insensitive).
    pub fn is_gitea(&self, full_name: &str) -> bool {
        self.gitea
            .as_deref()
            .is_some_and(|g| g.eq_ignore_ascii_case(full_name))
    }
}

/// Credentials for one registry host.
#[derive(Debug, Clone)]
pub struct Registry {
    /// `host[:port]` as image references name it (and the Docker engine reaches it).
    pub host: String,
    /// Base URL of the registry's HTTP API as Gantry's services reach it, when
    /// that differs from the host (e.g. `http://registry:5000` inside
    /// docker-compose); by default plain HTTP for loopback hosts, else HTTPS.
    pub api: Option<String>,
    pub username: Option<String>,
    pub password: Option<Secret>,
}

/// When an environment takes a published image automatically.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum Rule {
    /// A branch name or glob (`*` matches any run of characters), e.g. `main`, `release/*`.
    Branch(String),
    /// A git tag name or glob, e.g. `v*`.
    Tag(String),
    /// `merge_request: true`: images of merge requests' pipelines (which no
    /// branch or tag rule matches: they deploy nowhere else). A merge
    /// request from a fork is never deployed automatically: its code is
    /// anyone's.
    #[serde(rename = "merge_request")]
    MergeRequest(bool),
}

/// What an image was built from, as the rules of an environment see it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Origin<'a> {
    /// The branch of a push (empty otherwise).
    pub branch: &'a str,
    /// The git tag of a push (empty otherwise).
    pub tag: &'a str,
    /// Whether it is the pipeline of a merge request from the project
    /// itself (not from a fork: those match no rule).
    pub merge_request: bool,
}

impl Rule {
    /// Whether an image built from `origin` matches.
    pub fn matches(&self, origin: Origin<'_>) -> bool {
        match self {
            Rule::Branch(p) => !origin.branch.is_empty() && glob(p, origin.branch),
            Rule::Tag(p) => !origin.tag.is_empty() && glob(p, origin.tag),
            Rule::MergeRequest(wanted) => *wanted && origin.merge_request,
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Branch(p) => write!(f, "branch: {p}"),
            Rule::Tag(p) => write!(f, "tag: {p}"),
            Rule::MergeRequest(b) => write!(f, "merge_request: {b}"),
        }
    }
}

/// `*`-only glob matching (no other metacharacters).
pub fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or_default();
    let Some(mut rest) = text.strip_prefix(first) else {
        return false;
    };
    let parts: Vec<&str> = parts.collect();
    let Some((last, middle)) = parts.split_last() else {
        return rest.is_empty();
    };
    for part in middle {
        match rest.find(part) {
            Some(i) => rest = &rest[i + part.len()..],
            None => return false,
        }
    }
    rest.len() >= last.len() && rest.ends_with(last)
}

/// How a new version proves it is healthy before it takes over.
#[derive(Debug, Clone)]
pub struct HealthCheck {
    /// HTTP path probed on the container's `port`; a 2xx or 3xx answer is
    /// healthy. Without it the image's own `HEALTHCHECK` decides, and an
    /// image without one must keep running for a few seconds.
    pub http: Option<String>,
    /// How long the new version has to become healthy.
    pub timeout: std::time::Duration,
}

/// A service on Rancher 1.6 (Cattle) that an environment upgrades in place.
#[derive(Debug, Clone)]
pub struct Rancher {
    /// Base URL of the Rancher server (the API is under `/v2-beta`).
    pub url: String,
    /// The Rancher environment's (API: project's) id, e.g. `1a5`.
    pub project: String,
    /// The stack and the service in it, by name; a stack's environment
    /// names the Rancher stack only (its services are the release's).
    pub stack: String,
    pub service: Option<String>,
    /// The API key: access key (its name) and secret key; the secret only
    /// in services that resolve [`SecretKind::Target`] (the deployer).
    pub access_key: String,
    pub secret_key: Option<Secret>,
    /// Containers replaced at once, and the pause between two batches.
    pub batch_size: u32,
    pub interval_millis: u64,
}

/// A Deployment on Kubernetes whose container an environment sets.
#[derive(Debug, Clone)]
pub struct Kubernetes {
    /// `None`: the kubeconfig context's namespace, the pod's in a cluster,
    /// else `default`.
    pub namespace: Option<String>,
    pub deployment: String,
    /// The container (by name) that runs the project's image; `None`: the
    /// Deployment's only container.
    pub container: Option<String>,
    pub credentials: KubeCredentials,
}

/// How the deployer reaches a Kubernetes API server.
#[derive(Debug, Clone)]
pub enum KubeCredentials {
    /// The service account of the pod the deployer runs in.
    InCluster,
    /// A kubeconfig file, and a context of it (its current one if `None`).
    Kubeconfig {
        path: String,
        context: Option<String>,
    },
    /// An API server URL (a cluster's, or Rancher 2's proxy
    /// `https://rancher.example.com/k8s/clusters/<id>`) and a bearer token
    /// (only in services that resolve [`SecretKind::Target`]), with the CA
    /// bundle that signed the server's certificate when it is not a public one.
    Token {
        url: String,
        token: Option<Secret>,
        ca_file: Option<String>,
    },
}

/// Who must approve an environment's deployments before they run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Approval {
    /// Names of the API tokens that may approve (or reject); empty: any
    /// token with the `deploy` scope.
    pub by: Vec<String>,
}

impl Approval {
    /// Whether the token named `token` may approve.
    pub fn allows(&self, token: &str) -> bool {
        self.by.is_empty() || self.by.iter().any(|b| b == token)
    }
}

/// Where the deployer rolls out a project's images.
#[derive(Debug, Clone)]
pub struct Environment {
    pub name: String,
    pub project: String,
    /// `docker` (a local engine, or a remote one through `DOCKER_HOST`),
    /// `rancher` (a Rancher 1.6 service, see [`Environment::rancher`]) or
    /// `kubernetes` (a Deployment, see [`Environment::kubernetes`]).
    pub target: String,
    /// Of a `rancher` environment: the service it upgrades.
    pub rancher: Option<Rancher>,
    /// Of a `kubernetes` environment: the Deployment it sets.
    pub kubernetes: Option<Kubernetes>,
    /// Deployments wait for a person's approval (all but rollbacks).
    pub approval: Option<Approval>,
    /// The environment whose successful deployments this one receives,
    /// digest for digest (instead of rules).
    pub promote_from: Option<String>,
    /// Published images matching any rule are deployed automatically.
    pub rules: Vec<Rule>,
    /// The port the service listens on inside its container.
    pub port: Option<u16>,
    /// A stable `host:port` the deployer serves and forwards to whichever
    /// version is live, so that a replacement has no gap in answers.
    pub endpoint: Option<String>,
    /// Docker network of the containers (`bridge` if unset; a stack's
    /// environment gets a network of its own, `gantry-env-<name>`, when unset).
    pub network: String,
    pub env: std::collections::BTreeMap<String, String>,
    pub health: HealthCheck,
    /// Of a stack's environment (its `project` is the stack): the compose
    /// service the endpoint, `port` and HTTP health check are about.
    pub service: Option<String>,
}

impl Environment {
    /// Whether an image built from `origin` is deployed here automatically.
    pub fn matches(&self, origin: Origin<'_>) -> bool {
        self.rules.iter().any(|r| r.matches(origin))
    }
}

/// A forge's API, for commit statuses and merge request comments.
#[derive(Debug, Clone)]
pub struct Forge {
    /// Base URL: `https://gitlab.example.com` (the API is under `/api/v4`),
    /// `https://api.github.com`, or `https://gitea.example.com` (the API is
    /// under `/api/v1`).
    pub url: String,
    /// Only in services that resolve [`SecretKind::Forge`].
    pub token: Option<Secret>,
}

/// What kind of chat webhook a channel is.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ChatKind {
    /// A Slack-compatible incoming webhook (Slack, Mattermost, Rocket.Chat).
    Slack,
    /// A generic JSON webhook: the message as structured fields.
    Webhook,
}

/// A chat channel that hears about state changes.
#[derive(Debug, Clone)]
pub struct Chat {
    pub name: String,
    pub kind: ChatKind,
    /// The webhook URL (it holds the channel's credential); only in services
    /// that resolve [`SecretKind::Chat`].
    pub url: Option<Secret>,
    /// Only these projects (all when empty).
    pub projects: Vec<String>,
}

impl Chat {
    pub fn wants(&self, project: &str) -> bool {
        self.projects.is_empty() || self.projects.iter().any(|p| p == project)
    }
}

/// The validated configuration.
#[derive(Debug, Clone, Default)]
pub struct GantryConfig {
    pub projects: Vec<Project>,
    pub registries: Vec<Registry>,
    pub environments: Vec<Environment>,
    pub gitlab: Option<Forge>,
    pub github: Option<Forge>,
    pub gitea: Option<Forge>,
    pub chat: Vec<Chat>,
    /// Base of the links Gantry sends out (the notifier's HTTP address as
    /// users reach it), e.g. `https://gantry.example.com`.
    pub public_url: Option<String>,
    /// Bearer tokens of the gRPC API and the notifier's pages.
    pub tokens: Vec<ApiToken>,
    /// Whether the notifier's pages answer without a `read` token.
    pub public_pages: bool,
    /// The key that seals the secrets stored in the database (projects'
    /// with `gantry secrets set`, environments' configuration with `gantry
    /// config set --secret`); only in services that resolve
    /// [`SecretKind::Seal`] (the builder and the deployer).
    pub secrets_key: Option<gantry_seal::SealKey>,
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
    /// Problems found after parsing, each `file:line:column: entry: problem`.
    #[error("{}", problems.join("; "))]
    Invalid { file: String, problems: Vec<String> },
}

/// Validation of a parsed file: the problems found, each located.
struct Check<'a> {
    file: &'a str,
    kinds: &'a [SecretKind],
    problems: Vec<String>,
}

/// What is wrong with the URL of an API that gets credentials (a Rancher
/// API key, a Kubernetes token): it must be `https://`, or `http://` to
/// this machine only (loopback), where nothing on the way can read them.
fn credentials_url_problem(url: &str) -> Option<String> {
    if url.starts_with("https://") {
        return None;
    }
    let Some(rest) = url.strip_prefix("http://") else {
        return Some("must be https://".into());
    };
    let authority = rest.split('/').next().unwrap_or_default();
    let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or_default(),
        None => host.split(':').next().unwrap_or_default(),
    };
    let loopback = host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    (!loopback).then(|| {
        format!(
            "is http:// to {host}: the credentials would cross the network in clear; use https://"
        )
    })
}

/// Where an entry of the file is, and what it is (`projects[0] (hello)`).
#[derive(Clone, Copy)]
struct At<'a> {
    line: u64,
    column: u64,
    what: &'a str,
}

impl<'a> At<'a> {
    fn of<T>(spanned: &Spanned<T>, what: &'a str) -> Self {
        Self {
            line: spanned.defined.line(),
            column: spanned.defined.column(),
            what,
        }
    }
}

/// Letters, digits, `-`, `_` or `.`, and not empty: project and environment names.
fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

impl Check<'_> {
    fn uses(&self, kind: SecretKind) -> bool {
        self.kinds.contains(&kind)
    }

    /// Records `problem` of the entry at `at`: `file:line:column: what: problem`.
    fn located(&mut self, at: At<'_>, problem: String) {
        self.problems.push(format!(
            "{}:{}:{}: {}: {problem}",
            self.file, at.line, at.column, at.what
        ));
    }

    /// Resolves `source` when the service uses `kind`; a problem when it cannot be.
    fn secret(
        &mut self,
        kind: SecretKind,
        source: &SecretSource,
        at: At<'_>,
        field: &str,
    ) -> Option<Secret> {
        if !self.uses(kind) {
            return None;
        }
        match source.resolve() {
            Ok(s) => Some(s),
            Err(e) => {
                self.located(at, format!("{field}: {e}"));
                None
            }
        }
    }

    fn projects(&mut self, raw: Vec<Spanned<RawProject>>) -> Vec<Project> {
        let services: HashSet<String> = raw
            .iter()
            .filter(|sp| sp.value.kind == ProjectKind::Service)
            .map(|sp| sp.value.name.clone())
            .collect();
        let mut names = HashSet::new();
        let mut projects = Vec::new();
        for (i, sp) in raw.into_iter().enumerate() {
            let what = format!("projects[{i}] ({})", sp.value.name);
            let at = At::of(&sp, &what);
            let p = sp.value;
            if !valid_name(&p.name) {
                self.located(
                    at,
                    "name must be non-empty letters, digits, '-', '_' or '.'".into(),
                );
            }
            if !names.insert(p.name.clone()) {
                self.located(at, "duplicate project name".into());
            }
            if p.clone_url.trim().is_empty() {
                self.located(at, "clone_url is empty".into());
            }
            let image = match (p.kind, p.image) {
                (ProjectKind::Service, Some(image)) => {
                    if let Err(e) = validate_repository(&image) {
                        self.located(at, format!("image: {e}"));
                    }
                    image
                }
                (ProjectKind::Service, None) => {
                    self.located(
                        at,
                        "image is missing (the registry repository of the service)".into(),
                    );
                    String::new()
                }
                (ProjectKind::Stack, Some(_)) => {
                    self.located(
                        at,
                        "a stack has no image: its members' images come from their releases".into(),
                    );
                    String::new()
                }
                (ProjectKind::Stack, None) => String::new(),
            };
            let secret = self.secret(SecretKind::Webhook, &p.webhook_secret, at, "webhook_secret");
            if secret.as_ref().is_some_and(|s| s.0.is_empty()) {
                self.located(at, "webhook_secret is empty".into());
            }
            let (clone_url, in_url) = git::split_credentials(&p.clone_url);
            let clone_credentials = match (in_url, p.clone_credentials) {
                (Some(_), Some(_)) => {
                    self.located(
                        at,
                        "give the clone credentials in clone_url or in clone_credentials, not both"
                            .into(),
                    );
                    None
                }
                (Some((username, password)), None) => Some(GitCredentials {
                    username,
                    password: password
                        .filter(|_| self.uses(SecretKind::Clone))
                        .map(Secret::new),
                }),
                (None, Some(c)) => Some(GitCredentials {
                    username: c.username,
                    password: self.secret(
                        SecretKind::Clone,
                        &c.password,
                        at,
                        "clone_credentials.password",
                    ),
                }),
                (None, None) => None,
            };
            let mut problems = Vec::new();
            let limits = p.limits.validate(&mut problems);
            for problem in problems {
                self.located(at, problem);
            }
            if p.kind == ProjectKind::Service && !p.follows.is_empty() {
                self.located(at, "only a stack follows other projects".into());
            }
            for followed in p.follows.iter().filter(|f| !services.contains(*f)) {
                self.located(
                    at,
                    format!("follows {followed:?}, which is not a configured service project"),
                );
            }
            let mut secrets: Vec<StepSecret> = Vec::new();
            for raw in p.secrets {
                if let Some(why) = secret_name_refusal(&raw.name) {
                    self.located(at, why);
                    continue;
                }
                if secrets.iter().any(|s| s.name == raw.name) {
                    self.located(at, format!("secret {:?} is given twice", raw.name));
                    continue;
                }
                let field = format!("secrets.{}.value", raw.name);
                let value = self.secret(SecretKind::Step, &raw.value, at, &field);
                if value
                    .as_ref()
                    .is_some_and(|v| v.expose().len() < MIN_SECRET_LEN)
                {
                    self.located(
                        at,
                        format!(
                            "secret {:?} is shorter than {MIN_SECRET_LEN} characters: it could not be masked in logs",
                            raw.name
                        ),
                    );
                }
                secrets.push(StepSecret {
                    name: raw.name,
                    value,
                    protected: raw.protected,
                });
            }
            projects.push(Project {
                name: p.name,
                kind: p.kind,
                follows: p.follows,
                clone_url,
                clone_credentials,
                gitlab: p.gitlab,
                github: p.github,
                gitea: p.gitea,
                default_branch: p.default_branch.unwrap_or_else(|| "main".to_owned()),
                webhook_secret: secret,
                image,
                limits,
                cancel_superseded: p.cancel_superseded,
                secrets,
            });
        }
        projects
    }

    fn registries(&mut self, raw: Vec<Spanned<RawRegistry>>) -> Vec<Registry> {
        let mut registries = Vec::new();
        for (i, sp) in raw.into_iter().enumerate() {
            let what = format!("registries[{i}] ({})", sp.value.host);
            let at = At::of(&sp, &what);
            let r = sp.value;
            if r.host.is_empty() || r.host.contains('/') {
                self.located(at, "host must be a host[:port] without a path".into());
            }
            let password = r
                .password
                .as_ref()
                .and_then(|source| self.secret(SecretKind::Registry, source, at, "password"));
            if r.username.is_some() != r.password.is_some() {
                self.located(at, "username and password go together".into());
            }
            if let Some(api) = &r.api
                && !(api.starts_with("http://") || api.starts_with("https://"))
            {
                self.located(at, "api must be an http(s):// URL".into());
            }
            registries.push(Registry {
                host: r.host,
                api: r.api,
                username: r.username,
                password,
            });
        }
        registries
    }

    fn environments(
        &mut self,
        raw: Vec<Spanned<RawEnvironment>>,
        projects: &[Project],
    ) -> Vec<Environment> {
        let is_stack = |name: &str| projects.iter().any(|p| p.name == name && p.is_stack());
        // Services that a stack with environments follows: they are deployed
        // through the stack's releases, not by environments of their own.
        let stack_envs: HashSet<String> = raw
            .iter()
            .filter(|sp| is_stack(&sp.value.project))
            .map(|sp| sp.value.project.clone())
            .collect();
        let through_stack = |service: &str| {
            projects
                .iter()
                .find(|p| stack_envs.contains(&p.name) && p.follows.iter().any(|f| f == service))
                .map(|p| p.name.clone())
        };
        // name → (project, promote_from), for the promotion checks.
        let declared: HashMap<String, (String, Option<String>)> = raw
            .iter()
            .map(|sp| {
                let e = &sp.value;
                (e.name.clone(), (e.project.clone(), e.promote_from.clone()))
            })
            .collect();
        let mut environments = Vec::new();
        let mut names = HashSet::new();
        for (i, sp) in raw.into_iter().enumerate() {
            let what = format!("environments[{i}] ({})", sp.value.name);
            let at = At::of(&sp, &what);
            let e = sp.value;
            if !valid_name(&e.name) {
                self.located(
                    at,
                    "name must be non-empty letters, digits, '-', '_' or '.'".into(),
                );
            }
            if !names.insert(e.name.clone()) {
                self.located(at, "duplicate environment name".into());
            }
            let stack = is_stack(&e.project);
            if !projects.iter().any(|p| p.name == e.project) {
                self.located(at, format!("project {:?} is not configured", e.project));
            } else if let Some(via) = through_stack(&e.project) {
                self.located(
                    at,
                    format!("project {:?} is deployed through the releases of stack {via:?}, which has environments; an environment of its own would run it twice", e.project),
                );
            }
            if stack && e.port.is_some() != e.service.is_some() {
                self.located(
                    at,
                    "a stack's environment names the service and its port together (service, port)"
                        .into(),
                );
            }
            if !stack && e.service.is_some() {
                self.located(at, "only a stack's environment names a service".into());
            }
            if e.rules.contains(&Rule::MergeRequest(false)) {
                self.located(
                    at,
                    "`merge_request: false` matches nothing: leave the rule out (merge requests deploy only where `merge_request: true` says)".into(),
                );
            }
            let orchestrated = e.target != "docker";
            if stack && e.target == "kubernetes" {
                self.located(
                    at,
                    "a stack's environment deploys with docker or rancher".into(),
                );
            }
            if orchestrated && (e.endpoint.is_some() || e.port.is_some() || e.health.http.is_some())
            {
                self.located(
                    at,
                    format!("a {} environment has no endpoint, port or health.http: the orchestrator balances and health-checks what runs", e.target),
                );
            }
            for (given, target) in [
                (e.rancher.is_some(), "rancher"),
                (e.kubernetes.is_some(), "kubernetes"),
            ] {
                if given && e.target != target {
                    self.located(at, format!("{target} settings need `target: {target}`"));
                }
            }
            let (mut rancher, mut kubernetes) = (None, None);
            match e.target.as_str() {
                "docker" => {}
                "rancher" => match e.rancher {
                    None => self.located(
                        at,
                        "target rancher needs `rancher: {url, project, stack, service, access_key, secret_key}`".into(),
                    ),
                    Some(r) => rancher = self.rancher(r, stack, at),
                },
                "kubernetes" => match e.kubernetes {
                    None => self.located(
                        at,
                        "target kubernetes needs `kubernetes: {deployment, namespace, …}`".into(),
                    ),
                    Some(k) => kubernetes = self.kubernetes(k, at),
                },
                other => self.located(
                    at,
                    format!("target {other:?} is not supported (docker, rancher, kubernetes)"),
                ),
            }
            if let Some(endpoint) = &e.endpoint {
                if endpoint.parse::<std::net::SocketAddr>().is_err() {
                    self.located(at, format!("endpoint {endpoint:?} must be ip:port"));
                }
                if e.port.is_none() {
                    self.located(at, "an endpoint needs the container port".into());
                }
            }
            if e.health.http.is_some() && e.port.is_none() {
                self.located(at, "an HTTP health check needs the container port".into());
            }
            if let Some(path) = &e.health.http
                && !path.starts_with('/')
            {
                self.located(at, "health.http must be a path starting with '/'".into());
            }
            let approval = match e.approval {
                None => None,
                Some(RawApproval::Word(w)) if w == "required" => Some(Approval::default()),
                Some(RawApproval::Word(w)) => {
                    self.located(
                        at,
                        format!("approval {w:?}: write `approval: required` or `approval: {{by: [token names]}}`"),
                    );
                    None
                }
                Some(RawApproval::By(b)) => {
                    if b.by.is_empty() {
                        self.located(
                            at,
                            "approval.by names nobody: no deployment could ever run".into(),
                        );
                    }
                    Some(Approval { by: b.by })
                }
            };
            if stack && (approval.is_some() || e.promote_from.is_some()) {
                self.located(
                    at,
                    "a stack's environment takes releases: approval and promote_from are for a service's".into(),
                );
            }
            if let Some(from) = &e.promote_from {
                match declared.get(from) {
                    None => self.located(at, format!("promote_from {from:?} is no environment")),
                    Some((project, _)) if *project != e.project => self.located(
                        at,
                        format!(
                            "promote_from {from:?} deploys project {project:?}, not {:?}",
                            e.project
                        ),
                    ),
                    Some(_) => {
                        // Following promote_from must not lead back here.
                        let mut at_env = Some(from.clone());
                        for _ in 0..=declared.len() {
                            match at_env {
                                Some(ref n) if *n == e.name => {
                                    self.located(at, "promote_from leads back to this environment: promotions would never end".into());
                                    break;
                                }
                                Some(ref n) => at_env = declared.get(n).and_then(|d| d.1.clone()),
                                None => break,
                            }
                        }
                    }
                }
            }
            if e.promote_from.is_some() && !e.rules.is_empty() {
                self.located(
                    at,
                    "an environment fed by promote_from has no rules: it receives what succeeded there".into(),
                );
            }
            let name = e.name;
            environments.push(Environment {
                name: name.clone(),
                project: e.project,
                target: e.target,
                rancher,
                kubernetes,
                approval,
                promote_from: e.promote_from,
                rules: e.rules,
                port: e.port,
                endpoint: e.endpoint,
                network: e.network.unwrap_or_else(|| {
                    if stack {
                        format!("gantry-env-{name}")
                    } else {
                        "bridge".to_owned()
                    }
                }),
                env: e.env,
                service: e.service,
                health: HealthCheck {
                    http: e.health.http,
                    // An orchestrator's rollout replaces replicas batch by
                    // batch (Kubernetes' own progress deadline is 600 s).
                    timeout: std::time::Duration::from_secs(
                        e.health
                            .timeout_secs
                            .unwrap_or(if orchestrated { 600 } else { 60 }),
                    ),
                },
            });
        }
        environments
    }

    fn rancher(&mut self, r: RawRancher, stack: bool, at: At<'_>) -> Option<Rancher> {
        match (stack, &r.service) {
            (true, Some(_)) => self.located(
                at,
                "a stack's rancher environment names the Rancher stack only: its services are the release's".into(),
            ),
            (false, None) => self.located(at, "rancher.service: which service of the Rancher stack to upgrade".into()),
            _ => {}
        }
        if let Some(problem) = credentials_url_problem(&r.url) {
            self.located(at, format!("rancher.url {problem}"));
        }
        if r.batch_size == Some(0) {
            self.located(at, "rancher.batch_size must be at least 1".into());
        }
        let secret_key = self.secret(SecretKind::Target, &r.secret_key, at, "rancher.secret_key");
        Some(Rancher {
            url: r.url.trim_end_matches('/').to_owned(),
            project: r.project,
            stack: r.stack,
            service: r.service,
            access_key: r.access_key,
            secret_key,
            batch_size: r.batch_size.unwrap_or(1),
            interval_millis: r.interval_millis.unwrap_or(2000),
        })
    }

    fn kubernetes(&mut self, k: RawKubernetes, at: At<'_>) -> Option<Kubernetes> {
        // Names as Kubernetes has them (RFC 1123 labels and subdomains).
        let dns = |s: &str| {
            !s.is_empty()
                && s.len() <= 253
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
                && !s.starts_with(['-', '.'])
                && !s.ends_with(['-', '.'])
        };
        let namespace = k.namespace;
        for (field, value) in [
            ("namespace", namespace.as_ref()),
            ("deployment", Some(&k.deployment)),
            ("container", k.container.as_ref()),
        ] {
            if let Some(v) = value
                && !dns(v)
            {
                self.located(
                    at,
                    format!("kubernetes.{field} {v:?} is not a Kubernetes name (lowercase letters, digits, '-', '.')"),
                );
            }
        }
        let credentials = match (k.kubeconfig, k.url, k.token) {
            (None, None, None) => {
                if k.context.is_some() || k.ca_file.is_some() {
                    self.located(
                        at,
                        "kubernetes.context goes with kubeconfig, ca_file with url".into(),
                    );
                }
                KubeCredentials::InCluster
            }
            (Some(path), None, None) => {
                if k.ca_file.is_some() {
                    self.located(
                        at,
                        "kubernetes.ca_file goes with url (a kubeconfig names its own)".into(),
                    );
                }
                KubeCredentials::Kubeconfig {
                    path,
                    context: k.context,
                }
            }
            (None, Some(url), Some(token)) => {
                if let Some(problem) = credentials_url_problem(&url) {
                    self.located(at, format!("kubernetes.url {problem}"));
                }
                if k.context.is_some() {
                    self.located(at, "kubernetes.context goes with kubeconfig".into());
                }
                let token = self.secret(SecretKind::Target, &token, at, "kubernetes.token");
                KubeCredentials::Token {
                    url: url.trim_end_matches('/').to_owned(),
                    token,
                    ca_file: k.ca_file,
                }
            }
            _ => {
                self.located(
                    at,
                    "kubernetes credentials: give `kubeconfig` (and `context`), or `url` and `token`, or neither (the pod's service account)".into(),
                );
                return None;
            }
        };
        Some(Kubernetes {
            namespace,
            deployment: k.deployment,
            container: k.container,
            credentials,
        })
    }

    fn forge(&mut self, name: &str, raw: Option<Spanned<RawForge>>) -> Option<Forge> {
        let sp = raw?;
        let what = format!("forges.{name}");
        let at = At::of(&sp, &what);
        let raw = sp.value;
        if !(raw.url.starts_with("http://") || raw.url.starts_with("https://")) {
            self.located(at, "url must be http(s)://".into());
        }
        let token = self.secret(SecretKind::Forge, &raw.token, at, "token");
        Some(Forge {
            url: raw.url.trim_end_matches('/').to_owned(),
            token,
        })
    }

    fn chat(&mut self, raw: Vec<Spanned<RawChat>>, projects: &HashSet<String>) -> Vec<Chat> {
        let mut chat = Vec::new();
        for (i, sp) in raw.into_iter().enumerate() {
            let what = format!("chat[{i}] ({})", sp.value.name);
            let at = At::of(&sp, &what);
            let c = sp.value;
            for p in &c.projects {
                if !projects.contains(p) {
                    self.located(at, format!("project {p:?} is not configured"));
                }
            }
            let url = self.secret(SecretKind::Chat, &c.url, at, "url");
            if let Some(u) = &url
                && !(u.0.starts_with("http://") || u.0.starts_with("https://"))
            {
                self.located(at, "url must be http(s)://".into());
            }
            chat.push(Chat {
                name: c.name,
                kind: c.kind,
                url,
                projects: c.projects,
            });
        }
        chat
    }
}

impl GantryConfig {
    /// Reads, parses and validates the file at `path`, resolving every secret.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::load_for(path, &SecretKind::ALL)
    }

    /// Reads, parses and validates the file at `path`, resolving only the
    /// secrets of the `kinds` the caller uses.
    pub fn load_for(path: &Path, kinds: &[SecretKind]) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse_for(&path.display().to_string(), &text, kinds)
    }

    /// Parses and validates `text`, resolving every secret; `file` names it in errors.
    pub fn parse(file: &str, text: &str) -> Result<Self, ConfigError> {
        Self::parse_for(file, text, &SecretKind::ALL)
    }

    /// Parses and validates `text`, resolving only the secrets of `kinds`.
    /// Every problem is reported, each with the line and column of the entry
    /// it is about.
    pub fn parse_for(file: &str, text: &str, kinds: &[SecretKind]) -> Result<Self, ConfigError> {
        let raw: RawConfig = yaml::from_str(file, text)?;
        let mut cx = Check {
            file,
            kinds,
            problems: Vec::new(),
        };
        let projects = cx.projects(raw.projects);
        let names: HashSet<String> = projects.iter().map(|p| p.name.clone()).collect();
        let registries = cx.registries(raw.registries);
        let environments = cx.environments(raw.environments, &projects);

        let gitlab = cx.forge("gitlab", raw.forges.gitlab);
        let github = cx.forge("github", raw.forges.github);
        let gitea = cx.forge("gitea", raw.forges.gitea);
        let chat = cx.chat(raw.chat, &names);
        let tokens = tokens::validate(raw.tokens, &mut |at, problem| cx.located(at, problem));
        for env in &environments {
            for name in env.approval.iter().flat_map(|a| &a.by) {
                if !tokens
                    .iter()
                    .any(|t| t.name == *name && t.allows(Scope::Deploy))
                {
                    cx.problems.push(format!(
                        "{file}: environment {}: approval.by names {name:?}, which is no token with the deploy scope",
                        env.name
                    ));
                }
            }
        }
        let secrets_key = raw.secrets_key.and_then(|sp| {
            let at = At::of(&sp, "secrets_key");
            let text = cx.secret(SecretKind::Seal, &sp.value, at, "secrets_key")?;
            gantry_seal::SealKey::from_text(text.expose())
                .map_err(|e| cx.located(at, e))
                .ok()
        });
        if cx.problems.is_empty() {
            Ok(Self {
                projects,
                registries,
                environments,
                gitlab,
                github,
                gitea,
                chat,
                public_url: raw.public_url.map(|u| u.trim_end_matches('/').to_owned()),
                tokens,
                public_pages: raw.pages.public,
                secrets_key,
            })
        } else {
            Err(ConfigError::Invalid {
                file: file.to_owned(),
                problems: cx.problems,
            })
        }
    }

    /// The configured API token `presented` is, if any (see [`tokens::find`]).
    pub fn token(&self, presented: &str) -> Option<&ApiToken> {
        tokens::find(&self.tokens, presented)
    }

    pub fn environment(&self, name: &str) -> Option<&Environment> {
        self.environments.iter().find(|e| e.name == name)
    }

    pub fn project(&self, name: &str) -> Option<&Project> {
        self.projects.iter().find(|p| p.name == name)
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
                api: None,
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
        assert_eq!(
            cfg.projects[0].webhook_secret.as_ref().map(Secret::expose),
            Some("s3cret")
        );
        assert!(cfg.projects[0].is_gitlab("Team/Hello"));
        assert!(
            !cfg.projects[0].is_gitlab("team/hello2") && !cfg.projects[0].is_github("team/hello")
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
    fn globs() {
        assert!(glob("main", "main"));
        assert!(!glob("main", "mainline"));
        assert!(glob("v*", "v1.2.3"));
        assert!(!glob("v*", "1.2.3"));
        assert!(glob("release/*", "release/2026-11"));
        assert!(glob("*-hotfix-*", "a-hotfix-b"));
        assert!(!glob("*-hotfix-*", "a-hotfix"));
        assert!(glob("*", ""));
        let tag = |tag| Origin {
            tag,
            ..Origin::default()
        };
        let branch = |branch| Origin {
            branch,
            ..Origin::default()
        };
        assert!(Rule::Tag("v*".into()).matches(tag("v2")));
        assert!(!Rule::Tag("v*".into()).matches(branch("v2")));
        let mr = Origin {
            merge_request: true,
            ..Origin::default()
        };
        assert!(Rule::MergeRequest(true).matches(mr));
        assert!(!Rule::MergeRequest(true).matches(branch("main")));
        assert!(!Rule::Branch("*".into()).matches(mr));
    }

    #[test]
    fn environments_are_validated() {
        let base = "projects:\n  - name: a\n    clone_url: x\n    webhook_secret: {value: s}\n    image: localhost/a\n";
        let ok = GantryConfig::parse(
            "g.yml",
            &format!("{base}environments:\n  - name: staging\n    project: a\n    rules: [{{branch: main}}, {{tag: 'v*'}}]\n    port: 8080\n    endpoint: 127.0.0.1:18080\n    health: {{http: /health, timeout_secs: 5}}\n"),
        )
        .expect("valid");
        let env = ok.environment("staging").expect("staging");
        let at = |branch, tag| Origin {
            branch,
            tag,
            merge_request: false,
        };
        assert!(env.matches(at("main", "")) && env.matches(at("", "v1.0.0")));
        assert!(!env.matches(at("dev", "")));
        let review = GantryConfig::parse(
            "g.yml",
            &format!("{base}environments:\n  - name: review\n    project: a\n    rules: [{{merge_request: true}}]\n"),
        )
        .expect("valid");
        let review = review.environment("review").expect("review");
        assert!(review.matches(Origin {
            merge_request: true,
            ..Origin::default()
        }));
        assert!(!review.matches(at("main", "")));
        let rancher = "    target: rancher\n    rancher: {url: 'https://rancher.example.com/', project: 1a5, stack: shop, service: a, access_key: K, secret_key: {value: s3cret}}\n";
        let ok = GantryConfig::parse(
            "g.yml",
            &format!("{base}environments:\n  - name: prod\n    project: a\n{rancher}"),
        )
        .expect("valid");
        let r = ok
            .environment("prod")
            .and_then(|e| e.rancher.clone())
            .expect("rancher");
        assert_eq!(r.url, "https://rancher.example.com");
        assert_eq!((r.batch_size, r.interval_millis), (1, 2000));
        assert_eq!(r.secret_key.as_ref().map(Secret::expose), Some("s3cret"));
        for (extra, problem) in [
            ("    target: rancher\n", "target rancher needs"),
            (
                "    target: rancher\n    rancher: {url: 'https://r', project: p, stack: s, access_key: K, secret_key: {value: s}}\n",
                "rancher.service: which service",
            ),
            (
                &format!("{rancher}    endpoint: 127.0.0.1:1\n    port: 80\n") as &str,
                "no endpoint, port",
            ),
            (
                "    target: nomad\n",
                "not supported (docker, rancher, kubernetes)",
            ),
            ("    target: kubernetes\n", "target kubernetes needs"),
            (
                "    target: kubernetes\n    kubernetes: {deployment: hello, url: 'http://k8s.example.com:6443', token: {value: t}}\n",
                "kubernetes.url is http:// to k8s.example.com: the credentials would cross the network in clear",
            ),
            (
                "    target: rancher\n    rancher: {url: 'http://rancher.example.com', project: p, stack: s, service: a, access_key: K, secret_key: {value: s}}\n",
                "rancher.url is http:// to rancher.example.com",
            ),
            (
                "    target: kubernetes\n    kubernetes: {deployment: Hello}\n",
                "not a Kubernetes name",
            ),
            (
                "    target: kubernetes\n    kubernetes: {deployment: hello, url: 'https://k8s'}\n",
                "give `kubeconfig` (and `context`), or `url` and `token`",
            ),
            (
                "    target: kubernetes\n    kubernetes: {deployment: hello, kubeconfig: /k, url: 'https://k8s', token: {value: t}}\n",
                "give `kubeconfig` (and `context`), or `url` and `token`",
            ),
            (
                "    kubernetes: {deployment: hello}\n",
                "need `target: kubernetes`",
            ),
            (
                "    rancher: {url: x, project: p, stack: s, service: a, access_key: K, secret_key: {value: s}}\n",
                "need `target: rancher`",
            ),
        ] {
            let err = GantryConfig::parse(
                "g.yml",
                &format!("{base}environments:\n  - name: prod\n    project: a\n{extra}"),
            )
            .expect_err(problem);
            assert!(err.to_string().contains(problem), "{err}");
        }
        let kube = |settings: &str| {
            GantryConfig::parse(
                "g.yml",
                &format!("{base}environments:\n  - name: prod\n    project: a\n    target: kubernetes\n    kubernetes: {settings}\n"),
            )
            .expect("valid")
            .environment("prod")
            .and_then(|e| e.kubernetes.clone())
            .expect("kubernetes")
        };
        for url in [
            "http://127.0.0.1:8080",
            "http://localhost",
            "http://[::1]:6443/x",
        ] {
            assert!(credentials_url_problem(url).is_none(), "{url}");
        }
        for url in [
            "http://10.0.0.1",
            "http://user@k8s",
            "ftp://x",
            "http://127.0.0.1.example.com",
        ] {
            assert!(credentials_url_problem(url).is_some(), "{url}");
        }
        let k = kube("{deployment: hello}");
        assert_eq!((k.namespace, k.container), (None, None));
        assert!(matches!(k.credentials, KubeCredentials::InCluster));
        let k = kube(
            "{namespace: shop, deployment: hello, container: web, kubeconfig: /etc/k, context: prod}",
        );
        assert!(
            matches!(k.credentials, KubeCredentials::Kubeconfig { ref path, context: Some(ref c) } if path == "/etc/k" && c == "prod")
        );
        let k = kube(
            "{deployment: hello, url: 'https://rancher.example.com/k8s/clusters/c-1/', token: {value: t0k}}",
        );
        let KubeCredentials::Token {
            url,
            token,
            ca_file,
        } = k.credentials
        else {
            panic!("token credentials")
        };
        assert_eq!(url, "https://rancher.example.com/k8s/clusters/c-1");
        assert_eq!(token.as_ref().map(Secret::expose), Some("t0k"));
        assert_eq!(ca_file, None);
        let tokens = "tokens:\n  - {name: ops, sha256: 4c1e0f1b6a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f, scopes: [deploy]}\n  - {name: ci, sha256: 5c1e0f1b6a2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f, scopes: [trigger]}\n";
        let promoted = GantryConfig::parse(
            "g.yml",
            &format!("{base}environments:\n  - name: staging\n    project: a\n    rules: [{{branch: main}}]\n  - name: prod\n    project: a\n    promote_from: staging\n    approval: {{by: [ops]}}\n{tokens}"),
        )
        .expect("valid");
        let prod = promoted.environment("prod").expect("prod");
        assert_eq!(prod.promote_from.as_deref(), Some("staging"));
        let approval = prod.approval.clone().expect("approval");
        assert!(approval.allows("ops") && !approval.allows("ci"));
        for (envs, problem) in [
            (
                "  - name: prod\n    project: a\n    promote_from: nowhere\n",
                "is no environment",
            ),
            (
                "  - name: x\n    project: a\n    promote_from: y\n  - name: y\n    project: a\n    promote_from: x\n",
                "leads back",
            ),
            (
                "  - name: s\n    project: a\n  - name: prod\n    project: a\n    promote_from: s\n    rules: [{branch: main}]\n",
                "has no rules",
            ),
            (
                "  - name: prod\n    project: a\n    approval: maybe\n",
                "approval \"maybe\"",
            ),
            (
                "  - name: prod\n    project: a\n    approval: {by: [ci]}\n",
                "no token with the deploy scope",
            ),
        ] {
            let err = GantryConfig::parse("g.yml", &format!("{base}environments:\n{envs}{tokens}"))
                .expect_err(problem);
            assert!(err.to_string().contains(problem), "{problem}: {err}");
        }
        assert_eq!(
            GantryConfig::parse(
                "g.yml",
                &format!(
                    "{base}environments:\n  - name: prod\n    project: a\n    approval: required\n"
                ),
            )
            .expect("valid")
            .environment("prod")
            .and_then(|e| e.approval.clone()),
            Some(Approval::default())
        );
        let err = GantryConfig::parse(
            "g.yml",
            &format!("{base}environments:\n  - name: review\n    project: a\n    rules: [{{merge_request: false}}]\n"),
        )
        .expect_err("matches nothing");
        assert!(err.to_string().contains("matches nothing"), "{err}");
        let err = GantryConfig::parse(
            "g.yml",
            &format!("{base}environments:\n  - name: prod\n    project: b\n    target: nomad\n    endpoint: nowhere\n"),
        )
        .expect_err("invalid");
        let msg = err.to_string();
        for needle in ["project \"b\"", "nomad", "ip:port", "container port"] {
            assert!(msg.contains(needle), "{msg} lacks {needle}");
        }
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

    #[test]
    fn step_secrets_are_named_long_and_protected_by_choice() {
        let base = "projects:\n  - name: a\n    clone_url: x\n    webhook_secret: {value: s}\n    image: localhost/a\n    secrets:\n";
        let ok = GantryConfig::parse(
            "g.yml",
            &format!("{base}      - {{name: API_TOKEN, value: {{value: long-enough}}}}\n      - {{name: KEY, value: {{value: 0123456789}}, protected: true}}\n"),
        )
        .expect("valid");
        let secrets = &ok.project("a").expect("a").secrets;
        assert_eq!(
            secrets[0].value.as_ref().map(|v| v.expose()),
            Some("long-enough")
        );
        assert!(secrets[0].given_to("feature/x", "", "main"));
        assert!(!secrets[1].given_to("feature/x", "", "main"));
        assert!(secrets[1].given_to("main", "", "main"));
        assert!(secrets[1].given_to("", "v1.0.0", "main"));
        let err = GantryConfig::parse(
            "g.yml",
            &format!("{base}      - {{name: SHORT, value: {{value: abc}}}}\n      - {{name: 1BAD, value: {{value: long-enough}}}}\n      - {{name: GANTRY_X, value: {{value: long-enough}}}}\n"),
        )
        .expect_err("invalid");
        let msg = err.to_string();
        for needle in [
            "secret \"SHORT\" is shorter than 8 characters",
            "secret name \"1BAD\" is not an environment variable name",
            "secret name \"GANTRY_X\": GANTRY_ names are Gantry's",
        ] {
            assert!(msg.contains(needle), "{msg} lacks {needle}");
        }
    }

    #[test]
    fn stacks_are_projects_without_image_or_environment() {
        let base = "projects:\n  - name: api\n    clone_url: x\n    webhook_secret: {value: s}\n    image: localhost/api\n  - name: shop\n    kind: stack\n    clone_url: y\n    webhook_secret: {value: t}\n";
        let ok =
            GantryConfig::parse("g.yml", &format!("{base}    follows: [api]\n")).expect("valid");
        let shop = ok.project("shop").expect("shop");
        assert!(shop.is_stack() && shop.image.is_empty());
        assert_eq!(shop.follows, ["api"]);
        assert!(!ok.project("api").expect("api").is_stack());
        let err = GantryConfig::parse(
            "g.yml",
            &format!("{base}    image: localhost/shop\n    follows: [api, shop]\nenvironments:\n  - name: prod\n    project: shop\n    port: 80\n  - name: api-alone\n    project: api\n"),
        )
        .expect_err("invalid");
        let msg = err.to_string();
        for needle in [
            "environments[1] (api-alone): project \"api\" is deployed through the releases of stack \"shop\"",
            "g.yml:6:5: projects[1] (shop): a stack has no image",
            "g.yml:6:5: projects[1] (shop): follows \"shop\", which is not a configured service project",
            "g.yml:13:5: environments[0] (prod): a stack's environment names the service and its port together",
        ] {
            assert!(msg.contains(needle), "{msg} lacks {needle}");
        }
        let rancher = |service: &str| {
            format!(
                "{base}    follows: [api]\nenvironments:\n  - name: prod\n    project: shop\n    target: rancher\n    rancher: {{url: 'https://r', project: 1a5, stack: shop{service}, access_key: K, secret_key: {{value: s}}}}\n"
            )
        };
        let ok = GantryConfig::parse("g.yml", &rancher("")).expect("a stack on Rancher");
        let r = ok.environment("prod").and_then(|e| e.rancher.clone());
        assert_eq!(r.map(|r| (r.stack, r.service)), Some(("shop".into(), None)));
        let err = GantryConfig::parse("g.yml", &rancher(", service: web")).expect_err("a service");
        assert!(
            err.to_string().contains("names the Rancher stack only"),
            "{err}"
        );
        let err = GantryConfig::parse(
            "g.yml",
            &format!("{base}    follows: [api]\nenvironments:\n  - name: prod\n    project: shop\n    target: kubernetes\n    kubernetes: {{deployment: shop}}\n"),
        )
        .expect_err("kubernetes");
        assert!(
            err.to_string().contains("deploys with docker or rancher"),
            "{err}"
        );
    }
}
