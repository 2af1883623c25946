//! Credentials of a project's git repository. A clone URL written with user
//! info (`https://user:token@host/repo.git`) is split: the URL Gantry shows,
//! logs and puts in events has none, and the password is a [`Secret`] that
//! only the services fetching from the repository resolve. Git gets it from a
//! credential helper through the environment of its own process
//! ([`GitCredentials::helper_env`]), never on its command line or in a
//! checkout's `.git/config`.

use crate::Secret;

/// A username and (when resolved) a password for a git remote.
#[derive(Debug, Clone)]
pub struct GitCredentials {
    pub username: String,
    pub password: Option<Secret>,
}

/// Environment variables that carry the credentials to the helper.
const USER_VAR: &str = "GANTRY_GIT_USERNAME";
const PASSWORD_VAR: &str = "GANTRY_GIT_PASSWORD";

impl GitCredentials {
    /// Environment for a `git` process that fetches from `url`: a credential
    /// helper, scoped to that URL, answering with these credentials (git asks
    /// only when the server challenges). Nothing is written to disk.
    pub fn helper_env(&self, url: &str) -> Vec<(String, String)> {
        let helper = format!(
            "!f() {{ test \"$1\" = get && printf 'username=%s\\npassword=%s\\n' \"${USER_VAR}\" \"${PASSWORD_VAR}\"; }}; f"
        );
        vec![
            ("GIT_CONFIG_COUNT".into(), "1".into()),
            (
                "GIT_CONFIG_KEY_0".into(),
                format!("credential.{url}.helper"),
            ),
            ("GIT_CONFIG_VALUE_0".into(), helper),
            (USER_VAR.into(), self.username.clone()),
            (
                PASSWORD_VAR.into(),
                self.password
                    .as_ref()
                    .map(|p| p.expose().to_owned())
                    .unwrap_or_default(),
            ),
        ]
    }

    /// Replaces the password (and its URL-encoded form) in `text`, for git's
    /// output before it is logged or returned.
    pub fn scrub(&self, text: &str) -> String {
        let Some(p) = self.password.as_ref().map(Secret::expose) else {
            return text.to_owned();
        };
        if p.is_empty() {
            return text.to_owned();
        }
        text.replace(p, "[MASKED]")
            .replace(&percent_encode(p), "[MASKED]")
    }
}

/// Splits the user info off an `http(s)://` URL: the URL without it, and
/// `(username, password)` percent-decoded (user info without a `:` is a
/// token, sent as the password of [`TOKEN_USER`]). Other URLs (ssh, file)
/// are kept.
pub fn split_credentials(url: &str) -> (String, Option<(String, Option<String>)>) {
    let Some((scheme, rest)) = url.split_once("://") else {
        return (url.to_owned(), None);
    };
    if !scheme.eq_ignore_ascii_case("http") && !scheme.eq_ignore_ascii_case("https") {
        return (url.to_owned(), None);
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return (url.to_owned(), None);
    };
    let (user, password) = match userinfo.split_once(':') {
        Some((u, p)) => (percent_decode(u), percent_decode(p)),
        // `https://TOKEN@host/…` (GitHub's and GitLab's documented form): the
        // token is the credential; forges take any user name with it.
        None => (TOKEN_USER.to_owned(), percent_decode(userinfo)),
    };
    (
        format!("{scheme}://{host}{path}"),
        Some((user, Some(password))),
    )
}

/// The place a git URL points to, for comparing two of them: scheme and
/// `host[:port]` (lowercase, user info dropped); `ssh` for the scp-like
/// `user@host:path`; `file` and no host for a local path.
fn origin(url: &str) -> (String, String) {
    if let Some((scheme, rest)) = url.split_once("://") {
        let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        return (scheme.to_ascii_lowercase(), host.to_ascii_lowercase());
    }
    match url.split_once(':') {
        Some((host, _)) if !host.contains('/') => (
            "ssh".into(),
            host.rsplit_once('@')
                .map_or(host, |(_, h)| h)
                .to_ascii_lowercase(),
        ),
        _ => ("file".into(), String::new()),
    }
}

/// Whether Gantry may fetch a fork's merge request from `fork_url`, a URL
/// that came in a webhook, for a project cloned from `project_url`: only
/// from the same server (scheme, host and port), which also gets the
/// project's clone credentials; never a URL with credentials of its own
/// or one git could take for an option. Returns why not.
pub fn fork_url_refusal(project_url: &str, fork_url: &str) -> Option<String> {
    if fork_url.is_empty() {
        return Some("the fork's clone URL is missing".into());
    }
    if fork_url.starts_with('-') || fork_url.chars().any(|c| c.is_control() || c == ' ') {
        return Some(format!("the fork's clone URL {fork_url:?} is not a URL"));
    }
    if split_credentials(fork_url).1.is_some() {
        return Some("the fork's clone URL carries credentials".into());
    }
    let (want, got) = (origin(project_url), origin(fork_url));
    if want != got {
        return Some(format!(
            "the fork's clone URL {fork_url:?} is not on the server of the project's clone URL ({}://{})",
            want.0, want.1
        ));
    }
    None
}

/// The user name sent with a token given alone in a clone URL.
pub const TOKEN_USER: &str = "gantry";

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && let Some(b) = s
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encodes everything but unreserved characters (RFC 3986).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_info_is_split_off_http_urls() {
        let (url, creds) = split_credentials("https://ci:t%40ken@git.example.com/team/a.git");
        assert_eq!(url, "https://git.example.com/team/a.git");
        assert_eq!(creds, Some(("ci".into(), Some("t@ken".into()))));
        let (url, creds) = split_credentials("http://ghp_t0ken@git.example.com:8080/a");
        assert_eq!(url, "http://git.example.com:8080/a");
        assert_eq!(creds, Some((TOKEN_USER.into(), Some("ghp_t0ken".into()))));
        for kept in [
            "ssh://git@git.example.com/a.git",
            "git@git.example.com:a.git",
            "file:///srv/a",
            "https://git.example.com/a@b",
        ] {
            assert_eq!(split_credentials(kept), (kept.to_owned(), None), "{kept}");
        }
    }

    #[test]
    fn forks_are_fetched_only_from_the_project_server() {
        let project = "https://gitlab.example.com/team/a.git";
        assert_eq!(
            fork_url_refusal(project, "https://GitLab.example.com/ada/a.git"),
            None
        );
        for refused in [
            "",
            "https://evil.example.com/ada/a.git",
            "http://gitlab.example.com/ada/a.git",
            "https://gitlab.example.com:8443/ada/a.git",
            "https://u:p@gitlab.example.com/ada/a.git",
            "--upload-pack=touch /tmp/x",
            "file:///etc",
            "git@gitlab.example.com:ada/a.git",
        ] {
            assert!(fork_url_refusal(project, refused).is_some(), "{refused}");
        }
        assert_eq!(
            fork_url_refusal("git@host:team/a.git", "git@host:ada/a.git"),
            None
        );
        assert_eq!(fork_url_refusal("file:///srv/a", "file:///srv/b"), None);
    }

    #[test]
    fn scrub_masks_clear_and_encoded_passwords() {
        let c = GitCredentials {
            username: "u".into(),
            password: Some(Secret::new("p@ss word")),
        };
        assert_eq!(
            c.scrub("a p@ss word b p%40ss%20word c"),
            "a [MASKED] b [MASKED] c"
        );
    }
}
