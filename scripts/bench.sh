#!/usr/bin/env bash
#
# scripts/bench.sh: keyhole's end-to-end benchmark, next to the same workloads going
# straight to the server and through the proxies a user would pick instead. Run it by
# hand on a quiet machine; CI does not run it. One run, one table, ratios to direct.
#
#   scripts/bench.sh                  run everything, print the table
#   scripts/bench.sh --out FILE       also write the table (and the raw samples) to
#                                     FILE as markdown
#
# Paths (each on its own local port, each verifying the server's certificate):
#   direct     pgbench/psql straight to the server, sslmode=verify-full
#   keyhole    target/release/keyhole --ca-file CA 'postgres://...?server-name=localhost'
#   pgbouncer  session pool mode, server_tls_sslmode = verify-full
#   stunnel    client = yes, protocol = pgsql, verifyChain, checkHost
#   goproxy    the Go TLS proxy from the peers folder, built at run time
# Proxies are reached over plain TCP on 127.0.0.1 (sslmode=disable).
#
# Workloads, the same for every path, interleaved (every round runs each workload on
# every path, in an order that rotates each round) and the median over the rounds kept:
#   TPS -S       pgbench -S -c 8 -j 2 -T DURATION      (select-only, kept connections)
#   TPS -C       pgbench -S -C -c 8 -j 2 -T DURATION   (a new connection per transaction)
#   COPY out     psql: COPY (select repeat('x', 1000) from generate_series(1, 1000000))
#                TO STDOUT > /dev/null: wall seconds, and the proxy's CPU seconds
#                (utime + stime from /proc) per GiB moved
#   RSS/idle     BENCH_IDLE_CONNS connections opened through a freshly started proxy,
#                each logged in and one query run (so pgbouncer holds a server
#                connection for each), then left idle: the proxy's VmRSS growth / N
# For the pgbench runs, the proxy's CPU time per transaction is shown as well and kept
# with the samples in the markdown file.
# The server is a throwaway TLS-only PostgreSQL (pg_hba: hostssl only; role bench, md5)
# whose certificates come from certs/generate.sh. Everything the run starts or writes
# is removed on exit, also on Ctrl-C or failure.
#
# Steps: system packages (as root, missing ones are installed: the test packages plus
# pgbouncer, stunnel4, golang-go, python3; a peer that cannot be installed is skipped),
# cargo build --release, go build of goproxy into the temporary directory, the server,
# pgbench -i -s 10, the proxies, the rounds, the table.
#
# Environment:
#   BENCH_DURATION=SECONDS    length of each pgbench run (default 15; DURATION works too)
#   BENCH_ROUNDS=N            runs of each workload per path; the median is kept (default 2)
#   BENCH_IDLE_CONNS=N        idle connections for the RSS measurement (default 1000)
#   BENCH_PATHS="..."         the paths to run (default: direct keyhole pgbouncer stunnel
#                             goproxy); direct is always included, for the ratios
#   BENCH_LOG_DIR=DIR         copy the server's, the proxies' and the tools' logs here
#   KEYHOLE_BIN=PATH          use this keyhole binary instead of building one
#   KEYHOLE_PEERS_DIR=DIR     the benchmark peers (default: ../shared/peers from the repo)
#   KEYHOLE_SKIP_PACKAGES=1   don't check system packages
#   KEYHOLE_PG_BINDIR=DIR     where initdb/pg_ctl/postgres live (default: found)
# With the defaults a run takes about 10 minutes on 2 cores.
set -euo pipefail
# Decimal points in EPOCHREALTIME, awk and printf, whatever the caller's locale.
export LC_ALL=C

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
caller_dir=$PWD
cd "$repo_root"
# shellcheck source=scripts/lib/packages.sh
source "$repo_root/scripts/lib/packages.sh"
# shellcheck source=scripts/lib/pg.sh
source "$repo_root/scripts/lib/pg.sh"

usage() {
  sed -n '3,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
}

