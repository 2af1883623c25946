#!/usr/bin/env bash
# Installs (from Debian packages, when missing) and starts the real parts Gantry
# needs on this machine: the Docker engine, a docker-registry on 127.0.0.1:5000,
# RabbitMQ and PostgreSQL 15. Idempotent: what already runs is left alone.
# Writes the connection settings to .gantry/infra.env.
set -euo pipefail
cd "$(dirname "$0")/.."
STATE="$PWD/.gantry"
mkdir -p "$STATE"
log() { echo "infra: $*" >&2; }

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v rabbitmq-server >/dev/null || need+=(rabbitmq-server)
command -v pg_ctlcluster >/dev/null && [ -d /usr/lib/postgresql/15 ] || need+=(postgresql)
dpkg -s busybox-static >/dev/null 2>&1 || need+=(busybox-static)
command -v git >/dev/null || need+=(git)
command -v curl >/dev/null || need+=(curl)
command -v iptables >/dev/null || need+=(iptables)
command -v openssl >/dev/null || need+=(openssl)        # certificates for the TLS test
command -v htpasswd >/dev/null || need+=(apache2-utils)  # bcrypt htpasswd for the registry-auth test
if [ ${#need[@]} -gt 0 ]; then
  log "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need[@]}" >/dev/null
fi

wait_for() { # description, command...
  local what=$1; shift
  for _ in $(seq 1 240); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  log "$what did not come up"; return 1
}

# Docker engine
if ! docker info >/dev/null 2>&1; then
  log "starting dockerd"
  nohup dockerd >"$STATE/dockerd.log" 2>&1 &
  wait_for "dockerd" docker info
fi

# Image builds and test steps that ask for the network join the builder's
# bridge "gantry-steps" (GANTRY_STEP_NETWORK): they reach the internet, never
# this host's own services (RabbitMQ, Postgres, Gantry's ports: INPUT) nor
# private, link-local (cloud metadata) or shared addresses, which also covers
# other containers and ports published by Docker (FORWARD, DOCKER-USER).
for ipt in iptables ip6tables; do
  command -v "$ipt" >/dev/null || continue
  "$ipt" -C INPUT -i gantry-steps -j REJECT 2>/dev/null ||
    "$ipt" -I INPUT -i gantry-steps -j REJECT 2>/dev/null ||
    log "cannot add the $ipt INPUT rule that keeps test steps from this host"
done
if iptables -L DOCKER-USER -n >/dev/null 2>&1; then
  for net in 10.0.0.0/8 172.16.0.0/12 192.168.0.0/16 169.254.0.0/16 100.64.0.0/10; do
    iptables -C DOCKER-USER -i gantry-steps -d "$net" -j REJECT 2>/dev/null ||
      iptables -I DOCKER-USER -i gantry-steps -d "$net" -j REJECT ||
      log "cannot add the DOCKER-USER rule for $net"
  done
fi

# Registry on loopback
if ! curl -fsS http://127.0.0.1:5000/v2/ >/dev/null 2>&1; then
  log "starting docker-registry"
  mkdir -p "$STATE/registry"
  cat >"$STATE/registry.yml" <<YML
version: 0.1
storage:
  filesystem:
    rootdirectory: $STATE/registry
  delete:
    enabled: true
http:
  addr: 127.0.0.1:5000
log:
  level: warn
YML
  nohup docker-registry serve "$STATE/registry.yml" >"$STATE/registry.log" 2>&1 &
  wait_for "docker-registry" curl -fsS http://127.0.0.1:5000/v2/
fi

# RabbitMQ
if ! rabbitmqctl -q status >/dev/null 2>&1; then
  log "starting rabbitmq-server"
  rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_for "rabbitmq-server" rabbitmqctl -q await_startup --timeout 10
fi

# PostgreSQL
if ! pg_lsclusters -h | grep -q ' online'; then
  log "starting postgresql"
  pg_lsclusters -h | grep -q '^15 *main' || pg_createcluster 15 main >/dev/null
  pg_ctlcluster 15 main start
fi
wait_for "postgresql" su postgres -c "psql -qtAc 'select 1'"
su postgres -c "psql -qtAc \"select 1 from pg_roles where rolname='gantry'\"" | grep -q 1 ||
  su postgres -c "psql -qc \"create role gantry login superuser password 'gantry'\"" >/dev/null
su postgres -c "psql -qtAc \"select 1 from pg_database where datname='gantry'\"" | grep -q 1 ||
  su postgres -c "createdb -O gantry gantry"

cat >"$STATE/infra.env" <<ENV
DATABASE_URL=postgres://gantry:gantry@127.0.0.1:5432/gantry
AMQP_URL=amqp://guest:guest@127.0.0.1:5672/%2f
GANTRY_REGISTRY=127.0.0.1:5000
ENV
log "ready (settings in .gantry/infra.env)"
