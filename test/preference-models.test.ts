// The PreferenceModel interface: a JS-function judge (each unordered pair asked once, the other
// half filled in as 1 − P), its bad outputs named by prompt and pair, batching with bounded
// concurrency, abort and disposal; a bare judge's matrix is checked; the oracle as a model.
import { describe, expect, it } from 'vitest';
import {
  assertPreferenceMatrix,
  definePreferenceModel,
  functionPreference,
  idealAnswer,
  oraclePreference,
  styledReversalOracle,
  UnusableVerdictsError,
} from '../lib/preference/index.js';

// A judge that prefers the longer response, with strength by length difference.
const longer = (_prompt: string, a: string, b: string): number => 0.5 + Math.tanh(a.length - b.length) / 2;

describe('functionPreference', () => {
  it('asks each unordered pair once (i < j) and fills P_ji = 1 − P_ij, P_ii = 1/2', async () => {
    const calls: [string, string][] = [];
    const model = functionPreference((prompt, a, b) => {
      calls.push([a, b]);
      return longer(prompt, a, b);
    });
    const responses = ['aa', 'a', 'aaaa', 'aaa'];
    const P = await model.compare('x', responses);
    expect(calls).toEqual([
      ['aa', 'a'],
      ['aa', 'aaaa'],
      ['aa', 'aaa'],
      ['a', 'aaaa'],
      ['a', 'aaa'],
      ['aaaa', 'aaa'],
    ]);
    for (let i = 0; i < 4; i++) {
      expect(P[i][i]).toBe(0.5);
      for (let j = 0; j < 4; j++)
        if (i < j) {
          expect(P[i][j]).toBe(longer('x', responses[i], responses[j]));
          expect(P[j][i]).toBe(1 - P[i][j]);
        }
    }
    assertPreferenceMatrix(P, { size: 4 });
  });

  it('accepts async judges and runs pair calls concurrently up to pairConcurrency', async () => {
    let inFlight = 0;
    let peak = 0;
    const model = functionPreference(
      async (p, a, b) => {
        inFlight++;
        peak = Math.max(peak, inFlight);
        await new Promise((r) => setTimeout(r, 2));
        inFlight--;
        return longer(p, a, b);
      },
      { pairConcurrency: 3 },
    );
    const P = await model.compare('x', ['a', 'bb', 'ccc', 'dddd', 'eeeee']);
    expect(peak).toBe(3);
    expect(P[4][0]).toBe(1 - longer('x', 'a', 'eeeee'));
  });

  it.each([
    [1.25, /returned 1\.25; it must return P\(a ≻ b\), a number in \[0, 1\]/],
    [-0.1, /returned -0\.1; it must return/],
    [Number.NaN, /returned NaN; it must return/],
    [Infinity, /returned Infinity; it must return/],
    ['0.5', /returned string "0\.5"; it must return/],
    [undefined, /returned undefined undefined; it must return/],
  ])('counts a judge that returns %s as an unusable verdict, naming the pair', async (bad, pattern) => {
    const model = functionPreference((_p, a, b) => (a === 'y1' && b === 'y2' ? (bad as number) : 0.7));
    // 1 of 3 pairs is more than the default 5%
    const err = await model.compare('w', ['y0', 'y1', 'y2']).catch((e: unknown) => e);
    expect(err).toBeInstanceOf(UnusableVerdictsError);
    expect(err).toMatchObject({ unusable: 1, verdicts: 3, maxUnusableFraction: 0.05 });
    expect((err as Error).message).toMatch(
      /^preference model 'function:anonymous': 1 of 3 verdicts \(33\.3%\) were unusable, more than maxUnusableFraction = 5% allows; e\.g\. responses 1 and 2: /,
    );
    expect((err as Error).message).toMatch(pattern);
    // allowed, it is scored ½ and counted
    const j = await model.judge('w', ['y0', 'y1', 'y2'], { maxUnusableFraction: 0.5 });
    expect(j.P[1][2]).toBe(0.5);
    expect(j.P[0][1]).toBe(0.7);
    expect(j).toMatchObject({ verdicts: 3, unusable: [expect.stringMatching(pattern) as string] });
  });

  it('counts unusable verdicts over a batch, naming the prompt and the pair; past the limit the batch fails', async () => {
    const model = functionPreference((p, a, b) => (p === 'third' && a === 'b' && b === 'c' ? Number.NaN : 0.5));
    const items = ['first', 'second', 'third', 'fourth'].map((prompt) => ({ prompt, responses: ['a', 'b', 'c'] }));
    // 1 of 12 verdicts: more than 5%
    const err = await model.compareBatch(items).catch((e: unknown) => e);
    expect(err).toMatchObject({ name: 'UnusableVerdictsError', unusable: 1, verdicts: 12 });
    expect((err as Error).message).toMatch(
      /1 of 12 verdicts \(8\.33%\) .* e\.g\. prompt 2: responses 1 and 2: the preference function returned NaN/,
    );
    const batch = await model.judgeBatch(items, { maxUnusableFraction: 0.1 });
    expect(batch).toMatchObject({ verdicts: 12, unusable: 1 });
    expect(batch.examples).toEqual([expect.stringMatching(/^prompt 2: responses 1 and 2: the preference function returned NaN/) as string]);
    expect(batch.matrices[2][1][2]).toBe(0.5);
    // a judge made with a limit takes it as its default
    const lenient = functionPreference((p, a, b) => (p === 'third' && a === 'b' && b === 'c' ? Number.NaN : 0.5), {
      maxUnusableFraction: 0.1,
    });
    expect(lenient.maxUnusableFraction).toBe(0.1);
    expect(await lenient.compareBatch(items)).toEqual(batch.matrices);
    expect(() => functionPreference(() => 0.5, { maxUnusableFraction: 2 })).toThrow(
      /maxUnusableFraction must be a number in \[0, 1\], got 2/,
    );
  });

  it('wraps a judge that throws', async () => {
    const model = functionPreference(() => {
      throw new Error('rate limited');
    });
    await expect(model.compare('x', ['a', 'b'])).rejects.toThrow(/responses 0 and 1: the preference function threw: rate limited/);
  });

  it('refuses bad input: fewer than 2 responses, non-strings, a non-function', async () => {
    const model = functionPreference(longer);
    await expect(model.compare('x', ['only'])).rejects.toThrow(/at least 2 responses, got 1/);
    await expect(model.compare('x', ['a', 3 as unknown as string])).rejects.toThrow(/response 1 must be a string/);
    await expect(model.compare(7 as unknown as string, ['a', 'b'])).rejects.toThrow(/prompt must be a string/);
    await expect(
      model.compareBatch([
        { prompt: 'x', responses: ['a', 'b'] },
        { prompt: 'y', responses: [] },
      ]),
    ).rejects.toThrow(/^prompt 1: comparing needs at least 2 responses, got 0/);
    expect(() => functionPreference('judge' as unknown as () => number)).toThrow(/takes a function/);
  });

  it('gives an id from the function name unless one is given', () => {
    expect(functionPreference(longer).id).toBe('function:longer');
    expect(functionPreference(longer, { id: 'length-judge-v2' }).id).toBe('length-judge-v2');
  });
});

