#!/usr/bin/env bash
# Regenerates the seed corpus under tests/fuzz_corpus/ from the real encoders (fuzz/make_seeds.cpp).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(bash fuzz/build.sh)
rm -rf tests/fuzz_corpus
"$out/make_seeds" tests/fuzz_corpus
find tests/fuzz_corpus -type f | wc -l | xargs echo "seeds written:"
