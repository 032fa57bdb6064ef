"""The library surface the CLI and the MCP adapter share: plain functions over the spool.

Synchronous and side-effect free beyond the spool files, so tests, benchmarks,
the CLI and the adapter all call the same code.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spoold import census, config, ledger, options, owners, spool, transitions
from spoold.config import Settings
from spoold.errors import BadInput, InvalidState, SpoolError
from spoold.records import TaskInfo
from spoold.spool import Spool

if TYPE_CHECKING:
    from spoold.leftovers import Leftover
from spoold.task import Result, Task, from_user, is_failure_note, parse_result, parse_text, title_of
from spoold.task import read as read_task
from spoold.units import iso

MAX_QUERY_BYTES_DEFAULT = 1024 * 1024


@dataclass
class QueueStatus:
    spool: str
    counts: dict[str, int]
    running: list[TaskInfo]
    held_until: str | None
    hold_reason: str | None
    next_start: str | None
    settings: dict[str, Any]
    ignored_inbox_files: list[str]
    windows: list[WindowInfo] = field(default_factory=list)
    daemons: list[dict[str, Any]] = field(default_factory=list)  # who serves the spool: owner, host, pid, since, alive
    serving: bool = False  # a daemon on this host is alive (another host's may be, unseen from here)
    notify_failing: dict[str, str] = field(default_factory=dict)  # target -> why a daemon cannot reach it now
    oldest_queued: str | None = None  # the id of the task that has waited longest (ids sort by submission)
    hosts: list[dict[str, Any]] = field(default_factory=list)  # on a synced spool: host, age_s, live, running, leases
    duplicates: int = 0  # second answers another host wrote for a finished task, kept beside its answer
    leftovers: list[str] = field(default_factory=list)  # sync tools' conflict copies and temp files outside inbox/

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class WindowInfo:
    """What spoold last heard of one subscription window, and from which task."""

    name: str  # five_hour, seven_day, seven_day_opus, ...
    status: str  # allowed, allowed_warning, rejected
    utilization: float | None  # 0-1, when the CLI reported it
    resets_at: str | None
    seen_at: str | None
    task_id: str | None


def windows(sp: Spool, usage: ledger.Usage | None = None) -> list[WindowInfo]:
    """What spoold last heard of each subscription window (from the ledger alone: no listing)."""
    usage = usage or ledger.read_usage(sp)
    return [WindowInfo(name, w.status, w.utilization, iso(w.resets_at), iso(w.seen_at), w.task_id)
            for name, w in sorted(usage.windows.items())]


# What a front end needs of the spool itself (with the Spool type), so the adapter imports api alone.
FINISHED = spool.TERMINAL  # done, failed, cancelled
PENDING = spool.PENDING  # queued, running


def open_spool(root: Path | str, *, create: bool = False) -> Spool:
    """The spool at root (created, private, when asked), in this spoold's format (a format-1 spool is migrated
    first); SpoolError says what is wrong with it."""
    sp = spool.open_spool(root, create=create)
    if spool.needs_migration(sp):
        from spoold import migrate  # lazy: only a spool that needs it pays for the import

        migrate.migrate(sp)
    return sp


def check_id(task_id: str) -> str:
    """A task id, checked before it touches a path (BadTaskId otherwise)."""
    return spool.check_id(task_id)


def load_settings(sp: Spool, overrides: dict[str, Any] | None = None) -> Settings:
    return config.load(sp.config_path, overrides)


# ---- writing ---------------------------------------------------------------------


def submit(
    sp: Spool, prompt: str, *, model: str | None = None, priority: str | None = None, system: str | None = None,
    title: str | None = None, not_before: str | datetime | None = None, tags: list[str] | None = None,
    timeout: str | float | None = None, source: str | None = None, settings: Settings | None = None,
    frontmatter: bool = True, slug_hint: str | None = None, options_: dict[str, Any] | None = None,
) -> TaskInfo:
    """Queue a prompt; never rejected for load, only for bad input.

    With `frontmatter=False` the text is the prompt verbatim, even if it starts with `---`.
    The id's readable part comes from `slug_hint` (e.g. a file name), the title, or the prompt.
    `options_` are more frontmatter keys (resume, profile, effort, ...), checked as a dropped file's are.
    """
    settings = settings or load_settings(sp)
    size = len(prompt.encode()) + len((system or "").encode())
    if size > settings.max_bytes:
        raise BadInput(f"the query is {size:,} bytes; the spool's limit is {settings.max_bytes:,} (max_bytes)")
    meta, body = parse_text(prompt) if frontmatter else ({}, prompt)
    flags = {"model": model, "priority": priority, "system": system, "title": title, "not_before": not_before,
             "tags": tags, "timeout": timeout}
    meta.update({k: v for k, v in {**flags, **(options_ or {})}.items() if v is not None})
    task_id = spool.new_id(slug_hint or title or str(meta.get("title") or "") or body[:60])
    task = from_user(meta, body, task_id=task_id, default_model=settings.default_model)
    options.resolve(sp, settings, task)
    task.submitted_at = spool.id_time(task_id)
    task.source = source
    try:
        with census.submitting(sp) as seen:
            transitions.enqueue(sp, task)
            position = census.place(sp, task, settings, seen)
    except OSError as e:
        raise SpoolError(f"cannot write to the spool {sp.root} ({e.strerror or e}); free space or make it writable, "
                         "then submit again") from None
    out = TaskInfo(id=task.id, state="queued", title=title_of(task), model=task.model, priority=task.priority,
                   submitted_at=iso(task.submitted_at), not_before=iso(task.not_before), warnings=task.warnings,
                   path=str(spool.queued_path_for(sp, task.id, task.priority, task.not_before)))
    if position is None:
        _estimate_into(sp, out, settings)  # a listing: what every other reader does
    else:
        out.position = position
        start = ledger.nth_start(sp, settings, position)
        out.estimated_start = iso(start)
        out.estimated_wait_seconds = round(max(0.0, start - time.time()), 1)
    return out


def _estimate_into(sp: Spool, out: TaskInfo, settings: Settings) -> None:
    """A queued task's place and estimated start; the names before it are all that is parsed."""
    entries = spool.list_queued(sp)
    census.keep(sp, entries)
    idx = ledger.dispatch_order(entries, settings.strategy).index_of(out.id)  # type: ignore[attr-defined]
    if idx is not None:
        _apply_estimate(out, ledger.estimate(sp, settings, entries, limit=idx + 1)[-1])


