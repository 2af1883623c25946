#!/usr/bin/env bash
# Brings Gantry up on a Debian 12 machine with Rust: installs and starts the
# Docker engine, docker-registry, RabbitMQ and PostgreSQL when missing
# (scripts/infra.sh), builds the services, and runs the five of them until
# Ctrl-C. Configuration: $GANTRY_CONFIG, else ./gantry.yml, else the example
# in deploy/gantry.example.yml.
#
#   webhook-ingest      http://127.0.0.1:8080 (webhooks, /live, /ready)  gRPC :9090
#   builder             http://127.0.0.1:8081 (/live, /ready)            gRPC :9091
#   registry-publisher  http://127.0.0.1:8082                            gRPC :9092
#   deployer            http://127.0.0.1:8083                            gRPC :9093
#   notifier            http://127.0.0.1:8084                            gRPC :9094
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

bash scripts/infra.sh
set -a
# shellcheck disable=SC1091
source .gantry/infra.env
set +a

if [ -z "${GANTRY_CONFIG:-}" ]; then
  if [ -f gantry.yml ]; then
    GANTRY_CONFIG=$ROOT/gantry.yml
  else
    # The example configuration, with an admin token for the gantry command
    # and a read token for the notifier, both made here once (0600).
    umask 077
    [ -f .gantry/webhook-secret ] || head -c 24 /dev/urandom | base64 > .gantry/webhook-secret
    for t in token notifier-token; do
      [ -s ".gantry/$t" ] || printf 'gty_%s' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" > ".gantry/$t"
    done
    hash() { tr -d '\n' < "$1" | sha256sum | cut -d' ' -f1; }
    {
      cat deploy/gantry.example.yml
      echo
      echo "tokens:"
      echo "  - {name: local-admin, sha256: $(hash .gantry/token), scopes: [admin]}"
      echo "  - {name: notifier, sha256: $(hash .gantry/notifier-token), scopes: [read]}"
    } > .gantry/gantry.yml
    umask 022
    GANTRY_CONFIG=$ROOT/.gantry/gantry.yml
    echo "gantry: using the example configuration; webhook secret in .gantry/webhook-secret," >&2
    echo "gantry: API token in .gantry/token: export GANTRY_TOKEN=\$(cat .gantry/token)" >&2
  fi
fi
export GANTRY_CONFIG
# The notifier links to build logs it reads from the builder.
export GANTRY_BUILDER_URL=${GANTRY_BUILDER_URL:-http://127.0.0.1:9091}

profile_flag=()
bin=target/debug
if [ "${GANTRY_RELEASE:-}" = 1 ]; then profile_flag=(--release); bin=target/release; fi
cargo build "${profile_flag[@]}" --bins -p webhook-ingest -p builder -p registry-publisher -p deployer -p notifier -p gantry-cli

mkdir -p .gantry/logs
pids=()
stop() {
  echo "gantry: stopping" >&2
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}
trap stop INT TERM EXIT
i=0
for svc in webhook-ingest builder registry-publisher deployer notifier; do
  extra=()
  # Only the notifier holds its token (it reads build logs from the builder).
  if [ "$svc" = notifier ] && [ -s .gantry/notifier-token ] && [ -z "${GANTRY_BUILDER_TOKEN:-}" ]; then
    extra=(GANTRY_BUILDER_TOKEN="$(cat .gantry/notifier-token)")
  fi
  env "${extra[@]}" GANTRY_HTTP_ADDR=127.0.0.1:$((8080 + i)) GANTRY_GRPC_ADDR=127.0.0.1:$((9090 + i)) \
    "$bin/$svc" > >(sed -u "s/^/[$svc] /" | tee -a ".gantry/logs/$svc.log") 2>&1 &
  pids+=($!)
  i=$((i + 1))
done
for port in 8080 8081 8082 8083 8084; do
  for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break
    sleep 0.2
  done
done
echo "gantry: up — webhooks at http://127.0.0.1:8080/hooks/gitlab and /hooks/github; $bin/gantry pipelines; Ctrl-C stops" >&2
wait -n "${pids[@]}"
