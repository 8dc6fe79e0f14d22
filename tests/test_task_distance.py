"""Tests for lora_np/experiments/task_distance.py: the texts (every task made of characters the base saw in its
pretraining training text), the parameter counts of every configuration, the learning-rate searches (validation
only, stepping past the grid's edge), the measures read next to each other (share and gap, factor and ‖ΔW‖/‖W‖,
φ against chance), and the study at the quick size through the command line (every figure and results file)."""

from __future__ import annotations

import copy
import json
import math
from dataclasses import replace

import numpy as np
import pytest

from lora_np.__main__ import main
from lora_np.data import load_stdlib_sources
from lora_np.experiments import runs, task_distance
from lora_np.experiments.runs import model_config
from lora_np.experiments.task_distance import (
    PHI_CHANCE,
    TASKS,
    StudyConfig,
    cipher_table,
    encipher,
    gaps,
    load_study_data,
    markdown_table,
    paper_table,
    phi_verdict,
    recovered_share,
    run_study,
)
from lora_np.lora import EXTRA_MODULES, count_parameters, prepare_finetuning
from lora_np.model import GPT

STUDY_FIGURES = ["amplification.png", "full_rank.png", "lr_grid.png", "rslora.png", "spectrum.png",
                 "subspace_similarity.png", "task_distance.png"]


@pytest.fixture(scope="module")
def quick_cfg():
    return StudyConfig.quick()


@pytest.fixture(scope="module")
def data(quick_cfg):
    return load_study_data(quick_cfg)


# -- the texts ----------------------------------------------------------------------------------------------------


def test_every_task_character_is_in_the_pretraining_training_text(data):
    pretrain_train = set(data.tokenizer.decode(data.pretrain[0]))
    assert set(data.tokenizer.chars) == pretrain_train  # the vocabulary is exactly the training text's characters
    for task in TASKS:
        for part in data.tasks[task]:
            assert set(data.tokenizer.decode(part)) <= pretrain_train, task


def test_tasks_are_disjoint_from_pretraining_and_split_three_ways(data):
    held_out = data.texts["near"]
    pre_text = data.tokenizer.decode(data.pretrain[0]) + data.tokenizer.decode(data.pretrain[1])
    # Hebrews 1:1 and Revelation's "Alpha and Omega" are in the near task and nowhere in pretraining
    for text in (held_out.split("\n")[0], "I am Alpha and Omega"):
        assert text in held_out and text not in pre_text
    for task in TASKS:
        train, val, test = data.tasks[task]
        n = len(train) + len(val) + len(test)
        assert n == len(data.texts[task]) and abs(len(test) - 0.1 * n) <= 1 and abs(len(val) - 0.1 * n) <= 2
    assert data.texts["far"] == encipher(data.texts["near"], 0) and data.texts["far"] != data.texts["near"]


def test_cipher_is_a_derangement_of_letters_that_keeps_case():
    table = cipher_table(0)
    lower = "abcdefghijklmnopqrstuvwxyz"
    assert sorted(table[c] for c in lower) == list(lower)  # a permutation
    assert all(table[c] != c for c in lower)  # every letter changes
    assert all(table[c.upper()] == table[c].upper() for c in lower)
    assert encipher("And, 12!", 0)[3:] == ", 12!"  # everything but letters unchanged


def test_stdlib_sources_are_deterministic_capped_ascii_and_skip_pydoc_data():
    text = load_stdlib_sources(50_000)
    assert text == load_stdlib_sources(50_000) and 0 < len(text) <= 50_000
    assert all(c == "\n" or " " <= c <= "~" for c in set(text))
    assert "def " in text
    from pydoc_data.topics import topics
    assert topics["if"][:200] not in load_stdlib_sources(3_000_000)  # the middle task never leaks in


# -- the configurations and their parameter counts -------------------------------------------------------------


