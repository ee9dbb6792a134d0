"""Layer-major stage 1 (layerwise.py): same store as sample-major, every part equal to its model's
forward, the spill path, memory accounting, interruption."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import hollownet.lowmem.layerwise as LW
import hollownet.stages.store as store_mod

# A 1-byte budget (everything spilled, one sample per chunk) is below every layer's need: expected.
pytestmark = pytest.mark.filterwarnings("ignore::hollownet.lowmem.layerwise.BudgetWarning")


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """The tiny model's ops are too small to share between threads; on a loaded machine two OpenMP
    threads make these tests ~10x slower (every op waits for a descheduled thread), one does not."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
from hollownet.errors import HollownetError
from hollownet.memory.tracker import MemoryTracker
from hollownet.stages.precompute import PrecomputeConfig, run_precompute
from hollownet.stages.store import Store

from conftest import RES


def config(model, photos, out, **kw):
    base = dict(model=str(model), images=str(photos), prompt="a photo of sks dog", output=str(out), resolution=RES,
                num_samples=12, shard_size=5)
    return PrecomputeConfig(**{**base, **kw})


def assert_same_store(a, b, atol=1e-5):
    """Every tensor file of two stores, and the manifests' sample tables and identity."""
    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert files == sorted(p.name for p in b.glob("*.safetensors")) and files
    for f in files:
        x, y = load_file(a / f), load_file(b / f)
        assert x.keys() == y.keys(), f
        for k in x:
            assert x[k].dtype == y[k].dtype and x[k].shape == y[k].shape, (f, k)
            torch.testing.assert_close(x[k], y[k], rtol=1e-5, atol=atol, msg=f"{f}:{k}")
    ma, mb = Store(a).manifest(), Store(b).manifest()
    # the files' checksums differ where the tensors differ by rounding (compared above, to atol); their names not
    assert {k: v for k, v in ma.items() if k != "files"} == {k: v for k, v in mb.items() if k != "files"}
    assert ma["files"].keys() == mb["files"].keys()


def no_scratch(root):
    return not (root / LW.SCRATCH).exists() and not list(root.glob(".*.tmp"))


def test_layer_major_store_equals_sample_major(tiny_model, dog_photos, hollow_store, tmp_path):
    root = tmp_path / "s"
    result = run_precompute(config(tiny_model, dog_photos, root, layer_major=True), track_memory=False)
    assert Store(root).is_complete() and result.resumed_shards == 0
    assert_same_store(root, hollow_store)
    assert no_scratch(root)
    assert result.layer_major["spilled_bytes"] == 0  # no budget: every activation stays in RAM


def test_other_cut_odd_latents_and_everything_spilled(tiny_model, dog_photos, tmp_path, monkeypatch):
    """A deeper cut at 48 px (6x6 latents: the hollow's upsamplers get explicit sizes); a 1-byte
    budget sends every activation array to a memmap and runs one sample per chunk."""
    cut = ["down_blocks.1.downsamplers", "down_blocks.2", "down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.1"]
    kw = dict(resolution=48, num_samples=6, shard_size=4, hollow_blocks=cut)
    run_precompute(config(tiny_model, dog_photos, tmp_path / "sm", **kw), track_memory=False)
    memmaps = []
    real = np.lib.format.open_memmap
    monkeypatch.setattr(np.lib.format, "open_memmap", lambda *a, **k: memmaps.append(a[0]) or real(*a, **k))
    result = run_precompute(config(tiny_model, dog_photos, tmp_path / "lm", layer_major=True, memory_budget=1, **kw),
                            track_memory=False)
    assert_same_store(tmp_path / "lm", tmp_path / "sm")
    assert result.layer_major["spilled_bytes"] > 0 and len(memmaps) > 30
    assert all(LW.SCRATCH in str(p) for p in memmaps) and no_scratch(tmp_path / "lm")
    for part in ("text encoder", "VAE encoder", "U-Net encoder + hollow"):
        assert {s["chunk"] for s in result.layer_major[part]} == {1}
    assert Store(tmp_path / "lm").manifest()["hollow_blocks"] == cut


