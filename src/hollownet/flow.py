"""The rectified-flow objective SD3 / SD3.5 train with, as diffusers' ``train_dreambooth_lora_sd3.py`` has it.

Its defaults, written out as pure functions over a ``FlowMatchEulerDiscreteScheduler``'s training schedule:

* a training timestep is drawn by ``u ~ sigmoid(N(logit_mean, logit_std))`` (``weighting_scheme="logit_normal"``,
  diffusers' ``compute_density_for_timestep_sampling``), index ``int(u * num_train_timesteps)`` into the
  scheduler's (shifted) ``timesteps`` / ``sigmas``;
* the noisy latent is ``(1 - sigma) * x0 + sigma * noise``; the transformer predicts the velocity ``noise - x0``;
* ``precondition_outputs=1``: the prediction is turned into an ``x0`` estimate, ``pred * (-sigma) + noisy``,
  and compared with ``x0`` (so the loss is ``sigma^2 |v - (noise - x0)|^2``), weighted per sample by
  ``compute_loss_weighting_for_sd3`` (1 for ``logit_normal``), the squared error meaned per sample.

Stage 1 draws the timestep and noise of every sample once and stores ``noisy``, ``sigma`` and ``x0`` (the
target); stage 2 applies :func:`flow_loss` to the trained suffix's prediction: the same numbers as the script.
"""

from __future__ import annotations

import math

import torch

#: diffusers' SD3 script defaults (``--weighting_scheme logit_normal --logit_mean 0 --logit_std 1
#: --precondition_outputs 1``).
WEIGHTING_SCHEME = "logit_normal"
LOGIT_MEAN, LOGIT_STD = 0.0, 1.0


def draw_index(generator: torch.Generator, num_train_timesteps: int, *, scheme: str = WEIGHTING_SCHEME,
               logit_mean: float = LOGIT_MEAN, logit_std: float = LOGIT_STD) -> int:
    """One training timestep's index into the schedule, drawn as ``compute_density_for_timestep_sampling``."""
    if scheme == "logit_normal":
        u = torch.sigmoid(torch.normal(logit_mean, logit_std, size=(1,), generator=generator))
    elif scheme == "none":
        u = torch.rand((1,), generator=generator)
    else:
        raise ValueError(f"weighting scheme {scheme!r} is not one of logit_normal, none")
    return min(int(u.item() * num_train_timesteps), num_train_timesteps - 1)


def schedule_point(scheduler, index: int) -> tuple[float, float]:
    """``(timestep, sigma)`` at ``index`` of a flow-matching scheduler's training schedule (``get_sigmas``'s lookup)."""
    return float(scheduler.timesteps[index]), float(scheduler.sigmas[index])


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """``(1 - sigma) * x0 + sigma * noise``, ``sigma`` one per sample."""
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1.0 - s) * x0 + s * noise


def loss_weighting(sigma: torch.Tensor, scheme: str = WEIGHTING_SCHEME) -> torch.Tensor:
    """``compute_loss_weighting_for_sd3``: per sample."""
    if scheme == "sigma_sqrt":
        return (sigma**-2.0).float()
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2))
    return torch.ones_like(sigma)


def flow_loss(pred: torch.Tensor, noisy: torch.Tensor, sigma: torch.Tensor, x0: torch.Tensor,
              weighting: torch.Tensor, sample_weight: torch.Tensor) -> torch.Tensor:
    """The preconditioned flow-matching loss of a batch: per sample ``mean(w * (pred * -sigma + noisy - x0)^2)``,
    times ``sample_weight`` (prior preservation's), meaned over the batch."""
    shape = (-1, *([1] * (pred.ndim - 1)))
    s = sigma.reshape(shape).to(pred.dtype)
    x0_pred = pred * (-s) + noisy.to(pred.dtype)
    per = (weighting.reshape(shape).float() * (x0_pred.float() - x0.float()) ** 2).reshape(pred.shape[0], -1).mean(1)
    return (per * sample_weight.float()).mean()
