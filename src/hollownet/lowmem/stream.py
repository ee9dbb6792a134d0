"""Weight sources for the stage-2 builder, and streamed frozen weights.

``Modes(stream_weights=True)``: the frozen weights of the kept *units* (the (resnet,
attention) pairs and resamplers of the kept down and up blocks, see ``plan.py``) are not resident.
The U-Net checkpoint stays on disk (:class:`SafetensorsSource`) and a unit's frozen tensors are
read from it only while that unit runs: ``unet_split._run_unit`` enters ``StreamedWeights(unit)``, which
loads the unit's tensors into its modules, and puts them back on the meta device when the unit
returns. Stage 2 runs every unit under per-unit gradient checkpointing (``Modes.checkpointing``), so
the forward keeps nothing of a unit, and the backward's recomputation of a unit -- the same
``_run_unit`` call, hooks included -- loads its weights again; autograd holds them only until that
unit's backward is done. So about one unit's frozen weights are resident at a time. The rest of
the kept network (time embedding, ``conv_in``, ``conv_norm_out``, ``conv_out``: 2M parameters on
SD 2.x) and the LoRA parameters stay resident; inside a unit only peft's ``base_layer`` tensors (and
the unit's other frozen tensors: norms, biases) are streamed, never ``lora_A``/``lora_B``.

Each load is a file read straight into a tensor allocated by torch (``readinto``; after the
first step the bytes come from the OS page cache), so the memory tracker sees it as the
allocation it is, when it happens. The file is not memory-mapped: the pages of a map that has been
read count in the process's resident set (a run was seen at 3.8 GiB RSS for 0.71 GiB of tensors),
while the page cache is the kernel's, shared and reclaimable. The cost is one read of each kept
unit's weights per forward and one more per backward recomputation: see ``benchmarks/modes.py``
for the step time against resident weights.

``builder.build_unet`` reads the frozen weights from a tensor *source*: :class:`SafetensorsSource`
for a real model, or :class:`FakeSource` (shapes only) inside a ``FakeTensorMode``, so the planner
runs exactly the trainer's construction on SD 2.x without its weights; :class:`RandomSource` makes the
real tensors the fake source stands for, random (benchmarks on an architecture without a weights file).
"""

from __future__ import annotations

import json
import struct
import zlib
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from torch import nn
from torch._subclasses import FakeTensorMode

from hollownet.errors import HollownetError
from hollownet.loading import weight_files
from hollownet.cut import HollowPlan, Unit, unit_modules

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


# ------------------------------------------------------------------------------------ sources


