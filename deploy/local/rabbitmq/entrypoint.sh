#!/bin/sh
# Writes the broker configuration from the environment and runs the broker
# (Debian's wrapper drops to the rabbitmq user).
set -eu
cat >/etc/rabbitmq/rabbitmq.conf <<CONF
loopback_users = none
listeners.tcp.default = 5672
default_user = ${RABBITMQ_DEFAULT_USER:-guest}
default_pass = ${RABBITMQ_DEFAULT_PASS:-guest}
CONF
chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
exec rabbitmq-server
