"""Tests for the two LoRA variants of lora_np/lora.py (issue 20): DoRA (``LoRAConfig(dora=True)``, the op
``dora_linear``) and PiSSA (``LoRAConfig(init="pissa")``, ``pissa_factors``). Each starts where the base model was,
computes what its paper writes, trains, merges and unmerges, and refuses a layer it cannot adapt, changing nothing.
The gradients of ``dora_linear`` are rows of the one table in tests/test_gradcheck.py; adapter files of both are
tested in tests/test_checkpoint.py."""

from __future__ import annotations

import math

import numpy as np
import pytest
from helpers import TINY, assert_untouched, perturb_adapters, snapshot, tiny_gpt

from lora_np import lora
from lora_np.checkpoint import save_model
from lora_np.engine import Tensor
from lora_np.lora import LoRAConfig, LoRALinear, apply_lora, column_norm, count_parameters, lora_layers
from lora_np.memory import analytic_ledger
from lora_np.model import GPT
from lora_np.nn import Linear
from lora_np.optim import AdamW

C = TINY["n_embd"]
IDX = np.random.default_rng(0).integers(0, 11, (3, 8))
TGT = np.random.default_rng(1).integers(0, 11, (3, 8))


def logits(model: GPT) -> np.ndarray:
    return model(IDX)[0].data


def linear64(d_in: int = 6, d_out: int = 5, seed: int = 0) -> Linear:
    return Linear(d_in, d_out, gen=np.random.default_rng(seed)).to(np.float64)


def train_steps(model: GPT, steps: int = 3, lr: float = 1e-2) -> list[float]:
    opt, losses = AdamW(model.trainable_parameters(), lr=lr, weight_decay=0.0), []
    for _ in range(steps):
        opt.zero_grad()
        loss = model(IDX, TGT)[1]
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# --- DoRA: W' = m ⊙ (W + s·A·B) / ‖W + s·A·B‖_col ------------------------------------------------------------------


@pytest.mark.parametrize("zero", ["B", "A"])
def test_dora_layer_starts_exactly_at_the_base_layer(zero):
    base = Linear(6, 5, gen=np.random.default_rng(0))
    layer = LoRALinear(base, r=2, alpha=4.0, dora=True, zero=zero)
    assert layer.magnitude.shape == (5,) and layer.magnitude.dtype == np.float32
    np.testing.assert_array_equal(layer.magnitude.data, column_norm(base.weight.data))  # m = ‖W‖_col
    assert np.array_equal(layer.magnitude.data / column_norm(layer.direction()), np.ones(5, np.float32))  # m/‖V‖ = 1
    x = Tensor(np.random.default_rng(1).standard_normal((2, 3, 6)).astype(np.float32))
    assert np.array_equal(layer(x).data, base(x).data)  # bit for bit


@pytest.mark.parametrize("targets", ["q,v", "all-linear"])
def test_dora_model_starts_at_the_base_model(targets):
    base, adapted = tiny_gpt(), apply_lora(tiny_gpt(), targets=targets, r=2, alpha=4.0, dora=True)
    # every DoRA layer gives its base Linear's outputs bit for bit (above); q, k and v run apart instead of as one
    # fused product, which NumPy may round differently in the last bit
    np.testing.assert_allclose(logits(adapted), logits(base), rtol=0, atol=1e-7)
    assert adapted(IDX, TGT)[1].item() == pytest.approx(base(IDX, TGT)[1].item(), abs=1e-6)


def test_dora_forward_is_the_papers_formula():
    base = linear64()
    layer = LoRALinear(base, r=3, alpha=6.0, dora=True)
    rng = np.random.default_rng(1)
    layer.B.data[...] = rng.standard_normal((3, 5))
    layer.magnitude.data[...] = rng.uniform(0.5, 2.0, 5)
    x = rng.standard_normal((4, 6))
    W, b, A, B, m, s = base.weight.data, base.bias.data, layer.A.data, layer.B.data, layer.magnitude.data, 2.0
    V = W + s * A @ B
    W_dora = m * V / np.sqrt((V**2).sum(axis=0))  # each output column: length m_j, direction of V's column j
    np.testing.assert_allclose(layer(Tensor(x)).data, x @ W_dora + b, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(layer.merged_weight(), axis=0), m, rtol=1e-12)


