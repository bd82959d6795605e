"""The benchmark script runs end to end on the tiny model (CPU smoke; no timing asserted)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))


def test_bench_tiny_smoke(tmp_path):
    import bench

    res = bench.main(["--shape", "tiny", "--steps", "1", "--warmup", "0", "--batch", "2", "--seq", "32",
                      "--out", str(tmp_path / "B.md"), "--profile", str(tmp_path / "prof")])
    names = [r["variant"] for r in res["steps"]]
    assert names[:2] == ["full (naive: full fp32 logits)", "full"] and len(names) == 8
    assert all(r["median_s"] > 0 and r["tokens_per_s"] > 0 for r in res["steps"])
    assert all(set(r["phases_s"]) == set(bench.PHASES) for r in res["steps"])
    online = next(r for r in res["steps"] if r["variant"] == "sstoken (online history)")
    assert online["phases_s"]["history forward"] > 0
    att = res["attention"]["32"]["fused SDPA, indicator value"]
    assert att["max_abs_err_vs_eager"] < 1e-5
    text = (tmp_path / "B.md").read_text()
    assert "| sstoken (online history) |" in text and "command:" in text
    assert "| variant | history forward | forward + selection | backward | optimizer |" in text
    profiles = sorted(p.name for p in (tmp_path / "prof").iterdir())
    assert profiles == sorted(bench.slug(n) + ".txt" for n in bench.PROFILED)
    assert "aten::mm" in (tmp_path / "prof" / "sstoken-online-history.txt").read_text()
