"""Per-document held-out losses of the seed-0 runs, differences to full paired by document.

    .venv/bin/python docs/results/perdoc.py      (after the sweep; about 9 minutes on 2 CPU cores)
"""
import json, math, sys
import torch
sys.path.insert(0, "src")
from sstoken.data import IGNORE_INDEX, load_examples
from sstoken.modeling import load_model_with_adapter, load_tokenizer
from sstoken.pipeline import compute_losses
root = "outputs/sweep-smollm2-v2/runs"
out = {}
for run in ["full-seed0", "random-seed0", "tokencleaning-seed0", "rho1-seed0", "sstoken-gamma0.5-seed0", "sstoken-gamma1.0-seed0"]:
    m = load_model_with_adapter("embedded:smollm2-135m-instruct", f"{root}/{run}", "float32").eval()
    tok = load_tokenizer(f"{root}/{run}")
    ex, _ = load_examples("embedded:gsm8k", tok, "tulu", 256, limit=150, skip=500)
    ls = compute_losses(m, ex, tok.pad_token_id, 8)
    out[run] = [float(l[torch.tensor(e.labels) != IGNORE_INDEX].double().mean()) for e, l in zip(ex, ls)]
    print(run, sum(out[run]) / len(out[run]), flush=True)
json.dump(out, open("outputs/perdoc.json", "w"))
base = out["full-seed0"]
for run, v in out.items():
    if run == "full-seed0":
        continue
    d = [a - b for a, b in zip(v, base)]
    n = len(d); m = sum(d) / n; sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    worse = sum(x > 0 for x in d)
    print(f"{run} - full-seed0: {m:+.4f} ± {sd / math.sqrt(n):.4f} (doc-paired stderr, n={n}); docs where it is worse: {worse}/{n}")
