"""The activations counted from the graph itself: what the engine keeps alive between forward and backward.

After a forward pass (before backward), every graph node holds its inputs (``_parents``) and whatever arrays its
``backward`` closure captured (engine.py, ``Tensor.from_op``). ``graph_bytes(loss)`` walks the nodes in the
engine's own order (``_topological_order``) and adds up those arrays, each buffer once: a view (a transpose, a
reshape, a slice) shares its base's memory, so arrays are grouped by the buffer that owns the memory. Left out, as
in the ledger: the parameters (counted as weights) and the batch (it exists before the step), both given in
``exclude`` (a frozen parameter may reach the graph only through a view, as the tied head's ``wte.weight.T``
under LoRA, so the graph alone cannot tell), and 0-d scalars (a few bytes each: 1/√hs, -inf, lifted numbers).

Each buffer is charged to the op that made it: the node whose output it is (``"add"``, ``"gelu"``...), an op's
own array that its closure keeps (layer_norm's xhat, the attention weights, cross_entropy's log-probs), or
``"no-grad input"`` for an input made outside the graph (the positions ``arange(T)``; under LoRA, block 0's input).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ..engine import Tensor, _topological_order
from ..nn import Parameter

NO_GRAD = "no-grad input"  # an input of a graph op that was made outside the graph


@dataclass
class GraphBytes:
    """What the graph of one forward pass keeps: ``total`` bytes, and the same split by the op that made them."""

    total: int = 0
    by_op: dict[str, int] = field(default_factory=dict)


def graph_bytes(loss: Tensor, exclude: Iterable[Any] = ()) -> GraphBytes:
    """The bytes the graph behind ``loss`` keeps alive: every node's inputs and the arrays its backward closure
    captured, each buffer once; the parameters and arrays in ``exclude`` (the model's parameters, the batch),
    any other parameter the graph reaches, and 0-d arrays left out. Call it after the forward pass and before
    ``backward()``, which frees the graph as it goes."""
    skip: set[int] = set()
    stack = list(exclude)
    while stack:  # a batch may come as a tuple, (ids, mask) for BERT
        a = stack.pop()
        if isinstance(a, (tuple, list)):
            stack.extend(a)
        elif not hasattr(a, "quantized"):  # a 4-bit weight's .data is a fresh array: nothing to skip
            skip.add(id(_owner(a.data if isinstance(a, Tensor) else a)))
    made_by: dict[int, str] = {}  # buffer -> the op whose output it is
    kept: dict[int, tuple[Any, str]] = {}  # buffer -> (the buffer, the op a closure captured it in)
    for node in _topological_order(loss):
        for t in (node, *node._parents):
            if isinstance(t, Parameter):
                if not hasattr(t, "quantized"):  # a 4-bit weight's .data is a fresh array: nothing to skip
                    skip.add(id(_owner(t.data)))
                continue
            # the first claim is the maker's: each node comes before the nodes that read it (or its views)
            made_by.setdefault(id(_owner(t.data)), t._op or NO_GRAD)
        for arr in (*(p.data for p in node._parents if not isinstance(p, Parameter)),
                    *_captured_arrays(node._backward)):
            owner = _owner(arr)
            kept.setdefault(id(owner), (owner, node._op))
    result = GraphBytes()
    for key, (owner, op) in kept.items():
        if key in skip or owner.ndim == 0:
            continue
        op = made_by.get(key, op)
        result.total += owner.nbytes
        result.by_op[op] = result.by_op.get(op, 0) + owner.nbytes
    return result


def _owner(arr: Any) -> Any:
    """The array that owns ``arr``'s memory: a view's base, followed to its end."""
    while getattr(arr, "base", None) is not None and hasattr(arr.base, "nbytes"):
        arr = arr.base
    return arr


def _captured_arrays(fn: Any) -> Iterator[Any]:
    """The arrays a backward closure holds: in its cells, inside tuples, lists, dicts (fused_linear's parts and h)
    and in Tensors other than parameters. Functions, modules and numbers hold none we count."""
    stack = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            stack.append(cell.cell_contents)
        except ValueError:  # a cell not yet assigned
            pass
    seen: set[int] = set()
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, Parameter):
            continue
        if isinstance(v, Tensor):
            stack.append(v.data)
        elif isinstance(v, (tuple, list)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
        elif hasattr(v, "nbytes") and hasattr(v, "dtype") and hasattr(v, "shape"):
            yield v

