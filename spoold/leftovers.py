"""What sync tools leave in a spool: conflict copies, temp files and placeholders.

In inbox/ a conflict copy of a dropped file is a task of its own (spoold.intake takes it in;
temp files and placeholders are dotfiles it never touches). Anywhere else such a file is
nothing spoold wrote: `spoold status` reports it, and a daemon on a synced spool removes the
conflict copies that are byte-identical to their original (nothing is lost). A copy that
differs is kept and reported: spoold never guesses which of two bytes the user wanted.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from spoold import spool
from spoold.spool import Spool

log = logging.getLogger("spoold")
TEMP_AGE_S = 3600.0

# (tool, kind, pattern); a conflict pattern's groups are the original's stem and extension
_PATTERNS: list[tuple[str, str, re.Pattern[str]]] = [
    ("Syncthing", "conflict", re.compile(r"^(.+)\.sync-conflict-\d{8}-\d{6}(?:-[A-Z0-9]{7})?(\..+)?$")),
    ("Syncthing", "temp", re.compile(r"^(?:\.syncthing\.|~syncthing~).+\.tmp$")),
    ("Dropbox", "conflict", re.compile(r"^(.+) \((?:[^()]*'s )?conflicted copy(?: \d{4}-\d{2}-\d{2})?(?: \(\d+\))?\)(\..+)?$")),
    ("Dropbox", "conflict", re.compile(r"^(.+) \(Case Conflict(?: \d+)?\)(\..+)?$")),
    ("Dropbox", "temp", re.compile(r"^\.dropbox(?:\.cache|\.attr)?$")),
    ("Nextcloud", "conflict", re.compile(r"^(.+) \(conflicted copy \d{4}-\d{2}-\d{2} \d{6}\)(\..+)?$")),
    ("Nextcloud", "temp", re.compile(r"^\..+\.~[0-9a-f]+$|^\.(?:owncloudsync\.log|sync_[0-9a-f]+\.db.*|_sync_.+\.db.*)$")),
    ("iCloud", "placeholder", re.compile(r"^\..+\.icloud$")),
    ("iCloud", "conflict", re.compile(r"^(.+) [2-9](\.md|\.json|\.txt)$")),
    ("OneDrive", "temp", re.compile(r"^~\$.+|.+\.~tmp$")),
    ("Unison", "temp", re.compile(r"^\.unison\..+\.unison\.tmp$|^\.unison\.tmp$")),
    ("Unison", "conflict", re.compile(r"^(.+) \(conflict(?: #\d+)?_on_\d{4}-\d{2}-\d{2}(?:_was_deleted)?\)(\..+)?$")),
    ("rsync", "temp", re.compile(r"^\..+\.[A-Za-z0-9]{6}$")),
]


@dataclass(frozen=True)
class Leftover:
    path: Path
    tool: str
    kind: str  # conflict, temp, placeholder
    original: Path | None  # what a conflict copy is a copy of


def classify(directory: Path, name: str) -> Leftover | None:
    for tool, kind, pattern in _PATTERNS:
        m = pattern.match(name)
        if m:
            original = directory / (m.group(1) + (m.group(2) or "")) if kind == "conflict" else None
            return Leftover(directory / name, tool, kind, original)
    return None


def _dirs(sp: Spool, terminal: bool) -> list[Path]:
    """Spool directories a sync tool writes into, except inbox/ (there a conflict copy is a task)."""
    out = [sp.dir("running"), spool.hosts_dir(sp), spool.ledger_dir(sp), spool.notify_dir(sp)]
    for state in spool.TERMINAL if terminal else ():
        out += spool.terminal_dirs(sp, state)
    return [d for d in out if d.is_dir()]


def leftover_mark(name: str) -> bool:
    """What every pattern below has and none of spoold's own names do: a space, a `~`, a leading dot or the
    word conflict. A name without one is passed over without a regex."""
    return " " in name or "~" in name or name[:1] == "." or "conflict" in name


def among(directory: Path, names: list[str], now: float | None = None) -> list[Leftover]:
    """The leftovers in one directory's listing (only names with a leftover_mark are looked at). A temp file
    is a transfer in flight until it is an hour old (then its tool has given up on it)."""
    now = time.time() if now is None else now
    return [hit for n in names if leftover_mark(n)
            and (hit := classify(directory, n)) is not None and (hit.kind != "temp" or _age(hit.path, now) > TEMP_AGE_S)]


def _age(path: Path, now: float) -> float:
    try:
        return now - os.lstat(path).st_mtime
    except OSError:
        return 0.0


def find(sp: Spool, *, terminal: bool = True) -> list[Leftover]:
    """Leftovers in the spool but queued/ (`terminal`: also in the finished tasks' directories, the big
    listings); `among` a queued/ listing the caller already made finds those."""
    return [hit for d in _dirs(sp, terminal) for hit in among(d, os.listdir(d))]


def tidy(sp: Spool) -> list[str]:
    """Remove conflict copies that are byte-identical to their original; report the rest (returned)."""
    kept = []
    for hit in [*find(sp), *among(sp.dir("queued"), os.listdir(sp.dir("queued")))]:
        if hit.kind == "conflict" and hit.original is not None and _same(hit.path, hit.original):
            hit.path.unlink(missing_ok=True)
            log.info("removed %s: a %s conflict copy identical to %s", hit.path.name, hit.tool, hit.original.name)
        else:
            kept.append(describe(sp, hit))
    return kept


def describe(sp: Spool, hit: Leftover) -> str:
    where = hit.path.relative_to(sp.root)
    return f"{where} ({hit.tool} {hit.kind}" + (f" of {hit.original.name})" if hit.original else ")")


def _same(a: Path, b: Path) -> bool:
    try:
        if os.path.getsize(a) != os.path.getsize(b):
            return False
        return spool.read_bytes(a) == spool.read_bytes(b)
    except OSError:
        return False
