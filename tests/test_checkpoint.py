"""Tests for lora_np/checkpoint.py: model and adapter files round trip, hold just what they should, are refused
with a clear error (naming the file and the culprit) when anything is wrong, changing nothing, are written
atomically for any file name, and nothing in lora_np uses pickle."""

from __future__ import annotations

import ast
import json
import math
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from helpers import (
    TINY,
    adapted_gpt,
    assert_files_untouched,
    assert_untouched,
    perturb_adapters,
    snapshot,
    snapshot_files,
    tiny_gpt,
)
from safetensors import SafetensorError
from safetensors.numpy import save

import lora_np
from lora_np import checkpoint, lora
from lora_np.checkpoint import (
    load_adapter,
    load_model,
    read_adapter_config,
    read_file,
    save_adapter,
    save_model,
    write_file,
)
from lora_np.lora import LoRAConfig, apply_lora, base_fingerprint, lora_layers
from lora_np.model import GPT
from lora_np.optim import AdamW

C = TINY["n_embd"]
SHAPES = {"q": (C, C), "k": (C, C), "v": (C, C), "o": (C, C), "up": (C, 4 * C), "down": (4 * C, C)}  # (d_in, d_out)
IDX = np.random.default_rng(0).integers(0, 11, (3, 8))
QV = LoRAConfig(targets="q,v", r=2, alpha=4.0)  # the config of adapted_gpt()


def logits(model: GPT) -> np.ndarray:
    return model(IDX)[0].data


def data_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file: the size minus the 8-byte length and the JSON header."""
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    return len(raw) - 8 - header_len


# --- adapters: round trips ---------------------------------------------------------------------------------------


def test_adapter_round_trip_into_a_fresh_same_seed_base(tmp_path):
    src = adapted_gpt()
    path = tmp_path / "adapter.safetensors"
    save_adapter(src, path)
    dst = tiny_gpt()
    assert not np.array_equal(logits(dst), logits(src))
    assert load_adapter(dst, path) is dst
    assert np.array_equal(logits(dst), logits(src))
    assert dst.lora_config == src.lora_config == read_adapter_config(path)
    assert [id(p) for p in dst.trainable_parameters()] == [id(p) for m in lora_layers(dst).values() for p in (m.A, m.B)]
    opt = AdamW(dst.trainable_parameters(), lr=1e-2)  # training can go on from the loaded adapter
    dst(IDX, IDX)[1].backward()
    opt.step()


def test_adapter_round_trip_into_a_loaded_base_model(tmp_path):
    base = tiny_gpt()
    save_model(base, tmp_path / "base.safetensors")
    src = apply_lora(base, LoRAConfig(targets="all-linear", r=3, alpha=6.0, modules_to_save=["lm_head"]))
    for m in lora_layers(src).values():
        m.B.data[...] = 0.1
    src.lm_head.weight.data *= 2.0  # trained fully: not part of the fingerprint, which the adapter carries itself
    save_adapter(src, tmp_path / "adapter.safetensors")
    dst, _ = load_model(tmp_path / "base.safetensors")
    load_adapter(dst, tmp_path / "adapter.safetensors")
    assert np.array_equal(logits(dst), logits(src))
    assert np.array_equal(dst.lm_head.weight.data, src.lm_head.weight.data)
    assert dst.lm_head.weight.requires_grad


def test_adapter_round_trip_into_a_model_with_the_same_lora_config(tmp_path):
    src = adapted_gpt(seed=0)
    save_adapter(src, tmp_path / "a.safetensors")
    dst = apply_lora(tiny_gpt(), QV)  # same config, its own (initial) factors
    layers_before = lora_layers(dst)
    load_adapter(dst, tmp_path / "a.safetensors")
    assert np.array_equal(logits(dst), logits(src))
    assert lora_layers(dst) == layers_before  # the same LoRALinear objects, new values


def test_float16_adapter_loads_into_float32_factors(tmp_path):
    src = adapted_gpt()
    good = tmp_path / "a.safetensors"
    save_adapter(src, good)
    tensors, meta = read_file(good, "adapter")
    write_file(good, {n: a.astype(np.float16) for n, a in tensors.items()}, meta)  # float16 -> float32: no loss
    dst = load_adapter(tiny_gpt(), good)
    for n, m in lora_layers(dst).items():
        assert m.A.dtype == np.float32 and np.array_equal(m.A.data, tensors[f"{n}.A"].astype(np.float16))


@pytest.mark.parametrize("targets,r", [("q,v", 2), ("all-linear", 3), ("up", 1)])
def test_adapter_file_holds_just_the_factors(tmp_path, targets, r):
    model = adapted_gpt(targets, r=r)
    path = tmp_path / "a.safetensors"
    save_adapter(model, path)
    names = lora.resolve_targets(targets)
    expected = TINY["n_layer"] * sum(4 * r * (SHAPES[t][0] + SHAPES[t][1]) for t in names)  # float32 A and B
    assert data_bytes(path) == expected
    tensors, meta = read_file(path, "adapter")
    assert sorted(tensors) == sorted(f"blocks.{i}.{blk}.{t}.{f}" for i in range(2) for t in names
                                     for blk in ["attn" if t in "qkvo" else "mlp"] for f in "AB")
    assert meta["kind"] == "adapter" and meta["lora"] == model.lora_config.to_dict() and meta["format_version"] == 1
    assert meta["base_fingerprint"] == base_fingerprint(tiny_gpt())  # the base it was made from, not A or B


def test_adapter_fingerprint_describes_the_base_at_save_time(tmp_path):
    model = adapted_gpt()
    model.blocks[0].attn.k.weight.data[0, 0] += 0.5  # a frozen weight changes after apply_lora, before the save
    model.blocks[1].attn.q.weight.data[1, 2] -= 0.5  # ... and the W inside an adapted layer
    path = tmp_path / "a.safetensors"
    save_adapter(model, path)
    original = tiny_gpt()
    before = snapshot(original)
    with pytest.raises(ValueError, match="trained on a different base model"):
        load_adapter(original, path)
    assert_untouched(before, original)
    changed = tiny_gpt()
    changed.blocks[0].attn.k.weight.data[0, 0] += 0.5
    changed.blocks[1].attn.q.weight.data[1, 2] -= 0.5
    load_adapter(changed, path)
    assert np.array_equal(logits(changed), logits(model))


# --- adapter and model files: the table of bad files -------------------------------------------------------------
#
# Each row makes one defect from a good file: make(good, bad, kind) writes a bad file (or not) and returns the path to
# load. The test then checks the error type, that the message names the file and matches the culprit, and that
# neither the model (values, requires_grad flags, modules, LoRA state) nor any file on disk changed.

DROP = object()  # as a value in the edits below: delete the key
OTHER_BASE = base_fingerprint(tiny_gpt(seed=1))  # the fingerprint of a base model with other weights


def write_raw(path: Path, tensors: dict[str, np.ndarray], meta) -> None:
    """A safetensors file whose lora_np metadata is ``meta`` as given: a dict (as JSON), a str (verbatim) or None (no
    lora_np metadata), so that the table can write files that lora_np itself never would."""
    metadata = None if meta is None else {"lora_np": meta if isinstance(meta, str) else json.dumps(meta)}
    path.write_bytes(save(tensors, metadata=metadata))


def edit(change):
    """A defect made by ``change(tensors, meta)`` on the good file's contents; it returns the metadata to write."""

    def make(good: Path, bad: Path, kind: str) -> Path:
        tensors, meta = read_file(good, kind)
        tensors = dict(tensors)
        write_raw(bad, tensors, change(tensors, meta))
        return bad

    return make