def test_text_encoder_layerwise_equals_clip(tiny_model, tmp_path):
    from transformers import AutoTokenizer, CLIPTextModel

    tok = AutoTokenizer.from_pretrained(tiny_model / "tokenizer")
    ids = tok(["a photo of sks dog", "a photo of a dog, high quality"], padding="max_length",
              max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        want = CLIPTextModel.from_pretrained(tiny_model / "text_encoder").eval()(ids)[0]
    for budget in (None, 1):
        got, stats = LW.embed_prompts(tiny_model, ["a photo of sks dog", "a photo of a dog, high quality"], torch.float32,
                                      "cpu", None, budget=budget, scratch=tmp_path / "x")
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert [s.name for s in stats] == ["embeddings", "encoder.layers.0", "encoder.layers.1", "final_layer_norm"]


def test_text_encoder_reads_only_the_used_token_rows(tiny_model):
    from transformers import CLIPTextConfig, CLIPTextModel

    from hollownet.loading import weight_files

    ids = torch.tensor([[512, 70, 71, 70, 513, 513]])
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig.from_pretrained(tiny_model / "text_encoder")).eval()
    weights = LW.FileWeights(model, weight_files(tiny_model, "text_encoder"), torch.float32)
    LW.run_text_encoder(model, ids, weights)
    assert model.embeddings.token_embedding.weight.shape[0] == 4  # rows 70, 71, 512, 513 of 514
    assert model.embeddings.token_embedding.weight.device.type == "meta"  # and freed again


def test_vae_encoder_layerwise_equals_encoder(tiny_model):
    from diffusers import AutoencoderKL

    from hollownet.loading import weight_files
    from hollownet.memory.tracker import PartMeter
    from hollownet.stages.precompute import encode_photos

    pixels = torch.rand(5, 3, 64, 64) * 2 - 1
    vae = AutoencoderKL.from_pretrained(tiny_model / "vae").eval()
    with torch.no_grad():
        moments = vae.quant_conv(vae.encoder(pixels))
    with torch.device("meta"):
        skeleton = AutoencoderKL.from_config(AutoencoderKL.load_config(tiny_model / "vae"))
    skeleton.eval()
    layers, out = LW.vae_encoder_layers(skeleton, torch.float32)
    arrays = LW.Arrays(5)
    arrays.adopt("pixels", pixels)
    weights = LW.FileWeights(skeleton, weight_files(tiny_model, "vae"), torch.float32)
    LW.run_layers(layers, arrays, weights, LW.RunOptions(batch_size=2), keep={out})
    torch.testing.assert_close(arrays.read(out, 0, 5), moments, rtol=1e-5, atol=1e-5)
    assert weights.read_keys and not any(k.startswith(("decoder.", "post_quant_conv.")) for k in weights.read_keys)
    # the whole part, noise included, is precompute.encode_photos's math
    want = encode_photos(tiny_model, pixels, 7, torch.float32, "cpu", 2, PartMeter(False, "cpu"))
    got, _ = LW.encode_photos(tiny_model, pixels, 7, torch.float32, "cpu", 2, None)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # random weights instead of the file's (benchmarks): seeded, finite, and not the file's numbers
    rand = [LW.run_vae_encoder(skeleton, pixels, 7, LW.EmptyWeights(skeleton, torch.float32, init_std=0.05, seed=3),
                               dtype=torch.float32)[0] for _ in range(2)]
    assert torch.equal(rand[0], rand[1]) and rand[0].isfinite().all() and not torch.allclose(rand[0], want)


