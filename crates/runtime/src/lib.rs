//! What every service does the same way at run time:
//!
//! - [`shutdown_on_signal`]: one cancellation token, cancelled by SIGTERM or
//!   SIGINT, handed to every server and consumer loop;
//! - [`Readiness`]: named checks (broker, database, Docker) behind `/ready`,
//!   and `/live` which only says the process answers ([`health_routes`]);
//! - [`serve_http`] and [`serve_grpc`]: servers with graceful shutdown and
//!   optional TLS ([`tls`]); the gRPC one always adds `grpc.health.v1` (kept
//!   in step with readiness) and reflection for `gantry.v1`, and checks every
//!   call's bearer token ([`auth`]).

pub mod api;
pub mod auth;
pub mod metrics;
pub mod service;
pub mod tls;

pub use api::ApiError;
pub use service::{Built, Common, Parts, Service, main};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::http::StatusCode;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic_health::ServingStatus;

/// How long servers get to finish in-flight requests after shutdown starts.
pub const GRACE_PERIOD: Duration = Duration::from_secs(10);
/// How often gRPC health mirrors readiness.
const HEALTH_REFRESH: Duration = Duration::from_secs(1);

/// The life of a service process ([`main`] calls it): installs the TLS
/// crypto provider and telemetry, loads and validates the configuration file,
/// resolving only the secrets of `secrets` (exit code 2 with a clear message
/// when it is wrong), then runs `run` until SIGTERM/SIGINT.
pub async fn run_process<F, Fut>(
    name: &'static str,
    config_path: &std::path::Path,
    secrets: &[gantry_config::SecretKind],
    run: F,
) -> std::process::ExitCode
where
    F: FnOnce(gantry_config::GantryConfig, CancellationToken) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    use std::process::ExitCode;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let _telemetry = match gantry_telemetry::init(name) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("{name}: cannot set up telemetry: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let config = match gantry_config::GantryConfig::load_for(config_path, secrets) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("{name}: invalid configuration: {e}");
            return ExitCode::from(2);
        }
    };
    match run(config, shutdown_on_signal()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "{name} stopped");
            eprintln!("{name}: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A token cancelled on SIGTERM or SIGINT.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let ctrl_c = tokio::signal::ctrl_c();
        #[cfg(unix)]
        {
            let mut term =
                match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot listen for SIGTERM");
                        let _ = ctrl_c.await;
                        t.cancel();
                        return;
                    }
                };
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        #[cfg(not(unix))]
        let _ = ctrl_c.await;
        tracing::info!("shutdown signal received");
        t.cancel();
    });
    token
}

type CheckFn = Arc<dyn Fn() -> Pin<Box<dyn Future<Output = bool> + Send>> + Send + Sync>;

/// The named checks that decide readiness.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Vec<(&'static str, CheckFn)>,
}

impl Readiness {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a check; `f` is called on every readiness probe.
    pub fn check<F, Fut>(mut self, name: &'static str, f: F) -> Self
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        self.checks.push((name, Arc::new(move || Box::pin(f()))));
        self
    }

    /// Ready only while the database answers.
    pub fn database(self, pool: sqlx::PgPool) -> Self {
        self.check("database", move || {
            let pool = pool.clone();
            async move { gantry_store::ping(&pool).await }
        })
    }

    /// Ready only while every bus loop holds a broker connection.
    pub fn broker(self, links: Vec<gantry_bus::Link>) -> Self {
        self.check("broker", move || {
            let up = links.iter().all(gantry_bus::Link::is_up);
            async move { up }
        })
    }

    /// These checks and `other`'s.
    pub fn and(mut self, other: Readiness) -> Self {
        self.checks.extend(other.checks);
        self
    }

    /// Runs every check; ready only if all pass.
    pub async fn report(&self) -> (bool, serde_json::Map<String, serde_json::Value>) {
        let results = futures::future::join_all(self.checks.iter().map(|(_, f)| f())).await;
        let mut map = serde_json::Map::new();
        for ((name, _), up) in self.checks.iter().zip(&results) {
            map.insert((*name).to_owned(), serde_json::Value::Bool(*up));
        }
        (results.iter().all(|up| *up), map)
    }
}

/// `/live` (200 while the process serves) and `/ready` (200 only when every
/// check passes, 503 otherwise; the body lists each check).
pub fn health_routes(readiness: Readiness) -> axum::Router {
    axum::Router::new()
        .route("/live", get(|| async { "live" }))
        .route(
            "/ready",
            get(move || {
                let readiness = readiness.clone();
                async move {
                    let (ready, checks) = readiness.report().await;
                    let status = if ready {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    };
                    (
                        status,
                        Json(serde_json::json!({ "ready": ready, "checks": checks })),
                    )
                }
            }),
        )
}

