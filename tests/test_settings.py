"""hollownet.settings: how one run's stage-1 and stage-2 settings follow from its flags."""

import pytest

from hollownet.errors import HollownetError
from hollownet.settings import LOW_MEMORY_STAGE1_BUDGET, compute_precision, stage1_layout


def test_compute_precision():
    assert [compute_precision(p) for p in ("fp32", "bf16", "fp16", "int8", "nf4")] == ["fp32", "bf16", "fp16", "bf16", "bf16"]
    assert compute_precision("nf4", "fp32") == "fp32"


def test_stage1_layout_follows_the_stage2_mode_unless_told():
    auto = dict(layer_major=None, memory_budget=None)
    assert stage1_layout(**auto, precision="fp32", stream_weights=False) == (False, None)
    assert stage1_layout(**auto, precision="bf16", stream_weights=True) == (True, LOW_MEMORY_STAGE1_BUDGET)
    assert stage1_layout(**auto, precision="int8", stream_weights=False) == (True, LOW_MEMORY_STAGE1_BUDGET)
    # what the user says wins
    assert stage1_layout(False, None, precision="nf4", stream_weights=False) == (False, None)
    assert stage1_layout(None, "400MiB", precision="nf4", stream_weights=False) == (True, "400MiB")
    assert stage1_layout(True, None, precision="fp32", stream_weights=False) == (True, None)
    assert stage1_layout(None, "1GiB", precision="fp32", stream_weights=False) == (True, "1GiB")  # a budget means layer-major
    with pytest.raises(HollownetError, match="drop --no-layer-major or the budget"):
        stage1_layout(False, "1GiB", precision="nf4", stream_weights=False)
