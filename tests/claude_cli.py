"""The pinned real Claude Code CLI for integration tests, and an offline environment for it.

`ensure_claude()` installs `@anthropic-ai/claude-code@CLAUDE_CODE_VERSION` with npm into a
per-user cache once (safe against concurrent pytest processes: each installs into its own
temp dir beside the target and renames it into place; the loser of the race discards its copy).
`claude_env()` builds a minimal child environment pointing the CLI at a `FakeAPI`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

NEWEST = "2.1.332"  # the newest release when the runner last changed; what npm gives users today
OLDER = "2.1.197"  # the release the suite was first written against; its output differs in places
# One variable picks the CLI the whole suite runs; CI runs the runner's end-to-end tests with both.
CLAUDE_CODE_VERSION = os.environ.get("SPOOLD_TEST_CLI") or NEWEST
PACKAGE = "@anthropic-ai/claude-code"

__all__ = ["CLAUDE_CODE_VERSION", "NEWEST", "OLDER", "cache_dir", "claude_env", "ensure_claude"]


def cache_dir() -> Path:
    """`$SPOOLD_TEST_CACHE`, else `~/.cache/spoold-tests`."""
    env = os.environ.get("SPOOLD_TEST_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "spoold-tests"


def _claude_in(prefix: Path) -> Path:
    return prefix / "node_modules" / ".bin" / "claude"


def _works(exe: Path) -> bool:
    if not (exe.exists() and os.access(exe, os.X_OK)):
        return False
    try:
        out = subprocess.run([str(exe), "--version"], capture_output=True, timeout=60, env=_version_env())
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and CLAUDE_CODE_VERSION in out.stdout.decode(errors="replace")


def _version_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": tempfile.gettempdir(), "DISABLE_AUTOUPDATER": "1"}


_checked: set[Path] = set()


def ensure_claude() -> Path:
    """Path to the pinned `claude` executable, installing it with npm on first use."""
    target = cache_dir() / f"claude-code-{CLAUDE_CODE_VERSION}"
    exe = _claude_in(target)
    if exe in _checked or _works(exe):
        _checked.add(exe)
        return exe
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(
            f"npm not found on PATH: it is needed to install {PACKAGE}@{CLAUDE_CODE_VERSION} "
            f"for the integration tests (into {target})"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    os.chmod(tmp, 0o755)
    try:
        proc = subprocess.run(
            [npm, "install", "--prefix", str(tmp), "--no-audit", "--no-fund", "--no-save",
             f"{PACKAGE}@{CLAUDE_CODE_VERSION}"],
            capture_output=True,
            timeout=900,
        )
        if proc.returncode != 0 or not _works(_claude_in(tmp)):
            raise RuntimeError(
                f"installing {PACKAGE}@{CLAUDE_CODE_VERSION} with npm failed (exit {proc.returncode}):\n"
                + proc.stderr.decode(errors="replace")[-4000:]
            )
        if target.exists() and not _works(exe):
            # a broken earlier install: move it aside, then take its place
            broken = Path(tempfile.mkdtemp(prefix=f".{target.name}.broken.", dir=target.parent))
            try:
                os.rename(target, broken / "old")
            except OSError:
                pass
            shutil.rmtree(broken, ignore_errors=True)
        try:
            os.rename(tmp, target)  # atomic; fails if another process got there first
        except OSError:
            if not _works(exe):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _checked.add(exe)
    return exe


def claude_env(fake_url: str, home: Path, subscription: bool = False) -> dict[str, str]:
    """A minimal environment for running the real CLI offline against a FakeAPI at `fake_url`.

    `home` should be a fresh temp dir (the CLI writes `~/.claude.json` and `~/.claude/`); no
    onboarding happens in `-p` mode.  API-key mode sets ANTHROPIC_API_KEY; subscription mode sets
    CLAUDE_CODE_OAUTH_TOKEN instead (needed for the usage-limit "You've hit your ..." message).
    TZ=UTC makes reset times print as e.g. "resets 7:25pm (UTC)".  IS_SANDBOX=1 is added when
    running as root, where the CLI otherwise refuses --dangerously-skip-permissions /
    --permission-mode bypassPermissions.
    """
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": str(home),
        "TZ": "UTC",
        "LANG": "C.UTF-8",
        "ANTHROPIC_BASE_URL": fake_url,
        "CLAUDE_CODE_MAX_RETRIES": "1",
        # no traffic besides the model calls: telemetry, error reporting, auto-update, etc.
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "DISABLE_BUG_COMMAND": "1",
        "CLAUDE_CODE_DISABLE_TERMINAL_TITLE": "1",
    }
    if subscription:
        env["CLAUDE_CODE_OAUTH_TOKEN"] = "sk-ant-oat01-fake-token-for-tests"
    else:
        env["ANTHROPIC_API_KEY"] = "sk-ant-api03-fake-key-for-tests"
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        env["IS_SANDBOX"] = "1"
    return env
