"""Tests for lora_np/nn.py: the parameter tree (names, order, trainable flags), train/eval, dtype casts,
state dicts (copies out, copies in, all-or-nothing loading) and the layers themselves."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_untouched, snapshot, tiny_gpt

from lora_np.engine import Tensor
from lora_np.nn import Dropout, Embedding, LayerNorm, Linear, Module, Parameter
from lora_np.optim import AdamW


def copy_arrays(model: Module) -> dict[str, np.ndarray]:
    """Independent copies of every parameter, to compare bit for bit later."""
    return {name: np.array(p.data, copy=True) for name, p in model.named_parameters()}


def assert_same_arrays(before: dict[str, np.ndarray], model: Module) -> None:
    after = {name: p.data for name, p in model.named_parameters()}
    assert list(after) == list(before)
    for name, arr in before.items():
        assert after[name].dtype == arr.dtype, name
        assert np.array_equal(after[name], arr), f"{name} changed"


# --- the parameter tree ------------------------------------------------------------------------------------------


def expected_gpt_names(n_layer: int) -> list[str]:
    names = ["wte.weight", "wpe.weight"]
    for i in range(n_layer):
        b = f"blocks.{i}"
        names += [f"{b}.ln1.weight", f"{b}.ln1.bias"]
        for lin in ("q", "k", "v", "o"):
            names += [f"{b}.attn.{lin}.weight", f"{b}.attn.{lin}.bias"]
        names += [f"{b}.ln2.weight", f"{b}.ln2.bias"]
        for lin in ("up", "down"):
            names += [f"{b}.mlp.{lin}.weight", f"{b}.mlp.{lin}.bias"]
    return names + ["ln_f.weight", "ln_f.bias", "lm_head.weight"]


def test_named_parameters_names_and_order():
    model = tiny_gpt()
    names = [n for n, _ in model.named_parameters()]
    assert names == expected_gpt_names(2)  # attribute order, lists indexed: stable, readable names
    assert names[4] == "blocks.0.attn.q.weight"
    params = dict(model.named_parameters())
    assert params["blocks.0.attn.q.weight"] is model.blocks[0].attn.q.weight
    assert params["blocks.1.mlp.down.weight"].shape == (32, 8)  # W is (d_in, d_out)
    assert params["lm_head.weight"].shape == (8, 11)


def test_named_parameters_without_bias():
    names = [n for n, _ in tiny_gpt(bias=False).named_parameters()]
    assert not any(n.endswith(".bias") for n in names)
    assert names == [n for n in expected_gpt_names(2) if not n.endswith(".bias")]


class Shared(Module):
    def __init__(self) -> None:
        self.first = Linear(3, 4)
        self.layers = [Linear(4, 4), Linear(4, 2, bias=False)]
        self.scale = Parameter(np.ones(2, dtype=np.float32))
        self.tied = self.first.weight  # the same Parameter reachable twice
        self.note = "not a parameter"
        self.empty: list = []


def test_shared_parameter_listed_once_and_lists_are_indexed():
    m = Shared()
    names = [n for n, _ in m.named_parameters()]
    # Own Parameters come first (module-by-module walk: the root, then its children in order); `tied` is the
    # same object as first.weight, so it is listed once, under the first name the walk finds.
    assert names == ["scale", "tied", "first.bias", "layers.0.weight", "layers.0.bias", "layers.1.weight"]
    assert len(m.parameters()) == len({id(p) for p in m.parameters()})
    assert [n for n, _ in m.named_modules()] == ["", "first", "layers.0", "layers.1"]


def test_parameters_and_trainable_parameters_follow_requires_grad():
    model = tiny_gpt()
    params = model.parameters()
    assert len(params) == len(expected_gpt_names(2))
    assert model.trainable_parameters() == params  # a fresh model trains everything
    frozen = {id(model.wte.weight), id(model.blocks[1].attn.v.bias), id(model.lm_head.weight)}
    for p in params:
        if id(p) in frozen:
            p.requires_grad = False
    trainable = model.trainable_parameters()
    assert [id(p) for p in trainable] == [id(p) for p in params if id(p) not in frozen]  # same order, minus frozen
    assert len(model.parameters()) == len(params)  # parameters() still lists the frozen ones
    model.blocks[1].attn.v.bias.requires_grad = True
    assert model.blocks[1].attn.v.bias in model.trainable_parameters()


def test_zero_grad_clears_every_gradient():
    model = tiny_gpt()
    idx = np.arange(8).reshape(1, 8) % 11
    model(idx, idx)[1].backward()
    assert all(p.grad is not None for p in model.parameters())
    model.zero_grad()
    assert all(p.grad is None for p in model.parameters())


# --- train / eval / to -------------------------------------------------------------------------------------------


def test_train_eval_flip_training_recursively_and_change_no_weight():
    model = tiny_gpt(dropout=0.1)
    before = copy_arrays(model)
    modules = [m for _, m in model.named_modules()]
    assert len(modules) > 20 and all(m.training for m in modules)
    assert model.eval() is model
    assert not any(m.training for _, m in model.named_modules())
    assert_same_arrays(before, model)
    assert model.train() is model
    assert all(m.training for _, m in model.named_modules())
    model.train(False)
    assert not any(m.training for _, m in model.named_modules())
    assert_same_arrays(before, model)


def test_eval_turns_dropout_off_and_train_turns_it_on():
    model = tiny_gpt(dropout=0.5)
    idx = np.arange(16).reshape(2, 8) % 11
    model.eval()
    a, b = model(idx)[0].data, model(idx)[0].data
    assert np.array_equal(a, b)  # deterministic without dropout
    model.train()
    c = model(idx)[0].data
    assert not np.allclose(c, a)


def test_to_float64_casts_every_parameter_and_the_forward_pass():
    model = tiny_gpt()
    idx = np.arange(8).reshape(1, 8) % 11
    logits32 = model(idx)[0].data
    model(idx, idx)[1].backward()
    assert model.to(np.float64) is model
    assert all(p.dtype == np.float64 for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # stale float32 gradients are dropped
    logits, loss = model(idx, idx)
    assert logits.dtype == np.float64 and loss.dtype == np.float64
    np.testing.assert_allclose(logits.data, logits32, rtol=1e-5, atol=1e-6)  # same weights, more precision
    model.to(np.float32)
    assert all(p.dtype == np.float32 for p in model.parameters())


# --- state dicts -------------------------------------------------------------------------------------------------


def test_state_dict_returns_host_numpy_copies():
    model = tiny_gpt()
    sd = model.state_dict()
    assert list(sd) == expected_gpt_names(2)
    before = copy_arrays(model)
    for name, arr in sd.items():
        assert type(arr) is np.ndarray
        assert arr.shape == before[name].shape and arr.dtype == before[name].dtype
        assert np.array_equal(arr, before[name])
        arr += 1.0  # mutating the copy ...
    assert_same_arrays(before, model)  # ... leaves the model alone
    assert not np.shares_memory(model.state_dict()["wte.weight"], model.wte.weight.data)


def test_state_dict_includes_frozen_parameters():
    model = tiny_gpt()
    for p in model.parameters():
        p.requires_grad = False
    assert list(model.state_dict()) == expected_gpt_names(2)


def test_load_state_dict_round_trip():
    src, dst = tiny_gpt(seed=0), tiny_gpt(seed=1)
    idx = np.random.default_rng(0).integers(0, 11, (3, 8))
    assert not np.array_equal(src(idx)[0].data, dst(idx)[0].data)
    dst.load_state_dict(src.state_dict())
    assert np.array_equal(src(idx)[0].data, dst(idx)[0].data)
    for (n1, p1), (n2, p2) in zip(src.named_parameters(), dst.named_parameters()):
        assert n1 == n2 and p1.dtype == p2.dtype and np.array_equal(p1.data, p2.data)


def test_load_state_dict_copies_so_the_dict_and_model_stay_independent():
    """A state dict kept as a snapshot (say the best checkpoint) must not move when the model it was loaded into
    trains, and two models loaded from one dict must not share weights."""
    sd = tiny_gpt(seed=0).state_dict()
    kept = {n: a.copy() for n, a in sd.items()}
    a, b = tiny_gpt(seed=1), tiny_gpt(seed=2)
    a.load_state_dict(sd)
    b.load_state_dict(sd)
    for p in a.parameters():
        assert p.data.flags.writeable
        assert not any(np.shares_memory(p.data, arr) for arr in sd.values())
    idx = np.arange(16).reshape(2, 8) % 11
    opt = AdamW(a.trainable_parameters(), lr=1e-2)
    a(idx, idx)[1].backward()
    opt.step()  # in-place updates of a's arrays
    for name in sd:
        assert np.array_equal(sd[name], kept[name]), f"the caller's {name} changed"
    assert_same_arrays(kept, b)


def test_load_state_dict_casts_lossless_dtypes_to_the_parameter_dtype():
    model = tiny_gpt()
    sd = {n: a.astype(np.float16) for n, a in tiny_gpt(seed=3).state_dict().items()}
    model.load_state_dict(sd)
    assert all(p.dtype == np.float32 for p in model.parameters())
    assert np.array_equal(model.wte.weight.data, sd["wte.weight"].astype(np.float32))


def _edit(name, value):
    def edit(sd):
        sd[name] = value(sd[name]) if callable(value) else value
    return edit


def _drop(*names):
    def edit(sd):
        for n in names:
            del sd[n]
    return edit


def _nan_at(name):
    def edit(sd):
        sd[name] = sd[name].copy()
        sd[name].flat[3] = np.nan
    return edit


# Bad state dicts: (edit of a valid dict from another seed, the message). Every other tensor is valid and different,
# so a write of any of them would show: each row checks the error, its message, and that nothing changed.
STATE_ERRORS = {
    "missing": (_drop("blocks.1.attn.k.bias"), r"missing tensors \['blocks\.1\.attn\.k\.bias'\]"),
    "unexpected": (_edit("blocks.0.attn.q.A", np.zeros((8, 2), np.float32)),
                   r"unexpected tensors \['blocks\.0\.attn\.q\.A'\]"),
    "every bad name at once": (lambda sd: (_drop("wte.weight", "lm_head.weight")(sd),
                                           sd.__setitem__("extra.weight", np.zeros(3, np.float32))),
                               r"missing tensors \['lm_head\.weight', 'wte\.weight'\], unexpected tensors "
                               r"\['extra\.weight'\]"),
    "transposed": (_edit("blocks.1.mlp.up.weight", np.zeros((32, 8), np.float32)),
                   r"blocks\.1\.mlp\.up\.weight: shape \(32, 8\), expected \(8, 32\)"),
    "float64 into float32": (_edit("ln_f.weight", lambda a: a.astype(np.float64)),
                             r"ln_f\.weight: dtype float64 cannot be held by a float32 parameter without loss"),
    "integers": (_edit("wpe.weight", lambda a: a.astype(np.int32)), r"wpe\.weight: dtype int32"),
    "NaN": (_nan_at("blocks.0.attn.v.weight"), r"blocks\.0\.attn\.v\.weight: holds NaN or inf"),
    "inf": (_edit("lm_head.weight", lambda a: np.full_like(a, np.inf)), r"lm_head\.weight: holds NaN or inf"),
    "not an array": (_edit("wte.weight", lambda a: a.tolist()), r"wte\.weight: not an array \(list\)"),
}


@pytest.mark.parametrize("case", STATE_ERRORS)
def test_load_state_dict_refuses_bad_state_and_changes_nothing(case):
    edit, message = STATE_ERRORS[case]
    model = tiny_gpt()
    model.wpe.weight.requires_grad = False  # a mix of flags, kept as they are
    before = snapshot(model)
    sd = tiny_gpt(seed=1).state_dict()
    edit(sd)
    with pytest.raises(ValueError, match=message):
        model.load_state_dict(sd)
    assert_untouched(before, model)


# --- the layers --------------------------------------------------------------------------------------------------


def test_linear_is_x_at_w_plus_b_with_w_d_in_by_d_out():
    lin = Linear(5, 3, gen=np.random.default_rng(1))
    assert lin.weight.shape == (5, 3) and lin.bias.shape == (3,)
    lin.bias.data[:] = np.array([0.5, -1.0, 2.0], np.float32)
    x = np.random.default_rng(2).standard_normal((2, 4, 5)).astype(np.float32)
    y = lin(Tensor(x))
    assert y.shape == (2, 4, 3)
    np.testing.assert_allclose(y.data, x @ lin.weight.data + lin.bias.data, rtol=1e-6, atol=1e-6)
    assert repr(lin) == "Linear(d_in=5, d_out=3, bias=True)"


def test_linear_without_bias_and_its_init():
    lin = Linear(64, 32, bias=False, std=0.02, gen=np.random.default_rng(0))
    assert lin.bias is None and [n for n, _ in lin.named_parameters()] == ["weight"]
    x = np.random.default_rng(1).standard_normal((7, 64)).astype(np.float32)
    np.testing.assert_allclose(lin(Tensor(x)).data, x @ lin.weight.data, rtol=1e-6)
    assert abs(float(lin.weight.data.std()) - 0.02) < 0.002  # GPT-2 init N(0, 0.02²)
    assert lin.weight.dtype == np.float32


def test_linear_gradients():
    lin = Linear(4, 3, gen=np.random.default_rng(0))
    x = Tensor(np.random.default_rng(1).standard_normal((6, 4)), dtype=np.float32)
    g = np.random.default_rng(2).standard_normal((6, 3)).astype(np.float32)
    lin(x).backward(g)
    np.testing.assert_allclose(lin.weight.grad, x.data.T @ g, rtol=1e-5, atol=1e-6)  # dW = xᵀ g: (d_in, d_out)
    np.testing.assert_allclose(lin.bias.grad, g.sum(0), rtol=1e-5, atol=1e-6)


def test_embedding_and_layer_norm_forward():
    emb = Embedding(5, 3, gen=np.random.default_rng(0))
    ids = np.array([[4, 0, 4]])
    assert np.array_equal(emb(ids).data, emb.weight.data[ids])
    ln = LayerNorm(3)
    x = np.array([[1.0, 2.0, 4.0]], np.float32)
    y = ln(Tensor(x)).data
    np.testing.assert_allclose(y, (x - x.mean()) / np.sqrt(x.var() + 1e-5), rtol=1e-5)
    assert LayerNorm(3, bias=False).bias is None


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5, float("nan")])
def test_dropout_rejects_p_outside_0_1(p):
    with pytest.raises(ValueError, match=r"Dropout: p must be a number in \[0, 1\)"):
        Dropout(p)


def test_dropout_train_scales_eval_is_identity():
    x = Tensor(np.ones((200, 50), np.float32))
    d = Dropout(0.25, seed=0)
    y = d(x).data
    kept = y != 0
    assert np.allclose(y[kept], 1 / 0.75)  # inverted dropout: survivors are scaled up by 1/(1-p)
    assert 0.70 < kept.mean() < 0.80
    d.eval()
    assert d(x) is x
    assert Dropout(0.0)(x) is x
    a, b = Dropout(0.5, seed=7)(x).data, Dropout(0.5, seed=7)(x).data
    assert np.array_equal(a, b)  # masks come from the module's own seeded generator


def test_inference_context_is_eval_without_graph_and_restores_mode_even_on_error():
    model = tiny_gpt()
    assert model.training
    with model.inference():
        assert not model.training and not model.blocks[0].training
        logits, _ = model(np.zeros((1, 4), dtype=np.int64))
        assert not logits.requires_grad
    assert model.training
    with pytest.raises(RuntimeError, match="boom"), model.inference():
        raise RuntimeError("boom")
    assert model.training and model.blocks[0].mlp.training
