"""Tests for lora_np/backend.py: the backend switch, host/device transfers, seeded randomness and scatter_add."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lora_np import backend as lora_backend
from lora_np.engine import Tensor

ROOT = Path(__file__).resolve().parents[1]


# -- switching -------------------------------------------------------------------------------------------------


def test_numpy_is_the_default():
    assert lora_backend.get_backend() == "numpy"
    assert lora_backend.xp is np


def test_the_fixture_switches_and_restores(backend, request):
    name = request.node.callspec.params["backend"]
    assert backend.get_backend() == name
    assert backend.array_module(backend.xp.zeros(2)) is backend.xp
    # the fixture's teardown puts numpy back; test_numpy_is_the_default would catch it otherwise


def test_unknown_backend_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown backend 'nope'.*'numpy'.*'cupy'"):
        lora_backend.set_backend("nope")
    assert lora_backend.get_backend() == "numpy"  # unchanged


def test_cupy_without_cupy_is_a_clear_error():
    if lora_backend.cupy_available():
        pytest.skip("CuPy and a GPU are available here")
    with pytest.raises(RuntimeError, match=r"(?i)cupy"):
        lora_backend.set_backend("cupy")
    assert lora_backend.get_backend() == "numpy"  # a failed switch leaves numpy active


def test_cupy_available_is_a_bool():
    assert isinstance(lora_backend.cupy_available(), bool)


def run_with_env(value: str, code: str = "from lora_np import backend; print(backend.get_backend())"
                 ) -> subprocess.CompletedProcess:
    """A fresh interpreter importing lora_np with LORA_NP_BACKEND=value (read once, at import)."""
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "LORA_NP_BACKEND": value, "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)


def test_env_var_selects_the_backend_at_import():
    result = run_with_env("numpy")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "numpy"


def test_env_var_with_a_bogus_name_fails_at_first_use_naming_the_valid_ones():
    """Importing must not fail (the command line could not then say in one line what is wrong): the error is kept
    and raised by the first random draw, which every model and batch needs."""
    result = run_with_env("bogus", "from lora_np import backend; print(backend.env_error)")
    assert result.returncode == 0, result.stderr
    assert "unknown backend 'bogus'" in result.stdout and "'numpy'" in result.stdout and "'cupy'" in result.stdout
    result = run_with_env("bogus", "from lora_np import GPT, GPTConfig; GPT(GPTConfig())")
    assert result.returncode != 0
    assert "RuntimeError: LORA_NP_BACKEND='bogus': unknown backend 'bogus'" in result.stderr


# -- host and device -------------------------------------------------------------------------------------------


def test_to_numpy_round_trip(backend):
    a = np.arange(6.0).reshape(2, 3)
    d = backend.to_device(a)
    assert backend.array_module(d) is backend.xp
    back = backend.to_numpy(d)
    assert isinstance(back, np.ndarray)
    np.testing.assert_array_equal(back, a)
    assert back.dtype == a.dtype


def test_to_device_with_dtype(backend):
    d = backend.to_device([1, 2, 3], dtype=np.float32)
    assert d.dtype == np.float32 and backend.array_module(d) is backend.xp


def test_array_module_of_host_data():
    assert lora_backend.array_module(np.zeros(2)) is np
    assert lora_backend.array_module(np.float64(1.0)) is np
    assert lora_backend.array_module([1.0, 2.0]) is np  # Python data counts as host data
    assert lora_backend.array_module(3.0) is np


# -- seeded randomness -----------------------------------------------------------------------------------------


def test_same_seed_same_draws(backend):
    a = backend.to_numpy(backend.randn(backend.rng(0), (3, 4)))
    b = backend.to_numpy(backend.randn(backend.rng(0), (3, 4)))
    c = backend.to_numpy(backend.randn(backend.rng(1), (3, 4)))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # drawn on the host, so bit-identical to plain NumPy on any backend
    np.testing.assert_array_equal(a, np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32))


def test_randn_shape_dtype_and_std(backend):
    w = backend.randn(backend.rng(0), (400, 250), std=0.02)
    assert w.shape == (400, 250) and w.dtype == np.float32 and backend.array_module(w) is backend.xp
    h = backend.to_numpy(w)
    assert h.std() == pytest.approx(0.02, rel=0.01)  # 100,000 draws
    assert abs(h.mean()) < 0.001
    assert backend.randn(backend.rng(0), (2, 3), dtype=np.float64).dtype == np.float64


def test_uniform_shape_dtype_and_range(backend):
    u = backend.uniform(backend.rng(0), (200, 500), low=-0.5, high=1.5)
    assert u.shape == (200, 500) and u.dtype == np.float32 and backend.array_module(u) is backend.xp
    h = backend.to_numpy(u)
    assert h.min() >= -0.5 and h.max() <= 1.5
    assert h.mean() == pytest.approx(0.5, abs=0.01)
    assert h.std() == pytest.approx(2 / np.sqrt(12), rel=0.01)  # the std of U(a, b) is (b - a)/√12
    assert backend.uniform(backend.rng(0), (3,), 0, 1, dtype=np.float64).dtype == np.float64


# -- scatter_add -----------------------------------------------------------------------------------------------


def test_scatter_add_sums_repeated_indices(backend):
    target = backend.xp.zeros(4)
    index, values = backend.to_device(np.array([0, 0, 3, 0])), backend.to_device(np.array([1.0, 2.0, 3.0, 4.0]))
    backend.scatter_add(target, index, values)
    np.testing.assert_array_equal(backend.to_numpy(target), [7.0, 0.0, 0.0, 3.0])  # plain += would give [4, 0, 0, 3]


def test_scatter_add_rows(backend):
    table = backend.xp.zeros((3, 2))
    rows = backend.to_device(np.array([1, 1, 2]))
    backend.scatter_add(table, rows, backend.to_device(np.array([[1.0, 2.0], [10.0, 20.0], [5.0, 5.0]])))
    np.testing.assert_array_equal(backend.to_numpy(table), [[0, 0], [11, 22], [5, 5]])


# -- mixing backends (needs both, so it runs only where CuPy can) ----------------------------------------------


@pytest.mark.parametrize("backend", ["cupy"], indirect=True)
def test_mixing_backends_says_so(backend):
    gpu = Tensor([1.0, 2.0], requires_grad=True)  # made while cupy is active
    backend.set_backend("numpy")
    cpu = Tensor([1.0, 2.0], requires_grad=True)
    with pytest.raises(TypeError, match="different backends"):
        cpu + gpu
    with pytest.raises(TypeError, match="different backends"):
        cpu * gpu
    with pytest.raises(TypeError, match=r"backend 'cupy' given while the active backend is 'numpy'"):
        Tensor(gpu.data)


def test_device_info_names_the_gpu_on_cupy_and_nothing_on_numpy(monkeypatch):
    assert lora_backend.device_info() == {}  # a NumPy run records its CPU only
    # CuPy's runtime answers as below (getDeviceProperties' name is bytes; versions are 1000·major + 10·minor)
    runtime = SimpleNamespace(getDeviceProperties=lambda i: {"name": b"NVIDIA H200", "totalGlobalMem": 150 * 2**30},
                              runtimeGetVersion=lambda: 12090, driverGetVersion=lambda: 13000)
    fake = SimpleNamespace(cuda=SimpleNamespace(runtime=runtime, Device=lambda: SimpleNamespace(id=0)),
                           __version__="14.2.0")
    monkeypatch.setattr(lora_backend, "xp", fake)
    assert lora_backend.device_info() == {"gpu": "NVIDIA H200", "gpu_memory_gib": 150.0, "cupy": "14.2.0",
                                          "cuda_runtime": "12.9", "cuda_driver": "13.0"}
