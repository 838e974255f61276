// The BLAS under the Python peers of `npm run bench`, and whether a speed ratio against them is
// fair. Debian's python3-torch alone pulls in the reference BLAS (libblas3): PyTorch's CPU sgemm
// then runs at ~6 GFLOP/s instead of ~170 (OpenBLAS, one core), and every ratio against it is
// inflated ~20x. bench/peer_blas.py reports what a peer actually loaded and measures its sgemm;
// peerRatioVerdict decides from those two facts alone.
import { spawnSync } from 'node:child_process';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const PROBE = path.join(path.dirname(fileURLToPath(import.meta.url)), 'peer_blas.py');

export type PythonPeer = 'torch' | 'numpy';
export const PEER_NAMES: Record<PythonPeer, string> = { torch: 'PyTorch', numpy: 'numpy' };

/** bench/peer_blas.py's JSON line. */
export interface PeerBlasProbe {
  peer: PythonPeer;
  version: string;
  /** the imported package's __init__.py (which install of it) */
  module: string;
  /** torch.get_num_threads(); null for numpy */
  threads: number | null;
  /** what the library was built against (torch BLAS_INFO, numpy's build config), if it says */
  buildBlas: string | null;
  /** best of 7 timed 512^3 float32 matmuls at the library's default thread count */
  sgemmGflops: number;
  /** BLAS shared libraries mapped after the matmul, as /proc/self/maps names them (resolved) */
  blasLibraries: string[];
  /** openblas_get_num_threads() of a mapped OpenBLAS, else null */
  blasThreads: number | null;
}

export type BlasName = 'OpenBLAS' | 'MKL' | 'BLIS' | 'ATLAS' | 'FlexiBLAS' | 'reference BLAS' | 'unknown';

/**
 * Below this measured sgemm rate a peer is not a fair peer, whatever its BLAS is called. The
 * reference BLAS does ~6 GFLOP/s on a 512^3 sgemm; OpenBLAS does ~170 on one core of the same
 * machine. 20 sits 3x above the first and 8x below the second, so load on the machine does not
 * trip it for a real BLAS, and a slow fallback (a naive loop, a misbuilt library) cannot pass.
 */
export const MIN_PEER_SGEMM_GFLOPS = 20;

export const BLAS_FIX = 'install OpenBLAS for the peer: sudo apt-get install libopenblas0-pthread';

/**
 * Names the BLAS from the mapped libraries. An optimized library wins over a reference one that
 * is mapped beside it (Debian maps libblas.so.3 and libcblas.so.3 from the same alternative; a
 * process may also hold both). The reference BLAS is Debian's libblas3: .../blas/libblas.so.3.
 */
export function classifyBlas(libraries: readonly string[]): BlasName {
  const has = (re: RegExp) => libraries.some((p) => re.test(p));
  if (has(/openblas/i)) return 'OpenBLAS';
  if (has(/mkl/i)) return 'MKL';
  if (has(/blis/i)) return 'BLIS';
  if (has(/flexiblas/i)) return 'FlexiBLAS';
  if (has(/atlas/i)) return 'ATLAS';
  if (has(/(^|\/)lib(c)?blas\.so/)) return 'reference BLAS';
  return 'unknown'; // e.g. a statically linked BLAS (pip's torch bundles MKL): the speed decides
}

export type PeerVerdict = { ok: true } | { ok: false; reason: string };

/** Whether a speed ratio against a peer on `blas` with this measured sgemm may be reported. */
export function peerRatioVerdict(blas: BlasName, sgemmGflops: number | undefined): PeerVerdict {
  if (blas === 'reference BLAS') return { ok: false, reason: `the peer runs on the reference BLAS (Debian libblas3); ${BLAS_FIX}` };
  if (sgemmGflops === undefined || !Number.isFinite(sgemmGflops))
    return { ok: false, reason: "the peer's sgemm speed was not measured (bench/peer_blas.py failed)" };
  if (sgemmGflops < MIN_PEER_SGEMM_GFLOPS)
    return {
      ok: false,
      reason: `the peer's sgemm runs at ${sgemmGflops.toFixed(1)} GFLOP/s, below ${MIN_PEER_SGEMM_GFLOPS} (${blas}); ${BLAS_FIX}`,
    };
  return { ok: true };
}

export interface PeerBlas {
  probe?: PeerBlasProbe;
  blas: BlasName;
  verdict: PeerVerdict;
  /** why the probe produced nothing */
  error?: string;
}

/** Runs bench/peer_blas.py for one peer and judges it. */
export function checkPeerBlas(python: string, peer: PythonPeer, env: NodeJS.ProcessEnv = process.env): PeerBlas {
  const r = spawnSync(python, [PROBE, peer], { encoding: 'utf8', env, timeout: 120_000 });
  const line = r.stdout?.trim().split('\n').pop();
  if (r.status !== 0 || !line?.startsWith('{')) {
    const why = r.error?.message ?? `exit ${r.status}: ${(r.stderr ?? '').trim().split('\n').pop()}`;
    return { blas: 'unknown', verdict: peerRatioVerdict('unknown', undefined), error: why };
  }
  const probe = JSON.parse(line) as PeerBlasProbe;
  const blas = classifyBlas(probe.blasLibraries);
  return { probe, blas, verdict: peerRatioVerdict(blas, probe.sgemmGflops) };
}

/** One line for the bench output. */
export function describePeerBlas(peer: PythonPeer, c: PeerBlas): string {
  const name = PEER_NAMES[peer];
  if (!c.probe) return `${name} BLAS: probe failed (${c.error}); ratios against ${name} withheld`;
  const p = c.probe;
  const threads = [
    p.threads !== null ? `torch threads ${p.threads}` : '',
    p.blasThreads !== null ? `OpenBLAS threads ${p.blasThreads}` : '',
  ]
    .filter(Boolean)
    .join(', ');
  const libs = p.blasLibraries.length ? p.blasLibraries.join(' ') : 'no BLAS library mapped';
  const head =
    `${name} ${p.version} BLAS: ${c.blas} (${libs}; built with ${p.buildBlas ?? '?'}), ` +
    `sgemm 512^3 ${p.sgemmGflops.toFixed(1)} GFLOP/s${threads ? ` (${threads})` : ''}`;
  return c.verdict.ok ? head : `${head}\n  ratios against ${name} withheld: ${c.verdict.reason}`;
}
