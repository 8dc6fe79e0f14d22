"""Helpers shared by the test modules, defined once: a tiny GPT, a tiny GPT with trained-looking LoRA factors, and
snapshots to check that a refused call changed nothing (in a model, or on disk).

Test modules import them with ``from helpers import ...``: tests/ has no ``__init__.py``, so pytest puts the
folder on ``sys.path`` when it imports a test module from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from lora_np.lora import LoRAConfig, apply_lora, lora_layers
from lora_np.model import GPT, GPTConfig
from lora_np.nn import Module

TINY = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)  # 2000 parameters: fast everywhere


def tiny_gpt(seed: int = 0, **overrides: Any) -> GPT:
    """``GPT`` of the TINY config (``overrides`` replace its fields); the same seed gives the same weights."""
    return GPT(GPTConfig(**{**TINY, "seed": seed, **overrides}))


def perturb_adapters(model: Module, seed: int = 0, std: float = 0.1) -> None:
    """Give every A and B random values, as after some training, so that ΔW ≠ 0."""
    rng = np.random.default_rng(seed)
    for m in lora_layers(model).values():
        m.A.data[...] = rng.standard_normal(m.A.shape) * std
        m.B.data[...] = rng.standard_normal(m.B.shape) * std


def adapted_gpt(targets: str = "q,v", r: int = 2, seed: int = 0, **lora: Any) -> GPT:
    """A tiny GPT (base weights from ``seed``) with LoRA(``targets``, r, alpha=4 and ``lora``'s other fields),
    whose factors hold random values (as after training), so that ΔW ≠ 0."""
    model = apply_lora(tiny_gpt(seed), LoRAConfig(targets=targets, r=r, alpha=4.0, **lora))
    perturb_adapters(model, seed=100 + seed, std=0.3)
    return model


# --- nothing changed ---------------------------------------------------------------------------------------------


def snapshot(model: Module) -> dict[str, Any]:
    """Everything a refused call could have changed: every parameter's values and dtype, the parameter set (names,
    ids) with its requires_grad flags, the module types, each LoRA layer's state and the model's LoRA config."""
    return {
        "state": model.state_dict(),
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "modules": [(n, type(m).__name__, m.training) for n, m in model.named_modules()],
        "lora": {n: (m.merged, id(m.A), id(m.B), m.config) for n, m in lora_layers(model).items()},
        "lora_config": getattr(model, "lora_config", None),
    }


def assert_untouched(before: dict[str, Any], model: Module) -> None:
    """``model`` is exactly as ``snapshot`` saw it: bit for bit, flag for flag."""
    after = snapshot(model)
    assert list(after["state"]) == list(before["state"])
    for name, arr in before["state"].items():
        assert after["state"][name].dtype == arr.dtype, f"{name}: dtype changed"
        assert np.array_equal(after["state"][name], arr), f"{name} changed"
    changed = [(b, a) for b, a in zip(before["params"], after["params"]) if b != a]
    assert not changed, f"parameters or requires_grad flags changed (before, after): {changed[:3]}"
    for key in ("modules", "lora", "lora_config"):
        assert after[key] == before[key], key


def snapshot_files(folder: Path) -> dict[str, bytes]:
    """relative path -> bytes of every file under ``folder`` (hidden ones included: a temporary file counts)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def assert_files_untouched(before: dict[str, bytes], folder: Path) -> None:
    """No file under ``folder`` appeared, disappeared or changed since ``snapshot_files``."""
    after = snapshot_files(folder)
    new, gone = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    changed = sorted(n for n in set(before) & set(after) if after[n] != before[n])
    assert not (new or gone or changed), f"files on disk: new {new}, gone {gone}, changed {changed}"
