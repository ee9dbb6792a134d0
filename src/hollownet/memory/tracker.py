"""Exact live-bytes accounting of tensor memory on one device through a training step.

:class:`MemoryTracker` counts the bytes of every tensor *storage* that lives on
the tracked device while a piece of code runs, and reports the peak, the phase
in which the peak occurs, the peak of every phase, and what the live bytes
consisted of at the peak.  It works on real tensors and, unchanged, under
:class:`torch._subclasses.FakeTensorMode`, where no memory is used but every
fake tensor still has a storage with a size: for the same model and step the
fake and the real count agree to the byte (wherever each op's meta kernel
allocates outputs the size the real kernel does; see "Fake tensors" below), so
the count can plan memory for models that do not fit on the machine that plans.

Usage::

    tracker = MemoryTracker(device="cpu")
    tracker.add_resident(unet)          # parameters + buffers -> "weights"
    tracker.add_resident(optimizer)     # its params -> "weights", its state -> "optimizer"
    with tracker:
        with tracker.phase("forward"):
            loss = unet(x, t, ctx).sample.float().pow(2).mean()
        with tracker.phase("backward"):
            loss.backward()
        with tracker.phase("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    print(tracker.report.format())

or ``measure_step(step_fn, resident=[unet, optimizer])`` where ``step_fn``
receives the tracker (to mark phases).

How it counts
-------------
A :class:`~torch.utils._python_dispatch.TorchDispatchMode` sees every ATen
operator that runs while the tracker is entered -- the forward, the backward
(autograd runs its ops through the same dispatcher, with the mode active) and
the optimizer step (including its lazily created state).  After each operator
it looks at the ``untyped_storage()`` of each output tensor on the tracked
device.  A storage it has not seen before is a new allocation: its
``nbytes()`` (the whole storage, not the ``numel * itemsize`` of a view) is
added to the live count, and a ``weakref`` callback on the storage object
subtracts it again the moment the storage is freed.  PyTorch keeps exactly one
Python object per live storage (PyObject preservation), so a storage is
counted once however many views, ``.grad`` references or saved-tensor slots
point to it, and the callback fires when the storage itself dies -- for real
and for fake (meta) storages alike.  In-place ops return a storage already
known and add nothing; a storage whose size changed (``resize_``, ``out=``
into a smaller tensor, ``UntypedStorage.resize_``) is re-counted at its new
size.

Storages that exist before tracking starts are not seen being allocated.
They are counted through :meth:`MemoryTracker.add_resident`, and also by
*auto-discovery*: a storage on the device that first appears as an **input**
of an op and was never seen as an output must have existed since before
tracking started (or been made by something outside the dispatcher); it is
counted as live from the start of tracking -- its bytes are added to every
moment from the start until it is freed, which is exact for a pre-existing
tensor.  Auto-discovered storages are of kind ``"weights"`` if the tensor is
an ``nn.Parameter`` (which is then also registered for gradient
classification) and ``"inputs"`` otherwise (typically the batch passed in).
Registering residents explicitly is still better: a parameter that no op
reads (or that is only read late) is otherwise missed or found late.

Kinds (the breakdown)
---------------------
Every storage gets exactly one kind, decided when the report is built, by the
first rule that applies:

1. ``"weights"`` (or the ``kind=`` given): storages registered with
   :meth:`~MemoryTracker.add_resident` -- parameters and buffers of modules,
   params of optimizers, and tensors passed directly -- and auto-discovered
   ``nn.Parameter`` inputs.  Frozen and trainable alike.  A registered tensor's
   pre-existing ``.grad`` is ``"gradients"``; a registered optimizer's
   pre-existing state is ``"optimizer"``.  ``"inputs"``: auto-discovered
   non-parameter storages that existed before tracking.
2. ``"gradients"``: a storage that was, at some moment while tracking, the
   storage of ``.grad`` of a registered parameter.  Observed by a
   post-accumulate-grad hook on each registered parameter (so a gradient freed
   by ``zero_grad(set_to_none=True)`` later is still classified), and by a
   scan of the registered parameters' ``.grad`` at every phase exit and at the
   end.
3. ``"optimizer"``: a storage created inside a phase named in
   ``optimizer_phases`` (default ``("optimizer",)``) that is still alive when
   that phase exits, or that is found in the ``state`` of a registered
   optimizer at a phase exit or at the end.  Optimizer temporaries (freed
   inside the phase) are not optimizer state.
4. ``"activations"``: a storage created inside a phase named in
   ``activation_phases`` (default ``("forward",)``) that is still alive when
   that phase exits -- the tensors autograd saved for backward, plus the
   forward's outputs (the loss).
5. ``"temporaries"``: everything else created while tracking (intermediates
   freed within their phase, the backward's transient buffers, gradient of
   non-registered tensors, anything created outside a named phase).

The breakdown at the peak always sums to ``peak_bytes``.

What it cannot see
------------------
* Memory that is not a tensor storage returned by an ATen op: allocations
  made *inside* a kernel and freed before it returns (cuBLAS/cuDNN/flash
  workspaces, the intermediates of a fused kernel), CUDA context, and
  allocator overhead (block rounding, fragmentation, cached free blocks).
  ``round_to=512`` rounds every storage up like the CUDA caching allocator
  rounds requests; ``MemoryReport.cuda_max_allocated`` gives the allocator's
  own peak on a real CUDA run for comparison.
* Storages created outside the dispatcher (``torch.from_numpy``,
  ``torch.load``, ``UntypedStorage(...)``) while tracking: they are
  auto-discovered at their first use and counted from the start of tracking
  (an over-count for the time between the start and their creation).
* Tensor subclasses that are not traceable wrappers and have no storage
  (sparse, nested) are ignored.  Traceable wrapper subclasses are looked
  through to their inner tensors.

Fake tensors
------------
Enter the tracker *inside* the ``FakeTensorMode`` (the tracker must be the
innermost, top-of-stack mode so it sees the ops before the fake mode turns
them into meta computations)::

    with FakeTensorMode():
        model = build()              # fake parameters
        tracker = MemoryTracker("cpu"); tracker.add_resident(model)
        with tracker:
            ...

The tracker sees the same op sequence in both cases, so fake and real agree
to the byte whenever (a) every op's meta kernel returns outputs with the same
storage sizes as the real kernel and (b) the Python code takes the same path.
Known exceptions:

* (a) The CPU kernel of ``aten.mse_loss`` with a reduction returns the 0-dim
  loss inside a storage as large as the input (the elementwise buffer is kept
  and really stays allocated), while the meta kernel allocates 4 bytes.  Use
  ``(a - b).pow(2).mean()`` when comparing, or accept the difference.
* (b) ``torch.optim`` only defaults to ``foreach``/``fused`` for plain
  ``Tensor``/``Parameter`` types, so pass ``foreach=``/``fused=`` explicitly
  when fake and real counts must match on CUDA.  Likewise attention backend
  selection can differ between a fake CUDA device and a real GPU.
* ``module.half()`` / ``module.to(dtype)`` cannot swap fake parameters; build
  the module under ``torch.set_default_dtype(...)`` instead.

Notes
-----
* AdamW's ``step`` counters are 0-dim float32 tensors on the parameter's
  device only for ``fused=True``/``capturable=True`` or on CPU; the default
  CUDA path keeps them on the CPU, so they are not counted on ``cuda``.
* Autograd's worker threads (CUDA backward) inherit the dispatch mode, so the
  backward is seen on every device.  Phases are global to the tracker, not
  per thread.
* ``torch.UntypedStorage.resize_`` is wrapped while a tracker is active (it
  bypasses the dispatcher); the original is restored on exit.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
import weakref
from contextlib import contextmanager
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import (
    TorchDispatchMode,
    _get_current_dispatch_mode_stack,
    is_traceable_wrapper_subclass,
)
from torch.utils._pytree import tree_leaves

from hollownet.memory.sizes import format_bytes  # MemoryReport.format writes sizes

__all__ = [
    "KINDS",
    "NO_PHASE",
    "MemoryReport",
    "MemoryTracker",
    "PartMeter",
    "measure_step",
]

#: The standard kinds, in the order of the classification rules (see module docstring).
KINDS: tuple[str, ...] = ("weights", "inputs", "gradients", "optimizer", "activations", "temporaries")

#: Phase label for moments outside every ``tracker.phase(...)`` block.
NO_PHASE = "(none)"

# Ops that wrap a tensor made outside the dispatcher (``torch.tensor(...)``):
# their input is brand new, not pre-existing, so it must not be auto-discovered.
_LIFT_OPS = frozenset(
    op
    for op in (
        getattr(torch.ops.aten, "lift_fresh", None),
        getattr(torch.ops.aten, "lift_fresh_copy", None),
        getattr(torch.ops.aten, "lift", None),
    )
    if op is not None
)
_LIFT_OVERLOADS: frozenset = frozenset(
    getattr(packet, name) for packet in _LIFT_OPS for name in packet.overloads()
)


@dataclass
class MemoryReport:
    """What a :class:`MemoryTracker` measured over its tracked region.

    Attributes:
        device: the tracked device, as a string.
        peak_bytes: the maximum, over the region, of the live bytes of all
            storages on the device (residents included).
        peak_phase: the innermost phase active when that maximum was first
            reached (:data:`NO_PHASE` outside every phase).
        phase_peaks: for every phase name, the maximum live bytes while a phase
            of that name was active (on the phase stack; nested phases count for
            every enclosing phase too).  Includes :data:`NO_PHASE` when time was
            spent outside phases.
        breakdown: live bytes per kind at the peak; sums to ``peak_bytes``.
            Always has every kind in :data:`KINDS` (zero if absent), plus any
            custom resident kinds.
        phase_breakdowns: the same breakdown at each phase's own peak.
        start_bytes: live bytes when tracking started (residents + auto-
            discovered pre-existing storages).
        end_bytes: live bytes when tracking ended.
        end_breakdown: live bytes per kind when tracking ended.
        cuda_max_allocated: on a real CUDA device, ``torch.cuda.max_memory_allocated``
            over the region (after ``reset_peak_memory_stats`` at its start); it
            counts *all* allocations of the process on that device, rounded by
            the allocator, plus kernel workspaces.  ``None`` on other devices or
            under ``FakeTensorMode``.
        cuda_start_allocated: ``torch.cuda.memory_allocated`` at the start (same
            conditions), so ``cuda_max_allocated - cuda_start_allocated`` is the
            allocator's peak growth.
        fake: whether any tracked tensor was a ``FakeTensor``.
        num_ops: number of ATen ops observed.
        num_storages: number of distinct storages counted.
        round_to: the rounding unit applied to each storage's size (1 = exact).
    """

    device: str
    peak_bytes: int
    peak_phase: str
    phase_peaks: dict[str, int]
    breakdown: dict[str, int]
    phase_breakdowns: dict[str, dict[str, int]] = field(default_factory=dict)
    start_bytes: int = 0
    end_bytes: int = 0
    end_breakdown: dict[str, int] = field(default_factory=dict)
    cuda_max_allocated: int | None = None
    cuda_start_allocated: int | None = None
    fake: bool = False
    num_ops: int = 0
    num_storages: int = 0
    round_to: int = 1

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (ints, strings, bools, nested dicts, None)."""
        return asdict(self)

    def format(self, title: str | None = None) -> str:
        """A plain-text table of the peak, its breakdown and the phase peaks."""
        lines: list[str] = []
        head = title or f"Tensor memory on {self.device}" + (" (fake tensors)" if self.fake else "")
        lines.append(head)
        lines.append(
            f"  peak: {format_bytes(self.peak_bytes)} ({self.peak_bytes:,} B) in phase {self.peak_phase!r}"
        )
        lines.append(f"  start: {format_bytes(self.start_bytes)}   end: {format_bytes(self.end_bytes)}")
        lines.append("  breakdown at peak:")
        w = max([len(k) for k in self.breakdown] + [8])
        for k, v in self.breakdown.items():
            pct = 100.0 * v / self.peak_bytes if self.peak_bytes else 0.0
            lines.append(f"    {k:<{w}}  {format_bytes(v):>12}  {pct:5.1f}%")
        if self.phase_peaks:
            lines.append("  phase peaks:")
            pw = max(len(p) for p in self.phase_peaks)
            for p, v in self.phase_peaks.items():
                mark = "  <- peak" if p == self.peak_phase else ""
                lines.append(f"    {p:<{pw}}  {format_bytes(v):>12}{mark}")
        if self.cuda_max_allocated is not None:
            lines.append(
                f"  cuda max_memory_allocated: {format_bytes(self.cuda_max_allocated)}"
                f" (start {format_bytes(self.cuda_start_allocated)})"
            )
        lines.append(f"  ops: {self.num_ops}   storages: {self.num_storages}")
        return "\n".join(lines)

    def __str__(self) -> str:  # pragma: no cover - convenience
        return self.format()


