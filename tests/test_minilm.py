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
    balanced,
    batch_order,
    build,
    chapter_bootstrap,
    differences_table,
    embeddings,
    fit_probe,
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
    history = train_run(model, data, batch_order(CFG, data.lengths(), seed=0), CFG, lr=1e-2)
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


def test_accuracy_is_balanced_over_genres_whatever_the_order():
    model = GenreClassifier(tiny_base(), 7, seed=0)
    data = tiny_data(n=20)
    with model.inference():
        pred = model((data.ids, data.mask))[0].data.argmax(axis=1)
    expected = np.mean([(pred == data.labels)[data.labels == g].mean() for g in range(7)])
    for batch_size in (1, 3, 64):  # sorted by length and cut per batch: the same predictions as all at once
        assert accuracy(model, data, batch_size) == pytest.approx(expected)
    data.labels = pred
    assert accuracy(model, data, 5) == 1.0


def test_balanced_weighs_every_genre_the_same():
    labels = np.array([0, 0, 0, 0, 1])
    right = np.array([1, 1, 1, 1, 0])  # the big genre right, the small one wrong
    assert balanced(right, labels) == 0.5 and right.mean() == 0.8


def test_batches_are_seeded_bucketed_by_length_and_go_round_again():
    cfg = MiniLMConfig.quick(steps=7, batch_size=4, bucket_batches=2)
    lengths = np.array([3, 9, 4, 8, 5, 7, 6, 6, 2, 10, 3])
    a, b = batch_order(cfg, lengths, seed=0), batch_order(cfg, lengths, seed=0)
    assert all(np.array_equal(x, y) for x, y in zip(a, b)) and len(a) == 7
    assert all(len(x) == 4 for x in a)  # the short last batch of a pass is dropped
    first = np.concatenate(a[:2])  # one pass: 11 verses = 2 full batches (+ 3 dropped), no verse twice
    assert len(set(first.tolist())) == 8
    other = batch_order(cfg, lengths, seed=1)
    assert not all(np.array_equal(x, y) for x, y in zip(a, other))
    gen = np.random.default_rng(0)  # bucketing: a batch spans fewer lengths than random batches would
    lengths = gen.integers(3, 80, size=4000)
    cfg = MiniLMConfig.quick(steps=100, batch_size=16, bucket_batches=16)
    spread = np.mean([np.ptp(lengths[x]) for x in batch_order(cfg, lengths, seed=0)])
    assert spread < 0.25 * np.mean([np.ptp(gen.choice(lengths, 16)) for _ in range(100)])


def test_seeds_change_the_batches_and_loras_a_but_not_the_head():
    base, head = tiny_base(), GenreClassifier(tiny_base(), 7, seed=5).head
    m = Method("m", "lora", LoRAConfig(r=2, targets="q,v"))
    one, two = build(base, m, 7, seed=0, head=head), build(base, m, 7, seed=1, head=head)
    assert not np.array_equal(one.encoder.blocks[0].attn.q.A.data, two.encoder.blocks[0].attn.q.A.data)
    for model in (one, two):
        np.testing.assert_array_equal(model.head.weight.data, head.weight.data)
        assert model.head.weight.data is not head.weight.data  # a copy: training it leaves the probe's alone


def test_every_method_starts_at_the_probes_predictions():
    base, data = tiny_base(), tiny_data(n=14)
    probe = GenreClassifier(tiny_base(), 7, seed=3).head
    feats = embeddings(base, data, batch_size=5)
    expected = feats @ probe.weight.data + probe.bias.data
    for m in (Method("m", "lora", LoRAConfig(r=2, targets="all-linear")), Method("f", "full")):
        model = build(base, m, 7, seed=0, head=probe)
        with model.inference():
            np.testing.assert_allclose(model((data.ids, data.mask))[0].data, expected, rtol=1e-5, atol=1e-6)


def test_the_probe_converges_to_the_penalised_optimum():
    gen = np.random.default_rng(0)
    x = gen.standard_normal((70, 6)).astype(np.float32)
    y = np.arange(70) % 7
    l2 = 1e-2
    head, fit = fit_probe(x, y, l2, MiniLMConfig.quick(probe_steps=2000, probe_lr=0.05))
    assert abs(fit["last_tenth_change"]) < 1e-4
    z = x @ head.weight.data + head.bias.data  # the gradient of the penalised loss is ~0 at the optimum
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(70), y] -= 1
    grad_w = x.T @ p / 70 + l2 * head.weight.data
    assert np.abs(grad_w).max() < 1e-3 and np.abs(p.mean(0)).max() < 1e-3


