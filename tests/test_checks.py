"""Tests for lora_np/checks.py: every field rule accepts its kind of value (NumPy's integers too) and refuses the
rest with one message format, ``{what} must be {kind}, got {value!r}``."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from lora_np import checks

# (rule, the arguments after the value, a good value, what the rule returns for it)
GOOD = [
    (checks.positive_int, (), np.int64(4), 4),
    (checks.nonnegative_int, (), 0, 0),
    (checks.integer, (3, 512), np.int32(80), 80),
    (checks.positive_number, (), 1e-3, 1e-3),
    (checks.positive_number, (1e4,), 1e4, 1e4),
    (checks.nonnegative_number, (), 0, 0),
    (checks.probability, (), np.float32(0.5), np.float32(0.5)),
    (checks.fraction, (), Fraction(1, 10), Fraction(1, 10)),
    (checks.rate_grid, (), [3e-3, 1e-3], (3e-3, 1e-3)),
    (checks.flag, (), False, False),
    (checks.choice, (("gelu", "gelu_new"),), "gelu", "gelu"),
    (checks.nonempty_str, (), "def ", "def "),
    (checks.instance, (tuple,), (1,), (1,)),
    (checks.ranks, (), [np.int64(1), 4], (1, 4)),
    (checks.ranks, (True,), (), ()),
]


@pytest.mark.parametrize("rule, args, value, expected", GOOD)
def test_a_good_value_is_returned(rule, args, value, expected):
    got = rule(value, "X.field", *args)
    assert got == expected and type(got) is type(expected)


# (rule, the arguments after the value, a bad value, the message's kind)
ERRORS = [
    (checks.positive_int, (), 0, "a positive integer"),
    (checks.positive_int, (), True, "a positive integer"),
    (checks.positive_int, (), 2.0, "a positive integer"),
    (checks.positive_int, (), "8", "a positive integer"),
    (checks.positive_int, (), None, "a positive integer"),
    (checks.nonnegative_int, (), -1, "a non-negative integer"),
    (checks.nonnegative_int, (), np.bool_(False), "a non-negative integer"),
    (checks.integer, (3, 512), 600, "an integer in [3, 512]"),
    (checks.integer, (2,), 1, "an integer >= 2"),
    (checks.positive_number, (), 0.0, "a finite number > 0"),
    (checks.positive_number, (), math.nan, "a finite number > 0"),
    (checks.positive_number, (), math.inf, "a finite number > 0"),
    (checks.positive_number, (), True, "a finite number > 0"),
    (checks.positive_number, (1e4,), 1e308, "a finite number > 0, at most 10000"),
    (checks.nonnegative_number, (), -0.1, "a finite number >= 0"),
    (checks.nonnegative_number, (), math.inf, "a finite number >= 0"),
    (checks.probability, (), 1.0, "a number in [0, 1)"),
    (checks.probability, (), math.nan, "a number in [0, 1)"),
    (checks.probability, (), "0.1", "a number in [0, 1)"),
    (checks.fraction, (), 0.0, "a number in (0, 1)"),
    (checks.fraction, (), None, "a number in (0, 1)"),
    (checks.rate_grid, (), (1e-3,), "at least 2 distinct finite numbers > 0"),
    (checks.rate_grid, (), (1e-3, 1e-3), "at least 2 distinct finite numbers > 0"),
    (checks.rate_grid, (), (1e-3, -1.0), "at least 2 distinct finite numbers > 0"),
    (checks.rate_grid, (3,), (1e-3, 3e-3), "at least 3 distinct finite numbers > 0"),
    (checks.rate_grid, (), "1e-3,3e-3", "at least 2 distinct finite numbers > 0"),
    (checks.flag, (), 1, "True or False"),
    (checks.choice, (("near", "far"),), "middle", "one of ['near', 'far']"),
    (checks.nonempty_str, (), "", "a non-empty string"),
    (checks.instance, (int,), "8", "an int"),
    (checks.instance, (tuple,), [1], "a tuple"),
    (checks.ranks, (), (), "positive integers"),
    (checks.ranks, (), (1, 0), "positive integers"),
    (checks.ranks, (), (1, True), "positive integers"),
]


@pytest.mark.parametrize("rule, args, value, kind", ERRORS)
def test_a_bad_value_is_refused_in_one_format(rule, args, value, kind):
    with pytest.raises(ValueError) as e:
        rule(value, "X.field", *args)
    assert str(e.value) == f"X.field must be {kind}, got {value!r}"


def test_integer_says_why_after_the_range():
    with pytest.raises(ValueError, match=r"^X\.max_length must be an integer in \[3, 512\] \(positions\), got 2$"):
        checks.integer(2, "X.max_length", 3, 512, why="(positions)")


def test_optional_takes_none_and_says_so():
    assert checks.optional(checks.positive_int, None, "X.block_size") is None
    assert checks.optional(checks.positive_int, np.int64(8), "X.block_size") == 8
    with pytest.raises(ValueError, match=r"^X\.block_size must be None or a positive integer, got 0$"):
        checks.optional(checks.positive_int, 0, "X.block_size")


def test_repeated_ranks_are_named():
    with pytest.raises(ValueError, match=r"^X\.ranks has repeated values: \[4, 4\]$"):
        checks.ranks((4, 4), "X.ranks")


def test_max_rank_lists_every_rank_too_big():
    checks.max_rank(8, 8, "n_embd")
    checks.max_rank((1, 8), 8, "n_embd")
    with pytest.raises(ValueError, match=r"^LoRA rank\(s\) \[9, 65\] exceed 8 \(n_embd\)$"):
        checks.max_rank((1, 65, 9, 65), 8, "n_embd")


def test_fields_checks_and_stores_on_a_frozen_dataclass():
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class Config:
        steps: object = 1

    cfg = Config(np.int64(3))
    checks.fields(cfg, checks.positive_int, "steps")
    assert cfg.steps == 3 and type(cfg.steps) is int
    with pytest.raises(ValueError, match=r"^Config\.steps must be a positive integer, got 0$"):
        checks.fields(Config(0), checks.positive_int, "steps")
