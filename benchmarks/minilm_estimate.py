"""Estimate how long the full MiniLM lab (``python -m lora_np minilm``) takes, without running it.

    python benchmarks/minilm_estimate.py            # times 4 full-size steps of every method
    python benchmarks/minilm_estimate.py --steps 8

It runs the lab's own code (``experiments.minilm``: the same data, batches and models) for a few of the full run's
training steps of every method (after one untimed step), one validation pass and one measured-memory step each,
and multiplies out: every method trains ``len(grid)`` times for ``cfg.steps`` steps, is evaluated on validation
after each run and on test once, and has one measured step.

Time is CPU time of this process with BLAS pinned to ONE thread (threadpoolctl), not wall time: on a shared
machine the wall clock measures the neighbours, while one-thread CPU time is close to what an idle core takes.
With two idle cores (BLAS on two threads) the full run takes at most that, so the estimate is an upper bound.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

from threadpoolctl import threadpool_limits

from lora_np.bert import load_minilm
from lora_np.data import GENRES
from lora_np.experiments import minilm as lab


def cpu(fn, *args):
    """(CPU seconds of ``fn(*args)``, its result)."""
    start = time.process_time()
    out = fn(*args)
    return time.process_time() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="timed training steps per method")
    args = parser.parse_args()
    cfg = lab.MiniLMConfig()
    head_lr, lora_lr, full_lr = cfg.head_lrs[1], cfg.lora_lrs[1], cfg.full_lrs[1]
    total = 0.0
    with threadpool_limits(limits=1, user_api="blas"):
        t, base = cpu(load_minilm, cfg.max_length)
        t2, (data, _) = cpu(lab.load_data, cfg, base.tokenizer)
        total += t + t2
        print(f"loading {t + t2:.1f} s")
        batches = lab.batch_order(cfg, len(data["train"]))
        few = replace(cfg, steps=args.steps, warmup_steps=1)
        for method in lab.methods(cfg):
            model = lab.build(base, method, len(GENRES), cfg.seed)
            enc_lr = None if method.kind == "probe" else lora_lr if method.kind == "lora" else full_lr
            lab.train_run(model, data["train"], batches[:1], replace(few, steps=1), head_lr, enc_lr)  # warm-up
            step, _ = cpu(lab.train_run, model, data["train"], batches[1 : args.steps + 1], few, head_lr, enc_lr)
            step /= args.steps
            val, _ = cpu(lab.accuracy, model, data["val"], cfg.eval_batch_size)
            test = val * len(data["test"]) / len(data["val"])  # the same forward passes, on more verses
            mem, _ = cpu(lab.measure_memory, model, data["train"], batches[0], head_lr, enc_lr)
            runs = len(cfg.head_lrs if method.kind == "probe" else cfg.lora_lrs if method.kind == "lora"
                       else cfg.full_lrs)
            seconds = runs * (cfg.steps * step + val) + test + mem
            total += seconds
            print(f"{method.name:<12} {step:.3f} CPU s/step, validation pass {val:.1f} s, memory step {mem:.1f} s: "
                  f"{runs} runs x {cfg.steps} steps -> {seconds:.0f} s")
    print(f"estimated full lab: {total:.0f} CPU seconds on one core = {total / 60:.1f} min (an upper bound on 2 "
          f"idle cores)")


if __name__ == "__main__":
    main()
