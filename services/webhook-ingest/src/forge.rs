//! What GitLab, GitHub and Gitea send: the push and merge request payloads
//! we accept, turned into a [`Revision`], and the checks of their secrets
//! (constant time).
//!
//! A merge request's pipeline builds its head commit: `git_ref` is the
//! forge's ref of that head (`refs/merge-requests/<iid>/head` on GitLab,
//! `refs/pull/<n>/head` on GitHub and Gitea) and branch and tag stay empty,
//! so that no branch or tag rule (deployment, protected secrets, tags) ever
//! applies to it. Only new commits start one: opening, reopening, pushing.

use gantry_proto::v1::{MergeRequest, Revision};
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
    hmac_matches(hex_sig, body, secret)
}

/// Checks a Gitea `X-Gitea-Signature` (the HMAC-SHA256 in hex, no prefix)
/// over the raw body.
pub fn gitea_signature_matches(header: &[u8], body: &[u8], secret: &str) -> bool {
    hmac_matches(header, body, secret)
}

fn hmac_matches(hex_sig: &[u8], body: &[u8], secret: &str) -> bool {
    let Ok(given) = hex::decode(hex_sig) else {
        return false;
    };
    let Ok(mut mac) = hmac::Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(body);
    mac.verify_slice(&given).is_ok()
}

/// What a push or a merge request event means for Gantry.
#[derive(Debug)]
pub enum PushOutcome {
    /// Build this revision; for a fork's merge request, the fork's clone
    /// URLs the forge named (the first on the project's server is used).
    Build(Box<Revision>, Vec<String>),
    /// Nothing to build (a deleted branch, a merge request's title edited),
    /// with why.
    Ignore(String),
}

fn ignore(why: impl Into<String>) -> Result<PushOutcome, String> {
    Ok(PushOutcome::Ignore(why.into()))
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

/// A GitHub `push`; a Gitea `push` has the same fields.
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
    pub pusher: Option<Pusher>,
    #[serde(default)]
    pub head_commit: Option<GithubCommit>,
}

/// Who pushed: GitHub sends `name` (the login), Gitea `login` and
/// `full_name` too.
#[derive(Debug, Deserialize)]
pub struct Pusher {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub full_name: String,
    #[serde(default)]
    pub login: String,
    #[serde(default)]
    pub email: Option<String>,
}

impl Pusher {
    fn display_name(&self) -> String {
        [&self.full_name, &self.name, &self.login]
            .into_iter()
            .find(|n| !n.is_empty())
            .cloned()
            .unwrap_or_default()
    }
}

#[derive(Debug, Deserialize)]
pub struct GithubRepository {
    pub full_name: String,
    #[serde(default)]
    pub default_branch: Option<String>,
    #[serde(default)]
    pub clone_url: Option<String>,
    #[serde(default)]
    pub ssh_url: Option<String>,
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
            return ignore("ref deleted");
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
        Ok(PushOutcome::Build(Box::new(rev), Vec::new()))
    }
}

