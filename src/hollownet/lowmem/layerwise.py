"""Layer-major stage 1: one layer in memory at a time, every sample pushed through it in chunks.

Stage 1 is forward-only over a fixed set of samples, so it need not hold a whole model. The
sample-major path (``precompute.py``) loads the text encoder, the VAE encoder and the U-Net's
encoder + hollow whole and runs each batch through all of it. Here each model is a list of
:class:`~hollownet.unet_split.Step` s, run in order; for each layer:

1. its weights are read from the safetensors file into a skeleton built on the meta device
   (:class:`FileWeights`; :class:`EmptyWeights` gives fake or random weights instead, for
   ``FakeTensorMode`` memory measurement and benchmarks);
2. every sample's input activation is pushed through it, a chunk of samples at a time (the batch
   in flight), and the output written to an activation array (:class:`Arrays`);
3. its weights go back to the meta device (freed), and arrays no later layer reads are freed.

So stage 1's peak is one layer's weights plus one chunk's activations, plus the activation arrays
kept in RAM. Which arrays exist: the current hidden state, the hollow's own skips (until the
hollow's up units consume them) and the small per-sample inputs (noisy latent, timestep, time
embedding). The kept down path's skips are never stored: only the kept up units consume them, and
those never run in stage 1.

The layers follow the models' own forwards module by module (a resnet and its attention are two
layers; the mid block is split into its resnets and attentions; resamplers, ``conv_in`` and the
time embedding are layers of their own), calling the same diffusers / transformers modules, so
the outputs equal the sample-major ones (tested: the whole store, allclose in fp32).

Spill policy (``memory_budget`` set): an activation array stays in RAM while the arrays in RAM
total at most ``RAM_FRACTION`` of the budget; otherwise it is a ``.npy`` memmap in a scratch
folder (raw bits, so bf16 works too) that is read and written chunk by chunk and deleted with the
folder. The chunk size is chosen per layer: the first chunk is one sample, measured with
:class:`~hollownet.memory.tracker.MemoryTracker` (what that sample's input chunk, temporaries and output
cost); the rest of the layer's chunks take as many samples as fit in what the budget leaves after
the layer's weights and the arrays in RAM. Without a budget every array stays in RAM and the chunk
is ``batch_size`` samples.

Memory accounting: one tracker per layer (``memory.tracker.PartMeter.measure``) with the loaded layer and the
arrays in RAM as residents; a spilled chunk is ``torch.from_numpy(memmap[a:b])``, a storage of the
chunk's size that the tracker counts from its creation (the rest of the file is page cache, not
tensor memory, and is not counted). Under ``FakeTensorMode`` (``Arrays(simulate=True)``) nothing
is written: a spilled chunk read is a fake ``torch.empty`` of the same size, a write does nothing,
and only the first chunk of each size runs (the one-sample probe, the first full chunk, the last,
smaller one): a chunk of a size already run repeats its memory exactly, since every array the
layer writes exists from its first chunk on and nothing else accumulates between chunks.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from torch import nn
from torch._subclasses import FakeTensorMode

from hollownet import encoders as E
from hollownet import unet_split as H
from hollownet.errors import HollownetError
from hollownet.files import disk_error
from hollownet.loading import vae_scale_factor, weight_files
from hollownet.memory.sizes import format_bytes
from hollownet.memory.tracker import MemoryTracker, PartMeter
from hollownet.unet_split import Step, mid_steps, seq

#: Share of ``memory_budget`` that activation arrays kept in RAM may take; the rest is for the
#: layer in flight (its weights and one chunk's activations).
RAM_FRACTION = 0.25
#: Scratch folder (inside the store) for spilled activations; deleted at the end of stage 1.
SCRATCH = ".layer-major-scratch"

_RAW = {1: (torch.uint8, np.uint8), 2: (torch.int16, np.int16), 4: (torch.int32, np.int32), 8: (torch.int64, np.int64)}


class BudgetWarning(UserWarning):
    """The memory budget is below what a layer needs for one sample (it runs anyway, one at a time)."""


# ------------------------------------------------------------------------ activation arrays


@dataclass
class _Array:
    shape: tuple[int, ...]
    dtype: torch.dtype
    ram: torch.Tensor | None = None  # kept in RAM
    disk: np.ndarray | None = None  # spilled: a memmap of the raw bits
    path: Path | None = None
    freed: bool = False

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Arrays:
    """Per-sample activations of one pass (``n`` rows each): in RAM, or spilled to ``.npy`` memmaps.

    An array is created at its first write, with the shape ``(n, *chunk.shape[1:])``; whether it
    lives in RAM or on disk is decided then (see the module docstring). ``read`` returns the rows
    ``a:b`` (a view of the RAM array, or a tensor over the memmap slice), ``write`` stores them.
    """

    def __init__(self, n: int, scratch: str | Path | None = None, budget: int | None = None, *,
                 ram_fraction: float = RAM_FRACTION, simulate: bool = False):
        self.n = n
        self.scratch = Path(scratch) if scratch is not None else None
        self.budget = budget
        self.ram_limit = None if budget is None else int(budget * ram_fraction)
        self.simulate = simulate
        self.arrays: dict[str, _Array] = {}
        self.spilled: dict[str, int] = {}  # name -> bytes, every array that went to disk

    def __contains__(self, name: str) -> bool:
        return name in self.arrays and not self.arrays[name].freed

    def shape(self, name: str) -> tuple[int, ...]:
        return self.arrays[name].shape  # known after the array is freed too

    def ram_tensors(self) -> list[torch.Tensor]:
        return [a.ram for a in self.arrays.values() if a.ram is not None]

    def ram_bytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values() if a.ram is not None)

    def adopt(self, name: str, tensor: torch.Tensor) -> None:
        """An existing ``(n, ...)`` tensor as an array, in RAM, without a copy (e.g. the photos)."""
        if tensor.shape[0] != self.n:
            raise ValueError(f"{name}: {tensor.shape[0]} rows, expected {self.n}")
        self.arrays[name] = _Array(tuple(tensor.shape), tensor.dtype, ram=tensor)

    def _create(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> _Array:
        arr = _Array(shape, dtype)
        if self.ram_limit is None or self.ram_bytes() + arr.nbytes <= self.ram_limit:
            arr.ram = torch.empty(shape, dtype=dtype)
        else:
            self.spilled[name] = arr.nbytes
            if not self.simulate:
                if self.scratch is None:
                    raise HollownetError("activations must be spilled to disk but no scratch folder was given")
                self.scratch.mkdir(parents=True, exist_ok=True)
                arr.path = self.scratch / f"{len(self.arrays):04d}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.npy"
                arr.disk = np.lib.format.open_memmap(arr.path, mode="w+", dtype=_RAW[dtype.itemsize][1], shape=shape)
                _reserve(arr.path)
        self.arrays[name] = arr
        return arr

    def write(self, name: str, a: int, b: int, chunk: torch.Tensor) -> None:
        arr = self.arrays.get(name)
        if arr is None or arr.freed:
            arr = self._create(name, (self.n, *chunk.shape[1:]), chunk.dtype)
        if arr.ram is not None:
            arr.ram[a:b].copy_(chunk)
        elif arr.disk is not None:
            bits = chunk.detach().to("cpu").contiguous().view(_RAW[arr.dtype.itemsize][0])
            arr.disk[a:b] = bits.numpy()

    def read(self, name: str, a: int, b: int) -> torch.Tensor:
        arr = self.arrays[name]
        if arr.freed:
            raise RuntimeError(f"activation array {name!r} was freed")
        if arr.ram is not None:
            return arr.ram[a:b]
        if arr.disk is not None:
            return torch.from_numpy(arr.disk[a:b]).view(arr.dtype)
        return torch.empty((b - a, *arr.shape[1:]), dtype=arr.dtype)  # simulated spill

    def free(self, name: str) -> None:
        arr = self.arrays[name]
        arr.ram = arr.disk = None
        arr.freed = True
        if arr.path is not None:
            arr.path.unlink(missing_ok=True)

    def close(self) -> None:
        for name in list(self.arrays):
            self.free(name)
        if self.scratch is not None and not self.simulate:
            shutil.rmtree(self.scratch, ignore_errors=True)


# ------------------------------------------------------------------------------- weights


def _to_meta(module: nn.Module) -> None:
    """Drop a module's tensors (back to the meta device: no memory)."""
    for mod in module.modules():
        for k, p in list(mod._parameters.items()):
            if p is not None and p.device.type != "meta":
                mod._parameters[k] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"), requires_grad=False)
        for k, b in list(mod._buffers.items()):
            if b is not None and b.device.type != "meta":
                mod._buffers[k] = torch.empty(b.shape, dtype=b.dtype, device="meta")


