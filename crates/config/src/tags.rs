//! Registry tags made from git names, shared by the builder (which pushes
//! an image and reads a branch's last one as its build cache) and the
//! registry-publisher (which tags images; its policy is in its `tags`
//! module).

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

/// The only tag of a merge request's image: `mr-<number>` (no branch can
/// take it: see [`branch_tag`]).
pub fn merge_request_tag(number: u64) -> String {
    format!("mr-{number}")
}

#[cfg(test)]
mod tests {
    use super::*;

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
