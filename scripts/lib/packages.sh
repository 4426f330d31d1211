# shellcheck shell=bash
#
# Shared by scripts/test.sh, scripts/demo.sh and scripts/bench.sh (source it, don't run it): the Debian
# packages keyhole's tests and demo need on a machine, and how to get them.
#
# As root on a Debian machine, missing packages are installed with apt-get.
# Anyone else is told what is missing and how to install it; nothing is installed.
# KEYHOLE_SKIP_PACKAGES=1 skips the check (for a developer who knows what they have).

# THE package list. One entry per package: "<debian package> <probe>".
# A package counts as present when dpkg says it is installed, or when its probe is
# satisfied (so a machine without dpkg, or with the program from elsewhere, passes too):
# the probe is a command name looked up on PATH, or an absolute path (globs allowed).
KEYHOLE_APT_PACKAGES=(
  # PostgreSQL server binaries (initdb, pg_ctl, postgres) in /usr/lib/postgresql/<ver>/bin
  "postgresql         /usr/lib/postgresql/*/bin/initdb"
  # psql, pgbench
  "postgresql-client  psql"
  # MariaDB server (mariadbd in /usr/sbin, mariadb-install-db) for the MySQL tests
  "mariadb-server     /usr/sbin/mariadbd"
  # the mariadb command-line client
  "mariadb-client     mariadb"
  # test certificates (certs/generate.sh)
  "openssl            openssl"
  # ps, pgrep, pkill for test harnesses
  "procps             pgrep"
  # the system trust store, for targets that name no CA file
  "ca-certificates    /etc/ssl/certs/ca-certificates.crt"
  # a real HTTP proxy (CONNECT, basic auth) for the HTTP client's proxy tests (tests/http_proxy.rs)
  "tinyproxy          tinyproxy"
  # ip netns, veth pairs: the network namespace standing in for a VPC (tests/support/netns.rs)
  "iproute2           ip"
  # a real SSH bastion inside that namespace (tests/support/bastion.rs)
  "openssh-server     /usr/sbin/sshd"
  # ssh and ssh-keygen: bastion keys, and the reference client for the bastion tests
  "openssh-client     ssh"
  # danted: a SOCKS5 proxy without authentication inside the namespace
  "dante-server       /usr/sbin/danted"
  # a SOCKS5 proxy with user name and password inside the namespace
  "microsocks         microsocks"
  # TLS in front of a proxy, for the https:// hop test (tests/bastion.rs)
  "stunnel4           stunnel4"
  # the shells whose completions `keyhole completions` writes, to check them (bash is here)
  "zsh                zsh"
  "fish               fish"
  # groff: the man pages `keyhole man` writes are checked for warnings
  "groff-base         groff"
)

keyhole_log() {
  printf '%s\n' "$*"
}

keyhole_warn() {
  printf 'warning: %s\n' "$*" >&2
}

# keyhole_heading TEXT: a clear step heading.
keyhole_heading() {
  printf '\n==> %s\n' "$*"
}

# keyhole_duration SECONDS: "1m05s".
keyhole_duration() {
  local s=$1
  if ((s >= 60)); then
    printf '%dm%02ds' $((s / 60)) $((s % 60))
  else
    printf '%ds' "$s"
  fi
}

# keyhole_cargo_on_path: cargo from rustup lives in ~/.cargo/bin, which a non-login
# shell may not have on PATH.
keyhole_cargo_on_path() {
  local home=${CARGO_HOME:-${HOME:-}/.cargo}
  if ! command -v cargo >/dev/null 2>&1 && [[ -x $home/bin/cargo ]]; then
    PATH="$home/bin:$PATH"
    export PATH
  fi
}

