//! A small service repository on disk: a `FROM scratch` image holding the
//! static busybox and a page, and a `.gantry.yml` with test steps.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct SampleRepo {
    _dir: tempfile::TempDir,
    path: PathBuf,
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args([
            "-c",
            "user.name=Ada Lovelace",
            "-c",
            "user.email=ada@example.com",
            "-c",
            "init.defaultBranch=main",
        ])
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The default `.gantry.yml`: checks the page is in the image, as the unprivileged user.
pub const PASSING_PIPELINE: &str = "image:\n  dockerfile: Dockerfile\ntest:\n  - name: content\n    run: grep -q hello /www/index.html\n  - name: unprivileged\n    run: test \"$(id -u)\" = 65534\n";

/// The command the sample image serves its pages with.
pub const SERVE: &str = "[\"httpd\", \"-f\", \"-p\", \"8080\", \"-h\", \"/www\"]";

/// The sample's Dockerfile with `extra` instructions before `CMD cmd`.
pub fn dockerfile(extra: &str, cmd: &str) -> String {
    format!(
        "FROM scratch\nCOPY busybox /bin/busybox\nRUN [\"/bin/busybox\", \"--install\", \"-s\", \"/bin\"]\nCOPY index.html /www/index.html\n{extra}CMD {cmd}\n"
    )
}

impl SampleRepo {
    /// A repository on `main` with one commit of a passing service.
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("gantry-sample-")
            .tempdir()
            .expect("tempdir");
        let path = dir.path().to_owned();
        git(&path, &["init", "-q", "-b", "main"]);
        std::fs::copy("/bin/busybox", path.join("busybox"))
            .expect("static busybox (busybox-static) at /bin/busybox");
        std::fs::write(path.join("Dockerfile"), dockerfile("", SERVE)).expect("write Dockerfile");
        std::fs::write(path.join("index.html"), "hello v1\n").expect("write page");
        std::fs::write(path.join(".gantry.yml"), PASSING_PIPELINE).expect("write pipeline");
        let repo = Self { _dir: dir, path };
        repo.commit("initial service");
        repo
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A fork: a clone of this repository (its history, on its current
    /// branch) in a directory of its own.
    pub fn fork(&self) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("gantry-fork-")
            .tempdir()
            .expect("tempdir");
        let path = dir.path().join("fork");
        git(
            dir.path(),
            &["clone", "-q", &self.path.to_string_lossy(), "fork"],
        );
        Self { _dir: dir, path }
    }

    /// `file://` URL the builder clones from.
    pub fn url(&self) -> String {
        format!("file://{}", self.path.display())
    }

    /// Writes `content` to `file` and commits; returns the commit sha.
    pub fn commit_file(&self, file: &str, content: &str, message: &str) -> String {
        std::fs::write(self.path.join(file), content).expect("write file");
        self.commit(message)
    }

    /// Makes `link` a symbolic link to `target` (replacing what was there).
    pub fn symlink(&self, target: &str, link: &str) {
        let path = self.path.join(link);
        let _ = std::fs::remove_file(&path);
        std::os::unix::fs::symlink(target, &path).expect("symlink");
    }

    /// Writes `content` to `file` (creating its directories) without committing.
    pub fn write(&self, file: &str, content: &str) {
        let path = self.path.join(file);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("mkdir");
        }
        let _ = std::fs::remove_file(&path);
        std::fs::write(path, content).expect("write file");
    }

    /// Commits everything in the work tree; returns the commit sha.
    pub fn commit(&self, message: &str) -> String {
        git(&self.path, &["add", "-A"]);
        git(&self.path, &["commit", "-q", "-m", message]);
        self.head()
    }

    pub fn head(&self) -> String {
        git(&self.path, &["rev-parse", "HEAD"])
    }

    /// Creates an annotated tag at HEAD.
    pub fn tag(&self, name: &str) {
        git(&self.path, &["tag", "-a", name, "-m", name]);
    }

    /// Creates and switches to a branch.
    pub fn branch(&self, name: &str) {
        git(&self.path, &["checkout", "-q", "-b", name]);
    }

    /// Switches to an existing branch.
    pub fn switch(&self, name: &str) {
        git(&self.path, &["checkout", "-q", name]);
    }
}

impl Default for SampleRepo {
    fn default() -> Self {
        Self::new()
    }
}
