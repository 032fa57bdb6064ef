"""Per-task options that reach outside the task file: profiles, schemas by name, and follow-ups.

A dropped file chooses among what the spool's owner set up (a profile in config.yaml, a schema in
schemas/, an earlier task's conversation) and never widens it: no path, tool or server of its own.
Checked at intake, so a bad name is a clear message then, and looked up again when the task runs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from spoold import spool
from spoold.config import Profile, Settings
from spoold.errors import BadInput, SpooldError
from spoold.spool import Spool
from spoold.task import Task, check_schema_size, check_storable, parse_result
from spoold.task import read as read_task

RESUME_WAIT_S = 15.0  # how long a follow-up waits before looking again at the task it continues


class NotYet(SpooldError):
    """The task this one continues has not finished: wait for it, losing no attempt."""


def resolve(sp: Spool, settings: Settings, task: Task) -> None:
    """Intake's check of the names a task uses; BadInput says what to fix."""
    if isinstance(task.schema, str):
        task.schema = load_schema(sp, task.schema)
        check_schema_size(task.schema)
        check_storable(task)
    if task.resume is not None:
        try:
            task.resume = spool.resolve_id(sp, task.resume)
        except SpooldError as e:
            raise BadInput(f"`resume: {task.resume}`: {e}") from None
        earlier = _task(sp, task.resume)
        if task.profile is None:
            task.profile = earlier.profile  # its conversation lives where it ran
        elif task.profile != earlier.profile:
            raise BadInput(f"`resume` continues {task.resume}, which ran in profile {earlier.profile or '(none)'}; "
                           "a follow-up runs where its conversation is: drop `profile:` or name the same one")
    profile_of(settings, task)
    unknown = [n for n in task.notify or [] if n not in settings.notify]
    if unknown:
        known = ", ".join(sorted(settings.notify)) or "none are defined"
        raise BadInput(f"`notify: {unknown[0]}` is not a notification target of this spool's config.yaml ({known})")


def profile_of(settings: Settings, task: Task) -> Profile | None:
    if task.profile is None:
        return None
    if task.profile not in settings.profiles:
        known = ", ".join(sorted(settings.profiles)) or "none are defined"
        raise BadInput(f"`profile: {task.profile}` is not a profile of this spool's config.yaml ({known})")
    return settings.profiles[task.profile]


def load_schema(sp: Spool, name: str) -> dict[str, object]:
    try:
        path = spool.schema_path(sp, name)
        data = json.loads(spool.read_bytes(path).decode("utf-8"))
    except SpooldError as e:
        raise BadInput(f"`schema: {name}`: {e}") from None
    except FileNotFoundError:
        raise BadInput(f"`schema: {name}` names no file in {spool.schema_path(sp, name).parent}") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise BadInput(f"`schema: {name}` is not a JSON file spoold can read ({type(e).__name__})") from None
    if not isinstance(data, dict):
        raise BadInput(f"`schema: {name}` must hold a JSON object (a JSON Schema)")
    return data


@dataclass
class Context:
    """Where and how one task runs, from its profile and the conversation it continues."""

    cwd: Path
    profile: Profile | None
    session: str | None  # the CLI session to resume


def context(sp: Spool, settings: Settings, task: Task, workdir: Path) -> Context:
    """BadInput: the task cannot run as asked (it fails, saying why); NotYet: it must wait."""
    profile = profile_of(settings, task)
    cwd = Path(profile.cwd).expanduser() if profile and profile.cwd else workdir
    if profile and profile.cwd and not cwd.is_dir():
        raise BadInput(f"profile {task.profile}: its cwd {cwd} is not a directory")
    return Context(cwd, profile, session_to_resume(sp, task) if task.resume else None)


def finished(sp: Spool, task_id: str) -> bool:
    """Whether a task has left the queue for good (or the spool): a follow-up of it may start."""
    try:
        return spool.locate(sp, task_id).state in spool.TERMINAL
    except SpooldError:
        return True  # gone: the follow-up starts and says so


def session_to_resume(sp: Spool, task: Task) -> str:
    assert task.resume
    try:
        loc = spool.locate(sp, task.resume)
    except SpooldError:
        raise BadInput(f"the task it continues ({task.resume}) is no longer in the spool") from None
    if loc.state in spool.PENDING:
        raise NotYet(f"waiting for {task.resume}, the task it continues, to finish")
    try:
        answer = spool.answer_path(loc.path.parent, loc.task_id, lambda: spool.known_hosts(sp))
        result = parse_result(spool.read_bytes(answer).decode("utf-8"))
    except (OSError, UnicodeDecodeError, BadInput):
        result = None
    if result is None or not result.session_id:
        raise BadInput(f"the task it continues ({task.resume}, {loc.state}) has no conversation to resume")
    return result.session_id


def _task(sp: Spool, task_id: str) -> Task:
    loc = spool.locate(sp, task_id)
    try:
        return read_task(loc.path, task_id)
    except (OSError, BadInput) as e:
        raise BadInput(f"`resume: {task_id}`: that task's file cannot be read ({e})") from None