# keyhole_package_present PACKAGE [PROBE]
keyhole_package_present() {
  local pkg=$1 probe=${2:-} status f
  if command -v dpkg-query >/dev/null 2>&1; then
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ $status == "install ok installed" ]] && return 0
  fi
  [[ -n $probe ]] || return 1
  if [[ $probe == /* ]]; then
    # Unquoted on purpose: the probe may be a glob. An unmatched glob stays literal
    # and fails the -e test.
    for f in $probe; do
      [[ -e $f ]] && return 0
    done
    return 1
  fi
  command -v "$probe" >/dev/null 2>&1
}

# keyhole_missing_packages [PACKAGE...]: print the missing ones, one per line.
# With no arguments, every entry of KEYHOLE_APT_PACKAGES is checked; with arguments,
# only those (names not in the list are checked with dpkg alone).
keyhole_missing_packages() {
  local entry pkg probe wanted
  if (($# == 0)); then
    for entry in "${KEYHOLE_APT_PACKAGES[@]}"; do
      read -r pkg probe <<<"$entry"
      keyhole_package_present "$pkg" "$probe" || printf '%s\n' "$pkg"
    done
    return 0
  fi
  for wanted in "$@"; do
    probe=
    for entry in "${KEYHOLE_APT_PACKAGES[@]}"; do
      read -r pkg probe <<<"$entry"
      [[ $pkg == "$wanted" ]] && break
      probe=
    done
    keyhole_package_present "$wanted" "$probe" || printf '%s\n' "$wanted"
  done
}

# keyhole_apt_get ARGS...: apt-get that waits for the dpkg lock and retries a flaky
# mirror twice.
keyhole_apt_get() {
  local attempt
  for attempt in 1 2 3; do
    if DEBIAN_FRONTEND=noninteractive apt-get -q -o DPkg::Lock::Timeout=300 \
      -o Dpkg::Use-Pty=0 "$@"; then
      return 0
    fi
    ((attempt < 3)) && { keyhole_warn "apt-get $1 failed (attempt $attempt), retrying"; sleep 5; }
  done
  return 1
}

# keyhole_ensure_packages [PACKAGE...]: make sure the packages (default: the whole
# list) are present. Installs them as root where apt-get exists; otherwise prints
# what is missing and returns 1.
keyhole_ensure_packages() {
  local missing=() still=()
  if [[ ${KEYHOLE_SKIP_PACKAGES:-} == 1 ]]; then
    keyhole_log "KEYHOLE_SKIP_PACKAGES=1: not checking system packages"
    return 0
  fi
  mapfile -t missing < <(keyhole_missing_packages "$@")
  if ((${#missing[@]} == 0)); then
    keyhole_log "system packages: all present"
    return 0
  fi
  if ((EUID != 0)) || ! command -v apt-get >/dev/null 2>&1; then
    keyhole_warn "missing system packages: ${missing[*]}"
    if command -v apt-get >/dev/null 2>&1; then
      keyhole_log "install them with:"
      keyhole_log "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${missing[*]}"
    else
      keyhole_log "install the equivalents of these Debian packages with your system's package manager"
    fi
    keyhole_log "or set KEYHOLE_SKIP_PACKAGES=1 to go on without them"
    return 1
  fi
  keyhole_log "installing missing system packages: ${missing[*]}"
  keyhole_apt_get update || return 1
  keyhole_apt_get install -y --no-install-recommends "${missing[@]}" || return 1
  mapfile -t still < <(keyhole_missing_packages "${missing[@]}")
  if ((${#still[@]} > 0)); then
    keyhole_warn "still missing after apt-get install: ${still[*]}"
    return 1
  fi
  keyhole_log "installed: ${missing[*]}"
}

# keyhole_pg_bindir: print the directory holding the PostgreSQL server binaries
# (initdb, pg_ctl, postgres). KEYHOLE_PG_BINDIR overrides; otherwise the newest
# /usr/lib/postgresql/<ver>/bin, then the directory of pg_ctl on PATH.
keyhole_pg_bindir() {
  local dir best="" pg_ctl
  if [[ -n ${KEYHOLE_PG_BINDIR:-} ]]; then
    printf '%s\n' "$KEYHOLE_PG_BINDIR"
    return 0
  fi
  while IFS= read -r dir; do
    [[ -x $dir/initdb && -x $dir/pg_ctl && -x $dir/postgres ]] && best=$dir
  done < <(printf '%s\n' /usr/lib/postgresql/*/bin | sort -V)
  if [[ -n $best ]]; then
    printf '%s\n' "$best"
    return 0
  fi
  if pg_ctl=$(command -v pg_ctl 2>/dev/null); then
    dirname "$(readlink -f "$pg_ctl")"
    return 0
  fi
  return 1
}