def _set(d: dict, changes: dict) -> dict:
    """A copy of ``d`` with ``changes`` applied (DROP deletes the key)."""
    d = {**d, **changes}
    return {k: v for k, v in d.items() if v is not DROP}


def meta_set(**changes):
    """Change top-level metadata keys."""
    return edit(lambda t, m: _set(m, changes))


def lora_set(**changes):
    """Change keys of an adapter's stored LoRA config."""
    return edit(lambda t, m: {**m, "lora": _set(m["lora"], changes)})


def config_set(**changes):
    """Change keys of a model's stored GPT config."""
    return edit(lambda t, m: {**m, "config": _set(m["config"], changes)})


def meta_text(text):
    """Replace the whole lora_np metadata by ``text`` (None: no lora_np metadata at all)."""
    return edit(lambda t, m: text)


def other_kind():
    return edit(lambda t, m: {**m, "kind": {"adapter": "model", "model": "adapter"}[m["kind"]]})


def tensor_set(name, value):
    """Replace tensor ``name`` by ``value``, or by ``value(the tensor)`` if it is a function."""

    def change(tensors, meta):
        tensors[name] = value(tensors[name]) if callable(value) else value
        return meta

    return edit(change)


def tensor_drop(name):
    def change(tensors, meta):
        del tensors[name]
        return meta

    return edit(change)


def raw_bytes(change):
    """A defect in the bytes themselves: ``change(good bytes) -> bad bytes``."""

    def make(good: Path, bad: Path, kind: str) -> Path:
        bad.write_bytes(change(good.read_bytes()))
        return bad

    return make


def no_file(good: Path, bad: Path, kind: str) -> Path:
    return bad


def a_folder(good: Path, bad: Path, kind: str) -> Path:
    bad.mkdir()
    return bad


