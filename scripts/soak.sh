#!/usr/bin/env bash
#
# scripts/soak.sh: keyhole's soak benchmark (issue 15). Not a test, and CI does not run
# it: many connections held through one keyhole for a long time, with a trickle of
# queries on them and new connections coming and going beside them, while keyhole's
# memory and file descriptors are watched. A leak per query, per connection or per
# second shows as a slope in the memory curve, or as descriptors left over at the end.
#
#   scripts/soak.sh             run it (defaults: 10,000 connections for 10 minutes)
#   scripts/soak.sh --help      this text
#
# On 127.0.0.1 only: the synthetic TLS-only PostgreSQL upstream (`synthetic upstream`,
# benches/synthetic.rs, with a fresh CA and server certificate from certs/generate.sh),
# keyhole in front of it (release build, verifying the server's certificate, no
# KEYHOLE_* or proxy variables from the caller's environment), and `synthetic soak`
# as the clients:
#   1. one connection through keyhole (so one-time setup is not counted), then keyhole's
#      VmRSS, open descriptors (/proc/PID/fd) and CPU time (utime + stime from
#      /proc/PID/stat) before the load;
#   2. SOAK_CONNS connections opened (64 at a time), logged in, `select 1` on each, then
#      held SOAK_SECONDS seconds. Each runs `select 1` every SOAK_TRICKLE seconds (spread
#      evenly, not all at once), and SOAK_CHURN new connections a second are opened,
#      logged in, run one query and closed (Terminate). An error on a held connection
#      is counted and the connection opened again; any error fails the run;
#   3. the connections closed; descriptors counted again once keyhole has let them go.
# keyhole's VmRSS, descriptors and CPU time are sampled every SOAK_SAMPLE seconds from
# before the load until after it into a CSV (seconds since the first sample, phase:
# pre, opening, held, closing or after, rss_kib, fds, cpu_s, and the client's counts
# from its latest progress line: held, queries, churn, errors).
#
# Figures and verdicts, printed at the end and written to OUT/SUMMARY.md:
#   plateau RSS   the samples of the held period (all connections open): the first, the
#                 last and their mean
#   per connection  (mean plateau RSS - RSS before the load) / connections held; target
#                 (docs/performance.md, scripts/bench.sh): <= 16 KiB RSS per idle connection (stated
#                 at 1,000; here at SOAK_CONNS, with queries and churn on top)
#   slope         least squares of RSS over the held period, in KiB per minute. "Flat"
#                 when it moves RSS by less than 0.5% of the plateau in 10 minutes. At
#                 10,000 connections (a plateau near 100 MiB) that is about 50 KiB a
#                 minute: a leak of 45 bytes per churned connection (20 a second) or of
#                 3 bytes per query (about 330 a second) would cross it, while the
#                 allocator's own movement under a steady load stays well below
#   fd leak       none when the count after the load equals the count before it
# Any verdict that fails, or an error in the client, fails the run (exit 1), after the
# summary is written.
#
# Output (OUT: SOAK_OUT, default benches/results/soak in the repository):
#   OUT/soak-YYYYMMDD.csv   the samples
#   OUT/soak-YYYYMMDD.png   RSS and descriptors over time, and the held period zoomed
#                           with its least-squares line (gnuplot; skipped, with a note,
#                           when gnuplot is not installed)
#   OUT/SUMMARY.md          the summary of this run (overwritten by the next one)
#
# Open files: keyhole holds 2 descriptors per connection (client and server side), the
# upstream and the client 1 each, and each a few more: the open-files limit is raised
# to 2 * SOAK_CONNS + 256. Raising the hard limit needs CAP_SYS_RESOURCE (root, usually);
# where it cannot be raised, the connection count is lowered to what fits (rounded down
# to a hundred) and the summary says so.
#
# Environment:
#   SOAK_CONNS=N          connections held (default 10000)
#   SOAK_SECONDS=N        how long they are held once all are open (default 600)
#   SOAK_TRICKLE=SECONDS  a `select 1` on each held connection this often (default 30)
#   SOAK_CHURN=N          new short connections a second (default 20; 0 for none)
#   SOAK_SAMPLE=SECONDS   sampling interval (default 10)
#   SOAK_OUT=DIR          where the CSV, the PNG and SUMMARY.md go
#   SOAK_NOTE=TEXT        a line for the summary (e.g. where the binaries came from)
#   SOAK_LOG_DIR=DIR      copy keyhole's, the upstream's and the client's logs here
#   KEYHOLE_BIN=PATH      use this keyhole binary instead of building one
#   SOAK_SYNTHETIC_BIN=PATH  use this synthetic binary instead of building one
# With the defaults a run takes about 12 minutes, plus the builds.
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

