#!/usr/bin/env bash
# Builds the libFuzzer harnesses (fuzz/fuzz_*.cpp) and the seed generator into build/fuzz/,
# with clang++ -fsanitize=fuzzer,address,undefined over only the decoders they exercise.
# Cached: nothing is rebuilt while the sources, flags and compiler are unchanged.
# Installs clang with apt (as root) when it is missing, as on a fresh CI machine.
#
#   fuzz/build.sh            # prints the directory holding the binaries
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=build/fuzz
CXX=${FUZZ_CXX:-}

find_clang() {
  for c in clang++ clang++-19 clang++-18 clang++-17 clang++-16 clang++-15 clang++-14; do
    if command -v "$c" >/dev/null 2>&1; then echo "$c"; return 0; fi
  done
  return 1
}

if [ -z "$CXX" ]; then
  if ! CXX=$(find_clang); then
    echo "fuzz/build.sh: clang++ not found; installing clang (apt)" >&2
    if [ "$(id -u)" != 0 ]; then
      echo "fuzz/build.sh: need root (or sudo) for apt-get install clang" >&2
      exit 1
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 clang >/dev/null
    CXX=$(find_clang)
  fi
fi
# libFuzzer ships in compiler-rt; Debian splits it out of clang in some releases.
probe=$(mktemp -d)
trap 'rm -rf "$probe"' EXIT
echo 'extern "C" int LLVMFuzzerTestOneInput(const unsigned char*, unsigned long) { return 0; }' \
  >"$probe/p.cpp"
if ! "$CXX" -fsanitize=fuzzer "$probe/p.cpp" -o "$probe/p" 2>/dev/null; then
  ver=$("$CXX" --version | sed -n 's/.*clang version \([0-9]*\).*/\1/p' | head -1)
  echo "fuzz/build.sh: $CXX has no libFuzzer runtime; installing libclang-rt-$ver-dev (apt)" >&2
  if [ "$(id -u)" != 0 ]; then echo "fuzz/build.sh: need root for apt-get install" >&2; exit 1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=300 \
    "libclang-rt-$ver-dev" >/dev/null
fi

SAN=${FUZZ_SANITIZE:-address,undefined}
CXXFLAGS=(-std=c++17 -O1 -g -fno-omit-frame-pointer -Wall -Wextra -Werror -Icsrc -Ifuzz
          "-fsanitize=$SAN" -fno-sanitize-recover=undefined)
# The decoders and what they need: the wire codec, the control channel's framing (with the
# socket layer under it), HMAC for the handshake proofs, the KV file codec, and the cma arrival
# ring (shared memory a peer process writes).
LIB_SOURCES=(csrc/wire/*.cpp csrc/auth/hmac_sha256.cpp csrc/net/socket.cpp
             csrc/engine/control_channel.cpp csrc/transport/cma/cma_arrival_ring.cpp)
if compgen -G "csrc/serialize/*.cpp" >/dev/null; then LIB_SOURCES+=(csrc/serialize/*.cpp); fi
HARNESSES=(fuzz/fuzz_*.cpp)

key=$( { "$CXX" --version; echo "${CXXFLAGS[*]}"; cat fuzz/build.sh fuzz/*.h "${HARNESSES[@]}" \
         fuzz/make_seeds.cpp "${LIB_SOURCES[@]}"; find csrc -name '*.h' | sort | xargs cat; } \
       | sha256sum | cut -c1-16)
if [ -f "$OUT/.stamp" ] && [ "$(cat "$OUT/.stamp")" = "$key" ]; then
  echo "$OUT"
  exit 0
fi
rm -rf "$OUT/obj" "$OUT/.stamp" "$OUT"/fuzz_* "$OUT/make_seeds"
mkdir -p "$OUT/obj"
echo "fuzz/build.sh: building with $CXX (-fsanitize=fuzzer,$SAN)" >&2
objs=()
for src in "${LIB_SOURCES[@]}"; do objs+=("$OUT/obj/$(echo "$src" | tr / _).o"); done
printf '%s\n' "${LIB_SOURCES[@]}" | xargs -P "${FUZZ_JOBS:-2}" -I{} sh -c \
  'o="$1/obj/$(echo "$2" | tr / _).o"; shift 2; "$@" -fsanitize=fuzzer-no-link -c "$0" -o "$o"' \
  {} "$OUT" {} "$CXX" "${CXXFLAGS[@]}"
for h in "${HARNESSES[@]}"; do
  name=$(basename "$h" .cpp)
  "$CXX" "${CXXFLAGS[@]}" -fsanitize=fuzzer "$h" "${objs[@]}" -o "$OUT/$name" &
  [ "$(jobs -r | wc -l)" -ge "${FUZZ_JOBS:-2}" ] && wait -n
done
"$CXX" "${CXXFLAGS[@]}" fuzz/make_seeds.cpp "${objs[@]}" -o "$OUT/make_seeds" &
wait
for h in "${HARNESSES[@]}"; do test -x "$OUT/$(basename "$h" .cpp)"; done
test -x "$OUT/make_seeds"
echo "$key" >"$OUT/.stamp"
echo "$OUT"
