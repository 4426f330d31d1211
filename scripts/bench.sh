#!/usr/bin/env bash
#
# scripts/bench.sh: keyhole's end-to-end benchmark, next to the same workloads going
# straight to the server and through the proxies a user would pick instead. Run it by
# hand on a quiet machine; CI runs only a small --quick pass of it, direct and keyhole
# (with keyhole portable beside it; scripts/test.sh), to check the harness. One command
# sets everything up on loopback, runs every workload on every path in one run, and
# reports medians and ratios to the direct path, with keyhole's targets next to them.
#
#   scripts/bench.sh                  run everything, print the markdown report
#   scripts/bench.sh --out DIR        also write DIR/bench.md (the report), DIR/bench.json
#                                     (machine, settings, every sample and median) and
#                                     DIR/bench.png (a chart of the ratios, the proxies'
#                                     CPU per GB and RSS per idle connection)
#   scripts/bench.sh --quick          the whole harness end to end in a few minutes
#                                     (short runs, small volumes, 1 round; BENCH_QUICK=1)
#   scripts/bench.sh --only GROUPS    only these groups of workloads, comma-separated
#                                     (BENCH_ONLY): main (the main table: every path to
#                                     PostgreSQL, the synthetic upstream and MariaDB),
#                                     cloudsql, via, latency (every path over a ~1 ms
#                                     link); e.g. --only via. Only what the groups need
#                                     is set up.
#
# Servers (each TLS only, certificates from certs/generate.sh, on 127.0.0.1):
#   PostgreSQL  a throwaway cluster: pg_hba hostssl only (and the Unix socket, the fake
#               Cloud SQL proxy's way in), role bench with md5
#   synthetic   target/release/examples/synthetic (benches/synthetic.rs): speaks just
#               enough PostgreSQL to log anyone in and stream COPY data as fast as it
#               can, so a proxy's own ceiling shows without a database in the way; it
#               also holds the large idle-connection count
#   MariaDB     a throwaway server: require_secure_transport=ON, user bench
#   relay       for the latency group, target/release/examples/latency_relay
#               (benches/latency_relay.rs) on 127.0.0.1 in front of the PostgreSQL
#               above: it forwards every connection's bytes both ways, each chunk
#               delivered BENCH_LATENCY_DELAY_MS (default 0.5) ms after it was read, in
#               order and without a bandwidth limit, so a round trip through it takes
#               about 1 ms more. This kernel has no netem (CONFIG_NET_SCH_NETEM is not
#               set: tc qdisc ... netem delay fails), so a relay makes the slow link.
#               It runs at real-time priority (chrt -f 10) where that is allowed (as
#               root), so that its wake-ups do not wait behind other work.
#   Cloud SQL   target/release/examples/cloudsql_fake (benches/cloudsql_fake.rs): a
#               fake instance keyhole-bench:us-central1:bench, its SQL Admin API on
#               127.0.0.1 (plain HTTP) and its server-side proxy on 127.79.0.1:3307
#               (TLS 1.3 from the first byte, a client certificate from the fake API
#               required, no session resumption), which splices each connection to
#               the PostgreSQL above through its Unix socket (pg_hba: a local line
#               with md5 for bench, the same login as over TCP)
#   hops        for the via= group, each on 127.0.0.1 and each reaching the PostgreSQL
#               above: OpenSSH's sshd (/usr/sbin/sshd -D -e as root, a config, a fresh
#               ed25519 host key and an authorized fresh client key in the temporary
#               directory, public-key login only) with an ssh client config for it
#               (Host bastion: HostName, Port, User, IdentityFile, IdentitiesOnly,
#               UserKnownHostsFile with its host key, StrictHostKeyChecking yes,
#               BatchMode yes), microsocks (SOCKS5, no login) and tinyproxy (HTTP
#               CONNECT)
#
# Paths (each on its own local port, each verifying the server's certificate):
#   direct     the client straight to the server over TLS (libpq sslmode=verify-full;
#              the synthetic client with its CA; mariadb --ssl-verify-server-cert;
#              sysbench asks for TLS but its client library does not verify)
#   keyhole    target/release/keyhole --ca-file CA 'postgres://...?server-name=localhost'
#              (mysql://... in front of MariaDB)
#   keyhole-portable  ("keyhole portable" in the report; main table only) the same
#              flags and targets as keyhole, each on its own port, from a binary built
#              with RUSTFLAGS="--cfg keyhole_portable" (cargo build --release --locked
#              --bin keyhole into TARGET/portable-release, TARGET being CARGO_TARGET_DIR
#              or target, so that neither build evicts the other): the data path macOS
#              and Windows get, one buffered copy instead of splice(2) and rustls' record
#              layer instead of kernel TLS, so a laptop user knows what to expect. No
#              target judges it. It runs whenever the keyhole path does (BENCH_PATHS
#              naming keyhole brings it along; naming keyhole-portable alone runs it
#              alone), unless BENCH_PORTABLE=0. splice(2) only joins two plain legs and
#              every server here speaks TLS, so the two builds part only where keyhole
#              uses kernel TLS (BENCH_KEYHOLE_FLAGS="--kernel-tls auto" on a kernel with
#              the tls ULP): the report says under its table which it was
#   keyhole-pool  ("keyhole pool=session" in the report; main table, PostgreSQL only)
#              the same keyhole and flags with --http-port PORT --prometheus and the
#              target 'postgres://...?server-name=localhost&user=bench&password-file=
#              TMP/keyhole-pool.password&pool=session&pool-size=N': keyhole logs in
#              itself (the file, mode 0600, holds bench's password) and hands its
#              server connections from client to client after DISCARD ALL; N is
#              pgbouncer's default_pool_size (BENCH_IDLE_CONNS + 100). Its check (one
#              connection, then a second once the first is back in the pool) fails the
#              path unless /metrics then shows keyhole_pool_reused_total above 0
#   pgbouncer  session pool mode, server_tls_sslmode = verify-full,
#              default_pool_size = BENCH_IDLE_CONNS + 100 (BENCH_IDLE_LARGE + 100 in
#              front of the synthetic upstream)
#   stunnel    client = yes, protocol = pgsql, verifyChain, checkHost
#   goproxy    the Go TLS proxy from the peers folder, built at run time
# and, in the via= group only (keyhole direct is the keyhole path above):
#   via=ssh    keyhole --ssh-config CFG 'postgres://127.0.0.1:PG?server-name=localhost&via=ssh://bastion'
#   ssh -L     ssh -F CFG -N -L PORT:127.0.0.1:PG bastion (what a developer opens by
#              hand), with keyhole direct to 'postgres://127.0.0.1:PORT?server-name=localhost'
#   via=socks5 keyhole '...&via=socks5://127.0.0.1:SOCKS'   (microsocks)
#   via=http   keyhole '...&via=http://127.0.0.1:HTTP'      (tinyproxy)
# and, in the latency group, every path above but keyhole-pool and keyhole-portable with
# the relay between it and PostgreSQL (direct: pgbench -> relay -> PostgreSQL; a proxy:
# pgbench -> proxy -> relay -> PostgreSQL, the proxy next to its client as a sidecar
# would be).
# Proxies are reached over plain TCP on 127.0.0.1. Each proxy runs once per server it
# fronts (PostgreSQL, synthetic and the relay; keyhole-pool PostgreSQL only;
# keyhole-portable PostgreSQL, synthetic and MariaDB; only keyhole and keyhole-portable
# front MariaDB: no proxy that speaks MySQL is packaged here, see MySQL below).
#
# Workloads, the same for every path, interleaved (every round runs each workload on
# every path, in an order that rotates each round) and the median over rounds kept:
#   pgbench -S    pgbench -S -c C -T DURATION for C in 1, 8, 64: TPS and latency, and
#                 the proxy's CPU time per transaction (utime + stime from
#                 /proc/PID/stat, in µs, with its ratio to keyhole's); at -c 1 also the
#                 latency a proxy adds per round trip (its latency minus direct's, µs:
#                 pgbench -S sends one query per transaction)
#   pgbench -C    pgbench -S -C -c 8: new connections per second; the latency a proxy
#                 adds to each new connection (its latency minus direct's); the proxy's
#                 CPU per new connection (µs, its ratio to keyhole's)
#   COPY out      psql: COPY (select repeat('x', 1000) ...) TO STDOUT > /dev/null,
#                 about BENCH_COPY_MB MB: MB/s, and the proxy's CPU seconds per GB
#                 (utime + stime from /proc/PID/stat)
#   COPY in       the same rows from a generator into COPY ... FROM STDIN, into an
#                 UNLOGGED table truncated before each run: MB/s, proxy CPU s/GB
#   synthetic     `synthetic stream`: BENCH_STREAM_MB MB of COPY data from the
#                 synthetic upstream: MB/s, proxy CPU s/GB (not keyhole-pool)
#   idle          BENCH_IDLE_CONNS connections to PostgreSQL and BENCH_IDLE_LARGE to the
#                 synthetic upstream through a freshly started proxy, each logged in
#                 and one query run (so pgbouncer and keyhole-pool hold a server
#                 connection for each), then left idle: the proxy's VmRSS growth per
#                 connection (keyhole-pool's, a pooled session through its relay with
#                 two 16 KiB buffers, is shown but not judged by keyhole's target)
#   MySQL         sysbench oltp_point_select (one query per transaction), 1 and 8
#                 threads: TPS, latency, the proxy's CPU per query (µs); a bulk read
#                 (mariadb --quick, select repeat('x', 1000) from a sequence, about
#                 BENCH_COPY_MB MB, to /dev/null): MB/s, proxy CPU s/GB. Direct and
#                 keyhole (both builds) only: pgbouncer and goproxy speak PostgreSQL
#                 only, stunnel (and haproxy) cannot do MySQL's TLS upgrade inside the
#                 protocol, and none of the MySQL-speaking proxies that verify the
#                 server's certificate (proxysql, mysql-router, maxscale; mysql-proxy)
#                 is in Debian's packages: the run looks them up (apt-cache policy) and
#                 the report says what it found
#   Cloud SQL     keyhole's connector (the instance as its target) through the fake,
#                 next to direct and keyhole with its ordinary postgres:// target to
#                 the same PostgreSQL, and stunnel through the same fake (with a
#                 client certificate from its CA; no PostgreSQL 15 client speaks TLS
#                 from the first byte): pgbench -S -c 8 (TPS, the proxy's and the
#                 fake's CPU per transaction); pgbench -S -C -c 8, refresh-ahead and
#                 --lazy-refresh (each warmed by one connection first, so both use a
#                 cached certificate): connections per second, proxy CPU per
#                 connection; first connection: a freshly started keyhole (for
#                 refresh-ahead, once its first certificate is in; lazy fetches on
#                 the connection), one psql -c 'select 1', its wall time in ms,
#                 BENCH_FIRST_RUNS runs per round, median. Ratios are to keyhole with
#                 its ordinary target.
#   via           the via= paths above, next to keyhole direct (the baseline of the
#                 ratios) and ssh -L with keyhole direct to it (what ssh costs), each
#                 run BENCH_VIA_DURATION seconds: pgbench -S -c 8 (TPS, latency, the CPU
#                 per transaction of keyhole with its ssh client: keyhole's process
#                 tree, whose child the ssh master is, or keyhole and ssh -L; and of the
#                 hop: sshd's process tree, microsocks, tinyproxy); pgbench -S -C -c 8
#                 (new connections per second, the latency added to each, the same CPU
#                 per new connection); the SSH login of keyhole's master connection (its
#                 own log, once per run). Every via= run must succeed: a failure fails
#                 the benchmark (after the report is written).
#   latency       every path over the relay (see Servers): pgbench -S -c 1 and -c 8
#                 -T DURATION: TPS and average latency with their ratios to direct over
#                 the same relay, the proxy's CPU per transaction (µs, its ratio to
#                 keyhole's), and at -c 1 the latency a proxy adds per round trip; and
#                 direct without the relay, to show what the relay adds. The report's
#                 table "over a ~1 ms link".
# Targets for keyhole (shown with the results, and whether they are met): pgbench -S
# -c 8 >= 0.95x direct; pgbench -C >= 1.2x direct; pgbench -C through keyhole
# pool=session >= pgbouncer's rate (same run); COPY out <= 0.6 proxy CPU s/GB;
# <= 16 KiB RSS per idle connection at 1,000; 10,000 idle connections held without an
# error; MySQL point selects >= 0.95x direct; through the connector, keyhole's CPU per
# transaction <= 1.1x its ordinary target's (the data path must cost the same); through
# an SSH bastion (via=ssh), pgbench -S -c 8 TPS >= 0.95x and CPU per transaction
# (keyhole and its ssh) <= 1.1x those of ssh -L with keyhole direct (the data path costs
# what ssh costs, not more). MB and GB are 10^6 and 10^9 bytes.
#
# Steps: system packages (as root, missing ones are installed: the test packages plus
# pgbouncer, stunnel4, golang-go, python3, sysbench, gnuplot-nox, and for the via= group
# openssh-server, openssh-client, microsocks, tinyproxy; a peer that cannot be
# installed is skipped), cargo build --release of keyhole and the synthetic,
# cloudsql_fake and latency_relay examples, for the keyhole-portable path
# RUSTFLAGS="--cfg keyhole_portable" cargo build --release --locked --bin keyhole into
# TARGET/portable-release (once per run; a failed build skips the path with a note),
# the kernel's TLS ULP probed (setsockopt TCP_ULP "tls" on a loopback connection, for
# the report's line on the two keyhole builds), go build of goproxy into the temporary
# directory, the servers, pgbench -i -s 10, sysbench prepare, the relay, the proxies
# (each once more with the relay as its upstream), the fake Cloud SQL instance and the
# connector, the hops (sshd, ssh -L, microsocks, tinyproxy) and keyhole through each,
# the rounds, the report (scripts/lib/bench_report.py: the markdown, bench.json, and
# bench.png through gnuplot). Everything the run starts or writes is removed on exit,
# also on Ctrl-C or failure (/run/sshd, sshd's privilege separation directory, is
# created when missing and left).
#
# Environment:
#   BENCH_QUICK=1             quick mode (as --quick): BENCH_DURATION=3, BENCH_ROUNDS=1,
#                             BENCH_COPY_MB=64, BENCH_STREAM_MB=256, 200 idle connections,
#                             BENCH_FIRST_RUNS=3, BENCH_VIA_DURATION=1 (each setting below
#                             still wins when given)
#   BENCH_ONLY=GROUPS         as --only GROUPS
#   BENCH_DURATION=SECONDS    length of each pgbench and sysbench run (default 10)
#   BENCH_ROUNDS=N            runs of each workload per path; the median is kept (default 2)
#   BENCH_COPY_MB=N           size of COPY out, COPY in and the MySQL bulk read (default 1000)
#   BENCH_STREAM_MB=N         size of the synthetic stream (default 2000)
#   BENCH_IDLE_CONNS=N        idle connections to PostgreSQL (default 1000)
#   BENCH_IDLE_LARGE=N        idle connections to the synthetic upstream (default 10000;
#                             lowered, with a note, when the open-files hard limit cannot
#                             be raised to 2 N + 256, e.g. without CAP_SYS_RESOURCE)
#   BENCH_PATHS="..."         the paths to run (default: direct keyhole keyhole-portable
#                             keyhole-pool pgbouncer stunnel goproxy); direct is always
#                             included, for the ratios, and keyhole brings keyhole-portable
#   BENCH_PORTABLE=0          leave out the keyhole-portable path (and its build); it runs
#                             by default, in --quick runs too (about a minute more there,
#                             besides its first build: about 7 minutes on 2 cores, then
#                             nothing while the sources stay the same)
#   BENCH_MYSQL=0             leave out MariaDB and the MySQL workloads
#   BENCH_CLOUDSQL=0          leave out the Cloud SQL connector's workloads (they run
#                             only when the keyhole path does)
#   BENCH_FIRST_RUNS=N        first-connection runs per variant and round (default 5)
#   BENCH_VIA=0               leave out the via= group (it runs only when the keyhole
#                             path does; without sshd, ssh, microsocks or tinyproxy, and
#                             not root to install them, it is skipped with a warning)
#   BENCH_VIA_DURATION=SECONDS  length of each via= pgbench run (default: BENCH_DURATION;
#                             1 in quick mode)
#   BENCH_LATENCY=0           leave out the latency group
#   BENCH_LATENCY_DELAY_MS=MS the relay's one-way delay, each way (default 0.5: a round
#                             trip about 1 ms longer)
#   BENCH_LOG_DIR=DIR         copy the servers', the proxies' and the tools' logs here
#   BENCH_SAMPLES_DIR=DIR     copy the samples and the report's context here (DIR/results,
#                             which must not exist yet, and DIR/context.json), to write the
#                             report again from them: python3 scripts/lib/bench_report.py
#                             --results DIR/results --context DIR/context.json [--out OUT]
#   BENCH_KEYHOLE_FLAGS="..."  extra flags for keyhole (split on spaces), e.g.
#                             "--kernel-tls auto" on a kernel with the TLS ULP
#   KEYHOLE_BIN=PATH          use this keyhole binary instead of building one
#   KEYHOLE_PORTABLE_BIN=PATH use this keyhole binary for the keyhole-portable path
#                             instead of building one (it should be a --cfg
#                             keyhole_portable build: nothing here checks)
#   BENCH_SYNTHETIC_BIN=PATH  use this synthetic binary instead of building one
#   BENCH_CLOUDSQL_BIN=PATH   use this cloudsql_fake binary instead of building one
#   BENCH_RELAY_BIN=PATH      use this latency_relay binary instead of building one
#   KEYHOLE_PEERS_DIR=DIR     the benchmark peers (default: ../shared/peers from the repo)
#   KEYHOLE_SKIP_PACKAGES=1   don't check system packages
#   KEYHOLE_PG_BINDIR=DIR     where initdb/pg_ctl/postgres live (default: found)
# With the defaults a run takes about 46 minutes on 2 cores (the via= group about 4 of
# them, the latency group about 4, keyhole portable about 5); --quick about 8.
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

