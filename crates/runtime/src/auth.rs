//! Who may call what: bearer tokens with scopes on every gRPC method, and
//! the same tokens for HTTP pages.
//!
//! [`SCOPES`] is the one table of which scope each `gantry.v1` method needs
//! (a test checks that every method of the proto has its line). Health checks
//! (`grpc.health.v1`) stay open; reflection needs `read`; a path that is not
//! in the table needs `admin`. No token, or one that is not configured, is
//! `UNAUTHENTICATED`; a token without the scope is `PERMISSION_DENIED`. The
//! name of the token that was let in is logged for the calls that change
//! something.

use std::sync::Arc;
use std::task::{Context, Poll};

use gantry_config::{ApiToken, Scope};
use http::HeaderMap;

/// The scope each `gantry.v1` method needs.
pub const SCOPES: &[(&str, Scope)] = &[
    ("/gantry.v1.Ingest/Trigger", Scope::Trigger),
    ("/gantry.v1.Builds/StreamLogs", Scope::Read),
    ("/gantry.v1.Builds/GetBuilds", Scope::Read),
    ("/gantry.v1.Builds/Cancel", Scope::Trigger),
    ("/gantry.v1.Secrets/Set", Scope::Admin),
    ("/gantry.v1.Secrets/Unset", Scope::Admin),
    ("/gantry.v1.Secrets/List", Scope::Read),
    ("/gantry.v1.Deployments/ListEnvironments", Scope::Read),
    ("/gantry.v1.Deployments/ListDeployments", Scope::Read),
    ("/gantry.v1.Deployments/Deploy", Scope::Deploy),
    ("/gantry.v1.Deployments/Rollback", Scope::Deploy),
    ("/gantry.v1.Deployments/Approve", Scope::Deploy),
    ("/gantry.v1.EnvironmentConfig/Set", Scope::Deploy),
    ("/gantry.v1.EnvironmentConfig/Show", Scope::Read),
    ("/gantry.v1.EnvironmentConfig/History", Scope::Read),
    ("/gantry.v1.EnvironmentConfig/Diff", Scope::Read),
    ("/gantry.v1.Deployments/Reject", Scope::Deploy),
    ("/gantry.v1.Stacks/List", Scope::Read),
    ("/gantry.v1.Stacks/Get", Scope::Read),
    ("/gantry.v1.Stacks/ListRuns", Scope::Read),
    ("/gantry.v1.Stacks/ListReleases", Scope::Read),
    ("/gantry.v1.Stacks/Deploy", Scope::Deploy),
    ("/gantry.v1.Stacks/Rollback", Scope::Deploy),
    ("/gantry.v1.Pipelines/List", Scope::Read),
    ("/gantry.v1.Pipelines/Get", Scope::Read),
    ("/gantry.v1.Pipelines/Watch", Scope::Read),
];

/// The scope a gRPC path needs; `None` for the open health service.
pub fn required_scope(path: &str) -> Option<Scope> {
    if path.starts_with("/grpc.health.v1.Health/") {
        return None;
    }
    if path.starts_with("/grpc.reflection.") {
        return Some(Scope::Read);
    }
    Some(
        SCOPES
            .iter()
            .find(|(p, _)| *p == path)
            .map_or(Scope::Admin, |(_, s)| *s),
    )
}

/// The token a request presents: `Authorization: Bearer <token>`, or the
/// password of `Authorization: Basic` (so that a browser can ask for it).
pub fn presented_token(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.trim().split_once(' ')?;
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(rest.trim().to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        use base64::Engine as _;
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(rest.trim())
            .ok()?;
        let text = String::from_utf8(decoded).ok()?;
        return text.split_once(':').map(|(_, p)| p.to_owned());
    }
    None
}

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    #[error("no bearer token: pass one with --token or GANTRY_TOKEN (Authorization: Bearer)")]
    Missing,
    #[error("the bearer token is not one of the configured tokens")]
    Unknown,
    #[error("token {name:?} lacks the {scope} scope")]
    Scope { name: String, scope: Scope },
}