out_file=""
while (($# > 0)); do
  case $1 in
  --out)
    (($# >= 2)) || keyhole_die "--out needs a file name"
    out_file=$2
    shift 2
    ;;
  --out=*)
    out_file=${1#--out=}
    shift
    ;;
  -h | --help)
    usage
    exit 0
    ;;
  *)
    printf 'unknown argument: %s\n\n' "$1" >&2
    usage >&2
    exit 2
    ;;
  esac
done
if [[ -n $out_file ]]; then
  [[ $out_file == /* ]] || out_file=$caller_dir/$out_file
  [[ -d $(dirname "$out_file") && -w $(dirname "$out_file") ]] ||
    keyhole_die "--out: cannot write into $(dirname "$out_file")"
fi

# --- settings --------------------------------------------------------------------
duration=${BENCH_DURATION:-${DURATION:-15}}
duration=${duration%s}
rounds=${BENCH_ROUNDS:-2}
idle_conns=${BENCH_IDLE_CONNS:-1000}
[[ $duration =~ ^[1-9][0-9]*$ ]] || keyhole_die "BENCH_DURATION: '$duration' is not a whole number of seconds"
[[ $rounds =~ ^[1-9][0-9]*$ ]] || keyhole_die "BENCH_ROUNDS: '$rounds' is not a positive number"
[[ $idle_conns =~ ^[1-9][0-9]*$ ]] || keyhole_die "BENCH_IDLE_CONNS: '$idle_conns' is not a positive number"
readonly clients=8 threads=2 scale=10 copy_rows=1000000
readonly copy_sql="COPY (select repeat('x', 1000) from generate_series(1, $copy_rows)) TO STDOUT"
readonly all_paths=(direct keyhole pgbouncer stunnel goproxy)
paths=(direct)
for p in ${BENCH_PATHS:-${all_paths[*]}}; do
  case " ${all_paths[*]} " in
  *" $p "*) [[ $p == direct ]] || paths+=("$p") ;;
  *) keyhole_die "BENCH_PATHS: unknown path '$p' (known: ${all_paths[*]})" ;;
  esac
done
peers_dir=${KEYHOLE_PEERS_DIR:-$repo_root/../shared/peers}
log_dir=${BENCH_LOG_DIR:-}
if [[ -n $log_dir ]]; then
  [[ $log_dir == /* ]] || log_dir=$caller_dir/$log_dir
fi

# Whatever libpq settings the caller has (PGSSLMODE, PGHOST, a service file...) must
# not change what is measured: every tool gets exactly the settings given below.
keyhole_unset_env '^PG'

# The peers' packages, checked and installed with the same mechanism as the test
# packages (scripts/lib/packages.sh). They are added to the list in this process only.
KEYHOLE_BENCH_APT_PACKAGES=(
  # the usual C Postgres proxy
  "pgbouncer   /usr/sbin/pgbouncer"
  # the usual TLS wrapper
  "stunnel4    /usr/bin/stunnel4"
  # builds the Go TLS proxy from the peers folder
  "golang-go   go"
  # the idle-connection helper
  "python3     python3"
)
KEYHOLE_APT_PACKAGES+=("${KEYHOLE_BENCH_APT_PACKAGES[@]}")

step_no=0
step() {
  step_no=$((step_no + 1))
  keyhole_heading "[$step_no] $* ($(keyhole_duration "$SECONDS") so far)"
}

# --- state the cleanup needs -----------------------------------------------------
# (and the server's, in scripts/lib/pg.sh)
tmp=""
helper_pid=""
declare -A proxy_pid=() proxy_port=() skip_note=() late_note=()

# A summary of what the proxies' logs say went wrong: the interesting part of a run
# that is about to be deleted.
log_summary() {
  local name file count
  for name in keyhole pgbouncer stunnel goproxy; do
    for file in "$tmp/$name".*.log; do
      [[ -s $file ]] || continue
      case $name in
      keyhole) count=$(grep -cE ' (WARN|ERROR) ' "$file" || true) ;;
      pgbouncer) count=$(grep -cE ' (WARNING|ERROR|FATAL) ' "$file" || true) ;;
      stunnel) count=$(grep -cE 'LOG[0-4]\[' "$file" || true) ;;
      goproxy) count=$(grep -cv '^$' "$file" || true) ;;
      esac
      ((count > 0)) || continue
      keyhole_log "$(basename "$file"): $count warning/error lines; the first ones:"
      case $name in
      keyhole) grep -E ' (WARN|ERROR) ' "$file" | head -n 5 | cut -c1-400 | sed 's/^/  /' ;;
      pgbouncer) grep -E ' (WARNING|ERROR|FATAL) ' "$file" | head -n 5 | cut -c1-400 | sed 's/^/  /' ;;
      stunnel) grep -E 'LOG[0-4]\[' "$file" | head -n 5 | cut -c1-400 | sed 's/^/  /' ;;
      goproxy) head -n 5 "$file" | cut -c1-400 | sed 's/^/  /' ;;
      esac
    done
  done
}

cleanup() {
  local rc=$? name
  trap - EXIT INT TERM
  set +e
  keyhole_stop_pid "$helper_pid"
  for name in "${!proxy_pid[@]}"; do
    keyhole_stop_pid "${proxy_pid[$name]}"
  done
  keyhole_pg_stop immediate
  if [[ -n $tmp ]]; then
    keyhole_heading "proxy logs: warnings and errors"
    log_summary
    if ((rc != 0 && rc != 130)) && [[ -s $tmp/postgres.log ]]; then
      keyhole_heading "PostgreSQL's log (last lines)"
      tail -n 20 "$tmp/postgres.log"
    fi
    if [[ -n $log_dir ]]; then
      mkdir -p "$log_dir" && cp "$tmp"/*.log "$tmp"/*.conf "$log_dir"/ 2>/dev/null
      keyhole_log "logs copied to $log_dir"
    fi
    rm -rf "$tmp"
  fi
  keyhole_exit_report "$rc" \
    "done in $(keyhole_duration "$SECONDS"): the server, the proxies and the temporary directory are gone" \
    "interrupted; everything the benchmark started is stopped and removed" \
    "benchmark failed (exit %d); everything it started is stopped and removed"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- ports -----------------------------------------------------------------------
# open_sockets PORT: TCP sockets on local port PORT that are neither listening nor
# finished (TIME_WAIT, CLOSE): the connections a proxy still holds on its client side.
open_sockets() {
  awk -v p=":$(printf '%04X' "$1")" '$2 ~ (p "$") && $4 != "0A" && $4 != "06" && $4 != "07" { n++ }
    END { print n + 0 }' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# --- measuring -------------------------------------------------------------------
clk_tck=$(getconf CLK_TCK)

# cpu_ticks PID: utime + stime of the whole process (all its threads), in clock ticks.
cpu_ticks() {
  local stat fields
  stat=$(<"/proc/$1/stat") || return 1
  read -r -a fields <<<"${stat##*) }"
  # fields[0] is field 3 (state): utime is field 14, stime field 15
  printf '%d\n' $((fields[11] + fields[12]))
}

rss_kib() {
  local line
  while read -r line; do
    if [[ $line == VmRSS:* ]]; then
      read -r _ line _ <<<"$line"
      printf '%d\n' "$line"
      return 0
    fi
  done <"/proc/$1/status"
  return 1
}

# calc EXPR: floating-point arithmetic.
calc() {
  awk "BEGIN { printf \"%.6f\", $* }"
}

# median FILE: the median of the numbers in FILE, one a line; fails when there are none.
median() {
  [[ -s $1 ]] || return 1
  sort -g "$1" | awk '{ v[NR] = $1 } END {
    if (NR % 2) printf "%.6f", v[(NR + 1) / 2]; else printf "%.6f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# record PATH METRIC VALUE | record_fail PATH METRIC WHY
record() { printf '%s\n' "$3" >>"$tmp/results/$1.$2"; }
record_fail() {
  printf '%s\n' "$3" >>"$tmp/results/$1.$2.fail"
  keyhole_warn "$1 $2: $3"
}

# path_env PATH: the libpq environment for a path (in the array conn_env).
path_env() {
  conn_env=(PGUSER=bench PGPASSWORD=bench PGDATABASE=bench PGAPPNAME=bench PGCONNECT_TIMEOUT=30)
  if [[ $1 == direct ]]; then
    conn_env+=(PGHOST=localhost PGHOSTADDR=127.0.0.1 "PGPORT=$pg_port" PGSSLMODE=verify-full
      "PGSSLROOTCERT=$tmp/certs/ca.crt")
  else
    conn_env+=(PGHOST=127.0.0.1 "PGPORT=${proxy_port[$1]}" PGSSLMODE=disable)
  fi
}

# A superuser query over the server's Unix socket (setup and checks, never measured).
admin_sql() {
  "$keyhole_psql" -X -q -At -v ON_ERROR_STOP=1 -h "$tmp/run" -p "$pg_port" -U postgres -d postgres "$@"
}

# The number of server connections of role bench (-1 when the query fails).
bench_backends() {
  admin_sql -c "select count(*) from pg_stat_activity where usename = 'bench'" 2>/dev/null ||
    echo -1
}

# --- the proxies -----------------------------------------------------------------
# proxy_command NAME: the command line of a proxy (in the array cmd).
proxy_command() {
  local port=${proxy_port[$1]} var
  case $1 in
  keyhole)
    cmd=(env)
    # Only the flags configure it: no KEYHOLE_* variable from the caller's shell.
    while IFS= read -r var; do cmd+=(-u "$var"); done < <(keyhole_env_names '^KEYHOLE_')
    cmd+=("$tmp/bin/keyhole" --port "$port" --ca-file "$tmp/certs/ca.crt"
      "postgres://127.0.0.1:$pg_port?server-name=localhost")
    ;;
  pgbouncer) cmd=("$pgbouncer_bin" "$tmp/pgbouncer.conf") ;;
  stunnel) cmd=("$stunnel_bin" "$tmp/stunnel.conf") ;;
  goproxy)
    cmd=("$tmp/bin/goproxy" -listen "127.0.0.1:$port" -upstream "127.0.0.1:$pg_port"
      -ca "$tmp/certs/ca.crt" -sni localhost)
    ;;
  esac
}

write_proxy_config() {
  local port=${proxy_port[$1]}
  case $1 in
  pgbouncer)
    printf '"bench" "bench"\n' >"$tmp/pgbouncer.users"
    cat >"$tmp/pgbouncer.conf" <<EOF
[databases]
bench = host=127.0.0.1 port=$pg_port dbname=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $tmp/pgbouncer.users
pool_mode = session
max_client_conn = $((idle_conns + 100))
default_pool_size = $((idle_conns + 20))
server_tls_sslmode = verify-full
server_tls_ca_file = $tmp/certs/ca.crt
EOF
    ;;
  stunnel)
    cat >"$tmp/stunnel.conf" <<EOF
foreground = yes
syslog = no
pid =
[pg]
client = yes
accept = 127.0.0.1:$port
connect = 127.0.0.1:$pg_port
protocol = pgsql
CAfile = $tmp/certs/ca.crt
verifyChain = yes
checkHost = localhost
EOF
    ;;
  esac
}

# start_proxy NAME: start it (logging to $tmp/NAME.<start>.log) and wait until it listens.
declare -A proxy_starts=()
start_proxy() {
  local name=$1 port=${proxy_port[$1]} pid log why
  proxy_command "$name"
  proxy_starts[$name]=$((${proxy_starts[$name]:-0} + 1))
  log=$tmp/$name.${proxy_starts[$name]}.log
  # A session of its own, so a Ctrl-C reaches only this script, whose trap then stops
  # everything in order.
  keyhole_pg_exec setsid "${cmd[@]}" >"$log" 2>&1 </dev/null &
  pid=$!
  proxy_pid[$name]=$pid
  if why=$(keyhole_wait_listening "$port" "$pid" "$name"); then
    # setsid forks only when it leads a process group already; find the program.
    if [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == */setsid ]]; then
      pid=$(pgrep -P "$pid" | head -n 1)
      proxy_pid[$name]=$pid
    fi
    return 0
  fi
  if kill -0 "$pid" 2>/dev/null; then
    keyhole_warn "$why"
  else
    wait "$pid" 2>/dev/null || true
    proxy_pid[$name]=""
    keyhole_warn "$why; its log:"
    sed 's/^/  /' "$log" | tail -n 20 >&2
  fi
  return 1
}