def cancel(sp: Spool, task_id: str) -> str:
    """Cancel a task: a queued one at once; a running one by asking its owner, or, when its owner died, by
    recovering it here (holding an owner lock meanwhile), which keeps an answer that was already written."""
    state = transitions.cancel(sp, task_id)
    entry = next((e for e in spool.list_running(sp) if e.task_id == task_id), None) if state == "cancelling" else None
    if entry is not None and not owners.owner_alive(sp, entry.owner):
        from spoold import recovery

        with owners.owning(sp):
            recovery.recover_running(sp, entry, max_attempts=load_settings(sp).max_attempts)
        state = spool.locate(sp, task_id).state
        if state not in ("cancelled", "cancelling"):
            raise InvalidState(f"task {task_id} had already ended {state} (its daemon died after writing its "
                               "result); nothing to cancel")
    return state


def retry(sp: Spool, task_id: str) -> TaskInfo:
    """Queue a failed or cancelled task again with a fresh attempt count. Input that was moved aside as bad
    is read again as a dropped file (fix it where it lies, then retry): same id, checked as at intake."""
    try:
        transitions.retry(sp, task_id)
    except transitions.NotATask as e:
        from spoold import intake

        settings = load_settings(sp)
        try:
            task = intake.read_dropped(e.path, task_id=task_id, source=e.path.name,
                                       default_model=settings.default_model, max_bytes=settings.max_bytes)
            options.resolve(sp, settings, task)
        except BadInput as bad:
            raise BadInput(f"task {task_id} still cannot be read as a task: {bad}; fix {e.path}, then "
                           f"`spoold retry {task_id}` again") from None
        transitions.retake(sp, task, e.path)
    return info(sp, task_id)


# ---- reading ---------------------------------------------------------------------


