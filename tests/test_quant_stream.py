"""Low-memory stage 2: int8/nf4 frozen weights, streamed frozen weights, AdamW inside backward.

Checked on the tiny model: quantized layers compute exactly F.linear/F.conv2d with their
dequantized weight (forward and input gradient) and work under peft's LoRA; the hollowed network's
output error against fp32 is small and ordered (fp16 < bf16 < int8 < nf4, documented bounds);
streamed weights give bit-identical LoRA gradients and parameters to resident weights, with a lower
measured peak; adamw-in-backward equals AdamW without clipping; the fake-tensor prediction that
the SD 2.1 benchmark uses equals the real measurement to the byte.
"""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from hollownet import unet_split as H
from hollownet.errors import HollownetError
from hollownet.stages.export import LORA_FILE
from hollownet.memory.tracker import MemoryTracker
from hollownet.memory.predict import make_train_batch, predict_step, train_batch_shapes
from hollownet.cut import make_plan, meta_unet
from hollownet.lowmem.quant import (NF4_LEVELS, QuantConv2d, QuantLinear, dequantize_nf4, frozen_weight_bytes,
                                    quantize_nf4, relative_error)
from hollownet.optimizers import InBackwardAdamW, make_optimizer
from hollownet.settings import Modes
from hollownet.stages.train import TrainConfig, build_model, run_train, train_step

TEXT_LEN = 32  # the tiny model's tokenizer length

# Relative output error of the hollowed tiny network vs fp32 (random weights, 4 random samples).
# Measured: fp16 1.5e-3, bf16 1.2e-2, int8 (bf16 compute) 1.7e-2, nf4 (bf16 compute) 0.27.
ERROR_BOUNDS = {"fp16": 0.005, "bf16": 0.03, "int8": 0.04, "nf4": 0.45}


def config_of(model):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.load_config(model / "unet")


def manifest_of(model):
    return {"hollow_blocks": make_plan(meta_unet(config_of(model))).hollow_blocks}


def cfg(model, **kw):
    modes, rest = Modes.split(kw)
    return TrainConfig(model=str(model), store="-", output="-", rank=4, modes=modes, **rest)


def optimizer_of(net, c):
    return make_optimizer(net.params, c.modes.optimizer, c.lr, c.max_grad_norm)


# ------------------------------------------------------------------------------------ layers


@pytest.mark.parametrize("scheme,bound", [("int8", 0.01), ("nf4", 0.12)])
def test_quantized_layers_compute_with_their_dequantized_weight(scheme, bound):
    torch.manual_seed(0)
    lin, conv = nn.Linear(64, 48), nn.Conv2d(8, 16, 3, padding=1, stride=2)
    ql, qc = QuantLinear.from_float(lin, scheme, torch.float32), QuantConv2d.from_float(conv, scheme, torch.float32)
    assert relative_error(ql.weight, lin.weight) < bound and relative_error(qc.weight, conv.weight) < bound
    for q, x, ref in ((ql, torch.randn(5, 64), lambda x: F.linear(x, ql.weight, ql.bias)),
                      (qc, torch.randn(2, 8, 9, 7), lambda x: F.conv2d(x, qc.weight, qc.bias, stride=2, padding=1))):
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = q(a), ref(b)
        torch.testing.assert_close(ya, yb, rtol=0, atol=0)
        (ya * yb.detach()).sum().backward()
        (yb * yb.detach()).sum().backward()
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)
        assert isinstance(q, nn.Linear if q is ql else nn.Conv2d)  # peft and lora_target_modules match on this
    per_weight = ql.quantized_bytes / lin.weight.numel()
    assert per_weight == pytest.approx(1 + 4 / 64 if scheme == "int8" else 0.5 + 4 / 64, rel=0.01)