stop_proxy() {
  keyhole_stop_pid "${proxy_pid[$1]:-}"
  proxy_pid[$1]=""
}

# check_path PATH: one connection, which must reach the server over TLS.
check_path() {
  local out
  path_env "$1"
  if ! out=$(env "${conn_env[@]}" "$keyhole_psql" -X -At -v ON_ERROR_STOP=1 \
    -c "select ssl from pg_stat_ssl where pid = pg_backend_pid()" 2>&1); then
    printf '%s\n' "$out" | head -n 3 | tr '\n' ' '
    return 1
  fi
  if [[ $out != t ]]; then
    printf 'the server did not see TLS (pg_stat_ssl.ssl = %s)' "$out"
    return 1
  fi
}

# --- workloads -------------------------------------------------------------------
# run_pgbench PATH METRIC [PGBENCH ARGS...]: TPS; for a proxy, also its CPU time per
# transaction (shown and kept with the samples, not in the table).
run_pgbench() {
  local path=$1 metric=$2 log tps txs pid="" c0=0 c1 us
  shift 2
  path_env "$path"
  log=$tmp/pgbench.log
  printf '\n### %s %s: pgbench %s\n' "$path" "$metric" "$*" >>"$log"
  [[ $path == direct ]] || pid=${proxy_pid[$path]}
  [[ -z $pid ]] || c0=$(cpu_ticks "$pid")
  if env "${conn_env[@]}" pgbench -n -S -c "$clients" -j "$threads" -T "$duration" "$@" \
    >"$tmp/pgbench.out" 2>&1; then
    cat "$tmp/pgbench.out" >>"$log"
    tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$tmp/pgbench.out" | head -n 1)
    txs=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$tmp/pgbench.out")
    if [[ -n $tps ]]; then
      record "$path" "$metric" "$tps"
      if [[ -n $pid && ${txs:-0} -gt 0 ]]; then
        c1=$(cpu_ticks "$pid")
        us=$(calc "($c1 - $c0) * 1000000 / $clk_tck / $txs")
        record "$path" "cpu_$metric" "$us"
        printf '  %-10s %10.0f tps   proxy CPU %.0f us/transaction\n' "$path" "$tps" "$us"
      else
        printf '  %-10s %10.0f tps\n' "$path" "$tps"
      fi
      return 0
    fi
  fi
  cat "$tmp/pgbench.out" >>"$log"
  record_fail "$path" "$metric" "pgbench failed: $(grep -m1 -iE 'error|fatal' "$tmp/pgbench.out" | cut -c1-200)"
}

