"""The math of token selection: pure tensor functions, no I/O, no models.

Notation (``docs/design.md``, "The math"): one sample has positions ``0..L-1``; ``labels[i] = -100`` off
the response set R; the prompt set P is every non-pad position not in R. Per-token losses are
stored *aligned with the token*: ``loss[:, i] = -log p(x_i | x_<i)`` (the prediction made at
position ``i-1``), and ``loss[:, 0] = 0``. Every function takes a boolean ``mask`` of R
``(B, L)`` and returns zeros / False off R.

Equations of the ssToken paper (Qin et al., ICLR 2026, arXiv:2510.18250):

* Eq. 3   ``REL(i) = loss_history(i) - loss_current(i)``          -> :func:`excess_loss`
* Eq. 5-7 ``AttnScore(i) = mean_h sum_{j in P} softmax_j(q_i k_j / sqrt(d))`` -> :func:`attn_prompt_mass`
          (beyond the paper, ``--attn_sink k``: the first k keys left out, the rest renormalized)
* Eq. 8   min-max of REL over R within each sample                 -> :func:`minmax_normalize`
          (beyond the paper, ``--normalize rank``: both signals to per-sample percentiles
          -> :func:`percentile_normalize`)
* Eq. 9   ``score = gamma * norm(REL) + (1 - gamma) * AttnScore``  -> :func:`sstoken_score`
* Eq. 10  NLL over kept tokens / number of kept tokens             -> :func:`selected_loss`
* Eq. 11  keep the top ``ceil(rho * |R|)`` tokens of each sample   -> :func:`select_top_per_sample`

Token weights (how much a kept token counts; ``docs/design.md``, "Weighting"): DFT ->
:func:`dft_weight`, EAFT -> :func:`eaft_weight` (from :func:`topk_entropy_from_logits`),
ASFT -> DFT plus ``alpha *`` :func:`response_token_kl`.

RHO-1's excess loss is the same difference with a reference model in place of the history
model (``loss_current - loss_reference``, so the sign is flipped: high = still to learn).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def response_mask(labels: torch.Tensor) -> torch.Tensor:
    """R, the response set: labels (B, L) -> (B, L) bool, True where ``labels != -100``.

    Position 0 is never in R: nothing predicts the first token. This is the one definition of
    "which tokens are response tokens"; every loss, score and count uses it.
    """
    resp = labels != IGNORE_INDEX
    resp[..., 0] = False
    return resp


# --------------------------------------------------------------------------- per-token losses

def token_losses_from_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Reference per-token NLL from full logits: ``loss[:, i] = -log softmax(logits[:, i-1])[x_i]``.

    logits (B, L, V), input_ids (B, L) -> (B, L) float32, ``loss[:, 0] = 0``.
    Materializes fp32 logits of the whole vocabulary; the slow, obviously-correct path.
    """
    B, L, V = logits.shape
    acc = torch.float64 if logits.dtype == torch.float64 else torch.float32
    out = logits.new_zeros((B, L), dtype=acc)
    if L > 1:
        lp = F.cross_entropy(logits[:, :-1].to(acc).reshape(-1, V), input_ids[:, 1:].reshape(-1),
                             reduction="none")
        out[:, 1:] = lp.view(B, L - 1)
    return out


def _acc_dtype(t: torch.Tensor) -> torch.dtype:
    """Accumulate in float32, or float64 for float64 inputs."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def topk_entropy_from_logits(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Entropy (nats) of the softmax over each row's ``k`` largest logits, renormalized among
    them: EAFT's cheap stand-in for the predictive entropy. logits (N, V) -> (N,), no grad."""
    top = logits.detach().topk(min(k, logits.shape[-1]), dim=-1).values               # (N, k)
    logp = top - torch.logsumexp(top, dim=-1, keepdim=True)
    return -(logp.exp() * logp).sum(-1)


