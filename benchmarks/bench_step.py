"""Time one training step of full fine-tuning and of LoRA on the bench configuration (benchmarks/BENCH.md).

    python benchmarks/bench_step.py                      # the bench configuration, numpy, 10 timed steps
    python benchmarks/bench_step.py --config quick       # a tiny configuration: a smoke run of a few seconds
    python benchmarks/bench_step.py --config d768 --backend cupy   # GPT-2 small's width: 12 x 768, T 256 (a GPU)
    python benchmarks/bench_step.py --backend cupy --out benchmarks/results/bench_step_cupy.json

A step is zero_grad + forward + loss + backward + AdamW update on fixed random token ids. Per mode it reports the
median, min and max of the timed steps (after warm-up steps), tokens/s, the analytic matmul FLOPs of the step
(checked against ``engine.count_matmuls``, which sees every product the engine really does), the float32
1024x1024 matmul FLOP/s of the same array library measured in the same run, MFU (FLOPs / step time / matmul
FLOP/s), the LoRA/full step-time ratio, and the memory ledger of one step (analytic next to measured: by
tracemalloc on numpy, by CuPy's memory pool on cupy).

The two modes' timed steps alternate (full, LoRA, full, LoRA, ...), so that a machine that gets busier or
quieter during the run shifts both alike and their ratio stays fair.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from lora_np import backend, engine, memory
from lora_np.__main__ import UsageError, check_writable_file
from lora_np.checkpoint import write_atomic
from lora_np.lora import TARGETS, LoRAConfig, prepare_finetuning
from lora_np.model import GPT, GPTConfig
from lora_np.optim import AdamW

# The bench configuration (BENCH.md): every number of the README is measured on it.
BENCH = {"config": GPTConfig(vocab_size=96, block_size=128, n_layer=4, n_head=4, n_embd=256, dropout=0.0),
         "batch_size": 16}
QUICK = {"config": GPTConfig(vocab_size=96, block_size=32, n_layer=2, n_head=2, n_embd=64, dropout=0.0),
         "batch_size": 4}
# GPT-2 small's shape (12 layers x 768, T 256; the bench vocabulary): a size where a GPU has work to do per kernel
D768 = {"config": GPTConfig(vocab_size=96, block_size=256, n_layer=12, n_head=12, n_embd=768, dropout=0.0),
        "batch_size": 16}
CONFIGS = {"bench": BENCH, "quick": QUICK, "d768": D768}  # --config of this script and of torch_step.py
MODES = {"full": None, "lora": LoRAConfig(r=8, alpha=16.0, targets=TARGETS)}  # LoRA on every Linear of the blocks
ADAMW = {"lr": 1e-3, "weight_decay": 0.01}


def build(cfg: GPTConfig, mode: str) -> tuple[GPT, AdamW]:
    """A fresh ``GPT(cfg)`` set up for ``mode`` and its AdamW."""
    model = prepare_finetuning(GPT(cfg), MODES[mode])
    return model, AdamW(model.trainable_parameters(), **ADAMW)
BENCH_MD_GFLOP = {"forward": 14.1, "full": 42.2, "lora": 28.1}  # BENCH.md's figures for the bench configuration


def step_flops(cfg: GPTConfig, B: int, T: int, mode: str, r: int) -> dict[str, float]:
    """Matmul FLOPs of one training step (2·m·k·n per (m, k) @ (k, n) product), LoRA on all six linears.

    The engine computes a product's input gradient g @ Bᵀ only if the input requires a gradient, and its weight
    gradient Aᵀ @ g only if the weight trains (engine.py, ``__matmul__``); everything below follows from that and
    from ``fused.fused_linear``: an adapted layer runs x @ (W + s·A@B) (merging costs d_in·r·d_out) and x @ A, and
    its backward dx = g @ (W + s·A@B)ᵀ, dh = s·g @ Bᵀ, dA = xᵀ dh, dB = s·hᵀ g.
    """
    N, C, V, L = B * T, cfg.n_embd, cfg.vocab_size, cfg.n_layer
    linears = 2 * N * 12 * C * C  # q, k, v, o (C x C each) and up, down (C x 4C each), per block
    attention = 2 * (2 * B * T * T * C)  # q @ kᵀ and att @ v, all heads together, per block
    head = 2 * N * C * V  # lm_head
    forward = L * (linears + attention) + head
    out = {"forward_base": forward}
    if mode == "full":  # every product computes both gradients: backward = 2 × forward
        out.update(forward=forward, backward=2 * forward)
    else:
        thin = 2 * N * r * 9 * C  # one rank-r product per layer, N rows: d_in or d_out is C (q, k, v, o, up, down)
        merges = 2 * r * 12 * C * C  # s·A@B for the six layers: d_in·r·d_out each
        qkv_block0 = 3 * 2 * N * C * C  # block 0's q, k, v see the frozen embeddings: no input gradient at all
        backward = (L * linears - qkv_block0  # input gradients of the frozen linears, never their weight gradients
                    + 2 * L * attention  # attention has no weights: both operands get gradients
                    + head  # the input gradient of the frozen head
                    + 3 * L * thin)  # dh, dA and dB of every adapter
        out.update(forward=forward + L * (thin + merges), backward=backward)
    out["step"] = out["forward"] + out["backward"]
    return out


def profile_matmuls(model: Any, opt: Any, x: Any, y: Any, r: int, steps: int = 3) -> dict[str, Any]:
    """Run ``steps`` training steps inside ``engine.count_matmuls``, to count the FLOPs of every product the engine
    really does and to time them by kind: the (B, nh, T, ·) attention products, the products with a rank-r side
    (x @ A, h @ B and their gradients; LoRA only) and the dense ones (x @ W, the head, and their gradients).
    Returns FLOPs per step and, per kind, seconds/calls/GFLOP per step."""
    kinds: dict[str, dict[str, Any]] = {}
    totals: list[int] = []
    for _ in range(steps):
        with engine.count_matmuls(sync=_sync) as counted:
            _step(model, opt, x, y)
        totals.append(counted.flops)
        for a, b, _, flop, dt in counted.products:
            kind = "attention" if len(a) == 4 else "rank-r" if _is_rank_r(a, b, r) else "dense"
            k = kinds.setdefault(kind, {"seconds": 0.0, "calls": 0, "flops": 0})
            k["seconds"], k["calls"], k["flops"] = k["seconds"] + dt, k["calls"] + 1, k["flops"] + flop
    if len(set(totals)) != 1:
        raise AssertionError(f"the steps did different matmul FLOPs: {totals}")
    per_step = {kind: {"seconds": k["seconds"] / steps, "calls": k["calls"] // steps, "flops": k["flops"] // steps,
                       "flop_per_s": k["flops"] / k["seconds"]} for kind, k in sorted(kinds.items())}
    return {"flops_per_step": totals[0], "steps": steps, "by_kind": per_step}


def _is_rank_r(a: tuple[int, ...], b: tuple[int, ...], r: int) -> bool:
    """A product with a thin side: one of its three dimensions is r (or a multiple up to 3r for fused q, k, v)."""
    return any(d in (r, 2 * r, 3 * r) for d in (a[-2], a[-1], b[-1]))


def _step(model: Any, opt: Any, x: Any, y: Any) -> None:
    opt.zero_grad()
    _, loss = model(x, y)
    loss.backward()
    opt.step()


def _sync() -> None:
    if backend.get_backend() == "cupy":
        backend.xp.cuda.get_current_stream().synchronize()


def matmul_seconds(n: int = 1024, reps: int = 20) -> list[float]:
    """Seconds of each of ``reps`` (n, n) @ (n, n) float32 products on the active backend, after 3 untimed."""
    gen = backend.rng(0)
    a, b = (backend.randn(gen, (n, n)) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        _sync()
        times.append(time.perf_counter() - t0)
    return times


def machine() -> dict[str, Any]:
    import numpy

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        blas = numpy.show_config(mode="dicts")["Build Dependencies"]["blas"]
        blas = f"{blas.get('name')} {blas.get('version')}"
    except Exception:
        blas = "unknown"
    return {"nproc": os.cpu_count(), "cpu": cpu, "numpy": numpy.__version__, "blas": blas,
            "python": platform.python_version(), "platform": platform.platform(), "backend": backend.get_backend(),
            "threads_env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS") if k in os.environ},
            "blas_threads": blas_threads(), **backend.device_info()}


def blas_threads() -> int | None:
    """The threads BLAS uses now, from threadpoolctl (an optional benchmark dependency); None without it."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    return max((p["num_threads"] for p in threadpool_info() if p.get("user_api") == "blas"), default=None)


