"""What the installed `claude` can do: its version, its flags, its login command, whether it is logged in.

Flags come and go between releases (`--restricted` and `--permission-prompts` are new in
2.1.3xx), so the runner asks the binary itself (`--help`) instead of trusting a version table.
The answer is kept per binary (path, size, mtime): one probe per CLI install, not per task.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path

from spoold.errors import CliUnusable

PROBE_TIMEOUT_S = 60.0
FLAG_RE = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
VERSION_RE = re.compile(r"(\d+\.\d+\.\d+)")

# Each flag that keeps a task away from the user's own Claude Code setup, strongest set first used
# whole. The first two are required: without them a dropped file reaches the user's MCP servers,
# hooks and allow rules (issue 11), so spoold refuses to run tasks on a CLI that lacks them.
ISOLATION: tuple[tuple[str, str, bool], ...] = (
    ("--strict-mcp-config", "no MCP server from ~/.claude.json or .mcp.json", True),
    ("--setting-sources=", "no user, project or local settings: hooks, allow rules, env, plugins", True),
    ("--safe-mode", "no CLAUDE.md, skills, plugins, hooks, custom commands, agents or output styles", False),
    ("--disable-slash-commands", "no skills or slash commands", False),
    ("--restricted", "no code-running tool unless granted; file tools confined to the working dirs", False),
    ("--permission-prompts=none", "anything that would ask for permission is denied", False),
)


@dataclass(frozen=True)
class CliInfo:
    path: str
    version: str
    flags: frozenset[str]
    login_command: str  # what a person types to log in, as this release spells it

    def supports(self, flag: str) -> bool:
        return flag.split("=", 1)[0] in self.flags

    def isolation_args(self, owner_mcp: bool = False) -> list[str]:
        """The strongest isolation this CLI offers; CliUnusable if it lacks what is required.

        `owner_mcp`: a profile of the spool's owner brings its own --mcp-config, which --safe-mode would
        switch off too; --setting-sources= alone keeps CLAUDE.md, hooks and the user's settings out then.
        """
        missing = [flag for flag, _, required in ISOLATION if required and not self.supports(flag)]
        if missing:
            raise CliUnusable(
                f"claude {self.version} at {self.path} has no {' or '.join(m.rstrip('=') for m in missing)}, "
                "so a dropped task could reach your MCP servers and hooks; upgrade it "
                "(npm install -g @anthropic-ai/claude-code) and restart spoold"
            )
        return [flag for flag, _, _ in ISOLATION if self.supports(flag) and not (owner_mcp and flag == "--safe-mode")]


_cache: dict[tuple[str, int, int], CliInfo] = {}
_lock = threading.Lock()


def resolve(claude_bin: str) -> Path:
    """The binary's real path, or CliUnusable saying how to get one."""
    found = shutil.which(claude_bin)
    if found is None:
        raise CliUnusable(
            f"claude CLI not found ({claude_bin!r}); install it with `npm install -g @anthropic-ai/claude-code` "
            "or set claude_bin in the spool's config.yaml"
        )
    return Path(os.path.realpath(found))


def probe(claude_bin: str, env: dict[str, str] | None = None) -> CliInfo:
    """What this CLI supports, asked once per binary and kept while it stays the same file."""
    path = resolve(claude_bin)
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _cache:
            return _cache[key]
    exe = shutil.which(claude_bin) or claude_bin
    version_out = _run([exe, "--version"], env)
    m = VERSION_RE.search(version_out)
    if not m:
        raise CliUnusable(f"{exe} --version printed {version_out.strip()[:80]!r}, not a Claude Code version")
    flags = frozenset(FLAG_RE.findall(_run([exe, "--help"], env)))
    auth_help = _run([exe, "auth", "--help"], env, check=False)
    login = "claude auth login" if re.search(r"^\s+login\b", auth_help, re.M) else "claude login"
    info = CliInfo(str(path), m.group(1), flags, login)
    with _lock:
        _cache[key] = info
    return info


def logged_in(claude_bin: str, env: dict[str, str] | None = None) -> bool | None:
    """`claude auth status --json`, which spends no model call; None when this CLI cannot say."""
    exe = shutil.which(claude_bin) or claude_bin
    try:
        proc = subprocess.run([exe, "auth", "status", "--json"], capture_output=True, env=env,
                              timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
        data = json.loads(proc.stdout or b"null")
    except (OSError, subprocess.TimeoutExpired, ValueError):
        return None
    return bool(data["loggedIn"]) if isinstance(data, dict) and "loggedIn" in data else None


def _run(argv: list[str], env: dict[str, str] | None, check: bool = True) -> str:
    try:
        proc = subprocess.run(argv, capture_output=True, env=env, timeout=PROBE_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise CliUnusable(f"`{' '.join(argv)}` did not answer in {PROBE_TIMEOUT_S:.0f} s") from None
    except OSError as e:
        raise CliUnusable(f"cannot run {argv[0]!r}: {e.strerror}; install it or set claude_bin") from None
    if check and proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).decode("utf-8", "replace").strip().splitlines()[-1:] or ["no output"]
        raise CliUnusable(f"`{' '.join(argv)}` exited {proc.returncode}: {tail[0][:200]}")
    return proc.stdout.decode("utf-8", "replace")
