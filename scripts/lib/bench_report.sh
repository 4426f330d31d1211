# shellcheck shell=bash
# shellcheck disable=SC2154 # the settings and state are scripts/bench.sh's globals
#
# Used by scripts/bench.sh (source it, don't run it): the report of a benchmark run.
# report_write turns the samples in $tmp/results (files PATH.METRIC with one value a
# line per round, and PATH.METRIC.fail with one reason a line) into
#   - the markdown report: on stdout, or in $out_dir/bench.md (then only the results
#     table goes to stdout),
#   - $out_dir/bench.json: machine, versions, settings, every sample, medians, ratios,
#     targets,
#   - $out_dir/bench.png: a chart (gnuplot) of the ratios to direct, the proxies' CPU
#     seconds per GB and their RSS per idle connection, with the targets drawn in.
# It reads bench.sh's settings and state (paths, skip_note, late_note, the binaries'
# locations, ...), which are globals there.

# median FILE: the median of the numbers in FILE, one a line; fails when there are none.
median() {
  [[ -s $1 ]] || return 1
  sort -g "$1" | awk '{ v[NR] = $1 } END {
    if (NR % 2) printf "%.6f", v[(NR + 1) / 2]; else printf "%.6f", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# The rows of the report: id|server|label|unit|format|kind|target
#   kind   ratio: the value, and its ratio to direct's
#          delta: the value, and its difference to direct's
#          proxy: a proxy's own figure; direct has none
#   target (keyhole's) ratio>=X, max<=X, held (every round held the connections), or empty
report_metrics() {
  local c
  # (none without the main group: --only)
  ((run_main)) || return 0
  for c in "${pgbench_clients[@]}"; do
    local t=""
    ((c == 8)) && t="ratio>=0.95"
    printf '%s\n' "tps_s$c|pg|pgbench -S -c $c|TPS|%.0f|ratio|$t" \
      "lat_tps_s$c|pg|pgbench -S -c $c latency|ms|%.3f|ratio|"
  done
  printf '%s\n' \
    "tps_c|pg|pgbench -S -C -c $conn_clients: new connections|per s|%.0f|ratio|ratio>=1.2" \
    "lat_tps_c|pg|pgbench -S -C latency (+ added per new connection)|ms|%.3f|delta|" \
    "copy_out_mbs|pg|COPY out, $(mb "$copy_bytes")|MB/s|%.0f|ratio|" \
    "copy_out_cpu|pg|COPY out: proxy CPU|s/GB|%.2f|proxy|max<=0.6" \
    "copy_in_mbs|pg|COPY in, $(mb "$copy_bytes")|MB/s|%.0f|ratio|" \
    "copy_in_cpu|pg|COPY in: proxy CPU|s/GB|%.2f|proxy|" \
    "syn_mbs|syn|synthetic TLS stream, $(mb "$stream_bytes")|MB/s|%.0f|ratio|" \
    "syn_cpu|syn|synthetic stream: proxy CPU|s/GB|%.2f|proxy|" \
    "rss_pg|pg|idle: RSS per connection, $idle_conns to PostgreSQL|KiB|%.1f|proxy|max<=16" \
    "rss_syn|syn|idle: RSS per connection, $idle_large to synthetic|KiB|%.1f|proxy|held"
  if [[ -n $my_pid ]]; then
    printf '%s\n' \
      "my_tps|my|MySQL point selects (sysbench, $mysql_threads threads)|TPS|%.0f|ratio|ratio>=0.95" \
      "my_lat|my|MySQL point select latency|ms|%.3f|ratio|" \
      "my_bulk_mbs|my|MySQL bulk read, $(mb "$my_bytes")|MB/s|%.0f|ratio|" \
      "my_bulk_cpu|my|MySQL bulk read: proxy CPU|s/GB|%.2f|proxy|"
  fi
}

# mb BYTES: "1001 MB".
mb() {
  awk -v b="$1" 'BEGIN { printf "%.0f MB", b / 1000000 }'
}

# fmt FORMAT VALUE
fmt() {
  # shellcheck disable=SC2059 # the format is the caller's
  printf "$1" "$2"
}

# served PATH SERVER: the path is measured against that server at all.
served() {
  [[ " $(servers_of "$1") " == *" $2 "* ]]
}

# result_cell PATH ID FORMAT KIND SERVER: the markdown cell.
result_cell() {
  local path=$1 id=$2 format=$3 kind=$4 server=$5 m d fails="" cell
  if ! served "$path" "$server" || [[ $path == direct && $kind == proxy ]] ||
    [[ -n ${skip_note[$path]:-} ]]; then
    printf -- '-'
    return 0
  fi
  [[ -s $tmp/results/$path.$id.fail ]] && fails="*"
  if ! m=$(median "$tmp/results/$path.$id"); then
    if [[ -n $fails ]]; then printf 'fail'; else printf -- '-'; fi
    return 0
  fi
  cell=$(fmt "$format" "$m")
  if [[ $path != direct ]] && d=$(median "$tmp/results/direct.$id"); then
    case $kind in
    ratio) cell+=$(awk -v a="$m" -v b="$d" 'BEGIN { if (b > 0) printf " (%.2f×)", a / b }') ;;
    delta) cell+=$(awk -v a="$m" -v b="$d" 'BEGIN { printf " (%+.3f)", a - b }') ;;
    esac
  fi
  printf '%s%s' "$cell" "$fails"
}

# target_text TARGET: how the target reads in the table.
target_text() {
  case $1 in
  ratio\>=*) printf '≥ %s× direct' "${1#ratio>=}" ;;
  ratio\<=*) printf '≤ %s× keyhole → PostgreSQL' "${1#ratio<=}" ;;
  max\<=*) printf '≤ %s' "${1#max<=}" ;;
  held) printf '10,000 held, no error' ;;
  sshL\>=*) printf 'via=ssh ≥ %s× ssh -L' "${1#sshL>=}" ;;
  sshL\<=*) printf 'via=ssh ≤ %s× ssh -L' "${1#sshL<=}" ;;
  esac
}

# target_met ID TARGET: yes, no, or - (no data; or the run was too small to tell).
target_met() {
  local id=$1 target=$2 m d
  case $target in
  ratio\>=*)
    if ! m=$(median "$tmp/results/keyhole.$id") || ! d=$(median "$tmp/results/direct.$id"); then
      printf -- '-'
      return 0
    fi
    awk -v a="$m" -v b="$d" -v t="${target#ratio>=}" 'BEGIN { print (b > 0 && a / b >= t) ? "yes" : "no" }'
    ;;
  max\<=*)
    m=$(median "$tmp/results/keyhole.$id") || {
      printf -- '-'
      return 0
    }
    awk -v a="$m" -v t="${target#max<=}" 'BEGIN { print (a <= t) ? "yes" : "no" }'
    ;;
  held)
    if [[ -s $tmp/results/keyhole.$id.fail ]]; then
      printf 'no'
    elif [[ ! -s $tmp/results/keyhole.$id ]] || ((idle_large < 10000)); then
      printf -- '-'
    else
      printf 'yes'
    fi
    ;;
  *) printf -- '-' ;;
  esac
}

