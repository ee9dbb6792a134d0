"""Tests for hollownet.memory.tracker: exact live-bytes accounting, real and fake."""

from __future__ import annotations

import contextlib
import json
import resource

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses import FakeTensorMode

from hollownet.memory.tracker import KINDS, NO_PHASE, MemoryReport, MemoryTracker, PartMeter, measure_step


def _nbytes(ts) -> int:
    return sum(t.numel() * t.element_size() for t in ts)


# --------------------------------------------------------------- hand-countable


@pytest.mark.parametrize("fake", [False, True], ids=["real", "fake"])
def test_empty_tensor_is_4000_bytes_and_freeing_drops_it(fake):
    tr = MemoryTracker("cpu")
    with FakeTensorMode() if fake else contextlib.nullcontext(), tr:
        x = torch.empty(1000, dtype=torch.float32)
        assert tr.live_bytes == 4000
        v = x.view(10, 100)[3:, ::2]  # a view: same storage, counted once
        w = x.unsqueeze(0)  # another view
        assert tr.live_bytes == 4000
        x.add_(1.0)  # in-place: no allocation
        x.mul_(2.0)
        assert tr.live_bytes == 4000
        del x
        assert tr.live_bytes == 4000  # views keep the storage alive
        del v, w
        assert tr.live_bytes == 0
        y = torch.zeros(10, dtype=torch.float64)
        assert tr.live_bytes == 80
    r = tr.report
    assert isinstance(r, MemoryReport)
    assert r.fake == fake
    assert r.peak_bytes == 4000
    assert r.peak_phase == NO_PHASE
    assert r.breakdown["temporaries"] == 4000
    assert sum(r.breakdown.values()) == r.peak_bytes
    assert r.end_bytes == 80
    assert r.start_bytes == 0
    del y


def test_view_of_slice_counts_whole_storage_not_numel():
    tr = MemoryTracker("cpu")
    with tr:
        big = torch.randn(100, 10)
        small = big[:1].clone()  # new 40-byte storage
        row = big[5]  # view: 40 elements visible, 4000-byte storage
        del big
        assert tr.live_bytes == 4000 + 40
        del row
        assert tr.live_bytes == 40
        del small
    assert tr.report.peak_bytes == 4040
    assert tr.report.end_bytes == 0


def test_factory_ops_and_multi_output_ops():
    tr = MemoryTracker("cpu")
    with tr:
        a = torch.zeros(4, 4)  # 64
        b = torch.randn(4, 4)  # 64
        c = torch.empty(3, dtype=torch.int64)  # 24
        vals, idx = torch.sort(b, dim=1)  # 64 + 128
        assert tr.live_bytes == 64 + 64 + 24 + 64 + 128
        del a, b, c, vals, idx
    assert tr.report.peak_bytes == 344
    assert tr.report.end_bytes == 0


def test_resize_and_out_and_storage_resize():
    tr = MemoryTracker("cpu")
    with tr:
        c = torch.empty(0)
        assert tr.live_bytes == 0
        c.resize_(100)
        assert tr.live_bytes == 400
        a = torch.ones(100)
        torch.mul(a, 3, out=c)  # same storage, same size
        assert tr.live_bytes == 800
        s = torch.empty(5).untyped_storage()  # 20 bytes
        s.resize_(64)  # UntypedStorage.resize_ is in bytes and not dispatched
        assert tr.live_bytes == 864
        del s, a, c
    assert tr.report.peak_bytes == 864
    assert tr.report.end_bytes == 0


def test_round_to_allocator_block():
    tr = MemoryTracker("cpu", round_to=512)
    with tr:
        x = torch.empty(1000)  # 4000 -> 4096
        y = torch.empty(1)  # 4 -> 512
        z = torch.empty(0)  # 0 -> 0
        del x, y, z
    assert tr.report.peak_bytes == 4096 + 512
    assert tr.report.round_to == 512


def test_residents_are_counted_from_the_start_and_deduplicated():
    lin1 = nn.Linear(10, 20)
    lin2 = nn.Linear(20, 10)
    lin2.weight = nn.Parameter(lin1.weight.t())  # tied, shares lin1.weight's storage
    model = nn.Sequential(lin1, lin2)
    tr = MemoryTracker("cpu")
    tr.add_resident(model)
    with tr:
        pass
    r = tr.report
    expected = (10 * 20 + 20 + 10) * 4  # the tied weight once, two biases
    assert r.start_bytes == expected
    assert r.peak_bytes == expected
    assert r.breakdown["weights"] == expected