run_copy() {
  local path=$1 pid="" t0 t1 c0=0 c1 secs cpu
  path_env "$path"
  [[ $path == direct ]] || pid=${proxy_pid[$path]}
  [[ -z $pid ]] || c0=$(cpu_ticks "$pid")
  t0=$EPOCHREALTIME
  if ! env "${conn_env[@]}" "$keyhole_psql" -X -q -v ON_ERROR_STOP=1 -c "$copy_sql" \
    >/dev/null 2>"$tmp/copy.err"; then
    record_fail "$path" copy "psql COPY failed: $(head -n 1 "$tmp/copy.err" | cut -c1-200)"
    return 0
  fi
  t1=$EPOCHREALTIME
  secs=$(calc "$t1 - $t0")
  record "$path" copy "$secs"
  if [[ -n $pid ]]; then
    c1=$(cpu_ticks "$pid")
    cpu=$(calc "($c1 - $c0) / $clk_tck / ($copy_bytes / 1073741824)")
    record "$path" cpu "$cpu"
    printf '  %-10s %7.2f s   proxy CPU %.2f s/GiB\n' "$path" "$secs" "$cpu"
  else
    printf '  %-10s %7.2f s\n' "$path" "$secs"
  fi
}

# run_idle PATH: the RSS a proxy gains per idle, logged-in connection.
run_idle() {
  local path=$1 pid rss0 rss1 i backends0 backends limit per
  if ! command -v python3 >/dev/null 2>&1; then
    record_fail "$path" rss "python3 not found"
    return 0
  fi
  # A fresh process, so that what earlier workloads left in its allocator does not
  # hide or inflate the growth; one connection first, for one-time setup costs.
  stop_proxy "$path"
  start_proxy "$path" || {
    record_fail "$path" rss "could not restart $path"
    return 0
  }
  check_path "$path" >/dev/null || true
  sleep 0.5
  pid=${proxy_pid[$path]}
  rss0=$(rss_kib "$pid")
  # Other proxies' pools (pgbouncer's) hold server connections too: count the growth.
  backends0=$(bench_backends)
  : >"$tmp/idle.out"
  python3 "$tmp/idle_conns.py" 127.0.0.1 "${proxy_port[$path]}" bench bench bench "$idle_conns" \
    >"$tmp/idle.out" 2>"$tmp/idle.err" &
  helper_pid=$!
  limit=$((600 + idle_conns / 2))
  for ((i = 0; i < limit; i++)); do
    grep -q '^ready' "$tmp/idle.out" && break
    kill -0 "$helper_pid" 2>/dev/null || break
    sleep 0.2
  done
  if grep -q '^ready' "$tmp/idle.out"; then
    sleep 1
    rss1=$(rss_kib "$pid")
    backends=$(($(bench_backends) - backends0))
    per=$(calc "($rss1 - $rss0) / $idle_conns")
    record "$path" rss "$per"
    printf '  %-10s %8.1f KiB per connection (VmRSS %d -> %d KiB; %d new server connections)\n' \
      "$path" "$per" "$rss0" "$rss1" "$backends"
    # (pgbouncer hands the warm-up connection's server connection to one of them)
    ((backends >= idle_conns - 1)) ||
      keyhole_warn "$path: only $backends new server connections for $idle_conns clients"
  else
    record_fail "$path" rss "idle connections failed: $(tail -n 1 "$tmp/idle.err" | cut -c1-200)"
  fi
  keyhole_stop_pid "$helper_pid"
  helper_pid=""
  cat "$tmp/idle.err" >>"$tmp/idle_conns.log"
  # Let the proxy finish closing those connections: stopping it now would cut them.
  for ((i = 0; i < 200; i++)); do
    (($(open_sockets "${proxy_port[$path]}") == 0)) && break
    sleep 0.1
  done
  # And a fresh one again: pgbouncer keeps its server connections pooled otherwise.
  stop_proxy "$path"
  start_proxy "$path" || {
    keyhole_warn "could not restart $path; it is left out from here on"
    late_note[$path]="could not be restarted in round $round; later rounds lack it"
  }
  for ((i = 0; i < 300; i++)); do
    backends=$(bench_backends)
    ((backends <= backends0)) && break
    sleep 0.1
  done
}

