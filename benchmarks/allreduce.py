"""What data-parallel training sends: bytes all-reduced per step, full fine-tuning against LoRA, and the time it takes.

    python benchmarks/allreduce.py            # bench configuration: the bytes table, timings at 1 and 2 ranks, figure
    python benchmarks/allreduce.py --quick    # tiny configuration, a few seconds (a test runs it)
    python benchmarks/allreduce.py --no-measure   # the bytes alone (no MPI needed)

**Bytes** (counted from the configs, ``memory.count_trainable``): every step, each rank all-reduces one flat buffer
of its trainable parameters' gradients plus the loss (``distributed.DataParallel.average_gradients``): float32, so
4·(trainable + 1) bytes. Full fine-tuning sends every parameter; LoRA at rank r sends 2·d·r numbers per adapted
d × d matrix. On the bench configuration (LoRA on all six linears of every block, as BENCH.md) at r = 1…64, and for
GPT-2 124M and GPT-3 175B with LoRA on W_q and W_v (Hu et al.'s setting). The measured runs check the count: the
bytes their buffers held per step are the table's.

**Time** (measured, ``mpiexec -n 1`` and ``-n 2`` on this machine, shared memory): one ``Allreduce`` of a buffer of
each size (median of ``--reps``), and training steps of the bench batch (16 sequences, shared by the ranks) for
full fine-tuning and LoRA r = 8, their steps alternating, with the all-reduce's share of the step. At 1 rank the step
is the one-process loop (no MPI call). The machine's load average is recorded: on a shared machine with two cores,
two ranks compete with whatever else runs.

**Figure** (``--figure``, default figures/allreduce_bytes.png): bytes per step against the LoRA rank, one line per
model, its full fine-tuning as a dashed line.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from bench_step import BENCH, MODES, QUICK, OneLineParser, _loadavg, build, machine, out_file  # noqa: E402

from lora_np import backend, distributed  # noqa: E402
from lora_np.checkpoint import write_atomic  # noqa: E402
from lora_np.lora import TARGETS, LoRAConfig  # noqa: E402
from lora_np.memory import count_trainable  # noqa: E402
from lora_np.model import GPTConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RANKS = (1, 2, 4, 8, 16, 32, 64)
GPT2_124M = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768, tie_weights=True)
GPT3_175B = GPTConfig(vocab_size=50257, block_size=2048, n_layer=96, n_head=96, n_embd=12288, tie_weights=True)
BUFFER = {"full": "full", "lora": f"lora-r{MODES['lora'].r}"}  # each mode's buffer in the all-reduce timings
FLOAT32 = 4  # bytes a number in the all-reduced buffer (the engine trains in float32)


def models(quick: bool) -> dict[str, tuple[GPTConfig, str]]:
    """name -> (config, LoRA targets) of the bytes table."""
    bench = (QUICK if quick else BENCH)["config"]
    return {"bench": (bench, ",".join(TARGETS)), "GPT-2 124M": (GPT2_124M, "q,v"), "GPT-3 175B": (GPT3_175B, "q,v")}


def bytes_table(quick: bool) -> dict[str, Any]:
    """Per model: its parameters, full fine-tuning's numbers and bytes per step, LoRA's at every rank."""
    table = {}
    for name, (cfg, targets) in models(quick).items():
        total, _ = count_trainable(cfg, None)
        lora = {r: count_trainable(cfg, LoRAConfig(r=r, alpha=16.0, targets=targets))[1] for r in RANKS}
        table[name] = {
            "config": asdict(cfg), "targets": targets, "parameters": total,
            "full": {"numbers": total, "bytes": FLOAT32 * (total + 1)},
            "lora": {str(r): {"numbers": n, "bytes": FLOAT32 * (n + 1), "full_over_lora": (total + 1) / (n + 1)}
                     for r, n in lora.items()},
        }
    return table


# -- the worker: run under mpiexec, measures, rank 0 writes --------------------------------------------------------


def _step(model: Any, opt: Any, x: Any, y: Any, dp: distributed.DataParallel | None) -> tuple[float, float]:
    """One training step of ``train``'s shape (shard, forward, backward, all-reduce, AdamW), without clipping as
    bench_step -> (the global batch's loss, the seconds spent in the all-reduce)."""
    B, before = len(x), dp.seconds_reducing if dp else 0.0
    if dp is not None:
        x, y = dp.shard(x, y)
    opt.zero_grad()
    _, loss = model(x, y)
    loss.backward()
    value = loss.item()
    if dp is not None:
        value = dp.average_gradients(model.trainable_parameters(), value, share=len(x) / B)
    opt.step()
    return value, dp.seconds_reducing - before if dp else 0.0


def worker(args: argparse.Namespace) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    dp = distributed.DataParallel(comm) if comm.Get_size() > 1 else None  # 1 rank: the one-process loop
    setup = QUICK if args.quick else BENCH
    cfg, B = setup["config"], setup["batch_size"]
    table = bytes_table(args.quick)["bench"]
    sizes = {"full": table["full"]["numbers"]} | {f"lora-r{r}": v["numbers"] for r, v in table["lora"].items()}
    np = backend.np
    allreduce = {}
    for name, n in sizes.items():  # one Allreduce of the buffer a step would send
        buf = np.ones(n + 1, np.float32)
        times = []
        for _ in range(args.reps + 1):
            comm.Barrier()
            t0 = time.perf_counter()
            comm.Allreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
            times.append(time.perf_counter() - t0)
        allreduce[name] = {"bytes": buf.nbytes, "seconds": statistics.median(times[1:]), "min": min(times[1:])}

    gen = backend.rng(0)  # the same fixed batch on every rank
    x, y = (gen.integers(0, cfg.vocab_size, size=(B, cfg.block_size)) for _ in range(2))
    # At 1 rank also the half batch: what each of 2 ranks computes, so 2 ranks' ideal step is its time + the
    # all-reduce, and the gap to the measured step is what the machine took (cores shared with other work).
    runs = {mode: (mode, B) for mode in MODES} | ({f"{m} (batch {B // 2})": (m, B // 2) for m in MODES} if dp is None
                                                   else {})
    built = {run: build(cfg, mode) for run, (mode, _) in runs.items()}  # the same seed on every rank: same weights
    if dp is not None:
        for model, _ in built.values():
            dp.check_same_weights(model, "before the benchmark")
    steps: dict[str, dict[str, Any]] = {run: {"seconds": [], "cpu_seconds": [], "allreduce_seconds": [], "loss": []}
                                        for run in runs}
    load_before = _loadavg()
    for i in range(args.warmup + args.steps):  # the runs alternate: the machine's drift hits all alike
        for run, (_, b) in runs.items():
            model, opt = built[run]
            bytes_before = dp.bytes_reduced if dp else 0
            t0, c0 = time.perf_counter(), time.process_time()
            loss, reduce_s = _step(model, opt, x[:b], y[:b], dp)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            steps[run]["loss"].append(loss)  # every step's, warm-up included: 1 and 2 ranks train alike
            if i >= args.warmup:
                steps[run]["seconds"].append(seconds)
                steps[run]["cpu_seconds"].append(cpu)
                steps[run]["allreduce_seconds"].append(reduce_s)
                steps[run]["bytes"] = (dp.bytes_reduced if dp else 0) - bytes_before
    if comm.Get_rank() == 0:
        result = {"ranks": comm.Get_size(), "allreduce": allreduce, "load_average": [load_before, _loadavg()],
                  "steps": {run: {**s, "batch_size": runs[run][1], "median_seconds": statistics.median(s["seconds"]),
                                  "median_cpu_seconds": statistics.median(s["cpu_seconds"]),
                                  "median_allreduce_seconds": statistics.median(s["allreduce_seconds"]),
                                  "trainable": sum(p.data.size for p in built[run][0].trainable_parameters())}
                            for run, s in steps.items()}}
        Path(args.worker_out).write_text(json.dumps(result))


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """The worker at 1 and 2 ranks, each in its own ``mpiexec``; or why it could not run."""
    mpiexec = distributed.find_mpiexec()
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        mpiexec = None
    if mpiexec is None:
        return {"skipped": "mpi4py or mpiexec is not installed (pip install -r requirements-mpi.txt)"}
    runs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for n in (1, 2):
            out = Path(tmp) / f"{n}.json"
            cmd = [mpiexec, "-n", str(n), sys.executable, __file__, "--worker", "--worker-out", str(out),
                   "--steps", str(args.steps), "--warmup", str(args.warmup), "--reps", str(args.reps),
                   *(["--quick"] if args.quick else [])]
            print(f"measuring at {n} rank{'s' * (n > 1)}: {' '.join(cmd[:3])} ...", file=sys.stderr)
            subprocess.run(cmd, check=True, timeout=1800, env={**os.environ, "PYTHONPATH": os.pathsep.join(
                [str(ROOT), os.environ.get("PYTHONPATH", "")])})
            runs[str(n)] = json.loads(out.read_text())
    one, two = runs["1"]["steps"], runs["2"]["steps"]
    return {"runs": runs, "loss_max_relative_difference": {m: max(abs(a - b) / abs(a) for a, b in zip(
                one[m]["loss"], two[m]["loss"])) for m in two}, "losses_bitwise_equal": {
                m: one[m]["loss"] == two[m]["loss"] for m in two},
            "speedup_2_ranks": {m: one[m]["median_seconds"] / two[m]["median_seconds"] for m in two},
            "ideal_2_ranks_seconds": {m: one[half_batch(m, runs)]["median_seconds"]
                                      + runs["2"]["allreduce"][BUFFER[m]]["seconds"] for m in two}}


def half_batch(mode: str, runs: dict[str, Any]) -> str:
    return next(k for k, v in runs["1"]["steps"].items() if k.startswith(mode + " (batch"))


# -- report and figure -------------------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def report(result: dict[str, Any]) -> str:
    lines = ["bytes all-reduced per step (float32 gradients of the trainable parameters + the loss):", "",
             "| model | LoRA on | full FT | " + " | ".join(f"r = {r}" for r in RANKS) + " |",
             "|---|---|---:|" + "---:|" * len(RANKS)]
    for name, t in result["bytes"].items():
        lines.append(f"| {name} | {t['targets']} | {_size(t['full']['bytes'])} | "
                     + " | ".join(_size(t["lora"][str(r)]["bytes"]) for r in RANKS) + " |")
    m = result.get("measured", {})
    if "skipped" in m:
        return "\n".join([*lines, "", f"not measured: {m['skipped']}"])
    lines += ["", "time of one Allreduce (median), by buffer:", "",
              "| buffer | bytes | 1 rank | 2 ranks |", "|---|---:|---:|---:|"]
    one, two = m["runs"]["1"], m["runs"]["2"]
    for name, a in one["allreduce"].items():
        lines.append(f"| {name} | {_size(a['bytes'])} | {a['seconds'] * 1e3:.3f} ms | "
                     f"{two['allreduce'][name]['seconds'] * 1e3:.3f} ms |")
    lines += ["", f"training step of the bench batch ({result['batch_size']} sequences; median), LoRA r = 8 on all six "
              "linears; 'ideal' = 1 rank at half the batch + one Allreduce of the buffer alone:", "",
              "| mode | sent per step | 1 rank | 2 ranks | in the all-reduce | speed-up | ideal 2 ranks | CPU/wall "
              "2 ranks |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, s in two["steps"].items():
        lines.append(f"| {mode} | {_size(s['bytes'])} | {one['steps'][mode]['median_seconds']:.3f} s | "
                     f"{s['median_seconds']:.3f} s | {s['median_allreduce_seconds'] * 1e3:.2f} ms | "
                     f"{m['speedup_2_ranks'][mode]:.2f}× | {m['ideal_2_ranks_seconds'][mode]:.3f} s | "
                     f"{s['median_cpu_seconds'] / s['median_seconds']:.0%} |")
    lines.append("\nthe same steps' losses, 2 ranks against 1: " + ", ".join(
        f"{mode} max relative difference {d:.1e}{' (bitwise equal)' if m['losses_bitwise_equal'][mode] else ''}"
        for mode, d in m["loss_max_relative_difference"].items()))
    lines.append(f"\nload average (1, 5, 15 min) before and after: 1 rank {one['load_average']}, "
                 f"2 ranks {two['load_average']}; {result['machine']['nproc']} cores")
    return "\n".join(lines)


def draw(result: dict[str, Any]) -> bytes:
    """The figure as PNG bytes: bytes per step against rank, per model; full fine-tuning dashed."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter

    fig = Figure(figsize=(7.5, 4.8), dpi=110)
    ax = fig.subplots()
    for (name, t), color in zip(result["bytes"].items(), ("C0", "C1", "C3")):
        ranks = [int(r) for r in t["lora"]]
        ax.plot(ranks, [t["lora"][str(r)]["bytes"] for r in ranks], "o-", color=color,
                label=f"{name}: LoRA on {t['targets'].replace(',', ', ')}")
        ax.axhline(t["full"]["bytes"], color=color, ls="--", lw=1.5, label=f"{name}: full fine-tuning")
    measured = result.get("measured", {}).get("runs", {}).get("2")
    if measured:  # the bytes the 2-rank run's buffers really held: on the bench line
        bench = result["bytes"]["bench"]
        ax.plot([RANKS[-1] * 1.35], [measured["steps"]["full"]["bytes"]], "k*", ms=10,
                label="measured (2 ranks): full, LoRA r = 8")
        ax.plot([MODES["lora"].r], [measured["steps"]["lora"]["bytes"]], "k*", ms=10)
        assert measured["steps"]["lora"]["bytes"] == bench["lora"][str(MODES["lora"].r)]["bytes"]
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(list(RANKS), [str(r) for r in RANKS])
    ax.set_xlabel("LoRA rank r")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: _size(v)))
    ax.set_ylabel("bytes all-reduced per step (float32)")
    ax.set_title("What data-parallel training sends every step")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=7.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the tiny configuration, for smoke runs")
    p.add_argument("--steps", type=int, default=5, help="timed training steps per mode and rank count (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default 1)")
    p.add_argument("--reps", type=int, default=20, help="timed all-reduces per buffer size (default 20)")
    p.add_argument("--no-measure", action="store_true", help="the bytes table alone: no mpiexec")
    p.add_argument("--out", type=out_file, default=None,
                   help="JSON file (default benchmarks/results/allreduce.json, or allreduce_quick.json with --quick)")
    p.add_argument("--figure", type=out_file, default=None,
                   help="PNG file (default figures/allreduce_bytes.png; none with --quick)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.reps < 1:
        p.error("--steps and --reps must be >= 1, --warmup >= 0")
    if args.worker:
        worker(args)
        return 0
    result: dict[str, Any] = {"command": " ".join(["python", *sys.argv]), "quick": args.quick,
                              "machine": machine(), "bytes": bytes_table(args.quick),
                              "lora": MODES["lora"].to_dict(), "batch_size": (QUICK if args.quick else BENCH)[
                                  "batch_size"]}
    if not args.no_measure:
        result["measured"] = measure(args)
    out = Path(args.out or Path(__file__).parent / "results" / f"allreduce{'_quick' if args.quick else ''}.json")
    write_atomic(out, (json.dumps(result, indent=1) + "\n").encode())
    figure = args.figure or (None if args.quick else ROOT / "figures" / "allreduce_bytes.png")
    if figure:
        write_atomic(figure, draw(result))
    print(report(result))
    print(f"\nwrote {out}" + (f" and {figure}" if figure else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