def test_every_configuration_trains_the_parameters_it_claims(quick_cfg, data):
    m = quick_cfg.experiment.model
    C, L, V, T = m.n_embd, m.n_layer, data.tokenizer.vocab_size, m.block_size
    base = GPT(model_config(quick_cfg.experiment, data.corpora("near")))
    total = count_parameters(base).total
    # per block: q, k, v, o are C x C, up is C x 4C, down 4C x C; LoRA at rank r on W (d_in, d_out): r·(d_in + d_out)
    expected = {f"lora-qv-r{r}": L * 2 * r * (C + C) for r in quick_cfg.qv_ranks}
    expected |= {f"lora-all-r{r}": L * r * (4 * 2 * C + 2 * (C + 4 * C)) for r in quick_cfg.all_linear_ranks}
    expected["full"] = total
    got = {name: count_parameters(prepare_finetuning(GPT(base.config), lora)).trainable
           for name, lora in quick_cfg.methods()}
    assert got == expected
    full_rank = quick_cfg.full_rank_lora()
    assert full_rank.r == C and full_rank.modules_to_save == EXTRA_MODULES
    extras = V * C + T * C + C * V + 2 * C  # wte, wpe, lm_head (no bias), ln_f (weight and bias)
    assert count_parameters(prepare_finetuning(GPT(base.config), full_rank)).trainable == (
        L * C * (4 * 2 * C + 2 * (C + 4 * C)) + extras)


def test_study_config_is_validated():
    for bad in (dict(lora_lrs=(1e-3, 3e-3)), dict(full_lrs=(1e-3, 1e-3, 3e-3)), dict(qv_ranks=(1, 2, 8, 64)),
                dict(side_task="elsewhere"), dict(all_linear_ranks=(1, 1000)), dict(cipher_seed=-1),
                dict(lr_extend=-1), dict(lr_extend=1.5)):
        with pytest.raises(ValueError, match="StudyConfig"):
            StudyConfig(**bad)


# -- the learning-rate searches ----------------------------------------------------------------------------------


def _row(lr, val, test, stopped=""):
    return {"lr": lr, "final_val_loss": val, "test_loss": test, "stopped": stopped}


def test_lr_search_follows_validation_not_test():
    table = {1e-3: (2.0, 1.0), 3e-3: (1.5, 3.0), 1e-2: (1.8, 0.5)}  # lr -> (validation, test)
    found = runs.search_lr(lambda lr: _row(lr, *table[lr]), tuple(table))
    assert found["lr"] == 3e-3 and found["interior"] and found["grid"] == [1e-3, 3e-3, 1e-2]
    # the test losses change; the choice does not
    flipped = runs.search_lr(lambda lr: _row(lr, table[lr][0], -table[lr][1]), tuple(table))
    assert flipped["lr"] == found["lr"]
    # diverged or stopped runs lose against every finite one
    bad = {1e-3: (None, 0.1), 3e-3: (2.5, 2.0, "non-finite loss"), 1e-2: (2.7, 9.0)}
    assert runs.search_lr(lambda lr: _row(lr, *bad[lr]), tuple(bad), extend=0)["lr"] == 1e-2


# A hand-made validation curve per method, (log10 lr − log10 best)², so every search's path is known in advance:
# method -> (the best rate of its curve, the rates the search tries, the rate it chooses, interior?)
SEARCHES = {
    "full": (1e-3, [3e-4, 1e-3, 3e-3], 1e-3, True),  # inside the grid at once
    "lora-qv-r2": (3e-3, [1e-3, 3e-3, 1e-2], 3e-3, True),
    "lora-qv-r64": (3e-2, [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], 3e-2, True),  # two steps up, then interior
    "lora-qv-r1": (1.0, [1e-3, 3e-3, 1e-2, 3e-2, 1e-1], 1e-1, False),  # still at the edge after two steps
    "lora-all-r1": (1e-4, [1e-4, 3e-4, 1e-3, 3e-3, 1e-2], 1e-4, False),  # two steps down
}


@pytest.fixture(scope="module")
def wired(quick_cfg, data):
    """The study with ``finetune_run`` replaced by a stand-in: untrained models (the analyses run on them), and
    rows whose validation loss follows ``SEARCHES`` and whose test loss is its negative (reading it would pick the
    worst rate)."""
    mp = pytest.MonkeyPatch()

    def fake(base, spec, cfg, corpora, progress=True, measure_memory=True):
        method = spec.name.split("/")[1]
        best = SEARCHES.get(method, (3e-3,))[0]
        val = 1.0 + (math.log10(spec.lr) - math.log10(best)) ** 2
        model = prepare_finetuning(copy.deepcopy(base), spec.lora, spec.train_only)
        return model, {"lr": spec.lr, "lora": spec.lora.to_dict() if spec.lora else None, "final_val_loss": val,
                       "test_loss": -val, "stopped": "", "trainable": 1, "history": {"step_loss": []},
                       "pretrain_val_loss": 2.0 + spec.lr}

    mp.setattr(task_distance, "finetune_run", fake)
    try:
        return run_study(quick_cfg, progress=False, data=data)
    finally:
        mp.undo()  # now, not at the module's end: the tests after this one train for real


