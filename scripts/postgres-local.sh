#!/usr/bin/env bash
# A private PostgreSQL cluster on loopback for sweep workers and the MLflow server (the tests use it too).
#   bash scripts/postgres-local.sh start DIR [PORT]    initdb DIR if new, start on 127.0.0.1:PORT (default 5432)
#   bash scripts/postgres-local.sh createdb DIR NAME    a database; prints postgresql://asrlab@127.0.0.1:PORT/NAME
#   bash scripts/postgres-local.sh stop DIR [MODE]     pg_ctl's shutdown mode: fast (default) or immediate
# Superuser `asrlab`, trust authentication on loopback only: for one machine. A shared server needs real
# roles and passwords (see the README). PostgreSQL refuses to run as root: as root the cluster belongs to the
# `postgres` user that Debian's package creates (scripts/setup-system.sh installs it).
set -euo pipefail
cmd="${1:?usage: postgres-local.sh start|createdb|stop DIR [PORT|NAME]}"
dir="$(realpath -m "${2:?the cluster directory}")"

bindir="${PG_BINDIR:-}"
if [ -z "$bindir" ]; then  # Debian keeps the server binaries off PATH, under /usr/lib/postgresql/<version>/bin
  bindir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
  [ -n "$bindir" ] || bindir="$(dirname "$(command -v pg_ctl || true)")"
fi
[ -x "$bindir/pg_ctl" ] || { echo "postgres-local: no PostgreSQL server found (sudo bash scripts/setup-system.sh)" >&2; exit 1; }

as_owner() {  # run a server binary as the cluster's unprivileged owner
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

case "$cmd" in
  start)
    port="${3:-5432}"
    if [ ! -f "$dir/PG_VERSION" ]; then
      mkdir -p "$dir"
      [ "$(id -u)" -ne 0 ] || chown postgres: "$dir"
      chmod 700 "$dir"
      as_owner "$bindir/initdb" -D "$dir" -U asrlab --auth=trust -E UTF8 --no-instructions >/dev/null
    fi
    if as_owner "$bindir/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
      echo "postgres-local: already running in $dir (port $(cat "$dir/asrlab-port"))"
      exit 0
    fi
    echo "$port" > "$dir/asrlab-port"  # read by createdb
    [ "$(id -u)" -ne 0 ] || chown postgres: "$dir/asrlab-port"
    as_owner "$bindir/pg_ctl" -D "$dir" -l "$dir/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=200" start >/dev/null
    echo "postgres-local: running on 127.0.0.1:$port (log $dir/server.log)"
    ;;
  createdb)
    name="${3:?the database name}"
    port="$(cat "$dir/asrlab-port")"
    psql=("$bindir/psql" -h 127.0.0.1 -p "$port" -U asrlab -d postgres -Atq)
    if [ -z "$("${psql[@]}" -c "SELECT 1 FROM pg_database WHERE datname = '$name'")" ]; then
      "$bindir/createdb" -h 127.0.0.1 -p "$port" -U asrlab "$name"
    fi
    echo "postgresql://asrlab@127.0.0.1:$port/$name"
    ;;
  stop)
    as_owner "$bindir/pg_ctl" -D "$dir" -m "${3:-fast}" -w stop >/dev/null
    echo "postgres-local: stopped $dir"
    ;;
  *) echo "postgres-local: unknown command $cmd (start|createdb|stop)" >&2; exit 2 ;;
esac
