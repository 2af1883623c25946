//! The `notifier` binary (see lib.rs).
fn main() -> std::process::ExitCode {
    gantry_runtime::main::<notifier::Service>()
}
