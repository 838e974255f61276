#!/usr/bin/env bash
# One GPU job (docs/architecture.md, "Checking the CUDA backend"), run from the repository root
# on the GPU machine with .gpu/ from bench/gpu/pack.sh carried along:
#   run(command="bash bench/gpu/run.sh", carry=[".gpu"], timeout_s=...)
# Nothing is compiled there: the C++ test and benchmark executables and the addon travel in .gpu/.
# Sections, in order (SECTIONS="..." picks a subset; each is skipped when its input is missing):
#   tests     the C++ tests: every CUDA op, the model and the sampler against the CPU backend
#   mutants   the C++ update tests on executables with one planted optimizer bug each
#             (sppo_tests_<bug> in .gpu/bin): each must fail
#   variant   the tests and benchmarks again under another choice of kernels (VARIANT_ENV)
#   bench     the CUDA benchmarks and the per-phase breakdown (sppo_bench cuda_), then the same on
#             a baseline build when .gpu/bin/sppo_bench_base exists (BASE_FILTER: which of them)
#   node      through Node: the device tests and the transformers round trips (Llama family, PairRM)
#   peers     the PyTorch peers (bench/gpu/peers.py), last so nothing overlaps the engine's timing
# Writes $OUT/summary.txt (the tests, the breakdown, every speed beside its peer and the ratio)
# and one log per section.
set -u
OUT=${OUT:-/tmp/sppo-gpu-out}
mkdir -p "$OUT"
SECTIONS=${SECTIONS:-"tests mutants variant bench node peers"}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
log() { echo "== $* ($(date +%T))" | tee -a "$OUT/summary.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt"
start=$(date +%s)

log unpack
[ -f .gpu/bin.tar.xz ] && xz -dc .gpu/bin.tar.xz | tar -C .gpu -xf -
if [ -f .gpu/node.xz ]; then xz -dc .gpu/node.xz > .gpu/node && chmod +x .gpu/node; fi
if [ -f .gpu/node_modules.tar.xz ] && [ ! -d node_modules ]; then xz -dc .gpu/node_modules.tar.xz | tar -xf -; fi
[ -f .gpu/sppo.node ] && mkdir -p build/Release && cp .gpu/sppo.node build/Release/sppo.node
bin=.gpu/bin

if want tests && [ -x $bin/sppo_tests ]; then
  log "C++ tests (CUDA against CPU)"
  timeout 300 $bin/sppo_tests > "$OUT/cpp_tests.log" 2>&1
  tail -1 "$OUT/cpp_tests.log" | tee -a "$OUT/summary.txt"
  grep -E -A2 "^FAIL" "$OUT/cpp_tests.log" | head -40 >> "$OUT/summary.txt"
  # The update tests' own measurements (gradient and update errors, loss trajectories).
  grep -E "^      (largest|AdamW|RMSprop|step)" "$OUT/cpp_tests.log" >> "$OUT/summary.txt"
fi

if want mutants; then
  for m in $bin/sppo_tests_*; do
    [ -x "$m" ] || continue
    name=${m##*/sppo_tests_}
    timeout 120 "$m" cuda_ > "$OUT/mutant_$name.log" 2>&1
    caught=$(grep -E "^FAIL" "$OUT/mutant_$name.log" | awk '{print $2}' | tr '\n' ' ')
    echo "planted bug '$name': ${caught:+caught by: }${caught:-NOT CAUGHT}" | tee -a "$OUT/summary.txt"
  done
fi

# A variant of the build's choices, through its environment (VARIANT_ENV, e.g.
# "SPPO_CUDA_ATTENTION=wmma"): its tests (VARIANT_TESTS, a filter) and benchmarks (VARIANT_BENCH),
# so a kernel and its replacement are both checked and timed in one job.
# By default the mma.sync attention kernels, which no GPU has run yet (the WMMA ones are the default).
VARIANT_ENV=${VARIANT_ENV-"SPPO_CUDA_ATTENTION=mma"}
VARIANT_TESTS=${VARIANT_TESTS-"cuda_attention,cuda_training,cuda_model"}
VARIANT_BENCH=${VARIANT_BENCH-"cuda_train_step"}
if want variant && [ -n "$VARIANT_ENV" ] && [ -x $bin/sppo_tests ]; then
  log "variant $VARIANT_ENV"
  env $VARIANT_ENV timeout 200 $bin/sppo_tests "${VARIANT_TESTS:-cuda_}" > "$OUT/variant_tests.log" 2>&1
  tail -1 "$OUT/variant_tests.log" | tee -a "$OUT/summary.txt"
  grep -E -A2 "^FAIL" "$OUT/variant_tests.log" | head -20 >> "$OUT/summary.txt"
  if [ -n "$VARIANT_BENCH" ]; then
    env $VARIANT_ENV timeout 200 $bin/sppo_bench "$VARIANT_BENCH" > "$OUT/variant_bench.log" 2>&1
    cat "$OUT/variant_bench.log" >> "$OUT/summary.txt"
  fi
fi

if want bench && [ -x $bin/sppo_bench ]; then
  log "CUDA benchmarks and breakdown"
  timeout 300 $bin/sppo_bench cuda_ > "$OUT/cuda_bench.log" 2>&1
  cat "$OUT/cuda_bench.log" >> "$OUT/summary.txt"
  if [ -x $bin/sppo_bench_base ]; then
    log "baseline build: CUDA benchmarks and breakdown"
    timeout 300 $bin/sppo_bench_base "${BASE_FILTER:-cuda_}" > "$OUT/cuda_bench_base.log" 2>&1
    cat "$OUT/cuda_bench_base.log" >> "$OUT/summary.txt"
  fi
fi

if want node && [ -x .gpu/node ] && [ -f build/Release/sppo.node ]; then
  log "Node: device tests, transformers round trip"
  export PATH="$PWD/.gpu:$PATH"
  SPPO_PYTHON=$(command -v python3) timeout 400 ./.gpu/node node_modules/vitest/vitest.mjs run \
    test/engine-device.test.ts test/io-transformers.test.ts > "$OUT/node_tests.log" 2>&1
  grep -E "✓|×|FAIL|passed|failed" "$OUT/node_tests.log" | tail -20 >> "$OUT/summary.txt"
  # PairRM's DeBERTa-v3 encoder against transformers' DebertaV2Model, both directions of loading,
  # on the CPU backend (fp32) and on CUDA (bf16)
  log "Node: PairRM against transformers"
  SPPO_PYTHON=$(command -v python3) timeout 900 ./.gpu/node node_modules/vitest/vitest.mjs run \
    test/pairrm-transformers.test.ts > "$OUT/pairrm_transformers.log" 2>&1
  grep -E "✓|×|FAIL|passed|failed|→" "$OUT/pairrm_transformers.log" | tail -12 >> "$OUT/summary.txt"
fi
if want peers; then
  log "PyTorch peers (same job)"
  OUT="$OUT" timeout 300 python3 bench/gpu/peers.py > "$OUT/peers.log" 2>&1
  grep -vE "^\s|^Traceback|^  File" "$OUT/peers.log" | tail -8 >> "$OUT/summary.txt"
fi
if [ -f "$OUT/cuda_bench.log" ]; then
  log "speed against the peers"
  python3 bench/gpu/summary.py "$OUT/cuda_bench.log" "$OUT/peers.json" \
    $( [ -f "$OUT/cuda_bench_base.log" ] && echo "$OUT/cuda_bench_base.log") >> "$OUT/summary.txt" 2>&1
fi
if [ -f "$OUT/variant_bench.log" ]; then
  echo "the same under $VARIANT_ENV:" >> "$OUT/summary.txt"
  grep -E "^(train|generate|fused)" "$OUT/variant_bench.log" >> "$OUT/summary.txt"
fi

log "done in $(( $(date +%s) - start )) s"