version_of() {
  case $1 in
  postgres) "$keyhole_pgbin/postgres" --version | head -n 1 ;;
  mariadb) "$mariadbd_bin" --version 2>/dev/null | head -n 1 ;;
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
  keyhole)
    printf '%s' "$("$tmp/bin/keyhole" --version 2>/dev/null | head -n 1)"
    if [[ -n ${KEYHOLE_BIN:-} ]]; then
      printf ' (KEYHOLE_BIN)'
    else
      printf ' (built from %s)' "$(git -C "$repo_root" describe --always --dirty 2>/dev/null || echo '?')"
    fi
    ((${#keyhole_flags[@]} == 0)) || printf ', with %s' "${keyhole_flags[*]}"
    ;;
  esac
}

cpu_model() {
  sed -n 's/^model name[[:space:]]*: //p' /proc/cpuinfo | head -n 1
}

memory_gib() {
  awk '/^MemTotal:/ { printf "%.1f", $2 / 1048576 }' /proc/meminfo
}

# The paths that ran (requested and not skipped).
ran_paths() {
  local p
  for p in "${paths[@]}"; do
    [[ -n ${skip_note[$p]:-} ]] || printf '%s\n' "$p"
  done
}

# --- the Cloud SQL workloads -----------------------------------------------------
# Their rows: id|label|unit|format|kind|columns|target. Columns are bench.sh's cs_keys
# (direct@pg keyhole@pg keyhole keyhole-lazy stunnel); a row has figures for the ones
# listed. Samples are in $tmp/results/cloudsql/KEY.ID.
#   kind   ratio: the value, and its ratio to keyhole@pg (keyhole's ordinary target)
#          delta: the value, and its difference to keyhole@pg's
#          value: the value alone
#   target ratio<=X: keyhole (the connector) at most X times keyhole@pg
report_cs_metrics() {
  ((${#cs_keys[@]} > 0)) || return 0
  printf '%s\n' \
    "cs_tps_s8|pgbench -S -c $cs_clients|TPS|%.0f|ratio|direct@pg keyhole@pg keyhole stunnel|" \
    "cs_cpu_s8|pgbench -S -c $cs_clients: proxy CPU per transaction|µs|%.1f|ratio|keyhole@pg keyhole stunnel|ratio<=1.1" \
    "cs_fake_s8|pgbench -S -c $cs_clients: the fake proxy's CPU per transaction|µs|%.1f|value|keyhole stunnel|" \
    "cs_tps_c|pgbench -S -C -c $conn_clients: new connections|per s|%.0f|ratio|direct@pg keyhole@pg keyhole keyhole-lazy stunnel|" \
    "cs_cpu_c|pgbench -S -C: proxy CPU per new connection|µs|%.0f|ratio|keyhole@pg keyhole keyhole-lazy stunnel|" \
    "cs_first|first connection through a fresh process (psql -c 'select 1', wall time)|ms|%.1f|delta|direct@pg keyhole@pg keyhole keyhole-lazy|"
}

# cs_header KEY / cs_column_text KEY: a column's heading, and what it includes.
cs_header() {
  case $1 in
  direct@pg) printf 'direct → PostgreSQL' ;;
  keyhole@pg) printf 'keyhole → PostgreSQL' ;;
  keyhole) printf 'keyhole connector' ;;
  keyhole-lazy) printf 'connector, --lazy-refresh' ;;
  stunnel) printf 'stunnel → fake proxy' ;;
  esac
}
cs_column_text() {
  case $1 in
  direct@pg) printf 'libpq straight to PostgreSQL over TLS (sslmode=verify-full): no proxy, no fake' ;;
  keyhole@pg) printf 'keyhole with its ordinary target (postgres://127.0.0.1:PORT, verify-full), TLS to PostgreSQL'"'"'s own TLS (OpenSSL) over TCP: the baseline of the ratios' ;;
  keyhole) printf 'keyhole'"'"'s connector, refresh-ahead (the instance %s as its target): the fake API for settings and certificate, then TLS 1.3 with the ephemeral client certificate (RSA-2048) to the fake server-side proxy, which splices to PostgreSQL'"'"'s Unix socket' "$cs_instance" ;;
  keyhole-lazy) printf 'the same with --lazy-refresh (the certificate is fetched by the first connection that finds none)' ;;
  stunnel) printf 'stunnel (client mode, a certificate from the fake'"'"'s client CA for an RSA-2048 key, verifyChain, checkHost = the instance'"'"'s CN) in keyhole'"'"'s place, to the same fake proxy: no PostgreSQL 15 client speaks TLS from the first byte (libpq'"'"'s sslnegotiation=direct came in 17), so the stock reference on that path is a TLS proxy' ;;
  esac
}

# cs_cell KEY ID FORMAT KIND COLUMNS: the markdown cell.
cs_cell() {
  local key=$1 id=$2 format=$3 kind=$4 f=$tmp/results/cloudsql/$1.$2 m b fails="" cell
  if [[ " $5 " != *" $key "* ]]; then
    printf -- '-'
    return 0
  fi
  [[ -s $f.fail ]] && fails="*"
  if ! m=$(median "$f"); then
    if [[ -n $fails ]]; then printf 'fail'; else printf -- '-'; fi
    return 0
  fi
  cell=$(fmt "$format" "$m")
  # (direct is there for scale: no ratio)
  if [[ $key != keyhole@pg && $key != direct@pg ]] && b=$(median "$tmp/results/cloudsql/keyhole@pg.$id"); then
    case $kind in
    ratio) cell+=$(awk -v a="$m" -v b="$b" 'BEGIN { if (b > 0) printf " (%.2f×)", a / b }') ;;
    delta) cell+=$(awk -v a="$m" -v b="$b" 'BEGIN { printf " (%+.1f)", a - b }') ;;
    esac
  fi
  printf '%s%s' "$cell" "$fails"
}

# cs_target_met ID TARGET: yes, no, or - (no data).
cs_target_met() {
  local m b
  case $2 in
  ratio\<=*)
    if ! m=$(median "$tmp/results/cloudsql/keyhole.$1") ||
      ! b=$(median "$tmp/results/cloudsql/keyhole@pg.$1"); then
      printf -- '-'
      return 0
    fi
    awk -v a="$m" -v b="$b" -v t="${2#ratio<=}" 'BEGIN { print (b > 0 && a / b <= t) ? "yes" : "no" }'
    ;;
  *) printf -- '-' ;;
  esac
}

# cs_api_requests: the API requests the fake answered during the measured runs through
# the connector (each run comes after a warm-up connection; 0 is expected).
cs_api_requests() {
  local f n=0 v
  for f in "$tmp/results/cloudsql"/keyhole*.cs_api_*; do
    [[ -s $f ]] || continue
    while read -r v; do n=$((n + ${v%.*})); done <"$f"
  done
  printf '%d' "$n"
}

report_cs_table() {
  local id label unit format kind keys target key
  printf '| workload | unit |'
  for key in "${cs_keys[@]}"; do printf ' %s |' "$(cs_header "$key")"; done
  printf ' keyhole target | met |\n|---|---|'
  for key in "${cs_keys[@]}"; do printf -- '---:|'; done
  printf -- '---|---|\n'
  while IFS='|' read -r id label unit format kind keys target; do
    printf '| %s | %s |' "$label" "$unit"
    for key in "${cs_keys[@]}"; do
      printf ' %s |' "$(cs_cell "$key" "$id" "$format" "$kind" "$keys")"
    done
    if [[ -n $target ]]; then
      printf ' %s | %s |\n' "$(target_text "$target")" "$(cs_target_met "$id" "$target")"
    else
      printf ' | |\n'
    fi
  done < <(report_cs_metrics)
}

