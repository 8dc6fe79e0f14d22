"""Files: model checkpoints and LoRA adapters, as safetensors files.

Every file lora_np writes is one safetensors file (tensors by name, no pickle, nothing executable) whose
metadata holds one JSON document under the key ``"lora_np"``: what kind of file it is and the config needed to
rebuild what it stores. Writes are atomic: the bytes go to a temporary file in the same folder, which is then
renamed over the target, so a crash or an error never leaves a half-written file (or a temporary one) behind.

Reads check everything before they change anything: the file is a lora_np file of the right kind, its metadata
is well formed, every tensor has the expected name and shape, a float dtype the model holds without loss, and
finite values. A bad file is a ``ValueError`` naming the file and the culprit, and the model stays as it was.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.numpy import load, save

from . import backend
from .lora import (
    LoRAConfig,
    adapter_parameter_ids,
    apply_lora,
    base_fingerprint,
    check_lora,
    lora_layers,
    target_layers,
)
from .model import GPT, GPTConfig
from .nn import Module, TensorSpec, check_state

FORMAT_VERSION = 1


def encode_file(tensors: dict[str, Any], meta: dict[str, Any]) -> bytes:
    """The bytes of a safetensors file holding ``tensors`` (moved to the host) and JSON-able ``meta``."""
    np = backend.np
    arrays = {name: np.ascontiguousarray(backend.to_numpy(a)) for name, a in tensors.items()}
    return save(arrays, metadata={"lora_np": json.dumps({"format_version": FORMAT_VERSION, **meta})})


def write_file(path: str | os.PathLike, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    """Atomically write host arrays ``tensors`` and JSON-able ``meta`` to the safetensors file ``path``."""
    write_atomic(path, encode_file(tensors, meta))


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so a crash or an
    error leaves the old file (or none), never half of a new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    # a short temporary name: the target's own name may already be as long as the filesystem allows
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".lora_np-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file owner-only; give it the usual permissions
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old file or the new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_file(path: str | os.PathLike, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a lora_np safetensors file of the given ``kind`` ("model" or "adapter") -> (tensors, meta)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {kind} file at {path}")
    data = path.read_bytes()
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta_raw = json.loads(data[8 : 8 + header_len]).get("__metadata__", {}).get("lora_np")
    except (SafetensorError, ValueError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from None
    if meta_raw is None:
        raise ValueError(f"{path} is a safetensors file but not one written by lora_np (no 'lora_np' metadata)")
    try:
        meta = json.loads(meta_raw)
    except ValueError as e:
        raise ValueError(f"{path}: its lora_np metadata is not valid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its lora_np metadata is not a JSON object")
    if meta.get("kind") != kind:
        raise ValueError(f"{path} holds a {meta.get('kind')!r} file, expected a {kind!r} file")
    return tensors, meta


def _meta(path: Path, meta: dict[str, Any], key: str, kind: type) -> Any:
    """``meta[key]``, which must be a ``kind``; otherwise a ValueError naming the file and the key."""
    if not isinstance(meta.get(key), kind):
        raise ValueError(f"{path}: metadata key {key!r} is missing or not a {kind.__name__}")
    return meta[key]


def save_model(model: GPT, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Save the GPT's own parameters and its config (plus JSON-able ``extra``, e.g. the tokenizer).

    LoRA factors A and B are not part of a model checkpoint (``save_adapter`` saves them). If LoRA layers
    are merged, the merged W is saved: that is how a fine-tuned model is exported as a plain GPT.
    """
    skip = adapter_parameter_ids(model)
    tensors = {name: p.data for name, p in model.named_parameters() if id(p) not in skip}
    write_file(path, tensors, {"kind": "model", "config": model.config.to_dict(), "extra": extra or {}})


def load_model(path: str | os.PathLike) -> tuple[GPT, dict[str, Any]]:
    """Rebuild a GPT from ``save_model``'s file -> (model, extra). A file whose tensors do not match its own
    config (missing, unexpected or wrongly shaped tensors, lossy dtypes, NaN or inf) is an error naming them."""
    path = Path(path)
    tensors, meta = read_file(path, "model")
    stored = _meta(path, meta, "config", dict)
    try:
        config = GPTConfig(**stored)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad model config in metadata: {e}") from None
    extra = meta.get("extra", {})
    if not isinstance(extra, dict):
        raise ValueError(f"{path}: metadata key 'extra' is not a dict")
    model = GPT(config)
    try:
        model.load_state_dict(tensors)
    except ValueError as e:
        raise ValueError(f"{path}: cannot load its tensors: {e}") from None
    return model, extra