# The idle-connection helper: opens N connections, logs each in (trust, password or
# md5), runs one query on each, prints "ready N", and holds them until SIGTERM.
write_idle_helper() {
  cat >"$1" <<'PY'
import hashlib
import signal
import socket
import struct
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

host, port, user, database, password, count = sys.argv[1:7]
port, count = int(port), int(count)


def read_exactly(sock, size):
    data = bytearray()
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the proxy closed the connection")
        data += chunk
    return bytes(data)


def read_message(sock):
    header = read_exactly(sock, 5)
    (length,) = struct.unpack("!I", header[1:])
    return header[:1], read_exactly(sock, length - 4)


def server_error(body):
    fields = {part[:1]: part[1:].decode(errors="replace") for part in body.split(b"\0") if part}
    return RuntimeError("%s: %s" % (fields.get(b"S", "ERROR"), fields.get(b"M", "?")))


def send(sock, kind, payload):
    sock.sendall(kind + struct.pack("!I", len(payload) + 4) + payload)


def until_ready(sock):
    while True:
        kind, body = read_message(sock)
        if kind == b"E":
            raise server_error(body)
        if kind == b"Z":
            return


def login(_):
    sock = socket.create_connection((host, port), timeout=120)
    params = b""
    for key, value in (("user", user), ("database", database), ("application_name", "bench-idle")):
        params += key.encode() + b"\0" + value.encode() + b"\0"
    params += b"\0"
    sock.sendall(struct.pack("!II", len(params) + 8, 3 << 16) + params)
    while True:
        kind, body = read_message(sock)
        if kind == b"E":
            raise server_error(body)
        if kind != b"R":
            raise RuntimeError("unexpected message %r before authentication ended" % kind)
        (method,) = struct.unpack("!I", body[:4])
        if method == 0:
            break
        if method == 3:
            answer = password.encode()
        elif method == 5:
            inner = hashlib.md5((password + user).encode()).hexdigest().encode()
            answer = b"md5" + hashlib.md5(inner + body[4:8]).hexdigest().encode()
        else:
            raise RuntimeError("authentication method %d is not supported here" % method)
        send(sock, b"p", answer + b"\0")
    until_ready(sock)
    send(sock, b"Q", b"select 1\0")
    until_ready(sock)
    sock.settimeout(None)
    return sock


stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
signal.signal(signal.SIGINT, lambda *_: stop.set())
try:
    with ThreadPoolExecutor(max_workers=16) as pool:
        socks = list(pool.map(login, range(count)))
except Exception as exc:  # noqa: BLE001 - reported to the benchmark
    print("idle connections: %s" % exc, file=sys.stderr)
    sys.exit(1)
print("ready %d" % len(socks), flush=True)
while not stop.wait(1):
    pass
for sock in socks:
    try:
        send(sock, b"X", b"")
        sock.close()
    except OSError:
        pass
PY
}