impl GithubPush {
    /// The push's outcome; `source` is `github` or `gitea`.
    pub fn outcome(&self, source: &str) -> Result<PushOutcome, String> {
        if self.deleted || self.after == ZERO_SHA {
            return ignore("ref deleted");
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
        rev.source = source.into();
        rev.forge_project = self.repository.full_name.clone();
        rev.default_branch = self.repository.default_branch.clone().unwrap_or_default();
        if let Some(c) = &self.head_commit {
            rev.author_name = c.author.name.clone();
            rev.author_email = c.author.email.clone().unwrap_or_default();
            rev.commit_message = c.message.clone();
        } else if let Some(p) = &self.pusher {
            rev.author_name = p.display_name();
            rev.author_email = p.email.clone().unwrap_or_default();
        }
        Ok(PushOutcome::Build(Box::new(rev), Vec::new()))
    }
}

/// A GitLab `Merge Request Hook` body (`object_kind: merge_request`).
#[derive(Debug, Deserialize)]
pub struct GitlabMergeRequest {
    pub object_kind: String,
    pub project: GitlabProject,
    pub object_attributes: GitlabMrAttributes,
}

/// What a merge request hook says of the merge request. Only what every
/// action carries is required: the others (null once a fork is deleted, for
/// instance) are checked for the actions that build.
#[derive(Debug, Deserialize)]
pub struct GitlabMrAttributes {
    pub iid: u64,
    #[serde(default)]
    pub action: Option<String>,
    /// The head before an `update` that added commits (absent otherwise).
    #[serde(default)]
    pub oldrev: Option<String>,
    #[serde(default)]
    pub source_branch: String,
    #[serde(default)]
    pub target_branch: String,
    #[serde(default)]
    pub source_project_id: Option<u64>,
    #[serde(default)]
    pub target_project_id: Option<u64>,
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub url: String,
    #[serde(default)]
    pub source: Option<GitlabMrProject>,
    #[serde(default)]
    pub last_commit: Option<GitlabCommit>,
}

#[derive(Debug, Deserialize)]
pub struct GitlabMrProject {
    pub path_with_namespace: String,
    #[serde(default)]
    pub git_http_url: Option<String>,
    #[serde(default)]
    pub git_ssh_url: Option<String>,
}

/// The clone URLs the forge names for a fork's head (none for a merge
/// request inside the project).
fn fork_urls(from_fork: bool, urls: [&Option<String>; 2]) -> Vec<String> {
    if !from_fork {
        return Vec::new();
    }
    urls.into_iter().flatten().cloned().collect()
}

/// A merge request's revision, common to every forge.
fn merge_request_revision(
    source: &str,
    git_ref: String,
    sha: &str,
    forge_project: &str,
    mr: MergeRequest,
) -> Result<Revision, String> {
    if !is_sha(sha) {
        return Err(format!("head commit {sha:?} is not a 40-digit commit sha"));
    }
    Ok(Revision {
        git_ref,
        commit_sha: sha.to_ascii_lowercase(),
        source: source.into(),
        forge_project: forge_project.to_owned(),
        merge_request: Some(mr),
        ..Default::default()
    })
}

impl GitlabMergeRequest {
    pub fn outcome(&self) -> Result<PushOutcome, String> {
        let a = &self.object_attributes;
        let action = a.action.as_deref().unwrap_or_default();
        match action {
            "open" | "reopen" => {}
            "update" if a.oldrev.as_deref().is_some_and(|r| !r.is_empty()) => {}
            "update" => return ignore("merge request updated without new commits"),
            other => return ignore(format!("merge request action {other:?} starts no pipeline")),
        }
        let (Some(source), Some(source_id)) = (&a.source, a.source_project_id) else {
            return ignore("the merge request's source project was deleted");
        };
        let Some(last_commit) = &a.last_commit else {
            return Err("object_attributes.last_commit is missing".into());
        };
        let from_fork = a.target_project_id != Some(source_id);
        let mr = MergeRequest {
            number: a.iid,
            source_branch: a.source_branch.clone(),
            target_branch: a.target_branch.clone(),
            title: a.title.clone(),
            url: a.url.clone(),
            from_fork,
            head_clone_url: String::new(),
            head_project: if from_fork {
                source.path_with_namespace.clone()
            } else {
                String::new()
            },
        };
        let mut rev = merge_request_revision(
            "gitlab",
            format!("refs/merge-requests/{}/head", a.iid),
            &last_commit.id,
            &self.project.path_with_namespace,
            mr,
        )?;
        rev.before_sha = before_sha(a.oldrev.as_deref().unwrap_or_default());
        rev.default_branch = self.project.default_branch.clone().unwrap_or_default();
        rev.author_name = last_commit.author.name.clone();
        rev.author_email = last_commit.author.email.clone().unwrap_or_default();
        rev.commit_message = last_commit.message.clone();
        let forks = fork_urls(from_fork, [&source.git_http_url, &source.git_ssh_url]);
        Ok(PushOutcome::Build(Box::new(rev), forks))
    }
}

/// A GitHub `pull_request` or Gitea `pull_request` body.
#[derive(Debug, Deserialize)]
pub struct PullRequestEvent {
    pub action: String,
    pub number: u64,
    /// The head before a `synchronize` (GitHub).
    #[serde(default)]
    pub before: Option<String>,
    pub pull_request: PullRequest,
    #[serde(default)]
    pub sender: Option<Pusher>,
}

#[derive(Debug, Deserialize)]
pub struct PullRequest {
    #[serde(default)]
    pub title: String,
    #[serde(default)]
    pub html_url: String,
    pub head: PullRequestEnd,
    pub base: PullRequestEnd,
    #[serde(default)]
    pub user: Option<Pusher>,
    /// Gitea: 1 for a pull request pushed with AGit (`git push origin
    /// HEAD:refs/for/main`), which anyone who can read may open.
    #[serde(default)]
    pub flow: Option<i64>,
}

#[derive(Debug, Deserialize)]
pub struct PullRequestEnd {
    #[serde(rename = "ref")]
    pub branch: String,
    pub sha: String,
    /// Null when the head's fork was deleted.
    #[serde(default)]
    pub repo: Option<GithubRepository>,
}

impl PullRequestEvent {
    /// The event's outcome; `source` is `github` or `gitea` (which calls a
    /// push to the head `synchronized`).
    pub fn outcome(&self, source: &str) -> Result<PushOutcome, String> {
        match self.action.as_str() {
            "opened" | "reopened" | "synchronize" | "synchronized" => {}
            other => {
                return ignore(format!("pull request action {other:?} starts no pipeline"));
            }
        }
        let pr = &self.pull_request;
        let Some(base) = &pr.base.repo else {
            return Err("pull_request.base.repo is missing".into());
        };
        let Some(head) = &pr.head.repo else {
            return ignore("the pull request's head repository was deleted");
        };
        // A Gitea AGit pull request lives in the base repository but anyone
        // who can read it may push one (its head ref is `refs/…`, not a
        // branch): it is treated as a fork's.
        let agit = pr.flow.is_some_and(|f| f != 0) || pr.head.branch.starts_with("refs/");
        let from_fork = agit || !head.full_name.eq_ignore_ascii_case(&base.full_name);
        let mr = MergeRequest {
            number: self.number,
            source_branch: pr.head.branch.clone(),
            target_branch: pr.base.branch.clone(),
            title: pr.title.clone(),
            url: pr.html_url.clone(),
            from_fork,
            head_clone_url: String::new(),
            head_project: if from_fork {
                head.full_name.clone()
            } else {
                String::new()
            },
        };
        let mut rev = merge_request_revision(
            source,
            format!("refs/pull/{}/head", self.number),
            &pr.head.sha,
            &base.full_name,
            mr,
        )?;
        rev.before_sha = before_sha(self.before.as_deref().unwrap_or_default());
        rev.default_branch = base.default_branch.clone().unwrap_or_default();
        if let Some(who) = pr.user.as_ref().or(self.sender.as_ref()) {
            rev.author_name = who.display_name();
            rev.author_email = who.email.clone().unwrap_or_default();
        }
        let forks = fork_urls(from_fork, [&head.clone_url, &head.ssh_url]);
        Ok(PushOutcome::Build(Box::new(rev), forks))
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

    const SHA: &str = "da1560886d4f094c3e6c9ef40349f7d38b5d27d7";

    /// GitLab's documented merge request hook, trimmed to what is read.
    fn gitlab_mr(action: &str, oldrev: Option<&str>, source_project_id: u64) -> GitlabMergeRequest {
        let mut v = serde_json::json!({
            "object_kind": "merge_request",
            "project": { "path_with_namespace": "gitlabhq/gitlab-test", "default_branch": "master" },
            "object_attributes": {
                "iid": 1, "action": action, "target_branch": "master",
                "source_branch": "ms-viewport", "source_project_id": source_project_id,
                "target_project_id": 14, "title": "MS-Viewport",
                "url": "http://example.com/diaspora/merge_requests/1",
                "source": {
                    "path_with_namespace": "awesome_space/awesome_project",
                    "git_http_url": "http://example.com/awesome_space/awesome_project.git",
                    "git_ssh_url": "git@example.com:awesome_space/awesome_project.git"
                },
                "last_commit": {
                    "id": SHA, "message": "fixed readme",
                    "author": { "name": "GitLab dev user", "email": "gitlabdev@dv6700.(none)" }
                }
            }
        });
        if let Some(old) = oldrev {
            v["object_attributes"]["oldrev"] = old.into();
        }
        serde_json::from_value(v).expect("parses")
    }

    #[test]
    fn gitlab_merge_requests_build_only_new_commits() {
        let PushOutcome::Build(rev, forks) = gitlab_mr("open", None, 14).outcome().expect("valid")
        else {
            panic!("open builds");
        };
        assert_eq!(rev.git_ref, "refs/merge-requests/1/head");
        assert_eq!((rev.branch.as_str(), rev.tag.as_str()), ("", ""));
        assert_eq!(rev.commit_sha, SHA);
        assert_eq!(rev.forge_project, "gitlabhq/gitlab-test");
        let mr = rev.merge_request.expect("a merge request");
        assert_eq!((mr.number, mr.from_fork), (1, false));
        assert!(forks.is_empty());
        let old = "95790bf891e76fee5e1747ab589903a6a1f80f22";
        let PushOutcome::Build(rev, _) =
            gitlab_mr("update", Some(old), 14).outcome().expect("valid")
        else {
            panic!("an update with new commits builds");
        };
        assert_eq!(rev.before_sha, old);
        for (action, oldrev) in [
            ("update", None),
            ("close", None),
            ("merge", None),
            ("approved", None),
        ] {
            assert!(
                matches!(
                    gitlab_mr(action, oldrev, 14).outcome(),
                    Ok(PushOutcome::Ignore(_))
                ),
                "{action}"
            );
        }
        let PushOutcome::Build(rev, forks) =
            gitlab_mr("reopen", None, 15).outcome().expect("valid")
        else {
            panic!("reopen builds");
        };
        let mr = rev.merge_request.expect("a merge request");
        assert!(mr.from_fork);
        assert_eq!(mr.head_project, "awesome_space/awesome_project");
        assert_eq!(forks.len(), 2);
        // Once the fork is deleted GitLab sends nulls: a close is still
        // ignored (not refused), and so is an update.
        let gone: GitlabMergeRequest = serde_json::from_value(serde_json::json!({
            "object_kind": "merge_request",
            "project": { "path_with_namespace": "gitlabhq/gitlab-test" },
            "object_attributes": { "iid": 1, "action": "close", "source": null,
                "source_project_id": null, "target_project_id": 14, "last_commit": null }
        }))
        .expect("parses");
        assert!(matches!(gone.outcome(), Ok(PushOutcome::Ignore(_))));
        let mut reopened = gone;
        reopened.object_attributes.action = Some("reopen".into());
        assert!(matches!(reopened.outcome(), Ok(PushOutcome::Ignore(_))));
    }

    #[test]
    fn a_gitea_agit_pull_request_counts_as_a_fork() {
        let base = serde_json::json!({ "full_name": "Codertocat/Hello-World",
            "clone_url": "https://github.com/Codertocat/Hello-World.git" });
        let mut agit = pull_request("opened", base.clone());
        agit.pull_request.head.branch = "refs/pull/2/head".into();
        let PushOutcome::Build(rev, _) = agit.outcome("gitea").expect("valid") else {
            panic!("builds");
        };
        assert!(rev.merge_request.expect("a merge request").from_fork);
        let mut flow = pull_request("opened", base.clone());
        flow.pull_request.flow = Some(1);
        let PushOutcome::Build(rev, _) = flow.outcome("gitea").expect("valid") else {
            panic!("builds");
        };
        assert!(rev.merge_request.expect("a merge request").from_fork);
        let PushOutcome::Build(rev, _) = pull_request("opened", base)
            .outcome("gitea")
            .expect("valid")
        else {
            panic!("builds");
        };
        assert!(!rev.merge_request.expect("a merge request").from_fork);
    }

    fn pull_request(action: &str, head: serde_json::Value) -> PullRequestEvent {
        serde_json::from_value(serde_json::json!({
            "action": action, "number": 2,
            "pull_request": {
                "title": "Update the README", "html_url": "https://github.com/Codertocat/Hello-World/pull/2",
                "user": { "login": "Codertocat" },
                "head": { "ref": "changes", "sha": SHA, "repo": head },
                "base": { "ref": "master", "sha": SHA, "repo": {
                    "full_name": "Codertocat/Hello-World", "default_branch": "master",
                    "clone_url": "https://github.com/Codertocat/Hello-World.git" } }
            }
        }))
        .expect("parses")
    }

    #[test]
    fn pull_requests_of_github_and_gitea() {
        let fork = serde_json::json!({ "full_name": "someone/Hello-World",
            "clone_url": "https://github.com/someone/Hello-World.git" });
        for (source, action) in [
            ("github", "synchronize"),
            ("gitea", "synchronized"),
            ("github", "opened"),
        ] {
            let PushOutcome::Build(rev, forks) = pull_request(action, fork.clone())
                .outcome(source)
                .expect("valid")
            else {
                panic!("{action} builds");
            };
            assert_eq!(rev.git_ref, "refs/pull/2/head");
            assert_eq!(rev.source, source);
            assert_eq!(rev.forge_project, "Codertocat/Hello-World");
            assert_eq!(rev.author_name, "Codertocat");
            let mr = rev.merge_request.expect("a merge request");
            assert!(mr.from_fork);
            assert_eq!(forks, ["https://github.com/someone/Hello-World.git"]);
        }
        for action in ["edited", "closed", "labeled"] {
            assert!(matches!(
                pull_request(action, fork.clone()).outcome("github"),
                Ok(PushOutcome::Ignore(_))
            ));
        }
        // The fork was deleted: nothing to fetch.
        assert!(matches!(
            pull_request("opened", serde_json::Value::Null).outcome("github"),
            Ok(PushOutcome::Ignore(_))
        ));
        let mut bad = pull_request("opened", fork);
        bad.pull_request.head.sha = "HEAD".into();
        assert!(bad.outcome("github").is_err());
    }

    #[test]
    fn gitea_signature_is_plain_hex() {
        let hex = "757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        let secret = "It's a Secret to Everybody";
        assert!(gitea_signature_matches(
            hex.as_bytes(),
            b"Hello, World!",
            secret
        ));
        assert!(!gitea_signature_matches(
            format!("sha256={hex}").as_bytes(),
            b"Hello, World!",
            secret
        ));
        assert!(!gitea_signature_matches(b"", b"Hello, World!", secret));
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
