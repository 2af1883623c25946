#!/usr/bin/env bash
# Runs the whole test suite on a Debian 12 machine with Rust: installs and
# starts the real infrastructure (scripts/infra.sh), builds the workspace once,
# makes the images docker-compose.yml runs (scripts/images.sh, from the debug
# binaries just built), checks formatting and lints, then runs every unit and
# end-to-end test. The build reads the checked SQL from .sqlx/ (no database
# needed); the lint checks the SQL again against the migrated schemas and
# fails if .sqlx/ is stale (scripts/sqlx-prepare.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/infra.sh
set -a
# shellcheck disable=SC1091
source .gantry/infra.env
set +a

command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest

# The query macros read .sqlx/, whatever DATABASE_URL says.
export SQLX_OFFLINE=true

echo "== format"
cargo fmt --all -- --check
echo "== build"
cargo build --workspace --all-targets
echo "== images (docker-compose test: made here, nothing pulled)"
GANTRY_BIN_DIR="$PWD/target/debug" bash scripts/images.sh
echo "== clippy (and the SQL checked against the migrated schemas)"
sqlx_seen=$(mktemp -d)
(
  eval "$(bash scripts/sqlx-prepare.sh --env)"
  SQLX_OFFLINE=false SQLX_OFFLINE_DIR="$sqlx_seen" \
    cargo clippy --workspace --all-targets -- -D warnings
)
# Every query the lint compiled online must be what .sqlx/ says about it.
for f in "$sqlx_seen"/query-*.json; do
  [ -e "$f" ] || continue
  if ! cmp -s "$f" ".sqlx/${f##*/}"; then
    echo ".sqlx/${f##*/} is stale or missing: run scripts/sqlx-prepare.sh" >&2
    exit 1
  fi
done
rm -rf "$sqlx_seen"
echo "== tests"
profile=default
[ "${CI:-}" = "true" ] && profile=ci
cargo nextest run --workspace --profile "$profile" "$@"
