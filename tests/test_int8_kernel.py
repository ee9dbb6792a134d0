"""int8 Linear through torch's own int8 weight-only kernel (``torch._weight_int8pack_mm``) where quant.py
uses it (a CPU computing in bf16), against the dequantize-per-call path it replaces: same function
within bf16 rounding, the kernel actually called, and never where it would crash or be slower."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from hollownet.lowmem import quant as Q
from hollownet.lowmem.quant import QuantLinear, relative_error

pytestmark = pytest.mark.usefixtures("one_thread")

# Both paths round to bf16 (2^-8 = 3.9e-3 relative per value); the kernel accumulates in fp32 from the fp32-exact
# int8 * scale, the dequantize path multiplies bf16-rounded weights. Measured: 3.3e-3 to 3.8e-3 apart.
BF16_TOLERANCE = 1e-2


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def run(layer, x, kernel: bool):
    """Output and input gradient of ``layer`` on ``x``, with torch's kernel allowed or not; the ops it ran."""
    before, Q._HAS_INT8_KERNEL = Q._HAS_INT8_KERNEL, kernel and Q._HAS_INT8_KERNEL
    try:
        x = x.detach().requires_grad_()
        with OpLog() as log:
            y = layer(x)
            y.float().square().sum().backward()
    finally:
        Q._HAS_INT8_KERNEL = before
    return y.detach(), x.grad, log.ops


@pytest.mark.skipif(not hasattr(torch, "_weight_int8pack_mm"), reason="this torch has no int8 weight-only kernel")
@pytest.mark.parametrize("k, n", [(64, 48), (48, 64), (320, 1280)])
def test_kernel_equals_the_dequantize_path_within_bf16_rounding(k, n):
    torch.manual_seed(0)
    lin = nn.Linear(k, n)
    layer = QuantLinear.from_float(lin, "int8", torch.bfloat16)
    x = torch.randn(2, 9, k).to(torch.bfloat16)
    y, gx, ops = run(layer, x, kernel=True)
    y0, gx0, ops0 = run(layer, x, kernel=False)
    assert "_weight_int8pack_mm" in ops and "_weight_int8pack_mm" not in ops0
    assert relative_error(y, y0) < BF16_TOLERANCE and relative_error(gx, gx0) < BF16_TOLERANCE
    # and no further from the exact fp32 function of the int8 weights than the path it replaces (+ rounding)
    w = layer.dequantize(torch.float32)
    xr = x.float().requires_grad_()
    ref = F.linear(xr, w, layer.bias.float())
    ref.square().sum().backward()
    assert relative_error(y, ref) < 1.5 * relative_error(y0, ref) + 1e-3
    assert relative_error(gx, xr.grad) < 1.5 * relative_error(gx0, xr.grad) + 1e-3


def test_kernel_only_where_it_is_safe_and_faster():
    """fp32 (20-50x slower through the kernel here), a reduced dimension not a multiple of 16 (the x86 kernel
    crashed), nf4: dequantize. An input that does not start on an aligned row is copied first (no crash)."""
    torch.manual_seed(0)
    for k, n, dtype, scheme in ((64, 48, torch.float32, "int8"), (40, 48, torch.bfloat16, "int8"),
                                (64, 48, torch.bfloat16, "nf4")):
        layer = QuantLinear.from_float(nn.Linear(k, n), scheme, dtype)
        x = torch.randn(3, k).to(dtype)
        assert not Q.int8_kernel(x, layer.scheme, k)  # the forward reduces over k
        _, _, ops = run(layer, x, kernel=True)
        # the backward reduces over n = 48 = 3 x 16: the kernel there, in bf16 int8 only
        assert ("_weight_int8pack_mm" in ops) == (dtype == torch.bfloat16 and scheme == "int8"), (k, dtype, scheme)
    layer = QuantLinear.from_float(nn.Linear(64, 48), "int8", torch.bfloat16)
    storage = torch.randn(3 * 64 + 5).to(torch.bfloat16)
    x = storage[5:].view(3, 64)  # starts 10 bytes into its storage
    y, gx, ops = run(layer, x, kernel=True)
    y0, gx0, _ = run(layer, x, kernel=False)
    assert "_weight_int8pack_mm" in ops and relative_error(y, y0) < BF16_TOLERANCE