def test_nf4_codes_are_the_sixteen_levels_with_blockwise_absmax():
    levels = torch.tensor(NF4_LEVELS)
    g = torch.Generator().manual_seed(0)
    block1 = torch.cat([levels[torch.randperm(16, generator=g)] for _ in range(4)]) * 3.0  # 64 values, absmax 3
    w = torch.cat([block1, block1.flip(0) * 0.25])  # 128 values = 2 blocks, absmax 3.0 and 0.75
    packed, absmax = quantize_nf4(w)
    assert packed.dtype == torch.uint8 and packed.numel() == 64 and absmax.tolist() == [3.0, 0.75]
    torch.testing.assert_close(dequantize_nf4(packed, absmax, w.shape, torch.float32), w, rtol=0, atol=1e-6)
    odd = torch.randn(3, 7)  # not a whole number of blocks: padded, then cut back
    back = dequantize_nf4(*quantize_nf4(odd), odd.shape, torch.float32)
    assert back.shape == odd.shape and relative_error(back, odd) < 0.15


def test_peft_lora_wraps_a_quantized_base_layer():
    from peft import LoraConfig, inject_adapter_in_model

    from hollownet.lowmem.quant import quantize_model

    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Conv2d(2, 2, 1))
    quantize_model(m, "nf4", torch.float32)
    m = inject_adapter_in_model(LoraConfig(r=4, target_modules=["0"], init_lora_weights="gaussian"), m)
    assert isinstance(m[0].base_layer, QuantLinear) and isinstance(m[2], QuantConv2d)
    before = m[0].base_layer.qweight.clone()
    with torch.no_grad():
        m[0].lora_B["default"].weight.normal_()
    x = torch.randn(3, 16)
    y = m[0](x)
    lora = m[0].lora_B["default"](m[0].lora_A["default"](x)) * m[0].scaling["default"]
    torch.testing.assert_close(y, F.linear(x, m[0].base_layer.weight, m[0].base_layer.bias) + lora)
    y.square().sum().backward()
    trained = {n for n, p in m.named_parameters() if p.grad is not None}
    assert trained == {"0.lora_A.default.weight", "0.lora_B.default.weight"}
    assert torch.equal(m[0].base_layer.qweight, before)


# ------------------------------------------------------------------------------------ fidelity


def test_output_error_per_precision_is_small_and_ordered(tiny_model):
    from hollownet.loading import load_unet

    config = config_of(tiny_model)
    plan = make_plan(meta_unet(config))
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, TEXT_LEN, 32, generator=g)
    t = torch.tensor([50, 300, 600, 900])
    full, _ = load_unet(tiny_model)
    with torch.no_grad():
        hollow_out = H.hollow_output(full, plan, x, t, text)
    errors, frozen = {}, {}
    for p in ("fp32", "fp16", "bf16", "int8", "nf4"):  # int8 / nf4 computed in bf16, as the bounds were measured
        c = cfg(tiny_model, precision=p, **({"compute_dtype": "bf16"} if p in ("int8", "nf4") else {}))
        unet, plan_, _ = net = build_model(tiny_model, manifest_of(tiny_model), c)
        dt = net.dtype
        with torch.no_grad():
            y = H.hollowed_forward(unet, plan_, x.to(dt), t, text.to(dt), hollow_out.to(dt))
        errors[p] = relative_error(y, errors.get("ref", y)) if p != "fp32" else 0.0
        errors.setdefault("ref", y)
        frozen[p] = frozen_weight_bytes(unet)
    assert errors["fp32"] == 0.0
    for p, bound in ERROR_BOUNDS.items():
        assert 0 < errors[p] < bound, (p, errors[p])
    assert errors["fp16"] < errors["bf16"] < errors["int8"] < errors["nf4"], errors
    assert frozen["nf4"] < frozen["int8"] < frozen["bf16"] < frozen["fp32"]


# ------------------------------------------------------------------------------ streamed weights


def two_steps(model, **kw):
    """Two steps on one fixed batch: LoRA gradients (as accumulated), parameters, the second step's peak."""
    c = cfg(model, lr=1e-2, **kw)
    torch.manual_seed(0)
    net = build_model(model, manifest_of(model), c)
    unet, plan, params = net
    opt = optimizer_of(net, c)
    batch, embeds = make_train_batch(train_batch_shapes(config_of(model), plan, 64, 1, TEXT_LEN, 32), net.dtype,
                                     torch.Generator().manual_seed(1))
    grads = []
    if c.modes.optimizer == "adamw":  # the gradient as accumulated, before clipping and the optimizer
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: grads.append(p.grad.clone()))
    unet.train()
    train_step(net, batch, embeds, opt, c)
    tracker = MemoryTracker("cpu").add_resident(unet, opt)  # the second step: AdamW state resident
    train_step(net, batch, embeds, opt, c, tracker)
    return grads, [p.detach().clone() for p in params], tracker.report.peak_bytes, net