class _Record:
    """One storage.  Holds no reference to the storage itself."""

    __slots__ = (
        "index",
        "nbytes",
        "alive",
        "counted",
        "resident_kind",
        "is_grad",
        "is_opt",
        "is_act",
        "pre_existing",
        "key",
    )

    def __init__(self, index: int, nbytes: int, counted: bool = True) -> None:
        self.index = index
        self.nbytes = nbytes  # counted size (already rounded); 0 if not counted
        self.alive = True
        self.counted = counted
        self.resident_kind: str | None = None
        self.is_grad = False
        self.is_opt = False
        self.is_act = False
        self.pre_existing = False
        self.key = 0  # id() of the storage object while it is alive

    def kind(self) -> str:
        if self.resident_kind is not None:
            return self.resident_kind
        if self.is_grad:
            return "gradients"
        if self.is_opt:
            return "optimizer"
        if self.is_act:
            return "activations"
        return "temporaries"


class _PhaseFrame:
    __slots__ = ("name", "created")

    def __init__(self, name: str) -> None:
        self.name = name
        self.created: list[_Record] = []


_EV_DELTA = 0
_EV_PHASE = 1


class _DispatchMode(TorchDispatchMode):
    def __init__(self, tracker: MemoryTracker) -> None:
        super().__init__()
        self._tracker = tracker

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "namespace", None) == "prim":  # prim.device / prim.layout: metadata queries
            return func(*args, **kwargs)
        tr = self._tracker
        ins = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        if func not in _LIFT_OVERLOADS:
            tr._see_inputs(ins)
        out = func(*args, **kwargs)
        tr._see_outputs([o for o in tree_leaves(out) if isinstance(o, torch.Tensor)], ins)
        return out


