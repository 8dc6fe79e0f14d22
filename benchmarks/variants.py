"""DoRA, PiSSA and QLoRA against plain LoRA on the sweep's task, each at its own learning rate (issue 20).

    python benchmarks/variants.py --quick              # the quick configuration: seconds
    python benchmarks/variants.py --out results/variants.json   # the sweep's full configuration (r = 8 on q, v)
    python benchmarks/variants.py --r 4 --out benchmarks/results/variants.json

The experiment is ``lora_np.experiments.variants.run_variants``: the same base model, steps and batches for every
method, the learning rate chosen on the validation loss (``search_lr``), the test loss of the chosen run reported.
This script prints one line per method (and one for the untrained 4-bit base) and, with ``--out``, writes the
results as JSON (notebook 10 reads ``results/variants.json``). One seed: the second plain LoRA run (another
initialisation seed) is the yardstick for differences that a seed alone makes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))  # bench_step.py beside this file: the benchmarks' argument checks

from bench_step import OneLineParser, out_file  # noqa: E402

from lora_np.checkpoint import write_atomic
from lora_np.experiments.runs import ExperimentConfig
from lora_np.experiments.summary import chosen_runs
from lora_np.experiments.variants import run_variants


def report(results: dict[str, Any]) -> str:
    """The table this script prints: per method its chosen rate, losses and cost; then each variant against plain
    LoRA, next to the gap between plain LoRA's two seeds."""
    runs, base = chosen_runs(results), results["base"]
    lines = [f"{'method':<16} {'lr':>7} {'interior':>8} {'val':>7} {'test':>7} {'pretrain':>8} {'trainable':>9} "
             f"{'s/step':>7}",
             f"{'base':<16} {'':>7} {'':>8} {base['finetune_val_loss']:>7.4f} {base['finetune_test_loss']:>7.4f} "
             f"{base['pretrain_val_loss']:>8.4f} {0:>9,} {'':>7}"]
    for q in results.get("quantized_bases", []):  # the base in 4 bits, untrained: what quantizing alone cost
        name = f"base {q['base_quant']['kind']}{'+dq' if q['base_quant']['double_quant'] else ''}"
        lines.append(f"{name:<16} {'':>7} {'':>8} {q['finetune_val_loss']:>7.4f} {q['finetune_test_loss']:>7.4f} "
                     f"{q['pretrain_val_loss']:>8.4f} {0:>9,} {'':>7}")
    for run in runs:
        search = results["lr_search"][run["method"]]
        lines.append(f"{run['method']:<16} {run['lr']:>7.0e} {str(search['interior']):>8} "
                     f"{run['final_val_loss']:>7.4f} {run['test_loss']:>7.4f} {run['pretrain_val_loss']:>8.4f} "
                     f"{run['trainable']:>9,} {run['step_seconds']:>7.4f}")
    plain, *variants, yardstick = runs
    seed_gap = yardstick["test_loss"] - plain["test_loss"]
    lines.append(f"test loss against {plain['method']} (negative: better); a second seed of plain LoRA moved it by "
                 f"{seed_gap:+.4f}:")
    for run in variants:  # one pair of seeds is a yardstick, not an interval: "larger" is no significance test
        gap = run["test_loss"] - plain["test_loss"]
        told = "larger than the seed gap" if abs(gap) > abs(seed_gap) else "within the seed gap: not told apart"
        lines.append(f"  {run['method']:<14} {gap:+.4f} ({told})")
    qlora = next((run for run in variants if run.get("base_quant")), None)
    if qlora is not None and results.get("quantized_bases"):  # does LoRA recover what quantization cost?
        cost = results["quantized_bases"][0]["finetune_test_loss"] - base["finetune_test_loss"]
        lines.append(f"the 4-bit base before training: {cost:+.4f} test loss against the float base; after "
                     f"fine-tuning, {qlora['method']} against {plain['method']}: "
                     f"{qlora['test_loss'] - plain['test_loss']:+.4f}")
    return "\n".join(line.rstrip() for line in lines)


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the quick configuration (ExperimentConfig.quick)")
    p.add_argument("--r", type=int, default=8, help="the rank of every method (default 8)")
    p.add_argument("--out", type=out_file, default=None, help="also write the results as JSON to this file")
    args = p.parse_args(argv)
    cfg = ExperimentConfig.quick() if args.quick else ExperimentConfig()
    results = run_variants(cfg, r=args.r, progress=False)
    print(report(results))
    print(f"({'quick' if args.quick else 'full'} configuration: {cfg.finetune.max_steps} steps of "
          f"{cfg.finetune.batch_size} x {cfg.model.block_size} tokens, targets {','.join(cfg.lora.targets)}, "
          f"alpha {cfg.lora.alpha:g}; {results['seconds']:.0f} s)")
    if args.out:
        write_atomic(args.out, (json.dumps(results, indent=1) + "\n").encode())
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
