"""Tests for lora_np/checkpoint.py and the adapter files of lora_np/lora.py: round trips, file sizes, every bad
input refused with the model left untouched, atomic writes, and no pickle anywhere."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError
from safetensors.numpy import save_file

import lora_np
from lora_np import checkpoint, lora
from lora_np.checkpoint import load_model, read_file, save_model, write_file
from lora_np.lora import apply_lora, load_adapter, lora_layers, save_adapter
from lora_np.model import GPT, GPTConfig
from lora_np.nn import Module
from lora_np.optim import AdamW

TINY = dict(vocab_size=11, block_size=8, n_layer=2, n_head=2, n_embd=8)
C = TINY["n_embd"]
SHAPES = {"q": (C, C), "k": (C, C), "v": (C, C), "o": (C, C), "up": (C, 4 * C), "down": (4 * C, C)}  # (d_in, d_out)
IDX = np.random.default_rng(0).integers(0, 11, (3, 8))


def tiny_gpt(seed: int = 0, **overrides) -> GPT:
    return GPT(GPTConfig(**{**TINY, "seed": seed, **overrides}))


def adapted_gpt(targets="q,v", r: int = 2, seed: int = 0, **kwargs) -> GPT:
    """A tiny GPT with LoRA whose factors hold random values (as after training), so that ΔW ≠ 0."""
    model = apply_lora(tiny_gpt(seed), targets, r=r, alpha=4.0, **kwargs)
    rng = np.random.default_rng(100 + seed)
    for m in lora_layers(model).values():
        m.A.data[...] = rng.standard_normal(m.A.shape) * 0.3
        m.B.data[...] = rng.standard_normal(m.B.shape) * 0.3
    return model


def logits(model: GPT) -> np.ndarray:
    return model(IDX)[0].data


def snapshot(model: Module) -> dict:
    """Everything a failed load could have changed: values, parameter set and flags, LoRA layers and their state."""
    return {
        "state": model.state_dict(),
        "params": [(n, id(p), p.requires_grad) for n, p in model.named_parameters()],
        "modules": [(n, type(m).__name__) for n, m in model.named_modules()],
        "lora": {n: (m.merged, id(m.A), id(m.B)) for n, m in lora_layers(model).items()},
        "lora_config": getattr(model, "lora_config", None),
        "fingerprint": getattr(model, "lora_fingerprint", None),
    }


def assert_untouched(before: dict, model: Module) -> None:
    after = snapshot(model)
    assert list(after["state"]) == list(before["state"])
    for name, arr in before["state"].items():
        assert np.array_equal(after["state"][name], arr), f"{name} changed"
    for key in ("params", "modules", "lora", "lora_config", "fingerprint"):
        assert after[key] == before[key], key


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
    assert dst.lora_config == src.lora_config and dst.lora_fingerprint == src.lora_fingerprint
    assert [id(p) for p in dst.trainable_parameters()] == [id(p) for m in lora_layers(dst).values() for p in (m.A, m.B)]
    opt = AdamW(dst.trainable_parameters(), lr=1e-2)  # training can go on from the loaded adapter
    dst(IDX, IDX)[1].backward()
    opt.step()


def test_adapter_round_trip_into_a_loaded_base_model(tmp_path):
    base = tiny_gpt()
    save_model(base, tmp_path / "base.safetensors")
    src = apply_lora(base, "all-linear", r=3, alpha=6.0, modules_to_save=["lm_head"])
    for m in lora_layers(src).values():
        m.B.data[...] = 0.1
    src.lm_head.weight.data *= 2.0  # trained fully
    save_adapter(src, tmp_path / "adapter.safetensors")
    dst, _ = load_model(tmp_path / "base.safetensors")
    load_adapter(dst, tmp_path / "adapter.safetensors")
    assert np.array_equal(logits(dst), logits(src))
    assert np.array_equal(dst.lm_head.weight.data, src.lm_head.weight.data)
    assert dst.lm_head.weight.requires_grad


def test_adapter_round_trip_into_a_model_with_the_same_lora_config(tmp_path):
    src = adapted_gpt(seed=0)
    save_adapter(src, tmp_path / "a.safetensors")
    dst = apply_lora(tiny_gpt(), "q,v", r=2, alpha=4.0)  # same config, its own (initial) factors
    layers_before = lora_layers(dst)
    load_adapter(dst, tmp_path / "a.safetensors")
    assert np.array_equal(logits(dst), logits(src))
    assert lora_layers(dst) == layers_before  # the same LoRALinear objects, new values


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
    assert meta["kind"] == "adapter" and meta["lora"]["r"] == r and meta["format_version"] == 1
    assert meta["base_fingerprint"] == model.lora_fingerprint


# --- adapters: bad inputs --------------------------------------------------------------------------------------------


@pytest.fixture
def adapter_file(tmp_path) -> Path:
    path = tmp_path / "adapter.safetensors"
    save_adapter(adapted_gpt(), path)
    return path


def rewrite(src: Path, dst: Path, edit) -> Path:
    """Copy an adapter file with ``edit(tensors, meta)`` applied: a file with a valid header, config and
    fingerprint, but something else wrong."""
    tensors, meta = read_file(src, "adapter")
    tensors = dict(tensors)
    edit(tensors, meta)
    write_file(dst, tensors, meta)
    return dst


def bad_shape(t, m):
    t["blocks.1.attn.v.B"] = np.zeros((3, C), np.float32)


def missing(t, m):
    del t["blocks.0.attn.q.B"]


def unexpected(t, m):
    t["blocks.0.attn.k.A"] = np.zeros((C, 2), np.float32)


def other_r(t, m):
    m["lora"]["r"] = 3


@pytest.mark.parametrize(
    "edit, match",
    [
        (bad_shape, r"wrong shapes \['blocks\.1\.attn\.v\.B: \(3, 8\) in the file, expected \(2, 8\)'\]"),
        (missing, r"missing \['blocks\.0\.attn\.q\.B'\]"),
        (unexpected, r"unexpected \['blocks\.0\.attn\.k\.A'\]"),
        (other_r, r"wrong shapes \['blocks\.0\.attn\.q\.A: \(8, 2\) in the file, expected \(8, 3\)'"),
    ],
)
@pytest.mark.parametrize("has_lora", [False, True])
def test_load_adapter_rejects_mismatched_tensors_and_changes_nothing(tmp_path, adapter_file, edit, match, has_lora):
    path = rewrite(adapter_file, tmp_path / "bad.safetensors", edit)
    model = tiny_gpt()
    if has_lora:
        r = 3 if edit is other_r else 2  # the same config as the (edited) file, so the tensors are what is wrong
        apply_lora(model, "q,v", r=r, alpha=4.0)
    before = snapshot(model)
    with pytest.raises(ValueError, match=match):
        load_adapter(model, path)
    assert_untouched(before, model)


def test_load_adapter_into_a_different_base_model(adapter_file):
    model = tiny_gpt(seed=1)  # same architecture, other weights
    before = snapshot(model)
    with pytest.raises(ValueError, match="trained on a different base model"):
        load_adapter(model, adapter_file)
    assert_untouched(before, model)


def test_load_adapter_into_a_slightly_changed_base_model(adapter_file):
    model = tiny_gpt()
    model.blocks[1].ln2.bias.data[0] += 1e-3  # one number differs: the fingerprint sees it
    before = snapshot(model)
    with pytest.raises(ValueError, match="fingerprint"):
        load_adapter(model, adapter_file)
    assert_untouched(before, model)


def test_load_adapter_with_a_different_lora_config(adapter_file):
    model = apply_lora(tiny_gpt(), "q,k,v", r=2, alpha=4.0)
    before = snapshot(model)
    with pytest.raises(ValueError, match="has LoRA config .*'targets': \\['q', 'v'\\].*the model has"):
        load_adapter(model, adapter_file)
    assert_untouched(before, model)


def test_load_adapter_into_a_merged_model(adapter_file):
    model = apply_lora(tiny_gpt(), "q,v", r=2, alpha=4.0)
    lora.merge(model)
    before = snapshot(model)
    with pytest.raises(RuntimeError, match=r"unmerge\(\) first"):
        load_adapter(model, adapter_file)
    assert_untouched(before, model)


def test_load_adapter_from_random_bytes(tmp_path):
    path = tmp_path / "noise.safetensors"
    path.write_bytes(np.random.default_rng(0).bytes(300))
    model = tiny_gpt()
    before = snapshot(model)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_adapter(model, path)
    assert_untouched(before, model)


def test_load_adapter_from_a_truncated_file(tmp_path, adapter_file):
    path = tmp_path / "cut.safetensors"
    path.write_bytes(adapter_file.read_bytes()[:-10])
    model = tiny_gpt()
    before = snapshot(model)
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_adapter(model, path)
    assert_untouched(before, model)


def test_load_adapter_from_a_foreign_safetensors_file(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"blocks.0.attn.q.A": np.zeros((C, 2), np.float32)}, str(path))
    model = tiny_gpt()
    before = snapshot(model)
    with pytest.raises(ValueError, match="not one written by lora_np"):
        load_adapter(model, path)
    assert_untouched(before, model)


def test_load_adapter_given_a_model_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_model(tiny_gpt(), path)
    model = tiny_gpt()
    before = snapshot(model)
    with pytest.raises(ValueError, match="holds a 'model' file, expected a 'adapter' file"):
        load_adapter(model, path)
    assert_untouched(before, model)


def test_load_adapter_from_a_missing_path(tmp_path):
    model = tiny_gpt()
    before = snapshot(model)
    with pytest.raises(FileNotFoundError, match="no adapter file at"):
        load_adapter(model, tmp_path / "nope.safetensors")
    with pytest.raises(FileNotFoundError):
        load_adapter(model, tmp_path)  # a folder is not a file either
    assert_untouched(before, model)


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


# --- atomic writes -----------------------------------------------------------------------------------------------


def assert_only(folder: Path, names: set[str]) -> None:
    assert {p.name for p in folder.iterdir()} == names  # in particular no ".name.xxxx.tmp" left behind


def test_failed_rename_keeps_the_old_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "adapter.safetensors"
    save_adapter(adapted_gpt(seed=0), path)
    old = path.read_bytes()

    def boom(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(checkpoint.os, "replace", boom)
    with pytest.raises(OSError, match="simulated crash"):
        save_adapter(adapted_gpt(seed=1), path)
    assert path.read_bytes() == old
    assert_only(tmp_path, {"adapter.safetensors"})


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


def rewrite_model(src: Path, dst: Path, edit) -> Path:
    tensors, meta = read_file(src, "model")
    tensors = dict(tensors)
    edit(tensors, meta)
    write_file(dst, tensors, meta)
    return dst


def drop_tensor(t, m):
    del t["blocks.0.mlp.up.bias"]


def transpose_tensor(t, m):
    t["blocks.0.mlp.up.weight"] = t["blocks.0.mlp.up.weight"].T.copy()


def config_mismatch(t, m):
    m["config"]["n_embd"] = 16


def unknown_config_key(t, m):
    m["config"]["n_experts"] = 4


def no_config(t, m):
    del m["config"]


@pytest.mark.parametrize(
    "edit, match",
    [
        (drop_tensor, r"tensors do not match the stored config: .*missing \['blocks\.0\.mlp\.up\.bias'\]"),
        (transpose_tensor, r"blocks\.0\.mlp\.up\.weight: got \(32, 8\), expected \(8, 32\)"),
        (config_mismatch, "tensors do not match the stored config"),
        (unknown_config_key, "bad model config"),
        (no_config, "bad model config"),
    ],
)
def test_load_model_rejects_corrupted_files(tmp_path, edit, match):
    good = tmp_path / "m.safetensors"
    save_model(tiny_gpt(), good)
    with pytest.raises(ValueError, match=match):
        load_model(rewrite_model(good, tmp_path / "bad.safetensors", edit))


def test_load_model_rejects_other_kinds_and_garbage(tmp_path, adapter_file):
    with pytest.raises(ValueError, match="holds a 'adapter' file, expected a 'model' file"):
        load_model(adapter_file)
    garbage = tmp_path / "g.safetensors"
    garbage.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(ValueError, match="not a valid safetensors file"):
        load_model(garbage)
    with pytest.raises(FileNotFoundError, match="no model file at"):
        load_model(tmp_path / "missing.safetensors")


# --- no pickle -----------------------------------------------------------------------------------------------------

PICKLERS = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def test_no_module_of_lora_np_uses_pickle():
    sources = sorted(Path(lora_np.__file__).parent.glob("*.py"))
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
