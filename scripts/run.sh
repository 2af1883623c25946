#!/usr/bin/env bash
# Brings Gantry up on a Debian 12 machine with Rust: installs and starts the
# Docker engine, docker-registry, RabbitMQ and PostgreSQL when missing
# (scripts/infra.sh), builds the services, and runs the five of them until
# Ctrl-C.
#
# Configuration: $GANTRY_CONFIG, else ./gantry.yml, else the demo: `gantry
# demo init` makes a sample service repository in $GANTRY_HOME/demo/repo
# (default .gantry) and the configuration that builds it as project `demo`
# and deploys it to `staging` at http://127.0.0.1:18080/, with an API token
# in $GANTRY_HOME/token. `gantry demo push` then pushes a new version.
#
#   webhook-ingest      http://127.0.0.1:8080 (webhooks, /live, /ready)  gRPC :9090
#   builder             http://127.0.0.1:8081 (/live, /ready)            gRPC :9091
#   registry-publisher  http://127.0.0.1:8082                            gRPC :9092
#   deployer            http://127.0.0.1:8083                            gRPC :9093
#   notifier            http://127.0.0.1:8084                            gRPC :9094
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export GANTRY_HOME=${GANTRY_HOME:-$ROOT/.gantry}
say() { echo "gantry: $*" >&2; }

# Refuse to start beside something that holds Gantry's ports (docker-compose
# up of this repository, most likely), naming it.
busy=()
for port in 8080 8081 8082 8083 8084 9090 9091 9092 9093 9094 18080; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then busy+=("$port"); fi
done
if [ ${#busy[@]} -gt 0 ]; then
  holders=""
  if command -v docker >/dev/null && docker info >/dev/null 2>&1; then
    for port in "${busy[@]}"; do
      holders+=$(docker ps --filter "publish=$port" \
        --format '{{.Names}} (docker-compose project {{.Label "com.docker.compose.project"}})' 2>/dev/null || true)
      holders+=$'\n'
    done
  fi
  say "Gantry needs these ports, which are already taken: ${busy[*]}"
  if [ -n "$(echo "$holders" | tr -d '[:space:]')" ]; then
    say "they are published by these containers:"
    echo "$holders" | sort -u | sed '/^$/d; s/^/    /' >&2
    say "stop them first: docker-compose down (in that project), then run this again."
  else
    say "stop what listens there (ss -ltnp shows it), or an earlier scripts/run.sh, then run this again."
  fi
  exit 1
fi

bash scripts/infra.sh
set -a
# shellcheck disable=SC1091
source .gantry/infra.env
set +a

profile_flag=()
bin=target/debug
if [ "${GANTRY_RELEASE:-}" = 1 ]; then profile_flag=(--release); bin=target/release; fi
cargo build "${profile_flag[@]}" --bins -p webhook-ingest -p builder -p registry-publisher -p deployer -p notifier -p gantry-cli

demo=0
if [ -z "${GANTRY_CONFIG:-}" ]; then
  if [ -f gantry.yml ]; then
    GANTRY_CONFIG=$ROOT/gantry.yml
  else
    mkdir -p "$GANTRY_HOME"
    "$bin/gantry" demo init --home "$GANTRY_HOME" >/dev/null
    GANTRY_CONFIG=$GANTRY_HOME/gantry.yml
    demo=1
  fi
fi
export GANTRY_CONFIG
# The notifier links to build logs it reads from the builder.
export GANTRY_BUILDER_URL=${GANTRY_BUILDER_URL:-http://127.0.0.1:9091}

mkdir -p "$GANTRY_HOME/logs"
pids=()
stop() {
  say "stopping"
  kill -TERM "${pids[@]}" 2>/dev/null || true
  wait "${pids[@]}" 2>/dev/null || true
}
trap stop INT TERM EXIT
i=0
for svc in webhook-ingest builder registry-publisher deployer notifier; do
  extra=()
  # Only the notifier holds its token (it reads build logs from the builder).
  if [ "$svc" = notifier ] && [ -s "$GANTRY_HOME/notifier-token" ] && [ -z "${GANTRY_BUILDER_TOKEN:-}" ]; then
    extra=(GANTRY_BUILDER_TOKEN="$(cat "$GANTRY_HOME/notifier-token")")
  fi
  env "${extra[@]}" GANTRY_HTTP_ADDR=127.0.0.1:$((8080 + i)) GANTRY_GRPC_ADDR=127.0.0.1:$((9090 + i)) \
    "$bin/$svc" > >(sed -u "s/^/[$svc] /" | tee -a "$GANTRY_HOME/logs/$svc.log") 2>&1 &
  pids+=($!)
  i=$((i + 1))
done
for port in 8080 8081 8082 8083 8084; do
  for _ in $(seq 1 150); do
    curl -fsS "http://127.0.0.1:$port/ready" >/dev/null 2>&1 && break
    sleep 0.2
  done
done
say "up — webhooks at http://127.0.0.1:8080/hooks/gitlab and /hooks/github; Ctrl-C stops"
if [ "$demo" = 1 ]; then
  token=$GANTRY_HOME/token
  [ "$GANTRY_HOME" = "$ROOT/.gantry" ] && token=.gantry/token
  cat >&2 <<EOF
gantry: the demo project is ready. In another terminal, here:

    export GANTRY_TOKEN=\$(cat $token)
    $bin/gantry demo push            # version 2: built, tested, deployed to staging
    curl http://127.0.0.1:18080/           # staging answers version 2
    $bin/gantry demo push --break    # a version that never answers: rolled back
    $bin/gantry pipelines            # what happened
    $bin/gantry envs                 # what runs where

EOF
fi
wait -n "${pids[@]}"
