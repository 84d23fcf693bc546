#!/usr/bin/env bash
# Make sure PostgreSQL and Redis answer at the URLs the tests use:
# DATABASE_URL and REDIS_URL when set (as the library reads them), else
# postgres://postgres@127.0.0.1:5432/test and redis://127.0.0.1:6379/.
# Idempotent: a service that already answers is left alone; a local one
# (loopback host) that is installed but stopped is started; one that is
# missing is installed from Debian's packages first (postgresql,
# postgresql-client, redis-server, redis-tools). A server on another host
# is only checked: this script never installs or starts anything there.
# Never touches data. Creates the `test` database and the roles `postgres`
# and `root` (superusers, trust auth on loopback) when they are missing.
#
# `scripts/services.sh cluster` also starts a 3-master Redis Cluster on
# 127.0.0.1 ports 7001-7003 (or $REDIS_CLUSTER_PORTS), no replicas, no
# persistence, its node files in $REDIS_CLUSTER_DIR (default
# /tmp/cacheaside-cluster), and prints the REDIS_URL that selects it.
# Idempotent too: a cluster that already reports cluster_state:ok is left
# alone. (tests/cluster.rs starts a private cluster of its own instead.)
#
# `scripts/services.sh sentinel` starts a Redis master (127.0.0.1:6390), a
# replica of it (6391) and three sentinels (26390-26392) watching it as
# `cacheaside`, no persistence, in $REDIS_SENTINEL_DIR (default
# /tmp/cacheaside-sentinel), and prints the redis+sentinel:// REDIS_URL that
# selects it. Idempotent too: sentinels that already name a master are left
# alone (after a failover the master is wherever they say).
# (tests/sentinel.rs starts private servers of its own.)
set -euo pipefail

WANT_CLUSTER= WANT_TLS= WANT_SENTINEL=
for arg in "$@"; do
  case "$arg" in
    cluster) WANT_CLUSTER=1 ;;
    tls) WANT_TLS=1 ;;
    sentinel) WANT_SENTINEL=1 ;;
    *) echo "usage: $0 [cluster] [tls] [sentinel]" >&2; exit 2 ;;
  esac
done

