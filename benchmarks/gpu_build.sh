#!/usr/bin/env bash
# Builds fastround with its CUDA tuning kernels on the GPU host (the `device` machines: CUDA torch, nvcc, CMake,
# pybind11 and scikit-build-core present, no registry) into /tmp, then runs benchmarks/gpu_checks: the CUDA ops
# against the CPU ops bit for bit and woq_linear against its reference (pytest), then their speed
# (bench_tune_cuda.py, woq_cuda_bench.py). One command, from the repo root:
#   bash benchmarks/gpu_build.sh [pytest args...]   (FASTROUND_WOQ_SWEEP=1: also woq_cuda_bench.py --sweep)
# Needs .deps/nlohmann-json carried along (Debian's nlohmann-json3-dev unpacked, as for device_setup.sh) unless
# the host has nlohmann/json's CMake package. The package goes to /tmp/fastround-cuda (PYTHONPATH), the CMake
# build to /tmp/fastround-cuda-build (kept, so a second call rebuilds only what changed). Architectures: sm_90
# unless FASTROUND_CUDA_ARCHS says otherwise (e.g. "90;100"). Results: $OUT/tune_cuda_bench.json and
# $OUT/woq_cuda_bench.json when $OUT is set.
set -euo pipefail
cd "$(dirname "$0")/.."

PKG=/tmp/fastround-cuda
BUILD=/tmp/fastround-cuda-build
if ! command -v nvcc >/dev/null && [ -z "${CUDACXX:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"  # torch's own gencode flags: no autodetect run
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
python3 -c "import torch; assert torch.version.cuda, 'this torch has no CUDA'; print('torch', torch.__version__, \
'CUDA', torch.version.cuda)"

defines=(-Ccmake.define.CMAKE_CUDA_ARCHITECTURES="${FASTROUND_CUDA_ARCHS:-90}")
if [ -d .deps/nlohmann-json ]; then
  defines+=(-Ccmake.define.nlohmann_json_DIR="$PWD/.deps/nlohmann-json/usr/share/cmake/nlohmann_json")
fi
rm -rf "$PKG"
python3 -m pip install -q --no-build-isolation --no-deps --no-index --no-compile --target "$PKG" \
  -Cbuild-dir="$BUILD" "${defines[@]}" .
export PYTHONPATH="$PKG${PYTHONPATH:+:$PYTHONPATH}"

# torch first: fastround._torch resolves libtorch / libc10_cuda from the already loaded torch.
python3 -c "import torch; from fastround import _torch; assert _torch.with_cuda(), 'built without CUDA'; \
print('fastround with CUDA kernels, device', torch.cuda.get_device_name())"
python3 -m pytest -q -p no:cacheprovider benchmarks/gpu_checks "$@"
python3 benchmarks/gpu_checks/bench_tune_cuda.py ${OUT:+--json "$OUT/tune_cuda_bench.json"}
if [ -n "${OUT:-}" ]; then
  python3 benchmarks/woq_cuda_bench.py > "$OUT/woq_cuda_bench.json"
else
  python3 benchmarks/woq_cuda_bench.py
fi
# FASTROUND_WOQ_SWEEP=1: also time every batch-1 GEMV variant (woq_cuda_bench.py --sweep) to pick the default.
if [ "${FASTROUND_WOQ_SWEEP:-0}" = 1 ]; then
  if [ -n "${OUT:-}" ]; then
    python3 benchmarks/woq_cuda_bench.py --sweep > "$OUT/woq_cuda_sweep.json" 2> "$OUT/woq_cuda_sweep_rows.jsonl"
    cat "$OUT/woq_cuda_sweep.json"
  else
    python3 benchmarks/woq_cuda_bench.py --sweep
  fi
fi
