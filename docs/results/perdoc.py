"""Per-document held-out losses of the seed-0 runs, differences to full paired by document.

    .venv/bin/python docs/results/perdoc.py      (after the sweep; about 9 minutes on 2 CPU cores)

The runs' eval.json files of the sweep predate ``document_losses``, so each run is scored again
with the same function and settings as the sweep's held-out evaluation.
"""
import json
import math
import sys

sys.path.insert(0, "src")
from sstoken.evaluation import heldout_loss  # noqa: E402
from sstoken.modeling import load_model_with_adapter, load_tokenizer  # noqa: E402

root = "outputs/sweep-smollm2-v2/runs"
out = {}
for run in ["full-seed0", "random-seed0", "tokencleaning-seed0", "rho1-seed0", "sstoken-gamma0.5-seed0",
            "sstoken-gamma1.0-seed0"]:
    m = load_model_with_adapter("embedded:smollm2-135m-instruct", f"{root}/{run}", "float32").eval()
    metrics, prov = heldout_loss(m, load_tokenizer(f"{root}/{run}"), data="embedded:gsm8k", skip=500,
                                 samples=150, template="tulu", max_seq_length=256)
    out[run] = prov["document_losses"]
    print(run, metrics["loss"], flush=True)
json.dump(out, open("outputs/perdoc.json", "w"))
base = out["full-seed0"]
for run, v in out.items():
    if run == "full-seed0":
        continue
    d = [a - b for a, b in zip(v, base)]
    n = len(d)
    m = sum(d) / n
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / (n - 1))
    worse = sum(x > 0 for x in d)
    print(f"{run} - full-seed0: {m:+.4f} ± {sd / math.sqrt(n):.4f} (doc-paired stderr, n={n}); "
          f"docs where it is worse: {worse}/{n}")
