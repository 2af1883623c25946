//! The registry's HTTP API (Docker Registry v2 / OCI distribution), just what
//! tagging needs: read a manifest by digest and put it under more tags. No
//! image data moves, and no Docker engine is involved.
//!
//! Authentication follows the registry's challenge: anonymous first; on a 401
//! `Basic` challenge the configured credentials; on a `Bearer` challenge a
//! token from the realm it names (with the credentials, if any).

use std::time::Duration;

use gantry_config::Registry;
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use sha2::{Digest as _, Sha256};

/// Manifest types a tag may point at.
const MANIFEST_TYPES: &str = "application/vnd.oci.image.manifest.v1+json, \
     application/vnd.docker.distribution.manifest.v2+json, \
     application/vnd.oci.image.index.v1+json, \
     application/vnd.docker.distribution.manifest.list.v2+json";
/// Timeout of one registry call.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

pub struct RegistryApi {
    client: reqwest::Client,
}

/// Where the API of `registry` is: its `api` setting, else plain HTTP for a
/// loopback host (as the Docker engine does) and HTTPS otherwise.
pub fn base_url(registry: &Registry) -> String {
    if let Some(api) = &registry.api {
        return api.trim_end_matches('/').to_owned();
    }
    let host = registry.host.as_str();
    let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
    let loopback = name == "localhost" || name.starts_with("127.") || name == "[::1]";
    format!("{}://{host}", if loopback { "http" } else { "https" })
}

/// The repository path inside its registry (`team/service` of `host/team/service`).
pub fn path_of(repository: &str) -> &str {
    repository.split_once('/').map_or("", |(_, p)| p)
}

/// `key="value"` pairs of a challenge's parameters.
/// Values may be quoted and hold commas (`scope="repository:a:pull,push"`).
fn challenge_params(challenge: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = challenge.trim();
    while let Some((key, after)) = rest.split_once('=') {
        let key = key
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        let (value, next) = match after.strip_prefix('"') {
            Some(quoted) => match quoted.split_once('"') {
                Some((v, n)) => (v, n),
                None => (quoted, ""),
            },
            None => after.split_once(',').unwrap_or((after, "")),
        };
        out.push((key, value.to_owned()));
        rest = next.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
    }
    out
}

impl RegistryApi {
    pub fn new() -> anyhow::Result<Self> {
        let client = reqwest::Client::builder()
            .timeout(CALL_TIMEOUT)
            .user_agent(concat!(
                "gantry-registry-publisher/",
                env!("CARGO_PKG_VERSION")
            ))
            .build()?;
        Ok(Self { client })
    }

