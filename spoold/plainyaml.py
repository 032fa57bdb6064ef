"""Frontmatter written by hand for the common case, byte for byte what PyYAML's dumper writes.

Every task and result file gets a frontmatter block; PyYAML costs ~15 ms of import (most of it
compiling its regexes) and ~0.1 ms a block, on the path of every `spoold submit` and every task
the daemon takes in and finishes. Most blocks hold only short strings, numbers and lists of
strings, whose YAML is simple. `dump` writes those, and answers None for anything it is not sure
of (a mapping, a date, an odd string): the caller then uses PyYAML. tests/test_plainyaml.py holds
it to PyYAML's own output over generated values, so the two never differ where `dump` answers.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

MAX_CHARS = 4096  # longer strings go to PyYAML (its line width is set far above this)
# A plain scalar PyYAML would write as is: a safe first character, then printable text without the
# sequences YAML gives a meaning (": ", " #", a leading "..."), no trailing space or colon, no line breaks.
# The regexes are compiled on first use, and the Unicode ranges only for text that needs them: compiling
# them all cost a `spoold submit` 4 ms.
_PLAIN_ASCII = r"[A-Za-z0-9_/.~=<][A-Za-z0-9 _./+\-,?()!'\"&*%$;:#|`\\=<>~^@\[\]{}]*"
_PLAIN = _PLAIN_ASCII[:-2] + "\u00a0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd]*"
# What PyYAML's resolver reads as something other than a string: its own patterns for bool, float, int,
# merge, null, timestamp and value, copied as they are, in two parts: the words (bool, null, merge, value),
# and the patterns of the rest, which all begin with a digit, a sign or a dot. Such a string is written in
# single quotes.
_WORDS = frozenset(["yes", "Yes", "YES", "no", "No", "NO", "true", "True", "TRUE", "false", "False", "FALSE",
                    "on", "On", "ON", "off", "Off", "OFF", "~", "null", "Null", "NULL", "<<", "="])
_NUMERIC_FIRST = frozenset("+-.0123456789")
_NUMERIC = r"""(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN)
    |[-+]?0b[0-1_]+
    |[-+]?0[0-7_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+
    |[-+]?[1-9][0-9_]*(?::[0-5]?[0-9])+
    |[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]
    |[0-9][0-9][0-9][0-9]-[0-9][0-9]?-[0-9][0-9]?(?:[Tt]|[ \t]+)[0-9][0-9]?:[0-9][0-9]:[0-9][0-9](?:\.[0-9]*)?
        (?:[ \t]*(?:Z|[-+][0-9][0-9]?(?::[0-9][0-9])?))?)"""


@functools.cache
def _compiled(pattern: str, flags: int = 0) -> re.Pattern[str]:
    return re.compile(pattern, flags)


def _plain(text: str) -> bool:
    return _compiled(_PLAIN_ASCII if text.isascii() else _PLAIN).fullmatch(text) is not None


def _not_str(text: str) -> bool:
    if text in _WORDS:
        return True
    return text[0] in _NUMERIC_FIRST and _compiled(_NUMERIC, re.X).fullmatch(text) is not None


def scalar(value: object) -> str | None:
    """One scalar as PyYAML writes it in a block mapping, or None when this module is not sure."""
    kind = type(value)
    if kind is bool:
        return "true" if value else "false"
    if kind is int:
        return str(value)
    if kind is float:
        text = repr(value)
        return text if math.isfinite(value) and "e" not in text else None  # type: ignore[arg-type]
    if kind is not str or not value or len(value) > MAX_CHARS:  # type: ignore[arg-type]
        return None
    text = str(value)
    if not _plain(text) or ": " in text or " #" in text or text[-1] in " :" or text.startswith("..."):
        return None
    if _not_str(text):
        return None if "'" in text else f"'{text}'"
    return text


def dump(meta: dict[str, Any]) -> str | None:
    """A mapping of names to scalars and lists of scalars, as PyYAML's block style; None for anything else."""
    out: list[str] = []
    for key, value in meta.items():
        name = scalar(key) if isinstance(key, str) else None
        if name is None or name.startswith("'") or len(name.encode()) > 128:  # (longer: a "? " key in libyaml)
            return None
        if isinstance(value, list):
            if not value:
                return None
            out.append(f"{name}:\n")
            for item in value:
                text = None if isinstance(item, list) else scalar(item)
                if text is None:
                    return None
                out.append(f"- {text}\n")
            continue
        text = scalar(value)
        if text is None:
            return None
        out.append(f"{name}: {text}\n")
    return "".join(out) if out else None
