"""The rank sweep, the default experiment: LoRA at every rank of ``cfg.ranks`` on ``cfg.lora.targets``, rsLoRA
(s = α/√r) at ``cfg.rslora_ranks``, full fine-tuning, the control run (full fine-tuning of ``cfg.lora.targets`` only:
the same weights as LoRA with no rank limit, which separates rank from placement) and LoRA that also trains the
embeddings and the head (peft's ``modules_to_save``), all from the same base model with the same batches.

Every one of them is a method with its own learning-rate search (``runs.run_method``): α is fixed across ranks
(Hu et al. §4.1), so s = α/r shrinks as r grows and a single rate for every rank would favour some ranks; each
rank, and each scaling, gets the rate its own validation loss chooses, and the test loss of that run is reported.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from .runs import ExperimentConfig, RunSpec, run_experiment


def sweep_specs(cfg: ExperimentConfig) -> list[RunSpec]:
    """LoRA at every rank, rsLoRA at ``cfg.rslora_ranks`` ("rslora-r4", ...), full fine-tuning, full fine-tuning of
    LoRA's targets only ("full-qv" for q, v), and (if ``cfg.extra_modules``) LoRA at ``cfg.lora.r`` + those
    modules. No learning rate is set: the experiment searches each method's grid."""
    specs = [RunSpec(f"lora-r{r}", replace(cfg.lora, r=r, modules_to_save=())) for r in cfg.ranks]
    specs += [RunSpec(f"rslora-r{r}", replace(cfg.lora, r=r, rslora=True, modules_to_save=()))
              for r in cfg.rslora_ranks]
    specs.append(RunSpec("full", None))
    specs.append(RunSpec(f"full-{''.join(cfg.lora.targets)}", None, train_only=cfg.lora.targets))
    if cfg.extra_modules:
        extra = replace(cfg.lora, modules_to_save=cfg.extra_modules)
        specs.append(RunSpec(f"lora-r{extra.r}+{'+'.join(extra.modules_to_save)}", extra))
    return specs


def run_sweep(cfg: ExperimentConfig, progress: bool = True) -> dict[str, Any]:
    """The rank sweep's results (see ``runs.run_experiment``), with the peak memory of every chosen run measured."""
    return run_experiment(cfg, sweep_specs(cfg), "sweep", progress=progress, measure_memory=True)
