#!/usr/bin/env bash
# One-shot GPU check for the device machine (bare CUDA image, no network).
# Needs the wheels in .whl/ (carried): packages the image lacks or holds at other versions.
# Usage (repo root): bash scripts/gpu_check.sh   -> log in $OUT/gpu_tests.log
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "wheel install failed" >&2; exit 3; }
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi || true
python3 - <<'EOF' || { echo "environment check failed" >&2; exit 4; }
import sys, torch, transformers, peft, tokenizers, huggingface_hub, pydantic, safetensors, accelerate
print("python", sys.version.split()[0], sys.executable)
for m in (torch, transformers, peft, tokenizers, huggingface_hub, pydantic, safetensors, accelerate):
    print(f"{m.__name__:16} {m.__version__:20} {m.__file__}")
print("cuda", torch.version.cuda, "available", torch.cuda.is_available())
assert torch.cuda.is_available(), "no CUDA device: the gpu tests would only skip"
print("device", torch.cuda.get_device_name(0), "bf16", torch.cuda.is_bf16_supported())
EOF
timeout 300 python3 -m pytest -m gpu tests/test_gpu.py -q -p no:cacheprovider -rs 2>&1 \
  | tee "$OUT/gpu_tests.log"
rc=${PIPESTATUS[0]}
[ "$rc" -eq 5 ] && echo "no tests were collected" >&2
echo "pytest exit status: $rc"
exit "$rc"