out_dir=""
quick=${BENCH_QUICK:-0}
only=${BENCH_ONLY:-}
while (($# > 0)); do
  case $1 in
  --out)
    (($# >= 2)) || keyhole_die "--out needs a directory"
    out_dir=$2
    shift 2
    ;;
  --out=*)
    out_dir=${1#--out=}
    shift
    ;;
  --quick)
    quick=1
    shift
    ;;
  --only)
    (($# >= 2)) || keyhole_die "--only needs groups (main, cloudsql, via, latency)"
    only=$2
    shift 2
    ;;
  --only=*)
    only=${1#--only=}
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
if [[ -n $out_dir ]]; then
  [[ $out_dir == /* ]] || out_dir=$caller_dir/$out_dir
  if ! mkdir -p "$out_dir" 2>/dev/null || [[ ! -w $out_dir ]]; then
    keyhole_die "--out: cannot write into $out_dir"
  fi
fi

# --- settings --------------------------------------------------------------------
[[ $quick == 0 || $quick == 1 ]] || keyhole_die "BENCH_QUICK: '$quick' is neither 0 nor 1"
if ((quick)); then
  d_duration=3 d_rounds=1 d_copy_mb=64 d_stream_mb=256 d_idle=200 d_idle_large=200 d_first=3
else
  d_duration=10 d_rounds=2 d_copy_mb=1000 d_stream_mb=2000 d_idle=1000 d_idle_large=10000 d_first=5
fi
duration=${BENCH_DURATION:-${DURATION:-$d_duration}}
duration=${duration%s}
if ((quick)); then d_via_duration=1; else d_via_duration=$duration; fi
via_duration=${BENCH_VIA_DURATION:-$d_via_duration}
via_duration=${via_duration%s}
rounds=${BENCH_ROUNDS:-$d_rounds}
copy_mb=${BENCH_COPY_MB:-$d_copy_mb}
stream_mb=${BENCH_STREAM_MB:-$d_stream_mb}
idle_conns=${BENCH_IDLE_CONNS:-$d_idle}
idle_large=${BENCH_IDLE_LARGE:-$d_idle_large}
with_mysql=${BENCH_MYSQL:-1}
with_cloudsql=${BENCH_CLOUDSQL:-1}
with_via=${BENCH_VIA:-1}
with_latency=${BENCH_LATENCY:-1}
with_portable=${BENCH_PORTABLE:-1}
latency_delay_ms=${BENCH_LATENCY_DELAY_MS:-0.5}
first_runs=${BENCH_FIRST_RUNS:-$d_first}
read -r -a keyhole_flags <<<"${BENCH_KEYHOLE_FLAGS:-}"
for setting in duration:BENCH_DURATION rounds:BENCH_ROUNDS copy_mb:BENCH_COPY_MB \
  stream_mb:BENCH_STREAM_MB idle_conns:BENCH_IDLE_CONNS idle_large:BENCH_IDLE_LARGE \
  first_runs:BENCH_FIRST_RUNS via_duration:BENCH_VIA_DURATION; do
  var=${setting%%:*}
  [[ ${!var} =~ ^[1-9][0-9]*$ ]] ||
    keyhole_die "${setting#*:}: '${!var}' is not a positive whole number"
done
[[ $with_mysql == 0 || $with_mysql == 1 ]] || keyhole_die "BENCH_MYSQL: '$with_mysql' is neither 0 nor 1"
[[ $with_cloudsql == 0 || $with_cloudsql == 1 ]] ||
  keyhole_die "BENCH_CLOUDSQL: '$with_cloudsql' is neither 0 nor 1"
[[ $with_via == 0 || $with_via == 1 ]] || keyhole_die "BENCH_VIA: '$with_via' is neither 0 nor 1"
[[ $with_latency == 0 || $with_latency == 1 ]] ||
  keyhole_die "BENCH_LATENCY: '$with_latency' is neither 0 nor 1"
[[ $with_portable == 0 || $with_portable == 1 ]] ||
  keyhole_die "BENCH_PORTABLE: '$with_portable' is neither 0 nor 1"
if [[ ! $latency_delay_ms =~ ^[0-9]+(\.[0-9]+)?$ ]] ||
  ! awk -v d="$latency_delay_ms" 'BEGIN { exit !(d > 0 && d <= 1000) }'; then
  keyhole_die "BENCH_LATENCY_DELAY_MS: '$latency_delay_ms' is not a number of milliseconds above 0, at most 1000"
fi
latency_rtt_ms=$(awk -v d="$latency_delay_ms" 'BEGIN { printf "%g", 2 * d }')
# The groups of workloads that run: main (the main table), cloudsql, via, latency.
run_main=1 run_cloudsql=1 run_via=1 run_latency=1
if [[ -n $only ]]; then
  run_main=0 run_cloudsql=0 run_via=0 run_latency=0
  for g in ${only//,/ }; do
    case $g in
    main) run_main=1 ;;
    cloudsql) run_cloudsql=1 ;;
    via) run_via=1 ;;
    latency) run_latency=1 ;;
    *) keyhole_die "--only: unknown group '$g' (main, cloudsql, via, latency)" ;;
    esac
  done
  ((run_main || run_cloudsql || run_via || run_latency)) ||
    keyhole_die "--only: no group given (main, cloudsql, via, latency)"
  ((!run_cloudsql || with_cloudsql)) || keyhole_die "--only cloudsql contradicts BENCH_CLOUDSQL=0"
  ((!run_via || with_via)) || keyhole_die "--only via contradicts BENCH_VIA=0"
  ((!run_latency || with_latency)) || keyhole_die "--only latency contradicts BENCH_LATENCY=0"
  ((run_main)) || with_mysql=0
fi
((with_latency)) || run_latency=0
# sysbench's thread counts: the first is 1 (its samples are my_*_t1), the last is the
# one with keyhole's target (my_tps, my_lat, my_cpu).
readonly pgbench_clients=(1 8 64) conn_clients=8 scale=10 mysql_thread_counts=(1 8)
# The latency group: pgbench -S at these client counts over the relay.
readonly latency_clients=(1 8)
# Rows of 1000 bytes (1001 with the newline): BENCH_COPY_MB MB.
readonly copy_rows=$((copy_mb * 1000))
readonly copy_sql="COPY (select repeat('x', 1000) from generate_series(1, $copy_rows)) TO STDOUT"
readonly mysql_bulk_sql="select repeat('x', 1000) from seq_1_to_$copy_rows"
readonly stream_bytes=$((stream_mb * 1000000))
if ((quick)); then mysql_table_size=10000; else mysql_table_size=100000; fi
readonly mysql_table_size
readonly all_paths=(direct keyhole keyhole-portable keyhole-pool pgbouncer stunnel goproxy)
paths=(direct)
for p in ${BENCH_PATHS:-${all_paths[*]}}; do
  case " ${all_paths[*]} " in
  *" $p "*) [[ $p == direct ]] || paths+=("$p") ;;
  *) keyhole_die "BENCH_PATHS: unknown path '$p' (known: ${all_paths[*]})" ;;
  esac
done
# keyhole portable: right after keyhole, which brings it along, or where BENCH_PATHS
# names it without keyhole; never with BENCH_PORTABLE=0.
portable_named=0
[[ " ${paths[*]} " != *" keyhole-portable "* ]] || portable_named=1
kept=()
for p in "${paths[@]}"; do
  [[ $p == keyhole-portable ]] && continue
  kept+=("$p")
  if ((with_portable)) && { [[ $p == keyhole ]] ||
    [[ $p == direct && $portable_named == 1 && " ${paths[*]} " != *" keyhole "* ]]; }; then
    kept+=(keyhole-portable)
  fi
done
paths=("${kept[@]}")
if ((!run_main)); then
  # keyhole pool=session and keyhole portable are columns of the main table only.
  kept=()
  for p in "${paths[@]}"; do
    [[ $p == keyhole-pool || $p == keyhole-portable ]] || kept+=("$p")
  done
  paths=("${kept[@]}")
fi
# The pool size of the pooled paths: pgbouncer's default_pool_size, and keyhole
# pool=session's pool-size the same (like with like); SERVER pg or syn.
pool_size_of() {
  if [[ $1 == syn ]]; then printf '%d' $((idle_large + 100)); else printf '%d' $((idle_conns + 100)); fi
}
if ((!run_main && !run_latency)); then
  # Without the main table and the latency group (every path), the other groups need
  # keyhole (their baseline) and, for the Cloud SQL group, stunnel when it was asked
  # for; nothing else.
  kept=(direct)
  for p in "${paths[@]}"; do
    [[ $p == keyhole || ($p == stunnel && $run_cloudsql == 1) ]] && kept+=("$p")
  done
  paths=("${kept[@]}")
fi
# The Cloud SQL workloads: keyhole's connector next to its ordinary target.
cloudsql_note=""
if ((!with_cloudsql)); then
  cloudsql_note="Cloud SQL workloads left out (BENCH_CLOUDSQL=0)"
elif ((!run_cloudsql)); then
  cloudsql_note="Cloud SQL workloads left out (--only $only)"
elif [[ " ${paths[*]} " != *" keyhole "* ]]; then
  cloudsql_note="Cloud SQL workloads left out: the keyhole path is not in BENCH_PATHS"
fi
# The via= group: keyhole through an SSH bastion, a SOCKS5 and an HTTP proxy, next to
# keyhole direct and ssh -L.
via_note=""
if ((!with_via)); then
  via_note="via= workloads left out (BENCH_VIA=0)"
elif ((!run_via)); then
  via_note="via= workloads left out (--only $only)"
elif [[ " ${paths[*]} " != *" keyhole "* ]]; then
  via_note="via= workloads left out: the keyhole path is not in BENCH_PATHS"
fi
# The latency group: every path over the relay.
latency_note=""
if ((!with_latency)); then
  latency_note="latency workloads left out (BENCH_LATENCY=0)"
elif ((!run_latency)); then
  latency_note="latency workloads left out (--only $only)"
fi
# Asked for by name: then it runs, or the benchmark fails.
via_required=0
[[ -z $only || $run_via == 0 ]] || via_required=1
((!via_required)) || [[ -z $via_note ]] || keyhole_die "--only via: $via_note"
peers_dir=${KEYHOLE_PEERS_DIR:-$repo_root/../shared/peers}
log_dir=${BENCH_LOG_DIR:-}
if [[ -n $log_dir ]]; then
  [[ $log_dir == /* ]] || log_dir=$caller_dir/$log_dir
fi
samples_dir=${BENCH_SAMPLES_DIR:-}
if [[ -n $samples_dir ]]; then
  [[ $samples_dir == /* ]] || samples_dir=$caller_dir/$samples_dir
  [[ ! -e $samples_dir/results ]] || keyhole_die "BENCH_SAMPLES_DIR: $samples_dir/results exists already"
fi

# Whatever libpq or MySQL client settings the caller has (PGSSLMODE, MYSQL_PWD...) must
# not change what is measured: every tool gets exactly the settings given below.
keyhole_unset_env '^PG'
keyhole_unset_env '^(MYSQL_|MARIADB_|LIBMYSQL_)'

# The peers' and tools' packages, checked and installed with the same mechanism as the
# test packages (scripts/lib/packages.sh). They are added to the list in this process only.
KEYHOLE_BENCH_APT_PACKAGES=(
  # the usual C Postgres proxy
  "pgbouncer   /usr/sbin/pgbouncer"
  # the usual TLS wrapper
  "stunnel4    /usr/bin/stunnel4"
  # builds the Go TLS proxy from the peers folder
  "golang-go   go"
  # the report (scripts/lib/bench_report.py) and the idle-connection helper for
  # PostgreSQL (md5 login)
  "python3     python3"
  # the MySQL point-select workload
  "sysbench    sysbench"
  # the chart (bench.png)
  "gnuplot-nox gnuplot"
  # the via= group's hops: sshd and the ssh client (keyhole's master, ssh -L, ssh-keygen)
  "openssh-server /usr/sbin/sshd"
  "openssh-client ssh"
  # a SOCKS5 proxy
  "microsocks  microsocks"
  # an HTTP CONNECT proxy
  "tinyproxy   tinyproxy"
)
KEYHOLE_APT_PACKAGES+=("${KEYHOLE_BENCH_APT_PACKAGES[@]}")

step_no=0
step() {
  step_no=$((step_no + 1))
  keyhole_heading "[$step_no] $* ($(keyhole_duration "$SECONDS") so far)"
}

# --- state the cleanup needs -----------------------------------------------------
# (and the PostgreSQL server's, in scripts/lib/pg.sh)
tmp=""
helper_pid=""
syn_pid=""
my_pid=""
hold_fd=""
cs_pid=""
relay_pid=""
# Proxies are instances NAME@SERVER, SERVER one of pg (PostgreSQL), syn (synthetic),
# my (MariaDB), lat (the latency relay in front of PostgreSQL), cs and csl (the fake
# Cloud SQL instance: keyhole's connector with refresh-ahead and with --lazy-refresh,
# stunnel with a client certificate), and for
# the via= group vssh, vsocks, vhttp (keyhole through sshd, microsocks, tinyproxy) and
# vtun (keyhole direct to ssh -L's port); the hops themselves are sshd@via, ssh@vtun
# (the ssh -L tunnel), microsocks@via and tinyproxy@via:
# keyhole@pg, pgbouncer@syn, keyhole@csl, keyhole@vssh, sshd@via...
declare -A proxy_pid=() proxy_port=() skip_note=() late_note=() upstream_port=()
# The HTTP port (/metrics) of an instance that serves one: keyhole-pool@pg.
declare -A http_port=()

# A summary of what the proxies' logs say went wrong: the interesting part of a run
# that is about to be deleted.
log_summary() {
  local name file count
  # (cloudsql_fake's stdout: its address lines and one `call METHOD STATUS` per request)
  local quiet_fake='^$|^(api|proxy|instance|call) '
  # (tinyproxy, run as a user of its own choosing, says it would rather have one)
  local tp_bad='^(ERROR|CRITICAL|WARNING) ' tp_quiet='SHOULD set a UserName'
  for name in keyhole keyhole-portable keyhole-pool pgbouncer stunnel goproxy synthetic latency_relay cloudsql_fake sshd ssh tinyproxy; do
    for file in "$tmp/$name".*.log; do
      [[ -s $file ]] || continue
      case $name in
      keyhole | keyhole-portable | keyhole-pool) count=$(grep -cE ' (WARN|ERROR) ' "$file" || true) ;;
      pgbouncer) count=$(grep -cE ' (WARNING|ERROR|FATAL) ' "$file" || true) ;;
      stunnel) count=$(grep -cE 'LOG[0-4]\[' "$file" || true) ;;
      goproxy | synthetic | latency_relay) count=$(grep -cvE '^$|^listening ' "$file" || true) ;;
      cloudsql_fake) count=$(grep -cvE "$quiet_fake" "$file" || true) ;;
      sshd) count=$(grep -ciE 'error|fatal' "$file" || true) ;;
      ssh) count=$(grep -cvE '^$' "$file" || true) ;;
      tinyproxy) count=$(grep -E "$tp_bad" "$file" | grep -cv "$tp_quiet" || true) ;;
      esac
      ((count > 0)) || continue
      keyhole_log "$(basename "$file"): $count warning/error lines; the first ones:"
      case $name in
      keyhole | keyhole-portable | keyhole-pool) grep -E ' (WARN|ERROR) ' "$file" | head -n 5 | cut -c1-400 | sed 's/^/  /' ;;
      pgbouncer) grep -E ' (WARNING|ERROR|FATAL) ' "$file" | head -n 5 | cut -c1-400 | sed 's/^/  /' ;;
      stunnel) grep -E 'LOG[0-4]\[' "$file" | head -n 5 | cut -c1-400 | sed 's/^/  /' ;;
      goproxy | synthetic | latency_relay) grep -vE '^$|^listening ' "$file" | head -n 5 | cut -c1-400 | sed 's/^/  /' ;;
      cloudsql_fake) grep -vE "$quiet_fake" "$file" | head -n 5 | cut -c1-400 | sed 's/^/  /' ;;
      sshd) grep -iE 'error|fatal' "$file" | head -n 5 | cut -c1-400 | sed 's/^/  /' ;;
      ssh) grep -vE '^$' "$file" | head -n 5 | cut -c1-400 | sed 's/^/  /' ;;
      tinyproxy) grep -E "$tp_bad" "$file" | grep -v "$tp_quiet" | head -n 5 | cut -c1-400 | sed 's/^/  /' ;;
      esac
    done
  done
}

cleanup() {
  local rc=$? inst
  trap - EXIT INT TERM
  set +e
  keyhole_stop_pid "$helper_pid"
  for inst in "${!proxy_pid[@]}"; do
    [[ $inst == *@via ]] || keyhole_stop_pid "${proxy_pid[$inst]}"
  done
  # The hops after the keyholes and the ssh -L that go through them; sshd last.
  for inst in tinyproxy@via microsocks@via sshd@via; do
    keyhole_stop_pid "${proxy_pid[$inst]:-}"
  done
  keyhole_stop_pid "$relay_pid"
  keyhole_stop_pid "$syn_pid"
  keyhole_stop_pid "$my_pid"
  keyhole_stop_pid "$cs_pid"
  [[ -z $hold_fd ]] || exec {hold_fd}>&-
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
    if [[ -n $samples_dir && -d $tmp/results ]]; then
      mkdir -p "$samples_dir" && cp -R "$tmp/results" "$samples_dir/results" &&
        { [[ ! -f $tmp/context.json ]] || cp "$tmp/context.json" "$samples_dir/"; } &&
        keyhole_log "samples copied to $samples_dir (results/, context.json)"
    fi
    rm -rf "$tmp"
  fi
  keyhole_exit_report "$rc" \
    "done in $(keyhole_duration "$SECONDS"): the servers, the proxies and the temporary directory are gone" \
    "interrupted; everything the benchmark started is stopped and removed" \
    "benchmark failed (exit %d); everything it started is stopped and removed"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- ports -----------------------------------------------------------------------
# open_sockets PORT: TCP sockets on local port PORT that are neither listening nor
# finished (TIME_WAIT, CLOSE): the connections a proxy or server still holds there.
open_sockets() {
  awk -v p=":$(printf '%04X' "$1")" '$2 ~ (p "$") && $4 != "0A" && $4 != "06" && $4 != "07" { n++ }
    END { print n + 0 }' /proc/net/tcp /proc/net/tcp6 2>/dev/null
}

# new_port: a free port that none of this run's servers and proxies has.
new_port() {
  keyhole_free_port "${upstream_port[@]}" "${proxy_port[@]}" "${http_port[@]}"
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

# tree_ticks PID...: utime + stime of the processes and all their descendants, in clock
# ticks, with what the exited children they have waited for spent (cutime + cstime):
# keyhole and its ssh master, sshd and its session processes.
tree_ticks() {
  # (processes come and go while cat reads: a file that is gone is no failure)
  { cat /proc/[0-9]*/stat 2>/dev/null || true; } | awk -v roots="$*" '
    {
      pid = $1
      rest = $0
      sub(/^.*\) /, "", rest) # after the command name, which may hold spaces
      split(rest, f, " ")
      ppid[pid] = f[2]
      ticks[pid] = f[12] + f[13] + f[14] + f[15]
    }
    END {
      n = split(roots, r, " ")
      for (i = 1; i <= n; i++) tree[r[i]] = 1
      for (grew = 1; grew;) {
        grew = 0
        for (p in ppid) if (!(p in tree) && (ppid[p] in tree)) { tree[p] = 1; grew = 1 }
      }
      sum = 0
      for (p in tree) if (p in ticks) sum += ticks[p]
      print sum
    }'
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

# record PATH METRIC VALUE | record_fail PATH METRIC WHY
record() { printf '%s\n' "$3" >>"$tmp/results/$1.$2"; }
record_fail() {
  printf '%s\n' "${3//$'\n'/ }" >>"$tmp/results/$1.$2.fail"
  keyhole_warn "$1 $2: $3"
}

# cpu_start PATH SERVER (or cpu_start INSTANCE) / cpu_seconds: the CPU seconds the
# path's proxy process spent in between (empty for direct).
cpu_pid="" cpu_c0=0
cpu_start() {
  local inst=$1
  (($# < 2)) || inst=$1@$2
  cpu_pid=""
  cpu_c0=0
  [[ $1 == direct ]] && return 0
  cpu_pid=${proxy_pid[$inst]:-}
  [[ -z $cpu_pid ]] || cpu_c0=$(cpu_ticks "$cpu_pid")
}
cpu_seconds() {
  local c1
  [[ -n $cpu_pid ]] || return 0
  c1=$(cpu_ticks "$cpu_pid") || return 0
  calc "($c1 - $cpu_c0) / $clk_tck"
}

# path_env PATH: the libpq environment for a path to PostgreSQL (in the array conn_env);
# PATH may also be a proxy instance (keyhole@cs: through the fake Cloud SQL instance;
# direct@lat: straight to the latency relay in front of PostgreSQL).
path_env() {
  local inst=$1
  [[ $inst == *@* ]] || inst=$inst@pg
  conn_env=(PGUSER=bench PGPASSWORD=bench PGDATABASE=bench PGAPPNAME=bench PGCONNECT_TIMEOUT=30)
  if [[ ${inst%@*} == direct ]]; then
    conn_env+=(PGHOST=localhost PGHOSTADDR=127.0.0.1 "PGPORT=${upstream_port[${inst#*@}]}"
      PGSSLMODE=verify-full "PGSSLROOTCERT=$tmp/certs/ca.crt")
  else
    conn_env+=(PGHOST=127.0.0.1 "PGPORT=${proxy_port[$inst]}" PGSSLMODE=disable)
  fi
}

# syn_args PATH: the synthetic client's connection arguments (in the array syn_conn).
syn_args() {
  if [[ $1 == direct ]]; then
    syn_conn=(--connect "127.0.0.1:$syn_port" --tls --ca "$tmp/certs/ca.crt" --server-name localhost)
  else
    syn_conn=(--connect "127.0.0.1:${proxy_port[$1@syn]}")
  fi
}

# my_args PATH: the mariadb client's connection arguments (in the array my_conn; the
# password goes in MYSQL_PWD).
my_args() {
  my_conn=(--no-defaults -h 127.0.0.1 -u bench -D bench)
  if [[ $1 == direct ]]; then
    my_conn+=(-P "$my_port" --ssl "--ssl-ca=$tmp/certs/ca.crt" --ssl-verify-server-cert)
  else
    my_conn+=(-P "${proxy_port[$1@my]}" --skip-ssl)
  fi
}

# A superuser query over the server's Unix socket (setup and checks, never measured).
admin_sql() {
  "$keyhole_psql" -X -q -At -v ON_ERROR_STOP=1 -h "$tmp/run" -p "$pg_port" -U postgres -d "${admin_db:-postgres}" "$@"
}

# The number of server connections of role bench (-1 when the query fails).
bench_backends() {
  admin_sql -c "select count(*) from pg_stat_activity where usename = 'bench'" 2>/dev/null ||
    echo -1
}

# The MariaDB administrator over its Unix socket (unix_socket authentication).
my_admin() {
  mariadb --no-defaults --batch --skip-column-names --socket="$tmp/mariadb/mysqld.sock" \
    -u "$(id -un)" "$@"
}

# --- the proxies -----------------------------------------------------------------
# proxy_command INSTANCE: the command line of a proxy (in the array cmd). It runs as the
# servers' user, or as the caller when proxy_as_caller is 1 (sshd: as root).
proxy_as_caller=0
proxy_command() {
  local name=${1%@*} server=${1#*@} port=${proxy_port[$1]} up var scheme=postgres target
  up=${upstream_port[$server]:-}
  proxy_as_caller=0
  case $name in
  keyhole | keyhole-portable)
    # (keyhole portable: the same, from its own build; the main table's servers only)
    cmd=(env)
    # Only the flags configure it: no KEYHOLE_* variable from the caller's shell, and
    # none of the caller's proxy settings (ALL_PROXY would be a hop for every target,
    # and the fake Cloud SQL API on loopback is reached without an HTTP proxy).
    while IFS= read -r var; do cmd+=(-u "$var"); done < <(keyhole_env_names '^KEYHOLE_')
    for var in http_proxy https_proxy all_proxy no_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY NO_PROXY; do
      cmd+=(-u "$var")
    done
    [[ $server == my ]] && scheme=mysql
    case $server in
    cs | csl)
      # The connector: the instance as the target, the fake's API, any token.
      cmd+=("$tmp/bin/keyhole" --port "$port" --max-connections 0 --token bench-admin-token
        --sqladmin-api-endpoint "$cs_api" "${keyhole_flags[@]}")
      [[ $server == csl ]] && cmd+=(--lazy-refresh)
      cmd+=("$cs_instance")
      ;;
    *)
      cmd+=("$tmp/bin/$name" --port "$port" --max-connections 0 --ca-file "$tmp/certs/ca.crt"
        "${keyhole_flags[@]}")
      # The via= group: the same target, through a hop (vtun: direct, to ssh -L).
      target="$scheme://127.0.0.1:$up?server-name=localhost"
      case $server in
      vssh)
        cmd+=(--ssh-config "$via_dir/ssh_config")
        target+="&via=ssh://bastion"
        ;;
      vsocks) target+="&via=socks5://127.0.0.1:${proxy_port[microsocks@via]}" ;;
      vhttp) target+="&via=http://127.0.0.1:${proxy_port[tinyproxy@via]}" ;;
      esac
      cmd+=("$target")
      ;;
    esac
    ;;
  keyhole-pool)
    # keyhole as above, logging in itself (user= and password-file=) and keeping the
    # server connections (pool=session, pool-size as pgbouncer's default_pool_size),
    # with /metrics for check_path (keyhole_pool_reused_total).
    cmd=(env)
    while IFS= read -r var; do cmd+=(-u "$var"); done < <(keyhole_env_names '^KEYHOLE_')
    for var in http_proxy https_proxy all_proxy no_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY NO_PROXY; do
      cmd+=(-u "$var")
    done
    cmd+=("$tmp/bin/keyhole" --port "$port" --max-connections 0 --ca-file "$tmp/certs/ca.crt"
      --http-port "${http_port[$1]}" --prometheus "${keyhole_flags[@]}")
    target="postgres://127.0.0.1:$up?server-name=localhost&user=bench&password-file=$tmp/keyhole-pool.password"
    cmd+=("$target&pool=session&pool-size=$(pool_size_of "$server")")
    ;;
  sshd)
    cmd=("$sshd_bin" -D -e -f "$via_dir/sshd_config")
    proxy_as_caller=1
    ;;
  ssh)
    # What a developer opens by hand (plus: fail when the port cannot be forwarded).
    cmd=("$ssh_bin" -F "$via_dir/ssh_config" -N -o ExitOnForwardFailure=yes
      -L "$port:127.0.0.1:$pg_port" bastion)
    ;;
  microsocks) cmd=("$microsocks_bin" -i 127.0.0.1 -p "$port") ;;
  tinyproxy) cmd=("$tinyproxy_bin" -d -c "$via_dir/tinyproxy.conf") ;;
  pgbouncer) cmd=("$pgbouncer_bin" "$tmp/pgbouncer.$server.conf") ;;
  stunnel) cmd=("$stunnel_bin" "$tmp/stunnel.$server.conf") ;;
  goproxy)
    cmd=("$tmp/bin/goproxy" -listen "127.0.0.1:$port" -upstream "127.0.0.1:$up"
      -ca "$tmp/certs/ca.crt" -sni localhost)
    ;;
  esac
}

