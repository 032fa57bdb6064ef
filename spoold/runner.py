"""Running one claimed task: the backend, its answer so far, and its outcome written as a transition.

Plain functions the daemon calls, in one thread per running task (the event loop never waits on a run).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from spoold import config, ledger, notify, options, spool, transitions
from spoold.backends import Outcome, ProcResult, Progress, Stop, get_backend, run_process
from spoold.errors import BadInput, CliUnusable
from spoold.spool import Spool
from spoold.task import title_of
from spoold.units import backoff, iso

log = logging.getLogger("spoold")
EXEC_HOLD_S = 60.0
PARTIAL_EVERY_S = 2.0  # how often a running task's answer so far is written
MAX_BACKOFF_S = 900.0
WRITE_RETRY_S = 0.2


def run(sp: Spool, settings: config.Settings, claimed: transitions.Claimed, workdir: Path,
        exited: Callable[[], None], stop: Stop) -> bool:
    """Run a claimed task to its end, in the calling thread (one per running task): the backend, then its
    outcome written (kept and retried while the spool cannot be written). `exited()` is called once the backend
    is done, so that its slot can go to the next. A `stop` that ended the backend ends the run as `interrupted`
    says; one asked after the backend was done changes nothing: its outcome is written. True when a
    notification was queued (the courier has news)."""
    task = claimed.task
    backend = get_backend(settings)
    try:
        try:
            try:
                ctx = options.context(sp, settings, task, workdir)
                inv = backend.invocation(task, settings, ctx.cwd, profile=ctx.profile, session=ctx.session)
                proc = run_process(inv, task.timeout or settings.timeout_s, stop=stop,
                                   on_stdout=partial_writer(sp, claimed, backend.progress()))
            except (CliUnusable, options.NotYet, BadInput, OSError) as e:  # the CLI never ran this task
                outcome, proc = not_run(e, settings), ProcResult(None, b"", b"")
                ledger.forget_start(sp, settings, claimed.started.timestamp())
            else:
                if proc.stopped:
                    return interrupted(sp, settings, claimed, stop.reason)
                outcome = backend.classify(task, proc)
        finally:
            exited()
        return settle_when_writable(sp, settings, claimed, outcome, proc, stop)
    except Exception:
        log.exception("internal error on %s; requeued", task.id)
        with contextlib.suppress(Exception):
            interrupted(sp, settings, claimed, "error")
        return False


def interrupted(sp: Spool, settings: config.Settings, claimed: transitions.Claimed, why: str) -> bool:
    """A run the daemon stopped: a cancel ends it cancelled; a stop puts it back uncounted; an internal error
    puts it back counted (so a task that keeps breaking spoold ends failed, not in a loop). One whose result
    is already written (its move kept failing) goes beside it instead: an answer is never run again."""
    if transitions.to_its_result(sp, claimed.path, claimed.task.id) is not None:
        return False
    if why == "cancel":
        dest = transitions.cancel_running(sp, claimed, "cancelled by request")
        return tell(sp, settings, claimed, "cancelled", "cancelled by request", "", dest)
    if why == "stop":
        transitions.requeue(sp, claimed, "the daemon stopped while it ran", count_attempt=False)
    else:
        transitions.requeue(sp, claimed, "internal error in spoold (see its log)", count_attempt=True)
    return False


def partial_writer(sp: Spool, claimed: transitions.Claimed, progress: Progress) -> Callable[[bytes], None]:
    """Keep `running/ID.N.STARTED@OWNER.partial` up to date: written whole (tmp, rename) at most every
    PARTIAL_EVERY_S, by the run's own thread between two reads of the CLI's output: a write per few seconds,
    not per token, and none after the run has moved on."""
    path = spool.partial_path(claimed.path)
    last = [0.0]

    def feed(chunk: bytes) -> None:
        if not progress.feed(chunk) or time.monotonic() - last[0] < PARTIAL_EVERY_S:
            return
        try:  # the answer is built only here, every few seconds, never per token
            spool.rewrite(sp, path, progress.text().encode(), sync_dir=False)
        except OSError as e:
            log.warning("answer so far of %s not written (%s)", claimed.task.id, e.strerror or e)
        finally:  # the next write waits its full interval from the end of this one, however slow the disk
            last[0] = time.monotonic()

    return feed


def not_run(e: Exception, settings: config.Settings) -> Outcome:
    """Why the CLI never ran a task, as an outcome: the queue waits for a CLI that cannot run (the task
    loses nothing), a follow-up waits for its earlier task, a task that cannot run as asked fails."""
    later = datetime.now(UTC) + timedelta(seconds=EXEC_HOLD_S)
    if isinstance(e, CliUnusable):  # missing, broken, or unable to isolate the task
        return Outcome("hold", error=str(e), hold_until=later, counted=False, this_host=True)
    if isinstance(e, options.NotYet):
        return Outcome("wait", error=str(e), hold_until=datetime.now(UTC) + timedelta(seconds=options.RESUME_WAIT_S))
    if isinstance(e, BadInput):  # its profile or the task it continues is gone: say so, don't guess
        return Outcome("failed", error=str(e))
    assert isinstance(e, OSError)
    if e.errno in (errno.ENOENT, errno.EACCES, errno.ENOEXEC):  # the CLI itself is missing or not executable
        claude = settings.backend == "claude"
        program = settings.claude_bin if claude else (e.filename or (settings.command or ["?"])[0])
        fix = "set claude_bin" if claude else "fix `command:` in config.yaml"
        return Outcome("hold", error=f"cannot start {program!r}: {e.strerror}; install it or {fix}", hold_until=later,
                       counted=False, this_host=True)
    return Outcome("failed", error=f"the task could not be started ({e.strerror or e}): its schema or system "
                   "prompt may be too long for one command-line argument; make it shorter")


def settle_when_writable(sp: Spool, settings: config.Settings, claimed: transitions.Claimed, outcome: Outcome,
                         proc: ProcResult, stop: Stop) -> bool:
    """Settle a finished run; while the spool cannot be written, keep its answer here and try again (until
    the daemon stops, which `interrupted` ends: an answer already written goes beside its task, never runs
    again)."""
    failures = 0
    while True:
        if failures and not claimed.path.exists():
            return False  # the move itself went through before the error: settled
        try:
            return settle(sp, settings, claimed, outcome, proc)
        except OSError as e:
            failures += 1
            if failures == 1:
                log.error("cannot record the outcome of %s (%s); keeping it and retrying", claimed.task.id,
                          e.strerror or e)
            delay = backoff(failures, WRITE_RETRY_S, settings.scan_interval_s)
            if stop.requested and stop.reason != "stop":
                time.sleep(delay)  # a cancel after the run ended changes nothing: its outcome stands
            elif stop.wait(delay) and stop.reason == "stop":  # the daemon is going: recovery finishes it later
                with contextlib.suppress(OSError):
                    return interrupted(sp, settings, claimed, "stop")
                return False


def settle(sp: Spool, settings: config.Settings, claimed: transitions.Claimed, outcome: Outcome, proc: ProcResult) -> bool:
    """Move the task where its outcome puts it, and tell the ledger (True when a notification was queued)."""
    task = claimed.task
    seen = {w.name: ledger.WindowSeen(w.status, w.resets_at, w.utilization, time.time(), task.id)
            for w in outcome.windows}
    if outcome.kind == "hold":
        until = outcome.hold_until or datetime.now(UTC) + timedelta(minutes=30)
        ledger.set_hold(sp, settings, until.timestamp(), outcome.error or "held", seen, this_host=outcome.this_host,
                        person=not outcome.counted)  # refused before any work: logged out, no credit, no CLI
        if not outcome.counted:  # refused before any work (not logged in, no credit): the start is given back
            ledger.forget_start(sp, settings, claimed.started.timestamp())
        log.warning("holding the queue until %s: %s", iso(until), outcome.error)
        transitions.requeue(sp, claimed, outcome.error or "held", count_attempt=False)
        return False
    if outcome.kind == "wait":
        if seen:  # a family's rejected window: the claimer holds that family's other tasks too
            ledger.record_finish(sp, settings, outcome.cost_usd, None, seen)
        transitions.requeue(sp, claimed, outcome.error or "waiting", count_attempt=False,
                            not_before=outcome.hold_until)
        log.info("%s waits until %s: %s", task.id, iso(outcome.hold_until) or "later", outcome.error)
        return False
    if outcome.kind == "retry" and claimed.attempt < settings.max_attempts:
        if seen or outcome.cost_usd:  # a failed try may still have cost something
            ledger.record_finish(sp, settings, outcome.cost_usd, None, seen)
        delay = backoff(claimed.attempt, settings.retry_backoff_s, MAX_BACKOFF_S)
        transitions.requeue(sp, claimed, f"{outcome.error}; retry {claimed.attempt + 1} in {delay:.0f} s",
                            not_before=datetime.now(UTC) + timedelta(seconds=delay))
        return False
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
    return tell(sp, settings, claimed, status, error, outcome.answer, dest, outcome.cost_usd)


def tell(sp: Spool, settings: config.Settings, claimed: transitions.Claimed, state: str, error: str | None,
         answer: str, task_file: Path, cost_usd: float | None = None) -> bool:
    """Put the task's end in the notification outbox (the daemon's courier delivers it); never fails the task.
    True when it was queued."""
    try:
        return notify.task_ended(sp, settings, task_id=claimed.task.id, number=claimed.number, state=state,
                          title=title_of(claimed.task), chosen=claimed.task.notify, error=error, answer=answer,
                          task_file=task_file,
                          result_file=spool.answer_path(task_file.parent, claimed.task.id, lambda: spool.known_hosts(sp)),
                          cost_usd=cost_usd)
    except OSError as e:
        log.warning("could not queue the notification for %s (%s)", claimed.task.id, e.strerror or e)
        return False
