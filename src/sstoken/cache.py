"""Per-token loss cache on disk, keyed by model, data, template and max length.

Layout of one entry (a folder)::

    meta.json          model, model fingerprint, data source, template, max_seq_length, counts
    losses.safetensors ``losses`` (T,) float32 (all examples' tokens, concatenated in order),
                       ``offsets`` (N+1,) int64
    examples.json      per example: id and a hash of its input_ids

Aligned with tokens as everywhere in sstoken: ``losses[offsets[k] + i]`` is
``-log p(x_i | x_<i)`` of example k (0 at i = 0 and off the response). An entry is written to
a temporary folder and renamed into place, so a crash never leaves a half-written cache.
Reading checks every example's id and token hash: a stale or mismatched cache is an error.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .data import Example
from .io import atomic_dir

FORMAT_VERSION = 2              # 2: the example hash covers R (labels) too


class CacheError(RuntimeError):
    """A cache that does not match the model or data it is used with."""


def tokens_hash(ex: Example) -> str:
    """An example's tokens and its response set R (the losses stored are those on R; weights
    in the data can change R without changing the tokens)."""
    return hashlib.sha1(json.dumps([ex.input_ids, ex.labels]).encode()).hexdigest()[:16]


def model_fingerprint(model_path: str) -> str:
    """Identify a model's weights cheaply: for a local folder, its config and the names, sizes
    and modification times of its weight files; for a hub name, the name itself."""
    p = Path(model_path)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.name in ("config.json", "adapter_config.json"):
                h.update(f.read_bytes())
            elif f.suffix in (".safetensors", ".bin", ".gguf", ".pt"):
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    else:
        h.update(f"hub:{model_path}".encode())
    return h.hexdigest()[:16]


def data_fingerprint(examples: list[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(ex.id.encode())
        h.update(tokens_hash(ex).encode())
    return h.hexdigest()[:16]


def cache_key(model_fp: str, examples: list[Example], template: str, max_seq_length: int,
              dtype: str = "float32", attn_implementation: str = "sdpa") -> str:
    """The entry's name: everything that changes the stored losses (the model's weights, the
    tokenized data, the template, the max length, the dtype and the attention kernel)."""
    blob = (f"{FORMAT_VERSION}|{model_fp}|{data_fingerprint(examples)}|{template}|{max_seq_length}"
            f"|{dtype}|{attn_implementation}")
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass
class LossCache:
    path: Path
    meta: dict
    losses: dict[str, list[float]]          # example id -> per-token losses
    hashes: dict[str, str]                   # example id -> tokens hash

    def attach(self, examples: list[Example], field: str) -> None:
        """Put each example's cached losses into ``example.extra[field]``; raise CacheError if
        an example is missing or was tokenized differently."""
        for ex in examples:
            if ex.id not in self.losses:
                raise CacheError(f"{self.path}: example {ex.id!r} is not in this cache "
                                 "(different data?); run `sstoken score` again")
            if self.hashes[ex.id] != tokens_hash(ex):
                n_now, n_cached = len(ex.input_ids), len(self.losses[ex.id])
                size = f"now {n_now} tokens, cached {n_cached}" if n_now != n_cached else \
                    f"the same length ({n_now} tokens), other tokens"
                raise CacheError(f"{self.path}: example {ex.id!r} differs from when the cache was "
                                 f"written ({size}): the cache's model, template and max length "
                                 "match, so the record's text (or the tokenizer) changed since "
                                 "`sstoken score`; run it again")
            ex.extra[field] = self.losses[ex.id]


def entry_dir(root: Path, key: str) -> Path:
    return Path(root) / "losses" / key


def write(root: Path, key: str, meta: dict, examples: list[Example],
          losses: list[torch.Tensor]) -> Path:
    """Write one cache entry atomically; ``losses[k]`` is example k's (L_k,) float32 tensor."""
    out = entry_dir(root, key)
    with atomic_dir(out, replace=False) as tmp:     # the same key is the same content
        flat = torch.cat([l.float().cpu() for l in losses]) if losses else torch.zeros(0)
        offsets = torch.tensor([0] + [len(l) for l in losses], dtype=torch.int64).cumsum(0)
        save_file({"losses": flat.contiguous(), "offsets": offsets}, str(tmp / "losses.safetensors"))
        (tmp / "examples.json").write_text(json.dumps(
            [{"id": ex.id, "tokens": tokens_hash(ex)} for ex in examples]))
        meta = {**meta, "format": FORMAT_VERSION, "key": key, "examples": len(examples),
                "tokens": int(flat.numel()), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))
    return out


def read(path: Path) -> LossCache:
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
        items = json.loads((path / "examples.json").read_text())
        t = load_file(str(path / "losses.safetensors"))
    except FileNotFoundError as e:
        raise CacheError(f"{path}: not a complete sstoken loss cache ({e.filename} missing)") from e
    if meta.get("format") != FORMAT_VERSION:
        raise CacheError(f"{path}: cache format {meta.get('format')} != {FORMAT_VERSION}")
    flat, off = t["losses"], t["offsets"].tolist()
    if len(off) != len(items) + 1 or off[-1] != flat.numel():
        raise CacheError(f"{path}: corrupt cache (offsets do not match the losses)")
    losses = {it["id"]: flat[off[k]:off[k + 1]].tolist() for k, it in enumerate(items)}
    hashes = {it["id"]: it["tokens"] for it in items}
    return LossCache(path, meta, losses, hashes)


def find(root: Path, key: str) -> LossCache | None:
    d = entry_dir(root, key)
    return read(d) if (d / "meta.json").exists() else None


def check_meta(cache: LossCache, model_fp: str, template: str, max_seq_length: int,
               dtype: str | None = None) -> None:
    """A cache given explicitly must belong to this model, template, max length and dtype;
    the error names every field that differs."""
    m = cache.meta
    wanted = [("model", m.get("model_fingerprint"), model_fp, "model_fingerprint"),
              ("template", m.get("template"), template, "template"),
              ("max_seq_length", m.get("max_seq_length"), max_seq_length, "max_seq_length")]
    if dtype is not None and "dtype" in m:
        wanted.append(("dtype", m.get("dtype"), dtype, "dtype"))
    diff = [f"{what}={have!r} (this run: {want!r})" for what, have, want, _ in wanted if have != want]
    if diff:
        model = f" of {m['model']}" if "model" in m and m.get("model_fingerprint") != model_fp else ""
        raise CacheError(f"{cache.path}: the cache{model} was written for {', '.join(diff)}; "
                         "run `sstoken score` with this run's options")
