"""Files: model checkpoints and LoRA adapters, as safetensors files; and the files of a Hugging Face folder.

Every file lora_np writes is one safetensors file (tensors by name, no pickle, nothing executable) whose
metadata holds one JSON document under the key ``"lora_np"``: what kind of file it is and the config needed to
rebuild what it stores. Writes are atomic: the bytes go to a temporary file in the same folder, which is then
renamed over the target, so a crash or an error never leaves a half-written file (or a temporary one) behind.

Reads check everything before they change anything: the file is a lora_np file of the right kind, its metadata
is well formed, every tensor has the expected name and shape, a float dtype the model holds without loss, and
finite values. A bad file is a ``ValueError`` naming the file and the culprit, and the model stays as it was.
A Hugging Face folder's ``config.json`` and ``model.safetensors`` (GPT-2's, BERT's) are read through
``read_hf_config`` and ``read_hf_weights``, with the same care and the same kind of error.
"""

from __future__ import annotations

import json
import math
import os
import signal
import stat
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError
from safetensors.numpy import load, load_file, save

from . import backend
from .lora import (
    LoRAConfig,
    adapter_fingerprint,
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
# the fields of a base model's config that decide which adapters fit it (vocab_size: the tokenizer's characters)
SHAPE_FIELDS = ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "bias", "tie_weights")


def encode_file(tensors: dict[str, Any], meta: dict[str, Any]) -> bytes:
    """The bytes of a safetensors file holding ``tensors`` (moved to the host) and JSON-able ``meta``."""
    np = backend.np
    arrays = {name: np.ascontiguousarray(backend.to_numpy(a)) for name, a in tensors.items()}
    return save(arrays, metadata={"lora_np": json.dumps({"format_version": FORMAT_VERSION, **meta})})


def write_file(path: str | os.PathLike, tensors: dict[str, Any], meta: dict[str, Any]) -> None:
    """Atomically write host arrays ``tensors`` and JSON-able ``meta`` to the safetensors file ``path``."""
    write_atomic(path, encode_file(tensors, meta))


TEMP_PREFIX = ".lora_np-"  # temporary files: .lora_np-<pid>-<random>.tmp, in the target's folder
_pending: set[str] = set()  # temporary files being written now, removed by _remove_pending on SIGTERM / SIGINT