# =================================================================================
step "system packages"
keyhole_ensure_packages postgresql postgresql-client openssl procps ca-certificates ||
  keyhole_die "install the missing packages and run again"
bench_pkgs=()
for entry in "${KEYHOLE_BENCH_APT_PACKAGES[@]}"; do
  read -r pkg _ <<<"$entry"
  bench_pkgs+=("$pkg")
done
keyhole_log "for the benchmark peers and helper (${bench_pkgs[*]}):"
if ! keyhole_ensure_packages "${bench_pkgs[@]}"; then
  # One package that cannot be had must not keep the others out.
  if ((EUID == 0)) && [[ ${KEYHOLE_SKIP_PACKAGES:-} != 1 ]]; then
    for pkg in $(keyhole_missing_packages "${bench_pkgs[@]}"); do
      keyhole_apt_get install -y --no-install-recommends "$pkg" ||
        keyhole_warn "could not install $pkg"
    done
  fi
  keyhole_log "going on; what is still missing is skipped"
fi
keyhole_find_pg_tools
command -v pgbench >/dev/null 2>&1 || PATH=$keyhole_pgbin:$PATH
command -v pgbench >/dev/null 2>&1 || keyhole_die "pgbench not found"
pgbouncer_bin=$(command -v pgbouncer 2>/dev/null || true)
[[ -n $pgbouncer_bin || ! -x /usr/sbin/pgbouncer ]] || pgbouncer_bin=/usr/sbin/pgbouncer
stunnel_bin=$(command -v stunnel4 2>/dev/null || command -v stunnel 2>/dev/null || true)
go_bin=$(command -v go 2>/dev/null || true)
[[ -n $go_bin || ! -x /usr/lib/go/bin/go ]] || go_bin=/usr/lib/go/bin/go
for p in "${paths[@]}"; do
  case $p in
  pgbouncer) [[ -n $pgbouncer_bin ]] || skip_note[$p]="skipped: pgbouncer is not installed (Debian package pgbouncer)" ;;
  stunnel) [[ -n $stunnel_bin ]] || skip_note[$p]="skipped: stunnel is not installed (Debian package stunnel4)" ;;
  goproxy)
    if [[ ! -f $peers_dir/goproxy/main.go ]]; then
      skip_note[$p]="skipped: no peers folder (goproxy/main.go) at $peers_dir; set KEYHOLE_PEERS_DIR"
    elif [[ -z $go_bin ]]; then
      skip_note[$p]="skipped: go is not installed (Debian package golang-go)"
    fi
    ;;
  esac
done
command -v python3 >/dev/null 2>&1 ||
  keyhole_warn "python3 not found: no RSS per idle connection this run"

# ulimit: a proxy holds two descriptors per connection, the helper one.
need_fds=$((2 * idle_conns + 512))
if (($(ulimit -n) < need_fds)); then
  if (($(ulimit -Hn) < need_fds)) && ! ulimit -Hn "$need_fds" 2>/dev/null; then
    keyhole_die "open files: need $need_fds for BENCH_IDLE_CONNS=$idle_conns, the hard limit is $(ulimit -Hn)"
  fi
  ulimit -n "$need_fds"
fi
keyhole_log "open files limit: $(ulimit -n)"

# =================================================================================
keyhole_release_binary step

# =================================================================================
step "temporary directory, CA and certificates"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/keyhole-bench.XXXXXX")
mkdir "$tmp/bin" "$tmp/results"
keyhole_pg_prepare "$tmp" "PostgreSQL and the proxies (they refuse root)"
install -m 0755 "$keyhole_bin" "$tmp/bin/keyhole"
write_idle_helper "$tmp/idle_conns.py"

if [[ " ${paths[*]} " == *" goproxy "* && -z ${skip_note[goproxy]:-} ]]; then
  step "build goproxy (go build, standard library only)"
  # Offline and into the temporary directory; the peers folder is not written to.
  if (cd "$peers_dir/goproxy" && GOTOOLCHAIN=local GOPROXY=off GOFLAGS=-mod=mod \
    GOCACHE="$tmp/go-cache" GOPATH="$tmp/go" "$go_bin" build -o "$tmp/bin/goproxy" .) \
    >"$tmp/go-build.log" 2>&1; then
    keyhole_log "goproxy built with $("$go_bin" version)"
  else
    sed 's/^/  /' "$tmp/go-build.log" >&2
    skip_note[goproxy]="skipped: go build failed"
  fi
  rm -rf "$tmp/go-cache" "$tmp/go"
fi

# =================================================================================
pg_port=$(keyhole_free_port) || keyhole_die "no free port found"
step "TLS-only PostgreSQL on 127.0.0.1:$pg_port (running as $keyhole_pg_user)"
keyhole_pg_start "$pg_port" bench md5 "max_connections = $((idle_conns + 50))" \
  "shared_buffers = 256MB" "synchronous_commit = off" "full_page_writes = off" \
  "log_connections = off"
admin_sql -c "create role bench login password 'bench'" -c "create database bench owner bench"
why=$(check_path direct) || keyhole_die "direct connection (sslmode=verify-full) failed: $why"
keyhole_log "server up: TLS only (hostssl + md5 for role bench), verify-full from libpq works"

