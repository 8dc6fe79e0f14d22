"""Many adapters, one batch: tokens/s of a mixed batch of 8 adapters against 8 separate merged models, and the bytes
of 8 adapters against 8 merged copies.

    python benchmarks/multi_adapter.py                  # the sweep's model size (4 layers, 128 channels, T = 64)
    python benchmarks/multi_adapter.py --targets all-linear --rank 16
    python benchmarks/multi_adapter.py --quick          # a tiny model: a smoke run of a second

Eight requests, one per adapter, each a sequence of T tokens, served three ways (inference: no graph, no dropout):

* mixed batch: one base model holding the 8 adapters stacked (``multi_adapter.apply_adapters``), one forward of the
  (8, T) batch with ids 0..7;
* 8 merged models: adapter k merged into its own copy of the base, each forwarding its one request;
* one merged model, batch of 8: all 8 requests through a single adapter, the cost of the base model alone, which
  no mixed batch can beat.

The three alternate within each repeat, so that a machine that gets busier slows all alike; the median of the repeats
is reported. Weights are random (timing does not depend on them); the adapters' factors too, so that ΔW ≠ 0.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

from lora_np import backend, engine
from lora_np.lora import LoRAConfig, apply_lora, merge
from lora_np.model import GPT, GPTConfig
from lora_np.multi_adapter import Adapter, adapter_bytes, apply_adapters, use_adapters

SWEEP = GPTConfig(vocab_size=103, block_size=64, n_layer=4, n_head=4, n_embd=128)  # the sweep's base model
QUICK = GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=32)


def param_bytes(model: GPT) -> int:
    return sum(int(p.data.nbytes) for p in model.parameters())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--targets", default="q,v")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    cfg, K = (QUICK if args.quick else SWEEP), args.adapters

    base = GPT(cfg)
    lora_models = []
    for k in range(K):
        m = apply_lora(copy.deepcopy(base), LoRAConfig(r=args.rank, alpha=2.0 * args.rank, targets=args.targets,
                                                       seed=k))
        gen = backend.rng(100 + k)
        for layer in (mod for _, mod in m.named_modules() if hasattr(mod, "B") and hasattr(mod, "merged")):
            layer.B.data = backend.randn(gen, layer.B.shape, 0.02)  # as after training: ΔW ≠ 0
        lora_models.append(m)
    multi = apply_adapters(copy.deepcopy(base), [Adapter.of(m) for m in lora_models])
    for m in lora_models:
        merge(m)

    T = cfg.block_size
    idx = backend.rng(0).integers(0, cfg.vocab_size, size=(K, T))
    ids = list(range(K))

    def mixed() -> None:
        with use_adapters(multi, ids):
            multi(idx)

    def separate() -> None:
        for k, m in enumerate(lora_models):
            m(idx[k: k + 1])

    def one_adapter() -> None:
        lora_models[0](idx)

    ways = {"mixed batch (1 base + 8 adapters)": mixed, "8 merged models, 1 request each": separate,
            "1 merged model, batch of 8 (floor)": one_adapter}
    times: dict[str, list[float]] = {name: [] for name in ways}
    with engine.no_grad():
        for fn in ways.values():  # warm-up
            fn()
        for _ in range(args.repeats):
            for name, fn in ways.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)

    print(f"model: {cfg.n_layer} layers, {cfg.n_embd} channels, T = {T}; {K} adapters, r = {args.rank}, "
          f"targets {args.targets}; {K} requests of {T} tokens; median of {args.repeats} repeats, "
          f"backend {backend.get_backend()}")
    print(f"\n{'serving':<36} {'ms':>8} {'tokens/s':>10}")
    for name, ts in times.items():
        s = statistics.median(ts)
        print(f"{name:<36} {1e3 * s:>8.2f} {K * T / s:>10,.0f}")

    base_bytes, stacks = param_bytes(base), adapter_bytes(multi)
    print(f"\n{'memory':<36} {'bytes':>12}")
    print(f"{'one base model':<36} {base_bytes:>12,}")
    print(f"{f'{K} adapters, stacked':<36} {stacks:>12,}")
    print(f"{f'1 base + {K} adapters':<36} {base_bytes + stacks:>12,}")
    print(f"{f'{K} merged copies':<36} {K * param_bytes(lora_models[0]):>12,}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
