"""The one validation layer: every config value and name is checked here, with one message style.

Errors are ``ValueError`` (``KeyError`` for an unknown registry name) whose message names the key, what
was wrong and the valid choices, with a "did you mean" where a close match exists, e.g.::

    env.dealy is not an option of delayed_cue (did you mean 'delay'?); valid: delay, difficulty, n_cues, noise
    ppo.lr must be a number, got 'abc'

This module is the bottom layer of rlmem: it imports nothing of rlmem, so envs, LM tasks, memories,
agents and trainers can all use it without import cycles.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def _bound(bound: float | None, infinite: str) -> str:
    return infinite if bound is None else str(bound)


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None, why: str = "") -> int:
    """``value`` as an int in ``[low, high]``, or a ValueError naming ``name`` and the valid range.

    ``why`` (optional) is appended to the message, e.g. to say which other knob sets a bound.
    """
    why = f" ({why})" if why else ""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        kind = "" if _is_number(value) else f", not {_kind(value)}"
        raise ValueError(f"{name} must be an integer in [{_bound(low, '-inf')}, {_bound(high, 'inf')}]{why}{kind}, "
                         f"got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must be in [{_bound(low, '-inf')}, {_bound(high, 'inf')}]{why}, got {value}")
    return int(value)


def check_float(name: str, value: Any, low: float | None = None, high: float | None = None, why: str = "") -> float:
    """``value`` as a finite float in ``[low, high]``, or a ValueError naming ``name`` and the valid range."""
    why = f" ({why})" if why else ""
    if not _is_number(value):
        raise ValueError(f"{name} must be a number, not {_kind(value)}, got {value!r}")
    expected = f"{name} must be a finite number in [{_bound(low, '-inf')}, {_bound(high, 'inf')}]{why}"
    try:
        number = float(value)
    except OverflowError:  # a Python int beyond the float range
        raise ValueError(f"{expected}, got {value!r}") from None
    if not math.isfinite(number) or (low is not None and number < low) or (high is not None and number > high):
        raise ValueError(f"{expected}, got {value!r}")
    return number


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool, else a ValueError naming ``name``."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return bool(value)


def _is_number(value: Any) -> bool:
    return not isinstance(value, (bool, np.bool_)) and isinstance(value, (int, float, np.integer, np.floating))


def _kind(value: Any) -> str:
    if isinstance(value, str):
        return "a string"
    if value is None:
        return "null"
    if isinstance(value, (bool, np.bool_)):
        return "a boolean"
    return f"a {type(value).__name__}"


def suggest(word: Any, choices: Iterable[Any]) -> str:
    """``" (did you mean 'x'?)"`` for the closest of ``choices`` to ``word``, or ``""`` if none is close."""
    if not isinstance(word, str):
        return ""
    close = difflib.get_close_matches(word, [str(c) for c in choices], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def check_choice(name: str, value: Any, choices: Iterable[T], what: str = "a valid choice") -> T:
    """``value`` if it is one of ``choices``, else a ValueError naming ``name``, a suggestion and the choices."""
    choices = list(choices)
    if value in choices:
        return value
    raise ValueError(f"{name}={value!r} is not {what}{suggest(value, choices)}; valid: "
                     f"{', '.join(map(str, choices))}")


def check_keys(where: str, given: Iterable[str], valid: Iterable[str], of: str = "") -> None:
    """Raise a ValueError naming the first unknown key of ``given`` (``<where>.<key>``), what it is not an
    option of (``of``, e.g. ``"delayed_cue"``), a close match among ``valid`` and every valid key. ``where``
    is the config group, e.g. ``ppo`` or ``env``."""
    valid = sorted(valid)
    for key in given:
        if key not in valid:
            prefix = f"{where}.{key}" if where else str(key)
            of_what = f" of {of}" if of else ""
            raise ValueError(f"{prefix} is not an option{of_what}{suggest(key, valid)}; valid: {', '.join(valid)}")


def from_mapping(cls: type[T], values: Mapping[str, Any], where: str) -> T:
    """A config dataclass built from a mapping, every field checked against its annotation.

    Unknown keys raise naming the valid ones; ``int`` / ``float`` / ``bool`` fields are type-checked with
    the key named as ``<where>.<field>`` (an int is accepted for a float). Range checks beyond the type stay
    in the dataclass's ``__post_init__``.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    check_keys(where, values, fields)
    hints = typing.get_type_hints(cls)
    checked = {}
    for key, value in values.items():
        name, hint = f"{where}.{key}" if where else key, hints.get(key)
        if hint is bool:
            value = check_bool(name, value)
        elif hint is int:
            value = check_int(name, value)
        elif hint is float:
            value = check_float(name, value)
        checked[key] = value
    return cls(**checked)