def _regular(path: Path) -> bool:
    """A regular file, by lstat (a dropped link kept as `ID.rejected` is never followed, not even by a stat)."""
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _read_task(path: Path, task_id: str) -> Task | None:
    if path.name.endswith(spool.REJECTED_SUFFIX):
        return None  # a dropped directory or link, kept as it came: never read or followed
    try:
        return read_task(path, task_id)
    except (OSError, BadInput):
        return None


def info(sp: Spool, task_id: str, *, settings: Settings | None = None, with_estimate: bool = True) -> TaskInfo:
    """Everything about one task, from its file and its result (and the ledger's estimate while queued)."""
    return info_and_result(sp, task_id, settings=settings, with_estimate=with_estimate)[0]


def info_and_result(sp: Spool, task_id: str, *, settings: Settings | None = None,
                    with_estimate: bool = True) -> tuple[TaskInfo, Result | None]:
    """A task's info and, once it has one, its result as written: each file read once."""
    loc = spool.locate(sp, task_id)
    out = TaskInfo(id=task_id, state=loc.state, path=str(loc.path))
    task = _read_task(loc.path, task_id) if _regular(loc.path) else None
    if task:
        out.title, out.model, out.priority = title_of(task), task.model, task.priority
        out.not_before = iso(task.not_before)
        out.warnings, out.prompt, out.tags = task.warnings, task.prompt, task.tags
        asked = {"system": task.system, "timeout_s": task.timeout, "profile": task.profile, "resume": task.resume,
                 "effort": task.effort, "max_turns": task.max_turns, "max_budget_usd": task.max_budget_usd,
                 "fallback_model": task.fallback_model, "schema": task.schema}
        out.options = {k: v for k, v in asked.items() if v is not None}
    out.submitted_at = iso(spool.id_time(task_id))  # an id says when it was submitted, whatever its file holds
    res = _in_flight(sp, out, loc.path, with_reason=True)
    if res:
        out.input_tokens, out.output_tokens = res.input_tokens, res.output_tokens
        out.answer_chars = len(answer_of(res))
    if loc.state == "running":
        out.partial_answer = partial_answer(sp, task_id)
    if loc.state == "queued" and with_estimate:
        _estimate_into(sp, out, settings or load_settings(sp))
    return out, res


def result_fields(res: Result | None) -> dict[str, Any]:
    """A result file's fields as JSON values (times in ISO), without the answer: for `--json`."""
    if res is None:
        return {}
    out = {f.name: getattr(res, f.name) for f in fields(Result) if f.name != "answer"}
    return {k: iso(v) if isinstance(v, datetime) else v for k, v in out.items()}


def answer_of(res: Result | None) -> str:
    """A result's answer ('' when it has none: a failure's note in the file is not an answer)."""
    return "" if res is None or is_failure_note(res.answer) else res.answer


def partial_answer(sp: Spool, task_id: str) -> str | None:
    """A running task's answer so far, as its owner last wrote it (None before the first words)."""
    path = spool.find_partial(sp, task_id)
    try:
        return spool.read_bytes(path).decode("utf-8", "replace") if path else None
    except FileNotFoundError:
        return None  # it just finished


def _apply_estimate(out: TaskInfo, est: ledger.Estimate) -> None:
    out.position = est.position
    out.estimated_start = iso(est.start)
    out.estimated_wait_seconds = round(max(0.0, est.start - time.time()), 1)


def _read_result(path: Path) -> Result | None:
    try:
        return parse_result(spool.read_bytes(path).decode("utf-8"))
    except (OSError, UnicodeDecodeError, BadInput):
        return None


def result(sp: Spool, task_id: str) -> tuple[TaskInfo, str]:
    """(info, answer text) of a finished task (empty when it has none); InvalidState while it is not finished."""
    ti, res = info_and_result(sp, task_id, with_estimate=False)
    if ti.state not in spool.TERMINAL:
        raise InvalidState(f"task {task_id} is {ti.state}; no result yet (`spoold wait {task_id}`)")
    return ti, answer_of(res)


def structured(answer: str) -> Any:
    """The JSON a task's `schema:` asked for: the answer's fenced ```json block, parsed (None if it has none)."""
    import json

    text = answer.strip()
    if not (text.startswith("```json\n") and text.endswith("```")):
        return None
    try:
        return json.loads(text[len("```json\n"):-3])
    except ValueError:
        return None


