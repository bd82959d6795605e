"""Step cost of every selection method against plain SFT, in one process, on one batch.

    python bench/bench.py --shape tiny      # CPU smoke (seconds)
    python bench/bench.py --shape smollm2   # the real SmolLM2-135M (CPU: minutes)
    python bench/bench.py --shape 3b        # random Llama-3.2-3B shape (GPU)

For each variant: median step time (forward + selection + backward + AdamW step) over
``--steps`` after ``--warmup``, tokens/s, peak memory (CUDA: max_memory_allocated; CPU: peak
RSS sampled every millisecond, minus the RSS before the variant) and the ratio to ``full``,
and where the step's time goes (online history forward, training forward with selection,
backward, optimizer: the phases are split by device syncs, which on a GPU adds a few short
idle gaps to every step, so totals are not comparable with runs taken before the split).
Then the per-token scoring pass (``sstoken score``: no grad, chunked loss) against a naive HF
forward with full fp32 logits, and the attention-score computation alone (eager B x H x L x L
against the fused indicator-value SDPA call). Results are appended to BENCHMARKS.md (machine,
versions, date, command) and written as JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import contextlib

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from sstoken import scoring  # noqa: E402
from sstoken.args import SelectionArguments  # noqa: E402
from sstoken.modeling import add_lora, forward_token_losses  # noqa: E402
from sstoken.scoring import response_mask  # noqa: E402
from sstoken.trainer import SelectionTrainer  # noqa: E402

# Each timed step, split at device syncs: the online history forward (no grad; 0 when the
# history is cached or not used), the training forward with loss and selection, backward, AdamW.
PHASES = ("history forward", "forward + selection", "backward", "optimizer")

SHAPES = {
    # name: (layers, hidden, heads, kv_heads, intermediate, vocab)
    "tiny": (2, 64, 4, 2, 128, 512),
    "3b": (28, 3072, 24, 8, 8192, 128256),
}


class PeakMemory:
    """Peak memory of a region: CUDA allocator peak, or sampled RSS on CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.base = self._rss()
            self.peak, self._stop = self.base, False

            def sample():
                while not self._stop:
                    self.peak = max(self.peak, self._rss())
                    time.sleep(0.001)

            self._t = threading.Thread(target=sample, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.peak_bytes = torch.cuda.max_memory_allocated()
            self.extra_bytes = self.peak_bytes - self.base
        else:
            self._stop = True
            self._t.join()
            self.peak_bytes = self.peak
            self.extra_bytes = self.peak - self.base


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, steps: int, device):
    """One warm-up call, then ``steps`` timed calls: (seconds per call, PeakMemory, last output)."""
    fn()
    times, out = [], None
    with PeakMemory(device) as mem:
        for _ in range(steps):
            sync(device)
            t0 = time.perf_counter()
            out = fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    return times, mem, out


def build(shape: str, device, dtype, layers: int | None = None):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if shape == "smollm2":
        from sstoken.embedded import embedded_model_dir

        model = AutoModelForCausalLM.from_pretrained(embedded_model_dir(), dtype=dtype,
                                                     attn_implementation="sdpa")
    else:
        L, H, nh, kv, I, V = SHAPES[shape]
        cfg = LlamaConfig(num_hidden_layers=layers or L, hidden_size=H, num_attention_heads=nh,
                          num_key_value_heads=kv, intermediate_size=I, vocab_size=V,
                          max_position_embeddings=8192, tie_word_embeddings=False)
        with torch.device(device):
            model = LlamaForCausalLM(cfg).to(dtype)
        model.set_attn_implementation("sdpa")
    model.to(device)
    return add_lora(model, 64, 16, 0.0, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj")


def make_batch(B, L, V, device, prompt_frac=0.25, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, L), generator=g)
    labels = ids.clone()
    labels[:, : int(L * prompt_frac)] = -100
    labels[:, 0] = -100
    am = torch.ones(B, L, dtype=torch.long)
    batch = {"input_ids": ids, "attention_mask": am, "labels": labels,
             "index": torch.arange(B)}
    return {k: v.to(device) for k, v in batch.items()}


