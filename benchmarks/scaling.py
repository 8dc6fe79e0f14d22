"""How step time and peak memory grow with the model width and the context: the scaling table of benchmarks/README.md.

    python benchmarks/scaling.py                       # n_embd 128 -> 1024 and block_size 64 -> 512, both modes
    python benchmarks/scaling.py --steps 5 --out benchmarks/results/scaling.json

Everything else is the bench configuration (4 layers, 4 heads, vocab 96, batch 16, LoRA r = 8 on all six linears).
Per point: the median of ``--steps`` timed steps after one warm-up step, and the measured peak of one step
(``memory.measure_step``: tracemalloc on NumPy, CuPy's memory pool on CuPy). The fitted exponent is the slope of
log(value) against log(size) over the doubling series: ~2 for a cost that grows like d² (the linear layers'
products), ~1 for one that grows like T (the tokens of the batch), up to 2 where the T² attention matrices start to
dominate.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from bench_step import BENCH, OneLineParser, _step, _sync, build, out_file  # noqa: E402

from lora_np import backend, memory  # noqa: E402
from lora_np.checkpoint import write_atomic  # noqa: E402

SERIES = {"n_embd": [128, 256, 512, 1024], "block_size": [64, 128, 256, 512]}


def point(cfg, B: int, mode: str, steps: int) -> dict[str, float]:
    model, opt = build(cfg, mode)
    gen = backend.rng(0)
    x, y = (backend.to_device(gen.integers(0, cfg.vocab_size, size=(B, cfg.block_size))) for _ in range(2))
    _step(model, opt, x, y)
    times = []
    for _ in range(steps):
        _sync()  # on a GPU the clock must wait for the work: kernels run after their launch returns
        t0 = time.perf_counter()
        _step(model, opt, x, y)
        _sync()
        times.append(time.perf_counter() - t0)
    peak = memory.measure_step(model, opt, x, y, warmup_steps=0).peak
    return {"seconds": statistics.median(times), "peak_bytes": peak}


def slope(sizes: list[int], values: list[float]) -> float:
    """Least-squares slope of log(value) on log(size)."""
    lx, ly = [math.log(s) for s in sizes], [math.log(v) for v in values]
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly)) / sum((a - mx) ** 2 for a in lx)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    p.add_argument("--out", type=out_file, default=str(Path(__file__).parent / "results" / "scaling.json"))
    args = p.parse_args(argv)
    try:
        backend.set_backend(args.backend)  # a missing CuPy or GPU: one line, before any work
    except RuntimeError as e:
        p.error(str(e))
    base, B = BENCH["config"], BENCH["batch_size"]
    result = {"batch_size": B, "steps": args.steps, "series": {}}
    for knob, sizes in SERIES.items():
        rows = []
        for size in sizes:
            cfg = replace(base, **{knob: size})
            row = {knob: size, **{f"{mode}_{k}": v for mode in ("full", "lora")
                                  for k, v in point(cfg, B, mode, args.steps).items()}}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
        fits = {k: slope(sizes, [r[k] for r in rows]) for k in rows[0] if k != knob}
        result["series"][knob] = {"rows": rows, "exponent": fits}
    write_atomic(args.out, (json.dumps(result, indent=1) + "\n").encode())
    for knob, series in result["series"].items():
        print(f"\n{knob:>10} {'full s':>8} {'LoRA s':>8} {'full MiB':>9} {'LoRA MiB':>9}")
        for r in series["rows"]:
            print(f"{r[knob]:>10} {r['full_seconds']:>8.3f} {r['lora_seconds']:>8.3f} "
                  f"{r['full_peak_bytes'] / 2**20:>9.1f} {r['lora_peak_bytes'] / 2**20:>9.1f}")
        e = series["exponent"]
        print(f"{'exponent':>10} {e['full_seconds']:>8.2f} {e['lora_seconds']:>8.2f} {e['full_peak_bytes']:>9.2f} "
              f"{e['lora_peak_bytes']:>9.2f}")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
