#!/usr/bin/env bash
#
# scripts/test.sh: THE test command of keyhole. CI runs it (through .ci/run), and so
# does a developer before pushing.
#
#   scripts/test.sh                 everything: packages, fmt, clippy, all tests
#   scripts/test.sh postgres_       the same checks, then `cargo test --locked postgres_`
#   scripts/test.sh -- --nocapture  any arguments go to `cargo test` as they are
#
# Steps:
#   1. system packages the tests need (PostgreSQL server and client, openssl, ...):
#      installed with apt-get when run as root, otherwise only reported
#      (the list lives in scripts/lib/packages.sh)
#   2. the rustfmt and clippy components
#   3. cargo fmt --all -- --check
#   4. cargo clippy --all-targets --locked -- -D warnings, then with --features otel
#      (the OpenTelemetry export, off in the default build) every target the feature
#      changes: the library (with and without cfg(test)), the binary, tests/otel.rs
#   5. the dependency policy and the slim builds: cargo deny check (deny.toml: advisories,
#      licenses, duplicate versions, sources; cargo-deny is installed first if missing),
#      then clippy on each other feature combination (no cloud, aws alone, gcp alone)
#      and, under each, the unit tests that a target needing a missing feature is refused
#   6. (full runs only) the benchmark harness end to end, small: scripts/bench.sh
#      --quick on the direct path, keyhole and keyhole portable (the --cfg keyhole_portable
#      release build, in target/portable-release), PostgreSQL, the synthetic upstream and
#      MariaDB; it fails if any workload failed or left a figure out. It checks that
#      the harness works, not how fast anything is (no figure is compared).
#   7. (full runs only) the Debian package: scripts/package-deb.sh builds it (cargo-deb is
#      installed when missing; the release binary of step 6 is reused), then installs it
#      into a throwaway root and checks it (--version, man pages, completions, conffiles,
#      `systemd-analyze verify` of the unit)
#   8. (full runs only) the portable build: RUSTFLAGS="--cfg keyhole_portable" (the data
#      path, process metrics and calls macOS and Windows get; src/platform/) in its own
#      target directory (target/portable, so the two builds do not evict each other):
#      clippy on every target, then the whole test suite (lib, bins, integration tests);
#      and the Windows-shaped check: clippy on the library and binary, their unit tests
#      included, with --cfg keyhole_windows_shape as well (target/windows-shape), which
#      builds the crate without its Unix code and denies the Unix-only APIs clippy.toml
#      lists, as close to a Windows compile as a machine without Windows' standard
#      library gets
#   9. cargo test: doc tests first, then the OpenTelemetry test with its feature
#      (cargo test --features otel --test otel, and the library's unit tests with it),
#      then the library, binaries and integration tests, so the output closes on
#      cargo test's own summary of the main suite.
#
# Environment:
#   KEYHOLE_SKIP_PACKAGES=1   don't check system packages
#   KEYHOLE_SKIP_BENCH=1      leave out step 6
#   KEYHOLE_PG_BINDIR=DIR     where initdb/pg_ctl/postgres live (default: found)
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root"
# shellcheck source=scripts/lib/packages.sh
source "$repo_root/scripts/lib/packages.sh"

case ${1:-} in
-h | --help)
  sed -n '3,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
  exit 0
  ;;
esac

keyhole_cargo_on_path

locked=()
[[ -f Cargo.lock ]] && locked=(--locked)

# A one-shot CI run gains nothing from incremental compilation, and its working files took
# 9 GB of a disk that ran out once.
if [[ -n ${CI:-} ]]; then
  export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
fi

# Interactive runs keep cargo's colours even though the test step is piped.
if [[ -t 1 ]]; then
  export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-always}
fi

readonly total_steps=9
step_no=0
step_started=$SECONDS
step_times=()

step() {
  if ((step_no > 0)); then
    step_times+=("$step_name $(keyhole_duration $((SECONDS - step_started)))")
  fi
  step_no=$((step_no + 1))
  step_name=$1
  step_started=$SECONDS
  keyhole_heading "[$step_no/$total_steps] $2"
}

fail() {
  printf '\n==> FAILED at step %d/%d (%s) after %s\n' "$step_no" "$total_steps" \
    "$step_name" "$(keyhole_duration "$SECONDS")" >&2
  exit 1
}

