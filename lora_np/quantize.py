"""4-bit weights: blockwise absmax quantization to NormalFloat-4 (QLoRA, Dettmers et al. 2023, arXiv 2305.14314),
and to 16 evenly spaced levels for comparison.

A weight W is cut into blocks of ``block`` consecutive numbers (row-major, as bitsandbytes does). Each block keeps
one float32 scale, its absmax a = max|w|, and each number keeps the index (0..15) of the code-book level nearest to
w / a; two indices share a byte. Dequantizing is a lookup and a product: ŵ = level[code] · a.

    W (d_in, d_out) float32: 4 bytes a number  ->  codes: ½ byte a number  +  scales: 4 / block bytes a number

Which 16 levels? Trained weights are close to normal (QLoRA §3, their Figure 7 in the appendix), and w / a of a
normal block is a normal draw divided by its block's largest value. NormalFloat-4 (NF4) puts the levels at
quantiles of N(0, 1), so that each level is used about equally often (an information-theoretically optimal code
for normal data): more levels near 0, where most weights are, fewer in the tails. The uniform code book
(``kind="uniform4"``) spaces them evenly on [-1, 1]: the plain 4-bit absmax quantization NF4 is measured against
(QLoRA's Table 2 compares NF4 with Int4 and FP4 the same way).

Double quantization (QLoRA §3): the float32 scales are themselves quantized, to 8 bits in blocks of 256, with one
float32 scale per 256 scales and the mean of all scales subtracted first (the scales are all positive: centring
them uses the 8 bits on both sides of 0). That takes the scales' cost from 32 / 64 = 0.5 bit to 8 / 64 +
32 / (64·256) ≈ 0.127 bit a number. The paper stores the scales as 8-bit floats; here they are a symmetric 8-bit
integer (code / 127 · group absmax), which is easier to read and costs the same bytes.

Quantizing runs once, on the host (``backend.np``); the codes and scales then live on the active backend, where
``dequantize`` runs at every forward. ``qlora.py`` puts such a weight under a frozen Linear, with LoRA on top.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from . import backend

KINDS = ("nf4", "uniform4")
SCALE_BLOCK = 256  # scales per 8-bit group in double quantization (QLoRA §3)

# The probability of NF4's outermost level. The paper's estimate of a level, q_i = ½(Q(i/(2^k + 1)) + Q((i + 1)/
# (2^k + 1))), would put the outermost one at Q(1) = ∞; the published data type (bitsandbytes' create_normal_map)
# instead spaces the levels at equal probability steps from δ = 0.9677083 down to ½. That δ is 1 − ½(1/30 + 1/32),
# halfway between the centres of the outermost of 15 and of 16 equal-probability bins.
NF4_DELTA = 1 - (1 / 30 + 1 / 32) / 2


def nf4_code_book() -> Any:
    """The 16 NF4 levels (float32, sorted, in [-1, 1], with an exact 0), computed from the normal quantiles.

    An even number of levels symmetric around 0 has no 0, and a weight of exactly 0 (padding, pruned weights)
    should stay 0. So QLoRA makes NF4 asymmetric: 8 positive quantiles (2^(k-1)) and 7 negative ones
    (2^(k-1) - 1), the two halves' shared 0 kept once, then divided by the largest so that ±1 is a level."""
    inv_cdf = statistics.NormalDist().inv_cdf  # Q(p), the normal quantile function: no SciPy needed
    p = lambda i, n: NF4_DELTA + (0.5 - NF4_DELTA) * i / n  # noqa: E731  the i-th of n steps from δ to ½ (excl.)
    positive = [inv_cdf(p(i, 8)) for i in range(8)]  # Q(δ) = 1.848 ... Q(0.52): 8 levels above 0
    negative = [-inv_cdf(p(i, 7)) for i in range(7)]  # -Q(δ) ... : 7 levels below 0, spaced a little wider
    levels = sorted(negative + [0.0] + positive)
    return backend.np.array(levels, dtype=backend.np.float64) / max(levels)  # normalised: -1 ... 0 ... 1


def uniform4_code_book() -> Any:
    """16 evenly spaced levels on [-1, 1] (gap 2/15): plain 4-bit absmax quantization. No level is exactly 0."""
    return backend.np.linspace(-1.0, 1.0, 16)


CODE_BOOKS = {"nf4": nf4_code_book, "uniform4": uniform4_code_book}


