"""SD3 end to end on a tiny StableDiffusion3Pipeline built offline (two CLIP encoders, no T5): the family's
conditioning is the pipeline's, stage 2 on a stored sample is the full transformer with the LoRA (exactly), the
loss is diffusers' SD3 script's, and ``hollownet train`` / ``generate`` run it; what is not supported yet is
refused in one line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from conftest import error_line, run
from hollownet.errors import HollownetError
from hollownet.families import SD3_FAMILY
from hollownet.memory.tracker import PartMeter
from hollownet.tiny_sd3 import build_tiny_sd3

pytestmark = pytest.mark.usefixtures("one_thread")
RES = 32  # 16 latent pixels a side, 8 patches (the tiny transformer takes up to 16: 64 px)


@pytest.fixture(scope="module")
def tiny_sd3(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd3"))


def _pipeline(folder):
    from diffusers import StableDiffusion3Pipeline

    return StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)


def test_the_sd3_family_conditions_as_the_pipelines_encode_prompt(tiny_sd3):
    prompts = ["a photo of sks dog", "a dog"]
    mine = SD3_FAMILY.encode_prompts(tiny_sd3, prompts, torch.float32, "cpu", PartMeter(False))
    embeds, _, pooled, _ = _pipeline(tiny_sd3).encode_prompt(prompts, prompts, prompts, do_classifier_free_guidance=False)
    assert mine["embeds"].shape == (2, 16 + SD3_FAMILY.max_sequence_length, 64)  # CLIP tokens, then T5's zero slot
    assert torch.equal(mine["embeds"], embeds) and torch.equal(mine["pooled_projections"], pooled)


def test_stage2_on_a_stored_sample_is_the_full_transformer_with_the_lora(tiny_sd3, dog_photos, tmp_path):
    """Stage 1's store, stage 2's suffix with a non-zero LoRA: its prediction on every stored sample equals the
    full transformer with the same LoRA on the sample's inputs, bit for bit; the stored sample is diffusers' SD3
    script's (timestep and sigma from the schedule, (1 - sigma) x0 + sigma noise) and so is the loss."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from peft.utils import set_peft_model_state_dict

    from hollownet.dit_lora import add_suffix_lora, lora_state_dict
    from hollownet.stages.dit import batch_loss, build_suffix, predict, run_dit_precompute
    from hollownet.stages.precompute import PrecomputeConfig, sample_noise
    from hollownet.stages.store import Store
    from hollownet.stages.train import TrainConfig

    k, store_dir = 2, tmp_path / "store"
    run_dit_precompute(PrecomputeConfig(model=str(tiny_sd3), images=str(dog_photos), prompt="a photo of sks dog",
                                        output=str(store_dir), hollow_blocks=["transformer_blocks.0", "transformer_blocks.1"],
                                        resolution=RES, num_samples=4, shard_size=2, batch_size=2), track_memory=False)
    store = Store(store_dir)
    manifest = store.manifest()
    assert manifest["prefix_k"] == k and manifest["family"] == "sd3"
    net, params = build_suffix(tiny_sd3, k, TrainConfig(model=str(tiny_sd3), store="", output="", rank=2,
                                                        lora_targets=["attn.to_q", "attn.to_v", "attn.add_k_proj"]))
    for p in params:
        p.data.normal_(generator=torch.Generator().manual_seed(3))
    full = SD3Transformer2DModel.from_pretrained(tiny_sd3 / "transformer").eval()
    add_suffix_lora(full, k, rank=2, targets=("attn.to_q", "attn.to_v", "attn.add_k_proj"))
    set_peft_model_state_dict(full, lora_state_dict(net))
    base = SD3Transformer2DModel.from_pretrained(tiny_sd3 / "transformer").eval()
    prompts, latents = store.tensors("prompts.safetensors"), store.tensors("latents.safetensors")["latents"]
    scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(tiny_sd3 / "scheduler")
    keys = ("noisy", "target", "sigma", "timestep", "prompt_index", "weight", "loss_weight", "hidden_states",
            "encoder_hidden_states", "temb")
    for shard in range(2):  # the rows stage 1 ran together, run together here
        rows = manifest["samples"][2 * shard : 2 * shard + 2]
        batch = store.samples([2 * shard, 2 * shard + 1], keys=keys)
        x0 = latents[[r["latent"] for r in rows]]
        noise = torch.stack([sample_noise(r["noise_seed"], x0.shape[1:]) for r in rows])
        idx = [r["index"] for r in rows]
        sigma = scheduler.sigmas[idx]
        assert torch.equal(batch["timestep"], scheduler.timesteps[idx]) and torch.equal(batch["sigma"], sigma)
        assert torch.equal(batch["noisy"], (1.0 - sigma[:, None, None, None]) * x0 + sigma[:, None, None, None] * noise)
        assert torch.equal(batch["target"], x0)
        inputs = dict(hidden_states=batch["noisy"], timestep=batch["timestep"],
                      encoder_hidden_states=prompts["embeds"][batch["prompt_index"]],
                      pooled_projections=prompts["pooled_projections"][batch["prompt_index"]])
        with torch.no_grad():
            want = full(**inputs).sample
            assert (want - base(**inputs).sample).abs().max() > 1e-4  # the LoRA does something
            assert torch.equal(predict(net, k, batch, "cpu"), want)
            s = batch["sigma"][:, None, None, None]  # the script's preconditioned loss, written out as it has it
            script = torch.mean(((want * (-s) + batch["noisy"] - x0) ** 2).reshape(2, -1), 1).mean()
            assert torch.equal(batch_loss(net, k, batch, "cpu"), script)


