#!/usr/bin/env bash
# Everything that needs a CUDA device, in one bounded run: the CUDA kernels and the engine
# against their references (tests/gpu), then the GPU benchmarks whose numbers go to the README.
#
#   scripts/gpu_checks.sh OUT_DIR [STAGE...]   stages: tests attention offline serving profile
#
# Run from the repository root on a machine with a CUDA device and a CUDA build of torch, whose
# python3 already has torch, transformers and the CUDA toolkit. Missing pure-Python
# dependencies may be provided as wheels in .whl/ (installed into a private prefix). Each stage
# has its own time limit and log under OUT_DIR, so one failing stage never loses the others.
set -u
OUT_DIR=${1:?usage: scripts/gpu_checks.sh OUT_DIR [STAGE...]}
shift
STAGES=${*:-tests attention offline serving}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}

if compgen -G ".whl/*.whl" >/dev/null; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/protoserve-site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/protoserve-site${PYTHONPATH:+:$PYTHONPATH}
fi
# A CUDA build carried over from an earlier run on the same image skips the compile.
if [ -f .gpu-cache/extensions.tgz ]; then
    mkdir -p ~/.cache/protoserve && tar -xzf .gpu-cache/extensions.tgz -C ~/.cache/protoserve
fi

stage() {  # stage NAME LIMIT_S COMMAND...: runs COMMAND under LIMIT_S, logs to OUT_DIR/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s) $(date -u +%H:%M:%S)"
    local start=$SECONDS
    timeout --signal=INT --kill-after=15 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
    local rc=$?
    echo "=== $name: rc $rc in $((SECONDS - start))s"
    tail -n "${TAIL_LINES:-25}" "$OUT_DIR/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
"$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
      'transformers', transformers.__version__, torch.cuda.get_device_name())"

for name in $STAGES; do
    case $name in
    tests)
        stage tests 180 "$PY" -m pytest -q -p no:cacheprovider --timeout 150 tests/gpu \
            tests/engine/models/test_dummy_load_format.py -rs
        tar -czf "$OUT_DIR/extensions.tgz" -C ~/.cache/protoserve extensions 2>/dev/null
        ;;
    attention)
        stage attention 60 "$PY" -m benchmarks.attention_kernels --device cuda \
            --batch-sizes 1 8 32 64 --context-lens 1024 4096 --repeats 20
        ;;
    offline)
        stage offline 170 "$PY" -m benchmarks.offline_throughput --device cuda \
            --shape llama3-8b --num-prompts 128 --input-len 256 --output-len 128 --repeats 2 \
            --json "$OUT_DIR/offline_llama3_8b.json"
        ;;
    serving)
        # Batch-1 latency (TPOT against the weight-streaming floor), then a saturating load.
        stage serving_c1 90 "$PY" -m benchmarks.serving --launch --shape llama3-8b \
            --backend grpc --server-args "--device cuda" --kv-cache-memory auto \
            --vocab-size 128256 --num-prompts 8 --max-concurrency 1 --random-input-len 256 \
            --random-output-len 128 --result-json "$OUT_DIR/serving_llama3_8b_c1.json"
        stage serving_inf 120 "$PY" -m benchmarks.serving --launch --shape llama3-8b \
            --backend grpc --server-args "--device cuda" --kv-cache-memory auto \
            --vocab-size 128256 --num-prompts 256 --request-rate inf --random-input-len 256 \
            --random-output-len 128 --result-json "$OUT_DIR/serving_llama3_8b_inf.json"
        ;;
    profile)
        # Where a decode step's time goes (kernels vs host) at batch 1 and 64.
        for batch in 1 64; do
            TAIL_LINES=45 stage "profile_b$batch" 90 "$PY" -m benchmarks.step_profile \
                --device cuda --shape llama3-8b --batch-size "$batch" --steps 20 --rows 30
        done
        ;;
    *) echo "unknown stage $name" ;;
    esac
done