    /// The `Authorization` value answering a 401's challenge.
    async fn authorize(&self, registry: &Registry, challenge: &str) -> anyhow::Result<String> {
        let basic = || {
            let user = registry.username.clone().unwrap_or_default();
            let pass = registry
                .password
                .as_ref()
                .map(|p| p.expose().to_owned())
                .unwrap_or_default();
            (user, pass)
        };
        let (scheme, params) = challenge.split_once(' ').unwrap_or((challenge, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            anyhow::ensure!(
                registry.username.is_some(),
                "the registry wants a login and none is configured"
            );
            let (user, pass) = basic();
            let token = base64(&format!("{user}:{pass}"));
            return Ok(format!("Basic {token}"));
        }
        anyhow::ensure!(
            scheme.eq_ignore_ascii_case("bearer"),
            "unsupported authentication {scheme:?}"
        );
        let params = challenge_params(params);
        let get = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let realm =
            get("realm").ok_or_else(|| anyhow::anyhow!("bearer challenge without realm"))?;
        let mut query = Vec::new();
        if let Some(service) = get("service") {
            query.push(("service", service));
        }
        if let Some(scope) = get("scope") {
            query.push(("scope", scope));
        }
        let url = reqwest::Url::parse_with_params(&realm, &query)?;
        let mut request = self.client.get(url);
        if registry.username.is_some() {
            let (user, pass) = basic();
            request = request.basic_auth(user, Some(pass));
        }
        let response = request.send().await.map_err(reqwest::Error::without_url)?;
        anyhow::ensure!(
            response.status().is_success(),
            "token service answered {}",
            response.status()
        );
        let body: serde_json::Value = response.json().await?;
        let token = body["token"]
            .as_str()
            .or_else(|| body["access_token"].as_str())
            .ok_or_else(|| anyhow::anyhow!("token service gave no token"))?;
        Ok(format!("Bearer {token}"))
    }

    /// Sends the request `make` builds, answering one authentication challenge.
    async fn send(
        &self,
        registry: &Registry,
        make: impl Fn() -> reqwest::RequestBuilder,
        auth: &mut Option<String>,
    ) -> anyhow::Result<reqwest::Response> {
        let with = |a: &Option<String>| match a {
            Some(v) => make().header(AUTHORIZATION, v),
            None => make(),
        };
        let response = with(auth)
            .send()
            .await
            .map_err(reqwest::Error::without_url)?;
        if response.status() != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        let challenge = response
            .headers()
            .get(WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("Basic")
            .to_owned();
        *auth = Some(self.authorize(registry, &challenge).await?);
        let response = with(auth)
            .send()
            .await
            .map_err(reqwest::Error::without_url)?;
        anyhow::ensure!(
            response.status() != StatusCode::UNAUTHORIZED,
            "the registry refused the credentials (401)"
        );
        Ok(response)
    }

    /// Puts the manifest `digest` of `repository` under each of `tags`.
    pub async fn tag(
        &self,
        registry: &Registry,
        repository: &str,
        digest: &str,
        tags: &[String],
    ) -> anyhow::Result<()> {
        let base = base_url(registry);
        let path = path_of(repository);
        let mut auth = None;
        let url = format!("{base}/v2/{path}/manifests/{digest}");
        let response = self
            .send(
                registry,
                || self.client.get(&url).header(ACCEPT, MANIFEST_TYPES),
                &mut auth,
            )
            .await
            .map_err(|e| e.context(format!("reading {repository}@{digest}")))?;
        let status = response.status();
        anyhow::ensure!(
            status.is_success(),
            "reading {repository}@{digest}: the registry answered {status}"
        );
        let content_type = response
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("application/vnd.docker.distribution.manifest.v2+json")
            .to_owned();
        let manifest = response.bytes().await?;
        let actual = format!("sha256:{}", hex::encode(Sha256::digest(&manifest)));
        anyhow::ensure!(
            actual == digest,
            "the registry returned manifest {actual} for {digest}"
        );
        for tag in tags {
            let url = format!("{base}/v2/{path}/manifests/{tag}");
            let response = self
                .send(
                    registry,
                    || {
                        self.client
                            .put(&url)
                            .header(CONTENT_TYPE, &content_type)
                            .body(manifest.clone())
                    },
                    &mut auth,
                )
                .await
                .map_err(|e| e.context(format!("tagging {repository}:{tag}")))?;
            let status = response.status();
            if !status.is_success() {
                let text: String = response
                    .text()
                    .await
                    .unwrap_or_default()
                    .chars()
                    .take(200)
                    .collect();
                anyhow::bail!("tagging {repository}:{tag}: the registry answered {status}: {text}");
            }
            if let Some(d) = response
                .headers()
                .get("docker-content-digest")
                .and_then(|v| v.to_str().ok())
            {
                anyhow::ensure!(
                    d == digest,
                    "{repository}:{tag} got digest {d}, not {digest}"
                );
            }
        }
        Ok(())
    }
}

fn base64(s: &str) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let bytes = s.as_bytes();
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn registry(host: &str) -> Registry {
        Registry {
            host: host.into(),
            api: None,
            username: None,
            password: None,
        }
    }

    #[test]
    fn api_urls() {
        assert_eq!(
            base_url(&registry("127.0.0.1:5000")),
            "http://127.0.0.1:5000"
        );
        assert_eq!(
            base_url(&registry("localhost:5000")),
            "http://localhost:5000"
        );
        assert_eq!(
            base_url(&registry("registry.example.com")),
            "https://registry.example.com"
        );
        assert_eq!(path_of("127.0.0.1:5000/team/web"), "team/web");
    }

    #[test]
    fn basic_credentials_are_base64() {
        assert_eq!(base64("ci:s3cret"), "Y2k6czNjcmV0");
        assert_eq!(base64("a"), "YQ==");
        assert_eq!(base64("ab"), "YWI=");
    }

    #[test]
    fn bearer_challenges_are_parsed() {
        let p = challenge_params(
            r#"realm="https://auth.example.com/token",service="registry.example.com",scope="repository:team/web:pull,push""#,
        );
        assert_eq!(
            p[0],
            ("realm".into(), "https://auth.example.com/token".into())
        );
        assert_eq!(p[1].1, "registry.example.com");
        assert_eq!(
            p[2],
            ("scope".into(), "repository:team/web:pull,push".into())
        );
        let p = challenge_params("realm=https://a/t,service=r");
        assert_eq!(
            p,
            [
                ("realm".into(), "https://a/t".into()),
                ("service".into(), "r".into())
            ]
        );
    }
}
