"""Tasks and results as files: parse a dropped file, normalize it, render task and result files."""

from __future__ import annotations

import functools
import json
import math
import re
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from spoold import plainyaml
from spoold.config import MODEL_RE, TARGET_RE
from spoold.errors import BadInput
from spoold.spool import PRIORITIES, read_bytes
from spoold.units import iso, seconds

USER_KEYS = ("model", "priority", "system", "title", "tags", "timeout", "not_before", "resume", "follow_up",
             "schema", "max_budget_usd", "fallback_model", "effort", "max_turns", "profile", "notify")
EFFORTS = ("low", "medium", "high", "xhigh", "max")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # a profile name, a schema file name
SPOOLD_KEYS = ("id", "submitted_at", "source", "warnings")
FORMAT1_KEYS = ("status", "attempts", "started_at", "finished_at", "error")  # what spoold 1 rewrote into task files
MAX_FRONTMATTER = 64 * 1024


@dataclass
class Task:
    """A normalized task: what the daemon runs and what its file records, written once at intake.

    What changes over its life is not here: its state is its directory, and its attempts, start
    and outcome are in its running/ name, its records and its result (see spoold.transitions).
    """

    id: str
    prompt: str
    model: str = "sonnet"
    priority: str = "normal"
    submitted_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    source: str | None = None
    title: str | None = None
    system: str | None = None
    tags: list[str] = field(default_factory=list)
    timeout: float | None = None
    not_before: datetime | None = None
    warnings: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    # options mapped to the CLI's own flags (see spoold/options.py)
    resume: str | None = None  # the task whose conversation this one continues
    schema: dict[str, Any] | str | None = None  # a JSON Schema, or the name of one in the spool's schemas/
    max_budget_usd: float | None = None
    fallback_model: str | None = None
    effort: str | None = None
    max_turns: int | None = None
    profile: str | None = None
    notify: list[str] | None = None  # which of the owner's named targets hear of it ([]: none); None: the rule


@functools.cache
def _handler() -> Any:
    """python-frontmatter's YAML handler on PyYAML's C loader and dumper, the one reader and writer of every
    frontmatter block. Built on first use: the import costs ~15 ms, and a prompt without frontmatter
    never needs it. Splitting stays split_frontmatter's (python-frontmatter strips the body)."""
    import yaml
    from frontmatter.default_handlers import YAMLHandler

    class TaskYAML(YAMLHandler):
        def split(self, text: str) -> tuple[str, str]:
            fm, body, _ = split_frontmatter(text)
            if fm is None:
                raise ValueError("no frontmatter")
            return fm, body

        def load(self, fm: str, **kwargs: object) -> Any:
            """Safe YAML without anchors and aliases: no 'billion laughs' through a dropped file."""
            if "*" in fm:  # an alias needs one; the C loader composes in C, so look at the events first
                for event in yaml.parse(fm, Loader=yaml.CSafeLoader):
                    if isinstance(event, yaml.AliasEvent):
                        line = event.start_mark.line + 2 if event.start_mark else None
                        raise BadInput("YAML aliases (*name) are not allowed in frontmatter; write the value out", line)
            return super().load(fm, Loader=yaml.CSafeLoader)

        def export(self, metadata: dict[str, object], **kwargs: object) -> str:
            plain = _plain(metadata)
            readable = "\x85" not in json.dumps(plain, ensure_ascii=False)  # PyYAML mangles a raw NEL
            # yaml.dump itself, not super().export, which strips the text: a last value ending in a Unicode space
            # (U+00A0, U+3000, ...) lost it
            return str(yaml.dump(plain, Dumper=yaml.CSafeDumper, default_flow_style=False, sort_keys=False,
                                 allow_unicode=readable, width=1_000_000))

    return TaskYAML()


def split_frontmatter(text: str) -> tuple[str | None, str, int]:
    """Split `---` frontmatter from the body, keeping the body byte for byte.

    Hand-written because python-frontmatter strips the text and its boundary
    regex eats blank lines after `---`; the user's prompt must stay exact.
    Returns (yaml or None, body, line number where the yaml starts).
    """
    lines = text.splitlines(keepends=True)
    if not lines or lines[0].rstrip("\r\n").rstrip() != "---":
        return None, text, 0
    for i in range(1, len(lines)):
        if lines[i].rstrip("\r\n").rstrip() in ("---", "..."):
            return "".join(lines[1:i]), "".join(lines[i + 1 :]), 2
    raise BadInput("frontmatter starts with `---` on line 1 but has no closing `---` line", 1)


