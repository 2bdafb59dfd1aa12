#!/usr/bin/env bash
# One call on the GPU host (the `device` machine, released after seconds of idleness, so every call starts cold):
# build with CUDA, run the GPU checks, then the GPU and 16-core figures of the inference and rotation issues, each
# step under its own time limit so one slow step cannot eat the rest. Logs and JSON go to $OUT.
#   bash benchmarks/device_round.sh [steps...]   (default: checks woq_cuda inference_cuda woq_cpu inference_cpu hadamard)
# Needs .whl/ and .deps/ carried (see device_setup.sh).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/device-out}
mkdir -p "$OUT"
export TORCH_CUDA_ARCH_LIST=9.0 CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >/dev/null 2>&1
export PYTHONPATH=/tmp/site
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(checks woq_cuda inference_cuda woq_cpu inference_cpu hadamard)

defines=(-Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90
         -Ccmake.define.nlohmann_json_DIR="$PWD/.deps/nlohmann-json/usr/share/cmake/nlohmann_json")
t0=$(date +%s)
python3 -m pip install -q --no-build-isolation --no-deps --no-index --no-compile --target /tmp/fastround-cuda \
  -Cbuild-dir=/tmp/fastround-cuda-build "${defines[@]}" . > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
export PYTHONPATH=/tmp/fastround-cuda:/tmp/site
echo "build $(( $(date +%s) - t0 )) s"
python3 -c "import torch; from fastround import _torch; print('cuda kernels:', _torch.with_cuda(), torch.cuda.get_device_name())"

run() {  # name, seconds, command...
  local name=$1 limit=$2; shift 2
  [ -n "${STEP_LIMIT_MAX:-}" ] && [ "$limit" -gt "$STEP_LIMIT_MAX" ] && limit=$STEP_LIMIT_MAX  # fit one call
  local s=$(date +%s)
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: rc=$? $(( $(date +%s) - s )) s"; tail -4 "$OUT/$name.log"
}
for step in "${steps[@]}"; do
  case $step in
    checks) run gpu_checks 200 python3 -m pytest -q -p no:cacheprovider benchmarks/gpu_checks ;;
    woq_cuda) run woq_cuda_bench 90 sh -c "python3 benchmarks/woq_cuda_bench.py > $OUT/woq_cuda_bench.json" ;;
    inference_cuda) run inference_cuda 120 python3 benchmarks/inference.py --device cuda:0 --layers 32 \
      --json "$OUT/inference-h200.json" ;;
    hooks_cuda) run hooks_cuda 200 python3 benchmarks/inference.py --device cuda:0 --layers 32 --skip_bf16 \
      --prefill 0 --hooks quarot,transform,quarot_r1 --hook_paths fused --pairs 7 --new_tokens 32 --repeat 1 \
      --json "$OUT/inference-hooks-h200.json" ;;
    hooks_fuse) run hooks_fuse 240 python3 benchmarks/inference.py --device cuda:0 --layers 32 --skip_bf16 \
      --prefill 0 --hooks transform --hook_paths fused,two_ops --pairs 7 --new_tokens 32 --repeat 1 \
      --json "$OUT/inference-hooks-h200-fusefwht.json" ;;
    woq_cpu) run woq_linear_cpu16 120 python3 benchmarks/woq_linear.py --threads 16 --iters 5 --min_seconds 0.2 \
      --json "$OUT/woq_linear-h200host-16t.json" ;;
    woq_cpu_interleaved) run woq_gemv_interleaved16 90 python3 benchmarks/woq_gemv_interleaved.py --threads 16,8,1 \
      --json "$OUT/woq_gemv_interleaved-h200host.json" ;;
    inference_cpu32) run inference_cpu32 240 python3 benchmarks/inference.py --device cpu --threads 16 --layers 32 --prefill 0 \
      --new_tokens 8 --repeat 1 --json "$OUT/inference-cpu16-32l.json" ;;
    inference_cpu) run inference_cpu16 150 python3 benchmarks/inference.py --device cpu --threads 16 --layers 8 \
      --new_tokens 16 --repeat 2 --json "$OUT/inference-cpu16.json" ;;
    hadamard) run hadamard_cpu16 90 python3 benchmarks/hadamard.py --threads 16 --json "$OUT/hadamard-cpu16.json" ;;
    fwht_decode) run fwht_decode_cuda 60 python3 benchmarks/fwht_decode_cuda.py --json "$OUT/fwht-decode-h200.json" ;;
    hadamard_cuda) run hadamard_cuda 90 python3 benchmarks/hadamard.py --device cuda --json "$OUT/hadamard-h200.json" ;;
    hadamard_cuda_bf16) run hadamard_cuda_bf16 90 python3 benchmarks/hadamard.py --device cuda --dtype bfloat16 \
      --json "$OUT/hadamard-h200-bf16.json" ;;
    mxfp4_act) run mxfp4_act_checks 150 python3 -m pytest -q -s -p no:cacheprovider \
      benchmarks/gpu_checks/test_hadamard_mxfp4_act_cuda.py ;;
    fwht_checks) run fwht_checks 150 python3 -m pytest -q -p no:cacheprovider benchmarks/gpu_checks/test_fwht_cuda.py \
      benchmarks/gpu_checks/test_rotation_cuda.py ;;
    tune_mx) run tune_mxfp4 240 python3 benchmarks/tune.py --device cuda:0 --layers 2 --schemes MXFP4 \
      --tools fastround,upstream --iters 50 --timeout 220 --json "$OUT/tune-mxfp4-h200.json" ;;
    woq_staged) run woq_cuda_staged 120 sh -c "python3 benchmarks/woq_cuda_bench.py --staged --budget_s 90 \
      > $OUT/woq_cuda_staged.json 2> $OUT/woq_cuda_staged_rows.jsonl" ;;
    woq_half2) run woq_cuda_half2 120 sh -c "python3 benchmarks/woq_cuda_bench.py --half2 \
      > $OUT/woq_cuda_half2.json 2> $OUT/woq_cuda_half2_rows.jsonl" ;;
    woq_mma) run woq_cuda_mma 240 sh -c "python3 benchmarks/woq_cuda_bench.py --mma --budget_s 150 \
      > $OUT/woq_cuda_mma.json 2> $OUT/woq_cuda_mma_rows.jsonl" ;;
    woq_checks) run woq_checks 300 python3 -m pytest -q -p no:cacheprovider benchmarks/gpu_checks/test_woq_cuda.py ;;
    woq_sweep) run woq_cuda_sweep 150 sh -c "python3 benchmarks/woq_cuda_bench.py --sweep > $OUT/woq_cuda_sweep.json \
      2> $OUT/woq_cuda_sweep_rows.jsonl" ;;
    *) echo "unknown step $step" ;;
  esac
done
