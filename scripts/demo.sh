#!/usr/bin/env bash
#
# scripts/demo.sh: keyhole's main job, end to end, on one machine.
#
#   scripts/demo.sh          run the demo, then clean everything up
#   scripts/demo.sh --keep   leave keyhole and the server running until Ctrl-C,
#                            so you can connect with psql yourself
#
# What it does:
#   1. installs the missing system packages (as root; otherwise it says what is missing)
#   2. builds keyhole (cargo build --release)
#   3. makes a throwaway CA and server certificate (certs/generate.sh)
#   4. starts a throwaway PostgreSQL in a temporary directory that accepts only TLS
#      connections (pg_hba: hostssl + scram-sha-256; anything without TLS is rejected)
#   5. starts keyhole in front of it, trusting only that CA
#   6. connects with psql, default settings, to keyhole: the client speaks plain
#      Postgres to keyhole, the server sees a verified TLS connection
#   7. shows that a plain connection straight to the server is refused
# Everything it started or wrote is removed on exit, also on Ctrl-C or failure.
#
# Environment:
#   KEYHOLE_BIN=PATH          use this keyhole binary instead of building one
#   KEYHOLE_SKIP_PACKAGES=1   don't check system packages
#   KEYHOLE_PG_BINDIR=DIR     where initdb/pg_ctl/postgres live (default: found)
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
# shellcheck source=scripts/lib/packages.sh
source "$repo_root/scripts/lib/packages.sh"
# shellcheck source=scripts/lib/pg.sh
source "$repo_root/scripts/lib/pg.sh"

usage() {
  sed -n '3,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

keep=0
for arg in "$@"; do
  case $arg in
  --keep) keep=1 ;;
  -h | --help)
    usage
    exit 0
    ;;
  *)
    printf 'unknown argument: %s\n\n' "$arg" >&2
    usage >&2
    exit 2
    ;;
  esac
done

# Whatever libpq settings the caller has (PGSSLMODE, PGHOST, a service file...) must
# not change what the demo shows: psql runs with its defaults.
keyhole_unset_env '^PG'