def parse_text(text: str) -> tuple[dict[str, Any], str]:
    """Frontmatter (a mapping) and body of a task file; BadInput names the line."""
    fm, body, first_line = split_frontmatter(text)
    if fm is None:
        return {}, body
    if len(fm) > MAX_FRONTMATTER:
        raise BadInput(f"frontmatter is larger than {MAX_FRONTMATTER // 1024} KiB; put long text in the body", 1)
    import yaml

    try:
        meta = _handler().load(fm)
    except yaml.MarkedYAMLError as e:
        line = (e.problem_mark.line + first_line) if e.problem_mark else None
        raise BadInput(f"frontmatter is not valid YAML: {e.problem or e}", line) from None
    except (yaml.YAMLError, RecursionError) as e:
        raise BadInput(f"frontmatter is not valid YAML: {type(e).__name__}", 1) from None
    if meta is None:
        return {}, body
    if not isinstance(meta, dict):
        raise BadInput("frontmatter must be `key: value` lines, not a list or a single value", first_line)
    return {str(k): v for k, v in meta.items()}, body


def parse_time(value: Any, key: str) -> datetime:
    """ISO time or YAML timestamp; a time without zone is the machine's local time."""
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):
        dt = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
        except ValueError:
            raise BadInput(f"`{key}: {value}` is not an ISO time such as 2026-11-24T18:00:00Z") from None
    else:
        raise BadInput(f"`{key}` must be an ISO time such as 2026-11-24T18:00:00Z")
    return (dt if dt.tzinfo else dt.astimezone()).astimezone(UTC)


def parse_duration(value: Any, key: str = "timeout") -> float:
    """Seconds from a number or `90s`, `30m`, `2h`."""
    if isinstance(value, bool):
        raise BadInput(f"`{key}` must be a duration such as 600, 30m or 2h")
    if isinstance(value, (int, float)) and value > 0:
        return float(value)
    secs = seconds(value) if isinstance(value, str) else None
    if not secs:
        raise BadInput(f"`{key}: {value}` is not a duration such as 600, 30m or 2h")
    return secs


def check_model(value: Any) -> str:
    if not isinstance(value, str) or not MODEL_RE.match(value):
        raise BadInput(
            f"`model: {str(value)[:60]}` is not a model name; use an alias (sonnet, opus, haiku) or a full model id"
        )
    return value


def _text(meta: dict[str, Any], key: str) -> str | None:
    v = meta.get(key)
    if v is None:
        return None
    if isinstance(v, (dict, list)):
        raise BadInput(f"`{key}` must be text")
    return str(v)


def from_user(meta: dict[str, Any], body: str, *, task_id: str, default_model: str) -> Task:
    """A dropped file or a `spoold submit`: only the user's keys count. spoold's own (`attempts`, `status`,
    `started_at`, ...) are ignored with a warning, so a file copied back from failed/ starts afresh."""
    own = [k for k in (*SPOOLD_KEYS, *FORMAT1_KEYS) if k in meta and k != "id"]
    user = {k: v for k, v in meta.items() if k not in SPOOLD_KEYS and k not in FORMAT1_KEYS}
    task = _from_keys(user, body, task_id=task_id, default_model=default_model, warnings=[])
    task.warnings += [f"`{k}` is spoold's own key; ignored in a new task" for k in own]
    return task


def from_stored(meta: dict[str, Any], body: str, *, task_id: str, default_model: str = "sonnet") -> Task:
    """A task file spoold wrote: the user's keys and spoold's own (a format-1 file's runtime keys are ignored:
    the migration records what they said)."""
    meta = {k: v for k, v in meta.items() if k not in FORMAT1_KEYS}
    stored = meta.get("warnings")
    warnings = [w for w in stored if isinstance(w, str)] if isinstance(stored, list) else []
    task = _from_keys(meta, body, task_id=task_id, default_model=default_model, warnings=warnings)
    _stored_fields(task, meta)
    return task


def _from_keys(meta: dict[str, Any], body: str, *, task_id: str, default_model: str, warnings: list[str]) -> Task:
    """Normalize frontmatter into a Task; unknown keys become warnings."""
    if not body.strip():
        raise BadInput("the prompt is empty: write the question below the frontmatter")
    priority = str(meta.get("priority", "normal")).strip().lower()
    if priority not in PRIORITIES:
        raise BadInput(f"`priority: {priority[:30]}` must be one of {', '.join(PRIORITIES)}")
    tags = meta.get("tags") or []
    if isinstance(tags, str):
        tags = [t.strip() for t in tags.split(",") if t.strip()]
    if not isinstance(tags, list) or any(isinstance(t, (dict, list)) for t in tags):
        raise BadInput("`tags` must be a list such as [research, long]")
    known = set(USER_KEYS) | set(SPOOLD_KEYS) | set(FORMAT1_KEYS)
    extra = {k: v for k, v in meta.items() if k not in known}
    warnings = warnings + [f"unknown frontmatter key `{k}` kept but ignored" for k in extra
                           if not _already_warned(warnings, k)]
    task = Task(
        id=task_id,
        prompt=body,
        model=check_model(meta.get("model") or default_model),
        priority=priority,
        system=_text(meta, "system"),
        title=_text(meta, "title"),
        tags=[str(t) for t in tags],
        timeout=parse_duration(meta["timeout"]) if meta.get("timeout") is not None else None,
        not_before=parse_time(meta["not_before"], "not_before") if meta.get("not_before") else None,
        extra=extra,
        warnings=warnings,
    )
    _options(task, meta)
    if task.extra or task.schema is not None or len(task.system or "") + len(task.title or "") > MAX_FRONTMATTER // 8:
        check_storable(task)  # only user-shaped values can grow past the limit when written out
    return task


