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
  max\<=*) printf '≤ %s' "${1#max<=}" ;;
  held) printf '10,000 held, no error' ;;
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
  printf -- '- settings: %d round(s), median kept, paths alternating; pgbench -S -c %s and -S -C -c %d, -T %d, scale %d; COPY out and in %d bytes; synthetic stream %d bytes; idle connections %d (PostgreSQL) and %d (synthetic)' \
    "$rounds" "${pgbench_clients[*]}" "$conn_clients" "$duration" "$scale" "$copy_bytes" \
    "$stream_bytes" "$idle_conns" "$idle_large"
  [[ -z $my_pid ]] || printf '; sysbench oltp_point_select %d threads, -T %d, %d rows; MySQL bulk read %d bytes' \
    "$mysql_threads" "$duration" "$mysql_table_size" "$my_bytes"
  printf '\n- servers: %s, TLS only (hostssl, md5); the synthetic upstream (benches/synthetic.rs)' "$(version_of postgres)"
  [[ -z $my_pid ]] || printf '; %s, require_secure_transport=ON' "$(version_of mariadb)"
  printf '; all on this machine\n'
  printf -- '- clients: %s' "$(version_of pgbench)"
  [[ -z $my_pid ]] || printf ', %s, %s' "$(version_of sysbench)" "$(mariadb --version 2>/dev/null | head -n 1)"
  printf '\n'
  for p in "${paths[@]}"; do
    [[ $p == direct || -n ${skip_note[$p]:-} ]] && continue
    printf -- '- %s: %s\n' "$p" "$(version_of "$p")"
  done
  printf '\n'
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
  [[ -z $fd_note ]] || notes+=("$fd_note")
  if [[ " ${paths[*]} " == *" pgbouncer "* ]]; then
    notes+=("pgbouncer reuses its server connections (session pooling), so its -C figure measures pooling, not proxying")
  fi
  [[ -z $my_pid ]] || notes+=("sysbench 1.0 asks for TLS on the direct path but its client library does not verify the certificate; the other direct clients verify it")
  ((idle_large >= 10000)) || notes+=("fewer than 10,000 idle connections this run: the 'held' target is not judged")
  printf '\n## Notes\n\n'
  for m in "${notes[@]}"; do printf -- '- %s\n' "$m"; done
  printf '\n## Samples\n\nOne value per round; cpu_tps_*: the proxy'"'"'s CPU microseconds per pgbench transaction.\n\n'
  printf '| path | metric | values |\n|---|---|---|\n'
  for p in "${paths[@]}"; do
    for f in "$tmp/results/$p".*; do
      [[ -s $f && $f != *.fail ]] || continue
      printf '| %s | %s | %s |\n' "$p" "${f#"$tmp/results/$p."}" \
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
  local id server label unit format kind target p first_m=1 first_p m d ratio met f name
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
  printf '  "settings": {"rounds": %d, "duration_s": %d, "pgbench_clients": [%s], "conn_clients": %d, "scale": %d, "copy_bytes": %d, "stream_bytes": %d, "idle_conns": %d, "idle_large": %d, "mysql_threads": %d, "mysql_table_size": %d, "mysql_bulk_bytes": %d, "rounds_seconds": %d, "fd_note": %s},\n' \
    "$rounds" "$duration" "$(
      IFS=,
      printf '%s' "${pgbench_clients[*]}"
    )" "$conn_clients" "$scale" "$copy_bytes" "$stream_bytes" "$idle_conns" "$idle_large" \
    "$mysql_threads" "$mysql_table_size" "$my_bytes" "$rounds_took" "$(json_str "$fd_note")"
  printf '  "paths": {'
  first_p=1
  for p in "${paths[@]}"; do
    ((first_p)) || printf ', '
    first_p=0
    printf '%s: {"ran": %s, "note": %s}' "$(json_str "$p")" \
      "$([[ -z ${skip_note[$p]:-} ]] && echo true || echo false)" \
      "$(json_str "${skip_note[$p]:-${late_note[$p]:-}}")"
  done
  printf '},\n  "metrics": [\n'
  while IFS='|' read -r id server label unit format kind target; do
    ((first_m)) || printf ',\n'
    first_m=0
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
  printf '}\n}\n'
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
  report_chart "$out_dir/bench.png"
  keyhole_log ""
  report_table
  keyhole_log ""
  report_targets_line
  keyhole_log ""
  keyhole_log "written: $out_dir/bench.md, $out_dir/bench.json$([[ -s $out_dir/bench.png ]] && printf ', %s' "$out_dir/bench.png")"
}
