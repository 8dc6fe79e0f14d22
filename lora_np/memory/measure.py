"""The measured side: one real training step, watched by the allocator, by the same categories as the ledger.

``measure_step`` runs it; ``compare`` and ``measure_model`` build the model or batch and return the ledger next to
the measurement; ``format_table`` and ``format_comparison`` print the two side by side.

Which allocator is watched depends on the backend, and ``Measured.allocator`` records it:
- NumPy: ``tracemalloc``, which sees every host allocation (NumPy's buffers and Python's objects).
- CuPy: CuPy's device memory pool, through a ``cupy.cuda.MemoryHook`` told of every block the pool hands out and
  takes back (``_pool_bytes``). It sees the device arrays only; the Python objects live on the host.
Both are read through the same three members, ``live``, ``peak`` and ``reset_peak()``, so ``measure_step`` is one
code path for both.
"""

from __future__ import annotations

import gc
import math
import tracemalloc
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .. import backend
from ..data import BatchSampler
from ..lora import LoRAConfig, prepare_finetuning
from ..model import GPT, GPTConfig
from ..nn import Module
from ..optim import AdamW, Optimizer
from ..qlora import QuantizedWeight, quantize_base
from ..quantize import QuantConfig
from .graph import graph_bytes
from .ledger import CATEGORIES, MIB, Ledger, ledger_of

TRACEMALLOC = "tracemalloc"  # host memory: NumPy's buffers and Python's objects
CUPY_POOL = "cupy memory pool"  # device memory: the blocks CuPy's pool hands out, at the sizes asked for


@dataclass
class Measured:
    """Bytes of one real training step, by category, from the arrays themselves and from the allocator
    (``allocator``: "tracemalloc" on the NumPy backend, "cupy memory pool" on CuPy; the module docstring says why).

    weights, gradients, optimizer: the ``nbytes`` of the parameters, of their ``.grad`` after backward, and of the
    optimizer's state after the step (AdamW allocates m and v lazily, so ``measure_step`` runs warm-up steps first).
    activations: what the allocator sees alive right after the forward pass and the loss, above the baseline
    before the step: the graph's arrays, plus its Python objects under tracemalloc (not on the device).
    traced_peak: the most the allocator saw allocated at any moment of the step, above the same baseline: the
    activations still alive then (backward frees the graph as it goes), the gradients formed so far, and the
    transient arrays of backward (pending gradients of intermediate nodes, each op's temporaries) and of the update.
    scratch = traced_peak − activations − gradients: what the peak holds beyond "all activations and all gradients
    at once", the ledger's assumption. Because early activations are freed before the last weight gradients
    exist, it can come out negative in full fine-tuning. The ledger does not predict it.
    peak (= total): the most the step held at once, weights and optimizer state (allocated before it) included.
    graph: the activations counted from the graph itself (``graph.graph_bytes``): the arrays its nodes keep, each
    buffer once, without the Python objects; ``graph_by_op`` splits them by the op that made them.
    """

    weights: int
    gradients: int
    optimizer: int
    activations: int
    traced_peak: int
    quantized: int = 0  # the part of `weights` stored in 4 bits (QuantizedWeight.nbytes: codes + scales)
    graph: int = 0  # the arrays the graph keeps after the forward pass, counted node by node
    graph_by_op: dict[str, int] = field(default_factory=dict)  # the same, by the op that made each array
    allocator: str = TRACEMALLOC  # what measured activations and traced_peak: TRACEMALLOC or CUPY_POOL

    @property
    def scratch(self) -> int:
        return self.traced_peak - self.activations - self.gradients

    @property
    def peak(self) -> int:
        """The step's peak: weights and optimizer state (allocated before it) plus the traced peak."""
        return self.weights + self.optimizer + self.traced_peak

    @property
    def total(self) -> int:
        """= peak: weights + gradients + optimizer + activations + scratch, comparable to ``Ledger.total``."""
        return self.peak

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "scratch": self.scratch, "peak": self.peak, "total": self.total}


