"""Processes for the concurrent-cache test (tests/test_cache.py): two writers score the same
datasets through LossProvider at the same time while a reader polls the cache entries."""
import json
import sys
import time
from pathlib import Path


def examples_for(tiny_dir, data, k):
    from sstoken.data import load_examples
    from sstoken.modeling import load_tokenizer

    return load_examples(str(data), load_tokenizer(tiny_dir), limit=k)[0]


def writer(tiny_dir, data, cache, out, rounds):
    import torch

    torch.set_num_threads(1)
    from sstoken.args import DataArguments, ModelArguments
    from sstoken.losses import LossProvider

    lp = LossProvider(ModelArguments(model=tiny_dir, dtype="float32"),
                      DataArguments(data=str(data), cache_dir=str(cache)))
    got = {}
    for k in range(1, rounds + 1):
        ex = examples_for(tiny_dir, data, k)
        path = lp.attach(tiny_dir, ex, "history_loss")
        got[k] = [str(path), [e.extra["history_loss"] for e in ex]]
    Path(out).write_text(json.dumps(got))


def reader(cache, out, seconds):
    from sstoken import cache as cache_mod

    seen, errors, t0 = 0, [], time.time()
    root = Path(cache) / "losses"
    while time.time() - t0 < seconds:
        for d in (root.iterdir() if root.is_dir() else []):
            if d.name.startswith(".") or d.suffix == ".lock":
                continue
            try:
                c = cache_mod.read(d)                 # an entry, once visible, is complete
                assert c.meta["examples"] == len(c.losses)
                seen += 1
            except Exception as e:                    # noqa: BLE001 - reported to the test
                errors.append(f"{d.name}: {e!r}")
    Path(out).write_text(json.dumps({"seen": seen, "errors": errors}))


if __name__ == "__main__":
    role = sys.argv[1]
    if role == "writer":
        writer(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
    else:
        reader(sys.argv[2], sys.argv[3], float(sys.argv[4]))
