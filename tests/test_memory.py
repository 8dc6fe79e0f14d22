"""The memory ledger (lora_np/memory/: ledger.py, graph.py, measure.py, paper.py): analytic bytes against the real
arrays, the real graph and the allocator (tracemalloc on NumPy; CuPy's memory pool on a GPU, at the end).

Tolerances, and why:
- weights, gradients, optimizer state: EXACT. The ledger counts the same sizes model.py and lora.py allocate.
- activations, counted on the real graph (``graph_bytes``: every node's inputs and the arrays its backward closure
  captured, each buffer once): EXACT, on every setup below and on corner cases (``GRAPH_SETUPS``).
- activations, as tracemalloc sees them after the forward pass: may only exceed the analytic count, by the
  Python objects of the graph (Tensors, closures): 0 <= measured - analytic <= 128 KiB for these 2-layer models
  (40-85 KiB is what it is). That gap must not grow with the batch: every array that does is counted.
- total: the measured step's peak also holds backward's transient arrays ("scratch": pending gradients and each
  op's temporaries, mostly GELU's backward), which the ledger does not model, while backward frees activations as
  it goes, before the last gradients exist, which the ledger does not model either. For SMALL below the measured
  total is 0.98x (full) and 1.11x (LoRA on q, v) the analytic total; the test allows 0.9x <= measured <= 1.35x
  analytic. The ratio depends on the shape: scratch is a few (B, T, 4C) arrays, activations grow with n_layer
  (a 1-layer model reaches ~1.5x, the 4-layer bench configuration ~1.1x).
"""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from lora_np import backend, memory
from lora_np.lora import LoRAConfig, count_parameters, prepare_finetuning
from lora_np.memory.measure import _LiveBytes, _PoolBlocks
from lora_np.model import GPT, GPTConfig
from lora_np.optim import AdamW
from lora_np.qlora import quantize_base, quantized_weights
from lora_np.quantize import QuantConfig, quantize, stored_nbytes

KIB = 1024
SMALL = GPTConfig(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=64)

CASES = [  # (config, LoRA setup or None for full fine-tuning, batch, block_size)
    (SMALL, None, 4, None),
    (SMALL, LoRAConfig(), 4, None),
    (SMALL, LoRAConfig(targets="all-linear", r=4), 4, None),
    (SMALL, LoRAConfig(modules_to_save=("wte", "lm_head")), 4, 16),
    (SMALL, LoRAConfig(targets=("v",)), 4, None),
    (GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False),
     LoRAConfig(targets="k,o,down", r=4, modules_to_save=("wpe", "ln_f")), 3, 8),
    (GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=1, n_embd=32), None, 3, None),
    (GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1),
     LoRAConfig(dropout=0.2, modules_to_save=("wte",)), 3, None),
]


@pytest.fixture(scope="module")
def measured():
    """compare() for every case, computed once (each is a real training step under tracemalloc)."""
    return [memory.compare(cfg, lora, B, T) for cfg, lora, B, T in CASES]


@pytest.mark.parametrize("i", range(len(CASES)))
def test_parameter_bytes_are_exact(i, measured):
    cfg, lora, B, T = CASES[i]
    ledger, m = measured[i]
    assert ledger.mode == ("full" if lora is None else "lora")
    assert (m.weights, m.gradients, m.optimizer) == (ledger.weights, ledger.gradients, ledger.optimizer)
    assert m.optimizer == 2 * m.gradients  # AdamW: m and v per trainable number
    model = prepare_finetuning(GPT(cfg), lora)
    counts = count_parameters(model)
    assert memory.count_trainable(cfg, lora) == (counts.total, counts.trainable)
    assert ledger.weights == sum(p.data.nbytes for p in model.parameters())
    assert ledger.gradients == sum(p.data.nbytes for p in model.trainable_parameters())
    assert memory.ledger_of(model, B, T) == memory.analytic_ledger(cfg, lora, B, T)


@pytest.mark.parametrize("i", range(len(CASES)))
def test_activations_match_tracemalloc(i, measured):
    ledger, m = measured[i]
    assert 0 <= m.activations - ledger.activations <= 128 * KIB
    assert m.graph == ledger.activations  # counted node by node from the real graph: exact
    assert sum(m.graph_by_op.values()) == m.graph


