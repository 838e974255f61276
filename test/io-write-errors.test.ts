// Filesystem errors while writing a checkpoint or an output name the file (never its temporary)
// and what was being written, and keep the error code: cases that fail for root too — a
// directory where a file goes (EISDIR), a file where a folder goes (ENOTDIR), and /sys, which no
// user may create files in (EACCES, or EROFS where it is mounted read-only).
import { mkdirSync, mkdtempSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { Model, savePretrained } from '../lib/index.js';
import { FileWriteError, fileWriteError, writeFileAtomic, writeJsonAtomic } from '../lib/util/atomic-write.js';
import { tinyConfig } from './fixtures/engine-helpers.js';

const root = mkdtempSync(path.join(tmpdir(), 'sppo-io-write-'));
const model = Model.create(tinyConfig({ vocab_size: 16, seed: 1 }), { maxBatch: 1, maxSeq: 4 });
afterAll(async () => {
  await model.dispose();
  rmSync(root, { recursive: true, force: true });
});
let counter = 0;
const newDir = (name: string) => path.join(root, `${name}-${counter++}`);

/** The error `p` rejects with, which must be a FileWriteError. */
async function writeError(p: Promise<unknown>): Promise<FileWriteError> {
  const err = await p.then(
    () => undefined,
    (e: unknown) => e,
  );
  expect(err).toBeInstanceOf(FileWriteError);
  return err as FileWriteError;
}

describe('savePretrained', () => {
  it('a directory where a weights file or config.json goes: EISDIR, naming the file and the checkpoint', async () => {
    for (const name of ['model.safetensors', 'config.json']) {
      const dir = newDir('eisdir');
      mkdirSync(path.join(dir, name), { recursive: true });
      const err = await writeError(savePretrained(model, dir));
      expect(err.code).toBe('EISDIR');
      expect(err.path).toBe(path.join(dir, name));
      expect(err.message).toMatch(
        new RegExp(`^cannot write ${path.join(dir, name)} \\(the checkpoint in ${dir}\\): a directory is in the way \\(EISDIR`),
      );
      expect(readdirSync(dir).filter((f) => f.includes('.tmp-'))).toEqual([]); // no temporaries left behind
    }
  });

  it('a file where the checkpoint folder goes: ENOTDIR, naming the folder', async () => {
    const file = newDir('file');
    writeFileSync(file, 'not a folder');
    const err = await writeError(savePretrained(model, path.join(file, 'ckpt')));
    expect(err.code).toBe('ENOTDIR');
    expect(err.message).toMatch(
      new RegExp(`^cannot write ${path.join(file, 'ckpt')} \\(the checkpoint folder\\): a part of the path is a file, not a directory`),
    );
  });

  it('a folder no user may write: EACCES or EROFS, naming the folder', async () => {
    const err = await writeError(savePretrained(model, '/sys/sppo-io-write-test/ckpt'));
    expect(['EACCES', 'EROFS', 'EPERM']).toContain(err.code);
    expect(err.message).toMatch(
      /^cannot write \/sys\/sppo-io-write-test\/ckpt \(the checkpoint folder\): (permission denied|the filesystem is read-only|operation not permitted)/,
    );
  });
});

describe('writeFileAtomic and writeJsonAtomic (stage files, reports, generate --out)', () => {
  it('name the target, not its temporary, and keep the code', async () => {
    const dir = newDir('out');
    mkdirSync(path.join(dir, 'report.html'), { recursive: true });
    const eisdir = await writeError(writeFileAtomic(path.join(dir, 'report.html'), '<html>'));
    expect(eisdir.code).toBe('EISDIR');
    expect(eisdir.message).toMatch(new RegExp(`^cannot write ${path.join(dir, 'report.html')}: a directory is in the way`));
    expect(readdirSync(dir)).toEqual(['report.html']);

    const file = path.join(dir, 'plain');
    writeFileSync(file, '');
    const enotdir = await writeError(writeJsonAtomic(path.join(file, 'iter-1', 'train.json'), {}, { createParents: true }));
    expect(enotdir.code).toBe('ENOTDIR');
    expect(enotdir.message).toContain(`cannot write ${path.join(file, 'iter-1', 'train.json')}: a part of the path is a file`);
    expect(enotdir.cause).toBeInstanceOf(Error);
  });
});

describe('fileWriteError', () => {
  it("says what a full disk means, prefers a rename's destination, and leaves other errors alone", () => {
    const enospc = Object.assign(new Error('ENOSPC: no space left on device, write'), { code: 'ENOSPC' });
    const named = fileWriteError(enospc, '/runs/a/iter-1/policy/model.safetensors', 'the checkpoint in /runs/a/iter-1/policy');
    expect(named).toBeInstanceOf(FileWriteError);
    expect((named as FileWriteError).message).toBe(
      'cannot write /runs/a/iter-1/policy/model.safetensors (the checkpoint in /runs/a/iter-1/policy): no space left on the device (ENOSPC: no space left on device, write)',
    );
    expect(fileWriteError(named, '/elsewhere')).toBe(named);
    const rename = Object.assign(new Error('EXDEV: cross-device link not permitted'), { code: 'EXDEV', dest: '/b/c.json' });
    expect((fileWriteError(rename, '/a') as FileWriteError).path).toBe('/b/c.json');
    const plain = new RangeError('not a filesystem error');
    expect(fileWriteError(plain, '/a')).toBe(plain);
  });
});
