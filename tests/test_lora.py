"""Tests for lora_np/lora.py: LoRA starts exactly at the base model, trains only A and B, spends no compute on
W's gradient, merges and unmerges exactly, can represent any ΔW at full rank, and counts its parameters."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections import Counter

import numpy as np
import pytest
from helpers import TINY, assert_untouched, perturb_adapters, snapshot, tiny_gpt
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_np import engine, lora
from lora_np.engine import Tensor
from lora_np.lora import LoRAConfig, LoRALinear, apply_lora, count_parameters, lora_layers
from lora_np.model import GPT
from lora_np.nn import Linear, Module
from lora_np.optim import SGD, AdamW

C = TINY["n_embd"]
SHAPES = {"q": (C, C), "k": (C, C), "v": (C, C), "o": (C, C), "up": (C, 4 * C), "down": (4 * C, C)}  # (d_in, d_out)


def batch(B: int = 3, T: int = 8, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 11, (B, T)), rng.integers(0, 11, (B, T))


# --- at initialisation the adapted model IS the base model ------------------------------------------------------


@pytest.mark.parametrize("zero", ["B", "A"])
@pytest.mark.parametrize("targets", ["q,v", "all-linear"])
def test_outputs_identical_to_base_at_init(zero, targets):
    base, adapted = tiny_gpt(), tiny_gpt()
    apply_lora(adapted, targets=targets, r=4, alpha=8.0, zero=zero, dropout=0.1)
    idx, tgt = batch()
    for mode in ("train", "eval"):  # LoRA dropout acts on the input of A; times B = 0 (or A = 0) it is still 0
        getattr(base, mode)(), getattr(adapted, mode)()
        (l0, loss0), (l1, loss1) = base(idx, tgt), adapted(idx, tgt)
        assert np.array_equal(l0.data, l1.data)  # bit for bit: ΔW = A·B = 0 exactly
        assert loss0.item() == loss1.item()


def test_init_of_a_and_b():
    layer = LoRALinear(Linear(64, 32), r=8, alpha=16.0)
    assert layer.A.shape == (64, 8) and layer.B.shape == (8, 32)  # A (d_in, r), B (r, d_out)
    assert not layer.B.data.any()  # B = 0 (Hu et al. §4.1)
    bound = 1 / math.sqrt(64)
    assert np.abs(layer.A.data).max() <= bound and np.abs(layer.A.data).max() > 0.8 * bound  # Kaiming-uniform
    layer = LoRALinear(Linear(64, 32), r=8, alpha=16.0, zero="A")
    assert not layer.A.data.any() and layer.B.data.any()
    assert np.abs(layer.B.data).max() <= 1 / math.sqrt(8)


def test_lora_linear_shares_w_and_freezes_it():
    base = Linear(6, 5)
    layer = LoRALinear(base, r=2, alpha=4.0)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert not layer.weight.requires_grad and not layer.bias.requires_grad
    assert [n for n, _ in layer.named_parameters()] == ["weight", "bias", "A", "B"]
    assert layer.trainable_parameters() == [layer.A, layer.B]
    assert "r=2" in repr(layer) and "merged=False" in repr(layer)
    with pytest.raises(TypeError, match="wraps a Linear"):
        LoRALinear(layer, r=2, alpha=4.0)


def test_forward_is_base_plus_scaled_low_rank_update():
    base = Linear(6, 5, gen=np.random.default_rng(0)).to(np.float64)
    layer = LoRALinear(base, r=3, alpha=6.0)
    layer.B.data[...] = np.random.default_rng(1).standard_normal((3, 5))
    x = np.random.default_rng(2).standard_normal((4, 6))
    W, b, A, B = base.weight.data, base.bias.data, layer.A.data, layer.B.data
    assert layer.scaling == 2.0  # α / r
    np.testing.assert_allclose(layer(Tensor(x)).data, x @ W + b + 2.0 * (x @ A) @ B, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(layer.delta_weight(), 2.0 * A @ B, rtol=1e-12, atol=1e-14)


def test_lora_dropout_acts_on_the_input_of_a_only_in_training():
    base = Linear(6, 5, gen=np.random.default_rng(0)).to(np.float64)
    layer = LoRALinear(base, r=3, alpha=3.0, dropout=0.5)
    layer.B.data[...] = np.random.default_rng(1).standard_normal((3, 5))
    x = np.random.default_rng(2).standard_normal((40, 6))
    exact = x @ base.weight.data + base.bias.data + (x @ layer.A.data) @ layer.B.data
    layer.eval()
    np.testing.assert_allclose(layer(Tensor(x)).data, exact, rtol=1e-12, atol=1e-12)  # no dropout in eval
    layer.train()
    noisy = layer(Tensor(x)).data
    assert not np.allclose(noisy, exact)
    layer.B.data[...] = 0.0  # the frozen path x @ W + b is never dropped, only the input of the update
    np.testing.assert_allclose(layer(Tensor(x)).data, x @ base.weight.data + base.bias.data, rtol=1e-12)


@pytest.mark.parametrize("r", [1, 4, 16])
def test_rslora_scaling_is_alpha_over_sqrt_r(r):
    assert LoRALinear(Linear(16, 16), r=r, alpha=8.0).scaling == 8.0 / r
    assert LoRALinear(Linear(16, 16), r=r, alpha=8.0, rslora=True).scaling == 8.0 / math.sqrt(r)
    model = apply_lora(tiny_gpt(), targets="q", r=4, alpha=8.0, rslora=True)
    assert all(m.scaling == 4.0 for m in lora_layers(model).values())


# --- training touches only A and B -------------------------------------------------------------------------------


def test_after_apply_lora_only_a_and_b_are_trainable():
    model = apply_lora(tiny_gpt(), targets="q,v", r=2, alpha=4.0)
    layers = lora_layers(model)
    assert list(layers) == ["blocks.0.attn.q", "blocks.0.attn.v", "blocks.1.attn.q", "blocks.1.attn.v"]
    expected = [p for m in layers.values() for p in (m.A, m.B)]
    assert [id(p) for p in model.trainable_parameters()] == [id(p) for p in expected]
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names == [f"blocks.{i}.attn.{t}.{f}" for i in range(2) for t in "qv" for f in "AB"]


def test_modules_to_save_are_trained_fully():
    model = apply_lora(tiny_gpt(), targets="q,v", r=2, alpha=4.0, modules_to_save=["lm_head", "wte"])
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names[0] == "wte.weight" and names[-1] == "lm_head.weight" and len(names) == 2 + 8
    assert model.lora_config.modules_to_save == ("wte", "lm_head")  # model order, whatever the order given


def test_one_adamw_step_changes_only_a_and_b():
    model = apply_lora(tiny_gpt(), targets="all-linear", r=2, alpha=4.0)
    adapter_ids = lora.adapter_parameter_ids(model)
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    opt = AdamW(model.trainable_parameters(), lr=1e-2, weight_decay=0.1)
    idx, tgt = batch()
    for step in range(2):
        opt.zero_grad()
        model(idx, tgt)[1].backward()
        opt.step()
        for name, p in model.named_parameters():
            if id(p) not in adapter_ids:
                assert np.array_equal(p.data, before[name]), f"{name} changed at step {step + 1}"
                assert p.grad is None, name
        # Step 1 moves B by its gradient; A only by weight decay (its gradient is 0, see the next test). By step 2
        # B ≠ 0, so A moves by its gradient too.
        for name, m in lora_layers(model).items():
            assert m.B.data.any(), name
            assert not np.array_equal(m.A.data, before[f"{name}.A"]), name


@pytest.mark.parametrize("zero", ["B", "A"])
def test_gradient_at_step_one_flows_only_into_the_nonzero_factor(zero):
    # y = x W + s·(x A) B. With g = dL/dy:  dL/dA = s · xᵀ (g Bᵀ)  and  dL/dB = s · (x A)ᵀ g.
    # zero="B": B = 0, so g Bᵀ = 0 and dL/dA is EXACTLY 0 (a matmul with an all-zero matrix), while dL/dB ≠ 0:
    # only B moves on the first step, then A starts to move. zero="A": x A = 0, so dL/dB = 0 and dL/dA ≠ 0.
    model = apply_lora(tiny_gpt(), targets="all-linear", r=2, alpha=4.0, zero=zero)
    idx, tgt = batch()
    model(idx, tgt)[1].backward()
    for name, m in lora_layers(model).items():
        zero_grad, live_grad = (m.A.grad, m.B.grad) if zero == "B" else (m.B.grad, m.A.grad)
        assert zero_grad is not None and not zero_grad.any(), name  # exactly zero, not just small
        assert np.abs(live_grad).max() > 0, name


def test_frozen_w_and_bias_get_no_gradient():
    model = apply_lora(tiny_gpt(), targets="all-linear", r=2, alpha=4.0)
    idx, tgt = batch()
    model(idx, tgt)[1].backward()
    for name, m in lora_layers(model).items():
        assert not m.weight.requires_grad and m.weight.grad is None, name
        assert not m.bias.requires_grad and m.bias.grad is None, name
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def backward_matmul_shapes(monkeypatch: pytest.MonkeyPatch, loss: Tensor) -> list[tuple[int, ...]]:
    """The result shape of every matrix product that ``loss.backward()`` computes (engine.count_matmuls sees all)."""
    with engine.count_matmuls() as matmuls:
        loss.backward()
    return [out for _, _, out, *_ in matmuls.products]


@pytest.mark.parametrize("x_requires_grad", [True, False])
def test_no_weight_gradient_matmul_for_frozen_w(monkeypatch, x_requires_grad):
    d_in, d_out, r = 6, 5, 2
    x = Tensor(np.random.default_rng(0).standard_normal((2, 3, d_in)), dtype=np.float32, requires_grad=x_requires_grad)
    g = np.ones((2, 3, d_out), np.float32)

    plain = Linear(d_in, d_out)
    shapes = backward_matmul_shapes(monkeypatch, (plain(x) * Tensor(g)).sum())
    assert (d_in, d_out) in shapes  # dW = xᵀ g
    assert Counter(shapes) == Counter([(d_in, d_out)] + [(2, 3, d_in)] * x_requires_grad)

    layer = LoRALinear(Linear(d_in, d_out), r=r, alpha=4.0)
    shapes = backward_matmul_shapes(monkeypatch, (layer(x) * Tensor(g)).sum())
    assert (d_in, d_out) not in shapes  # no product the size of W: W's gradient is never formed
    # dA (d_in, r), dB (r, d_out), dh = s·g Bᵀ (N, r); and, if x needs it, dx = g (W + s·AB)ᵀ, through W and the
    # adapter at once (fused.fused_linear merges the adapter on the fly), in x's own shape as for the plain Linear.
    assert Counter(shapes) == Counter([(d_in, r), (r, d_out), (6, r)] + [(2, 3, d_in)] * x_requires_grad)
    assert layer.weight.grad is None and layer.A.grad.shape == (d_in, r)


def test_whole_gpt_backward_matmuls_full_vs_lora(monkeypatch):
    L, r = TINY["n_layer"], 3
    idx, tgt = batch(2, 8)
    base_shapes = {s for s in SHAPES.values()} | {(C, 11)}  # every W of the model, lm_head's included

    full = backward_matmul_shapes(monkeypatch, tiny_gpt()(idx, tgt)[1])
    # Full training: q, k, v share one product for dx and one for their dW (C, 3C); o, up, down compute dx and dW
    # (2 each); attention's q@kᵀ and att@v two each: 12 per block, plus lm_head's 2.
    assert len(full) == 12 * L + 2
    assert sum(s in base_shapes | {(C, 3 * C)} for s in full) == 4 * L + 1

    model = apply_lora(tiny_gpt(), targets="all-linear", r=r, alpha=6.0)
    lora_shapes = backward_matmul_shapes(monkeypatch, model(idx, tgt)[1])
    assert not any(s in base_shapes | {(C, 3 * C)} for s in lora_shapes)  # no dW at all, not lm_head's (frozen)
    # q, k, v: dx (one product), dh per adapter (3), dA (one product), dB per adapter (3) = 8; o, up, down: dx, dh,
    # dA, dB = 4 each. Block 0's q, k, v read frozen embeddings (nothing upstream trains), so they skip dx: 7.
    # Attention as before: 4 per block. lm_head: dx only. Total 23 + 24·(L-1) + 1.
    assert len(lora_shapes) == 23 + 24 * (L - 1) + 1

    # The same LoRA model with W unfrozen spends exactly one extra matmul per fused layer group: dW, (C, 3C) for
    # q, k, v together and W's shape for o, up and down.
    model.zero_grad()
    for m in lora_layers(model).values():
        m.weight.requires_grad = True
    unfrozen = backward_matmul_shapes(monkeypatch, model(idx, tgt)[1])
    alone = [m.weight.shape for n, m in lora_layers(model).items() if n.split(".")[-1] in ("o", "up", "down")]
    assert Counter(unfrozen) - Counter(lora_shapes) == Counter([(C, 3 * C)] * L + alone)
    assert len(unfrozen) - len(lora_shapes) == 4 * L


# --- merging -----------------------------------------------------------------------------------------------------


def adapted_model(dtype, seed: int = 0) -> GPT:
    model = apply_lora(tiny_gpt(seed), targets="all-linear", r=3, alpha=6.0)
    model.to(dtype)
    perturb_adapters(model, seed)
    return model


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_merged_and_unmerged_outputs_agree(dtype):
    model = adapted_model(dtype)
    idx, _ = batch()
    unmerged = model(idx)[0].data
    base_out = tiny_gpt()(idx)[0].data
    assert not np.allclose(unmerged, base_out, atol=1e-3)  # the adapter does change the model
    lora.merge(model)
    assert all(m.merged for m in lora_layers(model).values())
    merged = model(idx)[0].data
    if dtype == np.float64:
        np.testing.assert_allclose(merged, unmerged, rtol=0, atol=1e-12)
    else:
        np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_merge_then_unmerge_restores_w(dtype):
    model = adapted_model(dtype)
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    lora.merge(model)
    for name, m in lora_layers(model).items():
        assert not np.allclose(m.weight.data, before[f"{name}.weight"])
    lora.unmerge(model)
    for name, m in lora_layers(model).items():
        W0 = before[f"{name}.weight"]
        if dtype == np.float64:
            np.testing.assert_allclose(m.weight.data, W0, rtol=0, atol=1e-12)
        else:  # W + ΔW - ΔW in float32: a few ulps of the largest intermediate value
            ulp = np.finfo(np.float32).eps * np.abs(W0 + m.delta_weight()).max()
            np.testing.assert_allclose(m.weight.data, W0, rtol=0, atol=4 * ulp)
    for name, p in model.named_parameters():
        if not name.endswith(".weight") or name.rsplit(".", 1)[0] not in lora_layers(model):
            assert np.array_equal(p.data, before[name]), name  # merging touches nothing but the adapted W


@settings(max_examples=40, deadline=None)
@given(d_in=st.integers(1, 9), d_out=st.integers(1, 9), r_frac=st.floats(0, 1),
       lead=st.lists(st.integers(1, 3), min_size=1, max_size=3),  # leading dims; the engine's matmul needs >= 2-D
       rslora=st.booleans(), seed=st.integers(0, 2**16))
def test_merge_is_exact_for_any_shape(d_in, d_out, r_frac, lead, rslora, seed):
    r = 1 + int(r_frac * (min(d_in, d_out) - 1))
    rng = np.random.default_rng(seed)
    layer = LoRALinear(Linear(d_in, d_out, gen=rng).to(np.float64), r=r, alpha=2.0, rslora=rslora, seed=seed)
    layer.B.data[...] = rng.standard_normal((r, d_out))
    x = Tensor(rng.standard_normal((*lead, d_in)))
    W0, unmerged = layer.weight.data.copy(), layer(x).data
    assert unmerged.shape == (*lead, d_out)
    layer.merge()
    np.testing.assert_allclose(layer(x).data, unmerged, rtol=0, atol=1e-12)
    np.testing.assert_allclose(layer.weight.data, W0 + layer.scaling * layer.A.data @ layer.B.data, atol=1e-14)
    layer.unmerge()
    np.testing.assert_allclose(layer.weight.data, W0, rtol=0, atol=1e-12)


def test_merge_twice_and_unmerge_unmerged_raise():
    layer = LoRALinear(Linear(4, 4), r=2, alpha=2.0)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()
    model = adapted_model(np.float64)
    with pytest.raises(RuntimeError, match="unmerge: not merged"):
        lora.unmerge(model)
    lora.merge(model)
    with pytest.raises(RuntimeError, match="merge: already merged"):
        lora.merge(model)


def test_model_level_merge_is_all_or_nothing():
    model = adapted_model(np.float64)
    first = next(iter(lora_layers(model).values()))
    first.merge()  # one layer merged by hand, the others not
    weights = {n: m.weight.data.copy() for n, m in lora_layers(model).items()}
    with pytest.raises(RuntimeError, match=r"already merged: \['blocks\.0\.attn\.q'\]"):
        lora.merge(model)
    with pytest.raises(RuntimeError, match="not merged"):
        lora.unmerge(model)
    for n, m in lora_layers(model).items():
        assert np.array_equal(m.weight.data, weights[n]) and m.merged == (m is first)


def test_eval_does_not_merge():
    model = adapted_model(np.float32)
    weights = {n: m.weight.data.copy() for n, m in lora_layers(model).items()}
    model.eval()
    for n, m in lora_layers(model).items():
        assert not m.merged and np.array_equal(m.weight.data, weights[n])
    model.train()
    assert not any(m.merged for m in lora_layers(model).values())


def test_merged_forward_does_not_use_a_or_b():
    model = adapted_model(np.float64)
    idx, _ = batch()
    lora.merge(model)
    merged = model(idx)[0].data
    for m in lora_layers(model).values():
        m.A.data[...] = 123.0  # would change the output wildly if the low-rank path still ran
        m.B.data[...] = -7.0
    assert np.array_equal(model(idx)[0].data, merged)


# --- expressiveness: at full rank LoRA can reach any ΔW ----------------------------------------------------------


def fit_lora(r: int, X: np.ndarray, dW: np.ndarray, steps: int = 800) -> tuple[float, LoRALinear]:
    """Train A, B of a LoRALinear (float64) so that LoRALinear(x) ≈ x @ (W + dW) + b; return the final MSE."""
    base = Linear(*dW.shape, gen=np.random.default_rng(1)).to(np.float64)
    layer = LoRALinear(base, r=r, alpha=float(r), seed=0)
    target = X @ (base.weight.data + dW) + base.bias.data
    opt = SGD([layer.A, layer.B], lr=0.05, momentum=0.9)
    x = Tensor(X)
    for _ in range(steps):
        opt.zero_grad()
        diff = layer(x) - Tensor(target)
        loss = (diff * diff).mean()
        loss.backward()
        opt.step()
    return loss.item(), layer


def test_full_rank_lora_fits_any_delta_w_and_lower_rank_hits_the_eckart_young_bound():
    d_in, d_out, N = 6, 4, 48
    rng = np.random.default_rng(0)
    X = np.linalg.qr(rng.standard_normal((N, d_in)))[0] * math.sqrt(N)  # XᵀX = N·I: the MSE is ‖ΔW - ΔW*‖²/d_out
    dW = rng.standard_normal((d_in, d_out))
    sigma = np.linalg.svd(dW, compute_uv=False)

    loss, layer = fit_lora(min(d_in, d_out), X, dW)
    assert loss < 1e-8  # r = min(d_in, d_out): A·B can be any (d_in, d_out) matrix
    np.testing.assert_allclose(layer.delta_weight(), dW, atol=1e-4)
    assert not layer.weight.requires_grad

    # r = 3 < 4: the best rank-3 ΔW leaves the smallest singular value behind (Eckart–Young), so the loss cannot
    # go below σ₄²/d_out > 0, and gradient descent reaches that optimum.
    loss3, _ = fit_lora(3, X, dW)
    bound = sigma[3] ** 2 / d_out
    assert bound > 1e-3  # a generic ΔW has full rank: the bound is far from 0
    assert loss3 >= bound * (1 - 1e-9)
    np.testing.assert_allclose(loss3, bound, rtol=1e-6)


def test_best_rank_r_approximation_residual_by_svd():
    rng = np.random.default_rng(1)
    dW = rng.standard_normal((6, 4))
    U, S, Vt = np.linalg.svd(dW, full_matrices=False)
    for r in range(1, 5):
        A, B = U[:, :r] * S[:r], Vt[:r]  # the LoRA factors of the best rank-r approximation: A (6, r), B (r, 4)
        residual = np.linalg.norm(dW - A @ B)
        np.testing.assert_allclose(residual, np.sqrt((S[r:] ** 2).sum()), atol=1e-12)
        assert (residual < 1e-12) == (r == min(dW.shape))


# --- parameter counts --------------------------------------------------------------------------------------------

BASE_TOTAL = 2000  # wte 88 + wpe 64 + 2 blocks × 872 + ln_f 16 + lm_head 88


@pytest.mark.parametrize("targets", ["q,v", "all-linear", "o", "up,down", "q,k,v,o"])
@pytest.mark.parametrize("r", [1, 2, 8])
@pytest.mark.parametrize("save", [[], ["lm_head"]])
def test_count_parameters_matches_the_formula(targets, r, save):
    model = tiny_gpt()
    assert count_parameters(model).total == BASE_TOTAL == sum(p.size for p in model.parameters())
    apply_lora(model, targets=targets, r=r, alpha=1.0, modules_to_save=save)
    names = lora.resolve_targets(targets)
    lora_numbers = TINY["n_layer"] * sum(r * (SHAPES[t][0] + SHAPES[t][1]) for t in names)  # r·(d_in + d_out)
    extra = C * 11 if save else 0  # lm_head's W (C, V) trained fully
    counts = count_parameters(model)
    assert counts.trainable == lora_numbers + extra
    assert counts.total == BASE_TOTAL + lora_numbers
    assert counts.frozen == BASE_TOTAL - extra
    assert counts.trainable == sum(p.size for p in model.trainable_parameters())
    report = counts.report()
    assert f"trainable {counts.trainable:,} of {counts.total:,} parameters" in report
    assert f"{counts.trainable:,}" in report.splitlines()[-2] and f"{counts.frozen:,}" in report.splitlines()[-2]


@pytest.mark.parametrize("d,r", [(8, 1), (64, 4), (128, 8)])
def test_square_layer_trains_2dr_numbers(d, r):
    layer = LoRALinear(Linear(d, d), r=r, alpha=1.0)
    assert layer.expected_lora_parameters() == 2 * d * r == layer.A.size + layer.B.size
    counts = count_parameters(layer)
    assert counts.trainable == 2 * d * r and counts.frozen == d * d + d


def test_count_parameters_rows_name_the_modules():
    counts = count_parameters(apply_lora(tiny_gpt(), targets="q", r=2, alpha=1.0))
    rows = {name: (t, f) for name, t, f in counts.rows}
    assert rows["blocks.0.attn.q"] == (2 * 2 * C, C * C + C)
    assert rows["blocks.0.attn.k"] == (0, C * C + C)
    assert rows["wte"] == (0, 11 * C)
    assert "blocks.1.attn.q" in counts.report()


def test_count_parameters_catches_wrongly_sized_factors():
    model = apply_lora(tiny_gpt(), targets="q", r=2, alpha=1.0)
    model.blocks[0].attn.q.B.data = np.zeros((3, C), np.float32)
    with pytest.raises(AssertionError, match="blocks.0.attn.q"):
        count_parameters(model)


# --- LoRAConfig: one validated description of a LoRA setup ------------------------------------------------------

# Every field's bad values: (field, value, a piece of the message that names the culprit). The message must also
# name the field (FIELD_IN_MESSAGE).
CONFIG_ERRORS = [
    ("r", 0, "got 0"), ("r", -1, "got -1"), ("r", 2.0, "got 2.0"), ("r", True, "got True"), ("r", "8", "got '8'"),
    ("r", None, "got None"),
    ("alpha", 0, "got 0"), ("alpha", -1, "got -1"), ("alpha", math.nan, "got nan"), ("alpha", math.inf, "got inf"),
    ("alpha", -math.inf, "got -inf"), ("alpha", True, "got True"), ("alpha", "16", "got '16'"),
    ("dropout", -0.1, "got -0.1"), ("dropout", 1.0, "got 1.0"), ("dropout", math.nan, "got nan"),
    ("dropout", "x", "got 'x'"), ("dropout", True, "got True"),
    ("rslora", 1, "got 1"), ("rslora", "yes", "got 'yes'"), ("rslora", None, "got None"),
    ("zero", "both", "could never learn"), ("zero", "C", "got 'C'"), ("zero", "b", "got 'b'"),
    ("seed", -1, "got -1"), ("seed", 1.5, "got 1.5"), ("seed", True, "got True"), ("seed", None, "got None"),
    ("targets", "zz", "['zz']"), ("targets", "", "(none given)"), ("targets", 3, "got 3"),
    ("targets", ["q", "nope"], "['nope']"), ("targets", None, "got None"), ("targets", [], "(none given)"),
    ("modules_to_save", ["wte", "nope"], "['nope']"), ("modules_to_save", 7, "got 7"),
    ("modules_to_save", "blocks", "['blocks']"),
    ("dora", 1, "got 1"), ("dora", "yes", "got 'yes'"), ("dora", None, "got None"),
    ("init", "gaussian", "got 'gaussian'"), ("init", None, "got None"), ("init", "PiSSA", "got 'PiSSA'"),
]
FIELD_IN_MESSAGE = {"r": r"LoRAConfig\.r ", "alpha": r"LoRAConfig\.alpha ", "dropout": r"LoRAConfig\.dropout ",
                    "rslora": r"LoRAConfig\.rslora ", "zero": r"LoRAConfig\.zero ", "seed": r"LoRAConfig\.seed ",
                    "targets": r"LoRA target", "modules_to_save": r"modules_to_save", "dora": r"LoRAConfig\.dora ",
                    "init": r"LoRAConfig\.init "}


@pytest.mark.parametrize("field, value, culprit", CONFIG_ERRORS, ids=[f"{f}={v!r}" for f, v, _ in CONFIG_ERRORS])
def test_lora_config_refuses_every_bad_field(field, value, culprit):
    with pytest.raises(ValueError) as refused:
        LoRAConfig(**{field: value})
    message = str(refused.value)
    assert re.search(FIELD_IN_MESSAGE[field], message), message
    assert culprit in message, message


def test_lora_config_normalises_so_that_equal_setups_are_equal():
    a = LoRAConfig(targets="v,q", alpha=4, modules_to_save="lm_head, wte")
    b = LoRAConfig(targets=("q", "v"), alpha=4.0, modules_to_save=["wte", "lm_head"])
    assert a == b and hash(a) == hash(b)
    assert a.targets == ("q", "v") and a.modules_to_save == ("wte", "lm_head")  # tuples in model order
    assert type(a.alpha) is float and type(LoRAConfig(dropout=0).dropout) is float
    assert LoRAConfig(targets="all-linear").targets == lora.TARGETS
    assert LoRAConfig(targets=" q , v ,") == LoRAConfig()  # the default targets: q, v (the paper's)
    assert LoRAConfig(r=4) != LoRAConfig(r=8) and LoRAConfig(seed=1) != LoRAConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.r = 4  # a config that exists is valid: it cannot be changed into an invalid one


def test_lora_config_scaling():
    assert LoRAConfig(r=4, alpha=8).scaling == 2.0  # α / r
    assert LoRAConfig(r=4, alpha=8, rslora=True).scaling == 4.0  # α / √r


@pytest.mark.parametrize("config", [LoRAConfig(), LoRAConfig(r=3, alpha=5, targets="all-linear", dropout=0.1,
                                                             rslora=True, zero="A", seed=9,
                                                             modules_to_save=("lm_head", "ln_f")),
                                    LoRAConfig(r=4, dora=True, init="pissa")])
def test_lora_config_round_trips_through_json(config):
    d = config.to_dict()
    assert list(d) == [f.name for f in dataclasses.fields(LoRAConfig)]
    assert LoRAConfig.from_dict(json.loads(json.dumps(d))) == config


@pytest.mark.parametrize(
    "d, match",
    [
        ([1, 2], "a LoRA config must be a JSON object, got list"),
        ({**LoRAConfig().to_dict(), "rank": 2}, r"unknown keys \['rank'\], missing keys none"),
        ({k: v for k, v in LoRAConfig().to_dict().items() if k != "seed"},
         r"unknown keys none, missing keys \['seed'\]"),
        ({**LoRAConfig().to_dict(), "seed": -1}, r"LoRAConfig\.seed must be a non-negative integer, got -1"),
    ],
)
def test_lora_config_from_dict_refuses_bad_dicts(d, match):
    with pytest.raises(ValueError, match=match):
        LoRAConfig.from_dict(d)


def test_apply_lora_takes_a_config_or_keywords_that_build_one():
    config = LoRAConfig(targets="q,v", r=2, alpha=4.0, seed=3)
    a = apply_lora(tiny_gpt(), config)
    b = apply_lora(tiny_gpt(), targets="q,v", r=2, alpha=4.0, seed=3)
    assert a.lora_config is config and b.lora_config == config
    for (na, la), (nb, lb) in zip(lora_layers(a).items(), lora_layers(b).items()):
        assert na == nb and la.config == config and np.array_equal(la.A.data, lb.A.data)


# --- apply_lora: every refusal changes nothing -------------------------------------------------------------------


class OneLayer(Module):
    """A model with a single Linear named q, and none of GPT's top-level modules."""

    def __init__(self) -> None:
        self.q = Linear(8, 8, gen=np.random.default_rng(0))


