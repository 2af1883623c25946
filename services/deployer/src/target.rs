//! Where an environment's versions run: one [`Target`] per kind
//! (`docker`, `rancher`, `kubernetes`), behind one trait. The worker keeps everything
//! else — queueing, the one-deployment-per-environment lock, supersession,
//! the lease, events, the endpoint — so that adding a target is one module
//! that implements [`Target`] and one line in [`Targets::new`].

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::Arc;

use gantry_config::{Environment, Registry};

use crate::queue::{Live, Row};

/// What runs once a new version took over.
#[derive(Debug, Clone)]
pub struct Running {
    /// The target's id of what runs (a container, a Rancher service).
    pub id: String,
    /// Where the environment's endpoint forwards to, when the target has
    /// one (Docker: the container's address).
    pub address: Option<SocketAddr>,
}

/// Why a rollout did not take over.
#[derive(Debug)]
pub enum Failure {
    /// The target refused or could not be reached; nothing changed there
    /// (the image is not to blame).
    Refused(anyhow::Error),
    /// The new version failed (did not start, unhealthy, too slow) and was
    /// taken away; `rolled_back`: an earlier version runs again.
    Failed {
        error: anyhow::Error,
        rolled_back: bool,
    },
}

impl Failure {
    /// What went wrong, with its causes.
    pub fn text(&self) -> String {
        match self {
            Failure::Refused(e) => format!("{e:#}"),
            Failure::Failed { error, .. } => format!("{error:#}"),
        }
    }
}

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure::Refused(e)
    }
}

/// At most this much of what a server says goes into a reason.
const SAID_MAX: usize = 500;

/// `text`, cut to `SAID_MAX` (500) characters.
pub fn clip(text: &str) -> String {
    match text.char_indices().nth(SAID_MAX) {
        Some((at, _)) => format!("{}…", &text[..at]),
        None => text.to_owned(),
    }
}

/// The environment variables a target sets on an orchestrator's object
/// (`vars`), beside the ones Gantry set there last time, which the object
/// names in a label or annotation (comma-separated keys): a key Gantry no
/// longer sets (unset, rolled back) is removed, and the object's own keys
/// stay.
pub struct ManagedEnv<'a> {
    pub vars: &'a BTreeMap<String, String>,
    previous: Vec<&'a str>,
}

impl<'a> ManagedEnv<'a> {
    /// `label`: the keys named last time (empty when none).
    pub fn new(vars: &'a BTreeMap<String, String>, label: &'a str) -> Self {
        Self {
            vars,
            previous: label.split(',').filter(|k| !k.is_empty()).collect(),
        }
    }

    /// Whether the object's variables (and label) change at all.
    pub fn any(&self) -> bool {
        !self.vars.is_empty() || !self.previous.is_empty()
    }

    /// The keys set last time and not now: to be removed.
    pub fn gone(&self) -> impl Iterator<Item = &'a str> + '_ {
        self.previous
            .iter()
            .copied()
            .filter(|k| !self.vars.contains_key(*k))
    }

    /// The label naming the keys set now.
    pub fn label(&self) -> String {
        self.vars.keys().cloned().collect::<Vec<_>>().join(",")
    }
}

/// A kind of place where versions run.
#[tonic::async_trait]
pub trait Target: Send + Sync {
    /// Cleans what an earlier attempt of `row` left behind (keeping `live`).
    /// Nothing by default: an orchestrator's next rollout takes over from
    /// where an interrupted one stopped.
    async fn prepare(&self, _env: &Environment, _row: &Row, _live: Option<&Live>) {}

    /// Rolls `row`'s image (by digest) out in `env` with the environment
    /// variables `vars` (the environment's `env`, then its configuration
    /// version's), while the old version (`live`, if Gantry knows one) keeps
    /// serving, until the new one is healthy; on failure, what ran before
    /// runs again.
    async fn roll_out(
        &self,
        env: &Environment,
        row: &Row,
        vars: &BTreeMap<String, String>,
        registry: &Registry,
        live: Option<&Live>,
    ) -> Result<Running, Failure>;

    /// Once the new version took over and the endpoint switched: retires
    /// the old one. Nothing by default: an orchestrator's rollout already
    /// retired it.
    async fn retire(&self, _env: &Environment, _old: &Live) {}
}

/// The targets by the name environments give (`target:`).
#[derive(Clone)]
pub struct Targets(HashMap<&'static str, Arc<dyn Target>>);

impl Targets {
    pub fn new(docker: crate::docker::DockerTarget) -> anyhow::Result<Self> {
        let mut targets: HashMap<&'static str, Arc<dyn Target>> = HashMap::new();
        targets.insert("docker", Arc::new(docker));
        targets.insert("rancher", Arc::new(crate::rancher::RancherTarget::new()?));
        targets.insert("kubernetes", Arc::new(crate::kubernetes::KubernetesTarget));
        Ok(Self(targets))
    }

    /// The target of `env`.
    pub fn of(&self, env: &Environment) -> Option<&Arc<dyn Target>> {
        self.0.get(env.target.as_str())
    }
}
