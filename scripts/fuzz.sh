#!/usr/bin/env bash
#
# scripts/fuzz.sh: keyhole's fuzz targets (fuzz/) under libFuzzer, with cargo-fuzz on
# nightly Rust, one target after another.
#
#   scripts/fuzz.sh                 every target for 60 seconds
#   scripts/fuzz.sh 600             every target for 600 seconds
#   FUZZ_RUNS=10000000 scripts/fuzz.sh   every target for 10 million executions
#   FUZZ_TARGETS="tls_record config" scripts/fuzz.sh 30
#
# Each target starts from its committed corpus (fuzz/corpus/<target>/, read only) and
# grows a working corpus in fuzz/artifacts/corpus/<target>/ (kept between runs, not
# committed); a crash leaves its input in fuzz/artifacts/<target>/ and stops that
# target. At the end: executions, time, executions per second, corpus size and
# crashes per target, also written to fuzz/artifacts/summary.md.
#
# cargo test runs the same targets on stable (tests/fuzz_replay.rs: the corpus plus a
# deterministic mutation loop); this script adds coverage guidance and volume.
#
# Environment:
#   FUZZ_TARGETS=...          targets to run (default: all, from fuzz/Cargo.toml)
#   FUZZ_RUNS=N               stop each target after N executions instead of a time
#   FUZZ_SANITIZER=address    build with AddressSanitizer (default: none; the code under
#                             test is safe Rust, and ASan costs 3 to 5 times the speed)
#   FUZZ_JOBS=N               libFuzzer worker processes per target (default 1)
#   FUZZ_ARGS="..."           more libFuzzer flags (e.g. -max_len=8192)
#
# Debug assertions and overflow checks are on (cargo fuzz's default build), so an
# arithmetic overflow is a crash too. Needs rustup's nightly toolchain (installed
# with `rustup toolchain install nightly` if missing) and cargo-fuzz (installed with
# `cargo install cargo-fuzz` if missing).
set -euo pipefail

repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo_root/fuzz"

case ${1:-} in
-h | --help)
  sed -n '3,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"
  exit 0
  ;;
esac

seconds=${1:-60}
sanitizer=${FUZZ_SANITIZER:-none}
jobs=${FUZZ_JOBS:-1}

home=${CARGO_HOME:-${HOME:-}/.cargo}
if ! command -v cargo >/dev/null 2>&1 && [[ -x $home/bin/cargo ]]; then
  PATH="$home/bin:$PATH"
fi
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "==> installing the nightly toolchain (rustup toolchain install nightly)"
  rustup toolchain install nightly --profile minimal
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
  echo "==> installing cargo-fuzz (cargo install cargo-fuzz)"
  cargo install --locked cargo-fuzz
fi

if [[ -n ${FUZZ_TARGETS:-} ]]; then
  read -r -a targets <<<"$FUZZ_TARGETS"
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

echo "==> building ${#targets[@]} targets (sanitizer: $sanitizer)"
cargo +nightly fuzz build --sanitizer "$sanitizer"

mkdir -p artifacts
summary=artifacts/summary.md
{
  echo "| target | executions | seconds | executions/s | corpus (files) | crashes |"
  echo "| --- | ---: | ---: | ---: | ---: | ---: |"
} >"$summary"

limit=(-max_total_time="$seconds")
[[ -n ${FUZZ_RUNS:-} ]] && limit=(-runs="$FUZZ_RUNS")
status=0
for target in "${targets[@]}"; do
  work=artifacts/corpus/$target
  crashes=artifacts/$target
  mkdir -p "$work" "$crashes"
  log=artifacts/$target.log
  echo "==> $target (${limit[*]})"
  started=$SECONDS
  # shellcheck disable=SC2086 # FUZZ_ARGS is a list of flags
  if ! cargo +nightly fuzz run --sanitizer "$sanitizer" --jobs "$jobs" "$target" \
    "$work" "corpus/$target" -- "${limit[@]}" -print_final_stats=1 ${FUZZ_ARGS:-} \
    >"$log" 2>&1; then
    status=1
    echo "    FAILED: see fuzz/$log and fuzz/$crashes/"
    grep -E "panicked at|^thread '|SUMMARY" "$log" | head -n 5 | sed 's/^/    /' || true
  fi
  elapsed=$((SECONDS - started))
  # libFuzzer's own time (without the build), when it got to say it.
  done_in=$(grep -Eo '^Done [0-9]+ runs in [0-9]+ second' "$log" | grep -Eo '[0-9]+ second' | grep -Eo '[0-9]+' | tail -n 1)
  elapsed=${done_in:-$elapsed}
  execs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -n 1)
  rate=$(grep -Eo 'stat::average_exec_per_sec: *[0-9]+' "$log" | grep -Eo '[0-9]+$' | tail -n 1)
  files=$(find "$work" -type f | wc -l)
  found=$(find "$crashes" -type f \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' \) | wc -l)
  printf '    %s executions in %ss (%s/s), corpus %s files, %s crash(es)\n' \
    "${execs:-?}" "$elapsed" "${rate:-?}" "$files" "$found"
  echo "| $target | ${execs:-?} | $elapsed | ${rate:-?} | $files | $found |" >>"$summary"
done
echo
cat "$summary"
exit "$status"
