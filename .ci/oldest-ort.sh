#!/usr/bin/env bash
# CI step: the int8 export tests under the OLDEST onnxruntime that setup.cfg allows (Jetson wheels lag behind PyPI).
# Runs inside the CI virtual environment (.ci/run activates it) and layers that onnxruntime over it with
# PYTHONPATH, so nothing else is reinstalled. onnxruntime 1.18 wheels are built against numpy 1.x and do not import
# under numpy 2, so the layer carries numpy<2 as well (setup.cfg allows numpy>=1.24); its quantizer uses
# onnx.mapping, gone since onnx 1.19, so the layer carries onnx 1.18 (setup.cfg allows onnx>=1.16). ml_dtypes (which
# onnx imports) needs numpy 2 from 0.6 on and lacks onnx 1.23's float4 type before 0.5, so the layer carries 0.5.1. A second run
# without the onnx layer checks that the incompatible pair is one clear error.
set -euo pipefail
cd "$(dirname "$0")/.."
oldest=$(sed -n 's/^ *onnxruntime>=\([0-9.]*\) *$/\1/p' setup.cfg | head -n 1)
if [ -z "$oldest" ]; then
    echo "oldest-ort: no 'onnxruntime>=X' line in setup.cfg" >&2
    exit 1
fi
layer=$(mktemp -d)
trap 'rm -rf "$layer"' EXIT
python -m pip install -q --no-deps --target "$layer/ort" "onnxruntime==$oldest" "numpy<2" "ml_dtypes==0.5.1"
python -m pip install -q --no-deps --target "$layer/onnx" "onnx==1.18.0"
installed=$(PYTHONPATH="$layer/ort" python -c "import onnxruntime; print(onnxruntime.__version__)")
case "$installed" in
    "$oldest" | "$oldest".*) ;;
    *) echo "oldest-ort: expected onnxruntime $oldest in the layer, got $installed" >&2; exit 1 ;;
esac
echo "oldest-ort: int8 export tests with onnxruntime $installed"
PYTHONPATH="$layer/ort:$layer/onnx" python -m pytest -q -p no:cacheprovider tests/test_export_precision.py -k "int8"
echo "oldest-ort: onnxruntime $installed with this environment's onnx (>= 1.19) must be one clear error"
PYTHONPATH="$layer/ort" python -m pytest -q -p no:cacheprovider tests/test_export_precision.py \
    -k "old_quantizer_with_new_onnx" -rs