class SafetensorsSource:
    """The U-Net's tensors in its safetensors file(s), read one tensor at a time.

    ``read(name, dtype, device)`` allocates the result with torch and reads the bytes into it from the
    file: the only memory is the result (plus, when the file's dtype or device differs, the staging
    tensor in the file's dtype on the CPU, freed at once). Files stay open (one handle each).
    """

    def __init__(self, model_dir: str | Path, component: str = "unet"):
        self.files = weight_files(Path(model_dir), component)
        self._open_files: dict[Path, tuple[object, int, dict]] = {}

    def _open(self, path: Path):
        if path not in self._open_files:
            f = open(path, "rb")  # noqa: SIM115 - kept open for the source's life; close() closes it
            (n,) = struct.unpack("<Q", f.read(8))
            self._open_files[path] = (f, 8 + n, json.loads(f.read(n)))
        return self._open_files[path]

    def info(self, name: str) -> tuple[torch.Size, torch.dtype]:
        _, _, header = self._open(self.files[name])
        entry = header[name]
        return torch.Size(entry["shape"]), _ST_DTYPES[entry["dtype"]]

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def read(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        """The tensor ``name``; floating tensors cast to ``dtype`` (as ``model.read_tensors``)."""
        if name not in self.files:
            raise HollownetError(f"the U-Net checkpoint has no tensor '{name}'")
        f, base, header = self._open(self.files[name])
        entry = header[name]
        file_dtype = _ST_DTYPES[entry["dtype"]]
        start, end = entry["data_offsets"]
        out = torch.empty(entry["shape"], dtype=file_dtype)
        if end > start:
            buf = memoryview(out.view(-1).view(torch.uint8).numpy())
            f.seek(base + start)
            done = 0
            while done < end - start:  # readinto may return short counts
                got = f.readinto(buf[done:])
                if not got:
                    raise HollownetError(f"the U-Net checkpoint '{self.files[name]}' ends early; is it complete?")
                done += got
        return _cast(out, dtype, device)

    def loading(self):
        """The context the builder makes tensors from this source in: none needed for a file."""
        return nullcontext()

    def close(self) -> None:
        for f, _, _ in self._open_files.values():
            f.close()
        self._open_files.clear()


class FakeSource:
    """Shapes only: ``read`` returns ``torch.empty``, a fake tensor of :attr:`mode` (enter it to run them).

    Mirrors :class:`SafetensorsSource` op for op (the staging tensor in ``file_dtype`` included), so
    a memory count over fake reads equals the count over real ones.
    """

    def __init__(self, shapes: dict[str, tuple[torch.Size, torch.dtype]], file_dtype: torch.dtype = torch.float32):
        self.shapes = shapes
        self.file_dtype = file_dtype
        self.mode = FakeTensorMode()  # every tensor made from this source, and what runs on them, is fake

    def loading(self) -> FakeTensorMode:
        return self.mode

    @classmethod
    def for_module(cls, module: nn.Module, file_dtype: torch.dtype = torch.float32) -> FakeSource:
        return cls({k: (v.shape, v.dtype) for k, v in state_tensors(module)}, file_dtype)

    def __contains__(self, name: str) -> bool:
        return name in self.shapes

    def info(self, name: str):
        return self.shapes[name]

    def read(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        shape, dt = self.shapes[name]
        out = torch.empty(shape, dtype=self.file_dtype if dt.is_floating_point else dt)
        return _cast(out, dtype, device)


class RandomSource(FakeSource):
    """Random weights of a module's shapes (uniform, std 0.02, seeded by name), as real tensors: each made
    in fp32 on the CPU (a file's dtype there) and cast / moved as ``SafetensorsSource.read`` does, so the
    device sees the same allocations as from a file. Filled in place from nothing (no source tensor: on the
    CPU the tracker would count one it sees as an input)."""

    def loading(self):
        return nullcontext()

    def read(self, name: str, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.Tensor:
        shape, dt = self.shapes[name]
        if not dt.is_floating_point:
            return torch.zeros(shape, dtype=dt).to(device)
        out = torch.empty(shape, dtype=self.file_dtype)
        out.uniform_(-0.02 * 3**0.5, 0.02 * 3**0.5, generator=torch.Generator().manual_seed(zlib.crc32(name.encode())))
        return out.to(device, dtype) if dtype is not None and dtype != out.dtype else out.to(device)


def state_tensors(module: nn.Module):
    """``(name, tensor)`` of what ``state_dict()`` holds, without its ``detach`` (usable on meta
    modules inside a ``FakeTensorMode``)."""
    for mname, mod in module.named_modules():
        for k, p in mod._parameters.items():
            if p is not None:
                yield (f"{mname}.{k}" if mname else k), p
        for k, b in mod._buffers.items():
            if b is not None and k not in mod._non_persistent_buffers_set:
                yield (f"{mname}.{k}" if mname else k), b


def file_key(name: str) -> str:
    """The checkpoint's name of a tensor of the (possibly peft-wrapped) U-Net."""
    return name.replace(".base_layer.", ".")


def _cast(t: torch.Tensor, dtype, device) -> torch.Tensor:
    if t.is_floating_point() and dtype is not None and t.dtype != dtype:
        return t.to(device, dtype)
    return t.to(device)


# ---------------------------------------------------------------------------- streamed weights


def kept_units(plan: HollowPlan) -> list[Unit]:
    return list(plan.kept_down) + list(plan.kept_up)


class StreamedWeights:
    """Loads a unit's frozen tensors from ``source`` while it runs; see the module docstring.

    Call it as a context manager per unit: ``with streamed(unit): ...``. Between calls the unit's
    frozen tensors are on the meta device (an accidental use outside raises). The split forward does
    this for every unit it is given it as ``unit_weights`` (``unet_split.make_context``).
    """

    def __init__(self, unet: nn.Module, plan: HollowPlan, source, dtype: torch.dtype, device="cpu"):
        self.source, self.dtype, self.device = source, dtype, torch.device(device)
        # unit -> [(module, name, is_param, file key, meta placeholder)]; module objects survive peft's
        # wrapping (a LoRA target becomes ``<name>.base_layer``, the same object), so keys stay valid.
        self.slots: dict[Unit, list] = {}
        self.loads = 0
        self.bytes_read = 0
        for unit in kept_units(plan):
            slots = []
            for prefix in unit_modules(unet, unit):
                for mname, mod in unet.get_submodule(prefix).named_modules(prefix=prefix):
                    if "lora_" in mname:
                        continue
                    for pname, p in mod._parameters.items():
                        if p is not None and not p.requires_grad:
                            slots.append(self._slot(mod, mname, pname, p, True))
                    for bname, b in mod._buffers.items():
                        if b is not None and bname not in mod._non_persistent_buffers_set:
                            slots.append(self._slot(mod, mname, bname, b, False))
            self.slots[unit] = slots
        self._active: list[Unit] = []
        self.release_all()

    def _slot(self, mod, mname, name, t, is_param):
        key = file_key(f"{mname}.{name}")
        if key not in self.source:
            raise HollownetError(f"the U-Net checkpoint has no tensor '{key}'")
        shape, file_dtype = self.source.info(key)
        dtype = self.dtype if file_dtype.is_floating_point else file_dtype
        meta = torch.empty(shape, dtype=dtype, device="meta")
        return [mod, name, is_param, key, nn.Parameter(meta, requires_grad=False) if is_param else meta]

    @property
    def units(self) -> list[Unit]:
        return list(self.slots)

    def _set(self, slot, t: torch.Tensor) -> None:
        mod, name, is_param = slot[0], slot[1], slot[2]
        if is_param:
            mod._parameters[name] = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
        else:
            mod._buffers[name] = t

    def load(self, unit: Unit) -> None:
        for slot in self.slots.get(unit, ()):
            t = self.source.read(slot[3], self.dtype, self.device)
            self.bytes_read += t.numel() * t.element_size()
            self._set(slot, t)
        self.loads += 1

    def release(self, unit: Unit) -> None:
        for slot in self.slots.get(unit, ()):
            self._set(slot, slot[4])

    def release_all(self) -> None:
        for unit in self.slots:
            self.release(unit)

    @contextmanager
    def __call__(self, unit: Unit):
        if unit not in self.slots or unit in self._active:
            yield
            return
        self._active.append(unit)
        self.load(unit)
        try:
            yield
        finally:  # also when a checkpoint recomputation stops early (it raises inside the unit)
            self.release(unit)
            self._active.remove(unit)

    def resident_unit_bytes(self) -> dict[str, int]:
        """Bytes each unit's streamed tensors take when loaded (for reports)."""
        out = {}
        for unit, slots in self.slots.items():
            name = f"{unit.side}_blocks.{unit.block}." + ("samplers" if unit.index is None else f"{unit.index}")
            out[name] = sum(s[4].numel() * s[4].element_size() for s in slots)
        return out
