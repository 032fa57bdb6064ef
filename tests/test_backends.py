"""Classifying real `claude -p` stream-json runs (captured from both CLI releases) and the backends' argv."""

from __future__ import annotations

import json
import re
import signal
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest
from conftest import executable, fake_claude_script

from spoold import backends
from spoold.backends import Invocation, ProcResult, Stop, run_process
from spoold.backends.claude import (
    ClaudeBackend,
    classify,
    usage_limit_reset,
)
from spoold.backends.claude_probe import ISOLATION, probe
from spoold.backends.claude_stream import parse
from spoold.backends.command import CommandBackend
from spoold.config import Profile, Settings
from spoold.errors import BadInput, CliUnusable
from spoold.task import Task
from spoold.units import window_words

FIXTURES = Path(__file__).parent / "fixtures" / "cli_results"
TASK = Task(id="20261124T160000000Z-abcdef", prompt="hi\n")

VERSIONS = sorted(p.name for p in FIXTURES.iterdir() if p.is_dir())
EXPECTED = {
    "success": "done", "success_oauth": "done", "usage_warning_oauth": "done", "schema_output": "done",
    "error_500": "retry", "overloaded_529": "retry", "rate_limit_429_api_key": "retry",
    "usage_limit_api_key": "retry", "timeout_api_timeout_ms": "retry", "hang_sigterm": "retry",
    "auth_401_api_key": "hold", "auth_401_oauth": "hold", "auth_401_oauth_expired": "hold",
    "auth_403_oauth_revoked": "hold", "auth_401_oauth_x_api_key": "hold", "credit_balance_400": "hold",
    "usage_limit_session_oauth": "hold", "usage_limit_weekly_oauth": "hold",
    "usage_limit_opus_weekly_oauth": "wait",  # the weekly Opus limit stops opus tasks only
    "invalid_request_400": "failed", "model_not_found_404": "failed", "model_with_flag": "failed",
    "prompt_too_long_400": "failed", "max_turns": "failed", "budget_exceeded": "failed",
}
USAGE_LIMITS = {"usage_limit_session_oauth": "five_hour", "usage_limit_weekly_oauth": "seven_day",
                "usage_limit_opus_weekly_oauth": "seven_day_opus"}


def captured(name: str, version: str = "2.1.332") -> tuple[ProcResult, dict]:
    meta = json.loads((FIXTURES / version / f"{name}.meta.json").read_text())
    code = meta["exit_code"]
    rc = -15 if code == 143 else code
    return ProcResult(rc, (FIXTURES / version / f"{name}.stdout").read_bytes(), meta["stderr"].encode()), meta


def test_both_releases_are_captured_and_every_scenario_is_covered() -> None:
    assert len(VERSIONS) >= 2
    for version in VERSIONS:
        assert {p.name.removesuffix(".stdout") for p in (FIXTURES / version).glob("*.stdout")} == set(EXPECTED)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_classification_of_real_cli_results(name: str, version: str) -> None:
    proc, meta = captured(name, version)
    out = classify(TASK, proc, now=datetime.fromtimestamp(meta["captured_at"], UTC))
    assert out.kind == EXPECTED[name], out.error
    if out.kind == "done":
        assert out.answer in ("4", '```json\n{\n  "n": 4\n}\n```\n') and out.model_resolved and out.session_id
        assert out.structured == ({"n": 4} if name == "schema_output" else None)
        assert out.input_tokens is not None and out.output_tokens is not None
    else:
        assert out.error  # always words a user can act on
        assert "\n" not in out.error


