//! The Rancher 1.6 target (Cattle, API `v2-beta`): an environment names a
//! Rancher URL, environment (project) id, stack and service, and Gantry
//! upgrades that service in place:
//!
//! 1. read the service (found by stack and service name); it must be
//!    `active` — one already upgrading is someone else's upgrade;
//! 2. `POST …/services/{id}?action=upgrade` with an `inServiceStrategy`
//!    carrying the service's whole `launchConfig` (every field kept, the
//!    image replaced by `docker:<repository>@<digest>`, the environment's
//!    `env` merged into its `environment`) and its `secondaryLaunchConfigs`
//!    (the sidekicks) unchanged, `batchSize`, `intervalMillis` and
//!    `startFirst: true` (the new containers start before the old stop);
//! 3. poll until the service is `upgraded` and `healthy` (Rancher's own
//!    health checks) within the environment's timeout, then
//!    `action=finishupgrade` and wait for `active`;
//! 4. on `unhealthy`, an error state, the timeout, or a Rancher that stops
//!    answering once the upgrade began: `action=rollback` (after
//!    `cancelupgrade` when it is still `upgrading`), wait for `active` — the
//!    old image runs again — and report a rollback.
//!
//! Rancher's refusals before the upgrade began (401, a 422 with its `code`
//! and `message`, a service not `active`) become deployment failures that
//! say what to fix; nothing changed on Rancher. The variables Gantry sets
//! are named in a launch configuration label, so that one it no longer
//! sets (unset, rolled back) is removed.

use std::collections::BTreeMap;
use std::time::Duration;

use gantry_config::{Environment, Registry};
use serde_json::{Value, json};

use crate::queue::{Live, Row};
use crate::target::{Failure, ManagedEnv, Running, Target, clip};

/// How long one API call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause between two reads of the service while it changes state.
const POLL: Duration = Duration::from_millis(500);
/// How long finishing or rolling back an upgrade may take.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(300);
/// The launch configuration's label naming the variables Gantry sets.
const MANAGED_ENV: &str = "io.gantry.environment-keys";

pub struct RancherTarget {
    http: reqwest::Client,
}

/// One environment's Rancher API, authenticated.
pub(crate) struct Api<'a> {
    http: &'a reqwest::Client,
    base: String,
    access_key: &'a str,
    secret_key: &'a str,
}

impl Api<'_> {
    pub(crate) async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
    ) -> Result<Value, Failure> {
        let what = format!("{method} {path}");
        let mut request = self
            .http
            .request(method, format!("{}{path}", self.base))
            .basic_auth(self.access_key, Some(self.secret_key))
            .header("Accept", "application/json");
        if let Some(body) = body {
            request = request.json(body);
        }
        let response = request.send().await.map_err(|e| {
            Failure::Refused(anyhow::anyhow!(
                "Rancher cannot be reached ({what}): {}",
                e.without_url()
            ))
        })?;
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        if status.is_success() {
            return Ok(value);
        }
        let detail = |v: &Value| {
            let code = v["code"].as_str().unwrap_or_default();
            let message = v["message"].as_str().unwrap_or_default();
            let detail = v["detail"].as_str().unwrap_or_default();
            [code, message, detail]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(": ")
        };
        let why = match status.as_u16() {
            401 | 403 => format!(
                "Rancher refused the API key ({status}) for {what}: check the environment's rancher.access_key and rancher.secret_key"
            ),
            422 => format!("Rancher refused {what} (422 {})", clip(&detail(&value))),
            404 => format!("Rancher has no {path} (404)"),
            _ => format!(
                "Rancher answered {status} to {what}: {}",
                if value.is_null() {
                    text.chars().take(200).collect()
                } else {
                    clip(&detail(&value))
                }
            ),
        };
        Err(Failure::Refused(anyhow::anyhow!(why)))
    }

    pub(crate) async fn get(&self, path: &str) -> Result<Value, Failure> {
        self.call(reqwest::Method::GET, path, None).await
    }

    /// `POST {path}?action={action}` (a service's or a stack's).
    pub(crate) async fn action(
        &self,
        path: &str,
        action: &str,
        body: &Value,
    ) -> Result<Value, Failure> {
        self.call(
            reqwest::Method::POST,
            &format!("{path}?action={action}"),
            Some(body),
        )
        .await
    }

    /// The first of a collection, if any.
    pub(crate) async fn first(&self, path: &str) -> Result<Option<Value>, Failure> {
        let list = self.get(path).await?;
        Ok(list["data"].as_array().and_then(|d| d.first()).cloned())
    }

    /// The first of a collection, or why there is none.
    async fn find(&self, path: &str, what: &str) -> Result<Value, Failure> {
        self.first(path)
            .await?
            .ok_or_else(|| Failure::Refused(anyhow::anyhow!("Rancher has no {what}")))
    }
}

pub(crate) fn text<'a>(v: &'a Value, key: &str) -> &'a str {
    v[key].as_str().unwrap_or_default()
}