def test_unet_layerwise_equals_hollow_output_for_every_cut(tiny_model, tmp_path):
    """Every cut depth, odd non-square latents (5x7), with and without spilling."""
    from diffusers import UNet2DConditionModel

    from hollownet import unet_split as H
    from hollownet.loading import load_unet, weight_files
    from hollownet.cut import make_plan, max_depth, meta_unet, unit_modules

    unet, _ = load_unet(tiny_model)
    g = torch.Generator().manual_seed(0)
    n = 3
    x, t = torch.randn(n, 4, 5, 7, generator=g), torch.randint(0, 1000, (n,), generator=g)
    embeds, prompt_index = torch.randn(2, 32, 32, generator=g), torch.tensor([0, 1, 1])
    for depth in range(max_depth(unet) + 1):
        plan = make_plan(unet, depth)
        with torch.no_grad():
            want = H.hollow_output(unet, plan, x, t, embeds[prompt_index])
        budget = 1 if depth % 3 == 0 else None
        skeleton = meta_unet(UNet2DConditionModel.load_config(tiny_model / "unet")).requires_grad_(False).eval()
        weights = LW.FileWeights(skeleton, weight_files(tiny_model), torch.float32)
        arrays = LW.Arrays(n, tmp_path / f"scratch-{depth}", budget)
        arrays.write("noisy", 0, n, x)
        arrays.write("timestep", 0, n, t)
        out, _ = LW.run_unet_hollow(skeleton, plan, arrays, weights, embeds, prompt_index,
                                    LW.RunOptions(budget=budget, batch_size=2), dtype=torch.float32)
        got = arrays.read(out, 0, n).clone()
        arrays.close()
        assert not (tmp_path / f"scratch-{depth}").exists()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"depth {depth}")
        kept_up = [m for u in plan.kept_up for m in unit_modules(unet, u)] + ["conv_norm_out", "conv_out"]
        assert not any(k.startswith(tuple(p + "." for p in kept_up)) for k in weights.read_keys)


def test_a_spilled_chunk_counts_as_its_slice_from_its_creation(tmp_path):
    """torch.from_numpy(memmap[a:b]) is a storage of the slice's size, counted when it is made
    (not from the start of tracking), so reading chunk after chunk costs one chunk, not the file."""
    arrays = LW.Arrays(100, tmp_path / "scratch", budget=1)
    arrays.write("a", 0, 100, torch.arange(100 * 250, dtype=torch.float32).view(100, 250))
    assert "a" in arrays.spilled and arrays.ram_bytes() == 0
    chunk_bytes = 10 * 250 * 4
    tracker = MemoryTracker("cpu")
    with tracker:
        for a in range(0, 100, 10):
            x = arrays.read("a", a, a + 10)
            assert x.untyped_storage().nbytes() == chunk_bytes
            y = x * 2
            del x, y
    assert tracker.report.peak_bytes == 2 * chunk_bytes  # the chunk read + its product
    torch.testing.assert_close(arrays.read("a", 40, 41)[0, :3], torch.tensor([10000.0, 10001.0, 10002.0]))
    arrays.close()
    assert not (tmp_path / "scratch").exists()


def test_bf16_activations_spill_as_raw_bits(tmp_path):
    arrays = LW.Arrays(6, tmp_path / "s", budget=1)
    x = torch.randn(6, 3, 2, 2).to(torch.bfloat16)
    arrays.write("x", 0, 3, x[:3])
    arrays.write("x", 3, 6, x[3:])
    assert torch.equal(arrays.read("x", 0, 6), x) and arrays.read("x", 0, 6).dtype == torch.bfloat16
    arrays.close()


def test_layer_major_peak_is_below_sample_major_and_within_budget(tiny_model, dog_photos, tmp_path):
    kw = dict(num_samples=8, shard_size=8)
    sm = run_precompute(config(tiny_model, dog_photos, tmp_path / "sm", **kw)).memory
    lm = run_precompute(config(tiny_model, dog_photos, tmp_path / "lm", layer_major=True, **kw)).memory
    budget = 1 << 20
    lmb = run_precompute(config(tiny_model, dog_photos, tmp_path / "lmb", layer_major=True, memory_budget="1MiB", **kw)).memory
    assert lmb["peak_bytes"] <= budget < sm["peak_bytes"]
    assert lm["peak_bytes"] < sm["peak_bytes"]
    # one part per layer, each measured: the peak is the largest layer's (weights + activations)
    assert len(lmb["parts"]) > 40 and lmb["peak_bytes"] == max(lmb["parts"].values())
    assert lmb["peak_phase"].split(":")[0] in ("text encoder", "VAE encoder", "U-Net encoder + hollow")
    assert_same_store(tmp_path / "lmb", tmp_path / "sm")


