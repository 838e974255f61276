"""PyTorch CPU peer for the PairRM judge benchmark (bench/pairrm.ts, same machine, same run).

The same DeBERTa-v3 encoder and PairRM head in plain PyTorch, written as transformers writes
DebertaV2Model (disentangled attention with torch.gather over the c2p / p2c tables, post-LayerNorm,
exact GELU), random weights: speed only (bench/gpu/pairrm_check.py checks the numbers against
transformers itself). Reads the rows the engine's judge built (token ids and pooling positions)
and runs them in the same batches, sorted by length and right-padded with a key mask.

Run: /usr/bin/python3 bench/pairrm_torch.py rows.json  → prints JSON {seconds: [...], threads}
"""
import json, math, sys, time

import torch
import torch.nn.functional as F


def bucket_table(seq, buckets, max_position):
    r = torch.arange(seq)[:, None] - torch.arange(seq)[None, :]
    mid = buckets // 2
    sign = torch.sign(r)
    abs_pos = torch.where((r < mid) & (r > -mid), torch.tensor(mid - 1), r.abs())
    log_pos = torch.ceil(torch.log(abs_pos / mid) / torch.log(torch.tensor((max_position - 1) / mid)) * (mid - 1)) + mid
    b = torch.where(abs_pos <= mid, r.float(), log_pos * sign).long()
    return torch.clamp(b + buckets, 0, 2 * buckets - 1)


class Encoder(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        C, Fd, L = c["hiddenSize"], c["intermediateSize"], c["numLayers"]
        self.c = c
        self.emb = torch.nn.Embedding(c["vocabSize"], C)
        self.emb_ln = torch.nn.LayerNorm(C, eps=c["layerNormEps"])
        self.rel = torch.nn.Parameter(torch.randn(2 * c["positionBuckets"], C))
        self.rel_ln = torch.nn.LayerNorm(C, eps=c["layerNormEps"])
        mk = lambda i, o: torch.nn.Linear(i, o)
        self.layers = torch.nn.ModuleList(
            torch.nn.ModuleDict(dict(q=mk(C, C), k=mk(C, C), v=mk(C, C), o=mk(C, C), ln1=torch.nn.LayerNorm(C, eps=c["layerNormEps"]),
                                     f1=mk(C, Fd), f2=mk(Fd, C), ln2=torch.nn.LayerNorm(C, eps=c["layerNormEps"])))
            for _ in range(L))
        self.head = torch.nn.Sequential(torch.nn.Dropout(0), mk(2 * C, c["headHidden"]), torch.nn.Tanh(), torch.nn.Dropout(0), mk(c["headHidden"], 1))

    def forward(self, ids, lengths, pool):
        c = self.c
        B, T = ids.shape
        H, C = c["numHeads"], c["hiddenSize"]
        D = C // H
        keymask = torch.arange(T)[None, :] < lengths[:, None]  # (B, T)
        x = self.emb_ln(self.emb(ids))
        rel = self.rel_ln(self.rel)
        idx = bucket_table(T, c["positionBuckets"], c["maxRelativePositions"])  # (T, T)
        scale = math.sqrt(D * 3)
        heads = lambda t: t.view(t.shape[0], -1, H, D).transpose(1, 2)  # (B, H, T, D)
        for l in self.layers:
            q, k, v = heads(l["q"](x)), heads(l["k"](x)), heads(l["v"](x))
            qr, kr = heads(l["q"](rel[None]))[0], heads(l["k"](rel[None]))[0]  # (H, R, D)
            s = q @ k.transpose(-1, -2)
            c2p = torch.gather(q @ kr.transpose(-1, -2), -1, idx.expand(B, H, T, T))
            p2c = torch.gather(k @ qr.transpose(-1, -2), -1, idx.expand(B, H, T, T)).transpose(-1, -2)
            s = (s + c2p + p2c) / scale
            s = s.masked_fill(~keymask[:, None, None, :], float("-inf"))
            a = (F.softmax(s, -1) @ v).transpose(1, 2).reshape(B, T, C)
            x = l["ln1"](l["o"](a) + x)
            x = l["ln2"](l["f2"](F.gelu(l["f1"](x))) + x)
        rows = torch.arange(B)
        e = [x[rows, pool[:, k]] for k in range(3)]
        return self.head(torch.cat([e[0], e[1]], -1)).squeeze(-1) - self.head(torch.cat([e[0], e[2]], -1)).squeeze(-1)


def main():
    spec = json.load(open(sys.argv[1]))
    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    model = Encoder(spec["config"]).eval()
    batches = []
    for group in spec["batches"]:
        T = max(len(r["ids"]) for r in group)
        ids = torch.zeros(len(group), T, dtype=torch.long)
        for b, r in enumerate(group):
            ids[b, : len(r["ids"])] = torch.tensor(r["ids"])
        batches.append((ids, torch.tensor([len(r["ids"]) for r in group]), torch.tensor([r["pool"] for r in group])))
    seconds = []
    with torch.inference_mode():
        for _ in range(spec["reps"]):
            t = time.perf_counter()
            for ids, lengths, pool in batches:
                model(ids, lengths, pool)
            seconds.append(time.perf_counter() - t)
    print(json.dumps({"seconds": seconds, "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
