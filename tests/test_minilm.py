"""Tests for lora_np/experiments/minilm.py: the lab's config, model set-up, batches and table on a tiny random BERT
(fast, no model wheel needed); the lab end to end at the quick size is in tests/test_cli.py."""

from __future__ import annotations

import numpy as np
import pytest

from lora_np.bert import Bert, BertConfig
from lora_np.experiments.minilm import (
    Encoded,
    GenreClassifier,
    Method,
    MiniLMConfig,
    accuracy,
    batch_order,
    build,
    markdown_table,
    methods,
    train_run,
)
from lora_np.lora import LoRAConfig, lora_layers

TINY = dict(vocab_size=14, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=16,
            max_position_embeddings=16, type_vocab_size=2)


def tiny_base(seed: int = 0) -> Bert:
    model = Bert(BertConfig(**TINY, seed=seed))
    gen = np.random.default_rng(seed + 1)
    for _, p in model.named_parameters():
        p.data = (gen.standard_normal(p.shape) * 0.5).astype(p.dtype)
    return model


def tiny_data(n: int = 12, T: int = 10, seed: int = 0) -> Encoded:
    """n "verses" of 3 to T tokens, right-padded to T, labels in 0..6."""
    gen = np.random.default_rng(seed)
    lengths = gen.integers(3, T + 1, size=n)
    ids = gen.integers(4, 14, size=(n, T))
    mask = (np.arange(T)[None] < lengths[:, None]).astype(np.int64)
    return Encoded(np.where(mask == 1, ids, 0), mask, np.arange(n) % 7)


CFG = MiniLMConfig.quick(steps=2, batch_size=4)


def state(model) -> dict:
    return {n: p.data.copy() for n, p in model.named_parameters()}


@pytest.mark.parametrize("kind, lora", [("probe", None), ("lora", LoRAConfig(r=2, targets="q,v")),
                                        ("lora", LoRAConfig(r=2, targets="all-linear")), ("full", None)])
def test_the_head_trains_in_every_method_and_the_encoder_as_the_method_says(kind, lora):
    base = tiny_base()
    before_base = state(base)
    model = build(base, Method("m", kind, lora), 7, seed=0)
    before = state(model)
    data = tiny_data()
    history = train_run(model, data, batch_order(CFG, len(data)), CFG, head_lr=1e-2, encoder_lr=1e-2)
    assert not history["stopped"] and len(history["loss"]) == CFG.steps
    after = state(model)
    changed = {n for n in before if not np.array_equal(before[n], after[n])}
    assert {"head.weight", "head.bias"} <= changed  # the head trains whatever the method
    encoder = {n for n in changed if n.startswith("encoder.")}
    if kind == "probe":
        assert not encoder
    elif kind == "lora":
        assert encoder == {f"encoder.{n}.{f}" for n in lora_layers(model.encoder) for f in ("A", "B")}
    else:
        assert "encoder.blocks.0.mlp.up.weight" in encoder and "encoder.wpe.weight" in encoder
    after_base = state(base)
    assert all(np.array_equal(before_base[n], after_base[n]) for n in before_base)  # the base is never changed


def test_cutting_a_batch_to_its_longest_text_changes_nothing():
    model = GenreClassifier(tiny_base(), 7, seed=0)
    data = tiny_data(T=12)
    idx = np.array([0, 3, 5])
    (ids, mask), labels = data.batch(idx)
    assert ids.shape[1] == mask[:, :].sum(axis=1).max() < 12  # cut
    with model.inference():
        cut = model((ids, mask))[0].data
        full = model((data.ids[idx], data.mask[idx]))[0].data
    np.testing.assert_allclose(cut, full, rtol=1e-5, atol=1e-6)


def test_accuracy_counts_correct_predictions_whatever_the_order():
    model = GenreClassifier(tiny_base(), 7, seed=0)
    data = tiny_data(n=20)
    with model.inference():
        pred = model((data.ids, data.mask))[0].data.argmax(axis=1)
    for batch_size in (1, 3, 64):  # sorted by length and cut per batch: the same predictions as all at once
        assert accuracy(model, data, batch_size) == pytest.approx((pred == data.labels).mean())
    data.labels = pred
    assert accuracy(model, data, 5) == 1.0


def test_batches_are_seeded_and_go_round_again():
    cfg = MiniLMConfig.quick(steps=7, batch_size=4)
    a, b = batch_order(cfg, 10), batch_order(cfg, 10)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == 7
    first = np.concatenate(a)[:10]
    assert sorted(first.tolist()) == list(range(10))  # every verse once before any verse twice
    other = batch_order(MiniLMConfig.quick(steps=7, batch_size=4, seed=1), 10)
    assert not all(np.array_equal(x, y) for x, y in zip(a, other))


def test_methods_are_the_labs():
    names = [m.name for m in methods(MiniLMConfig())]
    assert names == ["probe", "lora-qv-r1", "lora-qv-r4", "lora-qv-r16", "lora-all-r8", "full"]
    assert methods(MiniLMConfig())[4].lora.targets == ("q", "k", "v", "o", "up", "down")


CONFIG_ERRORS = [
    ({"steps": 0}, "steps must be a positive integer"),
    ({"warmup_steps": 100}, r"warmup_steps must be an integer in \[0, steps=75\]"),
    ({"max_length": 600}, r"max_length must be an integer in \[3, 512\]"),
    ({"lora_lrs": ()}, "lora_lrs must be distinct finite numbers > 0"),
    ({"full_lrs": (1e-4, 1e-4)}, "full_lrs must be distinct"),
    ({"head_lrs": (float("nan"),)}, "head_lrs"),
    ({"ranks": (1, 400)}, r"ranks must be distinct integers in \[1, 384\]"),
    ({"alpha": 0}, "alpha must be a finite number > 0"),
    ({"seed": -1}, "seed must be a non-negative integer"),
]


@pytest.mark.parametrize("change, message", CONFIG_ERRORS)
def test_bad_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        MiniLMConfig(**change)


def test_markdown_table_has_one_row_per_method():
    row = {"mode": "lora", "rank": 4, "targets": "q,v", "trainable": 39_559, "total": 22_604_935, "lr": 3e-4,
           "val_accuracy": 0.5, "test_accuracy": 0.4321, "step_seconds": 1.0456, "adapter_bytes": 149_700,
           "memory_measured": {"peak": 150 * 2**20}}
    probe = {**row, "mode": "probe", "rank": None, "targets": "", "trainable": 2_695, "adapter_bytes": None,
             "lr": 0.01}
    table = markdown_table({"runs": [probe, row]}).splitlines()
    assert len(table) == 4
    assert table[2] == "| linear probe (head only) | 2,695 | 0.01% | 0.01 | 50.0% | 43.2% | 1.046 | 150.0 | — |"
    assert table[3] == "| LoRA r=4 on q, v | 39,559 | 0.18% | 0.0003 | 50.0% | 43.2% | 1.046 | 150.0 | 146.2 KiB |"
