"""The held-out loss: the SFT objective on data no run trained on (task ``heldout``).

torch and the data / loss code are imported inside :func:`heldout_loss`.
"""

from __future__ import annotations

import math


def heldout_loss(model, tokenizer, *, data: str, skip: int = 0, samples: int | None = None,
                 template: str = "tulu", max_seq_length: int = 2048,
                 batch_size: int = 8) -> tuple[dict, dict]:
    """The SFT objective on data no run trained on: per-token NLL of the response tokens.

    Every held-out example is rendered and masked exactly as in training (same template and
    length), and its response losses come from :func:`sstoken.losses.compute_losses` (the
    tested chunked loss, eq. 1). With ``l_d`` the mean NLL over the response tokens of
    document ``d``:

        loss = mean_d l_d,   loss_stderr = std_d(l_d) / sqrt(D)      (documents equally weighted)
        token_loss = sum of all response-token NLLs / number of response tokens

    Returns ``(metrics, provenance)``; lower is better. The provenance keeps every ``l_d``
    (``document_losses``, in data order) so runs can be compared document by document.
    """
    import torch

    from ..data import load_examples
    from ..losses import compute_losses
    from ..scoring import response_mask

    examples, stats = load_examples(data, tokenizer, template=template, max_seq_length=max_seq_length,
                                    limit=samples, skip=skip)
    if not examples:
        from ..errors import DataError

        raise DataError(f"held-out data {data} (skip {skip}) gave no examples")
    losses = compute_losses(model, examples, tokenizer.pad_token_id, batch_size=batch_size,
                            desc="held-out loss")
    per_doc, total, count = [], 0.0, 0
    for e, l in zip(examples, losses):
        mask = response_mask(torch.tensor(e.labels))            # (L,) R
        vals = l[mask].double()
        per_doc.append(float(vals.mean()))
        total += float(vals.sum())
        count += int(mask.sum())
    d = len(per_doc)
    mean = sum(per_doc) / d
    sd = math.sqrt(sum((x - mean) ** 2 for x in per_doc) / (d - 1)) if d > 1 else None
    metrics = {"loss": mean, "loss_stderr": None if sd is None else sd / math.sqrt(d),
               "token_loss": total / count, "token_loss_stderr": None}
    prov = {"data": data, "skip": skip, "samples": samples, "template": template,
            "max_seq_length": max_seq_length, "documents": d, "response_tokens": count,
            "truncated": stats.truncated, "dropped_no_response": stats.dropped_no_response,
            "document_losses": per_doc}
    return metrics, prov