class _LiveBytes:
    """The bytes alive now (``live``) and the most alive at once (``peak``), kept by hand from each allocation and
    release: what ``tracemalloc`` keeps for host memory, here for an allocator that only reports events."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def allocated(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def freed(self, nbytes: int) -> None:
        self.live -= nbytes

    def reset_peak(self) -> None:
        """Forget earlier highs: from here on, ``peak`` is the most alive since this call."""
        self.peak = self.live


class _TracedBytes:
    """Host memory as ``tracemalloc`` counts it, read as ``_LiveBytes`` is (``live``, ``peak``, ``reset_peak``). A
    context manager: tracemalloc is started and stopped here unless the caller already runs it."""

    allocator = TRACEMALLOC

    def __enter__(self) -> _TracedBytes:
        self._started = not tracemalloc.is_tracing()
        if self._started:
            tracemalloc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._started:
            tracemalloc.stop()

    @property
    def live(self) -> int:
        return tracemalloc.get_traced_memory()[0]

    @property
    def peak(self) -> int:
        return tracemalloc.get_traced_memory()[1]

    def reset_peak(self) -> None:
        tracemalloc.reset_peak()


class _PoolBlocks(_LiveBytes):
    """Device memory as CuPy's memory pool hands it out: ``_LiveBytes`` fed by the two callbacks of a
    ``cupy.cuda.MemoryHook``, called by CuPy with the keywords named below (``_pool_bytes`` makes it a real hook).

    It counts the size each array asked for (``size``, = its ``nbytes``), not the pool's block (``mem_size``,
    rounded up to 512 bytes): the asked-for bytes are what tracemalloc and the ledger count, so the columns stay
    comparable; the pool holds at most 511 bytes more per block. CuPy tells ``free_postprocess`` only the
    rounded size, so the asked-for one is kept by block address. A block handed out before the hook was entered is
    not in that table and its release is ignored, as tracemalloc ignores frees of blocks it never traced.

    The pool's bookkeeping happens on the host, when an array is made or dropped, so the counts need no
    ``Device().synchronize()``: a block dropped while a kernel may still read it goes back to that stream's free
    list, and the stream runs its next user after that kernel. Nor does the baseline need the pool emptied
    (``free_all_blocks``): a block the pool caches is not handed out, so it is not counted.
    """

    allocator = CUPY_POOL

    def __init__(self) -> None:
        super().__init__()
        self._asked: dict[int, int] = {}  # block address -> bytes asked for

    def malloc_postprocess(self, **kwargs: Any) -> None:  # device_id, size, mem_size, mem_ptr, pmem_id
        if kwargs["mem_ptr"]:  # 0: the malloc failed, or asked for 0 bytes; nothing is held
            self._asked[kwargs["mem_ptr"]] = kwargs["size"]
            self.allocated(kwargs["size"])

    def free_postprocess(self, **kwargs: Any) -> None:  # device_id, mem_size, mem_ptr, pmem_id
        size = self._asked.pop(kwargs["mem_ptr"], None)
        if size is not None:
            self.freed(size)


def _pool_bytes() -> _PoolBlocks:
    """A ``_PoolBlocks`` that is a ``cupy.cuda.MemoryHook``, entered with ``with`` like ``_TracedBytes``. CuPy's
    hooks are per thread: only the thread that enters it is watched."""

    class PoolHook(_PoolBlocks, backend.xp.cuda.MemoryHook):  # backend.xp is cupy here (only backend.py imports it)
        name = "lora_np.measure_step"  # CuPy keys the hooks it calls by name

    return PoolHook()


def _byte_counter() -> _TracedBytes | _PoolBlocks:
    """The allocator's live and peak bytes for the active backend: tracemalloc on NumPy, the device pool on CuPy."""
    return _TracedBytes() if backend.get_backend() == "numpy" else _pool_bytes()


def measure_step(model: Module, optimizer: Optimizer, x: Any, y: Any, warmup_steps: int = 1) -> Measured:
    """Run ``warmup_steps`` training steps (so AdamW's state exists), then one measured step: zero_grad, forward,
    loss, backward, optimizer.step, watched by the backend's allocator (tracemalloc on NumPy: host memory; CuPy's
    memory pool on CuPy: device memory; ``Measured.allocator`` says which). Between the forward pass and backward
    it also counts what the graph keeps, node by node (``graph_bytes``).

    On CuPy, pass the batch already on the device (``backend.to_device``, as ``compare`` and ``measure_model``
    do): a host batch is copied by every forward pass, and that copy would count among the activations.

    Every step updates the weights, as training does. ``tracemalloc`` is started and stopped here unless the
    caller already runs it (then its peak is reset, and what it traced before the step and sees freed during it
    counts against the step: tens of KiB of the warm-up's leftovers for the tests' small models).
    """
    for _ in range(warmup_steps):
        optimizer.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        optimizer.step()
        del loss
    optimizer.zero_grad()
    gc.collect()  # what the warm-up left in reference cycles must not be freed in the middle of the step
    counter = _byte_counter()
    with counter:
        counter.reset_peak()
        base = counter.live
        _, loss = model(x, y)
        activations = counter.live - base
        kept = graph_bytes(loss, exclude=(*model.parameters(), x, y))  # after the reading: its lists are not counted
        loss.backward()
        gradients = sum(int(p.grad.nbytes) for p in optimizer.params if p.grad is not None)
        optimizer.step()
        traced_peak = counter.peak - base
        del loss
    quantized = sum(int(p.nbytes) for p in model.parameters() if isinstance(p, QuantizedWeight))  # as stored
    weights = quantized + sum(int(p.data.nbytes) for p in model.parameters() if not isinstance(p, QuantizedWeight))
    return Measured(weights, gradients, optimizer.state_nbytes(), activations, traced_peak, quantized, kept.total,
                    kept.by_op, counter.allocator)


