//! Projects' secrets stored in the builder's database (`gantry secrets
//! set`), sealed with the configuration's `secrets_key` (see
//! [`gantry_seal`]); the builder is the only service that holds the key and
//! opens them, when a build starts. `gantry.v1.Secrets` sets, removes and
//! lists them: a value goes in and never comes out.
//!
//! A stored secret works like one of the configuration file (same name
//! rules, `protected`, masking); a name the file gives cannot also be
//! stored, so that there is never a doubt which value a build gets.

use gantry_config::{GantryConfig, MIN_SECRET_LEN, Project, Secret, StepSecret};
use gantry_proto::v1::secrets_server::Secrets;
use gantry_proto::v1::{
    ListSecretsRequest, ListSecretsResponse, SecretInfo, SetSecretRequest, UnsetSecretRequest,
    UnsetSecretResponse,
};
use gantry_runtime::ApiError;
use gantry_runtime::auth::Caller;
use sqlx::PgPool;
use std::sync::Arc;
use tonic::{Request, Response, Status};

/// The longest value stored.
const MAX_VALUE: usize = 64 * 1024;

/// What a value is sealed for: its project and name.
fn context(project: &str, name: &str) -> String {
    format!("{project}/{name}")
}

/// The stored secrets of `project`, opened. Fails, naming the secret, when
/// one does not open (no `secrets_key`, or another key than it was sealed
/// with): a build must not run without a secret it was given.
pub async fn stored_for(
    pool: &PgPool,
    config: &GantryConfig,
    project: &str,
) -> Result<Vec<StepSecret>, String> {
    // A database that restarts now is waited for, as a build waits for it
    // everywhere else: the build is not failed for it.
    let rows = gantry_retry::Policy::InPlace
        .retry("read the project's stored secrets", || {
            sqlx::query!(
                "SELECT name, sealed, protected FROM project_secrets WHERE project = $1 ORDER BY name",
                project,
            )
            .fetch_all(pool)
        })
        .await
        .map_err(|gave_up| {
            format!(
                "cannot read the project's stored secrets: {}",
                gave_up.error
            )
        })?;
    if rows.is_empty() {
        return Ok(Vec::new());
    }
    let Some(key) = &config.secrets_key else {
        return Err(format!(
            "the project has {} stored secret(s) but the configuration has no secrets_key to open them",
            rows.len()
        ));
    };
    rows.into_iter()
        .map(|row| {
            let value = key
                .open(&context(project, &row.name), &row.sealed)
                .map_err(|e| format!("stored secret {} does not open: {e}", row.name))?;
            let value = String::from_utf8(value)
                .map_err(|_| format!("stored secret {} is not UTF-8", row.name))?;
            Ok(StepSecret {
                name: row.name,
                value: Some(Secret::new(value)),
                protected: row.protected,
            })
        })
        .collect()
}

/// `gantry.v1.Secrets`.
pub struct SecretsService {
    pub pool: PgPool,
    pub config: Arc<GantryConfig>,
}

impl SecretsService {
    fn project(&self, name: &str) -> Result<&Project, ApiError> {
        self.config
            .project(name)
            .filter(|p| !p.is_stack())
            .ok_or_else(|| ApiError::NotFound(format!("no service project {name:?}")))
    }
}

#[tonic::async_trait]
impl Secrets for SecretsService {
    async fn set(
        &self,
        request: Request<SetSecretRequest>,
    ) -> Result<Response<SecretInfo>, Status> {
        let who = Caller::name_of(&request);
        let req = request.into_inner();
        let project = self.project(&req.project)?;
        if let Some(why) = gantry_config::secret_name_refusal(&req.name) {
            return Err(ApiError::InvalidArgument(why).into());
        }
        if req.value.chars().count() < MIN_SECRET_LEN || req.value.len() > MAX_VALUE {
            return Err(ApiError::InvalidArgument(format!(
                "a secret's value has {MIN_SECRET_LEN} characters at least (shorter ones could not be masked in logs) and {MAX_VALUE} bytes at most"
            ))
            .into());
        }
        if project.secrets.iter().any(|s| s.name == req.name) {
            return Err(ApiError::FailedPrecondition(format!(
                "the configuration file gives {:?} its secret {}: change it there",
                project.name, req.name
            ))
            .into());
        }
        let key = self.config.secrets_key.as_ref().ok_or_else(|| {
            ApiError::FailedPrecondition(
                "secrets cannot be stored: the configuration has no secrets_key (make one with `gantry secrets key`)".into(),
            )
        })?;
        let sealed = key
            .seal(&context(&project.name, &req.name), req.value.as_bytes())
            .ok_or_else(|| ApiError::FailedPrecondition("no randomness to seal with".into()))?;
        let row = sqlx::query!(
            "INSERT INTO project_secrets (project, name, sealed, protected, set_by) VALUES ($1, $2, $3, $4, $5)
             ON CONFLICT (project, name) DO UPDATE
               SET sealed = EXCLUDED.sealed, protected = EXCLUDED.protected,
                   set_by = EXCLUDED.set_by, updated_at = now()
             RETURNING updated_at",
            project.name,
            req.name,
            sealed,
            req.protected,
            who,
        )
        .fetch_one(&self.pool)
        .await
        .map_err(ApiError::store)?;
        tracing::info!(project = %project.name, name = %req.name, by = %who, "secret stored");
        Ok(Response::new(SecretInfo {
            project: project.name.clone(),
            name: req.name,
            protected: req.protected,
            source: "stored".into(),
            set_by: who,
            updated_at: Some(gantry_proto::timestamp(row.updated_at)),
        }))
    }

    async fn unset(
        &self,
        request: Request<UnsetSecretRequest>,
    ) -> Result<Response<UnsetSecretResponse>, Status> {
        let who = Caller::name_of(&request);
        let req = request.into_inner();
        let project = self.project(&req.project)?;
        let removed = sqlx::query!(
            "DELETE FROM project_secrets WHERE project = $1 AND name = $2",
            project.name,
            req.name,
        )
        .execute(&self.pool)
        .await
        .map_err(ApiError::store)?;
        if removed.rows_affected() == 0 {
            return Err(ApiError::NotFound(format!(
                "{:?} has no stored secret {:?}",
                project.name, req.name
            ))
            .into());
        }
        tracing::info!(project = %project.name, name = %req.name, by = %who, "secret removed");
        Ok(Response::new(UnsetSecretResponse {}))
    }

    async fn list(
        &self,
        request: Request<ListSecretsRequest>,
    ) -> Result<Response<ListSecretsResponse>, Status> {
        let req = request.into_inner();
        let project = self.project(&req.project)?;
        let mut secrets: Vec<SecretInfo> = project
            .secrets
            .iter()
            .map(|s| SecretInfo {
                project: project.name.clone(),
                name: s.name.clone(),
                protected: s.protected,
                source: "configuration".into(),
                ..Default::default()
            })
            .collect();
        let stored = sqlx::query!(
            "SELECT name, protected, set_by, updated_at FROM project_secrets WHERE project = $1 ORDER BY name",
            project.name,
        )
        .fetch_all(&self.pool)
        .await
        .map_err(ApiError::store)?;
        secrets.extend(stored.into_iter().map(|r| SecretInfo {
            project: project.name.clone(),
            name: r.name,
            protected: r.protected,
            source: "stored".into(),
            set_by: r.set_by,
            updated_at: Some(gantry_proto::timestamp(r.updated_at)),
        }));
        Ok(Response::new(ListSecretsResponse { secrets }))
    }
}
