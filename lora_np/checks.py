"""Field rules: one check per kind of value, shared by every config (``GPTConfig``, ``TrainConfig``, ``LoRAConfig``,
``BertConfig``, ``ExperimentConfig``, ``RunSpec``, ``StudyConfig``, ``PlantedConfig``, ``MiniLMConfig``) and by the
functions that take loose arguments (``data.BatchSampler``, ``GPT.generate``, ...).

Each rule takes the value and ``what`` (the field's name as the reader wrote it, e.g. ``"GPTConfig.n_layer"``),
returns the value when it is good (integers as Python ints, tuples as tuples) and otherwise raises a ValueError
(a ``FieldError``) in one format::

    GPTConfig.n_layer must be a positive integer, got 0

Integers may be Python's or NumPy's (``np.int64(4)`` is a rank like 4) but never a bool: ``True`` is an int in
Python, and ``n_layer=True`` is a mistake, not one layer. Numbers are any real number but a bool; NaN fails
every range (every comparison with NaN is False), and "finite" refuses the infinities too.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Collection, Iterable
from typing import Any, NoReturn, TypeVar

T = TypeVar("T")


class FieldError(ValueError):
    """A value that breaks its field's rule; the message is ``{what} must be {kind}, got {value!r}``."""

    def __init__(self, what: str, kind: str, value: Any) -> None:
        super().__init__(f"{what} must be {kind}, got {value!r}")
        self.what, self.kind, self.value = what, kind, value


def refuse(what: str, kind: str, value: Any) -> NoReturn:
    """Raise the one error of every rule."""
    raise FieldError(what, kind, value)