def _options(task: Task, meta: dict[str, Any]) -> None:
    """The per-task options, each checked here so a bad one is a clear message at intake."""
    resume = meta.get("resume") if meta.get("resume") is not None else meta.get("follow_up")
    if resume is not None:
        if not isinstance(resume, str) or not re.fullmatch(r"@?[A-Za-z0-9][A-Za-z0-9._-]{1,119}", resume.strip()):
            raise BadInput("`resume` must name an earlier task: its id, its first characters (such as o5e4gy), "
                           "the file it was dropped as, or @last")
        task.resume = resume.strip()
    schema = meta.get("schema")
    if isinstance(schema, str) and schema.strip().startswith("{"):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise BadInput(f"`schema` is not valid JSON ({e.msg}); write it as YAML or JSON") from None
    if schema is not None:
        if isinstance(schema, str) and NAME_RE.match(schema) and schema.endswith(".json"):
            task.schema = schema
        elif isinstance(schema, dict) and schema:
            plain: dict[str, Any] = json.loads(json.dumps(schema, default=str))
            check_schema_size(plain)
            task.schema = plain
        else:
            raise BadInput("`schema` must be a JSON Schema (a mapping such as {type: object, ...}) "
                           "or the name of a .json file in the spool's schemas/ folder")
    if meta.get("max_budget_usd") is not None:
        v = meta["max_budget_usd"]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise BadInput(f"`max_budget_usd: {str(v)[:30]}` must be a positive amount of dollars, such as 0.50")
        task.max_budget_usd = float(v)
    if meta.get("fallback_model") is not None:
        task.fallback_model = check_model(meta["fallback_model"])
    if meta.get("effort") is not None:
        effort = str(meta["effort"]).strip().lower()
        if effort not in EFFORTS:
            raise BadInput(f"`effort: {effort[:20]}` must be one of {', '.join(EFFORTS)}")
        task.effort = effort
    if meta.get("max_turns") is not None:
        v = meta["max_turns"]
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise BadInput(f"`max_turns: {str(v)[:20]}` must be a whole number of turns, 1 or more")
        task.max_turns = v
    if meta.get("profile") is not None:
        if not isinstance(meta["profile"], str) or not NAME_RE.match(meta["profile"]):
            raise BadInput("`profile` must be the name of a profile in the spool's config.yaml")
        task.profile = meta["profile"]
    if meta.get("notify") is not None:
        task.notify = _notify_names(meta["notify"])