def test_every_search_runs_its_grid_then_steps_past_the_edge(wired, quick_cfg):
    extra = 0
    for task in TASKS:
        t = wired["tasks"][task]
        for m, _ in quick_cfg.methods():
            _, grid, lr, interior = SEARCHES.get(m, SEARCHES["lora-qv-r2"])
            rows = [r for r in wired["runs"] if r["task"] == task and r["part"] == "grid" and r["method"] == m]
            assert t["lr_grid"][m] == grid == sorted(r["lr"] for r in rows), (task, m)
            assert (t["chosen_lr"][m], t["lr_interior"][m]) == (lr, interior), (task, m)
            chosen = [r for r in rows if r["chosen"]]  # one chosen row, the lowest validation loss
            assert len(chosen) == 1 and chosen[0]["lr"] == lr
            assert chosen[0]["final_val_loss"] == min(r["final_val_loss"] for r in rows)
            extra += len(grid) - len(quick_cfg.lrs(dict(quick_cfg.methods())[m]))
    # the side task's rsLoRA comparison reuses LoRA's searches at qv_ranks, and at r = 1 rsLoRA is LoRA
    own = wired["rslora"]["own_lr"]
    assert own["rslora"]["1"] == own["lora"]["1"] and own["lora"]["1"]["grid"] == SEARCHES["lora-qv-r1"][1]
    assert not [r for r in wired["runs"] if r["method"] in ("lora-qv-r1", "rslora-qv-r1", "lora-qv-r4")
                and r["part"] != "grid"]
    count = quick_cfg.run_count()
    assert len(wired["runs"]) == count["planned"] + extra <= count["at_most"]


def test_study_never_reads_the_test_split_before_choosing(quick_cfg, data, monkeypatch, tmp_path):
    """Run the study twice, the second time with every task's test split replaced by other text: every choice of
    learning rate and every validation loss must stay the same (the test split reaches nothing but the test
    loss), while the test losses change. A leak of the test split into the choice or into training fails this."""
    monkeypatch.setenv("LORA_NP_CACHE", str(tmp_path))
    cfg = replace(quick_cfg, qv_ranks=(4, 8, 64), all_linear_ranks=(1,), rslora_ranks=(1,))
    first = run_study(cfg, progress=False, data=data)
    swapped = load_study_data(cfg)
    for task in TASKS:
        train, val, test = swapped.tasks[task]
        swapped.tasks[task] = (train, val, train[:len(test)])  # the test split is now other text
    second = run_study(cfg, progress=False, data=swapped)
    for task in TASKS:
        a, b = first["tasks"][task], second["tasks"][task]
        for key in ("chosen_lr", "lr_interior", "lr_grid", "val_loss"):
            assert a[key] == b[key], (task, key)
        assert a["test_loss"] != b["test_loss"]
    assert first["full_rank"]["lr"] == second["full_rank"]["lr"]
    assert first["rslora"]["own_lr"]["rslora"]["1"]["lr"] == second["rslora"]["own_lr"]["rslora"]["1"]["lr"]


# -- the measures --------------------------------------------------------------------------------------------------


def test_recovered_share():
    assert recovered_share(3.0, 2.0, 1.0) == 0.5
    assert recovered_share(3.0, 1.0, 1.0) == 1.0 and recovered_share(3.0, 3.5, 1.0) == -0.25
    assert recovered_share(3.0, 2.0, 3.0) is None  # full fine-tuning gained nothing: no share to speak of


# (base, LoRA, full) test losses, the recovered share and the gap to full: similar shares, very different gaps
SHARE_AND_GAP = [
    ((5.73, 2.60, 1.69), 0.7748, 0.91),  # far-like: the base above ln V, a high share and a large gap
    ((2.00, 1.91, 1.90), 0.90, 0.01),  # near-like: a higher share, a tiny gap
    ((3.0, 3.5, 1.0), -0.25, 2.5),  # worse than the base
]


@pytest.mark.parametrize("losses, share, gap", SHARE_AND_GAP)
def test_gap_is_the_absolute_distance_the_share_hides(losses, share, gap):
    base, lora, full = losses
    task = {"test_loss": {"lora-qv-r1": lora, "full": full}}
    assert recovered_share(base, lora, full) == pytest.approx(share, abs=1e-3)
    assert gaps(task) == pytest.approx({"lora-qv-r1": gap})  # from the test losses (results without "gap")
    assert gaps({**task, "gap": {"lora-qv-r1": 0.123}}) == {"lora-qv-r1": 0.123}  # "gap" where it is recorded