def test_chapter_bootstrap_resamples_chapters_within_genres():
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    chapters = ["a", "a", "b", "b", "c", "c", "d", "d"]
    perfect, half = np.ones(8), np.array([1, 1, 0, 0, 1, 1, 1, 1])
    out = chapter_bootstrap({"p": perfect, "h": half}, labels, chapters, n=400, pairs=[("p", "h")])
    assert out["methods"]["p"] == [1.0, 1.0]
    lo, hi = out["methods"]["h"]  # genre 0 is 0, 0.5 or 1 by which chapters are drawn; genre 1 always 1
    assert lo == 0.5 and hi == 1.0
    assert out["differences"]["p - h"] == [0.0, 0.5]
    labels, half = np.repeat([0, 1], 20), np.repeat([1, 0, 1, 1], 10)  # genre 0: one chapter right, one wrong
    by_chapter = chapter_bootstrap({"h": half}, labels, list(np.repeat(["a", "b", "c", "d"], 10)), n=400)
    by_verse = chapter_bootstrap({"h": half}, labels, [str(i) for i in range(40)], n=400)
    assert by_chapter["methods"]["h"] == [0.5, 1.0]
    assert 0.5 < by_verse["methods"]["h"][0] < 0.75 < by_verse["methods"]["h"][1] < 1  # too narrow: verses of a
    # chapter are not independent draws


def test_methods_are_the_labs():
    names = [m.name for m in methods(MiniLMConfig())]
    assert names == ["probe", "lora-qv-r1", "lora-qv-r4", "lora-qv-r16", "lora-all-r8", "full"]
    assert MiniLMConfig().seeds == (0, 1, 2)  # at least three seeds per method
    assert methods(MiniLMConfig())[4].lora.targets == ("q", "k", "v", "o", "up", "down")


CONFIG_ERRORS = [
    ({"steps": 0}, "steps must be a positive integer"),
    ({"warmup_steps": 300}, r"warmup_steps must be an integer in \[0, 200\] \(at most steps\)"),
    ({"max_length": 600}, r"max_length must be an integer in \[3, 512\]"),
    ({"lora_lrs": (1e-3,)}, "lora_lrs must be at least 2 distinct finite numbers > 0"),
    ({"full_lrs": (1e-4, 1e-4)}, "full_lrs must be at least 2 distinct"),
    ({"probe_l2s": (float("nan"), 1.0)}, "probe_l2s"),
    ({"seeds": (0, 0)}, "seeds must be 1 to 10 distinct"),
    ({"seeds": ()}, "seeds must be"),
    ({"probe_lr": 0}, "probe_lr must be a finite number > 0"),
    ({"bootstrap": 0}, "bootstrap must be a positive integer"),
    ({"ranks": (1, 400)}, r"LoRA rank\(s\) \[400\] exceed 384"),
    ({"alpha": 0}, "alpha must be a finite number > 0"),
    ({"data_seed": -1}, "data_seed must be a non-negative integer"),
]


@pytest.mark.parametrize("change, message", CONFIG_ERRORS)
def test_bad_configs_are_refused(change, message):
    with pytest.raises(ValueError, match=message):
        MiniLMConfig(**change)


def test_markdown_tables_have_one_row_per_method_and_comparison():
    row = {"name": "lora-qv-r4", "mode": "lora", "rank": 4, "targets": "q,v", "trainable": 39_559,
           "total": 22_604_935, "lr": 3e-4, "interior": True, "seeds": [{}, {}, {}], "val_loss": 1.2345,
           "test_accuracy": 0.4321, "seed_interval": {"ci95": 0.0123}, "test_interval": [0.40, 0.47],
           "test_loss": 1.5, "step_seconds": 1.0456, "adapter_bytes": 149_700, "memory_measured": {"peak": 150 * 2**20}}
    probe = {**row, "name": "probe", "mode": "probe", "rank": None, "targets": "", "trainable": 2_695,
             "adapter_bytes": None, "l2": 1e-4, "seeds": [{}], "seed_interval": {"ci95": None}, "step_seconds": None,
             "memory_measured": {}}
    table = markdown_table({"runs": [probe, row]}).splitlines()
    assert len(table) == 4
    assert table[2] == ("| linear probe (head only) | 2,695 | 0.01% | l2 0.0001 | 1 | 1.234 | 43.2% | 40.0–47.0% | "
                        "1.500 | — |  | — |")
    assert table[3] == ("| LoRA r=4 on q, v | 39,559 | 0.18% | 0.0003 | 3 | 1.234 | 43.2% ± 1.2 | 40.0–47.0% | 1.500 | "
                        "1.046 | 150.0 | 146.2 KiB |")
    edge = markdown_table({"runs": [{**row, "interior": False}]}).splitlines()[2]
    assert "| 0.0003 (edge) |" in edge
    diff = differences_table({"runs": [probe, {**row, "test_accuracy": 0.5}],
                              "differences": {"lora-qv-r4 - probe": [0.01, 0.12]}}).splitlines()
    assert diff[2] == "| LoRA r=4 on q, v − linear probe (head only) | +6.8 | +1.0 to +12.0 |"
