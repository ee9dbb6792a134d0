"""Quantized frozen weights (QLoRA-style) and low-memory optimizers for stage 2.

``Modes(precision="int8" | "nf4")`` stores every frozen Linear/Conv2d *weight* of the trained
network quantized; biases and norms stay in the compute dtype (by default bf16 where the device
has it natively, else fp32: ``devices.default_compute_dtype``) and LoRA stays fp32. Weights are
dequantized on the fly, one layer at a time, inside a custom autograd function that saves only the quantized tensors for backward (the
input gradient re-dequantizes), so the dequantized weight is a temporary of one layer, never part
of the autograd graph.

* ``int8``: per-output-channel symmetric, ``q = round(w / s)`` in [-127, 127], ``s = max|w_row| / 127``
  (fp32 scale per output channel): 1 byte a weight.
* ``nf4``: QLoRA's 4-bit NormalFloat: the flattened weight in blocks of 64, each block divided by its
  absmax (fp32), every value rounded to the nearest of the 16 standard NF4 levels, two 4-bit codes
  packed per uint8: 0.5 + 4/64 = 0.5625 bytes a weight. (Checked once against bitsandbytes 0.50.2's
  ``quantize_4bit(blocksize=64, quant_type="nf4")``: identical dequantized weights.)

Why a small implementation of our own and not a library (checked with torch 2.13.0+cpu):
``torchao`` 0.18.0 and ``bitsandbytes`` 0.50.2 both install from PyPI without replacing torch, and
both quantize ``nn.Linear`` on the CPU under peft's LoRA layers. Neither quantizes ``nn.Conv2d``:
torchao's ``Int8Tensor`` has no ``aten.convolution`` (NotImplementedError) and bitsandbytes has no
quantized conv module -- and half of the kept SD 2.x weights (274M of 529M parameters at the paper's
cut) are convolutions, so with either library the int8/nf4 targets are out of reach. Both also use
tensor subclasses (``Int8Tensor``, ``Params4bit``) whose storage the fake-tensor memory planner and
``MemoryTracker`` see differently from plain tensors, torchao's NF4 is a prototype, and either would
be a new dependency. Here the quantized weights are plain int8 / uint8 / fp32 buffers: the same on CPU
and CUDA, counted to the byte under ``FakeTensorMode``, saved and moved like any buffer.

peft compatibility: :class:`QuantLinear` / :class:`QuantConv2d` subclass ``nn.Linear`` / ``nn.Conv2d``
(peft dispatches on ``isinstance``) with ``in_features``/``out_features`` (``in_channels``...) set,
a ``qweight`` buffer (peft's device lookup reads ``qweight`` first) and ``compute_dtype`` (peft's
dtype lookup, as for bitsandbytes' 4-bit layers).

int8 Linear through torch's own kernel: on a CPU in bf16, :class:`QuantLinear` multiplies by the int8
weight with ``torch._weight_int8pack_mm`` (forward, and backward on the transposed int8 weight) instead of
dequantizing it. Measured with torch 2.13 on a 2-core AVX2 CPU, one thread: in bf16 the kernel was 4-20x
faster than dequantize + bf16 matmul; in fp32 and fp16 it was 20-50x *slower* than dequantize + fp32
matmul (no vectorized path there), and CUDA's kernel is a one-thread-per-output loop that also copies
its input to fp32 (unlike cuBLAS). So: the kernel on CPU/bf16, dequantize-per-call everywhere else
(:func:`int8_kernel`). Convolutions always dequantize (torch has no int8 weight-only convolution). ``weight`` is a read-only property returning the
dequantized weight (a full-size temporary: only for inspection and peft's shape checks at build
time). peft's ``lora.Linear`` wraps one as its ``base_layer`` and calls ``base_layer(x)``; tested.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from hollownet.errors import HollownetError
from hollownet.loading import is_under
from hollownet.settings import QUANTIZED_PRECISIONS

SCHEMES = QUANTIZED_PRECISIONS
NF4_BLOCK = 64
# The 16 NormalFloat-4 levels (Dettmers et al. 2023, QLoRA, appendix E; as in bitsandbytes).
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)
_CHUNK = 1 << 20  # elements quantized at a time (bounds the temporaries of quantizing a large layer)


# ------------------------------------------------------------------------------- int8 per channel


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel (dim 0) symmetric int8: ``(q int8, scale fp32 [out])``, ``w ~ q * scale``."""
    w = w.detach().float()
    rows = w.reshape(w.shape[0], -1)
    scale = rows.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.empty(rows.shape, dtype=torch.int8, device=w.device)
    for i in range(0, rows.shape[0], max(1, _CHUNK // max(1, rows.shape[1]))):
        j = i + max(1, _CHUNK // max(1, rows.shape[1]))
        q[i:j] = (rows[i:j] / scale[i:j, None]).round_().clamp_(-127, 127).to(torch.int8)
    return q.view(w.shape), scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` in ``dtype``, one allocation of the weight's size.

    Cast, then scale in place: twice as fast on a CPU as one type-promoting ``torch.mul``."""
    return q.to(dtype).mul_(scale.to(dtype).view(-1, *([1] * (q.dim() - 1))))


# --------------------------------------------------------------------------- nf4 block-wise absmax


def _nf4_levels(device, dtype=torch.float32) -> torch.Tensor:
    return torch.tensor(NF4_LEVELS, dtype=dtype, device=device)


def quantize_nf4(w: torch.Tensor, block: int = NF4_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 with block-wise absmax: ``(packed uint8 [ceil(n/block)*block/2], absmax fp32 [ceil(n/block)])``.

    The flattened weight is zero-padded to whole blocks; ``dequantize_nf4`` drops the padding.
    """
    if block % 2:
        raise ValueError("the NF4 block size must be even (two codes per byte)")
    flat = w.detach().reshape(-1).float()
    n = flat.numel()
    nblocks = -(-n // block)
    padded = torch.zeros(nblocks * block, dtype=torch.float32, device=w.device)
    padded[:n] = flat
    blocks = padded.view(nblocks, block)
    absmax = blocks.abs().amax(dim=1)
    levels = _nf4_levels(w.device)
    mids = (levels[1:] + levels[:-1]) / 2  # nearest level = bucket between midpoints
    packed = torch.empty(nblocks * block // 2, dtype=torch.uint8, device=w.device)
    step = max(1, _CHUNK // block)
    for i in range(0, nblocks, step):
        b = blocks[i : i + step]
        normed = b / absmax[i : i + step, None].clamp_min(1e-12)
        codes = torch.bucketize(normed, mids, out_int32=True).view(-1, 2)
        packed[i * block // 2 : (i + b.shape[0]) * block // 2] = (codes[:, 0] * 16 + codes[:, 1]).to(torch.uint8)
    return packed, absmax


def _nf4_byte_table(device, dtype) -> torch.Tensor:
    """[256, 2]: a packed byte -> its two levels (high nibble first)."""
    levels = _nf4_levels(device)
    byte = torch.arange(256, device=device)
    return torch.stack([levels[byte // 16], levels[byte % 16]], dim=1).to(dtype)


def dequantize_nf4(packed: torch.Tensor, absmax: torch.Tensor, shape: torch.Size, dtype: torch.dtype,
                   table: torch.Tensor | None = None) -> torch.Tensor:
    """The weight in ``dtype``: one table lookup and one in-place scaling (a view of the padded buffer)."""
    table = _nf4_byte_table(packed.device, dtype) if table is None else table
    nblocks = absmax.numel()
    w = table.index_select(0, packed.int()).view(nblocks, -1)
    w.mul_(absmax.to(dtype)[:, None])
    n = 1
    for d in shape:
        n *= d
    return w.view(-1)[:n].view(shape)


# ------------------------------------------------------------------------- torch's int8 kernel


_HAS_INT8_KERNEL = hasattr(torch, "_weight_int8pack_mm")
# The x86 kernel reads 16 (AVX512) or 8 (AVX2) bf16 of a row per *aligned* load: a reduced dimension that
# is not a multiple of 16 crashed it (segfault, torch 2.13), and so would a row not on a 32-byte boundary.
_KERNEL_K_MULTIPLE = 16
_KERNEL_ALIGN = 32  # elements (64 bytes of bf16): torch's CPU allocator aligns every tensor to 64 bytes


def int8_kernel(x: torch.Tensor, scheme: str, reduced: int) -> bool:
    """Whether an int8 Linear on ``x`` that reduces over ``reduced`` features runs through
    ``torch._weight_int8pack_mm`` (see the module docstring: only where it was measured faster). Fake
    tensors answer as the real ones, so the planner follows the same path."""
    return (scheme == "int8" and x.device.type == "cpu" and x.dtype == torch.bfloat16 and _HAS_INT8_KERNEL
            and reduced % _KERNEL_K_MULTIPLE == 0)


def _kernel_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the kernel's 2-D input: contiguous and starting on an aligned boundary (copied if not)."""
    x = x.reshape(-1, x.shape[-1])
    return x if x.is_contiguous() and x.storage_offset() % _KERNEL_ALIGN == 0 else x.clone(memory_format=torch.contiguous_format)


def int8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x @ (q * scale).T`` by torch's int8 weight-only kernel (2-D inputs only; any leading dims here)."""
    y = torch._weight_int8pack_mm(_kernel_rows(x), q, scale.to(x.dtype))
    return y.view(*x.shape[:-1], q.shape[0])


def int8_linear_input_grad(grad_out: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``grad_out @ (q * scale)`` by the same kernel: ``(grad_out * scale) @ q`` with ``q`` transposed (an int8
    temporary, a quarter of an fp32 dequantized weight) and unit scales."""
    g = grad_out.reshape(-1, grad_out.shape[-1]) * scale.to(grad_out.dtype)  # new, so aligned; strided as grad_out
    g = g if g.is_contiguous() else g.contiguous()
    ones = torch.ones(q.shape[1], dtype=grad_out.dtype, device=grad_out.device)
    return torch._weight_int8pack_mm(g, q.t().contiguous(), ones).view(*grad_out.shape[:-1], q.shape[1])


# ------------------------------------------------------------------------------------- modules


class _QuantMixin:
    """Shared state of quantized layers: ``qweight``/``scale`` buffers and how to dequantize."""

    def _init_quant(self, weight: torch.Tensor, scheme: str, compute_dtype: torch.dtype) -> None:
        if scheme not in SCHEMES:
            raise HollownetError(f"unknown quantization {scheme!r}; one of {', '.join(SCHEMES)}")
        self.scheme = scheme
        self.compute_dtype = compute_dtype
        self.weight_shape = torch.Size(weight.shape)
        with torch.no_grad():
            q, s = quantize_int8(weight) if scheme == "int8" else quantize_nf4(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", s)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        dtype = dtype or self.compute_dtype
        if self.scheme == "int8":
            return dequantize_int8(self.qweight, self.scale, dtype)
        return dequantize_nf4(self.qweight, self.scale, self.weight_shape, dtype)

    @property
    def weight(self) -> torch.Tensor:  # read-only, a full-size temporary
        return self.dequantize()

    @property
    def quantized_bytes(self) -> int:
        return self.qweight.numel() * self.qweight.element_size() + self.scale.numel() * self.scale.element_size()


def _is_fake(t: torch.Tensor) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor

    return isinstance(t, FakeTensor)


def _frozen_bias(bias: torch.Tensor | None, dtype) -> nn.Parameter | None:
    return None if bias is None else nn.Parameter(bias.detach().to(dtype), requires_grad=False)


class QuantLinear(_QuantMixin, nn.Linear):
    """A frozen ``nn.Linear`` whose weight is stored int8 or nf4 (see module docstring)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scheme: str, compute_dtype: torch.dtype):
        nn.Module.__init__(self)
        self.out_features, self.in_features = weight.shape
        self._init_quant(weight, scheme, compute_dtype)
        self.bias = _frozen_bias(bias, compute_dtype)

    @classmethod
    def from_float(cls, mod: nn.Linear, scheme: str, compute_dtype: torch.dtype, weight: torch.Tensor | None = None):
        return cls(mod.weight if weight is None else weight, mod.bias, scheme, compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QLinearFn.apply(x, self, self.qweight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {self.scheme}"


class QuantConv2d(_QuantMixin, nn.Conv2d):
    """A frozen ``nn.Conv2d`` whose weight is stored int8 or nf4 (see module docstring)."""

    def __init__(self, conv: nn.Conv2d, scheme: str, compute_dtype: torch.dtype, weight: torch.Tensor | None = None):
        nn.Module.__init__(self)
        for k in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "transposed",
                  "output_padding", "groups", "padding_mode"):
            setattr(self, k, getattr(conv, k))
        self._reversed_padding_repeated_twice = getattr(conv, "_reversed_padding_repeated_twice", None)
        self._init_quant(conv.weight if weight is None else weight, scheme, compute_dtype)
        self.bias = _frozen_bias(conv.bias, compute_dtype)
        # The memory-lean backward needs numeric padding and zero padding mode; otherwise plain conv2d.
        self._fused = self.padding_mode == "zeros" and not isinstance(self.padding, str)

    @classmethod
    def from_float(cls, mod: nn.Conv2d, scheme: str, compute_dtype: torch.dtype, weight: torch.Tensor | None = None):
        return cls(mod, scheme, compute_dtype, weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused:
            return _QConv2dFn.apply(x, self, self.qweight, self.scale, self.bias)
        return self._conv_forward(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", {self.scheme}"


class _QLinearFn(torch.autograd.Function):
    """``F.linear`` with a dequantized-on-the-fly frozen weight; saves only the quantized weight."""

    @staticmethod
    def forward(ctx, x, mod, qweight, scale, bias):
        ctx.mod = mod
        ctx.save_for_backward(qweight, scale)
        bias = None if bias is None else bias.to(x.dtype)
        if int8_kernel(x, mod.scheme, mod.in_features):
            y = int8_linear(x, qweight, scale)
            return y if bias is None else y.add_(bias)
        return F.linear(x, mod.dequantize(x.dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        qweight, scale = ctx.saved_tensors  # also checks the quantized weight was not modified in place
        if int8_kernel(grad_out, ctx.mod.scheme, ctx.mod.out_features):
            return int8_linear_input_grad(grad_out, qweight, scale), None, None, None, None
        return grad_out.matmul(ctx.mod.dequantize(grad_out.dtype)), None, None, None, None


class _QConv2dFn(torch.autograd.Function):
    """``F.conv2d`` with a dequantized-on-the-fly frozen weight; saves only the quantized weight."""

    @staticmethod
    def forward(ctx, x, mod, qweight, scale, bias):
        ctx.mod = mod
        ctx.input_shape = x.shape
        ctx.save_for_backward(qweight, scale)
        bias = None if bias is None else bias.to(x.dtype)
        return F.conv2d(x, mod.dequantize(x.dtype), bias, mod.stride, mod.padding, mod.dilation, mod.groups)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        ctx.saved_tensors  # noqa: B018
        m = ctx.mod
        w = m.dequantize(grad_out.dtype)
        # As torch.nn.grad.conv2d_input: the input is only needed for its shape.
        fake_input = grad_out.new_empty(1).expand(ctx.input_shape)
        gx = torch.ops.aten.convolution_backward(grad_out, fake_input, w, None, _pair(m.stride), _pair(m.padding),
                                                 _pair(m.dilation), False, [0, 0], m.groups, (True, False, False))[0]
        return gx, None, None, None, None


def quantize_module(mod: nn.Module, scheme: str, compute_dtype: torch.dtype, weight: torch.Tensor | None = None) -> nn.Module:
    if isinstance(mod, (QuantLinear, QuantConv2d)):
        return mod
    if isinstance(mod, nn.Linear):
        return QuantLinear.from_float(mod, scheme, compute_dtype, weight)
    if isinstance(mod, nn.Conv2d):
        return QuantConv2d.from_float(mod, scheme, compute_dtype, weight)
    raise TypeError(f"cannot quantize a {type(mod).__name__}")


def quantizable(name: str, mod: nn.Module) -> bool:
    """Frozen layers whose weight is quantized: Linear/Conv2d that are not LoRA's own A/B layers."""
    return isinstance(mod, (nn.Linear, nn.Conv2d)) and not isinstance(mod, (QuantLinear, QuantConv2d)) \
        and "lora_" not in name


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def quantize_model(model: nn.Module, scheme: str, compute_dtype: torch.dtype, *, skip=(), weight_of=None) -> list[str]:
    """Replace every quantizable layer outside the ``skip`` prefixes, in place; returns their names.

    ``weight_of(name)``: the layer's weight (any float dtype), when the module's own is not loaded
    (e.g. on the meta device); read one at a time, so loading never holds more than one float weight.
    peft LoRA layers are fine either way: their ``base_layer`` is quantized, ``lora_A``/``lora_B`` not.
    """
    skip = list(skip)
    names = [n for n, m in model.named_modules() if quantizable(n, m) and not (skip and is_under(n, skip))]
    for name in names:
        mod = model.get_submodule(name)
        weight = weight_of(name) if weight_of is not None else None
        set_submodule(model, name, quantize_module(mod, scheme, compute_dtype, weight))
    return names


# ------------------------------------------------------------------------------------- helpers


def frozen_weight_bytes(model: nn.Module, device: str | torch.device = "cpu") -> int:
    """Bytes of the frozen parameters and buffers resident on ``device`` (meta tensors cost nothing)."""
    dev = torch.device(device).type
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.requires_grad or t.device.type != dev:
            continue
        key = id(t.untyped_storage()) if not _is_fake(t) else id(t)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in fp32."""
    out, ref = out.detach().float(), ref.detach().float()
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))
