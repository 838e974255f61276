#!/usr/bin/env bash
# One GPU job (../shared/docs/GPU.md), run from the repository root on the GPU machine with
# .gpu/ from bench/gpu/pack.sh carried along:
#   run(command="bash bench/gpu/run.sh", carry=[".gpu"], timeout_s=...)
# Steps, each logged to $OUT and skipped when its prerequisite is missing:
#   1. build the C++ tests and benchmarks with CMake (SPPO_CUDA=ON) in build-gpu/
#   2. the C++ CUDA tests (every op against the CPU backend, the model, the sampler)
#   3. the CUDA benchmarks, then the PyTorch anchors in the same job (ratios only compare here)
#   4. through Node: the device tests and the transformers round trip (issue 6)
# SECTIONS="build tests bench anchors node" picks a subset.
set -u
OUT=${OUT:-/tmp/sppo-gpu-out}
mkdir -p "$OUT"
SECTIONS=${SECTIONS:-"build tests bench anchors node"}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
log() { echo "== $* ($(date +%T))" | tee -a "$OUT/summary.txt"; }
nproc_=$(nproc)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt" 2>&1

if want build; then
  log build
  if [ -f .gpu/node.xz ]; then xz -dc .gpu/node.xz > .gpu/node && chmod +x .gpu/node; fi
  if [ -f .gpu/node_modules.tar.xz ] && [ ! -d node_modules ]; then xz -dc .gpu/node_modules.tar.xz | tar -xf -; fi
  cmake -S . -B build-gpu -DSPPO_CUDA=ON -DCMAKE_BUILD_TYPE=Release > "$OUT/build.log" 2>&1 &&
    cmake --build build-gpu -j"$nproc_" >> "$OUT/build.log" 2>&1
  echo "build exit $?" | tee -a "$OUT/summary.txt"
  # The addon was built on the development machine (pack.sh; static CUDA runtime, cuBLASLt by dlopen).
  [ -f .gpu/sppo.node ] && mkdir -p build/Release && cp .gpu/sppo.node build/Release/sppo.node
fi

if want tests && [ -x build-gpu/sppo_tests ]; then
  log "C++ tests (CUDA against CPU)"
  timeout 300 ./build-gpu/sppo_tests > "$OUT/cpp_tests.log" 2>&1
  tail -1 "$OUT/cpp_tests.log" | tee -a "$OUT/summary.txt"
  grep -E "^(FAIL|skip)" "$OUT/cpp_tests.log" | head -40 >> "$OUT/summary.txt"
fi

if want bench && [ -x build-gpu/sppo_bench ]; then
  log "CUDA benchmarks"
  timeout 300 ./build-gpu/sppo_bench cuda_ > "$OUT/cuda_bench.log" 2>&1
  cat "$OUT/cuda_bench.log" >> "$OUT/summary.txt"
fi

# Optional (SECTIONS=... fma): the training step again on the FMA attention kernels, to time the
# tensor-core attention against them in the same job.
if want fma && [ -x build-gpu/sppo_bench ]; then
  log "CUDA train step, FMA attention"
  SPPO_CUDA_ATTENTION=fma timeout 200 ./build-gpu/sppo_bench cuda_train_step > "$OUT/cuda_bench_fma.log" 2>&1
  cat "$OUT/cuda_bench_fma.log" >> "$OUT/summary.txt"
fi

if want anchors && [ -f .gpu/anchors/gpu_anchors.py ]; then
  log "PyTorch anchors (same job)"
  OUT="$OUT" timeout 240 python3 .gpu/anchors/gpu_anchors.py > "$OUT/anchors.log" 2>&1
  grep -vE "^\s" "$OUT/anchors.log" | head -30 >> "$OUT/summary.txt"
fi

if want node && [ -x .gpu/node ] && [ -f build/Release/sppo.node ]; then
  log "Node: device tests, transformers round trip"
  export PATH="$PWD/.gpu:$PATH"
  SPPO_PYTHON=$(command -v python3) timeout 400 ./.gpu/node node_modules/vitest/vitest.mjs run \
    test/engine-device.test.ts test/io-transformers.test.ts > "$OUT/node_tests.log" 2>&1
  tail -15 "$OUT/node_tests.log" >> "$OUT/summary.txt"
fi
log done
