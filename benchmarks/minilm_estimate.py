"""Estimate how long the full MiniLM lab (``python -m lora_np minilm``) takes, without running it.

    python benchmarks/minilm_estimate.py            # times 4 full-size steps of every method
    python benchmarks/minilm_estimate.py --steps 8

It runs the lab's own code (``experiments.minilm``: the same data, batches and models) for a few of the full run's
training steps of every method (after one untimed step; batches drawn as the lab draws them, bucketed by length),
one validation pass and one measured-memory step each, times the probe (embeddings once, one logistic regression
per L2 strength), and multiplies out: every encoder method trains ``len(grid) + len(seeds) - 1`` times for
``cfg.steps`` steps (a search that steps past its grid's edge adds up to ``lr_extend`` more: the estimate is
for an interior choice), is evaluated on validation after each run and on test once per seed, and has one
measured step.

Time is CPU time of this process with BLAS pinned to ONE thread (the thread variables below, set before NumPy
loads), not wall time: on a shared
machine the wall clock measures the neighbours, while one-thread CPU time is close to what an idle core takes.
With two idle cores (BLAS on two threads) the full run takes at most that, so the estimate is an upper bound.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import replace

for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # one BLAS thread: set before NumPy
    os.environ[_name] = "1"  # loads (lora_np imports it below), which is why these imports come after

from lora_np.bert import load_minilm  # noqa: E402
from lora_np.experiments import minilm as lab  # noqa: E402
from lora_np.experiments.genres import GENRES  # noqa: E402


def cpu(fn, *args):
    """(CPU seconds of ``fn(*args)``, its result)."""
    start = time.process_time()
    out = fn(*args)
    return time.process_time() - start, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per method")
    args = parser.parse_args()
    cfg = lab.MiniLMConfig()
    total = 0.0
    t, base = cpu(load_minilm, cfg.max_length)
    t2, (data, _) = cpu(lab.load_data, cfg, base.tokenizer)
    total += t + t2
    print(f"loading {t + t2:.1f} s")
    t, feats = cpu(lab.embeddings, base, data["train"], cfg.eval_batch_size)
    embed = t * (len(data["train"]) + len(data["val"]) + len(data["test"])) / len(data["train"])
    fit, (head, _) = cpu(lab.fit_probe, feats, data["train"].labels, cfg.probe_l2s[0], cfg)
    total += embed + len(cfg.probe_l2s) * fit
    print(f"probe        embeddings {embed:.1f} s, {len(cfg.probe_l2s)} fits x {fit:.1f} s")
    batches = lab.batch_order(cfg, data["train"].lengths(), cfg.seeds[0])
    few = replace(cfg, steps=args.steps, warmup_steps=1)
    for method in lab.methods(cfg)[1:]:
        model = lab.build(base, method, len(GENRES), cfg.seeds[0], head=head)
        grid = cfg.lora_lrs if method.kind == "lora" else cfg.full_lrs
        lr = grid[1]
        lab.train_run(model, data["train"], batches[:1], replace(few, steps=1), lr)  # warm-up
        step, _ = cpu(lab.train_run, model, data["train"], batches[1 : args.steps + 1], few, lr)
        step /= args.steps
        val, _ = cpu(lab.scores, model, data["val"], cfg.eval_batch_size)
        test = val * len(data["test"]) / len(data["val"])  # the same forward passes, on more verses
        mem, _ = cpu(lab.measure_memory, model, data["train"], batches[0], lr)
        runs = len(grid) + len(cfg.seeds) - 1
        seconds = runs * (cfg.steps * step + val) + len(cfg.seeds) * test + mem
        total += seconds
        print(f"{method.name:<12} {step:.3f} CPU s/step, validation pass {val:.1f} s, memory step {mem:.1f} s: "
              f"{runs} runs x {cfg.steps} steps -> {seconds:.0f} s")
    print(f"estimated full lab: {total:.0f} CPU seconds on one core = {total / 60:.1f} min (an upper bound on 2 "
          f"idle cores)")


if __name__ == "__main__":
    main()