describe('compareBatch', () => {
  it('returns one matrix per item in order, with at most `concurrency` prompts in flight', async () => {
    let inFlight = 0;
    let peak = 0;
    const model = definePreferenceModel({
      id: 'slow',
      async compare(prompt, responses) {
        inFlight++;
        peak = Math.max(peak, inFlight);
        await new Promise((r) => setTimeout(r, 5 - (prompt.length % 5)));
        inFlight--;
        const v = prompt.length / 100;
        return responses.map((_, i) => responses.map((_, j) => (i === j ? 0.5 : i < j ? v : 1 - v)));
      },
    });
    const items = Array.from({ length: 11 }, (_, n) => ({ prompt: 'p'.repeat(n + 1), responses: ['a', 'b'] }));
    const progress: number[] = [];
    const out = await model.compareBatch(items, { concurrency: 3, onProgress: (done) => progress.push(done) });
    expect(peak).toBe(3);
    expect(out.map((P) => P[0][1])).toEqual(items.map((it) => it.prompt.length / 100));
    expect(progress).toEqual([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]);
  });

  it('stops on abort and rejects with the abort reason', async () => {
    const ac = new AbortController();
    let calls = 0;
    const model = functionPreference(() => {
      if (++calls === 4) ac.abort(new Error('stop now'));
      return 0.5;
    });
    const items = Array.from({ length: 20 }, () => ({ prompt: 'x', responses: ['a', 'b'] }));
    await expect(model.compareBatch(items, { signal: ac.signal, concurrency: 1 })).rejects.toThrow('stop now');
    expect(calls).toBe(4);
    await expect(model.compare('x', ['a', 'b'], { signal: ac.signal })).rejects.toThrow('stop now');
  });
});