@pytest.mark.parametrize("lora", [None, LoRAConfig(), LoRAConfig(targets="all-linear", r=4, dropout=0.1)])
def test_graph_count_with_tied_weights(lora):
    """The tied head reads wte.weight.T, a view of a parameter (frozen under LoRA): counted as a weight, not kept."""
    cfg = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, tie_weights=True)
    ledger, m = memory.compare(cfg, lora, 3)
    assert m.graph == ledger.activations


def test_graph_count_by_op():
    """Full fine-tuning of SMALL: each op's share is the module docstring's term (f = 4 bytes, N = B·T)."""
    _, m = memory.compare(SMALL, None, 4)
    N, C, H, T, V, L = 4 * 32, SMALL.n_embd, SMALL.n_head, 32, SMALL.vocab_size, SMALL.n_layer
    f = 4
    assert m.graph_by_op["causal_attention"] == L * (4 * H * T * T + N * C) * f  # attention weights, output
    assert m.graph_by_op["fused_linear"] == L * (3 * N * C + 3 * C * C) * f  # [q | k | v], their (C, 3C) weights
    assert m.graph_by_op["gelu"] == L * 2 * 4 * N * C * f  # output and tanh(u)
    assert m.graph_by_op["cross_entropy"] == N * V * f + N + 8 * N  # log-probs, valid mask, clamped targets
    assert m.graph_by_op["layer_norm"] == (2 * L + 1) * (2 * N * C + N) * f  # output, xhat and rstd


def test_activation_gap_does_not_grow_with_the_batch():
    gaps = []
    for B in (2, 6):
        ledger, m = memory.compare(SMALL, LoRAConfig(), B)
        gaps.append(m.activations - ledger.activations)
    assert abs(gaps[1] - gaps[0]) < 4 * KIB  # the Python objects of the graph do not depend on the batch


@pytest.mark.parametrize("i", [0, 1])
def test_measured_total_within_tolerance(i, measured):
    ledger, m = measured[i]
    assert 0.9 * ledger.total <= m.total <= 1.35 * ledger.total
    assert m.traced_peak > m.activations  # the peak holds at least what the forward pass kept


def test_lora_shrinks_gradients_and_optimizer_not_activations(measured):
    (full, full_m), (lora, lora_m) = measured[0], measured[1]
    assert lora.gradients + lora.optimizer < 0.05 * (full.gradients + full.optimizer)
    assert lora_m.gradients + lora_m.optimizer < 0.05 * (full_m.gradients + full_m.optimizer)
    assert abs(lora.weights - full.weights) < 0.05 * full.weights  # W is still there; A and B are small
    # LoRA does not save activations: the frozen layers still pass gradients down, so their inputs are kept; the
    # fused adapter adds only h = x@A (N, r) per layer, and block 0 keeps a little less (its input needs no grad).
    assert 0.9 * full.activations < lora.activations < 1.1 * full.activations  # 0.98x for SMALL
    assert 0.9 * full_m.activations < lora_m.activations < 1.1 * full_m.activations


def _full_activations(cfg: GPTConfig, B: int, T: int, f: int = 4) -> int:
    """The closed form of the module docstring, for full fine-tuning (n_head > 1, T > 1, no dropout)."""
    N, C, H, V = B * T, cfg.n_embd, cfg.n_head, cfg.vocab_size
    embeddings = (2 * N * C + T * C) * f + 8 * T
    block = (24 * N * C + 2 * N + B * H * T * T + 3 * C * C) * f
    head = (2 * N * C + N + 2 * N * V) * f + 9 * N
    return embeddings + cfg.n_layer * block + head


@pytest.mark.parametrize("cfg,B,T", [(SMALL, 4, 32), (SMALL, 3, 7),
                                     (GPTConfig(vocab_size=11, block_size=64, n_layer=5, n_head=8, n_embd=48), 2, 64)])
def test_full_activations_closed_form(cfg, B, T):
    assert memory.analytic_ledger(cfg, None, B, T).activations == _full_activations(cfg, B, T)


def test_lora_adds_per_adapted_layer():
    """One more block, with LoRA on all six linears, costs a full block plus N·r per layer (h = x @ A) and the merged
    W + s·A@B of o, up and down (q, k, v keep their concatenated W in full fine-tuning too)."""
    B, T, r, f = 2, 16, 4, 4
    cfgs = [GPTConfig(vocab_size=40, block_size=T, n_layer=L, n_head=2, n_embd=32) for L in (2, 3)]
    acts = [memory.analytic_ledger(c, LoRAConfig(targets="all-linear", r=r), B).activations for c in cfgs]
    N = B * T
    full_block = _full_activations(cfgs[1], B, T) - _full_activations(cfgs[0], B, T)
    C = cfgs[0].n_embd
    adapters = (6 * N * r + 9 * C * C) * f  # h = x @ A in each of the six adapted layers; C² + 4C² + 4C²
    assert acts[1] - acts[0] == full_block + adapters


