"""Settings: one precedence (flags > environment > config.yaml > defaults), types, profiles, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from spoold import config
from spoold.config import Profile, Settings
from spoold.errors import ConfigError


def _file(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "config.yaml"
    p.write_text(text)
    return p


def test_one_precedence(tmp_path: Path) -> None:
    path = _file(tmp_path, "max_requests: 5\nconcurrency: 2\ndefault_model: opus\n")
    s = config.load(path, {"concurrency": 4, "default_model": None}, env={"MAX_REQUESTS": "7"})
    assert (s.max_requests, s.concurrency, s.default_model) == (7, 4, "opus")  # env over file, flag over both
    assert config.load(tmp_path / "absent.yaml", env={}) == Settings()


@pytest.mark.parametrize(("text", "field", "value"), [
    ("keep_api_key: 'yes'", "keep_api_key", True), ("allowed_tools: Read, Grep", "allowed_tools", ["Read", "Grep"]),
    ("command: llm -m x", "command", ["llm", "-m", "x"]), ("budget_day_usd: null", "budget_day_usd", None),
    ("window_minutes: 90", "window_minutes", 90.0), ("reserve: 0.25", "reserve", 0.25),
    ("timeout_s: 30m", "timeout_s", 1800.0), ("grace_s: 90s", "grace_s", 90.0), ("heartbeat_s: '15'", "heartbeat_s", 15.0),
])
def test_values_take_their_settings_type(tmp_path: Path, text: str, field: str, value: object) -> None:
    s = config.load(_file(tmp_path, text + ("\nbackend: command" if field == "command" else "")), env={})
    assert getattr(s, field) == value


@pytest.mark.parametrize(("text", "message"), [
    ("max_requests: lots", "has the wrong type"), ("windw: 5", "unknown setting"), ("reserve: 1.5", "reserve must be"),
    ("concurrency: 0", "at least 1"), ("- a list", "must be a mapping"), ("a: [unclosed", "not valid YAML"),
    ("profiles: [a, b]", "profiles must be a mapping"), ("profiles: {x: {shell: true}}", "unknown key"),
    ("timeout_s: soon", "expected seconds, such as 600 or 30m"),
    ("default_model: ''", "is not a model name"),
])
def test_a_bad_config_is_one_clear_error(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config.load(_file(tmp_path, text), env={})


def test_profiles_are_read_typed_and_written_back(tmp_path: Path) -> None:
    path = _file(tmp_path, "profiles:\n  review:\n    cwd: ~/src\n    tools: [Read, Grep]\n    add_dirs: /srv/docs\n"
                 "  concise:\n    system: Three sentences at most.\n")
    s = config.load(path, env={})
    assert s.profiles == {"review": Profile(cwd="~/src", tools=["Read", "Grep"], add_dirs=["/srv/docs"]),
                          "concise": Profile(system="Three sentences at most.")}
    written: dict[str, bytes] = {}
    config.update_file(lambda p, data: written.setdefault("data", data), path, {"max_requests": 3})
    path.write_bytes(written["data"])
    again = config.load(path, env={})
    assert again.profiles == s.profiles and again.max_requests == 3


def test_a_spools_config_is_parsed_once_per_text(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """config.yaml's parse is kept with its text in .spoold/cache: the same text again needs no PyYAML (a
    submit's start-up); a changed text is parsed again; a file outside a spool keeps nothing."""
    import sys

    from spoold import spool

    sp = spool.open_spool(tmp_path / "sp")
    sp.config_path.write_text("concurrency: 3\nprofiles:\n  web:\n    tools: [WebSearch]\n")
    first = config.load(sp.config_path)
    assert spool.config_cache_path(sp.config_path) is not None and spool.config_cache_path(sp.config_path).exists()
    monkeypatch.setitem(sys.modules, "yaml", None)  # `import yaml` fails from here on
    assert config.load(sp.config_path) == first and first.concurrency == 3
    sp.config_path.write_text("concurrency: 4\n")
    with pytest.raises(ImportError):
        config.load(sp.config_path)  # a new text is parsed again, never answered from the old one
    monkeypatch.delitem(sys.modules, "yaml")
    assert config.load(sp.config_path).concurrency == 4
    sp.config_path.write_text("concurrency: 5\nwhen: 2026-12-02\n")  # a date: JSON cannot hold it, nothing kept
    with pytest.raises(ConfigError, match="unknown"):
        config.load(sp.config_path)
    assert spool.read_cache(spool.config_cache_path(sp.config_path))["text"] == "concurrency: 4\n"
    loose = tmp_path / "config.yaml"
    loose.write_text("concurrency: 2\n")
    assert config.load(loose).concurrency == 2 and spool.config_cache_path(loose) is None
