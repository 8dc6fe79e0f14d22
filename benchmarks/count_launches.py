"""Count the device operations of one CuPy training step, fused kernels on and off, on a machine without a GPU.

    PYTHONPATH=tests/strict_cupy python benchmarks/count_launches.py                 # bench config, full and LoRA
    PYTHONPATH=tests/strict_cupy python benchmarks/count_launches.py --config d768 --out counts.json

It runs on ``tests/strict_cupy``, the CPU stand-in for CuPy, which counts every operation lora_np asks of it. On a
GPU each operation that computes (a ufunc, a reduction, a copy, an indexed assignment, a fill, a fused kernel) is
at least one kernel launch; views (reshape, transpose, swapaxes, slicing) and ``empty`` allocations are not, and
are left out. Products (``matmul``, cuBLAS) are counted apart. What it cannot tell: how long each launch takes. The
timed comparison of the two paths on a GPU is ``bench_step.py --backend cupy`` with and without ``LORA_NP_FUSED=0``.

One step = zero_grad + forward + loss + backward + AdamW, measured after one warm-up step (AdamW's state exists).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from bench_step import CONFIGS, OneLineParser, build, out_file  # noqa: E402

from lora_np import backend  # noqa: E402
from lora_np.checkpoint import write_atomic  # noqa: E402

VIEWS = {"method:reshape", "method:transpose", "method:swapaxes", "method:view", "getitem", "function:empty",
         "function:empty_like"}  # no launch: views of the same buffer, and allocations without a fill
PRODUCTS = {"ufunc:matmul", "function:matmul"}


def count_step(config: str, mode: str, fused: bool) -> Counter[str]:
    """The operations of one training step of ``mode`` at ``config``, by name, from the stand-in's counter."""
    import cupy  # the stand-in: checked in main()

    os.environ["LORA_NP_FUSED"] = "1" if fused else "0"
    setup = CONFIGS[config]
    cfg, B = setup["config"], setup["batch_size"]
    model, opt = build(cfg, mode)
    gen = backend.rng(0)
    x, y = (backend.to_device(gen.integers(0, cfg.vocab_size, (B, cfg.block_size))) for _ in range(2))

    def step() -> None:
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step()

    step()
    cupy.calls.clear()
    step()
    return Counter(cupy.calls)


def summarize(calls: Counter[str]) -> dict[str, Any]:
    launches = {k: v for k, v in calls.items() if k not in VIEWS}
    products = sum(v for k, v in launches.items() if k in PRODUCTS)
    others = {k: v for k, v in launches.items() if k not in PRODUCTS}
    return {"products": products, "other_launches": sum(others.values()),
            "kernels": sum(v for k, v in others.items() if k.startswith("kernel:")),
            "views": sum(v for k, v in calls.items() if k in VIEWS),
            "top": sorted(others.items(), key=lambda kv: (-kv[1], kv[0]))[:8]}


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", choices=sorted(CONFIGS), default="bench")
    p.add_argument("--out", type=out_file, help="write the counts as JSON here")
    args = p.parse_args(argv)
    try:
        import cupy
    except ImportError:
        cupy = None
    if getattr(cupy, "calls", None) is None:
        print("error: run on the CPU stand-in for CuPy: PYTHONPATH=tests/strict_cupy python "
              "benchmarks/count_launches.py", file=sys.stderr)
        return 2
    backend.set_backend("cupy")
    result = {"config": args.config, "modes": {}}
    print(f"device operations of one training step, --config {args.config} (tests/strict_cupy's count)")
    print(f"{'mode':<6} {'kernels':<9} {'products':>8} {'other launches':>15} {'of them fused':>14} {'views':>6}")
    for mode in ("full", "lora"):
        for fused in (False, True):
            s = summarize(count_step(args.config, mode, fused))
            result["modes"][f"{mode}{'' if fused else '_reference'}"] = s
            print(f"{mode:<6} {'fused' if fused else 'reference':<9} {s['products']:>8} {s['other_launches']:>15} "
                  f"{s['kernels']:>14} {s['views']:>6}")
    for mode in ("full", "lora"):
        ref, new = result["modes"][f"{mode}_reference"], result["modes"][mode]
        print(f"{mode}: {ref['other_launches']} -> {new['other_launches']} launches besides the products "
              f"({ref['other_launches'] / new['other_launches']:.1f}x fewer); what remains most, fused: "
              + ", ".join(f"{k} {v}" for k, v in new["top"][:5]))
    if args.out:
        write_atomic(args.out, json.dumps(result, indent=1).encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
