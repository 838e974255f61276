// Several files replaced together: each is first written in full under a temporary name in
// its target directory, and only when all are written are they renamed into place, in the
// order they were staged. A failure before commit leaves every existing file untouched.
import { rm } from 'node:fs/promises';
import { commitTemporaries, copyToTemporary, writeTemporary } from '../util/atomic-write.js';

export class StagedFiles {
  readonly #staged: { tmp: string; target: string }[] = [];

  /** Registers a complete temporary file that will become `target` on commit. */
  add(tmp: string, target: string): void {
    this.#staged.push({ tmp, target });
  }

  async writeText(target: string, text: string): Promise<void> {
    this.add(await writeTemporary(target, (file) => file.writeFile(text)), target);
  }

  async copy(source: string, target: string): Promise<void> {
    this.add(await copyToTemporary(source, target), target);
  }

  get targets(): string[] {
    return this.#staged.map((s) => s.target);
  }

  async commit(): Promise<void> {
    await commitTemporaries(this.#staged.splice(0));
  }

  async abort(): Promise<void> {
    await Promise.all(this.#staged.splice(0).map((s) => rm(s.tmp, { force: true })));
  }
}
