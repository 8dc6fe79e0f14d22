"""The figures of the experiments, drawn from their results dictionaries (as written to ``results/*.json``).

Each figure function takes the results and a folder, writes one PNG and returns its path. ``draw(results, out)``
draws every figure the results hold the data for (decided from the runs themselves, not from a file name), so
every figure in ``figures/`` can be redrawn from a committed results file:
``python -m lora_np figures --results results/sweep.json``.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker
from matplotlib.figure import Figure

from .checkpoint import write_atomic
from .experiments.summary import chosen_runs, forgetting_summary, loss_split, method

MIB = 2**20


STYLE = {"font.size": 12, "axes.grid": True, "grid.alpha": 0.3}


def _figure(ncols: int = 1, figsize: tuple[float, float] = (7, 4.5), **kw: Any) -> tuple[Any, Any]:
    """A matplotlib Figure made without pyplot: no GUI backend is touched, so drawing files from a notebook
    does not change its inline plotting."""
    fig = Figure(figsize=figsize, dpi=110)
    return fig, fig.subplots(1, ncols, **kw)


def _lora_runs(results: dict[str, Any], rslora: bool | None = None) -> list[dict[str, Any]]:
    """The plain LoRA runs of the rank sweep (no extra trained modules), each at its chosen learning rate, in rank
    order: those of the config's own scaling (α/r, unless the whole sweep ran rsLoRA), or of ``rslora``."""
    if rslora is None:
        rslora = bool((results["config"].get("lora") or {}).get("rslora", False))
    runs = [r for r in chosen_runs(results) if r["mode"] == "lora" and not r["modules_to_save"]
            and bool(r.get("rslora")) == rslora]
    return sorted(runs, key=lambda r: r["rank"])


def _rslora_runs(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The sweep's rsLoRA runs (s = α/√r) next to its α/r ones; none where the rank series is rsLoRA itself."""
    main = _lora_runs(results)
    return [] if main and main[0].get("rslora") else _lora_runs(results, rslora=True)


def _partial_label(run: dict[str, Any]) -> str:
    """'q, v in full' for the control run that trains those weights fully."""
    return f"{run['targets'].replace(',', ', ')} in full (no rank limit)"


def _lora_label(runs: list[dict[str, Any]]) -> str:
    """'LoRA on q, v' (or whatever the runs adapted)."""
    return f"LoRA on {runs[0]['targets'].replace(',', ', ')}" if runs else "LoRA"


def _run(results: dict[str, Any], mode: str, extra: bool = False) -> dict[str, Any] | None:
    """The first chosen run of ``mode`` ("lora", "full", "partial"), with or without modules_to_save."""
    for r in chosen_runs(results):
        if r["mode"] == mode and bool(r["modules_to_save"]) == extra:
            return r
    return None


def _save(fig: Any, path: Path, tight: bool = True) -> Path:
    """Write the figure as a PNG, atomically (``checkpoint.write_atomic``): a full disk or a Ctrl-C never leaves a
    truncated PNG in place of the old one."""
    if tight:
        fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, format="png")
    if _rendered is not None:
        _rendered[path] = png.getvalue()
    else:
        write_atomic(path, png.getvalue())
    return path


_rendered: dict[Path, bytes] | None = None  # while ``render`` runs, the PNGs are kept here instead of written


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
    partial = _run(results, "partial")
    if partial:
        ax2.axhline(partial["trainable"], color="tab:purple", ls="-.",
                    label=f"{_partial_label(partial)}: {partial['trainable']:,}")
    ax2.set(xscale="log", yscale="log", xlabel="rank r", ylabel="trainable parameters", title="whole model")
    ax2.set_xticks(ranks, [str(r) for r in ranks])
    ax2.legend()
    return _save(fig, out / "params_vs_rank.png")


@matplotlib.rc_context(STYLE)
def loss_curves(results: dict[str, Any], out: Path) -> Path:
    """Training and validation loss during fine-tuning, one line per rank plus full fine-tuning (and the control
    run, q, v in full), each method at its chosen learning rate (the rsLoRA runs are left to ``val_loss_vs_rank``:
    two lines per rank would hide both). Every validation curve starts at step 0 at the base model's loss: ΔW = 0
    (LoRA's B = 0) or W = W0 (full fine-tuning) before the first step, so step 0 IS the base model."""
    fig, (ax1, ax2) = _figure(2, (14, 4.8), sharey=True)
    runs = _lora_runs(results)
    cmap = matplotlib.colormaps["viridis"]
    styled = [(r, {"color": cmap(i / max(len(runs) - 1, 1)), "label": f"LoRA r={r['rank']}"})
              for i, r in enumerate(runs)]
    partial = _run(results, "partial")
    for r, extra in ((_run(results, "full"), {"color": "k", "ls": "--", "label": "full fine-tuning"}),
                     (partial, {"color": "tab:purple", "ls": "-.",
                                "label": _partial_label(partial) if partial else ""}),
                     (_run(results, "lora", True), {"color": "tab:red", "ls": ":", "label": "LoRA + wte, lm_head"})):
        if r:
            styled.append((r, extra))
    base = results["base"]["finetune_val_loss"]
    for r, style in styled:
        h, style = r["history"], {**style, "label": f"{style['label']} (lr {r['lr']:g})"}
        ax1.plot(h["steps"], h["train_loss"], **style)
        ax2.plot([0, *h["steps"]], [base, *h["val_loss"]], **style)  # step 0: the base model, for every run
    ax2.plot([0], [base], "o", color="gray", ms=7, label=f"step 0 = base model: {base:.2f}")
    ax2.axhline(base, color="gray", lw=1)
    ax1.set(xlabel="step", ylabel="loss (nats per character)", title="training loss (mean since last eval)")
    ax2.set(xlabel="step", title="validation loss")
    ax2.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _save(fig, out / "loss_curves.png")