@pytest.mark.parametrize("version", VERSIONS)
def test_auth_hold_says_to_log_in(version: str) -> None:
    out = classify(TASK, captured("auth_401_oauth_x_api_key", version)[0])
    assert "run `claude auth login`" in out.error  # what 2.1.x calls it; the probe reads it from `claude auth --help`
    assert out.kind == "hold" and out.counted is False  # refused before any work: it gives its start back
    older = classify(TASK, captured("auth_401_oauth_x_api_key", version)[0], login_command="claude login")
    assert "run `claude login`" in older.error


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(USAGE_LIMITS))
def test_usage_limit_holds_until_the_reset_the_cli_reported(name: str, version: str) -> None:
    proc, meta = captured(name, version)
    resets_at = int(re.search(r"resets_at=(\d+)", meta["fake_replies_served"][0]).group(1))
    out = classify(TASK, proc, now=datetime.fromtimestamp(meta["captured_at"], UTC))
    assert out.kind == ("wait" if name == "usage_limit_opus_weekly_oauth" else "hold")
    assert out.hold_until.timestamp() == resets_at  # the event's resetsAt, to the second
    assert f"{window_words(USAGE_LIMITS[name])} limit" in out.error
    assert out.windows and {w.name for w in out.windows} >= {USAGE_LIMITS[name]}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("name", sorted(USAGE_LIMITS))
def test_usage_limit_text_alone_still_holds(name: str, version: str) -> None:
    """Without its rate_limit_event (an older or different CLI), the words and their time still hold the queue."""
    proc, meta = captured(name, version)
    lines = [ln for ln in proc.stdout.splitlines() if b'"rate_limit_event"' not in ln]
    stripped = b"\n".join(ln.replace(b'"api_error":"usage_limit_reached"', b'"api_error":null') for ln in lines)
    resets_at = int(re.search(r"resets_at=(\d+)", meta["fake_replies_served"][0]).group(1))
    out = classify(TASK, ProcResult(1, stripped, b""), now=datetime.fromtimestamp(meta["captured_at"], UTC))
    assert out.kind == "hold" and abs(out.hold_until.timestamp() - resets_at) < 60  # the words have minute precision


@pytest.mark.parametrize("version", VERSIONS)
def test_a_warning_reports_the_windows_utilization(version: str) -> None:
    out = classify(TASK, captured("usage_warning_oauth", version)[0])
    five = next(w for w in out.windows if w.name == "five_hour")
    assert out.kind == "done" and five.status == "allowed_warning" and five.utilization == 0.85


@pytest.mark.parametrize("version", VERSIONS)
def test_stream_tells_the_resolved_model_and_loaded_tools(version: str) -> None:
    stream = parse(captured("success", version)[0].stdout)
    assert stream.init["model"].startswith("claude-") and stream.init["mcp_servers"] == []
    assert stream.answer_so_far == "4" and stream.result["result"] == "4"


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
    assert parse(data).result["result"] == "last"