def test_pre_existing_input_is_auto_discovered_retroactively():
    a = torch.ones(100)  # 400 bytes, exists before tracking, not registered
    tr = MemoryTracker("cpu")
    with tr:
        t = torch.empty(1000)  # 4000
        del t
        b = a * 1  # first use of `a`: it was live all along
        del b
    r = tr.report
    # The moment `t` was alive, `a` was alive too: 4400 at the peak.
    assert r.peak_bytes == 4400
    assert r.breakdown == {**{k: 0 for k in KINDS}, "inputs": 400, "temporaries": 4000}
    assert r.start_bytes == 400


def test_auto_register_inputs_off_ignores_unregistered_and_their_views():
    a = torch.ones(100)
    tr = MemoryTracker("cpu", auto_register_inputs=False)
    with tr:
        v = a.view(10, 10)  # alias of an ignored storage: not a new allocation
        b = v * 2  # 400
        del v, b
    assert tr.report.peak_bytes == 400
    assert tr.report.start_bytes == 0


def test_other_device_is_not_counted():
    tr = MemoryTracker("meta")
    with tr:
        x = torch.empty(1000)  # cpu: ignored
        y = torch.empty(10, device="meta")  # 40
        del x, y
    assert tr.report.peak_bytes == 40


def test_phases_nest_and_kinds_follow_the_rules():
    w = nn.Parameter(torch.randn(16, 16))  # 1024
    x = torch.randn(8, 16)  # 512
    tr = MemoryTracker("cpu")
    tr.add_resident(w).add_resident(x)
    with tr:
        with tr.phase("step"):
            with tr.phase("forward"):
                h = x @ w  # 512, survives forward -> activation
                tmp = h * 2  # 512, freed inside forward -> temporary
                del tmp
                out = h.sum()  # 4, survives -> activation
            with tr.phase("backward"):
                out.backward()  # w.grad (1024) -> gradients
    r = tr.report
    assert r.start_bytes == 1024 + 512
    assert r.phase_peaks["forward"] == 1024 + 512 + 512 + 512
    assert r.phase_breakdowns["forward"] == {
        **{k: 0 for k in KINDS},
        "weights": 1024,
        "inputs": 512,
        "activations": 512,  # h: alive when forward ends
        "temporaries": 512,  # tmp: freed inside forward
    }
    assert r.end_breakdown["weights"] == 1024
    assert r.end_breakdown["inputs"] == 512
    assert r.end_breakdown["activations"] == 512 + 4
    assert r.end_breakdown["gradients"] == 1024
    assert r.end_breakdown["temporaries"] == 0
    assert r.end_bytes == 1024 + 512 + 516 + 1024
    # the enclosing phase sees every inner peak
    assert r.phase_peaks["step"] == max(r.phase_peaks["forward"], r.phase_peaks["backward"])
    assert r.peak_phase in ("forward", "backward")
    assert r.peak_bytes == r.phase_peaks["step"]
    assert sum(r.breakdown.values()) == r.peak_bytes
    for name, bd in r.phase_breakdowns.items():
        assert sum(bd.values()) == r.phase_peaks[name]


# ------------------------------------------------------------------- MLP + AdamW


def _mlp_step(fake: bool, zero_grad: bool):
    ctx = FakeTensorMode() if fake else contextlib.nullcontext()
    with ctx:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 10)
        )
        model[0].requires_grad_(False)  # a frozen part, like the base UNet under LoRA
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=1e-3)
        x = torch.randn(32, 64)
        y = torch.randint(0, 10, (32,))

        def step(tr):
            with tr.phase("forward"):
                loss = F.cross_entropy(model(x), y)
            with tr.phase("backward"):
                loss.backward()
            with tr.phase("optimizer"):
                opt.step()
                if zero_grad:
                    opt.zero_grad(set_to_none=True)

        report = measure_step(step, resident=[model, opt, x, y])
        sizes = dict(
            weights=_nbytes(model.parameters()),
            trainable=_nbytes(trainable),
            n_trainable=len(trainable),
            inputs=_nbytes([x, y]),
        )
    return report, sizes


