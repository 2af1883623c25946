//! Bearer tokens of Gantry's gRPC API and pages. The configuration holds only
//! a token's SHA-256 (`gantry token hash` prints it), its name and its
//! scopes; a presented token is hashed and compared with every configured
//! hash in constant time.

use std::fmt;

use crate::yaml::Spanned;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a token may do. `admin` includes every other scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Pipelines, builds and logs, environments and deployments.
    Read,
    /// Start pipelines (`Ingest.Trigger`).
    Trigger,
    /// Deploy and roll back (`Deployments.Deploy`, `Deployments.Rollback`).
    Deploy,
    /// Everything, including what has no narrower scope.
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Trigger => "trigger",
            Scope::Deploy => "deploy",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A configured token: who it is for and what it may do.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiToken {
    pub name: String,
    sha256: [u8; 32],
    pub scopes: Vec<Scope>,
}

impl fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiToken")
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .finish_non_exhaustive()
    }
}

impl ApiToken {
    /// Whether the token grants `scope`.
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&Scope::Admin) || self.scopes.contains(&scope)
    }
}

/// The hex SHA-256 of a token, as the configuration holds it.
pub fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.trim().as_bytes()))
}

/// The configured token that `presented` is, if any. Every hash is compared,
/// in constant time, so neither timing nor order tells which one matched.
pub fn find<'a>(tokens: &'a [ApiToken], presented: &str) -> Option<&'a ApiToken> {
    let digest: [u8; 32] = Sha256::digest(presented.trim().as_bytes()).into();
    let mut found = None;
    for t in tokens {
        if bool::from(t.sha256.ct_eq(&digest)) && found.is_none() {
            found = Some(t);
        }
    }
    found
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawToken {
    name: String,
    sha256: String,
    scopes: Vec<Scope>,
}

/// Validates the configured tokens; `problem(at, text)` records what is wrong
/// with the entry at `at`.
pub(crate) fn validate(
    raw: Vec<Spanned<RawToken>>,
    problem: &mut dyn FnMut(crate::At<'_>, String),
) -> Vec<ApiToken> {
    let mut out: Vec<ApiToken> = Vec::new();
    for (i, sp) in raw.into_iter().enumerate() {
        let what = format!("tokens[{i}] ({})", sp.value.name);
        let at = crate::At::of(&sp, &what);
        let t = sp.value;
        if t.name.trim().is_empty() {
            problem(at, "name is empty".into());
        }
        if out.iter().any(|o| o.name == t.name) {
            problem(at, "duplicate token name".into());
        }
        if t.scopes.is_empty() {
            problem(
                at,
                "scopes is empty; expected some of read, trigger, deploy, admin".into(),
            );
        }
        let hash = hex::decode(t.sha256.trim().to_ascii_lowercase())
            .ok()
            .and_then(|b| <[u8; 32]>::try_from(b).ok());
        let Some(sha256) = hash else {
            problem(
                at,
                "sha256 must be 64 hex digits (`gantry token hash` prints it), not the token itself"
                    .into(),
            );
            continue;
        };
        if out.iter().any(|o| o.sha256 == sha256) {
            problem(at, "the same token is configured twice".into());
        }
        out.push(ApiToken {
            name: t.name,
            sha256,
            scopes: t.scopes,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ConfigError, GantryConfig};

    #[test]
    fn tokens_are_found_by_hash_with_their_scopes() {
        let text = format!(
            "tokens:\n  - {{name: ci, sha256: {}, scopes: [read, trigger]}}\n  - {{name: ops, sha256: {}, scopes: [admin]}}\n",
            token_hash("t1"),
            token_hash("t2").to_uppercase()
        );
        let config = GantryConfig::parse("g.yml", &text).expect("valid");
        let ci = config.token("t1").expect("ci");
        assert_eq!(ci.name, "ci");
        assert!(ci.allows(Scope::Trigger) && !ci.allows(Scope::Deploy));
        assert!(config.token("t2").expect("ops").allows(Scope::Deploy));
        assert!(config.token("t3").is_none());
        assert!(config.token("").is_none());
    }

    #[test]
    fn a_token_in_clear_is_refused_where_it_is_written() {
        let err = GantryConfig::parse(
            "g.yml",
            "public_url: http://x\ntokens:\n  - name: oops\n    sha256: gty_the-token-itself\n    scopes: [read]\n",
        )
        .expect_err("refused");
        let ConfigError::Invalid { problems, .. } = err else {
            panic!("expected a validation error, got {err}");
        };
        assert!(
            problems[0].starts_with("g.yml:3:5: tokens[0] (oops): sha256 must be 64 hex digits"),
            "{problems:?}"
        );
    }
}
