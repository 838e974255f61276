"""Which BLAS a Python peer of `npm run bench` runs on, and how fast its sgemm is.

`python3 bench/peer_blas.py torch` (or `numpy`) imports only that library, times a 512^3 float32
matmul at the library's default thread count (best of REPS after a warm-up) and prints one JSON
line: {peer, version, module, threads, buildBlas, sgemmGflops, blasLibraries, blasThreads}.

blasLibraries are the BLAS shared libraries mapped into this process after the matmul, read from
/proc/self/maps. The kernel lists the file actually mapped, so Debian's libblas.so.3 alternative
shows up resolved: .../blas/libblas.so.3 is the reference BLAS (libblas3), .../openblas-pthread/
libblas.so.3 is OpenBLAS. buildBlas is what the library says it was built against (a hint only:
Debian's builds link the alternative, whose target is chosen at install time).
bench/peer_blas.ts names the BLAS and decides whether a ratio against this peer is fair.
"""

import json
import re
import sys
import time

N = 512
REPS = 7
BLAS_LIB = re.compile(r"(blas|mkl|blis|atlas)", re.IGNORECASE)


def mapped_blas_libraries():
    with open("/proc/self/maps") as f:
        paths = {line.split(None, 5)[5].strip() for line in f if len(line.split(None, 5)) == 6}
    return sorted(p for p in paths if p.startswith("/") and BLAS_LIB.search(p.rsplit("/", 1)[-1]))


def openblas_threads(libraries):
    """OpenBLAS keeps its own thread pool (Debian's torch runs its GEMMs on it whatever
    torch.get_num_threads() says): ask the mapped library itself."""
    import ctypes

    for path in libraries:
        try:
            return ctypes.CDLL(path).openblas_get_num_threads()
        except (OSError, AttributeError):
            continue
    return None


def best_gflops(matmul):
    matmul()  # warm-up: thread pool start, page faults
    best = float("inf")
    for _ in range(REPS):
        t0 = time.perf_counter()
        matmul()
        best = min(best, time.perf_counter() - t0)
    return 2 * N**3 / best / 1e9


def probe_torch():
    import torch

    a, b = torch.rand(N, N), torch.rand(N, N)
    gflops = best_gflops(lambda: torch.mm(a, b))
    build = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    return {"version": torch.__version__, "module": torch.__file__, "threads": torch.get_num_threads(),
            "buildBlas": build.group(1) if build else None, "sgemmGflops": gflops}


def probe_numpy():
    import numpy as np

    rng = np.random.default_rng(0)
    a, b = rng.random((N, N), np.float32), rng.random((N, N), np.float32)
    gflops = best_gflops(lambda: a @ b)
    build = None
    try:  # numpy >= 1.26 returns a dict; older versions only print
        info = np.show_config(mode="dicts")
        build = info["Build Dependencies"]["blas"]["name"]
    except Exception:
        cfg = getattr(np.__config__, "blas_opt_info", None) or getattr(np.__config__, "blas_ilp64_opt_info", None)
        if isinstance(cfg, dict) and cfg.get("libraries"):
            build = ",".join(cfg["libraries"])
    return {"version": np.__version__, "module": np.__file__, "threads": None, "buildBlas": build, "sgemmGflops": gflops}


def main():
    peer = sys.argv[1] if len(sys.argv) > 1 else ""
    probes = {"torch": probe_torch, "numpy": probe_numpy}
    if peer not in probes:
        sys.exit(f"usage: {sys.argv[0]} torch|numpy")
    out = {"peer": peer, **probes[peer]()}
    out["blasLibraries"] = mapped_blas_libraries()
    out["blasThreads"] = openblas_threads(out["blasLibraries"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
