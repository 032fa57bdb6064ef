"""Finished tasks as a whole: what they cost and took (stats), and letting old ones go (prune).

Both read the directories, which are the truth: a result file says what a run cost, how long it
took and why it failed. Nothing here is a second record to keep in step.
"""

from __future__ import annotations

import functools
import os
import re
import statistics
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from spoold import spool
from spoold.errors import BadInput
from spoold.spool import Spool
from spoold.task import Result, parse_result


@dataclass
class Finished:
    task_id: str
    state: str
    task_path: Path
    result: Result | None


def finished(sp: Spool, states: tuple[str, ...] = spool.TERMINAL, since: datetime | None = None) -> Iterator[Finished]:
    """Finished tasks (submitted since `since`), with their results where they have one; a dropped directory or
    link (`failed/ID.rejected`) is one too, its result saying what to fix."""
    hosts = functools.cache(lambda: spool.known_hosts(sp))
    for state in states:
        for path in spool.terminal_task_files(sp, state, rejected=True):
            task_id = spool.listed_id(path.name) or ""
            if not spool.ID_RE.match(task_id) or (since is not None and spool.id_time(task_id) < since):
                continue
            rp = spool.answer_path(path.parent, task_id, hosts)
            try:
                res = parse_result(spool.read_bytes(rp).decode("utf-8")) if rp.exists() else None
            except (OSError, UnicodeDecodeError, BadInput):
                res = None
            yield Finished(task_id, state, path, res)


@dataclass
class Stats:
    since: str | None
    tasks: int = 0
    by_day: dict[str, dict[str, int]] = field(default_factory=dict)  # UTC day -> state -> count
    cost_by_day: dict[str, float] = field(default_factory=dict)
    cost_by_month: dict[str, float] = field(default_factory=dict)
    cost_by_model: dict[str, float] = field(default_factory=dict)
    duration_p50_s: float | None = None
    duration_p95_s: float | None = None
    failures: dict[str, int] = field(default_factory=dict)  # the reason's first words -> count


def stats(sp: Spool, since: datetime | None = None) -> Stats:
    out = Stats(since=since.isoformat(timespec="seconds") if since else None)
    by_day: dict[str, Counter[str]] = defaultdict(Counter)
    cost_day: defaultdict[str, float] = defaultdict(float)
    cost_month: defaultdict[str, float] = defaultdict(float)
    cost_model: defaultdict[str, float] = defaultdict(float)
    durations: list[float] = []
    failures: Counter[str] = Counter()
    for f in finished(sp, since=since):
        out.tasks += 1
        res = f.result
        when = (res.finished_at if res and res.finished_at else spool.id_time(f.task_id)).astimezone(UTC)
        day = when.strftime("%Y-%m-%d")
        by_day[day][f.state] += 1
        if res and res.cost_usd:
            cost_day[day] += res.cost_usd
            cost_month[day[:7]] += res.cost_usd
            cost_model[res.model_resolved or res.model or "?"] += res.cost_usd
        if res and f.state == "done" and res.duration_s is not None:
            durations.append(res.duration_s)
        if f.state == "failed":
            failures[_reason(res.error if res else None)] += 1
    out.by_day = {d: dict(c) for d, c in sorted(by_day.items())}
    out.cost_by_day = {d: round(v, 6) for d, v in sorted(cost_day.items())}
    out.cost_by_month = {m: round(v, 6) for m, v in sorted(cost_month.items())}
    out.cost_by_model = {m: round(v, 6) for m, v in sorted(cost_model.items(), key=lambda kv: -kv[1])}
    if durations:
        out.duration_p50_s = round(statistics.median(durations), 3)
        out.duration_p95_s = round(_p95(durations), 3)
    out.failures = dict(failures.most_common())
    return out


def _p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]


def _reason(error: str | None) -> str:
    """A failure's reason without its particulars (ids, numbers, paths), so alike failures count together."""
    if not error:
        return "no reason recorded"
    error = re.sub(r"^[^\s:`]+\.(?:md|markdown|txt): ", "", error)  # bad input says its file first: not the reason
    error = re.sub(r"""^(?:'[^']*'|"[^"]*") is a """, "a dropped entry is a ", error)  # (a rejected directory or link, by name)
    text = re.sub(r"\d+(\.\d+)?", "N", error.split(":", 1)[0] if len(error) > 80 else error)
    return text[:80]


@dataclass
class Pruned:
    task_ids: list[str]
    transcripts: list[str]
    dry_run: bool
    left: list[str] = field(default_factory=list)  # staged in tmp/ but not removable (not ours to delete)


def prune(sp: Spool, older_than: datetime, states: tuple[str, ...] = spool.TERMINAL, *, dry_run: bool = False,
          claude_dir: Path | None = None) -> Pruned:
    """Remove finished tasks submitted before `older_than`, each with its result, and the CLI's transcripts of
    their conversations that no kept task continues. Never a queued or running task.

    Crash-safe: a task's files (and its attempt records) move into tmp/ under a prune name first (gone from every listing at once),
    then are deleted; recovery deletes what a pruner that died left there.
    """
    for s in states:
        if s not in spool.TERMINAL:
            raise BadInput(f"prune takes only finished states ({', '.join(spool.TERMINAL)}), not {s!r}")
    old, kept_sessions = [], set()
    for f in finished(sp):
        if f.state in states and spool.id_time(f.task_id) < older_than:
            old.append(f)
        elif f.result and f.result.session_id:
            kept_sessions.add(f.result.session_id)
    hosts = functools.cache(lambda: spool.known_hosts(sp))
    sessions = {f.result.session_id for f in old if f.result and f.result.session_id} - kept_sessions
    transcripts = _transcripts(sessions, claude_dir or _claude_dir())
    left: list[str] = []
    if not dry_run:
        for f in old:
            records = spool.attempts_dir(sp, f.task_id)
            results = spool.results_of(f.task_path.parent, f.task_id, hosts)
            for path in (f.task_path, *results, records):
                try:
                    staged = spool.move(path, spool.prune_path(sp, path), sync="none", sp=sp)
                except FileNotFoundError:
                    continue
                if not spool.remove_pruned(staged):
                    left.append(str(staged))
        for d in {f.task_path.parent for f in old}:
            spool.fsync_dir(d, sp)
        for t in transcripts:
            t.unlink(missing_ok=True)
    return Pruned([f.task_id for f in old], [str(t) for t in transcripts], dry_run, left)


def _claude_dir() -> Path:
    return Path(os.environ.get("CLAUDE_CONFIG_DIR") or Path.home() / ".claude")


def _transcripts(sessions: set[str], claude_dir: Path) -> list[Path]:
    """The CLI's saved conversations (`projects/<its cwd>/<session id>.jsonl`) of these sessions."""
    projects = claude_dir / "projects"
    if not sessions or not projects.is_dir():
        return []
    return sorted(p for d in projects.iterdir() if d.is_dir() for p in d.glob("*.jsonl") if p.stem in sessions)
