"""The rank sweep, the default experiment: LoRA at every rank of ``cfg.ranks`` on ``cfg.lora.targets``, full
fine-tuning, the control run (full fine-tuning of ``cfg.lora.targets`` only: the same weights as LoRA with no rank
limit, which separates rank from placement) and LoRA that also trains the embeddings and the head (peft's
``modules_to_save``), all from the same base model with the same batches."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .runs import ExperimentConfig, RunSpec, run_experiment


def sweep_specs(cfg: ExperimentConfig) -> list[RunSpec]:
    """LoRA at every rank, full fine-tuning, full fine-tuning of LoRA's targets only ("full-qv" for q, v), and
    (if ``cfg.extra_modules``) LoRA at ``cfg.lora.r`` + those modules."""
    specs = [RunSpec(f"lora-r{r}", replace(cfg.lora, r=r, modules_to_save=())) for r in cfg.ranks]
    specs.append(RunSpec("full", None))
    specs.append(RunSpec(f"full-{''.join(cfg.lora.targets)}", None, train_only=cfg.lora.targets))
    if cfg.extra_modules:
        extra = replace(cfg.lora, modules_to_save=cfg.extra_modules)
        specs.append(RunSpec(f"lora-r{extra.r}+{'+'.join(extra.modules_to_save)}", extra))
    return specs


def run_sweep(cfg: ExperimentConfig, progress: bool = True) -> dict[str, Any]:
    """The rank sweep's results (see ``runs.run_experiment``), with the peak memory of every run measured."""
    return run_experiment(cfg, sweep_specs(cfg), "sweep", progress=progress, measure_memory=True)