def with_nan(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flat[1] = np.nan
    return a


def crafted(header, data: bytes = b"", claim: int | None = None):
    """A hand-made safetensors file: ``header`` (a dict, as JSON, or a str verbatim), then ``data``; ``claim``: the
    header length it states (default: the true one)."""
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()

    def change(good: bytes) -> bytes:
        return (len(raw) if claim is None else claim).to_bytes(8, "little") + raw + data

    return raw_bytes(change)


def good_meta(kind: str = "adapter", **more) -> dict:
    return {"__metadata__": {"lora_np": json.dumps({"format_version": 1, "kind": kind, **more})}}


# Defects of any lora_np file, adapter or model: (make, error type, what the message must say).
FILE_ERRORS = {
    "no such file": (no_file, FileNotFoundError, r"no (adapter|model) file at"),
    "a folder": (a_folder, FileNotFoundError, r"no (adapter|model) file at"),
    "empty": (raw_bytes(lambda b: b""), ValueError, "not a valid safetensors file"),
    "truncated data": (raw_bytes(lambda b: b[:-10]), ValueError, "not a valid safetensors file"),
    "truncated header": (raw_bytes(lambda b: b[:40]), ValueError, "not a valid safetensors file"),
    "random bytes": (raw_bytes(lambda b: np.random.default_rng(0).bytes(300)), ValueError,
                     "not a valid safetensors file"),
    "header not JSON": (raw_bytes(lambda b: b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}"), ValueError,
                        "not a valid safetensors file"),
    "no lora_np metadata": (meta_text(None), ValueError, "not one written by lora_np"),
    "metadata not JSON": (meta_text("{kind: adapter"), ValueError, "lora_np metadata is not valid JSON"),
    "metadata a JSON list": (meta_text("[1, 2]"), ValueError, "lora_np metadata is not a JSON object"),
    "metadata a JSON string": (meta_text('"adapter"'), ValueError, "lora_np metadata is not a JSON object"),
    # hostile files: each is refused from its header, before its tensors are read
    "header claims a terabyte": (crafted({}, claim=2**40), ValueError,
                                 r"not a valid safetensors file: its header claims 1,099,511,627,776 bytes"),
    "header longer than the file": (crafted({}, claim=1000), ValueError, r"header claims 1,000 bytes, the file has"),
    "tensor claims gigabytes": (crafted({**good_meta(), "x": {"dtype": "F32", "shape": [10**9],
                                                              "data_offsets": [0, 4 * 10**9]}}, b"\0" * 16),
                                ValueError, r"tensor 'x' has byte range \[0, 4000000000\] outside the file's 16"),
    "tensor range and shape disagree": (crafted({**good_meta(), "x": {"dtype": "F32", "shape": [8],
                                                                      "data_offsets": [0, 16]}}, b"\0" * 16),
                                        ValueError, r"tensor 'x' of shape \[8\] needs 32 bytes, its range holds 16"),
    "negative shape": (crafted({**good_meta(), "x": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}},
                               b"\0" * 16), ValueError, r"tensor 'x' has shape \[-4\]"),
    "unknown dtype": (crafted({**good_meta(), "x": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}},
                              b"\0" * 16), ValueError, r"tensor 'x' has no known dtype"),
    "header nested 10000 deep": (crafted('{"a": ' + "[" * 10_000 + "]" * 10_000 + "}"), ValueError,
                                 r"not a valid safetensors file: JSON nested deeper than 32 levels"),
    "metadata nested 10000 deep": (meta_text('{"kind": ' + "[" * 10_000 + "]" * 10_000 + "}"), ValueError,
                                   r"lora_np metadata is not valid JSON: JSON nested deeper than 32 levels"),
    "metadata of 2 MB": (meta_text(json.dumps({"format_version": 1, "kind": "x", "pad": "x" * 2**21})), ValueError,
                         r"lora_np metadata is 2,097,\d+ bytes, more than the 1,048,576"),
    "format version 2": (meta_set(format_version=2), ValueError,
                         r"format_version 2 is not one this lora_np reads \[1\] \(written by a newer lora_np\?\)"),
    "no format version": (meta_set(format_version=DROP), ValueError, r"format_version None is not one"),
    "format version a string": (meta_set(format_version="1"), ValueError, r"format_version '1' is not one"),
    "no kind": (meta_set(kind=DROP), ValueError, r"holds a None file, expected a '(adapter|model)' file"),
    "the other kind": (other_kind(), ValueError, r"holds a '(model|adapter)' file, expected a '(adapter|model)' file"),
}

