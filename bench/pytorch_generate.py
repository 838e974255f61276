"""PyTorch CPU peer for bench/run.ts's generate-k case (issue 14): K samples per prompt.

The SPPO loop's generation workload: P prompts of T tokens, K samples of each, N new tokens
drawn by temperature sampling with a KV cache. Done the way Hugging Face's
generate(num_return_sequences=K) does it in eager mode, which is what the GPU peer of issue 14
runs: each prompt repeated K times, one prefill of all P * K rows, then one decode step per
token over a KV cache that grows by torch.cat (as HF's DynamicCache) with the GQA keys repeated
per head (repeat_kv). The model is bench/pytorch_cpu_baseline.py's Llama, imported, with the
dimensions given on the command line (bench/run.ts passes the engine's presetConfig, the one
source of the preset's shape). fp32, eager, no_grad.

Run:  /usr/bin/python3 bench/pytorch_generate.py --hidden 512 --layers 8 --heads 8 --kv-heads 4 \
          --ffn 1376 --vocab 8192 [--prompts 16 --prompt-len 256 --samples 5 --new-tokens 128]
Prints one JSON line (and writes it to --json): tok_s = new tokens / wall seconds of the whole
call (prefill included), best of --runs.
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pytorch_cpu_baseline import Llama  # noqa: E402  (the baseline's model, not a copy)


def positive(name):
    def parse(text):
        value = int(text)
        if value < 1:
            raise argparse.ArgumentTypeError(f"{name} must be a positive integer, got {text}")
        return value
    return parse


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("hidden", "layers", "heads", "kv-heads", "ffn", "vocab"):
        ap.add_argument(f"--{flag}", type=positive(f"--{flag}"), required=True, help="model dimension")
    ap.add_argument("--prompts", type=positive("--prompts"), default=16)
    ap.add_argument("--prompt-len", type=positive("--prompt-len"), default=256)
    ap.add_argument("--samples", type=positive("--samples"), default=5, help="K samples per prompt")
    ap.add_argument("--new-tokens", type=positive("--new-tokens"), default=128)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--runs", type=positive("--runs"), default=2, help="timed runs; the best is reported")
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: leave as is)")
    ap.add_argument("--json", metavar="OUT", help="also write the result to this file")
    a = ap.parse_args()
    if a.hidden % a.heads:
        ap.error(f"--hidden {a.hidden} is not a multiple of --heads {a.heads}")
    if a.heads % a.kv_heads:
        ap.error(f"--heads {a.heads} is not a multiple of --kv-heads {a.kv_heads}")
    if not a.temperature > 0:
        ap.error(f"--temperature must be > 0 (sampling), got {a.temperature}")
    return a


def main():
    a = parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    model = Llama(a.hidden, a.layers, a.heads, a.kv_heads, a.ffn, a.vocab).eval()
    prompts = torch.randint(0, a.vocab, (a.prompts, a.prompt_len))

    def generate():
        with torch.no_grad():
            ids = prompts.repeat_interleave(a.samples, 0)  # (P * K, T), prompt-major
            caches = [dict() for _ in model.blocks]
            hidden = model.hidden(ids, 0, caches)
            out = []
            for i in range(a.new_tokens):
                probs = torch.softmax(model.head(hidden[:, -1]) / a.temperature, -1)
                token = torch.multinomial(probs, 1)
                out.append(token)
                if i + 1 < a.new_tokens:
                    hidden = model.hidden(token, a.prompt_len + i, caches)
            return torch.cat(out, 1)

    seconds = []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        tokens = generate()
        seconds.append(time.perf_counter() - t0)
    sequences = a.prompts * a.samples
    assert tokens.shape == (sequences, a.new_tokens), tokens.shape
    res = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "sequences": sequences,
        "new_tokens": a.new_tokens,
        "seconds": seconds,
        "tok_s": sequences * a.new_tokens / min(seconds),
    }
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