def with_lora() -> GPT:
    model = apply_lora(tiny_gpt(), targets="q,v", r=2, alpha=4.0)
    perturb_adapters(model)
    return model


# (the model, the call, the error, its message). Each row runs on the model as built and on the same model with
# some parameters frozen beforehand: the flags, like the values, must be exactly as before.
APPLY_ERRORS = {
    "seed=-1": (tiny_gpt, lambda m: apply_lora(m, targets="q,v", r=2, alpha=4, seed=-1), ValueError,
                r"LoRAConfig\.seed must be a non-negative integer, got -1"),
    "alpha=nan": (tiny_gpt, lambda m: apply_lora(m, r=2, alpha=math.nan), ValueError,
                  r"LoRAConfig\.alpha must be a finite number > 0, .*got nan"),
    "alpha=1e308": (tiny_gpt, lambda m: apply_lora(m, r=2, alpha=1e308), ValueError, r"at most 10000, got 1e\+308"),
    "r=0": (tiny_gpt, lambda m: apply_lora(m, r=0), ValueError, r"LoRAConfig\.r must be a positive integer, got 0"),
    "zero='both'": (tiny_gpt, lambda m: apply_lora(m, r=2, zero="both"), ValueError, "could never learn"),
    "unknown target": (tiny_gpt, lambda m: apply_lora(m, targets="q,x", r=2), ValueError,
                       r"unknown LoRA target\(s\) \['x'\]; valid: \['q', 'k', 'v', 'o', 'up', 'down'\] or "
                       r"'all-linear'"),
    "unknown module to save": (tiny_gpt, lambda m: apply_lora(m, r=2, modules_to_save=["lm_head", "blocks"]),
                               ValueError,
                               r"unknown modules_to_save \['blocks'\]; valid: \['wte', 'wpe', 'lm_head', 'ln_f'\]"),
    "unknown keyword": (tiny_gpt, lambda m: apply_lora(m, rank=2), TypeError,
                        r"apply_lora: .*'rank'.*LoRAConfig fields"),
    "a config and keywords": (tiny_gpt, lambda m: apply_lora(m, LoRAConfig(), r=2), TypeError,
                              r"give a LoRAConfig or keyword arguments, not both \(got \['r'\]\)"),
    "targets given positionally": (tiny_gpt, lambda m: apply_lora(m, "q,v", r=2, alpha=4), TypeError, "not both"),
    "a string for the config": (tiny_gpt, lambda m: apply_lora(m, "q,v"), TypeError,
                                r"expected a LoRAConfig, got str \(targets go in the config"),
    "a dict for the config": (tiny_gpt, lambda m: apply_lora(m, {"r": 2}), TypeError,
                              "expected a LoRAConfig, got dict"),
    "r larger than the targets allow": (tiny_gpt, lambda m: apply_lora(m, targets="all-linear", r=9), ValueError,
                                        r"LoRA rank\(s\) \[9\] exceed 8 \(min\(d_in, d_out\) of the targets"),
    "modules_to_save not in the model": (OneLayer, lambda m: apply_lora(m, targets="q", r=2, modules_to_save=["wte"]),
                                         ValueError, r"modules_to_save \['wte'\] are not modules of OneLayer"),
    "targets not in the model": (OneLayer, lambda m: apply_lora(m, targets="v", r=2),
                                 ValueError, r"no Linear layer named \['v'\] in OneLayer"),
    "already has LoRA": (with_lora, lambda m: apply_lora(m, targets="all-linear", r=2), RuntimeError,
                         "already has LoRA layers"),
    "already has the same LoRA": (with_lora, lambda m: apply_lora(m, m.lora_config), RuntimeError,
                                  "already has LoRA layers"),
}


