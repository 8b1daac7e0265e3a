#!/usr/bin/env bash
# Runs a throw-away PostgreSQL server (Debian's package) on 127.0.0.1 for
# idem's tests.
#
#   scripts/postgres.sh start DIR   initialise DIR, start the server on a free
#                                   port, wait until it answers; prints a
#                                   connection URL
#   scripts/postgres.sh stop DIR    stop the server started in DIR
set -euo pipefail

bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
[ -n "$bin" ] || { echo "postgres.sh: install Debian's postgresql package" >&2; exit 1; }

# PostgreSQL refuses to run as root; run it as the postgres user then.
as_owner() {
  if [ "$(id -u)" -eq 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start() {
  local dir="$1"
  mkdir -p "$dir"
  [ "$(id -u)" -eq 0 ] && chown postgres: "$dir"
  local port
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  if ! as_owner "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >"$dir/initdb.log" 2>&1; then
    echo "postgres.sh: initdb in $dir failed; see $dir/initdb.log" >&2
    tail -n 20 "$dir/initdb.log" >&2 || true
    exit 1
  fi
  if ! as_owner "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir -c fsync=on" \
    start >/dev/null; then
    echo "postgres.sh: the server in $dir did not start; see $dir/server.log" >&2
    tail -n 20 "$dir/server.log" >&2 || true
    exit 1
  fi
  echo "$port" >"$dir/port"
  echo "postgresql://postgres@127.0.0.1:$port/postgres"
}

stop() {
  local dir="$1"
  [ -d "$dir/data" ] || return 0
  as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
}

# Restarts the server in DIR (fast shutdown: open connections are cut), as
# a database restart in production would (for the chaos tests).
restart() {
  local dir="$1"
  as_owner "$bin/pg_ctl" -D "$dir/data" -m fast -w -t 60 restart >/dev/null
}

case "${1:-}" in
  start) start "${2:?usage: postgres.sh start DIR}" ;;
  stop) stop "${2:?usage: postgres.sh stop DIR}" ;;
  restart) restart "${2:?usage: postgres.sh restart DIR}" ;;
  *) echo "usage: postgres.sh start DIR | stop DIR | restart DIR" >&2; exit 2 ;;
esac
