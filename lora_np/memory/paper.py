"""The paper's arithmetic: Hu et al. 2021 §4.2's GPT-3 175B numbers, recomputed from formulas."""

from __future__ import annotations

from typing import Any


def gpt3_example() -> dict[str, dict[str, Any]]:
    """Hu et al. §4.2 ("Practical Benefits") for GPT-3 175B, recomputed: each entry has the ``value``, the
    ``formula`` it comes from, and what the paper says. fp16 (2 bytes a number); GB = 1e9 bytes, MB = 1e6.

    The adapter: r = 4 on W_q and W_v of all 96 layers, so L̂ = 192 adapted d x d matrices (d = 12288), each
    with 2·d·r numbers: 18.9 M parameters, 37.7 MB (36.0 MiB), a 9,272× reduction from 350 GB. The paper's
    "35MB" equals 350 GB / 10,000, its rounded "roughly 10,000×"; no unit (MB or MiB) makes the formula give 35.
    Training VRAM: frozen weights need no gradient and no Adam moments. Weights + Adam's m and v in fp16 is
    3 × 350 GB = 1.05 TB, and LoRA keeps only the first third: the paper's "up to 2/3". The paper's measured
    1.2 TB (full) and 350 GB (LoRA) also hold activations and whatever else its setup stores, which it does not
    break down; the formulas give the parameter-sized part.
    """
    n_params, d, n_layer, r, fp16 = 175e9, 12288, 96, 4, 2
    L_hat = n_layer * 2  # adapted matrices: W_q and W_v in every layer
    lora_params = 2 * L_hat * d * r  # A (d, r) and B (r, d) per matrix
    full_ckpt, lora_ckpt = n_params * fp16, lora_params * fp16
    return {
        "lora_parameters": {"value": lora_params, "formula": "2·L̂·d·r = 2·(96·2)·12288·4",
                            "paper": "(not stated for this setting)"},
        "full_checkpoint_bytes": {"value": full_ckpt, "formula": "175e9 params × 2 bytes (fp16)", "paper": "350GB"},
        "lora_checkpoint_bytes": {"value": lora_ckpt, "formula": "2·L̂·d·r × 2 bytes = 37.7 MB = 36.0 MiB",
                                  "paper": "35MB (= 350GB / 10,000, 'roughly 10,000×')"},
        "checkpoint_reduction": {"value": full_ckpt / lora_ckpt, "formula": "350 GB / 37.7 MB",
                                 "paper": "roughly 10,000×"},
        "full_training_bytes": {"value": 3 * full_ckpt, "formula": "weights + Adam m + v = 3 × 175e9 × 2 bytes",
                                "paper": "1.2TB (measured; includes activations)"},
        "full_training_bytes_with_grads": {"value": 4 * full_ckpt,
                                           "formula": "weights + gradients + Adam m + v = 4 × 175e9 × 2 bytes",
                                           "paper": "(not given)"},
        "lora_training_bytes": {"value": full_ckpt + 3 * lora_ckpt,
                                "formula": "frozen weights + adapter (weights + Adam m + v) = 350 GB + 3 × 37.7 MB",
                                "paper": "350GB"},
        "vram_saving": {"value": 1 - (full_ckpt + 3 * lora_ckpt) / (3 * full_ckpt),
                        "formula": "1 − LoRA / (weights + m + v)", "paper": "up to 2/3"},
    }