@pytest.mark.parametrize("some_frozen", [False, True], ids=["as built", "some parameters frozen"])
@pytest.mark.parametrize("case", APPLY_ERRORS)
def test_apply_lora_refuses_and_leaves_values_and_flags_as_they_were(case, some_frozen):
    make_model, call, error, match = APPLY_ERRORS[case]
    model = make_model()
    if some_frozen:
        for p in model.parameters()[::2]:
            p.requires_grad = not p.requires_grad
    before = snapshot(model)
    with pytest.raises(error, match=match):
        call(model)
    assert_untouched(before, model)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(r=2, seed=-1), ValueError, r"seed must be a non-negative integer, got -1"),
        (dict(r=2, alpha=math.nan), ValueError, r"LoRAConfig\.alpha"),
        (dict(r=5), ValueError, r"LoRA rank\(s\) \[5\] exceed 4 \(min\(d_in, d_out\)\)"),
        (dict(config=LoRAConfig(), r=2), TypeError, "not both"),
    ],
)
def test_lora_linear_refuses_and_leaves_the_base_layer_as_it_was(kwargs, error, match):
    base = Linear(4, 6, gen=np.random.default_rng(0))
    before = snapshot(base)
    with pytest.raises(error, match=match):
        LoRALinear(base, **kwargs)
    assert_untouched(before, base)
    assert base.weight.requires_grad and base.bias.requires_grad


