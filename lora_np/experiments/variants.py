"""DoRA and PiSSA against plain LoRA (issue 20) on the sweep's task, at one rank (default r = 8).

Every method starts from the same cached base model, trains the same number of steps on the same batches in the same
order, and gets its own learning-rate search on the validation loss (``runs.run_method``): DoRA trains a magnitude
next to A and B, and PiSSA starts from W's principal part instead of a zero update, so neither need share plain
LoRA's best rate. The test loss of each chosen run is what a verdict reads.

One seed decides the data order. Plain LoRA is run once more with another initialisation seed ("lora-rN-seed1"): the
gap between its two runs is a yardstick (a lower bound) for how much of a difference one seed can make; a variant
that differs from plain LoRA by less than that has not been told apart from it here.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .runs import ExperimentConfig, RunSpec, run_experiment


def variants_specs(cfg: ExperimentConfig, r: int = 8) -> list[RunSpec]:
    """Plain LoRA, DoRA and PiSSA at rank ``r`` with the experiment's α, targets and scaling, then plain LoRA with
    initialisation seed + 1 (the yardstick). No learning rate is set: the experiment searches each method's grid."""
    plain = replace(cfg.lora, r=r, modules_to_save=())
    return [RunSpec(f"lora-r{r}", plain),
            RunSpec(f"dora-r{r}", replace(plain, dora=True)),
            RunSpec(f"pissa-r{r}", replace(plain, init="pissa")),
            RunSpec(f"lora-r{r}-seed{plain.seed + 1}", replace(plain, seed=plain.seed + 1))]


def run_variants(cfg: ExperimentConfig, r: int = 8, progress: bool = True) -> dict[str, Any]:
    """The comparison's results (see ``runs.run_experiment``). Memory is not measured: the ledger does not model
    DoRA's op."""
    return run_experiment(cfg, variants_specs(cfg, r), "variants", progress=progress, measure_memory=False)
