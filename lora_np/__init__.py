"""lora_np: LoRA (Hu et al. 2021, arXiv 2106.09685) built from scratch on NumPy, for teaching.

The LoRA API in one import::

    from lora_np import GPT, GPTConfig, LoRAConfig, apply_lora, merge, save_adapter
"""

from . import backend
from .checkpoint import load_adapter, load_model, save_adapter, save_model
from .engine import Tensor, concat, no_grad, split, stack, where
from .lora import LoRAConfig, LoRALinear, apply_lora, count_parameters, lora_layers, merge, unmerge
from .model import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig", "LoRAConfig", "LoRALinear", "Tensor", "apply_lora", "backend", "concat",
           "count_parameters", "load_adapter", "load_model", "lora_layers", "merge", "no_grad", "save_adapter",
           "save_model", "split", "stack", "unmerge", "where"]
__version__ = "0.1.0"