def test_prepare_finetuning_full_or_lora():
    model = tiny_gpt()
    for p in model.parameters()[::2]:
        p.requires_grad = False
    assert lora.prepare_finetuning(model, None) is model
    assert model.trainable_parameters() == model.parameters()  # full fine-tuning: everything trains
    config = LoRAConfig(r=2, alpha=4.0)
    adapted = lora.prepare_finetuning(tiny_gpt(), config)
    assert adapted.lora_config is config and len(lora_layers(adapted)) == 4
    before = snapshot(adapted)
    with pytest.raises(RuntimeError, match="full fine-tuning of a model with LoRA layers"):
        lora.prepare_finetuning(adapted, None)
    assert_untouched(before, adapted)


def test_resolve_targets():
    assert lora.resolve_targets("all-linear") == list(lora.TARGETS)
    assert lora.resolve_targets(" v, q ") == ["q", "v"]  # model order, whatever the order given
    assert lora.resolve_targets(["down", "q"]) == ["q", "down"]


def test_apply_lora_records_config_and_float64_factors():
    model = tiny_gpt().to(np.float64)
    apply_lora(model, targets="v,q", r=2, alpha=4.0, rslora=True, seed=5)
    cfg = model.lora_config
    assert (cfg.targets, cfg.r, cfg.alpha, cfg.rslora, cfg.seed) == (("q", "v"), 2, 4.0, True, 5)
    assert all(m.A.dtype == np.float64 and m.B.dtype == np.float64 for m in lora_layers(model).values())
    a = [m.A.data for m in lora_layers(model).values()]
    assert not np.array_equal(a[0], a[1])  # each layer gets its own random A