def test_streamed_weights_train_exactly_like_resident_weights_in_less_memory(tiny_model):
    g0, p0, peak0, _ = two_steps(tiny_model, grad_checkpointing=True)
    g1, p1, peak1, net = two_steps(tiny_model, stream_weights=True)
    unet, streamer = net.unet, net.streamer
    assert len(g0) == len(g1) > 0
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert peak1 < 0.5 * peak0, (peak1, peak0)
    # each kept unit is read twice a step: its forward and its recomputation in backward
    assert streamer.loads == 2 * 2 * len(streamer.units)
    # between steps the streamed tensors are not resident (meta), LoRA is (and inside streamed units too)
    names = {n for n, p in unet.named_parameters() if p.device.type == "meta"}
    assert any(".attentions.0.transformer_blocks.0.attn1.to_q.base_layer.weight" in n for n in names)
    assert not any("lora_" in n for n in names)
    assert "conv_in.weight" not in names and "conv_out.weight" not in names and "time_embedding.linear_1.weight" not in names


def test_stream_settings_are_checked():
    assert Modes(stream_weights=True).checkpointing  # required by streaming: on as run
    assert not Modes(stream_weights=True).grad_checkpointing  # what was asked stays as asked
    for bad in (dict(stream_weights=True, method="lora"), dict(stream_weights=True, precision="int8"),
                dict(precision="int4"), dict(optimizer="sgd"), dict(compute_dtype="fp16"),
                dict(method="full", optimizer="adamw-in-backward"), dict(method="full", precision="int8")):
        with pytest.raises(HollownetError):
            cfg("m", **bad)
    assert Modes(precision="int8", compute_dtype="fp32").compute == "fp32"


# ---------------------------------------------------------------------------------- optimizers


def test_adamw_in_backward_equals_adamw_without_clipping(tiny_model):
    _, p0, peak0, _ = two_steps(tiny_model, max_grad_norm=0)
    _, p1, peak1, _ = two_steps(tiny_model, max_grad_norm=0, optimizer="adamw-in-backward")
    assert all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert peak1 <= peak0


def test_adamw_in_backward_frees_each_gradient_and_clips_per_parameter():
    torch.manual_seed(0)
    a, b = nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(4))
    opt = InBackwardAdamW([a, b], lr=0.1, max_grad_norm=0.5)
    seen = []
    a.register_post_accumulate_grad_hook(lambda p: seen.append(p.grad is None))  # runs after the optimizer's
    a0, b0 = a.detach().clone(), b.detach().clone()
    ((a * 100).sum() + (b * 1e-3).sum()).backward()
    assert a.grad is None and b.grad is None and seen == [True]
    # the first AdamW step moves every coordinate by lr whatever the (clipped) gradient's size
    torch.testing.assert_close(a0 - a.detach(), torch.full((3,), 0.1) + 0.1 * 0.01 * a0, rtol=1e-4, atol=1e-4)
    # exp_avg = 0.1 * the gradient as clipped per parameter: a's (norm 173) to 0.5, b's (norm 0.002) kept
    assert opt.state[a]["exp_avg"].norm().item() == pytest.approx(0.1 * 0.5, rel=1e-5)
    assert opt.state[b]["exp_avg"].norm().item() == pytest.approx(0.1 * 2e-3, rel=1e-5)
    plain = torch.optim.AdamW([nn.Parameter(a0.clone()), nn.Parameter(b0.clone())], lr=0.1)
    plain.load_state_dict(opt.state_dict())  # same state format as torch's AdamW (checkpoints interchange)
    assert plain.state_dict()["state"][0]["exp_avg"].equal(opt.state[a]["exp_avg"])
    a1, b1 = a.detach().clone(), b.detach().clone()
    opt.step()
    opt.zero_grad()  # no-ops: nothing left to do
    assert a.detach().equal(a1) and b.detach().equal(b1) and a.grad is None and b.grad is None


