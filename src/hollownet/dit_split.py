"""The SD3 / SD3.5 transformer forward, split into a frozen prefix and a trained suffix.

A U-Net can hollow its centre because its long skips carry the kept encoder around the hollow; a plain
DiT (SD3's MMDiT) has none, so the part stage 1 pre-computes is a **prefix**: the embedders
(``pos_embed``, ``time_text_embed``, ``context_embedder``) and the first ``k`` joint blocks. Stage 1
stores what the later blocks read (:class:`Prefix`: both token streams and the conditioning ``temb``);
stage 2 runs blocks ``k..N-1`` and the output layers (``norm_out``, ``proj_out``) on it. The prefix
carries no LoRA, so the trained function is the full transformer with the LoRA: inference needs no
second path.

:func:`run_prefix` then :func:`run_suffix` follow diffusers' ``SD3Transformer2DModel.forward``
(0.42) step by step, so their composition is ``transformer(...).sample`` bit for bit (tested, fp32,
every ``k`` in ``0..N``). ``k = N`` is valid for the split but special: the last block is
``context_pre_only`` and returns no text stream, so the prefix stores none and the suffix is the
output layers alone (nothing left to train: the planner offers ``k`` up to ``N-1``). What the forward
can do that the split does not follow is refused in one line (:func:`check_supported`,
:func:`check_call`).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.utils.peft_utils import scale_lora_layers, unscale_lora_layers
from torch import nn

from hollownet.errors import HollownetError

SUPPORTED = ("SD3Transformer2DModel",)
#: The embedders every prefix holds, in the order diffusers' forward runs them.
EMBEDDERS = ("pos_embed", "time_text_embed", "context_embedder")
OUTPUT_LAYERS = ("norm_out", "proj_out")
#: Call-time options of diffusers' forward the split does not reproduce, and what to do instead.
REFUSED_CALL = {
    "block_controlnet_hidden_states": "ControlNet residuals are not supported by the split forward; train without the ControlNet",
    "skip_layers": "skip_layers (skip-layer guidance) is not supported by the split forward; it is an inference option, "
                   "run the full transformer for it",
}


@dataclass
class Prefix:
    """What stage 1 stores for a batch: everything blocks ``k..`` and the output layers read."""

    k: int
    hidden_states: torch.Tensor  # image tokens after block k-1: (batch, patches, inner_dim)
    encoder_hidden_states: torch.Tensor | None  # text tokens; None when k = N (the last block drops them)
    temb: torch.Tensor  # time + pooled-text conditioning: (batch, inner_dim)
    latent_hw: tuple[int, int]  # the latent's height and width, to unpatchify the output

    def tensors(self) -> dict[str, torch.Tensor]:
        out = dict(hidden_states=self.hidden_states, temb=self.temb)
        if self.encoder_hidden_states is not None:
            out["encoder_hidden_states"] = self.encoder_hidden_states
        return out


def num_blocks(transformer: nn.Module) -> int:
    return len(transformer.transformer_blocks)


def check_supported(transformer: nn.Module) -> None:
    """Refuse, in one line, a model the split does not follow exactly (before anything runs)."""
    kind = type(transformer).__name__
    if kind not in SUPPORTED:
        raise HollownetError(f"the prefix split supports {', '.join(SUPPORTED)}, not {kind}; give an SD3 / SD3.5 transformer")
    extra = sorted(set(dict(transformer.named_children())) - {*EMBEDDERS, "transformer_blocks", *OUTPUT_LAYERS})
    if extra:  # e.g. ``image_proj`` of a loaded IP-Adapter, which feeds every block
        raise HollownetError(f"this transformer has modules the split forward does not run ({', '.join(extra)}); "
                             "unload the IP-Adapter or other add-on first")


def check_k(transformer: nn.Module, k: int) -> None:
    n = num_blocks(transformer)
    if not 0 <= k <= n:
        raise HollownetError(f"prefix k={k} is outside 0..{n} for this transformer ({n} blocks); pick k in that range")


def check_call(joint_attention_kwargs: dict | None, **options) -> None:
    """Refuse the forward's call-time options the split does not reproduce."""
    for name, given in options.items():
        if name not in REFUSED_CALL:
            raise TypeError(f"unexpected keyword argument {name!r}")
        if given is not None:
            raise HollownetError(REFUSED_CALL[name])
    if joint_attention_kwargs and "ip_adapter_image_embeds" in joint_attention_kwargs:
        raise HollownetError("IP-Adapter image embeddings are not supported by the split forward; drop "
                             "joint_attention_kwargs['ip_adapter_image_embeds']")


