"""How listings look to a person: aligned columns fitted to the terminal, states in colour on a TTY.

Colour only where a person reads it: a TTY, and never with NO_COLOR set (https://no-color.org).
In a pipe the same table comes plain, one task a line, for grep and awk.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import IO

STATE_COLORS = {"done": "32", "failed": "31", "running": "36", "queued": "33", "cancelled": "90"}  # ANSI SGR


def use_color(stream: IO[str]) -> bool:
    return stream.isatty() and not os.environ.get("NO_COLOR")


def width(stream: IO[str]) -> int:
    return shutil.get_terminal_size((120, 24)).columns if stream.isatty() else 200


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *, total: int, color_col: int | None = None,
          color: bool = False) -> list[str]:
    """Lines of an aligned table no wider than `total`; the last column takes what is left, cut with '…'."""
    cols = len(header)
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(cols - 1)]
    room = max(10, total - sum(widths) - 2 * (cols - 1))
    out = []
    for n, row in enumerate([list(header), *[list(r) for r in rows]]):
        last = row[-1] if len(row[-1]) <= room else row[-1][: room - 1] + "…"
        cells = [row[i].ljust(widths[i]) for i in range(cols - 1)]
        if color and n and color_col is not None and row[color_col] in STATE_COLORS:
            cells[color_col] = f"\x1b[{STATE_COLORS[row[color_col]]}m{cells[color_col]}\x1b[0m"
        line = "  ".join([*cells, last]).rstrip()
        out.append(f"\x1b[1m{line}\x1b[0m" if color and n == 0 else line)
    return out


def duration(s: float | None) -> str:
    """3s, 4m05s, 2h10m, 3d04h: a wait read at a glance."""
    if s is None:
        return "?"
    n = int(s)
    if n < 60:
        return f"{n}s"
    if n < 3600:
        return f"{n // 60}m{n % 60:02d}s"
    if n < 86400:
        return f"{n // 3600}h{n % 3600 // 60:02d}m"
    return f"{n // 86400}d{n % 86400 // 3600:02d}h"


def ago(iso_time: str | None, now: datetime | None = None) -> str:
    """`5m ago`, `3h ago`, `2d ago`: the largest unit of how long ago an ISO time was."""
    if not iso_time:
        return "-"
    then = datetime.fromisoformat(iso_time.replace("Z", "+00:00"))
    return _coarse(max(0, int(((now or datetime.now(UTC)) - then).total_seconds()))) + " ago"


def _coarse(s: int) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= size:
            return f"{s // size}{unit}"
    return f"{s}s"


def local(iso_time: str | None) -> str:
    """An ISO UTC time as this machine's local time with its zone, for people."""
    if not iso_time:
        return "-"
    return datetime.fromisoformat(iso_time.replace("Z", "+00:00")).astimezone().strftime("%Y-%m-%d %H:%M %Z")
