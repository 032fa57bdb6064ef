"""Classifying real `claude -p` results (captured from CLI 2.1.197) and the command backend's argv."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from pathlib import Path

import pytest

from spoold.backends import ProcResult
from spoold.backends.claude import (
    ClaudeBackend,
    classify,
    parse_result_json,
    usage_limit_reset,
)
from spoold.backends.command import CommandBackend
from spoold.config import Settings
from spoold.task import Task

FIXTURES = Path(__file__).parent / "fixtures" / "cli_results"
TASK = Task(id="20261124T160000000Z-abcdef", prompt="hi\n")

EXPECTED = {
    "success": "done", "success_oauth": "done",
    "error_500": "retry", "overloaded_529": "retry", "rate_limit_429_api_key": "retry",
    "usage_limit_api_key": "retry", "timeout_api_timeout_ms": "retry", "hang_sigterm": "retry",
    "auth_401_api_key": "hold", "auth_401_oauth": "hold", "auth_401_oauth_expired": "hold",
    "auth_403_oauth_revoked": "hold", "auth_401_oauth_x_api_key": "hold", "credit_balance_400": "hold",
    "usage_limit_session_oauth": "hold", "usage_limit_weekly_oauth": "hold",
    "invalid_request_400": "failed", "model_not_found_404": "failed", "model_with_flag": "failed",
    "prompt_too_long_400": "failed",
}


def captured(name: str) -> tuple[ProcResult, dict]:
    meta = json.loads((FIXTURES / f"{name}.meta.json").read_text())
    code = meta["exit_code"]
    rc = -15 if code == 143 else code
    return ProcResult(rc, (FIXTURES / f"{name}.stdout").read_bytes(), meta["stderr"].encode()), meta


def test_every_captured_scenario_is_covered() -> None:
    assert {p.name.removesuffix(".stdout") for p in FIXTURES.glob("*.stdout")} == set(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_classification_of_real_cli_results(name: str) -> None:
    proc, meta = captured(name)
    out = classify(TASK, proc, now=datetime.fromtimestamp(meta["captured_at"], UTC))
    assert out.kind == EXPECTED[name], out.error
    if out.kind == "done":
        assert out.answer == "4" and out.cost_usd and out.model_resolved and out.session_id
        assert out.input_tokens is not None and out.output_tokens is not None
    else:
        assert out.error  # always words a user can act on


def test_auth_hold_says_to_log_in() -> None:
    out = classify(TASK, captured("auth_401_oauth_x_api_key")[0])
    assert "claude login" in out.error


@pytest.mark.parametrize("name", ["usage_limit_session_oauth", "usage_limit_weekly_oauth"])
def test_usage_limit_reset_time_is_parsed(name: str) -> None:
    proc, meta = captured(name)
    resets_at = int(re.search(r"resets_at=(\d+)", meta["fake_replies_served"][0]).group(1))
    out = classify(TASK, proc, now=datetime.fromtimestamp(meta["captured_at"], UTC))
    assert abs(out.hold_until.timestamp() - resets_at) < 60  # the message has minute precision


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Claude AI usage limit reached|1795548542", datetime.fromtimestamp(1795548542, UTC)),
        ("You've hit your limit · resets 1:32pm (UTC)", datetime(2026, 11, 24, 13, 32, tzinfo=UTC)),
        ("You've hit your limit · resets 9am (UTC)", datetime(2026, 11, 25, 9, 0, tzinfo=UTC)),
        ("You've hit your session limit · resets 5pm (Europe/Paris)", datetime(2026, 11, 24, 16, 0, tzinfo=UTC)),
        ("You've hit your limit", datetime(2026, 11, 24, 12, 30, tzinfo=UTC)),
    ],
)
def test_reset_formats(text: str, expected: datetime) -> None:
    assert usage_limit_reset(text, datetime(2026, 11, 24, 12, 0, tzinfo=UTC)) == expected


@pytest.mark.parametrize(
    ("stdout", "rc", "kind"),
    [
        (b"", -9, "retry"),
        (b'{"type":"result","is_er', 1, "retry"),
        (b"garbage\n", 0, "retry"),
        (b'[{"type":"system"},{"type":"result","subtype":"success","is_error":false,"result":"ok"}]', 0, "done"),
        (b'{"type":"result","subtype":"success","is_error":true,"result":"boom"}', 0, "failed"),
        (b'{"type":"result","subtype":"error_max_turns","is_error":true}', 1, "failed"),
    ],
)
def test_odd_shapes(stdout: bytes, rc: int, kind: str) -> None:
    assert classify(TASK, ProcResult(rc, stdout, b"x" * 100_000)).kind == kind


def test_timeout_fails_with_a_hint() -> None:
    out = classify(TASK, ProcResult(-15, b"", b"", timed_out=True, duration_s=30))
    assert out.kind == "failed" and "timeout" in out.error


def test_parse_picks_the_last_result_of_an_array() -> None:
    data = b'[{"type":"result","result":"first"},{"type":"x"},{"type":"result","result":"last"}]'
    assert parse_result_json(data)["result"] == "last"


def test_claude_argv_cannot_be_smuggled(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-secret")
    monkeypatch.setenv("CLAUDECODE", "1")
    monkeypatch.setenv("CLAUDE_CODE_ENTRYPOINT", "cli")
    task = Task(id=TASK.id, prompt="--help\n", model="opus", system="--dangerously-skip-permissions",
                extra={"allowedTools": "Bash"})
    inv = ClaudeBackend().invocation(task, Settings(), tmp_path)
    assert inv.argv == ["claude", "-p", "--output-format", "json", "--model=opus", "--tools=",
                        "--append-system-prompt=--dangerously-skip-permissions"]
    assert inv.stdin == b"--help\n" and inv.cwd == tmp_path
    assert not {"ANTHROPIC_API_KEY", "CLAUDECODE", "CLAUDE_CODE_ENTRYPOINT"} & set(inv.env)
    kept = ClaudeBackend().invocation(task, Settings(keep_api_key=True, allowed_tools=["WebSearch"]), tmp_path)
    assert kept.env["ANTHROPIC_API_KEY"] == "sk-secret" and "--tools=WebSearch" in kept.argv


def test_command_backend_fills_the_template(tmp_path: Path) -> None:
    inv = CommandBackend(["llm", "-m", "{model}", "--title={title}"]).invocation(
        Task(id=TASK.id, prompt="p", model="haiku", title="T"), Settings(), tmp_path)
    assert inv.argv == ["llm", "-m", "haiku", "--title=T"] and inv.stdin == b"p"
