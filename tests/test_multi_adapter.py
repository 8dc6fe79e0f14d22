"""Tests for lora_np/multi_adapter.py: a batch whose samples each name their adapter equals each sample run alone
through its own merged model; bad ids and bad adapters are one clear error, the model unchanged."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from helpers import assert_untouched, perturb_adapters, snapshot, tiny_gpt

from lora_np import engine
from lora_np.checkpoint import save_adapter
from lora_np.lora import LoRAConfig, apply_lora, merge
from lora_np.multi_adapter import (
    Adapter,
    MultiLoRALinear,
    adapter_bytes,
    apply_adapters,
    multi_adapter_layers,
    use_adapters,
)
from lora_np.qlora import dequantize_base, quantize_base

# three adapters of one base: different ranks, alphas (so scalings), seeds; all on the same layers
SETUPS = [dict(r=1, alpha=2.0), dict(r=2, alpha=8.0, rslora=True), dict(r=4, alpha=4.0)]


def trained(base, targets="q,v", setups=SETUPS):
    """LoRA copies of ``base``, one per setup, with factors as after training."""
    models = []
    for k, s in enumerate(setups):
        m = apply_lora(copy.deepcopy(base), LoRAConfig(targets=targets, seed=k, **s))
        perturb_adapters(m, seed=10 + k, std=0.3)
        models.append(m)
    return models


def tokens(n=5, T=8, seed=0):
    return np.random.default_rng(seed).integers(0, 11, size=(n, T))


@pytest.mark.parametrize("targets", ["q,v", "all-linear", "o,down"])
@pytest.mark.parametrize("quantized", [False, True])
def test_mixed_batch_equals_each_sample_alone_with_its_merged_adapter(targets, quantized):
    base = tiny_gpt()
    if quantized:  # many adapters on a 4-bit base: the serving half of QLoRA
        quantize_base(base, block=8)
    models = trained(base, targets)
    multi = apply_adapters(copy.deepcopy(base), [Adapter.of(m) for m in models])
    idx, ids = tokens(), [2, 0, 1, 2, 0]
    with use_adapters(multi, ids), multi.inference():
        mixed = multi(idx)[0].data  # (5, 8, 11): one forward, three adapters
    for m in models:
        if quantized:
            dequantize_base(m)  # merging needs a float base; the dequantized one is the same numbers
        merge(m)
    with engine.no_grad():
        alone = np.concatenate([models[k](idx[i: i + 1])[0].data for i, k in enumerate(ids)])
    assert np.allclose(mixed, alone, atol=2e-6, rtol=1e-5)


def test_one_adapter_for_every_sample_is_that_lora_model():
    base = tiny_gpt()
    models = trained(base)
    multi = apply_adapters(copy.deepcopy(base), [Adapter.of(m) for m in models])
    idx = tokens(n=3)
    with use_adapters(multi, [1, 1, 1]), multi.inference():
        got = multi(idx)[0].data
    with models[1].inference():
        assert np.allclose(got, models[1](idx)[0].data, atol=2e-6)


def test_the_low_rank_path_is_one_batched_product_per_layer_not_a_loop():
    base = tiny_gpt()
    multi = apply_adapters(copy.deepcopy(base), [Adapter.of(m) for m in trained(base, "o")])
    with use_adapters(multi, [0, 1, 2, 0, 1, 2, 0, 1]), multi.inference(), engine.count_matmuls() as c:
        multi(tokens(n=8))
    per_layer = [p for p in c.products if len(p[0]) == 3 and len(p[1]) == 3 and p[1][0] == 8]  # (n, ., .) @ (n, ., .)
    rank_r = [p for p in per_layer if 4 in (p[1][-1], p[1][-2])]  # the gathered A (n, d_in, r) and B (n, r, d_out)
    assert len(rank_r) == 2 * 2  # x @ A[ids] and h @ B[ids] in each of the 2 blocks, whatever the batch size


def test_generate_one_prompt_per_adapter():
    base = tiny_gpt()
    models = trained(base)
    multi = apply_adapters(copy.deepcopy(base), [Adapter.of(m) for m in models])
    prompts, ids = tokens(n=3, T=3, seed=1), [2, 1, 0]
    with use_adapters(multi, ids):
        out = multi.generate(prompts, 5, top_k=1)  # greedy: the same tokens alone or in a batch
    for m in models:
        merge(m)
    for i, k in enumerate(ids):
        assert np.array_equal(out[i], models[k].generate(prompts[i: i + 1], 5, top_k=1)[0])


def test_an_adapter_file_loads_as_the_model_it_was_saved_from(tmp_path):
    base = tiny_gpt()
    m = trained(base)[2]
    save_adapter(m, tmp_path / "a.safetensors")
    loaded, direct = Adapter.load(base, tmp_path / "a.safetensors"), Adapter.of(m)
    assert loaded.scaling == direct.scaling and loaded.factors.keys() == direct.factors.keys()
    assert all(np.array_equal(loaded.factors[n][i], direct.factors[n][i]) for n in direct.factors for i in (0, 1))


def test_adapters_are_stored_stacked_and_cost_k_r_din_plus_dout():
    base = tiny_gpt()
    multi = apply_adapters(copy.deepcopy(base), [Adapter.of(m) for m in trained(base)])
    layers = multi_adapter_layers(multi)
    assert sorted(layers) == ["blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q", "blocks.1.attn.v"]
    q = layers["blocks.0.attn.q"]
    assert q.A.shape == (3, 8, 4) and q.B.shape == (3, 4, 8)  # padded to the largest rank, 4
    assert np.all(q.A.data[0, :, 1:] == 0) and np.all(q.B.data[0, 1:] == 0)  # rank 1 in a rank-4 slot
    assert q.weight is base.blocks[0].attn.q.weight or q.weight.shape == (8, 8)
    assert not multi.trainable_parameters()
    assert adapter_bytes(multi) == 4 * len(layers) * (3 * 4 * (8 + 8) + 3)  # K·r·(d_in + d_out) + K scalings


# -- bad input: one clear error, the model unchanged --------------------------------------------------------------


@pytest.fixture
def multi():
    base = tiny_gpt()
    return apply_adapters(base, [Adapter.of(m) for m in trained(base)])


IDS_ERRORS = [
    # name              ids                  error        message
    ("too-large",       [0, 3, 1],           ValueError,  r"index 3 \(sample 1\) out of range: the model holds 3 "
                                                          r"adapters, 0..2"),
    ("negative",        [0, -1, 1],          ValueError,  r"adapter index -1 \(sample 1\) out of range"),
    ("floats",          [0.0, 1.0, 1.0],     ValueError,  "a non-empty list of integers"),
    ("booleans",        [True, False, True], ValueError,  "a non-empty list of integers"),
    ("two-dimensional", [[0, 1, 2]],         ValueError,  "a non-empty list of integers"),
    ("empty",           [],                  ValueError,  "a non-empty list of integers"),
    ("wrong-length",    [0, 1],              ValueError,  r"\(2,\) adapter ids for a batch of 3 samples"),
]  # fmt: skip


@pytest.mark.parametrize("ids, error, message", [pytest.param(*row[1:], id=row[0]) for row in IDS_ERRORS])
def test_bad_adapter_ids_are_one_clear_error(multi, ids, error, message):
    before = snapshot(multi)
    with pytest.raises(error, match=message):
        with use_adapters(multi, ids):
            multi(tokens(n=3))
    assert_untouched(before, multi)
    assert all(m.ids is None for m in multi_adapter_layers(multi).values())  # nothing left chosen


def test_a_forward_without_chosen_adapters_is_an_error(multi):
    with pytest.raises(RuntimeError, match=r"inside use_adapters\(model, ids\)"):
        multi(tokens(n=2))


def _with_modules_to_save():
    m = apply_lora(tiny_gpt(), LoRAConfig(r=2, modules_to_save="lm_head"))
    return Adapter.of(m)


APPLY_ERRORS = [
    # name             base                          adapters (made from the base)          error     message
    ("no-adapters",    tiny_gpt,                     lambda b: [],                          ValueError,
     "non-empty list of Adapter"),
    ("not-adapters",   tiny_gpt,                     lambda b: [{"blocks.0.attn.q": None}], ValueError,
     "non-empty list of Adapter"),
    ("other-layers",   tiny_gpt,                     lambda b: [Adapter.of(trained(b)[0]),
                                                                Adapter.of(trained(b, "k")[0])], ValueError,
     "the same layers in every adapter"),
    ("wrong-shape",    lambda: tiny_gpt(n_embd=16),  lambda b: [Adapter.of(trained(tiny_gpt())[0])], ValueError,
     r"do not fit a \(16, 16\) layer"),
    ("base-has-lora",  lambda: apply_lora(tiny_gpt(), r=1), lambda b: [Adapter.of(trained(tiny_gpt())[0])],
     RuntimeError, "already has adapters"),
    ("modules-to-save", tiny_gpt,                    lambda b: [_with_modules_to_save()],   ValueError,
     "shares everything but A and B"),
]  # fmt: skip


@pytest.mark.parametrize("make, adapters, error, message", [pytest.param(*r[1:], id=r[0]) for r in APPLY_ERRORS])
def test_bad_adapters_are_one_clear_error_and_the_model_is_unchanged(make, adapters, error, message):
    base = make()
    before = snapshot(base)
    with pytest.raises(error, match=message):
        apply_adapters(base, adapters(base))
    assert_untouched(before, base)
    assert not any(isinstance(m, MultiLoRALinear) for _, m in base.named_modules())