/// What [`wait`] waits for at the end of an upgrade or a rollback: the
/// service (or stack) `active` again.
pub(crate) fn active(service: &Value) -> Option<bool> {
    (text(service, "state") == "active").then_some(true)
}

/// The HTTP client of Rancher calls.
pub(crate) fn client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .timeout(CALL_TIMEOUT)
        .user_agent(concat!("gantry-deployer/", env!("CARGO_PKG_VERSION")))
        .build()?)
}

/// The Rancher API of `env` (its `rancher` settings), authenticated.
pub(crate) fn api<'a>(
    http: &'a reqwest::Client,
    env: &'a Environment,
) -> Result<(Api<'a>, &'a gantry_config::Rancher), Failure> {
    {
        let r = env.rancher.as_ref().ok_or_else(|| {
            Failure::Refused(anyhow::anyhow!(
                "environment {} has no rancher settings",
                env.name
            ))
        })?;
        let secret = r.secret_key.as_ref().ok_or_else(|| {
            Failure::Refused(anyhow::anyhow!(
                "rancher.secret_key of {} is not resolved",
                env.name
            ))
        })?;
        Ok((
            Api {
                http,
                base: format!(
                    "{}/v2-beta/projects/{}",
                    r.url,
                    gantry_config::git::percent_encode(&r.project)
                ),
                access_key: &r.access_key,
                secret_key: secret.expose(),
            },
            r,
        ))
    }
}

impl RancherTarget {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self { http: client()? })
    }

    /// The service's path (`/services/{id}`), found by stack and name.
    async fn service_path(api: &Api<'_>, r: &gantry_config::Rancher) -> Result<String, Failure> {
        let name = r.service.as_deref().unwrap_or_default();
        let stack = api
            .find(
                &format!(
                    "/stacks?name={}",
                    gantry_config::git::percent_encode(&r.stack)
                ),
                &format!("stack {:?}", r.stack),
            )
            .await?;
        let service = api
            .find(
                &format!(
                    "/services?name={}&stackId={}",
                    gantry_config::git::percent_encode(name),
                    gantry_config::git::percent_encode(text(&stack, "id"))
                ),
                &format!("service {name:?} in stack {:?}", r.stack),
            )
            .await?;
        Ok(format!(
            "/services/{}",
            gantry_config::git::percent_encode(text(&service, "id"))
        ))
    }

    /// Reads the service until `done` says it is there (Ok(true)) or failed
    /// (Ok(false)), or `timeout` runs out (Err with what was last seen).
    pub(crate) async fn wait(
        api: &Api<'_>,
        path: &str,
        timeout: Duration,
        done: impl Fn(&Value) -> Option<bool>,
    ) -> Result<Result<Value, String>, Failure> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut errors = 0;
        loop {
            // A read that fails now and then (a proxy, a restart of Rancher's
            // server) is read again; three in a row end the wait.
            let service = match api.get(path).await {
                Ok(s) => {
                    errors = 0;
                    s
                }
                Err(f) if errors < 2 && tokio::time::Instant::now() < deadline => {
                    errors += 1;
                    tracing::warn!(error = %f.text(), "reading the Rancher service failed; reading again");
                    tokio::time::sleep(POLL).await;
                    continue;
                }
                Err(f) => return Err(f),
            };
            match done(&service) {
                Some(true) => return Ok(Ok(service)),
                Some(false) => {
                    return Ok(Err(format!(
                        "it is {} and {}",
                        text(&service, "state"),
                        text(&service, "healthState")
                    )));
                }
                None => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Ok(Err(format!(
                    "not upgraded and healthy within {}s (it is {} and {})",
                    timeout.as_secs(),
                    text(&service, "state"),
                    text(&service, "healthState")
                )));
            }
            tokio::time::sleep(POLL).await;
        }
    }
}

/// The upgrade's `inServiceStrategy`: the service's launch configuration
/// with only the image (and the environment variables `vars`) changed.
pub fn strategy(
    service: &Value,
    env: &Environment,
    row: &Row,
    vars: &BTreeMap<String, String>,
) -> Value {
    let r = env.rancher.as_ref();
    let mut launch = service["launchConfig"].clone();
    if !launch.is_object() {
        launch = json!({});
    }
    launch["imageUuid"] = json!(format!("docker:{}", row.reference()));
    // The variables Gantry set last time (named in a label) that it does
    // not set now are removed: an unset key or a rollback takes them away.
    if !launch["environment"].is_object() {
        launch["environment"] = json!({});
    }
    let label = launch["labels"][MANAGED_ENV]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let managed = ManagedEnv::new(vars, &label);
    if let Some(env) = launch["environment"].as_object_mut() {
        for gone in managed.gone() {
            env.remove(gone);
        }
    }
    for (k, v) in vars {
        launch["environment"][k] = json!(v);
    }
    if managed.any() {
        if !launch["labels"].is_object() {
            launch["labels"] = json!({});
        }
        launch["labels"][MANAGED_ENV] = json!(managed.label());
    }
    let mut strategy = json!({
        "launchConfig": launch,
        "batchSize": r.map_or(1, |r| r.batch_size),
        "intervalMillis": r.map_or(2000, |r| r.interval_millis),
        "startFirst": true,
    });
    if let Some(sidekicks) = service
        .get("secondaryLaunchConfigs")
        .filter(|v| v.is_array())
    {
        strategy["secondaryLaunchConfigs"] = sidekicks.clone();
    }
    json!({ "inServiceStrategy": strategy })
}

