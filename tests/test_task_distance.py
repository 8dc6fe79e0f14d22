"""Tests for lora_np/experiments/task_distance.py: the texts (every task made of characters the base saw in its
pretraining training text), the parameter counts of every configuration, the learning-rate choice (validation
only), and the study at the quick size through the command line (every figure and results file)."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from lora_np.__main__ import main
from lora_np.data import load_stdlib_sources
from lora_np.experiments import runs
from lora_np.experiments.runs import model_config
from lora_np.experiments.task_distance import (
    TASKS,
    StudyConfig,
    choose_lr,
    cipher_table,
    encipher,
    load_study_data,
    markdown_table,
    paper_table,
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
                dict(side_task="elsewhere"), dict(all_linear_ranks=(1, 1000)), dict(cipher_seed=-1)):
        with pytest.raises(ValueError, match="StudyConfig"):
            StudyConfig(**bad)


# -- the learning-rate choice -----------------------------------------------------------------------------------


def _row(method, lr, val, test, stopped=""):
    return {"method": method, "lr": lr, "final_val_loss": val, "test_loss": test, "stopped": stopped}


def test_lr_choice_follows_validation_not_test():
    rows = [_row("a", 1e-3, 2.0, 1.0), _row("a", 3e-3, 1.5, 3.0), _row("a", 1e-2, 1.8, 0.5),
            _row("b", 1e-3, None, 0.1), _row("b", 3e-3, 2.5, 2.0, stopped="non-finite loss"), _row("b", 1e-2, 2.7, 9)]
    assert choose_lr(rows) == {"a": 3e-3, "b": 1e-2}
    # the test losses change; the choice does not
    shuffled = [{**r, "test_loss": -r["test_loss"]} for r in rows]
    assert choose_lr(shuffled) == choose_lr(rows)


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
        assert a["chosen_lr"] == b["chosen_lr"] and a["val_loss"] == b["val_loss"]
        assert a["test_loss"] != b["test_loss"]


def test_recovered_share():
    assert recovered_share(3.0, 2.0, 1.0) == 0.5
    assert recovered_share(3.0, 1.0, 1.0) == 1.0 and recovered_share(3.0, 3.5, 1.0) == -0.25
    assert recovered_share(3.0, 2.0, 3.0) is None  # full fine-tuning gained nothing: no share to speak of


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
    for task in TASKS:
        t = res["tasks"][task]
        rows = [r for r in res["runs"] if r["task"] == task and r["part"] == "grid"]
        assert sorted((r["method"], r["lr"]) for r in rows) == sorted(
            (m, lr) for m, lora in quick_cfg.methods() for lr in quick_cfg.lrs(lora))
        assert sorted(t["chosen_lr"]) == sorted(methods) and set(t["recovered"]) == set(methods) - {"full"}
        for m in methods:
            chosen = [r for r in rows if r["method"] == m and r["chosen"]]
            assert len(chosen) == 1 and chosen[0]["test_loss"] == t["test_loss"][m]
            assert chosen[0]["final_val_loss"] == min(r["final_val_loss"] for r in rows if r["method"] == m)
        assert len({r["history"]["steps"][-1] for r in rows}) == 1  # the same steps for every run
        phi = t["analysis"]["phi"]["v"]
        assert len(phi["r8_vs_r64"]) == 8 and all(0 <= x <= 1 + 1e-9 for row in phi["r64_seeds"] for x in row)
        assert set(t["analysis"]["amplification"]) == {"r4", "r64"}
        for sp in t["analysis"]["spectrum"].values():
            assert math.isclose(sum(s * s for s in sp["full"]), 1.0, rel_tol=1e-3)
    assert res["full_rank"]["trainable"] > res["full_rank"]["full_trainable"] * 0.5
    assert set(res["rslora"]["test_loss"]["rslora"]) == {str(r) for r in quick_cfg.rslora_ranks}
    assert "| lora-qv-r8 |" in markdown_table(res) and paper_table(res).count("\n") == 7
    assert all(r.get("test_loss") is not None for r in res["runs"])


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