@matplotlib.rc_context(STYLE)
def val_loss_vs_rank(results: dict[str, Any], out: Path) -> Path:
    """Loss on the new task vs rank, every method at its chosen learning rate: LoRA (α/r) and rsLoRA (α/√r) as
    lines, full fine-tuning, the control run and the base model as horizontal lines. The loss is the TEST loss
    (the rates were chosen on validation); results from before the test split show the validation loss. The file
    keeps its old name, which the README links to."""
    split, key, base_key = loss_split(results)
    runs, rs = _lora_runs(results), _rslora_runs(results)
    fig, ax = _figure(1, (9, 4.8))
    ax.plot([r["rank"] for r in runs], [r[key] for r in runs], "o-", label=_lora_label(runs) + _scaling(runs))
    if rs:
        ax.plot([r["rank"] for r in rs], [r[key] for r in rs], "s--", color="tab:orange",
                label=_lora_label(rs) + _scaling(rs))
    full, extra, partial = _run(results, "full"), _run(results, "lora", True), _run(results, "partial")
    if full:
        ax.axhline(full[key], color="k", ls="--", label=f"full fine-tuning: {full[key]:.3f}")
    if partial:
        ax.axhline(partial[key], color="tab:purple", ls="-.", label=f"{_partial_label(partial)}: {partial[key]:.3f}")
    if extra:
        ax.plot([extra["rank"]], [extra[key]], "D", color="tab:red", ms=8,
                label=f"LoRA r={extra['rank']} + wte, lm_head: {extra[key]:.3f}")
    ax.axhline(results["base"][base_key], color="gray", lw=1, label=f"base model: {results['base'][base_key]:.3f}")
    ranks = sorted({r["rank"] for r in runs + rs})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set(xlabel="rank r", ylabel=f"{split} loss (nats per character)")
    ax.set_title(f"{split} loss vs rank{_rates(results)}", fontsize=11)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _save(fig, out / "val_loss_vs_rank.png")


def _rates(results: dict[str, Any]) -> str:
    """A title's note on the learning rates: chosen per method, or (results from before the search) one each."""
    return ("\neach method at the rate its validation loss chose" if "lr_search" in results else
            "\neach method at one learning rate, not searched")


def _scaling(runs: list[dict[str, Any]]) -> str:
    return (", s = α/√r" if runs[0].get("rslora") else ", s = α/r") if runs else ""


MEMORY_CATEGORIES = ("weights", "gradients", "optimizer", "activations", "scratch")


@matplotlib.rc_context(STYLE)
def memory_by_mode(results: dict[str, Any], out: Path) -> Path:
    """Peak training memory by mode, stacked by ledger category: analytic next to measured. The measured bar also
    holds ``scratch`` (backward's temporaries, which the ledger does not predict), so its top is the measured peak."""
    # rsLoRA's ledger is α/r LoRA's at the same rank (the scaling is one number): one bar pair per rank is enough
    rs = {id(r) for r in _rslora_runs(results)}
    picks = [r for r in chosen_runs(results) if "memory" in r and id(r) not in rs]
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
    ax.set_xticks(range(len(picks)), [method(r) for r in picks], rotation=30, ha="right")
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
    tokens = results["config"]["finetune"]["batch_size"] * results["config"]["model"]["block_size"]

    def spread(run: dict[str, Any], key: str) -> list[float]:
        """The run's measurement per interval between evaluations (a shared machine's load moves each one)."""
        tps = [v for v in run.get("history", {}).get("tokens_per_s", []) if v]
        return tps if key == "tokens_per_s" else [tokens / v for v in tps]

    for ax, key, ylabel in ((ax1, "step_seconds", "seconds per step"), (ax2, "tokens_per_s", "tokens per second")):
        # the median (the table's number) with bars from the lowest to the highest interval: overlapping bars are
        # differences the load made, not the method
        lows = [r[key] - min(spread(r, key), default=r[key]) for r in runs]
        highs = [max(spread(r, key), default=r[key]) - r[key] for r in runs]
        ax.errorbar(ranks, [r[key] for r in runs], [lows, highs], fmt="o-", capsize=3,
                    label=_lora_label(runs) + " (median; bars: min–max over intervals)")
        if full:
            ax.axhline(full[key], color="k", ls="--", label="full fine-tuning (median)")
            ax.axhspan(min(spread(full, key), default=full[key]), max(spread(full, key), default=full[key]),
                       color="k", alpha=0.08)
        partial = _run(results, "partial")
        if partial:
            ax.axhline(partial[key], color="tab:purple", ls="-.", label=_partial_label(partial))
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set(xlabel="rank r", ylabel=ylabel, ylim=(0, None))
        ax.legend()
    ax1.set_title(f"training step time ({results['machine']['cores']} CPU cores, {results['machine']['backend']}, "
                  "shared: noisy)")
    ax2.set_title("training throughput")
    return _save(fig, out / "step_time.png")