# --- LoRA fine-tuning actually learns ------------------------------------------------------------------------------


def pattern_batches(next_token, seed: int, B: int = 8, T: int = 8):
    """Batches of sequences that follow ``next_token`` (a map of token ids), from random starting tokens."""
    rng = np.random.default_rng(seed)
    while True:
        seq = [rng.integers(0, 11, (B, 1))]
        for _ in range(T):
            seq.append(next_token(seq[-1]))
        s = np.concatenate(seq, axis=1)
        yield s[:, :-1], s[:, 1:]


def train(model: GPT, batches, steps: int, lr: float = 1e-2) -> list[float]:
    opt = AdamW(model.trainable_parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        x, y = next(batches)
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_lora_fine_tuning_learns_a_new_pattern_with_w_frozen():
    model = tiny_gpt(n_embd=16)
    old, new = (lambda t: (t + 1) % 11), (lambda t: (2 * t + 3) % 11)
    pre = train(model, pattern_batches(old, seed=0), steps=60)
    assert pre[-1] < 0.2  # the base model has learned "count up"
    x_new, y_new = next(pattern_batches(new, seed=99, B=32))
    before_ft = model(x_new, y_new)[1].item()
    assert before_ft > 2.0  # ... and is bad at the new pattern

    apply_lora(model, targets="all-linear", r=4, alpha=8.0)
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if not p.requires_grad}
    ft = train(model, pattern_batches(new, seed=1), steps=100)
    after_ft = model(x_new, y_new)[1].item()
    assert after_ft < 0.1 * before_ft, (before_ft, after_ft)
    assert ft[-1] < 0.1 * ft[0]
    for n, p in model.named_parameters():
        if n in frozen:
            assert np.array_equal(p.data, frozen[n]), n  # all the learning is in A and B