@contextlib.contextmanager
def limit_blas_threads(n: int | None) -> Iterator[None]:
    """Pin BLAS to ``n`` threads for the block (threadpoolctl); ``None`` leaves the library's default."""
    if n is None:
        yield
        return
    from threadpoolctl import threadpool_limits  # asked for explicitly: a missing package is an error here

    with threadpool_limits(limits=n, user_api="blas"):
        yield


def _loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    backend.set_backend(args.backend)
    setup = CONFIGS[args.config]
    cfg, B = setup["config"], setup["batch_size"]
    T = cfg.block_size
    gen = backend.rng(0)
    x, y = (gen.integers(0, cfg.vocab_size, size=(B, T)) for _ in range(2))  # fixed random token ids, int64

    load_before = _loadavg()
    matmul_times = matmul_seconds()  # before the steps, and again after them: the machine may drift
    models = {mode: build(cfg, mode) for mode in MODES}
    result: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "config_name": args.config, "quick": args.config == "quick", "config": asdict(cfg), "batch_size": B,
        "tokens_per_step": B * T, "lora": MODES["lora"].to_dict(), "adamw": ADAMW,
        "machine": machine(), "modes": {},
    }

    for mode, (model, opt) in models.items():
        for _ in range(args.warmup):
            _step(model, opt, x, y)
        matmuls = profile_matmuls(model, opt, x, y, MODES["lora"].r)  # after the warm-up, before the timed steps
        analytic = step_flops(cfg, B, T, mode, MODES["lora"].r)
        if matmuls["flops_per_step"] != analytic["step"]:
            raise AssertionError(f"{mode}: analytic {analytic['step']} FLOPs, engine {matmuls['flops_per_step']}")
        _sync()
        result["modes"][mode] = {"flops": analytic, "matmuls": matmuls, "times": []}

    for i in range(args.steps):  # alternate the modes: drift of the machine hits both alike
        for mode, (model, opt) in models.items():
            t0 = time.perf_counter()
            _step(model, opt, x, y)
            _sync()
            result["modes"][mode]["times"].append(time.perf_counter() - t0)
        print(f"step {i + 1}/{args.steps}: " + ", ".join(f"{m} {r['times'][-1]:.3f} s"
                                                         for m, r in result["modes"].items()), file=sys.stderr)

    matmul_times += matmul_seconds()
    flop = 2 * 1024**3
    matmul = {"n": 1024, "reps": len(matmul_times), "median": flop / statistics.median(matmul_times),
              "best": flop / min(matmul_times), "worst": flop / max(matmul_times)}
    result["matmul_1024_float32_flops"] = matmul
    for r in result["modes"].values():
        times = r["times"]
        med = statistics.median(times)
        r["step_seconds"] = {"median": med, "min": min(times), "max": max(times)}
        r["tokens_per_s"] = B * T / med
        r["flop_per_s"] = r["flops"]["step"] / med
        r["mfu"] = r["flop_per_s"] / matmul["median"]
        matmul_s = sum(k["seconds"] for k in r["matmuls"]["by_kind"].values())
        r["outside_matmul_seconds"] = med - matmul_s  # elementwise work, copies, Python: the step minus its products
    result["lora_over_full_step_time"] = (result["modes"]["lora"]["step_seconds"]["median"]
                                         / result["modes"]["full"]["step_seconds"]["median"])
    result["load_average"] = {"before": load_before, "after_timing": _loadavg()}

    x, y = backend.to_device(x), backend.to_device(y)  # the batch on the device before the measured step
    for mode, (model, _) in models.items():  # memory last: watching the allocator slows the step down
        ledger = memory.ledger_of(model, B, T)
        model, opt = build(cfg, mode)  # a fresh model
        measured = memory.measure_step(model, opt, x, y).to_dict()
        result["modes"][mode]["memory"] = {"analytic": ledger.to_dict(), "measured": measured}
    return result