@pytest.mark.parametrize(
    "lora, batch_size, block_size, match",
    [
        (None, 4, SMALL.block_size + 1, "block_size"),
        (None, 0, None, "batch_size"),
        (LoRAConfig(), 4, 0, "block_size"),
        (LoRAConfig(r=SMALL.n_embd + 1), 4, None, r"LoRA rank\(s\) \[65\] exceed 64 \(n_embd\)"),
    ],
)
def test_bad_arguments(lora, batch_size, block_size, match):
    with pytest.raises(ValueError, match=match):
        memory.analytic_ledger(SMALL, lora, batch_size, block_size)


PARTIAL = [  # (config, train_only: full fine-tuning of these layers only, batch, block_size)
    (SMALL, ("q", "v"), 4, None),  # the sweep's control run
    (GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=False), "o,down", 3, 8),
    (GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1), ("up",), 3, None),
]


@pytest.mark.parametrize("cfg, only, B, T", PARTIAL)
def test_partial_fine_tuning_ledger_matches_a_measured_step(cfg, only, B, T):
    """Full fine-tuning of some layers only: parameter bytes exact, activations within the graph objects' margin,
    and ledger_of recognises the setup from the model's structure."""
    ledger, m = memory.compare(cfg, None, B, T, train_only=only)
    assert ledger.mode == "partial"
    assert (m.weights, m.gradients, m.optimizer) == (ledger.weights, ledger.gradients, ledger.optimizer)
    assert 0 <= m.activations - ledger.activations <= 128 * KIB
    assert m.graph == ledger.activations
    model = prepare_finetuning(GPT(cfg), None, train_only=only)
    counts = count_parameters(model)
    assert memory.count_trainable(cfg, None, only) == (counts.total, counts.trainable)
    names = (only,) if isinstance(only, str) else only
    layer_params = sum(p.size for name, mod in model.named_modules() for p in mod.parameters()
                       if name.split(".")[-1] in ",".join(names).split(","))
    assert counts.trainable == layer_params  # those layers' weights and biases, nothing else
    assert memory.ledger_of(model, B, T) == ledger


def test_partial_sits_between_lora_and_full():
    """q, v in full trains more than LoRA r=8 on q, v and less than everything; activations stay close to full's."""
    full, qv, lora = (memory.analytic_ledger(SMALL, lo, 4, train_only=t)
                      for lo, t in ((None, ()), (None, "q,v"), (LoRAConfig(), ())))
    assert lora.gradients < qv.gradients < full.gradients
    assert qv.weights == full.weights  # no adapter: the same parameters, fewer of them trainable
    assert 0.8 * full.activations < qv.activations <= full.activations


def test_ledger_of_a_model_that_is_neither_full_nor_lora_fine_tuning():
    model = GPT(SMALL)
    model.wte.weight.requires_grad = False
    with pytest.raises(ValueError, match="must train every parameter"):
        memory.ledger_of(model, 2)
    model = prepare_finetuning(GPT(SMALL), None, train_only="q,v")
    model.blocks[0].attn.v.bias.requires_grad = False  # not the whole layer: no setup the ledger models
    with pytest.raises(ValueError, match="exactly the Linear layers"):
        memory.ledger_of(model, 2)


@pytest.mark.parametrize("lora, only, error, match", [
    (LoRAConfig(), "q,v", ValueError, "not both"),
    (None, "q,x", ValueError, r"unknown LoRA target\(s\) \['x'\]"),
    ("q,v", (), TypeError, "must be a LoRAConfig"),
])
def test_bad_partial_setups(lora, only, error, match):
    with pytest.raises(error, match=match):
        memory.analytic_ledger(SMALL, lora, 2, train_only=only)
    model = GPT(SMALL)
    before = [p.requires_grad for p in model.parameters()]
    with pytest.raises(error, match=match):
        prepare_finetuning(model, lora, train_only=only)
    assert [p.requires_grad for p in model.parameters()] == before  # checked before anything changed


