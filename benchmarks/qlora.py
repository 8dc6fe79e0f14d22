"""A 4-bit frozen base (QLoRA): bytes of W, reconstruction error of NF4 against 4-bit uniform, and the loss of the
sweep's base model before and after quantization.

    python benchmarks/qlora.py             # Gaussian weights + the sweep's base model (pretrained ~3 min if not cached)
    python benchmarks/qlora.py --quick     # Gaussian weights + the quick experiment's base: seconds

Per storage (NF4 or 16 evenly spaced levels, absmax blocks of 64, with or without double quantization of the scales):
bytes of W per number (codes and scales, as stored), and the reconstruction error ŵ - w as an RMS and a maximum,
each relative to the weights' own RMS and maximum |w|, on N(0, 0.02²) weights (GPT-2's initialisation; 1024 x 1024)
and on the base model's block Linears (q, k, v, o, up, down, pooled). Then the validation loss of the base model on
its pretraining text and on the fine-tuning text, float and with every block Linear stored in 4 bits
(``qlora.quantize_base``), and the seconds that evaluation took (each forward dequantizes every block weight).
"""

from __future__ import annotations

import argparse
import copy
import time

from lora_np import backend
from lora_np.experiments import runs
from lora_np.lora import TARGETS, target_layers
from lora_np.qlora import quantize_base, weight_bytes
from lora_np.quantize import QuantConfig, quantize
from lora_np.train import evaluate

STORAGES = [QuantConfig(kind, 64, dq) for kind in ("nf4", "uniform4") for dq in (False, True)]


def label(c: QuantConfig) -> str:
    return f"{c.kind}{' + dq' if c.double_quant else ''}"


def errors(weights: list, config: QuantConfig) -> dict[str, float]:
    """Bytes per number and the relative RMS and max error of ``weights`` (host arrays) stored with ``config``."""
    np = backend.np
    stored = [quantize(w, config) for w in weights]
    diff = np.concatenate([(backend.to_numpy(q.dequantize()) - w).ravel() for q, w in zip(stored, weights)])
    flat = np.concatenate([w.ravel() for w in weights])
    return {"bytes_per_number": sum(q.nbytes for q in stored) / flat.size,
            "rms_error": float(np.sqrt(np.mean(diff**2)) / np.sqrt(np.mean(flat**2))),
            "max_error": float(np.abs(diff).max() / np.abs(flat).max())}


def print_errors(title: str, weights: list) -> None:
    print(f"\n{title}: {sum(w.size for w in weights):,} numbers")
    print(f"{'storage':<14} {'bytes/number':>12} {'RMS error / RMS w':>18} {'max error / max |w|':>20}")
    print(f"{'float32':<14} {4.0:>12.4f} {0.0:>18.4f} {0.0:>20.4f}")
    for c in STORAGES:
        e = errors(weights, c)
        print(f"{label(c):<14} {e['bytes_per_number']:>12.4f} {e['rms_error']:>18.4f} {e['max_error']:>20.4f}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="the quick experiment's tiny base and a 256 x 256 W")
    p.add_argument("--eval-batches", type=int, default=32, help="validation batches of 16 windows per loss")
    args = p.parse_args(argv)

    n = 256 if args.quick else 1024
    gaussian = [(backend.rng(0).standard_normal((n, n)) * 0.02).astype(backend.np.float32)]
    print_errors(f"Gaussian W ({n} x {n}, N(0, 0.02²))", gaussian)

    cfg = runs.ExperimentConfig.quick() if args.quick else runs.ExperimentConfig()
    corpora = runs.load_corpora(cfg)
    base, info = runs.pretrain_base(cfg, corpora, progress=False)
    print(f"\nbase model: {info['path']} ({'cached' if info['cached'] else 'pretrained now'})")
    print_errors("its block Linears (q, k, v, o, up, down)",
                 [backend.to_numpy(layer.weight.data) for *_, layer in target_layers(base, TARGETS)])

    T, texts = cfg.model.block_size, {"pretrain val": corpora.pretrain[1], "finetune val": corpora.finetune[1]}
    print(f"\nvalidation loss (nats per character, {args.eval_batches} batches of 16 x {T})")
    print(f"{'storage':<14} {'bytes of W':>12} " + " ".join(f"{t:>13}" for t in texts) + f" {'seconds':>8}")
    for c in [None, *STORAGES]:
        model = copy.deepcopy(base)
        if c is not None:
            quantize_base(model, c)
        t0 = time.perf_counter()
        losses = [evaluate(model, ids, T, 16, args.eval_batches) for ids in texts.values()]
        seconds = time.perf_counter() - t0
        print(f"{'float32' if c is None else label(c):<14} {weight_bytes(model)['bytes']:>12,} "
              + " ".join(f"{v:>13.4f}" for v in losses) + f" {seconds:>8.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
