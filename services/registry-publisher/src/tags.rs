//! The tag policy: which tags an image of a revision gets.
//!
//! - the full commit sha, always;
//! - the branch name, sanitised into a valid Docker tag; a branch whose tag
//!   would look like one of the others (`latest`, a commit sha or a prefix
//!   of one — 7 or more hex digits —, a version `1.2.3`, anything starting
//!   with a digit, `mr-*` kept for merge requests) gets the prefix
//!   `branch-`, so that no branch can overwrite them;
//! - the semver of a `v*` git tag (`v1.2.3` → `1.2.3`, pre-releases included);
//! - `latest` for the repository's default branch.

use gantry_proto::v1::Revision;

/// Longest tag the registry accepts.
const MAX_TAG: usize = 128;

/// Turns any branch name into a valid tag (`[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}`):
/// other characters become `-`, a leading `.` or `-` becomes `_`.
pub fn sanitize(name: &str) -> String {
    let mut out: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .take(MAX_TAG)
        .collect();
    if out.starts_with(['.', '-']) {
        out.replace_range(0..1, "_");
    }
    out
}

/// The tag of a branch: its sanitised name, prefixed with `branch-` when it
/// could be mistaken for a tag of another kind.
pub fn branch_tag(branch: &str) -> String {
    let tag = sanitize(branch);
    let reserved = tag.eq_ignore_ascii_case("latest")
        // A commit sha, or what `Deploy` would take for a prefix of one.
        || (tag.len() >= 7 && tag.bytes().all(|b| b.is_ascii_hexdigit()))
        || tag.starts_with(|c: char| c.is_ascii_digit())
        || tag.to_ascii_lowercase().starts_with("mr-")
        || tag.to_ascii_lowercase().starts_with("branch-");
    if reserved {
        sanitize(&format!("branch-{tag}"))
    } else {
        tag
    }
}

/// The semver of a release tag: `v1.2.3` or `1.2.3` (with pre-release/build) → `1.2.3`.
pub fn semver_of(tag: &str) -> Option<String> {
    let v = tag.strip_prefix('v')?;
    let parsed = semver::Version::parse(v).ok()?;
    // `+` is not allowed in Docker tags.
    Some(parsed.to_string().replace('+', "_"))
}

/// All tags of `rev`, without duplicates, sha first.
pub fn tags_for(rev: &Revision) -> Vec<String> {
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
    fn branches_cannot_take_the_other_tags() {
        let sha = "a".repeat(40);
        for (branch, tag) in [
            ("latest", "branch-latest"),
            ("LATEST", "branch-LATEST"),
            (sha.as_str(), format!("branch-{sha}").as_str()),
            ("1.2.3", "branch-1.2.3"),
            ("2024-fix", "branch-2024-fix"),
            ("mr-7", "branch-mr-7"),
            ("deadbeef", "branch-deadbeef"),
            ("cafe", "cafe"),
            ("branch-x", "branch-branch-x"),
            ("main", "main"),
        ] {
            assert_eq!(branch_tag(branch), tag, "{branch}");
        }
        let tags = tags_for(&rev("latest", "", "main"));
        assert_eq!(tags, vec![sha.clone(), "branch-latest".into()]);
        assert_eq!(branch_tag(&"b".repeat(200)).len(), 128);
    }

    #[test]
    fn branch_names_are_sanitised() {
        assert_eq!(sanitize("feature/login#2"), "feature-login-2");
        assert_eq!(sanitize(".hidden"), "_hidden");
        assert_eq!(sanitize("-x"), "_x");
        assert_eq!(sanitize(&"é".repeat(200)).len(), 128);
    }
}
