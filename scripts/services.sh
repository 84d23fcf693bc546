#!/usr/bin/env bash
# Make sure PostgreSQL and Redis answer at the URLs the tests use.
# Idempotent: a service that already answers is left alone; one that is
# installed but stopped is started; one that is missing is installed from
# Debian's packages first. Never touches data.
set -euo pipefail

PG_HOST=127.0.0.1 PG_PORT=5432 REDIS_HOST=127.0.0.1 REDIS_PORT=6379

log() { printf 'services: %s\n' "$*" >&2; }
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

apt_updated=
apt_install() {
  if [ -z "$apt_updated" ]; then as_root apt-get update -qq; apt_updated=1; fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# Waits up to 30 s for a check command to succeed.
wait_for() {
  local what=$1; shift
  for _ in $(seq 1 60); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  log "$what did not come up"; return 1
}

pg_ready() { pg_isready -q -h "$PG_HOST" -p "$PG_PORT"; }
redis_ready() { [ "$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null)" = PONG ]; }

# ---- PostgreSQL -------------------------------------------------------------
command -v pg_isready >/dev/null || apt_install postgresql postgresql-client
if ! pg_ready; then
  if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then apt_install postgresql; fi
  ver=$(ls /etc/postgresql | sort -V | tail -n 1)
  log "starting PostgreSQL $ver"
  as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
  wait_for PostgreSQL pg_ready
fi
# Trust auth for local TCP and a `test` database, as the README promises.
# Only done when the server does not already let us in: never rewrites a
# working setup.
if ! psql -h "$PG_HOST" -p "$PG_PORT" -U postgres -d test -c 'select 1' >/dev/null 2>&1; then
  ver=$(ls /etc/postgresql | sort -V | tail -n 1)
  hba=/etc/postgresql/$ver/main/pg_hba.conf
  if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
    log "enabling trust auth on 127.0.0.1 in $hba"
    as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
    as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main reload
  fi
  as_root su postgres -c "psql -tAc \"select 1 from pg_database where datname='test'\" | grep -q 1 || createdb test"
fi

# ---- Redis ------------------------------------------------------------------
command -v redis-cli >/dev/null || apt_install redis-server redis-tools
if ! redis_ready; then
  command -v redis-server >/dev/null || apt_install redis-server
  log "starting Redis"
  as_root mkdir -p /var/lib/redis /var/log/redis
  as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
    --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
  wait_for Redis redis_ready
fi

log "PostgreSQL and Redis are up"