@matplotlib.rc_context(STYLE)
def targets(results: dict[str, Any], out: Path) -> Path:
    """Test loss by which weights are adapted, at one budget of trainable parameters, each at its chosen learning
    rate, with the base model and full fine-tuning (if the results hold it) as reference lines (results from before
    the test split: the validation loss). The y-axis starts at 0: the bars are compared by their length, and a cut
    axis would make 0.2 nats look like a factor of two."""
    split, key, base_key = loss_split(results)
    runs = _lora_runs_in_order(results)
    fig, ax = _figure(1, (10, 4.8))
    labels = [f"{' + '.join(r['targets'].split(','))}\nr = {r['rank']}\nlr {r['lr']:g}" for r in runs]
    bars = ax.bar(range(len(runs)), [r[key] for r in runs], color="tab:blue")
    ax.bar_label(bars, fmt="%.3f", fontsize=9)
    ax.set_xticks(range(len(runs)), labels, fontsize=9)
    base, full = results["base"][base_key], _run(results, "full")
    ax.axhline(base, color="gray", lw=1.5, label=f"base model (no fine-tuning): {base:.3f}")
    if full:
        ax.axhline(full[key], color="k", ls="--", lw=1.5,
                   label=f"full fine-tuning ({full['trainable']:,} trainable): {full[key]:.3f}")
    ax.set_ylim(0, 1.12 * max([base] + [r[key] for r in runs]))
    ax.set(xlabel="adapted weight matrices of every block, the rank and the chosen learning rate",
           ylabel=f"{split} loss (nats/char)",
           title=f"which weights to adapt, {runs[0]['trainable']:,} trainable parameters each")
    ax.legend(fontsize=9, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2)  # below: clear of the bar labels
    return _save(fig, out / "targets.png")


MARKERS = ("o", "v", "^", "<", ">", "p", "h", "*", "X")


@matplotlib.rc_context(STYLE)
def learned_forgotten(results: dict[str, Any], out: Path) -> Path:
    """Learned against forgotten (Biderman et al. 2024, "LoRA Learns Less and Forgets Less"), one point per
    method at its chosen learning rate (``summary.forgetting_summary``): x = the base's loss on the new task − the
    run's, y = the run's loss on the base's held-out pretraining text − the base's. The base model is (0, 0).
    LoRA is coloured by rank; its marker tells the scaling (or, in the which-weights experiment, the weights)."""
    summary = forgetting_summary(results)
    runs = [r for r in summary["runs"] if r["learned"] is not None and r["forgotten"] is not None]
    lora = [r for r in runs if r["mode"] == "lora"]
    ranks = sorted({r["rank"] for r in lora})
    cmap = matplotlib.colormaps["viridis"]
    colour = {rank: cmap(i / max(len(ranks) - 1, 1)) for i, rank in enumerate(ranks)}
    targets = list(dict.fromkeys(r["targets"] for r in lora))
    fig, ax = _figure(1, (9, 5.5))
    ax.axhline(0, color="gray", lw=1)
    ax.axvline(0, color="gray", lw=1)
    ax.plot([0], [0], "o", color="gray", ms=8, label="base model")
    for r in runs:
        if r["mode"] == "full":
            style = {"marker": "D", "color": "k", "label": "full fine-tuning"}
        elif r["mode"] == "partial":
            style = {"marker": "P", "color": "tab:purple", "label": f"{r['targets'].replace(',', ', ')} in full"}
        else:
            if len(targets) > 1:  # which weights: one marker per set of adapted weights
                marker = MARKERS[targets.index(r["targets"]) % len(MARKERS)]
                label = f"LoRA on {r['targets'].replace(',', ', ')}, r={r['rank']}"
            elif r["modules_to_save"]:
                marker, label = "s", f"LoRA r={r['rank']} + {', '.join(r['modules_to_save'])}"
            else:
                marker, label = ("^", f"rsLoRA r={r['rank']}") if r["rslora"] else ("o", f"LoRA r={r['rank']}")
            style = {"marker": marker, "color": colour[r["rank"]], "label": label}
        ax.plot([r["learned"]], [r["forgotten"]], ls="none", ms=8, mec="k", mew=0.5, **style)
    title = f"learned vs forgotten{_rates(results)}"
    verdict = summary["learns_more_forgets_more"]
    if verdict is not None:
        both = "learns more and forgets more than" if verdict else "does not both learn more and forget more than"
        title += f"\nfull fine-tuning {both} the best LoRA run ({summary['best_lora']})"
    ax.set(xlabel=f"learned: base − run, {summary['split']} loss on the new task (nats/char)",
           ylabel="forgotten: run − base,\nloss on the pretraining text (nats/char)")
    ax.set_title(title, fontsize=11)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    # the sweep's is learned_forgotten.png; another experiment's (targets) gets its name in the file's, so that the
    # two commands writing into one figures/ folder never draw over each other's
    name = "learned_forgotten" + ("" if results.get("experiment", "sweep") == "sweep" else f"_{results['experiment']}")
    return _save(fig, out / f"{name}.png")


