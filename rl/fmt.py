"""Numbers as people read them — log lines, tables, figure titles: a value that is missing or
undefined (``None``, NaN, ±inf: no episode ended, no lap completed, nothing driven) is written
as a dash, never as ``nan`` or ``None``. Machine-read records (metrics.jsonl, metrics.json)
keep their own conventions (NaN, null); this module is only for text.

    num(float("nan"), ".1f", " s")   # '—'
    num(31.25, ".1f", " s")          # '31.2 s'
    pm(1.0, 0.5, ".2f")              # '1.00 ± 0.50'

Imports nothing from the project, so any module can use it.
"""

from __future__ import annotations

import math

DASH = "—"


def finite(x) -> float | None:
    """``x`` as a float, or None when it is missing, not a number or not finite."""
    if x is None or isinstance(x, str):
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def num(x, spec: str = "", unit: str = "") -> str:
    """``format(x, spec) + unit``, or :data:`DASH` (without the unit) when ``x`` is undefined."""
    v = finite(x)
    return DASH if v is None else f"{v:{spec}}{unit}"


def pm(mean, std, spec: str = "", unit: str = "") -> str:
    """``mean ± std`` (+ unit); the dash when the mean is undefined, the mean alone when only
    the spread is."""
    m, s = finite(mean), finite(std)
    if m is None:
        return DASH
    if s is None:
        return f"{m:{spec}}{unit}"
    return f"{m:{spec}} ± {s:{spec}}{unit}"