def test_fake_and_real_layer_major_measurements_agree(tiny_model, tmp_path):
    """The FakeTensorMode path the benchmark uses (EmptyWeights, simulated spill, repeated chunks
    skipped) measures what the real run measures, layer by layer, to the byte."""
    from diffusers import UNet2DConditionModel
    from torch._subclasses import FakeTensorMode

    from hollownet.loading import weight_files
    from hollownet.cut import make_plan, meta_unet
    from hollownet.memory.tracker import PartMeter

    n, budget = 11, 300_000
    g = torch.Generator().manual_seed(0)
    x, t, embeds = torch.randn(n, 4, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g), torch.randn(1, 32, 32)
    parts = []
    for fake in (False, True):
        skeleton = meta_unet(UNet2DConditionModel.load_config(tiny_model / "unet")).requires_grad_(False).eval()
        plan = make_plan(skeleton)
        meter = PartMeter(True, "cpu")
        mode = FakeTensorMode() if fake else None
        with mode or torch.no_grad():
            args = [mode.from_tensor(v) for v in (x, t, embeds)] if fake else [x, t, embeds]
            weights = LW.EmptyWeights(skeleton, torch.float32) if fake else LW.FileWeights(skeleton, weight_files(tiny_model), torch.float32)
            arrays = LW.Arrays(n, tmp_path / "agree", budget, simulate=fake)
            arrays.write("noisy", 0, n, args[0])
            arrays.write("timestep", 0, n, args[1])
            pi = torch.zeros(n, dtype=torch.long)
            _, stats = LW.run_unet_hollow(skeleton, plan, arrays, weights, args[2], pi,
                                          LW.RunOptions(meter=meter, budget=budget, batch_size=4), dtype=torch.float32)
            arrays.close()
        parts.append((meter.summary()["parts"], [(s.name, s.chunk, s.work_per_sample) for s in stats], dict(arrays.spilled)))
    assert parts[0] == parts[1]
    assert parts[0][2] and max(c for _, c, _ in parts[0][1]) > 1  # some arrays spilled, some chunks > 1 sample


def test_interrupted_layer_major_run_leaves_no_half_store(tiny_model, dog_photos, hollow_store, tmp_path, monkeypatch):
    root = tmp_path / "s"
    real = LW.run_layers
    calls = []

    def crash_in_the_unet(layers, *a, **kw):
        calls.append(kw.get("part"))
        if kw.get("part") == "U-Net encoder + hollow":
            real(layers[:5], *a, **kw)
            raise KeyboardInterrupt
        return real(layers, *a, **kw)

    monkeypatch.setattr(LW, "run_layers", crash_in_the_unet)
    with pytest.raises(KeyboardInterrupt):
        run_precompute(config(tiny_model, dog_photos, root, layer_major=True, memory_budget=1), track_memory=False)
    monkeypatch.setattr(LW, "run_layers", real)
    assert Store(root).done_shards() == set() and no_scratch(root)
    (root / LW.SCRATCH / "unet").mkdir(parents=True)  # as a hard kill would leave it
    (root / LW.SCRATCH / "unet" / "0000-conv_in.npy").write_bytes(b"junk")
    result = run_precompute(config(tiny_model, dog_photos, root, layer_major=True, memory_budget=1), track_memory=False)
    assert result.resumed_shards == 0 and no_scratch(root)
    assert_same_store(root, hollow_store)


