"""Shared fixtures: a temporary spool, a daemon subprocess, and waiting on files instead of sleeping."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as hypothesis_settings

from spoold import spool as spool_mod
from spoold.spool import Spool

ROOT = Path(__file__).resolve().parent.parent
# The suite's own installation: a generated host id lands here, never in the machine's ~/.config.
os.environ["XDG_CONFIG_HOME"] = tempfile.mkdtemp(prefix="spoold-test-config-")
os.environ["XDG_STATE_HOME"] = tempfile.mkdtemp(prefix="spoold-test-state-")  # search indexes
os.environ.pop("SPOOLD_HOST_ID", None)
ECHO_COMMAND = [sys.executable, "-c", "import sys; print('answer: ' + sys.stdin.read().strip())"]


# CI explores a fixed set of generated cases (a red build must mean a regression, not a new
# random draw); a developer's run and `--stress` explore fresh ones.
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    hypothesis_settings.load_profile("ci")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--stress", action="store_true", help="run the long fuzz and kill loops at full size")


@pytest.fixture
def stress(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--stress"))


@pytest.fixture
def sp(tmp_path: Path) -> Spool:
    return spool_mod.open_spool(tmp_path / "spool")


def write_config(sp: Spool, **settings: object) -> None:
    import yaml

    sp.config_path.write_text(yaml.safe_dump(settings))


def wait_for(pred: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> object:
    """Poll a cheap predicate on the filesystem until it holds (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def worst_window(stamps: list[float], window_s: float, slack: float = 0.001) -> int:
    """The most starts in any window of window_s (stamps are written to the millisecond: `slack` allows that)."""
    stamps = sorted(stamps)
    return max((sum(1 for b in stamps[i:] if b < a + window_s - slack) for i, a in enumerate(stamps)), default=0)


def executable(path: Path, text: str) -> Path:
    """Write a script the daemon can run as a backend."""
    path.write_text(text)
    path.chmod(0o700)
    return path


# What a fake `claude` script answers to the daemon's probe (version, flags, login), before its own body.
FAKE_CLAUDE_PROLOGUE = """#!/bin/sh
case "$1" in
  --version) echo "2.1.332 (Claude Code)"; exit 0;;
  --help) echo "  --strict-mcp-config --setting-sources --safe-mode --disable-slash-commands"
          echo "  --max-budget-usd --fallback-model --effort --json-schema --resume --add-dir --mcp-config"; exit 0;;
  auth) if [ "$2" = status ]; then echo '{"loggedIn": true}'; else echo "  login [options]"; fi; exit 0;;
esac
"""


def warm_imports_env(cache: Path) -> dict[str, str]:
    """An environment in which Python keeps compiled modules in `cache`, with the MCP SDK compiled there
    already: an MCP server started by the real CLI is then up in a fraction of a second even where the
    suite runs with PYTHONDONTWRITEBYTECODE=1 (a cold import of the SDK takes ~2 s, and an older CLI
    sends its first request without waiting for a server that slow)."""
    env = {"PYTHONPYCACHEPREFIX": str(cache), "PYTHONDONTWRITEBYTECODE": ""}
    subprocess.run([sys.executable, "-c", "import mcp.server, mcp_adapter.server"], check=True,
                   env={**os.environ, **env, "PYTHONPATH": str(ROOT)}, capture_output=True)
    return env


def fake_claude_script(path: Path, body: str) -> Path:
    """A shell script that passes for the claude CLI at daemon start, then runs `body` for each task."""
    return executable(path, FAKE_CLAUDE_PROLOGUE + body + "\n")


def terminal_files(sp: Spool, state: str) -> list[Path]:
    """Task files (not results) in a terminal state, across date partitions."""
    out = []
    for d in spool_mod.terminal_dirs(sp, state):
        out += [p for p in d.iterdir() if p.is_file() and p.name.endswith(".md") and not p.name.endswith(".result.md")]
    return sorted(out)


def results(sp: Spool, state: str) -> list[Path]:
    out = []
    for d in spool_mod.terminal_dirs(sp, state):
        out += [p for p in d.iterdir() if p.name.endswith(".result.md")]
    return sorted(out)


class DaemonProc:
    """`spoold run` as a real subprocess on a temporary spool; its stderr is kept for assertions."""

    def __init__(self, sp: Spool, env: dict[str, str] | None = None, args: list[str] | None = None) -> None:
        self.sp = sp
        self.log_path = sp.root.parent / f"daemon-{time.monotonic_ns()}.log"
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
        full_env.pop("SPOOLD_DIR", None)
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "spoold.cli", "run", "--spool", str(sp.root), *(args or [])],
            stdout=self._log, stderr=subprocess.STDOUT, env=full_env, cwd=ROOT,
        )
        wait_for(lambda: b"serving" in self.log_path.read_bytes() or self.proc.poll() is not None, what="daemon start")

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self._log.close()


