"""The Claude Code CLI backend: `claude -p --output-format stream-json`, classified from its structured fields."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from spoold.backends import Invocation, Outcome, ProcResult, environ
from spoold.backends.claude_probe import CliInfo, logged_in, probe
from spoold.backends.claude_stream import Stream, parse
from spoold.backends.command import stderr_tail, timeout_message
from spoold.config import Profile, Settings
from spoold.errors import BadInput
from spoold.task import Task
from spoold.units import FAMILY_WINDOWS, window_words

# The CLI refuses to start inside another Claude Code session; MCP servers launched by Claude Code inherit these.
DROP_ENV = ("CLAUDECODE", "CLAUDE_CODE_ENTRYPOINT")
BILLING_HOLD = timedelta(hours=1)
AUTH_HOLD = timedelta(minutes=10)
USAGE_LIMIT_FALLBACK = timedelta(minutes=30)
LOGIN_COMMAND = "claude auth login"
# The flags task options and profiles map to, checked against the CLI's `--help` (`--max-turns` works in
# 2.1.197 and 2.1.332 but is not listed there, so it is not checked).
OPTION_FLAGS = {"--max-budget-usd", "--fallback-model", "--effort", "--json-schema", "--resume", "--add-dir",
                "--mcp-config"}

# The structured fields, in the order they are trusted. `assistant.error` codes were seen in
# 2.1.197 and 2.1.332 alike; `api_error` ("usage_limit_reached") and `api_error_type` in 2.1.332.
AUTH_ERRORS = {"authentication_failed", "oauth_org_not_allowed"}
BILLING_ERRORS = {"billing_error"}
TRANSIENT_ERRORS = {"server_error", "rate_limit", "overloaded"}
TRANSIENT_TYPES = {"overloaded_error", "api_error", "rate_limit_error", "timeout_error"}
STOPPED_SUBTYPES = {
    "error_max_turns": "claude stopped at its maximum number of turns; raise `max_turns:` if it needs more",
    "error_max_budget_usd": "claude stopped at the task's spending cap; raise `max_budget_usd:` if it needs more",
    "error_max_structured_output_retries": "claude could not produce output that matches the task's `schema:`",
}

# Text patterns: the last resort, for a CLI that gives no structured field. One table; each row says
# the releases its wording was seen in, so a new wording is one more row, not a new code path.
TEXT_PATTERNS: tuple[tuple[str, str, str], ...] = (
    ("usage_limit", r"hit your (?:[\w-]+ )?limit", "2.1.197 `session limit`, `weekly limit`, `Opus limit`; 2.1.332 `5-hour limit`"),
    ("usage_limit", r"usage limit reached|out of extra usage", "1.x `Claude AI usage limit reached|<epoch>`"),
    ("auth", r"invalid api key|/login|log ?in again|not logged in|oauth token|failed to authenticate|invalid x-api-key",
     "2.1.197, 2.1.332"),
    ("billing", r"credit balance|out of credits|billing", "2.1.197, 2.1.332 `Credit balance is too low`"),
    ("transient", r"overloaded|timed? ?out|connection error|econnreset|socket hang up|internal server error|rate.?limit",
     "2.1.197, 2.1.332"),
)
_TEXT = [(kind, re.compile(rx, re.I)) for kind, rx, _ in TEXT_PATTERNS]
EPOCH_RE = re.compile(r"usage limit reached\|(\d{9,11})", re.I)
RESET_RE = re.compile(
    r"resets\s+(?:at\s+)?(?:(?P<mon>[A-Z][a-z]{2})\s+(?P<day>\d{1,2}),?\s+(?:at\s+)?)?"
    r"(?P<h>\d{1,2})(?::(?P<m>\d{2}))?\s*(?P<ampm>am|pm)?\s*(?:\((?P<tz>[^)]+)\))?",
    re.I,
)
MONTHS = {m: i for i, m in enumerate(["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"], 1)}


class ClaudeBackend:
    def __init__(self) -> None:
        self.info: CliInfo | None = None

    def check(self, settings: Settings) -> list[str]:
        """What stops tasks from running (or will), said at daemon start instead of at the first task."""
        env = task_env(settings)
        self.info = probe(settings.claude_bin, env)
        self.info.isolation_args()
        if logged_in(settings.claude_bin, env) is False:
            return [f"claude {self.info.version} is not logged in: run `{self.info.login_command}`; "
                    "tasks wait in the queue until it is"]
        return []

    def invocation(self, task: Task, settings: Settings, cwd: Path, *, profile: Profile | None = None,
                   session: str | None = None) -> Invocation:
        """argv as a list (never a shell); `--flag=value` so a value can never be read as a flag.

        Isolated: the task sees none of the user's MCP servers, settings, hooks, plugins, skills or
        CLAUDE.md, and only the tools the spool's own config grants (its profile's, if it names one).
        """
        env = task_env(settings)
        self.info = probe(settings.claude_bin, env)
        tools = profile.tools if profile and profile.tools is not None else settings.allowed_tools
        builtin = [t for t in tools if not t.startswith("mcp__")]  # --tools names built-in tools only
        owner_mcp = bool(profile and profile.mcp_config)
        argv = [settings.claude_bin, "-p", "--output-format", "stream-json", "--verbose",
                *self.info.isolation_args(owner_mcp), f"--model={task.model}", f"--tools={','.join(builtin)}"]
        if self.info.supports("--include-partial-messages"):
            argv.append("--include-partial-messages")  # the answer as it is written, not only per turn
        if tools:
            argv.append(f"--allowedTools={','.join(tools)}")
        for d in profile.add_dirs if profile else []:
            argv.append(f"--add-dir={Path(d).expanduser()}")
        if profile and profile.mcp_config:
            argv.append(f"--mcp-config={Path(profile.mcp_config).expanduser()}")
        system = "\n\n".join(t for t in (settings.system_prompt, profile.system if profile else None, task.system) if t)
        if system:
            argv.append(f"--append-system-prompt={system}")
        for flag, value in (("--max-budget-usd", task.max_budget_usd), ("--fallback-model", task.fallback_model),
                            ("--effort", task.effort), ("--max-turns", task.max_turns), ("--resume", session)):
            if value is not None:
                argv.append(f"{flag}={value}")
        self._check_flags(argv)
        if task.schema is not None:
            argv.append(f"--json-schema={json.dumps(task.schema, separators=(',', ':'), ensure_ascii=False)}")
        return Invocation(argv, env, task.prompt.encode(), cwd)

    def _check_flags(self, argv: list[str]) -> None:
        """A task option this CLI has no flag for fails the task with words, not as 'printed no result'."""
        assert self.info
        for arg in argv[1:]:
            flag = arg.split("=", 1)[0]
            if flag in OPTION_FLAGS and not self.info.supports(flag):
                raise BadInput(f"claude {self.info.version} has no {flag}, which this task needs; upgrade the CLI "
                               "(npm install -g @anthropic-ai/claude-code) or drop the option that asks for it")

    def progress(self) -> Stream:
        return Stream()

    def classify(self, task: Task, proc: ProcResult) -> Outcome:
        return classify(task, proc, login_command=self.info.login_command if self.info else LOGIN_COMMAND)


def task_env(settings: Settings) -> dict[str, str]:
    """The daemon's environment, less what would break or redirect a task, plus no non-essential traffic."""
    env = {k: v for k, v in environ().items() if k not in DROP_ENV}
    if not settings.keep_api_key:
        env.pop("ANTHROPIC_API_KEY", None)  # it would silently override the subscription login
    env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] = "1"  # no title request: one model call per task
    return env


