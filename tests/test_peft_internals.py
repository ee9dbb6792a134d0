"""Canary for ``hollownet.peft_internals``: each peft internal it relies on, checked on a tiny LoRA
layer. A failure here means a peft release changed that internal: fix ``peft_internals.py`` (and its
docstring's version), not the callers."""

from __future__ import annotations

import peft
import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from hollownet import peft_internals as P

CHANGED = f"peft {peft.__version__} changed an internal hollownet relies on (written against 0.22.0): "


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.conv = nn.Conv2d(2, 3, 3, padding=1)


def tiny(empty: bool = False, seed: int = 0, init="gaussian") -> Tiny:
    torch.manual_seed(seed)
    model = Tiny()
    cfg = LoraConfig(r=2, lora_alpha=2, target_modules=["lin", "conv"], init_lora_weights=init)
    if empty:
        with P.init_empty_weights():
            return inject_adapter_in_model(cfg, model)
    return inject_adapter_in_model(cfg, model)


def with_delta() -> Tiny:
    """A LoRA whose B is not zero, so the adapter changes the output."""
    model = tiny()
    with torch.no_grad():
        for _, layer in P.lora_modules(model):
            P.lora_parts(layer)[1].weight.normal_()
    return model


def test_lora_layer_holds_a_and_b_per_adapter():
    found = dict(P.lora_modules(tiny()))
    assert sorted(found) == ["conv", "lin"], CHANGED + "LoraLayer is no longer the class of an injected LoRA layer"
    a, b = P.lora_parts(found["lin"])
    assert isinstance(a, nn.Linear) and isinstance(b, nn.Linear), CHANGED + "lora_A / lora_B['default'] are not the A / B layers"
    assert (a.in_features, a.out_features, b.in_features, b.out_features) == (4, 2, 2, 3), CHANGED + "A / B shapes"
    a, b = P.lora_parts(found["conv"])
    assert isinstance(a, nn.Conv2d) and isinstance(b, nn.Conv2d), CHANGED + "a Conv2d's A / B are not Conv2d layers"


def test_empty_weights_then_made_tensors_match_peft_on_a_loaded_model():
    # builder.init_lora promises the same draws as add_adapter on a loaded model, for the same seed
    empty = tiny(empty=True)
    for _, layer in P.lora_modules(empty):
        for part in P.lora_parts(layer):
            assert part.weight.is_meta, CHANGED + "init_empty_weights no longer makes LoRA's tensors on meta"
    assert not empty.lin.base_layer.weight.is_meta, CHANGED + "init_empty_weights put the base layer on meta"
    loaded = tiny()
    torch.manual_seed(0)
    Tiny()  # the same draws as tiny(): the base layers first
    for _, layer in P.lora_modules(empty):
        P.make_lora_tensors(layer, "cpu")
    want, got = dict(P.lora_modules(loaded)), dict(P.lora_modules(empty))
    for name in want:
        for w, g in zip(P.lora_parts(want[name]), P.lora_parts(got[name])):
            assert g.weight.dtype == torch.float32 and not g.weight.is_meta
            assert torch.equal(w.weight, g.weight), CHANGED + f"reset_lora_parameters('default', 'gaussian') on {name} " \
                                                             "no longer draws what add_adapter draws"
        assert torch.count_nonzero(P.lora_parts(got[name])[1].weight) == 0, CHANGED + "gaussian init no longer zeroes B"


def test_set_weight_uses_the_tensor_itself():
    model = tiny()
    a, _ = P.lora_parts(model.lin)
    value = torch.randn(2, 4)
    P.set_weight(a, value)
    assert a.weight.data_ptr() == value.data_ptr() and not a.weight.requires_grad
    assert torch.equal(a(torch.eye(4)), value.T)


def test_disable_flag_is_what_forward_reads():
    model = with_delta()
    x = torch.randn(5, 4)
    base, on = model.lin.base_layer(x), model.lin(x)
    assert not torch.allclose(base, on)
    with P.adapters_disabled([model.lin]):
        assert model.lin.disable_adapters, CHANGED + "LoraLayer._disable_adapters no longer backs disable_adapters"
        assert torch.equal(model.lin(x), base), CHANGED + "forward no longer skips the adapter when _disable_adapters is set"
    assert torch.equal(model.lin(x), on)
    with pytest.raises(RuntimeError), P.adapters_disabled([model.lin]):
        raise RuntimeError
    assert not model.lin.disable_adapters


def test_adapter_names_mix_a_batch():
    model = with_delta()
    x = torch.randn(1, 4).repeat(2, 1)
    base, on = model.lin.base_layer(x[:1]), model.lin(x[:1])
    with P.adapter_names([model.lin], [P.BASE, P.ADAPTER]):
        y = model.lin(x)
    assert torch.allclose(y[:1], base) and torch.allclose(y[1:], on), \
        CHANGED + "the layer forward's adapter_names=['__base__', 'default'] no longer mixes a batch"
    assert torch.equal(model.lin(x[:1]), on)  # the hook is gone


def test_merge_all_fuses_the_delta():
    model = with_delta()
    x = torch.randn(5, 4)
    on, before = model.lin(x), model.lin.base_layer.weight.clone()
    P.merge_all(model)
    assert not torch.equal(model.lin.base_layer.weight, before), CHANGED + "merge() no longer writes the base weight"
    assert torch.allclose(model.lin(x), on, atol=1e-6)
    assert torch.allclose(model.lin.base_layer(x), on, atol=1e-6)


def test_cached_layers_are_not_submodules():
    model = tiny()
    names = [n for n, _ in model.named_modules()]
    layers = P.cached_lora_layers(model)
    assert layers == [model.lin, model.conv] and P.cached_lora_layers(model) is layers
    assert [n for n, _ in model.named_modules()] == names


def test_pattern_key_is_a_suffix_rule():
    assert P.pattern_key(["to_q", "attn1.to_q"], "down.attn1.to_q") == "to_q"  # the first match wins
    assert P.pattern_key(["attn1\\.to_q"], "down.attn1.to_q") == "attn1\\.to_q"
    assert P.pattern_key(["to_q"], "down.xto_q") == "down.xto_q", CHANGED + "get_pattern_key no longer matches at a dot"


def test_tensor_names_in_a_wrapped_model():
    # stream.file_key strips ".base_layer."; builder, quant and stream tell LoRA's tensors by "lora_" in the name
    names = set(tiny().state_dict())
    assert {"lin.base_layer.weight", "lin.base_layer.bias", "lin.lora_A.default.weight", "lin.lora_B.default.weight",
            "conv.base_layer.weight", "conv.lora_A.default.weight", "conv.lora_B.default.weight"} <= names, \
        CHANGED + f"a wrapped model's tensor names: {sorted(names)}"
    assert all(("lora_" in n) != (".base_layer." in n) for n in names), CHANGED + "tensors neither LoRA's nor the base layer's"
