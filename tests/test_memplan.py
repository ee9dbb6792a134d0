"""hollownet.memory.planner / ``hollownet plan``: predictions (fake tensors, no weights) against real measurements.

The tiny model runs the real stage 1 and stage 2 with exact memory tracking; the planner must give
the same bytes (the issue asks for 2%; the shared code path gives 0). SD 2.1 checks are the cheap
ones (configs, cut shapes, lower bounds): full-size figures are the benchmark's job.
"""

from __future__ import annotations

import json

import pytest

from hollownet.cli import main
from hollownet.devices import default_compute_dtype
from hollownet.errors import HollownetError
from hollownet.memory import stage1
from hollownet.memory.budget import candidates, fit_budget
from hollownet.memory.configs import load_model_configs
from hollownet.memory.fake import hollow_out_shape
from hollownet.memory.planner import plan_memory
from hollownet.requests import PlanRequest
from hollownet.cut import make_plan, meta_unet
from hollownet.memory.sizes import GiB, parse_size
from hollownet.settings import Modes

RES = 64
RANK = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread is as fast, and immune to OpenMP spin-waits on a busy machine
    (with two threads on two shared cores a 3 s training run was seen taking 45 s). Counts don't change."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _agree(predicted: int, measured: int) -> None:
    assert abs(predicted - measured) <= 0.02 * measured, (predicted, measured)
    assert predicted == measured  # the same code path: exact, not just within 2%