@dataclass(frozen=True)
class QuantConfig:
    """How a weight is stored in 4 bits (bitsandbytes' ``BitsAndBytesConfig``: ``bnb_4bit_quant_type``,
    ``bnb_4bit_use_double_quant``; its block size is fixed at 64). Checked when made."""

    kind: str = "nf4"  # code book: "nf4" (QLoRA) or "uniform4" (16 evenly spaced levels, for comparison)
    block: int = 64  # numbers sharing one absmax scale (QLoRA: 64); must divide the weight's size
    double_quant: bool = False  # also quantize the block scales: 8 bits, groups of 256 (QLoRA §3)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"QuantConfig.kind must be one of {KINDS}, got {self.kind!r}")
        # even: a block holds whole bytes of two codes, so a weight's blocks can be packed and cut independently
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 2 or self.block % 2:
            raise ValueError(f"QuantConfig.block must be an even integer >= 2, got {self.block!r}")
        if not isinstance(self.double_quant, bool):
            raise ValueError(f"QuantConfig.double_quant must be True or False, got {self.double_quant!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "block": self.block, "double_quant": self.double_quant}


@dataclass(frozen=True, eq=False)
class QuantizedScales:
    """The block scales in 8 bits (double quantization): scale_j ≈ mean + code_j / 127 · group_absmax[j // 256]."""

    codes: Any  # (n_blocks,) int8
    group_absmax: Any  # (ceil(n_blocks / 256),) float32: the largest |scale - mean| of each group of 256
    mean: float  # the mean of all scales, subtracted first

    def dequantize(self) -> Any:
        """(n_blocks,) float32 scales."""
        xp, n = backend.xp, self.codes.shape[0]
        groups = xp.repeat(self.group_absmax, SCALE_BLOCK)[:n]  # (n_blocks,): each scale's group absmax
        return (self.codes.astype(xp.float32) / 127) * groups + xp.float32(self.mean)

    @property
    def nbytes(self) -> int:
        return int(self.codes.nbytes + self.group_absmax.nbytes + 4)  # + the float32 mean


@dataclass(frozen=True, eq=False)
class Quantized4bit:
    """A weight in 4 bits: ``dequantize()`` gives it back as level[code] · block scale, in W's shape."""

    packed: Any  # (size / 2,) uint8: two codes a byte, the first in the high nibble
    scales: Any  # (size / block,) float32 absmax per block, or QuantizedScales (double quantization)
    code_book: Any  # (16,) float32 levels, sorted: the data type, shared by every weight of this kind
    shape: tuple[int, ...]
    config: QuantConfig

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored codes and scales (not the 64-byte code book, a constant of the data type)."""
        scales = self.scales.nbytes if isinstance(self.scales, QuantizedScales) else self.scales.nbytes
        return int(self.packed.nbytes + scales)

    def dequantize(self, dtype: Any = None) -> Any:
        """W as a fresh float array of ``shape`` (float32 unless ``dtype``): level[code] · scale, block by block."""
        scales = self.scales.dequantize() if isinstance(self.scales, QuantizedScales) else self.scales
        w = self.code_book[unpack4(self.packed)].reshape(-1, self.config.block)  # (n_blocks, block), in [-1, 1]
        w *= scales[:, None]  # (n_blocks, block) · (n_blocks, 1): each block times its absmax
        return w.reshape(self.shape).astype(dtype or backend.DEFAULT_DTYPE, copy=False)


def pack4(codes: Any) -> Any:
    """(2m,) codes in 0..15 -> (m,) uint8, two a byte: the first of each pair in the high nibble."""
    codes = codes.astype(backend.np.uint8)
    return (codes[0::2] << 4) | codes[1::2]


def unpack4(packed: Any) -> Any:
    """(m,) uint8 -> (2m,) codes in 0..15, in the order ``pack4`` took them (on the array's own backend)."""
    xp = backend.array_module(packed)
    return xp.stack([packed >> 4, packed & 0x0F], axis=-1).reshape(-1)  # (m, 2) -> (2m,): high, low, high, ...


def check_quantizable(W: Any, config: QuantConfig) -> None:
    """Raise a ValueError if ``W`` cannot be stored with ``config``: not a float array, NaN or inf values, or a
    size that the block does not divide (blocks never straddle two weights, as in bitsandbytes' blockwise
    kernels; padding a weight would make its dequantized shape a lie)."""
    shape, kind = tuple(W.shape), backend.np.dtype(W.dtype).kind
    if kind != "f":
        raise ValueError(f"quantize: W must be a float array, got dtype {W.dtype}")
    size = math.prod(shape)
    if size == 0 or size % config.block:
        raise ValueError(f"quantize: block {config.block} does not divide the weight's size {size} (shape {shape})")
    if not bool(backend.np.isfinite(backend.to_numpy(W)).all()):
        raise ValueError(f"quantize: W (shape {shape}) holds NaN or inf values")


def quantize(W: Any, config: QuantConfig | None = None) -> Quantized4bit:
    """W (any shape, float, on either backend) -> ``Quantized4bit``: every block scaled by its absmax, every
    number replaced by the index of the nearest level of the code book. ``dequantize()`` inverts it up to
    half a level gap times the block's absmax (exactly, for numbers that are levels times the absmax)."""
    config = config or QuantConfig()
    check_quantizable(W, config)
    np = backend.np
    book = CODE_BOOKS[config.kind]()  # (16,) float64, sorted
    w = backend.to_numpy(W).astype(np.float64).reshape(-1, config.block)  # (n_blocks, block), on the host
    absmax = np.abs(w).max(axis=1)  # (n_blocks,): the block's scale
    scaled = w / np.where(absmax > 0, absmax, 1.0)[:, None]  # in [-1, 1]; an all-zero block stays 0
    # nearest level: the levels are sorted, so the index is the number of midpoints below the value
    codes = np.searchsorted((book[1:] + book[:-1]) / 2, scaled.reshape(-1))  # (size,) in 0..15
    absmax32 = absmax.astype(np.float32)
    scales = quantize_scales(absmax32) if config.double_quant else backend.to_device(absmax32)
    return Quantized4bit(backend.to_device(pack4(codes)), scales, backend.to_device(book.astype(np.float32)),
                         tuple(W.shape), config)


def quantize_scales(scales: Any) -> QuantizedScales:
    """(n,) positive float32 block scales -> 8 bits each, in groups of 256 (QLoRA's double quantization)."""
    np = backend.np
    mean = float(scales.mean())
    centred = scales.astype(np.float64) - mean  # around 0: the 8 bits serve both signs (the scales are all > 0)
    n_groups = -(-len(scales) // SCALE_BLOCK)
    padded = np.zeros(n_groups * SCALE_BLOCK)
    padded[: len(scales)] = centred  # the last group may be short: padded with zeros, which never set its absmax
    group_absmax = np.abs(padded.reshape(n_groups, SCALE_BLOCK)).max(axis=1)  # (n_groups,)
    unit = np.repeat(np.where(group_absmax > 0, group_absmax, 1.0), SCALE_BLOCK)[: len(scales)]
    codes = np.rint(centred / unit * 127).astype(np.int8)  # in -127..127
    return QuantizedScales(backend.to_device(codes), backend.to_device(group_absmax.astype(np.float32)), mean)


def quantize_nf4(W: Any, block: int = 64, double_quant: bool = False) -> Quantized4bit:
    """W in NormalFloat-4 with absmax blocks of ``block`` (QLoRA's data type)."""
    return quantize(W, QuantConfig("nf4", block, double_quant))


def quantize_uniform4(W: Any, block: int = 64, double_quant: bool = False) -> Quantized4bit:
    """W in 16 evenly spaced levels with absmax blocks of ``block``: the baseline NF4 is measured against."""
    return quantize(W, QuantConfig("uniform4", block, double_quant))


def stored_nbytes(size: int, config: QuantConfig) -> int:
    """The bytes ``quantize`` stores for a weight of ``size`` numbers (a multiple of ``config.block``): ½ a number of
    codes + the block scales (4 bytes each, or with double quantization 1 byte each + a float32 per group of 256
    + the float32 mean). ``Quantized4bit.nbytes`` from the size alone: the memory ledger counts 4-bit weights so."""
    n_blocks = size // config.block
    scales = n_blocks + 4 * -(-n_blocks // SCALE_BLOCK) + 4 if config.double_quant else 4 * n_blocks
    return size // 2 + scales


def dequantize(q: Quantized4bit, dtype: Any = None) -> Any:
    """``q.dequantize(dtype)``: the weight back as a float array of its shape (float32 unless ``dtype``)."""
    return q.dequantize(dtype)


def largest_gap(kind: str) -> float:
    """The widest distance between two neighbouring levels of a code book: rounding to the nearest level errs by
    at most half of it (times the block's absmax)."""
    book = CODE_BOOKS[kind]()
    return float((book[1:] - book[:-1]).max())