# The variants --profile traces: the anchor, plain SFT and the two ways of paying for history.
PROFILED = ("full (naive: full fp32 logits)", "full", "sstoken (cached history)", "sstoken (online history)")


def profile_step(step, device, path: Path, name: str, top: int = 30) -> None:
    """One more step under ``torch.profiler``; the ops with the most self time are appended to
    ``path`` as a text table (one file for every profiled variant)."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        step()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages(group_by_input_shape=True).table(sort_by=key, row_limit=top, max_name_column_width=60)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(f"# {name}: one training step under the profiler, top {top} ops by {key}\n\n{table}\n\n")
    print(f"  profile of {name} -> {path}", flush=True)


def naive_step_loss(model, batch, weighting="none"):
    """The anchor: HF forward with full logits, fp32 per-token cross-entropy, mean over R; with
    ``weighting``, the weight computed from those full logits too, as the trainers that ship
    DFT / EAFT do (TRL, LLaMA-Factory, axolotl)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lp = scoring.token_losses_from_logits(logits, batch["input_ids"])
    resp = response_mask(batch["labels"])
    w = resp.float()
    if weighting == "dft":
        w = w * scoring.dft_weight(lp)
    elif weighting == "asft":                 # DFT + 0.1 * KL(base || model), base = adapter off
        with torch.no_grad(), model.disable_adapter():
            ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        kl = torch.zeros_like(lp)
        kl[:, 1:] = torch.nn.functional.kl_div(torch.log_softmax(logits[:, :-1].float(), -1),
                                               torch.softmax(ref[:, :-1].float(), -1), reduction="none").sum(-1)
        return (lp * w * scoring.dft_weight(lp) + 0.1 * kl * w).sum() / resp.sum()
    elif weighting == "eaft":
        B, L, V = logits.shape
        ent = torch.zeros_like(lp)
        ent[:, 1:] = scoring.topk_entropy_from_logits(logits[:, :-1].float().reshape(-1, V), 20).view(B, L - 1)
        w = w * scoring.eaft_weight(ent)
    return (lp * w).sum() / resp.sum()


