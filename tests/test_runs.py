"""Tests for lora_np/experiments/runs.py's base-model cache: the key tells apart everything that changes the base
model (however the corpora are cut, the engine's numerics), and a cached file is used only if its stored config and
tokenizer are the ones the run needs."""

from __future__ import annotations

from dataclasses import replace

import pytest
from helpers import assert_files_untouched, snapshot_files

from lora_np import experiments
from lora_np.checkpoint import save_model
from lora_np.experiments import runs
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


def _foreign(cfg, corpora):
    """A model of another config (n_embd 32), with the run's tokenizer."""
    config = replace(experiments.model_config(cfg, corpora), n_embd=32)
    return GPT(config), {"tokenizer": corpora.tokenizer.to_dict()}


def _other_tokenizer(cfg, corpora):
    """The run's config, another tokenizer (a stale file: same vocabulary size, other characters)."""
    chars = corpora.tokenizer.chars
    return GPT(experiments.model_config(cfg, corpora)), {"tokenizer": {"chars": "".join(sorted(chars[:-1] + "\x01"))}}


# (what the cached file holds, what the message says)
STALE_CACHE = {
    "another model config": (_foreign, "has another config than this run needs"),
    "another tokenizer": (_other_tokenizer, "has another tokenizer than this run needs"),
}


@pytest.mark.parametrize("case", STALE_CACHE)
def test_a_cached_file_of_another_config_is_refused_in_one_line(tmp_path, monkeypatch, case):
    make, message = STALE_CACHE[case]
    monkeypatch.setenv("LORA_NP_CACHE", str(tmp_path / "cache"))
    cfg = experiments.ExperimentConfig.quick()
    corpora = experiments.load_corpora(cfg)
    path = runs.base_model_path(cfg, corpora)
    model, extra = make(cfg, corpora)
    save_model(model, path, extra)
    files = snapshot_files(tmp_path)
    with pytest.raises(ValueError, match=message) as refused:
        experiments.pretrain_base(cfg, corpora, progress=False)
    assert str(path) in str(refused.value) and "\n" not in str(refused.value) and "--force" in str(refused.value)
    assert_files_untouched(files, tmp_path)
