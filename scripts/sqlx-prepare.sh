#!/usr/bin/env bash
# Checks every `sqlx::query!`-family macro against a real schema and writes the
# result to .sqlx/ (committed), so that the workspace builds without a
# database. Run it after changing a query or a migration; needs the
# Postgres that scripts/infra.sh starts.
#
# For each crate with a sqlx.toml it makes that crate's schema in a scratch
# database (`gantry_sqlx`, dropped and made again) from the crate's
# migrations (and the shared plumbing tables), then compiles the workspace
# with the crate's GANTRY_SQLX_URL_* pointing at that schema.
#
#   scripts/sqlx-prepare.sh          rewrite .sqlx/
#   scripts/sqlx-prepare.sh --check  fail if .sqlx/ is not what the code needs
#   scripts/sqlx-prepare.sh --env    only make the schemas; print the
#                                    variables that point the macros at them
#                                    (scripts/test.sh lints with them and
#                                    compares what the macros wrote)
set -euo pipefail
cd "$(dirname "$0")/.."

mode=${1:-write}

db=gantry_sqlx
base="postgres://gantry:gantry@127.0.0.1:5432"
psql_db() { PGPASSWORD=gantry psql -qX -v ON_ERROR_STOP=1 -h 127.0.0.1 -U gantry "$@"; }

PGOPTIONS='-c client_min_messages=warning' psql_db -d gantry -c "DROP DATABASE IF EXISTS $db" -c "CREATE DATABASE $db" >/dev/null

# crate directory, schema, variable suffix (as in the crate's sqlx.toml)
crates=(
  "crates/store store STORE"
  "services/webhook-ingest ingest INGEST"
  "services/builder builder BUILDER"
  "services/registry-publisher publisher PUBLISHER"
  "services/deployer deployer DEPLOYER"
  "services/notifier notifier NOTIFIER"
)
for entry in "${crates[@]}"; do
  read -r dir schema var <<<"$entry"
  {
    echo "CREATE SCHEMA $schema; SET search_path = $schema;"
    cat crates/store/plumbing.sql
    if [ -d "$dir/migrations" ]; then
      for f in "$dir"/migrations/*.sql; do cat "$f"; echo; done
    fi
  } | psql_db -d "$db" >/dev/null
  export "GANTRY_SQLX_URL_$var=$base/$db?options=-c%20search_path%3D$schema"
  if [ "$mode" = --env ]; then
    echo "export GANTRY_SQLX_URL_$var='$base/$db?options=-c%20search_path%3D$schema'"
  else
    # The macros run again only if their crate is compiled again.
    touch "$dir"/src/lib.rs
  fi
done
[ "$mode" = --env ] && exit 0
check=false
[ "$mode" = --check ] && check=true

out="$PWD/.sqlx"
$check && out=$(mktemp -d)
mkdir -p "$out"
rm -f "$out"/query-*.json
SQLX_OFFLINE=false SQLX_OFFLINE_DIR="$out" cargo check --workspace --all-targets --quiet
if $check; then
  if ! diff -r -q .sqlx "$out"; then
    echo ".sqlx/ is stale: run scripts/sqlx-prepare.sh and commit .sqlx/" >&2
    exit 1
  fi
  rm -rf "$out"
  echo ".sqlx/ matches the code"
else
  echo "wrote $(find .sqlx -name 'query-*.json' | wc -l) checked queries to .sqlx/"
fi
