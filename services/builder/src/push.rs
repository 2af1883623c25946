//! Pushing a tested image to the registry through the Docker engine that
//! built it. The engine talks plain HTTP to loopback registries and TLS
//! elsewhere, and handles both basic and token authentication with the
//! credentials given. The builder pushes the commit tag; the
//! registry-publisher adds the other tags through the registry API.

use anyhow::Context as _;
use bollard::Docker;
use bollard::query_parameters::{PushImageOptions, TagImageOptions};
use futures::StreamExt;
use gantry_config::Registry;
use gantry_docker::EngineError;

/// The manifest digest from a push progress line such as
/// `1.2.3: digest: sha256:abc... size: 527`.
pub fn digest_in(status: &str) -> Option<&str> {
    let (_, rest) = status.split_once("digest: ")?;
    let digest = rest.split_whitespace().next()?;
    (digest.starts_with("sha256:") && digest.len() == 71).then_some(digest)
}

/// Tags `image_id` as `repository:tag` for every tag and pushes each; returns
/// the manifest digest they all share.
pub async fn push(
    docker: &Docker,
    image_id: &str,
    repository: &str,
    tags: &[String],
    registry: &Registry,
) -> anyhow::Result<String> {
    let credentials = gantry_docker::credentials(registry);
    let mut digest: Option<String> = None;
    for tag in tags {
        docker
            .tag_image(
                image_id,
                Some(TagImageOptions {
                    repo: Some(repository.to_owned()),
                    tag: Some(tag.clone()),
                }),
            )
            .await
            .map_err(EngineError)
            .with_context(|| format!("cannot tag {image_id} as {repository}:{tag}"))?;
        let mut progress = docker.push_image(
            repository,
            Some(PushImageOptions {
                tag: Some(tag.clone()),
                ..Default::default()
            }),
            credentials.clone(),
        );
        let mut pushed = None;
        while let Some(item) = progress.next().await {
            let info = item
                .map_err(EngineError)
                .with_context(|| format!("pushing {repository}:{tag}"))?;
            if let Some(msg) = info.error_detail.and_then(|d| d.message) {
                anyhow::bail!("pushing {repository}:{tag}: {msg}");
            }
            if let Some(d) = info.status.as_deref().and_then(digest_in) {
                pushed = Some(d.to_owned());
            }
        }
        let pushed = pushed
            .ok_or_else(|| anyhow::anyhow!("push of {repository}:{tag} reported no digest"))?;
        match &digest {
            None => digest = Some(pushed),
            Some(d) if *d != pushed => {
                anyhow::bail!("{repository}:{tag} has digest {pushed}, other tags {d}")
            }
            Some(_) => {}
        }
    }
    digest.ok_or_else(|| anyhow::anyhow!("no tags to push"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_from_push_status() {
        let d = format!("sha256:{}", "ab".repeat(32));
        assert_eq!(
            digest_in(&format!("latest: digest: {d} size: 527")),
            Some(d.as_str())
        );
        assert_eq!(digest_in("Pushed"), None);
        assert_eq!(digest_in("x: digest: sha256:short size: 1"), None);
    }
}
