#!/usr/bin/env bash
# Fuzzes every decoder for a bounded time; fails on any crash, sanitizer report, leak, hang or
# oversized allocation. Builds the harnesses first (cached; installs clang if missing).
#
#   fuzz/run.sh SECONDS [HARNESS...]     # SECONDS per harness; default: every fuzz/fuzz_*.cpp
#
# Seeds come from tests/fuzz_corpus/<harness>/ (read only); what the fuzzer finds accumulates
# in build/fuzz/corpus/<harness>/, crash inputs in build/fuzz/artifacts/. Reproduce a crash
# with: build/fuzz/fuzz_<harness> build/fuzz/artifacts/<file>
set -uo pipefail
cd "$(dirname "$0")/.."
secs=${1:?usage: fuzz/run.sh SECONDS [HARNESS...]}
shift
out=$(bash fuzz/build.sh) || { echo "fuzz/run.sh: build failed" >&2; exit 1; }
if [ $# -gt 0 ]; then
  names=("$@")
else
  names=()
  for h in fuzz/fuzz_*.cpp; do n=$(basename "$h" .cpp); names+=("${n#fuzz_}"); done
fi
export ASAN_OPTIONS=${ASAN_OPTIONS:-halt_on_error=1:detect_leaks=1:allocator_may_return_null=0}
export UBSAN_OPTIONS=${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}
mkdir -p "$out/artifacts" "$out/logs"
status=0
printf '%-16s %8s %12s %10s %6s %7s  %s\n' harness seconds execs exec/s cov corpus result
for n in "${names[@]}"; do
  bin="$out/fuzz_$n"
  [ -x "$bin" ] || { echo "no harness '$n' (fuzz/fuzz_$n.cpp)"; status=1; continue; }
  mkdir -p "$out/corpus/$n" "tests/fuzz_corpus/$n"
  log="$out/logs/$n.log"
  # -malloc_limit_mb: any single allocation over 64 MiB is a finding (decoders cap every
  # length an attacker sends; the largest legitimate one is a 16 MiB control body).
  "$bin" -max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -malloc_limit_mb=64 \
    -max_len=32768 -print_final_stats=1 -artifact_prefix="$out/artifacts/$n-" \
    "$out/corpus/$n" "tests/fuzz_corpus/$n" >"$log" 2>&1
  rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log" | tail -1)
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | cut -d' ' -f2)
  corpus=$(find "$out/corpus/$n" -type f | wc -l)
  result=ok
  if [ $rc -ne 0 ]; then result="FAILED (rc $rc, log $log)"; status=1; fi
  printf '%-16s %8s %12s %10s %6s %7s  %s\n' "$n" "$secs" "${execs:-?}" "${rate:-?}" "${cov:-?}" \
    "$corpus" "$result"
  if [ $rc -ne 0 ]; then
    grep -E 'ERROR|SUMMARY|FUZZ_CHECK|runtime error|Test unit written|uncaught' "$log" | head -20
  fi
done
exit $status
