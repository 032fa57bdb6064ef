"""Running one claimed task: what a run that never started says (the rest runs in the daemon's tests)."""

from __future__ import annotations

import errno
import os

from spoold import runner
from spoold.config import Settings


def _missing(program: str) -> FileNotFoundError:
    return FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)


def test_a_missing_program_is_named_with_the_setting_that_fixes_it() -> None:
    command = runner.not_run(_missing("/nonexistent/tool"), Settings(backend="command", command=["/nonexistent/tool"]))
    assert command.kind == "hold" and command.error == (
        "cannot start '/nonexistent/tool': No such file or directory; install it or fix `command:` in config.yaml")
    claude = runner.not_run(_missing("claude"), Settings(claude_bin="/opt/claude"))
    assert claude.kind == "hold" and claude.error == (
        "cannot start '/opt/claude': No such file or directory; install it or set claude_bin")
