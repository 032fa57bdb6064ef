"""Settings and their one precedence: flags > environment > the spool's config.yaml > defaults."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from spoold import units
from spoold.errors import ConfigError

DEFAULT_SPOOL = "~/async"


@dataclass(frozen=True)
class Profile:
    """What the spool's owner lets a task that names this profile use; a dropped file can only choose one."""

    cwd: str | None = None  # the working directory (default: spoold's own neutral one)
    tools: list[str] | None = None  # built-in tools granted (default: the spool's allowed_tools)
    add_dirs: list[str] = field(default_factory=list)  # more directories the file tools may read
    mcp_config: str | None = None  # an MCP config file: only its servers, never the user's own
    system: str | None = None  # appended to the system prompt


PROFILE_KEYS = {f.name for f in fields(Profile)}


@dataclass
class Settings:
    """Everything a daemon, the CLI or the adapter may tune."""

    max_requests: int = 10
    window_minutes: float = 60.0
    min_interval_s: float = 0.0
    concurrency: int = 1
    budget_day_usd: float | None = None
    budget_month_usd: float | None = None
    reserve: float | None = None  # share of each subscription window kept for the user's own use (0.2 = 20%)
    strategy: str = "priority"
    max_attempts: int = 3
    retry_backoff_s: float = 15.0
    timeout_s: float = 1800.0
    grace_s: float = 10.0
    max_bytes: int = 1024 * 1024
    default_model: str = "sonnet"
    backend: str = "claude"
    claude_bin: str = "claude"
    command: list[str] = field(default_factory=list)
    allowed_tools: list[str] = field(default_factory=list)
    keep_api_key: bool = False
    scan_interval_s: float = 5.0
    system_prompt: str | None = None  # appended to every claude task's system prompt (a profile's comes after)
    profiles: dict[str, Profile] = field(default_factory=dict)
    notify: dict[str, str] = field(default_factory=dict)  # target name -> Apprise URL (ntfy://, mailto://, json://, ...)
    notify_on: dict[str, list[str]] = field(default_factory=dict)  # event -> target names (default: DEFAULT_NOTIFY_ON)
    on_finish: list[str] = field(default_factory=list)  # argv run (no shell) when a task ends
    on_hold: list[str] = field(default_factory=list)  # argv run when the queue is held
    hook_timeout_s: float = 30.0
    # several hosts on one synced spool (spoold.hosts)
    heartbeat_s: float = 30.0  # how often a daemon rewrites its heartbeat
    host_lease_s: float = 300.0  # a host silent this long is gone: its queued tasks and dropped files move
    running_lease_s: float = 900.0  # ... and this long: its running tasks are run again by another host
    handover_s: float = 60.0  # a task whose owner changed waits this long for the old owner's renames to arrive
    limit_mode: str = "shared"  # shared: the union of hosts' starts; strict: also each live host its share
    # group commit: "full" fsyncs every transition as it happens; "batch" flushes the daemon's writes together
    durability: str = "full"
    commit_interval_ms: float = 50.0  # batch: at most this long between a write and its flush


# Environment names, kept from the original design where they existed.
ENV = {
    "max_requests": "MAX_REQUESTS",
    "window_minutes": "WINDOW_MINUTES",
    "concurrency": "SPOOLD_CONCURRENCY",
    "max_attempts": "SPOOLD_MAX_ATTEMPTS",
    "timeout_s": "SPOOLD_TIMEOUT",
    "claude_bin": "SPOOLD_CLAUDE",
    "backend": "SPOOLD_BACKEND",
    "default_model": "SPOOLD_MODEL",
    "scan_interval_s": "SPOOLD_SCAN_INTERVAL",
}
STRATEGIES = ("priority", "fifo", "lifo")
EVENTS = ("done", "failed", "cancelled", "held", "resumed", "drained")  # what a notification can be about
DEFAULT_NOTIFY_ON = {"done": ["all"], "failed": ["all"], "held": ["all"], "resumed": ["all"], "drained": ["all"]}
MODEL_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/\[\]@-]{0,199}$")  # an alias or a model id
TARGET_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,39}$")  # a notification target's name
BACKENDS = ("claude", "command")
LIMIT_MODES = ("shared", "strict")
DURABILITIES = ("full", "batch")


def spool_root(flag: str | None = None) -> Path:
    """--spool, else SPOOLD_DIR, else ~/async."""
    return Path(flag or os.environ.get("SPOOLD_DIR") or DEFAULT_SPOOL).expanduser()


