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
while IFS= read -r name; do
  unset "$name"
done < <(compgen -e | grep -E '^PG' || true)

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

die() {
  printf '\nerror: %s\n' "$*" >&2
  exit 1
}

# --- state the cleanup needs -----------------------------------------------------
tmp=""
pgdata=""
pg_bindir=""
pg_user=""
pg_started=0
keyhole_pid=""

# Run a command as the PostgreSQL user: postgres refuses to run as root.
as_pg() {
  if ((EUID != 0)); then
    "$@"
  elif command -v runuser >/dev/null 2>&1; then
    (cd "$tmp" && runuser -u "$pg_user" -- "$@")
  else
    (cd "$tmp" && setpriv --reuid="$pg_user" --regid="$pg_user" --init-groups -- "$@")
  fi
}

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
  local rc=$? i pid
  trap - EXIT INT TERM
  set +e
  if [[ -n $keyhole_pid ]] && kill -0 "$keyhole_pid" 2>/dev/null; then
    kill -TERM "$keyhole_pid" 2>/dev/null
    for ((i = 0; i < 50; i++)); do
      kill -0 "$keyhole_pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$keyhole_pid" 2>/dev/null
  fi
  [[ -n $keyhole_pid ]] && wait "$keyhole_pid" 2>/dev/null
  if ((pg_started)); then
    if ! as_pg "$pg_bindir/pg_ctl" -D "$pgdata" -m fast -w -t 20 stop >/dev/null 2>&1; then
      if [[ -f $pgdata/postmaster.pid ]]; then
        pid=$(head -n 1 "$pgdata/postmaster.pid")
        [[ $pid =~ ^[0-9]+$ ]] && kill -KILL "$pid" 2>/dev/null
      fi
    fi
  fi
  if [[ -n $tmp ]]; then
    print_file "keyhole's log" "$tmp/keyhole.log"
    if ((rc != 0)); then
      print_file "PostgreSQL's log (last lines)" "$tmp/postgres.log" 30
    fi
    rm -rf "$tmp"
  fi
  if ((rc == 0)); then
    keyhole_heading "done: keyhole, the server and their temporary directory are gone"
  elif ((rc == 130)); then
    printf '\n==> interrupted; keyhole, the server and the temporary directory are cleaned up\n' >&2
  else
    printf '\n==> demo failed (exit %d); keyhole, the server and the temporary directory are cleaned up\n' "$rc" >&2
  fi
  exit "$rc"
}
trap cleanup EXIT
# With --keep, Ctrl-C is how the demo is meant to end.
waiting_for_ctrl_c=0
trap 'if ((waiting_for_ctrl_c)); then exit 0; else exit 130; fi' INT
trap 'exit 143' TERM