def _module_bytes(modules: list[nn.Module]) -> int:
    seen, total = set(), 0
    for m in modules:
        for t in list(m.parameters()) + list(m.buffers()):
            if t.device.type != "meta" and id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total


def _set_tensor(root: nn.Module, key: str, value: torch.Tensor) -> None:
    owner, _, leaf = key.rpartition(".")
    mod = root.get_submodule(owner)
    if leaf in mod._parameters:
        mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        mod._buffers[leaf] = value


class Weights:
    """Gives the named submodules of ``root`` (a model built on the meta device) their tensors and
    takes them away again. ``rows``: tensor name -> sorted row indices to load instead of the
    whole tensor (the token embedding: only the rows of tokens the prompts use)."""

    def __init__(self, root: nn.Module, dtype: torch.dtype):
        self.root, self.dtype = root, dtype

    def _cast(self, t: torch.Tensor) -> torch.Tensor:
        return t.to(self.dtype) if t.is_floating_point() else t

    def load(self, names: list[str], rows: dict[str, torch.Tensor] | None = None) -> list[nn.Module]:
        raise NotImplementedError

    def unload(self, names: list[str]) -> None:
        for name in names:
            _to_meta(self.root.get_submodule(name))


class FileWeights(Weights):
    """Reads exactly the tensors of the requested submodules from the model's safetensors file(s).

    ``files``: checkpoint tensor name -> file (``model.weight_files``). A checkpoint may name a
    tensor with a prefix the module does not use (``text_model.`` in older CLIP checkpoints).
    """

    PREFIXES = ("", "text_model.")

    def __init__(self, root: nn.Module, files: dict[str, Path], dtype: torch.dtype, device="cpu"):
        super().__init__(root, dtype)
        self.files, self.device = files, str(device)
        self.read_keys: list[str] = []  # every checkpoint tensor read (tests: nothing else is)

    def _file_key(self, key: str) -> str:
        for p in self.PREFIXES:
            if p + key in self.files:
                return p + key
        raise HollownetError(f"the checkpoint lacks tensor {key!r}; is it complete?")

    def load(self, names, rows=None):
        rows = rows or {}
        mods, by_file = [], {}
        for name in names:
            mod = self.root.get_submodule(name)
            mods.append(mod)
            for k in mod.state_dict():
                full = f"{name}.{k}" if name else k
                fk = self._file_key(full)
                by_file.setdefault(self.files[fk], []).append((full, fk))
        for f, keys in by_file.items():
            with safe_open(f, framework="pt", device=self.device) as sf:
                for full, fk in keys:
                    if full in rows:
                        sl = sf.get_slice(fk)
                        t = torch.cat([sl[int(i) : int(i) + 1] for i in rows[full]])
                    else:
                        t = sf.get_tensor(fk)
                    self.read_keys.append(fk)
                    _set_tensor(self.root, full, self._cast(t))
        return mods