/// Checks the token of `headers` for `scope`; the matching token on success.
pub fn authorize<'a>(
    tokens: &'a [ApiToken],
    headers: &HeaderMap,
    scope: Scope,
) -> Result<&'a ApiToken, Denied> {
    let presented = presented_token(headers).ok_or(Denied::Missing)?;
    let token = gantry_config::tokens::find(tokens, &presented).ok_or(Denied::Unknown)?;
    if token.allows(scope) {
        Ok(token)
    } else {
        Err(Denied::Scope {
            name: token.name.clone(),
            scope,
        })
    }
}

impl From<Denied> for tonic::Status {
    fn from(d: Denied) -> Self {
        match d {
            Denied::Scope { .. } => tonic::Status::permission_denied(d.to_string()),
            _ => tonic::Status::unauthenticated(d.to_string()),
        }
    }
}

/// The caller a request was let in as (a request extension).
#[derive(Debug, Clone)]
pub struct Caller {
    pub token: String,
}

impl Caller {
    /// The name of the token `request` was let in with, for the record of
    /// who changed something.
    pub fn name_of<T>(request: &tonic::Request<T>) -> String {
        request
            .extensions()
            .get::<Caller>()
            .map(|c| c.token.clone())
            .unwrap_or_else(|| "an unnamed caller".into())
    }
}

/// The tower layer that guards a gRPC server with [`authorize`].
#[derive(Clone)]
pub struct AuthLayer {
    tokens: Arc<Vec<ApiToken>>,
}

impl AuthLayer {
    pub fn new(tokens: Vec<ApiToken>) -> Self {
        Self {
            tokens: Arc::new(tokens),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

/// See [`AuthLayer`].
#[derive(Clone)]
pub struct Auth<S> {
    inner: S,
    tokens: Arc<Vec<ApiToken>>,
}

impl<S, B> tower::Service<http::Request<B>> for Auth<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::Either<
        futures::future::Ready<Result<Self::Response, S::Error>>,
        S::Future,
    >;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_owned();
        let Some(scope) = required_scope(&path) else {
            return futures::future::Either::Right(self.inner.call(req));
        };
        match authorize(&self.tokens, req.headers(), scope) {
            Ok(token) => {
                if scope != Scope::Read {
                    tracing::info!(token = %token.name, method = %path, "authorized call");
                }
                req.extensions_mut().insert(Caller {
                    token: token.name.clone(),
                });
                futures::future::Either::Right(self.inner.call(req))
            }
            Err(denied) => {
                tracing::info!(method = %path, reason = %denied, "call refused");
                let status = tonic::Status::from(denied);
                futures::future::Either::Left(futures::future::ready(Ok(status.into_http())))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message as _;

    #[test]
    fn every_gantry_method_has_a_scope() {
        let set = prost_types::FileDescriptorSet::decode(gantry_proto::FILE_DESCRIPTOR_SET)
            .expect("descriptor set");
        let mut methods = Vec::new();
        for file in set.file {
            for service in &file.service {
                for method in &service.method {
                    methods.push(format!(
                        "/{}.{}/{}",
                        file.package(),
                        service.name(),
                        method.name()
                    ));
                }
            }
        }
        assert!(!methods.is_empty());
        for m in &methods {
            assert!(
                SCOPES.iter().any(|(p, _)| p == m),
                "{m} has no line in auth::SCOPES"
            );
        }
        for (p, _) in SCOPES {
            assert!(methods.contains(&p.to_string()), "{p} is not in the proto");
        }
    }

    #[test]
    fn health_is_open_and_the_unknown_needs_admin() {
        assert_eq!(required_scope("/grpc.health.v1.Health/Check"), None);
        assert_eq!(
            required_scope("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"),
            Some(Scope::Read)
        );
        assert_eq!(
            required_scope("/gantry.v1.Secret/Steal"),
            Some(Scope::Admin)
        );
        assert_eq!(
            required_scope("/gantry.v1.Deployments/Deploy"),
            Some(Scope::Deploy)
        );
    }

    #[test]
    fn bearer_and_basic_are_read() {
        let mut h = HeaderMap::new();
        h.insert("authorization", "Bearer abc".parse().expect("header"));
        assert_eq!(presented_token(&h).as_deref(), Some("abc"));
        // "x:abc" in base64
        h.insert("authorization", "Basic eDphYmM=".parse().expect("header"));
        assert_eq!(presented_token(&h).as_deref(), Some("abc"));
        h.insert("authorization", "Token abc".parse().expect("header"));
        assert_eq!(presented_token(&h), None);
    }
}
