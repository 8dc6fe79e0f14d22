"""The memory of one training step: where its bytes go, predicted from the config and measured.

A training step holds four kinds of arrays (Hu et al. 2021, §4.2: LoRA needs no gradient and no optimizer
state for the frozen weights):

    weights       every parameter, trainable or frozen (for LoRA: W, b, ... and every A and B); a 4-bit W
                  (QLoRA, ``qlora.quantize_base``) at its stored bytes, ``Ledger.quantized``
    gradients     one ``.grad`` per TRAINABLE parameter: backward allocates no gradient for a frozen W
    optimizer     AdamW's m and v: 2 × the trainable numbers, allocated on a parameter's first step
    activations   what the autograd graph keeps alive from the forward pass until backward is done

LoRA shrinks the second and third (they follow the trainable numbers) and leaves the first almost unchanged; in
this engine it barely changes the fourth (``ledger.py`` says why). Its saving is 3 × the frozen weights' size
(gradient, m, v): small next to the activations of a small model at a real batch, decisive where the weights
dominate, as for GPT-3 175B. benchmarks/README.md has the measured numbers.

One concern per file:

    ledger.py    the prediction: ``analytic_ledger`` (from a config) and ``ledger_of`` (from a set-up model); its
                 docstring derives every term of the activations
    measure.py   the measurement: ``measure_step`` runs one real step watched by the allocator (``tracemalloc``
                 on NumPy, CuPy's memory pool on CuPy); ``compare``, ``measure_model``, ``format_table`` and
                 ``format_comparison`` put it next to the prediction
    graph.py     the activations counted from the graph itself: ``graph_bytes`` walks the nodes after a forward
                 pass and adds up the arrays each keeps (``measure_step`` reports it as ``Measured.graph``)
    paper.py     the papers' numbers, recomputed: GPT-3 175B (``gpt3_example``), QLoRA's 65B on one 48 GB GPU
                 (``qlora_65b_example``)
"""

from .graph import GraphBytes, graph_bytes
from .ledger import CATEGORIES, MIB, Ledger, analytic_ledger, count_trainable, ledger_of
from .measure import Measured, compare, format_comparison, format_table, measure_model, measure_step
from .paper import gpt3_example, qlora_65b_example

__all__ = ["CATEGORIES", "MIB", "GraphBytes", "Ledger", "Measured", "analytic_ledger", "compare", "count_trainable",
           "format_comparison", "format_table", "gpt3_example", "graph_bytes", "ledger_of", "measure_model",
           "measure_step", "qlora_65b_example"]