# (φ(1, 1), d) -> verdict
PHI_VERDICTS = [
    (0.9, 128, "shared (> 0.5)"), (0.51, 64, "shared (> 0.5)"),
    (0.5, 128, "above chance"), (0.15, 128, "above chance"),  # W_q's 0.15 on one task: far above 1/128
    (0.05, 128, "at chance"), (1 / 128, 128, "at chance"), (0.0, 128, "at chance"),
    (0.1, 64, "at chance"), (0.2, 64, "above chance"),  # the same φ reads differently in fewer dimensions
]


@pytest.mark.parametrize("phi11, d, verdict", PHI_VERDICTS)
def test_phi_verdict(phi11, d, verdict):
    assert phi_verdict(phi11, d) == verdict


@pytest.mark.parametrize("phi11, d", [(1.5, 128), (-0.1, 128), (None, 128), (0.3, 0), (0.3, 12.5), (True, 128)])
def test_phi_verdict_refuses_what_is_not_a_phi(phi11, d):
    with pytest.raises(ValueError, match="phi_verdict"):
        phi_verdict(phi11, d)


def test_phi_chance_threshold_is_about_one_in_a_thousand_for_random_directions():
    # φ(1, 1) of two random subspaces is the squared cosine of two uniformly random unit vectors of R^d; by
    # symmetry one of them can be e₁: cos² = x₁² / ‖x‖² (exactly Beta(1/2, (d − 1)/2): P(d·cos² > 10.83) = 0.0008)
    d, gen = 128, np.random.default_rng(0)
    cos2 = np.concatenate([(x[:, 0] ** 2) / (x * x).sum(1) for x in (gen.standard_normal((20_000, d))
                                                                       for _ in range(5))])
    assert cos2.mean() == pytest.approx(1 / d, rel=0.03)
    assert 0.0005 < (d * cos2 > PHI_CHANCE).mean() < 0.0012


# -- the subcommand at the quick size --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("study")
    assert main(["study", "--quick", "--no-progress", "--out", str(out)]) == 0
    return out


def test_study_writes_every_figure_and_the_results_file(study_out):
    assert sorted(p.name for p in study_out.iterdir()) == ["figures", "results"]
    assert [p.name for p in (study_out / "results").iterdir()] == ["study.json"]
    assert sorted(p.name for p in (study_out / "figures").iterdir()) == STUDY_FIGURES
    for name in STUDY_FIGURES:
        assert (study_out / "figures" / name).read_bytes().startswith(b"\x89PNG\r\n\x1a\n"), name


