"""The array backend: the one module of lora_np that imports numpy (and cupy, when asked).

Everything else asks this module for the active array module, ``backend.xp``, at call time (never
``from lora_np.backend import xp``, which would freeze the choice at import). NumPy runs everywhere; CuPy is
an optional GPU backend with the same array API, chosen by ``set_backend("cupy")`` or by the environment
variable ``LORA_NP_BACKEND=cupy`` read once at import.

Random numbers are always drawn on the host with NumPy's ``Generator`` and then moved to the device, so one
seed gives bit-identical initial weights on both backends (CuPy's own generators produce other streams).
"""

from __future__ import annotations

import os
from typing import Any

import numpy

np = numpy  # the host array module: data loading, files and anything that must stay on the CPU
xp: Any = numpy  # the active array module (numpy or cupy); read it as backend.xp at call time
DEFAULT_DTYPE = numpy.float32  # what Tensor uses for Python numbers and lists; float64 only where asked

_NAMES = ("numpy", "cupy")


def set_backend(name: str) -> None:
    """Make ``name`` ("numpy" or "cupy") the active array module. A missing CuPy or GPU is a clear error."""
    global xp
    if name not in _NAMES:
        raise ValueError(f"unknown backend {name!r}; expected one of {_NAMES}")
    if name == "numpy":
        xp = numpy
        return
    try:
        import cupy
    except ImportError as e:  # no wheel installed
        raise RuntimeError("backend 'cupy' asked for, but CuPy is not installed (pip install cupy-cuda12x)") from e
    try:
        n_gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDA driver missing or broken
        raise RuntimeError(f"backend 'cupy' asked for, but no CUDA device is usable: {e}") from e
    if n_gpus == 0:
        raise RuntimeError("backend 'cupy' asked for, but no CUDA device was found")
    xp = cupy


def get_backend() -> str:
    """The name of the active backend: "numpy" or "cupy"."""
    return "numpy" if xp is numpy else "cupy"


def device_info() -> dict[str, Any]:
    """The GPU the CuPy backend runs on: its name and memory, the CuPy, CUDA runtime and driver versions ({} on NumPy).

    Results files record it next to the CPU, so that a number says which device made it.
    """
    if xp is numpy:
        return {}
    runtime = xp.cuda.runtime
    props = runtime.getDeviceProperties(xp.cuda.Device().id)
    name = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
    version = lambda v: f"{v // 1000}.{v % 1000 // 10}"  # noqa: E731  CUDA's 12040 -> "12.4"
    return {"gpu": name, "gpu_memory_gib": round(props["totalGlobalMem"] / 2**30, 1), "cupy": xp.__version__,
            "cuda_runtime": version(runtime.runtimeGetVersion()), "cuda_driver": version(runtime.driverGetVersion())}


def cupy_available() -> bool:
    """True when CuPy imports and sees at least one GPU (tests use it to skip, not fake, the GPU backend)."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def array_module(x: Any) -> Any:
    """The module (numpy or cupy) that owns array ``x``."""
    return numpy if isinstance(x, (numpy.ndarray, numpy.generic)) else _cupy_of(x)


def _cupy_of(x: Any) -> Any:
    mod = type(x).__module__.split(".")[0]
    if mod == "cupy":
        import cupy

        return cupy
    return numpy  # Python scalars and lists count as host data


def to_numpy(x: Any) -> numpy.ndarray:
    """A host NumPy copy-or-view of ``x`` (a NumPy array, a CuPy array, or anything array-like)."""
    if array_module(x) is numpy:
        return numpy.asarray(x)
    return x.get()


def to_device(x: Any, dtype: Any = None) -> Any:
    """``x`` as an array of the active backend (moved to the GPU when that is CuPy)."""
    return xp.asarray(x, dtype=dtype)


def rng(seed: int | None) -> numpy.random.Generator:
    """A host random generator: the single source of randomness for weights, dropout masks and batches."""
    if env_error:
        raise RuntimeError(env_error)
    return numpy.random.default_rng(seed)


def randn(gen: numpy.random.Generator, shape: tuple[int, ...], std: float = 1.0, dtype: Any = None) -> Any:
    """Gaussian N(0, std²) drawn on the host from ``gen``, moved to the active backend."""
    dtype = dtype or DEFAULT_DTYPE
    return to_device((gen.standard_normal(shape) * std).astype(dtype))


def uniform(gen: numpy.random.Generator, shape: tuple[int, ...], low: float, high: float, dtype: Any = None) -> Any:
    """Uniform U(low, high) drawn on the host from ``gen``, moved to the active backend."""
    dtype = dtype or DEFAULT_DTYPE
    return to_device(gen.uniform(low, high, size=shape).astype(dtype))


def scatter_add(target: Any, index: Any, values: Any) -> None:
    """``target[index] += values`` with repeated indices summed (numpy's ``add.at``; cupyx's scatter_add)."""
    if array_module(target) is numpy:
        numpy.add.at(target, index, values)
    else:
        import cupyx

        cupyx.scatter_add(target, index, values)


# LORA_NP_BACKEND is read once, here. A bad value must not make `import lora_np` fail (the command line could not
# then say what is wrong in one line), so the error is kept in env_error: the command line reports it before any
# work, and rng(), which every model and batch needs, raises it for library users.
env_error = ""
_env = os.environ.get("LORA_NP_BACKEND")
if _env:
    try:
        set_backend(_env)
    except (ValueError, RuntimeError) as e:
        env_error = f"LORA_NP_BACKEND={_env!r}: {e}"