report_cs_markdown() {
  local key
  printf '\n## Cloud SQL connector\n\n'
  # shellcheck disable=SC2016 # markdown's backquotes
  printf 'keyhole with a Cloud SQL instance as its target, against `cloudsql_fake` (benches/cloudsql_fake.rs): a fake SQL Admin API (%s) and a fake server-side proxy on %s (TLS 1.3 from the first byte, ECDSA P-256 server certificate with CN %s, the client certificate required, no session resumption), which splices each connection to the same PostgreSQL through its Unix socket (pg_hba: md5 for bench there, as over TCP).\n\n' \
    "$cs_api" "$cs_proxy" "$cs_cn"
  report_cs_table
  cat <<'EOF'

Medians over the rounds. Cells: the value and, in parentheses, its ratio to keyhole →
PostgreSQL (keyhole with an ordinary target), or for the first connection the
milliseconds it adds to keyhole → PostgreSQL's; direct is there for scale. Proxy CPU:
user + system time of the proxy process (keyhole or stunnel) per transaction, or per
connection under `-C`; the fake's likewise.
EOF
  printf '\nWhat each column includes:\n\n'
  for key in "${cs_keys[@]}"; do
    printf -- '- %s: %s.\n' "$(cs_header "$key")" "$(cs_column_text "$key")"
  done
  cat <<EOF

How to read it:

- Steady state: the connector's path has one hop more than keyhole → PostgreSQL (the
  fake proxy, on the same cores), and on it PostgreSQL does no TLS (the fake does), so
  its TPS is not keyhole's cost alone. keyhole's own cost is its CPU per transaction,
  which must be the same as for any other target (the target above); stunnel is
  another proxy on the identical path; the fake's CPU is shown apart.
- New connections: every path makes a full TLS 1.3 handshake (PostgreSQL turns session
  tickets off; the fake issues none). Through the fake the client also presents a
  certificate and signs with its RSA-2048 key, which keyhole → PostgreSQL does not.
  Each measured run through the fake comes after one connection, so that a
  --lazy-refresh keyhole has its certificate: both modes use a cached one (the fake
  answered $(cs_api_requests) API requests during those runs).
- First connection: a freshly started process each time (none for direct), listening,
  then after 0.5 s (refresh-ahead: also once its log says its first certificate is in)
  one psql -c 'select 1': psql's whole wall time, its start and login included,
  $first_runs runs per round. --lazy-refresh pays for the RSA-2048 key generation and
  both API calls on that connection; refresh-ahead has done them by then (a client that
  connects before its first refresh ends waits for it).
EOF
}

# --- the via= workloads ----------------------------------------------------------
# Their rows: id|label|unit|format|kind|columns|target. Columns are bench.sh's via_keys
# (keyhole ssh ssh-L socks5 http); a row has figures for the ones listed. Samples are in
# $tmp/results/via/KEY.ID.
#   kind   ratio: the value, and its ratio to keyhole (keyhole direct)
#          delta: the value, and its difference to keyhole's
#          value: the value alone
#   target sshL>=X, sshL<=X: via=ssh (column ssh) at least, at most X times ssh -L's
report_via_metrics() {
  ((${#via_keys[@]} > 0)) || return 0
  local all="keyhole ssh ssh-L socks5 http" hops="ssh ssh-L socks5 http"
  printf '%s\n' \
    "via_tps_s8|pgbench -S -c $via_clients|TPS|%.0f|ratio|$all|sshL>=0.95" \
    "via_lat_s8|pgbench -S -c $via_clients latency|ms|%.3f|ratio|$all|" \
    "via_cpu_s8|pgbench -S -c $via_clients: CPU per transaction, keyhole and its ssh|µs|%.1f|ratio|$all|sshL<=1.1" \
    "via_hop_s8|pgbench -S -c $via_clients: the hop's CPU per transaction|µs|%.1f|value|$hops|" \
    "via_tps_c|pgbench -S -C -c $via_clients: new connections|per s|%.0f|ratio|$all|" \
    "via_lat_c|pgbench -S -C latency (+ added per new connection)|ms|%.3f|delta|$all|" \
    "via_cpu_c|pgbench -S -C: CPU per new connection, keyhole and its ssh|µs|%.0f|ratio|$all|" \
    "via_hop_c|pgbench -S -C: the hop's CPU per new connection|µs|%.0f|value|$hops|" \
    "via_login|SSH login of keyhole's master connection (at its start, from its log)|ms|%.0f|value|ssh|"
}

# via_header KEY / via_column_text KEY: a column's heading, and what it runs.
via_header() {
  case $1 in
  keyhole) printf 'keyhole direct' ;;
  ssh) printf 'via=ssh://bastion' ;;
  ssh-L) printf 'ssh -L + keyhole direct' ;;
  socks5) printf 'via=socks5:// (microsocks)' ;;
  http) printf 'via=http:// (tinyproxy)' ;;
  esac
}
via_column_text() {
  case $1 in
  keyhole) printf 'keyhole with its ordinary target, TLS to PostgreSQL over loopback TCP, as in the main table: the baseline of the ratios' ;;
  ssh) printf 'keyhole'"'"'s via=ssh with --ssh-config: one OpenSSH master connection (ssh -M -N, a child of keyhole) logged in to sshd at keyhole'"'"'s start; each client connection is a stdio-forward channel on it that keyhole asks for over the control socket, the master moving the bytes between a Unix socket pair and the channel; TLS from keyhole inside it' ;;
  ssh-L) printf 'the tunnel a developer opens by hand, with keyhole direct to its local port: each connection crosses loopback TCP to ssh, then a channel on its one SSH connection to sshd, which connects to PostgreSQL: what ssh costs, the reference for via=ssh' ;;
  socks5) printf 'keyhole'"'"'s via=socks5:// through microsocks (no login): per client connection a TCP connection to the proxy, a SOCKS5 greeting and CONNECT, and the proxy'"'"'s own connection to PostgreSQL' ;;
  http) printf 'keyhole'"'"'s via=http:// through tinyproxy: per client connection a TCP connection to the proxy, an HTTP CONNECT, and the proxy'"'"'s own connection to PostgreSQL' ;;
  esac
}

# via_cell KEY ID FORMAT KIND COLUMNS: the markdown cell.
via_cell() {
  local key=$1 id=$2 format=$3 kind=$4 f=$tmp/results/via/$1.$2 m b fails="" cell
  if [[ " $5 " != *" $key "* ]]; then
    printf -- '-'
    return 0
  fi
  [[ -s $f.fail ]] && fails="*"
  if ! m=$(median "$f"); then
    if [[ -n $fails ]]; then printf 'fail'; else printf -- '-'; fi
    return 0
  fi
  cell=$(fmt "$format" "$m")
  if [[ $key != keyhole ]] && b=$(median "$tmp/results/via/keyhole.$id"); then
    case $kind in
    ratio) cell+=$(awk -v a="$m" -v b="$b" 'BEGIN { if (b > 0) printf " (%.2f×)", a / b }') ;;
    delta) cell+=$(awk -v a="$m" -v b="$b" 'BEGIN { printf " (%+.3f)", a - b }') ;;
    esac
  fi
  printf '%s%s' "$cell" "$fails"
}

