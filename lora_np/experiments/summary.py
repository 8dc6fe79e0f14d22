"""Reading the results of ``runs.run_experiment`` (the sweep, the which-weights experiment): the run each method's
learning-rate search chose, a table of every chosen run against full fine-tuning, and learned vs forgotten.

Pure functions of the results dict (as written to ``results/*.json``): nothing here trains, draws or writes. They
also read results written before the learning-rate search: a row without "chosen" was its method's only run, and
counts as chosen; without a test split, the validation loss stands in for the test loss (and the tables say so).

The last part reads every experiment's results at once: ``practice_evidence`` derives, from the course's committed
results files (``read_practice_results``), the measured evidence behind each recommendation for choosing r, α, the
learning rate and the targets, and ``practice_table`` renders it (README, notebook 09).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Iterator
from pathlib import Path
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


# -- choosing r, α, the learning rate and the targets, in practice (issue 16) -------------------------------------
#
# Every experiment of the course chose its learning rates on validation and ran LoRA at several ranks, scalings and
# placements. ``practice_evidence`` reads them all and derives, for each recommendation a student can take to a
# next project, what this repository measured for it; nothing in the table is typed by hand. A file that is missing,
# or that lacks what a row needs, makes the row say "not measured here" instead of guessing.

PRACTICE_FILES = {  # name -> path under results/: the committed results the practice table reads
    "sweep": "sweep.json",  # LoRA on q, v at r = 1..64 (α/r and α/√r), full fine-tuning, q, v in full
    "targets": "targets.json",  # which matrices to adapt, at one budget of trainable parameters
    "all-linear": "all-linear/results/sweep.json",  # the sweep again with LoRA on all six linears
    "study": "study.json",  # three tasks at increasing distance; rsLoRA on the middle one
    "planted": "planted.json",  # a planted update of known rank k, in known matrices
    "minilm": "minilm.json",  # a real pretrained encoder (MiniLM): only its chosen rates are read
}
ALL_LINEAR = {"q", "k", "v", "o", "up", "down"}
MINILM_KEYS = ("mode", "lr", "rank", "targets")  # what every row of minilm.json's "runs" must hold to be read

PRACTICE_LITERATURE = {
    "lr": "Schulman et al. 2025, “LoRA Without Regret” (Thinking Machines Lab): LoRA's best rate is about 10× full "
          "fine-tuning's",
    "search": "Hu et al. 2021, App. D: the learning rate is swept for every task",
    "alpha": "Hu et al. 2021 §4.1: with Adam, tuning α is like tuning the rate, so α is set to the first r tried and "
             "not tuned; α = 2r at that first r is a practitioners' habit (Raschka 2023)",
    "rslora": "Kalajdzievski 2023 (rsLoRA, arXiv 2312.03732): with α/r high ranks stop improving at one rate; α/√r "
              "keeps them learning",
    "rank": "Hu et al. 2021 Table 6: r = 1–8 on q, v rivals full fine-tuning on GPT-3; Dettmers et al. 2023 (QLoRA): "
            "with every linear adapted, r hardly matters",
    "targets": "Dettmers et al. 2023 (QLoRA) §4: LoRA on every linear layer of the block is needed to match full "
               "fine-tuning; Schulman et al. 2025: the MLPs matter most",
    "budget": "Hu et al. 2021 Table 5: at one budget, W_q, W_v at r = 4 or all four attention matrices at r = 2 "
              "beat any one matrix at r = 8",
    "embeddings": "peft's `modules_to_save`; Chen et al. 2023 (LongLoRA): trainable embeddings and norms close "
                  "LoRA's gap on long contexts",
}


def read_practice_results(results_dir: str | Path) -> dict[str, dict[str, Any] | None]:
    """Every file of ``PRACTICE_FILES`` under ``results_dir``, parsed; None for a file that is not there."""
    folder = Path(results_dir)
    return {name: json.loads((folder / path).read_text(encoding="utf-8")) if (folder / path).is_file() else None
            for name, path in PRACTICE_FILES.items()}


def _targets(t: Any) -> str:
    return ",".join(t) if isinstance(t, (list, tuple)) else str(t or "")  # "q,v" from "q,v" or ["q", "v"]


def _interior(run: dict[str, Any]) -> bool | None:
    """A run's own "interior" flag, else whether its rate lies strictly inside its "grid" (rates, or rows with
    "lr"), else None: not recorded."""
    if run.get("interior") is not None:
        return bool(run["interior"])
    grid = run.get("grid")
    rates = [_number(g.get("lr") if isinstance(g, dict) else g) for g in grid] if isinstance(grid, list) else []
    rates = [x for x in rates if x is not None]
    lr = _number(run.get("lr"))
    return None if len(rates) < 2 or lr is None else min(rates) < lr < max(rates)


def _choice(group: str, method: str, mode: str, lr: Any, **fields: Any) -> dict[str, Any]:
    """One method's chosen run, the same fields for every experiment: "loss" is the number that is better lower
    (test loss, or KL to the teacher), None where the experiment measures something else."""
    return {"group": group, "method": method, "mode": mode, "lr": _number(lr), "interior": None, "loss": None,
            "trainable": None, "rank": None, "targets": "", "rslora": False, "modules": (), "alpha": None,
            "wrong": False, "share": None} | fields


def _read_runs(results: dict[str, Any]) -> dict[str, Any]:
    """sweep, targets, all-linear: the chosen run of every method (``compare_runs``) with its LoRA setup."""
    choices = [_choice("", row["method"], row["mode"], row["lr"], interior=row["interior"], loss=row["loss"],
                       trainable=row["trainable"], rank=r.get("rank"), targets=_targets(r.get("targets")),
                       rslora=bool(r.get("rslora")), modules=tuple(r.get("modules_to_save") or ()),
                       alpha=_number(r.get("alpha")))
               for r, row in zip(chosen_runs(results), compare_runs(results)["rows"])]
    unseen = results.get("unseen_chars")
    return {"choices": choices, "unseen": len(unseen) if isinstance(unseen, (str, list)) else None}


def _read_study(study: dict[str, Any]) -> dict[str, Any]:
    """The task-distance study: the chosen run of every method on every task, and rsLoRA against α/r."""
    choices = [_choice(r["task"], r["method"], r["mode"], r["lr"],
                       interior=study["tasks"][r["task"]]["lr_interior"].get(r["method"]), loss=_number(r["test_loss"]),
                       trainable=r["trainable"], rank=r.get("rank"), targets=_targets(r.get("targets")),
                       rslora=bool(r.get("rslora")), modules=tuple(r.get("modules_to_save") or ()),
                       alpha=_number(r.get("alpha")))
               for r in study["runs"] if r.get("part") == "grid" and r.get("chosen")]
    rs = study.get("rslora")
    if rs:  # at the highest rank both scalings ran: each at its own searched rate, and both at one rate
        own, one = rs["own_lr"], rs["test_loss"]
        r = max(set(own["lora"]) & set(own["rslora"]), key=int)
        rs = {"task": rs["task"], "rank": int(r), "own": own["rslora"][r]["test_loss"] - own["lora"][r]["test_loss"],
              "lr": rs["lr"], "one": one["rslora"][r] - one["lora"][r]}
    return {"choices": choices, "rslora": rs}


def _read_planted(planted: dict[str, Any]) -> dict[str, Any]:
    """The planted-rank experiment: every method per teacher at its chosen rate, "loss" = mean KL to the teacher."""
    modes = {(r["placement"], r["method"]): r["mode"] for r in planted["runs"]}
    choices = []
    for placement, p in planted["placements"].items():
        for name, m in p["methods"].items():
            mode = modes[(placement, name)]
            wrong = mode == "lora" and set(_targets(m["targets"]).split(",")) != set(_targets(p["targets"]).split(","))
            choices.append(_choice(placement, name, mode, m["lr"], interior=m.get("interior"),
                                   loss=_number(m["kl"]["mean"]), share=_number(m["kl_share"]["mean"]),
                                   trainable=m["trainable"], rank=m["rank"], targets=_targets(m["targets"]),
                                   alpha=_number(planted["config"].get("alpha")), wrong=wrong))
    return {"choices": choices, "k": planted["config"]["k"]}


def _read_minilm(minilm: dict[str, Any]) -> dict[str, Any]:
    """The MiniLM lab: the chosen rate of every method (rows with "mode", "lr", "rank", "targets"; the seeds of one
    method at its chosen rate count once). Its accuracies are not losses, so "loss" stays None."""
    runs = minilm.get("runs")
    if not isinstance(runs, list) or not runs or not all(
            isinstance(r, dict) and all(k in r for k in MINILM_KEYS) for r in runs):
        raise ValueError(f"its rows lack one of {', '.join(MINILM_KEYS)}")
    choices, seen = [], set()
    for r in runs:
        key = (r["mode"], r["rank"], _targets(r["targets"]), r["lr"])
        if r.get("chosen", True) and r["mode"] in ("probe", "lora", "full") and key not in seen:
            seen.add(key)
            choices.append(_choice("", r.get("name") or r["mode"], r["mode"], r["lr"], interior=_interior(r),
                                   rank=r["rank"], targets=_targets(r["targets"])))
    return {"choices": choices}


_READERS = {"sweep": _read_runs, "targets": _read_runs, "all-linear": _read_runs, "study": _read_study,
            "planted": _read_planted, "minilm": _read_minilm}


def _read(name: str, results: dict[str, Any] | None) -> tuple[dict[str, Any] | None, str]:
    """(what the rows read from one experiment, "") or (None, why it is not measured here)."""
    if results is None:
        return None, "no results file"
    try:
        return _READERS[name](results), ""
    except KeyError as e:
        return None, f"its results lack {e}"
    except (TypeError, AttributeError, ValueError) as e:
        return None, str(e) if isinstance(e, ValueError) else f"unreadable: {e}"


def _groups(choices: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for c in choices:
        out.setdefault(c["group"], []).append(c)
    return out


def _full(choices: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((c for c in choices if c["mode"] == "full"), None)


def _plain(c: dict[str, Any]) -> bool:
    """LoRA with α/r on the matrices it was meant for, nothing else trained: the runs a rank series compares."""
    return c["mode"] == "lora" and not c["rslora"] and not c["modules"] and not c["wrong"] and c["rank"] is not None


def _series(choices: list[dict[str, Any]], min_ranks: int = 2,
            longest: bool = False) -> list[tuple[str, str, list[dict[str, Any]]]]:
    """Per group, per target set: (group, targets, the plain LoRA runs by ascending rank), where there are at least
    ``min_ranks``; with ``longest``, per group only the target set tried at the most ranks."""
    out = []
    for group, cs in _groups(choices).items():
        by_targets: dict[str, list[dict[str, Any]]] = {}
        for c in cs:
            if _plain(c) and c["loss"] is not None:
                by_targets.setdefault(c["targets"], []).append(c)
        found = [(group, t, sorted(s, key=lambda c: c["rank"])) for t, s in by_targets.items() if len(s) >= min_ranks]
        if longest and found:
            found = [max(found, key=lambda f: len(f[2]))]  # the first of the longest
        out += found
    return out


def _where(name: str, group: str) -> str:
    return name if not group else f"{name} {group}" + (" teacher" if name == "planted" else "")


def _short(targets: str) -> str:
    return "every linear" if set(targets.split(",")) == ALL_LINEAR else targets


def _x(v: float) -> str:
    return f"×{v:.2g}"


def _span(values: list[float], fmt: str = "g") -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if lo == hi else f"{lo:{fmt}}–{hi:{fmt}}"


def _row(choice: str, advice: str, parts: list[str], measured: dict[str, Any], literature: str) -> dict[str, Any]:
    return {"choice": choice, "advice": advice, "evidence": "; ".join(parts) if parts else "not measured here",
            "measured": measured, "literature": PRACTICE_LITERATURE[literature]}


def _available(read: dict[str, tuple[dict[str, Any] | None, str]], names: Iterable[str]) -> Iterator[tuple[str, Any]]:
    """(name, evidence) of each of ``names`` whose results file was read; ``_unread`` says why the others were not."""
    return ((n, read[n][0]) for n in names if read[n][0] is not None)


def _unread(read: dict[str, tuple[dict[str, Any] | None, str]], names: tuple[str, ...]) -> list[str]:
    return [f"{n}: not measured here ({read[n][1]})" for n in names if read[n][0] is None]


def _lr_ratio_row(read: dict[str, tuple[dict[str, Any] | None, str]]) -> dict[str, Any]:
    parts, measured, every = [], {}, []
    for name, got in _available(read, read):
        ratios, edges = [], 0
        for cs in _groups(got["choices"]).values():
            full = _full(cs)
            if full is None or not full["lr"]:
                continue
            lora = [c for c in cs if c["mode"] == "lora" and c["lr"]]
            ratios += [c["lr"] / full["lr"] for c in lora]
            edges += sum(c["interior"] is False for c in lora) + (bool(lora) and full["interior"] is False)
        if ratios:
            measured[name], every = ratios, every + ratios
            edge = f"; {edges} of these choices at the edge of their grid" if edges else ""
            spread = f"–{_x(max(ratios))} (median {_x(statistics.median(ratios))}, " if max(ratios) > min(ratios) \
                else " ("
            parts.append(f"{name} {_x(min(ratios))}{spread}{len(ratios)} runs{edge})")
    if every:
        measured["above"], measured["runs"] = sum(r > 1 for r in every), len(every)
        measured["median"] = statistics.median(every)
        parts = [f"LoRA's chosen rate ÷ full fine-tuning's, in each experiment with both: above 1 in "
                 f"{measured['above']} of {len(every)} runs, median {_x(measured['median'])}"] + parts
    return _row("learning rate", "Give LoRA its own rate search, centred 3–10× above full fine-tuning's rate (with "
                "α/r and Adam)", parts + _unread(read, tuple(read)), measured, "lr")


def _interior_row(read: dict[str, tuple[dict[str, Any] | None, str]]) -> dict[str, Any]:
    parts, measured = [], {}
    for name, got in _available(read, read):
        known = [c for c in got["choices"] if c["interior"] is not None]
        if not known:
            parts.append(f"{name}: not recorded")
            continue
        inside = sum(c["interior"] for c in known)
        measured[name] = (inside, len(known))
        edges: dict[str, int] = {}
        for c in known:
            if not c["interior"]:
                edges[c["mode"]] = edges.get(c["mode"], 0) + 1
        at_edge = ", ".join(f"{n} {mode}" for mode, n in edges.items())
        parts.append(f"{name} {inside}/{len(known)}" + (f" (at an edge: {at_edge})" if at_edge else ""))
    if parts:
        parts[0] = "choices with a tried rate on both sides: " + parts[0]
    return _row("learning-rate search", "Choose each method's rate on validation loss, extend the grid until the "
                "choice is interior, report on a separate test split", parts + _unread(read, tuple(read)), measured,
                "search")


def _alpha_row(read: dict[str, tuple[dict[str, Any] | None, str]]) -> dict[str, Any]:
    names = ("sweep", "all-linear", "study", "planted")
    parts, measured, alphas, spreads = [], {}, set(), []
    for name, got in _available(read, names):
        alphas |= {c["alpha"] for c in got["choices"] if c["mode"] == "lora" and c["alpha"] is not None}
        for group, targets, s in _series(got["choices"], longest=True):
            lrs = [c["lr"] for c in s]
            measured[_where(name, group) + f" on {targets}"] = dict(zip([c["rank"] for c in s], lrs))
            spreads.append(max(lrs) / min(lrs))
            parts.append(f"{_where(name, group)} on {_short(targets)} r{s[0]['rank']}–{s[-1]['rank']}: {_span(lrs)}")
    if parts:
        head = f"α = {_span(sorted(alphas))} in every LoRA run; " if alphas else ""
        parts[0] = head + "the rate chosen at each rank (α/r): " + parts[0]
        measured["alpha"], measured["largest spread"] = sorted(alphas), max(spreads)
        parts.append(f"at most {_x(max(spreads))} apart across ranks")
    return _row("α", "Set α once (16 here, = 2r at r = 8) and keep it when r changes; tune the rate, not α",
                parts + _unread(read, names), measured, "alpha")


def _rslora_row(read: dict[str, tuple[dict[str, Any] | None, str]]) -> dict[str, Any]:
    names = ("sweep", "all-linear", "study")
    parts, measured = [], {}
    for name, got in _available(read, names):
        cs = [c for c in got["choices"] if c["mode"] == "lora" and not c["modules"] and c["loss"] is not None]
        plain = {(c["group"], c["targets"], c["rank"]): c for c in cs if not c["rslora"]}
        pairs = [(k, c) for c in cs if c["rslora"] and (k := (c["group"], c["targets"], c["rank"])) in plain]
        if pairs:
            (group, targets, r), c = max(pairs, key=lambda p: p[0][2])
            delta = c["loss"] - plain[(group, targets, r)]["loss"]
            measured[f"{_where(name, group)} r{r}"] = delta
            parts.append(f"{_where(name, group)} on {_short(targets)} r{r}: {delta:+.3f}")
        rs = got.get("rslora")
        if rs:
            measured[f"{name} {rs['task']} r{rs['rank']}"] = {"own": rs["own"], "one": rs["one"]}
            parts.append(f"{name} {rs['task']} r{rs['rank']}: {rs['own']:+.3f}, and {rs['one']:+.3f} with both at "
                         f"lr {rs['lr']:g}")
    if parts:
        parts[0] = "test loss, α/√r − α/r at the highest rank, each at its own rate: " + parts[0]
    return _row("α/r or α/√r", "From r ≈ 16 up, use rsLoRA's α/√r, or retune the rate per rank: with α/r a high "
                "rank's step shrinks", parts + _unread(read, names), measured, "rslora")


def _rank_row(read: dict[str, tuple[dict[str, Any] | None, str]], tol: float) -> dict[str, Any]:
    names = ("sweep", "all-linear", "study", "planted")
    parts, measured = [], {}
    for name, got in _available(read, names):
        groups = _groups(got["choices"])
        for group, targets, s in _series(got["choices"], min_ranks=3, longest=True):
            full = _full(groups[group])
            matched = next((c["rank"] for c in s if full and full["loss"] is not None and c["loss"] <= full["loss"]),
                           None)
            best = min(c["loss"] for c in s)
            enough = next(c for c in s if c["loss"] <= best + tol)
            gap = enough["loss"] - full["loss"] if full and full["loss"] is not None else None
            measured[f"{_where(name, group)} on {targets}"] = {"within tol of best": enough["rank"],
                                                               "gap to full": gap, "as good as full from": matched}
            if name == "planted":
                parts.append(f"{_where(name, group)} (k = {got['k']}): "
                             + (f"as close to the teacher as full fine-tuning from r{matched}" if matched else
                                "no rank as close as full fine-tuning"))
            else:
                parts.append(f"{_where(name, group)} on {_short(targets)}: r{enough['rank']} (of "
                             f"{', '.join(str(c['rank']) for c in s)})"
                             + (f", {gap:+.3f} to full there" if gap is not None else ""))
    if parts:
        parts[0] = f"smallest rank within {tol:g} nats of the best rank tried: " + parts[0]
    return _row("rank", "Start low (r = 8) and raise r only while a higher rank still gains: the rank needed is "
                "the rank of the update the task needs, larger for a task far from pretraining",
                parts + _unread(read, names), measured, "rank")


def _prefer(ranks: set[int], preferred: int = 8) -> int:
    return preferred if preferred in ranks else max(ranks)


def _targets_row(read: dict[str, tuple[dict[str, Any] | None, str]]) -> dict[str, Any]:
    names = ("sweep", "all-linear", "study", "planted")
    parts, measured = [], {}
    if read["sweep"][0] is not None and read["all-linear"][0] is not None:  # the same sweep on other targets
        few = {c["rank"]: c for _, _, s in _series(read["sweep"][0]["choices"], longest=True) for c in s}
        every = {c["rank"]: c for _, _, s in _series(read["all-linear"][0]["choices"], longest=True) for c in s}
        if set(few) & set(every):
            r = _prefer(set(few) & set(every))
            a, b = every[r], few[r]
            measured["sweep vs all-linear"] = {"rank": r, "delta": a["loss"] - b["loss"],
                                               "parameters": a["trainable"] / b["trainable"]}
            parts.append(f"{_short(a['targets'])} − {_short(b['targets'])} at r{r} (all-linear vs sweep): "
                         f"{a['loss'] - b['loss']:+.3f} test loss, at {_x(a['trainable'] / b['trainable'])} the "
                         f"parameters")
    study = read["study"][0]
    if study is not None:  # per task: more matrices against fewer at one rank, and at its lowest vs their highest
        by_group: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for group, targets, s in _series(study["choices"]):
            by_group.setdefault(group, {})[targets] = s
        same: dict[str, list[str]] = {}  # the text before the colon -> "task delta" of every task it fits
        cheap: dict[str, list[str]] = {}
        for group, sets in by_group.items():
            if len(sets) < 2:
                continue
            ordered = sorted(sets, key=lambda t: len(t.split(",")))
            few = {c["rank"]: c for c in sets[ordered[0]]}
            many = {c["rank"]: c for c in sets[ordered[-1]]}
            few_t, many_t = _short(ordered[0]), _short(ordered[-1])
            lo, hi = many[min(many)], few[max(few)]
            measured[f"study {group}"] = {"lowest vs highest": lo["loss"] - hi["loss"],
                                          "parameters": lo["trainable"] / hi["trainable"]}
            cheap.setdefault(f"{many_t} at r{lo['rank']} − {few_t} at r{hi['rank']} "
                             f"({_x(lo['trainable'] / hi['trainable'])} the parameters)", []).append(
                f"{group} {lo['loss'] - hi['loss']:+.3f}")
            if set(few) & set(many):
                r = _prefer(set(few) & set(many))
                measured[f"study {group}"]["same rank"] = many[r]["loss"] - few[r]["loss"]
                same.setdefault(f"{many_t} − {few_t} at r{r}", []).append(
                    f"{group} {many[r]['loss'] - few[r]['loss']:+.3f}")
        parts += [f"study, {head}: {', '.join(found)}" for head, found in (same | cheap).items()]
    planted = read["planted"][0]
    if planted is not None:
        shares = []
        for group, cs in _groups(planted["choices"]).items():
            wrong = next((c for c in cs if c["wrong"] and c["share"] is not None), None)
            right = next((c for c in cs if _plain(c) and c["rank"] == planted["k"] and c["share"] is not None), None)
            if wrong and right:
                measured[f"planted {group} teacher"] = {"wrong": wrong["share"], "right": right["share"]}
                shares.append(f"{group} teacher {100 * wrong['share']:.1f}% at r{wrong['rank']} on "
                              f"{wrong['targets']} vs {100 * right['share']:.2f}% at r{right['rank']} on "
                              f"{right['targets']}")
        if shares:
            parts.append("planted, share of the base's KL left on the wrong matrices vs the right ones: "
                         + ", ".join(shares))
    return _row("targets", "Adapt every linear layer (attention and MLP) before raising the rank: the update must "
                "lie in matrices LoRA adapts", parts + _unread(read, names), measured, "targets")


def _budget_row(read: dict[str, tuple[dict[str, Any] | None, str]]) -> dict[str, Any]:
    parts, measured = [], {}
    got = read["targets"][0]
    lora = sorted((c for c in got["choices"] if _plain(c) and c["loss"] is not None), key=lambda c: c["loss"]) \
        if got is not None else []
    if lora:
        best, worst = lora[0], lora[-1]
        single = next((c for c in lora if len(c["targets"].split(",")) == 1), None)
        full = _full(got["choices"])
        budget = _span([c["trainable"] for c in lora], ",")
        measured |= {"best": (best["targets"], best["rank"], best["loss"]), "worst": (worst["targets"], worst["rank"],
                     worst["loss"]), "budget": sorted({c["trainable"] for c in lora})}
        text = (f"targets, {budget} trainable each: best {best['targets']} at r{best['rank']} ({best['loss']:.3f}"
                + (f", {best['loss'] - full['loss']:+.3f} to full" if full and full["loss"] is not None else "") + ")")
        if single is not None and single is not best:
            measured["best single"] = (single["targets"], single["rank"], single["loss"])
            text += f"; best single matrix {single['targets']} at r{single['rank']} ({single['loss']:.3f})"
        parts.append(text + f"; worst {worst['targets']} at r{worst['rank']} ({worst['loss']:.3f})")
    return _row("targets at a fixed budget", "Spread a budget of trainable parameters as a low rank over several "
                "matrices rather than a high rank in one", parts + _unread(read, ("targets",)), measured, "budget")


def _embeddings_row(read: dict[str, tuple[dict[str, Any] | None, str]]) -> dict[str, Any]:
    names = ("sweep", "all-linear")
    parts, measured = [], {}
    for name, got in _available(read, names):
        full = _full(got["choices"])
        plain = {(c["targets"], c["rank"]): c for c in got["choices"] if _plain(c) and c["loss"] is not None}
        for c in got["choices"]:
            base = plain.get((c["targets"], c["rank"]))
            if c["mode"] == "lora" and c["modules"] and not c["rslora"] and base and c["loss"] is not None:
                delta, extra = c["loss"] - base["loss"], c["trainable"] - base["trainable"]
                gap = c["loss"] - full["loss"] if full and full["loss"] is not None else None
                measured[name] = {"delta": delta, "extra": extra, "gap to full": gap}
                parts.append(f"{name} on {_short(c['targets'])} r{c['rank']} + {', '.join(c['modules'])}: "
                             f"{delta:+.3f} test loss for {extra:+,} parameters"
                             + (f", {gap:+.3f} to full" if gap is not None else ""))
    unseen = read["sweep"][0] and read["sweep"][0].get("unseen")
    if parts and unseen:
        parts[0] = f"the new text holds {unseen} characters the base never saw; " + parts[0]
    return _row("embeddings and head", "When the new data has tokens the base never trained, train their embeddings "
                "and the head too", parts + _unread(read, names), measured, "embeddings")


def practice_evidence(results: dict[str, dict[str, Any] | None], tol: float = 0.05) -> list[dict[str, Any]]:
    """The practice table's rows, each a recommendation for choosing r, α, the learning rate or the targets, with
    what this repository's results measured for it.

    ``results`` maps the names of ``PRACTICE_FILES`` to their parsed results (``read_practice_results``); a name
    that is absent or None, or a file without what a row needs, leaves that part of the row "not measured here".
    ``tol`` (nats) is how close to the best rank a rank must come to count as enough. Every row is {"choice",
    "advice", "evidence" (the measured numbers in words), "measured" (the same numbers), "literature"}."""
    read = {name: _read(name, results.get(name)) for name in PRACTICE_FILES}
    return [_lr_ratio_row(read), _interior_row(read), _alpha_row(read), _rslora_row(read), _rank_row(read, tol),
            _targets_row(read), _budget_row(read), _embeddings_row(read)]


def practice_table(rows: list[dict[str, Any]]) -> str:
    """``practice_evidence``'s rows as the markdown table the README and notebook 09 show."""
    lines = ["| choice | do this | measured here | literature |", "|---|---|---|---|"]
    for row in rows:
        cells = (row["choice"], row["advice"], row["evidence"], row["literature"])
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