# -- adapter files -----------------------------------------------------------------------------------------------


def save_adapter(model: Module, path: str | os.PathLike) -> None:
    """Write only the adapter: every A and B (and the modules_to_save parameters), the LoRA config and the
    fingerprint of the base weights as they are now, as one safetensors file. About 4·r·(d_in + d_out) bytes
    per float32 layer."""
    write_atomic(path, encode_adapter(model))


def encode_adapter(model: Module) -> bytes:
    """The bytes ``save_adapter`` writes (so a size can be known without writing a file)."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("save_adapter: the model has no LoRA layers (apply_lora first)")
    if any(m.merged for m in layers.values()):
        raise RuntimeError("save_adapter: unmerge() first (the saved fingerprint is of the unmerged base)")
    config: LoRAConfig = model.lora_config
    tensors = {f"{n}.{f}": getattr(m, f).data for n, m in layers.items() for f in ("A", "B")}
    for mod in config.modules_to_save:
        tensors.update({f"{mod}.{n}": p.data for n, p in vars(model)[mod].named_parameters()})
    meta = {"kind": "adapter", "lora": config.to_dict(),
            "base_fingerprint": base_fingerprint(model, config.modules_to_save)}
    return encode_file(tensors, meta)


def load_adapter(model: Module, path: str | os.PathLike) -> Module:
    """Load an adapter file into ``model``: a plain base model gets LoRA applied with the file's config; a model
    that already has LoRA must have the same config. The file's metadata, the base model's fingerprint and every
    tensor (name, shape, dtype, finite values) are checked before anything changes, so a bad file leaves the
    model untouched."""
    path = Path(path)
    tensors, meta = read_file(path, "adapter")
    config, stored = _adapter_meta(path, meta)
    has_lora = bool(lora_layers(model))
    if has_lora:
        if model.lora_config != config:
            raise ValueError(f"load_adapter: {path} has LoRA config {config.to_dict()}, "
                             f"the model has {model.lora_config.to_dict()}")
        if any(m.merged for m in lora_layers(model).values()):
            raise RuntimeError("load_adapter: unmerge() first")
    else:
        try:
            check_lora(model, config)
        except ValueError as e:
            raise ValueError(f"load_adapter: {path} does not fit this model: {e}") from None
    fingerprint = base_fingerprint(model, config.modules_to_save)
    if fingerprint != stored:
        raise ValueError(f"load_adapter: {path} was trained on a different base model "
                         f"(fingerprint {stored[:12]}…, this model {fingerprint[:12]}…)")

    expected = {}  # name -> a parameter of the shape and dtype it will fill, found without changing anything
    for name, _, _, layer in target_layers(model, config.targets):
        dtype = layer.weight.data.dtype
        expected[f"{name}.A"] = TensorSpec((layer.d_in, config.r), dtype)
        expected[f"{name}.B"] = TensorSpec((config.r, layer.d_out), dtype)
    for mod in config.modules_to_save:
        expected.update({f"{mod}.{n}": p for n, p in vars(model)[mod].named_parameters()})
    try:
        check_state(expected, tensors)
    except ValueError as e:
        raise ValueError(f"load_adapter: {path} does not fit this model: {e}") from None

    if not has_lora:
        apply_lora(model, config)
    for n, m in lora_layers(model).items():
        m.A.data = backend.to_device(tensors[f"{n}.A"], dtype=m.A.dtype)
        m.B.data = backend.to_device(tensors[f"{n}.B"], dtype=m.B.dtype)
    for mod in config.modules_to_save:
        for n, p in vars(model)[mod].named_parameters():
            p.data = backend.to_device(tensors[f"{mod}.{n}"], dtype=p.dtype)
    return model


def read_adapter_config(path: str | os.PathLike) -> LoRAConfig:
    """The LoRA config of an adapter file, its metadata checked (nothing is loaded into any model)."""
    path = Path(path)
    return _adapter_meta(path, read_file(path, "adapter")[1])[0]


def _adapter_meta(path: Path, meta: dict[str, Any]) -> tuple[LoRAConfig, str]:
    """(config, base fingerprint) from an adapter file's metadata; a ValueError naming the file if malformed."""
    try:
        config = LoRAConfig.from_dict(_meta(path, meta, "lora", dict))
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: bad LoRA config in metadata: {e}") from None
    return config, _meta(path, meta, "base_fingerprint", str)