ADAPTER_ERRORS = {
    **FILE_ERRORS,
    "no LoRA config": (meta_set(lora=DROP), ValueError, r"metadata key 'lora' is missing or not a dict"),
    "LoRA config a list": (meta_set(lora=[2, 4.0]), ValueError, r"metadata key 'lora' is missing or not a dict"),
    "r=0": (lora_set(r=0), ValueError, r"bad LoRA config in metadata: LoRAConfig\.r must be a positive integer, got 0"),
    "r a string": (lora_set(r="2"), ValueError, r"LoRAConfig\.r must be a positive integer, got '2'"),
    "alpha=nan": (lora_set(alpha=math.nan), ValueError, r"LoRAConfig\.alpha must be a finite number > 0, .*got nan"),
    "alpha=inf": (lora_set(alpha=math.inf), ValueError, r"LoRAConfig\.alpha must be a finite number > 0, .*got inf"),
    "alpha=1e308": (lora_set(alpha=1e308), ValueError, r"LoRAConfig\.alpha must be .*at most 10000, got 1e\+308"),
    "seed=-1": (lora_set(seed=-1), ValueError, r"LoRAConfig\.seed must be a non-negative integer, got -1"),
    "zero='both'": (lora_set(zero="both"), ValueError, r"LoRAConfig\.zero must be 'B' \(paper\) or 'A', got 'both'"),
    "dropout=1": (lora_set(dropout=1.0), ValueError, r"LoRAConfig\.dropout must be a number in \[0, 1\), got 1\.0"),
    "unknown target": (lora_set(targets=["q", "x"]), ValueError, r"unknown LoRA target\(s\) \['x'\]"),
    "unknown config key": (lora_set(rank=2), ValueError, r"LoRA config: unknown keys \['rank'\]"),
    "missing config key": (lora_set(dropout=DROP), ValueError, r"missing keys \['dropout'\]"),
    "no fingerprint": (meta_set(base_fingerprint=DROP), ValueError,
                       r"metadata key 'base_fingerprint' is missing or not a str"),
    "fingerprint not a string": (meta_set(base_fingerprint=123), ValueError,
                                 r"metadata key 'base_fingerprint' is missing or not a str"),
    "base of another vocabulary": (edit(lambda t, m: {**m, "base_config": {**m["base_config"], "vocab_size": 40}}),
                                   ValueError, r"base model of another shape \(vocab_size 40, this model 11\)"),
    "base config a list": (meta_set(base_config=[1]), ValueError, r"metadata key 'base_config' is not a dict"),
    "other base model": (meta_set(base_fingerprint=OTHER_BASE), ValueError,
                         r"trained on a different base model \(fingerprint " + OTHER_BASE[:12]),
    "wrong shape": (tensor_set("blocks.1.attn.v.B", np.zeros((3, C), np.float32)), ValueError,
                    r"blocks\.1\.attn\.v\.B: shape \(3, 8\), expected \(2, 8\)"),
    "transposed": (tensor_set("blocks.0.attn.q.A", lambda a: a.T.copy()), ValueError,
                   r"blocks\.0\.attn\.q\.A: shape \(2, 8\), expected \(8, 2\)"),
    "missing tensor": (tensor_drop("blocks.0.attn.q.B"), ValueError, r"missing tensors \['blocks\.0\.attn\.q\.B'\]"),
    "unexpected tensor": (tensor_set("blocks.0.attn.k.A", np.zeros((C, 2), np.float32)), ValueError,
                          r"unexpected tensors \['blocks\.0\.attn\.k\.A'\]"),
    "NaN": (tensor_set("blocks.1.attn.q.A", with_nan), ValueError, r"blocks\.1\.attn\.q\.A: holds NaN or inf"),
    "inf": (tensor_set("blocks.1.attn.v.B", lambda a: np.full_like(a, -np.inf)), ValueError,
            r"blocks\.1\.attn\.v\.B: holds NaN or inf"),
    "float64": (tensor_set("blocks.0.attn.v.A", lambda a: a.astype(np.float64)), ValueError,
                r"blocks\.0\.attn\.v\.A: dtype float64 cannot be held by a float32 parameter without loss"),
    "integers": (tensor_set("blocks.0.attn.v.B", lambda a: a.astype(np.int32)), ValueError,
                 r"blocks\.0\.attn\.v\.B: dtype int32 cannot be held"),
    "dora a string": (lora_set(dora="yes"), ValueError, r"LoRAConfig\.dora must be True or False, got 'yes'"),
    "unknown init": (lora_set(init="loftq"), ValueError, r"LoRAConfig\.init must be one of \['random', 'pissa'\]"),
    "DoRA without magnitudes": (lora_set(dora=True), ValueError,  # into a model with plain LoRA: another config
                                r"missing tensors \['blocks\.0\.attn\.q\.magnitude'|has LoRA config .*'dora': True"),
    "a magnitude in a plain adapter": (tensor_set("blocks.0.attn.q.magnitude", np.ones(C, np.float32)), ValueError,
                                       r"unexpected tensors \['blocks\.0\.attn\.q\.magnitude'\]"),
}


@pytest.mark.parametrize("has_lora", [False, True], ids=["into a base model", "into a model with LoRA"])
@pytest.mark.parametrize("case", ADAPTER_ERRORS)
def test_load_adapter_refuses_a_bad_file_and_changes_nothing(tmp_path, case, has_lora):
    make, error, culprit = ADAPTER_ERRORS[case]
    good = tmp_path / "adapter.safetensors"
    save_adapter(adapted_gpt(), good)
    path = make(good, tmp_path / "bad.safetensors", "adapter")
    model = tiny_gpt()
    if has_lora:  # the same LoRA config as the file (before its defect), other factor values
        perturb_adapters(apply_lora(model, QV), seed=7)
    before, files = snapshot(model), snapshot_files(tmp_path)
    with pytest.raises(error, match=culprit) as refused:
        load_adapter(model, path)
    assert str(path) in str(refused.value)
    assert_untouched(before, model)
    assert_files_untouched(files, tmp_path)


