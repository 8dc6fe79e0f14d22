"""Tests for lora_np/experiments/summary.py on hand-made results: the chosen runs, the gap to full fine-tuning next
to the share of its gain, learned vs forgotten (Biderman et al. 2024) with its verdict, and the practice table's
evidence (choosing r, α, the learning rate and the targets) with what it says where a file lacks a number."""

from __future__ import annotations

import json
import re

import pytest

from lora_np.experiments.summary import (
    chosen_runs,
    compare_runs,
    forgetting_summary,
    format_forgetting,
    loss_split,
    markdown_table,
    practice_evidence,
    practice_table,
    read_practice_results,
)


def _run(method, mode, test, pre, rank=None, chosen=True, lr=1e-3, rslora=False, modules=()):
    return {"name": f"{method}/lr{lr:g}", "method": method, "mode": mode, "rank": rank, "rslora": rslora,
            "targets": "q,v", "modules_to_save": list(modules), "lr": lr, "trainable": 100, "chosen": chosen,
            "final_val_loss": test + 0.5, "test_loss": test, "pretrain_val_loss": pre, "val_loss_unseen": 5.0,
            "step_seconds": 0.1}


def _results(full_test=2.0, full_pre=1.8):
    """base 3.0 on the test split, 1.5 on the pretraining text. Learned / forgotten of the chosen runs:
    full 1.0 / 0.3; lora-r8 0.5 / 0.1; lora-r64 0.6 / 0.05 (the best LoRA run: it learned the most);
    LoRA + embeddings 1.2 / 0.4 (not a plain LoRA run); a grid run that was not chosen learns 2.0."""
    return {
        "base": {"finetune_val_loss": 3.5, "finetune_test_loss": 3.0, "pretrain_val_loss": 1.5,
                 "val_loss_unseen": 7.0},
        "lr_search": {"lora-r8": {"lr": 1e-3, "interior": True, "grid": [3e-4, 1e-3, 3e-3]},
                      "lora-r64": {"lr": 1e-2, "interior": False, "grid": [1e-3, 3e-3, 1e-2]}},
        "runs": [_run("lora-r8", "lora", 2.5, 1.6, rank=8), _run("lora-r8", "lora", 1.0, 1.5, rank=8, chosen=False,
                                                                lr=3e-3),
                 _run("lora-r64", "lora", 2.4, 1.55, rank=64, lr=1e-2),
                 _run("lora-r8+wte", "lora", 1.8, 1.9, rank=8, modules=("wte",)),
                 _run("full", "full", full_test, full_pre)],
    }


# (full fine-tuning's test loss and pretraining-text loss, learns more, forgets more)
VERDICTS = {
    "as the paper: learns more, forgets more": (2.0, 1.8, True, True),
    "learns more, forgets less": (2.0, 1.52, True, False),
    "learns less, forgets more": (2.45, 1.8, False, True),
    "learns less, forgets less": (2.45, 1.52, False, False),
}


@pytest.mark.parametrize("case", VERDICTS)
def test_forgetting_summary_compares_full_with_the_best_lora_run(case):
    full_test, full_pre, learns, forgets = VERDICTS[case]
    s = forgetting_summary(_results(full_test, full_pre))
    assert s["split"] == "test" and s["full"] == "full" and s["best_lora"] == "lora-r64"
    assert (s["full_learns_more"], s["full_forgets_more"]) == (learns, forgets)
    assert s["learns_more_forgets_more"] == (learns and forgets)
    assert ("as Biderman et al. 2024 report" in format_forgetting(s)) == (learns and forgets)


def test_learned_and_forgotten_of_every_chosen_run():
    s = forgetting_summary(_results())
    assert [r["method"] for r in s["runs"]] == ["lora-r8", "lora-r64", "lora-r8+wte", "full"]
    assert [r["learned"] for r in s["runs"]] == pytest.approx([0.5, 0.6, 1.2, 1.0])
    assert [r["forgotten"] for r in s["runs"]] == pytest.approx([0.1, 0.05, 0.4, 0.3])


def test_without_a_test_split_the_validation_loss_is_read():
    res = _results()
    del res["base"]["finetune_test_loss"]
    assert loss_split(res) == ("validation", "final_val_loss", "finetune_val_loss")
    s = forgetting_summary(res)
    assert s["split"] == "validation"
    assert {r["method"]: r["learned"] for r in s["runs"]}["full"] == pytest.approx(3.5 - 2.5)


def test_no_full_run_no_verdict_and_no_pretraining_loss_is_an_error():
    res = _results()
    res["runs"] = [r for r in res["runs"] if r["mode"] != "full"]
    s = forgetting_summary(res)
    assert s["full"] is None and s["learns_more_forgets_more"] is None and "no comparison" in format_forgetting(s)
    del res["base"]["pretrain_val_loss"]
    with pytest.raises(ValueError, match="pretrain_val_loss"):
        forgetting_summary(res)


