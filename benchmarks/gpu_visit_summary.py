"""summary.md of a GPU visit (benchmarks/gpu_visit.sh): the machine, then every number the stages left in WORK.

    python benchmarks/gpu_visit_summary.py WORK > summary.md

Reads what exists and skips the rest, so it runs after any stage: WORK/bench/*.json (bench_step.py and
torch_step.py), WORK/tests.txt (pytest's last line), WORK/bench.tsv, WORK/commands.tsv, WORK/notebooks.tsv and
WORK/full.tsv (name, exit code, wall seconds). Prints only numbers read from those files or from the machine now.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Any


def machine() -> list[str]:
    lines = [f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"]
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
        lines.append(f"- GPU (nvidia-smi: name, driver, memory): {gpu or 'none'}")
    except (OSError, subprocess.SubprocessError) as e:
        lines.append(f"- GPU: nvidia-smi not usable ({e})")
    try:
        import cupy

        rt, drv = cupy.cuda.runtime.runtimeGetVersion(), cupy.cuda.runtime.driverGetVersion()
        lines.append(f"- CuPy {cupy.__version__}, CUDA runtime {rt // 1000}.{rt % 1000 // 10}, "
                     f"driver API {drv // 1000}.{drv % 1000 // 10}")
    except Exception as e:  # no CuPy, or no GPU
        lines.append(f"- CuPy: not usable ({type(e).__name__}: {e})")
    try:
        import torch

        lines.append(f"- PyTorch {torch.__version__}")
    except ImportError:
        lines.append("- PyTorch: not installed")
    import numpy

    lines.append(f"- NumPy {numpy.__version__}, Python {sys.version.split()[0]}")
    return lines


def bench_tables(folder: Path) -> list[str]:
    out: list[str] = []
    steps = sorted(folder.glob("bench_step_*.json"))
    if steps:
        out += ["", "### bench_step.py (lora_np alone; median ms of the timed steps)", "",
                "| file | config | backend | full ms | LoRA ms | LoRA / full | full MFU | matmul 1024² GFLOP/s |",
                "|---|---|---|---:|---:|---:|---:|---:|"]
        for path in steps:
            r = json.loads(path.read_text())
            full, lora = r["modes"]["full"], r["modes"]["lora"]
            out.append(f"| {path.name} | {r.get('config_name', '?')} | {r['machine']['backend']} "
                       f"| {full['step_seconds']['median'] * 1e3:.2f} | {lora['step_seconds']['median'] * 1e3:.2f} "
                       f"| {r['lora_over_full_step_time']:.3f} | {full['mfu']:.1%} "
                       f"| {r['matmul_1024_float32_flops']['median'] / 1e9:.0f} |")
    torch_runs = sorted(folder.glob("torch_step_*.json"))
    if torch_runs:
        out += ["", "### torch_step.py (lora_np and PyTorch eager in one process, steps alternating; median ms)", "",
                "| file | config | attention | full lora_np | full torch | ratio | LoRA lora_np | LoRA torch | ratio "
                "| LoRA/full lora_np | LoRA/full torch | max loss diff |",
                "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for path in torch_runs:
            r = json.loads(path.read_text())
            m: dict[str, Any] = r["modes"]
            diff = max(d for mode in m.values() for d in mode["loss"]["abs_difference"])
            out.append(f"| {path.name} | {r['config_name']} | {r['attention']} "
                       f"| {m['full']['lora_np']['median'] * 1e3:.2f} | {m['full']['torch']['median'] * 1e3:.2f} "
                       f"| {m['full']['lora_np_over_torch']:.2f} "
                       f"| {m['lora']['lora_np']['median'] * 1e3:.2f} | {m['lora']['torch']['median'] * 1e3:.2f} "
                       f"| {m['lora']['lora_np_over_torch']:.2f} | {r['lora_over_full']['lora_np']:.3f} "
                       f"| {r['lora_over_full']['torch']:.3f} | {diff:.1e} |")
    for path in sorted(folder.glob("profile_*.json")):  # profile_step.py --by-op: the six largest shares
        r = json.loads(path.read_text())
        rows = [(k, v["forward"] + v["backward"]) for k, v in r["ops"].items()] + list(r["parts"].items())
        rows.sort(key=lambda kv: -kv[1])
        out += ["", f"### profile_step.py --by-op: {r['config']}, {r['mode']} (device synchronised per op; "
                f"{r['step'] * 1e3:.1f} ms a step)", "", "| op | ms a step | share |", "|---|---:|---:|"]
        out += [f"| {k} | {v * 1e3:.2f} | {v / r['step']:.1%} |" for k, v in rows[:6]]
    return out


def runs_table(path: Path, title: str) -> list[str]:
    if not path.exists():
        return []
    out = ["", f"### {title}", "", "| what | exit code | wall s |", "|---|---:|---:|"]
    for line in path.read_text().splitlines():
        name, rc, seconds = (line.split("\t") + ["", ""])[:3]
        out.append(f"| {name} | {rc} | {seconds} |")
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/gpu_visit_summary.py WORK", file=sys.stderr)
        return 2
    work = Path(argv[0])
    lines = ["# GPU visit", "", *machine()]
    if (work / "tests.txt").exists():
        lines += ["", "### tests (pytest -k cupy)", "", "    " + (work / "tests.txt").read_text().strip()]
    lines += bench_tables(work / "bench")
    lines += runs_table(work / "bench.tsv", "benchmark runs (exit code, wall time with start-up)")
    lines += runs_table(work / "commands.tsv", "commands (--quick, wall time per command)")
    lines += runs_table(work / "notebooks.tsv", "notebooks (LORA_NP_QUICK=1)")
    lines += runs_table(work / "full.tsv", "the main job at full size")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
