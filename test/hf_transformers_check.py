"""Cross-checks sppo-engine's Hugging Face I/O against transformers itself (driven by
test/io-transformers.test.ts; needs torch and transformers, any 4.x ≥ 4.43 or 5.x).

  make OUT
      Builds small random LlamaForCausalLM (llama3 RoPE scaling, untied), MistralForCausalLM
      (sliding window larger than the sequences) and Qwen2ForCausalLM (q/k/v biases, tied)
      models, saves each with save_pretrained (safetensors) to OUT/<name>/model, and writes
      OUT/<name>/tokens.json and OUT/<name>/logits.f32 (transformers' fp32 logits, row-major
      (batch, seq, vocab), little-endian).

  check MODEL_DIR TOKENS_JSON LOGITS_F32
      Loads MODEL_DIR (written by the engine) with AutoModelForCausalLM, refuses any missing,
      unexpected or mismatched tensor, runs the tokens and compares its logits with LOGITS_F32
      (the engine's). Prints one JSON line; exit status 1 on a mismatch.

Weights are random everywhere (norm weights around 1, biases non-zero) so that a swapped,
transposed or dropped tensor changes the logits.
"""
import inspect
import json
import os
import sys

import numpy as np
import torch
import transformers
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config, LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

# max |logits_a - logits_b| / max |logits_b|, fp32 against fp32 on the same weights
TOLERANCE = 1e-4
SMALL = dict(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2)


def rope_kwargs(config_class, theta, scaling):
    """RoPE settings in the form this transformers version's config class takes."""
    if "rope_parameters" in inspect.signature(config_class.__init__).parameters:  # transformers 5
        return {"rope_parameters": {"rope_type": "default", **(scaling or {}), "rope_theta": theta}}
    return {"rope_theta": theta, "rope_scaling": scaling}


def cases():
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 32}
    return {
        "llama": (LlamaForCausalLM, LlamaConfig(**SMALL, tie_word_embeddings=False,
                                                 **rope_kwargs(LlamaConfig, 500000.0, llama3))),
        "mistral": (MistralForCausalLM, MistralConfig(**SMALL, sliding_window=64, tie_word_embeddings=False,
                                                       **rope_kwargs(MistralConfig, 10000.0, None))),
        "qwen2": (Qwen2ForCausalLM, Qwen2Config(**SMALL, tie_word_embeddings=True, use_sliding_window=False,
                                                **rope_kwargs(Qwen2Config, 1000000.0, None))),
    }


def tokens_for(vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 24), generator=g)


def logits_of(model, tokens):
    with torch.no_grad():
        return model(input_ids=tokens).logits.float().numpy()


def save(model, directory):
    # safetensors is the default from 4.35 on; transformers 5 dropped the argument.
    if int(transformers.__version__.split(".")[0]) < 5:
        model.save_pretrained(directory, safe_serialization=True)
    else:
        model.save_pretrained(directory)


def make(out):
    for i, (name, (cls, config)) in enumerate(cases().items()):
        torch.manual_seed(1234 + i)
        config._attn_implementation = "eager"
        model = cls(config).eval()
        with torch.no_grad():
            for pname, p in model.named_parameters():
                if pname.endswith("norm.weight"):
                    p.copy_(1 + 0.1 * torch.randn_like(p))
                else:
                    p.normal_(0.0, 0.08)
        case = os.path.join(out, name)
        save(model, os.path.join(case, "model"))
        tokens = tokens_for(config.vocab_size, 99 + i)
        with open(os.path.join(case, "tokens.json"), "w") as f:
            json.dump(tokens.tolist(), f)
        logits_of(model, tokens).astype("<f4").tofile(os.path.join(case, "logits.f32"))
    print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__, "cases": list(cases())}))


def check(model_dir, tokens_json, logits_f32):
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, output_loading_info=True,
                                                       attn_implementation="eager")
    problems = {k: list(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    with open(tokens_json) as f:
        tokens = torch.tensor(json.load(f))
    theirs = logits_of(model.eval(), tokens)
    ours = np.fromfile(logits_f32, dtype="<f4").reshape(theirs.shape)
    rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
    ok = not problems and rel <= TOLERANCE
    print(json.dumps({"ok": ok, "rel": rel, "architecture": model.config.architectures, "loading": problems}))
    return 0 if ok else 1


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "make":
        make(sys.argv[2])
    elif len(sys.argv) == 5 and sys.argv[1] == "check":
        sys.exit(check(*sys.argv[2:]))
    else:
        sys.exit(__doc__)