# via_target_met ID TARGET: yes, no, or - (no data).
via_target_met() {
  local m b op
  case $2 in
  sshL\>=* | sshL\<=*)
    if ! m=$(median "$tmp/results/via/ssh.$1") || ! b=$(median "$tmp/results/via/ssh-L.$1"); then
      printf -- '-'
      return 0
    fi
    op=${2:4:2}
    awk -v a="$m" -v b="$b" -v t="${2:6}" -v op="$op" 'BEGIN {
      r = (b > 0) ? a / b : -1
      print (r >= 0 && ((op == ">=" && r >= t) || (op == "<=" && r <= t))) ? "yes" : "no" }'
    ;;
  *) printf -- '-' ;;
  esac
}

# via_ssh_ratio ID: via=ssh's median over ssh -L's, e.g. "1.02×" (empty without both).
via_ssh_ratio() {
  local m b
  m=$(median "$tmp/results/via/ssh.$1") && b=$(median "$tmp/results/via/ssh-L.$1") || return 0
  awk -v a="$m" -v b="$b" 'BEGIN { if (b > 0) printf "%.2f×", a / b }'
}

report_via_table() {
  local id label unit format kind keys target key met
  printf '| workload | unit |'
  for key in "${via_keys[@]}"; do printf ' %s |' "$(via_header "$key")"; done
  printf ' keyhole target | via=ssh / ssh -L | met |\n|---|---|'
  for key in "${via_keys[@]}"; do printf -- '---:|'; done
  printf -- '---|---:|---|\n'
  while IFS='|' read -r id label unit format kind keys target; do
    printf '| %s | %s |' "$label" "$unit"
    for key in "${via_keys[@]}"; do
      printf ' %s |' "$(via_cell "$key" "$id" "$format" "$kind" "$keys")"
    done
    if [[ -n $target ]]; then
      met=$(via_target_met "$id" "$target")
      printf ' %s | %s | %s |\n' "$(target_text "$target")" "$(via_ssh_ratio "$id")" "$met"
    else
      printf ' | | |\n'
    fi
  done < <(report_via_metrics)
}

report_via_markdown() {
  local key
  printf '\n## Hops (via=)\n\n'
  printf 'keyhole through each hop to the same PostgreSQL (127.0.0.1:%s, TLS from keyhole, verify-full against localhost), next to keyhole direct and the ssh -L tunnel a developer opens by hand, all on this machine'"'"'s loopback: %s (sshd and ssh), microsocks %s, %s. pgbench -S -c %d and -S -C -c %d, -T %d, every column in every round, in an order that rotates.\n\n' \
    "$pg_port" "$(version_of ssh)" "$(version_of microsocks)" "$(version_of tinyproxy)" \
    "$via_clients" "$via_clients" "$via_duration"
  report_via_table
  cat <<'EOF'

Medians over the rounds. Cells: the value and, in parentheses, its ratio to keyhole
direct, or for the latency under `-C` the milliseconds it adds to keyhole direct's.
"via=ssh / ssh -L": the ratio the targets are about. CPU "keyhole and its ssh": user +
system time of keyhole's process tree (with via=ssh, its ssh master is a child of
keyhole) and, for ssh -L, of the ssh -L process too: what runs on the developer's
machine; per transaction, or per connection under `-C`. The hop's CPU: sshd's process
tree (its listener and the processes of the SSH connection in use), microsocks,
tinyproxy: what runs on the bastion.
EOF
  printf '\nWhat each column runs (TMP: the run'"'"'s temporary directory; this run'"'"'s ports):\n\n'
  for key in "${via_keys[@]}"; do
    # shellcheck disable=SC2016 # markdown's backquotes
    printf -- '- %s: %s. `%s`\n' "$(via_header "$key")" "$(via_column_text "$key")" \
      "${via_cmdline[$key]//' + '/'` + `'}"
  done
  # shellcheck disable=SC2016 # markdown's backquotes
  printf -- '- the bastion, for via=ssh and ssh -L: `%s` (public-key login only, a fresh ed25519 host key and client key); the ssh client config both use: Host bastion, HostName 127.0.0.1, Port, User, IdentityFile, IdentitiesOnly yes, UserKnownHostsFile with the host key, StrictHostKeyChecking yes, BatchMode yes.\n' \
    "$via_sshd_cmdline"
  cat <<'EOF'

How to read it:

- Steady state: via=ssh and ssh -L do the same work (keyhole's TLS, one SSH channel
  per connection on one SSH connection, sshd's connection to PostgreSQL); keyhole hands
  its bytes to the ssh master over a Unix socket pair instead of a loopback TCP
  connection. The targets: via=ssh costs what ssh -L costs, not more (TPS ≥ 0.95×, CPU
  of keyhole and its ssh ≤ 1.1×). SOCKS5 and CONNECT proxies relay bytes without
  encryption of their own, so they cost less than ssh.
- New connections: via=ssh opens a channel on the logged-in master (a request over its
  control socket and a socket pair passed to it: no login, no process); ssh -L opens a
  channel per accepted connection; SOCKS5 and CONNECT each add a TCP connection to the
  proxy, a round trip, and the proxy's own connection. The latency row says what each
  adds to every new connection; where it is far above the CPU each adds, the rest is
  waiting on the hop's path, not work.
- The SSH login happens once per keyhole process (at its start): shown apart, not in
  the `-C` figures.
EOF
}