def wait(sp: Spool, task_id: str, timeout_s: float | None = None, poll_s: float = 0.1, *,
         with_estimate: bool = True) -> TaskInfo:
    """Block until the task ends (or the timeout passes); returns its info either way (with its estimate
    when it is still queued, unless asked not to). The one wait: the CLI and the adapter both call it."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        ti = info(sp, task_id, with_estimate=False)
        if ti.state in spool.TERMINAL or (deadline is not None and time.monotonic() >= deadline):
            return ti if ti.state in spool.TERMINAL or not with_estimate else info(sp, task_id)
        time.sleep(poll_s)


def list_tasks(sp: Spool, state: str | None = None, limit: int = 20) -> list[TaskInfo]:
    """Tasks by state (queued in dispatch order with estimates; finished newest first)."""
    states = [state] if state else list(spool.TASK_STATES)
    out: list[TaskInfo] = []
    for st in states:
        if len(out) >= limit:
            break
        out += _list_state(sp, st, limit - len(out))
    return out


def _list_state(sp: Spool, state: str, limit: int) -> list[TaskInfo]:
    if state == "queued":
        settings = load_settings(sp)
        entries = spool.list_queued(sp)
        census.keep(sp, entries)
        ests = ledger.estimate(sp, settings, entries, limit=limit)
        by_id = {e.task_id: e for e in ledger.dispatch_order(entries, settings.strategy)[:limit]}
        out = []
        for est in ests:
            e = by_id[est.task_id]
            ti = _summary(sp, spool.queued_path(sp, e.name), est.task_id, "queued")
            _apply_estimate(ti, est)
            out.append(ti)
        return out
    if state == "running":
        return [_summary(sp, spool.running_file(sp, e.name), e.task_id, "running") for e in spool.list_running(sp)][:limit]
    if state not in spool.TERMINAL:
        raise InvalidState(f"unknown state {state!r}; use one of queued, running, done, failed, cancelled")
    out = []
    for d in spool.terminal_dirs(sp, state):
        named = sorted(((tid, n) for n in os.listdir(d) if (tid := spool.listed_id(n))), reverse=True)
        for tid, n in named[: limit - len(out)]:
            if spool.ID_RE.match(tid):
                out.append(_summary(sp, d / n, tid, state))
        if len(out) >= limit:
            break
    return out


def _summary(sp: Spool, path: Path, task_id: str, state: str) -> TaskInfo:
    ti = TaskInfo(id=task_id, state=state, path=str(path))
    task = _read_task(path, task_id)
    if task:
        ti.title, ti.model, ti.priority = title_of(task), task.model, task.priority
        ti.not_before, ti.tags = iso(task.not_before), task.tags
    ti.submitted_at = iso(spool.id_time(task_id))  # an id says when it was submitted, whatever its file holds
    _in_flight(sp, ti, path)
    return ti


def _in_flight(sp: Spool, ti: TaskInfo, path: Path, *, with_reason: bool = False) -> Result | None:
    """What a task's file does not hold: its attempts, start and outcome, from its running/ name, its records
    and its result (the one place a TaskInfo learns them). `with_reason` (info): the records' log too.
    Returns the result of a finished task."""
    h = transitions.history(sp, ti.id, log=True) if with_reason else None
    if h:
        ti.history = h.log
    if ti.state == "running":
        entry = spool.parse_running_name(path.name)
        if entry:
            base = h.base if h else spool.retry_base(spool.attempt_records(sp, ti.id))
            ti.attempts, ti.started_at = entry.attempt - base, iso(entry.started)
        return None
    if ti.state == "queued":
        queued = spool.parse_queued_name(path.name)
        if queued and queued.not_before:
            ti.not_before = iso(queued.not_before)  # a retry's backoff or a hold's wait is in the name
        if h:
            ti.attempts, ti.error = h.attempts, h.last_reason
        return None
    result_path = spool.answer_path(path.parent, ti.id, lambda: spool.known_hosts(sp))
    res = _read_result(result_path) if result_path.exists() else None
    if res:
        ti.result_path = str(result_path)
        _from_result(ti, res)
    return res


def _from_result(ti: TaskInfo, res: Result) -> None:
    """What a finished task's result adds to its info (the one place that maps a Result onto a TaskInfo)."""
    ti.error, ti.attempts = res.error, res.attempts or 0
    ti.cost_usd, ti.duration_s, ti.model_resolved = res.cost_usd, res.duration_s, res.model_resolved
    ti.started_at, ti.finished_at = iso(res.started_at), iso(res.finished_at)


