"""Shared fixtures: the array backend as a test parameter, and random float64 tensors for gradchecks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import ModuleType

import numpy as np
import pytest

from lora_np import backend as _backend
from lora_np.engine import Tensor


@pytest.fixture(params=["numpy", "cupy"])
def backend(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    """``lora_np.backend`` with the requested array module active. CuPy is skipped (never faked) where it cannot
    run, and the NumPy backend is restored afterwards whatever the test did."""
    if request.param == "cupy" and not _backend.cupy_available():
        pytest.skip("CuPy with a usable CUDA device is not available")
    _backend.set_backend(request.param)
    try:
        yield _backend
    finally:
        _backend.set_backend("numpy")


@pytest.fixture
def rand() -> Callable[..., Tensor]:
    """``rand(*shape, domain="real", requires_grad=True)``: a float64 Tensor of random values on the active
    backend. ``domain`` keeps the values where an op is smooth: "real" (standard normal), "positive" (in
    [0.5, 2.5], for log, sqrt and denominators) or "away0" (|x| >= 0.2, for relu's kink and 1/x).
    Each test gets its own seeded stream, so the values are the same on every run."""
    gen = np.random.default_rng(0)

    def make(*shape: int, domain: str = "real", requires_grad: bool = True) -> Tensor:
        a = gen.standard_normal(shape)
        if domain == "positive":
            a = gen.uniform(0.5, 2.5, size=shape)
        elif domain == "away0":
            a = np.sign(a + (a == 0)) * (np.abs(a) + 0.2)
        elif domain != "real":
            raise ValueError(f"unknown domain {domain!r}")
        return Tensor(_backend.to_device(a), requires_grad=requires_grad, dtype=np.float64)

    return make
