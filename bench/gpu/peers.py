# The PyTorch peers of the GPU benchmark, measured in the same job as the engine (only ratios on
# one card compare). The strongest PyTorch path for each target of bench/NOTES.md, with the
# methods of ../shared/anchors (transformers LlamaForCausalLM, SDPA, bf16, fused AdamW, random
# tokens, CUDA-event medians after a warm-up):
#   train 134M B16 T1024 and 1.1B B8 T1024 under torch.compile;
#   generate 134M at batch 64 and 256 (64-token prompts, 128 new, T 0.7, top-p 0.9) with a static
#   KV cache and torch.compile (mode "default": "reduce-overhead" fails in transformers 5.17);
#   the unfused SPPO head B8 T1024 H4096 V128256 (time and extra memory).
#   train8B (not in the default set; bench/gpu/run.sh's "big" section asks for it): the Llama-3-8B
#   shape, full fine-tuning as the engine's big8b_ benchmark runs it (micro-batches of 2 x 1024,
#   32 per RMSprop step, gradient checkpointing), float32 weights under bf16 autocast (the
#   engine's precision: fp32 master, gradients and state); an out-of-memory is reported as such.
#   lora8B (with train8B, in the "big" section): the same shape and micro-batches with LoRA r16
#   (alpha 32) on all seven projections over frozen bf16 weights, as the engine's big8b_lora_
#   benchmark runs it: a plain LoRA written here (fp32 A and B under bf16 autocast, RMSprop on
#   them alone), with and without gradient checkpointing; and PEFT's LoRA where peft is installed.
# Writes $OUT/peers.json (peers_big.json for train8B / lora8B); PEERS="head train134M train1.1B
# gen64 gen256" (the default) picks which.
import json, os, time, traceback

import torch
from transformers import LlamaConfig, LlamaForCausalLM

OUT = os.environ.get("OUT", "/tmp")
WANT = os.environ.get("PEERS", "head train134M train1.1B gen64 gen256").split()
res = {"torch": torch.__version__, "device": torch.cuda.get_device_name(0)}
SHAPES = {"134M": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                       num_key_value_heads=12, vocab_size=32000),
          "1.1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=32000)}


