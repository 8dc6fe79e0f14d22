"""Profile training steps of the bench configuration with cProfile and print the top entries.

    python benchmarks/profile_step.py                    # full fine-tuning, 5 profiled steps, top 25 by own time
    python benchmarks/profile_step.py --mode lora --top 40 --sort cumulative
    python benchmarks/profile_step.py --quick            # the tiny configuration of bench_step.py --quick

"Own time" (tottime) is where the seconds really go: matrix products show up as ``engine.matmul``, elementwise
NumPy work inside the op that does it (``gelu``, ``layer_norm``, ...), and the rest is Python overhead. The
profiler adds a little time to every Python call, so a share, not an absolute number, is what to read here;
``bench_step.py`` is the clock.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # bench_step.py next to this file holds the bench configuration

from bench_step import BENCH, QUICK, _step, build  # noqa: E402

from lora_np import backend  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("full", "lora"), default="full")
    p.add_argument("--steps", type=int, default=5, help="profiled steps (after 2 warm-up steps)")
    p.add_argument("--top", type=int, default=25, help="entries to print")
    p.add_argument("--sort", default="tottime", help="pstats sort key: tottime (own time) or cumulative")
    p.add_argument("--quick", action="store_true", help="the tiny configuration")
    args = p.parse_args(argv)
    setup = QUICK if args.quick else BENCH
    cfg, B = setup["config"], setup["batch_size"]
    model, opt = build(cfg, args.mode)
    gen = backend.rng(0)
    x, y = (gen.integers(0, cfg.vocab_size, size=(B, cfg.block_size)) for _ in range(2))
    for _ in range(2):
        _step(model, opt, x, y)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(args.steps):
        _step(model, opt, x, y)
    prof.disable()
    out = io.StringIO()
    stats = pstats.Stats(prof, stream=out)
    total = stats.total_tt / args.steps
    stats.sort_stats(args.sort).print_stats(args.top)
    print(f"{args.mode}: {total:.3f} s per step under the profiler ({args.steps} steps)")
    print(out.getvalue())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
