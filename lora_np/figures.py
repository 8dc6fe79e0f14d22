"""The figures of the experiments, drawn from their results dictionaries (as written to ``results/*.json``).

Each figure function takes the results and a folder, writes one PNG and returns its path. ``draw(results, out)``
draws every figure the results hold the data for (decided from the runs themselves, not from a file name), so
every figure in ``figures/`` can be redrawn from a committed results file:
``python -m lora_np figures --results results/sweep.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure

MIB = 2**20


STYLE = {"font.size": 12, "axes.grid": True, "grid.alpha": 0.3}


def _figure(ncols: int = 1, figsize: tuple[float, float] = (7, 4.5), **kw: Any) -> tuple[Any, Any]:
    """A matplotlib Figure made without pyplot: no GUI backend is touched, so drawing files from a notebook
    does not change its inline plotting."""
    fig = Figure(figsize=figsize, dpi=110)
    return fig, fig.subplots(1, ncols, **kw)


def _lora_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The plain LoRA runs of the rank sweep (no extra trained modules), in rank order."""
    runs = [r for r in results["runs"] if r["mode"] == "lora" and not r["modules_to_save"]]
    return sorted(runs, key=lambda r: r["rank"])


def _lora_label(runs: list[dict[str, Any]]) -> str:
    """'LoRA on q, v' (or whatever the runs adapted)."""
    return f"LoRA on {runs[0]['targets'].replace(',', ', ')}" if runs else "LoRA"


def _run(results: dict[str, Any], mode: str, extra: bool = False) -> dict[str, Any] | None:
    for r in results["runs"]:
        if r["mode"] == mode and bool(r["modules_to_save"]) == extra:
            return r
    return None


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    return path


@matplotlib.rc_context(STYLE)
def params_vs_rank(results: dict[str, Any], out: Path) -> Path:
    """Trainable parameters vs rank: one d x d layer (2dr vs d²) and the whole model (LoRA vs full)."""
    d = results["config"]["model"]["n_embd"]
    runs = _lora_runs(results)
    ranks = [r["rank"] for r in runs]
    fig, (ax1, ax2) = _figure(2, (12, 4.5))
    rs = [2**k for k in range(0, max(d.bit_length() - 1, 1) + 1)]
    ax1.plot(rs, [2 * d * r for r in rs], "o-", label="LoRA: 2·d·r")
    ax1.axhline(d * d, color="k", ls="--", label=f"full: d² = {d * d:,}")
    ax1.set(xscale="log", yscale="log", xlabel="rank r", ylabel="trainable parameters",
            title=f"one {d}×{d} layer")
    ax1.set_xticks(rs, [str(r) for r in rs])
    ax1.legend()
    full = _run(results, "full")
    ax2.plot(ranks, [r["trainable"] for r in runs], "o-", label=_lora_label(runs))
    if full:
        ax2.axhline(full["trainable"], color="k", ls="--", label=f"full fine-tuning: {full['trainable']:,}")
    ax2.set(xscale="log", yscale="log", xlabel="rank r", ylabel="trainable parameters", title="whole model")
    ax2.set_xticks(ranks, [str(r) for r in ranks])
    ax2.legend()
    return _save(fig, out / "params_vs_rank.png")


@matplotlib.rc_context(STYLE)
def loss_curves(results: dict[str, Any], out: Path) -> Path:
    """Training and validation loss during fine-tuning, one line per rank plus full fine-tuning."""
    fig, (ax1, ax2) = _figure(2, (14, 4.8), sharey=True)
    runs = _lora_runs(results)
    cmap = matplotlib.colormaps["viridis"]
    styled = [(r, {"color": cmap(i / max(len(runs) - 1, 1)), "label": f"LoRA r={r['rank']}"})
              for i, r in enumerate(runs)]
    for r, extra in ((_run(results, "full"), {"color": "k", "ls": "--", "label": "full fine-tuning"}),
                     (_run(results, "lora", True), {"color": "tab:red", "ls": ":", "label": "LoRA + wte, lm_head"})):
        if r:
            styled.append((r, extra))
    for r, style in styled:
        h = r["history"]
        ax1.plot(h["steps"], h["train_loss"], **style)
        ax2.plot(h["steps"], h["val_loss"], **style)
    base = results["base"]["finetune_val_loss"]
    ax2.axhline(base, color="gray", lw=1, label=f"base model (no fine-tuning): {base:.2f}")
    ax1.set(xlabel="step", ylabel="loss (nats per character)", title="training loss (mean since last eval)")
    ax2.set(xlabel="step", title="validation loss")
    ax2.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _save(fig, out / "loss_curves.png")


