//! When a pipeline runs: `only:` and `except:` of a service's `.gantry.yml`.
//!
//! ```yaml
//! only:
//!   branches: [main, "release/*"]   # a branch push runs only on these
//!   tags: ["v*"]                    # a tag push runs only on these
//!   changes: ["api/**", "Cargo.lock"]  # ...and only if the push changed one of these
//! except:
//!   branches: ["wip/*"]             # never on these
//!   changes: ["docs/**", "*.md"]    # not when every changed file is one of these
//! ```
//!
//! Rules, in order (the first that applies skips the pipeline, with a reason
//! that says which):
//!
//! - `only.branches`/`only.tags`: when `only` names refs of either kind, the
//!   pushed ref must match a pattern of its own kind (so `only: {branches:
//!   [main]}` also skips tags).
//! - `except.branches`/`except.tags`: a matching ref is skipped.
//! - `only.changes`: skipped unless a changed file matches.
//! - `except.changes`: skipped when every changed file matches.
//!
//! Changed files are those of the whole push (the difference between the
//! commit the ref pointed at before it and the pushed one, whatever the
//! number of commits in between). When they are not known — a new branch,
//! a tag, a history the push rewrote, a manual trigger — the `changes` rules
//! do not skip: a pipeline that cannot tell builds.
//!
//! Ref patterns use `*` for any run of characters (`release/*` matches
//! `release/2026/11`). Path patterns are matched against the path from the
//! repository root: `*` and `?` stay within one directory, `**` spans any
//! number of them (`docs/**` is everything under `docs/`), and a pattern
//! without `/` matches a file name in any directory (`*.md`).

/// One side of the rules (`only` or `except`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub branches: Vec<String>,
    pub tags: Vec<String>,
    pub changes: Vec<String>,
}

impl Filter {
    fn names_refs(&self) -> bool {
        !self.branches.is_empty() || !self.tags.is_empty()
    }

    fn ref_matches(&self, branch: &str, tag: &str) -> bool {
        (!branch.is_empty() && self.branches.iter().any(|p| gantry_config::glob(p, branch)))
            || (!tag.is_empty() && self.tags.iter().any(|p| gantry_config::glob(p, tag)))
    }
}

/// The rules of a pipeline file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rules {
    pub only: Filter,
    pub except: Filter,
}

impl Rules {
    /// Whether any rule looks at the changed files (only then are they
    /// worth computing).
    pub fn uses_changes(&self) -> bool {
        !self.only.changes.is_empty() || !self.except.changes.is_empty()
    }

    /// Why a push of `branch` or `tag` that changed `changed` (when known)
    /// does not run, or `None` when it runs.
    pub fn skip_reason(
        &self,
        branch: &str,
        tag: &str,
        changed: Option<&[String]>,
    ) -> Option<String> {
        let what = if tag.is_empty() {
            format!("branch {branch:?}")
        } else {
            format!("tag {tag:?}")
        };
        if self.only.names_refs() && !self.only.ref_matches(branch, tag) {
            return Some(format!("{what} is not in `only`"));
        }
        if self.except.ref_matches(branch, tag) {
            return Some(format!("{what} is in `except`"));
        }
        let changed = changed?;
        if !self.only.changes.is_empty()
            && !changed
                .iter()
                .any(|f| self.only.changes.iter().any(|p| path_matches(p, f)))
        {
            return Some(format!(
                "no file the push changed matches `only.changes` ({} changed)",
                count(changed.len())
            ));
        }
        if !self.except.changes.is_empty()
            && changed
                .iter()
                .all(|f| self.except.changes.iter().any(|p| path_matches(p, f)))
        {
            return Some(format!(
                "every file the push changed matches `except.changes` ({} changed)",
                count(changed.len())
            ));
        }
        None
    }
}

fn count(n: usize) -> String {
    if n == 1 {
        "1 file".into()
    } else {
        format!("{n} files")
    }
}

/// Whether `path` (from the repository root, `/`-separated) matches
/// `pattern` (see the module doc).
pub fn path_matches(pattern: &str, path: &str) -> bool {
    let pattern = pattern.trim_start_matches("./").trim_start_matches('/');
    let path: Vec<&str> = path.split('/').collect();
    if !pattern.contains('/') {
        // A bare name matches the file name anywhere.
        return path.last().is_some_and(|name| segment(pattern, name));
    }
    let pattern: Vec<&str> = pattern.split('/').filter(|s| !s.is_empty()).collect();
    segments(&pattern, &path)
}

