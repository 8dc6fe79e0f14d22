"""Tests for lora_np/quantize.py: the NF4 code book, round-trip error bounds, packing, double quantization and
bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lora_np.quantize import (
    SCALE_BLOCK,
    QuantConfig,
    QuantizedScales,
    dequantize,
    largest_gap,
    nf4_code_book,
    pack4,
    quantize,
    quantize_nf4,
    quantize_uniform4,
    uniform4_code_book,
    unpack4,
)

# NF4 as published: bitsandbytes' table (functional.py, get_4bit_type("nf4")), i.e. the data type QLoRA trains on.
# The code book is computed in quantize.py from the normal quantiles; this only checks that it is the same one.
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def gaussian(shape, seed=0, std=0.02):
    return (np.random.default_rng(seed).standard_normal(shape) * std).astype(np.float32)


def block_absmax(W, block):
    return np.abs(W.reshape(-1, block)).max(axis=1, keepdims=True)  # (n_blocks, 1)


# -- the code books ---------------------------------------------------------------------------------------------


def test_nf4_code_book_is_the_published_one():
    book = nf4_code_book()
    assert book.shape == (16,) and np.all(np.diff(book) > 0)
    assert book[0] == -1.0 and book[-1] == 1.0 and book[7] == 0.0  # ±1 and an exact zero
    assert np.abs(book - PUBLISHED_NF4).max() < 1e-6  # the published table is float32 with δ rounded to 0.9677083


def test_nf4_is_denser_near_zero_and_asymmetric():
    book = nf4_code_book()
    gaps = np.diff(book)
    assert gaps[7] < gaps[0] and gaps[7] < gaps[-1]  # normal quantiles: levels crowd where the weights are
    assert (book > 0).sum() == 8 and (book < 0).sum() == 7  # 8 positive, 7 negative and the zero


def test_uniform_code_book_is_evenly_spaced():
    book = uniform4_code_book()
    assert book.shape == (16,) and np.allclose(np.diff(book), 2 / 15)
    assert largest_gap("uniform4") == pytest.approx(2 / 15)
    assert largest_gap("nf4") == pytest.approx(PUBLISHED_NF4[1] + 1, abs=1e-6)  # widest: the negative tail


# -- round trips ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["nf4", "uniform4"])
@pytest.mark.parametrize("shape, block", [((64, 64), 64), ((32, 128), 128), ((16, 24), 8), ((10,), 2)])
def test_error_is_at_most_half_the_largest_gap_times_the_block_absmax(kind, shape, block):
    W = gaussian(shape, seed=block)
    W_hat = quantize(W, QuantConfig(kind, block)).dequantize()
    assert W_hat.shape == W.shape and W_hat.dtype == np.float32
    err = np.abs(W_hat - W).reshape(-1, block)
    bound = largest_gap(kind) / 2 * block_absmax(W, block)
    assert np.all(err <= bound * (1 + 1e-6) + 1e-12)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("block", [32, 64, 256])
def test_nf4_error_is_below_uniform_on_gaussian_weights(seed, block):
    W = gaussian((256, 256), seed=seed)
    errors = {kind: np.sqrt(np.mean((quantize(W, QuantConfig(kind, block)).dequantize() - W) ** 2))
              for kind in ("nf4", "uniform4")}
    assert errors["nf4"] <= errors["uniform4"]  # QLoRA's argument for NF4 (their Table 2), on normal weights


@pytest.mark.parametrize("kind", ["nf4", "uniform4"])
def test_code_points_times_the_absmax_come_back_exactly(kind):
    rng, block = np.random.default_rng(3), 16
    book = uniform4_code_book() if kind == "uniform4" else nf4_code_book()
    codes = rng.integers(0, 16, size=(8, block))
    codes[:, 0] = rng.choice([0, 15], size=8)  # each block holds a ±1 level, so its absmax is its scale
    scales = rng.uniform(0.01, 3.0, size=(8, 1)).astype(np.float32)
    W = (book.astype(np.float32)[codes] * scales).reshape(4, 32)  # float32 products, as dequantize makes them
    q = quantize(W, QuantConfig(kind, block))
    assert np.array_equal(unpack4(q.packed), codes.reshape(-1))
    assert np.array_equal(dequantize(q), W)  # bit for bit


def test_an_all_zero_block_stays_zero():
    W = gaussian((4, 16))
    W[1] = 0.0
    for kind in ("nf4", "uniform4"):
        W_hat = quantize(W, QuantConfig(kind, 16)).dequantize()
        assert np.all(W_hat[1] == 0.0) and np.all(np.isfinite(W_hat))


def test_dequantize_dtype_and_the_shortcuts():
    W = gaussian((8, 8))
    q = quantize_nf4(W, block=16)
    assert q.config == QuantConfig("nf4", 16, False)
    assert quantize_uniform4(W, block=16).config.kind == "uniform4"
    assert q.dequantize(np.float64).dtype == np.float64
    assert np.array_equal(q.dequantize(np.float64), q.dequantize().astype(np.float64))


# -- packing and bytes ------------------------------------------------------------------------------------------


def test_pack_two_codes_a_byte_and_back():
    codes = np.random.default_rng(0).integers(0, 16, size=64)
    packed = pack4(codes)
    assert packed.dtype == np.uint8 and packed.shape == (32,)
    assert packed[0] == (codes[0] << 4) | codes[1]  # the first of a pair in the high nibble
    assert np.array_equal(unpack4(packed), codes)


@pytest.mark.parametrize("block", [64, 128])
def test_bytes_are_half_a_byte_a_number_plus_the_scales(block):
    W = gaussian((256, 512))
    n, n_blocks = W.size, W.size // block
    q = quantize_nf4(W, block)
    assert q.packed.nbytes == n // 2
    assert q.nbytes == n // 2 + 4 * n_blocks  # float32 scales: 0.5 + 4/64 = 0.5625 bytes a number at block 64
    dq = quantize_nf4(W, block, double_quant=True)
    assert isinstance(dq.scales, QuantizedScales)
    assert dq.nbytes == n // 2 + n_blocks + 4 * math.ceil(n_blocks / SCALE_BLOCK) + 4  # 8-bit scales + group's
    if block == 64:
        assert q.nbytes / n == 0.5625 and dq.nbytes / n == pytest.approx(0.5 + 1 / 64 + 4 / (64 * 256), abs=1e-4)


# -- double quantization ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(256, 512), (64, 100)])  # 2048 scales (8 full groups); 100 (a short group)
def test_double_quantized_scales_err_by_at_most_half_a_step(shape):
    W = gaussian(shape, seed=1) * np.random.default_rng(2).uniform(0.1, 3, size=(shape[0], 1)).astype(np.float32)
    plain, dq = quantize_nf4(W, 64), quantize_nf4(W, 64, double_quant=True)
    scales, approx = plain.scales, dq.scales.dequantize()
    step = np.repeat(dq.scales.group_absmax, SCALE_BLOCK)[: len(scales)] / 127  # one 8-bit step, per group
    assert np.all(np.abs(approx - scales) <= step / 2 * (1 + 1e-5) + 1e-7)
    # the weights: rounding to the level (with the true scale), then the scale's own error
    err = np.abs(dq.dequantize() - W).reshape(-1, 64)
    bound = largest_gap("nf4") / 2 * scales[:, None] + np.abs(approx - scales)[:, None]
    assert np.all(err <= bound * (1 + 1e-5) + 1e-7)
    assert np.array_equal(unpack4(dq.packed), unpack4(plain.packed))  # the codes do not depend on the scales' bits


def test_double_quantization_costs_little_accuracy():
    W = gaussian((256, 256), seed=4)
    rms = lambda q: float(np.sqrt(np.mean((q.dequantize() - W) ** 2)))  # noqa: E731
    assert rms(quantize_nf4(W, 64, double_quant=True)) < 1.01 * rms(quantize_nf4(W, 64))


# -- the backend ------------------------------------------------------------------------------------------------


def test_dequantize_runs_on_the_active_backend(backend):
    W = gaussian((32, 64))
    active = backend.get_backend()
    backend.set_backend("numpy")  # the host's result, to compare with
    on_host = {dq: quantize_nf4(W, 64, double_quant=dq).dequantize() for dq in (False, True)}
    backend.set_backend(active)
    for dq in (False, True):
        q = quantize_nf4(backend.to_device(W), 64, double_quant=dq)
        W_hat = q.dequantize()
        assert backend.array_module(W_hat) is backend.xp
        assert np.allclose(backend.to_numpy(W_hat), on_host[dq], rtol=1e-6)
        assert np.abs(backend.to_numpy(W_hat) - W).max() <= largest_gap("nf4") / 2 * np.abs(W).max() * 1.01


# -- bad input --------------------------------------------------------------------------------------------------

ERRORS = [
    # name                   call                                                    error message
    ("block-does-not-divide", lambda W: quantize_nf4(W, block=48),                   "block 48 does not divide the "
                                                                                     "weight's size 1024"),
    ("block-larger-than-W",  lambda W: quantize_nf4(W, block=2048),                  "does not divide"),
    ("odd-block",            lambda W: quantize_nf4(W, block=33),                    "even integer >= 2"),
    ("zero-block",           lambda W: quantize_nf4(W, block=0),                     "even integer >= 2"),
    ("bool-block",           lambda W: quantize_nf4(W, block=True),                  "even integer >= 2"),
    ("float-block",          lambda W: quantize_nf4(W, block=64.0),                  "even integer >= 2"),
    ("unknown-kind",         lambda W: quantize(W, QuantConfig(kind="int4")),        "kind must be one of"),
    ("double-quant-not-bool", lambda W: quantize_nf4(W, double_quant=1),             "double_quant must be True or "
                                                                                     "False"),
    ("nan",                  lambda W: quantize_nf4(np.where(W > 0.03, np.nan, W)),  "NaN or inf"),
    ("integer-W",            lambda W: quantize_nf4((W * 100).astype(np.int32)),     "must be a float array"),
]  # fmt: skip


@pytest.mark.parametrize("call, message", [pytest.param(c, m, id=n) for n, c, m in ERRORS])
def test_bad_input_is_one_clear_error(call, message):
    W = gaussian((32, 32))
    before = W.copy()
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        call(W)
    assert np.array_equal(W, before)  # the caller's array is never touched
