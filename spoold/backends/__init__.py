"""The backend interface: build an invocation for a task, classify what the process did.

A backend never starts processes itself; `run_process` does that for all of
them, so timeouts, cancellation and process-group cleanup live in one place.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol

from spoold.config import Settings
from spoold.task import Task

OutcomeKind = Literal["done", "failed", "retry", "hold"]
STDERR_KEEP = 64 * 1024


@dataclass
class Outcome:
    """What became of one run: done, failed (permanent), retry (transient), or hold (the account can't run now)."""

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
    started_at: float = field(default_factory=time.time)


class Backend(Protocol):
    name: str

    def invocation(self, task: Task, settings: Settings, cwd: Path) -> Invocation: ...

    def classify(self, task: Task, proc: ProcResult) -> Outcome: ...


def get_backend(settings: Settings) -> Backend:
    if settings.backend == "command":
        from spoold.backends.command import CommandBackend

        return CommandBackend(settings.command)
    from spoold.backends.claude import ClaudeBackend

    return ClaudeBackend()


async def _drain_tail(stream: asyncio.StreamReader, keep: int) -> bytes:
    """Read a stream to its end, keeping only its tail (a chatty child can't eat our memory)."""
    buf = bytearray()
    while chunk := await stream.read(65536):
        buf += chunk
        if len(buf) > 2 * keep:
            del buf[:-keep]
    return bytes(buf[-keep:])


async def run_process(inv: Invocation, timeout_s: float, on_start: object = None) -> ProcResult:
    """Run one invocation in its own process group; on timeout or cancel the group is terminated, then killed."""
    t0 = time.monotonic()
    started = time.time()
    proc = await asyncio.create_subprocess_exec(
        *inv.argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=inv.env,
        cwd=inv.cwd,
        start_new_session=True,
    )
    if callable(on_start):
        on_start(proc.pid)
    assert proc.stdin and proc.stdout and proc.stderr

    async def feed() -> None:
        try:
            proc.stdin.write(inv.stdin)
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the child did not read its stdin; its output says why
        finally:
            proc.stdin.close()

    out_task = asyncio.ensure_future(proc.stdout.read())
    err_task = asyncio.ensure_future(_drain_tail(proc.stderr, STDERR_KEEP))
    feed_task = asyncio.ensure_future(feed())
    timed_out = False
    try:
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except TimeoutError:
            timed_out = True
            await kill_group(proc)
    except asyncio.CancelledError:
        await kill_group(proc)
        for t in (out_task, err_task, feed_task):
            t.cancel()
        raise
    stdout, stderr = await asyncio.gather(out_task, err_task)
    await asyncio.gather(feed_task, return_exceptions=True)
    return ProcResult(proc.returncode, stdout, stderr, timed_out, time.monotonic() - t0, started)


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