def test_measure_model_and_tables():
    model = prepare_finetuning(GPT(SMALL), LoRAConfig(r=2))
    ids = np.random.default_rng(0).integers(0, SMALL.vocab_size, size=2000)
    mem = memory.measure_model(model, ids, batch_size=2)
    json.dumps(mem)  # goes into results files as it is
    for cat in memory.CATEGORIES:
        assert mem["analytic"][cat] >= 0 and mem["measured"][cat] >= 0
    assert mem["measured"]["weights"] == mem["analytic"]["weights"]
    assert mem["measured"]["peak"] == mem["measured"]["total"] > mem["measured"]["traced_peak"]
    text = memory.format_comparison(mem)
    assert "activations" in text and "scratch" in text
    assert mem["measured"]["allocator"] == "tracemalloc" and text.endswith("measured: tracemalloc (host memory)")
    assert "MiB" in memory.analytic_ledger(SMALL, None, 2).table()


# -- the allocator behind the measured column: tracemalloc on NumPy, CuPy's memory pool on CuPy ---------------------


def test_live_bytes_keeps_the_live_bytes_and_their_peak():
    c = _LiveBytes()
    c.allocated(100)
    c.allocated(50)
    c.freed(100)
    assert (c.live, c.peak) == (50, 150)
    c.reset_peak()
    assert (c.live, c.peak) == (50, 50)  # the earlier high is forgotten, the live bytes are not
    c.allocated(30)
    c.freed(30)
    assert (c.live, c.peak) == (50, 80)


def test_pool_blocks_count_the_bytes_asked_for():
    """The CuPy hook's arithmetic, fed the callbacks as CuPy's pool makes them (cupy/cuda/memory.pyx): malloc with
    the size asked for and the pool's block rounded up to 512 bytes; free with the block's size only."""
    c = _PoolBlocks()
    c.malloc_postprocess(device_id=0, size=100, mem_size=512, mem_ptr=0x1000, pmem_id=1)
    c.malloc_postprocess(device_id=0, size=1000, mem_size=1024, mem_ptr=0x2000, pmem_id=2)
    c.malloc_postprocess(device_id=0, size=0, mem_size=0, mem_ptr=0, pmem_id=3)  # an empty array: no block
    assert (c.live, c.peak) == (1100, 1100)  # asked for, not rounded
    c.free_postprocess(device_id=0, mem_size=512, mem_ptr=0x1000, pmem_id=1)
    c.free_postprocess(device_id=0, mem_size=2048, mem_ptr=0x9000, pmem_id=9)  # handed out before the hook: ignored
    assert (c.live, c.peak) == (1000, 1100)
    c.reset_peak()
    c.malloc_postprocess(device_id=0, size=8, mem_size=512, mem_ptr=0x1000, pmem_id=4)  # the freed block reused
    for ptr, pmem_id in ((0x1000, 4), (0x2000, 2)):
        c.free_postprocess(device_id=0, mem_size=512, mem_ptr=ptr, pmem_id=pmem_id)
    assert (c.live, c.peak) == (0, 1008)
    assert c.allocator == "cupy memory pool"


@pytest.mark.parametrize("tracing", [False, True])
def test_numpy_measures_with_tracemalloc(tracing):
    """The NumPy path as it was: tracemalloc, started and stopped by measure_step, or left running (its peak reset)
    when the caller already traces; the numbers from the arrays (weights, gradients, optimizer, graph) the same.
    (Under a caller's tracing, warm-up blocks freed during the step count against it: ~21 KiB fewer activations
    here, within the margin.)"""
    if tracing:
        tracemalloc.start()
    try:
        ledger, m = memory.compare(SMALL, LoRAConfig(), 4)
        assert tracemalloc.is_tracing() == tracing
    finally:
        tracemalloc.stop()
    assert m.allocator == "tracemalloc" and m.to_dict()["allocator"] == "tracemalloc"
    assert (m.weights, m.gradients, m.optimizer, m.graph) == (ledger.weights, ledger.gradients, ledger.optimizer,
                                                            ledger.activations)
    assert abs(m.activations - ledger.activations) <= 128 * KIB


def test_results_written_before_the_allocator_was_recorded_read_as_tracemalloc():
    """A measured dict without "allocator" (every results file written before it existed) was measured by
    tracemalloc, the only allocator there was then."""
    bench = json.loads((Path(__file__).parents[1] / "benchmarks/results/bench_step.json").read_text())
    for mode, r in bench["modes"].items():
        assert "allocator" not in r["memory"]["measured"]
        assert memory.format_comparison({"mode": mode, **r["memory"]}).endswith("measured: tracemalloc (host memory)")