def _coerce(name: str, value: Any) -> Any:
    """Turn a raw value (text from env or YAML) into the field's type, or say what is wrong."""
    default = getattr(Settings(), name)
    kind = {f.name: f.type for f in fields(Settings)}[name]
    if name == "profiles":
        return _profiles(value)
    if name == "notify":
        return _targets(value)
    if name == "notify_on":
        return _rules(value)
    try:
        if value is None:
            if "None" in str(kind):
                return None
            raise ValueError
        if isinstance(default, bool):
            if isinstance(value, str):
                return value.strip().lower() in ("1", "true", "yes", "on")
            return bool(value)
        if isinstance(default, list):
            if isinstance(value, str):
                argv = name in ("command", "on_finish", "on_hold")
                return value.split() if argv else [v for v in value.replace(",", " ").split() if v]
            return [str(v) for v in value]
        if isinstance(default, int) and not isinstance(default, bool):
            return int(value)
        if isinstance(default, float) or "float" in str(kind):
            if name.endswith("_s") and isinstance(value, str) and (secs := units.seconds(value)) is not None:
                return secs  # a duration as a task's `timeout:` takes it: 30m, 2h
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        expected = "seconds, such as 600 or 30m" if name.endswith("_s") else kind
        raise ConfigError(f"setting {name}={value!r} has the wrong type; expected {expected}") from None


def _profiles(value: Any) -> dict[str, Profile]:
    """`profiles:` in config.yaml: name -> {cwd, tools, add_dirs, mcp_config, system}."""
    if value is None:
        return {}
    if isinstance(value, dict) and all(isinstance(p, Profile) for p in value.values()):
        return dict(value)
    if not isinstance(value, dict):
        raise ConfigError("profiles must be a mapping of name -> {cwd, tools, add_dirs, mcp_config, system}")
    out = {}
    for name, spec in value.items():
        spec = spec or {}
        if not isinstance(spec, dict) or set(map(str, spec)) - PROFILE_KEYS:
            bad = sorted(set(map(str, spec)) - PROFILE_KEYS) if isinstance(spec, dict) else spec
            raise ConfigError(f"profile {name!r}: unknown key(s) {bad}; known: {', '.join(sorted(PROFILE_KEYS))}")
        lists = {k: _strings(name, k, spec[k]) for k in ("tools", "add_dirs") if spec.get(k) is not None}
        texts = {k: _string(name, k, spec[k]) for k in ("cwd", "mcp_config", "system") if spec.get(k) is not None}
        out[str(name)] = Profile(**lists, **texts)  # type: ignore[arg-type]
    return out


def _targets(value: Any) -> dict[str, str]:
    """`notify:` name -> Apprise URL. Names are what tasks and `notify_on` may choose; URLs only the owner sets."""
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) and "://" in v for v in value.values()):
        raise ConfigError("notify must be a mapping of target name -> Apprise URL, such as phone: ntfy://ntfy.sh/my-topic")
    bad = [str(k) for k in value if not TARGET_RE.match(str(k)) or str(k) in ("all", "none")]
    if bad:
        raise ConfigError(f"notify: {bad[0]!r} is not a target name (letters, digits, - and _; not all or none)")
    return {str(k): v.strip() for k, v in value.items()}


def _rules(value: Any) -> dict[str, list[str]]:
    """`notify_on:` event -> [target names] (or `all`, or `none`)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"notify_on must map events ({', '.join(EVENTS)}) to target names, such as failed: [phone]")
    out = {}
    for event, names in value.items():
        if event not in EVENTS:
            raise ConfigError(f"notify_on: no event {event!r}; the events are {', '.join(EVENTS)}")
        names = [names] if isinstance(names, str) else names
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ConfigError(f"notify_on: {event} takes a list of target names, all, or none")
        out[str(event)] = [] if names == ["none"] else list(names)
    return out


def _strings(profile: str, key: str, value: Any) -> list[str]:
    """A list of text (one text is a list of one: `Bash(git log:*)` is one rule, never split)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
        raise ConfigError(f"profile {profile!r}: {key} must be a list of names, such as [Read, Grep]")
    return list(items)


def _string(profile: str, key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"profile {profile!r}: {key} must be text")
    return value


def validate(s: Settings) -> Settings:
    if s.max_requests < 1:
        raise ConfigError("max_requests must be at least 1")
    if s.window_minutes <= 0:
        raise ConfigError("window_minutes must be more than 0")
    if s.concurrency < 1:
        raise ConfigError("concurrency must be at least 1")
    if not MODEL_RE.match(s.default_model):
        raise ConfigError(f"default_model {s.default_model!r} is not a model name; use an alias (sonnet, opus, haiku) "
                          "or a full model id")
    if s.limit_mode not in LIMIT_MODES:
        raise ConfigError(f"limit_mode must be one of {', '.join(LIMIT_MODES)}")
    if s.durability not in DURABILITIES:
        raise ConfigError(f"durability must be one of {', '.join(DURABILITIES)}")
    if not 1 <= s.commit_interval_ms <= 10_000:
        raise ConfigError("commit_interval_ms must be from 1 to 10000")
    if not 0 < s.heartbeat_s <= s.host_lease_s / 3:
        raise ConfigError(f"heartbeat_s must be above 0 and at most a third of host_lease_s ({s.host_lease_s:g})")
    if s.running_lease_s < s.host_lease_s:
        raise ConfigError("running_lease_s must be at least host_lease_s")
    if s.handover_s < 0:
        raise ConfigError("handover_s must be 0 or more")
    if s.strategy not in STRATEGIES:
        raise ConfigError(f"strategy must be one of {', '.join(STRATEGIES)}")
    if s.backend not in BACKENDS:
        raise ConfigError("backend must be claude or command")
    if s.backend == "command" and not s.command:
        raise ConfigError("backend `command` needs `command:` (an argv list such as [llm, -m, '{model}'])")
    if s.reserve is not None and not 0 <= s.reserve < 1:
        raise ConfigError("reserve must be a share from 0 up to (not including) 1, such as 0.2 for 20%")
    for event, names in s.notify_on.items():
        unknown = [n for n in names if n != "all" and n not in s.notify]
        if unknown:
            raise ConfigError(f"notify_on: {event} names {unknown[0]!r}, which is not a target in notify: "
                              f"({', '.join(s.notify) or 'none defined'})")
    for name in ("budget_day_usd", "budget_month_usd"):
        v = getattr(s, name)
        if v is not None and v < 0:
            raise ConfigError(f"{name} must not be negative")
    return s


