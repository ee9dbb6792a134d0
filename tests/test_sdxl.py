"""SDXL end to end on a tiny random StableDiffusionXLPipeline saved to disk (hollownet.tiny.build_tiny_sdxl):
the family's conditioning is the pipeline's, stage 1 + stage 2 compute the U-Net's own function with SDXL's
added inputs, the LoRA loads in StableDiffusionXLPipeline, the kohya file has kohya's / ComfyUI's SDXL names,
generation runs two-path and merged. One trained run is shared by the module."""

import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image
from diffusers.utils import convert_unet_state_dict_to_peft
from peft import set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file

from hollownet.cut import load_unet_config, plan_for_blocks
from hollownet.families import SDXL_FAMILY, detect_family
from hollownet.stages import formats
from hollownet.stages.export import LORA_FILE
from hollownet.memory.tracker import PartMeter
from hollownet.stages.generate import GenerateConfig, encode_prompts, load_pipeline, run_generate, two_path_forward
from hollownet.stages.store import Store
from hollownet.stages.train import TrainConfig, build_model, predict
from hollownet.requests import TrainRequest
from hollownet.workflow import personalize

RES = 64
PROMPT = "a photo of sks dog"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sdxl_model(tmp_path_factory) -> Path:
    from hollownet.tiny import build_tiny_sdxl

    # CLIP's 77 tokens: layerwise.predict_peak assumes them for the U-Net part when it runs no text encoder itself
    return build_tiny_sdxl(tmp_path_factory.mktemp("tiny-sdxl"), max_length=77)


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Photos of different shapes: SDXL conditions on each one's original size and crop."""
    folder = tmp_path_factory.mktemp("sdxl-photos")
    g = torch.Generator().manual_seed(0)
    for name, (w, h) in {"wide.png": (96, 64), "tall.png": (64, 80), "square.png": (64, 64)}.items():
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / name)
    return folder


