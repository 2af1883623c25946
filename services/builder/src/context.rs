//! What the builder reads from a checkout, which is hostile: `.gantry.yml`,
//! the build context and the Dockerfile are resolved (symbolic links
//! followed) and must stay inside the checkout, or the pipeline fails saying
//! which path leaves it. The context is archived the way `docker build` does
//! it — symbolic links inside it are stored as links, never followed — and
//! streamed to the engine while it is written, never held in memory.

use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use tokio::sync::mpsc;

use gantry_pipeline::FILE;
use gantry_pipeline::service::ImageSpec;

/// Largest `.gantry.yml` read.
pub const MAX_PIPELINE_FILE: u64 = 1024 * 1024;
/// Size of the pieces the context is streamed in.
const PIECE: usize = 256 * 1024;
/// Name, inside the build context, of a Dockerfile that lives outside it.
pub const OUTSIDE_DOCKERFILE: &str = ".gantry.Dockerfile";

/// A path of the repository that cannot be used, and why (for the pipeline's failure).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// `rel` inside `repo`, with every symbolic link resolved; refused when it
/// does not exist or leads outside the repository.
pub fn resolve_inside(repo: &Path, rel: &str, what: &str) -> Result<PathBuf, Refused> {
    let root = repo
        .canonicalize()
        .map_err(|e| Refused(format!("cannot read the checkout: {e}")))?;
    let path = root.join(rel);
    let real = match path.canonicalize() {
        Ok(p) => p,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let dangling = path.symlink_metadata().is_ok();
            return Err(Refused(if dangling {
                format!("{what} {rel:?} is a symbolic link to a path that does not exist")
            } else {
                format!("{what} {rel:?} does not exist")
            }));
        }
        Err(e) => return Err(Refused(format!("{what} {rel:?} cannot be read: {e}"))),
    };
    if !real.starts_with(&root) {
        return Err(Refused(format!(
            "{what} {rel:?} leads outside the repository (a symbolic link out of the checkout); refused"
        )));
    }
    Ok(real)
}

/// The text of `.gantry.yml`, `None` when the repository has none.
pub fn read_pipeline_file(repo: &Path) -> Result<Option<String>, Refused> {
    read_text_file(repo, FILE, "the pipeline file")
}

/// The text of the file `rel` of the repository (confined to it, at most
/// [`MAX_PIPELINE_FILE`] bytes of UTF-8), `None` when there is none.
pub fn read_text_file(repo: &Path, rel: &str, what: &str) -> Result<Option<String>, Refused> {
    if repo.join(rel).symlink_metadata().is_err() {
        return Ok(None);
    }
    let path = resolve_inside(repo, rel, what)?;
    let meta = std::fs::metadata(&path).map_err(|e| Refused(format!("{rel}: {e}")))?;
    if !meta.is_file() {
        return Err(Refused(format!("{rel} is not a regular file")));
    }
    if meta.len() > MAX_PIPELINE_FILE {
        return Err(Refused(format!(
            "{rel} is {} bytes; the limit is {MAX_PIPELINE_FILE}",
            meta.len()
        )));
    }
    let bytes = std::fs::read(&path).map_err(|e| Refused(format!("{rel}: {e}")))?;
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|_| Refused(format!("{rel} is not UTF-8 text")))
}

/// The build context, checked: its directory and where the Dockerfile is.
pub struct Context {
    dir: PathBuf,
    /// The Dockerfile when it lives outside the context directory.
    outside: Option<PathBuf>,
    /// The Dockerfile's name inside the archive.
    pub dockerfile: String,
}

impl Context {
    /// Resolves and checks the context and Dockerfile of `spec` in `repo`.
    pub fn resolve(repo: &Path, spec: &ImageSpec) -> Result<Self, Refused> {
        let dir = resolve_inside(repo, &spec.context, "the build context")?;
        if !dir.is_dir() {
            return Err(Refused(format!(
                "the build context {:?} is not a directory",
                spec.context
            )));
        }
        let dockerfile = resolve_inside(repo, &spec.dockerfile, "the Dockerfile")?;
        if !dockerfile.is_file() {
            return Err(Refused(format!(
                "the Dockerfile {:?} is not a regular file",
                spec.dockerfile
            )));
        }
        Ok(match dockerfile.strip_prefix(&dir) {
            Ok(rel) => Self {
                dockerfile: rel.to_string_lossy().into_owned(),
                dir,
                outside: None,
            },
            Err(_) => Self {
                dir,
                outside: Some(dockerfile),
                dockerfile: OUTSIDE_DOCKERFILE.to_owned(),
            },
        })
    }

