"""Reading the results of ``runs.run_experiment`` (the sweep, the which-weights experiment): the run each method's
learning-rate search chose, a table of every chosen run against full fine-tuning, and learned vs forgotten.

Pure functions of the results dict (as written to ``results/*.json``): nothing here trains, draws or writes. They
also read results written before the learning-rate search: a row without "chosen" was its method's only run, and
counts as chosen; without a test split, the validation loss stands in for the test loss (and the tables say so).
"""

from __future__ import annotations

import math
from typing import Any


def chosen_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The run of every method at its chosen learning rate, in the order the methods ran."""
    return [r for r in results["runs"] if r.get("chosen", True)]


def method(run: dict[str, Any]) -> str:
    """The method a run belongs to ("lora-r8"); its name ("lora-r8/lr0.003") names the learning rate too."""
    return run.get("method", run["name"])


def loss_split(results: dict[str, Any]) -> tuple[str, str, str]:
    """(split, the runs' key, the base's key) of the loss on the new task that a verdict reads: the test split
    where the base and every chosen run have it, else the validation split (results from before the test split)."""
    if results["base"].get("finetune_test_loss") is not None and all(
            "test_loss" in r for r in chosen_runs(results)):
        return "test", "test_loss", "finetune_test_loss"
    return "validation", "final_val_loss", "finetune_val_loss"


def _number(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _difference(a: Any, b: Any) -> float | None:
    a, b = _number(a), _number(b)
    return None if a is None or b is None else a - b


def recovered_share(base: float | None, run: float | None, full: float | None) -> float | None:
    """(base − run) / (base − full): 1 = all of full fine-tuning's gain, 0 = none; None if full gained nothing."""
    if base is None or run is None or full is None or base - full <= 0:
        return None
    return (base - run) / (base - full)


