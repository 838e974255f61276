// `npm run bench` withholds speed ratios against a Python peer on the reference BLAS or with a
// slow sgemm (bench/peer_blas.ts). Checked here: the naming and the rule on given inputs, then
// bench/peer_blas.py on this machine's /usr/bin/python3 — its library list against the target of
// Debian's libblas.so.3 alternative, and its measured sgemm against the threshold.
// The probe half is skipped (with a warning) when /usr/bin/python3 cannot import torch and numpy.
import { existsSync, realpathSync } from 'node:fs';
import { describe, expect, it } from 'vitest';

import { BLAS_FIX, checkPeerBlas, classifyBlas, MIN_PEER_SGEMM_GFLOPS, peerRatioVerdict } from '../bench/peer_blas.js';

const PYTHON = '/usr/bin/python3';
const DEBIAN_BLAS = '/usr/lib/x86_64-linux-gnu/libblas.so.3';

// The probes run once, at collection (each starts a python; torch's import takes seconds). A
// missing module skips the probe tests; any other failure of the probe fails them.
const checks = { torch: checkPeerBlas(PYTHON, 'torch'), numpy: checkPeerBlas(PYTHON, 'numpy') };
const missing = Object.values(checks).find((c) => /No module named|ENOENT/.test(c.error ?? ''));
const HAVE_TORCH = !missing;
if (missing) console.warn(`bench-peer-blas: probe tests SKIPPED — ${PYTHON}: ${missing.error}. Install Debian python3-torch.`);
/** Debian's torch links libblas.so.3, whose target the alternatives system picks at install time. */
const DEBIAN_TORCH = HAVE_TORCH && !!checks.torch.probe?.module.startsWith('/usr/lib/python3/') && existsSync(DEBIAN_BLAS);

describe('classifyBlas', () => {
  it('names the reference BLAS by Debian libblas3 paths', () => {
    expect(classifyBlas(['/usr/lib/x86_64-linux-gnu/blas/libblas.so.3.11.0'])).toBe('reference BLAS');
    expect(classifyBlas(['/usr/lib/x86_64-linux-gnu/blas/libblas.so.3.11.0', '/usr/lib/x86_64-linux-gnu/blas/libcblas.so.3.11.0'])).toBe(
      'reference BLAS',
    );
  });
  it('names optimized libraries, also when the reference one is mapped beside them', () => {
    expect(classifyBlas(['/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3'])).toBe('OpenBLAS');
    expect(
      classifyBlas([
        '/usr/lib/x86_64-linux-gnu/blas/libblas.so.3.11.0',
        '/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r0.3.21.so',
      ]),
    ).toBe('OpenBLAS');
    expect(classifyBlas(['/x/site-packages/numpy.libs/libscipy_openblas64_-32a4b2a6.so'])).toBe('OpenBLAS');
    expect(classifyBlas(['/opt/intel/lib/libmkl_rt.so.2'])).toBe('MKL');
    expect(classifyBlas(['/usr/lib/x86_64-linux-gnu/blis-openmp/libblis.so.4'])).toBe('BLIS');
    expect(classifyBlas(['/usr/lib/x86_64-linux-gnu/atlas/libblas.so.3'])).toBe('ATLAS');
  });
  it('says unknown when no BLAS library is mapped (a statically linked one)', () => {
    expect(classifyBlas([])).toBe('unknown');
  });
});

describe('peerRatioVerdict', () => {
  it('refuses the reference BLAS whatever its speed, and says how to fix it', () => {
    const v = peerRatioVerdict('reference BLAS', 500);
    expect(v.ok).toBe(false);
    expect(!v.ok && v.reason).toContain('reference BLAS');
    expect(!v.ok && v.reason).toContain('libopenblas0-pthread');
  });
  it('refuses a named BLAS measured below the threshold, accepts one at or above it', () => {
    expect(peerRatioVerdict('OpenBLAS', 6).ok).toBe(false);
    expect(peerRatioVerdict('OpenBLAS', MIN_PEER_SGEMM_GFLOPS - 0.1).ok).toBe(false);
    expect(peerRatioVerdict('OpenBLAS', MIN_PEER_SGEMM_GFLOPS)).toEqual({ ok: true });
    expect(peerRatioVerdict('OpenBLAS', 170)).toEqual({ ok: true });
    expect(peerRatioVerdict('unknown', 170)).toEqual({ ok: true });
  });
  it('refuses when the speed was not measured', () => {
    expect(peerRatioVerdict('OpenBLAS', undefined).ok).toBe(false);
    expect(peerRatioVerdict('OpenBLAS', NaN).ok).toBe(false);
  });
  it('puts the threshold between the reference BLAS (~6 GFLOP/s) and one OpenBLAS core (~170)', () => {
    expect(MIN_PEER_SGEMM_GFLOPS).toBeGreaterThanOrEqual(3 * 6);
    expect(MIN_PEER_SGEMM_GFLOPS).toBeLessThanOrEqual(170 / 4);
  });
});

describe.skipIf(!HAVE_TORCH)('bench/peer_blas.py on this machine', () => {
  for (const peer of ['torch', 'numpy'] as const) {
    it(`${peer}: reports a version, mapped libraries and a measured sgemm, and is judged by them`, () => {
      const c = checks[peer];
      expect(c.error).toBeUndefined();
      expect(c.probe?.peer).toBe(peer);
      expect(c.probe?.sgemmGflops).toBeGreaterThan(0);
      expect(c.probe?.sgemmGflops).toBeLessThan(10_000); // a 512^3 sgemm timed, not skipped
      expect(c.blas).toBe(classifyBlas(c.probe!.blasLibraries));
      expect(c.verdict).toEqual(peerRatioVerdict(c.blas, c.probe!.sgemmGflops));
      // The threshold separates what it claims to: the reference BLAS is measured below it, an
      // optimized BLAS above it (8x margin for a busy machine).
      if (c.blas === 'reference BLAS') expect(c.probe!.sgemmGflops).toBeLessThan(MIN_PEER_SGEMM_GFLOPS);
      else if (c.blas !== 'unknown') expect(c.probe!.sgemmGflops).toBeGreaterThanOrEqual(MIN_PEER_SGEMM_GFLOPS);
    });
  }

  it.skipIf(!DEBIAN_TORCH)("Debian's torch: the mapped BLAS is the current target of the libblas.so.3 alternative", () => {
    const target = realpathSync(DEBIAN_BLAS);
    const c = checks.torch;
    expect(c.probe!.blasLibraries).toContain(target);
    const reference = target.includes('/blas/');
    expect(c.blas === 'reference BLAS').toBe(reference);
    expect(c.verdict.ok).toBe(!reference);
    if (reference) expect(!c.verdict.ok && c.verdict.reason).toContain(BLAS_FIX);
  });
});