def bench_variants(model, batch, device, steps, warmup, chunk, profile_path=None, rounds=1,
                   only=None):
    """Every variant's training step. With ``rounds`` > 1 the whole list is run again, in
    reverse order every other round, and each variant's median is over all its rounds: a
    machine whose speed drifts during the run (CPU boost, a neighbour) then skews no variant."""
    from transformers import TrainingArguments

    resp = response_mask(batch["labels"])
    with torch.no_grad():
        base_losses = forward_token_losses(model, batch["input_ids"], batch["attention_mask"], resp, chunk)
    cached = {**batch, "history_loss": base_losses, "ref_loss": base_losses,
              "keep": scoring.select_top_per_sample(torch.rand_like(base_losses), resp, 0.6).float()}
    variants = [
        ("full (naive: full fp32 logits)", None, batch),
        ("full", SelectionArguments(method="full"), batch),
        ("full + dft", SelectionArguments(method="full", weighting="dft"), batch),
        ("full + dft (naive: full fp32 logits)", "dft", batch),
        ("full + eaft", SelectionArguments(method="full", weighting="eaft"), batch),
        ("full + eaft (naive: full fp32 logits)", "eaft", batch),
        ("full + asft (online base reference)", SelectionArguments(method="full", weighting="asft"), batch),
        ("full + asft (naive: full fp32 logits)", "asft", batch),
        ("sstoken (cached history) + dft", SelectionArguments(method="sstoken", weighting="dft"), cached),
        ("random", SelectionArguments(method="random"), batch),
        ("rho1 (cached reference)", SelectionArguments(method="rho1", ref_model="x"), cached),
        ("tokencleaning (precomputed)", SelectionArguments(method="tokencleaning", ref_model="x"), cached),
        ("sstoken (cached history)", SelectionArguments(method="sstoken"), cached),
        ("sstoken (online history)", SelectionArguments(method="sstoken"), batch),
        ("sstoken (EMA history)", SelectionArguments(method="sstoken", history="ema"), batch),
        # beyond the paper (#15)
        ("sstoken (cached history) --normalize rank", SelectionArguments(method="sstoken", normalize="rank"), cached),
        ("sstoken (cached history) --attn_sink 1", SelectionArguments(method="sstoken", attn_sink=1), cached),
        ("sstoken (cached history) --rho_rule unlearned",
         SelectionArguments(method="sstoken", rho_rule="unlearned"), cached),
        ("sstoken (epoch history)", SelectionArguments(method="sstoken", history="epoch"), batch),
    ]
    import tempfile

    args = TrainingArguments(output_dir=tempfile.mkdtemp(prefix="sstoken-bench-"), report_to="none",
                             use_cpu=device.type == "cpu", remove_unused_columns=False, max_steps=1)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    tokens = int(batch["attention_mask"].sum())
    if only:                                           # "full" always stays: the ratios' base
        variants = [v for v in variants if v[0] == "full" or any(o in v[0] for o in only)]
    times_of = {name: [] for name, _, _ in variants}
    phases_of = {name: {k: [] for k in PHASES} for name, _, _ in variants}
    mem_of = {}
    order = []
    for r in range(rounds):
        order += [(r, v) for v in (variants if r % 2 == 0 else variants[::-1])]
    for rnd, (name, sel, inputs) in order:
        if isinstance(sel, SelectionArguments):
            import dataclasses

            sel = dataclasses.replace(sel)                       # a fresh copy each round
        trainer = None
        naive = sel if isinstance(sel, str) or sel is None else None     # a naive weighting
        if naive is not None:
            sel = None
        if sel is not None:
            sel.save_scores = 0
            trainer = SelectionTrainer(model=model, args=args, selection=sel, loss_chunk_size=chunk)
        model.train()

        def one_step():
            """One training step; returns the device-synced times at the phase borders."""
            sync(device)
            t = [time.perf_counter()]
            if trainer is None:
                t.append(t[0])                                      # no history forward
                loss = naive_step_loss(model, inputs, naive or "none")
            else:
                # what compute_loss does, split so the online history forward is timed alone
                resp = response_mask(inputs["labels"])
                step_inputs = inputs
                if trainer.method.needs(0, 0).history and "history_loss" not in inputs:
                    step_inputs = {**inputs, "history_loss": trainer.history.losses(
                        model, inputs["input_ids"], inputs["attention_mask"], resp, chunk)}
                sync(device)
                t.append(time.perf_counter())
                n = torch.tensor(float(trainer.method.num_kept(resp, inputs)), device=device)
                loss = trainer.compute_loss(model, step_inputs, num_items_in_batch=n)
            sync(device)
            t.append(time.perf_counter())
            loss.backward()
            sync(device)
            t.append(time.perf_counter())
            opt.step()
            opt.zero_grad(set_to_none=True)
            sync(device)
            t.append(time.perf_counter())
            return t

        times, phases = times_of[name], phases_of[name]
        with trainer.attention_hook() if trainer is not None else contextlib.nullcontext():
            with PeakMemory(device) as mem:
                for s in range(warmup + steps):
                    t = one_step()
                    if s >= warmup:
                        times.append(t[-1] - t[0])
                        for k, a, b in zip(PHASES, t, t[1:]):
                            phases[k].append(b - a)
            if profile_path and name in PROFILED and rnd == 0:
                profile_step(one_step, device, Path(profile_path), name)
        mem_of.setdefault(name, mem)
        med = statistics.median(times[-steps:])
        print(f"  {name:34s} {med * 1e3:9.1f} ms  {tokens / med:9.0f} tok/s  "
              f"peak {mem.peak_bytes / 2**30:6.2f} GiB" + (f"  (round {rnd + 1})" if rounds > 1 else ""),
              flush=True)
        trainer = None              # free it before the next variant
    rows = []
    for name, _, _ in variants:
        med, mem = statistics.median(times_of[name]), mem_of[name]
        rows.append({"variant": name, "median_s": med, "tokens_per_s": tokens / med,
                     "peak_gib": mem.peak_bytes / 2**30, "extra_gib": mem.extra_bytes / 2**30,
                     "rounds": rounds,
                     "phases_s": {k: statistics.median(v) for k, v in phases_of[name].items()}})
    full = next(r for r in rows if r["variant"] == "full")
    for r in rows:
        r["time_ratio"] = r["median_s"] / full["median_s"]
        r["mem_ratio"] = r["peak_gib"] / full["peak_gib"] if full["peak_gib"] else float("nan")
    return rows


