//! Each environment's configuration, versioned (`gantry config …`,
//! `gantry.v1.EnvironmentConfig`): the environment variables of what runs
//! there, on top of the environment's `env` from the configuration file.
//!
//! A change makes a new version, a full snapshot (`env_config_versions`):
//! plain values as JSON, secret ones as one sealed JSON object
//! (`gantry-seal`, under the configuration's `secrets_key`, bound to
//! `<environment>/<version>`), never shown again. If something runs in the
//! environment, its image is queued again with the new version (trigger
//! `config`) and goes through the normal path: start-first, health check,
//! and on failure the previous image and configuration keep running — the
//! version is marked failed and later deployments skip it. A deployment
//! records the version it applies, so a rollback restores both.

use std::collections::BTreeMap;
use std::sync::Arc;

use gantry_config::GantryConfig;
use gantry_proto::v1::environment_config_server::EnvironmentConfig;
use gantry_proto::v1::{
    ConfigChange, ConfigDiffRequest, ConfigDiffResponse, ConfigEntry, ConfigHistoryRequest,
    ConfigHistoryResponse, ConfigVersion, SetConfigRequest, ShowConfigRequest,
};
use gantry_runtime::ApiError;
use gantry_runtime::auth::Caller;
use sqlx::{PgPool, Postgres, Transaction};
use tokio::sync::Notify;
use tonic::{Request, Response, Status};

use crate::queue::{self, ConfigPick, Trigger};

/// What masks a secret value wherever one is shown.
const MASK: &str = "[MASKED]";
/// Longest value, and most keys, of a configuration.
const MAX_VALUE: usize = 32 * 1024;
const MAX_KEYS: usize = 200;

/// The environment's current configuration version: its newest that did
/// not fail; `None` when it has none.
pub async fn current(
    tx: &mut Transaction<'_, Postgres>,
    environment: &str,
) -> sqlx::Result<Option<i32>> {
    sqlx::query_scalar!(
        "SELECT max(version) FROM env_config_versions WHERE environment = $1 AND failed IS NULL",
        environment,
    )
    .fetch_one(&mut **tx)
    .await
}

