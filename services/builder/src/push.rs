//! Pushing a tested image to the registry through the Docker engine that
//! built it. The engine talks plain HTTP to loopback registries and TLS
//! elsewhere, and handles both basic and token authentication with the
//! credentials given. The builder pushes the commit tag; the
//! registry-publisher adds the other tags through the registry API. The
//! manifest digest is the one the engine records with the image
//! (`RepoDigests`), not read from progress text.

use anyhow::Context as _;
use bollard::Docker;
use bollard::query_parameters::{PushImageOptions, TagImageOptions};
use futures::StreamExt;
use gantry_config::Registry;
use gantry_docker::EngineError;

/// The manifest digest of `repository` among an image's `RepoDigests`
/// (`host/path@sha256:...`, recorded by the engine when it pushes).
pub fn digest_of<'a>(repo_digests: &'a [String], repository: &str) -> Option<&'a str> {
    repo_digests.iter().find_map(|d| {
        let (repo, digest) = d.split_once('@')?;
        (repo == repository && digest.starts_with("sha256:") && digest.len() == 71)
            .then_some(digest)
    })
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
        while let Some(item) = progress.next().await {
            let info = item
                .map_err(EngineError)
                .with_context(|| format!("pushing {repository}:{tag}"))?;
            if let Some(msg) = info.error_detail.and_then(|d| d.message) {
                anyhow::bail!("pushing {repository}:{tag}: {msg}");
            }
        }
        // The engine records the manifest digest it pushed with the image.
        let repo_digests = docker
            .inspect_image(image_id)
            .await
            .map_err(EngineError)
            .with_context(|| format!("inspecting {image_id} after its push"))?
            .repo_digests
            .unwrap_or_default();
        let pushed = digest_of(&repo_digests, repository)
            .map(str::to_owned)
            .ok_or_else(|| anyhow::anyhow!("the engine recorded no digest for {repository}"))?;
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
    fn the_pushed_digest_is_the_repository_s() {
        let d = format!("sha256:{}", "ab".repeat(32));
        let other = format!("sha256:{}", "cd".repeat(32));
        let digests = vec![
            format!("127.0.0.1:5000/other@{other}"),
            format!("127.0.0.1:5000/team/hello@{d}"),
        ];
        assert_eq!(
            digest_of(&digests, "127.0.0.1:5000/team/hello"),
            Some(d.as_str())
        );
        assert_eq!(digest_of(&digests, "127.0.0.1:5000/team"), None);
        assert_eq!(digest_of(&["x@sha256:short".to_owned()], "x"), None);
    }
}
