"""``rho1`` (Lin et al., "Not All Tokens Are What You Need", 2024).

Excess loss ``EL(i) = loss_current(i) - loss_reference(i)``: high where a reference model of
the target distribution already predicts the token and the current model does not. The
current loss comes from the training forward; the reference losses are computed once over
the data and cached (``--ref_model``). Keep the top ``ceil(rho * |R|)`` per sample (scope
``sample``, as the ssToken paper's baseline) or the top ``ceil(rho * N)`` of the micro-batch
(scope ``batch``, as the RHO-1 paper).
"""

from __future__ import annotations

from ..scoring import reference_excess_loss
from .base import Method, Selection, Tokens


class Rho1(Method):
    name = "rho1"

    @staticmethod
    def check(args) -> list[str]:
        out = [] if args.ref_model else ["--method rho1 needs --ref_model (a reference model; "
                                         "`sstoken train-ref` trains one)"]
        if args.scope == "pool":
            out.append("--method rho1 takes --scope sample or batch, not pool")
        return out

    def prepare(self, examples, losses) -> dict:
        losses.attach(self.args.ref_model, examples, "ref_loss")
        return {}

    def num_kept(self, resp, batch) -> int:
        return self.num_kept_top(resp)

    def select(self, t: Tokens) -> Selection:
        score = reference_excess_loss(t.loss, t.ref_loss, t.resp)     # (B, L)
        return Selection(keep=self.top(score, t.resp), record={"score": score})