# --- ports -----------------------------------------------------------------------
# TCP ports in use on this machine (any state, IPv4 and IPv6), from /proc/net/tcp*.
ports_in_use() {
  local f local_addr
  for f in /proc/net/tcp /proc/net/tcp6; do
    [[ -r $f ]] || continue
    while read -r _ local_addr _; do
      [[ $local_addr == *:* ]] || continue # the header line
      printf '%d\n' $((16#${local_addr##*:}))
    done <"$f"
  done
}

# is_listening PORT: something listens on PORT (state 0A is LISTEN).
is_listening() {
  local want=$1 f local_addr state
  for f in /proc/net/tcp /proc/net/tcp6; do
    [[ -r $f ]] || continue
    while read -r _ local_addr _ state _; do
      [[ $local_addr == *:* && $state == 0A ]] || continue
      (($((16#${local_addr##*:})) == want)) && return 0
    done <"$f"
  done
  return 1
}

# free_port [EXCLUDED...]: a port below the kernel's ephemeral range that nothing
# uses. Another program could take it before we bind it; the demo would then fail
# loudly, not wrongly.
free_port() {
  local -A used=()
  local p try
  while IFS= read -r p; do used[$p]=1; done < <(ports_in_use)
  for p in "$@"; do used[$p]=1; done
  for ((try = 0; try < 200; try++)); do
    p=$((20000 + RANDOM % 12000))
    [[ -z ${used[$p]:-} ]] && {
      printf '%d\n' "$p"
      return 0
    }
  done
  return 1
}

# wait_listening PORT PID WHAT: until PORT listens; fail if PID dies or 30 s pass.
wait_listening() {
  local port=$1 pid=$2 what=$3 i
  for ((i = 0; i < 300; i++)); do
    is_listening "$port" && return 0
    kill -0 "$pid" 2>/dev/null || die "$what exited before listening on port $port"
    sleep 0.1
  done
  die "$what did not listen on port $port within 30 s"
}

# =================================================================================
step "system packages"
keyhole_ensure_packages postgresql postgresql-client openssl ca-certificates ||
  die "install the missing packages and run again"
pg_bindir=$(keyhole_pg_bindir) || die "PostgreSQL server binaries (initdb, pg_ctl) not found"
psql_bin=$(command -v psql 2>/dev/null || true)
[[ -n $psql_bin ]] || psql_bin=$pg_bindir/psql
[[ -x $psql_bin ]] || die "psql not found"
keyhole_log "PostgreSQL server binaries: $pg_bindir"

# =================================================================================
if [[ -n ${KEYHOLE_BIN:-} ]]; then
  step "keyhole binary (KEYHOLE_BIN)"
  keyhole_bin=$KEYHOLE_BIN
else
  step "build keyhole: cargo build --release"
  keyhole_cargo_on_path
  command -v cargo >/dev/null 2>&1 || die "cargo not found: install Rust with rustup (https://rustup.rs)"
  locked=()
  [[ -f Cargo.lock ]] && locked=(--locked)
  cargo build --release "${locked[@]}" --bin keyhole
  target_dir=${CARGO_TARGET_DIR:-target}
  [[ $target_dir == /* ]] || target_dir=$repo_root/$target_dir
  keyhole_bin=$target_dir/release/keyhole
fi
[[ -x $keyhole_bin ]] || die "no keyhole binary at $keyhole_bin"
keyhole_log "keyhole: $keyhole_bin"

# =================================================================================
step "throwaway CA and server certificate"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/keyhole-demo.XXXXXX")
pgdata=$tmp/pgdata
mkdir "$tmp/run"
if ((EUID == 0)); then
  # PostgreSQL runs as an unprivileged user: the distribution's postgres user if
  # there is one, else a system user made for the demo (it stays, for next time).
  if id -u postgres >/dev/null 2>&1; then
    pg_user=postgres
  else
    pg_user=keyhole-demo
    if ! id -u "$pg_user" >/dev/null 2>&1; then
      keyhole_log "creating system user $pg_user to run PostgreSQL (postgres refuses root)"
      useradd --system --user-group --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin "$pg_user"
    fi
  fi
  chmod 0755 "$tmp"
  chown "$pg_user:" "$tmp" "$tmp/run"
  as_pg test -w "$tmp" ||
    die "user $pg_user cannot write to $tmp: point TMPDIR at a directory every user can reach"
else
  pg_user=$(id -un)
fi
certs/generate.sh "$tmp/certs" localhost
[[ $EUID -ne 0 ]] || chown -R "$pg_user:" "$tmp/certs"
openssl x509 -in "$tmp/certs/server.crt" -noout -subject -issuer -ext subjectAltName 2>/dev/null |
  sed 's/^/  /' || true

# =================================================================================
pg_port=$(free_port) || die "no free port found"
step "TLS-only PostgreSQL on 127.0.0.1:$pg_port (running as $pg_user)"
as_pg "$pg_bindir/initdb" -D "$pgdata" -A trust -U postgres --no-locale -E UTF8 --no-sync \
  >"$tmp/initdb.log" 2>&1 || {
  cat "$tmp/initdb.log" >&2
  die "initdb failed"
}
cat >>"$pgdata/postgresql.conf" <<EOF

# --- keyhole demo ---
listen_addresses = '127.0.0.1'
port = $pg_port
unix_socket_directories = '$tmp/run'
ssl = on
ssl_cert_file = '$tmp/certs/server.crt'
ssl_key_file = '$tmp/certs/server.key'
password_encryption = 'scram-sha-256'
log_connections = on
fsync = off
EOF
cat >"$pgdata/pg_hba.conf" <<'EOF'
# keyhole demo: local socket for setup; over TCP, TLS with a password or nothing.
local     all  all                trust
hostssl   all  all  127.0.0.1/32  scram-sha-256
hostnossl all  all  0.0.0.0/0     reject
EOF
pg_started=1
as_pg "$pg_bindir/pg_ctl" -D "$pgdata" -l "$tmp/postgres.log" -w -t 60 start >/dev/null ||
  die "PostgreSQL did not start"
"$psql_bin" -X -q -v ON_ERROR_STOP=1 -h "$tmp/run" -p "$pg_port" -U postgres -d postgres \
  -c "create role demo login password 'demo'"
keyhole_log "server up: ssl=on; pg_hba.conf:"
grep -v '^#' "$pgdata/pg_hba.conf" | sed 's/^/  /'
keyhole_log "role demo, password demo (scram-sha-256)"

# =================================================================================
keyhole_port=$(free_port "$pg_port") || die "no free port found"
target="postgres://127.0.0.1:$pg_port?server-name=localhost"
keyhole_cmd=("$keyhole_bin" --port "$keyhole_port" --ca-file "$tmp/certs/ca.crt" "$target")
step "keyhole on 127.0.0.1:$keyhole_port"
keyhole_log "\$ $(shown "${keyhole_cmd[@]}") &"
# Only the flags above configure it: no KEYHOLE_* variable from the caller's shell.
keyhole_env=()
while IFS= read -r name; do
  keyhole_env+=(-u "$name")
done < <(compgen -e | grep -E '^KEYHOLE_' || true)
# In a session of its own, so a Ctrl-C reaches only this script, whose trap then stops
# keyhole and the server in order.
detach=()
command -v setsid >/dev/null 2>&1 && detach=(setsid)
"${detach[@]}" env "${keyhole_env[@]}" "${keyhole_cmd[@]}" >"$tmp/keyhole.log" 2>&1 </dev/null &
keyhole_pid=$!
wait_listening "$keyhole_port" "$keyhole_pid" keyhole
keyhole_log "keyhole is listening (pid $keyhole_pid)"

# =================================================================================
step "psql → keyhole (plain) → PostgreSQL (TLS)"
psql_cmd=(psql -h 127.0.0.1 -p "$keyhole_port" -U demo -d postgres
  -c "select version()"
  -c "select ssl, version, cipher from pg_stat_ssl where pid = pg_backend_pid()")
keyhole_log "\$ PGPASSWORD=demo $(shown "${psql_cmd[@]}")"
PGPASSWORD=demo "$psql_bin" "${psql_cmd[@]:1}" | tee "$tmp/psql.out" ||
  die "psql through keyhole failed"
grep -Eq '^ *t *\| *TLS' "$tmp/psql.out" ||
  die "the server did not report a TLS connection"
# psql's \conninfo names the TLS protocol when its own connection uses TLS.
conninfo=$(PGPASSWORD=demo "$psql_bin" -X -h 127.0.0.1 -p "$keyhole_port" -U demo -d postgres \
  -c '\conninfo')
keyhole_log "psql's own view of its connection (\\conninfo):"
keyhole_log "  $conninfo"
if [[ $conninfo == *"SSL connection"* ]]; then
  die "psql used TLS to keyhole; this demo expects a plain local leg"
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
if direct_out=$(PGPASSWORD=demo "$psql_bin" -X "$direct" -c 'select 1' 2>&1); then
  printf '%s\n' "$direct_out"
  die "the server accepted a plain connection; the demo's pg_hba.conf is not in force"
fi
printf '%s\n' "$direct_out" | sed 's/^/  /'
[[ $direct_out == *"no encryption"* || $direct_out == *"pg_hba.conf rejects"* ]] ||
  die "the plain connection failed, but not because pg_hba.conf rejected it"
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
  die "keyhole exited on its own (status $status)"
fi