# -- the task-distance study (``python -m lora_np study``) ---------------------------------------------------------

TASK_COLORS = {"near": "tab:green", "middle": "tab:orange", "far": "tab:red"}


def _ranks_of(recovered: dict[str, Any], prefix: str) -> list[tuple[int, Any]]:
    return sorted((int(m[len(prefix):]), v) for m, v in recovered.items() if m.startswith(prefix))


@matplotlib.rc_context(STYLE)
def task_distance(results: dict[str, Any], out: Path) -> Path:
    """The headline, by rank, one line per task (LoRA on q, v solid, on every linear dashed), on the test split:
    left, the share of full fine-tuning's gain that LoRA recovers; right, the absolute gap to full fine-tuning in
    nats/char. The share is inflated where the base is worse than a uniform guess (legend: base − ln V), the gap
    is not: read the two together."""
    from .experiments.task_distance import gaps, uniform_loss

    fig, (share_ax, gap_ax) = _figure(2, (13, 5))
    ranks: set[int] = set()
    ln_v = uniform_loss(results)
    for task, t in results["tasks"].items():
        color = TASK_COLORS.get(task)
        for prefix, style, what in (("lora-qv-r", "o-", "q, v"), ("lora-all-r", "s--", "all linear")):
            label = (f"{task}, LoRA on {what} (base {t['base_test_loss']:.2f}, base − ln V "
                     f"{t['base_test_loss'] - ln_v:+.2f})" if prefix == "lora-qv-r" else f"{task}, LoRA on {what}")
            for ax, values in ((share_ax, t["recovered"]), (gap_ax, gaps(t))):
                pts = [(r, v) for r, v in _ranks_of(values, prefix) if v is not None]
                if pts:
                    ranks |= {r for r, _ in pts}
                    ax.plot(*zip(*pts), style, color=color, label=label if ax is gap_ax else None)
    share_ax.axhline(1, color="k", lw=1, ls=":")
    share_ax.axhline(0, color="gray", lw=1)
    gap_ax.axhline(0, color="k", lw=1, ls=":", label="full fine-tuning")
    for ax in (share_ax, gap_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(ranks), [str(r) for r in sorted(ranks)])
        ax.set_xlabel("rank r")
    share_ax.set(ylabel="(base − LoRA) / (base − full), test loss",
                 title="share of full fine-tuning's gain LoRA recovers")
    gap_ax.set(ylabel="LoRA − full, test loss (nats/char)", title="gap to full fine-tuning")
    gap_ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _save(fig, out / "task_distance.png")


@matplotlib.rc_context(STYLE)
def lr_grid(results: dict[str, Any], out: Path) -> Path:
    """Final validation loss of every run of the learning-rate grids, one panel per task; the chosen learning
    rate of each method (lowest validation loss) is the filled marker."""
    tasks = list(results["tasks"])
    fig, axes = _figure(len(tasks), (5 * len(tasks), 4.5), squeeze=False)
    cmap = matplotlib.colormaps["viridis"]
    for ax, task in zip(axes[0], tasks):
        rows = [r for r in results["runs"] if r.get("task") == task and r.get("part") == "grid"]
        methods = list(dict.fromkeys(r["method"] for r in rows))
        for i, m in enumerate(methods):
            pts = sorted((r["lr"], r["final_val_loss"], r["chosen"]) for r in rows if r["method"] == m)
            color = "k" if m == "full" else cmap(i / max(len(methods) - 1, 1))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=color, lw=1, label=m)
            ax.plot([p[0] for p in pts if p[2]], [p[1] for p in pts if p[2]], "o", color=color)
            ax.plot([p[0] for p in pts if not p[2]], [p[1] for p in pts if not p[2]], "o", mfc="none", color=color)
        ax.set(xscale="log", xlabel="peak learning rate", title=f"{task}: validation loss (filled: chosen)")
    axes[0][0].set_ylabel("final validation loss (nats/char)")
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _save(fig, out / "lr_grid.png")


@matplotlib.rc_context(STYLE)
def full_rank(results: dict[str, Any], out: Path) -> Path:
    """§4.1: LoRA at full rank on every linear, embeddings and head trained too, against full fine-tuning."""
    fr = results["full_rank"]
    t = results["tasks"][fr["task"]]
    bars = [("base", fr["base_test_loss"], 0)] + [
        (m, t["test_loss"][m], t["trainable"][m]) for m in ("lora-qv-r8", "lora-all-r8") if m in t["test_loss"]] + [
        (f"LoRA r={fr['lora']['r']}, all linear\n+ {', '.join(fr['lora']['modules_to_save'])}", fr["test_loss"],
         fr["trainable"]), ("full fine-tuning", fr["full_test_loss"], fr["full_trainable"])]
    fig, ax = _figure(1, (9, 4.5))
    b = ax.bar(range(len(bars)), [v for _, v, _ in bars], color=["gray", "tab:blue", "tab:blue", "tab:purple", "k"][
        -len(bars):] if len(bars) == 5 else "tab:blue")
    ax.bar_label(b, [f"{v:.3f}\n{n:,} trained" if n else f"{v:.3f}" for _, v, n in bars], fontsize=8)
    ax.set_xticks(range(len(bars)), [n for n, _, _ in bars], fontsize=8)
    ax.set_ylim(0, 1.15 * max(v for _, v, _ in bars))  # from 0: a bar's length is its loss, never a cut-off part
    ax.set(ylabel="test loss (nats/char)", title=f"{fr['task']}: LoRA at full rank against full fine-tuning (§4.1)")
    return _save(fig, out / "full_rank.png")


