"""Independent float64 PyTorch reference of the engine's Llama-family decoder (for
test/torch-crosscheck.test.ts).

Usage: python3 test/torch_reference.py DIR

Reads   DIR/case.json    {config, batch, seq, tokens[], mask[], params: [{name, shape, offset}],
                          optimizers: [{name, kind, lr, beta1, beta2, alpha, eps, weightDecay,
                          maxGradNorm}]}
        DIR/params.f32   every parameter, raw little-endian float32, at params[i].offset (elements)
Writes  DIR/result.json  {loss, target_tokens, grad_norm, names, logits: off, grads: {name: off},
                          after: {opt: {name: off}}, clip: {opt: coef}, total}
        DIR/result.f64   raw little-endian float64 blob the offsets (elements) point into

Written from the Hugging Face conventions, not from the engine's code: LlamaForCausalLM with
rotate_half RoPE (default / linear / llama3 inv_freq as transformers'
_compute_*_rope_parameters, in float64), repeat_kv GQA, SwiGLU MLP, RMSNorm
x * rsqrt(mean(x^2) + eps) * w, causal softmax attention with optional q/k/v bias (Qwen2) and
optionally tied embeddings. Loss: mean next-token cross-entropy over the targets selected by
the mask (token t is a target, predicted from position t-1, when mask[b, t] != 0; t >= 1).

Optimizers, one step each from the same parameters, on torch's own autograd gradients:
  adamw   -> torch.optim.AdamW with two param groups (matrices: weight_decay=wd; 1-D tensors: 0)
  rmsprop -> torch.optim.RMSprop(weight_decay=0, momentum=0, centered=False); the engine's
             decoupled decay p *= (1 - lr*wd) on matrices is applied by hand before opt.step()
             (the RMSprop update does not depend on p, so the order does not matter)
Clipping (maxGradNorm > 0) is torch.nn.utils.clip_grad_norm_ over all parameters.
"""
import json
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

torch.set_default_dtype(torch.float64)
DT = torch.float64


def expected_param_names(cfg):
    names = ["model.embed_tokens.weight"]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        names += [p + "self_attn.q_proj.weight", p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight"]
        if cfg.get("attention_bias"):
            names += [p + "self_attn.q_proj.bias", p + "self_attn.k_proj.bias", p + "self_attn.v_proj.bias"]
        names += [p + "self_attn.o_proj.weight", p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight",
                  p + "mlp.down_proj.weight", p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
    names.append("model.norm.weight")
    if not cfg.get("tie_word_embeddings"):
        names.append("lm_head.weight")
    return names


def expected_shapes(cfg):
    C, V, F_ = cfg["hidden_size"], cfg["vocab_size"], cfg["intermediate_size"]
    H = cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    D = cfg.get("head_dim") or C // H
    shapes = {}
    for n in expected_param_names(cfg):
        if n.endswith("embed_tokens.weight") or n == "lm_head.weight":
            s = [V, C]
        elif n.endswith("q_proj.weight"):
            s = [H * D, C]
        elif n.endswith("k_proj.weight") or n.endswith("v_proj.weight"):
            s = [KV * D, C]
        elif n.endswith("q_proj.bias"):
            s = [H * D]
        elif n.endswith("k_proj.bias") or n.endswith("v_proj.bias"):
            s = [KV * D]
        elif n.endswith("o_proj.weight"):
            s = [C, H * D]
        elif n.endswith("gate_proj.weight") or n.endswith("up_proj.weight"):
            s = [F_, C]
        elif n.endswith("down_proj.weight"):
            s = [C, F_]
        else:  # norms
            s = [C]
        shapes[n] = s
    return shapes


def inv_freq(cfg, head_dim):
    """transformers' _compute_default/linear/llama3_rope_parameters, in float32 as it runs them."""
    F32 = torch.float32
    base = float(cfg.get("rope_theta", 10000.0))
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).to(F32) / head_dim))
    rs = cfg.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return inv
    factor = float(rs["factor"])
    if kind == "linear":
        return inv / factor
    if kind == "llama3":
        low_freq_factor = float(rs["low_freq_factor"])
        high_freq_factor = float(rs["high_freq_factor"])
        old_context_len = float(rs["original_max_position_embeddings"])
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv / factor, inv)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium, smoothed, inv_freq_llama)
    raise ValueError(f"unsupported rope type {kind}")


def rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def rms_norm(x, w, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def repeat_kv(x, n_rep):
    B, KV, T, D = x.shape
    if n_rep == 1:
        return x
    return x[:, :, None, :, :].expand(B, KV, n_rep, T, D).reshape(B, KV * n_rep, T, D)


def forward(cfg, P, tokens):
    """Logits (B, T, V) of LlamaForCausalLM with parameters P (HF names)."""
    B, T = tokens.shape
    C = cfg["hidden_size"]
    H = cfg["num_attention_heads"]
    KV = cfg.get("num_key_value_heads") or H
    D = cfg.get("head_dim") or C // H
    eps = float(cfg.get("rms_norm_eps", 1e-5))
    # Angles as transformers forms them: float32 positions times float32 inv_freq, rounded to
    # float32; only cos / sin are then taken in float64.
    pos = torch.arange(T, dtype=torch.float32)
    freqs = torch.outer(pos, inv_freq(cfg, D)).to(DT)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[None, None], emb.sin()[None, None]  # (1, 1, T, D)
    causal = torch.ones(T, T, dtype=torch.bool).triu(1)
    x = P["model.embed_tokens.weight"][tokens]
    for l in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{l}."
        h = rms_norm(x, P[p + "input_layernorm.weight"], eps)
        bias = (lambda n: P[p + f"self_attn.{n}_proj.bias"]) if cfg.get("attention_bias") else (lambda n: None)
        q = F.linear(h, P[p + "self_attn.q_proj.weight"], bias("q")).view(B, T, H, D).transpose(1, 2)
        k = F.linear(h, P[p + "self_attn.k_proj.weight"], bias("k")).view(B, T, KV, D).transpose(1, 2)
        v = F.linear(h, P[p + "self_attn.v_proj.weight"], bias("v")).view(B, T, KV, D).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k, v = repeat_kv(k, H // KV), repeat_kv(v, H // KV)
        s = (q @ k.transpose(-1, -2)) / math.sqrt(D)
        s = s.masked_fill(causal, float("-inf"))
        a = torch.softmax(s, dim=-1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(B, T, H * D), P[p + "self_attn.o_proj.weight"])
        h = rms_norm(x, P[p + "post_attention_layernorm.weight"], eps)
        m = F.silu(F.linear(h, P[p + "mlp.gate_proj.weight"])) * F.linear(h, P[p + "mlp.up_proj.weight"])
        x = x + F.linear(m, P[p + "mlp.down_proj.weight"])
    x = rms_norm(x, P["model.norm.weight"], eps)
    head = P["model.embed_tokens.weight"] if cfg.get("tie_word_embeddings") else P["lm_head.weight"]
    return F.linear(x, head)


def masked_loss(logits, tokens, mask):
    """Mean CE of token t predicted from position t-1, over t >= 1 with mask[b, t] != 0."""
    V = logits.shape[-1]
    w = (mask[:, 1:] != 0).to(DT)
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, V), tokens[:, 1:].reshape(-1), reduction="none")
    return (ce * w.reshape(-1)).sum() / w.sum(), int(w.sum().item())


def leaf_params(names, init):
    return {n: init[n].clone().requires_grad_(True) for n in names}


def main():
    d = sys.argv[1]
    case = json.load(open(os.path.join(d, "case.json")))
    cfg = case["config"]
    B, T = case["batch"], case["seq"]
    tokens = torch.tensor(case["tokens"], dtype=torch.long).view(B, T)
    mask = torch.tensor(case["mask"], dtype=torch.long).view(B, T)
    raw = np.fromfile(os.path.join(d, "params.f32"), dtype="<f4")

    # The engine must expose exactly the HF names and shapes this config implies.
    shapes = expected_shapes(cfg)
    got = {p["name"]: p["shape"] for p in case["params"]}
    if got != shapes:
        missing = sorted(set(shapes) - set(got))
        extra = sorted(set(got) - set(shapes))
        wrong = sorted(n for n in set(got) & set(shapes) if got[n] != shapes[n])
        raise SystemExit(f"parameter table mismatch: missing {missing}, unexpected {extra}, wrong shapes {wrong}")
    init = {}
    for p in case["params"]:
        n = int(np.prod(p["shape"]))
        init[p["name"]] = torch.from_numpy(raw[p["offset"]: p["offset"] + n].astype(np.float64)).view(*p["shape"])
    names = [p["name"] for p in case["params"]]

    out = []  # float64 chunks
    size = [0]

    def put(t):
        a = t.detach().to(DT).reshape(-1).numpy()
        off = size[0]
        out.append(a)
        size[0] += a.size
        return off

    P = leaf_params(names, init)
    logits = forward(cfg, P, tokens)
    loss, n_targets = masked_loss(logits, tokens, mask)
    loss.backward()
    grad_norm = math.sqrt(sum(float((P[n].grad ** 2).sum()) for n in names))
    res = {"loss": float(loss), "target_tokens": n_targets, "grad_norm": grad_norm, "names": names,
           "logits": put(logits), "grads": {n: put(P[n].grad) for n in names}, "after": {}, "clip": {}}

    for oc in case["optimizers"]:
        P = leaf_params(names, init)
        loss, _ = masked_loss(forward(cfg, P, tokens), tokens, mask)
        loss.backward()
        params = [P[n] for n in names]
        coef = 1.0
        if oc.get("maxGradNorm", 0) > 0:
            total = float(torch.nn.utils.clip_grad_norm_(params, oc["maxGradNorm"]))
            coef = min(1.0, oc["maxGradNorm"] / (total + 1e-6))
        decay = [P[n] for n in names if P[n].dim() == 2]
        no_decay = [P[n] for n in names if P[n].dim() != 2]
        lr, wd, eps = oc["lr"], oc.get("weightDecay", 0.0), oc["eps"]
        if oc["kind"] == "adamw":
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}],
                                    lr=lr, betas=(oc["beta1"], oc["beta2"]), eps=eps)
        elif oc["kind"] == "rmsprop":
            with torch.no_grad():
                for p in decay:
                    p.mul_(1.0 - lr * wd)
            opt = torch.optim.RMSprop(params, lr=lr, alpha=oc["alpha"], eps=eps, weight_decay=0.0, momentum=0.0,
                                      centered=False)
        else:
            raise SystemExit(f"unknown optimizer kind {oc['kind']}")
        opt.step()
        res["after"][oc["name"]] = {n: put(P[n]) for n in names}
        res["clip"][oc["name"]] = coef

    res["total"] = size[0]
    np.concatenate(out).astype("<f8").tofile(os.path.join(d, "result.f64"))
    with open(os.path.join(d, "result.json"), "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
