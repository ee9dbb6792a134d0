import pytest

from hollownet.errors import HollownetError
from hollownet.cut import (all_plans, ladder, load_unet_config, make_plan, meta_unet, plan_for_blocks,
                            plan_for_fraction, unit_modules)

PAPER_CUT = ["down_blocks.2.downsamplers", "down_blocks.3", "mid_block", "up_blocks.0"]


@pytest.fixture(scope="module")
def sd21():
    return meta_unet(load_unet_config("sd21"))


def test_paper_cut_is_default_on_sd21_and_sd15(sd21):
    plan = make_plan(sd21, rank=128)
    assert plan.hollow_blocks == PAPER_CUT
    assert abs(plan.fraction - 0.39) < 0.01
    # the paper's table: 527M base params kept (we count 529M incl. time embedding), 24M LoRA at r=128
    assert abs(plan.kept_params / 1e6 - 527) < 5
    assert abs(plan.lora_params / 1e6 - 24) < 0.5
    assert make_plan(meta_unet(load_unet_config("sd15"))).hollow_blocks == PAPER_CUT


def test_every_cut_is_skip_symmetric(sd21):
    """Skips made inside the hollow are exactly the ones consumed inside it."""
    down, up = ladder(sd21)
    for plan in all_plans(sd21):
        made = len(plan.hollow_down)
        used = sum(1 for u in plan.hollow_up if u.index is not None)
        assert made == used == plan.depth
        assert plan.kept_down + plan.hollow_down == down and plan.hollow_up + plan.kept_up == up
    fractions = [p.fraction for p in all_plans(sd21)]
    assert fractions == sorted(fractions)


def test_cut_works_for_other_configs():
    sdxl = meta_unet(load_unet_config("sdxl"))
    plan = make_plan(sdxl)
    assert plan.hollow_blocks[-1] == "up_blocks.0" and "mid_block" in plan.hollow_blocks


def test_fraction_picks_nearest_cut(sd21):
    assert plan_for_fraction(sd21, 0.40).hollow_blocks == PAPER_CUT
    assert plan_for_fraction(sd21, 0.55).depth == 4
    with pytest.raises(HollownetError, match="outside what this U-Net allows"):
        plan_for_fraction(sd21, 1.5)


def test_blocks_by_name_block_or_sub_block(sd21):
    assert plan_for_blocks(sd21, PAPER_CUT).depth == 3
    expanded = ["down_blocks.2.downsamplers", "down_blocks.3.resnets.0", "down_blocks.3.resnets.1", "mid_block",
                "up_blocks.0"]
    assert plan_for_blocks(sd21, expanded).depth == 3
    with pytest.raises(HollownetError, match="not a skip-symmetric"):
        plan_for_blocks(sd21, ["down_blocks.3", "mid_block"])
    with pytest.raises(HollownetError, match="names no block"):
        plan_for_blocks(sd21, ["down_blocks.9"])


def test_lora_targets_avoid_the_hollow(sd21):
    plan = make_plan(sd21, rank=4)
    hollow = plan.hollow_prefixes(sd21)
    assert plan.lora_targets and not any(t.startswith(p + ".") for t in plan.lora_targets for p in hollow)
    assert all(t.endswith(("to_q", "to_k", "to_v", "to_out.0")) for t in plan.lora_targets)
    assert unit_modules(sd21, plan.hollow_down[0]) == ["down_blocks.2.downsamplers"]
