"""lora_np: LoRA (Hu et al. 2021, arXiv 2106.09685) built from scratch on NumPy, for teaching."""

from . import backend
from .engine import Tensor, concat, no_grad, split, stack, where

__all__ = ["Tensor", "backend", "concat", "no_grad", "split", "stack", "where"]
__version__ = "0.1.0"