class EmptyWeights(Weights):
    """Uninitialised weights of the right shapes and dtype: fake ones inside a ``FakeTensorMode``
    (memory measurement: nothing is read, nothing is allocated), or real ones, optionally filled
    with ``N(0, init_std)`` (benchmarks with random weights)."""

    def __init__(self, root: nn.Module, dtype: torch.dtype, device="cpu", init_std: float | None = None, seed: int = 0):
        super().__init__(root, dtype)
        self.device, self.init_std = device, init_std
        self.generator = torch.Generator().manual_seed(seed) if init_std is not None else None

    def _new(self, shape, like: torch.Tensor) -> torch.Tensor:
        dtype = self.dtype if like.is_floating_point() else like.dtype
        t = torch.empty(shape, dtype=dtype, device=self.device)
        if self.generator is not None and t.is_floating_point():
            t.copy_(torch.randn(shape, generator=self.generator) * self.init_std)
        return t

    def load(self, names, rows=None):
        rows = rows or {}
        mods = []
        for name in names:
            mod = self.root.get_submodule(name)
            mods.append(mod)
            for k, t in mod.state_dict(keep_vars=True).items():
                full = f"{name}.{k}" if name else k
                shape = (len(rows[full]), *t.shape[1:]) if full in rows else t.shape
                _set_tensor(self.root, full, self._new(shape, t))
        return mods


