"""Which weights to adapt under a fixed budget of trainable parameters (Hu et al. 2021, Table 5, in small): every
run trains r × (number of adapted matrices) = 8 rank-units per block, so all have the same parameter count. Full
fine-tuning runs with them as the reference (the figure draws it, and the base model, as lines). Every method has its
own learning-rate search, chosen on validation, and reports the test loss (``runs.run_experiment``)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .runs import ExperimentConfig, RunSpec, run_experiment

TARGET_BUDGET = (("q", 8), ("k", 8), ("v", 8), ("o", 8), ("q,k", 4), ("q,v", 4), ("q,k,v,o", 2))


def targets_specs(cfg: ExperimentConfig) -> list[RunSpec]:
    """One LoRA run per (targets, r) of TARGET_BUDGET, with the experiment's alpha and scaling, then full
    fine-tuning (the reference: what training every weight reaches on the same batches)."""
    return [RunSpec(f"lora-{t.replace(',', '')}-r{r}", replace(cfg.lora, targets=t, r=r, modules_to_save=()))
            for t, r in TARGET_BUDGET] + [RunSpec("full", None)]


def run_targets(cfg: ExperimentConfig, progress: bool = True) -> dict[str, Any]:
    """The which-weights experiment's results (see ``runs.run_experiment``); memory is not measured."""
    return run_experiment(cfg, targets_specs(cfg), "targets", progress=progress, measure_memory=False)
