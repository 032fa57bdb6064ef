"""The daemon: recovery, the watch loop, dispatch under the ledger, and graceful stop.

The only asynchronous part of spoold. Filesystem events are hints that wake
the loop; a periodic full scan covers anything the watcher missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import signal
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from spoold import config, intake, ledger, options, owners, recovery, spool, transitions
from spoold.backends import Outcome, ProcResult, Progress, get_backend, run_process
from spoold.errors import BadInput, CliUnusable, SpooldError
from spoold.spool import Spool
from spoold.units import family_of, iso

if TYPE_CHECKING:
    from watchfiles import Change

log = logging.getLogger("spoold")
PENDING_RECHECK_S = 0.05
EXEC_HOLD_S = 60.0
PARTIAL_EVERY_S = 2.0  # how often a running task's answer so far is written
MAX_BACKOFF_S = 900.0
WRITE_RETRY_S = 0.2
INTAKE_BATCH = 256  # files taken in per turn: a dropped corpus starts running while it is still taken in


@dataclass
class Running:
    claimed: transitions.Claimed
    job: asyncio.Task[None]
    stop_reason: str | None = None  # "cancel" or "stop" once we interrupt it


class Daemon:
    def __init__(self, sp: Spool, overrides: dict[str, object] | None = None, *, once: bool = False) -> None:
        self.sp = sp
        self.overrides = overrides or {}
        self.once = once
        self.settings = config.load(sp.config_path, self.overrides)
        self._config_mtime = self._mtime(sp.config_path)
        self.running: dict[str, Running] = {}
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self.workdir = spool.work_dir(sp)
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._last_scan = 0.0
        self._held_logged: str | None = None
        self._watching = asyncio.Event()
        self._probe = spool.watch_probe_path(sp)
        self._write_failures = 0
        self._foreign_in_queued = False
        self._finishing: set[str] = set()  # ids whose process exited; their outcome is being written
        self.news = asyncio.Event()  # the watcher saw something that may be new work (or stop was asked)
        self.slot_freed = asyncio.Event()
        self._owner = spool.owner_tag()
        self._more_intake = False  # the last intake stopped at its batch limit

    @staticmethod
    def _mtime(path: Path) -> float | None:
        try:
            return path.stat().st_mtime_ns
        except OSError:
            return None

    # ---- lifecycle -------------------------------------------------------------

    async def run(self) -> int:
        """Serve until SIGINT/SIGTERM (or, with --once, until nothing more can start now)."""
        owner_lock = owners.hold_owner_lock(self.sp)
        flags = {k: v for k, v in self.overrides.items() if v is not None}
        try:
            note: Path | None = owners.announce_daemon(self.sp, {**config.env_values(), **flags})
        except OSError as e:  # a full or read-only spool: serve all the same; only `status` misses the note
            note = None
            log.warning("could not note this daemon for `spoold status` (%s)", e.strerror or e)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            for action in recovery.recover(self.sp, max_attempts=self.settings.max_attempts):
                log.info("recovery: %s", action)
        except OSError as e:
            self._cannot_write(e)  # the loop's first turn recovers again once it can
        watcher = asyncio.ensure_future(self._watch())
        checking = asyncio.ensure_future(self._check_backend())  # alongside serving: it may take seconds
        await self._watcher_ready()
        log.info("serving %s (backend %s, %d per %g min, concurrency %d)", self.sp.root, self.settings.backend,
                 self.settings.max_requests, self.settings.window_minutes, self.settings.concurrency)
        try:
            await self._serve()
        finally:
            await self._shutdown()
            try:
                ledger.flush(self.sp, self.settings)
            except OSError as e:
                log.warning("recent run times not saved to the ledger (%s); only estimates use them", e.strerror or e)
            for background in (watcher, checking):
                background.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await background
            if note is not None:
                note.unlink(missing_ok=True)
            owner_lock.release()
            log.info("stopped")
        return 0

    async def _check_backend(self) -> None:
        """Say what will stop tasks before the first one meets it; the tasks themselves wait, never fail, for it."""
        try:
            for problem in await asyncio.to_thread(get_backend(self.settings).check, self.settings):
                log.warning("%s", problem)
        except CliUnusable as e:
            log.error("tasks cannot run yet: %s", e)

    def request_stop(self) -> None:
        if not self.stopping.is_set():
            log.info("stopping: no new tasks; waiting up to %g s for running ones", self.settings.grace_s)
        self.stopping.set()
        self.news.set()
        self.wake.set()

    async def _watch(self) -> None:
        from watchfiles import (
            awatch,  # lazy: `spoold submit` must not pay for the watcher
        )

        queued = self.sp.dir("queued")
        paths = [self.sp.dir("inbox"), queued, self.sp.dir("running"), self.sp.root]
        async for changes in awatch(*paths, watch_filter=None, debounce=200, step=2, recursive=False,
                                    stop_event=self.stopping, ignore_permission_denied=True):
            news = False
            for change, p in changes:
                path = Path(p)
                if path.name == self._probe.name:
                    self._watching.set()
                    news = True
                elif self._is_news(change, path):
                    news = True
                    if path.parent == queued and not spool.parse_queued_name(path.name):
                        self._foreign_in_queued = True  # a file a foreign tool wrote straight into queued/
            if news:
                self.news.set()
                self.wake.set()

    def _is_news(self, change: Change, path: Path) -> bool:
        """Whether an event can mean new work; our own claims and moves (one per task) are not news."""
        from watchfiles import Change

        if path.parent == self.sp.dir("inbox") and change == Change.deleted and intake.lock_target(path.name):
            return True  # an editor let go of a file: it may be a task now
        if path.parent in (self.sp.dir("queued"), self.sp.dir("inbox")):
            return change != Change.deleted  # a file leaving the inbox or the queue never makes work
        if path.parent == self.sp.dir("running"):
            if spool.parse_cancel_marker(path.name) is not None:
                return True
            entry = spool.parse_running_name(path.name)
            mine = entry is not None and entry.owner == self._owner
            return change == Change.deleted and not mine  # a slot another daemon held is free
        return True

    async def _watcher_ready(self, timeout_s: float = 5.0) -> None:
        """Touch a probe until the watcher reports it, so no drop falls between the first scan and the watch."""
        deadline = time.monotonic() + timeout_s
        try:
            while not self._watching.is_set() and time.monotonic() < deadline:
                self._probe.touch(mode=0o600)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._watching.wait(), 0.05)
        finally:
            self._probe.unlink(missing_ok=True)
        if not self._watching.is_set():
            log.warning("the file watcher did not answer; relying on a scan every %g s", self.settings.scan_interval_s)

    async def _serve(self) -> None:
        while not self.stopping.is_set():
            self.wake.clear()
            self.news.clear()  # before this turn looks at anything: news from now on ends its dispatch pass
            self._maybe_reload()
            try:
                pending = await self._intake_and_recover()
                self._check_cancels()
                wait_until, started = await self._dispatch()
                if not started and not self.running:  # idle: make recent run times visible to estimates
                    await asyncio.to_thread(ledger.flush, self.sp, self.settings)
            except OSError as e:  # disk full, read-only, quota: hold with every task where it was
                delay = self._cannot_write(e)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)
                continue
            self._can_write()
            if self.once and not self.running and self._drained(wait_until):
                return
            timeout = self.settings.scan_interval_s
            if pending:
                timeout = min(timeout, 0.0 if self._more_intake else PENDING_RECHECK_S)
            if wait_until is not None:
                timeout = min(timeout, max(0.0, wait_until - time.time()) + 0.001)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout)

    def _cannot_write(self, e: OSError) -> float:
        """Say once why the spool cannot be written; return how long to wait before trying again."""
        self._write_failures += 1
        delay = backoff(self._write_failures, WRITE_RETRY_S, self.settings.scan_interval_s)
        if self._write_failures == 1:
            log.error("cannot write to the spool (%s: %s); holding, every task stays where it is; "
                      "retrying every %g s", e.strerror or e, e.filename or self.sp.root, self.settings.scan_interval_s)
        self._last_scan = 0.0  # recover our own half-done moves first once writing works again
        return delay

    def _can_write(self) -> None:
        if self._write_failures:
            log.info("the spool is writable again; resuming")
            self._write_failures = 0

    def _drained(self, wait_until: float | None) -> bool:
        """--once ends when no queued task can start now: the queue is empty, or it waits on the limit."""
        if wait_until is not None:
            log.info("--once: stopping; the next start waits until %s", iso(wait_until))
            return True
        return ledger.next_eligible(spool.list_queued(self.sp), time.time()) is None

    async def _shutdown(self) -> None:
        if not self.running:
            return
        jobs = [r.job for r in self.running.values()]
        _, still = await asyncio.wait(jobs, timeout=self.settings.grace_s)
        for r in list(self.running.values()):
            if r.job in still:
                r.stop_reason = "stop"
                r.job.cancel()
        if still:
            await asyncio.wait(still)

    # ---- each turn of the loop -------------------------------------------------

    def _maybe_reload(self) -> None:
        mtime = self._mtime(self.sp.config_path)
        if mtime == self._config_mtime:
            return
        self._config_mtime = mtime
        try:
            self.settings = config.load(self.sp.config_path, self.overrides)
            log.info("config reloaded: %d per %g min, concurrency %d", self.settings.max_requests,
                     self.settings.window_minutes, self.settings.concurrency)
        except SpooldError as e:
            log.error("config not reloaded, keeping the previous one: %s", e)

    async def _intake_and_recover(self) -> bool:
        """Take new files into the queue (and, every scan interval, recover) in a worker thread.

        A thread, so that fsyncs here overlap with finished tasks being written in other threads.
        Everything it needs from the loop's state is copied first.
        """
        full = time.monotonic() - self._last_scan > self.settings.scan_interval_s or self._foreign_in_queued
        self._foreign_in_queued = False
        settings, running_here = self.settings, set(self.running)

        def work() -> intake.IntakeReport:
            report = intake.scan(self.sp, default_model=settings.default_model, max_bytes=settings.max_bytes,
                                 include_queued=full, limit=INTAKE_BATCH, settings=settings)
            if full:
                for action in recovery.recover(self.sp, max_attempts=settings.max_attempts, running_here=running_here):
                    log.info("recovery: %s", action)
            return report

        report = await asyncio.to_thread(work)
        self._more_intake = report.more
        pending = bool(report.pending or report.more)
        if full:
            self._last_scan = time.monotonic()
        return pending

    def _check_cancels(self) -> None:
        for task_id, r in list(self.running.items()):
            if r.stop_reason is None and task_id not in self._finishing and spool.cancel_marker(self.sp, task_id).exists():
                r.stop_reason = "cancel"
                r.job.cancel()

    async def _dispatch(self) -> tuple[float | None, int]:
        """Start tasks while the ledger admits them; return when the next start may be possible, and how many started.

        One listing of queued/ per turn: at 100,000 queued tasks a listing costs ~0.1 s, so
        it must not be repeated per start. A name another process claimed first is skipped.
        Claims run in a worker thread (their fsyncs must not stall the loop).
        """
        settings = self.settings
        listing = spool.list_queued(self.sp)
        entries = ledger.dispatch_order(listing, settings.strategy)
        started = 0

        def due() -> Iterator[spool.QueuedEntry]:  # consumed across batches: each entry is tried once a turn
            for e in entries:
                if e.not_before is None or e.not_before.timestamp() <= time.time():
                    yield e

        candidates = due()
        while True:
            if self.stopping.is_set():
                return None, started
            free = settings.concurrency - self._busy()
            if free <= 0:
                if not await self._slot_freed():
                    return None, started  # a running task's end (ours or another daemon's) comes as news
                continue
            claimed, gate = await asyncio.to_thread(
                ledger.start_many, self.sp, settings, candidates, self._claimer(settings), free,
                finishing=frozenset(self._finishing), undo=self._unclaim,
            )
            for c in claimed:
                started += 1
                self.running[c.task.id] = Running(c, asyncio.ensure_future(self._execute(c)))
            if gate.waits:
                if self._held_logged != gate.reason:
                    log.info("waiting until %s: %s", iso(gate.wait_until) or "a running task ends", gate.reason)
                    self._held_logged = gate.reason
                return gate.wait_until, started
            self._held_logged = None
            if len(claimed) < free:  # the due entries ran out
                break
        now = time.time()
        later = [e.not_before.timestamp() for e in listing.timed() if e.not_before and e.not_before.timestamp() > now]
        return (min(later) if later else None), started

    def _claimer(self, settings: config.Settings) -> Callable[[spool.QueuedEntry, float], transitions.Claimed | None]:
        """transitions.claim, except for a task that must not start yet; it goes back to the queue with a not_before
        and counts as no start: a model family whose own window is rejected or past the reserve (weekly Opus:
        other families' tasks still start), or a follow-up whose earlier task has not finished."""
        families = ledger.reserve_holds(ledger.read_usage(self.sp), settings, time.time())
        families.pop(None, None)

        def claim(entry: spool.QueuedEntry, t: float) -> transitions.Claimed | None:
            c = transitions.claim(self.sp, entry, settings.default_model, started=t)
            if c is None:
                return None
            family = family_of(c.task.model) if families else None
            wait = families.get(family)
            if wait is None and c.task.resume and not options.finished(self.sp, c.task.resume):
                wait = (time.time() + options.RESUME_WAIT_S, f"waiting for {c.task.resume}, the task it continues")
            if wait is None:
                return c
            transitions.requeue(self.sp, c, wait[1], count_attempt=False,
                                not_before=datetime.fromtimestamp(wait[0], UTC))
            return None  # not a start: the ledger does not count it

        return claim

    def _unclaim(self, claims: list[transitions.Claimed]) -> None:
        for c in claims:
            try:
                transitions.unclaim(self.sp, c)
            except OSError as e:  # still ours in running/: recovery of our strays puts it back
                log.warning("could not put %s back in the queue (%s)", c.task.id, e.strerror or e)

    def _busy(self) -> int:
        """Slots in use. A finished run frees its slot while its outcome is written, except under a budget:
        its cost must be counted before the next admission, or one more task runs past the budget."""
        if self.settings.budget_day_usd is not None or self.settings.budget_month_usd is not None:
            return len(self.running)
        return len(self.running) - len(self._finishing)

    async def _slot_freed(self) -> bool:
        """Wait, keeping this turn's listing, until one of our tasks frees a slot (True) or until anything
        else may change what to start: news from the watcher, a stop, the next periodic scan (False).

        So a deep queue is listed once for many starts, not once per start.
        """
        timeout = self.settings.scan_interval_s - (time.monotonic() - self._last_scan)
        while self._busy() >= self.settings.concurrency:
            if self.news.is_set() or self.stopping.is_set() or timeout <= 0 or self._more_intake:
                return False  # (more dropped files to take in: back to intake, then list again)
            self.slot_freed.clear()
            waits = [asyncio.ensure_future(self.slot_freed.wait()), asyncio.ensure_future(self.news.wait())]
            _, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for w in pending:
                w.cancel()
            timeout = self.settings.scan_interval_s - (time.monotonic() - self._last_scan)
        return True

    # ---- one task ----------------------------------------------------------------

    async def _execute(self, claimed: transitions.Claimed) -> None:
        task = claimed.task
        settings = self.settings
        backend = get_backend(settings)
        try:
            try:
                ctx = options.context(self.sp, settings, task, self.workdir)
                inv = await asyncio.to_thread(partial(backend.invocation, task, settings, ctx.cwd,
                                                      profile=ctx.profile, session=ctx.session))
                feed, drain = self._partial_writer(claimed, backend.progress())
                try:
                    proc = await run_process(inv, task.timeout or settings.timeout_s, on_stdout=feed)
                finally:
                    await drain()
            except (CliUnusable, options.NotYet, BadInput, OSError) as e:  # the CLI never ran this task
                outcome, proc = self._not_run(e, settings), ProcResult(None, b"", b"")
                await asyncio.to_thread(ledger.forget_start, self.sp, settings, claimed.started.timestamp())
            else:
                outcome = backend.classify(task, proc)
            self._finishing.add(task.id)
            self.slot_freed.set()
            self.wake.set()  # its slot is free: the next task may start while this one is written
            await self._settle_when_writable(claimed, outcome, proc)
        except asyncio.CancelledError:
            reason = self.running[task.id].stop_reason if task.id in self.running else "stop"
            if reason == "cancel":
                transitions.cancel_running(self.sp, claimed, "cancelled by request")
            else:
                transitions.requeue(self.sp, claimed, "the daemon stopped while it ran", count_attempt=False)
        except Exception:
            log.exception("internal error on %s; requeued", task.id)
            with contextlib.suppress(Exception):
                transitions.requeue(self.sp, claimed, "internal error in spoold (see its log)", count_attempt=True)
        finally:
            self.running.pop(task.id, None)
            self._finishing.discard(task.id)
            self.slot_freed.set()
            self.wake.set()

    def _partial_writer(self, claimed: transitions.Claimed, progress: Progress
                        ) -> tuple[Callable[[bytes], None], Callable[[], Awaitable[None]]]:
        """Keep `running/ID@OWNER.partial` up to date: written whole (tmp, fsync, rename) at most every
        PARTIAL_EVERY_S, in a worker thread, never two writes at once: an fsync per few seconds, not per token.
        `drain` waits for a write in flight and stops new ones, so none lands after the task has moved on."""
        path = spool.partial_path(claimed.path)
        state: dict[str, object] = {"last": 0.0, "busy": False, "closed": False}
        jobs: list[asyncio.Future[None]] = []

        def write(text: str) -> None:
            try:
                spool.rewrite(self.sp, path, text.encode(), sync_dir=False)
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

    @staticmethod
    def _not_run(e: Exception, settings: config.Settings) -> Outcome:
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

    async def _settle_when_writable(self, claimed: transitions.Claimed, outcome: Outcome, proc: ProcResult) -> None:
        """Settle a finished run; while the spool cannot be written, keep its answer here and try again."""
        failures = 0
        while True:
            if failures and not claimed.path.exists():
                return  # the move itself went through before the error: settled
            try:
                await _to_thread_to_the_end(self._settle, claimed, outcome, proc)
                return
            except OSError as e:
                failures += 1
                if failures == 1:
                    log.error("cannot record the outcome of %s (%s); keeping it and retrying", claimed.task.id,
                              e.strerror or e)
                await asyncio.sleep(backoff(failures, WRITE_RETRY_S, self.settings.scan_interval_s))

    def _settle(self, claimed: transitions.Claimed, outcome: Outcome, proc: ProcResult) -> None:
        """Move the task where its outcome puts it, and tell the ledger."""
        task, settings = claimed.task, self.settings
        seen = {w.name: ledger.WindowSeen(w.status, w.resets_at, w.utilization, time.time(), task.id)
                for w in outcome.windows}
        if outcome.kind == "hold":
            until = outcome.hold_until or datetime.now(UTC) + timedelta(minutes=30)
            ledger.set_hold(self.sp, settings, until.timestamp(), outcome.error or "held", seen)
            log.warning("holding the queue until %s: %s", iso(until), outcome.error)
            transitions.requeue(self.sp, claimed, outcome.error or "held", count_attempt=False)
            return
        if outcome.kind == "wait":
            if seen:  # a family's rejected window: the claimer holds that family's other tasks too
                ledger.record_finish(self.sp, settings, outcome.cost_usd, None, seen)
            transitions.requeue(self.sp, claimed, outcome.error or "waiting", count_attempt=False,
                                not_before=outcome.hold_until)
            log.info("%s waits until %s: %s", task.id, iso(outcome.hold_until) or "later", outcome.error)
            return
        if outcome.kind == "retry" and claimed.attempt < settings.max_attempts:
            if seen or outcome.cost_usd:  # a failed try may still have cost something
                ledger.record_finish(self.sp, settings, outcome.cost_usd, None, seen)
            delay = backoff(claimed.attempt, settings.retry_backoff_s, MAX_BACKOFF_S)
            transitions.requeue(self.sp, claimed, f"{outcome.error}; retry {claimed.attempt + 1} in {delay:.0f} s",
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
        transitions.finish(self.sp, claimed, result)
        ledger.record_finish(self.sp, settings, outcome.cost_usd, proc.duration_s if status == "done" else None, seen)


def backoff(n: int, base: float, cap: float) -> float:
    """The wait before try n+1 after n failures: base, 2*base, 4*base, ... up to cap (the one backoff rule)."""
    return min(cap, base * 2 ** min(max(n, 1) - 1, 30))


async def _to_thread_to_the_end(fn: Callable[..., None], *args: object) -> None:
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


def serve(sp: Spool, overrides: dict[str, object] | None = None, *, once: bool = False) -> int:
    return asyncio.run(Daemon(sp, overrides, once=once).run())
