//! The `notifier` binary: parses its settings and runs the service (see lib.rs).
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let settings = notifier::Settings::parse();
    let path = settings.infra.config.clone();
    gantry_runtime::main(
        "notifier",
        &path,
        &[
            gantry_config::SecretKind::Forge,
            gantry_config::SecretKind::Chat,
        ],
        |config, shutdown| async move {
            notifier::Service::build(settings, config)
                .await?
                .run_until_stopped(shutdown)
                .await
        },
    )
    .await
}
