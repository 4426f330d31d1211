# shellcheck shell=bash
#
# Shared by scripts/demo.sh and scripts/bench.sh (source it after scripts/lib/packages.sh,
# don't run it): a throwaway PostgreSQL that accepts only TLS, and what it takes to run
# one next to keyhole on a single machine: the keyhole binary, free local ports, waiting
# for a listener, stopping what was started.
#
# A caller goes through it in this order (each step exits through keyhole_die when it
# fails, so run them in the script's own shell, not in $(...)):
#   keyhole_find_pg_tools              sets keyhole_pgbin and keyhole_psql
#   keyhole_release_binary [STEP_CMD]  sets keyhole_bin (KEYHOLE_BIN, or cargo build --release)
#   keyhole_pg_prepare DIR [FOR]       DIR/run, DIR/certs (certs/generate.sh), the server user
#   keyhole_pg_start PORT ROLE METHOD [SETTING...]
#                                      initdb into DIR/pgdata, TLS-only config, pg_ctl start
# and, from its EXIT trap, keyhole_pg_stop MODE before it removes DIR.
# Helpers besides: keyhole_die, keyhole_env_names, keyhole_unset_env, keyhole_stop_pid,
# keyhole_exit_report, keyhole_ports_in_use, keyhole_is_listening, keyhole_free_port,
# keyhole_wait_listening, keyhole_pg_exec, keyhole_as_pg (each described where it is).
#
# The server's files, for the caller to use: DIR/certs/{ca,server,client}.{crt,key},
# DIR/run (the Unix socket directory), DIR/postgres.log, DIR/initdb.log, DIR/pgdata.
# As root, the server (and whatever the caller starts with keyhole_pg_exec) runs as the
# postgres user, or as a system user keyhole-demo made for it; otherwise as the caller.
#
# State, set by the functions above and read by the caller:
#   keyhole_pgbin       the directory of initdb, pg_ctl and postgres
#   keyhole_psql        the psql program
#   keyhole_bin         the keyhole binary
#   keyhole_pg_dir      DIR of keyhole_pg_prepare
#   keyhole_pgdata      DIR/pgdata
#   keyhole_pg_user     the user the server runs as
#   keyhole_pg_started  1 from the moment pg_ctl start is tried until keyhole_pg_stop

keyhole_pgbin=""
keyhole_psql=""
keyhole_bin=""
keyhole_pg_dir=""
keyhole_pgdata=""
keyhole_pg_user=""
keyhole_pg_started=0

# keyhole_die MESSAGE...: print the error and exit 1 (the caller's EXIT trap cleans up).
keyhole_die() {
  printf '\nerror: %s\n' "$*" >&2
  exit 1
}

# keyhole_env_names REGEX: the exported variables whose names match REGEX, one a line.
keyhole_env_names() {
  compgen -e | grep -E "$1" || true
}

# keyhole_unset_env REGEX: unset them, e.g. '^PG' so that no libpq setting of the
# caller's (PGSSLMODE, PGHOST, a service file...) changes what a script shows.
keyhole_unset_env() {
  local name
  while IFS= read -r name; do
    unset "$name"
  done < <(keyhole_env_names "$1")
}

# keyhole_stop_pid PID: SIGTERM, up to 5 s to exit, then SIGKILL; reaps it. An empty
# PID or one already gone is fine.
keyhole_stop_pid() {
  local pid=$1 i
  [[ -n $pid ]] || return 0
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < 50; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
}

# keyhole_exit_report RC DONE INTERRUPTED FAILED: the last words of an EXIT trap:
# DONE as a heading on success, INTERRUPTED for 130 (Ctrl-C), else FAILED, a printf
# format that gets RC.
keyhole_exit_report() {
  local rc=$1
  if ((rc == 0)); then
    keyhole_heading "$2"
  elif ((rc == 130)); then
    printf '\n==> %s\n' "$3" >&2
  else
    # shellcheck disable=SC2059 # the format is the caller's
    printf "\\n==> $4\\n" "$rc" >&2
  fi
}

