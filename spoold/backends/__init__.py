"""The backend interface: build an invocation for a task, classify what the process did.

A backend never starts processes itself; `run_process` does that for all of
them, so timeouts, cancellation and process-group cleanup live in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
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
EXIT_POLL_S = 0.05


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


async def _read_into(stream: asyncio.StreamReader, buf: bytearray, keep: int | None = None,
                     on_chunk: Callable[[bytes], None] | None = None) -> None:
    """Read a stream to its end into buf, keeping only its tail when asked (a chatty child can't eat our memory)."""
    while chunk := await stream.read(65536):
        if on_chunk is not None:
            on_chunk(chunk)
        buf += chunk
        if keep is not None and len(buf) > 2 * keep:
            del buf[:-keep]


async def _exited(proc: asyncio.subprocess.Process) -> None:
    """The leader's exit. Not proc.wait(), which also waits for every holder of our pipes to close them."""
    wait = asyncio.ensure_future(proc.wait())
    try:
        while proc.returncode is None and not wait.done():
            await asyncio.wait([wait], timeout=EXIT_POLL_S)
    finally:
        wait.cancel()


async def _pipes_closed(proc: asyncio.subprocess.Process, readers: list[asyncio.Future[None]]) -> None:
    """The leader has exited; a child it left behind holding our pipes must not keep the task open."""
    _, pending = await asyncio.wait(readers, timeout=PIPE_GRACE_S)
    if pending:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        _, pending = await asyncio.wait(pending, timeout=PIPE_GRACE_S)
        for t in pending:  # it left our process group: keep what was read
            t.cancel()


async def run_process(inv: Invocation, timeout_s: float,
                      on_stdout: Callable[[bytes], None] | None = None) -> ProcResult:
    """Run one invocation in its own process group; on timeout or cancel the group is terminated, then killed."""
    t0 = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *inv.argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=inv.env,
        cwd=inv.cwd,
        start_new_session=True,
    )
    assert proc.stdin and proc.stdout and proc.stderr
    stdin = proc.stdin

    async def feed() -> None:
        try:
            stdin.write(inv.stdin)
            await stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the child did not read its stdin; its output says why
        finally:
            stdin.close()

    out, err = bytearray(), bytearray()
    out_task = asyncio.ensure_future(_read_into(proc.stdout, out, on_chunk=on_stdout))
    err_task = asyncio.ensure_future(_read_into(proc.stderr, err, STDERR_KEEP))
    feed_task = asyncio.ensure_future(feed())
    timed_out = False
    exited = asyncio.ensure_future(_exited(proc))
    try:
        try:
            await asyncio.wait_for(asyncio.shield(exited), timeout_s)
        except TimeoutError:
            timed_out = True
            await kill_group(proc)
    except asyncio.CancelledError:
        await kill_group(proc)
        for t in (out_task, err_task, feed_task):
            t.cancel()
        raise
    finally:
        exited.cancel()
    await _pipes_closed(proc, [out_task, err_task, feed_task])
    return ProcResult(proc.returncode, bytes(out), bytes(err[-STDERR_KEEP:]), timed_out, time.monotonic() - t0)


async def kill_group(proc: asyncio.subprocess.Process, grace_s: float = 3.0) -> None:
    """SIGTERM the child's whole process group, then SIGKILL what is left after a grace period."""
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            await asyncio.wait_for(proc.wait(), wait)
            break
        except TimeoutError:
            continue
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # grandchildren that outlived the leader
    except (ProcessLookupError, PermissionError):
        pass