step "pgbench -i -s $scale (directly)"
path_env direct
env "${conn_env[@]}" pgbench -i -q -s "$scale" >"$tmp/pgbench-init.log" 2>&1 || {
  cat "$tmp/pgbench-init.log" >&2
  keyhole_die "pgbench -i failed"
}
admin_sql -c "checkpoint"
copy_bytes=$(env "${conn_env[@]}" "$keyhole_psql" -X -q -c "$copy_sql" | wc -c)
((copy_bytes > 0)) || keyhole_die "COPY out returned nothing"
keyhole_log "pgbench tables at scale $scale; COPY out is $copy_bytes bytes ($(calc "$copy_bytes / 1073741824") GiB)"

# =================================================================================
step "proxies"
for p in "${paths[@]}"; do
  [[ $p == direct || -n ${skip_note[$p]:-} ]] && continue
  proxy_port[$p]=$(keyhole_free_port "$pg_port" "${proxy_port[@]}") || keyhole_die "no free port found"
  write_proxy_config "$p"
  if ! start_proxy "$p"; then
    skip_note[$p]="skipped: did not start (see the warning above)"
    continue
  fi
  if ! why=$(check_path "$p"); then
    keyhole_warn "$p: a connection through it failed: $why"
    skip_note[$p]="skipped: connection failed: $why"
    stop_proxy "$p"
    continue
  fi
  keyhole_log "$p on 127.0.0.1:${proxy_port[$p]} (pid ${proxy_pid[$p]}): the server sees TLS"
done
for p in "${paths[@]}"; do
  [[ -n ${skip_note[$p]:-} ]] && keyhole_log "$p: ${skip_note[$p]}"
done

# =================================================================================
run_paths=()
for p in "${paths[@]}"; do
  [[ -n ${skip_note[$p]:-} ]] || run_paths+=("$p")
