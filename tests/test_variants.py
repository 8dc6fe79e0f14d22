"""Tests for the DoRA / PiSSA / LoRA comparison (lora_np/experiments/variants.py, benchmarks/variants.py): the same
base, steps and batches for every method, each at the rate its validation loss chooses."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lora_np.experiments import ExperimentConfig
from lora_np.experiments.summary import chosen_runs
from lora_np.experiments.variants import run_variants, variants_specs


def test_the_methods_differ_only_in_the_variant():
    cfg = ExperimentConfig.quick()
    specs = variants_specs(cfg, r=4)
    assert [s.name for s in specs] == ["lora-r4", "dora-r4", "pissa-r4", "lora-r4-seed1"]
    plain = specs[0].lora
    assert plain == replace(cfg.lora, r=4, modules_to_save=())
    assert [s.lora for s in specs[1:]] == [replace(plain, dora=True), replace(plain, init="pissa"),
                                           replace(plain, seed=1)]
    assert all(s.lr is None for s in specs)  # every method searches its own rate


@pytest.fixture(scope="module")
def results():
    return run_variants(ExperimentConfig.quick(), r=8, progress=False)


def test_every_method_ran_on_the_same_steps_at_its_chosen_rate(results):
    cfg, runs = ExperimentConfig.quick(), chosen_runs(results)
    assert [r["method"] for r in runs] == [s.name for s in variants_specs(cfg)]
    for r in results["runs"]:
        assert r["history"]["steps"][-1] == cfg.finetune.max_steps and not r["stopped"], r["name"]
        assert r["lr"] in results["lr_search"][r["method"]]["grid"]
    lora, dora, pissa, _ = runs
    C, L = cfg.model.n_embd, cfg.model.n_layer
    assert dora["trainable"] - lora["trainable"] == L * 2 * C  # one magnitude per output column of q and v
    assert pissa["trainable"] == lora["trainable"] and pissa["lora"]["init"] == "pissa"
    assert all(r["test_loss"] > 0 for r in runs)
