"""The daemon: recovery, the serving loop, dispatch under the ledger, and graceful stop.

The only asynchronous part of spoold, in three parts a reader can hold one at a time: the
watcher (spoold.watcher: events wake the loop; a periodic scan covers what they miss), this
loop (intake, recovery, cancels, dispatch), and the runner (spoold.runner: one task, start to
outcome). The rule for threads: every call that touches the spool runs in a worker thread
(`asyncio.to_thread`); the event loop only waits, decides and keeps the state of `Daemon`,
so it never stalls on an fsync or a 100,000-name listing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from spoold import (
    census,
    config,
    durability,
    hosts,
    intake,
    ledger,
    leftovers,
    notify,
    options,
    owners,
    recovery,
    runner,
    spool,
    transitions,
)
from spoold.backends import Stop, get_backend
from spoold.errors import CliUnusable, SpooldError
from spoold.runner import WRITE_RETRY_S
from spoold.spool import Spool
from spoold.units import backoff, family_of, iso
from spoold.watcher import Watcher

log = logging.getLogger("spoold")
PENDING_RECHECK_S = 0.05
ONCE_PENDING_S = 3.0  # `run --once` waits this long for a file still being written or put in place
INTAKE_BATCH = 256  # files taken in per turn: a dropped corpus starts running while it is still taken in
INTAKE_FIRST = 16  # ... when nothing runs: the first task of a corpus starts after 16 fsyncs, not 256
VIEW_REFRESH_S = 1.0  # how often the other hosts' heartbeats are read (a few small files)
RUN_THREADS = 1024  # a thread per running task (started as needed): far above any sensible concurrency
HELD_FOR_PERSON = 7  # `run --once` stopped behind a hold only a person ends (logged out, no credit, no CLI)
LISTING_SHARE = 10  # a listing of queued/ serves at least ten times what it took: over a million queued tasks
# (~3 s a listing here) a pass relisted every scan interval and spent a third of its time listing
TIDY_S = 60.0  # how often a daemon on a synced spool removes sync tools' identical conflict copies


@dataclass
class Running:
    claimed: transitions.Claimed
    job: asyncio.Future[None]  # its thread's work, start to outcome (spoold.runner.run)
    stop: Stop  # asked once we interrupt it ("cancel" or "stop")


class Daemon:
    def __init__(self, sp: Spool, overrides: dict[str, object] | None = None, *, once: bool = False) -> None:
        self.sp = sp
        self.overrides = overrides or {}
        self.once = once
        self.exit_code = 0  # --once: HELD_FOR_PERSON when it stops behind a hold only a person can end
        self.settings = config.load(sp.config_path, self.overrides)
        self._config_mtime = self._mtime(sp.config_path)
        self.running: dict[str, Running] = {}
        self.wake = asyncio.Event()
        self.stopping = asyncio.Event()
        self.workdir = spool.work_dir(sp)
        self.workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._last_scan = 0.0
        self._listed_at = 0.0  # when this dispatch pass listed queued/
        self._listing_s = 0.0  # what the last listing of queued/ took (see _rescan_every)
        self._scanned: spool.QueuedListing | None = None  # queued/ as the last full scan listed it
        self._held_logged: str | None = None
        self._write_failures = 0
        self._finishing: set[str] = set()  # ids whose process exited; their outcome is being written
        self.news = asyncio.Event()  # the watcher saw something that may be new work (or stop was asked)
        self.inbox_news = asyncio.Event()  # ... in inbox/ alone: intake's to answer, beside the runs
        self.fresh = asyncio.Event()  # intake queued tasks since this turn's listing
        self.slot_freed = asyncio.Event()
        self._more_intake = False  # the last intake stopped at its batch limit
        self._pending = False  # the last intake saw files not yet complete: look again soon
        self._pending_since: float | None = None  # (monotonic) since when intakes have seen such files
        self._queued_waiting = False  # the last full scan saw a foreign file in queued/ not yet complete
        self._queued_timer: asyncio.TimerHandle | None = None  # the one full scan scheduled for it
        self._queued_rechecks = 0  # full scans in a row that found it still pending (they back off)
        self._intaking: asyncio.Future[intake.IntakeReport] | None = None  # the inbox taken in, in a thread
        self._intake_error: BaseException | None = None  # what stopped it, raised in the next turn
        self.watcher = Watcher(sp, self._news)
        self._foreign_seen = 0  # the watcher's count of foreign files in queued/ when we last looked
        self.courier = notify.Courier(sp, lambda: self.settings)
        self._holding: tuple[float, str] | None = None  # the hold we told about, until its end
        self._ran_since_drained = False
        self._queue_empty = False
        self._gate: ledger.Gate | None = None  # the last admission's answer, for the queue's events
        self.hosts = hosts.Membership(spool.owner_host(spool.owner_tag()))
        self._beat_seq = 0
        self._beat_ok = True
        self._since = time.time()
        self._last_tidy = 0.0
        self._told_leftovers: set[str] = set()
        self._runs = ThreadPoolExecutor(max_workers=RUN_THREADS, thread_name_prefix="spoold-run")

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
        try:  # the other hosts first: recovery on a synced spool names its results by what they say
            await asyncio.to_thread(self._beat_and_look)
        except OSError as e:
            log.warning("could not read the hosts' heartbeats (%s)", e.strerror or e)
        try:
            for action in recovery.recover(self.sp, max_attempts=self.settings.max_attempts):
                log.info("recovery: %s", action)
        except OSError as e:
            self._cannot_write(e)  # the loop's first turn recovers again once it can
        beating = asyncio.ensure_future(self._beating())
        committing = asyncio.ensure_future(self._committing())
        watcher = asyncio.ensure_future(self.watcher.run(self.stopping))
        courier = asyncio.ensure_future(self.courier.run(self.stopping))
        checking = asyncio.ensure_future(self._check_backend())  # alongside serving: it may take seconds
        await self.watcher.ready(self.settings.scan_interval_s)
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
            self.stopping.set()  # (--once ends without a signal)
            self.courier.wake.set()  # its pass in flight ends (a delivery never stops halfway), then it stops
            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(courier, self.settings.grace_s)
            self.courier.stop()
            with contextlib.suppress(Exception):  # a beat being written must land before our beat is dropped
                await asyncio.wait_for(beating, VIEW_REFRESH_S * 5)
            for background in (watcher, checking, courier, beating, committing):
                background.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await background
            self._commit()  # the last writes of a batch, before we say we stopped
            if note is not None:
                note.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                hosts.drop_beat(self.sp, spool.owner_tag())
            owners.let_go(self.sp, owner_lock)
            self._runs.shutdown(wait=False)
            log.info("stopped")
        return self.exit_code

    async def _committing(self) -> None:
        """Group commit (`durability: batch`, spoold.durability): one flush every commit_interval_ms for what the
        threads wrote meanwhile, instead of an fsync or two per file; on a filesystem where that could lose
        more than the interval, full durability, said once."""
        unsafe: str | bool | None = False  # not looked at yet
        while not self.stopping.is_set():
            batch = self.settings.durability == "batch"  # a reload may change it
            if batch and unsafe is False:
                unsafe = await asyncio.to_thread(durability.problem, self.sp.root)
                if unsafe:
                    log.warning("durability: batch is off: %s; every write is fsynced as it happens", unsafe)
            self.sp.local.batch = batch = batch and not unsafe
            if not batch and self.sp.local.dirty:  # switched off by a reload: what it left, flushed now
                await asyncio.to_thread(self._commit)
            with contextlib.suppress(TimeoutError):  # full durability: only a reload can make work here
                await asyncio.wait_for(self.stopping.wait(), self.settings.commit_interval_ms / 1000 if batch else 5.0)
            if self.sp.local.dirty:
                await asyncio.to_thread(self._commit)

    def _commit(self) -> None:
        try:
            durability.commit(self.sp)
        except OSError as e:  # the next interval tries again; until then the writes are as safe as a kill's
            log.warning("group commit failed (%s); trying again", e.strerror or e)

    async def _check_backend(self) -> None:
        """Say what will stop tasks before the first one meets it; the tasks themselves wait, never fail, for it."""
        try:
            for problem in await asyncio.to_thread(get_backend(self.settings).check, self.settings):
                log.warning("%s", problem)
        except CliUnusable as e:
            log.error("tasks cannot run yet: %s", e)
            return
        try:  # the CLI runs now: a hold from when it could not (set by this host alone) has no cause left
            if await asyncio.to_thread(ledger.clear_host_hold, self.sp, self.settings):
                log.info("lifted this host's hold for its CLI: the CLI runs now")
                self.wake.set()
        except OSError as e:
            log.warning("could not lift this host's hold for its CLI (%s); it ends by itself", e.strerror or e)

    # ---- the other hosts on a synced spool ---------------------------------------

    def _beat_and_look(self, write: bool = True, running: tuple[str, ...] = ()) -> bool:
        """Write our heartbeat (when due) and fold in everyone's; True when who owns what changed. A thread's work.

        A beat that cannot be written makes us take nothing on a synced spool (the others would soon count
        us as gone), but we still read theirs."""
        if write:
            self._beat_seq += 1
            try:
                hosts.write_beat(self.sp, self.hosts.beat(spool.owner_tag(), self._beat_seq, self.settings,
                                                          running, self._since))
                self._beat_ok = True
            except OSError as e:
                if self._beat_ok:
                    log.warning("could not write this host's heartbeat (%s)", e.strerror or e)
                self._beat_ok = False
        changed = self.hosts.refresh(hosts.read_beats(self.sp), self.settings, beat_ok=self._beat_ok,
                                     alive_here=lambda owner: owners.owner_alive(self.sp, owner),
                                     own=(spool.owner_tag(), self._beat_seq if self._beat_ok else None))
        for owner in self.hosts.remove:
            with contextlib.suppress(OSError):
                hosts.drop_beat(self.sp, owner)
        view, local = self.hosts.view, self.sp.local
        local.peers = view.peers
        local.in_touch_until = time.time() + self.settings.heartbeat_s if view.in_touch else 0.0
        return changed

    async def _beating(self) -> None:
        """Heartbeats every heartbeat_s, and at once when our view changed (so the others learn we see them);
        the others' read every second. The loop wakes when tasks may have moved to us: a change, or the
        end of a handover."""
        last_beat, looked = time.monotonic(), time.time()
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), VIEW_REFRESH_S)
            if self.stopping.is_set():
                return
            due = time.monotonic() - last_beat >= self.settings.heartbeat_s
            try:
                changed = await asyncio.to_thread(self._beat_and_look, due, tuple(self.running))
                if changed and not due:
                    await asyncio.to_thread(self._beat_and_look, True, tuple(self.running))
                    due = True
            except OSError as e:  # the heartbeats cannot be read: the view stays as it was, and ages
                log.warning("could not read the hosts' heartbeats (%s)", e.strerror or e)
                continue
            if due:
                last_beat = time.monotonic()
            if self.hosts.twin is not None:
                log.error("another machine uses this host id (%s: its daemon %s beats here); give each machine its "
                          "own: set SPOOLD_HOST_ID, or delete ~/.config/spoold/host_id on one of them; stopping",
                          spool.owner_host(self.hosts.twin), self.hosts.twin)
                self.request_stop()
                return
            ends, now = self.hosts.handover_ends(self.settings), time.time()
            if changed or looked < ends <= now:  # news: it ends a pass, whose listing may hold tasks now ours
                self._news()
            looked = now

    def _mine(self, key: str) -> bool:
        return self.hosts.view.mine(key, self.settings.handover_s)

    def _silent(self, host: str) -> bool:
        """A host whose running tasks we may run again: silent for running_lease_s, as seen here."""
        silent = self.hosts.silent_for(host)
        return silent is not None and silent >= self.settings.running_lease_s

    def _news(self, inbox_only: bool = False) -> None:
        (self.inbox_news if inbox_only else self.news).set()
        self.wake.set()

    def request_stop(self) -> None:
        if not self.stopping.is_set():
            log.info("stopping: no new tasks; waiting up to %g s for running ones", self.settings.grace_s)
        self.stopping.set()
        self.news.set()
        self.wake.set()

    async def _serve(self) -> None:
        while not self.stopping.is_set():
            self.wake.clear()
            self.news.clear()  # before this turn looks at anything: news from now on ends its dispatch pass
            self.fresh.clear()
            await self._maybe_reload()
            try:
                pending = await self._intake_and_recover()
                await self._check_cancels()
                wait_until, started = await self._dispatch()
                await self._tell_queue(started)
                if not started and not self.running:  # idle: make recent run times visible to estimates
                    await asyncio.to_thread(ledger.flush, self.sp, self.settings)
            except OSError as e:  # disk full, read-only, quota: hold with every task where it was
                delay = self._cannot_write(e)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), delay)
                continue
            self._can_write()
            if self.once and not self.running and await self._drained(wait_until):
                return
            timeout = self.settings.scan_interval_s
            if pending and self._intaking is None:  # (a running intake wakes us when it ends)
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

    async def _drained(self, wait_until: float | None) -> bool:
        """--once ends when no queued task can start now: the queue is empty, or it waits on the limit."""
        if self._intaking is not None or self._more_intake:
            return False
        if self._pending_since is not None and time.monotonic() - self._pending_since < ONCE_PENDING_S:
            return False  # a file being written or put in place (a synced one: for a second): taken in this run
        if wait_until is not None:
            usage = await asyncio.to_thread(ledger.read_usage, self.sp)
            if usage.hold_person and usage.hold_until is not None:  # cron must hear of it: nothing ends it alone
                self.exit_code = HELD_FOR_PERSON
                log.error("--once: stopping behind a hold a person must end (until %s): %s", iso(usage.hold_until),
                          usage.hold_reason)
            else:
                log.info("--once: stopping; the next start waits until %s", iso(wait_until))
            return True
        listing = await asyncio.to_thread(spool.list_queued, self.sp)
        view = self.hosts.view
        if view.shared:  # a synced spool: only what this host owns counts, handover or not
            if not view.ready and time.time() - self._since < self.settings.host_lease_s:
                return False  # the others have not seen us yet (or a dead host's beat counts live for a lease)
            mine = [e for e in listing if hosts.owner_of(e.task_id, view.members) == view.host]
            return ledger.next_eligible(mine, time.time()) is None
        return ledger.next_eligible(listing, time.time()) is None

    async def _shutdown(self) -> None:
        with contextlib.suppress(Exception):  # a batch being taken in lands whole (each file is atomic anyway)
            await self._intake_ended()
        if not self.running:
            return
        jobs = [r.job for r in self.running.values()]
        _, still = await asyncio.wait(jobs, timeout=self.settings.grace_s)
        for r in list(self.running.values()):
            if r.job in still:
                r.stop.request("stop")
        if still:
            await asyncio.wait(still)

    # ---- each turn of the loop -------------------------------------------------

    async def _maybe_reload(self) -> None:
        mtime = self._mtime(self.sp.config_path)
        if mtime == self._config_mtime:
            return
        self._config_mtime = mtime
        try:
            self.settings = await asyncio.to_thread(config.load, self.sp.config_path, self.overrides)
            log.info("config reloaded: %d per %g min, concurrency %d", self.settings.max_requests,
                     self.settings.window_minutes, self.settings.concurrency)
        except SpooldError as e:
            log.error("config not reloaded, keeping the previous one: %s", e)

    async def _intake_and_recover(self) -> bool:
        """Take new files into the queue (and, every rescan interval, recover) in a worker thread.

        The inbox alone is taken in beside this turn's claims and runs (`_start_intake`): a corpus being
        taken in, fsync by fsync, never holds up a start. A full scan (queued/'s foreign files, recovery)
        waits for that intake and runs before the claims, since recovery must see every claim made.
        """
        foreign, self._foreign_seen = self.watcher.foreign_seen != self._foreign_seen, self.watcher.foreign_seen
        full = time.monotonic() - self._last_scan > self._rescan_every() or foreign
        if full:
            await self._intake_ended()
        self._raise_intake_error()
        if not full:
            self._start_intake()
            return self._pending
        settings, running_here = self.settings, set(self.running)

        view = self.hosts.view
        shared = view.shared
        mine = self._mine if shared else None
        tidy = view.peers and time.monotonic() - self._last_tidy > TIDY_S
        if tidy:
            self._last_tidy = time.monotonic()

        def work() -> intake.IntakeReport:
            report = intake.scan(self.sp, default_model=settings.default_model, max_bytes=settings.max_bytes,
                                 include_queued=True, limit=INTAKE_BATCH, settings=settings, mine=mine,
                                 announce=self.watcher.expect)
            for action in recovery.recover(self.sp, max_attempts=settings.max_attempts, running_here=running_here,
                                           silent=self._silent if shared else None):
                log.info("recovery: %s", action)
            if tidy:
                for left in set(leftovers.tidy(self.sp)) - self._told_leftovers:
                    self._told_leftovers.add(left)  # said once; `spoold status` keeps listing it
                    log.warning("sync leftover kept (it differs from its original): %s", left)
            return report

        self.inbox_news.clear()
        report = await asyncio.to_thread(work)
        self._scanned = report.listing
        if report.listing is not None:  # (a scan stopped at its batch limit in inbox/ did not look at queued/)
            self._listing_s, self._queued_waiting = report.listing.seconds, report.pending_queued
        self._note(report)
        self._last_scan = time.monotonic()
        self._schedule_queued_recheck()
        if report.more:
            self._start_intake()
        return self._pending

    def _schedule_queued_recheck(self) -> None:
        """Only a full scan looks at queued/: one is scheduled for a foreign file there not yet complete, sooner
        the first times (a sync tool's arrival settles in a second), then backing off to the rescan interval (a
        writer holding it open for hours); a listing still serves ten times what it took."""
        if not self._queued_waiting:
            self._queued_rechecks = 0
            return
        if self._queued_timer is not None:
            return
        self._queued_rechecks += 1
        delay = max(LISTING_SHARE * self._listing_s,
                    backoff(self._queued_rechecks, PENDING_RECHECK_S, self._rescan_every()))
        self._queued_timer = asyncio.get_running_loop().call_later(delay, self._queued_recheck)

    def _queued_recheck(self) -> None:
        self._queued_timer = None
        self._last_scan = 0.0  # the next turn's scan is a full one
        self._news()

    def _note(self, report: intake.IntakeReport) -> None:
        """What an intake leaves for the next: more files past its batch, or files not yet complete."""
        self._more_intake, self._pending = report.more, bool(report.pending or report.more)
        waiting = report.pending or self._queued_waiting  # (an inbox intake does not look at queued/)
        self._pending_since = (self._pending_since or time.monotonic()) if waiting else None

    def _start_intake(self) -> None:
        """Take a batch of dropped files in, in a worker thread, unless a batch is being taken in already (the
        loop starts the next one when it ends: at a turn's start, or while it waits for a slot)."""
        if self._intaking is not None or self._intake_error is not None or self.stopping.is_set():
            return
        self.inbox_news.clear()
        settings, mine = self.settings, (self._mine if self.hosts.view.shared else None)
        self._intaking = asyncio.ensure_future(asyncio.to_thread(
            intake.scan, self.sp, default_model=settings.default_model, max_bytes=settings.max_bytes,
            include_queued=False, limit=INTAKE_BATCH if self.running else INTAKE_FIRST, settings=settings, mine=mine,
            announce=self.watcher.expect))
        self._intaking.add_done_callback(self._took_in)

    def _took_in(self, job: asyncio.Future[intake.IntakeReport]) -> None:
        """An intake ended: wake the loop only for what it brought (an empty one must not start a turn, which
        would start another intake: an idle daemon would spin)."""
        self._intaking = None
        if job.cancelled():
            return
        if (error := job.exception()) is not None:
            self._intake_error = error
            self.wake.set()
            return
        report = job.result()
        self._note(report)
        if report.queued or report.failed:
            self.fresh.set()
        if report.queued or report.failed or report.more:
            self.wake.set()
        elif report.pending:  # a file still being written (its close is no event): look again soon, as inbox
            asyncio.get_running_loop().call_later(PENDING_RECHECK_S, self._news, True)  # news, which a pass hears

    async def _intake_ended(self) -> None:
        """Wait for the intake in flight, if any (its error, if it failed, is raised by `_raise_intake_error`)."""
        if self._intaking is not None:
            await asyncio.wait((self._intaking,))

    def _raise_intake_error(self) -> None:
        error, self._intake_error = self._intake_error, None
        if error is not None:
            raise error

    async def _check_cancels(self) -> None:
        """Stop the runs someone asked to cancel (a `running/ID.cancel` marker): one listing of running/."""
        if not self.running:
            return
        names = await asyncio.to_thread(spool.running_names, self.sp)
        asked = {tid for tid in map(spool.parse_cancel_marker, names) if tid is not None}
        for task_id, r in list(self.running.items()):
            if not r.stop.requested and task_id not in self._finishing and task_id in asked:
                r.stop.request("cancel")

    async def _dispatch(self) -> tuple[float | None, int]:
        """Start tasks while the ledger admits them; return when the next start may be possible, and how many started.

        One listing of queued/ per turn: at 100,000 queued tasks a listing costs ~0.1 s, so
        it must not be repeated per start. A name another process claimed first is skipped.
        Claims run in a worker thread (their fsyncs must not stall the loop).
        """
        settings = self.settings
        listing = await asyncio.to_thread(self._list_queued)
        self._listed_at = time.monotonic()
        if not listing and self._intaking is not None:  # nothing to start but what is being taken in
            await self._intake_ended()
            self._raise_intake_error()
            self.fresh.clear()
            listing = await asyncio.to_thread(self._list_queued)
        self._queue_empty, self._gate = not listing, None
        entries = ledger.dispatch_order(listing, settings.strategy)
        started = 0

        view = self.hosts.view
        shared = view.shared

        passed_over: list[float] = []  # the soonest not_before this pass went past: it ends the pass once due

        def due() -> Iterator[spool.QueuedEntry]:  # consumed across batches: each entry is tried once a turn
            for e in entries:
                if e.not_before is not None and (at := e.not_before.timestamp()) > time.time():
                    if not passed_over or at < passed_over[0]:
                        passed_over[:] = [at]
                elif not shared or self._mine(e.task_id):
                    yield e

        candidates = due()
        while True:
            if self.stopping.is_set():
                return None, started
            free = settings.concurrency - self._busy()
            if free <= 0:
                if not await self._slot_freed(passed_over[0] if passed_over else None):
                    return None, started  # a running task's end (ours or another daemon's) comes as news
                continue
            claimed, gate = await asyncio.to_thread(  # (the loop's state read here, on the loop)
                self._start, settings, candidates, self._claimer(settings), free, frozenset(self._finishing),
                len(self.hosts.view.members))
            for c in claimed:
                started += 1
                stop = Stop()
                self.running[c.task.id] = Running(c, asyncio.ensure_future(self._execute(c, stop)), stop)
            self._gate = gate
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

    async def _tell_queue(self, started: int) -> None:
        """Queue-wide events for the owner's targets: held (once per hold), resumed (when a task may start
        again after it), drained (the queue ran empty after work)."""
        gate, events = self._gate, []
        if gate is not None and gate.held and gate.wait_until is not None:
            if self._holding is None or self._holding[1] != gate.reason:
                self._holding = (gate.wait_until, gate.reason or "held")
                events.append(("held", f"{gate.reason}; starts wait until {iso(gate.wait_until)}", gate.wait_until))
        elif gate is not None and self._holding is not None:
            until, reason = self._holding
            self._holding = None
            events.append(("resumed", f"tasks start again (the hold was: {reason})", until))
        self._ran_since_drained = self._ran_since_drained or started > 0
        if self._queue_empty and not self.running and not started and self._ran_since_drained:
            self._ran_since_drained = False
            events.append(("drained", "every queued task has run", time.time()))
        for kind, text, when in events:
            try:
                await asyncio.to_thread(notify.queue_event, self.sp, self.settings, kind, text, when)
            except OSError as e:
                log.warning("could not queue the %s notification (%s)", kind, e.strerror or e)
            self.courier.wake.set()

    def _list_queued(self) -> spool.QueuedListing:
        """The queue for a dispatch pass; a deep one's counts are kept for the next submit (a thread's work).

        The full scan just before lists queued/ too (for foreign files): while queued/ is as it was then (its
        stamp unchanged: nothing taken in, requeued or claimed since), that listing is this one. A daemon's
        first dispatch over a million queued tasks listed and checked every name twice (~3 s each here)."""
        scanned, self._scanned = self._scanned, None
        if scanned is not None and scanned.stamp == spool.dir_stamp(os.stat(self.sp.dir("queued"))):
            listing = scanned
        else:
            listing = spool.list_queued(self.sp)
            self._listing_s = listing.seconds
        census.keep(self.sp, listing)
        return listing

    def _start(self, settings: config.Settings, candidates: Iterator[spool.QueuedEntry],
               claim: Callable[[spool.QueuedEntry, float], transitions.Claimed | None], free: int,
               finishing: frozenset[str], members: int) -> tuple[list[transitions.Claimed], ledger.Gate]:
        """Admit and claim up to `free` tasks (in a worker thread): the ledger's write first, then the claims'
        directories made durable, so that on a journaled filesystem one commit carries both."""
        claimed, gate = ledger.start_many(self.sp, settings, candidates, claim, free, finishing=finishing,
                                          undo=self._unclaim, members=members)
        try:
            transitions.claims_durable(self.sp, claimed)
        except OSError:
            self._unclaim(claimed)  # not durable: they must not run (their starts stay counted: the limit holds)
            raise
        return claimed, gate

    def _claimer(self, settings: config.Settings) -> Callable[[spool.QueuedEntry, float], transitions.Claimed | None]:
        """transitions.claim, except for a task that must not start yet; it goes back to the queue with a not_before
        and counts as no start: a model family whose own window is rejected or past the reserve (weekly Opus:
        other families' tasks still start), or a follow-up whose earlier task has not finished."""
        read: list[dict[str | None, tuple[float, str]]] = []
        busy: set[str] = set(self.running)  # on a synced spool: tasks running anywhere (a queued copy came back)

        def claim(entry: spool.QueuedEntry, t: float) -> transitions.Claimed | None:  # runs in a worker thread
            if not read:  # once per batch, in the batch's thread (a file read: not on the loop)
                read.append(ledger.reserve_holds(ledger.read_usage(self.sp), settings, time.time()))
                read[0].pop(None, None)
                if self.sp.local.peers:
                    busy.update(e.task_id for e in spool.list_running(self.sp))
            families = read[0]
            if entry.task_id in busy:
                return None  # left queued: once the run ends, its claim finds it answered and drops it
            c = transitions.claim(self.sp, entry, settings.default_model, started=t, sync=False)
            if c is not None:
                busy.add(c.task.id)
            if c is None or (self.sp.local.peers and transitions.drop_answered(self.sp, c)):
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

    def _rescan_every(self) -> float:
        """Seconds between full scans (and so between a pass's listings of queued/): the scan interval, or ten
        times what listing queued/ takes if that is longer. What changes the queue meanwhile comes as news
        (a submit, a foreign file, another daemon's end); the periodic scan is for what the watcher missed, and
        recovery of dead owners' tasks, which can wait that long."""
        if not self.watcher.alive:  # nothing comes as news: the scan interval is all there is
            return self.settings.scan_interval_s
        return max(self.settings.scan_interval_s, LISTING_SHARE * self._listing_s)

    def _until_rescan(self) -> float:
        """How long this pass may keep its listing: a rescan interval from the last scan, or from the listing
        itself if that came later (a listing of a million names can take longer than the interval: counted
        from the scan, it ran out before its first slot freed, and every start cost a listing)."""
        return self._rescan_every() - (time.monotonic() - max(self._last_scan, self._listed_at))

    def _pass_left(self, due_at: float | None) -> float:
        """How long this pass may go on: until the next rescan, or until a task it passed over as not yet due
        (`due_at`) is due, though not sooner than a scan interval from its listing (a deep queue is listed
        again for it: at most once an interval, as before the rescan grew with the queue)."""
        left = self._until_rescan()
        if due_at is not None:
            since_listed = time.monotonic() - self._listed_at
            left = min(left, max(due_at - time.time(), self.settings.scan_interval_s - since_listed))
        return left

    async def _slot_freed(self, due_at: float | None = None) -> bool:
        """Wait, keeping this turn's listing, until one of our tasks frees a slot (True) or until anything
        else may change what to start: news from the watcher, a stop, the next periodic scan, a task passed
        over becoming due (False).

        So a deep queue is listed once for many starts, not once per start.
        """
        timeout = self._pass_left(due_at)
        while self._busy() >= self.settings.concurrency:
            if self.news.is_set() or self.stopping.is_set() or timeout <= 0 or self._intake_error is not None:
                return False
            if self.inbox_news.is_set() or self._more_intake:  # taken in while every slot is busy
                self._start_intake()
            self.slot_freed.clear()
            waits: list[asyncio.Future[Any]] = [asyncio.ensure_future(e.wait()) for e in (self.slot_freed, self.news)]
            if self._intaking is None:
                waits.append(asyncio.ensure_future(self.inbox_news.wait()))
            intaking = [self._intaking] if self._intaking is not None else []  # when it ends, the next batch starts
            await asyncio.wait([*waits, *intaking], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for w in waits:
                w.cancel()
            timeout = self._pass_left(due_at)
        return not self.fresh.is_set()  # tasks were queued meanwhile: list again, in a new turn, to see them

    # ---- one task ----------------------------------------------------------------

    async def _execute(self, claimed: transitions.Claimed, stop: Stop) -> None:
        """One task in its own thread, start to outcome: the loop hears of it twice, when its process exits
        (its slot is free: the next task may start while this one's outcome is written) and when it is done."""
        task_id, loop = claimed.task.id, asyncio.get_running_loop()

        def exited() -> None:
            self._finishing.add(task_id)
            self.slot_freed.set()
            self.wake.set()

        def exited_soon() -> None:  # (from the run's thread)
            loop.call_soon_threadsafe(exited)

        job = loop.run_in_executor(self._runs, runner.run, self.sp, self.settings, claimed, self.workdir,
                                   exited_soon, stop)
        told = True
        try:
            while True:
                try:
                    told = await asyncio.shield(job)  # a thread cannot stop halfway: a cancel asks it to stop
                    break
                except asyncio.CancelledError:
                    stop.request("stop")
                    if job.done():
                        raise
        finally:
            stop.close()
            self.running.pop(task_id, None)
            self._finishing.discard(task_id)
            self.slot_freed.set()
            self.wake.set()
            if told:
                self.courier.wake.set()


def serve(sp: Spool, overrides: dict[str, object] | None = None, *, once: bool = False) -> int:
    return asyncio.run(Daemon(sp, overrides, once=once).run())