done
n_paths=${#run_paths[@]}
# Other work on the machine (a build, a test suite) shifts every number: say so.
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
if awk -v l="${load_start%% *}" -v n="$(nproc)" 'BEGIN { exit !(l > n / 4) }'; then
  keyhole_warn "load average is $load_start before the rounds: other work on this machine will add noise"
fi
# usable PATH: not skipped, and (for a proxy) running.
usable() {
  [[ $1 == direct ]] || [[ -z ${skip_note[$1]:-} && -n ${proxy_pid[$1]:-} ]]
}
for ((round = 1; round <= rounds; round++)); do
  # The order rotates each round, so that no path always comes first or last.
  order=()
  for ((i = 0; i < n_paths; i++)); do
    order+=("${run_paths[$(((i + round - 1) % n_paths))]}")
  done
  step "round $round/$rounds: select-only, pgbench -S -c $clients -j $threads -T $duration"
  for p in "${order[@]}"; do
    if usable "$p"; then run_pgbench "$p" tps_s; fi
  done
  step "round $round/$rounds: connection per transaction, pgbench -S -C -c $clients -j $threads -T $duration"
  for p in "${order[@]}"; do
    if usable "$p"; then run_pgbench "$p" tps_c -C; fi
  done
  step "round $round/$rounds: COPY out of $copy_rows rows of 1000 bytes"
  for p in "${order[@]}"; do
    if usable "$p"; then run_copy "$p"; fi
  done
  step "round $round/$rounds: $idle_conns idle connections"
  for p in "${order[@]}"; do
    if [[ $p != direct ]] && usable "$p"; then run_idle "$p"; fi
  done
done

# =================================================================================
step "results"
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
# cell PATH METRIC FORMAT: the median, or "fail"/"-".
cell() {
  local m
  if m=$(median "$tmp/results/$1.$2"); then
    # shellcheck disable=SC2059 # the format is the caller's
    printf "$3" "$m"
  elif [[ -s $tmp/results/$1.$2.fail ]]; then
    printf 'fail'
  else
    printf -- '-'
  fi
}

ratio() {
  local a b
  if a=$(median "$tmp/results/$1.$2") && b=$(median "$tmp/results/direct.$2"); then
    awk -v a="$a" -v b="$b" 'BEGIN { if (b > 0) printf "%.2f", a / b; else printf "-" }'
  else
    printf -- '-'
  fi
}

header=(path "TPS -S" "vs direct" "TPS -C" "vs direct" "COPY out s" "proxy CPU s/GiB"
  "RSS KiB/idle conn" note)
rows=()
for p in "${paths[@]}"; do
  note=${skip_note[$p]:-${late_note[$p]:-}}
  fails=""
  for m in tps_s tps_c copy rss; do
    [[ -s $tmp/results/$p.$m.fail ]] && fails+=" $m: $(wc -l <"$tmp/results/$p.$m.fail")/$rounds failed"
  done
  [[ -z $fails ]] || note="${note:+$note; }${fails# }"
  if [[ $p == direct ]]; then
    rows+=("$p|$(cell "$p" tps_s '%.0f')|1.00|$(cell "$p" tps_c '%.0f')|1.00|$(cell "$p" copy '%.2f')|-|-|${note:--}")
  elif [[ -n ${skip_note[$p]:-} ]]; then
    rows+=("$p|-|-|-|-|-|-|-|$note")
  else
    rows+=("$p|$(cell "$p" tps_s '%.0f')|$(ratio "$p" tps_s)|$(cell "$p" tps_c '%.0f')|$(ratio "$p" tps_c)|$(cell "$p" copy '%.2f')|$(cell "$p" cpu '%.2f')|$(cell "$p" rss '%.1f')|${note:--}")
  fi
done

# The plain-text table on stdout.
print_text_table() {
  local -a widths=() cells
  local row i line
  for ((i = 0; i < ${#header[@]}; i++)); do widths[i]=${#header[i]}; done
  for row in "${rows[@]}"; do
    IFS='|' read -r -a cells <<<"$row"
    for ((i = 0; i < ${#cells[@]}; i++)); do
      ((${#cells[i]} > widths[i])) && widths[i]=${#cells[i]}
    done
  done
  line=""
  for ((i = 0; i < ${#header[@]}; i++)); do
    line+=$(printf '%-*s  ' "${widths[i]}" "${header[i]}")
  done
  printf '%s\n' "${line%"${line##*[! ]}"}"
  for row in "${rows[@]}"; do
    IFS='|' read -r -a cells <<<"$row"
    line=""
    for ((i = 0; i < ${#cells[@]}; i++)); do
      if ((i == 0 || i == ${#cells[@]} - 1)); then
        line+=$(printf '%-*s  ' "${widths[i]}" "${cells[i]}")
      else
        line+=$(printf '%*s  ' "${widths[i]}" "${cells[i]}")
      fi
    done
    printf '%s\n' "${line%"${line##*[! ]}"}"
  done
}

version_of() {
  case $1 in
  postgres) "$keyhole_pgbin/postgres" --version | head -n 1 ;;
  pgbouncer) "$pgbouncer_bin" --version 2>&1 | head -n 1 ;;
  stunnel) "$stunnel_bin" -version 2>&1 | grep -m1 -E '^stunnel' ;;
  goproxy) "$go_bin" version ;;
  keyhole)
    printf '%s' "$("$tmp/bin/keyhole" --version 2>/dev/null | head -n 1)"
    if [[ -n ${KEYHOLE_BIN:-} ]]; then
      printf ' (KEYHOLE_BIN)'
    else
      printf ' (built from %s)' "$(git -C "$repo_root" describe --always --dirty 2>/dev/null || echo '?')"
    fi
    ;;
  esac
}

print_markdown() {
  local row p m
  printf '# keyhole benchmark\n\n'
  printf -- '- date: %s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')"
  printf -- '- machine: %s cores (%s), %s GiB memory, Linux %s\n' "$(nproc)" \
    "$(sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1)" \
    "$(awk '/^MemTotal:/ { printf "%.0f", $2 / 1048576 }' /proc/meminfo)" "$(uname -r)"
  printf -- '- settings: pgbench -S [-C] -c %d -j %d -T %d (scale %d); %d round(s), median kept; COPY out %d bytes; %d idle connections\n' \
    "$clients" "$threads" "$duration" "$scale" "$rounds" "$copy_bytes" "$idle_conns"
  printf -- '- load average (1, 5, 15 min): %s before the rounds, %s after\n' "$load_start" "$load_end"
  printf -- '- server: %s, TLS only (hostssl, md5), on the same machine\n' "$(version_of postgres)"
  for p in "${paths[@]}"; do
    [[ $p == direct || -n ${skip_note[$p]:-} ]] && continue
    printf -- '- %s: %s\n' "$p" "$(version_of "$p")"
  done
  printf '\n| %s |\n|' "$(IFS='|'; printf '%s' "${header[*]}" | sed 's/|/ | /g')"
  for ((i = 0; i < ${#header[@]}; i++)); do
    if ((i == 0 || i == ${#header[@]} - 1)); then printf -- '---|'; else printf -- '---:|'; fi
  done
  printf '\n'
  for row in "${rows[@]}"; do
    printf '| %s |\n' "${row//|/ | }"
  done
  cat <<'EOF'

TPS: pgbench transactions per second, `-S` select-only on kept connections, `-C` a new
connection per transaction; "vs direct" is the ratio to the direct path. COPY out: wall
seconds for psql to read the COPY to /dev/null. proxy CPU: user + system seconds of the
proxy process per GiB of COPY output. RSS: growth of the proxy's VmRSS per idle
connection (each logged in, one query run), measured on a freshly started proxy.
Samples: one value per round; cpu_tps_s and cpu_tps_c are the proxy's CPU microseconds
per pgbench transaction, cpu its CPU seconds per GiB of COPY output.
EOF
  printf '\n## Samples\n\n| path | metric | values |\n|---|---|---|\n'
  for p in "${paths[@]}"; do
    for m in tps_s cpu_tps_s tps_c cpu_tps_c copy cpu rss; do
      [[ -s $tmp/results/$p.$m ]] || continue
      printf '| %s | %s | %s |\n' "$p" "$m" "$(awk '{ printf "%s%.2f", (NR > 1 ? ", " : ""), $1 }' "$tmp/results/$p.$m")"
    done
  done
}

keyhole_log ""
print_text_table
if [[ -n $out_file ]]; then
  print_markdown >"$out_file"
  keyhole_log ""
  keyhole_log "markdown written to $out_file"
fi