write_proxy_config() {
  local name=${1%@*} server=${1#*@} port=${proxy_port[$1]} up conns
  up=${upstream_port[$server]}
  conns=$idle_conns
  [[ $server == syn ]] && conns=$idle_large
  case $name in
  keyhole-pool)
    # The password keyhole logs in with (the file's text without its final newline),
    # readable by keyhole's user alone; and the port of its /metrics.
    (umask 077 && printf 'bench\n' >"$tmp/keyhole-pool.password")
    ((EUID != 0)) || chown "$keyhole_pg_user:" "$tmp/keyhole-pool.password"
    [[ -n ${http_port[$1]:-} ]] || http_port[$1]=$(new_port) || keyhole_die "no free port found"
    ;;
  pgbouncer)
    printf '"bench" "bench"\n' >"$tmp/pgbouncer.users"
    cat >"$tmp/pgbouncer.$server.conf" <<EOF
[databases]
bench = host=127.0.0.1 port=$up dbname=bench
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = $port
unix_socket_dir =
auth_type = trust
auth_file = $tmp/pgbouncer.users
pool_mode = session
max_client_conn = $((conns + 100))
default_pool_size = $(pool_size_of "$server")
server_tls_sslmode = verify-full
server_tls_ca_file = $tmp/certs/ca.crt
EOF
    ;;
  stunnel)
    if [[ $server == cs ]]; then
      # TLS 1.3 from the first byte to the fake server-side proxy, with the client
      # certificate the fake signed for an RSA-2048 key (as keyhole's), checked as
      # keyhole checks it: the chain to the instance's server CA, the CN.
      cat >"$tmp/stunnel.$server.conf" <<EOF
foreground = yes
syslog = no
pid =
[cs]
client = yes
accept = 127.0.0.1:$port
connect = $cs_proxy
cert = $tmp/cloudsql/client.crt
key = $tmp/cloudsql/client.key
CAfile = $tmp/cloudsql/server-ca.crt
verifyChain = yes
checkHost = $cs_cn
sslVersionMin = TLSv1.3
EOF
      return 0
    fi
    cat >"$tmp/stunnel.$server.conf" <<EOF
foreground = yes
syslog = no
pid =
[pg]
client = yes
accept = 127.0.0.1:$port
connect = 127.0.0.1:$up
protocol = pgsql
CAfile = $tmp/certs/ca.crt
verifyChain = yes
checkHost = localhost
EOF
    ;;
  esac
}

