"""Time the training step of two checkouts of lora_np in ONE process, steps alternating, on the bench configuration.

    python benchmarks/compare_versions.py /path/to/old/checkout            # this checkout against an older one
    python benchmarks/compare_versions.py OLD --new NEW --steps 20 --mode lora

Made for the before/after of each optimisation in benchmarks/README.md: on a shared machine two separate runs can
differ by more than the change being measured, while steps that alternate within one process see the same load.
Each checkout's ``lora_np`` is imported under its own name (``lora_np_old``, ``lora_np_new``), so both live side by
side; the ratio new / old of the median step time is what to read.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from bench_step import ADAMW, BENCH, MODES, limit_blas_threads  # noqa: E402


def load(checkout: Path, name: str) -> Any:
    """Import ``checkout/lora_np`` as the package ``name`` (its relative imports resolve inside it)."""
    spec = importlib.util.spec_from_file_location(name, checkout / "lora_np" / "__init__.py",
                                                  submodule_search_locations=[str(checkout / "lora_np")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    for sub in ("backend", "memory", "lora", "model", "optim"):
        importlib.import_module(f"{name}.{sub}")
    return module


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("old", type=Path, help="the checkout to compare against")
    p.add_argument("--new", type=Path, default=Path(__file__).resolve().parent.parent, help="default: this one")
    p.add_argument("--mode", choices=("full", "lora"), default="full")
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="pin BLAS to this many threads (needs threadpoolctl)")
    args = p.parse_args(argv)
    with limit_blas_threads(args.threads):
        return compare(args)


def _build(pkg: Any, model_cfg: Any, mode: str) -> tuple[Any, Any]:
    """The bench model of ``mode`` and its AdamW, in a checkout of either API: ``lora.prepare_finetuning`` (since
    LoRAConfig) or the older ``memory.build``."""
    if hasattr(pkg.lora, "prepare_finetuning"):
        lora = None if mode == "full" else pkg.lora.LoRAConfig(**MODES["lora"].to_dict())
        model = pkg.lora.prepare_finetuning(pkg.model.GPT(model_cfg), lora)
        return model, pkg.optim.AdamW(model.trainable_parameters(), **ADAMW)
    lora = {} if mode == "full" else {"lora_r": MODES["lora"].r, "lora_alpha": MODES["lora"].alpha,
                                       "lora_targets": MODES["lora"].targets}
    return pkg.memory.build(model_cfg, mode, **lora, **ADAMW)


def compare(args: argparse.Namespace) -> int:
    cfg, B = BENCH["config"], BENCH["batch_size"]
    runs = {}
    for label, path in (("old", args.old), ("new", args.new)):
        pkg = load(path.resolve(), f"lora_np_{label}")
        fields = pkg.model.GPTConfig.__dataclass_fields__  # an older checkout may lack newer fields (at defaults)
        model_cfg = pkg.model.GPTConfig(**{k: v for k, v in vars(cfg).items() if k in fields})
        model, opt = _build(pkg, model_cfg, args.mode)
        gen = pkg.backend.rng(0)
        x, y = (gen.integers(0, cfg.vocab_size, size=(B, cfg.block_size)) for _ in range(2))
        runs[label] = (model, opt, x, y, [])

    def step(model: Any, opt: Any, x: Any, y: Any) -> None:
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step()

    for i in range(args.warmup + args.steps):
        for model, opt, x, y, times in runs.values():
            t0 = time.perf_counter()
            step(model, opt, x, y)
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
    med = {label: statistics.median(r[4]) for label, r in runs.items()}
    for label, r in runs.items():
        print(f"{label}: median {med[label]:.3f} s, min {min(r[4]):.3f} s, max {max(r[4]):.3f} s ({args.mode})")
    print(f"new / old (medians): {med['new'] / med['old']:.3f};  (minima): "
          f"{min(runs['new'][4]) / min(runs['old'][4]):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