@torch.no_grad()
def bench_score_pass(model, batch, device, steps, chunk):
    model.eval()
    resp = response_mask(batch["labels"])
    out = {}
    for name, fn in [
        ("naive HF forward, full fp32 logits", lambda: scoring.token_losses_from_logits(
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
            batch["input_ids"])),
        ("sstoken score (chunked)", lambda: forward_token_losses(
            model, batch["input_ids"], batch["attention_mask"], resp, chunk)),
    ]:
        times, mem, _ = timed(fn, steps, device)
        med = statistics.median(times)
        out[name] = {"median_s": med, "tokens_per_s": int(batch["attention_mask"].sum()) / med,
                     "peak_gib": mem.peak_bytes / 2**30}
        print(f"  {name:34s} {med * 1e3:9.1f} ms  {out[name]['tokens_per_s']:9.0f} tok/s  "
              f"peak {mem.peak_bytes / 2**30:6.2f} GiB", flush=True)
    model.train()
    return out


def bench_attention(B, H, Hkv, L, D, device, dtype, steps=5):
    """Eager (materialize B x H x L x L) against the fused indicator-value SDPA."""
    g = torch.Generator(device="cpu").manual_seed(0)
    q = torch.randn(B, H, L, D, generator=g).to(device, dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(device, dtype)
    prompt = torch.zeros(B, L, dtype=torch.bool, device=device)
    prompt[:, : L // 4] = True
    scale = D ** -0.5
    res = {}

    def eager():
        kk = k.repeat_interleave(H // Hkv, dim=1)
        s = (q @ kk.transpose(-1, -2)).float() * scale
        s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool, device=device).tril(), float("-inf"))
        return scoring.attn_prompt_mass_from_probs(torch.softmax(s, -1), prompt)

    def fused():
        return scoring.attn_prompt_mass(q, k, prompt, None, scale)

    ref = None
    for name, fn in [("eager (B x H x L x L)", eager), ("fused SDPA, indicator value", fused)]:
        try:
            times, mem, out = timed(fn, steps, device)
            ref = out if ref is None else ref
            res[name] = {"median_ms": statistics.median(times) * 1e3, "extra_gib": mem.extra_bytes / 2**30,
                         "max_abs_err_vs_eager": float((out.float() - ref.float()).abs().max())}
        except torch.OutOfMemoryError:
            res[name] = {"median_ms": None, "extra_gib": None, "note": "out of memory"}
        print(f"  L={L:5d} {name:30s} {res[name]}", flush=True)
    return res


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, {os.cpu_count()} CPU cores"
    return f"CPU only ({platform.processor() or platform.machine()}), {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def versions() -> str:
    import peft
    import transformers

    return f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}"


