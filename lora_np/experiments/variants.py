"""DoRA, PiSSA and QLoRA against plain LoRA (issue 20) on the sweep's task, at one rank (default r = 8).

Every method starts from the same cached base model, trains the same number of steps on the same batches in the same
order, and gets its own learning-rate search on the validation loss (``runs.run_method``): DoRA trains a magnitude
next to A and B, and PiSSA starts from W's principal part instead of a zero update, so neither need share plain
LoRA's best rate. The test loss of each chosen run is what a verdict reads.

One seed decides the data order. Plain LoRA is run once more with another initialisation seed ("lora-rN-seed1"): the
gap between its two runs is a yardstick (a lower bound) for how much of a difference one seed can make; a variant
that differs from plain LoRA by less than that has not been told apart from it here.

QLoRA ("qlora-rN") is plain LoRA on a copy of the base whose block Linears store W in NF4 with double quantization
(``QLORA_BASE``, the paper's storage: blocks of 64, the scales in 8 bits): the same adapters, steps and batches, on
a frozen W that is 4 bits a number. Its untrained 4-bit base is scored too (``results["quantized_bases"]``), so
the comparison reads in two steps: what quantizing cost the base (4-bit base − float base), and what is left of it
after fine-tuning (qlora − lora, next to the seed gap).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ..quantize import QuantConfig
from .runs import ExperimentConfig, RunSpec, run_experiment

QLORA_BASE = QuantConfig(kind="nf4", block=64, double_quant=True)  # QLoRA's storage of the frozen W (§3)


def variants_specs(cfg: ExperimentConfig, r: int = 8) -> list[RunSpec]:
    """Plain LoRA, DoRA, PiSSA and QLoRA (plain LoRA on the 4-bit base) at rank ``r`` with the experiment's α,
    targets and scaling, then plain LoRA with initialisation seed + 1 (the yardstick). No learning rate is set: the
    experiment searches each method's grid."""
    plain = replace(cfg.lora, r=r, modules_to_save=())
    return [RunSpec(f"lora-r{r}", plain),
            RunSpec(f"dora-r{r}", replace(plain, dora=True)),
            RunSpec(f"pissa-r{r}", replace(plain, init="pissa")),
            RunSpec(f"qlora-r{r}", plain, base_quant=QLORA_BASE),
            RunSpec(f"lora-r{r}-seed{plain.seed + 1}", replace(plain, seed=plain.seed + 1))]


def run_variants(cfg: ExperimentConfig, r: int = 8, progress: bool = True) -> dict[str, Any]:
    """The comparison's results (see ``runs.run_experiment``; "quantized_bases" holds the 4-bit base's losses before
    training). Memory is not measured: the ledger does not model DoRA's op."""
    return run_experiment(cfg, variants_specs(cfg, r), "variants", progress=progress, measure_memory=False)
