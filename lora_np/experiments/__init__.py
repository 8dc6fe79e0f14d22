"""The experiments behind ``python -m lora_np``, one module each, sharing the run machinery of ``runs.py``.

    runs.py      ExperimentConfig, the corpora, the cached base model, RunSpec and ``finetune_run`` (one fine-tuning
                 run from the base model -> the trained model and its row), ``search_lr`` and ``run_method`` (one
                 method at the learning rate its validation loss chooses), ``run_experiment`` (a list of methods
                 -> one results dict)
    summary.py   reading those results: the chosen runs, the gap to full fine-tuning next to the share of its gain,
                 learned vs forgotten (Biderman et al. 2024)
    sweep.py     the rank sweep: LoRA at ranks 1…64, rsLoRA, full fine-tuning, the control run, LoRA + embeddings
                 and head
    targets.py   which weights to adapt at a fixed parameter budget (Hu et al. Table 5, in small)
    task_distance.py  the study of issue 8: three tasks at increasing distance from one base, every method at a
                 learning-rate grid chosen on validation and scored on test, and the §7 analyses of the models
    variants.py  DoRA, PiSSA and QLoRA (LoRA on a 4-bit base) against plain LoRA at one rank, each at its own rate
                 (benchmarks/variants.py prints it)

Experiments compute and return results (plain dicts, JSON-ready); they write no file and draw nothing. The command
line (``lora_np/__main__.py``) writes ``results/*.json``, draws the figures (``figures.draw``) and prints. A new
experiment is one new module here with a ``*_specs(cfg)`` list of runs (or its own loop over ``finetune_run``).
"""

from .runs import (
    Corpora,
    ExperimentConfig,
    RunSpec,
    base_model_path,
    cache_dir,
    finetune_run,
    load_cached_base,
    load_corpora,
    model_config,
    pretrain_base,
    run_experiment,
    run_method,
    sample_text,
    search_lr,
    split_loss,
    stale_base,
    to_json,
)
from .sweep import run_sweep, sweep_specs
from .targets import TARGET_BUDGET, run_targets, targets_specs
from .task_distance import StudyConfig, load_study_data, run_study
from .variants import run_variants, variants_specs

__all__ = ["TARGET_BUDGET", "Corpora", "ExperimentConfig", "RunSpec", "StudyConfig", "base_model_path", "cache_dir",
           "finetune_run", "load_cached_base", "load_corpora", "load_study_data", "model_config", "pretrain_base",
           "run_experiment", "run_method", "run_study", "run_sweep", "run_targets", "run_variants", "sample_text",
           "search_lr", "split_loss", "stale_base", "sweep_specs", "targets_specs", "to_json", "variants_specs"]