def _photos(folder) -> int:
    return len([p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp")])


def _measure(tiny_model, photos, tmp_path, method, **train_kw) -> tuple[dict, dict]:
    """Stage 1 (first shard: 2 samples) and 2 training steps, run for real with exact memory tracking."""
    from hollownet.stages.precompute import PrecomputeConfig, run_precompute
    from hollownet.stages.train import TrainConfig, run_train

    store = tmp_path / "store"
    pre = run_precompute(PrecomputeConfig(model=str(tiny_model), images=str(photos), prompt="a photo of sks dog",
                                          output=str(store), method=method, resolution=RES, num_samples=2, shard_size=2),
                         track_memory=True)
    train = run_train(TrainConfig(model=str(tiny_model), store=str(store), output=str(tmp_path / "out"), method=method,
                                  rank=RANK, steps=2, track_memory_steps=2, checkpoint_every=0, modes=Modes(**train_kw)))
    return pre.memory, train.memory


def test_cli_json_equals_the_measured_peaks(tiny_model, dog_photos, tmp_path, capsys):
    """``hollownet plan --json`` against a real stage 1 + stage 2 with the same settings."""
    pre, train = _measure(tiny_model, dog_photos, tmp_path, "hollow")
    rc = main(["plan", "--model", str(tiny_model), "--rank", str(RANK), "--resolution", str(RES), "--steps", "2",
               "--photos", str(_photos(dog_photos)), "--json"])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    # the contract other scripts read
    for key in ("precompute_peak_bytes", "train_peak_bytes", "inference_peak_bytes", "breakdown"):
        assert key in d
    # prediction == measurement (the issue asks for 2%; one code path gives 0)
    _agree(d["precompute_peak_bytes"], pre["peak_bytes"])
    for part, measured in pre["parts"].items():  # text encoder, VAE encoder, U-Net encoder + hollow
        _agree(d["breakdown"]["precompute_parts"][part], measured)
    assert d["precompute_peak_part"] == pre["peak_phase"]
    _agree(d["train_peak_bytes"], train["peak_bytes"])
    assert d["breakdown"]["train"] == train["breakdown"]
    assert d["train_peak_phase"] == train["peak_phase"]
    # internal consistency
    assert sum(d["breakdown"]["train"].values()) == d["train_peak_bytes"]
    assert sum(d["breakdown"]["precompute"].values()) == d["precompute_peak_bytes"]
    assert sum(d["breakdown"]["inference"].values()) == d["inference_peak_bytes"] > 0
    w = d["breakdown"]["train_weights"]
    assert w["frozen"] + w["trainable"] == d["breakdown"]["train"]["weights"]
    assert d["train_over_inference_bytes"] == d["train_peak_bytes"] - d["inference_peak_bytes"]
    assert d["inference_peak_bytes_by_batch"]["2"] > d["inference_peak_bytes_by_batch"]["1"]
    assert d["method"] == "hollow" and d["hollow_blocks"] and 0 < d["fraction"] < 1


def test_lora_with_gradient_checkpointing_equals_the_measured_peak(tiny_model, dog_photos, tmp_path):
    """diffusers' own checkpointing path (the whole U-Net), stage 1 without the U-Net."""
    pre, train = _measure(tiny_model, dog_photos, tmp_path, "lora", grad_checkpointing=True)
    p = plan_memory(PlanRequest(model=str(tiny_model), method="lora", rank=RANK, resolution=RES, steps=2,
                                photos=_photos(dog_photos), modes=Modes(grad_checkpointing=True)), stages=("precompute", "train"))
    _agree(p.precompute_peak, pre["peak_bytes"])
    _agree(p.train_peak, train["peak_bytes"])
    assert p.train.breakdown == train["breakdown"]


@pytest.mark.parametrize("flags, budget", [(["--precision", "nf4", "--grad-checkpointing", "--optimizer", "adamw-in-backward"], None),
                                           (["--stream-weights", "--optimizer", "adamw-in-backward"], "256KiB"),
                                           (["--precision", "int8", "--compute-dtype", "bf16", "--grad-checkpointing"], None)],
                         ids=["nf4", "stream", "int8-bf16"])  # int8-bf16: torch's int8 kernel on a CPU
def test_low_memory_run_equals_its_plan(tiny_model, dog_photos, tmp_path, capsys, monkeypatch, flags, budget):
    """``hollownet train`` in a low-memory mode (stage 2 quantized or streamed) against ``hollownet plan`` with
    the same flags: both stages' peaks to the byte, and stage 1's default layout decided alike. The tiny
    model's sample-major stage 1 fits the default layer-major budget (700 MiB), so it runs sample-major;
    below its peak (256 KiB) both run layer-major under that budget."""
    if budget is not None:
        monkeypatch.setattr(stage1, "LOW_MEMORY_STAGE1_BUDGET", budget)
    rc = main(["train", "--model", str(tiny_model), "--images", str(dog_photos), "--prompt", "a photo of sks dog",
               "--output", str(tmp_path / "run"), "--steps", "2", "--resolution", str(RES), "--rank", str(RANK),
               "--checkpoint-every", "0", "--device", "cpu", *flags])
    assert rc == 0
    record = json.loads((tmp_path / "run" / "train.json").read_text())
    pre, train = record["memory"]["precompute"], record["memory"]["train"]
    capsys.readouterr()
    rc = main(["plan", "--model", str(tiny_model), "--rank", str(RANK), "--resolution", str(RES), "--steps", "2",
               "--photos", str(_photos(dog_photos)), "--json", *flags])
    assert rc == 0
    d = json.loads(capsys.readouterr().out)
    assert d["stage1"]["layer_major"] == (budget is not None) and d["stage1"]["precision"] == d["compute_dtype"]
    # the compute dtype as chosen for the device (no --compute-dtype: devices.default_compute_dtype), recorded
    compute = "bf16" if "bf16" in flags else default_compute_dtype("cpu") if "nf4" in flags else None
    assert record["settings"]["compute_dtype"] == compute and d["compute_dtype"] == (compute or "fp32")
    # layer-major's peak names its layer ("U-Net encoder + hollow: down_blocks.0.resnets.0"), sample-major's the part
    assert (": " in pre["peak_phase"]) == (budget is not None), pre["peak_phase"]
    if budget is None:
        assert any("stage 1: sample-major" in n for n in d["notes"]), d["notes"]
    else:
        assert d["stage1"]["memory_budget_bytes"] == parse_size(budget)
    assert d["precompute_peak_part"] == pre["peak_phase"]
    _agree(d["precompute_peak_bytes"], pre["peak_bytes"])
    _agree(d["train_peak_bytes"], train["peak_bytes"])
    assert d["breakdown"]["train"] == train["breakdown"]
    assert d["stream_weights"] == ("--stream-weights" in flags) and d["grad_checkpointing"]


def test_bad_input_is_one_clear_line(tiny_model, capsys):
    cases = [
        (["--model", "sd99"], "sd15, sd21, sdxl"),
        (["--model", str(tiny_model), "--hollow", "1.5"], "outside what this U-Net allows"),
        (["--model", "sd21", "--budget", "lots"], "is not a size: 2GB (10^9 bytes)"),
        (["--model", "sd21", "--method", "full", "--precision", "bf16"], "needs --precision fp32"),
        (["--model", "sd21", "--method", "lora", "--stream-weights"], "needs --method hollow"),
        (["--model", "sd21", "--precision", "int8", "--stream-weights"], "float precision"),
        (["--model", "sd21", "--compute-dtype", "fp16"], "int8|nf4 only"),
        # 100 photos make stage 1's VAE part the largest of every setting: the search for the smallest
        # peak then stops after one setting
        (["--model", str(tiny_model), "--resolution", "64", "--photos", "100", "--steps", "2", "--budget", "1KB"],
         "the smallest peak is"),
    ]
    for args, hint in cases:
        assert main(["plan", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and err.startswith("hollownet plan: error:") and hint in err, err


def test_budget_answers_best_fidelity_first(tiny_model):
    req = PlanRequest(model=str(tiny_model), rank=RANK, resolution=RES, steps=2)
    cands = candidates(load_model_configs(str(tiny_model)), req)
    assert [c.fidelity_key for c in cands] == sorted(c.fidelity_key for c in cands)
    answer = fit_budget(req, parse_size("1GiB"), top=1)
    (best,) = answer.fits
    assert (best.method, best.precision, best.grad_checkpointing) == ("lora", "fp32", False)  # nothing hollowed, fp32
    assert best.peak == max(best.train_peak, best.precompute_peak, best.generate_peak) <= answer.budget
    assert best.generate_precision == "fp32" and best.generate_peak > 0  # generation fits too, at full precision
    assert "best fidelity that fits: hollownet train ... --method lora --precision fp32" in answer.format()
    json.dumps(answer.to_json())


def test_parse_size_units():  # the one size parser, as --budget and --memory-budget read it
    assert parse_size("2GB") == 2 * 10**9
    assert parse_size("1.5GiB") == parse_size("1.5G") == int(1.5 * 2**30)
    assert parse_size("800MB") == 800 * 10**6
    assert parse_size("512 MiB") == 512 * 2**20
    assert parse_size("3000") == parse_size(3000) == 3000  # a bare number counts bytes
    with pytest.raises(HollownetError):
        parse_size("lots")


def test_bundled_configs_and_paper_cut_shapes():
    for name in ("sd15", "sd21", "sdxl"):
        mc = load_model_configs(name)
        assert mc.unet["_class_name"] == "UNet2DConditionModel"
    mc = load_model_configs("sd21")
    assert mc.text_encoder["num_hidden_layers"] == 23 and mc.text_dim == 1024 == mc.unet["cross_attention_dim"]
    assert load_model_configs("sd15").text_dim == 768 == load_model_configs("sd15").unet["cross_attention_dim"]
    assert load_model_configs("sdxl").added_cond == {"text_embeds": (1280,), "time_ids": (6,)}
    plan = make_plan(meta_unet(mc.unet))
    assert plan.hollow_blocks == ["down_blocks.2.downsamplers", "down_blocks.3", "mid_block", "up_blocks.0"]
    assert hollow_out_shape(mc, plan, 512) == (1280, 16, 16)  # what stage 1 stores per sample at 512 px


def test_candidates_and_lower_bounds_sd21():
    cands = candidates(load_model_configs("sd21"), PlanRequest(model="sd21", rank=128))
    # plain LoRA + every cut (depth 0..11) x 12 modes: fp32/bf16 x checkpointing off/on, int8/nf4 x optimizer,
    # streamed fp32/bf16 x optimizer (hollow only)
    assert len(cands) == (1 + 12) * 12 - 4
    keys = [c.fidelity_key for c in cands]
    assert keys == sorted(keys)
    lora_fp32 = next(c for c in cands if c.method == "lora" and c.precision == "fp32")
    assert 3.2 * GiB < lora_fp32.lower_bound < 3.7 * GiB  # 866M fp32 weights + LoRA state
    paper = {(c.precision, c.stream_weights, c.in_backward): c for c in cands if c.depth == 3}
    assert paper["bf16", False, False].lower_bound < lora_fp32.lower_bound / 2
    # weights: bf16 2 B, int8 >= 1 B, nf4 >= 0.5 B a weight, streamed none resident; in-backward: no gradients
    assert paper["bf16", False, False].lower_bound > paper["int8", False, False].lower_bound > paper["nf4", False, False].lower_bound
    assert paper["nf4", False, False].lower_bound > paper["fp32", True, False].lower_bound > paper["fp32", True, True].lower_bound
    assert paper["fp32", True, True].flags()[1:] == ["--precision fp32", "--stream-weights", "--optimizer adamw-in-backward"]


def test_stage1_is_predicted_only_with_its_layout_decided():
    """A low-memory run's stage-1 layout is ``settle_stage1``'s decision (``hollownet train`` takes it before stage 1
    starts): predicting stage 1 without it would silently take ``PrecomputeConfig``'s layer-major default."""
    mc = load_model_configs("sd21")
    req = PlanRequest(model="sd21", modes=Modes(precision="nf4"))
    assert req.modes.stage1_unsettled
    with pytest.raises(ValueError, match="not decided"):
        stage1.predict_precompute(mc, req)