def test_rows_without_chosen_count_as_chosen():
    res = _results()
    for r in res["runs"]:
        del r["chosen"], r["method"]
    assert chosen_runs(res) == res["runs"]


def test_compare_runs_gap_share_and_edge():
    cmp = compare_runs(_results())
    rows = {r["method"]: r for r in cmp["rows"]}
    assert list(rows) == ["lora-r8", "lora-r64", "lora-r8+wte", "full"]  # the grid run not chosen is left out
    assert rows["lora-r8"]["gap"] == pytest.approx(0.5) and rows["lora-r8"]["recovered"] == pytest.approx(0.5)
    assert rows["lora-r8+wte"]["gap"] == pytest.approx(-0.2) and rows["full"]["gap"] == 0
    assert rows["lora-r64"]["interior"] is False and rows["full"]["interior"] is None
    table = markdown_table(_results())
    assert "| lora-r64 | 100 | 0.01† | 2.400 | +0.400 | 0.60 | +0.050 |" in table
    assert "| lora-r8 | 100 | 0.001 | 2.500 | +0.500 | 0.50 | +0.100 |" in table
    assert "| base (no fine-tuning) | 0 | – | 3.000 | +1.000 |" in table and "† chosen at the edge" in table


# -- the practice table ---------------------------------------------------------------------------------------------


def _sweep():
    """A sweep on q, v: LoRA r = 1, 8, 64 and rsLoRA r = 64, LoRA r = 8 + embeddings, full fine-tuning at 1e-3."""
    runs = [_run("lora-r1", "lora", 2.6, 1.6, rank=1, lr=1e-2), _run("lora-r8", "lora", 2.4, 1.6, rank=8, lr=1e-2),
            _run("lora-r64", "lora", 2.38, 1.6, rank=64, lr=3e-2),
            _run("rslora-r64", "lora", 2.3, 1.6, rank=64, lr=1e-2, rslora=True),
            _run("lora-r8+wte", "lora", 2.0, 1.7, rank=8, lr=1e-2, modules=("wte",)),
            _run("full", "full", 1.9, 1.8, lr=1e-3)]
    for r in runs:
        r["alpha"] = 16.0 if r["mode"] == "lora" else None
    runs[4]["trainable"] = 150
    return {"base": {"finetune_val_loss": 3.5, "finetune_test_loss": 3.0, "pretrain_val_loss": 1.5},
            "lr_search": {"lora-r64": {"lr": 3e-2, "interior": False, "grid": [3e-3, 1e-2, 3e-2]},
                          "lora-r8": {"lr": 1e-2, "interior": True, "grid": [3e-3, 1e-2, 3e-2]}},
            "unseen_chars": "#_{", "runs": runs}


def _planted():
    """One teacher (k = 2, in q, v): LoRA r = 1, 2, 4, LoRA r = 4 on the wrong matrix, full fine-tuning."""
    def method(rank, targets, lr, kl, share):
        return {"rank": rank, "targets": targets, "trainable": 10, "lr": lr, "interior": True,
                "kl": {"mean": kl}, "kl_share": {"mean": share}}
    methods = {"lora-r1": method(1, "q,v", 3e-2, 0.2, 0.4), "lora-r2": method(2, "q,v", 1e-2, 0.004, 0.008),
               "lora-r4": method(4, "q,v", 1e-2, 0.003, 0.006), "wrong-lora-r4-up": method(4, "up", 3e-2, 0.1, 0.2),
               "full": method(None, "all", 1e-3, 0.005, 0.01)}
    modes = {"full": "full"}
    return {"config": {"k": 2, "alpha": 16.0},
            "placements": {"q,v": {"targets": ["q", "v"], "methods": methods}},
            "runs": [{"placement": "q,v", "method": name, "mode": modes.get(name, "lora")} for name in methods]}


def _minilm(**drop):
    """The schema the lab writes: one row per run at its chosen rate, the seeds of a method repeating it."""
    rows = [{"name": "probe", "mode": "probe", "lr": 1e-2, "rank": None, "targets": "", "grid": [3e-3, 1e-2, 3e-2]},
            {"name": "lora-qv-r4", "mode": "lora", "lr": 1e-4, "rank": 4, "targets": "q,v", "grid": [1e-4, 3e-4]},
            {"name": "lora-qv-r4", "mode": "lora", "lr": 1e-4, "rank": 4, "targets": "q,v", "seed": 1},
            {"name": "full", "mode": "full", "lr": 1e-4, "rank": None, "targets": "",
             "grid": [{"lr": 3e-5}, {"lr": 1e-4}, {"lr": 3e-4}]}]
    for key in drop:
        del rows[1][key]
    return {"runs": rows}


def _evidence(**results):
    return {row["choice"]: row for row in practice_evidence(results)}