def test_study_results_hold_every_run_and_the_analyses(study_out, quick_cfg):
    res = json.loads((study_out / "results" / "study.json").read_text())
    methods = [m for m, _ in quick_cfg.methods()]
    base_pretrain, ln_v = res["base"]["pretrain_val_loss"], math.log(res["vocab_size"])
    assert res["uniform_loss"] == pytest.approx(ln_v)
    for task in TASKS:
        t = res["tasks"][task]
        rows = [r for r in res["runs"] if r["task"] == task and r["part"] == "grid"]
        assert sorted(t["chosen_lr"]) == sorted(methods) and set(t["recovered"]) == set(methods) - {"full"}
        for m, lora in quick_cfg.methods():
            mine = [r for r in rows if r["method"] == m]
            tried = t["lr_grid"][m]  # the grid, and at most lr_extend rates past its edge
            assert sorted(r["lr"] for r in mine) == tried and set(quick_cfg.lrs(lora)) <= set(tried)
            assert len(tried) <= len(quick_cfg.lrs(lora)) + quick_cfg.lr_extend
            assert t["lr_interior"][m] == (tried[0] < t["chosen_lr"][m] < tried[-1])
            chosen = [r for r in mine if r["chosen"]]
            assert len(chosen) == 1 and chosen[0]["test_loss"] == t["test_loss"][m]
            assert chosen[0]["lr"] == t["chosen_lr"][m]
            assert chosen[0]["final_val_loss"] == min(r["final_val_loss"] for r in mine)
            # learned on the task and forgotten of the pretraining text, by the chosen run
            assert t["learned"][m] == pytest.approx(t["base_test_loss"] - t["test_loss"][m])
            assert t["forgotten"][m] == pytest.approx(chosen[0]["pretrain_val_loss"] - base_pretrain)
            if m != "full":
                assert t["gap"][m] == pytest.approx(t["test_loss"][m] - t["test_loss"]["full"])
        assert t["base_minus_uniform"] == pytest.approx(t["base_test_loss"] - ln_v)
        assert len({r["history"]["steps"][-1] for r in rows}) == 1  # the same steps for every run
        phi = t["analysis"]["phi"]["v"]
        assert len(phi["r8_vs_r64"]) == 8 and all(0 <= x <= 1 + 1e-9 for row in phi["r64_seeds"] for x in row)
        assert set(t["analysis"]["amplification"]) == {"r4", "r64"}
        for a in t["analysis"]["amplification"].values():
            assert a is None or a["delta_w_over_w"] == pytest.approx(a["delta_w_norm"] / a["w_norm"])
        for sp in t["analysis"]["spectrum"].values():
            assert math.isclose(sum(s * s for s in sp["full"]), 1.0, rel_tol=1e-3)
    assert all("pretrain_val_loss" in r for r in res["runs"])
    fr = res["full_rank"]
    assert fr["trainable"] > fr["full_trainable"] * 0.5 and fr["lr"] in fr["grid"]
    rs = res["rslora"]
    for kind in ("lora", "rslora"):
        assert set(rs["test_loss"][kind]) == set(rs["own_lr"][kind]) == {str(r) for r in quick_cfg.rslora_ranks}
    for r in quick_cfg.qv_ranks:  # LoRA's own-lr numbers are the task grid's, not new runs
        if str(r) in rs["own_lr"]["lora"]:
            assert rs["own_lr"]["lora"][str(r)]["test_loss"] == res["tasks"][rs["task"]]["test_loss"][f"lora-qv-r{r}"]
    count = quick_cfg.run_count()
    assert count["planned"] <= len(res["runs"]) <= count["at_most"]
    table = markdown_table(res)
    assert "| lora-qv-r8 |" in table and "gap to full" in table and "forgotten" in table
    assert paper_table(res).count("\n") == 7
    assert all(r.get("test_loss") is not None for r in res["runs"])


def test_tables_read_results_written_before_the_searches(study_out):
    """Results from before the searches (no "gap", "lr_interior", "own_lr", forgetting, "delta_w_over_w"): the
    tables compute what they can and mark a chosen rate at the edge of the config's grid."""
    res = json.loads((study_out / "results" / "study.json").read_text())
    old = copy.deepcopy(res)
    del old["uniform_loss"], old["rslora"]["own_lr"], old["full_rank"]["interior"], old["full_rank"]["grid"]
    for t in old["tasks"].values():
        for key in ("gap", "lr_interior", "lr_grid", "learned", "forgotten", "base_minus_uniform"):
            del t[key]
        for a in t["analysis"]["amplification"].values():
            if a:
                del a["delta_w_over_w"]
    for t in res["tasks"].values():  # the tables read the same gaps either way
        assert gaps(t) == pytest.approx(gaps({k: v for k, v in t.items() if k != "gap"}))
    old_table = markdown_table(old)
    assert "gap to full" in old_table and "forgotten" not in old_table
    assert paper_table(old).count("\n") == 7 and "‖ΔW‖/‖W‖" in paper_table(old).split("\n")[-2]
    grid, lr = old["config"]["lora_lrs"], old["tasks"]["near"]["chosen_lr"]["lora-qv-r8"]
    row = next(line for line in old_table.split("\n") if line.startswith("| lora-qv-r8 |"))
    assert row.split(" | ")[1].endswith(f"(lr {lr:g}, edge)") == (not min(grid) < lr < max(grid))


def test_figures_redraw_the_study(study_out, tmp_path):
    assert main(["figures", "--results", str(study_out / "results" / "study.json"), "--out", str(tmp_path)]) == 0
    assert sorted(p.name for p in tmp_path.glob("*.png")) == STUDY_FIGURES


def test_finetune_run_scores_the_test_split_only_when_there_is_one(quick_cfg, data, tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_NP_CACHE", str(tmp_path))
    cfg = replace(quick_cfg.experiment, finetune=replace(quick_cfg.experiment.finetune, max_steps=2))
    base, _ = runs.pretrain_base(cfg, data.corpora("near"), progress=False)
    _, row = runs.finetune_run(base, runs.RunSpec("full"), cfg, data.corpora("near"), False, False)
    assert row["test_loss"] > 0
    no_test = replace(data.corpora("near"), test=None)
    _, row = runs.finetune_run(base, runs.RunSpec("full"), cfg, no_test, False, False)
    assert "test_loss" not in row