def read_file(path: Path) -> dict[str, Any]:
    """The spool's config.yaml as a mapping of known keys (unknown keys are an error to fix)."""
    return _checked(path, _read_raw(path))


def _checked(path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in fields(Settings)}
    unknown = sorted(set(map(str, raw)) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown setting(s) {', '.join(unknown)} (`spoold config --unset KEY` removes one); "
                          f"known: {', '.join(sorted(names))}")
    return {k: _coerce(k, v) for k, v in raw.items()}


def _read_raw(path: Path) -> dict[str, Any]:
    """config.yaml's mapping as written, unchecked (so that `--unset` can take a bad key out)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; fix or delete it") from None
    from spoold import spool

    cache = spool.config_cache_path(path)
    kept = spool.read_cache(cache) if cache is not None else None
    if isinstance(kept, dict) and kept.get("text") == text and isinstance(kept.get("raw"), dict):
        return dict(kept["raw"])  # the same text parsed before: a submit need not load PyYAML (~15 ms)
    import yaml  # lazy: without a config file a submit never pays for PyYAML

    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML ({type(e).__name__}); fix or delete it") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path} must be a mapping of settings")
    mapping = {str(k): v for k, v in raw.items()}
    if cache is not None and _json_exact(mapping):  # (a date, say, is parsed each time: JSON cannot hold it)
        spool.write_cache(cache, {"text": text, "raw": mapping})
    return mapping


def _json_exact(value: object) -> bool:
    import json

    try:
        return bool(json.loads(json.dumps(value)) == value)
    except (TypeError, ValueError):
        return False


def env_values(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The settings this environment sets (MAX_REQUESTS, SPOOLD_CONCURRENCY, ...), typed."""
    environ: Mapping[str, str] = os.environ if env is None else env
    return {name: _coerce(name, environ[var]) for name, var in ENV.items() if environ.get(var)}


def load(config_path: Path, overrides: dict[str, Any] | None = None, env: Mapping[str, str] | None = None) -> Settings:
    """Defaults, then the config file, then the environment, then flags (non-None overrides)."""
    values: dict[str, Any] = read_file(config_path)
    values.update(env_values(env))
    for name, v in (overrides or {}).items():
        if v is not None:
            values[name] = _coerce(name, v)
    return validate(Settings(**values))


def parse_value(text: str) -> Any:
    """A value typed on the command line, read as YAML (`3600`, `true`, `[Read, Grep]`), or as text."""
    import yaml

    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if value is None and text.strip() not in ("null", "~") else value


def update_file(spool_write: Any, config_path: Path, changes: dict[str, Any]) -> dict[str, Any]:
    """Merge changes into config.yaml (None removes a key) and write it atomically.

    `spool_write(path, data)` is the spool's atomic replace, passed in to keep
    the write rule in one module.
    """
    raw = _read_raw(config_path)
    names = {f.name for f in fields(Settings)}
    for k in changes:
        if k not in names and not (changes[k] is None and k in raw):  # a bad key in the file may be unset
            raise ConfigError(f"no setting {k!r}; known: {', '.join(sorted(names))}")
    for k in [k for k, v in changes.items() if v is None]:
        raw.pop(k, None)
    current = _checked(config_path, raw)
    for k, v in changes.items():
        if v is not None:
            current[k] = _coerce(k, v)
    validate(Settings(**current))
    import yaml

    plain = {k: ({n: {f: v for f, v in asdict(p).items() if v is not None} for n, p in v.items()}
                 if k == "profiles" else v) for k, v in current.items()}
    data = yaml.safe_dump(plain, sort_keys=True).encode()
    spool_write(config_path, data)
    return current


def as_dict(s: Settings) -> dict[str, Any]:
    """The settings as in effect (`notify_on` unset shows the default rule it stands for)."""
    return {**asdict(s), "notify_on": notify_rule(s)}


def notify_rule(s: Settings) -> dict[str, list[str]]:
    """Which events go to which targets: the owner's `notify_on`, else every event to every target."""
    return s.notify_on or DEFAULT_NOTIFY_ON


def as_yaml(values: dict[str, Any]) -> str:
    """Settings as YAML a person could paste into config.yaml (null, false, lists: not Python's None and [])."""
    import yaml

    return yaml.safe_dump(values, sort_keys=False, allow_unicode=True, default_flow_style=None, width=100)
