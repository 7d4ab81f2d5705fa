"""Hyperparameter validation shared by the ``defenses`` and ``attacks`` packages; every error names the
owner, the parameter and the allowed range. The registry itself is :mod:`spirt.registry`."""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

from spirt.registry import Registry, accepted_params, default_params, summary_of

__all__ = ["Registry", "accepted_params", "default_params", "summary_of", "int_param", "float_param",
           "choice_param", "seed_param"]


# ---------------------------------------------------------------------------------------------------
# Hyperparameter validation. Every error names the owner, the parameter and the allowed range.
# ---------------------------------------------------------------------------------------------------


def _range_text(minimum: float | None, maximum: float | None, strict_min: bool, strict_max: bool) -> str:
    parts = []
    if minimum is not None:
        parts.append(f"{'>' if strict_min else '>='} {minimum}")
    if maximum is not None:
        parts.append(f"{'<' if strict_max else '<='} {maximum}")
    return " and ".join(parts)


def int_param(
    owner: str, name: str, value: Any, minimum: int | None = None, maximum: int | None = None
) -> int:
    """Validate an integer hyperparameter (bools are rejected)."""
    rng = _range_text(minimum, maximum, False, False)
    expected = f"an integer {rng}".strip()
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{owner}: parameter {name!r} must be {expected} (got {value!r})")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ValueError(f"{owner}: parameter {name!r} must be {expected} (got {value})")
    return value


def float_param(
    owner: str,
    name: str,
    value: Any,
    minimum: float | None = None,
    maximum: float | None = None,
    strict_min: bool = False,
    strict_max: bool = False,
) -> float:
    """Validate a finite real hyperparameter (ints accepted, bools rejected)."""
    rng = _range_text(minimum, maximum, strict_min, strict_max)
    expected = f"a finite real number {rng}".strip()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{owner}: parameter {name!r} must be {expected} (got {value!r})")
    value = float(value)
    bad = not math.isfinite(value)
    if minimum is not None:
        bad |= value <= minimum if strict_min else value < minimum
    if maximum is not None:
        bad |= value >= maximum if strict_max else value > maximum
    if bad:
        raise ValueError(f"{owner}: parameter {name!r} must be {expected} (got {value})")
    return value


def choice_param(owner: str, name: str, value: Any, choices: Iterable[Any]) -> Any:
    """Validate a hyperparameter drawn from a fixed set of values."""
    choices = list(choices)
    if isinstance(value, bool) or value not in choices:
        raise ValueError(
            f"{owner}: parameter {name!r} must be one of {', '.join(map(repr, choices))} (got {value!r})"
        )
    return value


def seed_param(owner: str, value: Any) -> int | None:
    """Validate an rng seed: ``None`` (fresh OS entropy) or a non-negative integer."""
    if value is None:
        return None
    return int_param(owner, "seed", value, minimum=0)
