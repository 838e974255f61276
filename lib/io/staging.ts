// Several files replaced together: each is first written in full under a temporary name in
// its target directory, and only when all are written are they renamed into place, in the
// order they were staged. A failure before commit leaves every existing file untouched.
import { copyFile, rename, rm, writeFile } from 'node:fs/promises';
import { temporaryPath } from '../util/atomic-write.js';

export class StagedFiles {
  readonly #staged: { tmp: string; target: string }[] = [];

  /** Registers a complete temporary file that will become `target` on commit. */
  add(tmp: string, target: string): void {
    this.#staged.push({ tmp, target });
  }

  async writeText(target: string, text: string): Promise<void> {
    const tmp = temporaryPath(target);
    this.add(tmp, target);
    await writeFile(tmp, text, { flag: 'wx', flush: true });
  }

  async copy(source: string, target: string): Promise<void> {
    const tmp = temporaryPath(target);
    this.add(tmp, target);
    await copyFile(source, tmp);
  }

  get targets(): string[] {
    return this.#staged.map((s) => s.target);
  }

  async commit(): Promise<void> {
    const staged = this.#staged.splice(0);
    for (let i = 0; i < staged.length; i++) {
      try {
        await rename(staged[i].tmp, staged[i].target);
      } catch (e) {
        await Promise.all(staged.slice(i).map((s) => rm(s.tmp, { force: true })));
        throw e;
      }
    }
  }

  async abort(): Promise<void> {
    await Promise.all(this.#staged.splice(0).map((s) => rm(s.tmp, { force: true })));
  }
}