# start_proxy INSTANCE: start it (logging to $tmp/NAME.SERVER.<start>.log) and wait
# until it listens.
declare -A proxy_starts=()
start_proxy() {
  local inst=$1 port=${proxy_port[$1]} pid log why
  proxy_command "$inst"
  proxy_starts[$inst]=$((${proxy_starts[$inst]:-0} + 1))
  log=$tmp/${inst%@*}.${inst#*@}.${proxy_starts[$inst]}.log
  # A session of its own, so a Ctrl-C reaches only this script, whose trap then stops
  # everything in order.
  if ((proxy_as_caller)); then
    (cd "$tmp" && exec setsid "${cmd[@]}") >"$log" 2>&1 </dev/null &
  else
    keyhole_pg_exec setsid "${cmd[@]}" >"$log" 2>&1 </dev/null &
  fi
  pid=$!
  proxy_pid[$inst]=$pid
  if why=$(keyhole_wait_listening "$port" "$pid" "$inst"); then
    # setsid forks only when it leads a process group already; find the program.
    if [[ $(readlink "/proc/$pid/exe" 2>/dev/null) == */setsid ]]; then
      pid=$(pgrep -P "$pid" | head -n 1)
      proxy_pid[$inst]=$pid
    fi
    return 0
  fi
  if kill -0 "$pid" 2>/dev/null; then
    keyhole_warn "$why"
  else
    wait "$pid" 2>/dev/null || true
    proxy_pid[$inst]=""
    keyhole_warn "$why; its log:"
    sed 's/^/  /' "$log" | tail -n 20 >&2
  fi
  return 1
}

stop_proxy() {
  keyhole_stop_pid "${proxy_pid[$1]:-}"
  proxy_pid[$1]=""
}

# http_metric INSTANCE NAME [LABEL]: the sum of the samples of metric NAME (those whose
# labels include LABEL, e.g. state="idle") on the instance's /metrics; fails when
# /metrics does not answer.
http_metric() {
  local text
  # (python3, which the report needs anyway; no HTTP proxy of the caller's in between)
  text=$(python3 -c 'import sys, urllib.request as u
sys.stdout.write(u.build_opener(u.ProxyHandler({})).open(sys.argv[1], timeout=5).read().decode())' \
    "http://127.0.0.1:${http_port[$1]}/metrics" 2>/dev/null) || return 1
  awk -v n="$2" -v l="${3:-}" '(index($0, n " ") == 1 || index($0, n "{") == 1) && index($0, l) { sum += $NF }
    END { printf "%d\n", sum }' <<<"$text"
}

# check_pooled PATH: keyhole pool=session reuses server connections: once the first
# connection (check_path's) is back in the pool, a second one is handed it, and
# keyhole_pool_reused_total on its /metrics is above 0.
check_pooled() {
  local inst=$1@pg out i idle="" reused opened
  for ((i = 0; i < 50; i++)); do
    idle=$(http_metric "$inst" keyhole_pool_connections 'state="idle"') && ((idle > 0)) && break
    sleep 0.1
  done
  if [[ -z $idle ]]; then
    printf 'its /metrics (127.0.0.1:%s, --prometheus) does not answer' "${http_port[$inst]}"
    return 1
  fi
  path_env "$1"
  if ! out=$(env "${conn_env[@]}" "$keyhole_psql" -X -At -v ON_ERROR_STOP=1 -c "select 1" 2>&1); then
    printf 'the second connection failed: %s' "$(printf '%s\n' "$out" | head -n 3 | tr '\n' ' ')"
    return 1
  fi
  reused=$(http_metric "$inst" keyhole_pool_reused_total) || reused=0
  opened=$(http_metric "$inst" keyhole_pool_opened_total) || opened="?"
  if ((reused == 0)); then
    printf 'not pooled: keyhole_pool_reused_total is 0 after two connections (keyhole_pool_opened_total %s; idle in the pool after the first: %s)' \
      "$opened" "$idle"
    return 1
  fi
}

# check_path PATH SERVER: one connection, which must reach the server over TLS; through
# keyhole pool=session, also a second one, which must reuse the first one's server
# connection (check_pooled).
check_path() {
  local out
  case $2 in
  pg | lat | vssh | vtun | vsocks | vhttp)
    # (the relay's and the via= group's instances: PostgreSQL through a hop)
    if [[ $2 == pg ]]; then path_env "$1"; else path_env "$1@$2"; fi
    if ! out=$(env "${conn_env[@]}" "$keyhole_psql" -X -At -v ON_ERROR_STOP=1 \
      -c "select ssl from pg_stat_ssl where pid = pg_backend_pid()" 2>&1); then
      printf '%s\n' "$out" | head -n 3 | tr '\n' ' '
      return 1
    fi
    if [[ $out != t ]]; then
      printf 'the server did not see TLS (pg_stat_ssl.ssl = %s)' "$out"
      return 1
    fi
    [[ $1 != keyhole-pool ]] || check_pooled "$1" || return 1
    ;;
  syn)
    # The synthetic upstream speaks TLS only: a stream that arrives went through TLS.
    syn_args "$1"
    if ! out=$("$tmp/bin/synthetic" stream "${syn_conn[@]}" --bytes 100000 2>&1); then
      printf '%s\n' "$out" | head -n 3 | tr '\n' ' '
      return 1
    fi
    ;;
  my)
    my_args "$1"
    if ! out=$(MYSQL_PWD=bench mariadb "${my_conn[@]}" --batch --skip-column-names \
      -e "select variable_value from information_schema.session_status where variable_name = 'Ssl_cipher'" 2>&1); then
      printf '%s\n' "$out" | head -n 3 | tr '\n' ' '
      return 1
    fi
    if [[ -z $out ]]; then
      printf 'the server did not see TLS (no Ssl_cipher)'
      return 1
    fi
    ;;
  cs | csl)
    # Through the fake Cloud SQL instance: its proxy is the only one that comes in
    # over PostgreSQL's Unix socket as bench (no server address there).
    path_env "$1@$2"
    if ! out=$(env "${conn_env[@]}" "$keyhole_psql" -X -At -v ON_ERROR_STOP=1 \
      -c "select coalesce(inet_server_addr()::text, 'unix socket')" 2>&1); then
      printf '%s\n' "$out" | head -n 3 | tr '\n' ' '
      return 1
    fi
    if [[ $out != 'unix socket' ]]; then
      printf 'the session did not come through the fake proxy (server address %s)' "$out"
      return 1
    fi
    ;;
  esac
}

# usable PATH SERVER: the path can run against that server now.
usable() {
  case $2 in
  syn) [[ -n $syn_pid ]] || return 1 ;;
  my) [[ -n $my_pid ]] || return 1 ;;
  lat) [[ -n $relay_pid ]] || return 1 ;;
  esac
  [[ $1 == direct ]] || [[ -z ${skip_note[$1]:-} && -n ${proxy_pid[$1@$2]:-} ]]
}

# servers_of PATH: the servers a path is measured against in the main table (without
# it: PostgreSQL alone, for the other groups' baseline).
servers_of() {
  if ((!run_main)); then
    printf 'pg'
    return 0
  fi
  case $1 in
  direct | keyhole | keyhole-portable) printf 'pg syn my' ;;
  keyhole-pool) printf 'pg' ;;
  *) printf 'pg syn' ;;
  esac
}

# proxy_servers PATH: the servers the path's proxy is started for: those of the main
# table (without it, keyhole's PostgreSQL only, the other groups' baseline), and the
# latency relay when the latency group runs (but for keyhole pool=session and keyhole
# portable, columns of the main table only).
proxy_servers() {
  local list=""
  if ((run_main)) || [[ $1 == keyhole ]]; then list=$(servers_of "$1"); fi
  ((!run_latency)) || [[ -n $latency_note || $1 == keyhole-pool || $1 == keyhole-portable ]] ||
    list+=" lat"
  printf '%s' "${list# }"
}

# --- workloads -------------------------------------------------------------------
# pgbench_measure PATH CLIENTS [PGBENCH ARGS...]: one pgbench -S -T DURATION run on PATH
# (direct, a path to PostgreSQL, or a proxy instance such as keyhole@cs). Sets pb_tps,
# pb_lat (ms), pb_txs and pb_cpu (the proxy's CPU seconds; empty for direct); when it
# fails, pb_err says why and the status is 1.
pgbench_measure() {
  local path=$1 clients=$2 threads=2 log=$tmp/pgbench.log ok=0
  shift 2
  pb_tps="" pb_lat="" pb_txs=0 pb_cpu="" pb_err=""
  ((clients >= threads)) || threads=$clients
  path_env "$path"
  printf '\n### %s: pgbench -c %s %s\n' "$path" "$clients" "$*" >>"$log"
  if [[ $path == *@* ]]; then cpu_start "$path"; else cpu_start "$path" pg; fi
  env "${conn_env[@]}" pgbench -n -S -c "$clients" -j "$threads" -T "$duration" "$@" \
    >"$tmp/pgbench.out" 2>&1 && ok=1
  pb_cpu=$(cpu_seconds)
  cat "$tmp/pgbench.out" >>"$log"
  if ((ok)); then
    pb_tps=$(sed -n 's/^tps = \([0-9.]*\).*/\1/p' "$tmp/pgbench.out" | head -n 1)
    pb_lat=$(sed -n 's/^latency average = \([0-9.]*\) ms.*/\1/p' "$tmp/pgbench.out" | head -n 1)
    pb_txs=$(sed -n 's/^number of transactions actually processed: \([0-9]*\).*/\1/p' "$tmp/pgbench.out")
    pb_txs=${pb_txs:-0}
    [[ -z $pb_tps ]] || return 0
  fi
  pb_err="pgbench failed: $(grep -m1 -iE 'error|fatal' "$tmp/pgbench.out" | cut -c1-200)"
  return 1
}

# run_pgbench PATH CLIENTS METRIC [PGBENCH ARGS...]: TPS (METRIC), latency in ms
# (lat_ of it) and, for a proxy, its CPU microseconds per transaction (cpu_ of it).
run_pgbench() {
  local path=$1 clients=$2 metric=$3 us
  shift 3
  if ! pgbench_measure "$path" "$clients" "$@"; then
    record_fail "$path" "$metric" "$pb_err"
    return 0
  fi
  record "$path" "$metric" "$pb_tps"
  [[ -z $pb_lat ]] || record "$path" "lat_$metric" "$pb_lat"
  if [[ -n $pb_cpu ]] && ((pb_txs > 0)); then
    us=$(calc "$pb_cpu * 1000000 / $pb_txs")
    record "$path" "cpu_$metric" "$us"
    printf '  %-10s %10.0f tps  %8.3f ms   proxy CPU %.0f us/transaction\n' "$path" "$pb_tps" "${pb_lat:-0}" "$us"
  else
    printf '  %-10s %10.0f tps  %8.3f ms\n' "$path" "$pb_tps" "${pb_lat:-0}"
  fi
}

# finish_bulk PATH SERVER METRIC BYTES T0 T1: MB/s (METRIC_mbs) and, for a proxy, its
# CPU seconds per GB (METRIC_cpu).
finish_bulk() {
  local path=$1 metric=$3 bytes=$4 secs mbs cpu per
  secs=$(calc "$6 - $5")
  mbs=$(calc "$bytes / 1000000 / $secs")
  record "$path" "${metric}_mbs" "$mbs"
  cpu=$(cpu_seconds)
  if [[ -n $cpu ]]; then
    per=$(calc "$cpu / ($bytes / 1000000000)")
    record "$path" "${metric}_cpu" "$per"
    printf '  %-10s %7.2f s %8.0f MB/s   proxy CPU %.2f s/GB\n' "$path" "$secs" "$mbs" "$per"
  else
    printf '  %-10s %7.2f s %8.0f MB/s\n' "$path" "$secs" "$mbs"
  fi
}

run_copy_out() {
  local path=$1 t0 t1
  path_env "$path"
  cpu_start "$path" pg
  t0=$EPOCHREALTIME
  if ! env "${conn_env[@]}" "$keyhole_psql" -X -q -v ON_ERROR_STOP=1 -c "$copy_sql" \
    >/dev/null 2>"$tmp/copy.err"; then
    record_fail "$path" copy_out_mbs "psql COPY out failed: $(head -n 1 "$tmp/copy.err" | cut -c1-200)"
    return 0
  fi
  t1=$EPOCHREALTIME
  finish_bulk "$path" pg copy_out "$copy_bytes" "$t0" "$t1"
}

# The rows COPY in loads: the same as COPY out sends.
copy_in_rows() {
  local row
  row=$(printf '%1000s' '' | tr ' ' 'x')
  # yes ends on SIGPIPE when head has enough: not a failure.
  { yes "$row" || true; } | head -n "$copy_rows"
}

run_copy_in() {
  local path=$1 t0 t1
  admin_db=bench admin_sql -c "truncate copy_in" -c "checkpoint" >/dev/null
  path_env "$path"
  cpu_start "$path" pg
  t0=$EPOCHREALTIME
  if ! copy_in_rows | env "${conn_env[@]}" "$keyhole_psql" -X -q -v ON_ERROR_STOP=1 \
    -c "COPY copy_in FROM STDIN" >/dev/null 2>"$tmp/copy.err"; then
    record_fail "$path" copy_in_mbs "psql COPY in failed: $(head -n 1 "$tmp/copy.err" | cut -c1-200)"
    return 0
  fi
  t1=$EPOCHREALTIME
  finish_bulk "$path" pg copy_in "$copy_bytes" "$t0" "$t1"
}

run_stream() {
  local path=$1 out bytes secs
  syn_args "$path"
  cpu_start "$path" syn
  if ! out=$("$tmp/bin/synthetic" stream "${syn_conn[@]}" --bytes "$stream_bytes" 2>"$tmp/stream.err"); then
    record_fail "$path" syn_mbs "synthetic stream failed: $(tail -n 1 "$tmp/stream.err" | cut -c1-200)"
    return 0
  fi
  read -r _ bytes _ secs <<<"$out"
  finish_bulk "$path" syn syn "$bytes" 0 "$secs"
}

# run_mysql_select PATH THREADS: sysbench oltp_point_select with THREADS threads: TPS
# (my_tps), latency in ms (my_lat) and, for a proxy, its CPU microseconds per query
# (my_cpu); with 1 thread the same names with _t1 after them. oltp_point_select sends
# one query per transaction.
run_mysql_select() {
  local path=$1 threads=$2 tps lat queries cpu us suffix="" ssl=off
  [[ $path == direct ]] && ssl=on
  ((threads != 1)) || suffix=_t1
  cpu_start "$path" my
  printf '\n### %s: sysbench oltp_point_select run --threads=%d\n' "$path" "$threads" >>"$tmp/sysbench.log"
  if sysbench_cmd "$path" --mysql-ssl="$ssl" --threads="$threads" --time="$duration" \
    --report-interval=0 run >"$tmp/sysbench.out" 2>&1; then
    cpu=$(cpu_seconds)
    cat "$tmp/sysbench.out" >>"$tmp/sysbench.log"
    tps=$(sed -n 's/^ *transactions: *[0-9]* *(\([0-9.]*\) per sec.*/\1/p' "$tmp/sysbench.out" | head -n 1)
    lat=$(sed -n 's/^ *avg: *\([0-9.]*\).*/\1/p' "$tmp/sysbench.out" | head -n 1)
    queries=$(sed -n 's/^ *queries: *\([0-9]*\) *(.*/\1/p' "$tmp/sysbench.out" | head -n 1)
    if [[ -n $tps ]]; then
      record "$path" "my_tps$suffix" "$tps"
      [[ -z $lat ]] || record "$path" "my_lat$suffix" "$lat"
      if [[ -n $cpu && -n $queries ]] && ((queries > 0)); then
        us=$(calc "$cpu * 1000000 / $queries")
        record "$path" "my_cpu$suffix" "$us"
        printf '  %-10s %10.0f tps  %8.3f ms   proxy CPU %.0f us/query\n' "$path" "$tps" "${lat:-0}" "$us"
      else
        printf '  %-10s %10.0f tps  %8.3f ms\n' "$path" "$tps" "${lat:-0}"
      fi
      return 0
    fi
  fi
  cat "$tmp/sysbench.out" >>"$tmp/sysbench.log"
  record_fail "$path" "my_tps$suffix" "sysbench failed: $(grep -m1 -iE 'error|fatal' "$tmp/sysbench.out" | cut -c1-200)"
}

run_mysql_bulk() {
  local path=$1 t0 t1
  my_args "$path"
  cpu_start "$path" my
  t0=$EPOCHREALTIME
  if ! MYSQL_PWD=bench mariadb "${my_conn[@]}" --quick --batch --raw --skip-column-names \
    -e "$mysql_bulk_sql" >/dev/null 2>"$tmp/mysql.err"; then
    record_fail "$path" my_bulk_mbs "mariadb bulk read failed: $(head -n 1 "$tmp/mysql.err" | cut -c1-200)"
    return 0
  fi
  t1=$EPOCHREALTIME
  finish_bulk "$path" my my_bulk "$my_bytes" "$t0" "$t1"
}

# sysbench_cmd PATH ARGS...: sysbench oltp_point_select against the path. sysbench
# 1.0 takes its TLS files from fixed names in its working directory (cacert.pem,
# client-cert.pem, client-key.pem), so it runs in $tmp/sysbench.
sysbench_cmd() {
  local path=$1 port
  shift
  if [[ $path == direct ]]; then port=$my_port; else port=${proxy_port[$path@my]}; fi
  (cd "$tmp/sysbench" && sysbench oltp_point_select --db-driver=mysql --mysql-host=127.0.0.1 \
    --mysql-port="$port" --mysql-user=bench --mysql-password=bench --mysql-db=bench \
    --tables=1 --table-size="$mysql_table_size" "$@")
}