# -------------------------------------------------------------------------- layer runner


@dataclass
class LayerStat:
    name: str
    weight_bytes: int
    chunk: int  # samples per chunk after the first
    work_per_sample: int | None  # measured bytes one sample's chunk costs (budget set)
    ram_bytes: int  # activation arrays in RAM while the layer ran (at its end, before freeing)
    one_sample_bytes: int | None = None  # weights + arrays in RAM + constants + one sample's chunk (budget set)


@dataclass(frozen=True)
class RunOptions:
    """How a part runs layer by layer: on ``device``, measured into ``meter`` (None: not measured), in
    chunks of ``batch_size`` samples or, with a ``budget`` (bytes), of what fits it; ``bar`` ticks once a layer."""

    device: str | torch.device = "cpu"
    meter: PartMeter | None = None
    budget: int | None = None
    batch_size: int = 4
    bar: object = None  # tqdm-like: .update(1)


def run_layers(layers: list[Step], arrays: Arrays, weights: Weights, opts: RunOptions = RunOptions(), *, keep=(),
               part: str = "", constants=()) -> list[LayerStat]:
    """Run ``layers`` in order over all ``arrays.n`` samples (see the module docstring).

    ``keep``: arrays not to free after their last reader (the outputs). ``constants``: tensors held
    for the whole part (prompt embeddings...): counted as residents of every layer's measurement.
    """
    meter, budget, bar = opts.meter or PartMeter(False), opts.budget, opts.bar
    last = {name: i for i, layer in enumerate(layers) for name in layer.inputs}
    stats = []
    with torch.no_grad():
        for i, layer in enumerate(layers):
            mods = weights.load(layer.modules, layer.rows)
            try:
                with meter.measure(f"{part}: {layer.name}" if part else layer.name, *mods, *arrays.ram_tensors(), *constants):
                    stat = _run_layer(layer, mods, arrays, budget, opts.batch_size, opts.device, constants)
                    for name in dict.fromkeys(layer.inputs):
                        if last[name] == i and name not in keep:
                            arrays.free(name)
            finally:
                weights.unload(layer.modules)
            stats.append(stat)
            if bar is not None:
                bar.update(1)
    over = [s for s in stats if budget is not None and s.one_sample_bytes is not None and s.one_sample_bytes > budget]
    if over:
        worst = max(over, key=lambda s: s.one_sample_bytes)
        warnings.warn(f"{part or 'layer-major'}: the memory budget ({format_bytes(budget)}) is below what {len(over)} "
                      f"layer(s) need for a single sample (up to {format_bytes(worst.one_sample_bytes)}, {worst.name}); "
                      "they ran one sample at a time and the peak exceeds the budget", BudgetWarning, stacklevel=2)
    return stats


def _chunk(layer: Step, arrays: Arrays, a: int, b: int, device) -> torch.Tensor:
    chunks = [arrays.read(name, a, b).to(device) for name in layer.inputs]
    return layer.fn(slice(a, b), *chunks)


