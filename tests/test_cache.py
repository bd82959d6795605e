import pytest
import torch

from sstoken import cache
from sstoken.args import DataArguments, ModelArguments
from sstoken.data import build_examples
from sstoken.losses import LossProvider, compute_losses
from sstoken.runs import score


def examples(tok, records, n=5, seed=0):
    ex, _ = build_examples(((str(k), r) for k, r in enumerate(records(n, seed=seed))), tok)
    return ex


def test_roundtrip_and_atomic_layout(tmp_path, tok, records):
    ex = examples(tok, records)
    losses = [torch.rand(len(e.input_ids)) for e in ex]
    path = cache.write(tmp_path, "k1", {"model_fingerprint": "m", "template": "tulu",
                                         "max_seq_length": 2048}, ex, losses)
    assert [p.name for p in path.parent.iterdir()] == ["k1"]          # no temporary folder left
    c = cache.read(path)
    c.attach(ex, "history_loss")
    for e, l in zip(ex, losses):
        assert torch.allclose(torch.tensor(e.extra["history_loss"]), l)
    cache.check_meta(c, "m", "tulu", 2048)
    with pytest.raises(cache.CacheError, match="template"):
        cache.check_meta(c, "m", "chat", 2048)
    with pytest.raises(cache.CacheError, match="model"):
        cache.check_meta(c, "other", "tulu", 2048)


def test_stale_or_foreign_cache_is_an_error(tmp_path, tok, records):
    ex = examples(tok, records)
    c = cache.read(cache.write(tmp_path, "k", {}, ex, [torch.zeros(len(e.input_ids)) for e in ex]))
    changed = examples(tok, records)
    changed[1].input_ids = changed[1].input_ids[:-1]
    with pytest.raises(cache.CacheError, match=r"example .ex1. differs .*\(now \d+ tokens, cached \d+\).*text"):
        c.attach(changed, "x")
    other = examples(tok, records, n=3)
    other[0].id = "not-there"
    with pytest.raises(cache.CacheError, match="not in this cache"):
        c.attach(other, "x")
    (c.path / "losses.safetensors").unlink()
    with pytest.raises(cache.CacheError, match="not a complete"):
        cache.read(c.path)


def test_score_pass_matches_unbatched_losses_and_is_reused(tmp_path, tiny_dir, tok, records):
    ex = examples(tok, records, n=7)
    from sstoken.modeling import load_model

    model = load_model(tiny_dir, "float32")
    batched = compute_losses(model, ex, tok.pad_token_id, batch_size=3, chunk_size=4)
    for e, l in zip(ex, batched):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([e.input_ids])).logits[0]
        lp = torch.log_softmax(logits.double(), -1)
        for i in range(1, len(e.input_ids)):
            want = -float(lp[i - 1, e.input_ids[i]]) if e.labels[i] != -100 else 0.0
            assert abs(float(l[i]) - want) < 1e-5
    data = tmp_path / "d.jsonl"
    import json

    data.write_text("\n".join(json.dumps(r) for r in records(7)))
    d = DataArguments(data=str(data), cache_dir=str(tmp_path / "c"))
    m = ModelArguments(model=tiny_dir, dtype="float32")
    path = score(m, d)
    assert (path / "meta.json").exists()
    ex2, _ = build_examples(((str(k), r) for k, r in enumerate(records(7))), tok)
    assert LossProvider(m, d).attach(tiny_dir, ex2, "history_loss", compute=False)
    assert ex2[0].extra["history_loss"] == pytest.approx(batched[0].tolist(), abs=1e-5)
    # a different max length is a different key: not found, never silently reused
    ex3, _ = build_examples(((str(k), r) for k, r in enumerate(records(7))), tok, max_seq_length=9)
    d9 = DataArguments(data=str(data), max_seq_length=9, cache_dir=str(tmp_path / "c"))
    assert not LossProvider(m, d9).attach(tiny_dir, ex3, "history_loss", compute=False)


def test_key_covers_dtype_and_kernel_and_mismatch_names_every_field(tmp_path, tok, records):
    ex = examples(tok, records)
    keys = {cache.cache_key("m", ex, "tulu", 64, d, a) for d in ("float32", "bfloat16")
            for a in ("sdpa", "eager")}
    assert len(keys) == 4                           # losses in another dtype are never reused
    c = cache.read(cache.write(tmp_path, "k", {"model_fingerprint": "m", "template": "tulu",
                                               "max_seq_length": 64, "dtype": "bfloat16"},
                               ex, [torch.zeros(len(e.input_ids)) for e in ex]))
    with pytest.raises(cache.CacheError) as e:
        cache.check_meta(c, "m", "chat", 128, "float32")
    msg = str(e.value)
    assert "template='tulu' (this run: 'chat')" in msg and "max_seq_length=64" in msg and "dtype='bfloat16'" in msg
    assert "model" not in msg.split(":", 1)[1].split("written for")[1]           # the model matches


def test_concurrent_writers_and_a_reader(tmp_path, tiny_dir, records):
    """Two processes score the same data at once (as two ranks of a fresh run would) while a
    third reads: nothing fails, one scoring pass per entry, the reader never sees a partial
    entry, and both writers get the same losses."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in records(12)))
    cache_root = tmp_path / "cache"
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": str(here.parent / "src"), "OMP_NUM_THREADS": "1"}
    script = str(here / "cache_stress.py")
    procs = [subprocess.Popen([sys.executable, script, "writer", tiny_dir, str(data), str(cache_root),
                               str(tmp_path / f"w{i}.json"), "8"], env=env, stderr=subprocess.PIPE,
                              text=True) for i in range(2)]
    procs.append(subprocess.Popen([sys.executable, script, "reader", str(cache_root),
                                   str(tmp_path / "r.json"), "12"], env=env))
    logs = [p.communicate(timeout=300)[1] or "" for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], logs
    assert sum(log.count("[sstoken] scoring ") for log in logs) == 8     # one pass per entry
    w0, w1 = (json.loads((tmp_path / f"w{i}.json").read_text()) for i in range(2))
    assert w0 == w1                                             # the same entry, the same losses
    entries = [d for d in (cache_root / "losses").iterdir() if not d.name.startswith(".")
               and d.suffix != ".lock"]
    assert len(entries) == 8                                    # one per dataset, none doubled
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["errors"] == [] and r["seen"] > 0
