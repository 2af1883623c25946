//! A real docker-registry that wants a login (htpasswd, bcrypt), started on
//! a free loopback port for one test and stopped when dropped.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct AuthRegistry {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub host: String,
    _dir: tempfile::TempDir,
}

impl Drop for AuthRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts a registry that lets `user` in with `password` only.
pub async fn start_registry(user: &str, password: &str) -> AuthRegistry {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new("htpasswd")
        .args(["-Bbn", user, password])
        .output()
        .expect("htpasswd (apache2-utils)");
    assert!(out.status.success());
    std::fs::write(dir.path().join("htpasswd"), out.stdout).expect("write htpasswd");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    let config = format!(
        "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {dir}/data\nhttp:\n  addr: 127.0.0.1:{port}\nauth:\n  htpasswd:\n    realm: gantry-test\n    path: {dir}/htpasswd\n",
        dir = dir.path().display()
    );
    std::fs::write(dir.path().join("config.yml"), config).expect("write config");
    let child = Command::new("docker-registry")
        .arg("serve")
        .arg(dir.path().join("config.yml"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("docker-registry starts");
    let host = format!("127.0.0.1:{port}");
    let registry = AuthRegistry {
        child,
        host,
        _dir: dir,
    };
    for _ in 0..100 {
        if let Ok(r) = crate::http()
            .get(format!("http://{}/v2/", registry.host))
            .send()
            .await
        {
            assert_eq!(r.status(), 401, "the registry must ask for a login");
            return registry;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("docker-registry did not start");
}