def _run_layer(layer, mods, arrays, budget, batch_size, device, constants) -> LayerStat:
    n, a = arrays.n, 0
    weight_bytes = _module_bytes(mods)
    size, work, one, done_sizes = (batch_size if budget is None else None), None, None, set()
    while a < n:
        if size is None:  # probe: one sample, measured, decides the chunk size
            probe = MemoryTracker(device=device)
            with probe:
                out = _chunk(layer, arrays, a, a + 1, device)
            work = max(1, probe.report.peak_bytes - probe.report.start_bytes)
            arrays.write(layer.output, a, a + 1, out)
            del out
            base = weight_bytes + arrays.ram_bytes() + sum(t.numel() * t.element_size() for t in constants)
            size, one = max(1, (budget - base) // work), base + work
            a += 1
            continue
        b = min(n, a + size)
        if arrays.simulate and (b - a) in done_sizes and b < n:
            a = b  # same shape as a chunk already run: same memory (see the module docstring)
            continue
        out = _chunk(layer, arrays, a, b, device)
        arrays.write(layer.output, a, b, out)
        del out
        done_sizes.add(b - a)
        a = b
    return LayerStat(layer.name, weight_bytes, int(min(size, n)), work, arrays.ram_bytes(), one)


# ----------------------------------------------------------------------- the three models


def text_encoder_layers(model: nn.Module, ids: torch.Tensor) -> tuple[list[Step], torch.Tensor, str]:
    """A ``CLIPTextModel`` (built on meta) as layers: embeddings, each encoder layer, final norm.

    Returns the layers, the ids remapped to rows of the token-embedding slice the embeddings layer
    loads (only the tokens in ``ids``), and the output array's name. Equals ``model(ids)[0]``.
    """
    from transformers.masking_utils import create_causal_mask

    used = torch.unique(ids)
    remapped = torch.searchsorted(used, ids)

    def embeddings(rows, x):
        pos = torch.arange(x.shape[-1], device=x.device).unsqueeze(0)
        return model.embeddings(input_ids=x, position_ids=pos)

    layers = [Step("embeddings", ["embeddings"], ["ids"], "embeddings", embeddings,
                    rows={"embeddings.token_embedding.weight": used})]
    h = "embeddings"
    for i, block in enumerate(model.encoder.layers):
        def fn(rows, x, block=block):
            mask = create_causal_mask(config=model.config, inputs_embeds=x, attention_mask=None, cache=None)
            return block(x, mask, is_causal=True)

        layers.append(Step(f"encoder.layers.{i}", [f"encoder.layers.{i}"], [h], f"encoder.layers.{i}", fn))
        h = f"encoder.layers.{i}"
    layers.append(Step("final_layer_norm", ["final_layer_norm"], [h], "embeds", lambda rows, x: model.final_layer_norm(x)))
    return layers, remapped, "embeds"


def vae_encoder_layers(vae: nn.Module, dtype: torch.dtype) -> tuple[list[Step], str]:
    """An ``AutoencoderKL``'s encoder and ``quant_conv`` as layers, input array ``pixels``.
    The output (``moments``) equals ``vae.quant_conv(vae.encoder(pixels))``."""
    enc = vae.encoder
    layers = [Step("encoder.conv_in", ["encoder.conv_in"], ["pixels"], "encoder.conv_in",
                    lambda rows, x: enc.conv_in(x.to(dtype)))]

    def add(name, modules, fn, extra=()):
        layers.append(Step(name, modules, [layers[-1].output, *extra], name, fn))

    for b, block in enumerate(enc.down_blocks):
        p = f"encoder.down_blocks.{b}"
        for r, res in enumerate(block.resnets):
            add(f"{p}.resnets.{r}", [f"{p}.resnets.{r}"], lambda rows, x, res=res: res(x, temb=None))
        if block.downsamplers is not None:
            add(f"{p}.downsamplers", [f"{p}.downsamplers"], lambda rows, x, ds=block.downsamplers: seq(ds, x))
    mid_steps(enc.mid_block, "encoder.mid_block", add, temb=False, text=None)

    def out(rows, x):
        return enc.conv_out(enc.conv_act(enc.conv_norm_out(x)))

    add("encoder.out", ["encoder.conv_norm_out", "encoder.conv_out"], out)
    if vae.quant_conv is not None:
        add("quant_conv", ["quant_conv"], lambda rows, x: vae.quant_conv(x))
    layers[-1].output = "moments"
    return layers, "moments"


# ------------------------------------------------------------------------------- parts


def _clone_out(t: torch.Tensor) -> torch.Tensor:
    return t.clone()  # a RAM view or a memmap slice: the arrays are freed after this


def run_text_encoder(model: nn.Module, ids: torch.Tensor | None, weights: Weights, opts: RunOptions = RunOptions(), *,
                     scratch=None, simulate=False, prepared=None):
    """``model(ids)[0].float().cpu()`` layer by layer (``model`` built on meta). Returns (embeds, stats).

    ``prepared``: ``text_encoder_layers(model, ids)``'s result, made beforehand (under
    ``FakeTensorMode`` the token ids must be real to find the used rows; pass their fake copy here).
    """
    layers, remapped, out = prepared if prepared is not None else text_encoder_layers(model, ids)
    arrays = Arrays(remapped.shape[0], scratch, opts.budget, simulate=simulate)
    try:
        arrays.adopt("ids", remapped)
        stats = run_layers(layers, arrays, weights, opts, keep={out}, part="text encoder")
        embeds = _clone_out(arrays.read(out, 0, arrays.n).float().cpu())
    finally:
        arrays.close()
    return embeds, stats


def run_vae_encoder(vae: nn.Module, pixels: torch.Tensor, seed: int, weights: Weights, opts: RunOptions = RunOptions(), *,
                    dtype, scratch=None, simulate=False):
    """Scaled latents, one seeded posterior sample per photo, drawn chunk by chunk of ``batch_size``
    photos as the sample-major stage 1 draws them (``encoders``). Returns (latents, stats)."""
    layers, out = vae_encoder_layers(vae, dtype)
    arrays, batch_size = Arrays(pixels.shape[0], scratch, opts.budget, simulate=simulate), opts.batch_size
    try:
        arrays.adopt("pixels", pixels)
        stats = run_layers(layers, arrays, weights, opts, keep={out}, part="VAE encoder")
        g = torch.Generator().manual_seed(seed)
        with (opts.meter or PartMeter(False)).measure("VAE encoder: posterior sample", *arrays.ram_tensors()):
            samples = [E.posterior_sample(arrays.read(out, a, min(arrays.n, a + batch_size)), g)
                       for a in range(0, arrays.n, batch_size)]
    finally:
        arrays.close()
    return E.scale_latents(samples, vae.config), stats


def run_unet_hollow(unet: nn.Module, plan, arrays: Arrays, weights: Weights, embeds: torch.Tensor,
                    prompt_index: torch.Tensor, opts: RunOptions = RunOptions(), *, dtype, constants=(),
                    cond: dict | None = None) -> tuple[str, list[LayerStat]]:
    """The hollow's output for every sample of ``arrays`` (which holds ``noisy`` and ``timestep``):
    ``unet_split.hollow_steps`` step by step. ``cond``: the rest of the U-Net's conditioning, as
    ``unet_split.make_context`` takes it (e.g. ``added_cond_kwargs``), every tensor one row per sample.
    Returns the output array's name (kept) and the stats."""
    per_sample = H.make_cond(prompt_index, **(cond or {}))  # the text: embeds[prompt_index], looked up per chunk

    def conditioning(rows):
        c = per_sample.rows(rows)
        return replace(c, text=embeds[c.text].to(dtype)).map(lambda t: t.to(opts.device))

    layers = H.hollow_steps(unet, plan, conditioning, arrays.shape("noisy")[2:], dtype, arrays.shape)
    out = layers[-1].output
    stats = run_layers(layers, arrays, weights, opts, keep={out}, part="U-Net encoder + hollow",
                       constants=(embeds, prompt_index, *per_sample.tensors(), *constants))
    return out, stats


# ------------------------------------------------------------------- from a model folder


def embed_prompts(model_dir: Path, prompts: list[str], dtype, device, meter, *, budget=None, batch_size=4, scratch=None):
    """``precompute.embed_prompts``, layer by layer; only the used token-embedding rows are read."""
    from transformers import CLIPTextConfig, CLIPTextModel

    ids = E.prompt_ids(model_dir, prompts)
    with torch.device("meta"):
        model = CLIPTextModel(CLIPTextConfig.from_pretrained(model_dir / "text_encoder"))
    model.requires_grad_(False).eval()
    weights = FileWeights(model, weight_files(model_dir, "text_encoder"), dtype, device)
    return run_text_encoder(model, ids, weights, RunOptions(device, meter, budget, batch_size), scratch=scratch)


def encode_photos(model_dir: Path, pixels: torch.Tensor, seed: int, dtype, device, batch_size: int, meter, *, budget=None, scratch=None):
    """``precompute.encode_photos``, layer by layer (the decoder is never read)."""
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(model_dir / "vae"))
    vae.requires_grad_(False).eval()
    weights = FileWeights(vae, weight_files(model_dir, "vae"), dtype, device)
    return run_vae_encoder(vae, pixels, seed, weights, RunOptions(device, meter, budget, batch_size), dtype=dtype,
                           scratch=scratch)