def test_layer_major_resumes_a_sample_major_store(tiny_model, dog_photos, hollow_store, tmp_path, monkeypatch):
    """Same store identity in both modes: a layer-major rerun finishes an interrupted sample-major
    run (computing only the unfinished shards' samples), and vice versa."""
    real = store_mod.Store.mark_done

    def crash_after(n):
        calls = []

        def mark_done(self, shard):
            real(self, shard)
            calls.append(shard)
            if len(calls) == n:
                raise KeyboardInterrupt
        return mark_done

    for first, second in ((dict(), dict(layer_major=True)), (dict(layer_major=True), dict())):
        root = tmp_path / f"s{len(first)}"
        monkeypatch.setattr(store_mod.Store, "mark_done", crash_after(1))
        with pytest.raises(KeyboardInterrupt):
            run_precompute(config(tiny_model, dog_photos, root, **first), track_memory=False)
        monkeypatch.setattr(store_mod.Store, "mark_done", real)
        assert Store(root).done_shards() == {0}
        result = run_precompute(config(tiny_model, dog_photos, root, **second), track_memory=False)
        assert result.resumed_shards == 1 and no_scratch(root)
        if second:
            assert len(result.layer_major["U-Net encoder + hollow"]) > 0
        assert_same_store(root, hollow_store)


@pytest.mark.filterwarnings("error::hollownet.lowmem.layerwise.BudgetWarning")
def test_a_budget_too_small_for_one_sample_warns(tiny_model, tmp_path):
    with pytest.warns(LW.BudgetWarning, match="VAE encoder: the memory budget .* below what .* need for a single sample"):
        LW.encode_photos(tiny_model, torch.zeros(2, 3, 64, 64), 0, torch.float32, "cpu", 2, None, budget=1000,
                         scratch=tmp_path / "s")
    LW.encode_photos(tiny_model, torch.zeros(2, 3, 64, 64), 0, torch.float32, "cpu", 2, None, budget=1 << 20,
                     scratch=tmp_path / "s")  # enough: no warning


def test_budget_parsing_and_validation(tiny_model, dog_photos, tmp_path):
    from hollownet.stages.precompute import budget_bytes

    assert budget_bytes(config(tiny_model, dog_photos, tmp_path, layer_major=True, memory_budget="0.8GiB")) == int(0.8 * 2**30)
    assert budget_bytes(config(tiny_model, dog_photos, tmp_path, layer_major=True)) is None
    for bad in ("lots", "-1GiB", 0, "3 parsecs"):
        with pytest.raises(HollownetError, match="memory budget"):
            config(tiny_model, dog_photos, tmp_path, layer_major=True, memory_budget=bad)
    with pytest.raises(HollownetError, match="layer-major pre-compute only"):
        config(tiny_model, dog_photos, tmp_path, memory_budget="1GiB")
    with pytest.raises(HollownetError, match="memory budget"):
        config(tiny_model, dog_photos, tmp_path, layer_major=True, memory_budget="big")