def test_mlp_adamw_step_breakdown():
    r, s = _mlp_step(fake=False, zero_grad=False)
    W, T, n = s["weights"], s["trainable"], s["n_trainable"]
    # AdamW state: exp_avg + exp_avg_sq (2 x trainable) + a 0-dim float32 `step` per param.
    opt_state = 2 * T + 4 * n
    assert r.start_bytes == W + s["inputs"]
    assert r.end_breakdown["weights"] == W
    assert r.end_breakdown["gradients"] == T
    assert r.end_breakdown["optimizer"] == opt_state
    assert r.end_breakdown["inputs"] == s["inputs"]
    assert r.peak_bytes >= W + T + 2 * T
    assert sum(r.breakdown.values()) == r.peak_bytes
    # Here the peak is in the optimizer step: all grads and all state are live.
    assert r.peak_phase == "optimizer"
    assert r.breakdown["weights"] == W
    assert r.breakdown["gradients"] == T
    assert r.breakdown["optimizer"] == opt_state
    assert r.phase_peaks["optimizer"] == r.peak_bytes
    assert set(r.phase_peaks) >= {"forward", "backward", "optimizer"}
    json.dumps(r.to_dict())


def test_gradients_freed_by_zero_grad_are_still_gradients():
    r, s = _mlp_step(fake=False, zero_grad=True)
    T = s["trainable"]
    assert r.end_breakdown["gradients"] == 0
    assert r.breakdown["gradients"] == T  # at the peak they were alive, and were grads
    assert r.end_breakdown["optimizer"] == 2 * T + 4 * s["n_trainable"]


def test_mlp_fake_equals_real():
    real, s_real = _mlp_step(fake=False, zero_grad=True)
    fake, s_fake = _mlp_step(fake=True, zero_grad=True)
    assert s_real == s_fake
    assert fake.fake and not real.fake
    assert fake.peak_bytes == real.peak_bytes
    assert fake.breakdown == real.breakdown
    assert fake.phase_peaks == real.phase_peaks
    assert fake.end_breakdown == real.end_breakdown
    assert fake.num_storages == real.num_storages


# ------------------------------------------------------- tiny UNet: fake == real


def _tiny_unet_step(fake: bool) -> MemoryReport:
    from diffusers import UNet2DConditionModel

    ctx = FakeTensorMode() if fake else contextlib.nullcontext()
    with ctx:
        torch.manual_seed(0)
        unet = UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=16,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=4,
        )
        opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
        x = torch.randn(2, 4, 16, 16)
        t = torch.tensor([10, 500])
        c = torch.randn(2, 7, 32)

        def step(tr):
            with tr.phase("forward"):
                # Not F.mse_loss: its CPU kernel returns the 0-dim loss in a storage the
                # size of the input (8 KiB here) while its meta kernel allocates 4 bytes,
                # so real and fake would (truthfully) differ.
                loss = (unet(x, t, c).sample - x).pow(2).mean()
            with tr.phase("backward"):
                loss.backward()
            with tr.phase("optimizer"):
                opt.step()
                opt.zero_grad(set_to_none=True)

        report = measure_step(step, resident=[unet, opt])
        params = list(unet.parameters())
        P = _nbytes(params)
        assert report.end_breakdown["weights"] == P
        assert report.end_breakdown["optimizer"] == 2 * P + 4 * len(params)
        assert report.end_breakdown["inputs"] == _nbytes([x, t, c])
    return report


def test_tiny_unet_fake_and_real_agree_to_the_byte():
    real = _tiny_unet_step(fake=False)
    fake = _tiny_unet_step(fake=True)
    assert fake.fake and not real.fake
    assert fake.peak_bytes == real.peak_bytes
    assert fake.peak_phase == real.peak_phase
    assert fake.breakdown == real.breakdown
    assert fake.phase_peaks == real.phase_peaks
    assert fake.phase_breakdowns == real.phase_breakdowns
    assert fake.end_breakdown == real.end_breakdown
    assert fake.num_storages == real.num_storages
    assert sum(real.breakdown.values()) == real.peak_bytes
    assert real.breakdown["activations"] > 0
    assert real.peak_bytes > real.start_bytes


# ------------------------------------------- SD 2.1-sized block under fake tensors