#[tonic::async_trait]
impl Target for RancherTarget {
    async fn roll_out(
        &self,
        env: &Environment,
        row: &Row,
        vars: &BTreeMap<String, String>,
        _registry: &Registry,
        _live: Option<&Live>,
    ) -> Result<Running, Failure> {
        let (api, r) = api(&self.http, env)?;
        let path = Self::service_path(&api, r).await?;
        let service = api.get(&path).await?;
        let state = text(&service, "state");
        if state != "active" {
            return Err(Failure::Refused(anyhow::anyhow!(
                "the Rancher service {}/{} is {state}, not active: finish or roll back that upgrade in Rancher first",
                r.stack,
                r.service.as_deref().unwrap_or_default()
            )));
        }
        api.action(&path, "upgrade", &strategy(&service, env, row, vars))
            .await?;
        follow_upgrade(&api, &path, env.health.timeout, "service").await?;
        Ok(Running {
            id: path.trim_start_matches("/services/").to_owned(),
            address: None,
        })
    }
}

/// Whether Rancher's `healthState` says healthy (`started-once`: a
/// service that runs once and ended well).
pub(crate) fn healthy(v: &Value) -> bool {
    matches!(text(v, "healthState"), "healthy" | "started-once")
}

/// Follows an upgrade Rancher began on `path` (a service or a stack,
/// `what`): once `upgraded` and healthy within `timeout`, finishes it;
/// when unhealthy, in error, too slow, or no longer answering, rolls it
/// back (a `Failure::Failed`, rolled back).
pub(crate) async fn follow_upgrade(
    api: &Api<'_>,
    path: &str,
    timeout: Duration,
    what: &str,
) -> Result<(), Failure> {
    let upgraded = RancherTarget::wait(api, path, timeout, |s| {
        match (text(s, "state"), text(s, "healthState")) {
            ("upgraded", _) if healthy(s) => Some(true),
            (_, "unhealthy") | ("error", _) => Some(false),
            _ => None,
        }
    })
    .await
    .unwrap_or_else(|f| Err(format!("Rancher could not be followed: {}", f.text())));
    let why = match upgraded {
        Ok(_) => match RancherTarget::finish(api, path).await {
            Ok(()) => return Ok(()),
            Err(why) => why,
        },
        Err(why) => why,
    };
    Err(match RancherTarget::roll_back(api, path).await {
        Ok(()) => Failure::Failed {
            error: anyhow::anyhow!("{why}; Rancher rolled the {what} back"),
            rolled_back: true,
        },
        Err(stuck) => Failure::Failed {
            error: anyhow::anyhow!(
                "{why}; rolling back did not end ({stuck}): see the {what} in Rancher"
            ),
            rolled_back: false,
        },
    })
}

impl RancherTarget {
    /// Finishes a healthy upgrade (the call tried three times): the old
    /// containers go. The new ones already serve, so a service slow to turn
    /// `active` afterwards is still a success.
    pub(crate) async fn finish(api: &Api<'_>, path: &str) -> Result<(), String> {
        let mut last = String::new();
        for _ in 0..3 {
            match api.action(path, "finishupgrade", &json!({})).await {
                Ok(_) => {
                    if let Ok(Err(why)) = Self::wait(api, path, SETTLE_TIMEOUT, active).await {
                        tracing::warn!(why, "the finished upgrade is not active yet");
                    }
                    return Ok(());
                }
                Err(f) => last = f.text(),
            }
            tokio::time::sleep(POLL).await;
        }
        Err(format!("finishing the upgrade failed: {last}"))
    }

    /// Rolls an upgrade back: one still `upgrading` is canceled first (Cattle
    /// rolls back only an upgraded or canceled upgrade); waits for `active`.
    pub(crate) async fn roll_back(api: &Api<'_>, path: &str) -> Result<(), String> {
        let service = api.get(path).await.map_err(|f| f.text())?;
        if text(&service, "state") == "upgrading" {
            api.action(path, "cancelupgrade", &json!({}))
                .await
                .map_err(|f| f.text())?;
            Self::wait(api, path, SETTLE_TIMEOUT, |s| {
                matches!(text(s, "state"), "canceled-upgrade" | "upgraded").then_some(true)
            })
            .await
            .map_err(|f| f.text())??;
        }
        api.action(path, "rollback", &json!({}))
            .await
            .map_err(|f| f.text())?;
        Self::wait(api, path, SETTLE_TIMEOUT, active)
            .await
            .map_err(|f| f.text())?
            .map(drop)
    }
}
