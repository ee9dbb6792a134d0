"""Stage 1: the store's contents, resume after interruption, a full disk, a store from another model."""

import json

import pytest
import torch
from safetensors.torch import load_file

import hollownet.stages.store as store_mod
from hollownet.errors import HollownetError
from hollownet.stages.precompute import PrecomputeConfig, noisy_and_target, run_precompute
from hollownet.stages.store import Store, shard_name

from conftest import RES


def config(model, photos, out, **kw):
    base = dict(model=str(model), images=str(photos), prompt="a photo of sks dog", output=str(out), resolution=RES,
                num_samples=12, shard_size=5)
    return PrecomputeConfig(**{**base, **kw})


def shards(root):
    return [load_file(root / shard_name(i)) for i in range(3)]


def test_store_contents(hollow_store):
    store = Store(hollow_store)
    m = store.manifest()
    assert m["num_shards"] == 3 and m["done_shards"] == [0, 1, 2] and store.is_complete()
    # the default cut, nearest 39% of the tiny U-Net's parameters (38.7%; its widths are not SD's 1:2:4:4)
    assert m["hollow_blocks"] == ["down_blocks.2.resnets.1", "down_blocks.2.attentions.1", "down_blocks.2.downsamplers",
                                  "down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.1.resnets.0", "up_blocks.1.attentions.0"]
    batch = store.samples(list(range(12)))
    assert batch["hollow_out"].shape == (12, 32, 2, 2)  # what up_blocks.1.attentions.0 hands to its resnets.1 at 8x8 latents
    assert batch["noisy"].shape == batch["target"].shape == (12, 4, 8, 8)
    assert [int(t) for t in batch["timestep"]] == [s["timestep"] for s in m["samples"]]


def test_interrupted_run_resumes_to_the_same_store(tiny_model, dog_photos, hollow_store, tmp_path, monkeypatch):
    real = store_mod.Store.mark_done
    calls = []

    def crash_after_first(self, shard):
        real(self, shard)
        calls.append(shard)
        if len(calls) == 1:
            raise KeyboardInterrupt

    monkeypatch.setattr(store_mod.Store, "mark_done", crash_after_first)
    with pytest.raises(KeyboardInterrupt):
        run_precompute(config(tiny_model, dog_photos, tmp_path / "s"), track_memory=False)
    monkeypatch.setattr(store_mod.Store, "mark_done", real)
    assert Store(tmp_path / "s").done_shards() == {0}
    result = run_precompute(config(tiny_model, dog_photos, tmp_path / "s"), track_memory=False)
    assert result.resumed_shards == 1
    for a, b in zip(shards(tmp_path / "s"), shards(hollow_store)):
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


# A full disk in stage 1 (a real one, a small tmpfs): tests/test_faults.py.


def test_store_from_another_model_or_cut_is_refused(tiny_model, tiny_model_v, dog_photos, hollow_store):
    with pytest.raises(HollownetError, match="different model_fingerprint"):
        run_precompute(config(tiny_model_v, dog_photos, hollow_store), track_memory=False)
    with pytest.raises(HollownetError, match="different hollow_blocks"):
        run_precompute(config(tiny_model, dog_photos, hollow_store, hollow=0.9), track_memory=False)
    with pytest.raises(HollownetError, match="different resolution"):
        run_precompute(config(tiny_model, dog_photos, hollow_store, resolution=128), track_memory=False)


def test_v_prediction_targets(tiny_model_v):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(tiny_model_v / "scheduler")
    latent = torch.randn(2, 4, 8, 8)
    rows = [dict(noise_seed=1, timestep=10), dict(noise_seed=2, timestep=990)]
    noisy, target, t = noisy_and_target(latent, rows, scheduler)
    a = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    s = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    noise = (noisy - a * latent) / s
    torch.testing.assert_close(target, a * noise - s * latent, atol=1e-5, rtol=1e-5)


def test_manifest_is_plain_json(hollow_store):
    m = json.loads((hollow_store / "manifest.json").read_text())
    assert m["format"] == "hollownet-store/1" and m["dtype"] == "fp32" and m["resolution"] == RES


def test_prior_preservation_alternates_instance_and_class_samples(tiny_model, dog_photos, dreambooth, tmp_path):
    from hollownet.stages.train import TrainConfig, run_train

    class_photos = dreambooth / "dog2"
    root = tmp_path / "s"
    run_precompute(config(tiny_model, dog_photos, root, num_samples=6, class_prompt="a photo of dog",
                          class_images=str(class_photos), prior_loss_weight=0.5), track_memory=False)
    m = Store(root).manifest()
    n_instance = len(m["photo_files"])
    assert [s["prompt"] for s in m["samples"]] == [0, 1, 0, 1, 0, 1]
    assert all((s["latent"] >= n_instance) == (s["prompt"] == 1) for s in m["samples"])
    assert [s["weight"] for s in m["samples"]][:2] == [1.0, 0.5]
    embeds = Store(root).tensors("prompts.safetensors")["embeds"]
    assert embeds.shape[0] == 2 and not torch.equal(embeds[0], embeds[1])
    result = run_train(TrainConfig(model=str(tiny_model), store=str(root), output=str(tmp_path / "o"), rank=2,
                                   steps=3, checkpoint_every=0, track_memory_steps=0))
    assert len(result.losses) == 3


def test_config_rejects_half_of_prior_preservation(tiny_model, dog_photos, tmp_path):
    with pytest.raises(HollownetError, match="needs both --class-prompt and --class-images"):
        config(tiny_model, dog_photos, tmp_path, class_prompt="a photo of dog")


def test_per_photo_captions_kohya_convention(tiny_model, tmp_path):
    """NAME.txt beside a photo is its caption (kohya's convention); the others keep --prompt."""
    import shutil

    from hollownet.photos import demo_photos_dir

    photos = tmp_path / "photos"
    shutil.copytree(demo_photos_dir(), photos)
    first = sorted(p for p in photos.iterdir() if p.suffix == ".jpg")[0]
    first.with_suffix(".txt").write_text("a photo of sks dog on a sofa\n")
    import warnings

    from hollownet.photos import PhotoWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", PhotoWarning)  # a caption file is not an "ignored non-photo entry"
        run_precompute(config(tiny_model, photos, tmp_path / "store", method="lora"), track_memory=False)
    m = Store(tmp_path / "store").manifest()
    assert m["prompts"] == ["a photo of sks dog", "a photo of sks dog on a sofa"]
    index = m["photo_files"].index(first.name)
    assert all(s["prompt"] == (1 if s["latent"] == index else 0) for s in m["samples"])
    assert Store(tmp_path / "store").tensors("prompts.safetensors")["embeds"].shape[0] == 2

    first.with_suffix(".txt").write_text("a photo of a dog on a sofa")  # the identifier is missing
    with pytest.raises(HollownetError, match="lacks the identifier 'sks'"):
        run_precompute(config(tiny_model, photos, tmp_path / "store2", method="lora"), track_memory=False)