def inbox(sp: Spool) -> tuple[list[str], bool]:
    """The dropped files not taken in yet, and whether a daemon on this host is serving (it takes them soon)."""
    from spoold import intake

    return intake.waiting_files(sp), any(d["alive"] for d in owners.serving_daemons(sp))


def recent(sp: Spool, *, limit: int = 20, states: list[str] | None = None, since: datetime | None = None,
           tag: str | None = None, model: str | None = None) -> list[TaskInfo]:
    """The newest tasks across states, newest first (ids sort by submission), filtered; names are listed,
    and only the files of rows that may be shown are read. The queue alone comes in start order."""
    states = states or list(spool.TASK_STATES)
    for s in states:
        if s not in spool.TASK_STATES:
            raise BadInput(f"unknown state {s!r}; use queued, running, done, failed or cancelled")
    if states == ["queued"] and not (tag or model or since):
        return _list_state(sp, "queued", limit)  # the queue alone reads best in start order: what runs next
    want = None if tag or model else limit  # a filter on the files' contents may have to look further
    rows: list[tuple[str, str, Path]] = []
    if "running" in states:
        rows += [(e.task_id, "running", spool.running_file(sp, e.name)) for e in spool.list_running(sp)]
    queued = spool.list_queued(sp) if "queued" in states else spool.QueuedListing([])
    rows += [(tid, "queued", spool.queued_path(sp, name)) for tid, name in queued.newest(want)]
    for state in spool.TERMINAL:
        if state in states:
            rows += [(tid, state, p) for tid, p in spool.newest_terminal(sp, state, want)]
    if since is not None:
        rows = [r for r in rows if spool.id_time(r[0]) >= since]
    rows.sort(key=lambda r: r[0], reverse=True)
    out: list[TaskInfo] = []
    for task_id, state, path in rows:
        ti = _summary(sp, path, task_id, state)
        if (tag and tag not in ti.tags) or (model and model not in (ti.model, ti.model_resolved)):
            continue
        out.append(ti)
        if len(out) >= limit:
            break
    _estimates_for([t for t in out if t.state == "queued"], sp, queued)
    return out


LISTING_ESTIMATE_DEPTH = 5_000


def _estimates_for(rows: list[TaskInfo], sp: Spool, queued: Sequence[spool.QueuedEntry]) -> None:
    """Positions and starts for the queued rows of a listing, in one simulation up to the deepest of them."""
    if not rows:
        return
    settings = load_settings(sp)
    order = [e.task_id for e in ledger.dispatch_order(queued, settings.strategy)]
    wanted = {t.id for t in rows}
    depth = max((i for i, tid in enumerate(order) if tid in wanted), default=-1) + 1
    if depth > LISTING_ESTIMATE_DEPTH:  # a start that far back is simulated by `show`, not by every listing
        positions = {tid: i for i, tid in enumerate(order, 1) if tid in wanted}
        for t in rows:
            t.position = positions.get(t.id)
        return
    ests = {e.task_id: e for e in ledger.estimate(sp, settings, queued, limit=depth)}
    for t in rows:
        if t.id in ests:
            _apply_estimate(t, ests[t.id])


def hold(sp: Spool, settings: Settings | None = None) -> tuple[str | None, str | None]:
    """(until, why) dispatch is held by a limit, a budget or a hold, from the ledger alone (no listings)."""
    settings = settings or load_settings(sp)
    now = time.time()
    g = ledger.gate(ledger.read_usage(sp, now), settings, 0, now)
    until = iso(g.wait_until)
    return until, g.reason if until else None


def notify_test(sp: Spool, target: str | None = None) -> dict[str, str | None]:
    """Send a test message to one notification target (or all): target -> None if sent, else why not."""
    from spoold import notify  # (asyncio: a submit never pays for it)

    return notify.test(sp, load_settings(sp), target)


