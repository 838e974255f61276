// Several files replaced together: each is first written in full under a temporary name in
// its target directory, and only when all are written are they renamed into place, in the
// order they were staged (with a journal, for files that must change together, recording the
// renames while they run). A failure before commit leaves every existing file untouched. A
// filesystem error (no space, a directory in the way, a read-only filesystem) names the file
// and what the files are.
import { rm } from 'node:fs/promises';
import { commitTemporaries, copyToTemporary, fileWriteError, writeTemporary, type CommitOptions } from '../util/atomic-write.js';

export class StagedFiles {
  readonly #staged: { tmp: string; target: string }[] = [];

  /** @param what what the files are, for errors: "the checkpoint in /runs/a/iter-1" */
  constructor(readonly what?: string) {}

  /** Registers a complete temporary file that will become `target` on commit. */
  add(tmp: string, target: string): void {
    this.#staged.push({ tmp, target });
  }

  /** Registers the temporary that `write` makes for `target`; a filesystem error names `target`. */
  async stage(target: string, write: () => Promise<string>): Promise<void> {
    let tmp: string;
    try {
      tmp = await write();
    } catch (e) {
      throw fileWriteError(e, target, this.what);
    }
    this.add(tmp, target);
  }

  async writeText(target: string, text: string): Promise<void> {
    await this.stage(target, () => writeTemporary(target, (file) => file.writeFile(text)));
  }

  async copy(source: string, target: string): Promise<void> {
    await this.stage(target, () => copyToTemporary(source, target));
  }

  get targets(): string[] {
    return this.#staged.map((s) => s.target);
  }

  /** Renames every staged file into place; `options.journal` records the commit while it runs (see CommitOptions). */
  async commit(options: CommitOptions = {}): Promise<void> {
    const staged = this.#staged.splice(0);
    try {
      await commitTemporaries(staged, options);
    } catch (e) {
      throw fileWriteError(e, staged[0]?.target ?? '', this.what);
    }
  }

  async abort(): Promise<void> {
    await Promise.all(this.#staged.splice(0).map((s) => rm(s.tmp, { force: true })));
  }
}