def median_s(fn, iters, warm):
    for _ in range(warm):
        fn()
    torch.cuda.synchronize()
    s, e, ts = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True), []
    for _ in range(iters):
        s.record(); fn(); e.record(); torch.cuda.synchronize(); ts.append(s.elapsed_time(e) / 1e3)
    return sorted(ts)[len(ts) // 2]


def model(name):
    cfg = LlamaConfig(**SHAPES[name], max_position_embeddings=4096, tie_word_embeddings=False,
                      attn_implementation="sdpa")
    return LlamaForCausalLM(cfg).to("cuda", dtype=torch.bfloat16), cfg


def record(key, fn):
    t0 = time.time()
    try:
        res[key] = fn()
    except Exception as ex:  # a failed peer is reported, and the others still run
        res[key] = {"error": repr(ex)[:300]}
        traceback.print_exc()
    res[key]["wall_s"] = round(time.time() - t0, 1)
    print(key, json.dumps(res[key]), flush=True)
    # After every peer, so a job cut off by its time budget keeps the peers measured so far.
    json.dump(res, open(os.path.join(OUT, "peers.json"), "w"), indent=1)
    torch.cuda.empty_cache()


def train(name, B, T):
    m, cfg = model(name)
    n = sum(p.numel() for p in m.parameters())
    opt = torch.optim.AdamW(m.parameters(), lr=1e-4, fused=True)
    cm = torch.compile(m)
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")

    def step():
        cm(input_ids=ids, labels=ids).loss.backward(); opt.step(); opt.zero_grad(set_to_none=True)

    s = median_s(step, iters=6, warm=2)
    tok = B * T / s
    flops = 6 * n + 6 * cfg.num_hidden_layers * cfg.hidden_size * T
    return {"tokens_per_s": tok, "step_ms": 1e3 * s, "mfu_vs_790": tok * flops / 790e12}


def generate(B):
    m, cfg = model("134M")
    m.eval()
    m.generation_config.cache_implementation = "static"
    m.forward = torch.compile(m.forward, mode="default")
    ids = torch.randint(3, cfg.vocab_size, (B, 64), device="cuda")
    kw = dict(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=0.7, top_p=0.9,
              max_new_tokens=128, min_new_tokens=128, pad_token_id=0, eos_token_id=None)

    def g():
        with torch.no_grad():
            m.generate(**kw)

    return {"new_tokens_per_s": B * 128 / median_s(g, iters=3, warm=2)}


def head():
    B, T, H, V = 8, 1024, 4096, 128256
    h = torch.randn(B, T, H, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    W = (torch.randn(V, H, device="cuda", dtype=torch.bfloat16) * 0.02).requires_grad_()
    y = torch.randint(0, V, (B, T), device="cuda")
    mask = torch.ones(B, T, device="cuda"); mask[:, :T // 4] = 0
    ref = torch.randn(B, device="cuda") * 10 - 2000; p = torch.rand(B, device="cuda")
    torch.cuda.synchronize(); base = torch.cuda.memory_allocated(); torch.cuda.reset_peak_memory_stats()

    def run():
        lp = torch.log_softmax((h @ W.t()).float(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        loss = ((((lp * mask).sum(-1)) - ref - 1000.0 * (p - 0.5)) ** 2).mean()
        loss.backward(); h.grad = None; W.grad = None

    s = median_s(run, iters=5, warm=2)
    return {"ms": 1e3 * s, "peak_extra_GiB": (torch.cuda.max_memory_allocated() - base) / 2 ** 30}


def llama3_8b():
    return LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                       rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=8192),
                       tie_word_embeddings=False, attn_implementation="sdpa")


def train8b():
    cfg = llama3_8b()
    with torch.device("cuda"):
        m = LlamaForCausalLM(cfg)  # float32, initialised on the GPU
    m.gradient_checkpointing_enable()
    m.config.use_cache = False
    n = sum(p.numel() for p in m.parameters())
    opt = torch.optim.RMSprop(m.parameters(), lr=1e-7, alpha=0.99, foreach=True)
    B, T, accum = 2, 1024, 32
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")

    def micro():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            m(input_ids=ids, labels=ids).loss.backward()

    def step():
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); opt.zero_grad(set_to_none=False)

    t_micro = median_s(micro, iters=5, warm=2)
    t_step = median_s(step, iters=3, warm=1)
    tok = accum * B * T / (accum * t_micro + t_step)
    flops = 6 * n + 6 * cfg.num_hidden_layers * cfg.hidden_size * T
    return {"tokens_per_s": tok, "micro_ms": 1e3 * t_micro, "optimizer_step_ms": 1e3 * t_step,
            "mfu_vs_790": tok * flops / 790e12, "peak_GiB": torch.cuda.max_memory_allocated() / 2 ** 30}


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoraLinear(torch.nn.Module):
    """base(x) + (alpha / r)·(x·Aᵀ)·Bᵀ, PEFT's parametrisation; B starts nonzero so the step does its full work."""

    def __init__(self, base, r, alpha):
        super().__init__()
        self.base, self.scale = base, alpha / r
        self.A = torch.nn.Parameter(torch.empty(r, base.in_features, device="cuda"))
        torch.nn.init.kaiming_uniform_(self.A, a=5 ** 0.5)
        self.B = torch.nn.Parameter(torch.randn(base.out_features, r, device="cuda") * 0.01)

    def forward(self, x):
        F = torch.nn.functional
        return self.base(x) + F.linear(F.linear(x, self.A), self.B) * self.scale


def lora8b(ckpt, use_peft=False):
    cfg = llama3_8b()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            m = LlamaForCausalLM(cfg)  # bf16 base weights, frozen
    finally:
        torch.set_default_dtype(torch.float32)
    m.requires_grad_(False)
    if use_peft:
        import peft
        m = peft.get_peft_model(m, peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=list(LORA_TARGETS)))
        for n, p in m.named_parameters():
            if "lora_" in n:
                p.data = p.data.float()
                if "lora_B" in n:
                    torch.nn.init.normal_(p, std=0.01)
    else:
        for layer in m.model.layers:
            for owner in (layer.self_attn, layer.mlp):
                for name in LORA_TARGETS:
                    if hasattr(owner, name):
                        setattr(owner, name, LoraLinear(getattr(owner, name), 16, 32))
    if ckpt:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m.config.use_cache = False
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.RMSprop(params, lr=1e-5, alpha=0.99, foreach=True)
    B, T, accum = 2, 1024, 32
    ids = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def micro():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            m(input_ids=ids, labels=ids).loss.backward()

    def step():
        torch.nn.utils.clip_grad_norm_(params, 1.0); opt.step(); opt.zero_grad(set_to_none=False)

    t_micro = median_s(micro, iters=5, warm=2)
    t_step = median_s(step, iters=3, warm=1)
    tok = accum * B * T / (accum * t_micro + t_step)
    return {"tokens_per_s": tok, "micro_ms": 1e3 * t_micro, "optimizer_step_ms": 1e3 * t_step,
            "trainable": sum(p.numel() for p in params), "peak_GiB": torch.cuda.max_memory_allocated() / 2 ** 30}


if "lora8B" in WANT:
    record("train_8B_lora_r16_plain_B2_T1024_x32", lambda: lora8b(ckpt=False))
    record("train_8B_lora_r16_plain_ckpt_B2_T1024_x32", lambda: lora8b(ckpt=True))
    try:
        import peft  # noqa: F401
        record("train_8B_lora_r16_peft_B2_T1024_x32", lambda: lora8b(ckpt=False, use_peft=True))
    except ImportError:
        res["train_8B_lora_r16_peft"] = {"error": "peft is not installed on this machine"}
        print("train_8B_lora_r16_peft", json.dumps(res["train_8B_lora_r16_peft"]), flush=True)
if "train8B" in WANT:
    record("train_8B_fullft_rmsprop_ckpt_B2_T1024_x32", train8b)
if "lora8B" in WANT or "train8B" in WANT:
    json.dump(res, open(os.path.join(OUT, "peers_big.json"), "w"), indent=1)
    raise SystemExit(0)
if "head" in WANT:
    record("head_unfused_B8_T1024_H4096_V128256", head)
if "train134M" in WANT:
    record("train_compiled_134M_B16_T1024", lambda: train("134M", 16, 1024))
if "train1.1B" in WANT:
    record("train_compiled_1.1B_B8_T1024", lambda: train("1.1B", 8, 1024))
if "gen64" in WANT:
    record("generate_static_compiled_134M_b64", lambda: generate(64))
if "gen256" in WANT:
    record("generate_static_compiled_134M_b256", lambda: generate(256))
