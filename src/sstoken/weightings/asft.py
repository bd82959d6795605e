"""``asft`` - Anchored SFT (ICLR 2026, arXiv:2509.23753): DFT's weights plus ``alpha`` times the
token-wise KL divergence to a frozen reference, which keeps DFT from drifting.

For each kept token: ``sg(p(x_i)) * NLL_i + alpha * KL(q_i || p_i)``, ``q`` the reference's
prediction and ``p`` the trained model's, as the authors' implementation in LLaMA-Factory
(``F.kl_div(log_softmax(policy), softmax(reference))``, alpha 0.1). The reference is the base
model: with LoRA the same network with the adapter disabled (no second copy), with full
fine-tuning a frozen copy. The KL is computed inside the chunked loss (its gradient is
``p - q`` on the policy's logits), so neither model's full logits are ever built; the
reference costs one no-grad forward per step, and cannot be cached (it needs the whole
distribution, not one number per token).
"""

from __future__ import annotations

from .dft import DFT


class ASFT(DFT):
    name = "asft"
    needs_reference = True

    @staticmethod
    def check(args) -> list[str]:
        out = DFT.check(args)
        if args.asft_alpha <= 0:
            out.append(f"--asft_alpha must be > 0, got {args.asft_alpha}")
        return out

    @property
    def kl_alpha(self) -> float:
        return self.args.asft_alpha
