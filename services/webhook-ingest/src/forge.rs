//! What GitLab and GitHub send: the push payloads we accept, turned into a
//! [`Revision`], and the checks of their secrets (constant time).

use gantry_proto::v1::Revision;
use hmac::{KeyInit, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The all-zero sha forges send as `after` when a ref is deleted.
const ZERO_SHA: &str = "0000000000000000000000000000000000000000";

/// Compares a GitLab `X-Gitlab-Token` with the project's secret in constant
/// time (both are hashed first so that their lengths leak nothing either).
pub fn gitlab_token_matches(given: &[u8], secret: &str) -> bool {
    let a = Sha256::digest(given);
    let b = Sha256::digest(secret.as_bytes());
    a.ct_eq(&b).into()
}

/// Checks a GitHub `X-Hub-Signature-256` (`sha256=<hex>`) over the raw body.
pub fn github_signature_matches(header: &[u8], body: &[u8], secret: &str) -> bool {
    let Some(hex_sig) = header.strip_prefix(b"sha256=") else {
        return false;
    };
    let Ok(given) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = hmac::Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

/// What a push means for Gantry.
#[derive(Debug)]
pub enum PushOutcome {
    Build(Box<Revision>),
    /// Nothing to build (a deleted branch or tag), with why.
    Ignore(&'static str),
}

#[derive(Debug, Deserialize)]
pub struct GitlabPush {
    pub object_kind: String,
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The commit the ref pointed at before the push (zeros for a new ref).
    #[serde(default)]
    pub before: String,
    pub after: String,
    #[serde(default)]
    pub checkout_sha: Option<String>,
    #[serde(default)]
    pub user_name: Option<String>,
    #[serde(default)]
    pub user_email: Option<String>,
    pub project: GitlabProject,
    #[serde(default)]
    pub commits: Vec<GitlabCommit>,
}

#[derive(Debug, Deserialize)]
pub struct GitlabProject {
    pub path_with_namespace: String,
    #[serde(default)]
    pub default_branch: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct GitlabCommit {
    pub id: String,
    #[serde(default)]
    pub message: String,
    pub author: Person,
}

#[derive(Debug, Deserialize)]
pub struct Person {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub email: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct GithubPush {
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The commit the ref pointed at before the push (zeros for a new ref).
    #[serde(default)]
    pub before: String,
    pub after: String,
    #[serde(default)]
    pub deleted: bool,
    pub repository: GithubRepository,
    #[serde(default)]
    pub pusher: Option<Person>,
    #[serde(default)]
    pub head_commit: Option<GithubCommit>,
}

#[derive(Debug, Deserialize)]
pub struct GithubRepository {
    pub full_name: String,
    #[serde(default)]
    pub default_branch: Option<String>,
}

#[derive(Debug, Deserialize)]
pub struct GithubCommit {
    pub id: String,
    #[serde(default)]
    pub message: String,
    pub author: Person,
}

/// Fills branch/tag from a full git ref.
pub fn revision_for_ref(git_ref: &str, sha: &str) -> Revision {
    let mut rev = Revision {
        git_ref: git_ref.to_owned(),
        commit_sha: sha.to_owned(),
        ..Default::default()
    };
    if let Some(b) = git_ref.strip_prefix("refs/heads/") {
        rev.branch = b.to_owned();
    } else if let Some(t) = git_ref.strip_prefix("refs/tags/") {
        rev.tag = t.to_owned();
    }
    rev
}

fn is_sha(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The push's `before` when it names a commit (not a new ref's zeros, not
/// something else a payload may carry).
fn before_sha(before: &str) -> String {
    if is_sha(before) && before != ZERO_SHA {
        before.to_ascii_lowercase()
    } else {
        String::new()
    }
}

impl GitlabPush {
    pub fn outcome(&self) -> Result<PushOutcome, String> {
        let sha = self.checkout_sha.as_deref().unwrap_or(&self.after);
        if self.after == ZERO_SHA || sha.is_empty() {
            return Ok(PushOutcome::Ignore("ref deleted"));
        }
        if !is_sha(sha) {
            return Err(format!(
                "checkout_sha/after {sha:?} is not a 40-digit commit sha"
            ));
        }
        if !self.git_ref.starts_with("refs/heads/") && !self.git_ref.starts_with("refs/tags/") {
            return Err(format!(
                "ref {:?} is neither refs/heads/* nor refs/tags/*",
                self.git_ref
            ));
        }
        let mut rev = revision_for_ref(&self.git_ref, sha);
        rev.before_sha = before_sha(&self.before);
        rev.source = "gitlab".into();
        rev.forge_project = self.project.path_with_namespace.clone();
        rev.default_branch = self.project.default_branch.clone().unwrap_or_default();
        if let Some(c) = self.commits.iter().find(|c| c.id == sha) {
            rev.author_name = c.author.name.clone();
            rev.author_email = c.author.email.clone().unwrap_or_default();
            rev.commit_message = c.message.clone();
        } else {
            rev.author_name = self.user_name.clone().unwrap_or_default();
            rev.author_email = self.user_email.clone().unwrap_or_default();
        }
        Ok(PushOutcome::Build(Box::new(rev)))
    }
}

impl GithubPush {
    pub fn outcome(&self) -> Result<PushOutcome, String> {
        if self.deleted || self.after == ZERO_SHA {
            return Ok(PushOutcome::Ignore("ref deleted"));
        }
        if !is_sha(&self.after) {
            return Err(format!(
                "after {:?} is not a 40-digit commit sha",
                self.after
            ));
        }
        if !self.git_ref.starts_with("refs/heads/") && !self.git_ref.starts_with("refs/tags/") {
            return Err(format!(
                "ref {:?} is neither refs/heads/* nor refs/tags/*",
                self.git_ref
            ));
        }
        let mut rev = revision_for_ref(&self.git_ref, &self.after);
        rev.before_sha = before_sha(&self.before);
        rev.source = "github".into();
        rev.forge_project = self.repository.full_name.clone();
        rev.default_branch = self.repository.default_branch.clone().unwrap_or_default();
        if let Some(c) = &self.head_commit {
            rev.author_name = c.author.name.clone();
            rev.author_email = c.author.email.clone().unwrap_or_default();
            rev.commit_message = c.message.clone();
        } else if let Some(p) = &self.pusher {
            rev.author_name = p.name.clone();
            rev.author_email = p.email.clone().unwrap_or_default();
        }
        Ok(PushOutcome::Build(Box::new(rev)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gitlab_token_compare() {
        assert!(gitlab_token_matches(b"s3cret", "s3cret"));
        assert!(!gitlab_token_matches(b"s3cre", "s3cret"));
        assert!(!gitlab_token_matches(b"", "s3cret"));
    }

    #[test]
    fn github_signature_known_vector() {
        // From GitHub's documentation on validating webhook deliveries.
        let sig = b"sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert!(github_signature_matches(
            sig,
            b"Hello, World!",
            "It's a Secret to Everybody"
        ));
        assert!(!github_signature_matches(
            sig,
            b"Hello, World?",
            "It's a Secret to Everybody"
        ));
        assert!(!github_signature_matches(b"sha1=00", b"Hello, World!", "x"));
        assert!(!github_signature_matches(
            b"sha256=zz",
            b"Hello, World!",
            "x"
        ));
    }

    #[test]
    fn refs_become_branches_or_tags() {
        let r = revision_for_ref("refs/heads/feature/x", "a");
        assert_eq!((r.branch.as_str(), r.tag.as_str()), ("feature/x", ""));
        let r = revision_for_ref("refs/tags/v1.2.3", "a");
        assert_eq!((r.branch.as_str(), r.tag.as_str()), ("", "v1.2.3"));
    }

    #[test]
    fn before_is_kept_only_when_it_names_a_commit() {
        let sha = "95790bf891e76fee5e1747ab589903a6a1f80f22";
        assert_eq!(before_sha(sha), sha);
        assert_eq!(before_sha(&sha.to_uppercase()), sha);
        assert_eq!(before_sha(ZERO_SHA), "");
        assert_eq!(before_sha(""), "");
        assert_eq!(before_sha("--upload-pack=evil"), "");
    }
}
