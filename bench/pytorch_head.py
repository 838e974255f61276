"""PyTorch CPU peer for the fused SPPO head benchmark (same machine, same run as sppo_bench fused_head).

The unfused head as PyTorch users write it: logits = H @ W.T, log_softmax, gather the targets,
sum per sequence, the SPPO squared loss, backward to H and W. Prints JSON with, per hidden size,
the median fwd+bwd time and the peak extra resident memory of the step (ru_maxrss growth in a fresh
child process, so earlier shapes do not mask later ones).

Run: /usr/bin/python3 bench/pytorch_head.py [--threads N] [--json out.json]
"""
import argparse, json, resource, subprocess, sys, time


def one(d, threads):
    import torch
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    N, V, B = 4096, 32000, 8  # 8 sequences of 512 tokens
    H = torch.randn(N, d, requires_grad=True)
    W = (0.05 * torch.randn(V, d)).requires_grad_()
    y = torch.randint(0, V, (N,))
    ref = -torch.rand(B) * 100
    p = torch.rand(B)

    def step():
        lp = torch.log_softmax(H @ W.t(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1).view(B, -1).sum(-1)
        ((lp - ref - 1000 * (p - 0.5)) ** 2).mean().backward()
        H.grad = None
        W.grad = None

    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step()  # warm-up; its peak is the step's peak
    extra_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
    ts = []
    for _ in range(3):
        t = time.perf_counter()
        step()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return {"d": d, "ms": ts[1] * 1e3, "extra_mib": extra_mib, "threads": torch.get_num_threads()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--json")
    ap.add_argument("--child", type=int)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(one(a.child, a.threads)))
        return
    res = []
    for d in (512, 1024):
        out = subprocess.run([sys.executable, __file__, "--child", str(d), "--threads", str(a.threads)],
                             check=True, capture_output=True, text=True).stdout
        res.append(json.loads(out.strip().splitlines()[-1]))
    if a.json:
        json.dump(res, open(a.json, "w"), indent=1)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
