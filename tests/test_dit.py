"""Hollowed DiT, the core: the prefix / suffix split of SD3 / SD3.5 is the transformer bit for bit, stage 2
reads none of the prefix, and the suffix with LoRA fed the stored prefix is the full model with that LoRA
(which diffusers' StableDiffusion3Pipeline loads from the file we write)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from hollownet import dit_split as D
from hollownet import loading
from hollownet.dit_cut import (BUNDLED_TRANSFORMERS, check_prefix_cut, cut_kind, dead_targets, fraction_table,
                               k_for_fraction, load_transformer_config, make_prefix_plan, meta_transformer,
                               prefix_fractions, resolve_prefix_plan, stored_values, suffix_lora_targets)
from hollownet.dit_lora import add_suffix_lora, load_part, lora_state_dict, save_sd3_lora
from hollownet.errors import HollownetError
from hollownet.tiny_sd3 import TINY_SD3, TINY_SD35M, build_tiny_sd3, tiny_transformer

pytestmark = pytest.mark.usefixtures("one_thread")
CONFIGS = {"sd3": TINY_SD3, "sd35m": TINY_SD35M}


def inputs(seed: int = 0, hw=(8, 12), batch: int = 2):
    """diffusers' forward arguments for a tiny SD3 transformer; a non-square latent, two timesteps."""
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(batch, 16, *hw, generator=g), encoder_hidden_states=torch.randn(batch, 7, 64, generator=g),
                pooled_projections=torch.randn(batch, 64, generator=g), timestep=torch.tensor([3.0, 900.0][:batch]))