def text_kind(text: str) -> str | None:
    """The first TEXT_PATTERNS kind whose pattern the text matches."""
    return next((kind for kind, rx in _TEXT if rx.search(text)), None)


def classify(task: Task, proc: ProcResult, now: datetime | None = None, login_command: str = LOGIN_COMMAND) -> Outcome:
    """Turn one CLI run into an Outcome: the result's structured fields first, the stream's events next, text last."""
    now = now or datetime.now(UTC)
    if proc.timed_out:
        return Outcome("failed", error=timeout_message(task, proc))
    stream = parse(proc.stdout)
    res = stream.result
    if res is None:
        if _limit_rejected(stream):
            return _usage_hold(Outcome("hold"), stream, "", now)
        if proc.returncode is not None and proc.returncode < 0:
            return Outcome("retry", error=f"claude was killed by signal {-proc.returncode}")
        return Outcome("retry", error=f"claude printed no result (exit {proc.returncode}): {stderr_tail(proc)}")
    out = _metrics(res, stream)
    text = str(res.get("result") or res.get("error") or "; ".join(map(str, res.get("errors") or [])) or "").strip()
    subtype = str(res.get("subtype") or "")
    status = res.get("api_error_status")
    errors = set(stream.errors)
    if not res.get("is_error") and subtype in ("success", ""):
        out.kind, out.answer = "done", str(res.get("result") or "")
        if res.get("structured_output") is not None:
            out.structured = res["structured_output"]
            out.answer = "```json\n" + json.dumps(res["structured_output"], indent=2, ensure_ascii=False) + "\n```\n"
        return out
    if subtype in STOPPED_SUBTYPES:
        out.kind, out.error = "failed", STOPPED_SUBTYPES[subtype]
        return out
    kind = text_kind(text)
    if res.get("api_error") == "usage_limit_reached" or _limit_rejected(stream) or kind == "usage_limit":
        return _usage_hold(out, stream, text, now)
    if errors & AUTH_ERRORS or status in (401, 403) or kind == "auth":
        out.kind, out.hold_until, out.counted = "hold", now + AUTH_HOLD, False
        out.error = (f"claude is not logged in or its credentials were refused ({text[:200]}): "
                     f"run `{login_command}`, then `spoold config --clear-hold`")
        return out
    if errors & BILLING_ERRORS or kind == "billing":
        out.kind, out.hold_until, out.counted = "hold", now + BILLING_HOLD, False
        out.error = f"the account cannot pay for requests ({text[:200]}); add credit, then `spoold config --clear-hold`"
        return out
    if (errors & TRANSIENT_ERRORS or res.get("api_error_type") in TRANSIENT_TYPES or status in (408, 409, 429)
            or (isinstance(status, int) and status >= 500) or kind == "transient"):
        out.kind, out.error = "retry", f"temporary API error: {text[:300]}"
        return out
    out.kind = "failed"
    out.error = f"claude refused the task: {text[:500] or subtype or 'unknown error'}"
    return out