# run_idle PATH SERVER COUNT METRIC: the RSS a proxy gains per idle, logged-in
# connection; COUNT connections through it to SERVER (pg: the Python helper, which
# logs in with md5; syn: `synthetic idle`).
run_idle() {
  local path=$1 server=$2 count=$3 metric=$4 inst=$1@$2 pid rss0 rss1 i before after limit per t0 t1 t2 phases
  # A fresh process, so that what earlier workloads left in its allocator does not
  # hide or inflate the growth; one connection first, for one-time setup costs.
  stop_proxy "$inst"
  start_proxy "$inst" || {
    record_fail "$path" "$metric" "could not restart $inst"
    return 0
  }
  check_path "$path" "$server" >/dev/null || true
  sleep 0.5
  pid=${proxy_pid[$inst]}
  rss0=$(rss_kib "$pid")
  # pgbouncer's pool holds server connections too: count the growth.
  before=$(server_conns "$server")
  : >"$tmp/idle.out"
  if [[ $server == pg ]]; then
    python3 "$tmp/idle_conns.py" 127.0.0.1 "${proxy_port[$inst]}" bench bench bench "$count" \
      >"$tmp/idle.out" 2>"$tmp/idle.err" &
  else
    "$tmp/bin/synthetic" idle --connect "127.0.0.1:${proxy_port[$inst]}" --count "$count" \
      >"$tmp/idle.out" 2>"$tmp/idle.err" <&"$hold_fd" &
  fi
  helper_pid=$!
  t0=$EPOCHREALTIME
  limit=$((600 + count / 2))
  for ((i = 0; i < limit; i++)); do
    grep -q '^ready' "$tmp/idle.out" && break
    kill -0 "$helper_pid" 2>/dev/null || break
    sleep 0.2
  done
  t1=$EPOCHREALTIME
  if grep -q '^ready' "$tmp/idle.out"; then
    record "$path" "open_$server" "$(calc "$t1 - $t0")"
    sleep 1
    if ! kill -0 "$pid" 2>/dev/null; then
      record_fail "$path" "$metric" "$inst exited while holding $count connections"
    else
      rss1=$(rss_kib "$pid")
      after=$(($(server_conns "$server") - before))
      per=$(calc "($rss1 - $rss0) / $count")
      record "$path" "$metric" "$per"
      printf '  %-10s %8.1f KiB per connection (VmRSS %d -> %d KiB; %d new server connections; opened in %.1f s)\n' \
        "$path" "$per" "$rss0" "$rss1" "$after" "$(calc "$t1 - $t0")"
      # (pgbouncer hands the warm-up connection's server connection to one of them)
      ((after >= count - 1)) ||
        keyhole_warn "$path: only $after new server connections for $count clients"
    fi
  else
    record_fail "$path" "$metric" "$count idle connections failed: $(tail -n 1 "$tmp/idle.err" | cut -c1-200)"
  fi
  t2=$EPOCHREALTIME
  keyhole_stop_pid "$helper_pid"
  helper_pid=""
  cat "$tmp/idle.err" >>"$tmp/idle_conns.log"
  phases="client gone $(printf '%.1f s' "$(calc "$EPOCHREALTIME - $t2")")"
  # Let the proxy finish closing those connections: stopping it now would cut them.
  for ((i = 0; i < 300; i++)); do
    (($(open_sockets "${proxy_port[$inst]}") == 0)) && break
    sleep 0.1
  done
  phases+=", proxy drained $(printf '%.1f s' "$(calc "$EPOCHREALTIME - $t2")")"
  # And a fresh one again: pgbouncer keeps its server connections pooled otherwise.
  stop_proxy "$inst"
  start_proxy "$inst" || {
    keyhole_warn "could not restart $inst; it is left out from here on"
    late_note[$path]="$inst could not be restarted in round $round; later rounds lack it"
  }
  phases+=", restarted $(printf '%.1f s' "$(calc "$EPOCHREALTIME - $t2")")"
  for ((i = 0; i < 300; i++)); do
    (($(server_conns "$server") <= before)) && break
    sleep 0.1
  done
  printf '  %-10s (released: %s, server drained %.1f s)\n' "" "$phases" "$(calc "$EPOCHREALTIME - $t2")"
}

# --- the Cloud SQL workloads -----------------------------------------------------
# Their columns, KEY (as in the report) and how it is reached; cs_keys holds those that
# run, in this order (set in the "Cloud SQL" step):
#   direct@pg     libpq straight to PostgreSQL over TLS (verify-full)
#   keyhole@pg    keyhole with its ordinary postgres:// target: the baseline of the ratios
#   keyhole       keyhole's connector, refresh-ahead (keyhole@cs), through the fake
#   keyhole-lazy  keyhole's connector with --lazy-refresh (keyhole@csl), through the fake
#   stunnel       stunnel with a client certificate (stunnel@cs), through the fake
declare -A cs_inst=([direct@pg]=direct [keyhole@pg]=keyhole@pg [keyhole]=keyhole@cs
  [keyhole-lazy]=keyhole@csl [stunnel]=stunnel@cs)
cs_keys=()
cs_notes=()
readonly cs_clients=8
cs_api="" cs_instance="" cs_proxy="" cs_cn=""

# cs_calls: the SQL Admin API requests the fake has answered so far.
cs_calls() {
  local n
  n=$(grep -c '^call ' "$tmp/cloudsql_fake.out.log" 2>/dev/null) || true
  printf '%d\n' "${n:-0}"
}

# cs_pgbench KEY CLIENTS NAME [PGBENCH ARGS...]: pgbench -S through the column KEY,
# recorded under cloudsql/KEY: cs_tps_NAME, cs_cpu_NAME (the proxy's CPU microseconds
# per transaction: under -C, per connection), and through the fake cs_fake_NAME (the
# fake's CPU microseconds per transaction) and cs_api_NAME (API requests during the
# run). Through the fake, one connection comes first, so that a --lazy-refresh keyhole
# has its certificate as a refresh-ahead one has: both then use a cached one.
cs_pgbench() {
  local key=$1 clients=$2 name=$3 inst=${cs_inst[$1]} why f0="" f1 calls=0 us line per=transaction
  shift 3
  [[ $name != c ]] || per=connection
  if [[ $inst == *@cs || $inst == *@csl ]]; then
    if ! why=$(check_path "${inst%@*}" "${inst#*@}"); then
      record_fail "cloudsql/$key" "cs_tps_$name" "the warm-up connection failed: $why"
      return 0
    fi
    f0=$(cpu_ticks "$cs_pid") || f0=""
    calls=$(cs_calls)
  fi
  if ! pgbench_measure "$inst" "$clients" "$@"; then
    record_fail "cloudsql/$key" "cs_tps_$name" "$pb_err"
    return 0
  fi
  record "cloudsql/$key" "cs_tps_$name" "$pb_tps"
  line=$(printf '  %-13s %10.0f tps' "$key" "$pb_tps")
  if [[ -n $pb_cpu ]] && ((pb_txs > 0)); then
    us=$(calc "$pb_cpu * 1000000 / $pb_txs")
    record "cloudsql/$key" "cs_cpu_$name" "$us"
    line+=$(printf '   proxy CPU %.1f us/%s' "$us" "$per")
  fi
  if [[ -n $f0 ]] && f1=$(cpu_ticks "$cs_pid") && ((pb_txs > 0)); then
    us=$(calc "($f1 - $f0) / $clk_tck * 1000000 / $pb_txs")
    record "cloudsql/$key" "cs_fake_$name" "$us"
    calls=$(($(cs_calls) - calls))
    record "cloudsql/$key" "cs_api_$name" "$calls"
    line+=$(printf '   fake CPU %.1f us/%s   %d API requests' "$us" "$per" "$calls")
  fi
  printf '%s\n' "$line"
}

# cs_first KEY: the first connection through the column KEY: a freshly started process
# (none for direct@pg), listening and given a moment (0.5 s; a refresh-ahead keyhole
# also until its log says its first certificate is in), then one psql -c 'select 1';
# its wall time in ms (cs_first).
cs_first() {
  local key=$1 inst=${cs_inst[$1]} log i t0 t1 ms
  if [[ $inst != direct ]]; then
    stop_proxy "$inst"
    if ! start_proxy "$inst"; then
      record_fail "cloudsql/$key" cs_first "$inst could not be restarted"
      late_note[${inst%@*}]="${late_note[${inst%@*}]:+${late_note[${inst%@*}]}; }$inst could not be restarted in round $round"
      return 0
    fi
    sleep 0.5
    if [[ $inst == keyhole@cs ]]; then
      log=$tmp/keyhole.cs.${proxy_starts[$inst]}.log
      for ((i = 0; i < 300; i++)); do
        grep -q 'Cloud SQL client certificate refreshed' "$log" && break
        sleep 0.1
      done
      if ! grep -q 'Cloud SQL client certificate refreshed' "$log"; then
        record_fail "cloudsql/$key" cs_first "no certificate within 30 s of the start"
        return 0
      fi
    fi
  fi
  path_env "$inst"
  t0=$EPOCHREALTIME
  if ! env "${conn_env[@]}" "$keyhole_psql" -X -q -At -c 'select 1' >"$tmp/first.out" 2>&1; then
    record_fail "cloudsql/$key" cs_first "psql failed: $(head -n 1 "$tmp/first.out" | cut -c1-200)"
    return 0
  fi
  t1=$EPOCHREALTIME
  ms=$(calc "($t1 - $t0) * 1000")
  record "cloudsql/$key" cs_first "$ms"
  printf '  %-13s %8.1f ms\n' "$key" "$ms"
}

