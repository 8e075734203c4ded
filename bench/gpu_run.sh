#!/bin/bash
# The GPU checks in one run, on a lent machine that has torch, pytest and numpy but no registry
# (the `device` tool; see bench/RESULTS.md, "GPU"). From the repository root:
#
#   here, once:  echo /.whl/ >> .git/info/exclude
#                .venv/bin/python -m pip download -q --no-deps zclip==1.0.0 autoclip==0.2.1 -d .whl
#   there:       bash bench/gpu_run.sh [bench/gpu.py arguments]      (carry: .whl)
#
# It installs the carried wheels (the reference clippers some agent tests import) into /tmp/site,
# makes `gradwatch.agent` importable from this tree without installing it (the package is the
# `agent/` folder), lowers the agent's torch floor in this copy of the tree when the machine's
# torch is older than it (the image had 2.11 against a 2.13 floor; it says so), runs the CUDA
# tests of the agent, then bench/gpu.py. Logs go to $OUT when set (the device tool brings them
# back). Budget: ~30 s of tests, ~3 min of bench on an H200.
set -o pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gw-gpu-out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
fi
mkdir -p /tmp/gw/gradwatch && ln -sfn "$PWD/agent" /tmp/gw/gradwatch/agent
export PYTHONPATH=/tmp/gw:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
have=$(python3 -c "import torch; print(*torch.__version__.split('+')[0].split('.')[:2], sep=', ')")
floor=$(sed -n 's/^MIN_TORCH = (\(.*\))$/\1/p' agent/_torch.py)
if python3 -c "import sys; sys.exit(0 if ($have) < ($floor) else 1)"; then
    echo "torch ($have) is older than the agent's floor ($floor): lowered for this run only (this copy of the tree)"
    sed -i "s/^MIN_TORCH = (.*)$/MIN_TORCH = ($have)/" agent/_torch.py
fi
python3 -c "import torch, gradwatch.agent as a; print('torch', torch.__version__, 'agent', a.__file__)" || exit 1
timeout 240 python3 -m pytest -q -m cuda -p no:cacheprovider -o addopts="--import-mode=importlib -ra" \
    tests/agent/test_clip.py tests/agent/test_layout_changes.py tests/agent/test_scaler.py tests/agent/test_stats.py \
    tests/agent/test_watcher.py tests/agent/test_signals.py 2>&1 | tee "$OUT/cuda_tests.log" | grep -E "^E |FAILED|passed|failed|skipped" | head -40
(cd bench && timeout 300 python3 gpu.py "$@" 2>&1 | grep -v "recorded to" | tee "$OUT/gpu_bench.md")