def test_dora_dropout_acts_on_the_adapters_input_only_in_training():
    layer = LoRALinear(linear64(), r=3, alpha=3.0, dropout=0.5, dora=True)
    layer.B.data[...] = np.random.default_rng(1).standard_normal((3, 5))
    x = Tensor(np.random.default_rng(2).standard_normal((40, 6)))
    exact = x.data @ layer.merged_weight() + layer.bias.data
    layer.eval()
    np.testing.assert_allclose(layer(x).data, exact, rtol=1e-12, atol=1e-12)
    layer.train()
    assert not np.allclose(layer(x).data, exact)


def test_dora_trains_a_b_and_the_magnitude_and_counts_them():
    model = apply_lora(tiny_gpt(), targets="all-linear", r=2, alpha=4.0, dora=True)
    layers = lora_layers(model)
    assert [id(p) for p in model.trainable_parameters()] == [id(p) for m in layers.values()
                                                               for p in (m.A, m.B, m.magnitude)]
    shapes = [(C, C)] * 4 + [(C, 4 * C), (4 * C, C)]  # (d_in, d_out) of q, k, v, o, up, down
    expected = TINY["n_layer"] * sum(2 * (d_in + d_out) + d_out for d_in, d_out in shapes)
    assert count_parameters(model).trainable == expected  # r·(d_in + d_out) + d_out per layer
    frozen = {n: p.data.copy() for n, p in model.named_parameters() if not p.requires_grad}
    start = {n: m.magnitude.data.copy() for n, m in layers.items()}
    losses = train_steps(model, steps=5)
    assert losses[-1] < losses[0]
    for n, p in model.named_parameters():
        if n in frozen:
            assert np.array_equal(p.data, frozen[n]) and p.grad is None, n
    assert all(not np.array_equal(m.magnitude.data, start[n]) for n, m in layers.items())


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_dora_merge_then_unmerge_restores_w_bit_for_bit(dtype):
    model = apply_lora(tiny_gpt(), targets="all-linear", r=2, alpha=4.0, dora=True).to(dtype)
    perturb_adapters(model)
    for m in lora_layers(model).values():
        m.magnitude.data *= 1.5
    before = {n: p.data.copy() for n, p in model.named_parameters()}
    unmerged = logits(model)
    lora.merge(model)
    tol = 1e-12 if dtype == np.float64 else 2e-5
    np.testing.assert_allclose(logits(model), unmerged, rtol=0, atol=tol)
    for m in lora_layers(model).values():
        np.testing.assert_allclose(np.linalg.norm(m.weight.data, axis=0), m.magnitude.data, rtol=10 * tol)
    lora.unmerge(model)
    for name, p in model.named_parameters():
        assert p.data.tobytes() == before[name].tobytes(), name  # exactly: merge kept W
    assert np.array_equal(logits(model), unmerged)


def test_dora_and_plain_layers_share_an_input():
    # targets q, v: k stays a plain Linear; q, k, v then run apart and are joined (DoRA is not on the fast path)
    model = apply_lora(tiny_gpt(), targets="q,v", r=2, alpha=4.0, dora=True)
    perturb_adapters(model)
    attn, x = model.blocks[0].attn, Tensor(np.random.default_rng(3).standard_normal((2, 4, C)).astype(np.float32))
    joined = lora.shared_input_linear(x, [attn.q, attn.k, attn.v]).data
    np.testing.assert_array_equal(joined, np.concatenate([attn.q(x).data, attn.k(x).data, attn.v(x).data], -1))
    with pytest.raises(ValueError, match="unmerged DoRA layer is not a fused.LinearPart"):
        lora.linear_part(attn.q, x.shape)


def test_the_memory_ledger_refuses_dora_but_counts_its_parameters():
    from lora_np.memory.ledger import count_trainable

    model = apply_lora(tiny_gpt(), targets="q,v", r=2, alpha=4.0, dora=True)
    assert count_trainable(model.config, model.lora_config) == (count_parameters(model).total,
                                                                count_parameters(model).trainable)
    with pytest.raises(ValueError, match="does not model it"):
        analytic_ledger(model.config, model.lora_config, batch_size=2)