def write_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a crash, an error or a signal leaves the old file (or none), never half
    of a new one, and no temporary file.

    The bytes go to a temporary file in the same folder, are flushed to the disk (fsync) and the file is renamed
    over the target. An existing target keeps its permission bits (a 0600 file stays 0600). The temporary file is
    removed on any exception, on Ctrl-C and on SIGTERM (a handler, while the write lasts); one left by a process
    that was killed outright (SIGKILL) is removed by the next write into the same folder."""
    if not str(path):
        raise ValueError("no file name given (an empty path)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file name")
    _remove_stale_temporaries(path.parent)
    try:
        mode = stat.S_IMODE(path.stat().st_mode)  # overwriting: keep the file's permissions
    except FileNotFoundError:
        umask = os.umask(0)
        os.umask(umask)
        mode = 0o666 & ~umask  # a new file: the usual permissions (mkstemp makes it owner-only)
    # a short temporary name: the target's own name may already be as long as the filesystem allows
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f"{TEMP_PREFIX}{os.getpid()}-", suffix=".tmp")
    _pending.add(tmp)
    restore = _handle_signals()
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())  # the bytes are on the disk before the name points at them
        os.chmod(tmp, mode)
        os.replace(tmp, path)  # atomic on POSIX and Windows: readers see the old file or the new one
        _fsync_folder(path.parent)  # ... and the rename itself survives a power cut
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        _pending.discard(tmp)
        restore()


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # Windows cannot open a folder; the rename is as durable as the OS makes it
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_pending(signum: int, frame: Any) -> None:
    """Signal handler during a write: remove the temporary files, then let the signal do what it did before."""
    for tmp in list(_pending):
        Path(tmp).unlink(missing_ok=True)
    _pending.clear()
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)  # Python's own SIGINT handler: KeyboardInterrupt, as without us
    else:  # SIG_DFL (an ignored signal gets no handler at all: see _handle_signals)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)  # die of the signal, as the process would have


_previous_handlers: dict[int, Any] = {}


def _handle_signals() -> Callable[[], None]:
    """Install ``_remove_pending`` for SIGTERM and SIGINT (main thread only: Python allows no other) -> a function
    that puts the previous handlers back."""
    if threading.current_thread() is not threading.main_thread() or _previous_handlers:
        return lambda: None
    for signum in (signal.SIGTERM, signal.SIGINT):
        if signal.getsignal(signum) == signal.SIG_IGN:  # a process told to ignore it (a background job's SIGINT)
            continue  # goes on ignoring it: the write finishes, nothing to clean up
        _previous_handlers[signum] = signal.signal(signum, _remove_pending)

    def restore() -> None:
        for signum, previous in _previous_handlers.items():
            signal.signal(signum, previous)
        _previous_handlers.clear()
    return restore


def _remove_stale_temporaries(folder: Path) -> None:
    """Remove the temporary files of lora_np processes that no longer run (killed by SIGKILL mid-write)."""
    for tmp in folder.glob(f"{TEMP_PREFIX}*.tmp"):
        pid = tmp.name[len(TEMP_PREFIX):].split("-", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            tmp.unlink(missing_ok=True)


def _process_alive(pid: int) -> bool:
    if os.name == "nt":  # os.kill there terminates the process instead of asking after it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or a platform that cannot tell: leave its file alone
    return True


KNOWN_VERSIONS = (1,)  # format versions this code reads
MAX_HEADER_BYTES = 16 * 2**20  # a safetensors JSON header (names, shapes, offsets) longer than this is refused
MAX_META_BYTES = 2**20  # lora_np's own metadata: configs and a short history
MAX_TOKENIZER_BYTES = 64 * 2**20  # GPT-2's tokenizer.json is 1.4 MB, MiniLM's 0.7 MB; the library reads one whole
MAX_JSON_DEPTH = 32  # nesting of [ and {: deeper is hostile (Python's parser would hit its recursion limit)
DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


def read_file(path: str | os.PathLike, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a lora_np safetensors file of the given ``kind`` ("model" or "adapter") -> (tensors, meta).

    The header is read and checked first (its length against the file's, every tensor's dtype, shape and byte
    range within the file, the metadata's size, nesting, format version and kind); only then are the tensors
    read, so a file that claims more than it holds is refused before anything large is allocated."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no {kind} file at {path}")
    bad = f"{path} is not a valid safetensors file"
    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little")
        if len(head) < 8 or header_len > min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{bad}: its header claims {header_len:,} bytes, the file has {size:,}")
        header_raw = f.read(header_len)
        header = _parse_json(header_raw, bad)
        _check_tensor_entries(header, size - 8 - header_len, bad)
        meta_raw = header.get("__metadata__", {}).get("lora_np") if isinstance(header.get("__metadata__"), dict) \
            else None
        if not isinstance(meta_raw, str):
            raise ValueError(f"{path} is a safetensors file but not one written by lora_np (no 'lora_np' metadata)")
        if len(meta_raw) > MAX_META_BYTES:
            raise ValueError(f"{path}: its lora_np metadata is {len(meta_raw):,} bytes, more than the "
                             f"{MAX_META_BYTES:,} a lora_np file holds")
        meta = _parse_json(meta_raw.encode(), f"{path}: its lora_np metadata is not valid JSON")
        if not isinstance(meta, dict):
            raise ValueError(f"{path}: its lora_np metadata is not a JSON object")
        if meta.get("format_version") not in KNOWN_VERSIONS:
            raise ValueError(f"{path}: format_version {meta.get('format_version')!r} is not one this lora_np reads "
                             f"{list(KNOWN_VERSIONS)} (written by a newer lora_np?)")
        if meta.get("kind") != kind:
            raise ValueError(f"{path} holds a {meta.get('kind')!r} file, expected a {kind!r} file")
        data = head + header_raw + f.read()
    try:
        tensors = load(data)
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"{bad}: {e}") from None
    return tensors, meta


def _parse_json(raw: bytes, bad: str) -> Any:
    """JSON from ``raw``, its nesting checked first; a ValueError starting with ``bad`` otherwise."""
    depth = deepest = 0
    in_string = escaped = False
    for byte in raw:  # [ and { outside strings
        if in_string:
            escaped, in_string = (False, True) if escaped else (byte == 0x5C, byte != 0x22)
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_JSON_DEPTH:
                raise ValueError(f"{bad}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
        elif byte in (0x5D, 0x7D):
            depth -= 1
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{bad}: {e}") from None


def _check_tensor_entries(header: Any, data_bytes: int, bad: str) -> None:
    """Every tensor entry of a safetensors header: a known dtype, a shape of non-negative integers and a byte
    range inside the file's data, of the size the shape and dtype make."""
    if not isinstance(header, dict):
        raise ValueError(f"{bad}: its header is not a JSON object")
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPE_BYTES:
            raise ValueError(f"{bad}: tensor {name!r} has no known dtype")
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                  for d in shape):
            raise ValueError(f"{bad}: tensor {name!r} has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise ValueError(f"{bad}: tensor {name!r} has byte range {offsets!r} outside the file's "
                             f"{data_bytes:,} bytes of data")
        need = math.prod(shape) * DTYPE_BYTES[entry["dtype"]]
        if offsets[1] - offsets[0] != need:
            raise ValueError(f"{bad}: tensor {name!r} of shape {shape} needs {need:,} bytes, its range holds "
                             f"{offsets[1] - offsets[0]:,}")