def _limit_rejected(stream: Stream) -> bool:
    return stream.limit is not None and stream.limit.status == "rejected"


def _usage_hold(out: Outcome, stream: Stream, text: str, now: datetime) -> Outcome:
    """Hold the queue until the reset the CLI reported: its event's `resetsAt`, else the time in its words."""
    limit = stream.limit if _limit_rejected(stream) else None
    if limit and limit.resets_at and limit.resets_at > now.timestamp():
        until = datetime.fromtimestamp(limit.resets_at, UTC)
    else:
        until = usage_limit_reset(text, now)
    what = window_words(limit.name) if limit and limit.name else "usage"
    # A family's own window (weekly Opus) stops only that family: this task waits, the others go on.
    out.kind = "wait" if limit and limit.name in FAMILY_WINDOWS else "hold"
    out.hold_until = until
    out.error = f"subscription {what} limit reached: {text or 'rejected'}"
    return out


def _metrics(res: dict[str, Any], stream: Stream) -> Outcome:
    usage: dict[str, Any] = res["usage"] if isinstance(res.get("usage"), dict) else {}
    model_usage: dict[str, Any] = res["modelUsage"] if isinstance(res.get("modelUsage"), dict) else {}
    resolved = None
    if model_usage:
        resolved = max(model_usage, key=lambda m: _num((model_usage[m] or {}).get("outputTokens")) or 0)
    elif stream.init.get("model"):
        resolved = str(stream.init["model"])
    return Outcome(
        "failed",
        model_resolved=resolved,
        cost_usd=_num(res.get("total_cost_usd")),
        input_tokens=_int(usage.get("input_tokens")),
        output_tokens=_int(usage.get("output_tokens")),
        cache_read_tokens=_int(usage.get("cache_read_input_tokens")),
        cache_creation_tokens=_int(usage.get("cache_creation_input_tokens")),
        session_id=str(res["session_id"]) if res.get("session_id") else None,
        windows=list(stream.windows.values()),
    )


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _int(v: Any) -> int | None:
    return int(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def usage_limit_reset(text: str, now: datetime | None = None) -> datetime:
    """When a usage limit lifts, from the CLI's message; a fixed back-off if no time can be read."""
    now = now or datetime.now(UTC)
    m = EPOCH_RE.search(text)
    if m:
        return datetime.fromtimestamp(int(m.group(1)), UTC)
    m = RESET_RE.search(text)
    if not m:
        return now + USAGE_LIMIT_FALLBACK
    tz: Any = UTC
    if m.group("tz"):
        try:
            tz = ZoneInfo(m.group("tz").strip())
        except (ZoneInfoNotFoundError, ValueError):
            tz = UTC
    hour, minute = int(m.group("h")), int(m.group("m") or 0)
    if m.group("ampm"):
        hour = hour % 12 + (12 if m.group("ampm").lower() == "pm" else 0)
    if hour > 23 or minute > 59:
        return now + USAGE_LIMIT_FALLBACK
    local_now = now.astimezone(tz)
    if m.group("mon") and m.group("mon").lower() in MONTHS:
        try:
            cand = local_now.replace(month=MONTHS[m.group("mon").lower()], day=int(m.group("day")),
                                     hour=hour, minute=minute, second=0, microsecond=0)
        except ValueError:
            return now + USAGE_LIMIT_FALLBACK
        if cand < local_now - timedelta(days=180):
            cand = cand.replace(year=cand.year + 1)
    else:
        cand = local_now.replace(hour=hour, minute=minute, second=0, microsecond=0)
        if cand <= local_now:
            cand += timedelta(days=1)
    return cand.astimezone(UTC)