# --------------------------------------------------------------------------------- end to end


def run_base(tiny_model, hollow_store):
    return dict(model=str(tiny_model), store=str(hollow_store), rank=4, lr=1e-3, checkpoint_every=0, track_memory_steps=2)


@pytest.fixture(scope="module")
def reference_run(tiny_model, hollow_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref")
    return out, run_train(TrainConfig(**run_base(tiny_model, hollow_store), output=str(out), steps=1,
                                      modes=Modes(grad_checkpointing=True)))


@pytest.mark.parametrize("settings", [dict(precision="int8", grad_checkpointing=True),
                                      dict(precision="nf4", optimizer="adamw-in-backward"),
                                      dict(stream_weights=True, optimizer="adamw-in-backward")],
                         ids=["int8", "nf4-in-backward", "stream-in-backward"])  # one step each: the loop is tested elsewhere
def test_run_train_low_memory_modes(tiny_model, hollow_store, reference_run, tmp_path, settings):
    ref_dir, ref = reference_run
    result = run_train(TrainConfig(**run_base(tiny_model, hollow_store), output=str(tmp_path / "o"), steps=1,
                                   modes=Modes(**settings)))
    assert all(torch.isfinite(torch.tensor(result.losses)))
    assert abs(result.losses[0] - ref.losses[0]) < 0.05 * ref.losses[0]  # same first batch, near-same network
    assert result.memory["peak_bytes"] < ref.memory["peak_bytes"]
    saved = load_file(tmp_path / "o" / LORA_FILE)
    ref_saved = load_file(ref_dir / LORA_FILE)
    assert saved.keys() == ref_saved.keys() and all(v.dtype == torch.float32 for v in saved.values())


def test_resume_with_adamw_in_backward_continues_exactly(tiny_model, hollow_store, tmp_path):
    base = dict(model=str(tiny_model), store=str(hollow_store), rank=4, lr=1e-3, track_memory_steps=0,
                modes=Modes(optimizer="adamw-in-backward"), max_grad_norm=0.5)
    straight = run_train(TrainConfig(**base, output=str(tmp_path / "a"), steps=2, checkpoint_every=0))
    run_train(TrainConfig(**base, output=str(tmp_path / "b"), steps=2, checkpoint_every=1))  # leaves step 1's
    resumed = run_train(TrainConfig(**base, output=str(tmp_path / "b"), steps=2, checkpoint_every=1, resume=True))
    assert resumed.losses == straight.losses
    a, b = load_file(tmp_path / "a" / LORA_FILE), load_file(tmp_path / "b" / LORA_FILE)
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------ fake planning


@pytest.mark.parametrize("settings", [dict(precision="nf4", optimizer="adamw-in-backward"), dict(stream_weights=True),
                                      dict(optimizer="adamw-in-backward"),
                                      dict(precision="int8", compute_dtype="bf16", grad_checkpointing=True)],
                         ids=["nf4-inbwd", "stream", "fp32-inbwd", "int8-bf16"])  # int8-bf16: torch's int8 kernel on a CPU
def test_fake_prediction_equals_real_measurement(tiny_model, settings):
    """What benchmarks/modes.py reports for SD 2.1 is this prediction; on the tiny model it is exact."""
    config = config_of(tiny_model)
    c = cfg(tiny_model, **settings)
    predicted, info = predict_step(config, c, resolution=64, text_len=TEXT_LEN)
    torch.manual_seed(0)
    net = build_model(tiny_model, manifest_of(tiny_model), c)
    unet, plan, params = net
    opt = optimizer_of(net, c)
    batch, embeds = make_train_batch(train_batch_shapes(config, plan, 64, 1, TEXT_LEN, 32), net.dtype)
    unet.train()
    train_step(net, batch, embeds, opt, c)
    tracker = MemoryTracker("cpu").add_resident(unet, opt)
    train_step(net, batch, embeds, opt, c, tracker)
    assert predicted.peak_bytes == tracker.report.peak_bytes
    assert info["resident_frozen_bytes"] == frozen_weight_bytes(unet)
