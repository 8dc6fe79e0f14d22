"""Run lora_np/gpu.py's CUDA kernel sources on the CPU: the same source text, compiled by the host's C++ compiler.

A machine without a GPU cannot run a CuPy kernel, but the body of an ``ElementwiseKernel`` or a ``ReductionKernel``
is plain C++ over the element's inputs. This module wraps each body in a loop with CuPy's semantics and builds it
with ``g++``, so the kernels' arithmetic, their argument order and their use in the ops are tested everywhere:

- elementwise: non-raw inputs and the outputs broadcast together (NumPy's rules, as CuPy's); ``i`` is the flat index;
  ``raw`` inputs are passed whole, indexed by hand; outputs are references, so a body may read and update them;
  given outputs are written in place, missing ones are allocated;
- reduction: the inputs broadcast together, ``a`` starts at ``identity`` and takes ``reduce_expr`` of itself and
  ``b`` (the ``map_expr`` of each element) along ``axis``; then ``post_map_expr`` writes the output;
  ``_in_ind.size() / _out_ind.size()`` is the number of elements per output, as in CuPy.

What this cannot check: the launch itself (grid, streams), CuPy's own type rules for Python scalars, and NVRTC's
dialect; tests/test_gpu.py runs the real kernels where a GPU exists.
"""

from __future__ import annotations

import ctypes
import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from lora_np.gpu import Elementwise, Reduction

CXX = shutil.which("g++") or shutil.which("c++")
C_TYPES = {"float32": "float", "float64": "double", "int64": "long long", "int32": "int", "bool": "bool"}
PRELUDE = """#include <math.h>
struct Ind { long long n; long long size() const { return n; } };
"""


def _params(text: str) -> list[tuple[bool, str, str]]:
    """'float32 x, raw int64 t' -> [(False, 'float32', 'x'), (True, 'int64', 't')]."""
    out = []
    for part in text.split(","):
        words = part.split()
        raw = words[0] == "raw"
        out.append((raw, words[-2], words[-1]))
    return out


def _build(source: str, name: str) -> Any:
    """The function ``name`` of ``source`` compiled into a shared library (cached by the source's hash)."""
    folder = Path(tempfile.gettempdir()) / "lora_np_cuda_emulator"
    folder.mkdir(exist_ok=True)
    lib = folder / f"{name}_{hashlib.sha256(source.encode()).hexdigest()[:16]}.so"
    if not lib.exists():
        src = lib.with_suffix(".cpp")
        src.write_text(source)
        tmp = lib.with_suffix(".tmp")
        subprocess.run([CXX, "-O2", "-shared", "-fPIC", "-o", str(tmp), str(src)], check=True, capture_output=True)
        tmp.replace(lib)
    fn = getattr(ctypes.CDLL(str(lib)), name)
    fn.restype = None
    return fn


def _pointers(arrays: list[np.ndarray]) -> Any:
    return (ctypes.c_void_p * len(arrays))(*[a.ctypes.data for a in arrays])


class _ElementwiseKernel:
    def __init__(self, spec: Elementwise) -> None:
        self.ins, self.outs = _params(spec.in_params), _params(spec.out_params)
        lines = []
        for k, (raw, dtype, name) in enumerate(self.ins):
            ctype = C_TYPES[dtype]
            if raw:
                lines.append(f"const {ctype}* {name} = (const {ctype}*)args[{k}];")
            else:
                lines.append(f"const {ctype} {name} = ((const {ctype}*)args[{k}])[i];")
        for k, (_, dtype, name) in enumerate(self.outs, start=len(self.ins)):
            lines.append(f"{C_TYPES[dtype]}& {name} = (({C_TYPES[dtype]}*)args[{k}])[i];")
        source = (PRELUDE + f'extern "C" void {spec.name}(long long n, void** args) {{\n'
                  "  Ind _ind{n};\n  for (long long i = 0; i < n; ++i) {\n    " + "\n    ".join(lines)
                  + f"\n    {{ {spec.body} }}\n  }}\n}}\n")
        self.fn = _build(source, spec.name)

    def __call__(self, *args: Any) -> Any:
        ins, outs = args[: len(self.ins)], list(args[len(self.ins):])
        if outs and len(outs) != len(self.outs):
            raise TypeError("give every output or none")
        shape = np.broadcast_shapes(*(np.shape(a) for a, (raw, _, _) in zip(ins, self.ins) if not raw),
                                    *(o.shape for o in outs))
        host = []
        for a, (raw, dtype, _) in zip(ins, self.ins):
            a = np.asarray(a, dtype=dtype)
            host.append(np.ascontiguousarray(a.reshape(-1) if raw else np.broadcast_to(a, shape)))
        given = outs
        outs = [np.ascontiguousarray(o) for o in outs] or [np.empty(shape, dtype) for _, dtype, _ in self.outs]
        for o, (_, dtype, _) in zip(outs, self.outs):
            assert o.dtype == dtype and o.shape == shape, (o.dtype, o.shape)
        self.fn(ctypes.c_longlong(int(np.prod(shape))), _pointers(host + outs))
        for g, o in zip(given, outs):
            if g is not o:  # a non-contiguous output was copied: write the result back into it
                g[...] = o
        results = given or outs
        return results[0] if len(results) == 1 else tuple(results)


class _ReductionKernel:
    def __init__(self, spec: Reduction) -> None:
        self.ins, self.outs = _params(spec.in_params), _params(spec.out_params)
        (_, out_dtype, out_name), = self.outs
        self.out_dtype = out_dtype
        ctype = C_TYPES[out_dtype]
        loads = [f"const {C_TYPES[d]} {n} = ((const {C_TYPES[d]}*)args[{k}])[r * K + j];"
                 for k, (_, d, n) in enumerate(self.ins)]
        source = (PRELUDE + f'extern "C" void {spec.name}(long long rows, long long K, void** args) {{\n'
                  "  Ind _in_ind{rows * K}, _out_ind{rows};\n  for (long long r = 0; r < rows; ++r) {\n"
                  f"    {ctype} a = ({ctype})({spec.identity});\n    for (long long j = 0; j < K; ++j) {{\n"
                  "      " + "\n      ".join(loads) + f"\n      {ctype} b = ({ctype})({spec.map_expr});\n"
                  f"      a = ({spec.reduce_expr});\n    }}\n"
                  f"    {ctype}& {out_name} = (({ctype}*)args[{len(self.ins)}])[r];\n"
                  f"    {spec.post_map_expr};\n  }}\n}}\n")
        self.fn = _build(source, spec.name)

    def __call__(self, *args: Any, axis: int, keepdims: bool = False) -> np.ndarray:
        arrays = [np.asarray(a, dtype=d) for a, (_, d, _) in zip(args, self.ins)]
        shape = np.broadcast_shapes(*(a.shape for a in arrays))
        axis = axis % len(shape)
        rows_shape = shape[:axis] + shape[axis + 1:]
        host = [np.ascontiguousarray(np.moveaxis(np.broadcast_to(a, shape), axis, -1)).reshape(-1, shape[axis])
                for a in arrays]
        out = np.empty(rows_shape, self.out_dtype)
        rows = int(np.prod(rows_shape))
        self.fn(ctypes.c_longlong(rows), ctypes.c_longlong(shape[axis]), _pointers(host + [out]))
        return np.expand_dims(out, axis) if keepdims else out


def compile_kernel(spec: Elementwise | Reduction) -> Any:
    """The CPU stand-in for ``gpu.compile_kernel``: a callable with the CuPy kernel's calling convention."""
    return _ElementwiseKernel(spec) if isinstance(spec, Elementwise) else _ReductionKernel(spec)