def report(result: dict[str, Any]) -> str:
    m, gf = result["machine"], 1e9
    mm = result["matmul_1024_float32_flops"]
    lines = [f"{m['cpu']}, {m['nproc']} cores, numpy {m['numpy']} ({m['blas']}, {m['blas_threads']} BLAS threads), "
             f"backend {m['backend']}",
             f"matmul 1024x1024 float32: {mm['median'] / gf:.1f} GFLOP/s median of {mm['reps']} "
             f"(best {mm['best'] / gf:.1f}, worst {mm['worst'] / gf:.1f}); MFU is against the median",
             f"batch {result['batch_size']} x {result['config']['block_size']} tokens, "
             f"{len(result['modes']['full']['times'])} timed steps per mode",
             "",
             f"{'mode':<6} {'median s':>9} {'min s':>8} {'max s':>8} {'tokens/s':>9} {'GFLOP':>7} {'GFLOP/s':>8} "
             f"{'MFU':>6}"]
    for mode, r in result["modes"].items():
        s = r["step_seconds"]
        lines.append(f"{mode:<6} {s['median']:>9.3f} {s['min']:>8.3f} {s['max']:>8.3f} {r['tokens_per_s']:>9.0f} "
                     f"{r['flops']['step'] / gf:>7.2f} {r['flop_per_s'] / gf:>8.1f} {r['mfu']:>6.1%}")
    lines.append(f"LoRA / full step time: {result['lora_over_full_step_time']:.3f}")
    lines.append("outside matrix products (median step - the instrumented steps' matmul seconds): " + ", ".join(
        f"{mode} {r['outside_matmul_seconds']:.3f} s" for mode, r in result["modes"].items()))
    full, lora = result["modes"]["full"]["flops"], result["modes"]["lora"]["flops"]
    bench = "" if result["config_name"] != "bench" else (
        " (BENCH.md: {forward}, {full}, {lora} + the A/B products)".format(**BENCH_MD_GFLOP))
    lines.append(f"GFLOP: forward {full['forward'] / gf:.2f}, full step {full['step'] / gf:.2f}, LoRA step "
                 f"{lora['step'] / gf:.2f}{bench}; both equal the engine's own matmul count")
    lines += ["", "matmul time per step by kind (instrumented steps):",
              f"{'mode':<6} {'kind':<10} {'calls':>6} {'GFLOP':>7} {'seconds':>8} {'GFLOP/s':>8}"]
    for mode, r in result["modes"].items():
        for kind, k in r["matmuls"]["by_kind"].items():
            lines.append(f"{mode:<6} {kind:<10} {k['calls']:>6} {k['flops'] / gf:>7.2f} {k['seconds']:>8.3f} "
                         f"{k['flop_per_s'] / gf:>8.1f}")
    for mode, r in result["modes"].items():
        mem = r["memory"]
        lines.append("")
        if "measured" in mem:
            lines.append(memory.format_comparison({"mode": mode, **mem}))
        else:
            a = mem["analytic"]
            lines.append(f"{mode}: analytic " + ", ".join(f"{c} {a[c] / 2**20:.1f}" for c in (*memory.CATEGORIES,
                                                                                              "total")) + " MiB")
    return "\n".join(lines)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a command-line error is one line on stderr (no usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def out_file(text: str) -> Path:
    """The type of every benchmark's ``--out``: a file that may be written (not a folder, not read-only, in a
    writable folder), checked as the arguments are read, before any work, by the command line's own check."""
    try:
        check_writable_file(Path(text), "the file")
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return Path(text)


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per mode before timing (default 3)")
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    p.add_argument("--config", choices=tuple(CONFIGS), default="bench",
                   help="model size: bench (BENCH.md, default), quick (tiny, a smoke run), d768 (12 x 768, T 256)")
    p.add_argument("--quick", action="store_const", const="quick", dest="config", help="the same as --config quick")
    p.add_argument("--out", type=out_file, default=None,
                   help="JSON results file (default benchmarks/results/bench_step.json, or bench_step_CONFIG.json for "
                        "another --config)")
    p.add_argument("--threads", type=int, default=None, help="pin BLAS to this many threads (needs threadpoolctl)")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    try:
        backend.set_backend(args.backend)  # a missing CuPy or GPU: one line, before any work
    except RuntimeError as e:
        p.error(str(e))
    with limit_blas_threads(args.threads):
        result = run(args)
    name = "" if args.config == "bench" else f"_{args.config}"
    write_result(result, Path(args.out or Path(__file__).parent / "results" / f"bench_step{name}.json"),
                 report(result))
    return 0


def write_result(result: dict[str, Any], out: Path, text: str) -> None:
    """Write ``result`` to ``out`` as JSON (atomically), then print ``text`` and the file's name."""
    write_atomic(out, (json.dumps(result, indent=1) + "\n").encode())
    print(text)
    print(f"\nwrote {out}")


if __name__ == "__main__":
    raise SystemExit(main())