describe('definePreferenceModel', () => {
  it('checks what a judge returns', async () => {
    const notAntisymmetric = definePreferenceModel({
      id: 'bad',
      compare: () => [
        [0.5, 0.7],
        [0.7, 0.5],
      ],
    });
    await expect(notAntisymmetric.compare('x', ['a', 'b'])).rejects.toThrow(
      /preference model 'bad' returned a bad matrix: P\[0\]\[1\] \+ P\[1\]\[0\] = 0\.7 \+ 0\.7 = 1\.4, must be 1/,
    );
    const wrongSize = definePreferenceModel({
      id: 'small',
      compare: () => [
        [0.5, 0.5],
        [0.5, 0.5],
      ],
    });
    await expect(wrongSize.compare('x', ['a', 'b', 'c'])).rejects.toThrow(/has 2 rows, expected 3/);
    const batched = definePreferenceModel({
      id: 'b',
      compare: () => [[0.5]],
      compareBatch: () =>
        Promise.resolve([
          [
            [0.5, 2],
            [-1, 0.5],
          ],
        ]),
    });
    await expect(batched.compareBatch([{ prompt: 'x', responses: ['a', 'b'] }])).rejects.toThrow(
      /^prompt 0: .*P\[0\]\[1\] = 2 is not a probability/,
    );
  });

  it('takes a judgment with its unusable verdicts from a judge, and checks it', async () => {
    const half = [
      [0.5, 0.5],
      [0.5, 0.5],
    ];
    const reporting = definePreferenceModel({
      id: 'r',
      maxUnusableFraction: 0.5,
      compare: (prompt) => ({ P: half, verdicts: 2, unusable: prompt === 'bad' ? ['order 1: unreadable'] : [] }),
    });
    expect(reporting.maxUnusableFraction).toBe(0.5);
    expect(await reporting.judge('bad', ['a', 'b'])).toEqual({ P: half, verdicts: 2, unusable: ['order 1: unreadable'] });
    await expect(reporting.compare('bad', ['a', 'b'], { maxUnusableFraction: 0.4 })).rejects.toThrow(
      "preference model 'r': 1 of 2 verdicts (50%) were unusable, more than maxUnusableFraction = 40% allows; e.g. order 1: unreadable.",
    );
    const batch = await reporting.judgeBatch(['ok', 'bad', 'ok', 'bad'].map((prompt) => ({ prompt, responses: ['a', 'b'] })));
    expect(batch).toEqual({
      matrices: [half, half, half, half],
      verdicts: 8,
      unusable: 2,
      examples: ['prompt 1: order 1: unreadable', 'prompt 3: order 1: unreadable'],
    });
    // a bare matrix is K(K − 1)/2 usable verdicts
    const bare = definePreferenceModel({ id: 'b', compare: () => half });
    expect(await bare.judge('x', ['a', 'b'])).toEqual({ P: half, verdicts: 1, unusable: [] });
    const lying = definePreferenceModel({ id: 'l', compare: () => ({ P: half, verdicts: 1, unusable: ['x', 'y'] }) });
    await expect(lying.compare('x', ['a', 'b'])).rejects.toThrow(
      /preference model 'l' returned a bad matrix: a judgment needs a verdict count ≥ 0 and at most that many unusable reasons, got 1 and 2/,
    );
  });

  it('refuses calls after dispose, and disposes once', async () => {
    let disposed = 0;
    const dispose = (): void => {
      disposed++;
    };
    const model = definePreferenceModel({
      id: 'd',
      compare: () => [
        [0.5, 0.5],
        [0.5, 0.5],
      ],
      dispose,
    });
    await model.dispose();
    await model.dispose();
    expect(disposed).toBe(1);
    expect(model.disposed).toBe(true);
    await expect(model.compare('x', ['a', 'b'])).rejects.toThrow(/preference model 'd' is disposed/);
  });
});

describe('styledReversalOracle as a PreferenceModel', () => {
  it('returns oraclePreference for every ordered pair; its id carries the parameters', async () => {
    const oracle = styledReversalOracle();
    const word = 'cabd';
    const responses = [idealAnswer(word, 'R'), idealAnswer(word, 'S'), 'S:dbca', 'dbac', 'P:'];
    const P = await oracle.compare(word, responses);
    assertPreferenceMatrix(P, { size: 5, tolerance: 1e-15 });
    for (let i = 0; i < 5; i++)
      for (let j = 0; j < 5; j++) if (i !== j) expect(P[i][j]).toBe(oraclePreference(word, responses[i], responses[j]));
    expect(styledReversalOracle({ a: 0.2 }).id).not.toBe(oracle.id);
    expect(oracle.id).toBe(styledReversalOracle({}).id);
  });
});