@contextmanager
def lora_scale(transformer: nn.Module, joint_attention_kwargs: dict | None):
    """As diffusers' ``apply_lora_scale``: ``joint_attention_kwargs["scale"]`` scales the LoRA layers while
    the forward runs and is not passed on to the blocks. Yields the kwargs the blocks get."""
    kwargs = dict(joint_attention_kwargs) if joint_attention_kwargs is not None else None
    scale = kwargs.pop("scale", 1.0) if kwargs is not None else 1.0
    scale_lora_layers(transformer, scale)
    try:
        yield kwargs
    finally:
        unscale_lora_layers(transformer, scale)


def _run_blocks(transformer: nn.Module, blocks: range, hidden, text, temb, kwargs):
    """Blocks ``blocks`` as the forward runs them (gradient checkpointing included)."""
    for i in blocks:
        block = transformer.transformer_blocks[i]
        if torch.is_grad_enabled() and transformer.gradient_checkpointing:
            text, hidden = transformer._gradient_checkpointing_func(block, hidden, text, temb, kwargs)
        else:
            text, hidden = block(hidden_states=hidden, encoder_hidden_states=text, temb=temb, joint_attention_kwargs=kwargs)
    return hidden, text


def run_prefix(transformer: nn.Module, k: int, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
               pooled_projections: torch.Tensor, timestep: torch.Tensor, joint_attention_kwargs: dict | None = None,
               **options) -> Prefix:
    """Stage 1: the embedders and blocks ``0..k-1`` (arguments as diffusers' forward names them)."""
    check_supported(transformer)
    check_k(transformer, k)
    check_call(joint_attention_kwargs, **options)
    latent_hw = tuple(hidden_states.shape[-2:])
    with lora_scale(transformer, joint_attention_kwargs) as kwargs:
        hidden = transformer.pos_embed(hidden_states).contiguous()  # as the forward: PatchEmbed's output is a view
        temb = transformer.time_text_embed(timestep, pooled_projections)
        text = transformer.context_embedder(encoder_hidden_states)
        hidden, text = _run_blocks(transformer, range(k), hidden, text, temb, kwargs)
    return Prefix(k, hidden, text, temb, latent_hw)


def run_suffix(transformer: nn.Module, prefix: Prefix, joint_attention_kwargs: dict | None = None, **options) -> torch.Tensor:
    """Stage 2: blocks ``k..N-1`` and the output layers on a stored prefix; the transformer's ``.sample``.
    Only those modules are read, so the prefix's may be left on the meta device."""
    check_supported(transformer)
    check_k(transformer, prefix.k)
    check_call(joint_attention_kwargs, **options)
    with lora_scale(transformer, joint_attention_kwargs) as kwargs:
        hidden, _ = _run_blocks(transformer, range(prefix.k, num_blocks(transformer)), prefix.hidden_states,
                                prefix.encoder_hidden_states, prefix.temb, kwargs)
        hidden = transformer.proj_out(transformer.norm_out(hidden, prefix.temb))
    return unpatchify(transformer, hidden, prefix.latent_hw)


def unpatchify(transformer: nn.Module, hidden: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """Tokens back to a latent, as the forward's last step does."""
    p, c = transformer.config.patch_size, transformer.out_channels
    h, w = latent_hw[0] // p, latent_hw[1] // p
    hidden = hidden.reshape(hidden.shape[0], h, w, p, p, c)
    hidden = torch.einsum("nhwpqc->nchpwq", hidden)
    return hidden.reshape(hidden.shape[0], c, h * p, w * p)


def full_forward(transformer: nn.Module, k: int, hidden_states, encoder_hidden_states, pooled_projections, timestep,
                 joint_attention_kwargs: dict | None = None, **options) -> torch.Tensor:
    """The prefix then the suffix: ``transformer(...).sample`` (tested bit for bit)."""
    prefix = run_prefix(transformer, k, hidden_states, encoder_hidden_states, pooled_projections, timestep,
                        joint_attention_kwargs, **options)
    return run_suffix(transformer, prefix, joint_attention_kwargs, **options)


def prefix_modules(transformer: nn.Module, k: int) -> list[str]:
    """Module names stage 1 runs and stage 2 never loads."""
    check_k(transformer, k)
    return [*EMBEDDERS, *(f"transformer_blocks.{i}" for i in range(k))]


def suffix_modules(transformer: nn.Module, k: int) -> list[str]:
    """Module names stage 2 loads (and stage 1 need not)."""
    check_k(transformer, k)
    return [*(f"transformer_blocks.{i}" for i in range(k, num_blocks(transformer))), *OUTPUT_LAYERS]