def _leaf_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """``t`` itself, or the inner tensors of a traceable wrapper subclass (recursively)."""
    if is_traceable_wrapper_subclass(t):
        attrs, _ = t.__tensor_flatten__()
        for a in attrs:
            inner = getattr(t, a)
            if isinstance(inner, torch.Tensor):
                yield from _leaf_tensors(inner)
    else:
        yield t


def _is_fake(t: torch.Tensor) -> bool:
    return isinstance(t, FakeTensor)


def _fake_mode_active() -> bool:
    return any(isinstance(m, FakeTensorMode) for m in _get_current_dispatch_mode_stack())


class MemoryTracker:
    """Context manager that counts live tensor-storage bytes on one device.

    Args:
        device: the device to track (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...).
            A device without an index matches every index of its type.  Under
            ``FakeTensorMode`` the fake device is what counts (fake storages
            live on ``meta`` but the tensors report the fake device).
        activation_phases: phase names whose surviving storages are
            ``"activations"`` (default ``("forward",)``).
        optimizer_phases: phase names whose surviving storages are
            ``"optimizer"`` state (default ``("optimizer",)``).
        auto_register_inputs: count storages first seen as op inputs as
            pre-existing (live since the start); see the module docstring.  If
            False they are ignored (not counted at all).
        round_to: round each storage's size up to a multiple of this many bytes
            (1 = exact bytes; 512 mimics the CUDA caching allocator's request
            rounding).

    A tracker measures one region: enter it once.  The result is
    :attr:`report` (a :class:`MemoryReport`), built on exit.  While inside,
    :attr:`live_bytes` and :attr:`max_live_bytes` give running values.
    """

    def __init__(
        self,
        device: str | torch.device = "cpu",
        *,
        activation_phases: Iterable[str] = ("forward",),
        optimizer_phases: Iterable[str] = ("optimizer",),
        auto_register_inputs: bool = True,
        round_to: int = 1,
    ) -> None:
        self.device = torch.device(device)
        self.activation_phases = frozenset(activation_phases)
        self.optimizer_phases = frozenset(optimizer_phases)
        self.auto_register_inputs = bool(auto_register_inputs)
        if round_to < 1:
            raise ValueError("round_to must be >= 1")
        self.round_to = int(round_to)

        self._lock = threading.RLock()
        self._state = "new"  # new -> active -> done
        self._records: list[_Record] = []
        self._by_id: dict[int, tuple[weakref.ref, _Record]] = {}
        self._initial: list[_Record] = []  # live since the start (residents, discovered)
        self._events: list[tuple] = []
        self._stack: list[_PhaseFrame] = []
        self._start_stack: tuple[str, ...] = ()
        self._params: dict[int, torch.Tensor] = {}
        self._optimizers: dict[int, torch.optim.Optimizer] = {}
        self._hooks: list[Any] = []
        self._mode: _DispatchMode | None = None
        self._orig_resize: Callable | None = None
        self._live = 0
        self._max_live = 0
        self._num_ops = 0
        self._saw_fake = False
        self._cuda_stats = False
        self._cuda_start: int | None = None
        self._cuda_max: int | None = None
        self.report: MemoryReport | None = None

    # ------------------------------------------------------------------ public

    @property
    def live_bytes(self) -> int:
        """Bytes of all counted storages alive right now."""
        return self._live

    @property
    def max_live_bytes(self) -> int:
        """Running maximum of :attr:`live_bytes` (the final value is ``report.peak_bytes``)."""
        return self._max_live

    def add_resident(self, *objs: Any, kind: str | None = None) -> MemoryTracker:
        """Register memory that is resident (already allocated) before tracking.

        Accepts, possibly nested in lists/tuples/sets/dict values:

        * ``nn.Module``: its parameters and buffers (kind ``kind`` or
          ``"weights"``); existing ``.grad`` of its parameters -> ``"gradients"``.
          Its parameters are registered for gradient classification.
        * ``torch.optim.Optimizer``: its params as for a module; tensors in its
          ``state`` -> ``"optimizer"``; the optimizer is registered so that
          state created while tracking is classified ``"optimizer"``.
        * ``torch.Tensor``: its storage (kind ``kind``, or ``"weights"`` for an
          ``nn.Parameter`` and ``"inputs"`` otherwise); a Parameter requiring
          grad is registered for gradient classification.

        Only storages on the tracked device count; shared storages count once.
        A storage not yet known is counted as live from the start of tracking
        (exact for memory that existed before it).  A storage already counted
        (e.g. a LoRA weight created while tracking) just takes the new kind.
        Returns ``self`` for chaining.
        """
        for obj in objs:
            self._add_resident(obj, kind)
        return self

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[MemoryTracker]:
        """Label the code inside as phase ``name`` (may nest; may be used before entering)."""
        frame = _PhaseFrame(str(name))
        with self._lock:
            self._stack.append(frame)
            self._log_phase()
        try:
            yield self
        finally:
            with self._lock:
                self._close_phase(frame)
                # Pop this frame (normally the top).
                for i in range(len(self._stack) - 1, -1, -1):
                    if self._stack[i] is frame:
                        del self._stack[i]
                        break
                self._log_phase()

    def __enter__(self) -> MemoryTracker:
        with self._lock:
            if self._state != "new":
                raise RuntimeError("a MemoryTracker measures one region; create a new one")
            self._initial = [r for r in self._records if r.alive]
            for r in self._initial:
                r.pre_existing = True
            self._live = sum(r.nbytes for r in self._initial)
            self._max_live = self._live
            self._events = []
            self._start_stack = tuple(f.name for f in self._stack)
            self._state = "active"
            for p in self._params.values():
                self._hook_param(p)
        self._start_cuda_stats()
        self._patch_resize()
        self._mode = _DispatchMode(self)
        self._mode.__enter__()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if self._mode is not None:
                self._mode.__exit__(exc_type, exc, tb)
        finally:
            self._mode = None
            self._unpatch_resize()
            self._stop_cuda_stats()
            with self._lock:
                self._scan_params_and_optimizers()
                self.report = self._build_report()
                self._state = "done"
                for h in self._hooks:
                    h.remove()
                self._hooks.clear()
                # Drop every reference: weakrefs (no more callbacks), params, optimizers,
                # and the event log (the report holds everything that was measured).
                self._by_id.clear()
                self._events = []
                self._initial = []
                self._records = []
                self._params.clear()
                self._optimizers.clear()
                self._stack.clear()

    # ---------------------------------------------------------------- internals

    def _on_device(self, t: torch.Tensor) -> bool:
        d = t.device
        return d.type == self.device.type and (self.device.index is None or d.index == self.device.index)

    def _counted_size(self, st: torch.UntypedStorage) -> int:
        n = int(st.nbytes())
        if self.round_to > 1 and n:
            n = math.ceil(n / self.round_to) * self.round_to
        return n

    def _storages(self, t: torch.Tensor) -> Iterator[tuple[torch.Tensor, torch.UntypedStorage]]:
        for leaf in _leaf_tensors(t):
            if not self._on_device(leaf):
                continue
            try:
                st = leaf.untyped_storage()
            except Exception:  # sparse / nested / storage-less tensors
                continue
            yield leaf, st

    def _lookup(self, st: torch.UntypedStorage) -> _Record | None:
        entry = self._by_id.get(id(st))
        if entry is not None and entry[0]() is st:
            return entry[1]
        return None

    def _new_record(self, st: torch.UntypedStorage, counted: bool = True) -> _Record:
        rec = _Record(len(self._records), self._counted_size(st) if counted else 0, counted)
        self._records.append(rec)
        wr = weakref.ref(st, functools.partial(_free_callback, weakref.ref(self), rec))
        rec.key = id(st)
        self._by_id[rec.key] = (wr, rec)
        return rec

    def _log_phase(self) -> None:
        if self._state == "active":
            self._events.append((_EV_PHASE, tuple(f.name for f in self._stack)))

    def _apply_delta(self, rec: _Record, delta: int) -> None:
        if delta == 0:
            return
        self._live += delta
        if self._live > self._max_live:
            self._max_live = self._live
        self._events.append((_EV_DELTA, rec, delta))

    def _register_existing(self, t: torch.Tensor, st: torch.UntypedStorage, counted: bool = True) -> _Record:
        """A storage that existed before we saw it: live since the start."""
        rec = self._new_record(st, counted)
        if self._state == "active":
            rec.pre_existing = True
            self._initial.append(rec)
            # Retroactive: it was live at every moment so far, including the max.
            self._live += rec.nbytes
            self._max_live += rec.nbytes
        if _is_fake(t):
            self._saw_fake = True
        return rec

    def _add_resident(self, obj: Any, kind: str | None) -> None:
        if obj is None:
            return
        if isinstance(obj, torch.nn.Module):
            for p in obj.parameters():
                self._add_tensor(p, kind or "weights", param=True)
            for b in obj.buffers():
                self._add_tensor(b, kind or "weights")
            return
        if isinstance(obj, torch.optim.Optimizer):
            with self._lock:
                self._optimizers[id(obj)] = obj
            for g in obj.param_groups:
                for p in g["params"]:
                    self._add_tensor(p, kind or "weights", param=True)
            for st in obj.state.values():
                for v in tree_leaves(st):
                    if isinstance(v, torch.Tensor):
                        self._add_tensor(v, "optimizer")
            return
        if isinstance(obj, torch.Tensor):
            is_param = isinstance(obj, torch.nn.Parameter)
            self._add_tensor(obj, kind or ("weights" if is_param else "inputs"), param=is_param)
            return
        if isinstance(obj, Mapping):
            for v in obj.values():
                self._add_resident(v, kind)
            return
        if isinstance(obj, (str, bytes)):
            raise TypeError(f"cannot register {obj!r} as resident memory")
        if isinstance(obj, Iterable):
            for v in obj:
                self._add_resident(v, kind)
            return
        raise TypeError(f"cannot register object of type {type(obj).__name__} as resident memory")

    def _add_tensor(self, t: torch.Tensor, kind: str, param: bool = False) -> None:
        with self._lock:
            if self._state == "done":
                raise RuntimeError("tracker already finished")
            for leaf, st in self._storages(t):
                rec = self._lookup(st)
                if rec is None:
                    rec = self._register_existing(leaf, st)
                rec.resident_kind = kind
            if param:
                if id(t) not in self._params:
                    self._params[id(t)] = t
                    if self._state == "active":
                        self._hook_param(t)
                if t.grad is not None:
                    for leaf, st in self._storages(t.grad):
                        rec = self._lookup(st)
                        if rec is None:
                            rec = self._register_existing(leaf, st)
                            rec.resident_kind = "gradients"
                        else:
                            rec.is_grad = True

    def _hook_param(self, p: torch.Tensor) -> None:
        if not (p.requires_grad and p.is_leaf):
            return
        ref = weakref.ref(self)

        def hook(param: torch.Tensor) -> None:
            tr = ref()
            if tr is not None:
                tr._tag_grad(param)

        try:
            self._hooks.append(p.register_post_accumulate_grad_hook(hook))
        except RuntimeError:  # pragma: no cover - e.g. non-leaf
            pass

    def _tag_grad(self, p: torch.Tensor) -> None:
        g = p.grad
        if g is None:
            return
        with self._lock:
            if self._state != "active":
                return
            for leaf, st in self._storages(g):
                rec = self._lookup(st)
                if rec is None:  # made outside the dispatcher: count it from now
                    rec = self._new_record(st)
                    self._apply_delta(rec, rec.nbytes)
                rec.is_grad = True

    def _scan_params_and_optimizers(self) -> None:
        if self._state != "active":
            return
        for p in list(self._params.values()):
            self._tag_grad(p)
        for opt in list(self._optimizers.values()):
            for st in opt.state.values():
                for v in tree_leaves(st):
                    if isinstance(v, torch.Tensor):
                        for _, s in self._storages(v):
                            rec = self._lookup(s)
                            if rec is not None:
                                rec.is_opt = True

    def _close_phase(self, frame: _PhaseFrame) -> None:
        if self._state != "active":
            return
        is_opt = frame.name in self.optimizer_phases
        is_act = frame.name in self.activation_phases
        if is_opt or is_act:
            for rec in frame.created:
                if rec.alive:
                    if is_opt:
                        rec.is_opt = True
                    if is_act:
                        rec.is_act = True
        frame.created.clear()
        self._scan_params_and_optimizers()

    def _see_inputs(self, ins: list[torch.Tensor]) -> None:
        with self._lock:
            self._num_ops += 1
            if self._state != "active":
                return
            for t in ins:
                for leaf, st in self._storages(t):
                    if self._lookup(st) is None:
                        rec = self._register_existing(leaf, st, counted=self.auto_register_inputs)
                        if isinstance(t, torch.nn.Parameter):
                            rec.resident_kind = "weights"
                            if id(t) not in self._params:  # classify its .grad too
                                self._params[id(t)] = t
                                self._hook_param(t)
                        else:
                            rec.resident_kind = "inputs"

    def _see_outputs(self, outs: list[torch.Tensor], ins: list[torch.Tensor]) -> None:
        with self._lock:
            if self._state != "active":
                return
            for t in outs:
                for leaf, st in self._storages(t):
                    rec = self._lookup(st)
                    if rec is None:  # a new allocation
                        rec = self._new_record(st)
                        if _is_fake(leaf):
                            self._saw_fake = True
                        for frame in self._stack:
                            frame.created.append(rec)
                        self._apply_delta(rec, rec.nbytes)
                    else:
                        self._update_size(rec, st)
            # Inputs may have been resized in place (``out=`` arguments, ``resize_``).
            # Unknown inputs here are inputs of lift ops (``torch.tensor``): under fake
            # tensors they are real temporaries that never reach the fake program.
            for t in ins:
                for _, st in self._storages(t):
                    rec = self._lookup(st)
                    if rec is not None:
                        self._update_size(rec, st)

    def _update_size(self, rec: _Record, st: torch.UntypedStorage) -> None:
        if rec.counted and rec.alive:
            n = self._counted_size(st)
            if n != rec.nbytes:
                delta, rec.nbytes = n - rec.nbytes, n
                self._apply_delta(rec, delta)

    def _on_free(self, rec: _Record, wr: weakref.ref) -> None:
        with self._lock:
            if not rec.alive:
                return
            rec.alive = False
            entry = self._by_id.get(rec.key)
            if entry is not None and entry[0] is wr:
                del self._by_id[rec.key]
            if self._state == "active":
                self._apply_delta(rec, -rec.nbytes)

    def _on_storage_resize(self, st: torch.UntypedStorage) -> None:
        with self._lock:
            if self._state != "active":
                return
            rec = self._lookup(st)
            if rec is not None:
                self._update_size(rec, st)

    def _patch_resize(self) -> None:
        # ``UntypedStorage.resize_`` does not go through the dispatcher.
        orig = torch.UntypedStorage.resize_
        ref = weakref.ref(self)

        @functools.wraps(orig)
        def resize_(st, size):
            out = orig(st, size)
            tr = ref()
            if tr is not None:
                tr._on_storage_resize(st)
            return out

        self._orig_resize = orig
        torch.UntypedStorage.resize_ = resize_  # type: ignore[method-assign]

    def _unpatch_resize(self) -> None:
        if self._orig_resize is not None:
            torch.UntypedStorage.resize_ = self._orig_resize  # type: ignore[method-assign]
            self._orig_resize = None

    def _start_cuda_stats(self) -> None:
        self._cuda_stats = (
            self.device.type == "cuda" and torch.cuda.is_available() and not _fake_mode_active()
        )
        if self._cuda_stats:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._cuda_start = int(torch.cuda.memory_allocated(self.device))

    def _stop_cuda_stats(self) -> None:
        if self._cuda_stats:
            torch.cuda.synchronize(self.device)
            self._cuda_max = int(torch.cuda.max_memory_allocated(self.device))

    def _build_report(self) -> MemoryReport:
        """Replay the event log with the final classification of every storage."""
        kinds: dict[str, int] = {k: 0 for k in KINDS}
        live = 0
        for rec in self._initial:
            k = rec.kind()
            kinds.setdefault(k, 0)
            kinds[k] += rec.nbytes
            live += rec.nbytes
        # Storages created while tracking: their kind may be a custom resident kind.
        for rec in self._records:
            kinds.setdefault(rec.kind(), 0)
        start = live
        stack: tuple[str, ...] = self._start_stack
        peak, peak_phase, peak_kinds = live, (stack[-1] if stack else NO_PHASE), dict(kinds)
        phase_peaks: dict[str, int] = {}
        phase_bd: dict[str, dict[str, int]] = {}

        def touch_phases() -> None:
            names = set(stack) if stack else {NO_PHASE}
            for name in names:
                if live > phase_peaks.get(name, -1):
                    phase_peaks[name] = live
                    phase_bd[name] = dict(kinds)

        touch_phases()
        for ev in self._events:
            if ev[0] == _EV_PHASE:
                stack = ev[1]
                touch_phases()
                continue
            _, rec, delta = ev
            kinds[rec.kind()] += delta
            live += delta
            if delta > 0:
                if live > peak:
                    peak = live
                    peak_phase = stack[-1] if stack else NO_PHASE
                    peak_kinds = dict(kinds)
                touch_phases()
        end_kinds = dict(kinds)
        assert sum(peak_kinds.values()) == peak
        return MemoryReport(
            device=str(self.device),
            peak_bytes=int(peak),
            peak_phase=peak_phase,
            phase_peaks=phase_peaks,
            breakdown=peak_kinds,
            phase_breakdowns=phase_bd,
            start_bytes=int(start),
            end_bytes=int(live),
            end_breakdown=end_kinds,
            cuda_max_allocated=self._cuda_max,
            cuda_start_allocated=self._cuda_start if self._cuda_stats else None,
            fake=self._saw_fake,
            num_ops=self._num_ops,
            num_storages=sum(1 for r in self._records if r.counted),
            round_to=self.round_to,
        )