/// Marks `version` of `environment` failed (its rollout failed, it was
/// rejected, or rolled back on request): later deployments skip it.
pub async fn mark_failed(
    tx: &mut Transaction<'_, Postgres>,
    environment: &str,
    version: Option<i32>,
    why: &str,
) -> sqlx::Result<()> {
    sqlx::query!(
        "UPDATE env_config_versions SET failed = $3 WHERE environment = $1 AND version = $2",
        environment,
        version,
        why,
    )
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// One version as stored.
struct Stored {
    version: i32,
    plain: serde_json::Value,
    sealed: Option<Vec<u8>>,
    secret_keys: Vec<String>,
    changed_by: String,
    change: String,
    failed: Option<String>,
    created_at: chrono::DateTime<chrono::Utc>,
}

impl Stored {
    fn plain(&self) -> BTreeMap<String, String> {
        serde_json::from_value(self.plain.clone()).unwrap_or_default()
    }

    /// Its secret values, opened.
    fn secrets(
        &self,
        config: &GantryConfig,
        environment: &str,
    ) -> Result<BTreeMap<String, String>, String> {
        let Some(sealed) = &self.sealed else {
            return Ok(BTreeMap::new());
        };
        let key = config.secrets_key.as_ref().ok_or_else(|| {
            "the configuration has secret values but no secrets_key to open them".to_owned()
        })?;
        let opened = key
            .open(&context(environment, self.version), sealed)
            .map_err(|e| format!("the configuration's secret values do not open: {e}"))?;
        serde_json::from_slice(&opened).map_err(|e| format!("sealed configuration: {e}"))
    }

    fn info(&self, environment: &str, entries: Vec<ConfigEntry>) -> ConfigVersion {
        ConfigVersion {
            environment: environment.to_owned(),
            version: self.version.max(0) as u32,
            entries,
            changed_by: self.changed_by.clone(),
            change: self.change.clone(),
            failed: self.failed.clone().unwrap_or_default(),
            created_at: Some(gantry_proto::timestamp(self.created_at)),
            deployment: None,
        }
    }

    /// Its entries, secret values masked, by key.
    fn entries(&self) -> Vec<ConfigEntry> {
        let mut entries: Vec<ConfigEntry> = self
            .plain()
            .into_iter()
            .map(|(key, value)| ConfigEntry {
                key,
                value,
                secret: false,
            })
            .chain(self.secret_keys.iter().map(|k| ConfigEntry {
                key: k.clone(),
                value: MASK.into(),
                secret: true,
            }))
            .collect();
        entries.sort_by(|a, b| a.key.cmp(&b.key));
        entries
    }
}

fn context(environment: &str, version: i32) -> String {
    format!("{environment}/{version}")
}

async fn load(
    pool: &PgPool,
    environment: &str,
    version: Option<i32>,
) -> sqlx::Result<Option<Stored>> {
    sqlx::query_as!(
        Stored,
        "SELECT version, plain, sealed, secret_keys, changed_by, change, failed, created_at
         FROM env_config_versions WHERE environment = $1 AND version = $2",
        environment,
        version,
    )
    .fetch_optional(pool)
    .await
}

/// The variables a deployment's configuration version gives its
/// containers (secret values opened); empty for none.
pub async fn resolve(
    pool: &PgPool,
    config: &GantryConfig,
    environment: &str,
    version: Option<i32>,
) -> Result<BTreeMap<String, String>, String> {
    let Some(version) = version else {
        return Ok(BTreeMap::new());
    };
    let stored = load(pool, environment, Some(version))
        .await
        .map_err(|e| format!("cannot read configuration version {version}: {e}"))?
        .ok_or_else(|| format!("configuration version {version} of {environment} is gone"))?;
    let mut values = stored.plain();
    values.extend(stored.secrets(config, environment)?);
    Ok(values)
}

/// Where a new configuration `version` of `env` goes: the deployment not
/// yet running, if there is one (it never applied the old version); else
/// what runs, or is being rolled out, is queued again with it. `None` when
/// nothing was deployed there yet.
async fn redeploy(
    tx: &mut Transaction<'_, Postgres>,
    env: &gantry_config::Environment,
    version: i32,
) -> sqlx::Result<Option<queue::Row>> {
    let waiting = crate::queue::deployment_rows!(
        "WHERE environment = $1 AND state IN ('waiting', 'awaiting_approval')
         ORDER BY created_at DESC LIMIT 1",
        env.name
    )
    .fetch_optional(&mut **tx)
    .await?;
    if let Some(mut waiting) = waiting {
        sqlx::query!(
            "UPDATE deployments SET config_version = $2 WHERE id = $1",
            waiting.id,
            version
        )
        .execute(&mut **tx)
        .await?;
        waiting.config_version = Some(version);
        return Ok(Some(waiting));
    }
    let running = crate::queue::deployment_rows!(
        "WHERE environment = $1 AND state = 'running' LIMIT 1",
        env.name
    )
    .fetch_optional(&mut **tx)
    .await?;
    let current = match running {
        Some(r) => Some(r),
        None => {
            crate::queue::deployment_rows!(
                "WHERE id = (SELECT deployment_id FROM live WHERE environment = $1)",
                env.name
            )
            .fetch_optional(&mut **tx)
            .await?
        }
    };
    let Some(current) = current else {
        return Ok(None);
    };
    let row = queue::enqueue(
        tx,
        env,
        &current.image(),
        Trigger::Config,
        ConfigPick::Version(Some(version)),
    )
    .await?;
    Ok(Some(row))
}

/// `gantry.v1.EnvironmentConfig`.
pub struct ConfigService {
    pub pool: PgPool,
    pub config: Arc<GantryConfig>,
    /// Wakes the deployment loop when a redeployment is queued.
    pub wake: Arc<Notify>,
}

fn key_refusal(key: &str) -> Option<String> {
    let valid = !key.is_empty()
        && key.len() <= 128
        && key.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        Some(format!("{key:?} is not an environment variable name"))
    } else if key.starts_with("GANTRY_") {
        Some(format!("{key:?}: GANTRY_ names are Gantry's"))
    } else {
        None
    }
}

impl ConfigService {
    fn environment(&self, name: &str) -> Result<&gantry_config::Environment, Status> {
        self.config
            .environment(name)
            .filter(|e| {
                !self
                    .config
                    .project(&e.project)
                    .is_some_and(|p| p.is_stack())
            })
            .ok_or_else(|| ApiError::NotFound(format!("no service environment {name:?}")).into())
    }
}

