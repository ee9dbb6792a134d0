"""``hollownet generate``'s memory: measured over the whole run (every image, every part) and predicted by
``hollownet plan`` (generate's own code on fake tensors) to the byte, in every precision."""

from __future__ import annotations

import json

import pytest

from hollownet import cli
from hollownet.cli import main
from hollownet.devices import default_compute_dtype
from hollownet.memory.planner import plan_memory
from hollownet.requests import PlanRequest
from hollownet.stages.train import TrainConfig, run_train

from conftest import RES

RANK = 4


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def lora(tiny_model, hollow_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("gen-lora")
    run_train(TrainConfig(model=str(tiny_model), store=str(hollow_store), output=str(out), rank=RANK, steps=1,
                          checkpoint_every=0, track_memory_steps=0))
    return out


@pytest.mark.parametrize("flags", [[], ["--precision", "nf4"], ["--stream-weights"], ["--merged"],
                                   ["--precision", "int8", "--compute-dtype", "bf16"]],
                         ids=["fp32", "nf4", "stream", "merged", "int8-bf16"])  # int8-bf16: torch's int8 kernel on a CPU
def test_generate_peak_equals_its_plan(tiny_model, lora, tmp_path, capsys, flags):
    """4 denoising steps (the planner runs 3: the peak repeats), 2 images (the first's latents wait for the decoder)."""
    out = tmp_path / "gen"
    assert main(["generate", "--model", str(tiny_model), "--lora", str(lora), "--prompt", "a sks dog on the beach",
                 "--output", str(out), "--steps", "4", "--num-images", "2", "--device", "cpu", *flags]) == 0
    record = json.loads((out / "generate.json").read_text())
    measured = record["memory"]
    if "nf4" in flags:  # no --compute-dtype: the device's, recorded
        assert record["modes"]["compute_dtype"] == default_compute_dtype("cpu")
    assert set(measured["parts"]) == {"text encoder", "U-Net", "VAE decoder"}
    capsys.readouterr()
    plan_args = ["--model", str(tiny_model), "--rank", str(RANK), "--resolution", str(RES), "--gen-steps", "4",
                 "--num-images", "2", *flags]
    if not flags:  # the whole `hollownet plan --json` once; the other modes' generation part alone (the same code)
        assert main(["plan", *plan_args, "--json"]) == 0
        d = json.loads(capsys.readouterr().out)
        assert d["whole_run_peak_bytes"] == max(d["precompute_peak_bytes"], d["train_peak_bytes"], d["generate_peak_bytes"])
        for key in ("precompute_peak_bytes", "train_peak_bytes", "inference_peak_bytes", "peak_bytes"):  # every key kept
            assert key in d
    else:
        req = cli._request(PlanRequest, cli.build_parser().parse_args(["plan", *plan_args]))  # as `plan` reads the flags
        d = plan_memory(req, stages=("generate",)).to_json()
    assert d["generate_peak_bytes"] == measured["peak_bytes"] > 0
    assert d["breakdown"]["generate_parts"] == measured["parts"]
    assert d["breakdown"]["generate"] == measured["breakdown"]
    assert d["generate_peak_part"] == measured["peak_part"]


def test_more_images_cost_only_their_latents(tiny_model):
    """The run's peak grows with the number of images by the latents waiting for the decoder, nothing else."""
    from hollownet.memory.configs import load_model_configs
    from hollownet.memory.predict import predict_generate
    from hollownet.requests import PlanRequest

    mc = load_model_configs(str(tiny_model))
    one, three = (predict_generate(mc, PlanRequest(model=str(tiny_model), rank=RANK, resolution=RES, num_images=n))
                  for n in (1, 3))
    latent = 4 * mc.unet["in_channels"] * (RES // 8) ** 2  # fp32 latents, 8x smaller than the image
    assert three["parts"]["U-Net"] - one["parts"]["U-Net"] == 2 * latent
    assert three["parts"]["text encoder"] == one["parts"]["text encoder"]


def test_merged_with_quantized_weights_is_refused(tiny_model, lora, tmp_path, capsys):
    from conftest import error_line, run

    code, _, err = run(capsys, "generate", "--model", tiny_model, "--lora", lora, "--prompt", "a sks dog",
                       "--output", tmp_path / "g", "--precision", "nf4", "--merged", "--device", "cpu")
    assert code == 2 and "--merged fuses the LoRA" in error_line(err)


def test_streamed_and_low_precision_images_against_fp32(tiny_model, lora, tmp_path):
    """Same seeds: streamed weights give fp32's images exactly (the same function, weights read from disk per
    unit); bf16 and nf4 are close to them, nf4 the furthest (its weights are 4-bit)."""
    import numpy as np
    from PIL import Image

    from hollownet.stages.generate import GenerateConfig, run_generate

    def images(**kw):
        out = tmp_path / "-".join(f"{k}{v}" for k, v in kw.items())
        record = run_generate(GenerateConfig(model=str(tiny_model), lora=str(lora), prompt="a sks dog", output=str(out),
                                             steps=3, num_images=2, **kw))
        return np.stack([np.asarray(Image.open(out / f), dtype=np.float32) for f in record["images"]]), record

    ref, rec = images()
    streamed, srec = images(stream_weights=True)
    assert np.abs(streamed - ref).max() <= 1  # at most one rounding step of 255
    assert srec["memory"]["parts"]["U-Net"] < rec["memory"]["parts"]["U-Net"]  # the units' weights are not resident
    errors = {p: float(np.abs(images(precision=p)[0] - ref).mean()) for p in ("bf16", "nf4")}
    assert 0 < errors["bf16"] < errors["nf4"] < 40, errors
