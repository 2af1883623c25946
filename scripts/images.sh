#!/usr/bin/env bash
# Makes, without pulling anything, every image docker-compose.yml needs, for
# Debian machines that cannot reach a registry of images:
#   debian:bookworm-slim          debootstrap --variant=minbase bookworm
#   gantry-local/postgres:15      deploy/local/postgres   (Debian's postgresql-15)
#   gantry-local/rabbitmq:3       deploy/local/rabbitmq   (Debian's rabbitmq-server)
#   gantry-local/registry:2       deploy/local/registry   (Debian's docker-registry)
#   gantry/<service>:dev          deploy/Dockerfile.prebuilt with binaries built here
# Images that exist are kept (delete one to remake it); service images are
# always rebuilt. Containers still reach the Debian mirror for apt-get.
# Then:  docker-compose --env-file .gantry/images.env up -d
#
# GANTRY_BIN_DIR=target/debug uses binaries already built there instead of
# building release binaries.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
STATE=$ROOT/.gantry
mkdir -p "$STATE"
log() { echo "images: $*" >&2; }

if ! docker info >/dev/null 2>&1; then
  bash scripts/infra.sh
fi
command -v debootstrap >/dev/null || {
  log "installing debootstrap"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null ||
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
}

have() { docker image inspect "$1" >/dev/null 2>&1; }

if ! have debian:bookworm-slim; then
  log "debootstrap bookworm (a few minutes)"
  root=$(mktemp -d)
  debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >"$STATE/debootstrap.log" 2>&1 ||
    { tail -20 "$STATE/debootstrap.log" >&2; exit 1; }
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -c . | docker import - debian:bookworm-slim >/dev/null
  rm -rf "$root"
fi

for part in postgres:15 rabbitmq:3 registry:2; do
  name=${part%%:*}
  if ! have "gantry-local/$part"; then
    log "building gantry-local/$part"
    docker build -q -t "gantry-local/$part" "deploy/local/$name" >/dev/null
  fi
done

services=(webhook-ingest builder registry-publisher deployer notifier)
bin=${GANTRY_BIN_DIR:-}
if [ -z "$bin" ]; then
  cargo build --release --bins -p webhook-ingest -p builder -p registry-publisher -p deployer -p notifier -p gantry-cli
  bin=$ROOT/target/release
fi
context=$(mktemp -d)
trap 'rm -rf "$context"' EXIT
# Debug information is not needed in the image. Every image also has the
# gantry command (docker-compose.yml's `demo` runs it).
for svc in "${services[@]}" gantry; do
  objcopy --strip-debug "$bin/$svc" "$context/$svc" 2>/dev/null || cp "$bin/$svc" "$context/$svc"
done
for svc in "${services[@]}"; do
  log "building gantry/$svc:dev"
  docker build -q -f deploy/Dockerfile.prebuilt --build-arg SERVICE="$svc" \
    -t "gantry/$svc:dev" "$context" >/dev/null
done

cat >"$STATE/images.env" <<ENV
GANTRY_POSTGRES_IMAGE=gantry-local/postgres:15
GANTRY_RABBITMQ_IMAGE=gantry-local/rabbitmq:3
GANTRY_REGISTRY_IMAGE=gantry-local/registry:2
ENV
log "done; run: docker-compose --env-file .gantry/images.env up -d"
