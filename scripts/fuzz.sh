#!/usr/bin/env bash
# Runs every cargo-fuzz target for a fixed time (outside CI; CI replays the kept crashers and
# seeds through the same harness in tests/fuzz_regressions.rs).
#
#   scripts/fuzz.sh                 # every target, FUZZ_SECONDS (default 60) each
#   scripts/fuzz.sh event_decode    # only the targets named
#
# Environment:
#   FUZZ_SECONDS     seconds per target (default 60)
#   FUZZ_SANITIZER   none (default; the code has no unsafe of its own) or address
#   FUZZ_JOBS        parallel libFuzzer processes per target (-fork=N; default 1)
#
# Only a stable toolchain is needed: cargo-fuzz asks for nightly-only compiler flags, which
# RUSTC_BOOTSTRAP=1 allows on stable. Debug assertions (overflow checks, the fold's invariant
# checks) are on. A crash leaves its input in fuzz/artifacts/<target>/; keep it as a regression
# test under tests/fuzz_regressions/<target>/ after fixing it.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${FUZZ_SECONDS:-60}"
sanitizer="${FUZZ_SANITIZER:-none}"
jobs="${FUZZ_JOBS:-1}"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  mapfile -t targets < <(cargo fuzz list)
fi

status=0
for t in "${targets[@]}"; do
  corpus="corpus/$t"
  mkdir -p "$corpus" "artifacts/$t"
  # Seeds: real records, events, snapshots and arguments; and every kept crasher.
  if [ -d "seeds/$t" ]; then cp -n seeds/"$t"/* "$corpus"/ 2>/dev/null || true; fi
  if [ -d "../tests/fuzz_regressions/$t" ]; then cp -n ../tests/fuzz_regressions/"$t"/* "$corpus"/ 2>/dev/null || true; fi
  echo "== $t: ${seconds}s (sanitizer $sanitizer)"
  log="artifacts/$t/last-run.log"
  parallel=()
  if [ "$jobs" -gt 1 ]; then parallel=(-fork="$jobs"); fi
  if cargo fuzz run --sanitizer "$sanitizer" --release --debug-assertions "$t" "$corpus" -- \
      -max_total_time="$seconds" -rss_limit_mb=2048 -max_len=65536 -timeout=20 \
      "${parallel[@]}" -print_final_stats=1 >"$log" 2>&1; then
    grep -E "^(Done|stat::number_of_executed_units|stat::peak_rss_mb)" "$log" | sed "s/^/  /" || true
    echo "  ok"
  else
    status=1
    echo "  CRASH: see fuzz/$log and fuzz/artifacts/$t/"
    grep -E "panicked at|ERROR: libFuzzer|SUMMARY" "$log" | head -5 | sed "s/^/  /" || true
  fi
done
exit $status