@matplotlib.rc_context(STYLE)
def rslora(results: dict[str, Any], out: Path) -> Path:
    """rsLoRA (α/√r) against LoRA (α/r) on q, v across ranks: each at its own learning rate chosen on validation
    (solid, where the results have it: the fair comparison) and both at one learning rate (dotted: rsLoRA's claim
    is that one rate serves every rank)."""
    rs = results["rslora"]
    fig, ax = _figure(1, (8, 4.8))
    for kind, label, marker, color in (("lora", "LoRA, s = α/r", "o", "tab:blue"),
                                       ("rslora", "rsLoRA, s = α/√r", "s", "tab:orange")):
        if "own_lr" in rs:
            pts = sorted((int(r), o["test_loss"]) for r, o in rs["own_lr"][kind].items() if o["test_loss"] is not None)
            ax.plot(*zip(*pts), marker + "-", color=color, label=f"{label}, its own lr")
        pts = sorted((int(r), v) for r, v in rs["test_loss"][kind].items() if v is not None)
        ax.plot(*zip(*pts), marker + (":" if "own_lr" in rs else "-"), color=color, mfc="none" if "own_lr" in rs
                else color, label=f"{label}, lr {rs['lr']:g}")
    ax.axhline(rs["full_test_loss"], color="k", ls="--", label="full fine-tuning (its own best lr)")
    ax.axhline(rs["base_test_loss"], color="gray", lw=1, label="base model")
    ranks = sorted(int(r) for r in rs["test_loss"]["lora"])
    ax.set_xscale("log", base=2)
    ax.set_xticks(ranks, [str(r) for r in ranks])
    ax.set(xlabel="rank r", ylabel="test loss (nats/char)",
           title=f"{rs['task']}: rsLoRA vs LoRA on q, v, α = {rs['alpha']:g}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1))
    return _save(fig, out / "rslora.png")


@matplotlib.rc_context(STYLE)
def subspace_similarity(results: dict[str, Any], out: Path) -> Path:
    """§7.2, Fig. 3 and 4: φ(i, j) between A of r = 8 and r = 64, and between two seeds of r = 64, on W_q and W_v
    of the last block, per task; the last two columns are random Gaussian matrices of the same shapes."""
    tasks = list(results["tasks"])
    cols = [("q", "r8_vs_r64", "W_q: A r=8 vs r=64"), ("v", "r8_vs_r64", "W_v: A r=8 vs r=64"),
            ("q", "r64_seeds", "W_q: r=64, 2 seeds"), ("v", "r64_seeds", "W_v: r=64, 2 seeds"),
            ("q", "random_8_vs_64", "random (d,8), (d,64)"), ("q", "random_64_vs_64", "random (d,64), (d,64)")]
    fig, axes = _figure(len(cols), (3.3 * len(cols), 3.2 * len(tasks)), squeeze=False)
    fig.clear()
    axes = fig.subplots(len(tasks), len(cols), squeeze=False)
    for r, (row, task) in enumerate(zip(axes, tasks)):
        phi = results["tasks"][task]["analysis"]["phi"]
        for c, (ax, (w, key, title)) in enumerate(zip(row, cols)):
            m = phi[w][key]
            im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis", extent=(0.5, len(m[0]) + 0.5, len(m) + 0.5, 0.5))
            if r == 0:  # column titles once, row names once: the panels keep room for their own numbers
                ax.set_title(title, fontsize=12)
            if c == 0:
                ax.set_ylabel(f"{task}\ni", fontsize=13)
            if r == len(tasks) - 1:
                ax.set_xlabel("j", fontsize=12)
            ax.tick_params(labelsize=10)
            ax.grid(False)
    fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, label="φ(i, j)")
    return _save(fig, out / "subspace_similarity.png", tight=False)  # colorbar over all axes: no tight_layout


@matplotlib.rc_context(STYLE)
def amplification(results: dict[str, Any], out: Path) -> Path:
    """§7.3, Table 7: ‖UᵀWV‖_F with U, V the top-k directions of ΔW, of W and of a random matrix (W = W_q of the
    last block, k = r), per task and rank; under each group the amplification factor ‖ΔW‖_F / ‖UᵀWV‖_F next to
    ‖ΔW‖_F / ‖W‖_F (the factor grows with the update's size: the paper's is 0.11 at r = 4)."""
    groups = [(task, key, a) for task, t in results["tasks"].items()
              for key, a in t["analysis"]["amplification"].items() if a]
    fig, ax = _figure(1, (max(8, 1.8 * len(groups)), 5))
    for i, (_, _, a) in enumerate(groups):
        for j, (field, color, label) in enumerate((("w_on_delta_w", "tab:blue", "U, V of ΔW"),
                                                   ("w_on_w", "tab:gray", "U, V of W"),
                                                   ("w_on_random", "tab:olive", "U, V random"))):
            ax.bar(i + (j - 1) * 0.27, a[field], 0.25, color=color, label=label if i == 0 else None)
    # the numbers go under each group, with the tick labels, where they cannot run into bars or each other
    ax.set_xticks(range(len(groups)), [
        f"{task} {key}" + (f" (k = {a['k']})" if a["k"] != a.get("r", a["k"]) else "")
        + f"\nfactor {a['factor']:.1f}\n‖ΔW‖/‖W‖ {a['delta_w_norm'] / a['w_norm']:.2f}" for task, key, a in groups],
        fontsize=8)
    ax.set(yscale="log", ylabel="‖UᵀW_qV‖_F", title="how ΔW_q relates to W_q (Table 7): W projected on k directions")
    ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1))
    return _save(fig, out / "amplification.png")