@matplotlib.rc_context(STYLE)
def val_loss_vs_rank(results: dict[str, Any], out: Path) -> Path:
    """Final validation loss vs rank, with full fine-tuning and the base model as horizontal lines."""
    runs = _lora_runs(results)
    fig, ax = _figure()
    ax.plot([r["rank"] for r in runs], [r["final_val_loss"] for r in runs], "o-", label=_lora_label(runs))
    full, extra = _run(results, "full"), _run(results, "lora", True)
    if full:
        ax.axhline(full["final_val_loss"], color="k", ls="--", label=f"full fine-tuning: {full['final_val_loss']:.3f}")
    if extra:
        ax.plot([extra["rank"]], [extra["final_val_loss"]], "s", color="tab:red", ms=9,
                label=f"LoRA r={extra['rank']} + wte, lm_head: {extra['final_val_loss']:.3f}")
    ax.axhline(results["base"]["finetune_val_loss"], color="gray", lw=1, label="base model")
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["rank"] for r in runs], [str(r["rank"]) for r in runs])
    ax.set(xlabel="rank r", ylabel="validation loss (nats per character)", title="final validation loss vs rank")
    ax.legend(fontsize=9)
    return _save(fig, out / "val_loss_vs_rank.png")


MEMORY_CATEGORIES = ("weights", "gradients", "optimizer", "activations", "scratch")


@matplotlib.rc_context(STYLE)
def memory_by_mode(results: dict[str, Any], out: Path) -> Path:
    """Peak training memory by mode, stacked by ledger category: analytic next to measured. The measured bar also
    holds ``scratch`` (backward's temporaries, which the ledger does not predict), so its top is the measured peak."""
    picks = [r for r in results["runs"] if "memory" in r]
    fig, ax = _figure(1, (max(8, 1.2 * len(picks) + 4), 5.5))
    colors = dict(zip(MEMORY_CATEGORIES, ("tab:blue", "tab:orange", "tab:green", "tab:gray", "silver")))
    for i, r in enumerate(picks):
        for j, kind in enumerate(("analytic", "measured")):
            bottom = 0.0
            for cat in MEMORY_CATEGORIES:
                v = r["memory"][kind].get(cat, 0) / MIB
                ax.bar(i + (j - 0.5) * 0.38, v, 0.36, bottom=bottom, color=colors[cat],
                       hatch="//" if kind == "measured" else None, edgecolor="white",
                       label=cat if i == 0 and j == 1 else None)
                bottom += v
    ax.set_xticks(range(len(picks)), [r["name"] for r in picks], rotation=30, ha="right")
    batch = picks[0]["memory"]["batch_size"] if picks else "?"
    ax.set(ylabel="MiB", title=f"memory of one training step, batch {batch} (left: analytic, right hatched: measured)")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, out / "memory_by_mode.png")


@matplotlib.rc_context(STYLE)
def step_time(results: dict[str, Any], out: Path) -> Path:
    """Seconds per training step and tokens per second, by rank, with full fine-tuning for reference."""
    runs = _lora_runs(results)
    full = _run(results, "full")
    fig, (ax1, ax2) = _figure(2, (12, 4.5))
    ranks = [r["rank"] for r in runs]
    for ax, key, ylabel in ((ax1, "step_seconds", "seconds per step"), (ax2, "tokens_per_s", "tokens per second")):
        ax.plot(ranks, [r[key] for r in runs], "o-", label=_lora_label(runs))
        if full:
            ax.axhline(full[key], color="k", ls="--", label="full fine-tuning")
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set(xlabel="rank r", ylabel=ylabel, ylim=(0, None))
        ax.legend()
    ax1.set_title(f"training step time ({results['machine']['cores']} CPU cores, {results['machine']['backend']})")
    ax2.set_title("training throughput")
    return _save(fig, out / "step_time.png")


@matplotlib.rc_context(STYLE)
def targets(results: dict[str, Any], out: Path) -> Path:
    """Final validation loss by which weights are adapted, at one budget of trainable parameters."""
    runs = results["runs"]
    fig, ax = _figure(1, (10, 4.5))
    labels = [f"{' + '.join(r['targets'].split(','))}\nr = {r['rank']}" for r in runs]
    bars = ax.bar(range(len(runs)), [r["final_val_loss"] for r in runs], color="tab:blue")
    ax.bar_label(bars, fmt="%.3f", fontsize=9)
    ax.set_xticks(range(len(runs)), labels, fontsize=9)
    low = min(r["final_val_loss"] for r in runs)
    ax.set_ylim(0.9 * low, None)
    ax.set(xlabel="adapted weight matrices of every block, and the rank", ylabel="final validation loss (nats/char)",
           title=f"which weights to adapt, {runs[0]['trainable']:,} trainable parameters each")
    return _save(fig, out / "targets.png")


