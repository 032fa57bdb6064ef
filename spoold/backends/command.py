"""A generic backend: any CLI that reads the prompt on stdin and prints the answer on stdout."""

from __future__ import annotations

import shutil
from pathlib import Path

from spoold.backends import Invocation, Outcome, ProcResult, environ
from spoold.config import Profile, Settings
from spoold.errors import CliUnusable
from spoold.task import Task


class StdoutSoFar:
    """The answer is stdout itself, decoded whole when asked (a split UTF-8 character must not show as junk)."""

    def __init__(self) -> None:
        self.out = bytearray()

    def feed(self, chunk: bytes) -> bool:
        self.out.extend(chunk)
        return bool(chunk)

    def text(self) -> str:
        return self.out.decode("utf-8", "ignore")


class CommandBackend:
    """`command: [llm, -m, "{model}"]`; `{model}`, `{id}` and `{title}` are filled in per task."""

    def __init__(self, template: list[str]) -> None:
        self.template = template

    def check(self, settings: Settings) -> list[str]:
        if shutil.which(self.template[0]) is None:
            raise CliUnusable(f"command backend: {self.template[0]!r} not found; install it or fix `command:`")
        return []

    def invocation(self, task: Task, settings: Settings, cwd: Path, *, profile: Profile | None = None,
                   session: str | None = None) -> Invocation:
        fill = {"{model}": task.model, "{id}": task.id, "{title}": task.title or ""}
        argv = []
        for arg in self.template:
            for key, value in fill.items():
                arg = arg.replace(key, value)
            argv.append(arg)
        env = environ()
        env.update(SPOOLD_TASK_ID=task.id, SPOOLD_MODEL=task.model)
        return Invocation(argv, env, task.prompt.encode(), cwd)

    def progress(self) -> StdoutSoFar:
        return StdoutSoFar()

    def classify(self, task: Task, proc: ProcResult) -> Outcome:
        answer = proc.stdout.decode("utf-8", "replace")
        if proc.timed_out:
            return Outcome("failed", answer, error=timeout_message(task, proc))
        if proc.returncode == 0:
            return Outcome("done", answer)
        if proc.returncode is not None and proc.returncode < 0:
            return Outcome("retry", answer, error=f"{self.template[0]} was killed by signal {-proc.returncode}")
        return Outcome("failed", answer, error=f"{self.template[0]} exited {proc.returncode}: {stderr_tail(proc)}")


def stderr_tail(proc: ProcResult, limit: int = 300) -> str:
    """The last meaningful stderr line, for a one-line error."""
    lines = [ln.strip() for ln in proc.stderr.decode("utf-8", "replace").splitlines() if ln.strip()]
    return (lines[-1][:limit] if lines else "no error output")


def timeout_message(task: Task, proc: ProcResult) -> str:
    return f"stopped after {proc.duration_s:.0f} s: the task ran past its timeout; set a longer `timeout:` in its frontmatter"