# ------------------------------------------------------------------------------ prediction


def predict_peak(unet: nn.Module, plan, *, vae: nn.Module | None = None, text: nn.Module | None = None,  # wide: a plan request's fields, as the planner passes them
                 resolution: int, num_samples: int, photos: int, prompts: int = 1, budget: int | None = None, batch_size: int = 4,
                 dtype=torch.float32, vae_dtype=None, device="cpu", prompt_tokens: int = 8) -> dict:
    """Layer-major stage 1's peak without weights: the loop ``run_precompute(layer_major=True)``
    runs, under ``FakeTensorMode``, on models built on the meta device (they are left on meta).

    Each layer gets fake weights when it loads (:class:`EmptyWeights`), the arrays are
    ``Arrays(simulate=True)`` (the same spill decisions; a spilled chunk read is a fake tensor of
    its size; writes to disk do nothing; repeated chunks skipped, see the module docstring) and
    every layer is measured as the real run measures it (``PartMeter``); on the tiny test model the
    two agree to the byte. ``vae_dtype``: the VAE's, where the family runs it apart (default ``dtype``). ``budget``: bytes (``memory.tracker.parse_size``) or None; ``prompt_tokens``:
    distinct tokens per prompt (token-embedding rows read). Returns ``{"summary": PartMeter.summary(), "stats": {part: [LayerStat]}, "unet_spilled_bytes"}``.
    """
    meter, stats, spilled = PartMeter(True, device), {}, 0
    h = resolution // vae_scale_factor(dict(vae.config) if vae is not None else None)
    text_dim = text.config.hidden_size if text is not None else (unet.config.encoder_hid_dim or unet.config.cross_attention_dim)
    text_len = text.config.max_position_embeddings if text is not None else 77
    opts = RunOptions(device, meter, budget, batch_size)
    prepared = None
    if text is not None:  # the used token rows need real ids: made before entering fake mode
        ids = torch.zeros(prompts, text_len, dtype=torch.long)
        ids[:, :prompt_tokens] = torch.arange(1, prompt_tokens + 1)
        prepared = text_encoder_layers(text, ids)
    with FakeTensorMode() as mode:
        if text is not None:
            layers, remapped, name = prepared
            _, stats["text encoder"] = run_text_encoder(text, None, EmptyWeights(text, dtype, device), opts, simulate=True,
                                                        prepared=(layers, mode.from_tensor(remapped), name))
        if vae is not None:
            pixels = torch.empty(photos, vae.config.in_channels, resolution, resolution)
            vae_dtype = vae_dtype or dtype
            _, stats["VAE encoder"] = run_vae_encoder(vae, pixels, 0, EmptyWeights(vae, vae_dtype, device), opts,
                                                      dtype=vae_dtype, simulate=True)
            del pixels
        if plan is None:  # no hollow (a baseline, or only the text encoder / VAE asked for): no U-Net part
            return {"summary": meter.summary(always=True), "stats": stats, "unet_spilled_bytes": 0}
        latents = torch.empty(photos, unet.config.in_channels, h, h)
        embeds = torch.empty(prompts, text_len, text_dim)
        arrays = Arrays(num_samples, None, budget, simulate=True)
        arrays.write("noisy", 0, num_samples, torch.empty(num_samples, unet.config.in_channels, h, h))
        arrays.write("timestep", 0, num_samples, torch.zeros(num_samples, dtype=torch.long))
        prompt_index = torch.zeros(num_samples, dtype=torch.long)
        # added / class conditioning, where the U-Net has it: fp32 whatever the run's dtype, as the store keeps it
        cond = H.example_cond(unet, num_samples, (h, h), torch.float32)
        _, stats["U-Net encoder + hollow"] = run_unet_hollow(unet, plan, arrays, EmptyWeights(unet, dtype, device), embeds,
                                                             prompt_index, opts, dtype=dtype, constants=(latents,), cond=cond)
        spilled = sum(arrays.spilled.values())
        arrays.close()
    return {"summary": meter.summary(always=True), "stats": stats, "unet_spilled_bytes": spilled}


def _reserve(path: Path) -> None:
    """Allocate a spill file's blocks now: on a full disk a memmap would otherwise die of SIGBUS at
    its first write; reserved, it fails here with ENOSPC (one line, see files.disk_error)."""
    if not hasattr(os, "posix_fallocate"):
        return
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        mapped = disk_error(e, path)
        if mapped is not None:
            raise mapped from None
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    finally:
        os.close(fd)