def _backward_rows(h, weight, grad_out, chunk, needs, dlogits):
    """The backward both chunked functions share: for the rows whose output has a non-zero
    gradient only, ``chunk`` at a time, ``g = dlogits(rows) (c, V)`` (already times the output's
    gradient) is pushed through ``logits = h @ weight.T`` into the gradients of ``h`` (N, H)
    and ``weight`` (V, H); ``needs`` says which of the two are wanted."""
    acc = _acc_dtype(h)
    grad_h = torch.zeros_like(h) if needs[0] else None
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if needs[1] else None
    live = (grad_out != 0).nonzero().squeeze(1)                           # (n,) rows with gradient
    for s in range(0, live.numel(), chunk):
        rows = live[s:s + chunk]                                          # (c,)
        g = dlogits(rows)                                                 # (c, V)
        if grad_h is not None:
            grad_h[rows] = (g.to(weight.dtype) @ weight).to(h.dtype)
        if grad_w is not None:
            grad_w += g.T @ h[rows].to(acc)
    return grad_h, None if grad_w is None else grad_w.to(weight.dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Per-row NLL of ``h @ W.T`` computed ``chunk`` rows at a time, never holding (N, V) logits.

    Forward keeps only the log-sum-exp per row (and, when ``topk`` > 0, the top-k entropy of
    each row for EAFT, no grad); backward recomputes each chunk's logits (one extra matmul) so
    memory stays O(chunk * V) in fp32. Backward visits only the rows whose loss has a non-zero
    gradient: a token that selection drops (weight 0 in Eq. 10) costs no backward matmul
    through the vocabulary. Exact up to summation order; a dropped row with non-finite logits
    gives a zero gradient, not NaN as 0 * NaN would.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, chunk, topk):  # h (N, H), weight (V, H), targets (N,)
        N = h.shape[0]
        acc = _acc_dtype(h)
        loss = torch.empty(N, dtype=acc, device=h.device)
        lse = torch.empty(N, dtype=acc, device=h.device)
        entropy = torch.zeros(N if topk > 0 else 0, dtype=acc, device=h.device)
        for s in range(0, N, chunk):
            logits = (h[s:s + chunk] @ weight.T).to(acc)                  # (c, V)
            lse[s:s + chunk] = torch.logsumexp(logits, dim=-1)
            tgt = logits.gather(1, targets[s:s + chunk, None]).squeeze(1)
            loss[s:s + chunk] = lse[s:s + chunk] - tgt
            if topk > 0:
                entropy[s:s + chunk] = topk_entropy_from_logits(logits, topk)
        ctx.save_for_backward(h, weight, targets, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(entropy)
        return loss, entropy

    @staticmethod
    def backward(ctx, grad_loss, _grad_entropy):  # grad_loss (N,)
        h, weight, targets, lse = ctx.saved_tensors
        acc = _acc_dtype(h)

        def dlogits(rows):                                                    # (c, V)
            g = torch.exp((h[rows] @ weight.T).to(acc) - lse[rows, None])     # softmax
            g.scatter_add_(1, targets[rows, None], -torch.ones_like(targets[rows, None], dtype=g.dtype))
            return g.mul_(grad_loss[rows, None].to(acc))                      # dL/dlogits

        grad_h, grad_w = _backward_rows(h, weight, grad_loss, ctx.chunk, ctx.needs_input_grad, dlogits)
        return grad_h, grad_w, None, None, None


class _LinearKL(torch.autograd.Function):
    """Per-row ``KL(q || p)`` between a frozen reference ``q = softmax(h_ref @ W_ref.T)`` and the
    policy ``p = softmax(h @ W.T)``, ``chunk`` rows at a time, never holding (N, V) logits.

    ``KL(q || p) = sum_v q_v (log q_v - log p_v)``; its gradient with respect to the policy's
    logits is ``p - q``. Forward keeps the policy's log-sum-exp per row; backward recomputes
    both distributions chunk by chunk, for rows with a non-zero gradient only.
    """

    @staticmethod
    def forward(ctx, h, weight, h_ref, weight_ref, chunk):  # h, h_ref (N, H); weights (V, H)
        N, acc = h.shape[0], _acc_dtype(h)
        kl = torch.empty(N, dtype=acc, device=h.device)
        lse = torch.empty(N, dtype=acc, device=h.device)
        for s in range(0, N, chunk):
            zp = (h[s:s + chunk] @ weight.T).to(acc)                        # (c, V)
            logq = torch.log_softmax((h_ref[s:s + chunk] @ weight_ref.T).to(acc), dim=-1)
            lse[s:s + chunk] = torch.logsumexp(zp, dim=-1)
            kl[s:s + chunk] = (logq.exp() * (logq - (zp - lse[s:s + chunk, None]))).sum(-1)
        ctx.save_for_backward(h, weight, h_ref, weight_ref, lse)
        ctx.chunk = chunk
        return kl

    @staticmethod
    def backward(ctx, grad_kl):  # grad_kl (N,)
        h, weight, h_ref, weight_ref, lse = ctx.saved_tensors
        acc = _acc_dtype(h)

        def dlogits(rows):                                                    # (c, V)
            p = torch.exp((h[rows] @ weight.T).to(acc) - lse[rows, None])
            q = torch.softmax((h_ref[rows] @ weight_ref.T).to(acc), dim=-1)
            return (p - q) * grad_kl[rows, None].to(acc)                      # dKL/dz_p

        grad_h, grad_w = _backward_rows(h, weight, grad_kl, ctx.chunk, ctx.needs_input_grad, dlogits)
        return grad_h, grad_w, None, None, None


def response_token_kl(hidden: torch.Tensor, lm_head_weight: torch.Tensor, ref_hidden: torch.Tensor,
                      ref_head_weight: torch.Tensor, mask: torch.Tensor,
                      chunk_size: int = 1024) -> torch.Tensor:
    """Per-token ``KL(q || p)`` on R between the reference's prediction ``q`` and the policy's
    ``p`` of token x_i (both made at position i-1), chunked: ASFT's anchor (arXiv:2509.23753).

    hidden, ref_hidden (B, L, H); head weights (V, H); mask (B, L) bool -> (B, L), zero off R,
    differentiable in ``hidden`` and ``lm_head_weight``. Equals the full-logit
    ``F.kl_div(log_softmax(z_p), softmax(z_q)).sum(-1)`` (tested).
    """
    mask = mask.clone()
    mask[:, 0] = False
    b, i = mask.nonzero(as_tuple=True)
    out = torch.zeros(mask.shape, dtype=_acc_dtype(hidden), device=hidden.device)
    if b.numel() == 0:
        return out + 0.0 * hidden.sum()
    kl = _LinearKL.apply(hidden[b, i - 1], lm_head_weight, ref_hidden[b, i - 1].detach(),
                         ref_head_weight.detach(), chunk_size)
    return out.index_put((b, i), kl)


def response_token_stats(hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                         input_ids: torch.Tensor, mask: torch.Tensor, chunk_size: int = 1024,
                         topk: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token NLL on R from final hidden states, chunked (the fast path), and with
    ``topk`` > 0 the top-k entropy of each of those rows (EAFT), from the same logits.

    hidden (B, L, H), lm_head_weight (V, H), input_ids (B, L), mask (B, L) bool of R
    -> loss (B, L) float32 (float64 for float64 inputs), zero off R; entropy (B, L) or None.
    Only the rows that predict a response token are projected to the vocabulary,
    ``chunk_size`` rows at a time. Equals :func:`token_losses_from_logits` and
    :func:`topk_entropy_from_logits` on R (tested).
    """
    mask = mask.clone()
    mask[:, 0] = False                       # nothing predicts the first token
    b, i = mask.nonzero(as_tuple=True)       # (N,), (N,)
    h = hidden[b, i - 1]                     # (N, H): position i-1 predicts token i
    targets = input_ids[b, i]                # (N,)
    out = torch.zeros(mask.shape, dtype=_acc_dtype(hidden), device=hidden.device)
    ent = torch.zeros(mask.shape, dtype=_acc_dtype(hidden), device=hidden.device) if topk > 0 else None
    if h.shape[0] == 0:
        return out + 0.0 * hidden.sum(), ent  # keep the graph connected
    loss, entropy = _LinearCrossEntropy.apply(h, lm_head_weight, targets, chunk_size, topk)
    out = out.index_put((b, i), loss)
    if ent is not None:
        ent = ent.index_put((b, i), entropy)
    return out, ent


def response_token_losses(hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                          input_ids: torch.Tensor, mask: torch.Tensor,
                          chunk_size: int = 1024) -> torch.Tensor:
    """The loss part of :func:`response_token_stats`: (B, L), zero off R."""
    return response_token_stats(hidden, lm_head_weight, input_ids, mask, chunk_size)[0]


# --------------------------------------------------------------------------- token weights

def dft_weight(token_loss: torch.Tensor, min_weight: float = 0.0) -> torch.Tensor:
    """DFT (Wu et al., "On the Generalization of SFT: A Reinforcement Learning Perspective with
    Reward Rectification", 2025, arXiv:2508.05629): each token's NLL times its probability
    with the gradient stopped, ``w = sg(p(x_i)) = exp(-loss(i))``, floored at ``min_weight``
    (the authors' advice for long data). (B, L), no grad."""
    return torch.exp(-token_loss.detach()).clamp(min=min_weight)


EAFT_ENTROPY_SCALE = 3.0    # the reference's divisor: ~ln 20, the entropy of a uniform top-20


def eaft_weight(topk_entropy: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """EAFT (Entropy-Adaptive Fine-Tuning, arXiv:2601.02151), as its reference implementation
    (merged into LLaMA-Factory by the authors) defines it: ``w = (H_k / 3) ** alpha`` with
    ``H_k`` the entropy of the softmax over the top-k logits (k = 20 there) and 3 ~ ln 20, so
    a token the model is confident about (low entropy) counts little. (B, L), no grad."""
    return (topk_entropy.detach() / EAFT_ENTROPY_SCALE).pow(alpha)


# --------------------------------------------------------------------------- excess losses

def excess_loss(loss_history: torch.Tensor, loss_current: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Retrospective excess loss, Eq. 3: ``REL = loss_history - loss_current`` on R. (B, L)."""
    return torch.where(mask, loss_history - loss_current, torch.zeros_like(loss_current))


def reference_excess_loss(loss_current: torch.Tensor, loss_reference: torch.Tensor,
                          mask: torch.Tensor) -> torch.Tensor:
    """RHO-1's excess loss (Lin et al., 2024): ``EL = loss_current - loss_reference`` on R.

    High = the reference model already predicts the token but the current model does not
    (still to learn). The sign is the opposite of :func:`excess_loss`. (B, L).
    """
    return torch.where(mask, loss_current - loss_reference, torch.zeros_like(loss_current))


def minmax_normalize(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Eq. 8: per-sample min-max over R to [0, 1]; a constant sample maps to 0. (B, L)."""
    big = torch.finfo(x.dtype).max
    lo = torch.where(mask, x, torch.full_like(x, big)).amin(dim=1, keepdim=True)     # (B, 1)
    hi = torch.where(mask, x, torch.full_like(x, -big)).amax(dim=1, keepdim=True)    # (B, 1)
    span = hi - lo
    safe = torch.where(span > 0, span, torch.ones_like(span))
    out = torch.where(span > 0, (x - lo) / safe, torch.zeros_like(x))
    return torch.where(mask, out, torch.zeros_like(x))


def percentile_normalize(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample percentile over R (``--normalize rank``, beyond the paper): token i of a
    sample with n response tokens maps to ``(r_i - 1) / (n - 1)``, r_i its rank (1 = smallest)
    among them with ties sharing their average rank. Uniform on [0, 1] whatever the signal's
    shape, so ``gamma`` in Eq. 9 mixes two signals on the same scale. A sample with one
    response token (or all equal) maps to 0.5. (B, L) -> (B, L) float64, zero off R (float64
    so that a mix of two percentiles ties exactly where the fractions do).

    Sort-based, O(L log L): the rank is found by binary search in the sorted row.
    """
    xd = x.double()
    big = torch.full_like(xd, math.inf)
    row = torch.sort(torch.where(mask, xd, big), dim=1).values                 # (B, L), R first
    v = torch.where(mask, xd, torch.zeros_like(xd)).contiguous()
    below = torch.searchsorted(row, v, side="left")                            # # strictly less
    upto = torch.searchsorted(row, v, side="right")                            # # less or equal
    n = mask.sum(dim=1, keepdim=True).double()                                 # (B, 1)
    avg_rank0 = below.double() + (upto - below - 1).double() / 2               # 0-based, tie avg
    pct = torch.where(n > 1, avg_rank0 / (n - 1).clamp(min=1), torch.full_like(avg_rank0, 0.5))
    return torch.where(mask, pct, torch.zeros_like(pct))


def sstoken_score(rel_norm: torch.Tensor, attn_score: torch.Tensor, mask: torch.Tensor,
                  gamma: float) -> torch.Tensor:
    """Eq. 9: ``gamma * norm(REL) + (1 - gamma) * AttnScore`` on R. (B, L)."""
    s = gamma * rel_norm + (1.0 - gamma) * attn_score
    return torch.where(mask, s, torch.zeros_like(s))


def rank_score(rel_pct: torch.Tensor, attn_pct: torch.Tensor, mask: torch.Tensor,
               gamma: float) -> torch.Tensor:
    """Eq. 9 on percentiles (``--normalize rank``): :func:`sstoken_score` in float64, rounded
    to 12 decimals, so two tokens whose percentile mixes are equal as fractions tie exactly
    (and the earlier position wins, as everywhere) instead of by float rounding. (B, L)."""
    return torch.round(sstoken_score(rel_pct.double(), attn_pct.double(), mask, gamma), decimals=12)


def attention_driven(rel_norm: torch.Tensor, attn_score: torch.Tensor, gamma: float) -> torch.Tensor:
    """Tokens whose score comes mainly from attention: ``(1-gamma)*attn > gamma*norm(REL)``.

    These are the orange tokens of the paper's case studies. (B, L) bool.
    """
    return (1.0 - gamma) * attn_score > gamma * rel_norm


# --------------------------------------------------------------------------- attention score

def attn_prompt_mass_from_probs(attn_probs: torch.Tensor, prompt_mask: torch.Tensor,
                                sink_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference Eq. 5-7 from materialized attention probabilities.

    attn_probs (B, H, L, L) rows = queries, prompt_mask (B, L) bool -> (B, L): for every query
    i, the attention mass on prompt keys, averaged over heads.

    With ``sink_mask`` (B, L) bool (``--attn_sink``, beyond the paper): the sink keys S leave
    the sum and each head's remaining distribution is renormalized before the head mean,
    ``mean_h sum_{j in P minus S} p_hij / (1 - sum_{j in S} p_hij)`` (0 where a head puts all
    its mass on S).
    """
    p = attn_probs.float()
    if sink_mask is None:
        return (p * prompt_mask[:, None, None, :].float()).sum(-1).mean(1)
    kept = (prompt_mask & ~sink_mask)[:, None, None, :].float()
    rest = (p * (~sink_mask)[:, None, None, :].float()).sum(-1)                # (B, H, L)
    return _renormalized((p * kept).sum(-1), rest).mean(1)


def _renormalized(mass: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """``mass / rest`` per head (``rest`` the mass off the sink, summed directly rather than
    as ``1 - sink mass``, which cancels in float32 when the sink takes nearly everything);
    0 where (almost) everything is on the sink; at most 1."""
    ok = rest > 1e-6
    return torch.where(ok, mass / torch.where(ok, rest, torch.ones_like(rest)),
                       torch.zeros_like(mass)).clamp(0.0, 1.0)


def sink_keys(attention_mask: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` non-pad positions of each sequence (``--attn_sink k``): the keys a
    causal LM parks attention on (the attention sink). (B, L) bool."""
    real = attention_mask.bool()
    return real & (real.long().cumsum(dim=1) <= k)


def allowed_mask(attention_mask: torch.Tensor | None, q_len: int, k_len: int,
                 device: torch.device) -> torch.Tensor | None:
    """Turn whatever mask an attention function received into SDPA's boolean form.

    None (pure causal) -> None; 2D padding mask (B, K) (flash-attention style) -> causal AND
    key-not-pad (B, 1, Q, K); 4D bool (True = attend) -> as is; 4D float (additive, 0 = attend)
    -> ``mask == 0``.
    """
    if attention_mask is None:
        return None
    if attention_mask.dim() == 2:
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
        return causal[None, None] & attention_mask.bool()[:, None, None, :]
    if attention_mask.dtype == torch.bool:
        return attention_mask[..., :k_len]
    return attention_mask[..., :k_len] == 0


def attn_prompt_mass(query: torch.Tensor, key: torch.Tensor, prompt_mask: torch.Tensor,
                     attention_mask: torch.Tensor | None, scaling: float,
                     sink_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Eq. 5-7 in one fused attention call, O(L) extra memory (the fast path).

    ``sum_{j in P} softmax_j(q_i . k_j * scaling)`` is the output of attention with the value
    vector ``v_j = 1[j in P]``, so SDPA computes it without materializing (L, L) scores. With
    ``sink_mask`` a second value channel ``1[j not in S]`` gives each head's mass off the sinks in the same
    call, and the score is renormalized as in :func:`attn_prompt_mass_from_probs`.

    query (B, H, L, D), key (B, Hkv, L, D) (GQA key heads are repeated), prompt_mask (B, L)
    bool, attention_mask as the model passed it (see :func:`allowed_mask`), sink_mask (B, L)
    bool or None -> (B, L) float32. Rows with no allowed key (left-padding queries) give 0.
    """
    B, H, L, D = query.shape
    Hkv, K = key.shape[1], key.shape[2]
    if Hkv != H:
        key = key.repeat_interleave(H // Hkv, dim=1)                  # (B, H, K, D)
    mask = allowed_mask(attention_mask, L, K, query.device)
    if sink_mask is None:                                              # a view: no (B, H, K, D) copy
        value = prompt_mask[:, None, :K, None].to(query.dtype).expand(B, H, K, D)
    else:                                                              # (B, 1, K, D), a view over heads
        value = query.new_zeros(B, 1, K, D)
        value[..., 0] = (prompt_mask & ~sink_mask)[:, None, :K].to(query.dtype)
        value[..., 1] = (~sink_mask)[:, None, :K].to(query.dtype)
        value = value.expand(B, H, K, D)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask,
                                         is_causal=mask is None and L > 1, scale=scaling)
    out = torch.nan_to_num(out.float(), nan=0.0)                       # (B, H, L, D)
    if sink_mask is None:
        return out[..., 0].mean(1)                                     # (B, L)
    return _renormalized(out[..., 0], out[..., 1]).mean(1)


# --------------------------------------------------------------------------- selection

def num_keep(n: int | torch.Tensor, rho: float):
    """``ceil(rho * n)`` without floating-point surprises (0.6 * 5 is 3.0000000000000004)."""
    if isinstance(n, torch.Tensor):
        return torch.ceil(torch.round(n.double() * rho, decimals=9)).long().clamp(max=n)
    return min(int(n), math.ceil(round(n * rho, 9)))


RHO_FLOOR = 0.1


def unlearned_rho(n_unlearned: float, n_response: float, floor: float = RHO_FLOOR) -> float:
    """``--rho_rule unlearned`` (beyond the paper): the next step keeps the share of response
    tokens the model has not learned yet, ``rho_t = max(floor, n_unlearned / n_response)``,
    counted on the previous optimizer step (all micro-batches and processes) as the tokens
    with ``p(x_i) < --learned_prob``. The gradient of a token's NLL w.r.t. its logits has norm
    at most ``sqrt(2) (1 - p)``: learned tokens add little, so the budget shrinks as the model
    learns, and the ssToken score still decides *which* tokens fill it."""
    if n_response <= 0:
        raise ValueError("unlearned_rho: no response tokens counted")
    return max(floor, min(1.0, n_unlearned / n_response))


def _rank_desc(score: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rank of each entry along the last dim by score, descending; ties by position (earlier
    first); entries off the mask rank last. Same shape as score, int64."""
    s = torch.where(mask, score.double(), torch.full_like(score, -math.inf, dtype=torch.float64))
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
    return rank


def select_top_per_sample(score: torch.Tensor, mask: torch.Tensor, rho: float) -> torch.Tensor:
    """Eq. 11: keep the top ``ceil(rho * |R_b|)`` response tokens of each sample b.

    score, mask (B, L) -> keep (B, L) bool. Ties: the earlier position wins.
    """
    k = num_keep(mask.sum(dim=1), rho)                                 # (B,)
    return (_rank_desc(score, mask) < k[:, None]) & mask


def select_top_flat(score: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the top ``k`` entries of ``score`` over all of ``mask`` (any shape), ties by flat
    order (earlier sample, then earlier position). Used for batch scope (RHO-1) and pool scope
    (TokenCleaning)."""
    rank = _rank_desc(score.reshape(-1), mask.reshape(-1)).view(score.shape)
    return (rank < k) & mask


def select_random(mask: torch.Tensor, rho: float, generators: list[torch.Generator]) -> torch.Tensor:
    """Keep a uniformly random ``ceil(rho * |R_b|)`` of each sample's response tokens.

    One generator per sample (seeded from the run seed and the example), so the choice does
    not depend on batch composition."""
    u = torch.stack([torch.rand(mask.shape[1], generator=g) for g in generators]).to(mask.device)
    return select_top_per_sample(u, mask, rho)


def selected_loss(token_loss: torch.Tensor, weight: torch.Tensor, num_items: torch.Tensor | float) -> torch.Tensor:
    """Eq. 10: ``sum_i w_i * NLL_i / num_items``, ``num_items`` the number of kept tokens of
    the whole optimizer step (all micro-batches and processes). ``weight`` (B, L) is the keep
    mask (w = 1 on kept tokens, Eq. 10 itself) or a weighting's w, zero off the kept tokens."""
    return (token_loss * weight).sum() / num_items


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of two 1-D tensors (nan when undefined)."""
    if x.numel() < 2:
        return float("nan")
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    den = (x.norm() * y.norm()).item()
    return float((x @ y).item() / den) if den > 0 else float("nan")