def _full_run(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((r for r in runs if r["mode"] == "full"), None)


def compare_runs(results: dict[str, Any]) -> dict[str, Any]:
    """Every chosen run against full fine-tuning, on the split of ``loss_split``.

    Returns {"split", "base": the base's loss, "full": full fine-tuning's method (or None), "rows": one per chosen
    run}: each row holds "method", "mode", "trainable", "lr" (chosen), "interior" (True: a tried rate on both
    sides; False: at the edge of the grid; None: not searched), "grid", "loss", "gap" (loss − full's loss, in nats:
    the absolute number every ratio needs next to it), "recovered" (share of full's gain over the base),
    "forgotten" (loss on the pretraining text − the base's), "val_loss_unseen", "peak_mib" and "step_seconds"."""
    split, key, base_key = loss_split(results)
    runs, search = chosen_runs(results), results.get("lr_search", {})
    base, full = _number(results["base"][base_key]), _full_run(runs)
    full_loss = _number(full[key]) if full else None
    rows = []
    for r in runs:
        loss, found = _number(r[key]), search.get(method(r), {})
        peak = r.get("memory", {}).get("measured", {}).get("peak")
        rows.append({"method": method(r), "mode": r["mode"], "trainable": r["trainable"], "lr": r["lr"],
                     "interior": found.get("interior"), "grid": found.get("grid", [r["lr"]]), "loss": loss,
                     "gap": _difference(loss, full_loss), "recovered": recovered_share(base, loss, full_loss),
                     "forgotten": _difference(r.get("pretrain_val_loss"), results["base"].get("pretrain_val_loss")),
                     "val_loss_unseen": _number(r.get("val_loss_unseen")),
                     "peak_mib": peak / 2**20 if peak is not None else None,
                     "step_seconds": _number(r.get("step_seconds"))})
    return {"split": split, "base": base, "full": method(full) if full else None, "rows": rows}


def _f(v: float | None, fmt: str = ".3f") -> str:
    return "–" if v is None else format(v, fmt)


def markdown_table(results: dict[str, Any]) -> str:
    """The table the command line prints: per chosen run its loss on the new task, the gap to full fine-tuning in
    nats next to the share of full's gain it recovers, the learning rate chosen († at the edge of the grid), what
    it forgot, and its cost."""
    cmp = compare_runs(results)
    split, base = cmp["split"], cmp["base"]
    full_loss = next((row["loss"] for row in cmp["rows"] if row["method"] == cmp["full"]), None)
    lines = [f"| run | trainable | lr | {split} loss | gap to full (nats) | share of full's gain | forgot (nats) | "
             f"unseen-char loss | peak MiB | s/step |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| base (no fine-tuning) | 0 | – | {_f(base)} | {_f(_difference(base, full_loss), '+.3f')} | 0 | 0 | "
             f"{_f(_number(results['base'].get('val_loss_unseen')))} | – | – |"]
    for row in cmp["rows"]:
        edge = "†" if row["interior"] is False else ""
        lines.append(f"| {row['method']} | {row['trainable']:,} | {row['lr']:g}{edge} | {_f(row['loss'])} | "
                     f"{_f(row['gap'], '+.3f')} | {_f(row['recovered'], '.2f')} | {_f(row['forgotten'], '+.3f')} | "
                     f"{_f(row['val_loss_unseen'])} | {_f(row['peak_mib'], '.1f')} | {_f(row['step_seconds'])} |")
    if any(row["interior"] is False for row in cmp["rows"]):
        lines.append("\n† chosen at the edge of the rates tried: the best rate may lie beyond it")
    return "\n".join(lines)


# -- learned vs forgotten (Biderman et al. 2024, "LoRA Learns Less and Forgets Less") -------------------------------


def forgetting_summary(results: dict[str, Any]) -> dict[str, Any]:
    """Learned and forgotten for every chosen run, and the paper's comparison: does full fine-tuning learn more AND
    forget more than the best LoRA run?

    learned = the base's loss on the new task − the run's (test split where there is one, see ``loss_split``);
    forgotten = the run's loss on the base's held-out pretraining text − the base's. Both in nats per character;
    learned > 0 is better on the new task, forgotten > 0 is worse on the old one. The best LoRA run is the plain
    LoRA run (adapters only, no ``modules_to_save``) that learned the most.

    Returns {"split", "runs": [{"method", "mode", "rank", "rslora", "targets", "modules_to_save", "learned",
    "forgotten"}], "full", "best_lora" (methods, or None), "full_learns_more", "full_forgets_more" and
    "learns_more_forgets_more" (bools, or None where a number is missing)}. A ValueError for results without the
    losses on the pretraining text (results written before they were measured)."""
    base_pre = _number(results["base"].get("pretrain_val_loss"))
    if base_pre is None:
        raise ValueError("these results hold no loss on the pretraining text (pretrain_val_loss): rerun the "
                         "experiment to measure forgetting")
    split, key, base_key = loss_split(results)
    base = results["base"][base_key]
    runs = [{"method": method(r), "mode": r["mode"], "rank": r.get("rank"), "rslora": bool(r.get("rslora")),
             "targets": r.get("targets"), "modules_to_save": list(r.get("modules_to_save") or []),
             "learned": _difference(base, r[key]), "forgotten": _difference(r.get("pretrain_val_loss"), base_pre)}
            for r in chosen_runs(results)]
    full = _full_run(runs)
    lora = [r for r in runs if r["mode"] == "lora" and not r["modules_to_save"] and r["learned"] is not None]
    best = max(lora, key=lambda r: r["learned"]) if lora else None

    def more(field: str) -> bool | None:
        if full is None or best is None or full[field] is None or best[field] is None:
            return None
        return full[field] > best[field]

    learns, forgets = more("learned"), more("forgotten")
    return {"split": split, "runs": runs, "full": full["method"] if full else None,
            "best_lora": best["method"] if best else None, "full_learns_more": learns, "full_forgets_more": forgets,
            "learns_more_forgets_more": None if learns is None or forgets is None else learns and forgets}


def format_forgetting(summary: dict[str, Any]) -> str:
    """``forgetting_summary`` in words, for the command line: one line per run, then the comparison."""
    lines = [f"{'run':<24} {'learned':>8} {'forgotten':>10}   (nats/char; learned on the {summary['split']} split, "
             f"forgotten on the pretraining text)"]
    for r in summary["runs"]:
        lines.append(f"{r['method']:<24} {_f(r['learned'], '+.3f'):>8} {_f(r['forgotten'], '+.3f'):>10}")
    verdict = summary["learns_more_forgets_more"]
    if verdict is None:
        lines.append("no comparison: these results lack full fine-tuning, a plain LoRA run or one of their numbers")
    else:
        by = {r["method"]: r for r in summary["runs"]}
        full, best = by[summary["full"]], by[summary["best_lora"]]
        lines.append(f"full fine-tuning learned {full['learned']:+.3f} and forgot {full['forgotten']:+.3f}; the best "
                     f"LoRA run ({best['method']}) learned {best['learned']:+.3f} and forgot {best['forgotten']:+.3f}: "
                     + ("full fine-tuning learns more and forgets more, as Biderman et al. 2024 report"
                        if verdict else
                        f"full fine-tuning {'learns more' if summary['full_learns_more'] else 'does not learn more'} "
                        f"and {'forgets more' if summary['full_forgets_more'] else 'does not forget more'}, "
                        "unlike the 'learns less, forgets less' of Biderman et al. 2024"))
    return "\n".join(lines)