def _meta(path: Path, meta: dict[str, Any], key: str, kind: type) -> Any:
    """``meta[key]``, which must be a ``kind``; otherwise a ValueError naming the file and the key."""
    if not isinstance(meta.get(key), kind):
        raise ValueError(f"{path}: metadata key {key!r} is missing or not a {kind.__name__}")
    return meta[key]


def save_model(model: GPT, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Save the GPT's own parameters and its config (plus JSON-able ``extra``, e.g. the tokenizer).

    LoRA factors A and B are not part of a model checkpoint (``save_adapter`` saves them). If LoRA layers
    are merged, the merged W is saved: that is how a fine-tuned model is exported as a plain GPT. An unmerged PiSSA
    model is refused: its W are residuals (W − s·A₀B₀), neither the base nor the fine-tuned model.
    """
    config = getattr(model, "lora_config", None)
    if config is not None and config.init == "pissa" and not all(m.merged for m in lora_layers(model).values()):
        raise RuntimeError("save_model: the W of this PiSSA model are residuals, not a model anyone can use alone: "
                           "merge() to export the fine-tuned model (the base is the one PiSSA was applied to)")
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
    _check_sizes(path, config, tensors)
    model = GPT(config)
    try:
        model.load_state_dict(tensors)
    except ValueError as e:
        raise ValueError(f"{path}: cannot load its tensors: {e}") from None
    return model, extra


def _check_sizes(path: Path, config: GPTConfig, tensors: dict[str, Any]) -> None:
    """The config's sizes are those of the file's tensors, checked before the model is built: a config that
    claims a million layers is refused, not allocated."""
    wte, wpe = tensors.get("wte.weight"), tensors.get("wpe.weight")
    blocks = {name.split(".")[1] for name in tensors if name.startswith("blocks.")}
    found = {"vocab_size": wte.shape[0] if wte is not None and wte.ndim == 2 else None,
             "n_embd": wte.shape[1] if wte is not None and wte.ndim == 2 else None,
             "block_size": wpe.shape[0] if wpe is not None and wpe.ndim == 2 else None,
             "n_layer": len(blocks)}
    wrong = [f"{k} {getattr(config, k)} (the tensors say {v})" for k, v in found.items() if v != getattr(config, k)]
    if wrong:
        raise ValueError(f"{path}: its config does not match its tensors: {', '.join(wrong)}")


# -- adapter files -----------------------------------------------------------------------------------------------


def save_adapter(model: Module, path: str | os.PathLike) -> None:
    """Write only the adapter: every A and B (DoRA: and magnitude; and the modules_to_save parameters), the LoRA
    config and the fingerprint of the base weights as they are now (PiSSA: as they were before apply_lora replaced W
    by the residuals, see ``lora.adapter_fingerprint``), as one safetensors file. About 4·r·(d_in + d_out) bytes
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
    tensors = {f"{n}.{f}": p.data for n, m in layers.items() for f, p in m.adapter_parameters().items()}
    for mod in config.modules_to_save:
        tensors.update({f"{mod}.{n}": p.data for n, p in vars(model)[mod].named_parameters()})
    meta = {"kind": "adapter", "lora": config.to_dict(), "base_fingerprint": adapter_fingerprint(model)}
    if hasattr(getattr(model, "config", None), "to_dict"):  # the base's config: checked before any base is built
        meta["base_config"] = model.config.to_dict()
    return encode_file(tensors, meta)


def load_adapter(model: Module, path: str | os.PathLike) -> Module:
    """Load an adapter file into ``model``: a plain base model gets LoRA applied with the file's config; a model
    that already has LoRA must have the same config. The file's metadata, the base model's config and fingerprint
    and every tensor (name, shape, dtype, finite values) are checked before anything changes, so a bad file leaves
    the model untouched."""
    path = Path(path)
    tensors, config = check_adapter(model, path, fingerprint=True)
    if not lora_layers(model):
        apply_lora(model, config)
    for n, m in lora_layers(model).items():
        for f, p in m.adapter_parameters().items():  # A, B (and DoRA's magnitude)
            p.data = backend.to_device(tensors[f"{n}.{f}"], dtype=p.dtype)
    for mod in config.modules_to_save:
        for n, p in vars(model)[mod].named_parameters():
            p.data = backend.to_device(tensors[f"{mod}.{n}"], dtype=p.dtype)
    return model


def check_adapter(model: Module, path: str | os.PathLike, fingerprint: bool = False) -> tuple[dict[str, Any],
                                                                                              LoRAConfig]:
    """Every check of ``load_adapter``, changing nothing -> (tensors, LoRA config). Without ``fingerprint`` the
    base's weights are not compared, so a freshly built model of the base's config will do: the command line
    checks that an adapter fits the base before it pretrains one."""
    path = Path(path)
    tensors, meta = read_file(path, "adapter")
    config, stored = _adapter_meta(path, meta)
    own = getattr(model, "config", None)
    if isinstance(meta.get("base_config"), dict) and hasattr(own, "to_dict"):
        theirs, ours = meta["base_config"], own.to_dict()
        diff = [k for k in SHAPE_FIELDS if k in ours and theirs.get(k) != ours[k]]
        if diff:
            raise ValueError(f"load_adapter: {path} was trained on a base model of another shape ("
                             + ", ".join(f"{k} {theirs.get(k)!r}, this model {ours[k]!r}" for k in diff) + ")")
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
    if fingerprint:  # a model with the adapter's (PiSSA) LoRA: the base it was applied to
        own_print = adapter_fingerprint(model) if has_lora else base_fingerprint(model, config.modules_to_save)
        if own_print != stored:
            raise ValueError(f"load_adapter: {path} was trained on a different base model "
                             f"(fingerprint {stored[:12]}…, this model {own_print[:12]}…)")

    expected = {}  # name -> a parameter of the shape and dtype it will fill, found without changing anything
    for name, _, _, layer in target_layers(model, config.targets):
        dtype = layer.weight.data.dtype
        expected[f"{name}.A"] = TensorSpec((layer.d_in, config.r), dtype)
        expected[f"{name}.B"] = TensorSpec((config.r, layer.d_out), dtype)
        if config.dora:
            expected[f"{name}.magnitude"] = TensorSpec((layer.d_out,), dtype)
    for mod in config.modules_to_save:
        expected.update({f"{mod}.{n}": p for n, p in vars(model)[mod].named_parameters()})
    try:
        check_state(expected, tensors)
    except ValueError as e:
        raise ValueError(f"load_adapter: {path} does not fit this model: {e}") from None
    return tensors, config


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
    if "base_config" in meta and not isinstance(meta["base_config"], dict):
        raise ValueError(f"{path}: metadata key 'base_config' is not a dict")
    return config, _meta(path, meta, "base_fingerprint", str)


# -- Hugging Face folders (GPT-2, BERT) --------------------------------------------------------------------------


def read_hf_config(path: str | os.PathLike, from_hf: Callable[..., Any], **overrides: Any) -> Any:
    """``from_hf(config, **overrides)`` of the Hugging Face ``config.json`` at ``path`` (``gpt_config_from_hf``,
    ``BertConfig.from_hf``): the file's size and JSON nesting are checked before it is parsed, and every problem,
    the config's own included (a null, a string or a zero where a size belongs), is a ValueError naming the file.
    The sizes themselves are checked against the weights' shapes by the caller, before any model is built."""
    path = Path(path)
    size = path.stat().st_size
    if size > MAX_META_BYTES:  # a real config.json is a few hundred bytes
        raise ValueError(f"{path} is {size:,} bytes, more than the {MAX_META_BYTES:,} a config.json may hold")
    hf = _parse_json(path.read_bytes(), f"{path} is not a JSON file")
    try:
        return from_hf(hf, **overrides)
    except ValueError as e:
        raise ValueError(f"{path}: {str(e).removeprefix('config.json: ')}") from None


def check_tokenizer_file(path: str | os.PathLike) -> str:
    """``path`` as a string for the ``tokenizers`` library, once its size is that of a tokenizer file: the library
    reads the whole file into memory, so a folder's 10 GB ``tokenizer.json`` is a ValueError naming it instead."""
    size = Path(path).stat().st_size
    if size > MAX_TOKENIZER_BYTES:
        raise ValueError(f"{path} is {size:,} bytes, more than the {MAX_TOKENIZER_BYTES:,} a tokenizer file may hold")
    return str(path)


def read_hf_weights(path: str | os.PathLike) -> dict[str, Any]:
    """The tensors (name -> host array) of a Hugging Face ``model.safetensors``. The safetensors library checks the
    header's length and every tensor's byte range against the file's size before it makes an array; a broken
    file is a ValueError naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, ValueError) as e:
        raise ValueError(f"{path} is not a valid safetensors file: {e}") from None


def check_hf_weights(tensors: dict[str, Any], shapes: Callable[[], dict[str, tuple[int, ...]]], *,
                     layers: tuple[str, int], layer_prefix: str, model: str, source: str, dtype: Any) -> None:
    """The tensors of a Hugging Face ``model`` ("GPT-2", "BERT") against its config, before any model is built.

    First the number of blocks: ``layers`` is the config's (key, value), and a block's tensors are named
    ``layer_prefix`` + its index; so a config that claims a million layers is refused before the names of its
    layers are even listed. Then ``shapes()`` (name -> shape) against every tensor: names, shapes, ``dtype`` held
    without loss, finite values (``nn.check_state``). A ValueError naming ``source`` otherwise."""
    key, n_layer = layers
    found = {n[len(layer_prefix):].split(".")[0] for n in tensors if n.startswith(layer_prefix)}
    if n_layer > len(found):
        raise ValueError(f"{source}: the config says {key} {n_layer}, the file holds {len(found)} layers")
    try:
        check_state({name: TensorSpec(shape, dtype) for name, shape in shapes().items()}, tensors)
    except ValueError as e:
        raise ValueError(f"{source} (a {model} with {n_layer} layers): {e}") from None
