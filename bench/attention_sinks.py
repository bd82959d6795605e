"""Where the prompt attention of response tokens goes on the real model (#15, --attn_sink).

For the training examples of study v3 (the first 32 of GSM8K and of ShareGPT, tulu template,
max length 256), on SmolLM2-135M-Instruct (embedded), eager attention: for every response
token (query) at every layer, the share of its attention (mean over heads) on

* the first token of the sequence (the attention-sink candidate),
* the rest of the prompt P,
* earlier response tokens (and itself).

At the score's layer (-1, the last) it also compares the paper's attention score with the
sink-aware one (``--attn_sink 1``: key 0 left out, the rest renormalized per head): their
rank correlation, and what attention-only selection (gamma 0, rho 0.6) keeps by token class
with each. Exactness of the fast path is a test (tests/test_real_model.py), not measured here.

    .venv/bin/python bench/attention_sinks.py       # about 1 minute on 2 CPU cores
Writes docs/results/attention_sinks.json and prints a markdown summary.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    from sstoken.scoring import pearson

    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    return pearson(rx, ry)


def main(n: int = 32, out: Path = ROOT / "docs" / "results" / "attention_sinks.json") -> dict:
    from transformers import AutoModelForCausalLM

    from sstoken import scoring
    from sstoken.data import load_examples
    from sstoken.embedded import embedded_model_dir
    from sstoken.modeling import load_tokenizer
    from sstoken.records import TOKEN_CLASSES, kept_by_class

    model_dir = str(embedded_model_dir())
    tok = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    result = {"what": "share of response tokens' attention (mean over heads) by key group; "
                      "attention-only selection with and without the sink",
              "model": "SmolLM2-135M-Instruct (embedded)", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": "2-core CPU", "torch": torch.__version__, "data": {}}
    t0 = time.time()
    for data in ("embedded:gsm8k", "embedded:sharegpt"):
        examples, _ = load_examples(data, tok, template="tulu", max_seq_length=256, limit=n)
        n_layers = model.config.num_hidden_layers
        first = torch.zeros(n_layers, dtype=torch.float64)
        prompt_rest = torch.zeros(n_layers, dtype=torch.float64)
        response = torch.zeros(n_layers, dtype=torch.float64)
        count = 0
        recs = {"paper": [], "sink": []}
        rhos = []
        first_tokens = {}
        for e in examples:
            ids = torch.tensor([e.input_ids])
            labels = torch.tensor([e.labels])
            resp = scoring.response_mask(labels)                              # (1, L)
            prompt = ~resp
            with torch.no_grad():
                att = model(input_ids=ids, output_attentions=True).attentions  # n x (1, H, L, L)
            q = resp[0]
            key_first = torch.zeros_like(q)
            key_first[0] = True
            key_prompt = prompt[0] & ~key_first
            for layer, a in enumerate(att):
                p = a[0].double().mean(0)[q]                                   # (|R|, L)
                first[layer] += p[:, key_first].sum()
                prompt_rest[layer] += p[:, key_prompt].sum()
                response[layer] += p[:, ~prompt[0]].sum()
            count += int(q.sum())
            head = tok.decode(e.input_ids[:1])
            first_tokens[head] = first_tokens.get(head, 0) + 1
            last = att[-1]
            paper = scoring.attn_prompt_mass_from_probs(last, prompt)
            sink = scoring.attn_prompt_mass_from_probs(last, prompt, scoring.sink_keys(torch.ones_like(ids), 1))
            rhos.append(spearman(paper[resp], sink[resp]))
            toks = [tok.decode([i]) for i in e.input_ids]
            for name, score in (("paper", paper), ("sink", sink)):
                keep = scoring.select_top_per_sample(score, resp, 0.6)
                recs[name].append({"tokens": toks, "response": resp[0].tolist(), "keep": keep[0].tolist()})
        d = {"examples": len(examples), "response_tokens": count, "first_tokens": first_tokens,
             "share_by_layer": {"first_token": (first / count).tolist(),
                                "rest_of_prompt": (prompt_rest / count).tolist(),
                                "response": (response / count).tolist()},
             "spearman_paper_vs_sink_mean": sum(rhos) / len(rhos)}
        for name in recs:
            d[f"kept_by_class_{name}"] = {c: v for c, v in kept_by_class(recs[name]).items()}
        result["data"][data] = d
    result["seconds"] = round(time.time() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    # the summary
    for data, d in result["data"].items():
        s = d["share_by_layer"]
        print(f"\n### {data}: {d['examples']} examples, {d['response_tokens']} response tokens "
              f"(first token: {d['first_tokens']})\n")
        print("| layer | on the first token | on the rest of the prompt | on the response |")
        print("| --- | --- | --- | --- |")
        for layer in (0, 7, 14, 22, 29):
            print(f"| {layer} | {s['first_token'][layer]:.3f} | {s['rest_of_prompt'][layer]:.3f} | "
                  f"{s['response'][layer]:.3f} |")
        print(f"\nmean over layers: first token {sum(s['first_token']) / len(s['first_token']):.3f}; "
              f"Spearman(paper score, sink-aware score) per example, mean {d['spearman_paper_vs_sink_mean']:.3f}\n")
        print("| class | kept, paper score | kept, sink-aware score |")
        print("| --- | --- | --- |")
        for c in TOKEN_CLASSES:
            (k1, n1), (k2, _) = d["kept_by_class_paper"][c], d["kept_by_class_sink"][c]
            if n1:
                print(f"| {c} ({n1}) | {k1 / n1:.2f} | {k2 / n1:.2f} |")
    print(f"\n{result['seconds']} s -> {out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
