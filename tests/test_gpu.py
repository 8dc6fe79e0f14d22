"""The fused CuPy kernels (lora_np/gpu.py) against the NumPy reference helpers they replace, and the dispatch.

Every kernel test runs twice: "cupy", the real kernels on a GPU (skipped, with the reason, where CuPy sees none),
and "emulated", the same CUDA sources compiled for the CPU by tests/cuda_emulator.py (skipped where no C++
compiler is installed). The dispatch tests need neither: they prove which code runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import cuda_emulator
import numpy as np
import pytest

from lora_np import backend, functional, gpu, optim
from lora_np.engine import Tensor
from lora_np.lora import TARGETS, LoRAConfig, prepare_finetuning
from lora_np.model import GPT, GPTConfig


class Kernels:
    """Where the fused kernels run in a test, and how to switch them on and off there."""

    def __init__(self, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.name = name
        monkeypatch.setattr(gpu, "_built", {})  # kernels built in this test only
        if name == "emulated":
            monkeypatch.setattr(gpu, "compile_kernel", cuda_emulator.compile_kernel)

    @contextlib.contextmanager
    def fused(self, on: bool) -> Iterator[None]:
        """Run the block with the ops dispatching to the kernels (``on``) or to the reference code."""
        with pytest.MonkeyPatch.context() as mp:
            if self.name == "emulated":  # the NumPy backend, told that the kernels apply
                mp.setattr(gpu, "fused_enabled", lambda: on)
            else:
                mp.setenv(gpu.FLAG, "1" if on else "0")
            yield

    @contextlib.contextmanager
    def on_host(self) -> Iterator[None]:
        """Run the block on the NumPy backend (the reference helpers use the active backend's module)."""
        if self.name == "emulated":
            yield
            return
        backend.set_backend("numpy")
        try:
            yield
        finally:
            backend.set_backend("cupy")


@pytest.fixture(params=["emulated", "cupy"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Kernels]:
    if request.param == "emulated":
        if cuda_emulator.CXX is None:
            pytest.skip("no C++ compiler (g++) to build the kernel sources for the CPU")
        yield Kernels("emulated", monkeypatch)
        return
    if not backend.cupy_available():
        pytest.skip("CuPy with a CUDA GPU is not available")
    backend.set_backend("cupy")
    try:
        yield Kernels("cupy", monkeypatch)
    finally:
        backend.set_backend("numpy")


def _rand(gen: np.random.Generator, *shape: int, scale: float = 1.0) -> np.ndarray:
    return (gen.standard_normal(shape) * scale).astype(np.float32)


def _cases() -> dict[str, tuple[Callable[..., Any], Callable[[np.random.Generator], tuple[Any, ...]]]]:
    """name -> (reference helper, arguments on the host). The kernel is ``gpu.<name>``; the reference its twin."""
    def ln(gen, w=True, b=True):  # noqa: ANN001, ANN202
        return (_rand(gen, 3, 5, 16, scale=3.0) + 1.0, _rand(gen, 16) if w else None, _rand(gen, 16) if b else None,
                1e-5)

    def ln_back(gen, w=True, need=(True, True, True)):  # noqa: ANN001, ANN202
        out, xhat, rstd = functional._layer_norm_forward.__wrapped__(*ln(gen, w))
        return _rand(gen, *out.shape), xhat, rstd, _rand(gen, 16) if w else None, need

    def ce_back(gen):  # noqa: ANN001, ANN202
        logp = functional._log_softmax.__wrapped__(_rand(gen, 40, 11, scale=4.0), -1)
        valid = gen.random(40) > 0.25
        return logp, gen.integers(0, 11, 40), valid, np.float32(0.7), int(valid.sum())

    causal = lambda gen: (_rand(gen, 2, 3, 9, 9, scale=3.0), 0.25)  # noqa: E731
    return {
        "gelu_forward": (functional._gelu_forward, lambda gen: (_rand(gen, 4, 7, 12, scale=3.0),)),
        "gelu_backward": (functional._gelu_backward, lambda gen: (
            x := _rand(gen, 4, 7, 12, scale=3.0), functional._gelu_forward.__wrapped__(x)[1], _rand(gen, 4, 7, 12))),
        "layer_norm_forward": (functional._layer_norm_forward, ln),
        "layer_norm_forward no affine": (functional._layer_norm_forward, lambda gen: ln(gen, False, False)),
        "layer_norm_backward": (functional._layer_norm_backward, ln_back),
        "layer_norm_backward dx only": (functional._layer_norm_backward,
                                        lambda gen: ln_back(gen, need=(True, False, False))),
        "layer_norm_backward no weight": (functional._layer_norm_backward,
                                          lambda gen: ln_back(gen, w=False, need=(True, False, True))),
        "softmax": (functional._softmax, lambda gen: (_rand(gen, 6, 10, scale=5.0), -1)),
        "softmax_backward": (functional._softmax_backward, lambda gen: (
            functional._softmax.__wrapped__(_rand(gen, 6, 10), -1), _rand(gen, 6, 10), -1)),
        "causal_softmax": (functional._causal_softmax, causal),
        "causal_softmax_backward": (functional._causal_softmax_backward, lambda gen: (
            functional._causal_softmax.__wrapped__(*causal(gen)), _rand(gen, 2, 3, 9, 9), 0.25)),
        "log_softmax": (functional._log_softmax, lambda gen: (_rand(gen, 6, 10, scale=20.0), -1)),
        "cross_entropy_backward": (functional._cross_entropy_backward, ce_back),
    }


CASES = _cases()


def _as_tuple(out: Any) -> tuple[Any, ...]:
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("case", CASES)
def test_kernel_matches_its_reference(kernels: Kernels, case: str) -> None:
    reference, make = CASES[case]
    with kernels.on_host():
        args = make(np.random.default_rng(0))
        expected = _as_tuple(reference.__wrapped__(*[a.copy() if isinstance(a, np.ndarray) else a for a in args]))
    kernel = getattr(gpu, case.split()[0])
    got = _as_tuple(kernel(*[backend.to_device(a) if isinstance(a, np.ndarray) else a for a in args]))
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        if e is None:
            assert g is None
            continue
        assert g.shape == e.shape and g.dtype == e.dtype == np.float32
        np.testing.assert_allclose(backend.to_numpy(g), e, rtol=2e-5, atol=2e-6)


def test_adamw_kernel_matches_its_reference(kernels: Kernels) -> None:
    gen = np.random.default_rng(1)
    p, m, v = _rand(gen, 7, 5), np.zeros((7, 5), np.float32), np.zeros((7, 5), np.float32)
    dev = [backend.to_device(a) for a in (p, m, v)]
    for t in range(1, 6):  # five steps: the bias corrections change with t
        g = _rand(gen, 7, 5)
        with kernels.on_host():
            optim._adamw_update.__wrapped__(p, g, m, v, 3e-2, 0.1, (0.9, 0.999), 1e-8, t)
        assert gpu.adamw_update(*dev[:1], backend.to_device(g), *dev[1:], 3e-2, 0.1, (0.9, 0.999), 1e-8, t) is None
    for d, h in zip(dev, (p, m, v)):  # updated in place, like the reference
        np.testing.assert_allclose(backend.to_numpy(d), h, rtol=1e-5, atol=1e-7)


def _train(mode: LoRAConfig | None, steps: int = 2) -> tuple[list[float], dict[str, np.ndarray]]:
    """Losses of ``steps`` AdamW steps of a small GPT and its trainable parameters after them (on the host)."""
    cfg = GPTConfig(vocab_size=23, block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    model = prepare_finetuning(GPT(cfg), mode)
    opt = optim.AdamW(model.trainable_parameters(), lr=1e-2)
    gen = np.random.default_rng(3)
    x, y = gen.integers(0, 23, (4, 8)), gen.integers(0, 23, (4, 8))
    y[0, :3] = -100  # ignored positions: the kernel's mask
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        losses.append(float(backend.to_numpy(loss.data)))
    return losses, {n: backend.to_numpy(p.data) for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("mode", [None, LoRAConfig(r=2, alpha=4.0, targets=TARGETS)], ids=["full", "lora"])
def test_training_with_the_kernels_matches_the_reference(kernels: Kernels, mode: LoRAConfig | None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    used: list[str] = []
    build = gpu._kernel
    monkeypatch.setattr(gpu, "_kernel", lambda spec: used.append(spec.name) or build(spec))
    with kernels.fused(False):
        losses, params = _train(mode)
    assert used == []  # switched off, no kernel runs
    with kernels.fused(True):
        fused_losses, fused_params = _train(mode)
    np.testing.assert_allclose(fused_losses, losses, rtol=1e-5)
    for name in params:  # Adam divides by √v: a gradient near 0 turns float32 rounding into up to ~1e-3 of a step
        np.testing.assert_allclose(fused_params[name], params[name], rtol=1e-4, atol=1e-3 * 1e-2, err_msg=name)
    # every op of a GPT step went through its kernels: the dispatch is wired everywhere it should be
    specs = {v.name for v in vars(gpu).values() if isinstance(v, (gpu.Elementwise, gpu.Reduction))}
    assert set(used) == specs | {gpu._row_rstd(1e-5).name}


# ---------------------------------------------------------------------------------------------------- the dispatch
def _no_kernels(spec: Any) -> Any:
    raise AssertionError(f"kernel {spec.name} built where the reference should run")


def test_the_numpy_backend_never_runs_a_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gpu, "_kernel", _no_kernels)
    assert backend.get_backend() == "numpy" and not gpu.fused_enabled()
    _train(LoRAConfig(r=2, alpha=4.0, targets=TARGETS), steps=1)


@pytest.mark.parametrize("why", ["float64", "not the last axis", "switched off"])
def test_the_reference_runs_where_the_kernels_do_not_apply(monkeypatch: pytest.MonkeyPatch, why: str) -> None:
    monkeypatch.setattr(gpu, "_kernel", _no_kernels)
    monkeypatch.setattr(gpu, "fused_enabled", lambda: why != "switched off")
    gen = np.random.default_rng(0)
    x = gen.standard_normal((3, 4)).astype(np.float64 if why == "float64" else np.float32)
    if why == "not the last axis":
        y = functional.softmax(Tensor(x, requires_grad=True), axis=0)
        np.testing.assert_allclose(y.data.sum(axis=0), 1.0, rtol=1e-6)
    else:
        y = functional.gelu(Tensor(x, requires_grad=True))
        assert y.dtype == x.dtype
    y.sum().backward()


def test_the_flag_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(gpu.FLAG, "yes")
    assert gpu.flag_error() == "LORA_NP_FUSED='yes': expected '0' (reference code) or '1' (fused kernels on CuPy)"
    assert not gpu.fused_enabled()  # on NumPy the flag is never read: the command line reports it before work
    monkeypatch.setattr(backend, "get_backend", lambda: "cupy")
    with pytest.raises(ValueError, match="LORA_NP_FUSED='yes'"):
        gpu.fused_enabled()
    monkeypatch.setenv(gpu.FLAG, "0")
    assert gpu.flag_error() == "" and not gpu.fused_enabled()


def test_kernel_sources_name_their_constants_exactly() -> None:
    assert gpu._f(gpu.GELU_C) == "0.7978845608028654f" and gpu._f(1e-5) == "1e-05f" and gpu._f(1) == "1.0f"
    assert float(gpu._f(gpu.GELU_C)[:-1]) == gpu.GELU_C