# The "via" object of bench.json: whether the group ran, its columns and commands, and
# its rows (results by column, ratios to keyhole direct and to ssh -L).
report_via_json() {
  local key first=1 id label unit format kind keys target met m b s rb rs f
  printf '  "via": {"ran": %s, "note": %s' \
    "$( ((${#via_keys[@]} > 0)) && echo true || echo false)" "$(json_str "$via_note")"
  if ((${#via_keys[@]} > 0)); then
    printf ', "baseline": "keyhole", "clients": %d, "duration_s": %d, "versions": {"openssh": %s, "microsocks": %s, "tinyproxy": %s}, "bastion_command": %s, "columns": {' \
      "$via_clients" "$via_duration" "$(json_str "$(version_of ssh)")" \
      "$(json_str "$(version_of microsocks)")" "$(json_str "$(version_of tinyproxy)")" \
      "$(json_str "$via_sshd_cmdline")"
    for key in "${via_keys[@]}"; do
      ((first)) || printf ', '
      first=0
      printf '%s: {"header": %s, "what": %s, "command": %s}' "$(json_str "$key")" \
        "$(json_str "$(via_header "$key")")" "$(json_str "$(via_column_text "$key")")" \
        "$(json_str "${via_cmdline[$key]}")"
    done
    printf '}, "metrics": ['
    first=1
    while IFS='|' read -r id label unit format kind keys target; do
      ((first)) || printf ','
      first=0
      met=null
      if [[ -n $target ]]; then
        case $(via_target_met "$id" "$target") in yes) met=true ;; no) met=false ;; esac
      fi
      printf '\n    {"id": %s, "label": %s, "unit": %s, "kind": %s, "target": %s, "target_met": %s, "results": {' \
        "$(json_str "$id")" "$(json_str "$label")" "$(json_str "$unit")" "$(json_str "$kind")" \
        "$(json_str "$target")" "$met"
      b=$(median "$tmp/results/via/keyhole.$id") || b=""
      s=$(median "$tmp/results/via/ssh-L.$id") || s=""
      local firstk=1
      for key in "${via_keys[@]}"; do
        [[ " $keys " == *" $key "* ]] || continue
        ((firstk)) || printf ', '
        firstk=0
        f=$tmp/results/via/$key.$id
        rb=null rs=null
        if m=$(median "$f"); then
          [[ -z $b || $key == keyhole ]] ||
            rb=$(awk -v a="$m" -v b="$b" 'BEGIN { if (b > 0) printf "%.4f", a / b; else printf "null" }')
          [[ -z $s || $key != ssh ]] ||
            rs=$(awk -v a="$m" -v b="$s" 'BEGIN { if (b > 0) printf "%.4f", a / b; else printf "null" }')
        else
          m=null
        fi
        printf '%s: {"samples": %s, "median": %s, "ratio_to_baseline": %s, "ratio_to_ssh_L": %s, "failures": %s}' \
          "$(json_str "$key")" "$(json_samples "$f")" "$m" "$rb" "$rs" "$(json_failures "$f.fail")"
      done
      printf '}}'
    done < <(report_via_metrics)
    printf '\n  ]'
  fi
  printf '},\n'
}

# --- markdown --------------------------------------------------------------------
report_table() {
  local id server label unit format kind target p met
  printf '| workload | unit |'
  for p in "${paths[@]}"; do printf ' %s |' "$p"; done
  printf ' keyhole target | met |\n|---|---|'
  for p in "${paths[@]}"; do printf -- '---:|'; done
  printf -- '---|---|\n'
  while IFS='|' read -r id server label unit format kind target; do
    printf '| %s | %s |' "$label" "$unit"
    for p in "${paths[@]}"; do
      printf ' %s |' "$(result_cell "$p" "$id" "$format" "$kind" "$server")"
    done
    if [[ -n $target ]]; then
      met=$(target_met "$id" "$target")
      printf ' %s | %s |\n' "$(target_text "$target")" "$met"
    else
      printf ' | |\n'
    fi
  done < <(report_metrics)
}

report_targets_line() {
  local id target met yes=0 no=0 unknown=0
  while IFS='|' read -r id _ _ _ _ _ target; do
    [[ -n $target ]] || continue
    met=$(target_met "$id" "$target")
    case $met in yes) yes=$((yes + 1)) ;; no) no=$((no + 1)) ;; *) unknown=$((unknown + 1)) ;; esac
  done < <(report_metrics)
  while IFS='|' read -r id _ _ _ _ _ target; do
    [[ -n $target ]] || continue
    met=$(cs_target_met "$id" "$target")
    case $met in yes) yes=$((yes + 1)) ;; no) no=$((no + 1)) ;; *) unknown=$((unknown + 1)) ;; esac
  done < <(report_cs_metrics)
  while IFS='|' read -r id _ _ _ _ _ target; do
    [[ -n $target ]] || continue
    met=$(via_target_met "$id" "$target")
    case $met in yes) yes=$((yes + 1)) ;; no) no=$((no + 1)) ;; *) unknown=$((unknown + 1)) ;; esac
  done < <(report_via_metrics)
  printf 'keyhole targets: %d met, %d missed, %d not measured in this run\n' "$yes" "$no" "$unknown"
}

