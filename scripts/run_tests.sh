#!/usr/bin/env bash
# Runs every suite, printing each one's time; fails if any suite fails.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
status=0
summary=()

suite() {  # suite NAME COMMAND...
  local name=$1; shift
  echo "=== suite: $name"
  local t0=$SECONDS
  "$@"
  local rc=$?
  [ $rc -eq 5 ] && rc=0  # pytest: nothing collected (suite skipped on this machine)
  summary+=("$(printf '%-28s %5ss  %s' "$name" $((SECONDS - t0)) "$(verdict $rc)")")
  [ $rc -eq 0 ] || status=1
}

verdict() {  # a crash must not look like a test failure: it has no pytest report to read
  local rc=$1
  if [ "$rc" -eq 0 ]; then echo ok
  elif [ "$rc" -eq 1 ]; then echo FAILED
  elif [ "$rc" -gt 128 ]; then echo "CRASHED (killed by SIG$(kill -l $((rc - 128)) 2>/dev/null || echo $((rc - 128))))"
  else echo "FAILED (exit $rc)"
  fi
}

suite "lint (ruff)" .venv/bin/ruff check kvtransfer tests benchmarks
suite "unit + integration" $PY -m pytest -q -m "not vllm" tests -p no:cacheprovider
# The shipped conformance suite, run from outside the repo as a user runs it; a transport this
# build or host lacks is skipped by the suite itself, with the reason. --capture=sys lets what
# native code writes to stderr through (a provider's crash backtrace would die with pytest's
# capture file otherwise); the unit suite keeps full capture, its peers' children log a lot.
mkdir -p bench-results
conformance_xml=()
for t in tcp cma fabric:tcp fabric:udp fabric:shm; do
  suite "conformance --transport $t" bash -c \
    "cd /tmp && '$PWD/$PY' -m pytest -q -p no:cacheprovider --pyargs kvtransfer.testing \
     --capture=sys --transport $t --junitxml='$PWD/bench-results/conformance-${t//:/_}.xml'"
  conformance_xml+=("bench-results/conformance-${t//:/_}.xml")
done
if grep -q "guarantees:begin" docs/transports.md 2>/dev/null; then
  suite "docs: guarantees table" $PY scripts/guarantees_table.py --check "${conformance_xml[@]}"
fi
suite "fuzz (bounded, ASan+UBSan)" bash fuzz/run.sh 15
if [ -d tests/integrations/vllm ]; then
  suite "vllm environment" bash scripts/vllm_env.sh
  suite "vllm P/D" $PY -m pytest -q -m vllm tests/integrations/vllm -p no:cacheprovider
fi

echo "=== suite times"
printf '%s\n' "${summary[@]}"
exit $status
