"""GPT-2 checkpoints from Hugging Face in our ``GPT``, and GPT-2's tokenizer through ``tokenizers``.

lora_np never downloads anything. A user who can fetch the 124M model puts these files in one folder, e.g. with
``huggingface-cli download openai-community/gpt2 config.json model.safetensors tokenizer.json --local-dir gpt2``:

    config.json         n_embd, n_layer, n_head, n_positions, vocab_size, layer_norm_epsilon, activation_function
    model.safetensors   the weights (a pytorch_model.bin is refused: it is a pickle)
    tokenizer.json      byte-level BPE; or vocab.json + merges.txt, the two files it is made from

Our GPT is GPT-2's architecture with three differences of layout, all handled here: GPT-2 fuses q, k, v into one
``c_attn`` (C, 3C) matrix, which we split into our separate q, k, v (so that LoRA can adapt each alone); GPT-2's
``Conv1D`` stores its weight (d_in, d_out), which is already our layout (no transpose, unlike an ``nn.Linear``);
GPT-2 ties the LM head to ``wte``, which ``GPTConfig(tie_weights=True)`` reproduces. Its activation
``gelu_new`` is our tanh GELU, and its LayerNorm epsilon is read from the config.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import tokenizers

from . import backend
from .checkpoint import check_hf_weights, check_tokenizer_file, read_hf_config, read_hf_weights
from .model import GPT, GPTConfig

# In block i: HF "h.{i}." + name -> ours "blocks.{i}." + name. A tuple of three names splits the HF tensor into
# equal thirds along its last axis: c_attn's columns are [q | k | v]. No transpose anywhere: Conv1D is (d_in, d_out).
LAYER_NAMES: list[tuple[str, str | tuple[str, str, str]]] = [
    ("ln_1.weight", "ln1.weight"),
    ("ln_1.bias", "ln1.bias"),
    ("attn.c_attn.weight", ("attn.q.weight", "attn.k.weight", "attn.v.weight")),  # (C, 3C) -> 3 x (C, C)
    ("attn.c_attn.bias", ("attn.q.bias", "attn.k.bias", "attn.v.bias")),  # (3C,) -> 3 x (C,)
    ("attn.c_proj.weight", "attn.o.weight"),
    ("attn.c_proj.bias", "attn.o.bias"),
    ("ln_2.weight", "ln2.weight"),
    ("ln_2.bias", "ln2.bias"),
    ("mlp.c_fc.weight", "mlp.up.weight"),  # (C, 4C)
    ("mlp.c_fc.bias", "mlp.up.bias"),
    ("mlp.c_proj.weight", "mlp.down.weight"),  # (4C, C)
    ("mlp.c_proj.bias", "mlp.down.bias"),
]
TOP_NAMES = [("wte.weight", "wte.weight"), ("wpe.weight", "wpe.weight"), ("ln_f.weight", "ln_f.weight"),
             ("ln_f.bias", "ln_f.bias")]
# Buffers some GPT-2 files carry, not weights: the causal mask (we build ours) and the value masked scores take.
BUFFER = re.compile(r"h\.\d+\.attn\.(bias|masked_bias)")
TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")  # three names for 0.5x(1 + tanh(√(2/π)(x + 0.044715x³)))


def gpt_config_from_hf(hf: dict[str, Any], **overrides: Any) -> GPTConfig:
    """The ``GPTConfig`` of a Hugging Face GPT-2 ``config.json`` (a dict), with ``overrides`` applied on top.

    Dropout is 0 unless overridden (GPT-2's file says 0.1 for resid/embd/attn_pdrop; pass ``dropout=0.1`` to train
    with it): a forward pass is then deterministic. A key that changes the computation in a way our GPT does not
    implement is refused, naming it.
    """
    if not isinstance(hf, dict):
        raise ValueError(f"gpt_config_from_hf: expected the dict of a config.json, got {type(hf).__name__}")
    refuse = {  # key -> (the values we can map, why others cannot be)
        "model_type": (("gpt2",), "only GPT-2's layout is implemented"),
        "activation_function": (TANH_GELUS, "our GPT's MLP uses the tanh GELU"),
        "scale_attn_weights": ((True,), "our attention always divides scores by √hs"),
        "scale_attn_by_inverse_layer_idx": ((False,), "not implemented"),
        "add_cross_attention": ((False,), "no cross-attention"),
        "tie_word_embeddings": ((True, False), "must be true or false"),
    }
    for key, (allowed, why) in refuse.items():
        if key in hf and hf[key] not in allowed:
            raise ValueError(f"config.json: cannot map {key}={hf[key]!r} (expected one of {list(allowed)}: {why})")
    required = ["vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "layer_norm_epsilon"]
    missing = [k for k in required if k not in hf]
    if missing:
        raise ValueError(f"config.json: missing key(s) {missing}, needed to build the GPT")
    n_inner = hf.get("n_inner")
    if n_inner is not None and isinstance(hf["n_embd"], int) and n_inner != 4 * hf["n_embd"]:
        raise ValueError(f"config.json: cannot map n_inner={n_inner!r} (our MLP is 4 x n_embd = {4 * hf['n_embd']})")
    values = dict(vocab_size=hf["vocab_size"], block_size=hf["n_positions"], n_layer=hf["n_layer"],
                  n_head=hf["n_head"], n_embd=hf["n_embd"], layer_norm_eps=hf["layer_norm_epsilon"], dropout=0.0,
                  bias=True, tie_weights=hf.get("tie_word_embeddings", True))  # GPT-2 ties unless told otherwise
    try:
        return GPTConfig(**{**values, **overrides})
    except ValueError as e:
        raise ValueError(f"config.json: {e}") from None
    except TypeError as e:  # an unknown override
        raise ValueError(f"gpt_config_from_hf: {e}") from None


def _expected_shapes(cfg: GPTConfig) -> dict[str, tuple[int, ...]]:
    """HF name -> the shape GPT-2's file stores for a GPT of config ``cfg`` (our config's names)."""
    C, V = cfg.n_embd, cfg.vocab_size
    shapes = {"wte.weight": (V, C), "wpe.weight": (cfg.block_size, C), "ln_f.weight": (C,), "ln_f.bias": (C,)}
    per_layer = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (C, 3 * C), "attn.c_attn.bias": (3 * C,),
                 "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,), "ln_2.weight": (C,), "ln_2.bias": (C,),
                 "mlp.c_fc.weight": (C, 4 * C), "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (4 * C, C),
                 "mlp.c_proj.bias": (C,)}
    for i in range(cfg.n_layer):
        shapes.update({f"h.{i}.{n}": s for n, s in per_layer.items()})
    if not cfg.tie_weights:
        shapes["lm_head.weight"] = (V, C)  # an nn.Linear: (d_out, d_in), transposed at load
    return shapes


def check_gpt2_weights(cfg: GPTConfig, tensors: dict[str, Any], source: str, dtype: Any) -> dict[str, Any]:
    """The GPT-2 state dict ``tensors`` checked against config ``cfg`` (names, shapes, ``dtype`` held without loss,
    finite values), its accepted variations normalised -> the tensors by HF name. It needs no model, so a folder
    is checked before a model of its config is built."""
    np = backend.np
    tensors = {(n[len("transformer."):] if n.startswith("transformer.") else n): a for n, a in tensors.items()}
    tensors = {n: a for n, a in tensors.items() if not BUFFER.fullmatch(n)}
    if cfg.tie_weights and "lm_head.weight" in tensors:
        head, wte = tensors.pop("lm_head.weight"), tensors.get("wte.weight")
        if wte is None or head.shape != wte.shape or not np.array_equal(head, wte):
            raise ValueError(f"{source}: lm_head.weight differs from wte.weight, but the config ties them "
                             f"(tie_word_embeddings)")
    check_hf_weights(tensors, lambda: _expected_shapes(cfg), layers=("n_layer", cfg.n_layer), layer_prefix="h.",
                     model="GPT-2", source=source, dtype=dtype)
    return tensors


def load_gpt2_weights(model: GPT, tensors: dict[str, Any], source: str = "state dict") -> GPT:
    """Copy a Hugging Face GPT-2 state dict (name -> host array) into ``model`` (a ``GPT`` with biases).

    Every name, shape, dtype and value is checked before the first write, so a bad file leaves the model as it
    was. Accepted variations: a "transformer." prefix (GPT2LMHeadModel files), the attention-mask buffers, and in a
    tied model an ``lm_head.weight`` that is a copy of ``wte.weight`` (anything else there is refused).
    """
    np, cfg = backend.np, model.config
    if not cfg.bias:
        raise ValueError("load_gpt2_weights: GPT-2 has biases; the model was built with bias=False")
    tensors = check_gpt2_weights(cfg, tensors, source, model.parameters()[0].dtype)

    params = dict(model.named_parameters())

    def put(ours: str, a: Any) -> None:
        params[ours].data = backend.to_device(np.ascontiguousarray(a), dtype=params[ours].dtype)
        params[ours].grad = None

    for hf, ours in TOP_NAMES:  # all checked: now write
        put(ours, tensors[hf])
    for i in range(cfg.n_layer):
        for hf, ours in LAYER_NAMES:
            a = tensors[f"h.{i}.{hf}"]
            if isinstance(ours, tuple):  # c_attn: columns [q | k | v], each C wide
                for part, name in zip(np.split(a, 3, axis=-1), ours):
                    put(f"blocks.{i}.{name}", part)
            else:
                put(f"blocks.{i}.{ours}", a)
    if not cfg.tie_weights:
        put("lm_head.weight", tensors["lm_head.weight"].T)  # nn.Linear (V, C) -> our (C, V)
    return model


def load_gpt2(folder: str | os.PathLike, **overrides: Any) -> GPT:
    """A ``GPT`` from a Hugging Face GPT-2 folder (``config.json`` and ``model.safetensors``); ``overrides`` go to
    ``GPTConfig`` (e.g. ``dropout=0.1``). Training on shorter windows needs no change: a forward pass of T tokens
    reads only the first T rows of ``wpe``.
    A bad folder raises an error naming the file and the problem; no half-loaded model is ever returned."""

    folder = Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            hint = " (a pytorch_model.bin is a pickle, which lora_np never loads)" if name.endswith("tensors") else ""
            raise FileNotFoundError(f"{folder}: no {name}{hint}")
    weights = folder / "model.safetensors"
    cfg = read_hf_config(folder / "config.json", gpt_config_from_hf, **overrides)
    tensors = read_hf_weights(weights)
    # the shapes against the config before the model is built: a config of a million layers is refused here
    check_gpt2_weights(cfg, tensors, str(weights), backend.DEFAULT_DTYPE)
    return load_gpt2_weights(GPT(cfg), tensors, source=str(weights))


class GPT2Tokenizer:
    """GPT-2's byte-level BPE through Hugging Face's ``tokenizers`` (Rust, no PyTorch), with the interface of our
    ``CharTokenizer``: ``encode(text)`` -> host int64 ids, ``decode(ids)`` -> text, ``vocab_size``.

    Built from ``tokenizer.json`` when the folder has one, else from ``vocab.json`` + ``merges.txt`` (byte-level
    pre-tokenizer without a prefix space, and the byte-level decoder, as GPT-2's own tokenizer).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        for name in ("tokenizer.json", "vocab.json", "merges.txt"):  # sizes first: the library reads them whole
            if (self.folder / name).is_file():
                check_tokenizer_file(self.folder / name)
        try:  # the tokenizers library raises a bare Exception on a broken file: one ValueError naming it instead
            if (self.folder / "tokenizer.json").is_file():
                self.tok = tokenizers.Tokenizer.from_file(str(self.folder / "tokenizer.json"))
            elif (self.folder / "vocab.json").is_file() and (self.folder / "merges.txt").is_file():
                bpe = tokenizers.models.BPE.from_file(str(self.folder / "vocab.json"),
                                                      str(self.folder / "merges.txt"))
                self.tok = tokenizers.Tokenizer(bpe)
                self.tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
                self.tok.decoder = tokenizers.decoders.ByteLevel()
            else:
                raise FileNotFoundError(f"{self.folder}: no tokenizer.json, and not both vocab.json and merges.txt")
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001
            raise ValueError(f"{self.folder}: its tokenizer files are not readable "
                             f"({str(e).splitlines()[0][:200]})") from None
        self.tok.no_padding()
        self.tok.no_truncation()

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> Any:
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return backend.np.array(self.tok.encode(text, add_special_tokens=False).ids, dtype=backend.np.int64)

    def decode(self, ids: Any) -> str:
        return self.tok.decode(backend.to_numpy(ids).reshape(-1).tolist(), skip_special_tokens=False)

    def __repr__(self) -> str:
        return f"GPT2Tokenizer({self.folder}, vocab_size={self.vocab_size})"


def load_gpt2_tokenizer(folder: str | os.PathLike) -> GPT2Tokenizer:
    """GPT-2's tokenizer from a Hugging Face folder (see ``GPT2Tokenizer``)."""
    return GPT2Tokenizer(folder)


__all__ = ["GPT2Tokenizer", "gpt_config_from_hf", "load_gpt2", "load_gpt2_tokenizer", "load_gpt2_weights"]