# --- PiSSA: A, B from W's top-r singular triplets, W replaced by the residual ------------------------------------


@pytest.mark.parametrize("alpha, r, rslora", [(4.0, 2, False), (16.0, 4, False), (1.0, 8, True)])
@pytest.mark.parametrize("targets", ["q,v", "all-linear"])
def test_pissa_model_starts_at_the_base_model(targets, alpha, r, rslora):
    base = tiny_gpt()
    model = apply_lora(tiny_gpt(), targets=targets, r=r, alpha=alpha, rslora=rslora, init="pissa")
    np.testing.assert_allclose(logits(model), logits(base), rtol=0, atol=2e-6)  # float32 rounding, no more
    for name, m in lora_layers(model).items():
        W0 = dict(base.named_parameters())[f"{name}.weight"].data
        assert m.A.data.any() and m.B.data.any()  # neither factor is zero
        assert not np.allclose(m.weight.data, W0, atol=1e-3)  # W was replaced by the residual ...
        np.testing.assert_allclose(m.weight.data + m.delta_weight(), W0, rtol=0, atol=1e-6)  # ... W_res + sAB = W


@pytest.mark.parametrize("rslora", [False, True])
def test_pissa_factors_are_the_principal_part_of_w(rslora):
    base = linear64(8, 6)
    W = base.weight.data.copy()
    layer = LoRALinear(base, r=3, alpha=5.0, rslora=rslora, init="pissa")
    s, (A, B) = layer.scaling, (layer.A.data, layer.B.data)
    U, S, Vt = np.linalg.svd(W, full_matrices=False)
    np.testing.assert_allclose(s * A @ B, (U[:, :3] * S[:3]) @ Vt[:3], atol=1e-12)  # s·A·B = U_r S_r V_rᵀ
    np.testing.assert_allclose(A.T @ A, np.diag(S[:3] / s), atol=1e-12)  # A = U_r √(S_r/s): orthogonal columns
    np.testing.assert_allclose(B @ B.T, np.diag(S[:3] / s), atol=1e-12)  # B = √(S_r/s) V_rᵀ
    np.testing.assert_allclose(np.linalg.svd(layer.weight.data, compute_uv=False)[:3], S[3:], atol=1e-12)  # residual
    np.testing.assert_allclose(layer.weight.data + s * A @ B, W, atol=1e-12)


def test_pissa_trains_both_factors_from_the_first_step():
    # LoRA's first step moves only B (A's gradient s·xᵀ g Bᵀ is 0 while B = 0); PiSSA's factors are both non-zero
    model = apply_lora(tiny_gpt(), targets="all-linear", r=2, alpha=4.0, init="pissa")
    model(IDX, TGT)[1].backward()
    for name, m in lora_layers(model).items():
        assert np.abs(m.A.grad).max() > 0 and np.abs(m.B.grad).max() > 0, name
        assert m.weight.grad is None
    model.zero_grad()
    losses = train_steps(model, steps=5)
    assert losses[-1] < losses[0]


def test_pissa_merge_gives_the_fine_tuned_weight_and_unmerge_the_residual():
    model = apply_lora(tiny_gpt(), targets="q,v", r=2, alpha=4.0, init="pissa").to(np.float64)
    train_steps(model, steps=2)
    residual = {n: m.weight.data.copy() for n, m in lora_layers(model).items()}
    unmerged = logits(model)
    lora.merge(model)
    np.testing.assert_allclose(logits(model), unmerged, rtol=0, atol=1e-12)
    lora.unmerge(model)
    for n, m in lora_layers(model).items():
        np.testing.assert_allclose(m.weight.data, residual[n], rtol=0, atol=1e-12)