# shown ARGS...: the words as one would type them (single quotes only where needed).
shown() {
  local out="" word
  for word in "$@"; do
    if [[ $word =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
      out+="$word "
    else
      out+="'${word//\'/\'\\\'\'}' "
    fi
  done
  printf '%s\n' "${out% }"
}

step_no=0
step() {
  step_no=$((step_no + 1))
  keyhole_heading "[$step_no] $*"
}

# --- state the cleanup needs -----------------------------------------------------
# (and the server's, in scripts/lib/pg.sh)
tmp=""
keyhole_pid=""

print_file() {
  local title=$1 file=$2 lines=${3:-}
  [[ -s $file ]] || return 0
  keyhole_heading "$title"
  if [[ -n $lines ]]; then
    tail -n "$lines" "$file"
  else
    cat "$file"
  fi
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  keyhole_stop_pid "$keyhole_pid"
  keyhole_pg_stop fast
  if [[ -n $tmp ]]; then
    print_file "keyhole's log" "$tmp/keyhole.log"
    if ((rc != 0)); then
      print_file "PostgreSQL's log (last lines)" "$tmp/postgres.log" 30
    fi
    rm -rf "$tmp"
  fi
  keyhole_exit_report "$rc" "done: keyhole, the server and their temporary directory are gone" \
    "interrupted; keyhole, the server and the temporary directory are cleaned up" \
    "demo failed (exit %d); keyhole, the server and the temporary directory are cleaned up"
  exit "$rc"
}
trap cleanup EXIT
# With --keep, Ctrl-C is how the demo is meant to end.
waiting_for_ctrl_c=0
trap 'if ((waiting_for_ctrl_c)); then exit 0; else exit 130; fi' INT
trap 'exit 143' TERM

# =================================================================================
step "system packages"
keyhole_ensure_packages postgresql postgresql-client openssl ca-certificates ||
  keyhole_die "install the missing packages and run again"
keyhole_find_pg_tools
keyhole_log "PostgreSQL server binaries: $keyhole_pgbin"

# =================================================================================
keyhole_release_binary step

# =================================================================================
step "throwaway CA and server certificate"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/keyhole-demo.XXXXXX")
keyhole_pg_prepare "$tmp"
openssl x509 -in "$tmp/certs/server.crt" -noout -subject -issuer -ext subjectAltName 2>/dev/null |
  sed 's/^/  /' || true

# =================================================================================
pg_port=$(keyhole_free_port) || keyhole_die "no free port found"
step "TLS-only PostgreSQL on 127.0.0.1:$pg_port (running as $keyhole_pg_user)"
keyhole_pg_start "$pg_port" all scram-sha-256 "log_connections = on"
"$keyhole_psql" -X -q -v ON_ERROR_STOP=1 -h "$tmp/run" -p "$pg_port" -U postgres -d postgres \
  -c "create role demo login password 'demo'"
keyhole_log "server up: ssl=on; pg_hba.conf:"
grep -v '^#' "$keyhole_pgdata/pg_hba.conf" | sed 's/^/  /'
keyhole_log "role demo, password demo (scram-sha-256)"

# =================================================================================
keyhole_port=$(keyhole_free_port "$pg_port") || keyhole_die "no free port found"
target="postgres://127.0.0.1:$pg_port?server-name=localhost"
keyhole_cmd=("$keyhole_bin" --port "$keyhole_port" --ca-file "$tmp/certs/ca.crt" "$target")
step "keyhole on 127.0.0.1:$keyhole_port"
keyhole_log "\$ $(shown "${keyhole_cmd[@]}") &"
# Only the flags above configure it: no KEYHOLE_* variable from the caller's shell.
keyhole_env=()
while IFS= read -r name; do
  keyhole_env+=(-u "$name")
done < <(keyhole_env_names '^KEYHOLE_')
# In a session of its own, so a Ctrl-C reaches only this script, whose trap then stops
# keyhole and the server in order.
detach=()
command -v setsid >/dev/null 2>&1 && detach=(setsid)
"${detach[@]}" env "${keyhole_env[@]}" "${keyhole_cmd[@]}" >"$tmp/keyhole.log" 2>&1 </dev/null &
keyhole_pid=$!
why=$(keyhole_wait_listening "$keyhole_port" "$keyhole_pid" keyhole) || keyhole_die "$why"
keyhole_log "keyhole is listening (pid $keyhole_pid)"

# =================================================================================
step "psql → keyhole (plain) → PostgreSQL (TLS)"
psql_cmd=(psql -h 127.0.0.1 -p "$keyhole_port" -U demo -d postgres
  -c "select version()"
  -c "select ssl, version, cipher from pg_stat_ssl where pid = pg_backend_pid()")
keyhole_log "\$ PGPASSWORD=demo $(shown "${psql_cmd[@]}")"
PGPASSWORD=demo "$keyhole_psql" "${psql_cmd[@]:1}" | tee "$tmp/psql.out" ||
  keyhole_die "psql through keyhole failed"
grep -Eq '^ *t *\| *TLS' "$tmp/psql.out" ||
  keyhole_die "the server did not report a TLS connection"
# psql's \conninfo names the TLS protocol when its own connection uses TLS.
conninfo=$(PGPASSWORD=demo "$keyhole_psql" -X -h 127.0.0.1 -p "$keyhole_port" -U demo -d postgres \
  -c '\conninfo')
keyhole_log "psql's own view of its connection (\\conninfo):"
keyhole_log "  $conninfo"
if [[ $conninfo == *"SSL connection"* ]]; then
  keyhole_die "psql used TLS to keyhole; this demo expects a plain local leg"
fi
keyhole_log "the server's log of those connections:"
grep -E 'connection authorized: user=demo' "$tmp/postgres.log" | sed 's/^/  /' || true
keyhole_log ""
keyhole_log "=> psql spoke plain Postgres to keyhole (no TLS in its \\conninfo); the server"
keyhole_log "   saw TLS (pg_stat_ssl.ssl = t) from keyhole, which verified the server's"
keyhole_log "   certificate against the demo CA and the name localhost."

# =================================================================================
step "psql → PostgreSQL directly, without TLS: refused"
direct="host=127.0.0.1 port=$pg_port user=demo dbname=postgres sslmode=disable"
keyhole_log "\$ PGPASSWORD=demo psql '$direct' -c 'select 1'"
if direct_out=$(PGPASSWORD=demo "$keyhole_psql" -X "$direct" -c 'select 1' 2>&1); then
  printf '%s\n' "$direct_out"
  keyhole_die "the server accepted a plain connection; the demo's pg_hba.conf is not in force"
fi
printf '%s\n' "$direct_out" | sed 's/^/  /'
[[ $direct_out == *"no encryption"* || $direct_out == *"pg_hba.conf rejects"* ]] ||
  keyhole_die "the plain connection failed, but not because pg_hba.conf rejected it"
keyhole_log "=> the server takes TLS only; keyhole is how a plain client gets in."

# =================================================================================
if ((keep)); then
  step "running until Ctrl-C"
  keyhole_log "keyhole: 127.0.0.1:$keyhole_port  ->  TLS-only PostgreSQL: 127.0.0.1:$pg_port"
  keyhole_log "connect through keyhole with:"
  keyhole_log "  PGPASSWORD=demo psql -h 127.0.0.1 -p $keyhole_port -U demo -d postgres"
  keyhole_log "keyhole's log: $tmp/keyhole.log   PostgreSQL's log: $tmp/postgres.log"
  keyhole_log "press Ctrl-C to stop keyhole and the server and remove $tmp"
  status=0
  waiting_for_ctrl_c=1
  wait "$keyhole_pid" || status=$?
  # shellcheck disable=SC2034 # read by the INT trap
  waiting_for_ctrl_c=0
  keyhole_pid=""
  keyhole_die "keyhole exited on its own (status $status)"
fi
