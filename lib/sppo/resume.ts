// Resuming with a changed config or input: which stages each config field (and each input file)
// determines, a hash per stage of what it depends on (recorded in run.json), and the decision —
// a change that a finished stage used is refused, naming the field and the stage; a change only
// the stages still to do use is accepted, and the run says which stages will use the new values.
// (Stages run in one order and each needs the ones before, so the stages still to do are exactly
// those after the last finished one: there is nothing finished downstream to invalidate.)
import { createHash } from 'node:crypto';
import { formatFieldPath, type FieldPath } from '../config/errors.js';
import { canonicalJson, diffConfigs } from '../config/load.js';
import type { RunConfig } from '../config/schema.js';
import { describeInputChange, type InputFile, type InputFingerprints } from './inputs.js';
import { BASE_STAGES, ITERATION_STAGES, type StageName } from './stage-files.js';

const ALL_STAGES: readonly StageName[] = [...BASE_STAGES, ...ITERATION_STAGES];
const SAMPLING: readonly StageName[] = ['base-eval', 'generate', 'evaluate'];

/** The training fields that building the training set reads as well. */
const DATASET_FIELDS = new Set(['mode', 'winRateDiagonal', 'maxLength']);

/**
 * The stages whose output the config field `field` (or an input file it names) determines,
 * under either of `configs` (the recorded one and the new one). Conservative: a field not listed
 * determines every stage.
 */
export function stagesUsing(field: FieldPath, configs: readonly RunConfig[]): readonly StageName[] {
  const [section, name] = field;
  switch (section) {
    case 'run':
      return name === 'dir' ? [] : ALL_STAGES; // seed and iterations decide the prompt split
    case 'sft':
      return ['base'];
    case 'generation':
      return SAMPLING;
    case 'data':
      // the rest of data decides the prompts and their split
      return name === 'maxPromptTokens' ? [...SAMPLING, 'dataset'] : ALL_STAGES;
    case 'preference':
      // the styled-reversal task's parameters also make its prompts and π_0's supervised data
      return configs.some((c) => c.preference.kind === 'styled-reversal') ? ALL_STAGES : ['judge', 'evaluate'];
    case 'training':
      // LoRA decides what every checkpoint is, π_0's included (and what the demo's supervised base trains)
      if (name === 'lora') return ALL_STAGES;
      // the gradients' precision shapes every trained weight: the demo's supervised base's too
      if (name === 'gradientPrecision') return configs.some((c) => c.sft !== undefined) ? ['base', 'train'] : ['train'];
      return typeof name === 'string' && DATASET_FIELDS.has(name) ? ['dataset', 'train'] : ['train'];
    default:
      return ALL_STAGES; // model (π_0 itself) and anything unknown
  }
}

/** Every leaf of `value` with its path. */
function leaves(value: unknown, at: (string | number)[] = []): { path: (string | number)[]; value: unknown }[] {
  if (Array.isArray(value)) return value.flatMap((v, i) => leaves(v, [...at, i]));
  if (value !== null && typeof value === 'object') return Object.entries(value).flatMap(([k, v]) => leaves(v, [...at, k]));
  return [{ path: at, value }];
}

/** Per stage, a hash of the config fields and input files that determine it. */
export function stageHashes(config: RunConfig, inputs: InputFingerprints, files: readonly InputFile[]): Record<StageName, string> {
  const fieldOf = new Map(files.map((f) => [f.key, f.field]));
  const out = {} as Record<StageName, string>;
  for (const stage of ALL_STAGES) {
    const fields = leaves(config)
      .filter((l) => stagesUsing(l.path, [config]).includes(stage))
      .map((l) => [formatFieldPath(l.path), l.value]);
    const used = Object.entries(inputs).filter(([key]) => stagesUsing(fieldOf.get(key) ?? [], [config]).includes(stage));
    out[stage] = createHash('sha256')
      .update(canonicalJson({ fields, inputs: used }))
      .digest('hex');
  }
  return out;
}

