"""Running one claimed task: the backend, its answer so far, and its outcome written as a transition.

Plain functions the daemon calls. Everything that touches the spool runs in a worker thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path

from spoold import config, ledger, notify, options, spool, transitions
from spoold.backends import Outcome, ProcResult, Progress, get_backend, run_process
from spoold.errors import BadInput, CliUnusable
from spoold.spool import Spool
from spoold.task import title_of
from spoold.units import backoff, iso

log = logging.getLogger("spoold")
EXEC_HOLD_S = 60.0
PARTIAL_EVERY_S = 2.0  # how often a running task's answer so far is written
MAX_BACKOFF_S = 900.0
WRITE_RETRY_S = 0.2


async def run(sp: Spool, settings: config.Settings, claimed: transitions.Claimed, workdir: Path,
              exited: Callable[[], None]) -> None:
    """Run a claimed task to its end: the backend, then its outcome written (kept and retried while the spool
    cannot be written). `exited()` is called once the backend is done, so that its slot can go to the next."""
    task = claimed.task
    backend = get_backend(settings)
    try:
        ctx = options.context(sp, settings, task, workdir)
        inv = await asyncio.to_thread(partial(backend.invocation, task, settings, ctx.cwd,
                                              profile=ctx.profile, session=ctx.session))
        feed, drain = partial_writer(sp, claimed, backend.progress())
        try:
            proc = await run_process(inv, task.timeout or settings.timeout_s, on_stdout=feed)
        finally:
            await drain()
    except (CliUnusable, options.NotYet, BadInput, OSError) as e:  # the CLI never ran this task
        outcome, proc = not_run(e, settings), ProcResult(None, b"", b"")
        await asyncio.to_thread(ledger.forget_start, sp, settings, claimed.started.timestamp())
    else:
        outcome = backend.classify(task, proc)
    exited()
    await settle_when_writable(sp, settings, claimed, outcome, proc)


def interrupted(sp: Spool, settings: config.Settings, claimed: transitions.Claimed, why: str) -> None:
    """A run the daemon stopped: a cancel ends it cancelled; a stop puts it back uncounted; an internal error
    puts it back counted (so a task that keeps breaking spoold ends failed, not in a loop). One whose result
    is already written (its move kept failing) goes beside it instead: an answer is never run again."""
    if transitions.to_its_result(sp, claimed.path, claimed.task.id) is not None:
        return
    if why == "cancel":
        dest = transitions.cancel_running(sp, claimed, "cancelled by request")
        tell(sp, settings, claimed, "cancelled", "cancelled by request", "", dest)
    elif why == "stop":
        transitions.requeue(sp, claimed, "the daemon stopped while it ran", count_attempt=False)
    else:
        transitions.requeue(sp, claimed, "internal error in spoold (see its log)", count_attempt=True)


def partial_writer(sp: Spool, claimed: transitions.Claimed, progress: Progress
                   ) -> tuple[Callable[[bytes], None], Callable[[], Awaitable[None]]]:
    """Keep `running/ID.N.STARTED@OWNER.partial` up to date: written whole (tmp, fsync, rename) at most every
    PARTIAL_EVERY_S, in a worker thread, never two writes at once: an fsync per few seconds, not per token.
    `drain` waits for a write in flight and stops new ones, so none lands after the task has moved on."""
    path = spool.partial_path(claimed.path)
    state: dict[str, object] = {"last": 0.0, "busy": False, "closed": False}
    jobs: list[asyncio.Future[None]] = []

    def write(text: str) -> None:
        try:
            spool.rewrite(sp, path, text.encode(), sync_dir=False)
        except OSError as e:
            log.warning("answer so far of %s not written (%s)", claimed.task.id, e.strerror or e)
        finally:  # the next write waits its full interval from the end of this one, however slow the disk
            state["last"], state["busy"] = time.monotonic(), False

    def feed(chunk: bytes) -> None:
        if not progress.feed(chunk) or state["busy"] or state["closed"]:
            return
        if time.monotonic() - float(state["last"]) < PARTIAL_EVERY_S:  # type: ignore[arg-type]
            return
        state["busy"] = True  # the answer is built only here, every few seconds, never per token
        jobs[:] = [asyncio.get_running_loop().run_in_executor(None, write, progress.text())]

    async def drain() -> None:
        state["closed"] = True
        if jobs:
            with contextlib.suppress(Exception):
                await asyncio.shield(jobs[0])

    return feed, drain


def not_run(e: Exception, settings: config.Settings) -> Outcome:
    """Why the CLI never ran a task, as an outcome: the queue waits for a CLI that cannot run (the task
    loses nothing), a follow-up waits for its earlier task, a task that cannot run as asked fails."""
    later = datetime.now(UTC) + timedelta(seconds=EXEC_HOLD_S)
    if isinstance(e, CliUnusable):  # missing, broken, or unable to isolate the task
        return Outcome("hold", error=str(e), hold_until=later)
    if isinstance(e, options.NotYet):
        return Outcome("wait", error=str(e), hold_until=datetime.now(UTC) + timedelta(seconds=options.RESUME_WAIT_S))
    if isinstance(e, BadInput):  # its profile or the task it continues is gone: say so, don't guess
        return Outcome("failed", error=str(e))
    assert isinstance(e, OSError)
    if e.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC):  # the CLI itself is missing or not executable
        return Outcome("hold", error=f"cannot start {settings.claude_bin!r}: {e.strerror}; install it or set claude_bin",
                       hold_until=later)
    return Outcome("failed", error=f"the task could not be started ({e.strerror or e}): its schema or system "
                   "prompt may be too long for one command-line argument; make it shorter")


async def settle_when_writable(sp: Spool, settings: config.Settings, claimed: transitions.Claimed, outcome: Outcome,
                               proc: ProcResult) -> None:
    """Settle a finished run; while the spool cannot be written, keep its answer here and try again."""
    failures = 0
    while True:
        if failures and not claimed.path.exists():
            return  # the move itself went through before the error: settled
        try:
            await to_thread_to_the_end(settle, sp, settings, claimed, outcome, proc)
            return
        except OSError as e:
            failures += 1
            if failures == 1:
                log.error("cannot record the outcome of %s (%s); keeping it and retrying", claimed.task.id,
                          e.strerror or e)
            await asyncio.sleep(backoff(failures, WRITE_RETRY_S, settings.scan_interval_s))


def settle(sp: Spool, settings: config.Settings, claimed: transitions.Claimed, outcome: Outcome, proc: ProcResult) -> None:
    """Move the task where its outcome puts it, and tell the ledger."""
    task = claimed.task
    seen = {w.name: ledger.WindowSeen(w.status, w.resets_at, w.utilization, time.time(), task.id)
            for w in outcome.windows}
    if outcome.kind == "hold":
        until = outcome.hold_until or datetime.now(UTC) + timedelta(minutes=30)
        ledger.set_hold(sp, settings, until.timestamp(), outcome.error or "held", seen)
        log.warning("holding the queue until %s: %s", iso(until), outcome.error)
        transitions.requeue(sp, claimed, outcome.error or "held", count_attempt=False)
        return
    if outcome.kind == "wait":
        if seen:  # a family's rejected window: the claimer holds that family's other tasks too
            ledger.record_finish(sp, settings, outcome.cost_usd, None, seen)
        transitions.requeue(sp, claimed, outcome.error or "waiting", count_attempt=False,
                            not_before=outcome.hold_until)
        log.info("%s waits until %s: %s", task.id, iso(outcome.hold_until) or "later", outcome.error)
        return
    if outcome.kind == "retry" and claimed.attempt < settings.max_attempts:
        if seen or outcome.cost_usd:  # a failed try may still have cost something
            ledger.record_finish(sp, settings, outcome.cost_usd, None, seen)
        delay = backoff(claimed.attempt, settings.retry_backoff_s, MAX_BACKOFF_S)
        transitions.requeue(sp, claimed, f"{outcome.error}; retry {claimed.attempt + 1} in {delay:.0f} s",
                            not_before=datetime.now(UTC) + timedelta(seconds=delay))
        return
    status = "done" if outcome.kind == "done" else "failed"
    error = outcome.error
    if outcome.kind == "retry":
        error = f"{error} (gave up after {claimed.attempt} attempts; `spoold retry {task.id}` to try again)"
    result = transitions.result_for(
        claimed, status, error, outcome.answer, model_resolved=outcome.model_resolved,
        duration_s=round(proc.duration_s, 3), cost_usd=outcome.cost_usd, input_tokens=outcome.input_tokens,
        output_tokens=outcome.output_tokens, cache_read_tokens=outcome.cache_read_tokens,
        cache_creation_tokens=outcome.cache_creation_tokens, session_id=outcome.session_id,
        structured=True if outcome.structured is not None else None)
    dest = transitions.finish(sp, claimed, result)
    ledger.record_finish(sp, settings, outcome.cost_usd, proc.duration_s if status == "done" else None, seen)
    tell(sp, settings, claimed, status, error, outcome.answer, dest, outcome.cost_usd)


def tell(sp: Spool, settings: config.Settings, claimed: transitions.Claimed, state: str, error: str | None,
         answer: str, task_file: Path, cost_usd: float | None = None) -> None:
    """Put the task's end in the notification outbox (the daemon's courier delivers it); never fails the task."""
    try:
        notify.task_ended(sp, settings, task_id=claimed.task.id, number=claimed.number, state=state,
                          title=title_of(claimed.task), chosen=claimed.task.notify, error=error, answer=answer,
                          task_file=task_file,
                          result_file=spool.answer_path(task_file.parent, claimed.task.id, lambda: spool.known_hosts(sp)),
                          cost_usd=cost_usd)
    except OSError as e:
        log.warning("could not queue the notification for %s (%s)", claimed.task.id, e.strerror or e)



async def to_thread_to_the_end(fn: Callable[..., None], *args: object) -> None:
    """Run fn in a worker thread and wait for it even if cancelled meanwhile: a thread cannot stop halfway.

    A cancel that arrives while fn runs takes effect only if fn failed; work done is not undone.
    """
    fut = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        await asyncio.shield(fut)
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await fut
            return
        raise
