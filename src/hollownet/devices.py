"""Which device and dtypes a run uses, checked before anything loads.

``resolve_device(None)`` picks CUDA, then Apple's MPS, then the CPU. A named device that this
torch lacks (``cuda`` on a CPU-only build, ``mps`` off macOS, ``cuda:3`` on a one-GPU machine) is
refused in one line naming the devices that do exist, instead of torch's assertion deep inside
model loading.

Dtypes per device (what works, not what is fastest everywhere):

* ``cuda``: fp32, fp16, bf16 (bf16 natively on Ampere and newer; older GPUs emulate it slowly).
* ``mps``: fp32 and fp16; bf16 needs macOS 14+ and a recent torch. fp64 is unsupported.
* ``xpu``: fp32, fp16, bf16.
* ``cpu``: fp32 (fastest on most CPUs), bf16 (fast with AVX512-BF16/AMX, otherwise emulated),
  fp16 (works, but slow: most CPUs have no fp16 arithmetic).

Only the CPU path is exercised by this project's tests; CUDA, MPS and XPU are detected through
torch's own availability checks.

:func:`default_compute_dtype` is the one place that picks the compute dtype of int8/nf4 runs left
without ``--compute-dtype``: bf16 where the device computes it natively, fp32 where bf16 would be
emulated (on this project's AVX2 CPU bf16 steps were 8x slower than fp32 ones).
"""

from __future__ import annotations

import functools
import warnings

from hollownet.errors import HollownetError

KINDS = ("cuda", "mps", "xpu", "cpu")


def _backend_available(kind: str) -> int:
    """How many devices of ``kind`` this torch can use (0: none)."""
    import torch

    if kind == "cpu":
        return 1
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "mps":
        mps = getattr(torch.backends, "mps", None)
        return 1 if mps is not None and mps.is_available() else 0
    if kind == "xpu":
        xpu = getattr(torch, "xpu", None)
        return xpu.device_count() if xpu is not None and xpu.is_available() else 0
    return 0


def available_devices() -> list[str]:
    out = []
    for kind in KINDS:
        n = _backend_available(kind)
        if n:
            out += [kind] if n == 1 or kind == "cpu" else [kind] + [f"{kind}:{i}" for i in range(n)]
    return out


def default_device() -> str:
    for kind in ("cuda", "mps"):
        if _backend_available(kind):
            return kind
    return "cpu"


def resolve_device(name: str | None) -> str:
    """``name`` checked against this machine (or the default: cuda, then mps, then cpu)."""
    if name is None or str(name).strip() == "":
        return default_device()
    name = str(name).strip().lower()
    kind, _, index = name.partition(":")
    have = ", ".join(available_devices())
    if kind not in KINDS or (index and not index.isdigit()) or (kind in ("cpu", "mps") and index not in ("", "0")):
        raise HollownetError(f"--device {name!r} is not a device name; this machine has: {have}")
    n = _backend_available(kind)
    if n == 0:
        raise HollownetError(f"--device {name}: this torch has no {kind.upper()} device; available: {have} "
                             "(or omit --device for the best one)")
    if index and int(index) >= n:
        raise HollownetError(f"--device {name}: there {'is' if n == 1 else 'are'} only {n} {kind.upper()} "
                             f"device{'s' if n != 1 else ''} ({kind}:0-{kind}:{n - 1}); available: {have}")
    return name


def check_dtype(device: str, precision: str) -> None:
    """Warn about a precision that works badly on ``device``; refuse one that cannot work."""
    kind = device.partition(":")[0]
    if kind == "cpu" and precision == "fp16":
        warnings.warn("--precision fp16 on the CPU is slow (few CPUs compute in fp16); bf16 or fp32 is faster")
    if kind == "mps" and precision == "bf16":
        import torch

        try:
            torch.zeros(1, dtype=torch.bfloat16, device="mps") + 1
        except Exception:  # noqa: BLE001  older macOS / torch
            raise HollownetError("--precision bf16 is not supported by this Mac's MPS (needs macOS 14+); "
                                 "use --precision fp16 or fp32") from None


def native_bf16(device: str) -> bool:
    """Whether ``device`` computes bf16 in hardware: CUDA with bf16 support (Ampere and newer), a CPU
    with AMX or AVX512-BF16, MPS where a bf16 op runs (macOS 14+), any XPU."""
    import torch

    kind = device.partition(":")[0]
    if kind == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False))
    if kind == "cpu":
        cpu = torch.cpu
        return any(getattr(cpu, name, lambda: False)() for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
    if kind == "mps":
        try:
            torch.zeros(1, dtype=torch.bfloat16, device="mps") + 1
        except Exception:  # noqa: BLE001  no MPS, or older macOS / torch
            return False
        return True
    return kind == "xpu"


@functools.lru_cache(maxsize=None)  # torch's capability queries are per process, and Modes.compute asks often
def default_compute_dtype(device: str | None = None) -> str:
    """The compute dtype of int8/nf4 weights on ``device`` (None: the default device here) when none is
    asked for: ``bf16`` where it is native (:func:`native_bf16`), else ``fp32``."""
    return "bf16" if native_bf16(device or default_device()) else "fp32"