MODEL_ERRORS = {
    **FILE_ERRORS,
    "no config": (meta_set(config=DROP), ValueError, r"metadata key 'config' is missing or not a dict"),
    "config a string": (meta_set(config="tiny"), ValueError, r"metadata key 'config' is missing or not a dict"),
    "bad config value": (config_set(n_head=3), ValueError,
                         r"bad model config in metadata: GPTConfig: n_embd=8 must be divisible by n_head=3"),
    "config value a bool": (config_set(n_layer=True), ValueError, r"GPTConfig\.n_layer must be a positive integer"),
    "unknown config key": (config_set(n_experts=4), ValueError, r"bad model config in metadata: .*n_experts"),
    "config of another size": (config_set(n_embd=16), ValueError,
                               r"its config does not match its tensors: n_embd 16 \(the tensors say 8\)"),
    "a million layers": (config_set(n_layer=10**6), ValueError, r"n_layer 1000000 \(the tensors say 2\)"),
    "another vocabulary": (config_set(vocab_size=50_000), ValueError, r"vocab_size 50000 \(the tensors say 11\)"),
    "n_layer null": (config_set(n_layer=None), ValueError, r"GPTConfig\.n_layer must be a positive integer, got None"),
    "extra not an object": (meta_set(extra=[1]), ValueError, r"metadata key 'extra' is not a dict"),
    "missing tensor": (tensor_drop("blocks.0.mlp.up.bias"), ValueError,
                       r"missing tensors \['blocks\.0\.mlp\.up\.bias'\]"),
    "unexpected tensor": (tensor_set("blocks.0.attn.q.A", np.zeros((C, 2), np.float32)), ValueError,
                          r"unexpected tensors \['blocks\.0\.attn\.q\.A'\]"),
    "transposed": (tensor_set("blocks.0.mlp.up.weight", lambda a: a.T.copy()), ValueError,
                   r"blocks\.0\.mlp\.up\.weight: shape \(32, 8\), expected \(8, 32\)"),
    "NaN": (tensor_set("blocks.1.ln2.weight", with_nan), ValueError, r"blocks\.1\.ln2\.weight: holds NaN or inf"),
    "inf": (tensor_set("lm_head.weight", lambda a: np.full_like(a, np.inf)), ValueError,
            r"lm_head\.weight: holds NaN or inf"),
    "float64": (tensor_set("wte.weight", lambda a: a.astype(np.float64)), ValueError,
                r"wte\.weight: dtype float64 cannot be held by a float32 parameter without loss"),
    "integers": (tensor_set("wpe.weight", lambda a: a.astype(np.int64)), ValueError, r"wpe\.weight: dtype int64"),
}


@pytest.mark.parametrize("case", MODEL_ERRORS)
def test_load_model_refuses_a_bad_file_and_changes_nothing(tmp_path, case):
    make, error, culprit = MODEL_ERRORS[case]
    good = tmp_path / "model.safetensors"
    save_model(tiny_gpt(), good, extra={"tokenizer": "abc"})
    path = make(good, tmp_path / "bad.safetensors", "model")
    files = snapshot_files(tmp_path)
    with pytest.raises(error, match=culprit) as refused:
        load_model(path)
    assert str(path) in str(refused.value)
    assert_files_untouched(files, tmp_path)


@pytest.mark.parametrize("case", ["r=0", "alpha=nan", "unknown config key", "no fingerprint", "metadata a JSON list"])
def test_read_adapter_config_refuses_bad_metadata(tmp_path, case):
    make, error, culprit = ADAPTER_ERRORS[case]
    good = tmp_path / "adapter.safetensors"
    save_adapter(adapted_gpt(), good)
    path = make(good, tmp_path / "bad.safetensors", "adapter")
    with pytest.raises(error, match=culprit) as refused:
        read_adapter_config(path)
    assert str(path) in str(refused.value)


# --- adapters: files that are fine but do not fit the model --------------------------------------------------------


@pytest.fixture
def adapter_file(tmp_path) -> Path:
    path = tmp_path / "adapter.safetensors"
    save_adapter(adapted_gpt(), path)
    return path


def assert_refused(model, path, error, match):
    """load_adapter(model, path) raises ``error`` matching ``match`` and changes nothing; a ValueError (the file
    does not fit the model) names the file."""
    before, files = snapshot(model), snapshot_files(path.parent)
    with pytest.raises(error, match=match) as refused:
        load_adapter(model, path)
    if error is ValueError:
        assert str(path) in str(refused.value)
    assert_untouched(before, model)
    assert_files_untouched(files, path.parent)


def test_load_adapter_into_a_different_base_model(adapter_file):
    assert_refused(tiny_gpt(seed=1), adapter_file, ValueError, "trained on a different base model")  # other weights


def test_load_adapter_into_a_slightly_changed_base_model(adapter_file):
    model = tiny_gpt()
    model.blocks[1].ln2.bias.data[0] += 1e-3  # one number differs: the fingerprint sees it
    assert_refused(model, adapter_file, ValueError, "fingerprint")


def test_load_adapter_into_a_model_with_frozen_parameters_keeps_the_flags(adapter_file):
    model = tiny_gpt(seed=1)
    for p in model.parameters()[::3]:
        p.requires_grad = False  # a mix of flags: a refused load must not touch any of them
    assert_refused(model, adapter_file, ValueError, "trained on a different base model")


