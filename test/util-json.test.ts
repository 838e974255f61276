// lib/util/json.ts: the first offending character of a JSON text, checked against V8 wherever
// V8 names a position, and found where it names none.
import { describe, expect, it } from 'vitest';
import { jsonErrorOffset, jsonSyntaxProblem, textPosition } from '../lib/util/json.js';
import { prng } from './fixtures/engine-helpers.js';

/** V8's offset of a syntax error, when its message names one. */
function v8Offset(text: string): number | undefined {
  try {
    JSON.parse(text);
    return undefined;
  } catch (err) {
    const m = /at position (\d+)/.exec((err as Error).message);
    return m ? Number(m[1]) : -1;
  }
}

describe('jsonErrorOffset', () => {
  it('accepts what JSON.parse accepts', () => {
    for (const text of [
      '{}',
      ' [ ] ',
      '0',
      '-1.5e+3',
      '"a\\u00e9\\n"',
      'null',
      '{"a": [1, {"b": [true, false]}], "c": ""}',
      '['.repeat(1e5) + ']'.repeat(1e5),
    ])
      expect(jsonErrorOffset(text), text.slice(0, 20)).toBeUndefined();
  });

  it('agrees with V8 on random damage wherever V8 names a position', () => {
    const r = prng(5);
    const base = JSON.stringify({ a: [1, 2.5, -3e4, 'x"y', null], b: { c: true, d: false, e: 'ü\n' }, f: [] }, null, 2);
    const junk = ['', ',', '}', ']', '{', '[', ':', '"', 'x', '0', ' ', '-', '.', 'e', '\\'];
    let compared = 0;
    for (let n = 0; n < 3000; n++) {
      const at = Math.floor(r() * (base.length + 1));
      const cut = Math.floor(r() * 3);
      const text = base.slice(0, at) + junk[Math.floor(r() * junk.length)] + base.slice(at + cut);
      const v8 = v8Offset(text);
      const ours = jsonErrorOffset(text);
      if (v8 === undefined) expect(ours, text).toBeUndefined();
      else expect(ours, text).toBeDefined();
      // structural errors; inside a string, number or literal V8 points at the bad character, we at where it starts
      if (v8 !== undefined && v8 >= 0 && /^(Expected|Unexpected non-whitespace)/.test(String(tryParse(text)))) {
        expect(ours, text).toBe(v8);
        compared++;
      }
    }
    expect(compared).toBeGreaterThan(500);
  });

  it('finds what V8 names no position for', () => {
    expect(jsonErrorOffset('{"a": tru}')).toBe(6);
    expect(jsonErrorOffset('[1,]')).toBe(3);
    expect(jsonErrorOffset('')).toBe(0);
    expect(jsonErrorOffset('{"a": 1')).toBe(7);
  });
});

function tryParse(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch (err) {
    return (err as Error).message;
  }
}

describe('jsonSyntaxProblem', () => {
  it('says the line and the column, or the end', () => {
    expect(textPosition('ab\ncd\nef', 7)).toEqual({ offset: 7, line: 3, column: 2 });
    const text = '{\n  "a": 1\n  "b": 2\n}';
    expect(jsonSyntaxProblem(text, new SyntaxError('V8 says'))).toBe('not valid JSON at line 3, column 3 (V8 says)');
    expect(jsonSyntaxProblem('{\n', new SyntaxError('end'))).toBe('not valid JSON at its end (line 2, column 1) (end)');
  });
});
