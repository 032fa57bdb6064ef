"""The backend interface: build an invocation for a task, classify what the process did.

A backend never starts processes itself; `run_process` does that for all of
them, so timeouts, cancellation and process-group cleanup live in one place.
"""

from __future__ import annotations

import contextlib
import os
import select
import selectors
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

from spoold.config import Profile, Settings
from spoold.task import Task

OutcomeKind = Literal["done", "failed", "retry", "hold", "wait"]
STDERR_KEEP = 64 * 1024
PIPE_GRACE_S = 2.0  # how long output may trail the CLI's exit
EXIT_POLL_S = 0.05  # where the leader has no pidfd to wait on
PIPE_CHUNK = 65536


@dataclass
class Window:
    """What the provider said of one usage window (five_hour, seven_day, seven_day_opus, ...)."""

    name: str
    status: str  # allowed, allowed_warning, rejected
    resets_at: float | None = None  # epoch seconds
    utilization: float | None = None  # 0-1, once the provider reports it


@dataclass
class Outcome:
    """What became of one run: done, failed (permanent), retry (transient), hold (the account can't run now),
    or wait (this task alone must wait until hold_until: a follow-up whose earlier task has not finished)."""

    kind: OutcomeKind
    answer: str = ""
    error: str | None = None
    model_resolved: str | None = None
    cost_usd: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_creation_tokens: int | None = None
    session_id: str | None = None
    hold_until: datetime | None = None
    windows: list[Window] = field(default_factory=list)
    structured: object = None  # the JSON a task's `schema:` asked for, when it produced it
    counted: bool = True  # the run used a start of the limit (not when the account refused it: not logged in)
    this_host: bool = False  # a hold about this machine (its CLI cannot run), not the account: other hosts go on


@dataclass
class Invocation:
    argv: list[str]
    env: dict[str, str]
    stdin: bytes
    cwd: Path


@dataclass
class ProcResult:
    returncode: int | None
    stdout: bytes
    stderr: bytes  # the last STDERR_KEEP bytes
    timed_out: bool = False
    duration_s: float = 0.0
    stopped: bool = False  # a Stop's request ended it (not one that came after it had exited)


class Progress(Protocol):
    """One run's answer so far: `feed` takes each chunk of stdout (True when the answer grew), `text` builds
    the answer only when asked, since a writer wants it every few seconds, not at every token."""

    def feed(self, chunk: bytes) -> bool: ...

    def text(self) -> str: ...


class Backend(Protocol):
    def check(self, settings: Settings) -> list[str]:
        """Problems worth saying at daemon start (raises CliUnusable for one that stops every task)."""
        ...

    def invocation(self, task: Task, settings: Settings, cwd: Path, *, profile: Profile | None = None,
                   session: str | None = None) -> Invocation: ...

    def classify(self, task: Task, proc: ProcResult) -> Outcome: ...

    def progress(self) -> Progress:
        """A reader of one run's stdout as it comes."""
        ...


def get_backend(settings: Settings) -> Backend:
    if settings.backend == "command":
        from spoold.backends.command import CommandBackend

        return CommandBackend(settings.command)
    from spoold.backends.claude import ClaudeBackend

    return ClaudeBackend()


_environ: tuple[dict[bytes, bytes], dict[str, str]] = ({}, {})


def environ() -> dict[str, str]:
    """A copy of this process's environment for a task's process to start from.

    os.environ decodes every variable in Python on each copy, ~0.3 ms a task; its raw bytes are
    compared in C instead, and decoded again only when they changed."""
    raw = getattr(os.environ, "_data", None)
    global _environ
    if not isinstance(raw, dict):
        return dict(os.environ)
    if raw != _environ[0]:
        _environ = (dict(raw), dict(os.environ))
    return dict(_environ[1])