    /// The archive as a stream of pieces, written by a blocking task as the
    /// engine reads it. An error while archiving ends the stream with it.
    pub fn stream(self) -> impl futures::Stream<Item = Result<Bytes, std::io::Error>> + Send {
        let (tx, rx) = mpsc::channel::<Result<Bytes, std::io::Error>>(4);
        tokio::task::spawn_blocking(move || {
            let error_tx = tx.clone();
            let write = move || -> std::io::Result<()> {
                let mut tar = tar::Builder::new(Pieces {
                    tx,
                    buf: Vec::with_capacity(PIECE),
                });
                tar.follow_symlinks(false);
                tar.append_dir_all(".", &self.dir)?;
                if let Some(dockerfile) = &self.outside {
                    let mut file = std::fs::File::open(dockerfile)?;
                    tar.append_file(OUTSIDE_DOCKERFILE, &mut file)?;
                }
                tar.into_inner()?.flush()
            };
            if let Err(e) = write() {
                let _ = error_tx.blocking_send(Err(e));
            }
        });
        tokio_stream::wrappers::ReceiverStream::new(rx)
    }
}

/// A writer that hands full pieces to the stream.
struct Pieces {
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
}

impl Pieces {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(PIECE)));
        self.tx.blocking_send(Ok(piece)).map_err(|_| {
            std::io::Error::new(
                std::io::ErrorKind::BrokenPipe,
                "the engine stopped reading the context",
            )
        })
    }
}

impl Write for Pieces {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= PIECE {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn spec(dockerfile: &str, context: &str) -> ImageSpec {
        ImageSpec {
            dockerfile: dockerfile.into(),
            context: context.into(),
            target: None,
            args: Default::default(),
        }
    }

    #[test]
    fn paths_that_leave_the_checkout_are_refused() {
        let repo = tempfile::tempdir().expect("tempdir");
        let r = repo.path();
        std::fs::create_dir(r.join("app")).expect("mkdir");
        std::fs::write(r.join("app/Dockerfile"), "FROM scratch\n").expect("write");
        symlink("/etc", r.join("etc")).expect("symlink");
        symlink("..", r.join("up")).expect("symlink");
        symlink("app", r.join("inside")).expect("symlink");
        symlink("/etc/hostname", r.join(FILE)).expect("symlink");

        for (ctx, what) in [("etc", "context"), ("up", "context")] {
            let err = Context::resolve(r, &spec("app/Dockerfile", ctx))
                .err()
                .unwrap_or_else(|| panic!("{ctx} accepted"));
            assert!(err.0.contains("outside the repository"), "{what}: {err}");
        }
        assert!(
            Context::resolve(r, &spec("etc/passwd", "."))
                .err()
                .is_some_and(|e| e.0.contains("outside"))
        );
        let ok = Context::resolve(r, &spec("inside/Dockerfile", "inside")).expect("inside");
        assert_eq!(ok.dockerfile, "Dockerfile");
        let err = read_pipeline_file(r).expect_err("pipeline file outside");
        assert!(err.0.contains("outside the repository"), "{err}");
    }

    #[tokio::test]
    async fn the_archive_keeps_links_as_links() {
        use futures::StreamExt;
        let repo = tempfile::tempdir().expect("tempdir");
        let r = repo.path();
        std::fs::write(r.join("Dockerfile"), "FROM scratch\n").expect("write");
        symlink("/etc/shadow", r.join("shadow")).expect("symlink");
        let ctx = Context::resolve(r, &spec("Dockerfile", ".")).expect("context");
        let mut bytes = Vec::new();
        let mut stream = Box::pin(ctx.stream());
        while let Some(piece) = stream.next().await {
            bytes.extend_from_slice(&piece.expect("piece"));
        }
        let mut archive = tar::Archive::new(bytes.as_slice());
        let mut seen = Vec::new();
        for entry in archive.entries().expect("entries") {
            let entry = entry.expect("entry");
            let path = entry.path().expect("path").to_string_lossy().into_owned();
            if path.ends_with("shadow") {
                assert!(entry.header().entry_type().is_symlink());
                assert_eq!(entry.header().size().expect("size"), 0);
            }
            seen.push(path);
        }
        assert!(seen.iter().any(|p| p.ends_with("Dockerfile")), "{seen:?}");
        assert!(seen.iter().any(|p| p.ends_with("shadow")), "{seen:?}");
    }
}
