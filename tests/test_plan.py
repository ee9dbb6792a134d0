import pytest

from hollownet.errors import HollownetError
from hollownet.cut import (PAPER_FRACTION, all_plans, depth_fractions, ladder, load_unet_config, make_plan, meta_unet,
                            plan_for_blocks, plan_for_fraction, unit_modules)

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


def test_default_cut_is_nearest_the_papers_fraction_on_every_config():
    """The default means the same on every U-Net: the valid cut nearest 39% of its parameters."""
    for name in ("sd15", "sd21", "sdxl"):
        unet = meta_unet(load_unet_config(name))
        plans = all_plans(unet)
        default = make_plan(unet)
        assert [p.fraction for p in plans] == pytest.approx(depth_fractions(unet))
        nearest = min(abs(p.fraction - PAPER_FRACTION) for p in plans)
        assert abs(default.fraction - PAPER_FRACTION) == nearest, name
        assert default.is_default and "default" in default.why and f"{default.fraction:.1%}" in default.why
        assert sum(p.is_default for p in plans) == 1
        assert "as asked" in plans[0].why


def test_sdxl_default_cut_hollows_a_paper_like_fraction():
    """SDXL's 3-level U-Net: the old rule (up_blocks.0 and its skip partners) hollowed 92.7%, removing
    86% of the attention layers LoRA targets; the fraction rule picks depth 1 (46.5%, the cut nearest 39%)."""
    sdxl = meta_unet(load_unet_config("sdxl"))
    assert sdxl.config.addition_embed_type == "text_time" and sdxl.config.transformer_layers_per_block == [1, 2, 10]
    plan = make_plan(sdxl, rank=4)
    assert plan.depth == 1 and 0.3 < plan.fraction < 0.5
    assert plan.hollow_blocks == ["down_blocks.2.resnets.1", "down_blocks.2.attentions.1", "mid_block",
                                  "up_blocks.0.resnets.0", "up_blocks.0.attentions.0"]
    # 70 transformer blocks x 8 projections; the hollow holds 30 of them (10 + mid's 10 + 10)
    assert (plan.lora_targets_total, plan.lora_targets_kept) == (560, 320) == (560, len(plan.lora_targets))
    assert plan.lora_targets_removed_share == pytest.approx(3 / 7)
    old = make_plan(sdxl, len(sdxl.up_blocks[0].resnets))
    assert old.fraction > 0.9 and old.lora_targets_removed_share > 0.85


def test_lora_targets_removed_share_counts_the_hollows_target_layers(sd21):
    plan = make_plan(sd21, rank=4)
    assert plan.lora_targets_total == 128 and len(plan.lora_targets) == 120  # the mid block's one transformer block
    assert plan.lora_targets_removed_share == pytest.approx(8 / 128)
    assert make_plan(sd21, 0).lora_targets_kept == 120
    assert plan.to_dict()["lora_targets_removed_share"] == 0.0625 and "why" in plan.to_dict()


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


def test_plan_says_why_the_cut_and_what_share_of_lora_targets_it_removes():
    """`hollownet plan` (text and --json) names the default's reason and the LoRA-target share removed;
    stages=(): only the cut and parameter accounting (the memory predictions have their own tests)."""
    from hollownet.memory.planner import plan_memory
    from hollownet.requests import PlanRequest

    for model in ("sd21", "sdxl"):
        result = plan_memory(PlanRequest(model=model, rank=4), stages=())
        js, text = result.to_json(), result.format()
        plan = make_plan(meta_unet(load_unet_config(model)))
        assert js["hollow_blocks"] == plan.hollow_blocks and js["cut_why"] == plan.why
        assert js["lora_targets_removed_share"] == round(plan.lora_targets_removed_share, 4) > 0
        assert f"cut: {plan.why}" in text
        assert f"the cut removes {plan.lora_targets_removed_share:.1%} of the layers LoRA targets" in text
