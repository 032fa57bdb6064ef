"""Amounts, times and names as a person (or a file) reads them: dollars without exponents, ISO times in
UTC, windows in words."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import overload


@overload
def iso(when: float | datetime, *, ms: bool = False) -> str: ...
@overload
def iso(when: float | datetime | None, *, ms: bool = False) -> str | None: ...
def iso(when: float | datetime | None, *, ms: bool = False) -> str | None:
    """`2026-11-24T16:18:16Z` (or `...16.123Z` with ms): the one way spoold writes a time, always UTC."""
    if when is None:
        return None
    dt = when if isinstance(when, datetime) else datetime.fromtimestamp(when, UTC)
    return dt.astimezone(UTC).isoformat(timespec="milliseconds" if ms else "seconds").replace("+00:00", "Z")


def usd(amount: float | None) -> str:
    """$1,234.50, $0.42, $0.00055: cents for sums, enough digits that a small cost never reads $0.00."""
    if amount is None:
        return "-"
    if amount == 0:
        return "$0.00"
    if abs(amount) >= 0.995:
        return f"${amount:,.2f}"
    decimals = max(2, 1 - math.floor(math.log10(abs(amount))))
    text = f"{amount:.{decimals}f}".rstrip("0")
    whole, _, frac = text.partition(".")
    return f"${whole}.{frac.ljust(2, '0')}"


WINDOWS = {"five_hour": "5-hour", "seven_day": "weekly", "seven_day_opus": "weekly Opus",
           "seven_day_sonnet": "weekly Sonnet", "seven_day_overage_included": "weekly", "overage": "extra-usage"}


FAMILY_WINDOWS = {"seven_day_opus": "opus", "seven_day_sonnet": "sonnet"}  # windows that bind one model family


def family_of(model: str) -> str | None:
    """The model family a model name or alias belongs to, for the windows that bind one family."""
    m = model.lower()
    return next((f for f in FAMILY_WINDOWS.values() if f in m), None)


def window_words(name: str) -> str:
    """A subscription window's name as the CLI's own messages say it (five_hour -> 5-hour)."""
    return WINDOWS.get(name, name.replace("_", " "))


def backoff(n: int, base: float, cap: float) -> float:
    """The wait before try n+1 after n failures: base, 2*base, 4*base, ... up to cap (the one backoff rule)."""
    return min(cap, base * 2 ** min(max(n, 1) - 1, 30))


_DURATION = r"\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr)?\s*"
_UNITS = {None: 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600}


def seconds(text: str) -> float | None:
    """The seconds in a duration a person writes (`600`, `90s`, `30m`, `2h`), or None if it is not one."""
    m = re.fullmatch(_DURATION, text)
    return float(m.group(1)) * _UNITS[m.group(2)] if m else None
