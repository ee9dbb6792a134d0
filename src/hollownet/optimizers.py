"""Stage 2's optimizers (``settings.Modes.optimizer``).

``"adamw"``: torch's AdamW (its single-tensor implementation: what a CPU runs); ``"adamw-foreach"``:
torch's multi-tensor AdamW (its default on CUDA; larger temporaries in the step);
``"adamw-in-backward"``: :class:`InBackwardAdamW`, each parameter's AdamW step run in its
post-accumulate-grad hook and its gradient freed at once, so no full set of gradients ever exists
(same math as ``adamw``; clipping per tensor).
"""

from __future__ import annotations

import torch

from hollownet.errors import HollownetError
from hollownet.settings import ALL_OPTIMIZERS


class InBackwardAdamW(torch.optim.AdamW):
    """AdamW whose per-parameter step runs *during* backward, as each gradient is accumulated.

    Each trainable parameter gets a post-accumulate-grad hook that (optionally) clips that
    parameter's gradient to ``max_grad_norm`` (per tensor: a global norm needs every gradient at
    once, which is what this optimizer avoids), runs torch's AdamW update for that parameter alone
    and frees its gradient. Only one parameter's gradient lives at a time. The update is torch's
    own (single-tensor AdamW on exactly the parameters that have a gradient), so without clipping
    the parameters equal ``torch.optim.AdamW``'s step for step; the state dict has AdamW's format.
    ``step()`` and ``zero_grad()`` are no-ops afterwards (no gradients remain), so a training loop
    written for AdamW runs unchanged. A parameter used twice in one graph is stepped once per
    accumulation: not the case for LoRA.
    """

    def __init__(self, params, *, max_grad_norm: float = 0.0, **kw):
        kw.setdefault("foreach", False)
        super().__init__(params, **kw)
        self.max_grad_norm = max_grad_norm
        self._handles = [p.register_post_accumulate_grad_hook(self._step_one)
                         for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _step_one(self, p: torch.Tensor) -> None:
        if p.grad is None:
            return
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p], self.max_grad_norm)
        # AdamW's own step on ``p`` alone: its group is narrowed to it for the call (the other
        # parameters have no gradient now anyway; this only saves looking at them).
        saved = []
        for group in self.param_groups:
            saved.append(group["params"])
            group["params"] = [q for q in group["params"] if q is p]
        try:
            super().step()
        finally:
            for group, params in zip(self.param_groups, saved):
                group["params"] = params
        p.grad = None

    def remove_hooks(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def make_optimizer(params, name: str, lr: float, max_grad_norm: float = 0.0) -> torch.optim.Optimizer:
    """The optimizer called ``name`` (one of :data:`settings.ALL_OPTIMIZERS`) over ``params``."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "adamw-foreach":
        return torch.optim.AdamW(params, lr=lr, foreach=True)
    if name == "adamw-in-backward":
        return InBackwardAdamW(params, lr=lr, max_grad_norm=max_grad_norm)
    raise HollownetError(f"--optimizer {name!r} is not one of {', '.join(ALL_OPTIMIZERS)}")