def serving(sp: Spool) -> list[dict[str, Any]]:
    """The daemons that serve the spool and may be alive (this host's proven alive; another host's unseen)."""
    return [d for d in owners.serving_daemons(sp) if d["alive"] is not False]


def status(sp: Spool, settings: Settings | None = None) -> QueueStatus:
    """Counts by state (from directory listings), running tasks, holds and the next start."""
    from spoold import hosts, intake, leftovers, notify  # what only `status` reads: a submit imports none of it

    daemons = owners.serving_daemons(sp)
    here = [d for d in daemons if d["alive"]]
    # The settings the serving daemon uses: config.yaml plus its own flags and environment, not this shell's.
    settings = settings or (config.load(sp.config_path, here[0].get("overrides") or {}, env={}) if here
                            else load_settings(sp))
    now = time.time()
    kept = census.kept_queue(sp) if settings.strategy == "priority" else None  # fifo, lifo: order by id
    if kept is not None:  # queued/ unchanged since a listing counted it: its count and head, no listing
        n_queued, queued, oldest = kept
    else:
        queued = spool.list_queued(sp, census.trust(sp))  # once: a deep queue is the expensive listing
        census.keep(sp, queued)
        n_queued, oldest = len(queued), queued.oldest_id()
    counts, duplicates = {}, 0
    left = leftovers.find(sp, terminal=False) + leftovers.among(sp.dir("queued"), queued.unparsed)
    for st in spool.COUNTED:
        counts[st], dups = (n_queued, 0) if st == "queued" else _count(sp, st, left)
        duplicates += dups
    usage = ledger.read_usage(sp, now)
    g = ledger.gate(usage, settings, 0, now)
    nxt = ledger.estimate(sp, settings, queued, limit=1, now=now, usage=usage) if queued else []
    return QueueStatus(
        spool=str(sp.root), counts=counts,
        running=[_summary(sp, spool.running_file(sp, e.name), e.task_id, "running") for e in spool.list_running(sp)],
        held_until=iso(g.wait_until),
        hold_reason=g.reason, next_start=iso(nxt[0].start) if nxt else None,
        settings=config.as_dict(settings), ignored_inbox_files=intake.ignored_files(sp), windows=windows(sp, usage),
        daemons=daemons, serving=bool(here), notify_failing=notify.failing(sp),
        oldest_queued=oldest,
        hosts=[asdict(h) for h in hosts.host_status(sp, now)], duplicates=duplicates,
        leftovers=[leftovers.describe(sp, hit) for hit in left],
    )


def _count(sp: Spool, state: str, left: list[Leftover]) -> tuple[int, int]:
    """Tasks in a state, and (terminal states) the duplicate answers beside them and sync tools' leftovers
    (added to `left`): one listing of each directory that changed since it was last counted."""
    from spoold import intake, leftovers

    if state == "running":
        return len(spool.list_running(sp)), 0
    if state == "inbox":
        return len(intake.waiting_files(sp)), 0  # (a file that is no task is listed apart, by `status`)
    tasks = duplicates = 0
    for d, n, dup, odd in census.finished(sp, state):
        tasks += n
        duplicates += dup
        left += leftovers.among(d, odd)
    return tasks, duplicates


def clear_hold(sp: Spool) -> None:
    """Lift a usage-limit, billing or login hold early (for example after `claude auth login`)."""
    ledger.clear_hold(sp, load_settings(sp))


def set_config(sp: Spool, changes: dict[str, Any]) -> Settings:
    """Write the spool's config.yaml (a running daemon reloads it) and return the effective settings."""
    if changes:
        config.update_file(lambda p, data: spool.rewrite(sp, p, data), sp.config_path, changes)
    return load_settings(sp)


def search(sp: Spool, text: str, *, limit: int = 20, states: list[str] | None = None,
           since: datetime | None = None) -> list[Any]:
    """Finished tasks whose prompt, title, tags or answer hold every word, best first (spoold.search.Hit)."""
    from spoold import search as index  # lazy: sqlite only for a search

    return index.query(sp, text, limit=limit, states=states, since=since)


def rebuild_index(sp: Spool) -> int:
    from spoold import search as index

    return index.rebuild(sp)
