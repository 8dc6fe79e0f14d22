"""The papers' arithmetic, recomputed from formulas: Hu et al. 2021 §4.2's GPT-3 175B numbers, and QLoRA's 65B
model fine-tuned on one 48 GB GPU (Dettmers et al. 2023)."""

from __future__ import annotations

from typing import Any

from ..quantize import QuantConfig, stored_nbytes


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


def qlora_65b_example() -> dict[str, dict[str, Any]]:
    """QLoRA (Dettmers et al. 2023, arXiv 2305.14314) for LLaMA-65B, recomputed: "from >780GB of GPU memory to
    <48GB". Each entry: ``value``, ``formula``, and what the paper says. GB = 1e9 bytes.

    Assumptions, each from the paper or its released training script (``qlora.py``; state them when quoting):

    * LLaMA-65B: d = 8192, 80 layers, MLP width 22016, vocabulary 32000; per layer q, k, v, o (d x d) and gate, up
      (d x 22016), down (22016 x d), no biases; embeddings and head not tied. That is 65.3e9 parameters.
    * Full 16-bit fine-tuning: 12 bytes a parameter, 16-bit weight and gradient and 32-bit Adam m and v (the
      accounting that gives the paper's 780 GB; a 32-bit master copy of the weights would add 4 more).
    * QLoRA's base: every block Linear's W in NF4 with double quantization (blocks of 64, scales in 8 bits in
      groups of 256: ``quantize.stored_nbytes``, 0.516 byte a number); embeddings, head and norms in 16 bits.
    * Adapters: r = 64 on every linear layer of every block (the paper's setting for its Guanaco models), stored
      and trained in bf16 (2 bytes, gradient 2 bytes), with 32-bit paged AdamW (m and v: 8 bytes).
    * Not counted: activations. QLoRA trains with gradient checkpointing, so they are a few GB at its sequence
      lengths; paged optimizers move Adam's state to CPU memory when a long batch's activations would not fit,
      which is how the peaks stay under 48 GB. What is left of 48 GB after the parameter-sized state is printed.
    """
    d, n_layer, d_ff, vocab, r = 8192, 80, 22016, 32000, 64
    shapes = [(d, d)] * 4 + [(d, d_ff)] * 2 + [(d_ff, d)]  # q, k, v, o; gate, up; down
    block_linears = n_layer * sum(a * b for a, b in shapes)
    other = 2 * vocab * d + (2 * n_layer + 1) * d  # embeddings, head; two RMSNorms a layer and the final one
    n_params = block_linears + other
    nf4_dq = QuantConfig("nf4", 64, double_quant=True)
    base_4bit = n_layer * sum(stored_nbytes(a * b, nf4_dq) for a, b in shapes) + 2 * other
    no_dq = n_layer * sum(stored_nbytes(a * b, QuantConfig("nf4", 64)) for a, b in shapes) + 2 * other
    lora_params = n_layer * sum(r * (a + b) for a, b in shapes)
    adapter_training = lora_params * (2 + 2 + 8)  # bf16 weights and gradients, 32-bit Adam m and v
    qlora_training = base_4bit + adapter_training
    return {
        "parameters": {"value": n_params, "formula": "80·(4·8192² + 3·8192·22016) + 2·32000·8192 + 161·8192",
                       "paper": "65B"},
        "full_training_bytes": {"value": 12 * n_params, "formula": "65.3e9 × (2 weight + 2 gradient + 8 Adam m, v)",
                                "paper": ">780GB"},
        "bytes_per_4bit_number": {"value": stored_nbytes(d * d, nf4_dq) / (d * d),
                                  "formula": "½ + 1/64 (8-bit scale per 64) + 4/(64·256) (a float32 per 256 scales)",
                                  "paper": "scales: 0.127 bit a parameter with double quantization, 0.5 without (§3)"},
        "base_4bit_bytes": {"value": base_4bit, "formula": "block Linears × 0.516 byte + the rest × 2 bytes",
                            "paper": "(not broken down)"},
        "double_quant_saving": {"value": no_dq - base_4bit, "formula": "block Linears × (4/64 − 1/64 − 4/16384) byte",
                                "paper": "approximately 3 GB for a 65B model (§3)"},
        "lora_parameters": {"value": lora_params, "formula": "80 · 64 · (4·(8192 + 8192) + 3·(8192 + 22016))",
                            "paper": "(r = 64 on all linear layers; count not stated)"},
        "adapter_training_bytes": {"value": adapter_training,
                                   "formula": "LoRA params × (2 bf16 weight + 2 gradient + 8 paged Adam m, v)",
                                   "paper": "(not broken down)"},
        "qlora_training_bytes": {"value": qlora_training, "formula": "4-bit base + adapter training state",
                                 "paper": "<48GB (with activations)"},
        "left_for_activations": {"value": 48e9 - qlora_training, "formula": "48 GB − the above",
                                 "paper": "(gradient checkpointing; paged optimizers absorb the spikes)"},
    }
