//! Environment endpoints: a stable `ip:port` per environment that forwards
//! each new TCP connection to whichever version is live. The switch to a new
//! version is one pointer swap after its health check passed, so answers
//! never stop during a replacement; connections already open keep going to
//! the old version while it drains.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// How long forwarding waits for the live version to accept a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The live backend of every environment.
#[derive(Clone, Default)]
pub struct Backends(Arc<RwLock<HashMap<String, SocketAddr>>>);

impl Backends {
    pub fn set(&self, environment: &str, addr: Option<SocketAddr>) {
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        match addr {
            Some(a) => map.insert(environment.to_owned(), a),
            None => map.remove(environment),
        };
    }

    pub fn get(&self, environment: &str) -> Option<SocketAddr> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(environment)
            .copied()
    }
}

/// Binds the endpoint of `environment`.
pub async fn bind(environment: &str, endpoint: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(endpoint)
        .await
        .with_context(|| format!("environment {environment}: cannot listen on {endpoint}"))
}

/// Forwards connections to `environment`'s live version until `shutdown`.
pub async fn serve(
    environment: String,
    listener: TcpListener,
    backends: Backends,
    shutdown: CancellationToken,
) {
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            a = listener.accept() => a,
        };
        let (client, peer) = match accepted {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(environment, error = %e, "endpoint accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(backend) = backends.get(&environment) else {
            tracing::debug!(environment, %peer, "no live version: connection closed");
            continue;
        };
        let env = environment.clone();
        let stop = shutdown.clone();
        tokio::spawn(async move {
            if let Err(e) = forward(client, backend, stop).await {
                tracing::debug!(environment = env, %backend, error = %e, "forwarding ended");
            }
        });
    }
}

async fn forward(
    mut client: TcpStream,
    backend: SocketAddr,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut upstream = tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(backend))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out"))??;
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    tokio::select! {
        _ = shutdown.cancelled() => Ok(()),
        r = tokio::io::copy_bidirectional(&mut client, &mut upstream) => r.map(|_| ()),
    }
}
