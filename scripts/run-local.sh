#!/usr/bin/env bash
# `make run`: Redis (the configured one, or a project-local redis-server with AOF
# persistence), the Plural sandbox when no credentials are set, a worker and beat,
# all in the foreground. Ctrl-C stops them all.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
mkdir -p var/redis
pids=()
# Stop in reverse order of start: worker and beat hand their messages back to Redis
# before Redis and the sandbox go away.
# Each gets WORKER_SHUTDOWN_GRACE (15 s) and a margin, then SIGKILL: a stuck shutdown must
# not hang the terminal, and a killed worker loses nothing (its cancels are in the ledger).
cleanup() {
  trap - INT TERM EXIT
  for ((i = ${#pids[@]} - 1; i >= 0; i--)); do
    kill -TERM "${pids[i]}" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "${pids[i]}" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "${pids[i]}" 2>/dev/null || true
    wait "${pids[i]}" 2>/dev/null || true
  done
}
trap cleanup INT TERM EXIT

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

if [ -z "${REDIS_URL:-}" ]; then
  port=6379
  while ! port_free "$port"; do port=$((port + 1)); done
  # In a session of its own: Ctrl-C reaches the worker and beat, which hand their messages
  # back to Redis; Redis must still be there then (it is stopped last, by cleanup).
  setsid redis-server --port "$port" --bind 127.0.0.1 --dir "$PWD/var/redis" --appendonly yes \
    --appendfsync everysec --save "" --daemonize no --logfile "$PWD/var/redis/redis.log" &
  pids+=($!)
  export REDIS_URL="redis://127.0.0.1:$port/0"
  for _ in $(seq 50); do port_free "$port" || break; sleep 0.1; done
  echo "redis: project-local redis-server with AOF in var/redis, $REDIS_URL"
fi

reveal=()  # secrets this script made up, shown in the printout below
if [ -z "${PLURAL_CLIENT_ID:-}" ] && [ -z "${PLURAL_BASE_URL:-}" ]; then
  sport=${SANDBOX_PORT:-8800}
  while ! port_free "$sport"; do sport=$((sport + 1)); done
  export PLURAL_CLIENT_ID=sandbox-client PLURAL_CLIENT_SECRET=sandbox-secret
  reveal=(PLURAL_CLIENT_SECRET)
  "$VENV/bin/plural-cancel" sandbox --port "$sport" &
  pids+=($!)
  export PLURAL_BASE_URL="http://127.0.0.1:$sport/api"
  for _ in $(seq 50); do port_free "$sport" || break; sleep 0.1; done
  echo "plural: no credentials set, using the local sandbox at $PLURAL_BASE_URL"
fi

REMAP_SIGTERM=SIGQUIT "$VENV/bin/celery" -A worker worker --loglevel=INFO &
pids+=($!)
"$VENV/bin/celery" -A worker beat --loglevel=INFO &
pids+=($!)

# Every setting set here (config/settings.py names them), as lines to paste into another
# terminal; a secret is printed only when this script made it up (the sandbox's).
exports=$("$VENV/bin/python" -c 'import os, sys; from plural_cancel.config.settings import exports
print("\n".join("  " + line for line in exports(os.environ, sys.argv[1:])))' ${reveal[@]+"${reveal[@]}"})

cat <<MSG

Running. In another terminal, in this directory, first:
$exports
then:
  .venv/bin/plural-cancel check                             # settings, Redis, a Plural token
  .venv/bin/plural-cancel enqueue pl-demo-created-01        # prints a Request-ID
  .venv/bin/plural-cancel status REQUEST_ID
or from Python:  from plural_cancel import enqueue_cancel; enqueue_cancel("pl-demo-created-01")
Ctrl-C stops everything.

MSG
wait -n "${pids[@]}"