@pytest.fixture(scope="module")
def run(sdxl_model, photos, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sdxl-run") / "run"
    personalize(TrainRequest(model=str(sdxl_model), images=str(photos), prompt=PROMPT, output=str(out), resolution=RES,
                             steps=6, rank=4, lr=1e-2, checkpoint_every=0, track_memory=False))
    return out


def pipeline(model):
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(model, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_conditioning(pipe, prompt, negative_prompt, guided, resolution):
    """The reference: ``(text, added_cond_kwargs)`` as ``StableDiffusionXLPipeline.__call__`` builds them."""
    cond, uncond, pooled, pooled_uncond = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=guided,
                                                             negative_prompt=negative_prompt)
    size = (resolution, resolution)
    time_ids = pipe._get_add_time_ids(size, (0, 0), size, dtype=cond.dtype,
                                      text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim)
    if guided:
        return torch.cat([uncond, cond]), {"text_embeds": torch.cat([pooled_uncond, pooled]),
                                           "time_ids": torch.cat([time_ids, time_ids])}
    return cond, {"text_embeds": pooled, "time_ids": time_ids}


def test_family_is_detected_from_the_folder(sdxl_model, tiny_model):
    assert detect_family(sdxl_model) is SDXL_FAMILY
    assert detect_family(tiny_model).name == "sd"
    # SDXL's VAE overflows in fp16 (diffusers upcasts it): stage 1 and decoding run it in fp32 then
    assert SDXL_FAMILY.vae_dtype(torch.float16) == torch.float32 and SDXL_FAMILY.vae_dtype(torch.bfloat16) == torch.bfloat16
    assert detect_family(tiny_model).vae_dtype(torch.float16) == torch.float16


def test_prompt_tensors_are_the_pipelines(sdxl_model):
    """Stage 1's conditioning is StableDiffusionXLPipeline.encode_prompt's: both encoders' penultimate states
    concatenated, and the second encoder's pooled projection."""
    from hollownet.memory.tracker import PartMeter

    prompts = [PROMPT, "a dog on the beach"]
    got = SDXL_FAMILY.encode_prompts(sdxl_model, prompts, torch.float32, "cpu", PartMeter(False))
    pipe = pipeline(sdxl_model)
    for i, prompt in enumerate(prompts):
        embeds, _, pooled, _ = pipe.encode_prompt(prompt, device="cpu", do_classifier_free_guidance=False)
        torch.testing.assert_close(got["embeds"][i : i + 1], embeds, rtol=0, atol=0)
        torch.testing.assert_close(got["text_embeds"][i : i + 1], pooled, rtol=0, atol=1e-6)  # batched: rounding


def test_time_ids_follow_the_crop():
    """(original h, w, crop top, left, target h, w): the short side resized to the resolution, center-cropped."""
    ids = SDXL_FAMILY.photo_time_ids([(64, 96), (80, 64), (1024, 1024), (3000, 4000)], 64)
    assert ids.tolist() == [[64, 96, 0, 16, 64, 64], [80, 64, 8, 0, 64, 64], [1024, 1024, 0, 0, 64, 64], [3000, 4000, 0, 10, 64, 64]]
    # diffusers' SDXL DreamBooth script: Resize(1024) makes 4000x3000 1365x1024 (truncated), round(341 / 2) = 170
    assert SDXL_FAMILY.photo_time_ids([(3000, 4000)], 1024).tolist() == [[3000, 4000, 0, 170, 1024, 1024]]


def test_store_holds_each_samples_added_inputs(run):
    store = Store(run / "store")
    manifest = store.manifest()
    batch = store.samples(list(range(manifest["num_samples"])), keys=("prompt_index", "text_embeds", "time_ids"))
    pooled = store.tensors("prompts.safetensors")["text_embeds"]
    photo_ids = store.tensors("latents.safetensors")["time_ids"]
    assert manifest["family"] == "sdxl"
    torch.testing.assert_close(batch["text_embeds"], pooled[batch["prompt_index"]])
    want = photo_ids[[s["latent"] for s in manifest["samples"]]]
    torch.testing.assert_close(batch["time_ids"], want)
    assert {tuple(r) for r in photo_ids.tolist()} == {(64.0, 96.0, 0.0, 16.0, 64.0, 64.0), (80.0, 64.0, 8.0, 0.0, 64.0, 64.0),
                                                      (64.0, 64.0, 0.0, 0.0, 64.0, 64.0)}


def test_stage1_and_stage2_compute_the_unets_function(run, sdxl_model):
    """Before training (LoRA zero), the hollowed network on the stored hollow output equals
    ``unet(x, t, text, added_cond_kwargs=...)`` on every stored sample: the added inputs reach both stages."""
    from diffusers import UNet2DConditionModel

    store = Store(run / "store")
    manifest = store.manifest()
    cfg = TrainConfig(model=str(sdxl_model), store=str(run / "store"), output="unused", rank=4)
    unet, plan, _ = build_model(sdxl_model, manifest, cfg)
    full = UNet2DConditionModel.from_pretrained(sdxl_model / "unet").eval()
    batch = store.samples(list(range(manifest["num_samples"])), keys=("noisy", "timestep", "prompt_index", "hollow_out",
                                                                      "text_embeds", "time_ids"))
    embeds = store.tensors("prompts.safetensors")["embeds"]
    with torch.no_grad():
        got = predict(unet, plan, batch, embeds, torch.float32, "cpu")
        want = full(batch["noisy"], batch["timestep"], embeds[batch["prompt_index"]],
                    added_cond_kwargs={"text_embeds": batch["text_embeds"], "time_ids": batch["time_ids"]}).sample
        other = full(batch["noisy"], batch["timestep"], embeds[batch["prompt_index"]],
                     added_cond_kwargs={"text_embeds": batch["text_embeds"], "time_ids": batch["time_ids"] * 2}).sample
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (other - want).abs().max() > 1e-4  # the time ids matter: a test that could fail


@pytest.fixture(scope="module")
def loaded(run, sdxl_model):
    """One StableDiffusionXLPipeline with both LoRA files loaded by ``load_lora_weights`` (adapters
    ``diffusers`` and ``kohya``), and a U-Net input: ``(pipe, unet_out(adapter or None))``."""
    pipe = pipeline(sdxl_model)
    pipe.load_lora_weights(run, weight_name=LORA_FILE, adapter_name="diffusers")
    with warnings.catch_warnings():  # peft: "multiple adapters in the model", which is the point here
        warnings.simplefilter("ignore", UserWarning)
        pipe.load_lora_weights(run, weight_name=formats.KOHYA_FILE, adapter_name="kohya")
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    text, added = pipeline_conditioning(pipe, PROMPT, None, False, RES)

    @torch.no_grad()
    def unet_out(adapter):
        if adapter is None:
            pipe.disable_lora()
        else:
            pipe.enable_lora()
            pipe.set_adapters(adapter)
        return pipe.unet(x, t, text, added_cond_kwargs=added).sample

    return pipe, unet_out


def test_lora_loads_in_stable_diffusion_xl_pipeline(run, loaded):
    """``StableDiffusionXLPipeline.load_lora_weights`` takes the diffusers file: every LoRA module lands in the
    U-Net, and the output changes."""
    pipe, unet_out = loaded
    with safe_open(run / LORA_FILE, "pt") as f:
        modules = {k.removeprefix("unet.").rsplit(".lora", 1)[0] for k in f.keys()}
    have = {name for name, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "diffusers" in m.lora_A}
    assert modules and have == modules
    assert (unet_out("diffusers") - unet_out(None)).abs().max() > 1e-4


# kohya's / ComfyUI's SDXL names (comfy/utils.py unet_to_diffusers on SDXL 1.0's U-Net), module by module
SAI_NAMES = {
    "down_blocks.0.resnets.1.time_emb_proj": "input_blocks.2.0.emb_layers.1",
    "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op",
    "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q": "input_blocks.4.1.transformer_blocks.1.attn1.to_q",
    "down_blocks.2.attentions.1.proj_in": "input_blocks.8.1.proj_in",
    "mid_block.resnets.0.conv1": "middle_block.0.in_layers.2",
    "mid_block.attentions.0.transformer_blocks.9.attn2.to_k": "middle_block.1.transformer_blocks.9.attn2.to_k",
    "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3",
    "up_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0": "output_blocks.0.1.transformer_blocks.0.attn1.to_out.0",
    "up_blocks.0.upsamplers.0.conv": "output_blocks.2.2.conv",
    "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.2": "output_blocks.5.1.transformer_blocks.0.ff.net.2",
    "up_blocks.2.resnets.0.conv_shortcut": "output_blocks.6.0.skip_connection",
    "up_blocks.2.resnets.2.conv1": "output_blocks.8.0.in_layers.2",
}


def test_sai_names_follow_comfyuis_sdxl_map():
    config = load_unet_config("sdxl")
    assert {m: formats.sai_module(m, config) for m in SAI_NAMES} == SAI_NAMES
    assert formats.kohya_sdxl_name("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", config) == \
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"


def test_kohya_file_has_sdxl_names_and_diffusers_reads_it_back(run, loaded):
    """The kohya file: SAI names only, the same LoRA as the diffusers file (max |dW| 0), and diffusers' own
    SDXL loader (which maps SAI names with _maybe_map_sgm_blocks_to_diffusers) gives the same U-Net output."""
    kohya = run / formats.KOHYA_FILE
    with safe_open(kohya, "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and all(k.startswith(formats.SAI_BLOCKS) for k in keys)
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    ours, layout = formats.read_lora(kohya)
    theirs, _ = formats.read_lora(run / LORA_FILE)
    assert layout == "kohya" and formats.max_weight_diff(ours, theirs) == 0.0
    pipe, unet_out = loaded
    have = {name for name, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and "kohya" in m.lora_A}
    assert have == set(theirs.modules())  # every SAI name mapped to its module by diffusers' reader
    torch.testing.assert_close(unet_out("kohya"), unet_out("diffusers"), rtol=1e-5, atol=1e-6)


def test_convert_keeps_sdxl_names(run, tmp_path):
    done = formats.convert(run / LORA_FILE, tmp_path / "k.safetensors", to="kohya")
    assert done["max_abs_diff"] == 0.0
    with safe_open(tmp_path / "k.safetensors", "pt") as f:
        assert all(k.startswith(formats.SAI_BLOCKS) for k in f.keys())


def test_two_path_inference_reproduces_the_trained_function(run, sdxl_model):
    store = Store(run / "store")
    batch = store.samples([0, 3], keys=("noisy", "timestep", "prompt_index", "hollow_out", "text_embeds", "time_ids"))
    embeds = store.tensors("prompts.safetensors")["embeds"]
    parts, info = load_pipeline(str(sdxl_model), str(run), "fp32", "cpu", "ddim")
    unet = parts.unet()  # generation's U-Net: the builder's loader, the LoRA unmerged on it
    plan = plan_for_blocks(unet, info["hollow_blocks"])
    added = {"text_embeds": batch["text_embeds"], "time_ids": batch["time_ids"]}
    cfg = TrainConfig(model=str(sdxl_model), store=str(run / "store"), output="unused", rank=4)
    hollowed, hplan, _ = build_model(sdxl_model, store.manifest(), cfg)
    saved = load_file(run / LORA_FILE)  # the exported LoRA loaded back into the network as trained
    set_peft_model_state_dict(hollowed, convert_unet_state_dict_to_peft({k[5:]: v for k, v in saved.items()}))
    with torch.no_grad():
        two_path = two_path_forward(unet, plan, batch["noisy"], batch["timestep"], embeds[batch["prompt_index"]], added)
        trained = predict(hollowed, hplan, batch, embeds, torch.float32, "cpu")
    torch.testing.assert_close(two_path, trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("negative", [None, "blurry"])
@pytest.mark.parametrize("guided", [True, False])
def test_generation_conditioning_is_the_pipelines(sdxl_model, guided, negative):
    """Generation's text-encoder part (both encoders built on meta, loaded by the builder's loader, one at a time)
    gives StableDiffusionXLPipeline's conditioning: penultimate states concatenated, encoder 2's pooled projection,
    time ids (r, r, 0, 0, r, r); no negative prompt: zeros (its config's force_zeros_for_empty_prompt)."""
    parts, _ = load_pipeline(str(sdxl_model), None, "fp32", "cpu", "dpm")
    prompts = [PROMPT, "a dog on the beach"]
    meter = PartMeter(True)
    got = encode_prompts(parts, prompts, negative, guided, RES, meter)
    assert set(meter.parts) == {"text encoder", "text encoder 2"}
    pipe = pipeline(sdxl_model)
    assert pipe.config.force_zeros_for_empty_prompt
    for prompt in prompts:
        text, added = pipeline_conditioning(pipe, prompt, negative, guided, RES)
        torch.testing.assert_close(got[prompt].text, text, rtol=0, atol=1e-6)  # batched with the others: rounding
        assert got[prompt].added.keys() == added.keys()
        torch.testing.assert_close(got[prompt].added["text_embeds"], added["text_embeds"], rtol=0, atol=1e-6)
        torch.testing.assert_close(got[prompt].added["time_ids"], added["time_ids"], rtol=0, atol=0)
        if guided:  # the test can fail: a negative prompt is encoded, none is zeros
            assert (text[0].abs().max() == 0) == (negative is None)


@pytest.mark.parametrize("scheduler", ["dpm", "ddim"])
def test_base_model_images_are_stable_diffusion_xl_pipelines(sdxl_model, tmp_path, scheduler):
    """No LoRA: ``hollownet generate`` (no pipeline: three parts in turn) draws StableDiffusionXLPipeline's image
    for the same seed and sampler (noise drawn the same way: fp32 randn on a CPU generator), to one 8-bit step."""
    import numpy as np
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    record = run_generate(GenerateConfig(model=str(sdxl_model), lora=None, prompt=PROMPT, output=str(tmp_path), steps=3,
                                         num_images=2, seed=5, guidance=5.0, scheduler=scheduler, resolution=RES))
    pipe = pipeline(sdxl_model)
    cls = {"dpm": DPMSolverMultistepScheduler, "ddim": DDIMScheduler}[scheduler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config)
    for i, name in enumerate(record["images"]):
        ours = np.asarray(Image.open(tmp_path / name), dtype=np.int16)
        theirs = np.asarray(pipe(PROMPT, height=RES, width=RES, num_inference_steps=3, guidance_scale=5.0,
                                 generator=torch.Generator().manual_seed(5 + i)).images[0], dtype=np.int16)
        assert np.abs(ours - theirs).max() <= 1, np.abs(ours - theirs).max()
        assert ours.std() > 1  # a real image, not a constant one
    assert record["memory"]["parts"].keys() == {"text encoder", "text encoder 2", "U-Net", "VAE decoder"}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_generation_peak_equals_its_plan(run, sdxl_model, tmp_path, precision):
    """``hollownet plan`` predicts SDXL generation (both encoders, two-path with the added inputs, the VAE in fp32
    for fp16) to the byte, part by part: generate's own code on fake parts."""
    from hollownet.memory.planner import plan_memory
    from hollownet.requests import PlanRequest
    from hollownet.settings import Modes

    record = run_generate(GenerateConfig(model=str(sdxl_model), lora=str(run), prompt=PROMPT, output=str(tmp_path),
                                         steps=4, num_images=2, precision=precision))
    plan = plan_memory(PlanRequest(model=str(sdxl_model), rank=4, resolution=RES, gen_steps=4, num_images=2,
                                   modes=Modes(precision=precision)), stages=("generate",))
    assert record["mode"] == "two-path"
    assert plan.generate["parts"] == record["memory"]["parts"]
    assert plan.generate["peak_bytes"] == record["memory"]["peak_bytes"] > 0
    assert plan.generate["breakdown"] == record["memory"]["breakdown"]


@pytest.mark.parametrize("merged", [False, True])
def test_generate_two_path_and_merged(run, sdxl_model, tmp_path, merged):
    record = run_generate(GenerateConfig(model=str(sdxl_model), lora=str(run), prompt="a sks dog on the beach",
                                         output=str(tmp_path), steps=2, num_images=1, merged=merged, guidance=5.0))
    assert record["mode"] == ("merged" if merged else "two-path") and record["resolution"] == RES
    image = Image.open(tmp_path / record["images"][0])
    assert image.size == (RES, RES)


@pytest.mark.parametrize("method", ["hollow", "lora"])
def test_plan_equals_the_measured_peaks(sdxl_model, photos, tmp_path, method):
    """``hollownet plan`` on an SDXL folder (both text encoders, the added inputs in stage 1 and 2) against a
    real stage 1 + 2 training steps with exact memory tracking: the same bytes, part by part."""
    from hollownet.memory.planner import plan_memory
    from hollownet.requests import PlanRequest
    from hollownet.stages.precompute import PrecomputeConfig, run_precompute
    from hollownet.stages.train import run_train

    store = tmp_path / "store"
    pre = run_precompute(PrecomputeConfig(model=str(sdxl_model), images=str(photos), prompt=PROMPT, output=str(store),
                                          method=method, resolution=RES, num_samples=2, shard_size=2), track_memory=True)
    train = run_train(TrainConfig(model=str(sdxl_model), store=str(store), output=str(tmp_path / "out"), method=method,
                                  rank=4, steps=2, track_memory_steps=2, checkpoint_every=0))
    plan = plan_memory(PlanRequest(model=str(sdxl_model), method=method, rank=4, resolution=RES, steps=2, photos=3),
                       stages=("precompute", "train"))
    assert set(pre.memory["parts"]) >= {"text encoder", "text encoder 2", "VAE encoder"}
    assert plan.precompute["parts"] == pre.memory["parts"]
    assert plan.train.peak_bytes == train.memory["peak_bytes"]
    assert plan.train.breakdown == train.memory["breakdown"]


def test_bench_inference_peak_equals_the_plan(sdxl_model):
    """The bench's measured inference peak (one U-Net step with SDXL's added inputs) is the planner's prediction."""
    from hollownet.evaluation.bench import measure_inference_peak
    from hollownet.memory.planner import plan_memory
    from hollownet.requests import PlanRequest

    measured = measure_inference_peak(sdxl_model, resolution=RES)
    plan = plan_memory(PlanRequest(model=str(sdxl_model), resolution=RES), stages=("inference",))
    assert measured["peak_bytes"] == plan.inference[1].peak_bytes > measured["weights_bytes"]


def test_layer_major_stage1_writes_the_same_store(run, sdxl_model, photos, tmp_path):
    """Layer-major stage 1 (both text encoders and the U-Net one layer at a time, a budget that forces small
    chunks) writes the sample-major store: prompt tensors, time ids and every sample's added inputs and hollow output."""
    from hollownet.stages.precompute import PrecomputeConfig, run_precompute

    out = tmp_path / "store"
    run_precompute(PrecomputeConfig(model=str(sdxl_model), images=str(photos), prompt=PROMPT, output=str(out),
                                    resolution=RES, num_samples=6, layer_major=True, memory_budget="2MiB"),
                   track_memory=False)
    want, got = Store(run / "store"), Store(out)
    for name in ("prompts.safetensors", "latents.safetensors", "shard-00000.safetensors"):
        a, b = want.tensors(name), got.tensors(name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-5)
    assert {"text_embeds", "time_ids", "hollow_out"} <= set(got.tensors("shard-00000.safetensors"))


@pytest.mark.parametrize("layer_major", [False, True])
def test_fp16_stage1_plan_counts_the_vae_in_fp32(sdxl_model, photos, tmp_path, layer_major):
    """An fp16 stage 1 runs SDXL's VAE in fp32 (it overflows in fp16): the plan counts it so, part by part."""
    from hollownet.memory.planner import plan_memory
    from hollownet.requests import PlanRequest
    from hollownet.settings import Modes
    from hollownet.stages.precompute import PrecomputeConfig, run_precompute

    lm = dict(layer_major=True, memory_budget="3MiB") if layer_major else {}
    pre = run_precompute(PrecomputeConfig(model=str(sdxl_model), images=str(photos), prompt=PROMPT, output=str(tmp_path),
                                          resolution=RES, num_samples=2, shard_size=2, precision="fp16", **lm),
                         track_memory=True)
    plan = plan_memory(PlanRequest(model=str(sdxl_model), rank=4, resolution=RES, steps=2, photos=3,
                                   modes=Modes(precision="fp16", **lm)), stages=("precompute",))
    measured: dict[str, int] = {}
    for layer, peak in pre.memory["parts"].items():
        measured[layer.split(":")[0]] = max(measured.get(layer.split(":")[0], 0), peak)
    assert plan.precompute["parts"] == measured
    fp32 = plan_memory(PlanRequest(model=str(sdxl_model), rank=4, resolution=RES, steps=2, photos=3,
                                   modes=Modes(precision="fp32", **lm)), stages=("precompute",))
    assert plan.precompute["parts"]["VAE encoder"] == fp32.precompute["parts"]["VAE encoder"]


def test_layer_major_plan_equals_the_measured_peaks(sdxl_model, photos, tmp_path):
    """``hollownet plan`` of a layer-major stage 1 on an SDXL folder (both encoders through lowmem/sdxl_text.py,
    the U-Net with its added inputs) against the real run, layer by layer grouped by part: the same bytes."""
    from hollownet.memory.planner import plan_memory
    from hollownet.requests import PlanRequest
    from hollownet.settings import Modes
    from hollownet.stages.precompute import PrecomputeConfig, run_precompute

    budget = "3MiB"
    pre = run_precompute(PrecomputeConfig(model=str(sdxl_model), images=str(photos), prompt=PROMPT, output=str(tmp_path),
                                          resolution=RES, num_samples=2, shard_size=2, layer_major=True,
                                          memory_budget=budget), track_memory=True)
    plan = plan_memory(PlanRequest(model=str(sdxl_model), rank=4, resolution=RES, steps=2, photos=3,
                                   modes=Modes(layer_major=True, memory_budget=budget)), stages=("precompute",))
    measured: dict[str, int] = {}
    for layer, peak in pre.memory["parts"].items():
        measured[layer.split(":")[0]] = max(measured.get(layer.split(":")[0], 0), peak)
    assert set(measured) == {"text encoder", "text encoder 2", "VAE encoder", "U-Net encoder + hollow"}
    assert plan.precompute["parts"] == measured
    assert plan.precompute["peak_bytes"] == pre.memory["peak_bytes"]


def test_unknown_sdxl_kohya_name_is_refused_in_one_line():
    from hollownet.errors import HollownetError

    bogus = {"lora_unet_input_blocks_99_1_proj_in.lora_down.weight": torch.zeros(1, 4),
             "lora_unet_input_blocks_99_1_proj_in.lora_up.weight": torch.zeros(4, 1)}
    with pytest.raises(HollownetError, match="no module of an SDXL U-Net"):
        formats.from_kohya(bogus)
    with pytest.raises(HollownetError, match="no name in kohya's SDXL layout"):
        formats.sai_module("down_blocks.1.attentions", load_unet_config("sdxl"))