# cs_round: the Cloud SQL workloads of a round, the columns in an order that rotates.
cs_round() {
  local order=() key i n=${#cs_keys[@]} run
  for ((i = 0; i < n; i++)); do
    order+=("${cs_keys[$(((i + round - 1) % n))]}")
  done
  step "round $round/$rounds: Cloud SQL, pgbench -S -c $cs_clients -T $duration"
  for key in "${order[@]}"; do
    # (--lazy-refresh changes when certificates are fetched, not the data path)
    [[ $key == keyhole-lazy ]] || cs_pgbench "$key" "$cs_clients" s8
  done
  step "round $round/$rounds: Cloud SQL, connection per transaction, pgbench -S -C -c $conn_clients -T $duration"
  for key in "${order[@]}"; do
    cs_pgbench "$key" "$conn_clients" c -C
  done
  step "round $round/$rounds: Cloud SQL, first connection through a fresh process, $first_runs runs each"
  for ((run = 1; run <= first_runs; run++)); do
    for key in "${order[@]}"; do
      [[ $key == stunnel ]] || cs_first "$key"
    done
  done
}

# --- the via= workloads ----------------------------------------------------------
# Their columns, KEY (as in the report): the keyhole instance pgbench goes through, the
# hop's processes (whose CPU is the hop's), in this order:
#   keyhole   keyhole@pg, keyhole direct as in the main table: the baseline of the ratios
#   ssh       keyhole@vssh: via=ssh://bastion with --ssh-config; its ssh master (a child
#             of keyhole) logs in to sshd@via
#   ssh-L     keyhole@vtun: keyhole direct to the port of ssh@vtun, an ssh -N -L to
#             sshd@via: what ssh costs, the reference for via=ssh
#   socks5    keyhole@vsocks: via=socks5:// through microsocks@via
#   http      keyhole@vhttp: via=http:// (CONNECT) through tinyproxy@via
readonly via_all_keys=(keyhole ssh ssh-L socks5 http)
declare -A via_inst=([keyhole]=keyhole@pg [ssh]=keyhole@vssh [ssh-L]=keyhole@vtun
  [socks5]=keyhole@vsocks [http]=keyhole@vhttp)
declare -A via_hop=([ssh]=sshd@via [ssh-L]=sshd@via [socks5]=microsocks@via [http]=tinyproxy@via)
# The command lines of each column (for the report), set in the "via=" step.
declare -A via_cmdline=()
via_keys=()
via_sshd_cmdline=""
via_dir=""
readonly via_clients=8

# shown_command: cmd (from proxy_command) as a command line for the report: without
# the env -u prefix, keyhole by its name, the temporary directory as TMP.
shown_command() {
  local arg out="" i=0 n=${#cmd[@]}
  if [[ ${cmd[0]} == env ]]; then
    i=1
    while ((i + 1 < n)) && [[ ${cmd[i]} == -u ]]; do i=$((i + 2)); done
  fi
  for ((; i < n; i++)); do
    arg=${cmd[i]}
    [[ $arg != "$tmp/bin/keyhole" && $arg != "$tmp/bin/keyhole-portable" ]] || arg=keyhole
    arg=${arg//"$tmp"/TMP}
    if [[ $arg =~ ^[A-Za-z0-9_./:@=,+-]+$ ]]; then out+=" $arg"; else out+=" '$arg'"; fi
  done
  printf '%s' "${out# }"
}

# via_client_pids KEY: the processes on the client's side of a column: keyhole (with
# its ssh master, a child); for ssh-L also the ssh -L process.
via_client_pids() {
  printf '%s\n' "${proxy_pid[${via_inst[$1]}]}"
  [[ $1 != ssh-L ]] || printf '%s\n' "${proxy_pid[ssh@vtun]}"
}

# via_pgbench KEY NAME [PGBENCH ARGS...]: pgbench -S -c 8 -T BENCH_VIA_DURATION through
# the column KEY, recorded under via/KEY: via_tps_NAME, via_lat_NAME (ms), via_cpu_NAME
# (the client side's CPU microseconds per transaction: under -C, per connection) and,
# through a hop, via_hop_NAME (the hop's).
via_pgbench() {
  local key=$1 name=$2 inst=${via_inst[$1]} hop=${via_hop[$1]:-} duration=$via_duration
  local pids c0 c1 h0="" h1 us line per=transaction
  shift 2
  [[ $name != c ]] || per=connection
  mapfile -t pids < <(via_client_pids "$key")
  c0=$(tree_ticks "${pids[@]}")
  [[ -z $hop ]] || h0=$(tree_ticks "${proxy_pid[$hop]}")
  if ! pgbench_measure "$inst" "$via_clients" "$@"; then
    record_fail "via/$key" "via_tps_$name" "$pb_err"
    return 0
  fi
  c1=$(tree_ticks "${pids[@]}")
  [[ -z $hop ]] || h1=$(tree_ticks "${proxy_pid[$hop]}")
  record "via/$key" "via_tps_$name" "$pb_tps"
  [[ -z $pb_lat ]] || record "via/$key" "via_lat_$name" "$pb_lat"
  line=$(printf '  %-8s %10.0f tps  %8.3f ms' "$key" "$pb_tps" "${pb_lat:-0}")
  if ((pb_txs > 0)); then
    us=$(calc "($c1 - $c0) / $clk_tck * 1000000 / $pb_txs")
    record "via/$key" "via_cpu_$name" "$us"
    line+=$(printf '   client CPU %.1f us/%s' "$us" "$per")
    if [[ -n $hop ]]; then
      us=$(calc "($h1 - $h0) / $clk_tck * 1000000 / $pb_txs")
      record "via/$key" "via_hop_$name" "$us"
      line+=$(printf '   hop (%s) CPU %.1f us/%s' "${hop%@*}" "$us" "$per")
    fi
  fi
  printf '%s\n' "$line"
}

# via_round: the via= workloads of a round, the columns in an order that rotates.
via_round() {
  local order=() key i n=${#via_keys[@]}
  for ((i = 0; i < n; i++)); do
    order+=("${via_keys[$(((i + round - 1) % n))]}")
  done
  step "round $round/$rounds: via=, pgbench -S -c $via_clients -T $via_duration"
  for key in "${order[@]}"; do
    via_pgbench "$key" s8
  done
  step "round $round/$rounds: via=, connection per transaction, pgbench -S -C -c $via_clients -T $via_duration"
  for key in "${order[@]}"; do
    via_pgbench "$key" c -C
  done
}

# via_setup_die MESSAGE [INSTANCE...]: the end of a via= setup that failed, with the
# last lines of the instances' logs.
via_setup_die() {
  local msg=$1 inst log
  shift
  for inst in "$@"; do
    log=$tmp/${inst%@*}.${inst#*@}.${proxy_starts[$inst]:-1}.log
    [[ -s $log ]] || continue
    keyhole_log "$inst's log (last lines):" >&2
    tail -n 15 "$log" | cut -c1-400 | sed 's/^/  /' >&2
  done
  keyhole_die "via=: $msg"
}

# --- the latency workloads --------------------------------------------------------
# Every path over the latency relay (the instances PATH@lat; direct@lat is libpq to
# the relay's port), recorded under latency/PATH with the main table's names: tps_sC,
# lat_tps_sC (ms), cpu_tps_sC (the proxy's CPU microseconds per transaction); and, as
# the column loopback, direct without the relay, to show what the relay adds.
# lat_paths: loopback, then the paths whose instance over the relay works (set in the
# "proxies" step).
lat_paths=()
lat_notes=()
relay_port=""
relay_priority=""

# latency_round: the latency workloads of a round, the paths in the round's order,
# then direct without the relay.
latency_round() {
  local c p inst us
  for c in "${latency_clients[@]}"; do
    step "round $round/$rounds: over the latency relay (+$latency_rtt_ms ms per round trip), pgbench -S -c $c -T $duration"
    for p in "${order[@]}" loopback; do
      inst=$p@lat
      if [[ $p == loopback ]]; then
        inst=direct@pg
      elif [[ " ${lat_paths[*]} " != *" $p "* ]] || ! usable "$p" lat; then
        continue
      fi
      if ! pgbench_measure "$inst" "$c"; then
        record_fail "latency/$p" "tps_s$c" "$pb_err"
        continue
      fi
      record "latency/$p" "tps_s$c" "$pb_tps"
      [[ -z $pb_lat ]] || record "latency/$p" "lat_tps_s$c" "$pb_lat"
      if [[ -n $pb_cpu ]] && ((pb_txs > 0)); then
        us=$(calc "$pb_cpu * 1000000 / $pb_txs")
        record "latency/$p" "cpu_tps_s$c" "$us"
        printf '  %-10s %10.0f tps  %8.3f ms   proxy CPU %.0f us/transaction\n' "$p" "$pb_tps" "${pb_lat:-0}" "$us"
      else
        printf '  %-10s %10.0f tps  %8.3f ms%s\n' "$p" "$pb_tps" "${pb_lat:-0}" \
          "$([[ $p != loopback ]] || printf '   (direct, without the relay)')"
      fi
    done
  done
}

# --- MySQL-speaking proxies ----------------------------------------------------------
# The proxies that speak MySQL and can verify the server's certificate, looked up in
# the package lists (apt-cache policy): what each has as its installation candidate.
# None is in Debian 12, so the MySQL rows have direct and keyhole only; the report says
# what was looked for and found (mysql_proxies, mysql_proxies_how).
readonly mysql_proxy_packages=(proxysql mysql-router maxscale mysql-proxy)
declare -A mysql_proxies=()
mysql_proxies_how=""

# probe_mysql_proxies: fills mysql_proxies (PACKAGE: its candidate version, or empty)
# and mysql_proxies_how (how they were looked up, or why they could not be).
probe_mysql_proxies() {
  local pkg candidate lists found=""
  if ! command -v apt-cache >/dev/null 2>&1; then
    mysql_proxies_how="not looked up: no apt-cache on this system"
    return 0
  fi
  lists=$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' 2>/dev/null | wc -l)
  if ((lists == 0)); then
    mysql_proxies_how="not looked up: the package lists are empty (apt-get update has not run)"
    return 0
  fi
  mysql_proxies_how="apt-cache policy, $lists package lists"
  for pkg in "${mysql_proxy_packages[@]}"; do
    candidate=$(apt-cache policy "$pkg" 2>/dev/null | sed -n 's/^ *Candidate: *//p' | head -n 1)
    [[ $candidate != "(none)" ]] || candidate=""
    mysql_proxies[$pkg]=$candidate
    found+=" $pkg ${mysql_proxies[$pkg]:-(no candidate)},"
  done
  keyhole_log "MySQL-speaking proxies in the package lists:${found%,}"
}

# server_conns SERVER: the connections the server holds (PostgreSQL: role bench).
server_conns() {
  case $1 in
  pg) bench_backends ;;
  syn) open_sockets "$syn_port" ;;
  esac
}

# The idle-connection helper for PostgreSQL: opens N connections, logs each in (trust,
# password or md5), runs one query on each, prints "ready N", and holds them until SIGTERM.
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

# --- the report ------------------------------------------------------------------
# scripts/lib/bench_report.py writes it (the markdown, bench.json, bench.png) from the
# samples in $tmp/results and from $tmp/context.json, what this script knows that the
# samples do not say: the settings, the paths and their notes, the servers each path is
# measured against, the versions, the Cloud SQL and via= columns (write_context).

# version_of NAME: the version of a server, client or proxy, one line.
version_of() {
  case $1 in
  postgres) "$keyhole_pgbin/postgres" --version | head -n 1 ;;
  mariadb) "$mariadbd_bin" --version 2>/dev/null | head -n 1 ;;
  mariadb_client) mariadb --version 2>/dev/null | head -n 1 ;;
  sysbench) sysbench --version 2>/dev/null | head -n 1 ;;
  pgbench) pgbench --version | head -n 1 ;;
  pgbouncer) "$pgbouncer_bin" --version 2>&1 | head -n 1 ;;
  stunnel) "$stunnel_bin" -version 2>&1 | grep -m1 -E '^stunnel' ;;
  goproxy) printf 'peers goproxy, %s' "$("$go_bin" version)" ;;
  ssh) "$ssh_bin" -V 2>&1 | head -n 1 ;;
  tinyproxy) "$tinyproxy_bin" -v 2>&1 | head -n 1 ;;
  microsocks)
    # (it has no --version)
    dpkg-query -W -f='${Version}' microsocks 2>/dev/null || printf '?'
    ;;
  keyhole-pool)
    # (the same binary and flags as the keyhole path; its pooled target)
    proxy_command keyhole-pool@pg
    printf '%s; %s' "$(version_of keyhole)" "$(shown_command)"
    ;;
  keyhole | keyhole-portable)
    printf '%s' "$("$tmp/bin/$1" --version 2>/dev/null | head -n 1)"
    if [[ $1 == keyhole && -n ${KEYHOLE_BIN:-} ]]; then
      printf ' (KEYHOLE_BIN)'
    elif [[ $1 == keyhole-portable && -n ${KEYHOLE_PORTABLE_BIN:-} ]]; then
      printf ' (KEYHOLE_PORTABLE_BIN)'
    else
      printf ' (built from %s' "$(git -C "$repo_root" describe --always --dirty 2>/dev/null || echo '?')"
      [[ $1 == keyhole ]] || printf ' with RUSTFLAGS="--cfg keyhole_portable"'
      printf ')'
    fi
    ((${#keyhole_flags[@]} == 0)) || printf ', with %s' "${keyhole_flags[*]}"
    ;;
  esac
}

# json_str TEXT: TEXT as a JSON string (control characters other than newline and tab
# are left out).
json_str() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\t'/\\t}
  s=${s//[[:cntrl:]]/}
  printf '"%s"' "$s"
}

# json_strs TEXT...: a JSON array of strings.
json_strs() {
  local s sep=""
  printf '['
  for s in "$@"; do
    printf '%s%s' "$sep" "$(json_str "$s")"
    sep=", "
  done
  printf ']'
}

# json_map NAME: the associative array NAME as a JSON object of strings.
json_map() {
  local -n json_map_of=$1
  local key sep=""
  printf '{'
  for key in "${!json_map_of[@]}"; do
    printf '%s%s: %s' "$sep" "$(json_str "$key")" "$(json_str "${json_map_of[$key]}")"
    sep=", "
  done
  printf '}'
}

# json_bool N: true unless N is 0 or empty.
json_bool() {
  if [[ ${1:-0} == 0 ]]; then printf false; else printf true; fi
}

# write_context FILE: the context of the report (its keys are the fields of Run,
# CloudSqlGroup and ViaGroup in scripts/lib/bench_report.py).
write_context() {
  local p name mysql=0 list sep probe=(postgres pgbench)
  [[ -z $my_pid ]] || mysql=1
  ((!mysql)) || probe+=(mariadb mariadb_client sysbench)
  for p in "${paths[@]}"; do
    [[ $p == direct || -n ${skip_note[$p]:-} ]] || probe+=("$p")
  done
  ((${#via_keys[@]} == 0)) || probe+=(ssh microsocks tinyproxy)
  {
    printf '{\n  "quick": %s, "only": %s, "main": %s, "mysql": %s,\n' "$(json_bool "$quick")" \
      "$(json_str "$only")" "$(json_bool "$run_main")" "$(json_bool "$mysql")"
    printf '  "rounds": %d, "duration": %d, "pgbench_clients": [%s], "conn_clients": %d, "scale": %d,\n' \
      "$rounds" "$duration" "$(
        IFS=,
        printf '%s' "${pgbench_clients[*]}"
      )" "$conn_clients" "$scale"
    printf '  "copy_bytes": %d, "stream_bytes": %d, "idle_conns": %d, "idle_large": %d,\n' \
      "$copy_bytes" "$stream_bytes" "$idle_conns" "$idle_large"
    printf '  "mysql_threads": [%s], "mysql_table_size": %d, "mysql_bytes": %d, "first_runs": %d,\n' \
      "$(
        IFS=,
        printf '%s' "${mysql_thread_counts[*]}"
      )" "$mysql_table_size" "$my_bytes" "$first_runs"
    printf '  "rounds_seconds": %d, "load_before": %s, "load_after": %s,\n' "$rounds_took" \
      "$(json_str "$load_start")" "$(json_str "$load_end")"
    printf '  "paths": %s, "pool_size": %d,\n  "servers": {' "$(json_strs "${paths[@]}")" "$(pool_size_of pg)"
    sep=""
    for p in "${paths[@]}"; do
      read -r -a list <<<"$(servers_of "$p")"
      printf '%s%s: %s' "$sep" "$(json_str "$p")" "$(json_strs "${list[@]}")"
      sep=", "
    done
    printf '},\n  "skip_notes": %s,\n  "late_notes": %s,\n' "$(json_map skip_note)" "$(json_map late_note)"
    printf '  "mysql_note": %s,\n  "fd_note": %s,\n' "$(json_str "$mysql_note")" "$(json_str "$fd_note")"
    printf '  "mysql_proxies": %s, "mysql_proxies_how": %s,\n' "$(json_map mysql_proxies)" \
      "$(json_str "$mysql_proxies_how")"
    # (probed only with the keyhole-portable path)
    printf '  "kernel_tls": {"available": %s, "probe": %s, "asked": %s},\n' "$(json_str "$ktls_available")" \
      "$(json_str "$ktls_probe")" "$(json_bool "$ktls_asked")"
    # (the versions of what ran; a probe that fails leaves its line empty or partial)
    printf '  "versions": {'
    sep=""
    for name in "${probe[@]}"; do
      printf '%s%s: %s' "$sep" "$(json_str "$name")" "$(json_str "$(version_of "$name")")"
      sep=", "
    done
    printf '},\n'
    printf '  "cloudsql": {"keys": %s, "note": %s, "notes": %s, "clients": %d,\n' \
      "$(json_strs "${cs_keys[@]}")" "$(json_str "$cloudsql_note")" "$(json_strs "${cs_notes[@]}")" \
      "$cs_clients"
    printf '    "instance": %s, "api": %s, "proxy": %s, "cn": %s},\n' "$(json_str "$cs_instance")" \
      "$(json_str "$cs_api")" "$(json_str "$cs_proxy")" "$(json_str "$cs_cn")"
    printf '  "via": {"keys": %s, "note": %s, "clients": %d, "duration": %d, "pg_port": %d,\n' \
      "$(json_strs "${via_keys[@]}")" "$(json_str "$via_note")" "$via_clients" "$via_duration" "$pg_port"
    printf '    "commands": %s,\n    "bastion_command": %s},\n' "$(json_map via_cmdline)" \
      "$(json_str "$via_sshd_cmdline")"
    printf '  "latency": {"keys": %s, "note": %s, "clients": [%s], "delay_ms": %s, "relay_port": %d,\n' \
      "$(json_strs "${lat_paths[@]}")" "$(json_str "$latency_note")" "$(
        IFS=,
        printf '%s' "${latency_clients[*]}"
      )" "$(json_str "$latency_delay_ms")" "${relay_port:-0}"
    printf '    "priority": %s, "notes": %s}\n}\n' "$(json_str "$relay_priority")" "$(json_strs "${lat_notes[@]}")"
  } >"$1"
}

# report_write: the report, on stdout, or into $out_dir (bench.md, bench.json,
# bench.png; then the tables go to stdout).
report_write() {
  local args=(--results "$tmp/results" --context "$tmp/context.json")
  [[ -z $out_dir ]] || args+=(--out "$out_dir")
  write_context "$tmp/context.json"
  python3 "$repo_root/scripts/lib/bench_report.py" "${args[@]}"
}

# =================================================================================
step "system packages"
base_pkgs=(postgresql postgresql-client openssl procps ca-certificates)
((with_mysql)) && base_pkgs+=(mariadb-server mariadb-client)
keyhole_ensure_packages "${base_pkgs[@]}" ||
  keyhole_die "install the missing packages and run again"
bench_pkgs=()
for entry in "${KEYHOLE_BENCH_APT_PACKAGES[@]}"; do
  read -r pkg _ <<<"$entry"
  # Only what the chosen paths and workloads use.
  case $pkg in
  pgbouncer) [[ " ${paths[*]} " == *" pgbouncer "* ]] || continue ;;
  stunnel4) [[ " ${paths[*]} " == *" stunnel "* ]] || continue ;;
  golang-go) [[ " ${paths[*]} " == *" goproxy "* && ($run_main == 1 || $run_latency == 1) ]] || continue ;;
  sysbench) ((with_mysql)) || continue ;;
  gnuplot-nox) ((run_main)) || continue ;;
  openssh-server | openssh-client | microsocks | tinyproxy) [[ -z $via_note ]] || continue ;;
  esac
  bench_pkgs+=("$pkg")
done
keyhole_log "for the benchmark peers, helpers and chart (${bench_pkgs[*]}):"
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
mariadbd_bin=$(command -v mariadbd 2>/dev/null || true)
[[ -n $mariadbd_bin || ! -x /usr/sbin/mariadbd ]] || mariadbd_bin=/usr/sbin/mariadbd
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
# (what is packaged here is what the report says about the MySQL rows' paths)
((!run_main || !with_mysql)) || probe_mysql_proxies
mysql_note=""
if ((!run_main)); then
  mysql_note="MySQL workloads left out (--only $only)"
elif ((!with_mysql)); then
  mysql_note="MySQL workloads left out (BENCH_MYSQL=0)"
elif [[ -z $mariadbd_bin ]] || ! command -v mariadb-install-db >/dev/null 2>&1 ||
  ! command -v mariadb >/dev/null 2>&1; then
  mysql_note="MySQL workloads skipped: MariaDB is not installed (mariadb-server, mariadb-client)"
fi
command -v python3 >/dev/null 2>&1 ||
  keyhole_die "python3 not found: it writes the report (Debian package python3)"
if ((run_main)); then
  command -v gnuplot >/dev/null 2>&1 ||
    keyhole_warn "gnuplot not found: no chart this run (Debian package gnuplot-nox)"
