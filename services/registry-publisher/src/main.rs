//! The `registry-publisher` binary (see lib.rs).
fn main() -> std::process::ExitCode {
    gantry_runtime::main::<registry_publisher::Service>()
}