/** A changed config field or input file, and the stages that use it. */
export interface Change {
  /** `training.eta: 5 → 3`, `the input data.prompts (/data/p.jsonl) changed content` */
  what: string;
  stages: readonly StageName[];
}

/** One stage of one iteration (t = 0 for π_0's). */
export interface StageRef {
  t: number;
  stage: StageName;
}

export const stageLabel = ({ t, stage }: StageRef): string => (t === 0 ? stage : `iter-${t} ${stage}`);

/** What differs between the recorded run and this start: config fields (run.dir aside) and input files. */
export function changesSince(
  saved: { config: RunConfig; inputs?: InputFingerprints },
  config: RunConfig,
  inputs: InputFingerprints,
  files: readonly InputFile[],
): Change[] {
  const configs = [saved.config, config];
  const changes: Change[] = diffConfigs(saved.config, config)
    .map((c) => ({
      what: `${c.path}: ${JSON.stringify(c.before)} → ${JSON.stringify(c.after)}`,
      // `preference.A[0][1]` → ['preference', 'A', '0]', …]: the section and the field are what count
      stages: stagesUsing(c.path.split(/[.[]/), configs),
    }))
    .filter((c) => c.stages.length > 0);
  // a run recorded before inputs were fingerprinted has nothing to compare with
  const before = saved.inputs;
  if (before)
    for (const f of files)
      if (before[f.key] !== inputs[f.key] && !(before[f.key] === undefined && inputs[f.key] === 'absent'))
        changes.push({
          what: `the input ${f.key} (${f.file}) ${describeInputChange(before[f.key], inputs[f.key])}`,
          stages: stagesUsing(f.field, configs),
        });
  return changes;
}

/**
 * The decision on a start with `changes`: refused (the message names each change a finished
 * stage used, and that stage) or accepted (the message names the changes and the stages still to
 * do that will use them).
 */
export function resumeDecision(
  changes: readonly Change[],
  finished: readonly StageRef[],
  iterations: number,
): { refused: true; message: string } | { refused: false; message: string } {
  const used = changes.flatMap((c) => {
    const hit = finished.find((f) => c.stages.includes(f.stage));
    return hit ? [`${c.what} (used by the finished stage ${stageLabel(hit)})`] : [];
  });
  if (used.length > 0) {
    const more = used.length > 10 ? `; and ${used.length - 10} more` : '';
    return {
      refused: true,
      message: `holds a run whose finished stages used other values: ${used.slice(0, 10).join('; ')}${more}; restore them, or use a new run.dir`,
    };
  }
  const done = new Set(finished.map(stageLabel));
  const all: StageRef[] = [
    ...BASE_STAGES.map((stage) => ({ t: 0, stage })),
    ...Array.from({ length: iterations }, (_, i) => ITERATION_STAGES.map((stage) => ({ t: i + 1, stage }))).flat(),
  ];
  const redo = all.filter((r) => !done.has(stageLabel(r)) && changes.some((c) => c.stages.includes(r.stage)));
  return {
    refused: false,
    message: `changed since the run started: ${changes.map((c) => c.what).join('; ')}; no finished stage used them, so the stages still to do use the new values: ${describeStages(redo)}`,
  };
}

/** `base-eval, generate (iterations 1–3), train (iterations 2–3)` */
function describeStages(refs: readonly StageRef[]): string {
  const byStage = new Map<StageName, number[]>();
  for (const r of refs) byStage.set(r.stage, [...(byStage.get(r.stage) ?? []), r.t]);
  const ranges = (ts: number[]) => {
    const out: string[] = [];
    for (let i = 0; i < ts.length;) {
      let j = i;
      while (j + 1 < ts.length && ts[j + 1] === ts[j] + 1) j++;
      out.push(j === i ? `${ts[i]}` : `${ts[i]}–${ts[j]}`);
      i = j + 1;
    }
    return out.join(', ');
  };
  const parts = [...byStage].map(([stage, ts]) => (ts[0] === 0 ? stage : `${stage} (iteration${ts.length > 1 ? 's' : ''} ${ranges(ts)})`));
  return parts.join(', ') || 'none';
}