fi
# The via= group's programs. sshd re-executes itself, so by its absolute path.
sshd_bin="" ssh_bin="" ssh_keygen_bin="" microsocks_bin="" tinyproxy_bin=""
if [[ -z $via_note ]]; then
  sshd_bin=$(command -v sshd 2>/dev/null || true)
  [[ -n $sshd_bin || ! -x /usr/sbin/sshd ]] || sshd_bin=/usr/sbin/sshd
  ssh_bin=$(command -v ssh 2>/dev/null || true)
  ssh_keygen_bin=$(command -v ssh-keygen 2>/dev/null || true)
  microsocks_bin=$(command -v microsocks 2>/dev/null || true)
  tinyproxy_bin=$(command -v tinyproxy 2>/dev/null || true)
  [[ -n $tinyproxy_bin || ! -x /usr/sbin/tinyproxy ]] || tinyproxy_bin=/usr/sbin/tinyproxy
  missing=()
  [[ -n $sshd_bin ]] || missing+=("sshd (openssh-server)")
  [[ -n $ssh_bin && -n $ssh_keygen_bin ]] || missing+=("ssh, ssh-keygen (openssh-client)")
  [[ -n $microsocks_bin ]] || missing+=("microsocks (microsocks)")
  [[ -n $tinyproxy_bin ]] || missing+=("tinyproxy (tinyproxy)")
  if ((${#missing[@]} > 0)); then
    via_note="via= workloads skipped: not installed: $(IFS=,; printf '%s' "${missing[*]}" | sed 's/,/, /g')"
    ((!via_required)) || keyhole_die "--only via: $via_note"
    keyhole_warn "$via_note"
  fi
fi

# ulimit: a proxy holds two descriptors per connection (client and server side), the
# synthetic upstream and the idle client one each, and every process a few more.
# Without CAP_SYS_RESOURCE the hard limit cannot be raised: then the large idle count
# is lowered to what fits, and the report says so.
fd_note=""
((run_main)) || idle_large=$idle_conns
need_fds=$((2 * idle_large + 256))
hard_fds=$(ulimit -Hn)
if [[ $hard_fds != unlimited ]] && ((hard_fds < need_fds)); then
  if ulimit -Hn "$need_fds" 2>/dev/null; then
    hard_fds=$need_fds
  else
    fit=$(((hard_fds - 256) / 2 / 100 * 100))
    ((fit >= 100)) || keyhole_die "open files: the hard limit is $hard_fds, too low for the idle-connection workloads"
    fd_note="open files: the hard limit is $hard_fds and cannot be raised here (that needs CAP_SYS_RESOURCE); $idle_large idle connections need $need_fds descriptors in a proxy, so $fit were opened instead"
    keyhole_warn "$fd_note"
    idle_large=$fit
    need_fds=$((2 * idle_large + 256))
  fi
fi
((idle_conns <= idle_large)) || idle_conns=$idle_large
if (($(ulimit -n) < need_fds)); then
  ulimit -n "$need_fds"
fi
keyhole_log "open files limit: $(ulimit -n)"

# =================================================================================
keyhole_release_binary step
# The examples: the synthetic upstream, and the fake Cloud SQL instance when the Cloud
# SQL workloads run; each given binary is taken as it is.
synthetic_bin=${BENCH_SYNTHETIC_BIN:-}
cloudsql_bin=${BENCH_CLOUDSQL_BIN:-}
relay_bin=${BENCH_RELAY_BIN:-}
examples=()
((run_main)) || synthetic_bin=none
[[ -z $latency_note ]] || relay_bin=none
[[ -n $synthetic_bin ]] || examples+=(--example synthetic)
[[ -n $cloudsql_bin || -n $cloudsql_note ]] || examples+=(--example cloudsql_fake)
[[ -n $relay_bin ]] || examples+=(--example latency_relay)
if ((${#examples[@]} > 0)); then
  step "build the examples: cargo build --release ${examples[*]}"
  keyhole_cargo_on_path
  locked=()
  [[ -f Cargo.lock ]] && locked=(--locked)
  cargo build --release "${locked[@]}" "${examples[@]}" ||
    keyhole_die "cargo build --release ${examples[*]} failed"
  target_dir=${CARGO_TARGET_DIR:-target}
  [[ $target_dir == /* ]] || target_dir=$repo_root/$target_dir
  [[ -n $synthetic_bin ]] || synthetic_bin=$target_dir/release/examples/synthetic
  [[ -n $cloudsql_bin || -n $cloudsql_note ]] || cloudsql_bin=$target_dir/release/examples/cloudsql_fake
  [[ -n $relay_bin ]] || relay_bin=$target_dir/release/examples/latency_relay
fi
[[ $synthetic_bin == none || -x $synthetic_bin ]] || keyhole_die "no synthetic binary at $synthetic_bin"
[[ $relay_bin == none || -x $relay_bin ]] || keyhole_die "no latency_relay binary at $relay_bin"
[[ -n $cloudsql_note || -x $cloudsql_bin ]] || keyhole_die "no cloudsql_fake binary at $cloudsql_bin"

# keyhole portable: keyhole built for the data path macOS and Windows get, into a target
# directory of its own (other RUSTFLAGS rebuild every crate: in the shared one, the two
# builds would evict each other), once per run.
portable_bin=""
if [[ " ${paths[*]} " == *" keyhole-portable "* ]]; then
  if [[ -n ${KEYHOLE_PORTABLE_BIN:-} ]]; then
    step "keyhole portable binary (KEYHOLE_PORTABLE_BIN)"
    portable_bin=$KEYHOLE_PORTABLE_BIN
    [[ -x $portable_bin ]] || keyhole_die "no keyhole binary at $portable_bin (KEYHOLE_PORTABLE_BIN)"
  else
    portable_target=${CARGO_TARGET_DIR:-target}
    [[ $portable_target == /* ]] || portable_target=$repo_root/$portable_target
    portable_target+=/portable-release
    step "build keyhole portable: RUSTFLAGS=\"--cfg keyhole_portable\" cargo build --release --bin keyhole"
    keyhole_cargo_on_path
    locked=()
    [[ -f Cargo.lock ]] && locked=(--locked)
    # The caller's flags, and the cfg; cargo takes CARGO_ENCODED_RUSTFLAGS over
    # RUSTFLAGS when both are set.
    if [[ -n ${CARGO_ENCODED_RUSTFLAGS:-} ]]; then
      portable_env=("CARGO_ENCODED_RUSTFLAGS=$CARGO_ENCODED_RUSTFLAGS"$'\x1f--cfg\x1fkeyhole_portable')
    else
      portable_env=("RUSTFLAGS=${RUSTFLAGS:+$RUSTFLAGS }--cfg keyhole_portable")
    fi
    if env "${portable_env[@]}" CARGO_TARGET_DIR="$portable_target" \
      cargo build --release "${locked[@]}" --bin keyhole; then
      portable_bin=$portable_target/release/keyhole
      keyhole_log "keyhole portable: $portable_bin"
    else
      skip_note[keyhole-portable]="skipped: its build failed (RUSTFLAGS=\"--cfg keyhole_portable\" cargo build --release --bin keyhole)"
      keyhole_warn "${skip_note[keyhole-portable]}"
    fi
  fi
fi
# Whether this kernel has kernel TLS (the TLS ULP), the one place where the two keyhole
# builds can part here (every server speaks TLS: splice(2) joins plain legs only), and
# whether keyhole is asked to use it: for the report's line on keyhole portable.
ktls_available="" ktls_probe="" ktls_asked=0
if [[ " ${paths[*]} " == *" keyhole-portable "* ]]; then
  ktls_probe=$(python3 - <<'PY' 2>&1
import socket
listener = socket.socket()
listener.bind(("127.0.0.1", 0))
listener.listen(1)
client = socket.create_connection(listener.getsockname())
server, _ = listener.accept()
try:
    client.setsockopt(socket.IPPROTO_TCP, 31, b"tls")  # TCP_ULP
    print("yes")
except OSError as e:
    print("no: setsockopt TCP_ULP \"tls\" failed: %s" % (e.strerror or e))
PY
  ) || ktls_probe="?: the probe failed: $ktls_probe"
  ktls_available=${ktls_probe%%:*}
  for ((i = 0; i < ${#keyhole_flags[@]}; i++)); do
    case ${keyhole_flags[i]} in
    --kernel-tls=auto) ktls_asked=1 ;;
    --kernel-tls) [[ ${keyhole_flags[i + 1]:-} != auto ]] || ktls_asked=1 ;;
    esac
  done
  keyhole_log "kernel TLS: ${ktls_probe}; asked for in keyhole's flags: $( ((ktls_asked)) && echo yes || echo no)"
fi

# =================================================================================
step "temporary directory, CA and certificates"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/keyhole-bench.XXXXXX")
mkdir "$tmp/bin" "$tmp/results" "$tmp/results/cloudsql" "$tmp/results/via" "$tmp/results/latency" \
  "$tmp/sysbench"
keyhole_pg_prepare "$tmp" "the servers and the proxies (they refuse root)"
install -m 0755 "$keyhole_bin" "$tmp/bin/keyhole"
[[ -z $portable_bin ]] || install -m 0755 "$portable_bin" "$tmp/bin/keyhole-portable"
[[ $synthetic_bin == none ]] || install -m 0755 "$synthetic_bin" "$tmp/bin/synthetic"
[[ $relay_bin == none ]] || install -m 0755 "$relay_bin" "$tmp/bin/latency_relay"
[[ -n $cloudsql_note ]] || install -m 0755 "$cloudsql_bin" "$tmp/bin/cloudsql_fake"
((!run_main)) || write_idle_helper "$tmp/idle_conns.py"
# The idle client holds its connections until its standard input ends: a FIFO this
# script keeps open (and closes when it exits).
mkfifo "$tmp/hold"
exec {hold_fd}<>"$tmp/hold"

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
pg_port=$(new_port) || keyhole_die "no free port found"
upstream_port[pg]=$pg_port
step "TLS-only PostgreSQL on 127.0.0.1:$pg_port (running as $keyhole_pg_user)"
# (the idle workload's connections, and beside them the server connections the pooled
# paths, pgbouncer and keyhole pool=session, keep from their -c 64 runs)
keyhole_pg_start "$pg_port" bench md5 "max_connections = $((idle_conns + 250))" \
  "shared_buffers = 256MB" "synchronous_commit = off" "full_page_writes = off" \
  "log_connections = off" "max_wal_size = 4GB"
admin_sql -c "create role bench login password 'bench'" -c "create database bench owner bench"
why=$(check_path direct pg) || keyhole_die "direct connection (sslmode=verify-full) failed: $why"
keyhole_log "server up: TLS only (hostssl + md5 for role bench), verify-full from libpq works"

step "pgbench -i -s $scale (directly); the COPY in table"
path_env direct
env "${conn_env[@]}" pgbench -i -q -s "$scale" >"$tmp/pgbench-init.log" 2>&1 || {
  cat "$tmp/pgbench-init.log" >&2
  keyhole_die "pgbench -i failed"
}
env "${conn_env[@]}" "$keyhole_psql" -X -q -v ON_ERROR_STOP=1 \
  -c "create unlogged table copy_in (t text)" || keyhole_die "could not create table copy_in"
admin_sql -c "checkpoint"
copy_bytes=0
if ((run_main)); then
  copy_bytes=$(env "${conn_env[@]}" "$keyhole_psql" -X -q -c "$copy_sql" | wc -c)
  ((copy_bytes > 0)) || keyhole_die "COPY out returned nothing"
  keyhole_log "pgbench tables at scale $scale; COPY out and in are $copy_bytes bytes each"
else
  keyhole_log "pgbench tables at scale $scale"
fi

# =================================================================================
syn_port=""
if ((run_main)); then
  syn_port=$(new_port) || keyhole_die "no free port found"
  upstream_port[syn]=$syn_port
  step "synthetic TLS upstream on 127.0.0.1:$syn_port"
  setsid "$tmp/bin/synthetic" upstream --listen "127.0.0.1:$syn_port" \
    --cert "$tmp/certs/server.crt" --key "$tmp/certs/server.key" \
    >"$tmp/synthetic.upstream.log" 2>&1 </dev/null &
  syn_pid=$!
  if ! why=$(keyhole_wait_listening "$syn_port" "$syn_pid" "synthetic upstream"); then
    cat "$tmp/synthetic.upstream.log" >&2
    keyhole_die "$why"
  fi
  why=$(check_path direct syn) || keyhole_die "the synthetic upstream does not stream: $why"
  keyhole_log "synthetic upstream up (pid $syn_pid); a TLS stream from it works"
fi

# =================================================================================
my_port=""
my_bytes=0
if [[ -z $mysql_note ]]; then
  my_port=$(new_port) || keyhole_die "no free port found"
  upstream_port[my]=$my_port
  step "TLS-only MariaDB on 127.0.0.1:$my_port (require_secure_transport=ON)"
  mkdir -p "$tmp/mariadb/data" "$tmp/mariadb/tmp"
  ((EUID != 0)) || chown -R "$keyhole_pg_user:" "$tmp/mariadb"
  # --auth-root-socket-user: the caller administers it over the Unix socket.
  if ! keyhole_as_pg mariadb-install-db --no-defaults --datadir="$tmp/mariadb/data" \
    --tmpdir="$tmp/mariadb/tmp" --auth-root-socket-user="$(id -un)" --skip-test-db \
    --skip-name-resolve >"$tmp/mariadb-install.log" 2>&1; then
    tail -n 20 "$tmp/mariadb-install.log" >&2
    keyhole_die "mariadb-install-db failed"
  fi
  keyhole_pg_exec setsid "$mariadbd_bin" --no-defaults --datadir="$tmp/mariadb/data" \
    --port="$my_port" --bind-address=127.0.0.1 --socket="$tmp/mariadb/mysqld.sock" \
    --pid-file="$tmp/mariadb/mariadbd.pid" --log-error="$tmp/mariadb.log" \
    --tmpdir="$tmp/mariadb/tmp" --skip-name-resolve --max-connections=300 \
    --skip-log-bin --innodb-flush-log-at-trx-commit=0 --innodb-buffer-pool-size=256M \
    --character-set-server=utf8mb4 --ssl-ca="$tmp/certs/ca.crt" \
    --ssl-cert="$tmp/certs/server.crt" --ssl-key="$tmp/certs/server.key" \
    --require-secure-transport=ON >"$tmp/mariadbd.out.log" 2>&1 </dev/null &
  my_pid=$!
  if ! why=$(keyhole_wait_listening "$my_port" "$my_pid" "mariadbd"); then
    tail -n 20 "$tmp/mariadb.log" >&2
    keyhole_die "$why"
  fi
  for ((i = 0; i < 100; i++)); do
    my_admin -e "select 1" >/dev/null 2>&1 && break
    sleep 0.1
  done
  my_admin -e "create database bench; create user bench@'%' identified by 'bench';
    grant all on bench.* to bench@'%'" || keyhole_die "MariaDB setup failed"
  why=$(check_path direct my) || keyhole_die "direct MariaDB connection (verified TLS) failed: $why"
  # sysbench's fixed TLS file names (see sysbench_cmd).
  cp "$tmp/certs/ca.crt" "$tmp/sysbench/cacert.pem"
  cp "$tmp/certs/client.crt" "$tmp/sysbench/client-cert.pem"
  cp "$tmp/certs/client.key" "$tmp/sysbench/client-key.pem"
  if command -v sysbench >/dev/null 2>&1; then
    if ! sysbench_cmd direct --mysql-ssl=on prepare >"$tmp/sysbench.log" 2>&1; then
      tail -n 20 "$tmp/sysbench.log" >&2
      keyhole_die "sysbench prepare failed"
    fi
  else
    mysql_note="MySQL point selects skipped: sysbench is not installed (Debian package sysbench)"
  fi
  my_args direct
  my_bytes=$(MYSQL_PWD=bench mariadb "${my_conn[@]}" --quick --batch --raw --skip-column-names \
    -e "$mysql_bulk_sql" | wc -c)
  ((my_bytes > 0)) || keyhole_die "the MariaDB bulk read returned nothing"
  keyhole_log "MariaDB up: TLS only; sysbench table of $mysql_table_size rows; bulk read is $my_bytes bytes"
fi

# =================================================================================
if [[ -z $latency_note ]]; then
  relay_port=$(new_port) || keyhole_die "no free port found"
  upstream_port[lat]=$relay_port
  step "latency relay on 127.0.0.1:$relay_port to PostgreSQL, $latency_delay_ms ms each way"
  relay_cmd=("$tmp/bin/latency_relay" --listen "127.0.0.1:$relay_port" --upstream "127.0.0.1:$pg_port"
    --delay-ms "$latency_delay_ms")
  # Real-time priority where it may have it (as root): its wake-ups then do not wait
  # behind the machine's other work, so the link's delay is what was asked for. It
  # spends a few percent of a core.
  relay_priority="normal (chrt -f is not allowed here)"
  if command -v chrt >/dev/null 2>&1 && chrt -f 10 true 2>/dev/null; then
    relay_cmd=(chrt -f 10 "${relay_cmd[@]}")
    relay_priority="real-time, SCHED_FIFO 10 (chrt -f 10)"
  fi
  setsid "${relay_cmd[@]}" >"$tmp/latency_relay.lat.log" 2>&1 </dev/null &
  relay_pid=$!
  if ! why=$(keyhole_wait_listening "$relay_port" "$relay_pid" "latency relay"); then
    cat "$tmp/latency_relay.lat.log" >&2
    keyhole_die "$why"
  fi
  why=$(check_path direct lat) || keyhole_die "direct connection through the latency relay failed: $why"
  keyhole_log "latency relay up (pid $relay_pid, priority $relay_priority); verify-full through it works"
fi

# =================================================================================
step "proxies"
for p in "${paths[@]}"; do
  [[ $p == direct || -n ${skip_note[$p]:-} ]] && continue
  for server in $(proxy_servers "$p"); do
    [[ $server == my && -z $my_pid ]] && continue
    inst=$p@$server
    proxy_port[$inst]=$(new_port) || keyhole_die "no free port found"
    write_proxy_config "$inst"
    if ! start_proxy "$inst"; then
      late_note[$p]="${late_note[$p]:+${late_note[$p]}; }$inst did not start"
      [[ $server != lat ]] || lat_notes+=("$p: $inst did not start")
      continue
    fi
    if ! why=$(check_path "$p" "$server"); then
      [[ $server != lat ]] || lat_notes+=("$p: a connection through $inst failed: $why")
      keyhole_warn "$inst: its check failed, it is left out: $why"
      late_note[$p]="${late_note[$p]:+${late_note[$p]}; }$inst: check failed: $why"
      stop_proxy "$inst"
      continue
    fi
    [[ $server != lat ]] || lat_paths+=("$p")
    if [[ $p == keyhole-pool ]]; then
      keyhole_log "$inst on 127.0.0.1:${proxy_port[$inst]} (pid ${proxy_pid[$inst]}, /metrics on 127.0.0.1:${http_port[$inst]}): the server sees TLS; a second connection reused the first one's server connection ($(http_metric "$inst" keyhole_pool_reused_total || echo '?') reused)"
    else
      keyhole_log "$inst on 127.0.0.1:${proxy_port[$inst]} (pid ${proxy_pid[$inst]}): the server sees TLS"
    fi
  done
done
[[ -n $latency_note ]] || lat_paths=(loopback direct "${lat_paths[@]}")
for p in "${paths[@]}"; do
  [[ -n ${skip_note[$p]:-} ]] && keyhole_log "$p: ${skip_note[$p]}"
done

# =================================================================================
if [[ -z $cloudsql_note ]]; then
  step "Cloud SQL: a fake instance in front of PostgreSQL's Unix socket; keyhole's connector"
  # The fake proxy comes in over the Unix socket: bench logs in there with md5, as over
  # TCP. The line goes first, before the socket's trust for the setup.
  keyhole_as_pg sed -i '1i local   bench   bench   md5' "$keyhole_pgdata/pg_hba.conf" ||
    keyhole_die "could not add the Unix-socket line to pg_hba.conf"
  admin_sql -c "select pg_reload_conf()" >/dev/null || keyhole_die "pg_reload_conf failed"
  mkdir "$tmp/cloudsql"
  fake_args=(--socket "$tmp/run/.s.PGSQL.$pg_port" --server-ca-out "$tmp/cloudsql/server-ca.crt")
  with_stunnel=0
  if [[ " ${paths[*]} " == *" stunnel "* && -z ${skip_note[stunnel]:-} ]]; then
    # stunnel's key is RSA-2048, as keyhole's: both sign the same handshake.
    if openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 \
      -out "$tmp/cloudsql/client.key" >/dev/null 2>&1 &&
      openssl pkey -in "$tmp/cloudsql/client.key" -pubout -out "$tmp/cloudsql/client.pub" 2>/dev/null; then
      with_stunnel=1
      fake_args+=(--client-key-pub "$tmp/cloudsql/client.pub" --client-cert-out "$tmp/cloudsql/client.crt")
    else
      cs_notes+=("stunnel through the fake: no client key (openssl genpkey failed)")
    fi
  fi
  ((EUID != 0)) || chown -R "$keyhole_pg_user:" "$tmp/cloudsql"
  # Its standard input is the hold FIFO: it ends with this script.
  keyhole_pg_exec setsid "$tmp/bin/cloudsql_fake" "${fake_args[@]}" \
    >"$tmp/cloudsql_fake.out.log" 2>"$tmp/cloudsql_fake.err.log" <&"$hold_fd" &
  cs_pid=$!
  for ((i = 0; i < 300; i++)); do
    grep -q '^instance ' "$tmp/cloudsql_fake.out.log" && break
    kill -0 "$cs_pid" 2>/dev/null || break
    sleep 0.1
  done
  if ! grep -q '^instance ' "$tmp/cloudsql_fake.out.log"; then
    cat "$tmp/cloudsql_fake.err.log" >&2
    keyhole_die "the fake Cloud SQL instance did not start"
  fi
  if [[ $(readlink "/proc/$cs_pid/exe" 2>/dev/null) == */setsid ]]; then
    cs_pid=$(pgrep -P "$cs_pid" | head -n 1)
  fi
  cs_api=$(sed -n 's/^api //p' "$tmp/cloudsql_fake.out.log")
  cs_proxy=$(sed -n 's/^proxy //p' "$tmp/cloudsql_fake.out.log")
  cs_instance=$(sed -n 's/^instance //p' "$tmp/cloudsql_fake.out.log")
  # The server certificate's CN (internal CA mode): PROJECT:INSTANCE.
  cs_cn=${cs_instance%%:*}:${cs_instance##*:}
  keyhole_log "fake instance $cs_instance (pid $cs_pid): API $cs_api, server-side proxy $cs_proxy"
  upstream_port[cs]=3307
  upstream_port[csl]=3307
  usable keyhole pg || cs_notes+=("keyhole@pg is not running: no baseline for the ratios")
  cs_keys=(direct@pg keyhole@pg keyhole keyhole-lazy)
  for inst in keyhole@cs keyhole@csl stunnel@cs; do
    [[ $inst != stunnel@cs ]] || ((with_stunnel)) || continue
    proxy_port[$inst]=$(new_port) || keyhole_die "no free port found"
    write_proxy_config "$inst"
    if ! start_proxy "$inst"; then
      cs_notes+=("$inst did not start")
      continue
    fi
    if ! why=$(check_path "${inst%@*}" "${inst#*@}"); then
      keyhole_warn "$inst: a connection through it failed: $why"
      cs_notes+=("$inst: a connection through it failed: $why")
      stop_proxy "$inst"
      continue
    fi
    [[ $inst != stunnel@cs ]] || cs_keys+=(stunnel)
    keyhole_log "$inst on 127.0.0.1:${proxy_port[$inst]} (pid ${proxy_pid[$inst]}): through the fake proxy to PostgreSQL's Unix socket"
  done
  keyhole_log "API requests so far: $(cs_calls) (refresh-ahead at its start, lazy on its first connection)"
fi

# =================================================================================
if [[ -z $via_note ]]; then
  step "via=: sshd, ssh -L, microsocks and tinyproxy on 127.0.0.1; keyhole through each"
  usable keyhole pg || keyhole_die "via=: keyhole@pg (keyhole direct, the baseline) is not running"
  via_dir=$tmp/via
  mkdir "$via_dir"
  # sshd runs as the caller (root: it logs in as root); keyhole's ssh master and ssh -L
  # run as the servers' user, like every proxy here, with the client key and files
  # theirs.
  if ((EUID == 0)); then via_user=root; else via_user=$(id -un); fi
  for key_name in host_key client_key; do
    "$ssh_keygen_bin" -q -t ed25519 -N '' -C "keyhole-bench $key_name" -f "$via_dir/$key_name" ||
      keyhole_die "via=: ssh-keygen failed"
  done
  cp "$via_dir/client_key.pub" "$via_dir/authorized_keys"
  proxy_port[sshd@via]=$(new_port) || keyhole_die "no free port found"
  sshd_port=${proxy_port[sshd@via]}
  read -r host_key_type host_key_blob _ <"$via_dir/host_key.pub"
  printf '[127.0.0.1]:%d %s %s\n' "$sshd_port" "$host_key_type" "$host_key_blob" >"$via_dir/known_hosts"
  cat >"$via_dir/sshd_config" <<EOF
Port $sshd_port
ListenAddress 127.0.0.1
HostKey "$via_dir/host_key"
PidFile none
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin prohibit-password
AllowUsers $via_user
AuthorizedKeysFile "$via_dir/authorized_keys"
StrictModes no
AllowTcpForwarding yes
AllowAgentForwarding no
X11Forwarding no
PrintMotd no
EOF
  cat >"$via_dir/ssh_config" <<EOF
Host bastion
  HostName 127.0.0.1
  Port $sshd_port
  User $via_user
  IdentityFile "$via_dir/client_key"
  IdentitiesOnly yes
  UserKnownHostsFile "$via_dir/known_hosts"
  StrictHostKeyChecking yes
  BatchMode yes
EOF
  ((EUID != 0)) || chown "$keyhole_pg_user:" "$via_dir/client_key" "$via_dir/client_key.pub" \
    "$via_dir/ssh_config" "$via_dir/known_hosts"
  # sshd's privilege separation directory.
  if ((EUID == 0)) && [[ ! -d /run/sshd ]]; then
    mkdir -p /run/sshd && chmod 0755 /run/sshd
  fi
  start_proxy sshd@via || via_setup_die "sshd did not start" sshd@via
  proxy_command sshd@via
  via_sshd_cmdline=$(shown_command)
  keyhole_log "sshd on 127.0.0.1:$sshd_port (pid ${proxy_pid[sshd@via]}), logins as $via_user with the client key"

  # The hand-made tunnel: ssh -L, and keyhole direct to its port.
  proxy_port[ssh@vtun]=$(new_port) || keyhole_die "no free port found"
  upstream_port[vtun]=${proxy_port[ssh@vtun]}
  start_proxy ssh@vtun || via_setup_die "ssh -L did not open its port" ssh@vtun sshd@via
  keyhole_log "ssh -L on 127.0.0.1:${proxy_port[ssh@vtun]} (pid ${proxy_pid[ssh@vtun]}) to 127.0.0.1:$pg_port through sshd"

  proxy_port[microsocks@via]=$(new_port) || keyhole_die "no free port found"
  start_proxy microsocks@via || via_setup_die "microsocks did not start" microsocks@via
  keyhole_log "microsocks on 127.0.0.1:${proxy_port[microsocks@via]} (pid ${proxy_pid[microsocks@via]})"

  proxy_port[tinyproxy@via]=$(new_port) || keyhole_die "no free port found"
  # No Allow lines: every client; no ConnectPort lines: CONNECT to every port.
  cat >"$via_dir/tinyproxy.conf" <<EOF
Port ${proxy_port[tinyproxy@via]}
Listen 127.0.0.1
Timeout 600
MaxClients 200
LogLevel Connect
DisableViaHeader Yes
EOF
  start_proxy tinyproxy@via || via_setup_die "tinyproxy did not start" tinyproxy@via
  keyhole_log "tinyproxy on 127.0.0.1:${proxy_port[tinyproxy@via]} (pid ${proxy_pid[tinyproxy@via]})"

  upstream_port[vssh]=$pg_port
  upstream_port[vsocks]=$pg_port
  upstream_port[vhttp]=$pg_port
  login_ms=""
  for inst in keyhole@vssh keyhole@vtun keyhole@vsocks keyhole@vhttp; do
    server=${inst#*@}
    proxy_port[$inst]=$(new_port) || keyhole_die "no free port found"
    start_proxy "$inst" || via_setup_die "$inst did not start" "$inst"
    log=$tmp/keyhole.$server.${proxy_starts[$inst]}.log
    case $server in
    vssh)
      # keyhole logs in to the bastion at its start: its log says when, and how long
      # the login took.
      for ((i = 0; i < 350; i++)); do
        grep -qE 'SSH connection to the bastion open|SSH login to the bastion failed' "$log" && break
        sleep 0.1
      done
      grep -q 'SSH connection to the bastion open' "$log" ||
        via_setup_die "keyhole's SSH login to the bastion did not succeed" "$inst" sshd@via
      login_ms=$(sed -n 's/.*SSH connection to the bastion open.*took_ms=\([0-9][0-9]*\).*/\1/p' "$log" | head -n 1)
      [[ -z $login_ms ]] || record via/ssh via_login "$login_ms"
      hop=sshd@via
      ;;
    vtun) hop=ssh@vtun ;;
    vsocks) hop=microsocks@via ;;
    vhttp) hop=tinyproxy@via ;;
    esac
    why=$(check_path keyhole "$server") ||
      via_setup_die "$inst: a connection through it failed: $why" "$inst" "$hop"
    # And it went through the hop: the hop says so (keyhole's ssh master is its child).
    case $server in
    vssh) seen=$(pgrep -P "${proxy_pid[$inst]}" -x ssh | head -n 1 || true) ;;
    vtun) seen=yes ;;
    vsocks) seen=$(grep -m1 -F "127.0.0.1:$pg_port" "$tmp/microsocks.via.${proxy_starts[microsocks@via]}.log" || true) ;;
    vhttp) seen=$(grep -m1 -F "CONNECT 127.0.0.1:$pg_port" "$tmp/tinyproxy.via.${proxy_starts[tinyproxy@via]}.log" || true) ;;
    esac
    [[ -n $seen ]] || via_setup_die "$inst: the connection did not go through $hop" "$inst" "$hop"
    keyhole_log "$inst on 127.0.0.1:${proxy_port[$inst]} (pid ${proxy_pid[$inst]}): through ${hop%@*}, the server sees TLS"
  done
  for key in "${via_all_keys[@]}"; do
    proxy_command "${via_inst[$key]}"
    via_cmdline[$key]=$(shown_command)
  done
  proxy_command ssh@vtun
  via_cmdline[ssh-L]="$(shown_command) + ${via_cmdline[ssh-L]}"
  proxy_command microsocks@via
  via_cmdline[socks5]="$(shown_command) + ${via_cmdline[socks5]}"
  proxy_command tinyproxy@via
  via_cmdline[http]="$(shown_command) + ${via_cmdline[http]}"
  via_keys=("${via_all_keys[@]}")
  keyhole_log "keyhole's SSH login to the bastion took ${login_ms:-?} ms (its log)"
