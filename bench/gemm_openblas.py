"""OpenBLAS sgemm baseline (through numpy) for the shapes of native/bench/bench_gemm.cpp.

Prints the same table as the C++ benchmark (case, M, N, K, trans, ms, GFLOP/s); with
`--json out.json` it also writes the rows as JSON. Transposes are .T views of C-contiguous
float32 arrays, so numpy hands OpenBLAS the same layouts that sppo's gemm gets.

Run it with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset (e.g.
`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 bench/gemm_openblas.py`): some machines
set them to work around old OpenBLAS builds, and they make a current one pick a slower kernel.
Set OPENBLAS_NUM_THREADS to match the thread count of the C++ run (both default to all cores).
Needs numpy linked to OpenBLAS (Debian: python3-numpy + libopenblas0-pthread).
"""

import argparse
import json
import time

import numpy as np

T = 4096
NK = [(512, 512), (256, 512), (1376, 512), (512, 1376), (8192, 512),
      (256, 256), (688, 256), (256, 688), (512, 256)]


def model_shapes():
    """(case, M, N, K, transA, transB, beta) in the order of the C++ benchmark."""
    rows = [("fwd", T, n, k, False, True, 0.0) for n, k in NK]
    rows += [("bwd_dx", T, k, n, False, False, 0.0) for n, k in NK]
    rows += [("bwd_dw", n, k, T, True, False, 1.0) for n, k in NK]
    for m in (1, 2, 4, 16, 64):
        rows.append(("decode", m, 1376, 512, False, True, 0.0))
        rows.append(("decode", m, 512, 1376, False, True, 0.0))
    rows += [("head", m, 8192, 512, False, True, 0.0) for m in (1, 4)]
    return rows


def bench(case, M, N, K, tA, tB, beta, rng):
    a = rng.uniform(-1, 1, (K, M) if tA else (M, K)).astype(np.float32)
    b = rng.uniform(-1, 1, (N, K) if tB else (K, N)).astype(np.float32)
    c = np.zeros((M, N), np.float32)
    opa = a.T if tA else a
    opb = b.T if tB else b
    if beta == 0.0:
        def call():
            np.dot(opa, opb, out=c)
    else:
        # The accumulate case: sgemm with beta=1 has no numpy spelling, so time dot + add.
        tmp = np.empty_like(c)

        def call():
            np.dot(opa, opb, out=tmp)
            c.__iadd__(tmp)
    flop = 2.0 * M * N * K
    reps = int(min(200, max(5, 0.3 * 200e9 / flop)))
    call()
    call()
    ms = []
    for _ in range(reps):
        t0 = time.perf_counter()
        call()
        ms.append((time.perf_counter() - t0) * 1e3)
    med = sorted(ms)[len(ms) // 2]
    return {"case": case, "M": M, "N": N, "K": K,
            "trans": ("T" if tA else "N") + ("T" if tB else "N"),
            "ms": med, "gflops": flop / med * 1e-6}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", metavar="OUT", help="also write the rows to this JSON file")
    args = ap.parse_args()
    rng = np.random.default_rng(1)
    rows = []
    print(f"{'case':<8} {'M':>6} {'N':>6} {'K':>6} {'trans':>5} {'ms':>10} {'GFLOP/s':>9}")
    for shape in model_shapes():
        r = bench(*shape, rng)
        rows.append(r)
        print(f"{r['case']:<8} {r['M']:>6} {r['N']:>6} {r['K']:>6} {r['trans']:>5} "
              f"{r['ms']:>10.4f} {r['gflops']:>9.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
