"""Fakes shared by the tests: scores records like the trainer writes (test_records.py,
test_report.py) and run folders holding an eval.json (test_evaluate.py,
test_evaluation_tables.py)."""
import json
import random
from pathlib import Path

# ~3,000 distinct "BPE pieces": 1,000 real examples of 200 tokens have a few thousand distinct
# tokens, so the token index needs two digits, as it would on real data.
VOCAB = [w + s for w in ("the", " sea", " is", " 5", ".", " blue", " eggs", " Answer", ":", " x",
                         " total", " of", " 12", " and", " +", " =", " $", "ing", " her", "ly")
         for s in [""] + [chr(97 + i) + chr(97 + j) for i in range(12) for j in range(12)]]


def fake_record(k, method="sstoken", n=200, rng=None, tokens=None, gamma=0.5):
    """A scores record like the trainer writes: a prompt quarter, then the response, with a
    top-60% selection by gamma * rel_norm + (1 - gamma) * attn_score."""
    rng = rng or random.Random(hash((k, method)) & 0xFFFF)
    tokens = tokens or [rng.choice(VOCAB) if rng.random() > 0.05 else "\n" for _ in range(n)]
    n = len(tokens)
    resp = [i >= n // 4 for i in range(n)]
    attn = [rng.random() * 0.6 if r else None for r in resp]
    rel = [rng.gauss(0, 1) if r else None for r in resp]
    vals = [v for v in rel if v is not None]
    lo, hi = min(vals), max(vals)
    reln = [(v - lo) / (hi - lo) if v is not None else None for v in rel]
    g = gamma if gamma is not None else 0.5
    score = [g * a + (1 - g) * b if r else None for a, b, r in zip(reln, attn, resp)]
    order = sorted((i for i in range(n) if resp[i]), key=lambda i: -score[i])
    top = set(order[: -(-len(order) * 6 // 10)])
    keep = [i in top for i in range(n)]
    return {"id": f"ex{k}", "method": method, "step": 3, "gamma": gamma, "rho": 0.6,
            "tokens": tokens, "response": resp, "keep": keep,
            "loss": [rng.random() * 4 if r else None for r in resp], "rel": rel, "rel_norm": reln,
            "attn_score": attn, "score": score,
            "by_attention": [kk and (1 - g) * (a or 0) > g * (b or 0)
                             for kk, a, b in zip(keep, attn, reln)]}


def fake_eval_run(d: Path, acc: float, se: float | None) -> str:
    """A run folder whose eval.json has arc_easy (acc) and triviaqa (exact_match)."""
    d.mkdir()
    (d / "eval.json").write_text(json.dumps({"results": {
        "arc_easy": {"acc": acc, "acc_stderr": se, "acc_norm": 0.1, "acc_norm_stderr": 0.01},
        "triviaqa": {"exact_match": acc / 2, "exact_match_stderr": se}}}))
    return str(d)
