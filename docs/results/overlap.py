"""Jaccard overlap of the kept response tokens between the runs of one seed (saved examples).

    python docs/results/overlap.py 0
"""
import json
import sys
from pathlib import Path
root = Path("outputs/sweep-smollm2-v2/runs")
seed = sys.argv[1] if len(sys.argv) > 1 else "0"
runs = [d for d in sorted(root.iterdir()) if d.name.endswith(f"-seed{seed}") and not d.name.startswith("full")]
kept = {}
for d in runs:
    for line in open(d / "selection.jsonl"):
        r = json.loads(line)
        kept.setdefault(d.name.rsplit("-seed", 1)[0], {})[r["id"]] = {
            i for i, (k, resp) in enumerate(zip(r["keep"], r["response"])) if k and resp}
names = list(kept)
print("| | " + " | ".join(names) + " |\n|" + " --- |" * (len(names) + 1))
for a in names:
    row = []
    for b in names:
        ids = set(kept[a]) & set(kept[b])
        inter = sum(len(kept[a][i] & kept[b][i]) for i in ids)
        union = sum(len(kept[a][i] | kept[b][i]) for i in ids)
        row.append(f"{inter / union:.2f}")
    print(f"| {a} | " + " | ".join(row) + " |")
