//! Fetching the exact commit of a pipeline with the `git` command, so any URL
//! git understands works (https, ssh, git, file).

use std::path::Path;
use std::time::Duration;

use crate::logs::LogSink;

/// How long fetching a repository may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(15 * 60);

async fn git(dir: &Path, args: &[&str], log: &LogSink) -> anyhow::Result<()> {
    let out = tokio::time::timeout(
        FETCH_TIMEOUT,
        tokio::process::Command::new("git")
            .args(args)
            .current_dir(dir)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_ASKPASS", "true")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .map_err(|_| anyhow::anyhow!("git {} timed out", args[0]))??;
    log.write("checkout", "stdout", &out.stdout).await;
    log.write("checkout", "stderr", &out.stderr).await;
    anyhow::ensure!(
        out.status.success(),
        "git {} failed ({}): {}",
        args[0],
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// Checks out `sha` of `url` into the empty directory `dir`. Tries a shallow
/// fetch of the commit first; servers that refuse fetching by sha get a full fetch.
pub async fn checkout(url: &str, sha: &str, dir: &Path, log: &LogSink) -> anyhow::Result<()> {
    anyhow::ensure!(
        sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit()),
        "{sha:?} is not a full commit sha"
    );
    log.system("checkout", format!("fetching {sha} from {url}"))
        .await;
    git(dir, &["init", "-q"], log).await?;
    git(dir, &["remote", "add", "origin", url], log).await?;
    if git(dir, &["fetch", "-q", "--depth=1", "origin", sha], log)
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
        log,
    )
    .await?;
    Ok(())
}
