"""Search everything the spool has answered: prompts, titles, tags and answers, ranked (SQLite FTS5).

The index is a cache of the directories, never a second truth: each search first brings it up to
date from the finished tasks' names and their result files' stamps (new, changed, gone), and
`rebuild` throws it away. It lives in this machine's state directory, outside the spool, since a
SQLite file on a synced folder corrupts.
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from spoold import spool
from spoold.errors import BadInput
from spoold.spool import Spool
from spoold.task import parse_result, parse_task, title_of
from spoold.units import iso

SCHEMA = """
CREATE TABLE IF NOT EXISTS seen (id TEXT PRIMARY KEY, sig TEXT NOT NULL, rid INTEGER, dir TEXT);
CREATE TABLE IF NOT EXISTS dirs (dir TEXT PRIMARY KEY, mtime INTEGER NOT NULL);
CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5(
    id UNINDEXED, state UNINDEXED, submitted UNINDEXED, title, tags, prompt, answer, tokenize='unicode61');
"""


@dataclass
class Hit:
    id: str
    state: str
    submitted_at: str
    title: str
    snippet: str  # where the words were found, [marked]


def index_path(sp: Spool) -> Path:
    """`$XDG_STATE_HOME/spoold/index-<spool>.sqlite`: one index per spool, on this machine only."""
    base = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "spoold"
    key = hashlib.sha256(str(sp.root.resolve()).encode()).hexdigest()[:16]
    return base / f"index-{key}.sqlite"


SCHEMA_VERSION = 2


def _open(sp: Spool) -> sqlite3.Connection:
    path = index_path(sp)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    db = sqlite3.connect(path)
    try:
        if db.execute("PRAGMA user_version").fetchone()[0] not in (0, SCHEMA_VERSION):
            raise sqlite3.DatabaseError("an index of another version")
        db.executescript(SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
    except sqlite3.DatabaseError:  # damaged, or made by another version: it is only a cache
        db.close()
        path.unlink(missing_ok=True)
        db = sqlite3.connect(path)
        db.executescript(SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")
    return db


RACY_S = 1.0  # a directory changed this recently may change again within its mtime's tick: look again next time


def _finished_dirs(sp: Spool) -> Iterator[tuple[str, Path]]:
    for state in spool.TERMINAL:
        for d in spool.terminal_dirs(sp, state):
            if d.is_dir():
                yield state, d


def _files_in(state: str, d: Path) -> Iterator[tuple[str, Path, str]]:
    """(id, task file, signature) of a directory's finished tasks, from names and one stat of each result."""
    for name in os.listdir(d):
        task_id = name[:-3]
        if not spool.is_task_file(name) or not spool.ID_RE.match(task_id):
            continue
        try:
            st = os.stat(spool.result_path_for(d, task_id))
            sig = f"{state}:{st.st_mtime_ns}:{st.st_size}"
        except FileNotFoundError:
            sig = f"{state}:-"
        yield task_id, d / name, sig


def refresh(sp: Spool, db: sqlite3.Connection | None = None) -> int:
    """Bring the index up to date with the directories; returns how many tasks it (re)read.

    A directory whose mtime is what it was at the last refresh has gained and lost no file (and a
    result, written once, never changes in place), so only changed directories are listed.
    """
    own = db is None
    db = db or _open(sp)
    try:
        dirs_then = dict(db.execute("SELECT dir, mtime FROM dirs"))
        changed = 0
        with db:
            for state, d in _finished_dirs(sp):
                key, mtime = str(d), d.stat().st_mtime_ns
                if dirs_then.pop(key, None) == mtime:
                    continue
                changed += _refresh_dir(db, state, d)
                fresh = mtime < (time.time() - RACY_S) * 1e9
                db.execute("INSERT OR REPLACE INTO dirs VALUES (?, ?)", (key, mtime if fresh else -1))
            for gone in dirs_then:  # a partition that is no more
                for (rid,) in db.execute("SELECT rid FROM seen WHERE dir = ?", (gone,)).fetchall():
                    if rid is not None:
                        db.execute("DELETE FROM fts WHERE rowid = ?", (rid,))
                db.execute("DELETE FROM seen WHERE dir = ?", (gone,))
                db.execute("DELETE FROM dirs WHERE dir = ?", (gone,))
        return changed
    finally:
        if own:
            db.close()


def _refresh_dir(db: sqlite3.Connection, state: str, d: Path) -> int:
    known = {i: (sig, rid) for i, sig, rid in db.execute("SELECT id, sig, rid FROM seen WHERE dir = ?", (str(d),))}
    present: set[str] = set()
    changed = 0
    for task_id, path, sig in _files_in(state, d):
        present.add(task_id)
        old = known.get(task_id)
        if old is not None and old[0] == sig:
            continue
        if old is not None and old[1] is not None:
            db.execute("DELETE FROM fts WHERE rowid = ?", (old[1],))  # by rowid: FTS5 has no other index
        row = _row(task_id, state, path)
        rid = db.execute("INSERT INTO fts VALUES (?, ?, ?, ?, ?, ?, ?)", row).lastrowid if row else None
        db.execute("INSERT OR REPLACE INTO seen VALUES (?, ?, ?, ?)", (task_id, sig, rid, str(d)))
        changed += 1
    for gone in set(known) - present:
        if known[gone][1] is not None:
            db.execute("DELETE FROM fts WHERE rowid = ?", (known[gone][1],))
        db.execute("DELETE FROM seen WHERE id = ?", (gone,))
    return changed


def _row(task_id: str, state: str, path: Path) -> tuple[str, ...] | None:
    try:
        task = parse_task(spool.read_bytes(path).decode("utf-8", "replace"), task_id=task_id)
    except (OSError, BadInput):
        return None
    answer = ""
    rp = spool.answer_path(path.parent, task_id, None)
    try:
        answer = parse_result(spool.read_bytes(rp).decode("utf-8", "replace")).answer
    except (OSError, BadInput):
        pass
    submitted = iso(spool.id_time(task_id))  # the id's time
    return task_id, state, submitted, title_of(task), " ".join(task.tags), task.prompt, answer


def rebuild(sp: Spool) -> int:
    index_path(sp).unlink(missing_ok=True)
    return refresh(sp)


def query(sp: Spool, text: str, *, limit: int = 20, states: list[str] | None = None,
          since: datetime | None = None) -> list[Hit]:
    """The best matches first (BM25), every word required; after bringing the index up to date."""
    words = re.findall(r"\w+", text)
    if not words:
        raise BadInput("search for some words, such as `spoold search rayleigh scattering`")
    match = " ".join('"' + w.replace('"', "") + '"' for w in words)
    db = _open(sp)
    try:
        refresh(sp, db)
        sql = ("SELECT id, state, submitted, title, snippet(fts, -1, '[', ']', '…', 12) FROM fts "
               "WHERE fts MATCH ?")
        args: list[object] = [match]
        if states:
            sql += f" AND state IN ({', '.join('?' * len(states))})"
            args += states
        if since is not None:
            sql += " AND submitted >= ?"
            args.append(iso(since))
        sql += " ORDER BY bm25(fts, 0, 0, 0, 4.0, 2.0, 1.0, 1.0) LIMIT ?"
        args.append(limit)
        return [Hit(*row) for row in db.execute(sql, args)]
    finally:
        db.close()
