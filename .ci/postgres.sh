#!/usr/bin/env bash
# Start a throwaway PostgreSQL on 127.0.0.1 for the service tests and export its URL as
# ADVFACE_TEST_POSTGRES_URL. Idempotent: reuses a running server, initialises once.
# Source it (`source .ci/postgres.sh`) to get the variable, or run it to print the URL;
# `advface_pg_stop` then stops the server if this shell started it (a reused one keeps running).
# Installs PostgreSQL with apt when it is missing. On failure it warns and leaves the
# variable unset (the postgres tests then skip) unless ADVFACE_REQUIRE_POSTGRES=1.

_ADVFACE_PG_STOP=()

advface_pg_stop() {
  if [ "${#_ADVFACE_PG_STOP[@]}" -gt 0 ]; then
    "${_ADVFACE_PG_STOP[@]}" >/dev/null 2>&1 || true
    _ADVFACE_PG_STOP=()
  fi
}

_advface_pg() {
  local dir="${ADVFACE_PG_DIR:-/tmp/advface-pg}"
  local port="${ADVFACE_PG_PORT:-55432}"
  local user=advface db=advface_test pass=advface-ci
  local bin=""
  _find_bin() {
    if command -v initdb >/dev/null 2>&1; then
      bin="$(dirname "$(readlink -f "$(command -v initdb)")")"
    else
      bin="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)"
    fi
    [ -n "$bin" ] && [ -x "$bin/initdb" ]
  }
  if ! _find_bin; then
    echo "postgres.sh: installing PostgreSQL with apt" >&2
    if [ "$(id -u)" -eq 0 ]; then
      DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 &&
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2 || return 1
    else
      sudo -n apt-get update -qq >&2 && sudo -n apt-get install -y -qq postgresql >&2 || return 1
    fi
    _find_bin || return 1
  fi
  # PostgreSQL refuses to run as root: run the server as the 'postgres' system user then.
  local as=()
  if [ "$(id -u)" -eq 0 ]; then
    id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres || return 1
    as=(runuser -u postgres --)
  fi
  if [ ! -s "$dir/data/PG_VERSION" ]; then
    mkdir -p "$dir" || return 1
    [ "${#as[@]}" -gt 0 ] && chown postgres "$dir"
    printf '%s\n' "$pass" >"$dir/pwfile"
    [ "${#as[@]}" -gt 0 ] && chown postgres "$dir/pwfile"
    "${as[@]}" "$bin/initdb" -D "$dir/data" -U "$user" --pwfile="$dir/pwfile" \
      --auth-local=trust --auth-host=scram-sha-256 -E UTF8 >"$dir/initdb.log" 2>&1 || {
      cat "$dir/initdb.log" >&2
      return 1
    }
  fi
  if ! "${as[@]}" "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
    "${as[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=on" start >&2 || {
      tail -n 20 "$dir/server.log" >&2
      return 1
    }
    # Started here (not reused): advface_pg_stop stops it again.
    _ADVFACE_PG_STOP=("${as[@]}" "$bin/pg_ctl" -D "$dir/data" -m fast -w stop)
  fi
  local psql=("$bin/psql" -h 127.0.0.1 -p "$port" -U "$user" -v ON_ERROR_STOP=1 -tA)
  export PGPASSWORD="$pass"
  if [ "$("${psql[@]}" -d postgres -c "SELECT 1 FROM pg_database WHERE datname='$db'")" != 1 ]; then
    "${psql[@]}" -d postgres -c "CREATE DATABASE $db" >/dev/null || return 1
  fi
  unset PGPASSWORD
  export ADVFACE_TEST_POSTGRES_URL="postgresql://$user:$pass@127.0.0.1:$port/$db"
  echo "$ADVFACE_TEST_POSTGRES_URL"
}

if _advface_pg; then
  :
else
  echo "postgres.sh: WARNING: could not start PostgreSQL; postgres tests will skip" >&2
  if [ "${ADVFACE_REQUIRE_POSTGRES:-0}" = 1 ]; then
    # shellcheck disable=SC2317
    return 1 2>/dev/null || exit 1
  fi
fi
unset -f _advface_pg _find_bin
