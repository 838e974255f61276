#!/usr/bin/env bash
# One GPU job (docs/architecture.md, "Checking the CUDA backend"), run from the repository root
# on the GPU machine with .gpu/ from bench/gpu/pack.sh carried along:
#   run(command="bash bench/gpu/run.sh", carry=[".gpu"], timeout_s=...)
# Nothing is compiled there: the C++ test and benchmark executables and the addon travel in .gpu/.
# Sections, in order (SECTIONS="..." picks a subset; each is skipped when its input is missing):
#   tests     the C++ tests: every CUDA op, the model and the sampler against the CPU backend
#   mutants   the C++ update tests on executables with one planted optimizer bug each
#             (sppo_tests_<bug> in .gpu/bin, from bench/gpu/plants/): each must fail
#   bench     the CUDA benchmarks and the per-phase breakdown (sppo_bench cuda_), then the same on
#             a baseline build when .gpu/bin/sppo_bench_base exists (BASE_FILTER: which of them)
#   node      through Node: the device tests and the transformers round trip
#   variant   the tests and benchmarks again under another choice of kernels (VARIANT_ENV)
#   peers     the PyTorch peers (bench/gpu/peers.py), last so nothing overlaps the engine's timing
#   big       the Llama-3-8B shape (issue 13): the memory plan against cudaMemGetInfo, one SPPO
#             step with LoRA r16 on all seven projections and one full-fine-tuning step with
#             RMSprop and activation checkpointing, generation at batch 64 after each (sppo_bench
#             big8b_), then the PyTorch peers: plain LoRA (and PEFT's where installed), full
#             fine-tuning with gradient checkpointing (peers.py lora8B train8B); ~110 GiB and a
#             few minutes, so not in the default SECTIONS: its
#             own job, `SECTIONS=big bash bench/gpu/run.sh`, within the same budget
#   pairrm    PairRM's DeBERTa-v3 encoder (issue 17) against transformers' DebertaV2Model in the
#             full PairRM shape, both directions of loading, CPU (fp32), CUDA fp32 and bf16; not in the
#             default SECTIONS either: `SECTIONS="pairrm big" bash bench/gpu/run.sh`
# Writes $OUT/summary.txt (the tests, the breakdown, every speed beside its peer and the ratio)
# and one log per section.
# The whole job keeps within BUDGET_S seconds (default 420: the GPU lease is short): each section
# runs under `timeout` for the smaller of its own cap and what the budget leaves after the time
# kept back for the sections after it; a section with under 10 s left is skipped, and says so.
set -u
OUT=${OUT:-/tmp/sppo-gpu-out}
mkdir -p "$OUT"
SECTIONS=${SECTIONS:-"tests mutants bench node variant peers"}
want() { [[ " $SECTIONS " == *" $1 "* ]]; }
log() { echo "== $* ($(date +%T))" | tee -a "$OUT/summary.txt"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt"
start=$(date +%s)
deadline=$((start + ${BUDGET_S:-420}))
# limit CAP [KEEP]: seconds a section may run: CAP, or less where the budget, minus KEEP seconds
# for the sections after it, has less left; 0 when that is under 10 s.
limit() {
  local l=$((deadline - $(date +%s) - ${2:-0}))
  ((l > $1)) && l=$1
  ((l < 10)) && l=0
  echo $l
}
# run_for SECONDS WHAT: true when SECONDS allow the section; otherwise notes the skip.
run_for() {
  (($1 > 0)) && return 0
  echo "skipped $2: out of the ${BUDGET_S:-420} s budget" | tee -a "$OUT/summary.txt"
  return 1
}

log unpack
[ -f .gpu/bin.tar.xz ] && xz -dc .gpu/bin.tar.xz | tar -C .gpu -xf -
if [ -f .gpu/node.xz ]; then xz -dc .gpu/node.xz > .gpu/node && chmod +x .gpu/node; fi
if [ -f .gpu/node_modules.tar.xz ] && [ ! -d node_modules ]; then xz -dc .gpu/node_modules.tar.xz | tar -xf -; fi
[ -f .gpu/sppo.node.xz ] && mkdir -p build/Release && xz -dc .gpu/sppo.node.xz > build/Release/sppo.node
bin=.gpu/bin

# Each section keeps back (limit's second argument) about what the sections after it need:
# mutants ~30 s, bench ~90 (up to 180: the breakdown comes last), node ~60, peers ~140-170
# (torch.compile warm-ups); the variant takes what is left.
if want tests && [ -x $bin/sppo_tests ] && t=$(limit 120 290) && run_for $t "C++ tests"; then
  log "C++ tests (CUDA against CPU)"
  timeout $t $bin/sppo_tests > "$OUT/cpp_tests.log" 2>&1
  tail -1 "$OUT/cpp_tests.log" | tee -a "$OUT/summary.txt"
  grep -E -A2 "^FAIL" "$OUT/cpp_tests.log" | head -40 >> "$OUT/summary.txt"
  # The update tests' own measurements (gradient and update errors, loss trajectories).
  grep -E "^      (largest|absent|AdamW|RMSprop|step)" "$OUT/cpp_tests.log" >> "$OUT/summary.txt"
fi

# The planted bugs (bench/gpu/plants/, built by pack.sh): only the tests that must catch them.
UPDATE_TESTS="cuda_training_step,cuda_embedding_rows,cuda_optimizer,cuda_linear_updates,cuda_rmsprop_training,cuda_bf16_gradients"
if want mutants; then
  for m in $bin/sppo_tests_*; do
    [ -x "$m" ] || continue
    name=${m##*/sppo_tests_}
    t=$(limit 30 270)
    run_for $t "planted bug '$name'" || continue
    timeout $t "$m" "$UPDATE_TESTS" > "$OUT/mutant_$name.log" 2>&1
    caught=$(grep -E "^FAIL" "$OUT/mutant_$name.log" | awk '{print $2}' | sort -u | tr '\n' ' ')
    if [ -n "$caught" ]; then verdict="caught by: $caught"
    elif grep -qE "^[1-9][0-9]* passed" "$OUT/mutant_$name.log"; then verdict="NOT CAUGHT"
    else verdict="not checked: no update test ran ($(tail -1 "$OUT/mutant_$name.log"))"; fi
    echo "planted bug '$name': $verdict" | tee -a "$OUT/summary.txt"
  done
fi

if want bench && [ -x $bin/sppo_bench ] && t=$(limit 180 200) && run_for $t "CUDA benchmarks"; then
  log "CUDA benchmarks and breakdown"
  timeout $t $bin/sppo_bench cuda_ > "$OUT/cuda_bench.log" 2>&1
  cat "$OUT/cuda_bench.log" >> "$OUT/summary.txt"
  if [ -x $bin/sppo_bench_base ] && t=$(limit 150 220) && run_for $t "baseline benchmarks"; then
    log "baseline build: CUDA benchmarks and breakdown"
    timeout $t $bin/sppo_bench_base "${BASE_FILTER:-cuda_}" > "$OUT/cuda_bench_base.log" 2>&1
    cat "$OUT/cuda_bench_base.log" >> "$OUT/summary.txt"
  fi
fi

if want node && [ -x .gpu/node ] && [ -f build/Release/sppo.node ] && t=$(limit 120 150) && run_for $t "Node tests"; then
  log "Node: device tests, transformers round trip"
  export PATH="$PWD/.gpu:$PATH"
  SPPO_PYTHON=$(command -v python3) timeout $t ./.gpu/node node_modules/vitest/vitest.mjs run \
    test/engine-device.test.ts test/io-transformers.test.ts > "$OUT/node_tests.log" 2>&1
  grep -E "✓|×|FAIL|passed|failed" "$OUT/node_tests.log" | tail -20 >> "$OUT/summary.txt"
  # The device tests' own measurements (update errors where |g| is above noise, linear updates).
  grep -E "^update check:" "$OUT/node_tests.log" >> "$OUT/summary.txt"
fi
# A variant of the build's choices, through its environment (VARIANT_ENV, e.g.
# "SPPO_CUDA_ATTENTION=wmma"): its tests (VARIANT_TESTS, a filter) and benchmarks (VARIANT_BENCH),
# so a kernel and its replacement are both checked and timed in one job.
# By default the mma.sync attention kernels, which no GPU has run yet (the WMMA ones are the default).
VARIANT_ENV=${VARIANT_ENV-"SPPO_CUDA_ATTENTION=mma"}
VARIANT_TESTS=${VARIANT_TESTS-"cuda_attention,cuda_training,cuda_model"}
VARIANT_BENCH=${VARIANT_BENCH-"cuda_train_step"}
if want variant && [ -n "$VARIANT_ENV" ] && [ -x $bin/sppo_tests ] && t=$(limit 40 150) && run_for $t "variant tests"; then
  log "variant $VARIANT_ENV"
  env $VARIANT_ENV timeout $t $bin/sppo_tests "${VARIANT_TESTS:-cuda_}" > "$OUT/variant_tests.log" 2>&1
  tail -1 "$OUT/variant_tests.log" | tee -a "$OUT/summary.txt"
  grep -E -A2 "^FAIL" "$OUT/variant_tests.log" | head -20 >> "$OUT/summary.txt"
  if [ -n "$VARIANT_BENCH" ] && t=$(limit 40 140) && run_for $t "variant benchmarks"; then
    env $VARIANT_ENV timeout $t $bin/sppo_bench "$VARIANT_BENCH" > "$OUT/variant_bench.log" 2>&1
    cat "$OUT/variant_bench.log" >> "$OUT/summary.txt"
  fi
fi
# The peers last, so nothing overlaps the engine's timing; peers.json is written after each
# peer, so one cut off by the budget keeps those before it.
if want peers && t=$(limit 300 5) && run_for $t "PyTorch peers"; then
  log "PyTorch peers (same job)"
  OUT="$OUT" timeout $t python3 bench/gpu/peers.py > "$OUT/peers.log" 2>&1
  grep -vE "^\s|^Traceback|^  File" "$OUT/peers.log" | tail -8 >> "$OUT/summary.txt"
fi
if want big && [ -x $bin/sppo_bench ] && t=$(limit 300 120) && run_for $t "Llama-3-8B shape"; then
  log "Llama-3-8B shape: plan, LoRA and full fine-tuning, generation"
  timeout $t $bin/sppo_bench big8b_ > "$OUT/big8b.log" 2>&1
  cat "$OUT/big8b.log" >> "$OUT/summary.txt"
  if t=$(limit 240) && run_for $t "Llama-3-8B shape: the PyTorch peer"; then
    log "Llama-3-8B shape: the PyTorch peers (LoRA; full fine-tuning with gradient checkpointing)"
    OUT="$OUT" PEERS="lora8B train8B" timeout $t python3 bench/gpu/peers.py > "$OUT/peers_big.log" 2>&1
    grep -E "^train_8B|Error|error" "$OUT/peers_big.log" | tail -8 >> "$OUT/summary.txt"
  fi
fi
if want pairrm && [ -x .gpu/node ] && [ -f build/Release/sppo.node ] && t=$(limit 300 60) && run_for $t "PairRM check"; then
  log "Node: PairRM against transformers"
  export PATH="$PWD/.gpu:$PATH"
  SPPO_PYTHON=$(command -v python3) timeout $t ./.gpu/node node_modules/vitest/vitest.mjs run \
    test/pairrm-transformers.test.ts > "$OUT/pairrm_transformers.log" 2>&1
  grep -E "✓|×|FAIL|passed|failed|→" "$OUT/pairrm_transformers.log" | tail -12 >> "$OUT/summary.txt"
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