class Stop:
    """A request, from any thread, that a run end now: its process group is terminated, then killed.

    A pipe wakes the thread that runs the process at once, however quiet the process is."""

    def __init__(self) -> None:
        self.requested = False
        self.reason = "stop"
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def request(self, reason: str = "stop") -> None:
        """Ask; `reason` (cancel, stop) says what becomes of the task. A stop outranks a cancel asked before it
        (the daemon is going: a finished run's outcome that cannot be written yet waits no longer)."""
        if not self.requested:
            self.reason, self.requested = reason, True
            with contextlib.suppress(OSError):
                os.write(self._w, b"x")
        elif reason == "stop":
            self.reason = "stop"

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to timeout_s, woken early by a request; True when one was made."""
        if not self.requested:
            waiter = select.poll()  # (not select.select: it cannot wait on a descriptor past 1023)
            waiter.register(self._r, select.POLLIN)
            waiter.poll(max(0, int(timeout_s * 1000)))
        return self.requested

    def close(self) -> None:
        for fd in (self._r, self._w):
            with contextlib.suppress(OSError):
                os.close(fd)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def run_process(inv: Invocation, timeout_s: float, on_stdout: Callable[[bytes], None] | None = None,
                stop: Stop | None = None, term_grace_s: float = 3.0) -> ProcResult:
    """Run one invocation in its own process group, in the calling thread, to its end.

    Blocking on one selector (the pipes, the leader's pidfd, the stop pipe) costs a fraction of
    asyncio's subprocess transports, and a run holds no event-loop turn. On timeout or `stop` the
    group gets SIGTERM, then SIGKILL after `term_grace_s`. The leader's exit ends the run: a child it
    left holding our pipes gets PIPE_GRACE_S, then the group is killed, then its output is let go.
    """
    t0 = time.monotonic()
    proc = subprocess.Popen(inv.argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=inv.env, cwd=inv.cwd, start_new_session=True)
    assert proc.stdin and proc.stdout and proc.stderr
    out, err = bytearray(), bytearray()
    fds = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
    pidfd, sel = -1, None
    try:
        with contextlib.suppress(AttributeError, OSError):  # Linux 5.3+; elsewhere the leader is polled
            pidfd = os.pidfd_open(proc.pid)
        sel = selectors.DefaultSelector()
        for fd in fds:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        stdin_fd, pending = proc.stdin.fileno(), memoryview(inv.stdin)
        if pending:
            os.set_blocking(stdin_fd, False)
            sel.register(stdin_fd, selectors.EVENT_WRITE)
        else:
            proc.stdin.close()
        if pidfd >= 0:
            sel.register(pidfd, selectors.EVENT_READ)
        if stop is not None:
            sel.register(stop._r, selectors.EVENT_READ)
        deadline, kill_at, let_go_at = t0 + timeout_s, None, None
        timed_out = stopping = group_killed = False
        while True:
            now = time.monotonic()
            if let_go_at is None and proc.poll() is not None:
                let_go_at = now + PIPE_GRACE_S  # the leader is gone: its output may trail it a little
            if let_go_at is not None and not fds:
                break
            if not stopping and let_go_at is None and ((stop is not None and stop.requested) or now >= deadline):
                timed_out, stopping = not (stop is not None and stop.requested), True
                _signal_group(proc.pid, signal.SIGTERM)
                kill_at = now + term_grace_s
            if kill_at is not None and now >= kill_at:
                if proc.returncode is None:
                    _signal_group(proc.pid, signal.SIGKILL)
                kill_at = None
            if let_go_at is not None and now >= let_go_at:
                if group_killed:
                    break  # it left our process group: keep what was read
                _signal_group(proc.pid, signal.SIGKILL)  # a child kept our pipes open: it goes too
                group_killed, let_go_at = True, now + PIPE_GRACE_S
            waits = [t for t in (None if stopping or let_go_at else deadline, kill_at, let_go_at) if t is not None]
            timeout = max(0.0, min(waits) - now) if waits else None
            if pidfd < 0 and proc.returncode is None:
                timeout = EXIT_POLL_S if timeout is None else min(timeout, EXIT_POLL_S)
            for key, _ in sel.select(timeout):
                fd = key.fd
                if fd == stdin_fd:
                    try:
                        pending = pending[os.write(fd, pending[:PIPE_CHUNK]):]
                    except BlockingIOError:
                        continue
                    except (BrokenPipeError, ConnectionResetError):
                        pending = pending[:0]  # the child did not read its stdin; its output says why
                    if not pending:
                        sel.unregister(fd)
                        proc.stdin.close()
                elif fd in fds:
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(fd)
                        del fds[fd]
                        continue
                    buf = fds[fd]
                    if buf is out and on_stdout is not None:
                        on_stdout(chunk)
                    buf += chunk
                    if buf is err and len(buf) > 2 * STDERR_KEEP:
                        del buf[:-STDERR_KEEP]
                elif fd == pidfd:
                    sel.unregister(fd)  # the leader exited: the loop's poll() reaps it
                elif stop is not None and fd == stop._r:
                    sel.unregister(fd)
        if stopping:
            _signal_group(proc.pid, signal.SIGKILL)  # what of the group outlived the leader we stopped
    except BaseException:
        _signal_group(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        if sel is not None:
            sel.close()
        if pidfd >= 0:
            os.close(pidfd)
        for f in (proc.stdin, proc.stdout, proc.stderr):
            with contextlib.suppress(OSError):
                f.close()
    return ProcResult(proc.returncode, bytes(out), bytes(err[-STDERR_KEEP:]), timed_out, time.monotonic() - t0,
                      stopped=stopping and not timed_out)