def test_save_model_refuses_an_unmerged_pissa_model(tmp_path):
    model = apply_lora(tiny_gpt(), targets="q,v", r=2, alpha=4.0, init="pissa")
    with pytest.raises(RuntimeError, match="residuals"):
        save_model(model, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []
    lora.merge(model)  # merged: the fine-tuned model, a plain GPT
    save_model(model, tmp_path / "m.safetensors")


@pytest.mark.parametrize("dora", [False, True])
def test_dora_and_pissa_together_start_at_the_base(dora):
    model = apply_lora(tiny_gpt(), targets="all-linear", r=2, alpha=4.0, init="pissa", dora=dora)
    np.testing.assert_allclose(logits(model), logits(tiny_gpt()), rtol=0, atol=2e-6)


# --- bad input: one clear error, the model byte for byte as it was -----------------------------------------------


def zero_column(model: GPT) -> GPT:
    model.blocks[1].attn.v.weight.data[:, 3] = 0.0  # output unit 3 of v reads nothing
    return model


def low_rank(model: GPT) -> GPT:
    W = model.blocks[0].attn.q.weight.data
    W[...] = np.outer(W[:, 0], W[0, :])  # rank 1
    return model


ERRORS = {  # (the model, the LoRA setup, the message)
    "DoRA, a column of norm 0": (lambda: zero_column(tiny_gpt()), dict(targets="q,v", dora=True),
                                 r"DoRA divides each output column of W by its norm, but blocks\.1\.attn\.v's W "
                                 r"\(8, 8\) has 1 column\(s\) of norm 0 \(columns \[3\]\)"),
    "PiSSA, r > rank(W)": (lambda: low_rank(tiny_gpt()), dict(targets="q,v", init="pissa"),
                           r"PiSSA needs r <= rank\(W\): blocks\.0\.attn\.q's W \(8, 8\) has rank 1, r = 2"),
    "PiSSA, r > rank(W) of a later target": (lambda: low_rank(tiny_gpt()), dict(targets="all-linear", init="pissa",
                                                                              dora=True), r"has rank 1, r = 2"),
}


@pytest.mark.parametrize("case", ERRORS)
def test_apply_lora_refuses_a_layer_it_cannot_adapt_and_changes_nothing(case):
    make, setup, match = ERRORS[case]
    model = make()
    before, raw = snapshot(model), {n: p.data.tobytes() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        apply_lora(model, LoRAConfig(r=2, alpha=4.0, **setup))
    assert_untouched(before, model)
    assert {n: p.data.tobytes() for n, p in model.named_parameters()} == raw  # byte for byte
    assert not hasattr(model, "pissa_fingerprints")


@pytest.mark.parametrize("setup, match", [(dict(dora=True), "column"), (dict(init="pissa"), "rank")])
def test_lora_linear_refuses_a_layer_it_cannot_adapt_and_changes_nothing(setup, match):
    base = Linear(6, 4, gen=np.random.default_rng(0))
    base.weight.data[:, 1] = 0.0  # a zero column, and rank 3
    before = snapshot(base)
    with pytest.raises(ValueError, match=match):
        LoRALinear(base, r=4, alpha=4.0, **setup)
    assert_untouched(before, base)
    assert base.weight.requires_grad


def test_dora_needs_a_linear():
    with pytest.raises(TypeError, match="wraps a Linear"):
        LoRALinear(tiny_gpt().wte, r=2, dora=True)


def test_lora_config_dora_and_init():
    assert LoRAConfig().dora is False and LoRAConfig().init == "random"
    assert LoRAConfig(dora=True, init="pissa").to_dict()["init"] == "pissa"
    with pytest.raises(ValueError, match=r"LoRAConfig\.zero has no meaning with init='pissa'.*got 'A'"):
        LoRAConfig(init="pissa", zero="A")  # neither factor starts at zero: a second spelling of the same setup
    old = {k: v for k, v in LoRAConfig(r=4).to_dict().items() if k not in ("dora", "init")}  # an older adapter file
    assert LoRAConfig.from_dict(old) == LoRAConfig(r=4)
    assert "dora=True" in repr(LoRALinear(Linear(4, 4), r=2, dora=True))
    assert "init='pissa'" in repr(LoRALinear(Linear(4, 4), r=2, init="pissa"))
    assert math.isclose(LoRALinear(Linear(4, 4), r=2, alpha=2.0, init="pissa").scaling, 1.0)