report_markdown() {
  local p f m id
  printf '# keyhole benchmark\n\n'
  printf -- '- date: %s%s\n' "$(date -u '+%Y-%m-%d %H:%M UTC')" "$( ((quick)) && printf ' (quick mode: not for comparison)')"
  printf -- '- machine: %s cores (%s), %s GiB memory, Linux %s\n' "$(nproc)" "$(cpu_model)" \
    "$(memory_gib)" "$(uname -r)"
  printf -- '- load average (1, 5, 15 min): %s before the rounds, %s after; the rounds took %s\n' \
    "$load_start" "$load_end" "$(keyhole_duration "$rounds_took")"
  if ((run_main)); then
    printf -- '- settings: %d round(s), median kept, paths alternating; pgbench -S -c %s and -S -C -c %d, -T %d, scale %d; COPY out and in %d bytes; synthetic stream %d bytes; idle connections %d (PostgreSQL) and %d (synthetic)' \
      "$rounds" "${pgbench_clients[*]}" "$conn_clients" "$duration" "$scale" "$copy_bytes" \
      "$stream_bytes" "$idle_conns" "$idle_large"
  else
    printf -- '- settings: --only %s: %d round(s), median kept, columns alternating; pgbench scale %d' \
      "$only" "$rounds" "$scale"
  fi
  [[ -z $my_pid ]] || printf '; sysbench oltp_point_select %d threads, -T %d, %d rows; MySQL bulk read %d bytes' \
    "$mysql_threads" "$duration" "$mysql_table_size" "$my_bytes"
  ((${#cs_keys[@]} == 0)) || printf '; Cloud SQL: pgbench -S -c %d and -S -C -c %d, %d first connections per column and round' \
    "$cs_clients" "$conn_clients" "$first_runs"
  ((${#via_keys[@]} == 0)) || printf '; via=: pgbench -S -c %d and -S -C -c %d, -T %d' \
    "$via_clients" "$via_clients" "$via_duration"
  printf '\n- servers: %s, TLS only (hostssl, md5)' "$(version_of postgres)"
  ((!run_main)) || printf '; the synthetic upstream (benches/synthetic.rs)'
  [[ -z $my_pid ]] || printf '; %s, require_secure_transport=ON' "$(version_of mariadb)"
  ((${#cs_keys[@]} == 0)) || printf '; a fake Cloud SQL instance in front of that PostgreSQL (benches/cloudsql_fake.rs)'
  ((${#via_keys[@]} == 0)) || printf '; sshd, microsocks and tinyproxy in front of it (via=)'
  printf '; all on this machine\n'
  printf -- '- clients: %s' "$(version_of pgbench)"
  [[ -z $my_pid ]] || printf ', %s, %s' "$(version_of sysbench)" "$(mariadb --version 2>/dev/null | head -n 1)"
  printf '\n'
  for p in "${paths[@]}"; do
    [[ $p == direct || -n ${skip_note[$p]:-} ]] && continue
    printf -- '- %s: %s\n' "$p" "$(version_of "$p")"
  done
  printf '\n'
  if ((run_main)); then
    report_table
    printf '\n%s\n' "$(report_targets_line)"
    cat <<'EOF'

Medians over the rounds. Proxy cells: the value (ratio to direct), or for latency under
`-C` the value (difference to direct in ms: what the proxy adds to each new connection).
TPS: pgbench or sysbench transactions per second; latency: their average. MB/s: bytes
moved per wall second (COPY out and the bulk reads to /dev/null, COPY in from a
generator). Proxy CPU: user + system seconds of the proxy process per GB moved.
RSS: growth of the proxy's VmRSS per idle connection (each logged in, one query run),
on a freshly started proxy. `*`: some rounds failed (see the notes); `-`: not measured.
EOF
  else
    printf 'The main table was left out (--only %s).\n\n%s\n' "$only" "$(report_targets_line)"
  fi
  ((${#cs_keys[@]} == 0)) || report_cs_markdown
  ((${#via_keys[@]} == 0)) || report_via_markdown
  local notes=()
  for p in "${paths[@]}"; do
    [[ -z ${skip_note[$p]:-} ]] || notes+=("$p: ${skip_note[$p]}")
    [[ -z ${late_note[$p]:-} ]] || notes+=("$p: ${late_note[$p]}")
    for f in "$tmp/results/$p".*.fail; do
      [[ -s $f ]] || continue
      id=${f#"$tmp/results/$p."}
      id=${id%.fail}
      notes+=("$p $id: $(wc -l <"$f")/$rounds failed: $(head -n 1 "$f")")
    done
  done
  [[ -z $mysql_note ]] || notes+=("$mysql_note")
  [[ -z $cloudsql_note ]] || notes+=("$cloudsql_note")
  for m in "${cs_notes[@]}"; do notes+=("Cloud SQL: $m"); done
  for f in "$tmp/results/cloudsql"/*.fail; do
    [[ -s $f ]] || continue
    id=${f#"$tmp/results/cloudsql/"}
    id=${id%.fail}
    notes+=("Cloud SQL ${id%%.*} ${id#*.}: $(wc -l <"$f") failed: $(head -n 1 "$f")")
  done
  [[ -z $via_note ]] || notes+=("$via_note")
  for f in "$tmp/results/via"/*.fail; do
    [[ -s $f ]] || continue
    id=${f#"$tmp/results/via/"}
    id=${id%.fail}
    notes+=("via= ${id%%.*} ${id#*.}: $(wc -l <"$f")/$rounds failed: $(head -n 1 "$f")")
  done
  [[ -z $fd_note ]] || notes+=("$fd_note")
  if [[ " ${paths[*]} " == *" pgbouncer "* ]]; then
    notes+=("pgbouncer reuses its server connections (session pooling), so its -C figure measures pooling, not proxying")
  fi
  [[ -z $my_pid ]] || notes+=("sysbench 1.0 asks for TLS on the direct path but its client library does not verify the certificate; the other direct clients verify it")
  ((!run_main || idle_large >= 10000)) || notes+=("fewer than 10,000 idle connections this run: the 'held' target is not judged")
  printf '\n## Notes\n\n'
  for m in "${notes[@]}"; do printf -- '- %s\n' "$m"; done
  printf '\n## Samples\n\nOne value per round; cpu_tps_*: the proxy'"'"'s CPU microseconds per pgbench transaction.'
  # shellcheck disable=SC2016 # markdown's backquotes
  ((${#cs_keys[@]} == 0)) || printf ' Cloud SQL (path `cloudsql KEY`): cs_tps_*, cs_cpu_* (the proxy'"'"'s CPU µs per transaction or connection), cs_fake_* (the fake'"'"'s), cs_api_* (API requests during the run), cs_first (ms), per round; cs_first has %d values per round.' "$first_runs"
  # shellcheck disable=SC2016 # markdown's backquotes
  ((${#via_keys[@]} == 0)) || printf ' via= (path `via KEY`): via_tps_*, via_lat_* (ms), via_cpu_* (keyhole and its ssh, CPU µs per transaction or connection), via_hop_* (the hop'"'"'s), per round; via_login (ms), once.'
  printf '\n\n| path | metric | values |\n|---|---|---|\n'
  for p in "${paths[@]}"; do
    for f in "$tmp/results/$p".*; do
      [[ -s $f && $f != *.fail ]] || continue
      printf '| %s | %s | %s |\n' "$p" "${f#"$tmp/results/$p."}" \
        "$(awk '{ printf "%s%.3f", (NR > 1 ? ", " : ""), $1 }' "$f")"
    done
  done
  for p in "${cs_keys[@]}"; do
    for f in "$tmp/results/cloudsql/$p".*; do
      [[ -s $f && $f != *.fail ]] || continue
      printf '| cloudsql %s | %s | %s |\n' "$p" "${f#"$tmp/results/cloudsql/$p."}" \
        "$(awk '{ printf "%s%.3f", (NR > 1 ? ", " : ""), $1 }' "$f")"
    done
  done
  for p in "${via_keys[@]}"; do
    for f in "$tmp/results/via/$p".*; do
      [[ -s $f && $f != *.fail ]] || continue
      printf '| via %s | %s | %s |\n' "$p" "${f#"$tmp/results/via/$p."}" \
        "$(awk '{ printf "%s%.3f", (NR > 1 ? ", " : ""), $1 }' "$f")"
    done
  done
}

# --- JSON ------------------------------------------------------------------------
json_str() {
  local s=$1
  s=${s//\\/\\\\}
  s=${s//\"/\\\"}
  s=${s//$'\n'/\\n}
  s=${s//$'\t'/\\t}
  s=${s//$'\r'/}
  printf '"%s"' "$s"
}

# json_samples FILE: [1.0, 2.0]
json_samples() {
  if [[ -s $1 ]]; then
    awk 'BEGIN { printf "[" } { printf "%s%.6f", (NR > 1 ? ", " : ""), $1 } END { printf "]" }' "$1"
  else
    printf '[]'
  fi
}

json_failures() {
  local line first=1
  printf '['
  if [[ -s $1 ]]; then
    while IFS= read -r line; do
      ((first)) || printf ', '
      first=0
      json_str "$line"
    done <"$1"
  fi
  printf ']'
}

report_json() {
  local id server label unit format kind target p first_p m d ratio met f name
  # (the rows of "metrics" so far: the main ones, then the Cloud SQL ones)
  json_rows=0
  printf '{\n  "date": %s,\n  "quick": %s,\n' "$(json_str "$(date -u '+%Y-%m-%dT%H:%M:%SZ')")" \
    "$( ((quick)) && echo true || echo false)"
  printf '  "machine": {"nproc": %d, "cpu": %s, "memory_gib": %s, "kernel": %s, "load_before": %s, "load_after": %s},\n' \
    "$(nproc)" "$(json_str "$(cpu_model)")" "$(memory_gib)" "$(json_str "$(uname -r)")" \
    "$(json_str "$load_start")" "$(json_str "$load_end")"
  printf '  "versions": {"postgres": %s, "pgbench": %s' "$(json_str "$(version_of postgres)")" \
    "$(json_str "$(version_of pgbench)")"
  [[ -z $my_pid ]] || printf ', "mariadb": %s, "sysbench": %s' "$(json_str "$(version_of mariadb)")" \
    "$(json_str "$(version_of sysbench)")"
  for p in "${paths[@]}"; do
    [[ $p == direct || -n ${skip_note[$p]:-} ]] && continue
    printf ', %s: %s' "$(json_str "$p")" "$(json_str "$(version_of "$p")")"
  done
  printf '},\n'
  printf '  "settings": {"rounds": %d, "duration_s": %d, "pgbench_clients": [%s], "conn_clients": %d, "scale": %d, "copy_bytes": %d, "stream_bytes": %d, "idle_conns": %d, "idle_large": %d, "mysql_threads": %d, "mysql_table_size": %d, "mysql_bulk_bytes": %d, "cloudsql_clients": %d, "first_runs": %d, "via_duration_s": %d, "only": %s, "rounds_seconds": %d, "fd_note": %s},\n' \
    "$rounds" "$duration" "$(
      IFS=,
      printf '%s' "${pgbench_clients[*]}"
    )" "$conn_clients" "$scale" "$copy_bytes" "$stream_bytes" "$idle_conns" "$idle_large" \
    "$mysql_threads" "$mysql_table_size" "$my_bytes" "$cs_clients" "$first_runs" "$via_duration" \
    "$(json_str "$only")" "$rounds_took" \
    "$(json_str "$fd_note")"
  printf '  "paths": {'
  first_p=1
  for p in "${paths[@]}"; do
    ((first_p)) || printf ', '
    first_p=0
    printf '%s: {"ran": %s, "note": %s}' "$(json_str "$p")" \
      "$([[ -z ${skip_note[$p]:-} ]] && echo true || echo false)" \
      "$(json_str "${skip_note[$p]:-${late_note[$p]:-}}")"
  done
  printf '},\n'
  report_cs_json_head
  report_via_json
  printf '  "metrics": [\n'
  while IFS='|' read -r id server label unit format kind target; do
    ((json_rows == 0)) || printf ',\n'
    json_rows=$((json_rows + 1))
    met=null
    if [[ -n $target ]]; then
      case $(target_met "$id" "$target") in yes) met=true ;; no) met=false ;; esac
    fi
    printf '    {"id": %s, "server": %s, "label": %s, "unit": %s, "kind": %s, "target": %s, "target_met": %s, "results": {' \
      "$(json_str "$id")" "$(json_str "$server")" "$(json_str "$label")" "$(json_str "$unit")" \
      "$(json_str "$kind")" "$(json_str "$target")" "$met"
    first_p=1
    d=$(median "$tmp/results/direct.$id") || d=""
    for p in "${paths[@]}"; do
      served "$p" "$server" || continue
      [[ $p == direct && $kind == proxy ]] && continue
      ((first_p)) || printf ', '
      first_p=0
      ratio=null
      if m=$(median "$tmp/results/$p.$id"); then
        if [[ -n $d && $kind == ratio ]]; then
          ratio=$(awk -v a="$m" -v b="$d" 'BEGIN { if (b > 0) printf "%.4f", a / b; else printf "null" }')
        fi
      else
        m=null
      fi
      printf '%s: {"samples": %s, "median": %s, "ratio_to_direct": %s, "failures": %s}' \
        "$(json_str "$p")" "$(json_samples "$tmp/results/$p.$id")" "$m" "$ratio" \
        "$(json_failures "$tmp/results/$p.$id.fail")"
    done
    printf '}}'
  done < <(report_metrics)
  report_cs_json_metrics
  printf '\n  ],\n  "other_samples": {'
  first_p=1
  for p in "${paths[@]}"; do
    for f in "$tmp/results/$p".cpu_tps_* "$tmp/results/$p".open_*; do
      [[ -s $f ]] || continue
      name=${f#"$tmp/results/$p."}
      ((first_p)) || printf ', '
      first_p=0
      printf '%s: %s' "$(json_str "$p.$name")" "$(json_samples "$f")"
    done
  done
  for p in "${cs_keys[@]}"; do
    for f in "$tmp/results/cloudsql/$p".cs_api_* "$tmp/results/cloudsql/$p".cs_fake_c; do
      [[ -s $f ]] || continue
      name=${f#"$tmp/results/cloudsql/$p."}
      ((first_p)) || printf ', '
      first_p=0
      printf '%s: %s' "$(json_str "cloudsql.$p.$name")" "$(json_samples "$f")"
    done
  done
  printf '}\n}\n'
}

# The "cloudsql" object: whether the Cloud SQL workloads ran, the fake, the columns.
report_cs_json_head() {
  local key first=1 m
  printf '  "cloudsql": {"ran": %s, "note": %s' \
    "$( ((${#cs_keys[@]} > 0)) && echo true || echo false)" "$(json_str "$cloudsql_note")"
  if ((${#cs_keys[@]} > 0)); then
    printf ', "instance": %s, "api": %s, "proxy": %s, "baseline": "keyhole@pg", "api_requests_during_runs": %d, "columns": {' \
      "$(json_str "$cs_instance")" "$(json_str "$cs_api")" "$(json_str "$cs_proxy")" "$(cs_api_requests)"
    for key in "${cs_keys[@]}"; do
      ((first)) || printf ', '
      first=0
      printf '%s: %s' "$(json_str "$key")" "$(json_str "$(cs_column_text "$key")")"
    done
    printf '}'
  fi
  printf ', "notes": ['
  first=1
  for m in "${cs_notes[@]}"; do
    ((first)) || printf ', '
    first=0
    json_str "$m"
  done
  printf ']},\n'
}

# The Cloud SQL rows of "metrics" (server "cloudsql"; results by column; ratios to
# direct@pg and to the baseline keyhole@pg), after the main rows (json_rows of them).
report_cs_json_metrics() {
  local id label unit format kind keys target key first met m d b rd rb f
  while IFS='|' read -r id label unit format kind keys target; do
    met=null
    if [[ -n $target ]]; then
      case $(cs_target_met "$id" "$target") in yes) met=true ;; no) met=false ;; esac
    fi
    ((json_rows == 0)) || printf ','
    json_rows=$((json_rows + 1))
    printf '\n    {"id": %s, "server": "cloudsql", "label": %s, "unit": %s, "kind": %s, "baseline": "keyhole@pg", "target": %s, "target_met": %s, "results": {' \
      "$(json_str "$id")" "$(json_str "$label")" "$(json_str "$unit")" "$(json_str "$kind")" \
      "$(json_str "$target")" "$met"
    d=$(median "$tmp/results/cloudsql/direct@pg.$id") || d=""
    b=$(median "$tmp/results/cloudsql/keyhole@pg.$id") || b=""
    first=1
    for key in "${cs_keys[@]}"; do
      [[ " $keys " == *" $key "* ]] || continue
      ((first)) || printf ', '
      first=0
      f=$tmp/results/cloudsql/$key.$id
      rd=null rb=null
      if m=$(median "$f"); then
        if [[ $kind == ratio ]]; then
          [[ -z $d ]] || rd=$(awk -v a="$m" -v b="$d" 'BEGIN { if (b > 0) printf "%.4f", a / b; else printf "null" }')
          [[ -z $b || $key == direct@pg ]] || rb=$(awk -v a="$m" -v b="$b" 'BEGIN { if (b > 0) printf "%.4f", a / b; else printf "null" }')
        fi
      else
        m=null
      fi
      printf '%s: {"samples": %s, "median": %s, "ratio_to_direct": %s, "ratio_to_baseline": %s, "failures": %s}' \
        "$(json_str "$key")" "$(json_samples "$f")" "$m" "$rd" "$rb" "$(json_failures "$f.fail")"
    done
    printf '}}'
  done < <(report_cs_metrics)
}

# --- chart -----------------------------------------------------------------------
# chart_data FILE ID:LABEL... : one line per metric: label, then the median for each
# proxy that ran (ratio to direct for ratio rows, else the value), then keyhole's
# target ("NaN" where there is none).
chart_data() {
  local file=$1 item id label kind target p m d line
  shift
  : >"$file"
  for item in "$@"; do
    id=${item%%:*}
    label=${item#*:}
    kind=$(report_metrics | awk -F'|' -v id="$id" '$1 == id { print $6 }')
    target=$(report_metrics | awk -F'|' -v id="$id" '$1 == id { print $7 }')
    [[ -n $kind ]] || continue
    line="\"$label\""
    for p in "${chart_paths[@]}"; do
      if m=$(median "$tmp/results/$p.$id"); then
        if [[ $kind == ratio ]]; then
          if d=$(median "$tmp/results/direct.$id"); then
            m=$(awk -v a="$m" -v b="$d" 'BEGIN { if (b > 0) printf "%.4f", a / b; else printf "NaN" }')
          else
            m=NaN
          fi
        fi
      else
        m=NaN
      fi
      line+=" $m"
    done
    case $target in
    ratio\>=*) line+=" ${target#ratio>=}" ;;
    max\<=*) line+=" ${target#max<=}" ;;
    *) line+=" NaN" ;;
    esac
    printf '%s\n' "$line" >>"$file"
  done
}

report_chart() {
  local png=$1 dir=$tmp/chart n i p title cap=2.5
  command -v gnuplot >/dev/null 2>&1 || {
    keyhole_warn "gnuplot not found: no chart (Debian package gnuplot-nox)"
    return 0
  }
  mkdir -p "$dir"
  chart_paths=()
  while IFS= read -r p; do
    [[ $p == direct ]] || chart_paths+=("$p")
  done < <(ran_paths)
  n=${#chart_paths[@]}
  ((n > 0)) || return 0
  local c ratio_items=()
  for c in "${pgbench_clients[@]}"; do ratio_items+=("tps_s$c:-S -c$c"); done
  ratio_items+=("tps_c:-C" "copy_out_mbs:COPY out" "copy_in_mbs:COPY in" "syn_mbs:synthetic")
  [[ -z $my_pid ]] || ratio_items+=("my_tps:MySQL select" "my_bulk_mbs:MySQL bulk")
  chart_data "$dir/ratio.dat" "${ratio_items[@]}"
  local cpu_items=("copy_out_cpu:COPY out" "copy_in_cpu:COPY in" "syn_cpu:synth")
  [[ -z $my_pid ]] || cpu_items+=("my_bulk_cpu:MySQL")
  chart_data "$dir/cpu.dat" "${cpu_items[@]}"
  chart_data "$dir/rss.dat" "rss_pg:$idle_conns, PostgreSQL" "rss_syn:$idle_large, synthetic"
  title="keyhole benchmark, $(date -u '+%Y-%m-%d'), $(nproc) cores, medians of $rounds round(s)"
  ((quick)) && title+=" (quick mode)"
  # shellcheck disable=SC2016 # gnuplot's $0, not the shell's
  {
    printf 'set terminal pngcairo size 1800,620 font "sans,10"\n'
    printf 'set output "%s"\n' "$png"
    printf 'set datafile missing "NaN"\n'
    printf 'set style fill solid 0.85 border -1\n'
    printf 'set key top right opaque\nset grid ytics\nset xtics nomirror\nset ytics nomirror\n'
    printf 'set multiplot title "%s"\n' "$title"
    printf 'n = %d\nw = 0.8 / n\n' "$n"
    printf 'colors = "#1f77b4 #ff7f0e #2ca02c #d62728 #9467bd"\n'
    printf 'names = "%s"\n' "${chart_paths[*]}"
    printf 'cap = %s\n' "$cap"
    # Panel 1: ratios to direct (higher is better), capped; the cap shows the value.
    printf 'set origin 0,0\nset size 0.52,0.95\n'
    printf 'set title "ratio to direct (higher is better; red: keyhole target)"\n'
    printf 'set yrange [0:cap * 1.08]\nset xrange [-0.6:%s]\n' "$(($(wc -l <"$dir/ratio.dat") - 1)).6"
    printf 'set arrow 1 from graph 0, first 1 to graph 1, first 1 nohead dt 2 lc rgb "black"\n'
    printf 'plot "%s" using 0:(NaN):xtic(1) notitle, \\\n' "$dir/ratio.dat"
    printf '  for [k=1:n] "%s" using ($0 + (k - (n + 1) / 2.0) * w):(column(k+1) > cap ? cap : column(k+1)):(w) with boxes lc rgb word(colors, k) title word(names, k), \\\n' "$dir/ratio.dat"
    printf '  for [k=1:n] "%s" using ($0 + (k - (n + 1) / 2.0) * w):(cap):(column(k+1) > cap ? sprintf("%%.1f", column(k+1)) : "") with labels offset 0,0.6 font ",8" notitle, \\\n' "$dir/ratio.dat"
    printf '  "%s" using ($0 - 0.45):(column(n+2)):(0.9):(0) with vectors nohead lw 3 lc rgb "red" notitle\n' "$dir/ratio.dat"
    printf 'unset arrow 1\n'
    # Panel 2: CPU s/GB (lower is better).
    printf 'set origin 0.52,0\nset size 0.26,0.95\n'
    printf 'set title "proxy CPU s/GB (lower is better)"\nset yrange [0:*]\nunset key\n'
    printf 'set xrange [-0.6:%s]\n' "$(($(wc -l <"$dir/cpu.dat") - 1)).6"
    printf 'plot "%s" using 0:(NaN):xtic(1) notitle, \\\n' "$dir/cpu.dat"
    printf '  for [k=1:n] "%s" using ($0 + (k - (n + 1) / 2.0) * w):(column(k+1)):(w) with boxes lc rgb word(colors, k) title word(names, k), \\\n' "$dir/cpu.dat"
    printf '  "%s" using ($0 - 0.45):(column(n+2)):(0.9):(0) with vectors nohead lw 3 lc rgb "red" notitle\n' "$dir/cpu.dat"
    # Panel 3: RSS per idle connection.
    printf 'set origin 0.78,0\nset size 0.22,0.95\n'
    printf 'set title "RSS KiB per idle connection (lower is better)"\nset yrange [0:*]\n'
    printf 'set xrange [-0.6:%s]\n' "$(($(wc -l <"$dir/rss.dat") - 1)).6"
    printf 'plot "%s" using 0:(NaN):xtic(1) notitle, \\\n' "$dir/rss.dat"
    printf '  for [k=1:n] "%s" using ($0 + (k - (n + 1) / 2.0) * w):(column(k+1)):(w) with boxes lc rgb word(colors, k) title word(names, k), \\\n' "$dir/rss.dat"
    printf '  "%s" using ($0 - 0.45):(column(n+2)):(0.9):(0) with vectors nohead lw 3 lc rgb "red" notitle\n' "$dir/rss.dat"
    printf 'unset multiplot\n'
  } >"$dir/chart.gp"
  if ! gnuplot "$dir/chart.gp" 2>"$dir/gnuplot.err"; then
    keyhole_warn "gnuplot failed; no chart:"
    sed 's/^/  /' "$dir/gnuplot.err" | head -n 10 >&2
    return 0
  fi
  [[ ! -s $dir/gnuplot.err ]] || sed 's/^/  gnuplot: /' "$dir/gnuplot.err" | head -n 5 >&2
  i=$(wc -c <"$png")
  keyhole_log "chart written to $png ($i bytes)"
}

# report_write: the report on stdout, or into $out_dir (bench.md, bench.json, bench.png).
report_write() {
  if [[ -z $out_dir ]]; then
    report_markdown
    return 0
  fi
  report_markdown >"$out_dir/bench.md"
  report_json >"$out_dir/bench.json"
  # (the chart is of the main table)
  ((!run_main)) || report_chart "$out_dir/bench.png"
  if ((run_main)); then
    keyhole_log ""
    report_table
  fi
  if ((${#cs_keys[@]} > 0)); then
    keyhole_log ""
    keyhole_log "Cloud SQL connector (ratios to keyhole -> PostgreSQL):"
    report_cs_table
  fi
  if ((${#via_keys[@]} > 0)); then
    keyhole_log ""
    keyhole_log "Hops, via= (ratios to keyhole direct):"
    report_via_table
  fi
  keyhole_log ""
  report_targets_line
  keyhole_log ""
  keyhole_log "written: $out_dir/bench.md, $out_dir/bench.json$([[ -s $out_dir/bench.png ]] && printf ', %s' "$out_dir/bench.png")"
}