def test_load_adapter_with_a_different_lora_config(adapter_file):
    model = apply_lora(tiny_gpt(), LoRAConfig(targets="q,k,v", r=2, alpha=4.0))
    assert_refused(model, adapter_file, ValueError, r"has LoRA config .*'targets': \['q', 'v'\].*the model has")


def test_load_adapter_whose_rank_does_not_fit_the_model(tmp_path, adapter_file):
    tensors, meta = read_file(adapter_file, "adapter")
    meta["lora"]["r"] = 9  # a valid config, but the layers are 8 wide
    path = tmp_path / "r9.safetensors"
    write_file(path, tensors, meta)
    assert_refused(tiny_gpt(), path, ValueError, r"does not fit this model: LoRA rank\(s\) \[9\] exceed 8")


def test_load_adapter_into_a_merged_model(adapter_file):
    model = apply_lora(tiny_gpt(), QV)
    lora.merge(model)
    assert_refused(model, adapter_file, RuntimeError, r"unmerge\(\) first")


def test_save_adapter_needs_lora_and_an_unmerged_model(tmp_path):
    path = tmp_path / "a.safetensors"
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_adapter(tiny_gpt(), path)
    model = adapted_gpt()
    lora.merge(model)
    with pytest.raises(RuntimeError, match=r"unmerge\(\) first"):
        save_adapter(model, path)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    lora.unmerge(model)
    save_adapter(model, path)
    assert path.is_file()


# --- DoRA and PiSSA adapters ---------------------------------------------------------------------------------------


def trained(config: LoRAConfig, seed: int = 0) -> GPT:
    """A tiny GPT with ``config``'s LoRA whose adapter parameters hold trained-looking values."""
    model = apply_lora(tiny_gpt(seed), config)
    perturb_adapters(model, seed=100 + seed, std=0.3)
    for m in lora_layers(model).values():
        if m.dora:
            m.magnitude.data *= np.linspace(0.5, 1.5, m.d_out, dtype=np.float32)
    return model


DORA, PISSA = replace(QV, dora=True), replace(QV, init="pissa")


@pytest.mark.parametrize("config", [DORA, PISSA, replace(QV, dora=True, init="pissa")], ids=["dora", "pissa", "both"])
def test_dora_and_pissa_adapters_round_trip_onto_the_base(tmp_path, config):
    src, path = trained(config), tmp_path / "a.safetensors"
    save_adapter(src, path)
    tensors, meta = read_file(path, "adapter")
    assert meta["lora"] == config.to_dict() and read_adapter_config(path) == config
    assert meta["base_fingerprint"] == base_fingerprint(tiny_gpt())  # PiSSA too: the base, not its residuals
    assert {n.rsplit(".", 1)[1] for n in tensors} == {"A", "B"} | ({"magnitude"} if config.dora else set())
    expected = TINY["n_layer"] * 2 * 4 * (2 * (C + C) + (C if config.dora else 0))  # float32: r·(d_in+d_out) [+ d_out]
    assert data_bytes(path) == expected
    dst = load_adapter(tiny_gpt(), path)  # apply_lora with the file's config (PiSSA: the SVD again), then its values
    assert dst.lora_config == config
    assert np.array_equal(logits(dst), logits(src))  # one machine: the SVD, hence the residual, is the same
    again = load_adapter(apply_lora(tiny_gpt(), config), path)  # into a model that has that LoRA already
    assert np.array_equal(logits(again), logits(src))


@pytest.mark.parametrize("config", [DORA, PISSA], ids=["dora", "pissa"])
def test_dora_and_pissa_adapters_refuse_another_base(tmp_path, config):
    path = tmp_path / "a.safetensors"
    save_adapter(trained(config), path)
    assert_refused(tiny_gpt(seed=1), path, ValueError, "trained on a different base model")
    assert_refused(apply_lora(tiny_gpt(seed=1), config), path, ValueError, "trained on a different base model")
    assert_refused(apply_lora(tiny_gpt(), QV), path, ValueError, "has LoRA config")  # plain LoRA is another setup
    changed = tiny_gpt()
    changed.blocks[0].attn.q.weight.data[0, 0] += 1e-3
    assert_refused(changed, path, ValueError, "fingerprint")


def test_a_pissa_adapter_refuses_the_residual_model_as_its_base(tmp_path):
    # the residual model (W − s·A₀B₀) is not a base: PiSSA applied to it again would subtract the principal part twice
    src, path = trained(PISSA), tmp_path / "a.safetensors"
    save_adapter(src, path)
    residual = tiny_gpt()
    for name, m in lora_layers(src).items():
        dict(residual.named_parameters())[f"{name}.weight"].data[...] = m.weight.data
    assert_refused(residual, path, ValueError, "trained on a different base model")


