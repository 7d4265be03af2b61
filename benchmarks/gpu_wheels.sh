#!/usr/bin/env bash
# The wheels benchmarks/gpu_run.py needs on the lent GPU machine (Python 3.12, offline), into .whl/ of this
# checkout (ignored by git; the device tool carries it with `carry: [".whl"]`). See docs/THROUGHPUT.md.
#
#   bash benchmarks/gpu_wheels.sh           download them
#   bash benchmarks/gpu_wheels.sh check     also install them, exactly as the GPU machine will, into an empty
#                                           target with a local Python 3.12 (PY312=...), and import them there
#
# What is carried, and why only this: the GPU machine has torch, torchvision, timm, regex, huggingface_hub,
# safetensors, tqdm, numpy, pillow, click, pyyaml, onnx, onnxscript and matplotlib. gpu_run.py's code path
# imports nothing else at run time except open_clip, which benchmarks/latency.py uses (when importable) to
# check its written-out ViT-B-32 shape against open_clip's; open_clip needs ftfy, and ftfy needs wcwidth.
# webdataset (data/build.py) and ultralytics are not on that path. Versions: the ones this project is tested with.
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4)
# requirements of the wheels above that the GPU machine already has (its package list, .library/device/KINDS.md)
THERE="torch torchvision timm regex huggingface-hub safetensors tqdm"
PY=${PYTHON:-python3}

download() {
    mkdir -p .whl
    rm -f .whl/*.whl # one version of each: two copies of a package stop the whole install there
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}"
    ls -l .whl
    # every requirement (extras aside) is in .whl/ or already on the GPU machine
    local have missing=""
    have=" $THERE $(for w in .whl/*.whl; do basename "$w" | cut -d- -f1 | tr _ - | tr A-Z a-z; done | tr '\n' ' ') "
    for w in .whl/*.whl; do
        for req in $(unzip -p "$w" '*/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' |
            sed -E 's/^Requires-Dist: *([A-Za-z0-9_.-]+).*/\1/' | tr _ - | tr A-Z a-z); do
            [[ "$have" == *" $req "* ]] || missing="$missing $req($(basename "$w"))"
        done
    done
    if [[ -n "$missing" ]]; then
        echo "requirements neither carried nor on the GPU machine:$missing" >&2
        exit 1
    fi
}

check() {
    local py312="" c
    for c in ${PY312:-} python3.12 ~/.pyenv/versions/3.12*/bin/python3.12; do # a pyenv shim may not run
        if "$c" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
            py312=$c
            break
        fi
    done
    if [[ -z "$py312" ]]; then
        echo "no Python 3.12 here: set PY312=/path/to/python3.12" >&2
        exit 1
    fi
    tmp=$(mktemp -d)
    trap 'rm -rf "$tmp"' EXIT
    "$py312" -m venv "$tmp/venv" # empty: only pip
    # the GPU machine's install line (docs/THROUGHPUT.md), into an empty target
    "$tmp/venv/bin/python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$tmp/site" .whl/*.whl
    PYTHONPATH="$tmp/site" "$tmp/venv/bin/python" - <<'EOF'
import importlib.util, os, sys
import ftfy, wcwidth
assert ftfy.fix_text("cafÃ©") == "café" and wcwidth.wcswidth("abc") == 3
spec = importlib.util.find_spec("open_clip")
assert spec is not None and spec.origin.startswith(os.environ["PYTHONPATH"]), spec
try:  # torch is not in this empty environment (it is on the GPU machine): this is how far it can get here
    import open_clip  # noqa: F401
except ModuleNotFoundError as e:
    assert e.name in ("torch", "torchvision", "timm", "regex", "huggingface_hub"), e
    print(f"open_clip found; importing it stops at the GPU machine's own packages here: {e.name} is missing")
print(f"Python {sys.version.split()[0]}: ftfy {ftfy.__version__}, wcwidth {wcwidth.__version__} import; open_clip installed")
EOF
}

download
if [[ "${1:-}" == "check" ]]; then
    check
fi
