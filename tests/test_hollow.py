"""The split forward is the U-Net; the hollowed network fed the stored activation is too (LoRA at zero)."""

import itertools

import pytest
import torch
from hollownet import unet_split as H
from hollownet.loading import load_unet
from hollownet.cut import all_plans, make_plan
from hollownet.lowmem.stream import SafetensorsSource
from hollownet.stages.store import Store
from hollownet.stages.train import TrainConfig, build_model, predict


def test_split_forward_equals_unet_for_every_cut(tiny_model):
    unet, _ = load_unet(tiny_model)
    text = torch.randn(2, 7, 32)
    for shape in ((2, 4, 8, 8), (2, 4, 6, 10)):  # the second is not a multiple of 8: explicit upsample sizes
        x, t = torch.randn(shape), torch.tensor([3, 900])
        ref = unet(x, t, text).sample
        for plan in all_plans(unet):
            torch.testing.assert_close(H.full_forward(unet, plan, x, t, text), ref, rtol=0, atol=0)


def test_stage1_walk_equals_the_split_forward_for_every_cut():
    """hollow_output walks the U-Net step by step (what layer-major stage 1 runs too): it must be the
    split forward's encode -> hollow, exactly, also where the upsamplers need explicit sizes and with
    a text added embedding."""
    text = torch.randn(2, 7, 32)
    with torch.no_grad():
        for unet, shape in itertools.product((_tiny_unet(), _tiny_unet(addition_embed_type="text", addition_embed_type_num_heads=4)),
                                             ((2, 4, 8, 8), (2, 4, 6, 10))):
            x, t = torch.randn(shape), torch.tensor([3, 900])
            for plan in all_plans(unet):
                ctx = H.make_context(unet, x, t, text)
                h, skips = H.encode(unet, plan, x, ctx)
                torch.testing.assert_close(H.hollow_output(unet, plan, x, t, text), H.hollow(unet, plan, h, ctx, skips),
                                           rtol=0, atol=0)


def test_zero_lora_hollowed_forward_on_stored_activation_equals_full_unet(tiny_model, hollow_store):
    store = Store(hollow_store)
    batch = store.samples([0, 3, 11])
    embeds = store.tensors("prompts.safetensors")["embeds"]
    cfg = TrainConfig(model=str(tiny_model), store=str(hollow_store), output="unused", rank=4)
    hollowed, plan, params = build_model(tiny_model, store.manifest(), cfg)
    lora_b = [p for n, p in hollowed.named_parameters() if "lora_B" in n]
    assert lora_b and all(float(p.detach().abs().max()) == 0 for p in lora_b)  # LoRA starts at zero
    full, _ = load_unet(tiny_model)
    text = embeds[batch["prompt_index"]]
    with torch.no_grad():
        ours = predict(hollowed, plan, batch, embeds, torch.float32, "cpu")
        ref = full(batch["noisy"], batch["timestep"], text).sample
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def test_stage2_reads_none_of_the_hollow(tiny_model, hollow_store, monkeypatch):
    read = []
    real = SafetensorsSource.read

    def recording(self, name, *a, **k):  # every tensor stage 2 takes from the checkpoint file
        read.append(name)
        return real(self, name, *a, **k)

    monkeypatch.setattr(SafetensorsSource, "read", recording)
    cfg = TrainConfig(model=str(tiny_model), store=str(hollow_store), output="unused", rank=4)
    unet, plan, _ = build_model(tiny_model, Store(hollow_store).manifest(), cfg)
    hollow = plan.hollow_prefixes(unet)
    assert read, "nothing recorded: the test would pass vacuously"
    assert not [k for k in read if any(k.startswith(p + ".") for p in hollow)]
    meta = [n for n, p in unet.named_parameters() if p.is_meta]
    assert meta and all(any(n.startswith(p + ".") for p in hollow) for n in meta)
    # and every kept tensor was read
    kept = [k.replace(".base_layer", "") for k in unet.state_dict()
            if not any(k.startswith(p + ".") for p in hollow) and "lora" not in k]
    assert set(kept) <= set(read)


def test_stage1_does_not_load_the_outer_up_blocks(tiny_model):
    from hollownet.stages.precompute import kept_up_modules

    full, _ = load_unet(tiny_model)
    plan = make_plan(full)
    skip = kept_up_modules(full, plan)
    partial, read = load_unet(tiny_model, skip=skip)
    assert not any(k.startswith("up_blocks.3.") or k.startswith("conv_out") for k in read)
    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 7, 32)
    torch.testing.assert_close(H.hollow_output(partial, plan, x, t, text), H.hollow_output(full, plan, x, t, text))


