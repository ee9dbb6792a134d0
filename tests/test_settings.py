"""hollownet.settings: how one run's stage-1 and stage-2 settings follow from its flags (settings.Modes)."""

import pytest

from hollownet import devices
from hollownet.errors import HollownetError
from hollownet.settings import LOW_MEMORY_STAGE1_BUDGET, PRECISIONS, Modes


def cpu_has_native_bf16() -> bool:
    """From the kernel's own CPU flags, not torch's: AVX512-BF16 or AMX (bf16 tiles)."""
    from pathlib import Path

    info = Path("/proc/cpuinfo")
    if not info.is_file():
        pytest.skip("no /proc/cpuinfo to check torch's answer against")
    flags = set(next((line for line in info.read_text().splitlines() if line.startswith("flags")), "").split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def test_compute_dtype_follows_the_precision_and_the_device():
    quantized = "bf16" if cpu_has_native_bf16() else "fp32"  # emulated bf16 was 8x slower than fp32 on an AVX2 CPU
    assert devices.default_compute_dtype("cpu") == quantized
    assert [Modes(precision=p).on("cpu").compute for p in PRECISIONS] == ["fp32", "bf16", "fp16", quantized, quantized]
    assert Modes(precision="int8").on("cpu").compute_dtype == quantized  # filled in: records and checkpoints carry it
    assert Modes(precision="fp32").on("cpu").compute_dtype is None
    assert Modes(precision="nf4", compute_dtype="fp32").on("cpu").compute == "fp32"  # asked for wins
    assert Modes(precision="nf4", compute_dtype="bf16").on("cpu").compute == "bf16"
    with pytest.raises(HollownetError, match="int8|nf4 only"):
        Modes(precision="bf16", compute_dtype="fp32")


def test_stage1_layout_follows_the_stage2_mode_unless_told():
    assert Modes().stage1 == (False, None)
    assert Modes(precision="bf16", stream_weights=True).stage1 == (True, LOW_MEMORY_STAGE1_BUDGET)
    assert Modes(precision="int8").stage1 == (True, LOW_MEMORY_STAGE1_BUDGET)
    # what the user says wins
    assert Modes(precision="nf4", layer_major=False).stage1 == (False, None)
    assert Modes(precision="nf4", memory_budget="400MiB").stage1 == (True, "400MiB")
    assert Modes(layer_major=True).stage1 == (True, None)
    assert Modes(memory_budget="1GiB").stage1 == (True, "1GiB")  # a budget means layer-major
    with pytest.raises(HollownetError, match="drop --no-layer-major or the budget"):
        Modes(precision="nf4", layer_major=False, memory_budget="1GiB")


def test_derived_values_and_method_rules():
    streamed = Modes(stream_weights=True)
    assert streamed.checkpointing and not streamed.grad_checkpointing  # needed by streaming, not rewritten
    assert streamed.stage2()["grad_checkpointing"] is True  # records say how it ran
    assert streamed.low_memory and Modes(precision="nf4").low_memory and not Modes(optimizer="adamw-in-backward").low_memory
    assert Modes(optimizer="adamw-in-backward").in_backward and not Modes(optimizer="adamw-foreach").in_backward
    for method, modes, hint in (("full", Modes(precision="bf16"), "needs --precision fp32"),
                                ("full", Modes(optimizer="adamw-in-backward"), "another optimizer"),
                                ("lora", streamed, "needs --method hollow"), ("half", Modes(), "not one of")):
        with pytest.raises(HollownetError, match=hint):
            modes.check_method(method)
    Modes(precision="nf4").check_method("hollow")


def test_split_takes_the_modes_out_of_a_flat_dict():
    modes, rest = Modes.split({"precision": "bf16", "rank": 4, "stream_weights": True})
    assert modes == Modes(precision="bf16", stream_weights=True) and rest == {"rank": 4}
    # an unset flag (None) is the field's default, whatever the default is
    modes, rest = Modes.split({"precision": None, "optimizer": None, "layer_major": None, "rank": None})
    assert modes == Modes() and rest == {"rank": None}
