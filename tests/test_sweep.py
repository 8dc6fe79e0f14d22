"""Tests for the rank sweep (lora_np/experiments/sweep.py) and the run machinery it stands on (runs.py): the
learning-rate search of every method (chosen on validation, never on test), rsLoRA next to LoRA, the three-way split,
the config's grids, and the sweep's figures drawn from its quick results (the forgetting figure among them)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from lora_np.experiments import ExperimentConfig, runs, sweep_specs
from lora_np.experiments.runs import load_corpora, next_lr, search_lr
from lora_np.experiments.summary import chosen_runs, compare_runs
from lora_np.experiments.sweep import run_sweep
from lora_np.figures import draw, drawable, learned_forgotten
from lora_np.lora import LoRAConfig
from lora_np.model import GPTConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def results():
    return run_sweep(ExperimentConfig.quick(), progress=False)


def _by_method(results):
    out = {}
    for r in results["runs"]:
        out.setdefault(r["method"], []).append(r)
    return out


# -- the learning-rate search of every method ----------------------------------------------------------------------


def test_every_method_has_one_chosen_run_with_the_lowest_validation_loss(results):
    methods = _by_method(results)
    assert list(methods) == [s.name for s in sweep_specs(ExperimentConfig.quick())] == list(results["lr_search"])
    for name, rows in methods.items():
        chosen = [r for r in rows if r["chosen"]]
        assert len(chosen) == 1, name
        assert chosen[0]["final_val_loss"] == min(runs.lr_score(r) for r in rows), name
        search = results["lr_search"][name]
        lrs = [r["lr"] for r in rows]
        assert lrs == sorted(lrs) == search["grid"] and search["lr"] == chosen[0]["lr"]
        assert search["interior"] == (lrs[0] < chosen[0]["lr"] < lrs[-1])
        assert all(r["name"] == f"{name}/lr{r['lr']:g}" for r in rows)
        assert all(r["test_loss"] > 0 and r["pretrain_val_loss"] > 0 for r in rows)


def test_grids_by_kind_of_method(results):
    cfg = ExperimentConfig.quick()
    for r in results["runs"]:
        grid = cfg.lora_lrs if r["mode"] == "lora" else cfg.full_lrs  # the control run trains weights in full
        assert set(grid) <= set(results["lr_search"][r["method"]]["grid"]), r["name"]


def test_only_the_chosen_run_has_a_sample_and_a_memory_measurement(results):
    for r in results["runs"]:
        assert ("sample" in r) == ("memory" in r) == r["chosen"], r["name"]
    assert len(chosen_runs(results)) == len(results["lr_search"])


def test_the_choice_never_reads_the_test_loss(tmp_path, monkeypatch):
    """The same small sweep twice, the second time with test losses that favour the other rates (the lowest test
    loss on the worst validation run): the same rates are chosen, and the test losses reported are the new ones."""
    cfg = ExperimentConfig.quick(ranks=(1, 8), rslora_ranks=(4,), extra_modules=())
    plain = run_sweep(cfg, progress=False)
    real = runs.finetune_run

    def adversarial(*args, **kwargs):
        model, row = real(*args, **kwargs)
        return model, row | {"test_loss": -row["final_val_loss"]}

    monkeypatch.setattr(runs, "finetune_run", adversarial)
    perturbed = run_sweep(cfg, progress=False)
    assert perturbed["lr_search"] == plain["lr_search"]
    assert [r["final_val_loss"] for r in perturbed["runs"]] == [r["final_val_loss"] for r in plain["runs"]]
    assert all(r["test_loss"] == -r["final_val_loss"] for r in perturbed["runs"])


def test_a_spec_with_its_own_rate_runs_once(monkeypatch):
    cfg = ExperimentConfig.quick(ranks=(1, 2), rslora_ranks=(), extra_modules=())
    spec = runs.RunSpec("lora-r2-fixed", replace(cfg.lora, r=2), lr=1e-3)
    res = runs.run_experiment(cfg, [spec], "fixed", progress=False, measure_memory=False)
    assert [r["name"] for r in res["runs"]] == ["lora-r2-fixed/lr0.001"] and res["runs"][0]["chosen"]
    assert res["lr_search"] == {"lora-r2-fixed": {"lr": 1e-3, "interior": None, "grid": [1e-3]}}
    with pytest.raises(ValueError, match="its own name"):
        runs.run_experiment(cfg, [spec, spec], "twice", progress=False)


# (grid, validation loss as a function of lr, rates tried, rate chosen, interior)
SEARCHES = {
    "interior at once": ((1e-3, 3e-3, 1e-2), lambda lr: abs(math.log(lr / 3e-3)), [1e-3, 3e-3, 1e-2], 3e-3, True),
    "steps up until interior": ((1e-3, 3e-3, 1e-2), lambda lr: abs(math.log(lr / 3e-2)),
                                [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], 3e-2, True),
    "steps down twice, then stops": ((1e-3, 3e-3), lambda lr: lr, [1e-4, 3e-4, 1e-3, 3e-3], 1e-4, False),
    "at the edge after two steps": ((3e-4, 1e-3), lambda lr: -lr, [3e-4, 1e-3, 3e-3, 1e-2], 1e-2, False),
    "every run diverged": ((1e-3, 3e-3), lambda lr: math.nan, [1e-3, 3e-3], 1e-3, False),
}


@pytest.mark.parametrize("case", SEARCHES)
def test_search_lr(case):
    grid, loss, tried, lr, interior = SEARCHES[case]
    found = search_lr(lambda rate: {"lr": rate, "final_val_loss": loss(rate)}, grid)
    assert found["grid"] == pytest.approx(tried) and found["lr"] == pytest.approx(lr)
    assert found["interior"] == interior
    assert [r["chosen"] for r in found["rows"]] == [math.isclose(r["lr"], lr) for r in found["rows"]]


def test_next_lr_walks_the_1_3_10_ladder():
    assert [next_lr(v, up=True) for v in (1e-3, 3e-3, 1e-2, 5e-3)] == [3e-3, 1e-2, 3e-2, 1.5e-2]
    assert [next_lr(v, up=False) for v in (1e-3, 3e-3, 1e-2)] == [3e-4, 1e-3, 3e-3]


# -- rsLoRA next to LoRA --------------------------------------------------------------------------------------------


def test_rslora_runs_are_in_the_sweep_with_their_own_search(results):
    cfg = ExperimentConfig.quick()
    methods = _by_method(results)
    for r in cfg.rslora_ranks:
        rows = methods[f"rslora-r{r}"]
        assert all(x["rslora"] and x["lora"]["rslora"] and x["rank"] == r and x["mode"] == "lora" for x in rows)
        assert sum(x["chosen"] for x in rows) == 1
    assert not any(x["rslora"] for name, rows in methods.items() if name.startswith("lora-") for x in rows)
    # at r = 1, α/√r = α/r: the two runs are the same run, a check that both paths train alike
    lora1 = {x["lr"]: x["final_val_loss"] for x in methods["lora-r1"]}
    assert all(lora1[x["lr"]] == x["final_val_loss"] for x in methods["rslora-r1"] if x["lr"] in lora1)


def test_the_gap_to_full_fine_tuning_is_the_test_loss_difference(results):
    cmp = compare_runs(results)
    full = next(r for r in chosen_runs(results) if r["mode"] == "full")
    assert cmp["split"] == "test" and cmp["base"] == results["base"]["finetune_test_loss"]
    for row, run in zip(cmp["rows"], chosen_runs(results)):
        assert row["method"] == run["method"] and row["loss"] == run["test_loss"]
        assert row["gap"] == pytest.approx(run["test_loss"] - full["test_loss"])
        assert row["forgotten"] == pytest.approx(run["pretrain_val_loss"] - results["base"]["pretrain_val_loss"])
        assert row["lr"] == results["lr_search"][row["method"]]["lr"]


# -- the config and the corpora -------------------------------------------------------------------------------------

CONFIG_ERRORS = {
    "one rate": ({"lora_lrs": (1e-3,)}, "lora_lrs must be at least 2 distinct"),
    "repeated rate": ({"full_lrs": (1e-3, 1e-3)}, "full_lrs must be at least 2 distinct"),
    "rate zero": ({"lora_lrs": (0.0, 1e-3)}, "lora_lrs"),
    "rate nan": ({"full_lrs": (math.nan, 1e-3)}, "full_lrs"),
    "rate a bool": ({"lora_lrs": (True, 1e-3)}, "lora_lrs"),
    "rate a string": ({"lora_lrs": "1e-3,3e-3"}, "lora_lrs"),
    "rsLoRA rank too big": ({"rslora_ranks": (1, 200)}, r"\[200\] exceed"),
    "rsLoRA rank zero": ({"rslora_ranks": (0,)}, "rslora_ranks must be positive integers"),
    "rsLoRA rank repeated": ({"rslora_ranks": (4, 4)}, "rslora_ranks has repeated"),
    "rsLoRA next to rsLoRA": ({"lora": LoRAConfig(rslora=True)}, "set rslora_ranks=()"),
    "full_lr nan": ({"full_lr": math.nan}, "full_lr must be"),
}


@pytest.mark.parametrize("case", CONFIG_ERRORS)
def test_experiment_config_refuses(case):
    changes, match = CONFIG_ERRORS[case]
    with pytest.raises(ValueError, match=match):
        ExperimentConfig(**changes)


def test_experiment_config_grids_and_rslora_ranks():
    cfg = ExperimentConfig(lora_lrs=[1e-3, 3e-3], rslora_ranks=[])  # lists, as JSON gives them back: tuples
    assert cfg.lora_lrs == (1e-3, 3e-3) and cfg.rslora_ranks == ()
    assert cfg.lr_grid(None) == cfg.full_lrs and cfg.lr_grid(cfg.lora) == cfg.lora_lrs
    assert ExperimentConfig(lora=LoRAConfig(rslora=True), rslora_ranks=()).lora.rslora
    names = [s.name for s in sweep_specs(ExperimentConfig(rslora_ranks=(1, 4, 16, 64)))]
    assert names[7:11] == ["rslora-r1", "rslora-r4", "rslora-r16", "rslora-r64"]
    assert all(s.lr is None for s in sweep_specs(ExperimentConfig()))  # every method is searched


def test_load_corpora_cuts_the_fine_tuning_text_three_ways():
    cfg = ExperimentConfig.quick()
    corpora = load_corpora(cfg)
    (train, val), test = corpora.finetune, corpora.test
    n = len(train) + len(val) + len(test)
    assert len(test) == round(0.1 * n) and abs(len(val) - 0.1 * n) <= 1
    assert len(corpora.pretrain[1]) == round(0.1 * (len(corpora.pretrain[0]) + len(corpora.pretrain[1])))


def test_a_fine_tuning_text_too_short_for_a_test_window_is_refused(tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("x" * 300, encoding="utf-8")  # 30 test characters < block_size + 1 = 33
    with pytest.raises(ValueError, match="training, validation and test parts need at least 33"):
        load_corpora(ExperimentConfig.quick(finetune_corpus=str(short)))


# -- the figures of the sweep ---------------------------------------------------------------------------------------


def test_the_sweep_draws_the_forgetting_figure(results, tmp_path):
    paths = draw(results, tmp_path)
    assert [p.name for p in paths] == ["params_vs_rank.png", "loss_curves.png", "val_loss_vs_rank.png",
                                       "memory_by_mode.png", "step_time.png", "learned_forgotten.png"]
    for p in paths:
        assert p.read_bytes().startswith(PNG_MAGIC) and p.stat().st_size > 10_000, p.name


def test_figures_read_results_from_before_the_search():
    """results/sweep.json of the last full run has no "chosen", no test split and no forgetting numbers: every row
    counts as chosen, the validation loss stands in, and the forgetting figure is not drawn."""
    old = json.loads((ROOT / "results" / "sweep.json").read_text(encoding="utf-8"))
    if any("chosen" in r for r in old["runs"]):
        pytest.skip("results/sweep.json has been rerun with the learning-rate search")
    assert chosen_runs(old) == old["runs"] and compare_runs(old)["split"] == "validation"
    assert [f.__name__ for f in drawable(old)] == ["params_vs_rank", "loss_curves", "val_loss_vs_rank",
                                                   "memory_by_mode", "step_time"]


def test_the_forgetting_figure_draws_the_which_weights_runs(tmp_path):
    """A hand-made results dict shaped like the targets experiment's: several sets of weights at one budget."""
    def run(name, mode, targets, rank, test, pre):
        return {"name": f"{name}/lr0.001", "method": name, "mode": mode, "rank": rank, "rslora": False,
                "targets": targets, "modules_to_save": [], "lr": 1e-3, "trainable": 10, "chosen": True,
                "final_val_loss": test, "test_loss": test, "pretrain_val_loss": pre}

    results = {"config": {"lora": {"rslora": False}}, "lr_search": {},
               "base": {"finetune_val_loss": 3.0, "finetune_test_loss": 3.0, "pretrain_val_loss": 1.5},
               "runs": [run("lora-q-r8", "lora", "q", 8, 2.8, 1.52), run("lora-qv-r4", "lora", "q,v", 4, 2.7, 1.51),
                        run("full", "full", "", None, 2.0, 1.9)]}
    path = learned_forgotten(results, tmp_path)
    assert path.name == "learned_forgotten.png" and path.read_bytes().startswith(PNG_MAGIC)


def test_quick_config_stays_small():
    cfg = ExperimentConfig.quick()
    assert len(cfg.lora_lrs) == len(cfg.full_lrs) == 2 and cfg.rslora_ranks == (1, 4)
    assert cfg.model == GPTConfig(block_size=32, n_layer=1, n_head=2, n_embd=64)