def test_sd21_sized_block_under_fake_mode_uses_no_memory():
    from diffusers.models.unets.unet_2d_blocks import CrossAttnDownBlock2D

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float16)  # build in fp16 (.half() cannot swap fake params)
    try:
        with FakeTensorMode():
            # First down block of SD 2.1 at 768 px: 320 ch, 96x96 latents, 5 heads x 64, ctx 1024.
            blk = CrossAttnDownBlock2D(
                in_channels=320,
                out_channels=320,
                temb_channels=1280,
                num_layers=2,
                transformer_layers_per_block=1,
                resnet_groups=32,
                cross_attention_dim=1024,
                num_attention_heads=5,
                use_linear_projection=True,
                add_downsample=True,
            )
            x = torch.randn(2, 320, 96, 96)
            temb = torch.randn(2, 1280)
            ctx = torch.randn(2, 77, 1024)

            def step(tr):
                with tr.phase("forward"):
                    h, _ = blk(x, temb, encoder_hidden_states=ctx)
                    loss = h.float().pow(2).mean()
                with tr.phase("backward"):
                    loss.backward()

            r = measure_step(step, resident=blk)
            W = _nbytes(blk.parameters())
            X = _nbytes([x, temb, ctx])
    finally:
        torch.set_default_dtype(old)
    assert r.fake
    assert r.breakdown["weights"] == W
    assert r.start_bytes == W + X
    # Every parameter gets an fp16 gradient; activations of 2x320x96x96 fp16 maps dominate.
    assert r.end_breakdown["gradients"] == W
    assert r.peak_bytes > W + X + 10 * x.numel() * 2
    assert r.peak_bytes < 16 * 1024**3
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert rss1 - rss0 < r.peak_bytes / 4  # nothing of the ~1 GiB was really allocated


# -------------------------------------------------------------------- reporting


def test_part_meter_keeps_the_largest_part():
    meter = PartMeter(True)
    with meter.measure("small"):
        a = torch.empty(100)
    with meter.measure("large", a):
        b = torch.empty(1000)
    with meter.measure("large"):  # a part is measured once
        c = torch.empty(10**6)
    s = meter.summary()
    assert s["parts"] == {"small": 400, "large": 4400} and s["peak_phase"] == "large" and s["peak_bytes"] == 4400
    assert PartMeter(True).summary() is None and PartMeter(True).summary(always=True)["peak_bytes"] == 0
    off = PartMeter(False)
    with off.measure("x"):
        d = torch.empty(10)
    assert off.summary() is None
    del a, b, c, d


def test_report_format_and_dict():
    tr = MemoryTracker("cpu")
    with tr:
        with tr.phase("forward"):
            x = torch.empty(2 * 1024**2 // 4)
            del x
    r = tr.report
    text = r.format()
    assert "2.00 MiB" in text and "forward" in text and "temporaries" in text
    d = r.to_dict()
    assert json.loads(json.dumps(d)) == d
    assert d["peak_bytes"] == 2 * 1024**2
    assert d["cuda_max_allocated"] is None
    assert d["peak_phase"] == "forward"


def test_tracker_is_single_use_and_survives_exceptions():
    orig_resize = torch.UntypedStorage.resize_
    tr = MemoryTracker("cpu")
    with pytest.raises(ValueError):
        with tr:
            x = torch.empty(10)
            raise ValueError("boom")
    assert tr.report is not None and tr.report.peak_bytes == 40
    with pytest.raises(RuntimeError):
        with tr:
            pass
    # The patched UntypedStorage.resize_ is restored.
    assert torch.UntypedStorage.resize_ is orig_resize
    del x


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_peak_is_below_allocator_peak():
    model = nn.Sequential(nn.Linear(256, 1024), nn.GELU(), nn.Linear(1024, 256)).cuda()
    opt = torch.optim.AdamW(model.parameters())
    x = torch.randn(64, 256, device="cuda")

    def step(tr):
        with tr.phase("forward"):
            loss = model(x).pow(2).mean()
        with tr.phase("backward"):
            loss.backward()
        with tr.phase("optimizer"):
            opt.step()

    r = measure_step(step, resident=[model, opt, x], device="cuda", round_to=512)
    assert r.cuda_max_allocated is not None
    assert 0 < r.peak_bytes <= r.cuda_max_allocated


def test_unregistered_parameters_are_discovered_as_weights_with_gradients():
    lin = nn.Linear(8, 8)  # not registered
    x = torch.randn(4, 8)
    tr = MemoryTracker("cpu")
    with tr:
        with tr.phase("forward"):
            loss = lin(x).sum()
        with tr.phase("backward"):
            loss.backward()
    r = tr.report
    P = _nbytes(lin.parameters())
    assert r.start_bytes == P + x.numel() * 4
    assert r.end_breakdown["weights"] == P
    assert r.end_breakdown["gradients"] == P
    assert r.end_breakdown["inputs"] == x.numel() * 4
