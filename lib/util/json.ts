// JSON text read from a file, with syntax errors that say where: V8's JSON.parse names a
// position for some errors and none for others ("Unexpected token …", "Unexpected end of JSON
// input"), so the first offending character is found by a scan of the JSON grammar of its own.

/** Where in a text: 1-based line and column, and the 0-based offset. */
export interface TextPosition {
  offset: number;
  line: number;
  column: number;
}

const LITERAL = /true|false|null/y;
const NUMBER = /-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?/y;
// eslint-disable-next-line no-control-regex -- JSON strings may not hold raw control characters
const STRING = /"(?:[^"\\\u0000-\u001f]|\\(?:["\\/bfnrt]|u[0-9a-fA-F]{4}))*"/y;

/**
 * The offset of the first character at which `text` stops being one JSON value (text.length
 * when it ends too soon), or undefined when it is valid JSON. Iterative: nesting depth costs no
 * stack.
 */
export function jsonErrorOffset(text: string): number | undefined {
  let i = 0;
  const closers: string[] = [];
  const ws = () => {
    while (i < text.length && (text[i] === ' ' || text[i] === '\t' || text[i] === '\n' || text[i] === '\r')) i++;
  };
  const match = (re: RegExp): boolean => {
    re.lastIndex = i;
    if (!re.test(text)) return false;
    i = re.lastIndex;
    return true;
  };
  // after '{' or a ',' in an object: a key and its colon
  const key = (): boolean => {
    ws();
    if (!match(STRING)) return false;
    ws();
    if (text[i] !== ':') return false;
    i++;
    return true;
  };
  for (;;) {
    // a value
    ws();
    const c = text[i];
    if (c === '{' || c === '[') {
      const close = c === '{' ? '}' : ']';
      i++;
      ws();
      if (text[i] === close) i++;
      else {
        closers.push(close);
        if (close === '}' && !key()) return i;
        continue;
      }
    } else if (!(match(STRING) || match(NUMBER) || match(LITERAL))) return i;
    // after a value: the end, a closing bracket or a comma
    for (;;) {
      ws();
      if (closers.length === 0) return i === text.length ? undefined : i;
      const close = closers[closers.length - 1];
      if (text[i] === close) {
        i++;
        closers.pop();
        continue;
      }
      if (text[i] !== ',') return i;
      i++;
      if (close === '}' && !key()) return i;
      break;
    }
  }
}

/** The line and column of `offset` in `text`. */
export function textPosition(text: string, offset: number): TextPosition {
  let line = 1;
  let lineStart = 0;
  for (let at = text.indexOf('\n'); at >= 0 && at < offset; at = text.indexOf('\n', at + 1)) {
    line++;
    lineStart = at + 1;
  }
  return { offset, line, column: offset - lineStart + 1 };
}

/**
 * What is wrong with `text`, which JSON.parse refused with `err`: where the first offending
 * character is and what V8 says about it, e.g. "not valid JSON at line 3, column 3 (Expected ','
 * or '}' after property value in JSON at position 13)". Callers put the file's path before it.
 */
export function jsonSyntaxProblem(text: string, err: unknown): string {
  const offset = jsonErrorOffset(text) ?? 0;
  const { line, column } = textPosition(text, offset);
  const where = offset >= text.length ? `at its end (line ${line}, column ${column})` : `at line ${line}, column ${column}`;
  return `not valid JSON ${where} (${err instanceof Error ? err.message : String(err)})`;
}

/**
 * `text`, the contents of `file`, parsed as a JSON object: a syntax error (jsonSyntaxProblem) or
 * another JSON value is thrown as an `Err` whose message starts with the file's path.
 */
export function parseJsonObject(
  text: string,
  file: string,
  Err: new (message: string, options?: ErrorOptions) => Error,
): Record<string, unknown> {
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (e) {
    throw new Err(`${file}: ${jsonSyntaxProblem(text, e)}`, { cause: e });
  }
  if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) throw new Err(`${file}: must be a JSON object`);
  return parsed as Record<string, unknown>;
}
