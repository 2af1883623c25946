//! The one service skeleton. A Gantry service is its [`Service`] impl: its
//! settings (with the [`Common`] part every service has), its schema and
//! migrations, the secrets it uses, and [`Service::start`], which starts its
//! own loops on a connected [`Base`] and returns what it serves ([`Parts`]).
//! Everything else — the process's life ([`main`]), configuration loading,
//! the database, the listeners and their guard, health, shutdown — is here,
//! once. A binary is one line: `gantry_runtime::main::<my_service::Service>()`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use gantry_config::{GantryConfig, Infra, SecretKind};
use tokio_util::sync::CancellationToken;

use crate::{Base, Grpc, Readiness};

/// What every service's command line has: the infrastructure, and where it
/// listens (`GANTRY_HTTP_ADDR`, `GANTRY_GRPC_ADDR`; each service has its own
/// default ports, [`Service::PORTS`]).
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    #[command(flatten)]
    pub infra: Infra,
    /// Address of the HTTP server (`/live`, `/ready`, and the service's own routes).
    #[arg(long, env = "GANTRY_HTTP_ADDR")]
    pub http_addr: Option<String>,
    /// Address of the gRPC server (the service's API, health, reflection).
    #[arg(long, env = "GANTRY_GRPC_ADDR")]
    pub grpc_addr: Option<String>,
}

/// What a started service serves, besides health and reflection.
pub struct Parts {
    /// Its HTTP routes.
    pub router: axum::Router,
    /// Its gRPC services.
    pub grpc: Grpc,
    /// Its own readiness checks (the database and its bus loops are added).
    pub readiness: Readiness,
}

impl Default for Parts {
    fn default() -> Self {
        Self {
            router: axum::Router::new(),
            grpc: Grpc::none(),
            readiness: Readiness::new(),
        }
    }
}

/// A Gantry service.
pub trait Service: Sized {
    /// Its command line and environment; [`Service::common`] finds [`Common`] in it.
    type Settings: clap::Parser + Send + 'static;
    /// Its name, in logs and traces.
    const NAME: &'static str;
    /// Its default HTTP and gRPC ports.
    const PORTS: (u16, u16);
    /// The Postgres schema it owns.
    const SCHEMA: &'static str;
    /// The kinds of secrets it resolves (the others are never read).
    const SECRETS: &'static [SecretKind];

    /// Its embedded migrations.
    fn migrator() -> &'static sqlx::migrate::Migrator;

    /// The common part of its settings.
    fn common(settings: &Self::Settings) -> &Common;

    /// Starts what is its own on `base` (consumers, relay, workers: they
    /// stop on `shutdown`) and returns what it serves.
    fn start(
        settings: Self::Settings,
        config: Arc<GantryConfig>,
        base: &mut Base,
        shutdown: &CancellationToken,
    ) -> impl Future<Output = anyhow::Result<Parts>> + Send;
}

/// The part of a [`Service`] impl that only names things: its settings
/// type (`Settings`, with a `common` field), name, default ports, schema
/// (`SCHEMA`), migrations (`MIGRATOR`) and secret kinds.
///
/// ```ignore
/// impl gantry_runtime::Service for Service {
///     gantry_runtime::service_identity!("builder", (8081, 9091), [Clone, Registry]);
///     async fn start(/* ... */) -> anyhow::Result<Parts> { /* ... */ }
/// }
/// ```
#[macro_export]
macro_rules! service_identity {
    ($name:literal, ($http:literal, $grpc:literal), [$($secret:ident),* $(,)?]) => {
        type Settings = Settings;
        const NAME: &'static str = $name;
        const PORTS: (u16, u16) = ($http, $grpc);
        const SCHEMA: &'static str = SCHEMA;
        const SECRETS: &'static [gantry_config::SecretKind] =
            &[$(gantry_config::SecretKind::$secret),*];

        fn migrator() -> &'static sqlx::migrate::Migrator {
            &MIGRATOR
        }

        fn common(settings: &Settings) -> &$crate::Common {
            &settings.common
        }
    };
}

/// A service connected and bound, not yet started: its addresses are known
/// (tests and benchmarks bind port 0 and read them here).
pub struct Built<S: Service> {
    settings: S::Settings,
    config: Arc<GantryConfig>,
    base: Base,
}

impl<S: Service> Built<S> {
    /// Connects to the database (migrating the service's schema) and binds
    /// both listeners.
    pub async fn new(settings: S::Settings, config: GantryConfig) -> anyhow::Result<Self> {
        let common = S::common(&settings);
        let http = common
            .http_addr
            .clone()
            .unwrap_or_else(|| format!("0.0.0.0:{}", S::PORTS.0));
        let grpc = common
            .grpc_addr
            .clone()
            .unwrap_or_else(|| format!("0.0.0.0:{}", S::PORTS.1));
        let base = Base::connect(
            &common.infra,
            &config,
            S::SCHEMA,
            S::migrator(),
            &http,
            &grpc,
        )
        .await?;
        Ok(Self {
            settings,
            config: Arc::new(config),
            base,
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        self.base.http_addr()
    }

    pub fn grpc_addr(&self) -> SocketAddr {
        self.base.grpc_addr()
    }

    /// Starts the service and serves it until `shutdown`.
    pub async fn run_until_stopped(mut self, shutdown: CancellationToken) -> anyhow::Result<()> {
        let parts = S::start(self.settings, self.config, &mut self.base, &shutdown).await?;
        let readiness = self.base.readiness().and(parts.readiness);
        self.base
            .serve(S::NAME, parts.router, parts.grpc, readiness, shutdown)
            .await
    }
}

/// The whole life of a service binary: the TLS crypto provider and
/// telemetry, the settings, the configuration file with only the service's
/// secrets (exit code 2 with a clear message when it is wrong), then the
/// service until SIGTERM/SIGINT (exit code 1 when it stops on an error).
pub fn main<S: Service>() -> std::process::ExitCode {
    use clap::Parser as _;
    let settings = S::Settings::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{}: cannot start the async runtime: {e}", S::NAME);
            return std::process::ExitCode::FAILURE;
        }
    };
    let path = S::common(&settings).infra.config.clone();
    runtime.block_on(crate::run_process(
        S::NAME,
        &path,
        S::SECRETS,
        |config, shutdown| async move {
            Built::<S>::new(settings, config)
                .await?
                .run_until_stopped(shutdown)
                .await
        },
    ))
}
