#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored) for one GPU job, on the development machine: the GPU machine has
# CUDA, PyTorch and transformers but no Node, and reaches nothing outside itself. Nothing is
# built there: the job only runs what travels here.
#   .gpu/node.xz              this machine's Node binary (glibc only; runs on the GPU machine's Ubuntu)
#   .gpu/node_modules.tar.xz  the packages the Node device tests need (npm ci in a scratch copy, pruned)
#   .gpu/bin.tar.xz           build/sppo_tests and build/sppo_bench (CUDA backend, static CUDA runtime,
#                             cuBLASLt opened at run time); sppo_tests_<name> for each planted bug of
#                             bench/gpu/plants/<name>.patch (SPPO_GPU_PLANTS=0 leaves them out); plus
#                             any extra executables named in SPPO_GPU_EXTRA_BINS ("name=path ..."):
#                             e.g. a baseline build's sppo_bench as sppo_bench_base, for before/after
#                             in the same job
#   .gpu/sppo.node.xz         the addon built here with the CUDA backend
# Total must stay under the 64 MiB carry limit.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out="$root/.gpu"
# Node and the packages are slow to compress: kept from the last pack while Node and the lock
# file are the same.
stamp="$(node --version) $(sha256sum "$root/package-lock.json" | cut -d' ' -f1)"
keep=""
[ -f "$out/stamp" ] && [ "$(cat "$out/stamp")" = "$stamp" ] && [ -f "$out/node.xz" ] && [ -f "$out/node_modules.tar.xz" ] && keep=1
# Everything else goes, including what a dry run of run.sh here unpacked (node, bin/): the carry
# must hold only what pack.sh writes.
if [ -n "$keep" ]; then
  find "$out" -mindepth 1 -maxdepth 1 ! -name node.xz ! -name node_modules.tar.xz ! -name stamp -exec rm -rf {} +
else
  rm -rf "$out"
fi
mkdir -p "$out/bin"
node -e "const a=require('$root/build/Release/sppo.node'); if(!a.cudaInfo().built){console.error('build/Release/sppo.node has no CUDA backend: rebuild with nvcc on PATH (rm -rf build && npm run build:native)');process.exit(1)}"
# The executables must be as new as the sources they were built from.
(cd "$root/build" && cmake --build . --target sppo_tests sppo_bench > /dev/null)
xz -T2 -6 -c "$root/build/Release/sppo.node" > "$out/sppo.node.xz"
cp "$root/build/sppo_tests" "$root/build/sppo_bench" "$out/bin/"
for pair in ${SPPO_GPU_EXTRA_BINS:-}; do cp "${pair#*=}" "$out/bin/${pair%%=*}"; done
# The planted bugs: each patch is applied to this tree, sppo_tests is built in a scratch copy of
# build/ (only the patched sources recompile there, about a minute each), and each patched file
# gets back its content and modification time, so build/ never sees a plant. A patch that no
# longer applies stops the pack: the check it stands for would be silently gone.
if [ "${SPPO_GPU_PLANTS:-1}" != 0 ]; then
  plant_dir=$(mktemp -d)
  # Puts every file saved under $plant_dir/orig (its path with / as %) back, with its mtime.
  unplant() {
    for f in "$plant_dir"/orig/*; do [ -e "$f" ] && cp -p "$f" "$root/$(basename "$f" | tr '%' '/')"; done
    rm -rf "$plant_dir/orig"
  }
  trap 'unplant; rm -rf "$plant_dir"' EXIT
  for patch in "$root"/bench/gpu/plants/*.patch; do
    name=$(basename "$patch" .patch)
    if ! git -C "$root" apply --check "$patch"; then
      echo "bench/gpu/plants/$name.patch no longer applies to this tree: update it" >&2
      exit 1
    fi
    rm -rf "$plant_dir/build" && cp -a "$root/build" "$plant_dir/build" && mkdir "$plant_dir/orig"
    for f in $(git -C "$root" apply --numstat "$patch" | cut -f3); do
      cp -p "$root/$f" "$plant_dir/orig/$(echo "$f" | tr '/' '%')"
    done
    git -C "$root" apply "$patch"
    if ! (cd "$plant_dir/build" && cmake --build . --target sppo_tests > "$plant_dir/build.log" 2>&1); then
      cat "$plant_dir/build.log" >&2
      echo "planted bug $name does not build" >&2
      exit 1
    fi
    unplant
    cp "$plant_dir/build/sppo_tests" "$out/bin/sppo_tests_$name"
    echo "planted bug $name: built"
  done
  trap - EXIT
  unplant
  rm -rf "$plant_dir"
fi
# One stream with a dictionary wider than an executable (~10 MB): each planted-bug executable then
# compresses to its few differences from sppo_tests.
tar -C "$out" -cf - bin | xz -T1 --lzma2=preset=6,dict=64MiB > "$out/bin.tar.xz" && rm -rf "$out/bin"
if [ -z "$keep" ]; then
xz -T2 -6 -c "$(command -v node)" > "$out/node.xz"
scratch=$(mktemp -d)
cp "$root/package.json" "$root/package-lock.json" "$scratch/"
# --ignore-scripts: only the JavaScript packages travel (the addon is carried above).
(cd "$scratch" && npm ci --ignore-scripts --no-audit --no-fund >/dev/null)
# What the GPU checks never load: compilers, type packages, the tokenizer corpora of other tests.
(cd "$scratch/node_modules" && rm -rf typescript @types node-gyp @lenml llama3-tokenizer-js mistral-tokenizer-js \
  lightningcss* @rolldown/binding-linux-x64-musl @esbuild/linux-x64-musl 2>/dev/null || true)
tar -C "$scratch" -cf - node_modules | xz -T2 -6 > "$out/node_modules.tar.xz"
rm -rf "$scratch"
echo "$stamp" > "$out/stamp"
fi
du -ch "$out"/* | tail -1
