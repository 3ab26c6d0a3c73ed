#!/usr/bin/env bash
# Make sure the servers the integration tests talk to are up: Postgres and Redis
# on loopback.  Start whichever is down with the machine's own packages; fail
# clearly when one cannot be started (a test must never skip because of it).
# The S3 endpoint (moto's standalone server) is started by the tests themselves.
set -uo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for() {
  local port=$1 name=$2
  for _ in $(seq 1 60); do
    up "$port" && return 0
    sleep 0.5
  done
  echo "error: $name did not come up on 127.0.0.1:$port" >&2
  return 1
}

start_postgres() {
  if command -v pg_ctlcluster >/dev/null 2>&1 && [ -d /etc/postgresql ]; then
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start
  else
    echo "error: Postgres is not running on 127.0.0.1:5432 and is not installed here" \
      "(apt-get install postgresql, trust auth for 127.0.0.1)" >&2
    return 1
  fi
}

start_redis() {
  if command -v redis-server >/dev/null 2>&1; then
    mkdir -p /var/lib/redis /var/log/redis
    redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" \
      --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  else
    echo "error: Redis is not running on 127.0.0.1:6379 and is not installed here" \
      "(apt-get install redis-server)" >&2
    return 1
  fi
}

status=0
if ! up 5432; then
  echo "starting Postgres" >&2
  { start_postgres && wait_for 5432 Postgres; } || status=1
fi
if ! up 6379; then
  echo "starting Redis" >&2
  { start_redis && wait_for 6379 Redis; } || status=1
fi
exit $status
