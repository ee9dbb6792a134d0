"""hollownet.settings: how one run's stage-1 and stage-2 settings follow from its flags (settings.Modes)."""

import pytest

from hollownet.errors import HollownetError
from hollownet.settings import LOW_MEMORY_STAGE1_BUDGET, PRECISIONS, Modes


def test_compute_dtype_follows_the_precision():
    assert [Modes(precision=p).compute for p in PRECISIONS] == ["fp32", "bf16", "fp16", "bf16", "bf16"]
    assert Modes(precision="nf4", compute_dtype="fp32").compute == "fp32"
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