@matplotlib.rc_context(STYLE)
def accuracy_vs_parameters(results: dict[str, Any], out: Path) -> Path:
    """The MiniLM lab: test accuracy against trainable parameters (log x), one point per method, LoRA on q, v as a
    line over its ranks, chance as a horizontal line."""
    runs = results["runs"]
    fig, ax = _figure(1, (8, 4.8))
    qv = sorted([r for r in runs if r["mode"] == "lora" and r["targets"] == "q,v"], key=lambda r: r["rank"])
    if qv:
        ax.plot([r["trainable"] for r in qv], [100 * r["test_accuracy"] for r in qv], "o-", color="tab:blue",
                label="LoRA on q, v")
        for r in qv:
            ax.annotate(f"r={r['rank']}", (r["trainable"], 100 * r["test_accuracy"]), textcoords="offset points",
                        xytext=(4, -12), fontsize=9)
    marks = {"probe": ("s", "tab:green", "linear probe (head only)"), "full": ("D", "k", "full fine-tuning")}
    for r in runs:
        if r["mode"] in marks:
            m, c, text = marks[r["mode"]]
        elif r not in qv:
            m, c, text = "^", "tab:red", f"LoRA r={r['rank']} on {r['targets'].replace(',', ', ')}"
        else:
            continue
        ax.plot([r["trainable"]], [100 * r["test_accuracy"]], m, color=c, ms=8, label=text)
    ax.axhline(100 * results["base"]["chance"], color="gray", lw=1, ls=":", label="chance")
    ax.set_xscale("log")
    ax.set_ylim(0, None)
    ax.set(xlabel="trainable parameters (head included)", ylabel="test accuracy (%)",
           title=f"all-MiniLM-L6-v2: genre of a Bible verse, {results['config']['steps']} steps each")
    ax.legend(fontsize=9, loc="best")
    return _save(fig, out / "minilm_accuracy.png")


def _classifies(results: dict[str, Any]) -> bool:
    """A classification lab (the MiniLM one): every run has a test accuracy."""
    return bool(results["runs"]) and all("test_accuracy" in r for r in results["runs"])


def _language_model(results: dict[str, Any]) -> bool:
    """A language-model experiment (sweep, targets): every run has a validation loss."""
    return all("final_val_loss" in r for r in results["runs"])


def _has_rank_series(results: dict[str, Any]) -> bool:
    """Plain LoRA runs at two or more ranks on the same targets: the rank figures have a line to draw."""
    by_targets: dict[str, set[int]] = {}
    for r in _lora_runs(results):
        by_targets.setdefault(r["targets"], set()).add(r["rank"])
    return any(len(ranks) > 1 for ranks in by_targets.values())


def _has_target_choices(results: dict[str, Any]) -> bool:
    """LoRA runs that adapt two or more different sets of weights: the which-weights figure has bars to draw."""
    return len({r["targets"] for r in _lora_runs(results)}) > 1


def _lm(has_data: Any) -> Any:
    """``has_data`` for a language-model figure: only where the results are a language-model experiment's."""
    return lambda results: _language_model(results) and has_data(results)


def _has_memory(results: dict[str, Any]) -> bool:
    return any("memory" in r for r in results["runs"])


# (figure, does the results dict hold what it needs?) in drawing order
FIGURES = ((params_vs_rank, _lm(_has_rank_series)), (loss_curves, _lm(_has_rank_series)),
           (val_loss_vs_rank, _lm(_has_rank_series)), (memory_by_mode, _lm(_has_memory)),
           (step_time, _lm(_has_rank_series)), (targets, _lm(_has_target_choices)),
           (accuracy_vs_parameters, _classifies))


def drawable(results: Any) -> list[Any]:
    """The figure functions that ``results`` holds the data for; a ValueError if it is not a results dict of
    lora_np or no figure can be drawn from it."""
    runs = results.get("runs") if isinstance(results, dict) else None
    if not isinstance(runs, list) or not all(isinstance(r, dict) and "mode" in r for r in runs) or (
            "base" not in results or "config" not in results):
        raise ValueError("not a results file of lora_np (expected 'config', 'base' and 'runs')")
    todo = [f for f, has_data in FIGURES if has_data(results)]
    if not todo:
        raise ValueError("these results hold no runs that any figure draws")
    return todo


def draw(results: dict[str, Any], out: str | Path) -> list[Path]:
    """Every figure that ``results`` holds the data for, written to the folder ``out``; returns their paths."""
    return [f(results, Path(out)) for f in drawable(results)]
