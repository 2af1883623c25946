#!/usr/bin/env bash
# Runs the whole test suite on a Debian 12 machine with Rust: installs and
# starts the real infrastructure (scripts/infra.sh), builds the workspace once,
# makes the images docker-compose.yml runs (scripts/images.sh, from the debug
# binaries just built), checks formatting and lints, then runs every unit and
# end-to-end test.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/infra.sh
set -a
# shellcheck disable=SC1091
source .gantry/infra.env
set +a

command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest

echo "== format"
cargo fmt --all -- --check
echo "== build"
cargo build --workspace --all-targets
echo "== images (docker-compose test: made here, nothing pulled)"
GANTRY_BIN_DIR="$PWD/target/debug" bash scripts/images.sh
echo "== clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== tests"
profile=default
[ "${CI:-}" = "true" ] && profile=ci
cargo nextest run --workspace --profile "$profile" "$@"
