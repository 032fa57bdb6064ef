"""Notifications: telling the spool's owner that work ended, or that the queue is held, without blocking dispatch.

An event is a file in the spool's outbox (`.spoold/notify/EVENT@OWNER.json`), written once by the daemon
that saw it; that daemon delivers it to the owner's named targets (Apprise URLs) and hooks, records each
delivery (`EVENT~TARGET.sent`), and retries what fails with back-off. A daemon that dies leaves its
events to a live daemon on its host, which takes them over by a rename: at least once, and never by two.
A task's `notify:` may only choose among the owner's targets; it can never add an address.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spoold import config, owners, spool
from spoold.config import Settings
from spoold.spool import Spool
from spoold.units import backoff, iso

if TYPE_CHECKING:
    import asyncio  # the daemon's Courier only: `spoold status` reads the health notes without it

log = logging.getLogger("spoold")
TASK_EVENTS = ("done", "failed", "cancelled")
HOOKS = {"done": "on_finish", "failed": "on_finish", "cancelled": "on_finish", "held": "on_hold"}
RETRY_S = 5.0  # the first retry of a failed delivery; doubling up to RETRY_CAP_S
RETRY_CAP_S = 900.0
MAX_TRIES = 8  # then it is given up, said in the log and in `spoold status` (about 40 minutes of trying)
BODY_CHARS = 600


@dataclass
class Event:
    """What to tell, to whom: the targets and hooks still to reach are in the file, their deliveries beside it."""

    id: str
    kind: str  # done, failed, cancelled, held, resumed, drained
    title: str
    body: str
    targets: list[str]
    hooks: list[str]
    env: dict[str, str] = field(default_factory=dict)  # for hooks: SPOOLD_TASK_ID, SPOOLD_STATE, ...
    at: str = ""

    def to_json(self) -> bytes:
        return (json.dumps(self.__dict__) + "\n").encode()


def targets_for(settings: Settings, kind: str, chosen: list[str] | None = None) -> list[str]:
    """The owner's targets an event goes to: the task's own choice for its end, else the `notify_on` rule."""
    names = chosen if chosen is not None and kind in TASK_EVENTS else config.notify_rule(settings).get(kind, [])
    out: list[str] = []
    for n in names:
        for name in (settings.notify if n == "all" else [n]):
            if name in settings.notify and name not in out:
                out.append(name)
    return out


def emit(sp: Spool, settings: Settings, event: Event) -> bool:
    """Put an event in the outbox (once per id, whoever saw it first); False when nobody is to be told."""
    hook = HOOKS.get(event.kind)
    event.hooks = [hook] if hook and getattr(settings, hook) else []
    if not event.targets and not event.hooks:
        return False
    if any((p := spool.parse_event_name(n)) and p[0] == event.id for n in spool.notify_names(sp)):
        return False  # another daemon saw the same hold first
    event.at = event.at or iso(time.time())
    try:
        spool.write_new(sp, spool.event_path(sp, event.id), event.to_json())
    except FileExistsError:
        return False
    return True


def task_ended(sp: Spool, settings: Settings, *, task_id: str, number: int, state: str, title: str,
               chosen: list[str] | None, error: str | None, answer: str, task_file: Path, result_file: Path,
               cost_usd: float | None = None) -> bool:
    """The event for a task that ended (done, failed, or cancelled while it ran), once per attempt."""
    lines = [f"{task_id} {state}" + (f": {error}" if error else "")]
    if answer.strip():
        lines.append(answer.strip()[:BODY_CHARS] + ("…" if len(answer.strip()) > BODY_CHARS else ""))
    env = {"SPOOLD_EVENT": state, "SPOOLD_TASK_ID": task_id, "SPOOLD_STATE": state, "SPOOLD_TITLE": title,
           "SPOOLD_TASK_FILE": str(task_file), "SPOOLD_RESULT_FILE": str(result_file), "SPOOLD_SPOOL": str(sp.root),
           "SPOOLD_ERROR": error or "", "SPOOLD_COST_USD": "" if cost_usd is None else f"{cost_usd:.6f}"}
    event = Event(id=f"{task_id}.{number}.{state}", kind=state, title=f"spoold: {state}: {title}"[:200],
                  body="\n\n".join(lines), targets=targets_for(settings, state, chosen), hooks=[], env=env)
    return emit(sp, settings, event)


def queue_event(sp: Spool, settings: Settings, kind: str, text: str, when: float) -> bool:
    """A queue-wide event (held, resumed, drained), named for its kind and moment so a second sighting is one."""
    event = Event(id=f"{kind}.{spool.stamp_ms(_utc(when))}", kind=kind, title=f"spoold: queue {kind}",
                  body=text, targets=targets_for(settings, kind), hooks=[],
                  env={"SPOOLD_EVENT": kind, "SPOOLD_REASON": text, "SPOOLD_SPOOL": str(sp.root)})
    return emit(sp, settings, event)


def _utc(ts: float) -> Any:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ts, UTC)


# ---- delivery ------------------------------------------------------------------------


def send(url: str, title: str, body: str) -> str | None:
    """Deliver one message through Apprise; None when it went, else why not in one line."""
    import apprise  # lazy: ~80 ms, and only a daemon with targets (or `notify test`) needs it

    a = apprise.Apprise()
    if not a.add(url):
        return "not a notification URL Apprise knows (see https://github.com/caronc/apprise/wiki)"
    quiet = logging.getLogger("apprise")
    was, quiet.propagate = quiet.propagate, False  # what it says comes back in our own one line
    try:
        with apprise.LogCapture(level=logging.WARNING, fmt="%(message)s") as logs:
            ok = a.notify(title=title, body=body)
    finally:
        quiet.propagate = was
    if ok:
        return None
    said = [ln.strip() for ln in logs.getvalue().splitlines() if ln.strip()]
    return said[-1][:300] if said else "not delivered"


def run_hook(argv: list[str], env: dict[str, str], timeout_s: float) -> str | None:
    """Run an owner's hook without a shell; None when it exited 0, else why not. Its output goes to the log."""
    try:
        proc = subprocess.run(argv, env={**os.environ, **env}, stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        return f"{argv[0]} did not finish in {timeout_s:g} s"
    except OSError as e:
        return f"cannot run {argv[0]}: {e.strerror or e}"
    out = (proc.stdout + proc.stderr).decode("utf-8", "replace").strip()
    if out:
        log.info("hook %s: %s", argv[0], out[-2000:])
    return None if proc.returncode == 0 else f"{argv[0]} exited {proc.returncode}"


class Courier:
    """Delivers this daemon's events (and those of dead daemons on its host) in a worker thread of its own."""

    def __init__(self, sp: Spool, settings: Callable[[], Settings]) -> None:
        self.sp, self.settings = sp, settings
        import asyncio

        self.wake = asyncio.Event()
        self._tries: dict[tuple[str, str], tuple[int, float, str]] = {}  # (event, target) -> (tries, next at, why)
        self._failing: dict[str, str] = {}
        self._said: dict[str, str] = {}

    async def run(self, stopping: asyncio.Event) -> None:
        import asyncio

        """Deliver, then sleep until woken (an event written), a retry is due, the next scan, or a stop."""
        while True:
            self.wake.clear()
            try:
                delay = await asyncio.to_thread(self.deliver_due)
            except OSError as e:  # the spool cannot be read or written now: the daemon says so; try later
                log.warning("notifications wait: %s", e.strerror or e)
                delay = RETRY_S
            if stopping.is_set() and not self.wake.is_set():
                return  # (an event written during that pass, such as a stop's last "drained", gets one more)
            waits = [asyncio.ensure_future(self.wake.wait()), asyncio.ensure_future(stopping.wait())]
            timeout = delay if delay is not None else self.settings().scan_interval_s
            _, pending = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for w in pending:
                w.cancel()

    def deliver_due(self) -> float | None:
        """One pass: deliver what is due; return how long until the next retry is due (None: nothing waits)."""
        names = spool.notify_names(self.sp)
        done = {(p[0], p[1]) for n in names if (p := spool.parse_delivered_name(n))}
        mine, now, soonest = spool.owner_tag(), time.time(), None
        for name in names:
            parsed = spool.parse_event_name(name)
            if parsed is None:
                continue
            event_id, owner = parsed
            path: Path | None = spool.notify_dir(self.sp) / name
            if owner != mine:
                if owners.owner_alive(self.sp, owner):
                    continue
                path = self._take_over(spool.notify_dir(self.sp) / name, event_id)
            if path is None:
                continue
            wait = self._deliver(path, event_id, done, now)
            soonest = wait if soonest is None or (wait is not None and wait < soonest) else soonest
        self._say_health()
        return soonest

    def _take_over(self, path: Path, event_id: str) -> Path | None:
        mine = spool.event_path(self.sp, event_id)
        try:
            spool.move(path, mine, sp=self.sp)
        except (FileNotFoundError, FileExistsError):
            return None  # another daemon took it first
        return mine

    def _deliver(self, path: Path, event_id: str, done: set[tuple[str, str]], now: float) -> float | None:
        try:
            event = Event(**json.loads(spool.read_bytes(path)))
        except (OSError, ValueError, TypeError) as e:
            log.warning("notification %s cannot be read (%s); dropped", event_id, e)
            path.unlink(missing_ok=True)
            return None
        settings, waits = self.settings(), []
        for target in [*event.targets, *event.hooks]:
            if (event_id, target) in done:
                continue
            tries, due, _ = self._tries.get((event_id, target), (0, 0.0, ""))
            if due > now:
                waits.append(due - now)
                continue
            why = self._attempt(settings, event, target)
            if why is None:
                spool.write_new(self.sp, spool.delivered_path(self.sp, event_id, target), b"")
                self._tries.pop((event_id, target), None)
                self._failing.pop(target, None)
                continue
            tries += 1
            self._failing[target] = why
            if tries >= MAX_TRIES:
                log.error("gave up telling %s about %s after %d tries: %s", target, event_id, tries, why)
                spool.write_new(self.sp, spool.delivered_path(self.sp, event_id, target, failed=True),
                                (why + "\n").encode())
                self._tries.pop((event_id, target), None)
                continue
            delay = backoff(tries, RETRY_S, RETRY_CAP_S)
            if tries == 1:
                log.warning("could not tell %s about %s (%s); trying again in %g s", target, event_id, why, delay)
            self._tries[(event_id, target)] = (tries, now + delay, why)
            waits.append(delay)
        if not waits:
            self._finish(path, event)
            return None
        return min(waits)

    def _attempt(self, settings: Settings, event: Event, target: str) -> str | None:
        if target in HOOKS.values():
            argv = getattr(settings, target)
            return run_hook(argv, event.env, settings.hook_timeout_s) if argv else None  # unset since: nothing to run
        url = settings.notify.get(target)
        if url is None:
            log.warning("notification target %s is no longer in config.yaml; %s not sent to it", target, event.id)
            return None
        return send(url, event.title, event.body)

    def _finish(self, path: Path, event: Event) -> None:
        """Every target reached (or given up): the event goes first, then its delivery records."""
        path.unlink(missing_ok=True)
        for target in [*event.targets, *event.hooks]:
            for failed in (False, True):
                spool.delivered_path(self.sp, event.id, target, failed=failed).unlink(missing_ok=True)

    def _say_health(self) -> None:
        """`failing@OWNER.health`: which targets fail now and why, for `spoold status` (rewritten only by us)."""
        if self._failing == self._said:
            return
        path = spool.notify_health_path(self.sp)
        if self._failing:
            spool.rewrite(self.sp, path, json.dumps(self._failing).encode())
        else:
            path.unlink(missing_ok=True)
        self._said = dict(self._failing)

    def stop(self) -> None:
        spool.notify_health_path(self.sp).unlink(missing_ok=True)


def failing(sp: Spool) -> dict[str, str]:
    """Targets some daemon cannot reach now, and why (for `spoold status`)."""
    out: dict[str, str] = {}
    for name in spool.notify_names(sp):
        if name.startswith("failing@") and name.endswith(".health"):
            with contextlib.suppress(OSError, ValueError):
                out.update(json.loads(spool.read_bytes(spool.notify_dir(sp) / name)))
    return out


def test(sp: Spool, settings: Settings, target: str | None = None) -> dict[str, str | None]:
    """Send a test message to one target or all of them now; target -> None (sent) or why not."""
    from spoold.errors import ConfigError

    names = [target] if target else list(settings.notify)
    if target and target not in settings.notify:
        raise ConfigError(f"no notification target {target!r}; config.yaml's notify: has "
                          f"{', '.join(settings.notify) or 'none'}")
    if not names:
        raise ConfigError("no notification targets: add some under `notify:` in config.yaml, such as "
                          "phone: ntfy://ntfy.sh/my-topic")
    return {n: send(settings.notify[n], "spoold: test", f"A test message from spoold at {sp.root}.") for n in names}
