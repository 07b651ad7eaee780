#!/bin/bash
# Run RabbitMQ as `rabbitmq` with its logs on stdout, as the official image does. The CLI
# tools (the health check's rabbitmq-diagnostics, run as root) find the node through the
# same Erlang cookie: Debian's wrappers switch to `rabbitmq` for them.
set -euo pipefail
export RABBITMQ_LOGS=-
mkdir -p /var/lib/rabbitmq /var/log/rabbitmq
chown -R rabbitmq:rabbitmq /var/lib/rabbitmq /var/log/rabbitmq
if [ "${1:-}" = rabbitmq-server ]; then
    # setpriv keeps the environment: the Erlang cookie goes to rabbitmq's home, not root's.
    export HOME=/var/lib/rabbitmq
    exec setpriv --reuid=rabbitmq --regid=rabbitmq --init-groups -- /usr/lib/rabbitmq/bin/rabbitmq-server
fi
exec "$@"