def to_markdown(res) -> str:
    lines = [f"### {res['shape']} - batch {res['batch']} x {res['seq']} tokens, {res['dtype']}, LoRA r64 (all linear)",
             "", f"- date: {res['date']}", f"- machine: {res['machine']}", f"- versions: {res['versions']}",
             f"- command: `{res['command']}`", "",
             "| variant | median step | tokens/s | peak memory | time vs full | memory vs full |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in res["steps"]:
        lines.append(f"| {r['variant']} | {r['median_s'] * 1e3:.1f} ms | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_gib']:.2f} GiB | {r['time_ratio']:.3f}x | {r['mem_ratio']:.3f}x |")
    lines += ["", "Where the time goes (median of each phase; the phases are split by device syncs):", "",
              "| variant | " + " | ".join(PHASES) + " |", "| --- |" + " ---: |" * len(PHASES)]
    for r in res["steps"]:
        ph = r["phases_s"]
        lines.append(f"| {r['variant']} | " + " | ".join(f"{ph[k] * 1e3:.1f} ms" for k in PHASES) + " |")
    lines += ["", "| scoring pass | median | tokens/s | peak memory |", "| --- | ---: | ---: | ---: |"]
    for name, r in res["score_pass"].items():
        lines.append(f"| {name} | {r['median_s'] * 1e3:.1f} ms | {r['tokens_per_s']:.0f} | {r['peak_gib']:.2f} GiB |")
    lines += ["", "| attention score, one layer | L | median | extra memory | max abs err vs eager |",
              "| --- | ---: | ---: | ---: | ---: |"]
    for L, d in res["attention"].items():
        for name, r in d.items():
            ms = f"{r['median_ms']:.2f} ms" if r.get("median_ms") is not None else r.get("note", "-")
            ex = f"{r['extra_gib']:.3f} GiB" if r.get("extra_gib") is not None else "-"
            err = f"{r['max_abs_err_vs_eager']:.1e}" if "max_abs_err_vs_eager" in r else "-"
            lines.append(f"| {name} | {L} | {ms} | {ex} | {err} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["tiny", "smollm2", "3b"], default="tiny")
    p.add_argument("--batch", type=int, default=None, help="sequences per step")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence")
    p.add_argument("--layers", type=int, default=None,
                   help="override the shape's layer count (tiny/3b), e.g. --shape 3b --layers 1 for a "
                        "CPU smoke of the GPU shape's code path with its full 128k vocabulary")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--variants", default=None,
                   help="comma-separated substrings: time only the variants whose name has one "
                        "(and full, the base of the ratios); default all")
    p.add_argument("--rounds", type=int, default=1,
                   help="run every variant this many times, reversing the order every other round, "
                        "and take each variant's median over all (cancels a machine whose speed drifts)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--chunk", type=int, default=1024, help="loss chunk size (rows)")
    p.add_argument("--attn-lengths", default=None, help="comma-separated L for the attention micro-benchmark")
    p.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"), help="markdown file to append to ('' = none)")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--profile", default=None, metavar="FILE",
                   help="also trace one step of " + ", ".join(PROFILED) + " with torch.profiler; "
                        "the top ops by self time of each are appended to FILE")
    a = p.parse_args(argv)
    for flag, path in (("--out", a.out), ("--json", a.json), ("--profile", a.profile)):
        if path:                      # fail now, not after minutes of timing
            try:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                p.error(f"{flag} {path}: cannot create its folder ({e.strerror})")
            target = path if os.path.exists(path) else Path(path).parent
            if not os.access(target, os.W_OK) or os.path.isdir(path):
                p.error(f"{flag} {path}: not a writable file")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    defaults = {"tiny": (4, 128), "smollm2": (2, 256), "3b": (4, 2048)}[a.shape]
    B, L = a.batch or defaults[0], a.seq or defaults[1]
    print(f"[bench] {a.shape} on {machine()}; {versions()}; batch {B} x {L}", flush=True)
    if a.layers and a.shape == "smollm2":
        p.error("--layers applies to the random shapes (tiny, 3b), not the real smollm2")
    model = build(a.shape, device, dtype, a.layers)
    cfg = model.get_base_model().config
    batch = make_batch(B, L, cfg.vocab_size, device)
    res = {"shape": a.shape + (f" ({a.layers} layers)" if a.layers else ""), "batch": B, "seq": L, "dtype": str(dtype).replace("torch.", ""),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
           "versions": versions(), "command": "python bench/bench.py " + " ".join(argv or sys.argv[1:])}
    print("[bench] training steps", flush=True)
    res["steps"] = bench_variants(model, batch, device, a.steps, a.warmup, a.chunk, a.profile, a.rounds,
                                  a.variants.split(",") if a.variants else None)
    print("[bench] scoring pass", flush=True)
    res["score_pass"] = bench_score_pass(model, batch, device, a.steps, a.chunk)
    print("[bench] attention score", flush=True)
    lengths = [int(x) for x in a.attn_lengths.split(",")] if a.attn_lengths else [L]
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    res["attention"] = {str(l): bench_attention(B, cfg.num_attention_heads, cfg.num_key_value_heads,
                                                l, hd, device, dtype) for l in lengths}
    md = to_markdown(res)
    print(md)
    if a.out:
        path = Path(a.out)
        head = "" if path.exists() else "# Benchmarks\n\nWritten by `bench/bench.py`; newest last.\n\n"
        with open(path, "a") as f:
            f.write(head + md + "\n")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return res


if __name__ == "__main__":
    main()