def test_predicted_peak_equals_the_measured_one(tiny_model, dog_photos, tmp_path):
    """layerwise.predict_peak (FakeTensorMode, no weights: what the benchmark reports for SD 2.1)
    equals what a real layer-major run measures, every layer of every part, to the byte."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

    from hollownet.photos import load_photos
    from hollownet.cut import make_plan, meta_unet

    budget = 600_000
    result = run_precompute(config(tiny_model, dog_photos, tmp_path / "s", layer_major=True, memory_budget=budget,
                                   num_samples=40, shard_size=20))
    measured = result.memory
    tok = AutoTokenizer.from_pretrained(tiny_model / "tokenizer")
    ids = tok(["a photo of sks dog"], padding="max_length", max_length=tok.model_max_length, return_tensors="pt").input_ids
    unet = meta_unet(UNet2DConditionModel.load_config(tiny_model / "unet")).requires_grad_(False).eval()
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(tiny_model / "vae")).eval()
        text = CLIPTextModel(CLIPTextConfig.from_pretrained(tiny_model / "text_encoder")).eval()
    from hollownet.stages.precompute import validation_count

    # the stage runs its 40 training samples and the held-out ones (stage 2's validation loss) together
    pred = LW.predict_peak(unet, make_plan(unet), vae=vae, text=text, resolution=RES, num_samples=40 + validation_count(40, 20),
                           photos=len(load_photos(dog_photos, RES)[1]), budget=budget,
                           prompt_tokens=len(torch.unique(ids)) - 1)
    assert pred["summary"]["parts"] == measured["parts"]
    assert pred["summary"]["peak_bytes"] == measured["peak_bytes"] <= budget
    assert pred["unet_spilled_bytes"] == result.layer_major["spilled_bytes"] > 0


def test_layer_major_lora_baseline_store(tiny_model, dog_photos, tmp_path):
    """The lora/full baselines have no hollow: layer-major only changes the text encoder and VAE."""
    kw = dict(method="lora", num_samples=6)
    run_precompute(config(tiny_model, dog_photos, tmp_path / "sm", **kw), track_memory=False)
    result = run_precompute(config(tiny_model, dog_photos, tmp_path / "lm", layer_major=True, memory_budget="64KiB", **kw),
                            track_memory=False)
    assert "U-Net encoder + hollow" not in result.layer_major
    assert_same_store(tmp_path / "lm", tmp_path / "sm")
    assert no_scratch(tmp_path / "lm")


def test_layer_major_follows_added_embeddings_and_encoder_hid_proj(tmp_path):
    """An SDXL-style U-Net (text_time added embedding: pooled text + time ids per sample), with class
    embeddings and an encoder_hid_proj too: layer-major stage 1 equals sample-major (hollow_output)
    and the split forward's encode -> hollow, for every cut, the conditioning chunked per sample;
    and the fake run the planner uses (predict_peak) takes the same conditioning."""
    from diffusers import UNet2DConditionModel

    from hollownet import unet_split as H
    from hollownet.cut import all_plans, meta_unet
    from hollownet.loading import weight_files
    from hollownet.tiny import TINY_UNET

    torch.manual_seed(0)
    config = {**TINY_UNET, "block_out_channels": (16, 32, 32), "layers_per_block": 1,
              "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
              "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
              "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
              "projection_class_embeddings_input_dim": 20 + 6 * 8, "encoder_hid_dim": 24, "num_class_embeds": 3}
    unet = UNet2DConditionModel(**config).eval()
    unet.save_pretrained(tmp_path / "unet")
    g = torch.Generator().manual_seed(0)
    n = 5
    x, t = torch.randn(n, 4, 6, 6, generator=g), torch.randint(0, 1000, (n,), generator=g)
    embeds, prompt_index = torch.randn(2, 7, 24, generator=g), torch.tensor([0, 1, 1, 0, 1])
    cond = dict(added_cond_kwargs=dict(text_embeds=torch.randn(n, 20, generator=g), time_ids=torch.rand(n, 6, generator=g) * 512),
                class_labels=torch.tensor([0, 1, 2, 1, 0]))
    for plan in all_plans(unet):
        with torch.no_grad():
            want = H.hollow_output(unet, plan, x, t, embeds[prompt_index], **cond)
            ctx = H.make_context(unet, x, t, embeds[prompt_index], **cond)
            h, skips = H.encode(unet, plan, x, ctx)
            torch.testing.assert_close(want, H.hollow(unet, plan, h, ctx, skips), rtol=0, atol=0)
        skeleton = meta_unet(UNet2DConditionModel.load_config(tmp_path / "unet")).requires_grad_(False).eval()
        weights = LW.FileWeights(skeleton, weight_files(tmp_path), torch.float32)
        arrays = LW.Arrays(n, tmp_path / "scratch", None)
        arrays.write("noisy", 0, n, x)
        arrays.write("timestep", 0, n, t)
        out, _ = LW.run_unet_hollow(skeleton, plan, arrays, weights, embeds, prompt_index, LW.RunOptions(batch_size=2),
                                    dtype=torch.float32, cond=cond)
        got = arrays.read(out, 0, n).clone()
        arrays.close()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=f"depth {plan.depth}")
        assert {"add_embedding.linear_1.weight", "class_embedding.weight", "encoder_hid_proj.weight"} <= set(weights.read_keys)
    pred = LW.predict_peak(skeleton, plan, resolution=48, num_samples=3, photos=1)
    steps = [s.name for s in pred["stats"]["U-Net encoder + hollow"]]
    assert steps[:3] == ["time_embedding", "encoder_hid_proj", "conv_in"] and pred["summary"]["peak_bytes"] > 0
