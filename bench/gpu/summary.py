# The GPU job's speed table: each engine number (sppo_bench cuda_ log) beside its PyTorch peer
# (peers.json, same job), the ratio and the target of issue 12. An optional second engine log
# (a baseline build, same job) adds a "before" column. A peer the job did not measure is taken
# from the H200 anchors of ../shared/anchors/h200-2026-12-04.md and marked "(anchor)": another
# job on the same kind of card, so its ratio is indicative only.
#   python3 summary.py ENGINE_LOG PEERS_JSON [BASELINE_LOG]
import json, os, re, sys


def engine_numbers(path):
    text = open(path).read() if path else ""
    r = {}
    for name, v in re.findall(r"^train (\S+)\s+B\d+ T\d+\s+(\d+) tok/s", text, re.M):
        r["train " + name] = float(v)
    for b, v in re.findall(r"^generate 134M batch (\d+),.*?([\d.]+) new tok/s", text, re.M):
        r["generate b" + b] = float(v)
    m = re.search(r"^fused head .*?: ([\d.]+) ms, extra device memory ([\d.]+) GiB", text, re.M)
    if m:
        r["head ms"], r["head GiB"] = float(m.group(1)), float(m.group(2))
    return r


def main():
    eng = engine_numbers(sys.argv[1])
    peers = json.load(open(sys.argv[2])) if len(sys.argv) > 2 and os.path.exists(sys.argv[2]) else {}
    base = engine_numbers(sys.argv[3]) if len(sys.argv) > 3 else {}

    anchors = {("train_compiled_134M_B16_T1024", "tokens_per_s"): 451.4e3,
               ("train_compiled_1.1B_B8_T1024", "tokens_per_s"): 76.5e3,
               ("generate_static_compiled_134M_b64", "new_tokens_per_s"): 13.0e3,
               ("generate_static_compiled_134M_b256", "new_tokens_per_s"): 45.5e3,
               ("head_unfused_B8_T1024_H4096_V128256", "ms"): 46.7,
               ("head_unfused_B8_T1024_H4096_V128256", "peak_extra_GiB"): 11.7}
    from_anchor = set()

    def peer(key, field):
        v = peers.get(key, {}).get(field)
        if v is None and (key, field) in anchors:
            from_anchor.add((key, field))
            return anchors[(key, field)]
        return v

    # (label, engine key, peer value, higher is better, target ratio engine/peer)
    rows = [("train 134M B16 T1024, tok/s", "train 134M", peer("train_compiled_134M_B16_T1024", "tokens_per_s"), True, 1.0),
            ("train 1.1B B8 T1024, tok/s", "train 1.1B", peer("train_compiled_1.1B_B8_T1024", "tokens_per_s"), True, 1.0),
            ("generate 134M b64, new tok/s", "generate b64", peer("generate_static_compiled_134M_b64", "new_tokens_per_s"), True, 4.0),
            ("generate 134M b256, new tok/s", "generate b256", peer("generate_static_compiled_134M_b256", "new_tokens_per_s"), True, 3.0),
            ("fused head B8 T1024 H4096 V128256, ms (lower is better)", "head ms", peer("head_unfused_B8_T1024_H4096_V128256", "ms"), False, None),
            ("fused head extra memory, GiB (lower is better)", "head GiB", peer("head_unfused_B8_T1024_H4096_V128256", "peak_extra_GiB"), False, None)]
    print("| work | engine before | engine | PyTorch peer | engine / peer | target |")
    print("| --- | --- | --- | --- | --- | --- |")
    marked = {anchors[k] for k in from_anchor}
    for label, key, p, higher, target in rows:
        e, b = eng.get(key), base.get(key)
        ratio = f"{e / p:.2f}x" if e and p else "-"
        if target is not None:
            goal = f">= {target:g}x" + (" met" if e and p and e / p >= target else " not met" if e and p else "")
        elif key == "head ms":
            goal = "<= 40 ms" + (" met" if e and e <= 40 else " not met" if e else "")
        else:
            goal = "<= 1 GiB" + (" met" if e is not None and e <= 1 else " not met" if e is not None else "")
        fmt = (lambda v: f"{v:,.0f}") if higher else (lambda v: f"{v:.2f}")
        shown = (fmt(p) + (" (anchor)" if p in marked else "")) if p else "-"
        print(f"| {label} | {fmt(b) if b else '-'} | {fmt(e) if e else '-'} | {shown} | {ratio} | {goal} |")


main()