def is_int(value: Any) -> bool:
    """An integer, Python's or NumPy's; never True or False."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """A real number (int, float, NumPy's); never True or False."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def fields(config: Any, rule: Callable[[Any, str], Any], *names: str) -> None:
    """Check each named field of ``config`` (a dataclass, frozen or not) by ``rule`` and store what the rule
    returns: ``checks.fields(self, checks.positive_int, "n_layer", "n_head")``. Messages name ``Class.field``."""
    for name in names:
        object.__setattr__(config, name, rule(getattr(config, name), f"{type(config).__name__}.{name}"))


# -- integers ------------------------------------------------------------------------------------------------------


def integer(value: Any, what: str, low: int = 0, high: int | None = None, why: str = "") -> int:
    """An integer in [low, high] (no upper end when ``high`` is None), as a Python int. ``why`` follows the range
    in the message: ``"(MiniLM's positions)"``."""
    if high is not None:
        kind = f"an integer in [{low}, {high}]"
    else:
        kind = {0: "a non-negative integer", 1: "a positive integer"}.get(low, f"an integer >= {low}")
    if not is_int(value) or value < low or (high is not None and value > high):
        refuse(what, kind + (f" {why}" if why else ""), value)
    return int(value)


def positive_int(value: Any, what: str) -> int:
    """A size or a count: an integer >= 1."""
    return integer(value, what, low=1)


def nonnegative_int(value: Any, what: str) -> int:
    """A seed or a number of warmup steps: an integer >= 0."""
    return integer(value, what, low=0)


# -- numbers -------------------------------------------------------------------------------------------------------


def positive_number(value: Any, what: str, at_most: float | None = None) -> Any:
    """A learning rate, a scale, a temperature: a finite number > 0 (and <= ``at_most`` when given)."""
    ok = is_real(value) and math.isfinite(value) and value > 0 and (at_most is None or value <= at_most)
    if not ok:
        refuse(what, "a finite number > 0" + (f", at most {at_most:g}" if at_most is not None else ""), value)
    return value


def nonnegative_number(value: Any, what: str) -> Any:
    """A weight decay, a clipping norm (0: off): a finite number >= 0."""
    if not (is_real(value) and math.isfinite(value) and value >= 0):
        refuse(what, "a finite number >= 0", value)
    return value


def probability(value: Any, what: str) -> Any:
    """A dropout probability: a number in [0, 1) (p = 1 would drop everything)."""
    if not (is_real(value) and 0 <= value < 1):
        refuse(what, "a number in [0, 1)", value)
    return value


def fraction(value: Any, what: str) -> Any:
    """A number strictly between 0 and 1: a share of a data set, LayerNorm's epsilon."""
    if not (is_real(value) and 0 < value < 1):
        refuse(what, "a number in (0, 1)", value)
    return value


def rate_grid(value: Any, what: str, at_least: int = 2) -> tuple[float, ...]:
    """A learning-rate grid (``runs.search_lr``): a list or tuple of ``at_least`` or more distinct finite numbers
    > 0, returned as a tuple."""
    grid = tuple(value) if isinstance(value, (list, tuple)) else value
    if not isinstance(grid, tuple) or len(grid) < at_least or len(set(grid)) != len(grid) or not all(
            is_real(v) and math.isfinite(v) and v > 0 for v in grid):
        refuse(what, f"at least {at_least} distinct finite numbers > 0", value)
    return grid


# -- other kinds ---------------------------------------------------------------------------------------------------


def flag(value: Any, what: str) -> bool:
    """True or False, nothing that merely converts to one (1, "yes")."""
    if not isinstance(value, bool):
        refuse(what, "True or False", value)
    return value


def choice(value: Any, what: str, options: Collection[str]) -> str:
    """One of ``options``."""
    if not isinstance(value, str) or value not in options:
        refuse(what, f"one of {list(options)}", value)
    return value


def instance(value: Any, what: str, cls: type) -> Any:
    """An object of class ``cls``: a config nested in another (``ExperimentConfig.model`` is a ``GPTConfig``)."""
    if not isinstance(value, cls):
        refuse(what, f"{'an' if cls.__name__[0].lower() in 'aeiou' else 'a'} {cls.__name__}", value)
    return value


def nonempty_str(value: Any, what: str) -> str:
    """A name, a prompt, a corpus: a string that is not empty."""
    if not isinstance(value, str) or not value:
        refuse(what, "a non-empty string", value)
    return value


def optional(rule: Callable[[Any, str], T], value: Any, what: str) -> T | None:
    """None, or a value that ``rule`` accepts (``TrainConfig.block_size``: None means the model's)."""
    if value is None:
        return None
    try:
        return rule(value, what)
    except FieldError as e:
        refuse(what, f"None or {e.kind}", value)


# -- LoRA ranks ----------------------------------------------------------------------------------------------------


def ranks(value: Any, what: str, allow_empty: bool = False) -> tuple[int, ...]:
    """A list or tuple of distinct LoRA ranks (positive integers), returned as a tuple of ints; ``()`` only with
    ``allow_empty``. Whether they fit the model is ``max_rank``'s question."""
    rs = tuple(value) if isinstance(value, (list, tuple)) else value
    if not isinstance(rs, tuple) or not (rs or allow_empty) or not all(is_int(r) and r >= 1 for r in rs):
        refuse(what, "positive integers", value)
    if len(set(rs)) != len(rs):
        raise ValueError(f"{what} has repeated values: {list(rs)}")
    return tuple(int(r) for r in rs)


def max_rank(rank: int | Iterable[int], limit: int, why: str) -> None:
    """The one rank limit: a LoRA rank r fits a (d_in, d_out) layer when r <= min(d_in, d_out), the most that
    ΔW = A @ B can have (a larger r only adds parameters). ``limit`` is that minimum over the layers adapted, and
    ``why`` says where it comes from: ``"n_embd"``, ``"min(d_in, d_out)"``, ..."""
    too_big = sorted({r for r in ((rank,) if is_int(rank) else rank) if r > limit})
    if too_big:
        raise ValueError(f"LoRA rank(s) {too_big} exceed {limit} ({why})")