@pytest.mark.parametrize("lora", [None, LoRAConfig(targets="all-linear", r=4, dropout=0.1)])
def test_array_buffers_after_the_forward_pass_are_the_graphs(lora):
    """What the device pool counts, on the host: NumPy's data buffers alone (tracemalloc's NumPy domain, without
    Python's objects) alive after the forward pass are the graph's arrays, to a few bytes (0-d arrays: the loss)."""
    model = prepare_finetuning(GPT(SMALL), lora)
    opt = AdamW(model.trainable_parameters(), lr=1e-3)
    x, y = (np.random.default_rng(i).integers(0, SMALL.vocab_size, size=(4, 32)) for i in range(2))
    memory.measure_step(model, opt, x, y)  # AdamW's state exists, as in a measured step
    opt.zero_grad()
    tracemalloc.start()
    try:
        _, loss = model(x, y)
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    buffers = snapshot.filter_traces([tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)])
    kept = memory.graph_bytes(loss, exclude=(*model.parameters(), x, y))
    assert 0 <= sum(t.size for t in buffers.traces) - kept.total <= 64


@pytest.mark.skipif(not backend.cupy_available(), reason="CuPy with a usable CUDA device is not available")
@pytest.mark.parametrize("lora", [None, LoRAConfig()])
def test_measure_step_on_cupy_counts_the_device_pool(lora):
    """On a GPU the measured column comes from CuPy's memory pool, and its activations are the graph's arrays.

    Tolerance, and why: |activations - graph| <= 16 KiB. The pool sees device arrays only (the graph's Python
    objects, which the tracemalloc tests allow 128 KiB for, live on the host), so what it may hold beyond the
    graph's count is the 0-d arrays graph_bytes leaves out (the loss, lifted numbers: a few bytes each). 16 KiB
    is under 1% of SMALL's graph (~1.9 MiB) and half its smallest (N, C) activation (32 KiB): a gap above it would
    be an array the graph does not account for. On the host the same count, NumPy's buffers alone, is the graph's
    to 4 bytes (``test_array_buffers_after_the_forward_pass_are_the_graphs``)."""
    backend.set_backend("cupy")
    try:
        ledger, m = memory.compare(SMALL, lora, 4)
        _, again = memory.compare(SMALL, lora, 4)  # the first hook was removed: a second one can be entered
    finally:
        backend.set_backend("numpy")
    assert m.allocator == again.allocator == "cupy memory pool"
    assert (m.weights, m.gradients, m.optimizer) == (ledger.weights, ledger.gradients, ledger.optimizer)
    assert abs(m.activations - m.graph) <= 16 * KIB
    assert m.traced_peak > m.activations
    assert (again.activations, again.graph) == (m.activations, m.graph)  # device bytes: no Python objects' jitter
    assert memory.format_table(ledger, m).endswith("measured: cupy memory pool (device memory)")


def test_gpt3_numbers():
    g = memory.gpt3_example()
    assert g["lora_parameters"]["value"] == 2 * 192 * 12288 * 4 == 18_874_368
    assert g["lora_checkpoint_bytes"]["value"] == 37_748_736  # 37.7 MB, 36.0 MiB; the paper rounds to "35MB"
    assert g["full_checkpoint_bytes"]["value"] == 350e9
    assert 9_000 < g["checkpoint_reduction"]["value"] < 10_000  # "roughly 10,000x"
    assert g["lora_training_bytes"]["value"] == pytest.approx(350e9, rel=1e-3)  # the paper's "350GB"
    assert g["vram_saving"]["value"] == pytest.approx(2 / 3, abs=1e-3)  # "up to 2/3"
    assert all(isinstance(v["formula"], str) and v["formula"] for v in g.values())


# -- QLoRA: the frozen W in 4 bits ---------------------------------------------------------------------------------


@pytest.mark.parametrize("size, config", [(4096, QuantConfig()), (4096, QuantConfig(block=64, double_quant=True)),
                                          (64 * 300, QuantConfig(double_quant=True)),  # 300 scales: 2 groups
                                          (40, QuantConfig("uniform4", block=8, double_quant=True))])
def test_stored_nbytes_is_what_quantize_stores(size, config):
    W = np.random.default_rng(0).standard_normal(size).astype(np.float32)
    assert stored_nbytes(size, config) == quantize(W, config).nbytes


@pytest.mark.parametrize("lora, quant", [(LoRAConfig(), QuantConfig()),
                                         (LoRAConfig(targets="all-linear", r=4), QuantConfig(double_quant=True))])
