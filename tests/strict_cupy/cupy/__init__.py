"""A strict stand-in for CuPy on the CPU: a development aid for machines without a GPU.

    PYTHONPATH=tests/strict_cupy python -m pytest tests -k cupy       # the CuPy variants of the suite
    PYTHONPATH=tests/strict_cupy python -m lora_np finetune --quick --backend cupy

Its arrays hold NumPy arrays but behave like CuPy's where lora_np can go wrong on a GPU: NumPy will not take them
(``np.asarray`` raises, as CuPy's ``__array__`` does), they will not mix with NumPy arrays in an operation, an index
or an assignment, reductions return 0-d arrays, ``.get()`` copies to the host, and ``type(x).__module__`` is cupy's.
``ElementwiseKernel`` and ``ReductionKernel`` build the kernel sources with the host's C++ compiler
(tests/cuda_emulator.py). It finds host/device mixing; it proves nothing about a GPU: no streams, no memory pool
(the memory hook never fires, so measured device bytes read 0), no NVRTC, NumPy's rounding. So the test suite's CuPy
variants never use it (without a GPU they skip); only benchmarks/count_launches.py runs on it, which counts the device
operations a step asks for (``calls``).
"""
import sys as _sys
import types as _types
from collections import Counter as _Counter
from pathlib import Path as _Path

import numpy as _np
from numpy.lib.mixins import NDArrayOperatorsMixin as _Mixin

__version__ = "0.0-strict-stand-in"
calls: _Counter = _Counter()  # array operations by name ("ufunc:add", "method:sum", "kernel:lora_np_adamw", ...)


class ndarray(_Mixin):
    __slots__ = ("_a",)
    __array_priority__ = 100

    def __init__(self, a):
        assert isinstance(a, (_np.ndarray, _np.generic)), type(a)
        self._a = _np.asarray(a) if isinstance(a, _np.generic) else a

    def __array__(self, *a, **k):
        raise TypeError("Implicit conversion to a NumPy array is not allowed. "
                        "Please use `.get()` to construct a NumPy array explicitly.")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        calls[f"ufunc:{ufunc.__name__}" + ("" if method == "__call__" else f".{method}")] += 1
        _strict(inputs)
        if "out" in kwargs:
            _strict(kwargs["out"])
            kwargs["out"] = tuple(_un(o) for o in kwargs["out"])
        return _wrap(getattr(ufunc, method)(*[_un(i) for i in inputs], **kwargs))

    def __array_function__(self, func, types, args, kwargs):
        calls[f"function:{func.__name__}"] += 1
        _strict((args, kwargs))
        return _wrap(func(*_un(args), **_un(kwargs)))

    def __deepcopy__(self, memo):
        return ndarray(self._a.copy())

    def __copy__(self):
        return ndarray(self._a.copy())

    def get(self, *a, **k):
        return self._a.copy()

    def __getattr__(self, name):
        attr = getattr(self._a, name)
        if callable(attr):
            def method(*args, **kwargs):
                calls[f"method:{name}"] += 1
                _strict((args, kwargs))
                return _wrap(attr(*_un(args), **_un(kwargs)))
            return method
        return _wrap(attr) if isinstance(attr, _np.ndarray) else attr

    @property
    def T(self):
        return ndarray(self._a.T)

    @property
    def real(self):
        return ndarray(self._a.real)

    def __getitem__(self, idx):
        calls["getitem"] += 1
        _strict(idx)
        return _wrap(self._a[_un(idx)])

    def __setitem__(self, idx, value):
        calls["setitem"] += 1
        _strict((idx, value))
        self._a[_un(idx)] = _un(value)

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (_wrap(x) for x in self._a)

    def __float__(self):
        return float(self._a)

    def __int__(self):
        return int(self._a)

    def __bool__(self):
        return bool(self._a)

    def __index__(self):
        return self._a.__index__()

    def __complex__(self):
        return complex(self._a)

    def __repr__(self):
        return "fakecupy." + repr(self._a)

    def __format__(self, spec):
        return format(self._a, spec)

    __hash__ = None

    def __dlpack__(self, *a, **k):
        raise TypeError("no dlpack in the fake")

    def __reduce__(self):
        raise TypeError("no pickling in the fake")


ndarray.__module__ = "cupy._core.core"


def _strict(x):
    if isinstance(x, _np.ndarray):
        raise TypeError(f"Unsupported type {type(x)} (a NumPy array given to a CuPy operation)")
    if isinstance(x, (list, tuple)):
        for v in x:
            _strict(v)
    elif isinstance(x, dict):
        for v in x.values():
            _strict(v)


