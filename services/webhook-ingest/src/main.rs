//! The `webhook-ingest` binary (see lib.rs).
fn main() -> std::process::ExitCode {
    gantry_runtime::main::<webhook_ingest::Service>()
}
