//! The `webhook-ingest` binary: parses its settings and runs the service (see lib.rs).
use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let settings = webhook_ingest::Settings::parse();
    let path = settings.infra.config.clone();
    gantry_runtime::main(
        "webhook-ingest",
        &path,
        &[
            gantry_config::SecretKind::Webhook,
            gantry_config::SecretKind::Clone,
        ],
        |config, shutdown| async move {
            webhook_ingest::Service::build(settings, config)
                .await?
                .run_until_stopped(shutdown)
                .await
        },
    )
    .await
}