def test_practice_evidence_from_a_sweep():
    rows = _evidence(sweep=_sweep())
    lr = rows["learning rate"]
    assert lr["measured"]["sweep"] == pytest.approx([10, 10, 30, 10, 10])  # every LoRA run ÷ full's 1e-3
    assert lr["measured"]["above"] == 5 and "sweep ×10–×30 (median ×10, 5 runs; 1 of these choices at the edge" \
        in lr["evidence"]
    assert rows["learning-rate search"]["measured"]["sweep"] == (1, 2)  # only lora-r8 and lora-r64 were searched
    rank = rows["rank"]["measured"]["sweep on q,v"]
    assert rank["within tol of best"] == 8 and rank["gap to full"] == pytest.approx(0.5)  # 2.40 ≤ 2.38 + 0.05
    assert rank["as good as full from"] is None and "r8 (of 1, 8, 64), +0.500 to full there" in rows["rank"]["evidence"]
    assert practice_evidence({"sweep": _sweep()}, tol=0.01)[4]["measured"]["sweep on q,v"]["within tol of best"] == 64
    assert rows["α/r or α/√r"]["measured"]["sweep r64"] == pytest.approx(-0.08)
    assert rows["α"]["measured"]["alpha"] == [16.0] and rows["α"]["measured"]["largest spread"] == pytest.approx(3)
    assert rows["embeddings and head"]["measured"]["sweep"] == pytest.approx({"delta": -0.4, "extra": 50,
                                                                              "gap to full": 0.1})
    assert rows["embeddings and head"]["evidence"].startswith("the new text holds 3 characters the base never saw")


def test_practice_evidence_from_the_planted_experiment():
    rows = _evidence(planted=_planted())
    assert rows["rank"]["measured"]["planted q,v teacher on q,v"]["as good as full from"] == 2  # 0.004 ≤ 0.005
    assert "planted q,v teacher (k = 2): as close to the teacher as full fine-tuning from r2" in \
        rows["rank"]["evidence"]
    assert rows["targets"]["measured"]["planted q,v teacher"] == {"wrong": 0.2, "right": 0.008}  # r = k on q, v
    assert rows["learning rate"]["measured"]["planted"] == pytest.approx([30, 10, 10, 30])  # the wrong run counts too


def test_practice_evidence_reads_the_minilm_schema_and_counts_seeds_once():
    rows = _evidence(minilm=_minilm())
    assert rows["learning rate"]["measured"]["minilm"] == pytest.approx([1.0])
    assert "minilm ×1 (1 runs; 1 of these choices at the edge of their grid)" in rows["learning rate"]["evidence"]
    assert rows["learning-rate search"]["measured"]["minilm"] == (2, 3)  # probe, full interior; LoRA at 1e-4
    assert "(at an edge: 1 lora)" in rows["learning-rate search"]["evidence"]


# (the results given, the rows that must say which file is not measured and why)
MISSING = {
    "nothing": ({}, "sweep: not measured here (no results file)"),
    "a minilm row without targets": ({"minilm": _minilm(targets=True)},
                                     "minilm: not measured here (its rows lack one of mode, lr, rank, targets)"),
    "a minilm file without runs": ({"minilm": {"methods": {}}},
                                   "minilm: not measured here (its rows lack one of mode, lr, rank, targets)"),
    "a sweep without its base": ({"sweep": {k: v for k, v in _sweep().items() if k != "base"}},
                                 "sweep: not measured here (its results lack 'base')"),
}


@pytest.mark.parametrize("case", MISSING)
def test_practice_evidence_says_not_measured_instead_of_guessing(case):
    results, note = MISSING[case]
    rows = practice_evidence(results)
    assert [r["measured"] for r in rows] == [{}] * len(rows)  # no number invented
    assert all("not measured here" in r["evidence"] for r in rows)
    assert note in rows[0]["evidence"] and note in rows[1]["evidence"]  # the two rows every file feeds


def test_practice_table_renders_every_row_and_reads_files(tmp_path):
    (tmp_path / "all-linear" / "results").mkdir(parents=True)
    (tmp_path / "sweep.json").write_text(json.dumps(_sweep()), encoding="utf-8")
    results = read_practice_results(tmp_path)
    assert results["sweep"] == _sweep() and results["planted"] is None and results["all-linear"] is None
    rows = practice_evidence(results)
    rows[0]["advice"] = "a | b"  # a cell with a pipe must not split the row
    lines = practice_table(rows).splitlines()
    assert lines[:2] == ["| choice | do this | measured here | literature |", "|---|---|---|---|"]
    assert len(lines) == 2 + len(rows) and "a \\| b" in lines[2]
    assert all(len(re.split(r"(?<!\\)\|", line)) == 6 for line in lines[2:])  # 4 cells between 5 pipes