# Pass cargo test's output through, but hold back the closing summary (the last
# "test result:" line and the blank lines after it) until the end, print the total
# time, then the summary: the run shows its time and still closes on cargo test's
# own lines.
hold_closing_summary() {
  local line held=()
  while IFS= read -r line || [[ -n $line ]]; do
    if [[ $line == "test result:"* ]]; then
      ((${#held[@]} > 0)) && printf '%s\n' "${held[@]}"
      held=("$line")
    elif ((${#held[@]} > 0)) && [[ -z ${line//[[:space:]]/} ]]; then
      held+=("$line")
    else
      ((${#held[@]} > 0)) && printf '%s\n' "${held[@]}"
      held=()
      printf '%s\n' "$line"
    fi
  done
  step_times+=("$step_name $(keyhole_duration $((SECONDS - step_started)))")
  local joined
  joined=$(printf '%s, ' "${step_times[@]}")
  printf '==> scripts/test.sh: total time %s (%s)\n' \
    "$(keyhole_duration "$SECONDS")" "${joined%, }"
  ((${#held[@]} > 0)) && printf '%s\n' "${held[@]}"
  return 0
}

has_lib_target() {
  [[ -f src/lib.rs ]] || grep -q '^\[lib\]' Cargo.toml
}

SECONDS=0

step packages "system packages"
# shellcheck disable=SC2119 # no arguments: the whole package list
keyhole_ensure_packages || fail
if pg_bindir=$(keyhole_pg_bindir); then
  keyhole_log "PostgreSQL server binaries: $pg_bindir"
fi

# A full run builds 3.4 GB (debug tests, clippy, the release bench binary); say up
# front how much room there is, so "No space left on device" later is no mystery.
keyhole_log "free disk for target/: $(df -h --output=avail . | tail -n 1 | tr -d ' ')"

step toolchain "Rust toolchain"
if ! command -v cargo >/dev/null 2>&1; then
  keyhole_warn "cargo not found: install Rust with rustup (https://rustup.rs)"
  fail
fi
components=()
cargo fmt --version >/dev/null 2>&1 || components+=(rustfmt)
cargo clippy --version >/dev/null 2>&1 || components+=(clippy)
if ((${#components[@]} > 0)); then
  if command -v rustup >/dev/null 2>&1; then
    keyhole_log "adding toolchain components: ${components[*]}"
    rustup component add "${components[@]}" || fail
  else
    keyhole_warn "missing toolchain components (${components[*]}) and no rustup to add them"
    fail
  fi
fi
cargo --version
rustc --version
cargo fmt --version
cargo clippy --version

step fmt "cargo fmt --all -- --check"
cargo fmt --all -- --check || fail

step clippy "cargo clippy --all-targets ${locked[*]} -- -D warnings (without and with --features otel)"
cargo clippy --all-targets "${locked[@]}" -- -D warnings || fail
# Not --all-targets: the ~30 other test crates and the benches are the same with the
# feature (their harness gains only tests/support/otlp.rs, which tests/otel.rs checks),
# and checking them again cost CI minutes for nothing.
cargo clippy --lib --bins --test otel --features otel "${locked[@]}" -- -D warnings || fail
cargo clippy --lib --profile test --features otel "${locked[@]}" -- -D warnings || fail

step deps "dependency policy (cargo deny) and the slim builds (feature combinations)"
# cargo-deny is not a rustup component: a fresh machine compiles it once (about 5.5 minutes
# of CPU, so 3 to 5 minutes on 2 idle cores), later runs find it in ~/.cargo/bin.
if ! cargo deny --version >/dev/null 2>&1; then
  keyhole_log "cargo-deny not found: cargo install --locked cargo-deny"
  deny_started=$SECONDS
  cargo install --locked cargo-deny || fail
  keyhole_log "cargo-deny installed in $(keyhole_duration $((SECONDS - deny_started)))"
fi
cargo deny --version
# The advisory check needs RustSec's database (github.com) and the crates.io index (for
# yanked versions). Fetched first, so that a network that is down is told apart from an
# advisory: then the checks that need no network still run, and the run says what it
# left out. An advisory that applies fails the run like any other check.
deny_started=$SECONDS
if cargo deny fetch; then
  keyhole_log "cargo deny check: advisories, licenses, bans, sources (policy: deny.toml)"
  cargo deny --offline check --hide-inclusion-graph || fail
else
  keyhole_warn "cargo deny could not fetch RustSec's advisory database (github.com) or the crates.io index: is the network down? The advisories check is LEFT OUT of this run; licenses, bans and sources are checked"
  cargo deny --offline check --hide-inclusion-graph bans licenses sources || fail
fi
keyhole_log "cargo deny: $(keyhole_duration $((SECONDS - deny_started)))"
# Each optional part is a Cargo feature (README, "Build features"): the builds without
# one must compile and lint clean as well, tests included, and refuse a configuration
# that needs what they lack (the feature_refusal unit tests, which exist only there).
# In this order, each build reuses most of the one before: gcp alone is the build without
# a cloud plus rsa, aws alone nearly the default build.
for features in "" "gcp" "aws"; do
  combination=(--no-default-features)
  [[ -n $features ]] && combination+=(--features "$features")
  keyhole_log "features: ${features:-none}: clippy --all-targets, then cargo test --lib feature_refusal"
  cargo clippy --all-targets "${locked[@]}" "${combination[@]}" -- -D warnings || fail
  cargo test --lib "${locked[@]}" "${combination[@]}" feature_refusal || fail
done

if (($# == 0)) && [[ ${KEYHOLE_SKIP_BENCH:-} != 1 ]]; then
  step bench "benchmark harness, small: scripts/bench.sh --quick (direct, keyhole and keyhole portable)"
  bench_dir=$(mktemp -d)
  if ! BENCH_PATHS=keyhole BENCH_DURATION=2 BENCH_COPY_MB=16 BENCH_STREAM_MB=64 \
    BENCH_IDLE_CONNS=50 BENCH_IDLE_LARGE=50 scripts/bench.sh --quick --out "$bench_dir" \
    >"$bench_dir/run.log" 2>&1; then
    tail -n 40 "$bench_dir/run.log"
    keyhole_warn "the benchmark harness failed (its log: $bench_dir/run.log); KEYHOLE_SKIP_BENCH=1 leaves this step out"
    fail
  fi
  # Every workload ran on both paths and left its figure, and the report is whole.
  if ! python3 - "$bench_dir" <<'PY'; then
import json, os, sys
out = sys.argv[1]
report = json.load(open(os.path.join(out, "bench.json")))
problems = [f"{p}: {v['note']}" for p, v in report["paths"].items() if not v["ran"]]
for m in report["metrics"]:
    for path, r in m["results"].items():
        if r["failures"] or r["median"] is None:
            problems.append(f"{m['label']} on {path}: {r['failures'] or 'no figure'}")
    if "keyhole" not in m["results"]:
        problems.append(f"{m['label']}: no keyhole figure")
for name in ("bench.md", "bench.png"):
    path = os.path.join(out, name)
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        problems.append(f"{name} is missing or empty")
print(f"benchmark harness: {len(report['metrics'])} workloads on direct, keyhole and keyhole portable")
for p in problems:
    print(f"  problem: {p}")
sys.exit(1 if problems else 0)
PY
    tail -n 40 "$bench_dir/run.log"
    keyhole_warn "the benchmark harness run failed (its log: $bench_dir/run.log); KEYHOLE_SKIP_BENCH=1 leaves this step out"
    fail
  fi
  rm -rf "$bench_dir"
fi

if (($# == 0)); then
  step package "Debian package: scripts/package-deb.sh, installed into a throwaway root"
  package_args=()
  [[ -x target/release/keyhole && ${KEYHOLE_SKIP_BENCH:-} != 1 ]] && package_args=(--no-build)
  deb=$(scripts/package-deb.sh "${package_args[@]}" | tail -n 1) || fail
  scripts/package-deb.sh --smoke "$deb" || fail
fi

if (($# == 0)); then
  step portable "the portable build (--cfg keyhole_portable): clippy, the whole test suite, the Windows-shaped check"
  # RUSTFLAGS rebuilds every crate: its own target directory keeps both builds.
  portable=(env RUSTFLAGS="${RUSTFLAGS:-} --cfg keyhole_portable"
    CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/portable")
  "${portable[@]}" cargo clippy --all-targets "${locked[@]}" -- -D warnings || fail
  "${portable[@]}" cargo test "${locked[@]}" --tests || fail
  env RUSTFLAGS="${RUSTFLAGS:-} --cfg keyhole_portable --cfg keyhole_windows_shape" \
    CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/windows-shape" \
    cargo clippy --lib --bins --profile test "${locked[@]}" -- -D warnings || fail
fi

if (($# > 0)); then
  step test "cargo test ${locked[*]} $*"
  status=0
  cargo test "${locked[@]}" "$@" 2>&1 | hold_closing_summary || status=$?
else
  step test "cargo test: doc tests, then lib, bins and integration tests"
  if has_lib_target; then
    cargo test "${locked[@]}" --doc || fail
  fi
  # The feature rebuilds only keyhole itself (it adds no dependency): its unit
  # tests, and the export end to end against the test's OTLP receiver.
  cargo test "${locked[@]}" --features otel --lib telemetry:: || fail
  cargo test "${locked[@]}" --features otel --test otel || fail
  status=0
  cargo test "${locked[@]}" --tests 2>&1 | hold_closing_summary || status=$?
fi
((status == 0)) || fail
