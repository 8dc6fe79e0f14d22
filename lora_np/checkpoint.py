"""Files: model checkpoints and the safetensors plumbing that adapters use too.

Every file lora_np writes is one safetensors file (tensors by name, no pickle, nothing executable) whose
metadata holds one JSON document under the key ``"lora_np"``: what kind of file it is and the config needed to
rebuild what it stores. Writes are atomic: the bytes go to a temporary file in the same folder, which is then
renamed over the target, so a crash or an error never leaves a half-written file behind.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from . import backend
from .model import GPT, GPTConfig

FORMAT_VERSION = 1


def write_file(path: str | os.PathLike, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    """Atomically write host arrays ``tensors`` and JSON-able ``meta`` to the safetensors file ``path``."""
    from safetensors.numpy import save

    np = backend.np
    arrays = {name: np.ascontiguousarray(backend.to_numpy(a)) for name, a in tensors.items()}
    write_atomic(path, save(arrays, metadata={"lora_np": json.dumps({"format_version": FORMAT_VERSION, **meta})}))


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename, so a crash or an
    error leaves the old file (or none), never half of a new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
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
    from safetensors import SafetensorError
    from safetensors.numpy import load

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {kind} file at {path}")
    data = path.read_bytes()
    try:
        tensors = load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta_raw = json.loads(data[8 : 8 + header_len]).get("__metadata__", {}).get("lora_np")
    except (SafetensorError, ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from None
    if meta_raw is None:
        raise ValueError(f"{path} is a safetensors file but not one written by lora_np (no 'lora_np' metadata)")
    meta = json.loads(meta_raw)
    if meta.get("kind") != kind:
        raise ValueError(f"{path} holds a {meta.get('kind')!r} file, expected a {kind!r} file")
    return tensors, meta


def save_model(model: GPT, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Save the GPT's own parameters and its config (plus JSON-able ``extra``, e.g. the tokenizer).

    LoRA factors A and B are not part of a model checkpoint (``lora.save_adapter`` saves them). If LoRA layers
    are merged, the merged W is saved: that is how a fine-tuned model is exported as a plain GPT.
    """
    from .lora import adapter_parameter_ids  # lora builds on this module, so import it late

    skip = adapter_parameter_ids(model)
    tensors = {name: p.data for name, p in model.named_parameters() if id(p) not in skip}
    write_file(path, tensors, {"kind": "model", "config": model.config.to_dict(), "extra": extra or {}})


def load_model(path: str | os.PathLike) -> tuple[GPT, dict[str, Any]]:
    """Rebuild a GPT from ``save_model``'s file -> (model, extra). A file whose tensors do not match its own
    config (missing, unexpected or wrongly shaped tensors) is an error naming them."""
    tensors, meta = read_file(path, "model")
    try:
        config = GPTConfig(**meta["config"])
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: bad model config in metadata: {e}") from None
    model = GPT(config)
    try:
        model.load_state_dict(tensors)
    except (KeyError, ValueError) as e:
        raise ValueError(f"{path}: tensors do not match the stored config: {e}") from None
    return model, meta.get("extra", {})