/// Serves `router` on `listener` (over TLS with `tls`) until `shutdown`,
/// then drains for at most [`GRACE_PERIOD`].
pub async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    tls: Option<&tls::TlsFiles>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if let Some(tls) = tls {
        return tls::serve_https(listener, router, tls.acceptor()?, shutdown, GRACE_PERIOD).await;
    }
    let drain = shutdown.clone();
    let server = axum::serve(listener, router)
        .with_graceful_shutdown(async move { drain.cancelled().await });
    bounded_by_grace(std::future::IntoFuture::into_future(server), shutdown).await
}

async fn bounded_by_grace<E: Into<anyhow::Error>>(
    server: impl Future<Output = Result<(), E>>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    tokio::pin!(server);
    tokio::select! {
        r = &mut server => r.map_err(Into::into),
        _ = async { shutdown.cancelled().await; tokio::time::sleep(GRACE_PERIOD).await } => {
            tracing::warn!("grace period over; dropping open connections");
            Ok(())
        }
    }
}

/// The gRPC services a service serves: their routes and names (the names
/// are what reflection advertises).
pub struct Grpc {
    pub routes: tonic::service::Routes,
    pub names: Vec<&'static str>,
}

impl Grpc {
    /// Only health and reflection.
    pub fn none() -> Self {
        Self {
            routes: tonic::service::Routes::default(),
            names: Vec::new(),
        }
    }

    /// One `gantry.v1` service: its generated server and `SERVICE_NAME`.
    pub fn one<S>(server: S, name: &'static str) -> Self
    where
        S: tower_service::Service<
                http::Request<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        Self {
            routes: tonic::service::Routes::new(server),
            names: vec![name],
        }
    }

    /// One more `gantry.v1` service served by the same listener.
    pub fn and<S>(mut self, server: S, name: &'static str) -> Self
    where
        S: tower_service::Service<
                http::Request<tonic::body::Body>,
                Error = std::convert::Infallible,
            > + tonic::server::NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Response: axum::response::IntoResponse,
        S::Future: Send + 'static,
    {
        self.routes = self.routes.add_service(server);
        self.names.push(name);
        self
    }
}

/// How a gRPC listener is guarded: the tokens it accepts, and its TLS.
#[derive(Clone, Default)]
pub struct Guard {
    pub tokens: Vec<gantry_config::ApiToken>,
    pub tls: Option<tls::TlsFiles>,
}

/// Serves `grpc` plus `grpc.health.v1` and reflection on `listener` until
/// `shutdown`; every call but health needs a token of `guard` with its scope.
pub async fn serve_grpc(
    listener: TcpListener,
    grpc: Grpc,
    readiness: Readiness,
    guard: Guard,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let (reporter, health) = tonic_health::server::health_reporter();
    let mut reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(gantry_proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health");
    for name in &grpc.names {
        reflection = reflection.with_service_name(*name);
    }
    let reflection = reflection.build_v1()?;
    let routes = grpc.routes;
    let routes = routes.add_service(health).add_service(reflection);
    let refresh = shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(HEALTH_REFRESH);
        while !refresh.is_cancelled() {
            tokio::select! {
                _ = refresh.cancelled() => break,
                _ = tick.tick() => {}
            }
            let (ready, _) = readiness.report().await;
            let status = if ready {
                ServingStatus::Serving
            } else {
                ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
        }
    });
    let drain = shutdown.clone();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &guard.tls {
        builder = builder.tls_config(tls.grpc())?;
    }
    let server = builder
        .layer(auth::AuthLayer::new(guard.tokens))
        .add_routes(routes)
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::TcpListenerStream::new(listener),
            async move { drain.cancelled().await },
        );
    bounded_by_grace(server, shutdown).await
}

/// Serves a service's HTTP side (`extra` routes plus `/live`, `/ready` and
/// `/metrics`, every route's answers counted)
/// and its gRPC side (`grpc` plus health and reflection) until `shutdown`.
pub async fn serve(
    http: TcpListener,
    extra: axum::Router,
    grpc_listener: TcpListener,
    grpc: Grpc,
    readiness: Readiness,
    guard: Guard,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let router = extra
        .merge(health_routes(readiness.clone()))
        .merge(metrics::routes(guard.tokens.clone()))
        .route_layer(axum::middleware::from_fn(metrics::track));
    let (h, g) = tokio::join!(
        serve_http(http, router, guard.tls.as_ref(), shutdown.clone()),
        serve_grpc(
            grpc_listener,
            grpc,
            readiness,
            guard.clone(),
            shutdown.clone()
        ),
    );
    shutdown.cancel();
    h.and(g)
}

