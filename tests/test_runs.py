"""Tests for lora_np/experiments/runs.py's base-model cache: the key tells apart everything that changes the base
model (however the corpora are cut, the engine's numerics), and a cached file is used only if its stored config and
tokenizer are the ones the run needs; one that cannot serve the run is retrained and replaced."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from lora_np import experiments
from lora_np.checkpoint import save_adapter, save_model
from lora_np.experiments import runs
from lora_np.lora import LoRAConfig, apply_lora
from lora_np.model import GPT


def corpora_of(tmp_path, pre: str, fine: str, name: str = "x"):
    (tmp_path / f"{name}-pre.txt").write_text(pre, encoding="utf-8")
    (tmp_path / f"{name}-fine.txt").write_text(fine, encoding="utf-8")
    cfg = experiments.ExperimentConfig.quick(pretrain_corpus=str(tmp_path / f"{name}-pre.txt"),
                                             finetune_corpus=str(tmp_path / f"{name}-fine.txt"))
    return cfg, experiments.load_corpora(cfg)


def test_hash_parts_prefixes_lengths():
    assert runs.hash_parts("a\0b", "c") != runs.hash_parts("a", "b\0c")
    assert runs.hash_parts("ab", "") != runs.hash_parts("a", "b") != runs.hash_parts("ab")
    assert runs.hash_parts("a", b"b") == runs.hash_parts(b"a", "b")


def test_two_pairs_of_corpora_that_join_to_the_same_text_have_two_keys(tmp_path, monkeypatch):
    """(A\\0B, C) and (A, B\\0C) joined with a \\0 are the same bytes: the old key gave them one base model."""
    monkeypatch.setenv("LORA_NP_CACHE", str(tmp_path / "cache"))
    a, b, c = "and god said " * 30, "let there be " * 30, "def f(x): pass " * 30
    cfg1, one = corpora_of(tmp_path, a + "\0" + b, c, "one")
    cfg2, two = corpora_of(tmp_path, a, b + "\0" + c, "two")
    assert one.tokenizer.chars == two.tokenizer.chars  # the same vocabulary, so the model config is the same too
    assert one.digest != two.digest
    assert runs.base_model_path(cfg1, one) != runs.base_model_path(cfg2, two)


def test_the_key_holds_the_numerics_version_and_every_config(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_NP_CACHE", str(tmp_path / "cache"))
    cfg = experiments.ExperimentConfig.quick()
    corpora = experiments.load_corpora(cfg)
    path = runs.base_model_path(cfg, corpora)
    assert path.parent == tmp_path / "cache" and path.name.startswith("base-")
    monkeypatch.setattr(runs, "NUMERICS_VERSION", runs.NUMERICS_VERSION + 1)  # a newer engine: another file
    assert runs.base_model_path(cfg, corpora) != path
    monkeypatch.undo()
    monkeypatch.setenv("LORA_NP_CACHE", str(tmp_path / "cache"))
    assert runs.base_model_path(cfg, corpora) == path
    assert runs.base_model_path(replace(cfg, pretrain=replace(cfg.pretrain, lr=1e-3)), corpora) != path
    assert runs.base_model_path(replace(cfg, model=replace(cfg.model, seed=1)), corpora) != path
    assert runs.base_model_path(replace(cfg, finetune=replace(cfg.finetune, lr=1e-3)), corpora) == path  # not base


def _foreign(cfg, corpora, path):
    """A model of another config (n_embd 32), with the run's tokenizer."""
    config = replace(experiments.model_config(cfg, corpora), n_embd=32)
    save_model(GPT(config), path, {"tokenizer": corpora.tokenizer.to_dict()})


def _other_tokenizer(cfg, corpora, path):
    """The run's config, another tokenizer (a stale file: same vocabulary size, other characters)."""
    chars = "".join(sorted(corpora.tokenizer.chars[:-1] + "\x01"))
    save_model(GPT(experiments.model_config(cfg, corpora)), path, {"tokenizer": {"chars": chars}})


def _truncated(cfg, corpora, path):
    """The run's model cut short (a disk error, a copy stopped half-way)."""
    save_model(GPT(experiments.model_config(cfg, corpora)), path, {"tokenizer": corpora.tokenizer.to_dict()})
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _adapter(cfg, corpora, path):
    """An adapter saved over the cache file (by hand: the command line refuses it)."""
    save_adapter(apply_lora(GPT(experiments.model_config(cfg, corpora)), LoRAConfig(r=2)), path)


# (what the cache file holds, what the one line says): a file that cannot serve the run is retrained and replaced
STALE_CACHE = {
    "another model config": (_foreign, "has another config than this run needs"),
    "another tokenizer": (_other_tokenizer, "has another tokenizer than this run needs"),
    "a truncated file": (_truncated, "is not a valid safetensors file"),
    "an adapter, not a model": (_adapter, "holds a 'adapter' file, expected a 'model' file"),
}


@pytest.mark.parametrize("case", STALE_CACHE)
def test_a_cached_file_that_cannot_serve_the_run_is_retrained_and_replaced(tmp_path, monkeypatch, case):
    make, message = STALE_CACHE[case]
    monkeypatch.setenv("LORA_NP_CACHE", str(tmp_path / "cache"))
    cfg = experiments.ExperimentConfig.quick()
    corpora = experiments.load_corpora(cfg)
    path = runs.base_model_path(cfg, corpora)
    make(cfg, corpora, path)
    path.chmod(0o600)
    assert message in runs.stale_base(cfg, corpora)  # what the command line announces before any work
    model, info = experiments.pretrain_base(cfg, corpora, progress=False)
    assert not info["cached"] and message in info["replaced"] and str(path) in info["replaced"]
    assert "\n" not in info["replaced"]
    assert runs.stale_base(cfg, corpora) is None and (path.stat().st_mode & 0o777) == 0o600  # replaced, mode kept
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    again, info = experiments.pretrain_base(cfg, corpora, progress=False)
    assert info["cached"] and "replaced" not in info
    assert all((a.data == b.data).all() for a, b in zip(model.parameters(), again.parameters()))


def test_a_cache_file_it_may_not_read_is_an_error_not_replaced(tmp_path, monkeypatch):
    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    monkeypatch.setenv("LORA_NP_CACHE", str(tmp_path / "cache"))
    cfg = experiments.ExperimentConfig.quick()
    corpora = experiments.load_corpora(cfg)
    path = runs.base_model_path(cfg, corpora)
    _foreign(cfg, corpora, path)
    path.chmod(0)
    files = {path.name: path.stat()}
    with pytest.raises(PermissionError):
        experiments.pretrain_base(cfg, corpora, progress=False)
    assert path.stat() == files[path.name]
