"""How the reports write numbers: one formatter per kind, a dash for a missing value (None or NaN)."""

from __future__ import annotations

__all__ = ["DASH", "pct", "pp", "ratio", "fixed"]

DASH = "–"


def _missing(v) -> bool:
    return v is None or v != v  # NaN is the only value unequal to itself


def pct(v: float | None) -> str:
    """A share as ``"81.2 %"``."""
    return DASH if _missing(v) else f"{100 * v:.1f} %"


def pp(v: float | None) -> str:
    """A difference of shares in percentage points, signed: ``"+8.9 pp"``."""
    return DASH if _missing(v) else f"{100 * v:+.1f} pp"


def ratio(v: float | None) -> str:
    """A ratio as ``"2.13×"``."""
    return DASH if _missing(v) else f"{v:.2f}×"


def fixed(v: float | None, digits: int = 2) -> str:
    """A plain number with ``digits`` decimals."""
    return DASH if _missing(v) else f"{v:.{digits}f}"
