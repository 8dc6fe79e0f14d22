"""Tests for lora_np/experiments/summary.py on hand-made results: the chosen runs, the gap to full fine-tuning next
to the share of its gain, and learned vs forgotten (Biderman et al. 2024) with its verdict."""

from __future__ import annotations

import pytest

from lora_np.experiments.summary import (
    chosen_runs,
    compare_runs,
    forgetting_summary,
    format_forgetting,
    loss_split,
    markdown_table,
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