def _notify_names(value: Any) -> list[str]:
    """`notify:` names targets the spool's owner defined, or `none`; a task can never add an address."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise BadInput("`notify` must be `none` or a list of the spool's notification target names, such as [phone]")
    if any(ch in n for n in names for ch in ":/@"):
        raise BadInput("`notify` names targets of the spool's config.yaml; a task cannot add an address of its own")
    if names == ["none"]:
        return []
    bad = [n for n in names if not TARGET_RE.match(n)]
    if bad:
        raise BadInput(f"`notify: {bad[0][:40]}` is not a target name; use names from the spool's config.yaml")
    return names


SCHEMA_MAX = 64 * 1024  # one command-line argument holds 128 KiB on Linux; a schema needs far less


def check_schema_size(schema: dict[str, Any]) -> None:
    size = len(json.dumps(schema, ensure_ascii=False, separators=(",", ":")).encode())
    if size > SCHEMA_MAX:
        raise BadInput(f"`schema` is {size:,} bytes as JSON; at most {SCHEMA_MAX:,} fit: make it smaller")


def check_storable(task: Task) -> None:
    """Refuse now what could not be read back once written out (YAML re-indents deep nesting, escapes control bytes)."""
    try:
        parse_text(render_task(task).decode())
    except BadInput as e:
        raise BadInput(f"the frontmatter is too large or too deeply nested to store ({e}); make it smaller or flatter") from None


def _already_warned(warnings: list[str], key: str) -> bool:
    return any(f"`{key}`" in w for w in warnings)


def _stored_fields(task: Task, meta: dict[str, Any]) -> None:
    """Fields spoold itself wrote (present when re-reading a stored task)."""
    if meta.get("submitted_at"):
        task.submitted_at = parse_time(meta["submitted_at"], "submitted_at")
    task.source = _text(meta, "source")


def _ms(dt: datetime | None) -> str | None:
    return iso(dt, ms=True)


def task_meta(task: Task) -> dict[str, Any]:
    """The frontmatter spoold writes for a task: user keys normalized, spoold keys added."""
    meta: dict[str, Any] = {
        "id": task.id,
        "title": task.title,
        "model": task.model,
        "priority": task.priority,
        "submitted_at": _ms(task.submitted_at),
        "not_before": _ms(task.not_before),
        "source": task.source,
        "timeout": task.timeout,
        "system": task.system,
        "tags": task.tags or None,
        "profile": task.profile,
        "resume": task.resume,
        "schema": task.schema,
        "max_budget_usd": task.max_budget_usd,
        "fallback_model": task.fallback_model,
        "effort": task.effort,
        "max_turns": task.max_turns,
        "notify": task.notify if task.notify is None or task.notify else "none",
        "warnings": task.warnings or None,
    }
    meta = {k: v for k, v in meta.items() if v is not None}
    meta.update(task.extra)
    return meta


def render(meta: dict[str, Any], body: str) -> bytes:
    """A Markdown file with YAML frontmatter; the body is written exactly as given. The common frontmatter
    is written by hand (spoold.plainyaml, PyYAML's own bytes without its import), the rest by PyYAML."""
    fm = plainyaml.dump(meta)
    return f"---\n{_handler().export(meta) if fm is None else fm}---\n{body}".encode()


def _plain(value: Any) -> Any:
    """Values yaml.safe_dump can always write (user extras may hold dates and odd scalars)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return _ms(value) if value.tzinfo else value.isoformat()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def render_task(task: Task) -> bytes:
    return render(task_meta(task), task.prompt)


def parse_task(text: str, *, task_id: str, default_model: str = "sonnet") -> Task:
    """A stored task file's text (one spoold wrote)."""
    meta, body = parse_text(text)
    return from_stored(meta, body, task_id=task_id, default_model=default_model)


def parse_user_task(text: str, *, task_id: str, default_model: str = "sonnet") -> Task:
    """A dropped file's text: the user's keys only."""
    meta, body = parse_text(text)
    return from_user(meta, body, task_id=task_id, default_model=default_model)


def read(path: Path, task_id: str, default_model: str = "sonnet") -> Task:
    """The one way to read a stored task file; BadInput (with why) for one that cannot be read as a task."""
    try:
        return parse_task(read_bytes(path).decode("utf-8"), task_id=task_id, default_model=default_model)
    except UnicodeDecodeError as e:
        raise BadInput(f"{path.name} is not UTF-8 text (byte {e.start})") from None
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise
        raise BadInput(f"{path.name} cannot be read ({e.strerror or e})") from None


FAILURE_NOTE = "**Failed:** "  # a failed result's body when there is no answer: for a person opening the file


def is_failure_note(body: str) -> bool:
    """The body is only the failure note, not an answer (so `spoold result` prints no answer)."""
    return body.startswith(FAILURE_NOTE) and body.count("\n") <= 1


@dataclass
class Result:
    """What a result file records beside its task."""

    id: str
    status: str
    answer: str = ""
    model: str | None = None
    model_resolved: str | None = None
    submitted_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    duration_s: float | None = None
    cost_usd: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int | None = None
    cache_creation_tokens: int | None = None
    session_id: str | None = None
    attempts: int | None = None
    error: str | None = None
    continues: str | None = None  # the task whose conversation this one resumed
    structured: bool | None = None  # the answer is JSON matching the task's schema, in a fenced block


def render_result(result: Result) -> bytes:
    meta = {f.name: getattr(result, f.name) for f in fields(Result) if f.name != "answer"}
    meta = {k: (_ms(v) if isinstance(v, datetime) else v) for k, v in meta.items() if v is not None}
    body = result.answer if result.answer.endswith("\n") or not result.answer else result.answer + "\n"
    if result.status == "failed" and not result.answer:
        body = f"{FAILURE_NOTE}{result.error}\n"
    return render(meta, body)


def parse_result(text: str) -> Result:
    meta, body = parse_text(text)
    known = {f.name for f in fields(Result)}
    kwargs = {k: v for k, v in meta.items() if k in known}
    for key in ("submitted_at", "started_at", "finished_at"):
        if kwargs.get(key):
            kwargs[key] = parse_time(kwargs[key], key)
    kwargs.setdefault("id", "")
    kwargs.setdefault("status", "unknown")
    return Result(answer=body, **kwargs)


def title_of(task: Task) -> str:
    """A short human label: the title, or the prompt's first line."""
    if task.title:
        return task.title
    first = next((ln.strip() for ln in task.prompt.splitlines() if ln.strip()), "")
    return first.lstrip("# ")[:80]