def _tiny_unet(**extra):
    from diffusers import UNet2DConditionModel

    from hollownet.tiny import TINY_UNET

    torch.manual_seed(0)
    return UNet2DConditionModel(**{**TINY_UNET, **extra}).eval()


# A 3-level U-Net (SDXL's block layout, one resnet a block): 5 units, 6 cuts, so every variant's
# check over every cut stays fast.
SMALL = dict(block_out_channels=(16, 32, 32), layers_per_block=1,
             down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
             up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"))
B = 2
g = torch.Generator().manual_seed(1)
# name: (config beyond SMALL, text width, diffusers' keyword arguments)
VARIANTS = {
    "text": (dict(addition_embed_type="text", addition_embed_type_num_heads=4), 32, {}),
    "text_time (SDXL)": (dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                              projection_class_embeddings_input_dim=32 + 6 * 8), 32,
                         dict(added_cond_kwargs=dict(text_embeds=torch.randn(B, 32, generator=g),
                                                     time_ids=torch.tensor([[64., 64, 0, 0, 64, 64], [96, 80, 8, 4, 64, 64]])))),
    "image": (dict(addition_embed_type="image", encoder_hid_dim=24), 24,
              dict(added_cond_kwargs=dict(image_embeds=torch.randn(B, 24, generator=g)))),
    "text_image": (dict(addition_embed_type="text_image"), 32,
                   dict(added_cond_kwargs=dict(image_embeds=torch.randn(B, 32, generator=g), text_embeds=torch.randn(B, 32, generator=g)))),
    "image_hint": (dict(addition_embed_type="image_hint", encoder_hid_dim=24, in_channels=8), 24,
                   dict(added_cond_kwargs=dict(image_embeds=torch.randn(B, 24, generator=g), hint=torch.randn(B, 3, 64, 64, generator=g)))),
    "num_class_embeds": (dict(num_class_embeds=3), 32, dict(class_labels=torch.tensor([0, 2]))),
    "class timestep": (dict(class_embed_type="timestep"), 32, dict(class_labels=torch.tensor([10, 500]))),
    "class identity": (dict(class_embed_type="identity"), 32, dict(class_labels=torch.randn(B, 64, generator=g))),
    "class projection, concat": (dict(class_embed_type="projection", projection_class_embeddings_input_dim=10,
                                      class_embeddings_concat=True), 32, dict(class_labels=torch.randn(B, 10, generator=g))),
    "class simple_projection": (dict(class_embed_type="simple_projection", projection_class_embeddings_input_dim=10), 32,
                                dict(class_labels=torch.randn(B, 10, generator=g))),
    "timestep_cond (LCM)": (dict(time_cond_proj_dim=16), 32, dict(timestep_cond=torch.randn(B, 16, generator=g))),
    "encoder_hid_proj text_proj": (dict(encoder_hid_dim=24), 24, {}),
    "encoder_hid_proj text_image_proj": (dict(encoder_hid_dim_type="text_image_proj", encoder_hid_dim=24), 24,
                                         dict(added_cond_kwargs=dict(image_embeds=torch.randn(B, 32, generator=g)))),
    "encoder_hid_proj image_proj": (dict(encoder_hid_dim_type="image_proj", encoder_hid_dim=24), 24,
                                    dict(added_cond_kwargs=dict(image_embeds=torch.randn(B, 24, generator=g)))),
    "encoder_attention_mask": ({}, 32, dict(encoder_attention_mask=torch.tensor([[1] * 7, [1, 1, 1, 0, 0, 0, 0]]))),
    "center input, fourier time, time act, scale_shift": (
        dict(center_input_sample=True, time_embedding_type="fourier", time_embedding_act_fn="silu",
             resnet_time_scale_shift="scale_shift"), 32, {}),
    "mid block without cross-attention": (dict(mid_block_type="UNetMidBlock2D"), 32, {}),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_split_forward_and_stage1_walk_equal_unet_for_every_variant_and_cut(name):
    """Each conditioning stage of diffusers' forward: the split forward is ``unet(...)`` on every cut,
    exactly, and stage 1's walk (what sample- and layer-major stage 1 run) is encode -> hollow."""
    extra, width, cond = VARIANTS[name]
    unet = _tiny_unet(**{**SMALL, **extra})
    x, t = torch.randn(B, 4, 8, 8, generator=g), torch.tensor([3, 900])
    text = torch.randn(B, 7, width, generator=g)
    with torch.no_grad():
        ref = unet(x, t, text, **cond).sample
        assert not ref.isnan().any()
        plans = all_plans(unet)
        assert len(plans) == 6
        for plan in plans:
            torch.testing.assert_close(H.full_forward(unet, plan, x, t, text, **cond), ref, rtol=0, atol=0)
            ctx = H.make_context(unet, x, t, text, **cond)
            h, skips = H.encode(unet, plan, x, ctx)
            torch.testing.assert_close(H.hollow_output(unet, plan, x, t, text, **cond), H.hollow(unet, plan, h, ctx, skips),
                                       rtol=0, atol=0)


def test_the_conditioning_matters_in_the_variants():
    """The equality above is not vacuous: dropping the added embedding changes the output."""
    extra, width, cond = VARIANTS["text_time (SDXL)"]
    unet = _tiny_unet(**{**SMALL, **extra})
    x, t, text = torch.randn(B, 4, 8, 8, generator=g), torch.tensor([3, 900]), torch.randn(B, 7, 32, generator=g)
    other = dict(added_cond_kwargs=dict(cond["added_cond_kwargs"], time_ids=torch.zeros(B, 6)))
    with torch.no_grad():
        a, b = (H.full_forward(unet, all_plans(unet)[2], x, t, text, **c) for c in (cond, other))
    assert (a - b).abs().max() > 1e-3


def test_cross_attention_kwargs_scale_scales_the_lora_as_unet_does():
    """diffusers' forward scales the LoRA layers by cross_attention_kwargs["scale"] while it runs."""
    from peft import LoraConfig

    unet = _tiny_unet(**SMALL)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv_in"],
                                init_lora_weights=False))
    x, t, text = torch.randn(B, 4, 8, 8, generator=g), torch.tensor([3, 900]), torch.randn(B, 7, 32, generator=g)
    kw = dict(cross_attention_kwargs={"scale": 0.3})
    with torch.no_grad():
        ref, full = unet(x, t, text, **kw).sample, unet(x, t, text).sample
        assert (ref - full).abs().max() > 1e-3
        for plan in all_plans(unet):
            torch.testing.assert_close(H.full_forward(unet, plan, x, t, text, **kw), ref, rtol=0, atol=0)
            ctx = H.make_context(unet, x, t, text, **kw)
            h, skips = H.encode(unet, plan, x, ctx)
            out = H.hollowed_forward(unet, plan, x, t, text, H.hollow(unet, plan, h, ctx, skips), **kw)
            torch.testing.assert_close(out, ref, rtol=0, atol=0)
        torch.testing.assert_close(H.full_forward(unet, plan, x, t, text), full, rtol=0, atol=0)  # scale undone