def _images(folder):
    return np.stack([np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]).astype(np.int16)


def test_train_then_generate_through_the_cli_changes_the_images(tiny_sd3, dog_photos, tmp_path, capsys):
    out = tmp_path / "run"
    code, stdout, err = run(capsys, "train", "--model", tiny_sd3, "--images", dog_photos, "--prompt", "a photo of sks dog",
                            "--output", out, "--resolution", RES, "--steps", 4, "--rank", 4, "--lr", 1e-2, "--hollow", 0.3)
    assert code == 0, err
    assert "froze the prefix k=1 of 4 blocks" in stdout
    record = json.loads((out / "train.json").read_text())
    assert record["plan"]["k"] == 1 and record["outputs"]["lora_files"] == [str(out / "pytorch_lora_weights.safetensors")]
    keys = list(load_file(out / "pytorch_lora_weights.safetensors"))
    assert keys and all(n.startswith("transformer.transformer_blocks.") for n in keys)
    assert min(int(n.split(".")[2]) for n in keys) == 1  # nothing in the frozen prefix
    images = {}
    for name, lora in (("base", ()), ("lora", ("--lora", out))):
        code, _, err = run(capsys, "generate", "--model", tiny_sd3, *lora, "--prompt", "a sks dog on the beach",
                           "--output", tmp_path / name, "--steps", 2, "--num-images", 2, "--resolution", RES)
        assert code == 0, err
        images[name] = _images(tmp_path / name)
    assert images["base"].shape == images["lora"].shape == (2, RES, RES, 3)
    assert np.abs(images["lora"] - images["base"]).max() > 0


@pytest.mark.parametrize("flags, says", [
    (("--method", "lora"), "--method lora is not supported for SD3"),
    (("--precision", "nf4"), "--precision nf4 is not supported for SD3"),
    (("--class-prompt", "a photo of dog", "--class-images", "PHOTOS"), "prior preservation"),
    (("--resolution", 72), "beyond this transformer's position table"),
    (("--hollow-blocks", "transformer_blocks.1"), "is not a prefix of an SD3 transformer"),
])
def test_unsupported_sd3_training_settings_are_refused_in_one_line(tiny_sd3, dog_photos, tmp_path, capsys, flags, says):
    flags = [str(dog_photos) if f == "PHOTOS" else f for f in flags]
    code, _, err = run(capsys, "train", "--model", tiny_sd3, "--images", dog_photos, "--prompt", "a photo of sks dog",
                       "--output", tmp_path / "out", "--steps", 1, *flags)
    assert code == 2 and says in error_line(err)
    assert not (tmp_path / "out" / "store").exists()  # refused before anything ran


def test_an_sd3_folder_with_t5_or_given_to_a_u_net_stage_is_refused_in_one_line(tiny_sd3, dog_photos, tmp_path, capsys):
    from hollownet.stages.precompute import PrecomputeConfig, run_precompute

    with_t5 = tmp_path / "with-t5"
    shutil.copytree(tiny_sd3, with_t5)
    (with_t5 / "text_encoder_3").mkdir()
    code, _, err = run(capsys, "generate", "--model", with_t5, "--prompt", "a dog", "--output", tmp_path / "gen")
    assert code == 2 and "T5 text encoder (text_encoder_3/)" in error_line(err)
    with pytest.raises(HollownetError, match="SD3 / SD3.5 folder"):
        run_precompute(PrecomputeConfig(model=str(tiny_sd3), images=str(dog_photos), prompt="a photo of sks dog",
                                        output=str(tmp_path / "store"), resolution=RES, num_samples=1))


def test_a_stopped_sd3_run_resumes_to_the_same_lora(tiny_sd3, dog_photos, tmp_path):
    """Stopped after step 2 of 4 (a checkpoint is kept, as Ctrl-C does), then rerun: the same losses and LoRA as
    the run that was never stopped (both from one store)."""
    from hollownet.requests import TrainRequest
    from hollownet.stages.train import TrainingStopped
    from hollownet.workflow import personalize

    def request(name):
        return TrainRequest(model=str(tiny_sd3), images=str(dog_photos), prompt="a photo of sks dog", output=str(tmp_path / name),
                            store=str(tmp_path / "store"), resolution=RES, rank=2, lr=1e-2, steps=4, device="cpu",
                            lora_format="diffusers", track_memory=False)

    whole = personalize(request("whole"))
    with pytest.raises(TrainingStopped):
        personalize(request("stopped"), on_step=lambda step, losses, memory: step == 2)
    resumed = personalize(request("stopped"))
    assert resumed["timings"]["resumed_from_step"] == 2
    assert resumed["loss"]["history"] == whole["loss"]["history"]
    a, b = (load_file(tmp_path / name / "pytorch_lora_weights.safetensors") for name in ("whole", "stopped"))
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