def test_a_4bit_base_counts_its_stored_bytes(lora, quant):
    """QLoRA: each block Linear's W counts ½ byte a number + its scales; nothing else in the ledger changes, and the
    measured step agrees byte for byte on the parameter state."""
    ledger, m = memory.compare(SMALL, lora, 4, quant=quant)
    assert (m.weights, m.quantized, m.gradients, m.optimizer) == (ledger.weights, ledger.quantized, ledger.gradients,
                                                                    ledger.optimizer)
    assert 0 <= m.activations - ledger.activations <= 128 * KIB
    assert m.graph == ledger.activations
    model = quantize_base(prepare_finetuning(GPT(SMALL), lora), quant)
    weights = quantized_weights(model).values()
    assert ledger.quantized == sum(w.nbytes for w in weights)
    float_ledger = memory.analytic_ledger(SMALL, lora, 4)
    assert ledger.weights == float_ledger.weights - 4 * sum(w.size for w in weights) + ledger.quantized
    assert (ledger.gradients, ledger.optimizer, ledger.activations) == (
        float_ledger.gradients, float_ledger.optimizer, float_ledger.activations)
    assert memory.ledger_of(model, 4) == ledger  # read from the model's quant_config
    assert "4-bit W" in ledger.table() and "4-bit W" in memory.format_table(ledger, m)
    with pytest.raises(ValueError, match="trains adapters only"):
        memory.analytic_ledger(SMALL, None, 4, quant=quant)


def test_qlora_65b_numbers():
    q = memory.qlora_65b_example()
    assert q["parameters"]["value"] == pytest.approx(65.3e9, rel=1e-3)  # LLaMA-65B
    assert q["full_training_bytes"]["value"] > 780e9  # the paper's ">780GB"
    assert q["bytes_per_4bit_number"]["value"] == pytest.approx(0.5 + 0.127 / 8, abs=1e-4)  # 4.127 bits
    assert q["double_quant_saving"]["value"] == pytest.approx(3e9, rel=0.05)  # "approximately 3 GB"
    assert q["lora_parameters"]["value"] == 80 * 64 * (4 * 2 * 8192 + 3 * (8192 + 22016))
    assert q["qlora_training_bytes"]["value"] == q["base_4bit_bytes"]["value"] + q["adapter_training_bytes"]["value"]
    assert 0 < q["left_for_activations"]["value"] < 48e9 - q["base_4bit_bytes"]["value"]  # "<48GB", with room left
    assert all(isinstance(v["formula"], str) and v["formula"] for v in q.values())


TINY = dict(vocab_size=30, block_size=8, n_layer=2, n_embd=16)
GRAPH_SETUPS = [  # (config, LoRA or None, train_only, batch, block_size): corners of the activation terms
    (GPTConfig(**TINY, n_head=1, dropout=0.1), None, (), 3, 8),  # one head: merging the heads is a view
    (GPTConfig(**TINY, n_head=2, dropout=0.1), None, (), 3, 1),  # one position: a view too
    (GPTConfig(**TINY, n_head=2, dropout=0.1), None, ("o", "down"), 2, 5),  # block 0's attention outside the graph
    (GPTConfig(**TINY, n_head=2), LoRAConfig(targets="up", r=2, dropout=0.2, modules_to_save=("ln_f",)), (), 2, 8),
    (GPTConfig(**TINY, n_head=2, tie_weights=True, dropout=0.1), LoRAConfig(targets="q,down", r=2, dropout=0.1,
                                                                           modules_to_save=("wpe",)), (), 2, 6),
    (GPTConfig(**TINY, n_head=4, bias=False), LoRAConfig(targets="k", r=3, modules_to_save=("lm_head",)), (), 2, 8),
]


@pytest.mark.parametrize("cfg, lora, only, B, T", GRAPH_SETUPS)
def test_activation_terms_match_the_graph(cfg, lora, only, B, T):
    """The ledger's terms (ledger._activation_bytes) against the arrays the real graph keeps, byte for byte."""
    model = prepare_finetuning(GPT(cfg), lora, only)
    x, y = (np.random.default_rng(i).integers(0, cfg.vocab_size, size=(B, T)) for i in range(2))
    _, loss = model(x, y)
    kept = memory.graph_bytes(loss, exclude=(*model.parameters(), x, y))
    assert kept.total == memory.ledger_of(model, B, T).activations
