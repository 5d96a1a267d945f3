#!/usr/bin/env bash
# Source-line coverage of the decoders by a fuzz corpus: builds the harnesses with clang's
# coverage instrumentation (no sanitizers), replays each harness's corpus once and prints
# llvm-cov's per-file report for csrc/wire and csrc/serialize.
#
#   fuzz/coverage.sh [CORPUS_ROOT]   # default: build/fuzz/corpus (what fuzz/run.sh found)
#                                    # plus the seeds in tests/fuzz_corpus
set -euo pipefail
cd "$(dirname "$0")/.."
root=${1:-build/fuzz/corpus}
bash fuzz/build.sh >/dev/null  # installs clang if needed
CXX=$(command -v clang++ || ls /usr/bin/clang++-* | head -1)
ver=$("$CXX" --version | sed -n 's/.*clang version \([0-9]*\).*/\1/p' | head -1)
PROFDATA=$(command -v llvm-profdata-"$ver" || command -v llvm-profdata)
COV=$(command -v llvm-cov-"$ver" || command -v llvm-cov)
OUT=build/fuzz-cov
rm -rf "$OUT" && mkdir -p "$OUT/prof"
flags=(-std=c++17 -O1 -g -Icsrc -Ifuzz -fsanitize=fuzzer -fprofile-instr-generate
       -fcoverage-mapping)
lib=(csrc/wire/*.cpp csrc/auth/hmac_sha256.cpp csrc/net/socket.cpp csrc/engine/control_channel.cpp)
if compgen -G "csrc/serialize/*.cpp" >/dev/null; then lib+=(csrc/serialize/*.cpp); fi
bins=()
for h in fuzz/fuzz_*.cpp; do
  n=$(basename "$h" .cpp)
  "$CXX" "${flags[@]}" "$h" "${lib[@]}" -o "$OUT/$n"
  bins+=("$OUT/$n")
  dirs=("tests/fuzz_corpus/${n#fuzz_}")
  [ -d "$root/${n#fuzz_}" ] && dirs+=("$root/${n#fuzz_}")
  LLVM_PROFILE_FILE="$OUT/prof/$n.profraw" "$OUT/$n" -runs=0 "${dirs[@]}" >/dev/null 2>&1
done
"$PROFDATA" merge -sparse "$OUT"/prof/*.profraw -o "$OUT/all.profdata"
objs=()
for b in "${bins[@]:1}"; do objs+=(-object "$b"); done
"$COV" report "${bins[0]}" "${objs[@]}" -instr-profile="$OUT/all.profdata" \
  csrc/wire/ csrc/serialize/ csrc/engine/control_channel.cpp
