"""Stage 2 to 5: loss falls, resume is exact, the LoRA loads in diffusers, two-path == trained function."""

import pytest
import torch
from safetensors.torch import load_file

from hollownet.stages.export import LORA_FILE, lora_state_dict, save_lora
from hollownet.stages.generate import load_pipeline, two_path_batched, two_path_forward
from hollownet.cut import plan_for_blocks
from hollownet.stages.store import Store
from hollownet.optimizers import make_optimizer
from hollownet.settings import Modes
from hollownet.stages.train import TrainConfig, build_model, predict, run_train, train_step


def train(model, store, out, **kw):
    base = dict(model=str(model), store=str(store), output=str(out), rank=4, lr=1e-3, steps=12, checkpoint_every=0,
                track_memory_steps=0)
    modes, kw = Modes.split(kw)
    return run_train(TrainConfig(**{**base, **kw}, modes=modes))


@pytest.fixture(scope="module")
def trained(tiny_model, hollow_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora")
    return out, train(tiny_model, hollow_store, out, steps=24, lr=1e-2)


def hollowed_with_lora(model, store_dir, lora_dir=None):
    """The stage-2 network; with ``lora_dir``, carrying the exported LoRA loaded back."""
    from diffusers.utils import convert_unet_state_dict_to_peft
    from peft import set_peft_model_state_dict

    store = Store(store_dir)
    cfg = TrainConfig(model=str(model), store=str(store_dir), output="unused", rank=4)
    unet, plan, _ = build_model(model, store.manifest(), cfg)
    if lora_dir is not None:
        saved = load_file(lora_dir / LORA_FILE)
        set_peft_model_state_dict(unet, convert_unet_state_dict_to_peft({k[5:]: v for k, v in saved.items()}))
    return unet, plan


def test_loss_falls_on_one_subject(trained, tiny_model, hollow_store):
    from hollownet.stages.train import loss_fn

    out, _ = trained
    store = Store(hollow_store)
    batch = store.samples(list(range(12)))
    embeds = store.tensors("prompts.safetensors")["embeds"]
    losses = []
    for lora in (None, out):
        unet, plan = hollowed_with_lora(tiny_model, hollow_store, lora)
        with torch.no_grad():
            losses.append(loss_fn(predict(unet, plan, batch, embeds, torch.float32, "cpu"), batch, "cpu").item())
    assert losses[1] < 0.95 * losses[0], losses  # the store's 12 samples, before and after 24 steps


def test_resume_continues_exactly(tiny_model, hollow_store, tmp_path, capsys):
    straight = train(tiny_model, hollow_store, tmp_path / "a", steps=6)
    first = train(tiny_model, hollow_store, tmp_path / "b", steps=4, checkpoint_every=2)  # leaves step-2 checkpoint
    capsys.readouterr()
    resumed = train(tiny_model, hollow_store, tmp_path / "b", steps=6, checkpoint_every=2)  # resumes by itself
    assert "resuming from step 2" in capsys.readouterr().err
    assert resumed.start_step == 2 and len(resumed.losses) == 6
    assert resumed.losses[:2] == first.losses[:2] == straight.losses[:2]  # restored from the checkpoint
    # computed again after it, from the restored LoRA and AdamW state: the same numbers as without a break
    assert resumed.losses[2:] == straight.losses[2:] and resumed.losses[2:4] == first.losses[2:4]
    a, b = load_file(tmp_path / "a" / LORA_FILE), load_file(tmp_path / "b" / LORA_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # the final LoRA


def test_no_resume_starts_over_and_other_settings_are_refused(tiny_model, hollow_store, tmp_path):
    from hollownet.errors import HollownetError

    train(tiny_model, hollow_store, tmp_path, steps=4, checkpoint_every=2)
    with pytest.raises(HollownetError, match=r"made with other settings: a different --lr .*--no-resume"):
        train(tiny_model, hollow_store, tmp_path, steps=4, checkpoint_every=2, lr=5e-4)
    fresh = train(tiny_model, hollow_store, tmp_path, steps=3, resume=False, lr=5e-4)
    assert fresh.start_step == 0 and len(fresh.losses) == 3
    assert not list((tmp_path / "checkpoints").glob("step-*.pt"))  # the old run's checkpoints are gone


def test_a_damaged_checkpoint_is_never_picked(tiny_model, hollow_store, tmp_path):
    train(tiny_model, hollow_store, tmp_path, steps=5, checkpoint_every=2)  # step-2 and step-4
    (tmp_path / "checkpoints" / "step-000004.pt").write_bytes(b"half a checkpoint")
    with pytest.warns(UserWarning, match="step-000004.pt cannot be read"):
        resumed = train(tiny_model, hollow_store, tmp_path, steps=5, checkpoint_every=2)
    assert resumed.start_step == 2


def test_exported_lora_loads_in_diffusers_and_changes_output(trained, tiny_model):
    from diffusers import StableDiffusionPipeline

    out, _ = trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None, requires_safety_checker=False)
    kw = dict(prompt="a photo of sks dog", num_inference_steps=2, height=64, width=64, output_type="pt")
    before = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    pipe.load_lora_weights(out)
    after = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert (after - before).abs().max() > 1e-3
    # round trip: export -> load -> export is lossless
    saved = load_file(out / LORA_FILE)
    again = {"unet." + k: v for k, v in lora_state_dict(pipe.unet).items()}
    assert saved.keys() == again.keys()
    for k in saved:
        torch.testing.assert_close(saved[k], again[k], rtol=0, atol=0)
    save_lora(pipe.unet, out / "again", {})
    resaved = load_file(out / "again" / LORA_FILE)
    assert all(torch.equal(saved[k], resaved[k]) for k in saved)


def test_two_path_inference_reproduces_the_trained_function(trained, tiny_model, hollow_store):
    out, _ = trained
    store = Store(hollow_store)
    batch = store.samples([0, 5, 7])
    embeds = store.tensors("prompts.safetensors")["embeds"]
    # the network as trained: hollowed U-Net + stored activation, with the exported LoRA loaded back
    hollowed, plan = hollowed_with_lora(tiny_model, hollow_store, out)
    parts, info = load_pipeline(str(tiny_model), str(out), "fp32", "cpu", "ddim")
    unet = parts.unet()  # generation's U-Net: the full model, the LoRA unmerged on it
    plan_full = plan_for_blocks(unet, info["hollow_blocks"])
    text = embeds[batch["prompt_index"]]
    with torch.no_grad():
        trained_fn = predict(hollowed, plan, batch, embeds, torch.float32, "cpu")
        two_path = two_path_forward(unet, plan_full, batch["noisy"], batch["timestep"], text)
        batched = two_path_batched(unet, plan_full, batch["noisy"], batch["timestep"], text)
        single = unet(batch["noisy"], batch["timestep"], text).sample
    torch.testing.assert_close(two_path, trained_fn, rtol=1e-5, atol=1e-5)
    # one batched forward [x, x] through the kept down blocks, LoRA on the second half only: the same function
    torch.testing.assert_close(batched, two_path, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(batched, trained_fn, rtol=1e-5, atol=1e-5)
    assert (single - trained_fn).abs().max() > 1e-4  # the merged path is a different function


def test_generation_unet_equals_diffusers_load_lora_weights(trained, tiny_model):
    """The U-Net generation builds (builder's loader, LoRA set from the file) is diffusers' own with the LoRA loaded."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders import StableDiffusionLoraLoaderMixin

    out, _ = trained
    parts, _ = load_pipeline(str(tiny_model), str(out), "fp32", "cpu", "ddim")
    ours = parts.unet()
    ref = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    state, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(out)
    StableDiffusionLoraLoaderMixin.load_lora_into_unet(state, alphas, unet=ref)
    x = torch.randn(2, ref.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    text = torch.randn(2, 16, ref.config.cross_attention_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(x, 500, text).sample, ref(x, 500, text).sample, rtol=1e-5, atol=1e-5)


def test_bf16_frozen_weights_train_lora_in_fp32(tiny_model, hollow_store, tmp_path):
    cfg = TrainConfig(model=str(tiny_model), store=str(hollow_store), output=str(tmp_path), rank=4, lr=1e-2,
                      modes=Modes(precision="bf16"))
    store = Store(hollow_store)
    net = build_model(tiny_model, store.manifest(), cfg)
    frozen = [p for p in net.unet.parameters() if not p.requires_grad and p.device.type != "meta"]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert net.params and all(p.dtype == torch.float32 for p in net.params)
    grads = []
    for p in net.params:
        p.register_post_accumulate_grad_hook(lambda p: grads.append(p.grad.dtype))
    before = [p.detach().clone() for p in net.params]
    optimizer = make_optimizer(net.params, "adamw", cfg.lr)
    train_step(net, store.samples([0]), store.tensors("prompts.safetensors")["embeds"], optimizer, cfg)
    assert len(grads) == len(net.params) and set(grads) == {torch.float32}  # LoRA's gradients in fp32 too
    assert all(p.dtype == torch.float32 for p in net.params)
    assert any(not torch.equal(a, p) for a, p in zip(before, net.params))  # and they were trained
    result = train(tiny_model, hollow_store, tmp_path / "run", steps=2, precision="bf16")
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_baseline_lora_method_trains_whole_unet(tiny_model, dog_photos, tmp_path):
    from hollownet.stages.precompute import PrecomputeConfig, run_precompute

    run_precompute(PrecomputeConfig(model=str(tiny_model), images=str(dog_photos), prompt="a photo of sks dog",
                                    output=str(tmp_path / "s"), method="lora", resolution=64, num_samples=4),
                   track_memory=False)
    assert "hollow_out" not in load_file(tmp_path / "s" / "shard-00000.safetensors")
    result = train(tiny_model, tmp_path / "s", tmp_path / "o", method="lora", steps=2)
    keys = load_file(tmp_path / "o" / LORA_FILE).keys()
    assert any(k.startswith("unet.mid_block.") for k in keys)  # plain LoRA reaches the hollow's layers too
    assert result.plan is None
