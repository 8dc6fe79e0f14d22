"""Tests for lora_np/experiments/planted.py: the planted-rank experiment.

The quick run is too short to show the staircase (r < k at a floor, r >= k at full fine-tuning's level): these
tests check the mechanics that the full-size result rests on. ΔW* has rank k and the singular values it was
planted with (in the data's metric); the teacher's KL is the target; the oracle line falls to 0 at r = k; the
learning rate is chosen on validation KL only; every number of the table is there.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace

import numpy as np
import pytest

from lora_np import backend
from lora_np.experiments.planted import (
    PlantedConfig,
    TeacherTargets,
    interval,
    markdown_table,
    plant,
    run_planted,
    verdict,
)
from lora_np.experiments.runs import ExperimentConfig
from lora_np.figures import draw


@pytest.fixture(scope="module")
def results():
    return run_planted(PlantedConfig.quick(), progress=False)


def test_the_planted_update_has_rank_k_and_the_planted_singular_values_in_the_data_metric():
    gen = np.random.default_rng(0)
    x = gen.standard_normal((4000, 16)) * np.linspace(3, 0.1, 16)  # inputs with very unequal directions
    sigma = x.T @ x / len(x)
    cfg = PlantedConfig.quick(experiment=ExperimentConfig.quick(), k=3, singular_values=(1.0, 0.7, 0.2),
                              ranks=(1, 3, 6))
    upd = plant(sigma, 24, cfg, backend.rng(1))
    dw = upd.delta(2.0)  # (16, 24)
    assert np.linalg.matrix_rank(dw) == 3
    # x @ ΔW* on whitened inputs: the singular values of Σ^(1/2) ΔW* are c·S
    np.testing.assert_allclose(np.linalg.svd(upd.sigma_half @ dw, compute_uv=False)[:3], [2.0, 1.4, 0.4],
                               rtol=1e-6)
    for r in (1, 2):  # the rank-r truncation keeps the r largest, in the same metric
        np.testing.assert_allclose(np.linalg.svd(upd.sigma_half @ upd.delta(2.0, r), compute_uv=False)[:r],
                                   [2.0, 1.4][:r], rtol=1e-6)
        assert np.linalg.matrix_rank(upd.delta(2.0, r)) == r


def test_teacher_kl_hits_the_target_and_the_planted_rank_is_k(results):
    k, target = results["config"]["k"], results["config"]["target_kl"]
    for s in results["placements"].values():
        assert s["teacher_kl_val"] == pytest.approx(target, rel=1e-3)
        assert set(s["planted_rank"].values()) == {k}
        assert s["c"] > 0 and all(v > 0 for v in s["planted_norm_ratio"].values())


def test_oracle_is_non_increasing_in_r_and_zero_from_k_on(results):
    k = results["config"]["k"]
    for s in results["placements"].values():
        ranks = sorted(int(r) for r in s["oracle"])
        values = [s["oracle"][str(r)] for r in ranks]
        assert all(a >= b - 1e-9 for a, b in zip(values, values[1:])), values
        assert all(s["oracle"][str(r)] == pytest.approx(0, abs=1e-6) for r in ranks if r >= k)
        assert all(s["oracle"][str(r)] > 0 for r in ranks if r < k)
        assert s["oracle"][str(min(ranks))] < s["base_kl"]  # a rank-1 truncation already explains some of it


def test_every_method_has_its_lr_chosen_on_validation_and_its_seeds(results):
    cfg = results["config"]
    for placement, s in results["placements"].items():
        assert len(s["methods"]) == len(cfg["ranks"]) + 3  # LoRA ranks, these matrices in full, all, wrong
        for method, m in s["methods"].items():
            rows = [r for r in results["runs"] if r["placement"] == placement and r["method"] == method]
            search = [r for r in rows if r["seed"] == 0]
            assert sorted(r["lr"] for r in search) == m["grid"]
            assert m["lr"] == min(search, key=lambda r: (r["kl_val"], r["lr"]))["lr"]  # validation KL alone
            assert m["interior"] == (min(m["grid"]) < m["lr"] < max(m["grid"]))
            chosen = [r for r in rows if r.get("chosen")]
            assert sorted(r["seed"] for r in chosen) == list(range(cfg["seeds"]))
            assert all(r["lr"] == m["lr"] for r in chosen)
            assert m["kl"]["values"] == [r["kl_test"] for r in sorted(chosen, key=lambda r: r["seed"])]


def test_students_adapt_what_their_method_says(results):
    for placement, s in results["placements"].items():
        for method, m in s["methods"].items():
            if method.startswith("wrong-"):
                assert m["phi"] == {"input": None, "output": None} and not m["phi_per_layer"]
                assert m["targets"] != placement
            else:
                assert set(m["phi_per_layer"]) == set(s["planted_rank"])  # every planted layer, and only those
                assert all(0 <= v["input"] <= 1 + 1e-9 for v in m["phi_per_layer"].values())
        trainable = {n: m["trainable"] for n, m in s["methods"].items()}
        lora = [trainable[n] for n in s["methods"] if n.startswith("lora-r")]
        assert lora == sorted(lora) and max(lora) < trainable["full"]


def test_forgetting_and_the_tables_are_reported(results):
    base = results["base"]["pretrain_val_loss"]
    assert math.isfinite(base)
    for s in results["placements"].values():
        assert math.isfinite(s["teacher_pretrain_val_loss"])
        for m in s["methods"].values():
            assert len(m["forgotten"]["values"]) == results["config"]["seeds"]
    table = markdown_table(results)
    assert table.count("\n") == 1 + sum(len(s["methods"]) + 1 for s in results["placements"].values())
    lines = verdict(results)
    assert len(lines) == len(results["placements"]) and all("LoRA r < k stops at" in v for v in lines)
    json.dumps(results, allow_nan=False)  # JSON-ready as it is


def test_figures_are_drawn_from_the_results(results, tmp_path):
    paths = draw(results, tmp_path)
    assert sorted(p.name for p in paths) == ["planted_kl_vs_rank.png", "planted_phi.png", "planted_placement.png"]
    assert all(p.stat().st_size > 10_000 for p in paths)


def test_teacher_probabilities_are_computed_once_per_batch():
    class Counting:
        calls = 0

        def inference(self):
            import contextlib
            return contextlib.nullcontext()

        def __call__(self, x):
            Counting.calls += 1
            from lora_np.engine import Tensor
            return Tensor(backend.to_device(np.zeros((*x.shape, 3), dtype=np.float32))), None

    teacher = TeacherTargets(Counting())
    x = np.array([[1, 2, 3]])
    p1, p2 = teacher(x, None), teacher(x.copy(), None)
    assert p1 is p2 and Counting.calls == 1
    np.testing.assert_allclose(backend.to_numpy(p1).sum(-1), 1.0, rtol=1e-6)
    teacher(np.array([[3, 2, 1]]), None)
    assert Counting.calls == 2


def test_interval_is_a_t_interval_of_the_mean():
    d = interval([1.0, 2.0, 3.0])
    assert d["mean"] == 2.0 and d["sd"] == 1.0
    assert d["ci95"] == pytest.approx(4.303 / math.sqrt(3))
    assert interval([5.0])["ci95"] is None


CONFIG_ERRORS = [
    # name, change, message (a literal part of it)
    ("k zero", {"k": 0, "singular_values": ()}, "k must be a positive integer"),
    ("k bool", {"k": True}, "k must be a positive integer"),
    ("singular values count", {"singular_values": (1.0,)}, "must be k = 2 finite numbers > 0"),
    ("singular values order", {"singular_values": (0.5, 1.0)}, "largest first"),
    ("singular value zero", {"singular_values": (1.0, 0.0)}, "must be k = 2 finite numbers > 0"),
    ("target kl zero", {"target_kl": 0.0}, "target_kl must be a finite number > 0"),
    ("target kl nan", {"target_kl": float("nan")}, "target_kl must be a finite number > 0"),
    ("one placement", {"placements": ("q,v",)}, "at least two placements"),
    ("repeated placement", {"placements": ("q,v", "v,q")}, "repeats a placement"),
    ("unknown placement", {"placements": ("q,v", "zz")}, "unknown LoRA target"),
    ("unplantable placement", {"placements": ("q,v", "o,down")}, "cannot plant in ['down', 'o']"),
    ("ranks without k", {"ranks": (1, 4)}, "below k, k = 2 itself and above"),
    ("ranks unsorted", {"ranks": (4, 2, 1)}, "increasing integers"),
    ("rank too big", {"ranks": (1, 2, 65)}, "LoRA rank(s) [65] exceed 64 (PlantedConfig.experiment.model.n_embd)"),
    ("lora grid of one", {"lora_lrs": (1e-2,)}, "lora_lrs must be at least 2 distinct finite numbers"),
    ("full grid negative", {"full_lrs": (1e-3, -1.0)}, "full_lrs must be at least 2 distinct finite numbers"),
    ("seeds zero", {"seeds": 0}, "seeds must be a positive integer"),
    ("too many seeds", {"seeds": 11}, "seeds must be at most 10"),
    ("span too wide", {"span": 40}, "span·k = 80 exceeds n_embd = 64"),
    ("alpha zero", {"alpha": 0}, "alpha must be a finite number > 0"),
    ("experiment wrong type", {"experiment": None}, "experiment must be an ExperimentConfig"),
]


@pytest.mark.parametrize("change, message", [pytest.param(*row[1:], id=row[0]) for row in CONFIG_ERRORS])
def test_bad_config_is_named(change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        replace(PlantedConfig.quick(), **change)


def test_placements_are_normalised_and_wrong_is_the_next_placement():
    cfg = PlantedConfig.quick(placements=("v,q", "up"))
    assert cfg.placements == ("q,v", "up")
    names = [name for name, *_ in cfg.methods("up")]
    assert names == ["lora-r1", "lora-r2", "lora-r4", "full-up", "full", "wrong-lora-r4-qv"]