def _un(x):
    if isinstance(x, ndarray):
        return x._a
    if isinstance(x, tuple):
        return tuple(_un(v) for v in x)
    if isinstance(x, list):
        return [_un(v) for v in x]
    if isinstance(x, dict):
        return {k: _un(v) for k, v in x.items()}
    return x


def _wrap(x):
    if isinstance(x, _np.ndarray):
        return ndarray(x)
    if isinstance(x, tuple):
        return tuple(_wrap(v) for v in x)
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    if isinstance(x, _np.generic) and not isinstance(x, (_np.str_, _np.bytes_)):
        return ndarray(_np.asarray(x))  # CuPy reductions return 0-d arrays, not scalars
    return x


def asarray(a, dtype=None, order=None, **kw):
    if isinstance(a, ndarray):
        return ndarray(_np.asarray(a._a, dtype=dtype, order=order))
    return ndarray(_np.array(_un(a), dtype=dtype, order=order, copy=True))


def array(a, dtype=None, copy=True, order="K", **kw):
    if isinstance(a, ndarray):
        return ndarray(_np.array(a._a, dtype=dtype, copy=copy, order=order))
    return ndarray(_np.array(_un(a), dtype=dtype, order=order, copy=True))


def asnumpy(a, *k, **kw):
    return a.get() if isinstance(a, ndarray) else _np.asarray(a)


def ascontiguousarray(a, dtype=None):
    _strict(a)
    return ndarray(_np.ascontiguousarray(_un(a), dtype=dtype))


def _wrap_function(f):
    def g(*args, **kwargs):
        calls[f"function:{getattr(f, '__name__', 'f')}"] += 1
        _strict((args, kwargs))
        return _wrap(f(*_un(args), **_un(kwargs)))
    g.__name__ = getattr(f, "__name__", "f")
    return g


def _wrapped(attr):
    """NumPy's functions and ufuncs as the stand-in's (strict on their arguments, wrapping their results)."""
    return _wrap_function(attr) if callable(attr) and not isinstance(attr, type) else attr


class _Namespace(_types.ModuleType):
    def __init__(self, name, target):
        super().__init__(name)
        self._target = target

    def __getattr__(self, name):
        return _wrapped(getattr(self._target, name))


linalg = _Namespace("cupy.linalg", _np.linalg)  # optim.clip_grad_norm's xp.linalg.norm


def __getattr__(name):
    return _wrapped(getattr(_np, name))


# --- cuda ---------------------------------------------------------------------------------------------
class _Runtime:
    @staticmethod
    def getDeviceCount():
        return 1

    @staticmethod
    def getDeviceProperties(i):
        return {"name": b"tests/strict_cupy (no GPU)", "totalGlobalMem": 0}

    @staticmethod
    def driverGetVersion():
        return 0

    @staticmethod
    def runtimeGetVersion():
        return 0


class _Device:
    def __init__(self, i=0):
        self.id = i

    def synchronize(self):
        pass


class MemoryHook:
    name = "fake"

    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


cuda = _types.SimpleNamespace(runtime=_Runtime, Device=_Device, MemoryHook=MemoryHook,
                              get_current_stream=lambda: _types.SimpleNamespace(synchronize=lambda: None))


def show_config():
    print("tests/strict_cupy: a CPU stand-in for CuPy, no GPU")


def _emulated(kind):
    tests = str(_Path(__file__).resolve().parents[2])  # tests/, where cuda_emulator.py lives
    if tests not in _sys.path:
        _sys.path.insert(0, tests)
    import cuda_emulator

    from lora_np.gpu import Elementwise, Reduction

    class K:
        def __init__(self, *spec):
            if kind == "e":
                in_p, out_p, body, name = spec[:4]
                self.name = name
                self.k = cuda_emulator.compile_kernel(Elementwise(name, in_p, out_p, body))
            else:
                in_p, out_p, m, r, post, ident, name = spec[:7]
                self.name = name
                self.k = cuda_emulator.compile_kernel(Reduction(name, in_p, out_p, m, r, post, ident))

        def __call__(self, *args, **kw):
            calls[f"kernel:{self.name}"] += 1
            _strict(args)
            return _wrap(self.k(*_un(args), **kw))
    return K


ElementwiseKernel = _emulated("e")
ReductionKernel = _emulated("r")
