"""Profile training steps: with cProfile (where Python spends its time), or op by op with the device synchronised
(where a GPU spends its time).

    python benchmarks/profile_step.py                    # full fine-tuning, 5 profiled steps, top 25 by own time
    python benchmarks/profile_step.py --mode lora --top 40 --sort cumulative
    python benchmarks/profile_step.py --quick            # the tiny configuration of bench_step.py --quick
    python benchmarks/profile_step.py --by-op --backend cupy --config d768 --out profile.json

cProfile: "own time" (tottime) is where the seconds really go: matrix products show up as ``engine.matmul``,
elementwise NumPy work inside the op that does it (``gelu``, ``layer_norm``, ...), and the rest is Python overhead.
The profiler adds a little time to every Python call, so a share, not an absolute number, is what to read here;
``bench_step.py`` is the clock.

``--by-op``: on a GPU, cProfile sees only the launches (the work runs later, asynchronously). This mode
synchronises the device around every op instead and charges each op the time from the end of the op before it to
its own end (forward: every op of the engine ends in ``Tensor.from_op``), and each backward closure its own time;
the rest of backward (adding up the gradients of nodes with several consumers), zero_grad and the optimizer's step
are timed apart. The products are inside the ops that do them (``linear``, ``fused_linear``, ``causal_attention``).
Synchronising costs a little per op, so the step is slower than ``bench_step.py``'s; the shares are what to read.
"""

from __future__ import annotations

import cProfile
import io
import json
import pstats
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))  # bench_step.py next to this file holds the configurations

from bench_step import CONFIGS, OneLineParser, _step, _sync, build, out_file  # noqa: E402

from lora_np import backend  # noqa: E402
from lora_np.checkpoint import write_atomic  # noqa: E402
from lora_np.engine import Tensor  # noqa: E402


def profile_by_op(model: Any, opt: Any, x: Any, y: Any, steps: int) -> dict[str, Any]:
    """Seconds per step by op (forward, backward), and for the parts of a step outside the ops, over ``steps``."""
    ops: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "forward": 0.0, "backward": 0.0})
    parts = {"zero_grad": 0.0, "backward, outside the ops": 0.0, "optimizer": 0.0}
    last = [0.0]  # when the op before ended
    from_op = Tensor.from_op

    def timed_from_op(data, parents, op_name, backward):  # noqa: ANN001, ANN202
        _sync()
        now = time.perf_counter()
        ops[op_name]["calls"] += 1
        ops[op_name]["forward"] += now - last[0]

        def timed_backward(g):  # noqa: ANN001, ANN202
            _sync()
            t0 = time.perf_counter()
            grads = backward(g)
            _sync()
            ops[op_name]["backward"] += time.perf_counter() - t0
            return grads

        out = from_op(data, parents, op_name, timed_backward)
        last[0] = time.perf_counter()
        return out

    def clock() -> float:
        _sync()
        return time.perf_counter()

    Tensor.from_op = staticmethod(timed_from_op)
    try:
        total = 0.0
        for _ in range(steps):
            t0 = clock()
            opt.zero_grad()
            t1 = last[0] = clock()
            _, loss = model(x, y)
            t2 = clock()
            in_closures = sum(v["backward"] for v in ops.values())
            loss.backward()
            t3 = clock()
            parts["backward, outside the ops"] += (t3 - t2) - (sum(v["backward"] for v in ops.values()) - in_closures)
            opt.step()
            t4 = clock()
            parts["zero_grad"] += t1 - t0
            parts["optimizer"] += t4 - t3
            total += t4 - t0
            del loss
    finally:
        Tensor.from_op = staticmethod(from_op)
    per_step = lambda s: s / steps  # noqa: E731
    return {"step": per_step(total),
            "ops": {k: {"calls": v["calls"] / steps, "forward": per_step(v["forward"]),
                        "backward": per_step(v["backward"])} for k, v in ops.items()},
            "parts": {k: per_step(v) for k, v in parts.items()}}


def format_by_op(result: dict[str, Any]) -> str:
    step = result["step"]
    rows = [(name, v["calls"], v["forward"], v["backward"]) for name, v in result["ops"].items()]
    rows += [(name, 1, s, 0.0) for name, s in result["parts"].items()]
    rows.sort(key=lambda r: -(r[2] + r[3]))
    lines = [f"{'op':<28} {'calls':>6} {'forward ms':>11} {'backward ms':>12} {'share':>7}"]
    for name, calls, fwd, bwd in rows:
        lines.append(f"{name:<28} {calls:>6.0f} {fwd * 1e3:>11.2f} {bwd * 1e3:>12.2f} {(fwd + bwd) / step:>7.1%}")
    accounted = sum(r[2] + r[3] for r in rows)
    lines.append(f"{'step (synchronised per op)':<28} {'':>6} {step * 1e3:>11.2f} {'':>12} "
                 f"{accounted / step:>7.1%}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--mode", choices=("full", "lora"), default="full")
    p.add_argument("--steps", type=int, default=5, help="profiled steps (after 2 warm-up steps)")
    p.add_argument("--top", type=int, default=25, help="entries to print (cProfile)")
    p.add_argument("--sort", default="tottime", help="pstats sort key: tottime (own time) or cumulative")
    p.add_argument("--config", choices=tuple(CONFIGS), default="bench", help="model size, as bench_step.py's")
    p.add_argument("--quick", action="store_const", const="quick", dest="config", help="the same as --config quick")
    p.add_argument("--by-op", action="store_true", help="time each op with the device synchronised, not cProfile")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    p.add_argument("--out", type=out_file, help="--by-op: write the profile as JSON here")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.out and not args.by_op:
        p.error("--out writes the --by-op profile; add --by-op")
    try:
        backend.set_backend(args.backend)  # a missing CuPy or GPU: one line, before any work
    except RuntimeError as e:
        p.error(str(e))
    setup = CONFIGS[args.config]
    cfg, B = setup["config"], setup["batch_size"]
    model, opt = build(cfg, args.mode)
    gen = backend.rng(0)
    x, y = (backend.to_device(gen.integers(0, cfg.vocab_size, size=(B, cfg.block_size))) for _ in range(2))
    for _ in range(2):
        _step(model, opt, x, y)
    if args.by_op:
        result = profile_by_op(model, opt, x, y, args.steps)
        print(f"{args.mode}, --config {args.config}, {args.backend}: per step, mean of {args.steps}")
        print(format_by_op(result))
        if args.out:
            result.update(mode=args.mode, config=args.config, backend=args.backend, steps=args.steps,
                          device=backend.device_info())
            write_atomic(args.out, (json.dumps(result, indent=1) + "\n").encode())
            print(f"wrote {args.out}")
        return 0
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
