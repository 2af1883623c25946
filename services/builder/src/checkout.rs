//! Fetching the exact commit of a pipeline with the `git` command, so any URL
//! git understands works (https, ssh, git, file). Credentials reach git
//! through a credential helper in its environment only (see
//! [`gantry_config::git`]): never on a command line, in the checkout's
//! `.git/config` (which a `COPY . .` would put in the image) or in the log.

use std::path::Path;
use std::time::Duration;

use gantry_config::GitCredentials;

use crate::logs::LogSink;

/// How long fetching a repository may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// Where and how git fetches.
struct Remote<'a> {
    url: &'a str,
    credentials: Option<&'a GitCredentials>,
}

impl Remote<'_> {
    fn scrub(&self, bytes: &[u8]) -> String {
        let text = String::from_utf8_lossy(bytes);
        match self.credentials {
            Some(c) => c.scrub(&text),
            None => text.into_owned(),
        }
    }
}

async fn git(dir: &Path, args: &[&str], remote: &Remote<'_>, log: &LogSink) -> anyhow::Result<()> {
    let out = tokio::time::timeout(
        FETCH_TIMEOUT,
        tokio::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "true")
            .envs(
                remote
                    .credentials
                    .map(|c| c.helper_env(remote.url))
                    .unwrap_or_default(),
            )
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| anyhow::anyhow!("git {} timed out", args[0]))??;
    let (stdout, stderr) = (remote.scrub(&out.stdout), remote.scrub(&out.stderr));
    log.write("checkout", "stdout", stdout.as_bytes()).await;
    log.write("checkout", "stderr", stderr.as_bytes()).await;
    anyhow::ensure!(
        out.status.success(),
        "git {} failed ({}): {}",
        args[0],
        out.status,
        stderr.trim()
    );
    Ok(())
}

/// Checks out `sha` of `url` (with `credentials`, if the project has some)
/// into the empty directory `dir`. Tries a shallow fetch of the commit
/// first; servers that refuse fetching by sha get a full fetch.
pub async fn checkout(
    url: &str,
    credentials: Option<&GitCredentials>,
    sha: &str,
    dir: &Path,
    log: &LogSink,
) -> anyhow::Result<()> {
    let remote = Remote { url, credentials };
    anyhow::ensure!(
        sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit()),
        "{sha:?} is not a full commit sha"
    );
    log.system("checkout", format!("fetching {sha} from {url}"))
        .await;
    git(dir, &["init", "-q"], &remote, log).await?;
    git(dir, &["remote", "add", "origin", url], &remote, log).await?;
    if git(
        dir,
        &["fetch", "-q", "--depth=1", "origin", sha],
        &remote,
        log,
    )
    .await
    .is_err()
    {
        log.system(
            "checkout",
            "shallow fetch by sha refused; fetching all refs",
        )
        .await;
        git(
            dir,
            &[
                "fetch",
                "-q",
                "--tags",
                "origin",
                "+refs/heads/*:refs/remotes/origin/*",
            ],
            &remote,
            log,
        )
        .await?;
    }
    git(
        dir,
        &[
            "-c",
            "advice.detachedHead=false",
            "checkout",
            "-q",
            "--detach",
            sha,
        ],
        &remote,
        log,
    )
    .await?;
    Ok(())
}

/// Checks out the head of `git_ref` (e.g. `refs/heads/main`) of `url` into
/// the empty directory `dir`; returns the commit it is at.
pub async fn checkout_ref(
    url: &str,
    credentials: Option<&GitCredentials>,
    git_ref: &str,
    dir: &Path,
    log: &LogSink,
) -> anyhow::Result<String> {
    let remote = Remote { url, credentials };
    anyhow::ensure!(
        git_ref.starts_with("refs/") && !git_ref.contains("..") && !git_ref.contains(':'),
        "{git_ref:?} is not a full git ref"
    );
    log.system("checkout", format!("fetching {git_ref} from {url}"))
        .await;
    git(dir, &["init", "-q"], &remote, log).await?;
    git(dir, &["remote", "add", "origin", url], &remote, log).await?;
    git(
        dir,
        &["fetch", "-q", "--depth=1", "origin", git_ref],
        &remote,
        log,
    )
    .await?;
    git(
        dir,
        &[
            "-c",
            "advice.detachedHead=false",
            "checkout",
            "-q",
            "--detach",
            "FETCH_HEAD",
        ],
        &remote,
        log,
    )
    .await?;
    let out = tokio::process::Command::new("git")
        .args(["rev-parse", "HEAD"])
        .current_dir(dir)
        .kill_on_drop(true)
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "git rev-parse HEAD failed");
    let sha = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    log.system("checkout", format!("{git_ref} is at {sha}"))
        .await;
    Ok(sha)
}

/// The files a push changed: the difference between `before` and `sha`
/// (already checked out in `dir`), over all the commits in between. `None`
/// when it cannot be told (the old commit cannot be fetched: the push
/// rewrote history, or the server refuses it); the log says so.
pub async fn changed_files(
    url: &str,
    credentials: Option<&GitCredentials>,
    before: &str,
    sha: &str,
    dir: &Path,
    log: &LogSink,
) -> Option<Vec<String>> {
    let remote = Remote { url, credentials };
    if !(before.len() == 40 && before.bytes().all(|b| b.is_ascii_hexdigit())) {
        return None;
    }
    let have_before = git(
        dir,
        &["cat-file", "-e", &format!("{before}^{{commit}}")],
        &remote,
        log,
    )
    .await
    .is_ok()
        || git(
            dir,
            &["fetch", "-q", "--depth=1", "origin", before],
            &remote,
            log,
        )
        .await
        .is_ok();
    if !have_before {
        log.system(
            "config",
            format!("the commit before the push ({before}) cannot be fetched: the changed files are not known"),
        )
        .await;
        return None;
    }
    let out = tokio::time::timeout(
        FETCH_TIMEOUT,
        tokio::process::Command::new("git")
            .args(["diff", "--name-only", "--no-renames", "-z", before, sha])
            .current_dir(dir)
            .kill_on_drop(true)
            .output(),
    )
    .await;
    match out {
        Ok(Ok(out)) if out.status.success() => Some(
            out.stdout
                .split(|b| *b == 0)
                .filter(|p| !p.is_empty())
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .collect(),
        ),
        _ => {
            log.system("config", "cannot list the files the push changed")
                .await;
            None
        }
    }
}