def test_a_pissa_model_whose_frozen_weights_changed_cannot_name_its_base(tmp_path):
    model = trained(PISSA)
    model.blocks[0].attn.k.weight.data[0, 0] += 0.5  # after apply_lora: the recorded base is no longer this one
    with pytest.raises(RuntimeError, match="a frozen weight changed after PiSSA was applied"):
        save_adapter(model, tmp_path / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_dora_adapter_refuses_a_base_with_a_zero_column(tmp_path):
    path = tmp_path / "a.safetensors"
    save_adapter(trained(DORA), path)
    model = tiny_gpt()
    model.blocks[0].attn.v.weight.data[:, 2] = 0.0
    assert_refused(model, path, ValueError, r"does not fit this model: DoRA divides each output column")


def test_an_adapter_written_before_dora_and_pissa_loads_as_plain_lora(tmp_path, adapter_file):
    tensors, meta = read_file(adapter_file, "adapter")
    meta["lora"] = {k: v for k, v in meta["lora"].items() if k not in ("dora", "init")}
    path = tmp_path / "old.safetensors"
    write_file(path, tensors, meta)
    assert load_adapter(tiny_gpt(), path).lora_config == QV


# --- atomic writes -----------------------------------------------------------------------------------------------


def assert_only(folder: Path, names: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == names  # in particular no ".lora_np-xxxx.tmp" left behind


def test_a_250_character_file_name_works_and_leaves_no_temporary(tmp_path):
    name = "a" * (250 - len(".safetensors")) + ".safetensors"  # the temporary name must not be longer (255 max)
    assert len(name) == 250
    model = adapted_gpt()
    save_adapter(model, tmp_path / name)
    save_adapter(model, tmp_path / name)  # and again, over the existing file
    assert_only(tmp_path, {name})
    assert np.array_equal(logits(load_adapter(tiny_gpt(), tmp_path / name)), logits(model))
    save_model(model, tmp_path / name.replace("a", "m", 1))
    assert_only(tmp_path, {name, name.replace("a", "m", 1)})


def test_saving_to_a_folder_is_an_error_and_changes_nothing(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    files = snapshot_files(tmp_path)
    with pytest.raises(IsADirectoryError, match="is a folder"):
        save_adapter(adapted_gpt(), tmp_path / "out")
    with pytest.raises(IsADirectoryError, match="is a folder"):
        save_model(tiny_gpt(), tmp_path / "out")
    assert_files_untouched(files, tmp_path)


@pytest.mark.parametrize("save_one", [lambda m, p: save_adapter(m, p), lambda m, p: save_model(m, p)],
                         ids=["adapter", "model"])
def test_failed_rename_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch, save_one):
    path = tmp_path / "file.safetensors"
    save_one(adapted_gpt(seed=0), path)
    files = snapshot_files(tmp_path)

    def boom(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(checkpoint.os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        save_one(adapted_gpt(seed=1), path)
    assert_files_untouched(files, tmp_path)  # the old file, byte for byte, and no temporary one


def test_write_failing_midway_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    save_model(tiny_gpt(seed=0), path)
    old = path.read_bytes()
    real_fdopen = os.fdopen

    class HalfWriter:  # writes half of the bytes, then the disk is "full"
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, blob):
            self.f.write(blob[: len(blob) // 2])
            self.f.flush()
            raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint.os, "fdopen", lambda fd, mode: HalfWriter(real_fdopen(fd, mode)))
    with pytest.raises(OSError, match="No space left"):
        save_model(tiny_gpt(seed=1), path)
    assert path.read_bytes() == old
    assert_only(tmp_path, {"model.safetensors"})
    monkeypatch.undo()
    assert load_model(path)[0].config.seed == 0


@pytest.mark.parametrize(
    "tensors, meta",
    [
        ({"a": np.zeros(2, np.float32), "b": np.array([object()])}, {"kind": "adapter"}),  # no object dtype
        ({"a": np.zeros(2, np.float32)}, {"kind": "model", "extra": {1, 2}}),  # a set is not JSON
    ],
)
def test_unserialisable_input_keeps_the_old_file(tmp_path, tensors, meta):
    path = tmp_path / "f.safetensors"
    write_file(path, {"x": np.ones(3, np.float32)}, {"kind": "model"})
    old = path.read_bytes()
    with pytest.raises((SafetensorError, TypeError)):
        write_file(path, tensors, meta)
    assert path.read_bytes() == old
    assert_only(tmp_path, {"f.safetensors"})


def test_write_file_creates_folders_and_overwrites(tmp_path):
    path = tmp_path / "a" / "b" / "f.safetensors"
    write_file(path, {"x": np.arange(3, dtype=np.float32)}, {"kind": "model", "n": 1})
    write_file(path, {"x": np.arange(4, dtype=np.float32)}, {"kind": "model", "n": 2})
    tensors, meta = read_file(path, "model")
    assert np.array_equal(tensors["x"], np.arange(4)) and meta["n"] == 2
    assert_only(path.parent, {"f.safetensors"})


def test_overwriting_keeps_the_file_mode(tmp_path):
    path = tmp_path / "private.safetensors"
    save_adapter(adapted_gpt(), path)
    path.chmod(0o600)
    save_adapter(adapted_gpt(seed=1), path)
    assert path.stat().st_mode & 0o777 == 0o600
    checkpoint.write_atomic(path, b"x")
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_bytes() == b"x"


def test_an_empty_path_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="no file name"):
        checkpoint.write_atomic("", b"x")
    assert_only(tmp_path, set())


def test_a_write_removes_temporaries_of_dead_processes_only(tmp_path):
    """A process killed outright (SIGKILL) mid-write leaves its temporary file; the next write into that folder
    removes it, and leaves alone those of processes still running (they may be writing now)."""
    dead = tmp_path / f"{checkpoint.TEMP_PREFIX}{2**22 + 1}-abc.tmp"  # above Linux's pid_max default: never alive
    alive = tmp_path / f"{checkpoint.TEMP_PREFIX}{os.getppid()}-abc.tmp"
    other = tmp_path / ".lora_np-notes.txt"  # not one of ours: untouched
    for p in (dead, alive, other):
        p.write_bytes(b"half")
    checkpoint.write_atomic(tmp_path / "f.bin", b"new")
    assert_only(tmp_path, {alive.name, other.name, "f.bin"})


def test_ctrl_c_during_a_write_keeps_the_old_file(tmp_path, monkeypatch):
    import signal

    path = tmp_path / "f.bin"
    checkpoint.write_atomic(path, b"old")

    def interrupted(fd):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the bytes go to the disk

    monkeypatch.setattr(checkpoint.os, "fsync", interrupted)
    started_with = signal.getsignal(signal.SIGINT)
    # Ctrl-C as in a terminal, even where pytest runs as a background job (which starts with SIGINT ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            checkpoint.write_atomic(path, b"new")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is put back
    finally:
        signal.signal(signal.SIGINT, started_with)
    assert path.read_bytes() == b"old"
    assert_only(tmp_path, {"f.bin"})


def test_an_ignored_signal_stays_ignored_and_the_write_completes(tmp_path, monkeypatch):
    import signal

    path = tmp_path / "f.bin"
    checkpoint.write_atomic(path, b"old")
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: os.kill(os.getpid(), signal.SIGINT))
    started_with = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a background job: SIGINT ignored
    try:
        checkpoint.write_atomic(path, b"new")
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, started_with)
    assert path.read_bytes() == b"new"
    assert_only(tmp_path, {"f.bin"})


# --- model checkpoints -------------------------------------------------------------------------------------------


def test_save_model_load_model_round_trip(tmp_path):
    model = tiny_gpt(seed=4, dropout=0.1, bias=False)
    path = tmp_path / "m.safetensors"
    extra = {"tokenizer": "abcdefghijk", "step": 12, "losses": [2.3, 1.1]}
    save_model(model, path, extra=extra)
    loaded, got = load_model(path)
    assert got == extra
    assert loaded.config == model.config
    model.eval(), loaded.eval()
    assert np.array_equal(logits(loaded), logits(model))
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), loaded.named_parameters()):
        assert n1 == n2 and p1.dtype == p2.dtype and np.array_equal(p1.data, p2.data)
    save_model(model, path)
    assert load_model(path)[1] == {}