# host and port of a URL: scheme://[user[:password]@]host[:port][/...]
url_host() { local rest=${1#*://}; rest=${rest%%/*}; rest=${rest##*@}; echo "${rest%%:*}"; }
url_port() {
  local rest=${1#*://}; rest=${rest%%/*}; rest=${rest##*@}
  if [[ $rest == *:* ]]; then echo "${rest##*:}"; else echo "$2"; fi
}
url_user() {
  local rest=${1#*://}; rest=${rest%%/*}
  if [[ $rest == *@* ]]; then rest=${rest%%@*}; echo "${rest%%:*}"; else echo postgres; fi
}
url_db() { local rest=${1#*://}; rest=${rest#*/}; rest=${rest%%\?*}; [[ $1 == *://*/* && -n $rest ]] && echo "$rest" || echo test; }

DATABASE_URL=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/test}
REDIS_URL=${REDIS_URL:-redis://127.0.0.1:6379/}
PG_HOST=$(url_host "$DATABASE_URL") PG_PORT=$(url_port "$DATABASE_URL" 5432)
PG_USER=$(url_user "$DATABASE_URL") PG_DB=$(url_db "$DATABASE_URL")
REDIS_HOST=$(url_host "$REDIS_URL") REDIS_PORT=$(url_port "$REDIS_URL" 6379)
is_local() { [[ $1 == 127.* || $1 == localhost || $1 == "[::1]" || $1 == ::1 ]]; }

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
redis_ready() { [ "$(redis-cli -u "$REDIS_URL" ping 2>/dev/null)" = PONG ]; }

# A remote server is the caller's: check that it answers, nothing more.
if ! is_local "$PG_HOST" || ! is_local "$REDIS_HOST"; then
  command -v pg_isready >/dev/null || apt_install postgresql-client
  command -v redis-cli >/dev/null || apt_install redis-tools
fi
if ! is_local "$PG_HOST"; then
  pg_ready || { log "PostgreSQL at $PG_HOST:$PG_PORT does not answer (not local: not started here)"; exit 1; }
fi
if ! is_local "$REDIS_HOST"; then
  redis_ready || { log "Redis at $REDIS_HOST:$REDIS_PORT does not answer (not local: not started here)"; exit 1; }
fi

# ---- PostgreSQL -------------------------------------------------------------
local_postgres() {
  command -v pg_isready >/dev/null || apt_install postgresql postgresql-client
  local ver hba
  if ! pg_ready; then
    if ! ls /etc/postgresql/*/main >/dev/null 2>&1; then apt_install postgresql; fi
    ver=$(ls /etc/postgresql | sort -V | tail -n 1)
    log "starting PostgreSQL $ver"
    as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main start || true
    wait_for PostgreSQL pg_ready
  fi
  # Trust auth for local TCP, the database and the roles, as the README
  # promises. Only done when the server does not already let us in: never
  # rewrites a working setup.
  if ! psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d "$PG_DB" -c 'select 1' >/dev/null 2>&1; then
    ver=$(ls /etc/postgresql | sort -V | tail -n 1)
    hba=/etc/postgresql/$ver/main/pg_hba.conf
    if ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
      log "enabling trust auth on 127.0.0.1 in $hba"
      as_root sed -i '1i host all all 127.0.0.1/32 trust\nhost all all ::1/128 trust' "$hba"
      as_root pg_ctlcluster --skip-systemctl-redirect "$ver" main reload
    fi
    as_root su postgres -c "psql -tAc \"select 1 from pg_roles where rolname='$PG_USER'\" | grep -q 1 || createuser --superuser '$PG_USER'"
    as_root su postgres -c "psql -tAc \"select 1 from pg_database where datname='$PG_DB'\" | grep -q 1 || createdb '$PG_DB'"
  fi
  # The roles the README names: `postgres` (the URLs' default) and `root`
  # (what psql picks when run as root).
  local role
  for role in postgres root; do
    psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d "$PG_DB" -tAc \
      "select 1 from pg_roles where rolname = '$role'" | grep -q 1 ||
      psql -h "$PG_HOST" -p "$PG_PORT" -U "$PG_USER" -d "$PG_DB" -qc "create role $role superuser login"
  done
}
if is_local "$PG_HOST"; then local_postgres; fi

# ---- Redis ------------------------------------------------------------------
local_redis() {
  command -v redis-cli >/dev/null || apt_install redis-server redis-tools
  if ! redis_ready; then
    command -v redis-server >/dev/null || apt_install redis-server
    log "starting Redis"
    as_root mkdir -p /var/lib/redis /var/log/redis
    as_root redis-server --daemonize yes --bind 127.0.0.1 -::1 --port "$REDIS_PORT" \
      --save "" --appendonly no --dir /var/lib/redis --logfile /var/log/redis/ci.log
    wait_for Redis redis_ready
  fi
}
if is_local "$REDIS_HOST"; then local_redis; fi

log "PostgreSQL and Redis are up"

# ---- Redis Cluster (on request) ---------------------------------------------
cluster_ok() { [[ "$(redis-cli -p "$1" cluster info 2>/dev/null)" == *cluster_state:ok* ]]; }
local_cluster() {
  local ports=(${REDIS_CLUSTER_PORTS:-7001 7002 7003})
  local dir=${REDIS_CLUSTER_DIR:-/tmp/cacheaside-cluster}
  local url="" port all_ok=1
  for port in "${ports[@]}"; do url+="${url:+,}redis://127.0.0.1:$port"; done
  for port in "${ports[@]}"; do cluster_ok "$port" || all_ok=; done
  if [ -n "$all_ok" ]; then
    log "Redis Cluster is up: REDIS_URL=$url"
    return
  fi
  command -v redis-server >/dev/null || apt_install redis-server
  mkdir -p "$dir"
  for port in "${ports[@]}"; do
    if [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ]; then
      if ! redis-cli -p "$port" info cluster 2>/dev/null | grep -q '^cluster_enabled:1'; then
        log "port $port answers as a Redis without cluster mode: not ours, giving up"; exit 1
      fi
      continue
    fi
    log "starting Redis Cluster node on port $port"
    redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
      --cluster-config-file "$dir/nodes-$port.conf" --save "" --appendonly no \
      --dir "$dir" --logfile "$dir/node-$port.log" --daemonize yes
    wait_for "Redis Cluster node $port" redis-cli -p "$port" ping
  done
  # Nodes up but no cluster yet (fresh, or slots never assigned): create it.
  if [ "$(redis-cli -p "${ports[0]}" cluster info | tr -d '\r' | sed -n 's/^cluster_slots_assigned://p')" = 0 ]; then
    local addrs=()
    for port in "${ports[@]}"; do addrs+=("127.0.0.1:$port"); done
    redis-cli --cluster create "${addrs[@]}" --cluster-replicas 0 --cluster-yes >/dev/null
  fi
  for port in "${ports[@]}"; do wait_for "Redis Cluster on $port" cluster_ok "$port"; done
  log "Redis Cluster is up: REDIS_URL=$url"
}
if [ -n "$WANT_CLUSTER" ]; then local_cluster; fi

# ---- A TLS-only Redis (on request) -------------------------------------------
# `scripts/services.sh tls` starts a Redis that speaks only TLS on
# 127.0.0.1:$REDIS_TLS_PORT (6380), with a CA and a server certificate for
# 127.0.0.1 made by openssl in $REDIS_TLS_DIR (/tmp/cacheaside-tls), and
# prints the REDIS_URL and REDIS_CA_FILE that select it (Config::from_env
# reads both).
# Idempotent: a server already answering there over TLS is left alone.
# (tests/tls.rs starts private TLS servers, Redis and Postgres, of its own.)
local_tls_redis() {
  local port=${REDIS_TLS_PORT:-6380} dir=${REDIS_TLS_DIR:-/tmp/cacheaside-tls}
  command -v openssl >/dev/null || apt_install openssl
  command -v redis-server >/dev/null || apt_install redis-server
  tls_ok() {
    [ -f "$dir/ca.pem" ] && [ "$(redis-cli --tls --cacert "$dir/ca.pem" -h 127.0.0.1 -p "$port" ping 2>/dev/null)" = PONG ]
  }
  if ! tls_ok; then
    mkdir -p "$dir"
    if [ ! -f "$dir/server.pem" ]; then
      log "making a CA and a certificate for 127.0.0.1 in $dir"
      (
        cd "$dir"
        echo "subjectAltName=IP:127.0.0.1" >san.ext
        openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 30 \
          -subj "/CN=cacheaside local CA" 2>/dev/null
        openssl req -newkey rsa:2048 -nodes -keyout server.key -out server.csr \
          -subj "/CN=127.0.0.1" 2>/dev/null
        openssl x509 -req -in server.csr -CA ca.pem -CAkey ca.key -CAcreateserial \
          -out server.pem -days 30 -extfile san.ext 2>/dev/null
      )
    fi
    log "starting a TLS-only Redis on port $port"
    redis-server --port 0 --tls-port "$port" --bind 127.0.0.1 \
      --tls-cert-file "$dir/server.pem" --tls-key-file "$dir/server.key" \
      --tls-ca-cert-file "$dir/ca.pem" --tls-auth-clients no \
      --save "" --appendonly no --dir "$dir" --logfile "$dir/redis.log" --daemonize yes
    wait_for "TLS Redis on $port" tls_ok
  fi
  log "TLS Redis is up: REDIS_URL=rediss://127.0.0.1:$port/ REDIS_CA_FILE=$dir/ca.pem"
}
if [ -n "$WANT_TLS" ]; then local_tls_redis; fi

# ---- Redis Sentinel (on request) ---------------------------------------------
local_sentinel() {
  local dir=${REDIS_SENTINEL_DIR:-/tmp/cacheaside-sentinel} name=cacheaside
  local master=6390 replica=6391 sentinels=(26390 26391 26392) port url="" all_ok=1
  for port in "${sentinels[@]}"; do url+="${url:+,}127.0.0.1:$port"; done
  url="redis+sentinel://$url/$name"
  sentinel_ok() { redis-cli -p "$1" sentinel get-master-addr-by-name "$name" 2>/dev/null | grep -q '^[0-9]*$'; }
  for port in "${sentinels[@]}"; do sentinel_ok "$port" || all_ok=; done
  if [ -n "$all_ok" ]; then
    log "Redis Sentinel is up: REDIS_URL=$url"
    return
  fi
  command -v redis-server >/dev/null || apt_install redis-server
  mkdir -p "$dir"
  for port in "$master" "$replica" "${sentinels[@]}"; do
    if [ "$(redis-cli -p "$port" ping 2>/dev/null)" = PONG ]; then continue; fi
    local args=(--port "$port" --bind 127.0.0.1 --save "" --appendonly no --dir "$dir"
      --logfile "$dir/redis-$port.log" --daemonize yes)
    if [ "$port" = "$replica" ]; then
      log "starting a Redis replica on port $port"
      redis-server "${args[@]}" --replicaof 127.0.0.1 "$master"
    elif [ "$port" = "$master" ]; then
      log "starting a Redis master on port $port"
      redis-server "${args[@]}" --repl-diskless-sync-delay 0
    else
      log "starting a Redis Sentinel on port $port"
      printf 'sentinel monitor %s 127.0.0.1 %s 2\nsentinel down-after-milliseconds %s 2000\nsentinel failover-timeout %s 10000\n' \
        "$name" "$master" "$name" "$name" >"$dir/sentinel-$port.conf"
      redis-server "$dir/sentinel-$port.conf" "${args[@]}" --sentinel
    fi
    wait_for "Redis on $port" redis-cli -p "$port" ping
  done
  for port in "${sentinels[@]}"; do wait_for "Redis Sentinel on $port" sentinel_ok "$port"; done
  log "Redis Sentinel is up: REDIS_URL=$url"
}
if [ -n "$WANT_SENTINEL" ]; then local_sentinel; fi
