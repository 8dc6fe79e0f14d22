"""Tests for the DoRA / PiSSA / QLoRA / LoRA comparison (lora_np/experiments/variants.py, benchmarks/variants.py):
the same base, steps and batches for every method, each at the rate its validation loss chooses."""

from __future__ import annotations

from dataclasses import replace

import pytest

from lora_np.experiments import ExperimentConfig, RunSpec
from lora_np.experiments.summary import chosen_runs
from lora_np.experiments.variants import QLORA_BASE, run_variants, variants_specs
from lora_np.lora import LoRAConfig
from lora_np.quantize import QuantConfig


def test_the_methods_differ_only_in_the_variant():
    cfg = ExperimentConfig.quick()
    specs = variants_specs(cfg, r=4)
    assert [s.name for s in specs] == ["lora-r4", "dora-r4", "pissa-r4", "qlora-r4", "lora-r4-seed1"]
    plain = specs[0].lora
    assert plain == replace(cfg.lora, r=4, modules_to_save=())
    assert [s.lora for s in specs[1:]] == [replace(plain, dora=True), replace(plain, init="pissa"), plain,
                                           replace(plain, seed=1)]
    assert [s.base_quant for s in specs] == [None, None, None, QLORA_BASE, None]  # QLoRA: only the base differs
    assert QLORA_BASE == QuantConfig("nf4", 64, double_quant=True)  # the paper's storage
    assert all(s.lr is None for s in specs)  # every method searches its own rate


@pytest.mark.parametrize("kwargs, match", [
    ({"base_quant": QLORA_BASE}, "needs lora"),  # full fine-tuning on a 4-bit base: W cannot train
    ({"base_quant": QLORA_BASE, "train_only": "q,v"}, "needs lora"),
    ({"lora": LoRAConfig(), "base_quant": "nf4"}, "must be None or a QuantConfig"),
])
def test_a_4bit_base_is_for_lora_only(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RunSpec("x", **kwargs)


@pytest.fixture(scope="module")
def results():
    return run_variants(ExperimentConfig.quick(), r=8, progress=False)


def test_every_method_ran_on_the_same_steps_at_its_chosen_rate(results):
    cfg, runs = ExperimentConfig.quick(), chosen_runs(results)
    assert [r["method"] for r in runs] == [s.name for s in variants_specs(cfg)]
    for r in results["runs"]:
        assert r["history"]["steps"][-1] == cfg.finetune.max_steps and not r["stopped"], r["name"]
        assert r["lr"] in results["lr_search"][r["method"]]["grid"]
    lora, dora, pissa, qlora, _ = runs
    C, L = cfg.model.n_embd, cfg.model.n_layer
    assert dora["trainable"] - lora["trainable"] == L * 2 * C  # one magnitude per output column of q and v
    assert pissa["trainable"] == lora["trainable"] and pissa["lora"]["init"] == "pissa"
    assert qlora["trainable"] == lora["trainable"] and qlora["lora"] == lora["lora"]
    assert qlora["base_quant"] == QLORA_BASE.to_dict() and lora["base_quant"] is None
    assert all(r["test_loss"] > 0 for r in runs)


def test_the_4bit_base_is_scored_before_training(results):
    # One entry per distinct 4-bit storage: the untrained base's losses, close to the float base's but not equal
    (q,) = results["quantized_bases"]
    assert q["base_quant"] == QLORA_BASE.to_dict()
    base = results["base"]
    for key in ("finetune_val_loss", "finetune_test_loss", "pretrain_val_loss"):
        assert q[key] != base[key] and abs(q[key] - base[key]) < 0.05, key
