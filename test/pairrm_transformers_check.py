"""Cross-checks the engine's PairRM (DeBERTa-v3 encoder + pairwise head) against transformers'
DebertaV2Model (driven by test/pairrm-transformers.test.ts; needs torch, transformers, safetensors).

  make DIR VOCAB [LAYERS]
      A random DebertaV2Model in PairRM's config shape (hidden 1024, 16 heads, FFN 4096, relative
      attention with 256 log buckets, p2c + c2p, share_att_key, norm_rel_ebd layer_norm, no
      absolute positions, eps 1e-7; LAYERS of 24, default 24), vocabulary VOCAB, plus PairRM's head
      Sequential(Dropout, Linear(2048, 1024), Tanh, Dropout, Linear(1024, 1)), saved to DIR as
      config.json and model.safetensors with PairRM's names (pretrained_model.*, head_layer.*).
      Biases and LayerNorm weights are random too, so a swapped or dropped tensor shows.

  run DIR ROWS_JSON OUT_JSON
      Loads DIR (whoever wrote it) into DebertaV2Model + head with load_state_dict(strict=True)
      (a missing, unexpected or misshapen tensor fails by name), runs each row of ROWS_JSON
      ([{ids, pool}], one at a time, unpadded) in float32 on the CPU, and writes OUT_JSON:
      {logits: [f per row], hidden: [last hidden state of row 0, flattened]}.
"""
import json
import os
import sys

import torch
from safetensors.torch import load_file, save_file
from transformers import DebertaV2Config, DebertaV2Model


def config(vocab, layers):
    return DebertaV2Config(
        vocab_size=vocab, hidden_size=1024, num_hidden_layers=layers, num_attention_heads=16, intermediate_size=4096,
        hidden_act="gelu", max_position_embeddings=512, type_vocab_size=0, relative_attention=True, max_relative_positions=-1,
        position_buckets=256, pos_att_type=["p2c", "c2p"], share_att_key=True, norm_rel_ebd="layer_norm",
        position_biased_input=False, layer_norm_eps=1e-7, pad_token_id=0,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def head(C=1024):
    return torch.nn.Sequential(torch.nn.Dropout(0.0), torch.nn.Linear(2 * C, 1024), torch.nn.Tanh(), torch.nn.Dropout(0.0),
                               torch.nn.Linear(1024, 1))


def make(out, vocab, layers):
    torch.manual_seed(0)
    cfg = config(vocab, layers)
    model, h = DebertaV2Model(cfg).eval(), head().eval()
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(h.named_parameters()):
            if name.endswith("bias"):
                p.normal_(0, 0.1)
            elif "LayerNorm.weight" in name:
                p.normal_(1, 0.2)
            elif name == "encoder.rel_embeddings.weight" or name == "embeddings.word_embeddings.weight":
                p.normal_(0, 1)
            else:
                p.normal_(0, 1 / p.shape[-1] ** 0.5)
    tensors = {f"pretrained_model.{k}": v.contiguous() for k, v in model.state_dict().items() if not k.endswith("position_ids")}
    tensors.update({f"head_layer.{k}": v.contiguous() for k, v in h.state_dict().items()})
    os.makedirs(out, exist_ok=True)
    save_file(tensors, os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    d = cfg.to_dict()
    d["model_type"] = "deberta-v2"
    json.dump(d, open(os.path.join(out, "config.json"), "w"), indent=1)
    print(json.dumps({"made": out, "tensors": len(tensors), "transformers": __import__("transformers").__version__}))


def run(d, rows_file, out_file):
    cfg = json.load(open(os.path.join(d, "config.json")))
    cfg = config(cfg["vocab_size"], cfg["num_hidden_layers"])
    model, h = DebertaV2Model(cfg).eval(), head().eval()
    state = load_file(os.path.join(d, "model.safetensors"))
    body = {k[len("pretrained_model."):]: v for k, v in state.items() if k.startswith("pretrained_model.")}
    hd = {k[len("head_layer."):]: v for k, v in state.items() if k.startswith("head_layer.")}
    if len(body) + len(hd) != len(state):
        raise SystemExit(f"tensors outside pretrained_model.* and head_layer.*: {sorted(set(state) - set('pretrained_model.' + k for k in body) - set('head_layer.' + k for k in hd))}")
    missing, unexpected = model.load_state_dict(body, strict=False)
    missing = [m for m in missing if not m.endswith("position_ids")]
    if missing or unexpected:
        raise SystemExit(f"load_state_dict: missing {missing}, unexpected {unexpected}")
    h.load_state_dict(hd, strict=True)
    rows = json.load(open(rows_file))
    logits, hidden = [], None
    with torch.no_grad():
        for n, r in enumerate(rows):
            ids = torch.tensor([r["ids"]])
            x = model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state[0]
            if n == 0:
                hidden = x.flatten().tolist()
            s, c1, c2 = (x[p] for p in r["pool"])
            logits.append((h(torch.cat([s, c1])) - h(torch.cat([s, c2]))).item())
    json.dump({"logits": logits, "hidden": hidden}, open(out_file, "w"))
    print(json.dumps({"rows": len(rows)}))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "make":
        make(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else 24)
    elif cmd == "run":
        run(sys.argv[2], sys.argv[3], sys.argv[4])
    else:
        raise SystemExit(f"unknown command {cmd}")
