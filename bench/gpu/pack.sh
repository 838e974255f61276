#!/usr/bin/env bash
# Prepares .gpu/ (git-ignored) for one GPU job, on the development machine: the GPU machine has
# CUDA, PyTorch and transformers but no Node, and reaches nothing outside itself.
#   .gpu/node.xz          this machine's Node binary (glibc only; runs on the GPU machine's Ubuntu)
#   .gpu/node_modules.tar.xz  the packages the tests need (npm ci in a scratch copy, then pruned)
#   .gpu/anchors/         the PyTorch anchor scripts (../shared/anchors), rerun in the same job
#   .gpu/sppo.node        the addon built here with the CUDA backend (static CUDA runtime, cuBLASLt
#                         opened at run time, so it loads there); the C++ tests and benchmarks are
#                         rebuilt there from the carried sources.
# Total must stay under the 64 MiB carry limit.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
out="$root/.gpu"
rm -rf "$out" && mkdir -p "$out/anchors"
xz -T2 -6 -c "$(command -v node)" > "$out/node.xz"
node -e "const a=require('$root/build/Release/sppo.node'); if(!a.cudaInfo().built){console.error('build/Release/sppo.node has no CUDA backend: rebuild with nvcc on PATH (rm -rf build && npm run build:native)');process.exit(1)}"
cp "$root/build/Release/sppo.node" "$out/sppo.node"
cp "$root"/../shared/anchors/*.py "$out/anchors/" 2>/dev/null || cp /work/shared/anchors/*.py "$out/anchors/"
scratch=$(mktemp -d)
cp "$root/package.json" "$root/package-lock.json" "$scratch/"
# --ignore-scripts: the addon is built on the GPU machine; only the JavaScript packages travel.
(cd "$scratch" && npm ci --ignore-scripts --no-audit --no-fund >/dev/null)
# What the GPU checks never load: compilers, type packages, the tokenizer corpora of other tests.
(cd "$scratch/node_modules" && rm -rf typescript @types node-gyp @lenml llama3-tokenizer-js mistral-tokenizer-js \
  lightningcss* @rolldown/binding-linux-x64-musl @esbuild/linux-x64-musl 2>/dev/null || true)
tar -C "$scratch" -cf - node_modules | xz -T2 -6 > "$out/node_modules.tar.xz"
rm -rf "$scratch"
du -ch "$out"/* | tail -1