/// What every service has: its migrated database schema, its two bound
/// listeners, and the bus loops (consumers, outbox relay) it runs.
pub struct Base {
    pub amqp_url: String,
    pub pool: sqlx::PgPool,
    /// Wakes the outbox relay as soon as an event is written.
    pub relay_wake: std::sync::Arc<tokio::sync::Notify>,
    http: TcpListener,
    grpc: TcpListener,
    tasks: tokio::task::JoinSet<()>,
    links: Vec<gantry_bus::Link>,
    /// API tokens and TLS of the listeners.
    pub guard: Guard,
}

impl Base {
    /// Connects to the database (creating `schema`, running `migrator`) and
    /// binds both listeners, guarded by the tokens of `config` and the TLS of `infra`.
    pub async fn connect(
        infra: &gantry_config::Infra,
        config: &gantry_config::GantryConfig,
        schema: &str,
        migrator: &sqlx::migrate::Migrator,
        http_addr: &str,
        grpc_addr: &str,
    ) -> anyhow::Result<Self> {
        let guard = Guard {
            tokens: config.tokens.clone(),
            tls: tls::TlsFiles::load(&infra.tls)?,
        };
        if guard.tokens.is_empty() {
            tracing::warn!(
                "no API tokens are configured: every gRPC call but health is refused (see `tokens:` in the configuration)"
            );
        }
        metrics::install();
        let pool = gantry_store::connect(&infra.database_url, schema, migrator).await?;
        Ok(Self {
            guard,
            amqp_url: infra.amqp_url.clone(),
            pool,
            relay_wake: Default::default(),
            http: bind(http_addr).await?,
            grpc: bind(grpc_addr).await?,
            tasks: tokio::task::JoinSet::new(),
            links: Vec::new(),
        })
    }

    pub fn http_addr(&self) -> std::net::SocketAddr {
        self.http
            .local_addr()
            .expect("bound listener has an address")
    }

    pub fn grpc_addr(&self) -> std::net::SocketAddr {
        self.grpc
            .local_addr()
            .expect("bound listener has an address")
    }

    /// Runs the relay of this service's outbox until `shutdown`.
    pub fn relay(&mut self, shutdown: &CancellationToken) {
        let link = gantry_bus::Link::default();
        self.links.push(link.clone());
        self.tasks.spawn(gantry_bus::relay(
            self.amqp_url.clone(),
            self.pool.clone(),
            self.relay_wake.clone(),
            link,
            shutdown.clone(),
        ));
    }

    /// Consumes `queue` with `handler` until `shutdown`.
    pub fn consume<H: gantry_bus::Handler>(
        &mut self,
        queue: gantry_bus::QueueDef,
        prefetch: u16,
        handler: H,
        shutdown: &CancellationToken,
    ) {
        let link = gantry_bus::Link::default();
        self.links.push(link.clone());
        self.tasks.spawn(gantry_bus::consume(
            self.amqp_url.clone(),
            queue,
            prefetch,
            std::sync::Arc::new(handler),
            link,
            shutdown.clone(),
        ));
    }

    /// Samples the outbox and `queues` for `/metrics` until `shutdown`.
    pub fn sample(&mut self, queues: Vec<gantry_queue::Queue>, shutdown: &CancellationToken) {
        self.tasks
            .spawn(metrics::sample(self.pool.clone(), queues, shutdown.clone()));
    }

    /// Runs another long-lived task that stops on `shutdown`.
    pub fn spawn(&mut self, task: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(task);
    }

    /// Readiness on the database and every bus loop started so far.
    pub fn readiness(&self) -> Readiness {
        Readiness::new()
            .database(self.pool.clone())
            .broker(self.links.clone())
    }

    /// Serves HTTP (`extra` plus health) and gRPC (`grpc` plus health and
    /// reflection) until `shutdown`, then waits for the bus loops and tasks.
    pub async fn serve(
        mut self,
        name: &str,
        extra: axum::Router,
        grpc: Grpc,
        readiness: Readiness,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        tracing::info!(http = %self.http_addr(), grpc = %self.grpc_addr(), "{name} started");
        let served = serve(
            self.http,
            extra,
            self.grpc,
            grpc,
            readiness,
            self.guard.clone(),
            shutdown.clone(),
        )
        .await;
        shutdown.cancel();
        while self.tasks.join_next().await.is_some() {}
        served
    }
}

/// Binds a TCP listener, naming the address in the error.
pub async fn bind(addr: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::Error::new(e).context(format!("cannot listen on {addr}")))
}
