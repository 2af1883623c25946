//! Tagging through the registry's API (Docker Registry v2 / OCI
//! distribution), with `oci-client` speaking the protocol — anonymous
//! access, `Basic` credentials, or a `Bearer` token from the realm the
//! registry's challenge names. Only what tagging needs: read a manifest by
//! digest (checked against that digest here, whatever the registry says)
//! and put the same bytes under more tags. No image data moves, and no
//! Docker engine is involved.

use gantry_config::Registry;
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference, RegistryOperation};
use sha2::{Digest as _, Sha256};

/// Manifest types a tag may point at.
const MANIFEST_TYPES: [&str; 4] = [
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
];
/// The type of a manifest that does not say its own.
const DEFAULT_TYPE: &str = "application/vnd.docker.distribution.manifest.v2+json";

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

/// The media type a manifest declares (`mediaType`), if it does.
fn media_type(manifest: &[u8]) -> Option<String> {
    let value: serde_json::Value = serde_json::from_slice(manifest).ok()?;
    value["mediaType"].as_str().map(str::to_owned)
}

/// Puts the manifest `digest` of `repository` under each of `tags`.
pub async fn tag(
    registry: &Registry,
    repository: &str,
    digest: &str,
    tags: &[String],
) -> anyhow::Result<()> {
    let base = base_url(registry);
    let (scheme, host) = base
        .split_once("://")
        .ok_or_else(|| anyhow::anyhow!("the registry API {base:?} has no scheme"))?;
    let client = Client::new(ClientConfig {
        protocol: if scheme == "http" {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        },
        ..Default::default()
    });
    let auth = match (&registry.username, &registry.password) {
        (Some(user), Some(password)) => {
            RegistryAuth::Basic(user.clone(), password.expose().to_owned())
        }
        _ => RegistryAuth::Anonymous,
    };
    let path = path_of(repository).to_owned();
    let by_digest = Reference::with_digest(host.to_owned(), path.clone(), digest.to_owned());
    // One authentication for reading and writing the repository.
    client
        .auth(&by_digest, &auth, RegistryOperation::Push)
        .await
        .map_err(|e| anyhow::Error::new(e).context(format!("logging in to {host}")))?;
    let (manifest, _) = client
        .pull_manifest_raw(&by_digest, &auth, &MANIFEST_TYPES)
        .await
        .map_err(|e| anyhow::Error::new(e).context(format!("reading {repository}@{digest}")))?;
    let actual = format!("sha256:{}", hex::encode(Sha256::digest(&manifest)));
    anyhow::ensure!(
        actual == digest,
        "the registry returned manifest {actual} for {digest}"
    );
    let content_type = media_type(&manifest).unwrap_or_else(|| DEFAULT_TYPE.to_owned());
    let content_type: reqwest::header::HeaderValue = content_type
        .parse()
        .map_err(|_| anyhow::anyhow!("manifest type {content_type:?} is not a header value"))?;
    for tag in tags {
        let by_tag = Reference::with_tag(host.to_owned(), path.clone(), tag.clone());
        client
            .push_manifest_raw(&by_tag, manifest.clone(), content_type.clone())
            .await
            .map_err(|e| anyhow::Error::new(e).context(format!("tagging {repository}:{tag}")))?;
    }
    Ok(())
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
    fn manifests_say_their_type() {
        let m = br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#;
        assert_eq!(
            media_type(m).as_deref(),
            Some("application/vnd.oci.image.manifest.v1+json")
        );
        assert_eq!(media_type(b"{}"), None);
        assert_eq!(media_type(b"not json"), None);
    }
}