fi

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
rounds_started=$SECONDS
for ((round = 1; round <= rounds; round++)); do
  # The order rotates each round, so that no path always comes first or last.
  order=()
  for ((i = 0; i < n_paths; i++)); do
    order+=("${run_paths[$(((i + round - 1) % n_paths))]}")
  done
  if ((run_main)); then
    for c in "${pgbench_clients[@]}"; do
      step "round $round/$rounds: select-only, pgbench -S -c $c -T $duration"
      for p in "${order[@]}"; do
        if usable "$p" pg; then run_pgbench "$p" "$c" "tps_s$c"; fi
      done
    done
    step "round $round/$rounds: connection per transaction, pgbench -S -C -c $conn_clients -T $duration"
    for p in "${order[@]}"; do
      if usable "$p" pg; then run_pgbench "$p" "$conn_clients" tps_c -C; fi
    done
  fi
  [[ -n $cloudsql_note ]] || cs_round
  [[ -n $via_note ]] || via_round
  [[ -n $latency_note ]] || latency_round
  if ((run_main)); then
    step "round $round/$rounds: COPY out, $copy_bytes bytes"
    for p in "${order[@]}"; do
      if usable "$p" pg; then run_copy_out "$p"; fi
    done
    step "round $round/$rounds: COPY in, $copy_bytes bytes into an unlogged table"
    for p in "${order[@]}"; do
      if usable "$p" pg; then run_copy_in "$p"; fi
    done
    step "round $round/$rounds: synthetic upstream, a stream of $stream_bytes bytes"
    for p in "${order[@]}"; do
      if usable "$p" syn; then run_stream "$p"; fi
    done
    if [[ -n $my_pid ]]; then
      if command -v sysbench >/dev/null 2>&1; then
        for threads in "${mysql_thread_counts[@]}"; do
          step "round $round/$rounds: MySQL point selects, sysbench oltp_point_select --threads=$threads"
          for p in "${order[@]}"; do
            if usable "$p" my; then run_mysql_select "$p" "$threads"; fi
          done
        done
      fi
      step "round $round/$rounds: MySQL bulk read, $my_bytes bytes"
      for p in "${order[@]}"; do
        if usable "$p" my; then run_mysql_bulk "$p"; fi
      done
    fi
    step "round $round/$rounds: $idle_conns idle connections to PostgreSQL"
    for p in "${order[@]}"; do
      if [[ $p != direct ]] && usable "$p" pg; then run_idle "$p" pg "$idle_conns" rss_pg; fi
    done
    step "round $round/$rounds: $idle_large idle connections to the synthetic upstream"
    for p in "${order[@]}"; do
      if [[ $p != direct ]] && usable "$p" syn; then run_idle "$p" syn "$idle_large" rss_syn; fi
    done
  fi
done
rounds_took=$((SECONDS - rounds_started))

# =================================================================================
step "results"
load_end=$(cut -d' ' -f1-3 /proc/loadavg)
report_write
# A via= run that failed fails the benchmark, report or not.
via_failed=()
for f in "$tmp/results/via"/*.fail; do
  [[ -s $f ]] || continue
  name=${f#"$tmp/results/via/"}
  name=${name%.fail}
  via_failed+=("${name%%.*} ${name#*.}: $(head -n 1 "$f")")
done
if ((${#via_failed[@]} > 0)); then
  for m in "${via_failed[@]}"; do keyhole_warn "via= $m"; done
  keyhole_die "the via= group failed: ${#via_failed[@]} workload(s) with failed runs (above)"
fi
