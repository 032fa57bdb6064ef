"""The few exception types spoold raises; each message tells the user what to do next.

Each carries the exit code the CLI ends with (the README's table): 2 bad input, a bad id, a bad
config or an unusable spool; 5 no such task; 6 not allowed in the task's state.
"""


class SpooldError(Exception):
    """A user-facing problem: the CLI prints it as one line, the adapter as a ToolError."""

    exit_code = 2


class SpoolError(SpooldError):
    """The spool itself is missing, unsafe or unwritable."""

    exit_code = 2


class BadTaskId(SpooldError):
    """An id that does not have the id format (and so can never name a file)."""

    exit_code = 2


class TaskNotFound(SpooldError):
    exit_code = 5


class BadInput(SpooldError):
    """A dropped file that cannot be a task; `line` points into the file when known."""

    def __init__(self, message: str, line: int | None = None) -> None:
        super().__init__(message if line is None else f"line {line}: {message}")
        self.line = line


class ConfigError(SpooldError):
    exit_code = 2


class NotTakenYet(SpooldError):
    """A file still in the inbox: no daemon has made it a task yet (exit 4, like any task not finished)."""

    exit_code = 4


class InvalidState(SpooldError):
    """The task is not in a state that allows the asked transition."""

    exit_code = 6


class CliUnusable(SpooldError):
    """The backend's CLI cannot run tasks as spoold must run them: missing, broken, or too old to isolate them."""