def test_claude_argv_cannot_be_smuggled(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("ANTHROPIC_API_KEY", "sk-secret")
    monkeypatch.setenv("CLAUDECODE", "1")
    monkeypatch.setenv("CLAUDE_CODE_ENTRYPOINT", "cli")
    exe = str(fake_claude_script(tmp_path / "claude", "exit 0"))
    task = Task(id=TASK.id, prompt="--help\n", model="opus", system="--dangerously-skip-permissions",
                extra={"allowedTools": "Bash"})
    inv = ClaudeBackend().invocation(task, Settings(claude_bin=exe), tmp_path)
    assert inv.argv == [exe, "-p", "--output-format", "stream-json", "--verbose", *ISOLATED, "--model=opus", "--tools=",
                        "--append-system-prompt=--dangerously-skip-permissions"]
    assert inv.stdin == b"--help\n" and inv.cwd == tmp_path
    assert not {"ANTHROPIC_API_KEY", "CLAUDECODE", "CLAUDE_CODE_ENTRYPOINT"} & set(inv.env)
    assert inv.env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"  # no title request: one model call
    kept = ClaudeBackend().invocation(task, Settings(claude_bin=exe, keep_api_key=True, allowed_tools=["WebSearch"]),
                                      tmp_path)
    assert kept.env["ANTHROPIC_API_KEY"] == "sk-secret" and "--tools=WebSearch" in kept.argv


ISOLATED = ["--strict-mcp-config", "--setting-sources=", "--safe-mode", "--disable-slash-commands"]


def _cli(tmp_path: Path, help_text: str, auth_help: str = "  login [options]") -> Path:
    """A fake CLI with the given --help, counting how often it is asked."""
    return executable(tmp_path / "claude", f"""#!/bin/sh
echo "$@" >> {tmp_path}/calls
case "$1" in
  --version) echo "2.1.500 (Claude Code)";;
  --help) echo "{help_text}";;
  auth) echo "{auth_help}";;
esac
""")


def test_isolation_uses_every_flag_the_cli_has_and_asks_it_once(tmp_path: Path) -> None:
    every = " ".join(flag.split("=")[0] for flag, _, _ in ISOLATION)
    exe = _cli(tmp_path, f"  -p, --print  {every}  --tools <tools...>")
    info = probe(str(exe))
    assert info.version == "2.1.500" and info.isolation_args() == [flag for flag, _, _ in ISOLATION]
    assert "--restricted" in info.isolation_args() and "--permission-prompts=none" in info.isolation_args()
    for _ in range(3):
        assert probe(str(exe)) is info
    assert (tmp_path / "calls").read_text().splitlines() == ["--version", "--help", "auth --help"]  # once per binary
    exe.write_text(exe.read_text().replace("2.1.500", "2.1.501"))  # an upgrade: a different file
    assert probe(str(exe)).version == "2.1.501"


def test_a_cli_that_cannot_isolate_runs_no_task(tmp_path: Path) -> None:
    exe = _cli(tmp_path, "  -p, --print  --safe-mode  --tools <tools...>", auth_help="")
    info = probe(str(exe))
    assert info.login_command == "claude login"  # this release has no `claude auth login`
    with pytest.raises(CliUnusable, match=r"no --strict-mcp-config or --setting-sources.*upgrade"):
        ClaudeBackend().invocation(TASK, Settings(claude_bin=str(exe)), tmp_path)


def test_a_missing_cli_says_how_to_install_it(tmp_path: Path) -> None:
    with pytest.raises(CliUnusable, match="not found.*npm install -g @anthropic-ai/claude-code"):
        probe(str(tmp_path / "nope"))


def test_command_backend_fills_the_template(tmp_path: Path) -> None:
    inv = CommandBackend(["llm", "-m", "{model}", "--title={title}"]).invocation(
        Task(id=TASK.id, prompt="p", model="haiku", title="T"), Settings(), tmp_path)
    assert inv.argv == ["llm", "-m", "haiku", "--title=T"] and inv.stdin == b"p"


def test_each_task_option_maps_to_the_clis_own_flag(tmp_path: Path) -> None:
    exe = str(fake_claude_script(tmp_path / "claude", "exit 0"))
    task = Task(id=TASK.id, prompt="p", model="opus", max_budget_usd=0.5, fallback_model="sonnet", effort="high",
                max_turns=3, schema={"type": "object"}, system="task line")
    s = Settings(claude_bin=exe, system_prompt="spool line")
    argv = ClaudeBackend().invocation(task, s, tmp_path, session="sess-1").argv
    assert argv[-7:] == ["--append-system-prompt=spool line\n\ntask line", "--max-budget-usd=0.5",
                         "--fallback-model=sonnet", "--effort=high", "--max-turns=3", "--resume=sess-1",
                         '--json-schema={"type":"object"}']


def test_a_profile_grants_its_tools_dirs_and_mcp_config_only(tmp_path: Path) -> None:
    exe = str(fake_claude_script(tmp_path / "claude", "exit 0"))
    profile = Profile(cwd=str(tmp_path), tools=["Read", "mcp__docs__search"], add_dirs=["/srv/docs"],
                      mcp_config=str(tmp_path / "mcp.json"), system="profile line")
    argv = ClaudeBackend().invocation(TASK, Settings(claude_bin=exe, allowed_tools=["Bash"]), tmp_path,
                                      profile=profile).argv
    assert "--tools=Read" in argv and "--allowedTools=Read,mcp__docs__search" in argv and "Bash" not in str(argv)
    assert "--add-dir=/srv/docs" in argv and f"--mcp-config={tmp_path / 'mcp.json'}" in argv
    assert "--strict-mcp-config" in argv and "--setting-sources=" in argv  # only the profile's servers load
    assert "--safe-mode" not in argv  # it would switch the profile's own MCP servers off too
    assert "--append-system-prompt=profile line" in argv


def test_an_option_the_cli_lacks_fails_the_task_with_words(tmp_path: Path) -> None:
    exe = _cli(tmp_path, "  -p, --print  --strict-mcp-config --setting-sources --tools <tools...>")
    with pytest.raises(BadInput, match=r"claude 2.1.500 has no --effort, which this task needs; upgrade"):
        ClaudeBackend().invocation(Task(id=TASK.id, prompt="p", effort="high"), Settings(claude_bin=str(exe)), tmp_path)


# ---- the process runner (spoold.backends.run_process) ----------------------------------------


def _inv(tmp_path: Path, script: str, stdin: bytes = b"") -> Invocation:
    return Invocation(["sh", "-c", script], {"PATH": "/usr/bin:/bin"}, stdin, tmp_path)


def test_the_runner_feeds_stdin_larger_than_a_pipe_while_it_reads_stdout(tmp_path: Path) -> None:
    data = bytes(range(256)) * 8192  # 2 MiB: both pipes fill many times over
    seen: list[bytes] = []
    proc = run_process(_inv(tmp_path, "cat; echo done >&2", data), 30, on_stdout=seen.append)
    assert proc.returncode == 0 and proc.stdout == data == b"".join(seen) and proc.stderr == b"done\n"
    assert not proc.timed_out


def test_a_stop_ends_a_quiet_run_at_once(tmp_path: Path) -> None:
    stop = Stop()
    threading.Timer(0.2, stop.request, ("cancel",)).start()
    proc = run_process(_inv(tmp_path, "sleep 30"), 60, stop=stop)
    stop.close()
    assert proc.returncode == -signal.SIGTERM and proc.stopped and not proc.timed_out and proc.duration_s < 10
    assert stop.requested and stop.reason == "cancel"


def test_a_run_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    proc = run_process(_inv(tmp_path, "trap '' TERM; echo ready; while :; do sleep 1; done"), 0.5, term_grace_s=0.3)
    assert proc.timed_out and proc.returncode == -signal.SIGKILL and proc.stdout == b"ready\n"


def test_a_child_left_holding_the_pipes_does_not_keep_the_run_open(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backends, "PIPE_GRACE_S", 0.3)
    proc = run_process(_inv(tmp_path, "sleep 30 & echo hi"), 60)
    assert proc.returncode == 0 and proc.stdout == b"hi\n" and proc.duration_s < 10


def test_stderr_keeps_only_its_tail(tmp_path: Path) -> None:
    proc = run_process(_inv(tmp_path, "head -c 300000 /dev/zero | tr '\\0' x >&2; echo end >&2"), 30)
    assert proc.returncode == 0 and len(proc.stderr) == backends.STDERR_KEEP and proc.stderr.endswith(b"xend\n")


def test_output_trailing_the_leader_never_turns_a_finished_run_into_a_timeout(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The clock stops when the leader exits: a child holding the pipes past the timeout changes nothing."""
    monkeypatch.setattr(backends, "PIPE_GRACE_S", 1.5)
    proc = run_process(_inv(tmp_path, "sleep 30 & echo answer; sleep 0.3"), 0.6)
    assert proc.returncode == 0 and not proc.timed_out and not proc.stopped and proc.stdout == b"answer\n"


def test_a_stop_outranks_a_cancel_asked_before_it() -> None:
    stop = Stop()
    stop.request("cancel")
    stop.request("cancel")
    assert stop.reason == "cancel" and stop.wait(10)
    stop.request("stop")
    assert stop.reason == "stop"
    stop.close()
