//! The tag policy: which tags an image of a revision gets.
//!
//! - the full commit sha, for every push;
//! - the branch name, sanitised into a valid Docker tag; a branch whose tag
//!   would look like one of the others (`latest`, a commit sha or a prefix
//!   of one — 7 or more hex digits —, a version `1.2.3`, anything starting
//!   with a digit, `mr-*` kept for merge requests) gets the prefix
//!   `branch-`, so that no branch can overwrite them;
//! - the semver of a `v*` git tag (`v1.2.3` → `1.2.3`, pre-releases included);
//! - `latest` for the repository's default branch;
//! - for a merge request's pipeline, only `mr-<number>`: an image of a
//!   merge request (perhaps a fork's) never takes a tag a branch, a release
//!   or `latest` could have.

use gantry_proto::v1::Revision;

pub use gantry_config::tags::{branch_tag, merge_request_tag, sanitize};

/// The semver of a release tag: `v1.2.3` or `1.2.3` (with pre-release/build) → `1.2.3`.
pub fn semver_of(tag: &str) -> Option<String> {
    let v = tag.strip_prefix('v')?;
    let parsed = semver::Version::parse(v).ok()?;
    // `+` is not allowed in Docker tags.
    Some(parsed.to_string().replace('+', "_"))
}

/// All tags of `rev`, without duplicates, sha first.
pub fn tags_for(rev: &Revision) -> Vec<String> {
    if let Some(mr) = &rev.merge_request {
        return vec![merge_request_tag(mr.number)];
    }
    let mut tags = vec![rev.commit_sha.clone()];
    let mut add = |t: String| {
        if !t.is_empty() && !tags.contains(&t) {
            tags.push(t);
        }
    };
    if !rev.branch.is_empty() {
        add(branch_tag(&rev.branch));
        if rev.branch == rev.default_branch {
            add("latest".to_owned());
        }
    }
    if let Some(v) = semver_of(&rev.tag) {
        add(v);
    }
    tags
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rev(branch: &str, tag: &str, default_branch: &str) -> Revision {
        Revision {
            commit_sha: "a".repeat(40),
            branch: branch.into(),
            tag: tag.into(),
            default_branch: default_branch.into(),
            ..Default::default()
        }
    }

    #[test]
    fn merge_requests_get_only_their_tag() {
        let mut r = rev("", "", "main");
        r.merge_request = Some(gantry_proto::v1::MergeRequest {
            number: 7,
            source_branch: "main".into(),
            ..Default::default()
        });
        assert_eq!(tags_for(&r), vec!["mr-7".to_owned()]);
    }

    #[test]
    fn default_branch_gets_latest() {
        assert_eq!(
            tags_for(&rev("main", "", "main")),
            vec!["a".repeat(40), "main".into(), "latest".into()]
        );
        assert_eq!(
            tags_for(&rev("dev", "", "main")),
            vec!["a".repeat(40), "dev".into()]
        );
    }

    #[test]
    fn version_tags_get_semver() {
        assert_eq!(
            tags_for(&rev("", "v1.2.3", "main")),
            vec!["a".repeat(40), "1.2.3".into()]
        );
        assert_eq!(
            tags_for(&rev("", "v2.0.0-rc.1+b7", "main"))[1],
            "2.0.0-rc.1_b7"
        );
        assert_eq!(
            tags_for(&rev("", "release-7", "main")),
            vec!["a".repeat(40)]
        );
        assert_eq!(tags_for(&rev("", "v1.2", "main")), vec!["a".repeat(40)]);
    }

    #[test]
    fn a_branch_called_latest_does_not_get_latest() {
        let tags = tags_for(&rev("latest", "", "main"));
        assert_eq!(tags, vec!["a".repeat(40), "branch-latest".into()]);
    }
}