case ${1:-} in
"") ;;
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

# --- settings --------------------------------------------------------------------
conns=${SOAK_CONNS:-10000}
seconds=${SOAK_SECONDS:-600}
trickle=${SOAK_TRICKLE:-30}
churn=${SOAK_CHURN:-20}
sample=${SOAK_SAMPLE:-10}
out_dir=${SOAK_OUT:-benches/results/soak}
[[ $out_dir == /* ]] || out_dir=$caller_dir/$out_dir
log_dir=${SOAK_LOG_DIR:-}
[[ -z $log_dir || $log_dir == /* ]] || log_dir=$caller_dir/$log_dir
note=${SOAK_NOTE:-}
for setting in conns:SOAK_CONNS seconds:SOAK_SECONDS; do
  var=${setting%%:*}
  [[ ${!var} =~ ^[1-9][0-9]*$ ]] ||
    keyhole_die "${setting#*:}: '${!var}' is not a positive whole number"
done
for setting in trickle:SOAK_TRICKLE sample:SOAK_SAMPLE churn:SOAK_CHURN; do
  var=${setting%%:*}
  [[ ${!var} =~ ^[0-9]+(\.[0-9]+)?$ ]] || keyhole_die "${setting#*:}: '${!var}' is not a number"
done
awk -v t="$trickle" -v s="$sample" 'BEGIN { exit !(t > 0 && s >= 1) }' ||
  keyhole_die "SOAK_TRICKLE must be above 0 and SOAK_SAMPLE at least 1"
if ! mkdir -p "$out_dir" 2>/dev/null || [[ ! -w $out_dir ]]; then
  keyhole_die "cannot write into $out_dir"
fi
# RSS may move by less than this share of the plateau in 10 minutes for "slope flat".
readonly slope_limit=0.005
limit_pct=$(awk -v l="$slope_limit" 'BEGIN { printf "%g", 100 * l }')
# The target for RSS per idle connection (docs/performance.md), in KiB.
readonly target_kib=16
stamp=$(date +%Y%m%d)
csv=$out_dir/soak-$stamp.csv
png=$out_dir/soak-$stamp.png
summary=$out_dir/SUMMARY.md

# --- state the cleanup needs -------------------------------------------------------
tmp=""
up_pid=""
kh_pid=""
client_pid=""

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  set +e
  keyhole_stop_pid "$client_pid"
  keyhole_stop_pid "$kh_pid"
  keyhole_stop_pid "$up_pid"
  if [[ -n $tmp ]]; then
    if ((rc != 0 && rc != 130)); then
      for log in keyhole upstream client; do
        [[ -s $tmp/$log.log ]] || continue
        keyhole_heading "$log log (last lines)"
        tail -n 10 "$tmp/$log.log" | cut -c1-400
      done
    fi
    if [[ -n $log_dir ]]; then
      mkdir -p "$log_dir" && cp "$tmp"/*.log "$log_dir"/ 2>/dev/null
      keyhole_log "logs copied to $log_dir"
    fi
    rm -rf "$tmp"
  fi
  keyhole_exit_report "$rc" \
    "done in $(keyhole_duration "$SECONDS"): keyhole, the upstream and the client are stopped" \
    "interrupted; everything the soak started is stopped and removed" \
    "soak failed (exit %d); everything it started is stopped and removed"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- measuring ---------------------------------------------------------------------
clk_tck=$(getconf CLK_TCK)

# calc EXPR: floating-point arithmetic.
calc() {
  awk "BEGIN { printf \"%.6f\", $* }"
}

rss_kib() {
  awk '$1 == "VmRSS:" { print $2; found = 1 } END { exit !found }' "/proc/$1/status"
}

fd_count() {
  local fds
  fds=$(ls -U "/proc/$1/fd") || return 1
  wc -l <<<"$fds"
}

# cpu_seconds PID: utime + stime of the whole process (all its threads).
cpu_seconds() {
  local stat fields
  stat=$(<"/proc/$1/stat") || return 1
  read -r -a fields <<<"${stat##*) }"
  # fields[0] is field 3 (state): utime is field 14, stime field 15
  calc "($((fields[11] + fields[12]))) / $clk_tck"
}

# The client's latest progress line, as "held,queries,churn,errors" (or ",,,").
client_counts() {
  awk '$1 == "elapsed" || ($1 == "done" && $2 == "elapsed") {
      for (i = 1; i < NF; i++) v[$i] = $(i + 1)
      line = v["held"] "," v["queries"] "," v["churn"] "," v["errors"]
    }
    END { print (line == "" ? ",,," : line) }' "$tmp/client.out"
}

# sample PHASE: one line of the CSV, and one on the terminal.
sample() {
  local phase=$1 t rss fds cpu counts
  kill -0 "$kh_pid" 2>/dev/null || keyhole_die "keyhole (pid $kh_pid) exited during the soak"
  t=$(calc "$EPOCHREALTIME - $t0")
  rss=$(rss_kib "$kh_pid") || keyhole_die "cannot read keyhole's VmRSS"
  fds=$(fd_count "$kh_pid") || keyhole_die "cannot count keyhole's descriptors"
  cpu=$(cpu_seconds "$kh_pid") || keyhole_die "cannot read keyhole's CPU time"
  counts=$(client_counts)
  printf '%.1f,%s,%d,%d,%.2f,%s\n' "$t" "$phase" "$rss" "$fds" "$cpu" "$counts" >>"$csv"
  printf '  %6.0f s  %-7s  RSS %8.1f MiB  fds %6d  CPU %7.1f s  client (held,queries,churn,errors) %s\n' \
    "$t" "$phase" "$(calc "$rss / 1024")" "$fds" "$cpu" "$counts"
  last_fds=$fds
  last_rss=$rss
}

# wait_tick K: sleep until K sampling intervals after the first sample.
wait_tick() {
  local left
  left=$(calc "$t0 + $1 * $sample - $EPOCHREALTIME")
  if awk -v l="$left" 'BEGIN { exit !(l > 0) }'; then sleep "$left"; fi
}

# =================================================================================
# Open files: keyhole 2 per connection; the client and the upstream 1 each.
fd_note=""
asked=$conns
need_fds=$((2 * conns + 256))
hard_fds=$(ulimit -Hn)
if [[ $hard_fds != unlimited ]] && ((hard_fds < need_fds)); then
  if ulimit -Hn "$need_fds" 2>/dev/null; then
    fd_note="open files: the hard limit was raised from $hard_fds to $need_fds"
    hard_fds=$need_fds
  else
    fit=$(((hard_fds - 256) / 2 / 100 * 100))
    ((fit >= 100)) || keyhole_die "open files: the hard limit is $hard_fds, too low for a soak"
    fd_note="open files: the hard limit is $hard_fds and cannot be raised here (ulimit -Hn: not permitted; it needs CAP_SYS_RESOURCE); $conns connections need $need_fds descriptors in keyhole, so $fit were held instead"
    keyhole_warn "$fd_note"
    conns=$fit
    need_fds=$((2 * conns + 256))
  fi
fi
if [[ $hard_fds == unlimited ]]; then soft_fds=$need_fds; else soft_fds=$hard_fds; fi
(($(ulimit -n) >= soft_fds)) || ulimit -n "$soft_fds"
keyhole_log "open files limit: $(ulimit -n) (hard $(ulimit -Hn))"

# =================================================================================
keyhole_release_binary keyhole_heading
synthetic_bin=${SOAK_SYNTHETIC_BIN:-}
if [[ -z $synthetic_bin ]]; then
  keyhole_heading "build the synthetic upstream and client: cargo build --release --example synthetic"
  keyhole_cargo_on_path
  locked=()
  [[ -f Cargo.lock ]] && locked=(--locked)
  cargo build --release "${locked[@]}" --example synthetic ||
    keyhole_die "cargo build --release --example synthetic failed"
  target_dir=${CARGO_TARGET_DIR:-target}
  [[ $target_dir == /* ]] || target_dir=$repo_root/$target_dir
  synthetic_bin=$target_dir/release/examples/synthetic
fi
[[ -x $synthetic_bin ]] || keyhole_die "no synthetic binary at $synthetic_bin"

keyhole_heading "the synthetic upstream and keyhole on 127.0.0.1"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/keyhole-soak.XXXXXX")
"$repo_root/certs/generate.sh" "$tmp/certs" localhost || keyhole_die "certs/generate.sh failed"
up_port=$(keyhole_free_port) || keyhole_die "no free port found"
kh_port=$(keyhole_free_port "$up_port") || keyhole_die "no free port found"
# Sessions of their own, so that a Ctrl-C reaches only this script, whose trap then
# stops them in order.
setsid "$synthetic_bin" upstream --listen "127.0.0.1:$up_port" \
  --cert "$tmp/certs/server.crt" --key "$tmp/certs/server.key" \
  >"$tmp/upstream.log" 2>&1 </dev/null &
up_pid=$!
why=$(keyhole_wait_listening "$up_port" "$up_pid" "the synthetic upstream") || keyhole_die "$why"
# Only the flags configure keyhole: no KEYHOLE_* variable and no proxy setting of the
# caller's.
kh_cmd=(env)
while IFS= read -r var; do kh_cmd+=(-u "$var"); done < <(keyhole_env_names '^KEYHOLE_')
for var in http_proxy https_proxy all_proxy no_proxy HTTP_PROXY HTTPS_PROXY ALL_PROXY NO_PROXY; do
  kh_cmd+=(-u "$var")
done
kh_args=(--port "$kh_port" --max-connections 0 --ca-file "$tmp/certs/ca.crt"
  "postgres://127.0.0.1:$up_port?server-name=localhost")
setsid "${kh_cmd[@]}" "$keyhole_bin" "${kh_args[@]}" >"$tmp/keyhole.log" 2>&1 </dev/null &
kh_pid=$!
why=$(keyhole_wait_listening "$kh_port" "$kh_pid" keyhole) || keyhole_die "$why"
# setsid and env exec the program; whichever forked, find keyhole itself.
for ((i = 0; i < 3; i++)); do
  [[ $(readlink "/proc/$kh_pid/exe" 2>/dev/null) == "$(readlink -f "$keyhole_bin")" ]] && break
  kh_pid=$(pgrep -P "$kh_pid" | head -n 1) || keyhole_die "cannot find keyhole's process"
done
[[ $(readlink "/proc/$kh_pid/exe" 2>/dev/null) == "$(readlink -f "$keyhole_bin")" ]] ||
  keyhole_die "cannot find keyhole's process"
# One connection first: the server sees TLS (it speaks nothing else), and one-time
# setup is not counted as growth.
out=$("$synthetic_bin" stream --connect "127.0.0.1:$kh_port" --bytes 100000 2>&1) ||
  keyhole_die "a connection through keyhole failed: $out"
keyhole_log "upstream on 127.0.0.1:$up_port (pid $up_pid), keyhole on 127.0.0.1:$kh_port (pid $kh_pid): a stream through it works"
sleep 1

# =================================================================================
keyhole_heading "soak: $conns connections held ${seconds} s, select 1 every ${trickle} s on each, $churn new connections a second"
load_start=$(cut -d' ' -f1-3 /proc/loadavg)
if awk -v l="${load_start%% *}" -v n="$(nproc)" 'BEGIN { exit !(l > n / 4) }'; then
  keyhole_warn "load average is $load_start: other work on this machine will add noise"
fi
printf 'seconds,phase,rss_kib,fds,cpu_s,held,queries,churn,errors\n' >"$csv"
: >"$tmp/client.out"
t0=$EPOCHREALTIME
sample pre
rss0=$last_rss
fds0=$last_fds
"$synthetic_bin" soak --connect "127.0.0.1:$kh_port" --count "$conns" --duration "$seconds" \
  --trickle "$trickle" --churn "$churn" >"$tmp/client.out" 2>"$tmp/client.log" </dev/null &
client_pid=$!
client_t=$(calc "$EPOCHREALTIME - $t0")
# The client ends on its own (opening, then SOAK_SECONDS); this is only a backstop.
deadline=$((seconds + 900 + conns / 10))
k=0
while true; do
  k=$((k + 1))
  wait_tick "$k"
  kill -0 "$client_pid" 2>/dev/null || break
  if grep -q '^done ' "$tmp/client.out"; then
    phase=closing
  elif grep -q '^ready ' "$tmp/client.out"; then
    phase=held
  else
    phase=opening
  fi
  sample "$phase"
  if (($(printf '%.0f' "$(calc "$EPOCHREALTIME - $t0")") > deadline)); then
    keyhole_die "the soak client did not finish within $deadline s"
  fi
done
client_rc=0
wait "$client_pid" || client_rc=$?
client_pid=""
keyhole_log "the client exited with status $client_rc"
grep -q '^ready ' "$tmp/client.out" ||
  keyhole_die "the connections did not all open: $(tail -n 1 "$tmp/client.log" | cut -c1-300)"
# keyhole lets go of the connections once both sides are closed: until its descriptors
# are back where they were (or a minute), a sample every interval (the first one at the
# tick that found the client gone); at least two.
for ((n = 1; n <= 6; n++)); do
  if ((n > 1)); then
    k=$((k + 1))
    wait_tick "$k"
  fi
  sample after
  ((n < 2 || last_fds > fds0)) || break
done
fds1=$last_fds
rss1=$last_rss
load_end=$(cut -d' ' -f1-3 /proc/loadavg)

# =================================================================================
ready_n="" open_s="" errors=""
read -r ready_n open_s < <(awk '$1 == "ready" { print $2, $4 }' "$tmp/client.out") || true
read -r done_elapsed held_end queries churned errors < <(
  awk '$1 == "done" { for (i = 2; i < NF; i++) v[$i] = $(i + 1)
    print v["elapsed"], v["held"], v["queries"], v["churn"], v["errors"] }' "$tmp/client.out"
) || true
if [[ -z ${errors:-} ]]; then
  # The client failed before its summary: count its error lines instead.
  done_elapsed="?" held_end="?" queries="?" churned="?"
  errors=$(grep -c '^synthetic' "$tmp/client.log" || true)
fi
# What keyhole logged at WARN or ERROR (the first lines are shown).
kh_warnings=$(grep -cE ' (WARN|ERROR) ' "$tmp/keyhole.log" || true)
if ((kh_warnings > 0)); then
  keyhole_warn "keyhole logged $kh_warnings warning/error lines; the first ones:"
  grep -E ' (WARN|ERROR) ' "$tmp/keyhole.log" | head -n 5 | cut -c1-300 | sed 's/^/  /' >&2
fi
client_errors=$(grep -c '^synthetic' "$tmp/client.log" || true)
if ((client_errors > 0)); then
  keyhole_warn "the client reported $client_errors errors; the first ones:"
  grep '^synthetic' "$tmp/client.log" | head -n 5 | cut -c1-300 | sed 's/^/  /' >&2
fi
ready_s=$(calc "$client_t + $open_s")
# The held period: n, first and last sample, mean, least-squares slope (KiB/min),
# its time span, and keyhole's CPU seconds over it.
read -r h_n h_first h_last h_mean slope h_t0 h_t1 h_cpu < <(awk -F, '
  NR > 1 && $2 == "held" {
    n++; x = $1 / 60; y = $3
    if (n == 1) { first = y; t0 = $1; c0 = $5 }
    last = y; t1 = $1; c1 = $5
    sx += x; sy += y; sxx += x * x; sxy += x * y
  }
  END {
    if (n == 0) { print 0, "-", "-", "-", "-", "-", "-", "-"; exit }
    d = n * sxx - sx * sx
    slope = (n >= 3 && d > 0) ? sprintf("%.2f", (n * sxy - sx * sy) / d) : "-"
    printf "%d %d %d %.0f %s %.1f %.1f %.2f\n", n, first, last, sy / n, slope, t0, t1, c1 - c0
  }' "$csv")
verdicts=()
failed=0
verdict() { # OK TEXT-IF-OK TEXT-IF-NOT
  if (($1)); then verdicts+=("$2: yes"); else
    verdicts+=("$2: NO ($3)")
    failed=1
  fi
}
if [[ $slope == - ]]; then
  slope_text="- (fewer than 3 samples in the held period)"
  slope_pct="-"
  verdict 0 "slope flat" "too few samples to tell"
else
  slope_pct=$(printf '%+.4f' "$(calc "100 * $slope * 10 / $h_mean")")
  slope_text="$slope KiB/min ($slope_pct% of the plateau per 10 minutes; flat: under $limit_pct%)"
  ok=$(awk -v s="$slope" -v m="$h_mean" -v l="$slope_limit" 'BEGIN { print ((s < 0 ? -s : s) * 10 < l * m) ? 1 : 0 }')
  verdict "$ok" "slope flat" "$slope_pct% per 10 minutes"
fi
if [[ $h_mean == - ]]; then
  per_conn="-"
  verdict 0 "per-connection RSS within target" "no sample in the held period"
else
  per_conn=$(printf '%.1f' "$(calc "($h_mean - $rss0) / $conns")")
  ok=$(awk -v p="$per_conn" -v t="$target_kib" 'BEGIN { print (p <= t) ? 1 : 0 }')
  verdict "$ok" "per-connection RSS within target" "$per_conn KiB > $target_kib KiB"
fi
verdict $((fds1 == fds0)) "no fd leak" "$fds0 before, $fds1 after"
verdict $((client_rc == 0 && errors == 0)) "held without an error" "$errors errors, client exit $client_rc"

mib() { printf '%.1f MiB' "$(calc "$1 / 1024")"; }
held_note=""
((conns == asked)) || held_note=" (asked for $asked: see the note on open files)"
max_fds=$(awk -F, 'NR > 1 && $4 > m { m = $4 } END { print m + 0 }' "$csv")
max_rss=$(awk -F, 'NR > 1 && $3 > m { m = $3 } END { print m + 0 }' "$csv")
h_cpu_pct="-"
[[ $h_cpu == - ]] || h_cpu_pct=$(printf '%.1f' "$(calc "100 * $h_cpu / ($h_t1 - $h_t0 + 0.000001)")")

# =================================================================================
plot_note=""
if ! command -v gnuplot >/dev/null 2>&1; then
  plot_note="plot skipped: gnuplot is not installed (Debian package gnuplot-nox)"
  rm -f "$png"
elif [[ $slope == - ]]; then
  plot_note="plot skipped: too few samples in the held period"
  rm -f "$png"
else
  # For the zoomed panel: the held samples' centre (minutes, KiB), through which the
  # least-squares line goes, and the steepest slope still called flat (KiB/min).
  read -r mid_x mid_y < <(awk -F, 'NR > 1 && $2 == "held" { n++; sx += $1 / 60; sy += $3 }
    END { printf "%.4f %.1f\n", sx / n, sy / n }' "$csv")
  flat_slope=$(calc "$slope_limit * $h_mean / 10")
  if gnuplot -e 'set terminal pngcairo' >/dev/null 2>&1; then
    term='pngcairo size 1100,800 font "sans,10"'
  else
    term='png size 1100,800'
  fi
  title="keyhole soak ($(date +%Y-%m-%d)): $conns connections held $seconds s, select 1 every $trickle s on each, $churn new connections/s"
  if ! gnuplot >"$tmp/gnuplot.log" 2>&1 <<EOF; then
set terminal $term
set output "$png"
set datafile separator ","
set multiplot layout 2,1 title "$title"
set grid
set key below horizontal maxrows 1 width 2
set xlabel "time since the first sample (minutes)"
set ylabel "keyhole VmRSS (MiB)"
set y2label "keyhole open file descriptors"
set ytics nomirror
set y2tics
# (RSS at two thirds of the height, so that its line and the descriptors' stay apart)
set yrange [0:$max_rss * 1.5 / 1024.0]
set y2range [0:*]
set arrow 1 from $ready_s/60.0, graph 0 to $ready_s/60.0, graph 1 nohead dashtype 2 lc rgb "gray40"
set label 1 "all $ready_n open" at $ready_s/60.0, graph 0.06 offset 0.5,0 font ",9"
set arrow 2 from ($ready_s + $seconds)/60.0, graph 0 to ($ready_s + $seconds)/60.0, graph 1 nohead dashtype 2 lc rgb "gray40"
set label 2 "load ends" at ($ready_s + $seconds)/60.0, graph 0.06 offset 0.5,0 font ",9"
set title "the whole run: VmRSS (left axis) and open descriptors (right axis), sampled every $sample s"
plot "$csv" every ::1 using (\$1/60):(\$3/1024.0) axes x1y1 with linespoints pt 7 ps 0.5 lw 2 lc rgb "#1f77b4" title "VmRSS (MiB)", \
     "$csv" every ::1 using (\$1/60):4 axes x1y2 with linespoints pt 5 ps 0.4 lw 1.5 lc rgb "#d62728" title "open fds"
unset arrow 1
unset arrow 2
unset label 1
unset label 2
unset y2tics
unset y2label
set ytics mirror
set autoscale y
set xlabel "time since the first sample (minutes)"
set ylabel "keyhole VmRSS (MiB)"
set title "the held period, zoomed: VmRSS and its least-squares line ($slope KiB/min)"
through(x, b) = ($mid_y + b * (x - $mid_x)) / 1024.0
set xrange [$h_t0/60.0:$h_t1/60.0]
plot "$csv" every ::1 using (strcol(2) eq "held" ? \$1/60 : 1/0):(\$3/1024.0) with linespoints pt 7 ps 0.5 lw 2 lc rgb "#1f77b4" title "VmRSS (MiB)", \
     through(x, $slope) with lines dashtype 2 lw 2 lc rgb "black" title "least squares: $slope KiB/min", \
     through(x, $flat_slope) with lines dashtype 3 lw 1 lc rgb "gray50" title "limit of flat: +/-$(printf '%.0f' "$flat_slope") KiB/min ($limit_pct% of the plateau in 10 min)", \
     through(x, -$flat_slope) with lines dashtype 3 lw 1 lc rgb "gray50" notitle
unset multiplot
EOF
    plot_note="plot failed: $(head -n 3 "$tmp/gnuplot.log" | tr '\n' ' ')"
    rm -f "$png"
  fi
fi

# =================================================================================
commit=$(git -C "$repo_root" describe --always --dirty 2>/dev/null || echo unknown)
{
  printf '# keyhole soak benchmark\n\n'
  printf 'Produced by %s on %s. ' "\`scripts/soak.sh\`" "$(date '+%Y-%m-%d %H:%M %Z')"
  printf 'Repository at %s; keyhole %s (%s). ' "$commit" \
    "$("$keyhole_bin" --version 2>/dev/null | awk '{ print $2 }')" \
    "$([[ -n ${KEYHOLE_BIN:-} ]] && echo 'the binary in KEYHOLE_BIN' || echo 'built by the script')"
  printf 'Machine: %s cores, Linux %s; load average %s at the start, %s at the end.\n\n' \
    "$(nproc)" "$(uname -r)" "$load_start" "$load_end"
  printf 'Settings: SOAK_CONNS=%s SOAK_SECONDS=%s SOAK_TRICKLE=%s SOAK_CHURN=%s SOAK_SAMPLE=%s.\n' \
    "$asked" "$seconds" "$trickle" "$churn" "$sample"
  [[ -z $note ]] || printf '\n%s\n' "$note"
  [[ -z $fd_note ]] || printf '\nNote: %s.\n' "$fd_note"
  [[ -z $plot_note ]] || printf '\nNote: %s.\n' "$plot_note"
  printf '\n| figure | value |\n|---|---|\n'
  printf '| connections held | %s%s, all open %.1f s after the client started |\n' "$conns" "$held_note" "$open_s"
  printf '| held for | %s s (the client says %s s), %s samples in the held period |\n' "$seconds" "$done_elapsed" "$h_n"
  printf '| trickle | %s every %s s on each held connection: %s queries |\n' "\`select 1\`" "$trickle" "$queries"
  printf '| churn | %s new connections a second (login, %s, Terminate): %s connections |\n' \
    "$churn" "\`select 1\`" "$churned"
  printf '| errors | %s (client exit status %s); %s held at the end |\n' "$errors" "$client_rc" "$held_end"
  printf '| VmRSS before the load | %s KiB (%s) |\n' "$rss0" "$(mib "$rss0")"
  if [[ $h_mean != - ]]; then
    printf '| VmRSS plateau: first, last, mean | %s, %s, %s KiB (%s, %s, %s) |\n' \
      "$h_first" "$h_last" "$h_mean" "$(mib "$h_first")" "$(mib "$h_last")" "$(mib "$h_mean")"
  fi
  printf '| VmRSS per connection | %s KiB ((mean plateau - before) / %s; target <= %s KiB per idle connection) |\n' \
    "$per_conn" "$conns" "$target_kib"
  printf '| VmRSS slope over the held period | %s |\n' "$slope_text"
  printf '| VmRSS after the connections closed | %s KiB (%s) |\n' "$rss1" "$(mib "$rss1")"
  printf '| open descriptors: before, most, after | %s, %s, %s |\n' "$fds0" "$max_fds" "$fds1"
  printf '| keyhole CPU over the held period | %s s (%s%% of one core) |\n' "$h_cpu" "$h_cpu_pct"
  printf '| keyhole log | %s lines at WARN or ERROR |\n' "$kh_warnings"
  printf '\nVerdicts:\n\n'
  for v in "${verdicts[@]}"; do printf -- '- %s\n' "$v"; done
  printf '\nSamples: [%s](%s) (seconds since the first sample, phase, rss_kib, fds, cpu_s, and the client'"'"'s held, queries, churn and errors from its latest progress line).\n' \
    "\`$(basename "$csv")\`" "$(basename "$csv")"
  if [[ -s $png ]]; then
    printf '\n![keyhole soak: VmRSS and open descriptors over time](%s)\n' "$(basename "$png")"
  fi
} >"$summary"
keyhole_heading "summary (also in ${summary#"$repo_root"/})"
cat "$summary"
if ((failed)); then
  keyhole_die "the soak failed a verdict or had errors (above)"
fi
