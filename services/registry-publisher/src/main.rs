//! The `registry-publisher` binary: parses its settings and runs the service (see lib.rs).
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let settings = registry_publisher::Settings::parse();
    let path = settings.infra.config.clone();
    gantry_runtime::main(
        "registry-publisher",
        &path,
        &[gantry_config::SecretKind::Registry],
        |config, shutdown| async move {
            registry_publisher::Service::build(settings, config)
                .await?
                .run_until_stopped(shutdown)
                .await
        },
    )
    .await
}