@pytest.fixture
def daemon(request: pytest.FixtureRequest) -> Iterator[Callable[..., DaemonProc]]:
    started: list[DaemonProc] = []

    def start(sp: Spool, env: dict[str, str] | None = None, args: list[str] | None = None) -> DaemonProc:
        d = DaemonProc(sp, env, args)
        started.append(d)
        return d

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.send_signal(signal.SIGKILL)
            d.proc.wait()


def dead_pid() -> int:
    """The pid of a process that has exited: an owner recovery can prove dead."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def drop(sp: Spool, name: str, content: str | bytes) -> Path:
    """Drop a file into inbox/ the safe way a script would (write elsewhere, rename in)."""
    data = content.encode() if isinstance(content, str) else content
    staging = sp.root.parent / f".staging-{name}"
    staging.write_bytes(data)
    dest = sp.dir("inbox") / name
    os.rename(staging, dest)
    return dest


@pytest.fixture
def no_settle_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Intake leaves a closed file whose inode changed within a second (a second link, or any file on a synced
    spool: a sync tool may not have set its time yet), counted from its ctime, which no test can set back: the
    moment is made nothing."""
    from spoold import intake

    monkeypatch.setattr(intake, "DEFAULT_SETTLE_S", 0.0)


@pytest.fixture(scope="session")
def claude_bin() -> Path:
    """The pinned real Claude Code CLI, installed into a cache on first use (never skipped)."""
    from claude_cli import ensure_claude

    return ensure_claude()


@pytest.fixture
def fake_api() -> Iterator[object]:
    from fake_api import FakeAPI

    with FakeAPI() as fake:
        yield fake


@pytest.fixture
def claude_daemon(sp: Spool, daemon: Callable[..., DaemonProc], fake_api: object, claude_bin: Path, tmp_path: Path):
    """Start `spoold run` with the real CLI pointed at the fake API, logged in as a subscription user."""
    from claude_cli import claude_env

    def start(subscription: bool = True, unset: tuple[str, ...] = (), **settings: object) -> DaemonProc:
        home = tmp_path / "home"  # a test may fill it (a user's ~/.claude) before it starts the daemon
        home.mkdir(exist_ok=True)
        write_config(sp, claude_bin=str(claude_bin), **settings)
        env = claude_env(fake_api.url, home, subscription=subscription)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        for name in unset:  # what spoold itself must set for its tasks
            env.pop(name, None)
        return daemon(sp, env={**env, "PYTHONPATH": str(ROOT)})

    return start


class Terminal:
    """One tmux server on a private socket, running one program; stopped by its pid."""

    def __init__(self, tmp_path: Path, command: list[str], env: dict[str, str] | None = None) -> None:
        self.sock = str(tmp_path / f"tmux-{len(list(tmp_path.glob('tmux-*')))}.sock")
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "TERM": "xterm-256color", "LANG": "C.UTF-8",
               "XDG_CONFIG_HOME": os.environ["XDG_CONFIG_HOME"], **(env or {})}
        subprocess.run(["tmux", "-S", self.sock, "new-session", "-d", "-x", "100", "-y", "30", *command],
                       check=True, env=env, cwd=tmp_path)
        self.server_pid = int(self._tmux("display", "-p", "#{pid}"))
        self.pid = int(self._tmux("display", "-p", "#{pane_pid}"))

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.sock, *args], capture_output=True, text=True, check=True).stdout.strip()

    def keys(self, *keys: str) -> None:
        self._tmux("send-keys", *keys)

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p")

    def stop(self) -> None:
        for pid in (self.pid, self.server_pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def terminal(tmp_path: Path):
    started: list[Terminal] = []

    def start(command: list[str], env: dict[str, str] | None = None) -> Terminal:
        t = Terminal(tmp_path, command, env)
        started.append(t)
        return t

    yield start
    for t in started:
        t.stop()


def start_one(sp: Spool, settings: Any, claim: Any, now: Any = time.time) -> tuple[Any, Any]:
    """Admit and claim one start through ledger.start_many, as the daemon does for a batch of one."""
    from spoold import ledger

    out, g = ledger.start_many(sp, settings, [None], lambda _c, t: claim(t), 1, now=now)
    return (out[0] if out else None), g