# --- ports -----------------------------------------------------------------------
# keyhole_ports_in_use: TCP ports in use on this machine (any state, IPv4 and IPv6),
# from /proc/net/tcp*.
keyhole_ports_in_use() {
  local f local_addr
  for f in /proc/net/tcp /proc/net/tcp6; do
    [[ -r $f ]] || continue
    while read -r _ local_addr _; do
      [[ $local_addr == *:* ]] || continue # the header line
      printf '%d\n' $((16#${local_addr##*:}))
    done <"$f"
  done
}

# keyhole_is_listening PORT: something listens on PORT (state 0A is LISTEN).
keyhole_is_listening() {
  local f files=()
  for f in /proc/net/tcp /proc/net/tcp6; do
    [[ -r $f ]] && files+=("$f")
  done
  ((${#files[@]} > 0)) || return 1
  # awk, not a read loop: with tens of thousands of sockets (a benchmark's TIME_WAIT
  # ones) a loop in bash takes seconds per look.
  awk -v p=":$(printf '%04X' "$1")" '$4 == "0A" && $2 ~ (p "$") { found = 1; exit }
    END { exit !found }' "${files[@]}"
}

# keyhole_free_port [EXCLUDED...]: print a port below the kernel's ephemeral range that
# nothing uses and that is none of EXCLUDED (the ports already handed out). Another
# program could take it before it is bound; the script then fails loudly, not wrongly.
keyhole_free_port() {
  local -A used=()
  local p try
  while IFS= read -r p; do used[$p]=1; done < <(keyhole_ports_in_use)
  for p in "$@"; do used[$p]=1; done
  for ((try = 0; try < 500; try++)); do
    p=$((20000 + RANDOM % 12000))
    if [[ -z ${used[$p]:-} ]]; then
      printf '%d\n' "$p"
      return 0
    fi
  done
  return 1
}

# keyhole_wait_listening PORT PID WHAT: wait until PORT listens. Fails, saying why on
# stdout, when PID exits first or 30 s pass.
keyhole_wait_listening() {
  local port=$1 pid=$2 what=$3 i
  for ((i = 0; i < 300; i++)); do
    keyhole_is_listening "$port" && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      printf '%s exited before listening on port %d\n' "$what" "$port"
      return 1
    fi
    sleep 0.1
  done
  printf '%s did not listen on port %d within 30 s\n' "$what" "$port"
  return 1
}

# --- programs --------------------------------------------------------------------
# keyhole_find_pg_tools: set keyhole_pgbin (see keyhole_pg_bindir) and keyhole_psql
# (psql on PATH, else the one next to the server binaries).
keyhole_find_pg_tools() {
  keyhole_pgbin=$(keyhole_pg_bindir) ||
    keyhole_die "PostgreSQL server binaries (initdb, pg_ctl) not found"
  keyhole_psql=$(command -v psql 2>/dev/null || true)
  [[ -n $keyhole_psql ]] || keyhole_psql=$keyhole_pgbin/psql
  [[ -x $keyhole_psql ]] || keyhole_die "psql not found"
}

# keyhole_release_binary [STEP_CMD]: set keyhole_bin to $KEYHOLE_BIN, or build keyhole
# with cargo build --release (--locked when there is a Cargo.lock) and take that one.
# The step is announced with STEP_CMD TITLE (default keyhole_heading).
keyhole_release_binary() {
  local step=${1:-keyhole_heading} root target_dir locked=()
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  if [[ -n ${KEYHOLE_BIN:-} ]]; then
    "$step" "keyhole binary (KEYHOLE_BIN)"
    keyhole_bin=$KEYHOLE_BIN
  else
    "$step" "build keyhole: cargo build --release"
    keyhole_cargo_on_path
    command -v cargo >/dev/null 2>&1 ||
      keyhole_die "cargo not found: install Rust with rustup (https://rustup.rs)"
    [[ -f $root/Cargo.lock ]] && locked=(--locked)
    (cd "$root" && cargo build --release "${locked[@]}" --bin keyhole) ||
      keyhole_die "cargo build --release failed"
    target_dir=${CARGO_TARGET_DIR:-target}
    [[ $target_dir == /* ]] || target_dir=$root/$target_dir
    keyhole_bin=$target_dir/release/keyhole
  fi
  [[ -x $keyhole_bin ]] || keyhole_die "no keyhole binary at $keyhole_bin"
  keyhole_log "keyhole: $keyhole_bin"
}

# --- the server ------------------------------------------------------------------
# keyhole_pg_exec ARGS...: run a command as keyhole_pg_user (postgres refuses root, and
# so does pgbouncer) from keyhole_pg_dir. It replaces the current (sub)shell: run it as
# `keyhole_pg_exec ... &`, and $! is the pid of the program itself.
keyhole_pg_exec() {
  cd "$keyhole_pg_dir" || exit 1
  if ((EUID != 0)); then
    exec "$@"
  fi
  exec setpriv --reuid="$keyhole_pg_user" --regid="$keyhole_pg_user" --init-groups -- "$@"
}

# keyhole_as_pg ARGS...: the same in a subshell, waiting for it.
keyhole_as_pg() {
  (keyhole_pg_exec "$@")
}

# keyhole_pg_prepare DIR [FOR]: DIR (a fresh directory of the caller's, which removes
# it) gets run/ and certs/ (a fresh CA and a server certificate for localhost). As root,
# picks the server's user; FOR says in the note on creating one what it is for
# (default "PostgreSQL (postgres refuses root)").
keyhole_pg_prepare() {
  local dir=$1 for=${2:-"PostgreSQL (postgres refuses root)"} root
  root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  keyhole_pg_dir=$dir
  keyhole_pgdata=$dir/pgdata
  mkdir "$dir/run"
  if ((EUID == 0)); then
    # The distribution's postgres user if there is one, else a system user made for
    # this (it stays, for next time).
    if id -u postgres >/dev/null 2>&1; then
      keyhole_pg_user=postgres
    else
      keyhole_pg_user=keyhole-demo
      if ! id -u "$keyhole_pg_user" >/dev/null 2>&1; then
        keyhole_log "creating system user $keyhole_pg_user to run $for"
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
          --shell /usr/sbin/nologin "$keyhole_pg_user" ||
          keyhole_die "could not create user $keyhole_pg_user"
      fi
    fi
    chmod 0755 "$dir"
    chown "$keyhole_pg_user:" "$dir" "$dir/run"
    keyhole_as_pg test -w "$dir" ||
      keyhole_die "user $keyhole_pg_user cannot write to $dir: point TMPDIR at a directory every user can reach"
  else
    keyhole_pg_user=$(id -un)
  fi
  "$root/certs/generate.sh" "$dir/certs" localhost || keyhole_die "certs/generate.sh failed"
  ((EUID != 0)) || chown -R "$keyhole_pg_user:" "$dir/certs"
}

# keyhole_pg_start PORT ROLE METHOD [SETTING...]: initdb, then start the server on
# 127.0.0.1:PORT with TLS on (DIR/certs/server.*) and fsync off. pg_hba.conf: the Unix
# socket with trust (for the caller's setup, as superuser postgres), TCP with TLS for
# ROLE ("all" for any) with METHOD (also the password_encryption), and nothing else.
# Each SETTING ("name = value") goes into postgresql.conf as well.
keyhole_pg_start() {
  local port=$1 role=$2 method=$3 width
  shift 3
  keyhole_as_pg "$keyhole_pgbin/initdb" -D "$keyhole_pgdata" -A trust -U postgres \
    --no-locale -E UTF8 --no-sync >"$keyhole_pg_dir/initdb.log" 2>&1 || {
    cat "$keyhole_pg_dir/initdb.log" >&2
    keyhole_die "initdb failed"
  }
  {
    cat <<EOF

# --- throwaway TLS-only server (keyhole scripts/lib/pg.sh) ---
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$keyhole_pg_dir/run'
ssl = on
ssl_cert_file = '$keyhole_pg_dir/certs/server.crt'
ssl_key_file = '$keyhole_pg_dir/certs/server.key'
password_encryption = '$method'
fsync = off
EOF
    (($# == 0)) || printf '%s\n' "$@"
  } >>"$keyhole_pgdata/postgresql.conf"
  width=$((${#role} + 2))
  ((width >= 5)) || width=5
  {
    printf '# throwaway server: local socket for setup; over TCP, TLS only (%s).\n' "$method"
    printf "%-10s%-5s%-${width}s%-14s%s\n" local all all "" trust \
      hostssl all "$role" 127.0.0.1/32 "$method" \
      hostnossl all all 0.0.0.0/0 reject
  } >"$keyhole_pgdata/pg_hba.conf"
  keyhole_pg_started=1
  keyhole_as_pg "$keyhole_pgbin/pg_ctl" -D "$keyhole_pgdata" -l "$keyhole_pg_dir/postgres.log" \
    -w -t 60 start >/dev/null || keyhole_die "PostgreSQL did not start"
}

# keyhole_pg_stop MODE: for the EXIT trap: stop the server if it was started (pg_ctl
# stop -m MODE: fast, immediate), killing the postmaster if pg_ctl cannot.
keyhole_pg_stop() {
  local pid
  ((keyhole_pg_started)) || return 0
  if ! keyhole_as_pg "$keyhole_pgbin/pg_ctl" -D "$keyhole_pgdata" -m "$1" -w -t 20 stop \
    >/dev/null 2>&1; then
    if [[ -f $keyhole_pgdata/postmaster.pid ]]; then
      pid=$(head -n 1 "$keyhole_pgdata/postmaster.pid")
      [[ $pid =~ ^[0-9]+$ ]] && kill -KILL "$pid" 2>/dev/null
    fi
  fi
  keyhole_pg_started=0
  return 0
}