def test_save_model_of_a_lora_model_excludes_a_and_b(tmp_path):
    model = adapted_gpt("all-linear", r=2)
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    tensors, _ = read_file(path, "model")
    assert sorted(tensors) == sorted(n for n, _ in tiny_gpt().named_parameters())
    assert not any(n.endswith((".A", ".B")) for n in tensors)
    loaded, _ = load_model(path)
    assert np.array_equal(logits(loaded), logits(tiny_gpt()))  # the untouched base model


def test_merged_lora_model_exports_as_a_plain_gpt(tmp_path):
    model = adapted_gpt("all-linear", r=2)
    lora.merge(model)
    merged_out = logits(model)
    assert not np.allclose(merged_out, logits(tiny_gpt()), atol=1e-3)
    path = tmp_path / "merged.safetensors"
    save_model(model, path)
    plain, _ = load_model(path)
    assert not lora_layers(plain)
    assert np.array_equal(logits(plain), merged_out)  # merged W, same products: bit for bit


# --- no pickle -----------------------------------------------------------------------------------------------------

PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def test_no_module_of_lora_np_uses_pickle():
    sources = sorted(Path(lora_np.__file__).parent.rglob("*.py"))  # the experiments package too
    assert {p.name for p in sources} >= {"checkpoint.py", "lora.py", "nn.py", "model.py"}
    for path in sources:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                mods = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                mods = [(node.module or "").split(".")[0]]
            else:
                mods = []
            assert not PICKLERS & set(mods), f"{path.name}:{node.lineno} imports {mods}"
            if isinstance(node, ast.keyword) and node.arg == "allow_pickle":
                pytest.fail(f"{path.name}: allow_pickle= used")
            if isinstance(node, ast.Attribute) and node.attr in ("load", "save") and isinstance(node.value, ast.Name):
                call = f"{node.value.id}.{node.attr}"  # np.load / np.save can unpickle object arrays
                assert node.value.id not in ("np", "numpy", "torch"), f"{path.name}:{node.lineno} {call}"