#[tonic::async_trait]
impl EnvironmentConfig for ConfigService {
    async fn set(
        &self,
        request: Request<SetConfigRequest>,
    ) -> Result<Response<ConfigVersion>, Status> {
        let who = Caller::name_of(&request);
        let req = request.into_inner();
        let env = self.environment(&req.environment)?;
        if req.set.is_empty() && req.unset.is_empty() {
            return Err(ApiError::InvalidArgument("nothing to set or unset".into()).into());
        }
        for key in req.set.keys().chain(&req.unset) {
            if let Some(why) = key_refusal(key) {
                return Err(ApiError::InvalidArgument(why).into());
            }
        }
        if req
            .set
            .values()
            .any(|v| v.len() > MAX_VALUE || v.contains('\0'))
        {
            return Err(ApiError::InvalidArgument(format!(
                "a value has at most {MAX_VALUE} bytes and no NUL"
            ))
            .into());
        }
        let mut tx = self.pool.begin().await.map_err(ApiError::store)?;
        // Serialises the changes of one environment.
        sqlx::query!(
            "SELECT name FROM environments WHERE name = $1 FOR UPDATE",
            env.name
        )
        .fetch_optional(&mut *tx)
        .await
        .map_err(ApiError::store)?;
        let latest: Option<i32> = sqlx::query_scalar!(
            "SELECT max(version) FROM env_config_versions WHERE environment = $1",
            env.name
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(ApiError::store)?;
        let base_version = current(&mut tx, &env.name).await.map_err(ApiError::store)?;
        let base = match base_version {
            Some(v) => load(&self.pool, &env.name, Some(v))
                .await
                .map_err(ApiError::store)?,
            None => None,
        };
        let mut plain = base.as_ref().map(Stored::plain).unwrap_or_default();
        let mut secrets = match &base {
            Some(b) => b
                .secrets(&self.config, &env.name)
                .map_err(ApiError::FailedPrecondition)?,
            None => BTreeMap::new(),
        };
        let mut change = Vec::new();
        for key in &req.unset {
            if plain.remove(key).is_some() || secrets.remove(key).is_some() {
                change.push(format!("-{key}"));
            }
        }
        if let Some(key) = req
            .set
            .keys()
            .find(|k| !req.secret && secrets.contains_key(*k))
        {
            return Err(ApiError::InvalidArgument(format!(
                "{key} is secret: set it with --secret, or unset it first"
            ))
            .into());
        }
        // Nothing was unset, and every value set is the one there already.
        let unchanged = change.is_empty()
            && req.set.iter().all(|(k, v)| {
                if req.secret {
                    secrets.get(k) == Some(v)
                } else {
                    plain.get(k) == Some(v)
                }
            });
        if unchanged {
            return Err(ApiError::FailedPrecondition(format!(
                "nothing changes: version {} already says so",
                base_version.unwrap_or(0)
            ))
            .into());
        }
        for (key, value) in &req.set {
            if req.secret {
                plain.remove(key);
                secrets.insert(key.clone(), value.clone());
                change.push(format!("{key}=[MASKED]"));
            } else {
                secrets.remove(key);
                plain.insert(key.clone(), value.clone());
                change.push(format!("{key}={value}"));
            }
        }
        if plain.len() + secrets.len() > MAX_KEYS {
            return Err(ApiError::InvalidArgument(format!("at most {MAX_KEYS} keys")).into());
        }
        let version = latest.unwrap_or(0) + 1;
        let sealed = if secrets.is_empty() {
            None
        } else {
            let key = self.config.secrets_key.as_ref().ok_or_else(|| {
                ApiError::FailedPrecondition(
                    "secret values cannot be stored: the configuration has no secrets_key (make one with `gantry secrets key`)".into(),
                )
            })?;
            let json = serde_json::to_vec(&secrets).unwrap_or_default();
            Some(
                key.seal(&context(&env.name, version), &json)
                    .ok_or_else(|| {
                        ApiError::FailedPrecondition("no randomness to seal with".into())
                    })?,
            )
        };
        let secret_keys: Vec<String> = secrets.keys().cloned().collect();
        let change = change.join(" ");
        let stored = sqlx::query_as!(
            Stored,
            "INSERT INTO env_config_versions (environment, version, plain, sealed, secret_keys, changed_by, change)
             VALUES ($1, $2, $3, $4, $5, $6, $7)
             RETURNING version, plain, sealed, secret_keys, changed_by, change, failed, created_at",
            env.name,
            version,
            serde_json::to_value(&plain).unwrap_or_default(),
            sealed,
            &secret_keys,
            who,
            change,
        )
        .fetch_one(&mut *tx)
        .await
        .map_err(ApiError::store)?;
        let deployment = redeploy(&mut tx, env, version)
            .await
            .map_err(ApiError::store)?
            .map(Into::into);
        tx.commit().await.map_err(ApiError::store)?;
        self.wake.notify_one();
        tracing::info!(environment = %env.name, version, by = %who, change = %stored.change, "configuration changed");
        let mut info = stored.info(&env.name, stored.entries());
        info.deployment = deployment;
        Ok(Response::new(info))
    }

    async fn show(
        &self,
        request: Request<ShowConfigRequest>,
    ) -> Result<Response<ConfigVersion>, Status> {
        let req = request.into_inner();
        let env = self.environment(&req.environment)?;
        let version = if req.version == 0 {
            let mut tx = self.pool.begin().await.map_err(ApiError::store)?;
            current(&mut tx, &env.name).await.map_err(ApiError::store)?
        } else {
            Some(req.version as i32)
        };
        let stored = load(&self.pool, &env.name, version)
            .await
            .map_err(ApiError::store)?
            .ok_or_else(|| {
                ApiError::NotFound(format!("{} has no such configuration version", env.name))
            })?;
        Ok(Response::new(stored.info(&env.name, stored.entries())))
    }

    async fn history(
        &self,
        request: Request<ConfigHistoryRequest>,
    ) -> Result<Response<ConfigHistoryResponse>, Status> {
        let req = request.into_inner();
        let env = self.environment(&req.environment)?;
        let rows = sqlx::query_as!(
            Stored,
            "SELECT version, plain, sealed, secret_keys, changed_by, change, failed, created_at
             FROM env_config_versions WHERE environment = $1 ORDER BY version DESC",
            env.name,
        )
        .fetch_all(&self.pool)
        .await
        .map_err(ApiError::store)?;
        Ok(Response::new(ConfigHistoryResponse {
            versions: rows.iter().map(|r| r.info(&env.name, Vec::new())).collect(),
        }))
    }

    async fn diff(
        &self,
        request: Request<ConfigDiffRequest>,
    ) -> Result<Response<ConfigDiffResponse>, Status> {
        let req = request.into_inner();
        let env = self.environment(&req.environment)?;
        let get = |v: u32| async move {
            if v == 0 {
                return Ok(None);
            }
            load(&self.pool, &env.name, Some(v as i32))
                .await
                .map_err(ApiError::store)?
                .ok_or_else(|| {
                    ApiError::NotFound(format!("{} has no configuration version {v}", env.name))
                })
                .map(Some)
        };
        let (from, to) = (get(req.from).await?, get(req.to).await?);
        // Secret values are compared opened and shown masked.
        let values = |s: &Option<Stored>| -> Result<BTreeMap<String, (String, bool)>, ApiError> {
            let Some(s) = s else {
                return Ok(BTreeMap::new());
            };
            let mut all: BTreeMap<String, (String, bool)> = s
                .plain()
                .into_iter()
                .map(|(k, v)| (k, (v, false)))
                .collect();
            let secrets = s
                .secrets(&self.config, &env.name)
                .map_err(ApiError::FailedPrecondition)?;
            all.extend(secrets.into_iter().map(|(k, v)| (k, (v, true))));
            Ok(all)
        };
        let (before, after) = (values(&from)?, values(&to)?);
        let shown = |v: &(String, bool)| if v.1 { MASK.to_owned() } else { v.0.clone() };
        let mut changes = Vec::new();
        for (key, b) in &before {
            match after.get(key) {
                None => changes.push(ConfigChange {
                    key: key.clone(),
                    kind: "removed".into(),
                    before: shown(b),
                    after: String::new(),
                    secret: b.1,
                }),
                Some(a) if a != b => changes.push(ConfigChange {
                    key: key.clone(),
                    kind: "changed".into(),
                    before: shown(b),
                    after: shown(a),
                    secret: a.1 || b.1,
                }),
                Some(_) => {}
            }
        }
        for (key, a) in after.iter().filter(|(k, _)| !before.contains_key(*k)) {
            changes.push(ConfigChange {
                key: key.clone(),
                kind: "added".into(),
                before: String::new(),
                after: shown(a),
                secret: a.1,
            });
        }
        changes.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(Response::new(ConfigDiffResponse { changes }))
    }
}