/// Whether the path's segments match the pattern's, `**` spanning any
/// number of them. Dynamic programming over (pattern, path) positions, so
/// the time is their product whatever the pattern (no backtracking blow-up).
fn segments(pattern: &[&str], path: &[&str]) -> bool {
    // `**/**` is `**`.
    let mut p: Vec<&str> = Vec::with_capacity(pattern.len());
    for seg in pattern {
        if *seg == "**" && p.last() == Some(&"**") {
            continue;
        }
        p.push(seg);
    }
    let (np, ns) = (p.len(), path.len());
    // next[j]: whether p[i+1..] matches path[j..]; row[j]: p[i..] vs path[j..].
    let mut next = vec![false; ns + 1];
    next[ns] = true;
    for i in (0..np).rev() {
        let mut row = vec![false; ns + 1];
        for j in (0..=ns).rev() {
            row[j] = if p[i] == "**" {
                next[j] || (j < ns && row[j + 1])
            } else {
                j < ns && next[j + 1] && segment(p[i], path[j])
            };
        }
        next = row;
    }
    next[0]
}

/// `*` (any run) and `?` (one character) within one path segment.
fn segment(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    // Iterative matching with backtracking to the last `*`.
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_patterns() {
        assert!(path_matches("docs/**", "docs/a.md"));
        assert!(path_matches("docs/**", "docs/deep/er/a.md"));
        assert!(!path_matches("docs/**", "src/docs/a.md"));
        assert!(path_matches("**/*.md", "a.md"));
        assert!(path_matches("**/*.md", "x/y/a.md"));
        assert!(path_matches("*.md", "x/y/README.md"));
        assert!(!path_matches("*.md", "x/y/README.mdx"));
        assert!(path_matches("src/*.rs", "src/main.rs"));
        assert!(!path_matches("src/*.rs", "src/bin/main.rs"));
        assert!(path_matches("src/**/*.rs", "src/bin/main.rs"));
        assert!(path_matches("Cargo.lock", "Cargo.lock"));
        assert!(path_matches("./api/**", "api/x"));
        assert!(path_matches("a?c/**", "abc/d"));
        assert!(!path_matches("a?c/**", "ac/d"));
        assert!(path_matches(
            "services/*/migrations/**",
            "services/api/migrations/1.sql"
        ));
        assert!(path_matches("**", "anything/at/all"));
        assert!(path_matches("a/**/b/**/c", "a/x/b/y/z/c"));
        assert!(!path_matches("a/**/b/**/c", "a/x/c"));
    }

    #[test]
    fn many_double_stars_against_a_deep_path_stay_fast() {
        let pattern = format!("{}zz", "**/x/".repeat(30));
        let path = format!("{}f", "a/".repeat(200));
        assert!(!path_matches(&pattern, &path));
        let pattern = format!("{}zz", "**/".repeat(40));
        assert!(!path_matches(&pattern, &path));
    }

    fn rules(only: Filter, except: Filter) -> Rules {
        Rules { only, except }
    }

    fn v(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn refs() {
        let r = rules(
            Filter {
                branches: v(&["main", "release/*"]),
                ..Default::default()
            },
            Filter {
                branches: v(&["release/old*"]),
                ..Default::default()
            },
        );
        assert_eq!(r.skip_reason("main", "", None), None);
        assert_eq!(r.skip_reason("release/2026", "", None), None);
        assert_eq!(
            r.skip_reason("feature/x", "", None).as_deref(),
            Some("branch \"feature/x\" is not in `only`")
        );
        assert_eq!(
            r.skip_reason("release/old-1", "", None).as_deref(),
            Some("branch \"release/old-1\" is in `except`")
        );
        // Only branches named: tags do not run.
        assert!(r.skip_reason("", "v1", None).is_some());
        // No rules: everything runs.
        assert_eq!(Rules::default().skip_reason("x", "", Some(&[])), None);
    }

    #[test]
    fn changes() {
        let only = rules(
            Filter {
                changes: v(&["src/**", "Dockerfile"]),
                ..Default::default()
            },
            Filter::default(),
        );
        assert_eq!(
            only.skip_reason("b", "", Some(&v(&["src/a.rs", "docs/x"]))),
            None
        );
        assert_eq!(
            only.skip_reason("b", "", Some(&v(&["docs/x"]))).as_deref(),
            Some("no file the push changed matches `only.changes` (1 file changed)")
        );
        // Unknown changes: runs.
        assert_eq!(only.skip_reason("b", "", None), None);
        let except = rules(
            Filter::default(),
            Filter {
                changes: v(&["docs/**", "*.md"]),
                ..Default::default()
            },
        );
        assert!(
            except
                .skip_reason("b", "", Some(&v(&["docs/a", "README.md"])))
                .is_some()
        );
        assert_eq!(
            except.skip_reason("b", "", Some(&v(&["docs/a", "src/b"]))),
            None
        );
        assert!(only.uses_changes() && except.uses_changes());
        assert!(!Rules::default().uses_changes());
    }
}