# The optimizer of every measured step. Its state's bytes do not depend on these settings (m and v have the shapes of
# the parameters whatever the rate), but one setting for every measurement keeps them the same step.
MEASURE_LR = 1e-3
MEASURE_WEIGHT_DECAY = 0.01


def _optimizer(model: GPT) -> AdamW:
    return AdamW(model.trainable_parameters(), lr=MEASURE_LR, weight_decay=MEASURE_WEIGHT_DECAY)


def compare(config: GPTConfig, lora: LoRAConfig | None, batch_size: int, block_size: int | None = None,
            seed: int = 0, train_only: Sequence[str] | str = (), quant: QuantConfig | None = None
            ) -> tuple[Ledger, Measured]:
    """The analytic ledger and the measured step for the same model, ``GPT(config)`` set up with ``lora`` (None:
    full fine-tuning; with ``train_only``, of those layers only; with ``quant``, LoRA on the base in 4 bits), with
    AdamW (``MEASURE_LR``, ``MEASURE_WEIGHT_DECAY``), on a batch of random token ids (int64)."""
    model = prepare_finetuning(GPT(config), lora, train_only)
    if quant is not None:
        quantize_base(model, quant)
    opt = _optimizer(model)
    T = config.block_size if block_size is None else block_size
    gen = backend.rng(seed)
    # int64, drawn on the host and put on the device before the step, as the ledger assumes (NumPy: the same array)
    x, y = (backend.to_device(gen.integers(0, config.vocab_size, size=(batch_size, T))) for _ in range(2))
    return ledger_of(model, batch_size, T), measure_step(model, opt, x, y)


def measure_model(model: GPT, train_ids: Any, batch_size: int, block_size: int | None = None,
                  seed: int = 0) -> dict[str, Any]:
    """Ledger and measured step for an already set-up ``model`` (it is trained by the step: pass a copy to keep
    it), on a batch cut from the token stream ``train_ids``; a JSON-ready dict for results files."""
    T = block_size or model.config.block_size
    x, y = map(backend.to_device, BatchSampler(train_ids, T, batch_size, seed).sample())  # on the device already
    ledger = ledger_of(model, batch_size, T)
    opt = _optimizer(model)
    measured = measure_step(model, opt, x, y)
    return {"mode": ledger.mode, "batch_size": batch_size, "block_size": T,
            "analytic": ledger.to_dict(), "measured": measured.to_dict()}


def format_table(ledger: Ledger, measured: Measured) -> str:
    """Analytic next to measured, in MiB, one line per category (scratch: measured only), and a last line that
    names the allocator the measured column comes from."""
    lines = [f"{'MiB':<12} {'analytic':>10} {'measured':>10} {'meas/an':>8}   ({ledger.mode})"]
    for cat in (*CATEGORIES, "total"):
        a, m = getattr(ledger, cat), getattr(measured, cat)
        lines.append(f"{cat:<12} {a / MIB:>10.2f} {m / MIB:>10.2f} {m / a if a else math.nan:>8.3f}")
        if cat == "weights" and (ledger.quantized or measured.quantized):
            q, mq = ledger.quantized, measured.quantized
            lines.append(f"{'  4-bit W':<12} {q / MIB:>10.2f} {mq / MIB:>10.2f} {mq / q if q else math.nan:>8.3f}")
        if cat == "activations" and measured.graph:
            lines.append(f"{'  in graph':<12} {'':>10} {measured.graph / MIB:>10.2f}   the arrays its nodes keep")
        if cat == "activations":
            lines.append(f"{'  scratch':<12} {'':>10} {measured.scratch / MIB:>10.2f}   backward's transient arrays")
    where = "host memory" if measured.allocator == TRACEMALLOC else "device memory"
    lines.append(f"measured: {measured.allocator} ({where})")
    return "\n".join(lines)


def format_comparison(mem: dict[str, Any]) -> str:
    """``format_table`` for the dict that ``measure_model`` returns (or a results file kept: one written before
    ``allocator`` was recorded was measured by tracemalloc, the only allocator there was)."""
    a, m = mem["analytic"], mem["measured"]
    ledger = Ledger(*(a[c] for c in CATEGORIES), mode=mem.get("mode", ""), quantized=a.get("quantized", 0))
    measured = Measured(*(m[c] for c in (*CATEGORIES, "traced_peak")), quantized=m.get("quantized", 0),
                        graph=m.get("graph", 0), graph_by_op=m.get("graph_by_op", {}),
                        allocator=m.get("allocator", TRACEMALLOC))
    return format_table(ledger, measured)