@matplotlib.rc_context(STYLE)
def spectrum(results: dict[str, Any], out: Path) -> Path:
    """The normalised singular values of full fine-tuning's ΔW = W_ft − W_base, per task, one line per layer
    (W_q and W_v of every block), with the effective rank (90% of the energy) of each in the legend."""
    tasks = list(results["tasks"])
    fig, axes = _figure(len(tasks), (6 * len(tasks), 6.2), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        spectra = results["tasks"][task]["analysis"]["spectrum"]
        for name, sp in spectra.items():
            er = sp["effective_rank"]
            ax.plot(range(1, len(sp["full"]) + 1), sp["full"], lw=1,
                    label=f"{name.replace('blocks.', 'b').replace('.attn', '')}: {er['full']} "
                          f"({er['lora-r8']}, {er['lora-r64']})")
        random = sorted({sp["effective_rank"]["random"] for sp in spectra.values()})
        ax.set(yscale="log", xlabel="k", title=f"{task}: full fine-tuning's ΔW\n(a random matrix: "
               f"{'–'.join(str(v) for v in (random[0], random[-1]) if v is not None)} directions hold 90%)")
        # below the axes, in two columns: eight layers' ranks stay readable without covering the curves
        ax.legend(fontsize=10, title="directions holding 90% of the energy:\nfull FT (LoRA r = 8, r = 64)",
                  title_fontsize=10, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    axes[0][0].set_ylabel("σ_k / ‖ΔW‖_F")
    return _save(fig, out / "spectrum.png")


def _is_study(results: dict[str, Any]) -> bool:
    return isinstance(results.get("tasks"), dict)


def _lora_runs_in_order(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The plain LoRA runs at their chosen learning rates in the order they ran (the which-weights experiment's)."""
    return [r for r in chosen_runs(results) if r["mode"] == "lora" and not r["modules_to_save"]]


@matplotlib.rc_context(STYLE)
def accuracy_vs_parameters(results: dict[str, Any], out: Path) -> Path:
    """The MiniLM lab: balanced test accuracy (mean over seeds) against trainable parameters (log x), one point per
    method, LoRA on q, v as a line over its ranks, the probe and chance as horizontal lines; error bars: the 95%
    chapter-bootstrap interval (how much another draw of test chapters would move the point)."""
    runs = results["runs"]
    fig, ax = _figure(1, (8.5, 5))

    def bars(rs: list[dict[str, Any]]) -> list[list[float]]:  # asymmetric: [below], [above], in points
        return [[100 * (r["test_accuracy"] - r["test_interval"][0]) for r in rs],
                [100 * (r["test_interval"][1] - r["test_accuracy"]) for r in rs]]

    qv = sorted([r for r in runs if r["mode"] == "lora" and r["targets"] == "q,v"], key=lambda r: r["rank"])
    if qv:
        ax.errorbar([r["trainable"] for r in qv], [100 * r["test_accuracy"] for r in qv], bars(qv), fmt="o-",
                    color="tab:blue", capsize=3, label="LoRA on q, v")
        for r in qv:
            ax.annotate(f"r={r['rank']}", (r["trainable"], 100 * r["test_accuracy"]), textcoords="offset points",
                        xytext=(6, -14), fontsize=9)
    marks = {"probe": ("s", "tab:green", "linear probe (head only, converged)"), "full": ("D", "k", "full fine-tuning")}
    for r in runs:
        if r["mode"] in marks:
            m, c, text = marks[r["mode"]]
        elif r not in qv:
            m, c, text = "^", "tab:red", f"LoRA r={r['rank']} on {r['targets'].replace(',', ', ')}"
        else:
            continue
        ax.errorbar([r["trainable"]], [100 * r["test_accuracy"]], bars([r]), fmt=m, color=c, ms=8, capsize=3,
                    label=text)
        if r["mode"] == "probe":
            ax.axhline(100 * r["test_accuracy"], color=c, lw=1, ls="--")
    ax.axhline(100 * results["base"]["chance"], color="gray", lw=1, ls=":", label="chance (1/7)")
    ax.set_xscale("log")
    ax.set_ylim(0, 100)
    seeds = len(results["config"]["seeds"])
    ax.set(xlabel="trainable parameters (head included)", ylabel="balanced test accuracy (%)",
           title=f"all-MiniLM-L6-v2: genre of a Bible verse, {results['config']['steps']} steps, mean of {seeds} seeds"
                 "\nbars: 95% bootstrap over test chapters")
    ax.legend(fontsize=9, loc="lower right")
    return _save(fig, out / "minilm_accuracy.png")


def _planted_parts(s: dict[str, Any]) -> tuple[list[tuple[int, dict]], tuple[str, dict], dict, tuple[str, dict]]:
    """A planted teacher's students: (LoRA on the planted matrices by rank, (name, full FT of those matrices),
    full FT of everything, (name, LoRA on the wrong matrices))."""
    m = s["methods"]
    lora = sorted(((v["rank"], v) for n, v in m.items() if n.startswith("lora-r")), key=lambda t: t[0])
    part = next((n, v) for n, v in m.items() if n.startswith("full-"))
    wrong = next((n, v) for n, v in m.items() if n.startswith("wrong-"))
    return lora, part, m["full"], wrong


def _err(d: dict[str, Any], scale: float = 100.0) -> float:
    return 0.0 if d.get("ci95") is None else scale * d["ci95"]


@matplotlib.rc_context(STYLE)
def planted_kl_vs_rank(results: dict[str, Any], out: Path) -> Path:
    """The planted-rank experiment's staircase: KL to the teacher (as a share of the base's) against LoRA's rank,
    one panel per teacher, with the planted rank k, the oracle (ΔW* truncated to rank r), full fine-tuning and
    LoRA on the wrong matrices; error bars: 95% intervals over seeds."""
    k, placements = results["config"]["k"], results["placements"]
    fig, axes = _figure(len(placements), (6.2 * len(placements), 4.8), squeeze=False)
    for ax, (placement, s) in zip(axes[0], placements.items()):
        lora, (part_name, part), full, (wrong_name, wrong) = _planted_parts(s)
        ranks = [r for r, _ in lora]
        ax.errorbar(ranks, [100 * v["kl_share"]["mean"] for _, v in lora], [_err(v["kl_share"]) for _, v in lora],
                    fmt="o-", color="tab:blue", capsize=3, label=f"LoRA on {placement.replace(',', ', ')} (student)")
        oracle = [(r, 100 * s["oracle"][str(r)] / s["base_kl"]) for r in ranks if s["oracle"][str(r)] > 0]
        if oracle:
            ax.plot(*zip(*oracle), "s--", color="tab:gray", ms=5, label="oracle: ΔW* truncated to rank r (0 for r ≥ k)")
        for d, color, text in ((part, "tab:green", f"{placement.replace(',', ', ')} in full"),
                               (full, "k", "full fine-tuning (everything)")):
            ax.axhline(100 * d["kl_share"]["mean"], color=color, ls="-.", lw=1.2, label=text)
        ax.errorbar([wrong["rank"] * 1.15], [100 * wrong["kl_share"]["mean"]], [_err(wrong["kl_share"])], fmt="^",
                    color="tab:red", ms=9, capsize=3, label=f"LoRA r={wrong['rank']} on {wrong['targets']} (wrong)")
        ax.axvline(k, color="tab:purple", ls=":", lw=1.5, label=f"planted rank k = {k}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}%"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set(xlabel="LoRA rank r", ylabel="KL(teacher ‖ student), % of the base's",
               title=f"teacher: rank-{k} ΔW* in {placement.replace(',', ', ')} (base KL {s['base_kl']:.2f} nats)")
        ax.legend(fontsize=8)
    return _save(fig, out / "planted_kl_vs_rank.png")


@matplotlib.rc_context(STYLE)
def planted_phi(results: dict[str, Any], out: Path) -> Path:
    """φ between the learned update and ΔW* per block (input and output side, in the data's metric) for LoRA at
    r = k and for full fine-tuning of the planted matrices; a random k-frame would give about k/d."""
    k, placements = results["config"]["k"], results["placements"]
    fig, axes = _figure(len(placements), (6.2 * len(placements), 4.4), squeeze=False)
    for ax, (placement, s) in zip(axes[0], placements.items()):
        lora, (part_name, part), _, _ = _planted_parts(s)
        at_k = dict(lora)[k]
        layers = list(at_k["phi_per_layer"])
        x = range(len(layers))
        bars = [(at_k, "input", "tab:blue", f"LoRA r={k}, input side"),
                (at_k, "output", "tab:cyan", f"LoRA r={k}, output side"),
                (part, "input", "tab:green", f"{part_name[5:]} in full, input side"),
                (part, "output", "tab:olive", f"{part_name[5:]} in full, output side")]
        for j, (d, side, color, text) in enumerate(bars):
            ax.bar([i + (j - 1.5) * 0.2 for i in x], [d["phi_per_layer"][n][side] or 0 for n in layers], 0.19,
                   color=color, label=text)
        ax.set_xticks(list(x), [n.replace("blocks.", "b").replace(".attn", "").replace(".mlp", "") for n in layers],
                      fontsize=9)
        ax.set_ylim(0, 1.05)
        ax.set(ylabel=f"φ(i, k = {k}): learned top directions inside ΔW*'s",
               title=f"teacher in {placement.replace(',', ', ')}: does the student find ΔW*'s subspace?")
        ax.legend(fontsize=8, loc="lower right")
    return _save(fig, out / "planted_phi.png")


@matplotlib.rc_context(STYLE)
def planted_placement(results: dict[str, Any], out: Path) -> Path:
    """Placement against rank: for each teacher, KL to it (share of the base's) of LoRA at r = k on the planted
    matrices, full fine-tuning of those matrices and of everything, and LoRA at r = 4k on the wrong matrices."""
    k, placements = results["config"]["k"], results["placements"]
    fig, axes = _figure(len(placements), (5.6 * len(placements), 4.4), squeeze=False)
    for ax, (placement, s) in zip(axes[0], placements.items()):
        lora, (part_name, part), full, (wrong_name, wrong) = _planted_parts(s)
        items = [(f"LoRA r={k}\non {placement}", dict(lora)[k], "tab:blue"),
                 (f"{placement}\nin full", part, "tab:green"), ("everything\nin full", full, "k"),
                 (f"LoRA r={wrong['rank']}\non {wrong['targets']}", wrong, "tab:red")]
        vals = [100 * d["kl_share"]["mean"] for _, d, _ in items]
        errs = [_err(d["kl_share"]) for _, d, _ in items]
        ax.bar(range(len(items)), vals, yerr=errs, capsize=4, color=[c for *_, c in items])
        top = max(v + e for v, e in zip(vals, errs))
        for i, (v, e) in enumerate(zip(vals, errs)):
            ax.text(i, v + e + 0.02 * top, f"{v:.2f}%", ha="center", va="bottom", fontsize=9)
        ax.set_xticks(range(len(items)), [t for t, _, _ in items], fontsize=9)
        ax.set_ylim(0, top * 1.15)
        ax.set(ylabel="KL(teacher ‖ student), % of the base's",
               title=f"teacher: rank {k} in {placement.replace(',', ', ')}")
    return _save(fig, out / "planted_placement.png")


def _is_planted(results: dict[str, Any]) -> bool:
    return isinstance(results.get("placements"), dict)


def _classifies(results: dict[str, Any]) -> bool:
    """A classification lab (the MiniLM one): every run has a test accuracy."""
    return bool(results["runs"]) and all("test_accuracy" in r for r in results["runs"])


def _language_model(results: dict[str, Any]) -> bool:
    """A language-model experiment (sweep, targets): every run has a validation loss."""
    return all("final_val_loss" in r for r in results["runs"])


def _has_rank_series(results: dict[str, Any]) -> bool:
    """Plain LoRA runs at two or more ranks on the same targets: the rank figures have a line to draw."""
    if _is_study(results):  # the study's runs span three tasks: its own figures draw them
        return False
    by_targets: dict[str, set[int]] = {}
    for r in _lora_runs(results):
        by_targets.setdefault(r["targets"], set()).add(r["rank"])
    return any(len(ranks) > 1 for ranks in by_targets.values())


def _has_target_choices(results: dict[str, Any]) -> bool:
    """LoRA runs that adapt two or more different sets of weights: the which-weights figure has bars to draw."""
    return not _is_study(results) and len({r["targets"] for r in _lora_runs(results)}) > 1


def _lm(has_data: Any) -> Any:
    """``has_data`` for a language-model figure: only where the results are a language-model experiment's."""
    return lambda results: _language_model(results) and has_data(results)


def _has_forgetting(results: dict[str, Any]) -> bool:
    """The base and a run of a sweep-like experiment hold the loss on the pretraining text (the study's own
    figures draw its runs; results written before forgetting was measured have no such loss)."""
    return not _is_study(results) and results["base"].get("pretrain_val_loss") is not None and any(
        r.get("pretrain_val_loss") is not None for r in chosen_runs(results))


def _has_memory(results: dict[str, Any]) -> bool:
    return not _is_study(results) and any("memory" in r for r in results["runs"])


# (figure, does the results dict hold what it needs?) in drawing order
FIGURES = ((params_vs_rank, _lm(_has_rank_series)), (loss_curves, _lm(_has_rank_series)),
           (val_loss_vs_rank, _lm(_has_rank_series)), (memory_by_mode, _lm(_has_memory)),
           (step_time, _lm(_has_rank_series)), (targets, _lm(_has_target_choices)),
           (learned_forgotten, _lm(_has_forgetting)),
           (task_distance, _is_study), (lr_grid, _is_study), (full_rank, lambda res: "full_rank" in res),
           (rslora, lambda res: "rslora" in res), (subspace_similarity, _is_study), (amplification, _is_study),
           (spectrum, _is_study), (accuracy_vs_parameters, _classifies), (planted_kl_vs_rank, _is_planted),
           (planted_phi, _is_planted), (planted_placement, _is_planted))


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


def render(results: dict[str, Any], out: str | Path) -> dict[Path, bytes]:
    """Every figure that ``results`` holds the data for, drawn in memory -> {path under ``out``: PNG bytes}. A
    figure that cannot be drawn fails here, before any file is written."""
    global _rendered
    todo = drawable(results)
    _rendered = {}
    try:
        for f in todo:
            f(results, Path(out))
        return _rendered
    finally:
        _rendered = None


def draw(results: dict[str, Any], out: str | Path) -> list[Path]:
    """Every figure that ``results`` holds the data for, written to the folder ``out``; returns their paths. All are
    drawn before the first is written, and each is written atomically."""
    pngs = render(results, out)
    for path, png in pngs.items():
        write_atomic(path, png)
    return list(pngs)
