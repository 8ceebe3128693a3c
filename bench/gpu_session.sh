#!/usr/bin/env bash
# Everything a session with a borrowed GPU should run, in one call that fits a short device budget:
# install the tree, the GPU tests and every kernel config, the batch-8 benchmark against the original,
# the largest size each variant fits in GPU memory, then the Triton op tests. Every stage has its own
# time limit and writes its output as it goes, so a stage cut short keeps what it measured and the next
# one still runs. The default limits add up to 570 s: one device call (at most 600 s).
#
#   bash bench/gpu_session.sh            # results under $OUT (the device tool's folder) or bench/results/gpu-session,
#                                        # every log in session-log.txt there
#
# Stage limits in seconds (environment): GPU_TESTS_S (150), BENCH_S (180), MAX_SIZE_S (120), OP_TESTS_S (60),
# TRAIN_STEP_S (60; last, so a device call cut at 600 s loses only it).
# PYTHON: the interpreter that holds torch and triton (default python3: on the lent machine's image
# that is the one; a bare "python" may not exist there).
# Copy the benchmark's .json/.md into bench/results/ afterwards and name the device in the commit.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-bench/results/gpu-session}"
py="${PYTHON:-python3}"
mkdir -p "$out"
# Every log goes into one file: the device tool brings back at most 8 files, which the results
# (benchmark json/md/png, size search json/md) and this log stay within.
log="$out/session-log.txt"
: >"$log"
stage() {  # stage NAME LIMIT_S COMMAND...: run under a time limit, append to the log, never stop the script
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "===== $name (limit $limit s)" >>"$log"
    timeout --signal=INT --kill-after=15 "$limit" "$@" >>"$log" 2>&1
    local status=$?
    echo "===== $name: exit $status after $((SECONDS - start)) s (limit $limit s)" | tee -a "$log"
}

echo "===== install" >>"$log"
"$py" -m pip install --no-deps --no-build-isolation -e . >>"$log" 2>&1 || echo "install failed" | tee -a "$log"
{
    echo "===== device"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    "$py" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} >>"$log" 2>&1

# Test processes in parallel where pytest-xdist is there (the image has it): compiling every kernel
# variant the tests reach takes minutes on one process (0.6-2.7 s per config for sm_90).
parallel=()
if "$py" -c "import xdist" 2>/dev/null; then
    parallel=(-n 4)
fi
# The GPU-only tests, then every autotune config run alone (on a GPU each compiles and runs for real).
stage gpu-tests "${GPU_TESTS_S:-150}" "$py" -m pytest -q -p no:cacheprovider "${parallel[@]}" tests/test_gpu.py \
    tests/test_kernel_configs.py
# The issue's GPU targets first (learner forward, batch 8, size 50); one process per group and variant,
# so few variants: each process pays CUDA's start-up. Autotuning results are kept on disk, so that the
# memory workers do not time every config again (the timing worker chose on the same shapes).
TRITON_CACHE_AUTOTUNING=1 stage bench "${BENCH_S:-180}" "$py" bench/run.py --device cuda --batch 8 --size 50 \
    --cases learner_forward,fused_first_layer --variants original,triton,torch,triton-lean --repeats 5 \
    --timeout 120 --out "$out" --name cuda-resnet50-size50-b8-float32
TRITON_CACHE_AUTOTUNING=1 stage max-size "${MAX_SIZE_S:-120}" "$py" bench/run.py --device cuda --batch 8 --size 50 \
    --max-size 256 --masks object --variants original,triton --timeout 60 --out "$out" \
    --name cuda-resnet50-b8-float32-max-size
# The Triton op tests: numerics, which no tile size changes, so each kernel keeps its first config (no
# autotuning of every hypothesis shape; tests/test_kernel_configs.py above ran every config).
HYPERTRITON_TEST_ONE_CONFIG=1 stage op-tests "${OP_TESTS_S:-60}" "$py" -m pytest -q -p no:cacheprovider \
    "${parallel[@]}" -k triton tests/test_hypercorrelation.py tests/test_center_pivot_conv4d.py \
    tests/test_fused_first_layer.py
# A training step (learner forward + backward, batch 8), never timed on a GPU: the fused layer's backward
# recomputes its correlations in PyTorch, per episode and in chunks, and reads sizes back to the host
# (its backward: about 9,500 ATen calls and 123 host reads at batch 8, counted on CPU before its 24
# finite-feature reads were dropped), where the original runs a few large kernels. Written beside $OUT and then
# copied without its plot: the device tool brings back at most 8 files, and a stage cut short must not leave
# a ninth.
train_out="${TMPDIR:-/tmp}/hypertriton-train-step"
rm -rf "$train_out"
TRITON_CACHE_AUTOTUNING=1 stage train-step "${TRAIN_STEP_S:-60}" "$py" bench/run.py --device cuda --batch 8 \
    --size 50 --cases forward_backward --masks object --variants original,triton,triton-unfused --repeats 3 \
    --timeout 50 --out "$train_out" --name cuda-resnet50-size50-b8-float32-train-step
cp "$train_out"/*.json "$train_out"/*.md "$out"/ 2>/dev/null
grep -E "^=====|passed|failed" "$log"