def test_unsupported_or_missing_conditioning_is_refused_in_one_line():
    from hollownet.errors import HollownetError

    x, t, text = torch.randn(1, 4, 8, 8), torch.tensor([5]), torch.randn(1, 7, 32)
    cases = [(dict(addition_embed_type="text_time", addition_time_embed_dim=8, projection_class_embeddings_input_dim=32 + 6 * 8),
              {}, "text_embeds, time_ids"),
             (dict(num_class_embeds=3), {}, "class_labels"),
             ({}, dict(cross_attention_kwargs={"gligen": {}}), "gligen")]
    for extra, cond, word in cases:
        unet = _tiny_unet(**{**SMALL, **extra})
        plan = all_plans(unet)[2]
        for run in (lambda: H.full_forward(unet, plan, x, t, text, **cond), lambda: H.hollow_output(unet, plan, x, t, text, **cond)):
            with pytest.raises(HollownetError, match=word) as e:
                run()
            assert "\n" not in str(e.value)
    # what the split forward does not follow at all is refused when the cut is planned, before any stage
    with pytest.raises(HollownetError, match="GLIGEN"):
        make_plan(_tiny_unet(**SMALL, attention_type="gated"))
    unet = _tiny_unet(**SMALL)
    plan = make_plan(unet)
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    for run in (lambda: make_plan(unet), lambda: H.full_forward(unet, plan, x, t, text), lambda: H.hollow_output(unet, plan, x, t, text)):
        with pytest.raises(HollownetError, match="FreeU"):
            run()


@pytest.mark.parametrize("name", ["text_time (SDXL)", "image_hint", "class identity", "class projection, concat",
                                  "encoder_hid_proj text_image_proj", "num_class_embeds"])
def test_example_conditioning_fits_the_unet(name):
    """The planner's fake runs use placeholder conditioning: it must have the shapes unet(...) takes."""
    extra, width, _ = VARIANTS[name]
    unet = _tiny_unet(**{**SMALL, **extra})
    x, t, text = torch.randn(B, 4, 8, 8), torch.tensor([3, 900]), torch.randn(B, 7, width)
    cond = H.example_cond(unet, B, (8, 8))
    with torch.no_grad():
        torch.testing.assert_close(H.full_forward(unet, all_plans(unet)[1], x, t, text, **cond), unet(x, t, text, **cond).sample,
                                   rtol=0, atol=0)
