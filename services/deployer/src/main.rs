//! The `deployer` binary: parses its settings and runs the service (see lib.rs).
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let settings = deployer::Settings::parse();
    let path = settings.infra.config.clone();
    gantry_runtime::main(
        "deployer",
        &path,
        &[gantry_config::SecretKind::Registry],
        |config, shutdown| async move {
            deployer::Service::build(settings, config)
                .await?
                .run_until_stopped(shutdown)
                .await
        },
    )
    .await
}