def _free_callback(tracker_ref: weakref.ref, rec: _Record, wr: weakref.ref) -> None:
    tr = tracker_ref()
    if tr is not None:
        tr._on_free(rec, wr)


def measure_step(
    step_fn: Callable[[MemoryTracker], Any],
    resident: Any = None,
    device: str | torch.device = "cpu",
    **tracker_kwargs: Any,
) -> MemoryReport:
    """Run ``step_fn(tracker)`` under a fresh :class:`MemoryTracker` and return its report.

    ``resident`` is passed to :meth:`MemoryTracker.add_resident` (a module, an
    optimizer, a tensor, or a list of them).  ``step_fn`` marks phases with
    ``with tracker.phase("forward"): ...``.  Extra keyword arguments go to the
    tracker (``round_to``, ``activation_phases``, ...).
    """
    tracker = MemoryTracker(device, **tracker_kwargs)
    if resident is not None:
        tracker.add_resident(resident)
    with tracker:
        step_fn(tracker)
    assert tracker.report is not None
    return tracker.report


class PartMeter:
    """Peak tensor memory of each stage-1 part. One tracker per part: parts never overlap in memory
    (each model is dropped before the next loads), so the stage's peak is the largest part's.

    Layer-major runs measure one part per layer (``"U-Net encoder + hollow: mid_block.resnets.0"``):
    residents are the loaded layer, the activation arrays kept in RAM and the part's constants; the
    chunks count as they are created. Layers never overlap either, so the largest is the peak.
    A disabled meter measures nothing (``measure`` is a no-op)."""

    def __init__(self, enabled: bool, device: str | torch.device = "cpu"):
        self.enabled, self.device, self.parts = enabled, device, {}

    @contextmanager
    def measure(self, name: str, *resident):
        if not self.enabled or name in self.parts:
            yield
            return
        tracker = MemoryTracker(device=self.device)
        tracker.add_resident(*resident)
        with tracker:
            yield
        self.parts[name] = tracker.report

    def summary(self, always: bool = False) -> dict | None:
        """The largest part's peak and breakdown, every part's peak; ``always``: zeros if none was measured."""
        if not self.parts:
            return {"peak_bytes": 0, "peak_phase": None, "breakdown": dict.fromkeys(KINDS, 0), "parts": {}} if always else None
        name, top = max(self.parts.items(), key=lambda kv: kv[1].peak_bytes)
        return {"peak_bytes": top.peak_bytes, "peak_phase": name, "breakdown": top.breakdown,
                "cuda_max_allocated": max((r.cuda_max_allocated or 0) for r in self.parts.values()) or None,
                "parts": {k: r.peak_bytes for k, r in self.parts.items()}}