def one_line(e) -> str:
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("kwargs", [None, {}], ids=["kwargs None", "kwargs {}"])
def test_split_forward_equals_the_transformer_for_every_k(name, kwargs):
    net = tiny_transformer(CONFIGS[name])
    x = inputs()
    with torch.no_grad():
        ref = net(**x, joint_attention_kwargs=kwargs).sample
        stored = []
        for k in range(D.num_blocks(net) + 1):  # k = N included: no text stream left, the output layers alone
            prefix = D.run_prefix(net, k, **x, joint_attention_kwargs=kwargs)
            assert (prefix.encoder_hidden_states is None) == (k == D.num_blocks(net))
            assert torch.equal(D.run_suffix(net, prefix, joint_attention_kwargs=kwargs), ref), k
            stored.append(prefix.hidden_states)
            assert sum(t.numel() for t in prefix.tensors().values()) == 2 * stored_values(net, k, (8, 12), 7)
        # (a new text, not the same tokens reordered: joint attention has no text positions, order is invisible)
        other = net(**{**x, "encoder_hidden_states": inputs(9)["encoder_hidden_states"]}).sample
    # not vacuous: every block changes the stored tokens, and the text matters to the output
    assert all(not torch.equal(a, b) for a, b in zip(stored, stored[1:]))
    assert (other - ref).abs().max() > 1e-4


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    """The suffix runs blocks through the transformer's checkpointing function where it is on, as the forward."""
    net = tiny_transformer(TINY_SD35M)
    x, k = inputs(1), 2
    with torch.no_grad():
        prefix = D.run_prefix(net, k, **x)
    grads = []
    for on in (False, True):
        net.enable_gradient_checkpointing() if on else net.disable_gradient_checkpointing()
        net.zero_grad()
        out = D.run_suffix(net, prefix)
        out.square().mean().backward()
        assert torch.equal(out, net(**x).sample)
        grads.append([p.grad.clone() for p in net.parameters() if p.grad is not None])
    assert net.gradient_checkpointing and len(grads[0]) == len(grads[1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_what_the_split_cannot_follow_is_refused_in_one_line():
    net = tiny_transformer(TINY_SD3)
    x = inputs()
    cases = [(dict(block_controlnet_hidden_states=[torch.zeros(2, 24, 32)]), "ControlNet"),
             (dict(skip_layers=[1]), "skip_layers"),
             (dict(joint_attention_kwargs={"ip_adapter_image_embeds": torch.zeros(1)}), "IP-Adapter")]
    for extra, word in cases:
        for run in (lambda: D.run_prefix(net, 1, **x, **extra), lambda: D.full_forward(net, 1, **x, **extra)):
            with pytest.raises(HollownetError, match=word) as e:
                run()
            one_line(e)
    for k in (-1, D.num_blocks(net) + 1):
        with pytest.raises(HollownetError, match="outside") as e:
            D.run_prefix(net, k, **x)
        one_line(e)
    net.image_proj = torch.nn.Linear(2, 2)  # what load_ip_adapter adds: it feeds every block
    with pytest.raises(HollownetError, match="image_proj") as e:
        D.run_prefix(net, 1, **x)
    one_line(e)


def test_the_cut_rule_reads_the_architecture():
    from diffusers import FluxTransformer2DModel, HunyuanDiT2DModel, UNet2DConditionModel

    from hollownet.tiny import TINY_UNET

    with torch.device("meta"):
        unet = UNet2DConditionModel(**TINY_UNET)
        hunyuan = HunyuanDiT2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, patch_size=2, sample_size=8, num_layers=4,
                                    cross_attention_dim=16, cross_attention_dim_t5=16, pooled_projection_dim=16,
                                    text_len=4, text_len_t5=4)
        flux = FluxTransformer2DModel(num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                                      joint_attention_dim=16, pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    sd3 = meta_transformer(TINY_SD3)
    assert [cut_kind(m) for m in (unet, hunyuan, sd3, flux)] == ["centre", "centre", "prefix", "prefix"]
    check_prefix_cut(sd3)
    for model, word in ((unet, "U-Net"), (hunyuan, "long skips"), (flux, "not FluxTransformer2DModel")):
        with pytest.raises(HollownetError, match=word) as e:
            check_prefix_cut(model)
        one_line(e)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_the_ladder_counts_the_prefix_and_picks_the_nearest_k(name):
    net = tiny_transformer(CONFIGS[name])
    n, total = D.num_blocks(net), sum(p.numel() for p in net.parameters())
    fractions = prefix_fractions(net)
    assert len(fractions) == n and fractions == sorted(fractions) and 0 < fractions[0] < fractions[-1] < 1
    for k in range(n):
        plan = make_prefix_plan(net, k, rank=2)
        frozen = D.prefix_modules(net, k)  # counted independently, from the parameter names
        assert plan.prefix_params == sum(p.numel() for m, p in net.named_parameters() if loading.is_under(m, frozen))
        assert plan.fraction == pytest.approx(fractions[k]) and plan.total_params == total
        assert plan.lora_targets and all(not loading.is_under(t, frozen) for t in plan.lora_targets)
        assert plan.lora_params == sum(2 * (m.in_features + m.out_features) for t, m in net.named_modules() if t in plan.lora_targets)
        assert k_for_fraction(net, fractions[k] + 1e-6) == k
        assert resolve_prefix_plan(net, fraction=fractions[k]).k == k
    with pytest.raises(HollownetError, match="nothing to train") as e:
        make_prefix_plan(net, n)
    one_line(e)
    for kw in ({}, dict(k=1, fraction=0.5)):
        with pytest.raises(HollownetError, match="exactly one") as e:
            resolve_prefix_plan(net, **kw)
        one_line(e)
    with pytest.raises(HollownetError, match="outside") as e:
        k_for_fraction(net, 1.2)
    one_line(e)


def test_the_last_blocks_text_queries_are_dead_so_no_lora_goes_there():
    """SD3's last block is context_pre_only: it drops its text stream, so a LoRA on its attn.add_q_proj (which
    diffusers' script adds) never changes the output. Ours leaves it out; this shows the exclusion loses nothing."""
    from peft import LoraConfig

    net = tiny_transformer(TINY_SD3)
    last = f"transformer_blocks.{D.num_blocks(net) - 1}.attn"
    assert dead_targets(net) == {f"{last}.add_q_proj"}
    assert f"{last}.add_q_proj" not in suffix_lora_targets(net, 0) and f"{last}.add_k_proj" in suffix_lora_targets(net, 0)
    x = inputs(7)
    with torch.no_grad():
        ref = net(**x).sample
        for module, changes in ((f"{last}.add_q_proj", False), (f"{last}.add_k_proj", True)):
            lora = tiny_transformer(TINY_SD3)  # the same weights (seeded), with a random LoRA on one module
            lora.add_adapter(LoraConfig(r=2, init_lora_weights=False, target_modules=[module]))
            assert (not torch.equal(lora(**x).sample, ref)) == changes, module


def test_bundled_configs_build_and_match_the_published_sizes():
    """Parameter counts on the meta device against Stability's published sizes (SD3 Medium 2B, SD3.5 Large
    8.1B). SD3.5 Medium is published as 2.5B; this config counts 2.24B (see the config's note)."""
    sizes = {}
    for name in BUNDLED_TRANSFORMERS:
        net = meta_transformer(load_transformer_config(name))
        sizes[name] = sum(p.numel() for p in net.parameters())
        assert all(p.is_meta for p in net.parameters())  # no memory: shapes only
    assert sizes["sd3m"] == pytest.approx(2.0e9, rel=0.03)
    assert sizes["sd35l"] == pytest.approx(8.1e9, rel=0.01)
    assert sizes["sd35m"] > sizes["sd3m"]  # the 13 dual-attention blocks' second attention
    assert len(meta_transformer(load_transformer_config("sd35m")).transformer_blocks[12].attn2.to_q.weight) == 1536
    table = fraction_table("sd35l", [0, 19, 37])
    assert "38 blocks" in table and len(table.splitlines()) == 5


# ------------------------------------------------------------- kept-parts loading, LoRA, the pipeline


@pytest.fixture(scope="module")
def tiny_sd35m(tmp_path_factory):
    return build_tiny_sd3(tmp_path_factory.mktemp("tiny-sd35m"), config=TINY_SD35M)


def _full(folder):
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel.from_pretrained(folder / "transformer").eval()


@pytest.fixture
def reads(monkeypatch):
    """Every tensor name hollownet.loading takes from a safetensors file (the real reader, recorded)."""
    read, real = [], loading.safe_open

    class Recording:
        def __init__(self, *a, **kw):
            self.file = real(*a, **kw)

        def __enter__(self):
            self.handle = self.file.__enter__()
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

        def keys(self):
            return self.handle.keys()

        def get_tensor(self, name):
            read.append(name)
            return self.handle.get_tensor(name)

    monkeypatch.setattr(loading, "safe_open", Recording)
    return read


def test_stage2_reads_none_of_the_prefix_and_stage1_none_of_the_suffix(tiny_sd35m, reads):
    full, x, k = _full(tiny_sd35m), inputs(2), 2
    state = full.state_dict()
    with torch.no_grad():
        ref, stored = full(**x).sample, D.run_prefix(full, k, **x)
        for part, own, other in (("suffix", D.suffix_modules(full, k), D.prefix_modules(full, k)),
                                 ("prefix", D.prefix_modules(full, k), D.suffix_modules(full, k))):
            reads.clear()
            net, names = load_part(tiny_sd35m, k, part)
            assert sorted(reads) == sorted(names) and reads, "nothing recorded: the test would pass vacuously"
            assert not [n for n in reads if loading.is_under(n, other)]
            assert {n for n in state if loading.is_under(n, own)} == set(reads)  # every tensor of its own part
            assert all(p.is_meta for n, p in net.named_parameters() if loading.is_under(n, other))
            plan = make_prefix_plan(net, k)
            held = sum(p.numel() for p in net.parameters() if not p.is_meta)
            assert held == (plan.total_params - plan.prefix_params if part == "suffix" else plan.prefix_params)
            if part == "suffix":
                assert torch.equal(D.run_suffix(net, stored), ref)
            else:
                assert torch.equal(D.run_prefix(net, k, **x).hidden_states, stored.hidden_states)


def test_a_poisoned_prefix_does_not_change_stage_2(tiny_sd35m, tmp_path):
    """The prefix's tensors overwritten with NaN in the file: the suffix loaded from it gives the same output."""
    full, x, k = _full(tiny_sd35m), inputs(3), 3
    shutil.copytree(tiny_sd35m / "transformer", tmp_path / "transformer")
    path = tmp_path / "transformer" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(path)
    frozen = D.prefix_modules(full, k)
    save_file({n: torch.full_like(t, float("nan")) if loading.is_under(n, frozen) else t for n, t in tensors.items()},
              path, metadata={"format": "pt"})
    net, _ = load_part(tmp_path, k, "suffix")
    with torch.no_grad():
        assert torch.equal(D.run_suffix(net, D.run_prefix(full, k, **x)), full(**x).sample)
        assert load_part(tmp_path, k, "prefix")[0].transformer_blocks[0].ff.net[2].weight.isnan().all()  # the poison is there


@pytest.mark.parametrize("k", [0, 2, 4])
def test_suffix_lora_on_the_stored_prefix_is_the_full_model_with_that_lora(tiny_sd35m, k):
    """Zero LoRA: the split is the base model. A non-zero LoRA: the suffix fed the stored prefix is the full
    transformer with the same LoRA (with and without a LoRA scale), so inference needs one path."""
    from peft.utils import set_peft_model_state_dict

    base, x = _full(tiny_sd35m), inputs(4)
    net, _ = load_part(tiny_sd35m, k, "suffix")
    targets = add_suffix_lora(net, k, rank=2)
    assert all(loading.is_under(n, D.suffix_modules(net, k)) for n in targets)
    trained = sorted(n.replace(".default.", ".") for n, p in net.named_parameters() if p.requires_grad)
    assert trained == sorted(lora_state_dict(net)) and len(trained) == 2 * len(targets)
    with torch.no_grad():
        stored, ref = D.run_prefix(base, k, **x), base(**x).sample
        assert torch.equal(D.run_suffix(net, stored), ref)  # B = 0
        for p in (p for n, p in net.named_parameters() if "lora_B" in n):
            p.normal_(generator=torch.Generator().manual_seed(5))
        lora = _full(tiny_sd35m)
        add_suffix_lora(lora, k, rank=2)
        set_peft_model_state_dict(lora, lora_state_dict(net))
        for kwargs in (None, {"scale": 0.5}):
            want = lora(**x, joint_attention_kwargs=kwargs).sample
            assert (want - ref).abs().max() > 1e-4  # the LoRA does something
            assert torch.equal(D.run_suffix(net, stored, joint_attention_kwargs=kwargs), want)
    D.run_suffix(net, stored).square().mean().backward()  # and it trains: every LoRA tensor gets a gradient
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in net.parameters() if p.requires_grad)


def test_the_lora_file_loads_into_a_stable_diffusion_3_pipeline(tiny_sd35m, tmp_path):
    from diffusers import StableDiffusion3Pipeline

    k, x = 2, inputs(6)
    net, _ = load_part(tiny_sd35m, k, "suffix")
    add_suffix_lora(net, k, rank=2, alpha=4, init=False)  # random A and B, alpha != rank: the scale must survive
    with torch.no_grad():
        want = D.run_suffix(net, D.run_prefix(_full(tiny_sd35m), k, **x))
    path = save_sd3_lora(net, tmp_path / "lora")
    keys = list(load_file(path))
    assert keys and all(n.startswith("transformer.transformer_blocks.") and ".lora_" in n for n in keys)
    assert not [n for n in keys if int(n.split(".")[2]) < k]  # nothing in the prefix
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd35m, text_encoder_3=None, tokenizer_3=None)  # no T5: named, as diffusers asks
    draw = dict(prompt="a photo of sks dog", height=32, width=32, num_inference_steps=2, guidance_scale=2.0, output_type="np")
    before = pipe(**draw, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(tmp_path / "lora")
    after = pipe(**draw, generator=torch.Generator().manual_seed(0)).images
    assert abs(after - before).max() > 1e-3
    with torch.no_grad():
        assert torch.equal(pipe.transformer(**x).sample, want)  # the pipeline computes what stage 2 trained
    meta = json.loads(json.dumps(pipe.transformer.peft_config["default_0"].to_dict(), default=list))
    assert meta["r"] == 2 and meta["lora_alpha"] == 4


def test_predicted_stage2_memory_is_the_measured_one_and_falls_with_k():
    """The fake-tensor step counts what the same step on real tensors allocates, to the byte, for LoRA FT and
    every cut (and with gradient checkpointing); the deeper the prefix, the smaller stage 2's peak."""
    from hollownet.dit_memory import predict_train_step

    kw = dict(latent_hw=(8, 8), batch=2, dtype=torch.float32, text_tokens=7, rank=2)
    peaks = {}
    for k in (None, 2, 4):  # k=2: a dual-attention block in the suffix
        fake, real = (predict_train_step(TINY_SD35M, k, fake=f, **kw) for f in (True, False))
        assert fake.fake and not real.fake
        assert fake.peak_bytes == real.peak_bytes and fake.breakdown == real.breakdown, k
        peaks[k] = fake.peak_bytes
    assert peaks[None] > peaks[2] > peaks[4]
    ckpt = [predict_train_step(TINY_SD35M, 2, fake=f, grad_checkpointing=True, **kw).peak_bytes for f in (True, False)]
    assert ckpt[0] == ckpt[1] < peaks[2]


def test_predicted_stage1_and_inference_memory_is_the_measured_one():
    """The prefix pass (stage 1's transformer part) and a whole no-grad step (inference, CFG batch): fake ==
    real to the byte; stage 1 holds only the prefix, so it grows with k."""
    from hollownet.dit_memory import predict_forward

    kw = dict(latent_hw=(8, 8), batch=2, dtype=torch.float32, text_tokens=7)
    peaks = {}
    for k in (1, 4, None):
        fake, real = (predict_forward(TINY_SD35M, k, fake=f, **kw) for f in (True, False))
        assert fake.peak_bytes == real.peak_bytes and fake.breakdown == real.breakdown, k
        peaks[k] = fake.peak_bytes
    assert peaks[1] < peaks[4] < peaks[None]
