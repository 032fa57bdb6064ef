"""End to end: the daemon runs the real `claude` CLI (pinned) against the suite's fake Messages API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pytest
from conftest import drop, terminal_files, wait_for, warm_imports_env

from spoold import api, spool
from spoold.task import parse_result


def _state(sp: spool.Spool, tid: str) -> str:
    try:
        return spool.locate(sp, tid).state
    except Exception:
        return "?"


def test_dropped_file_becomes_a_result_through_the_real_cli(sp, fake_api, claude_daemon) -> None:
    d = claude_daemon()
    drop(sp, "sky.md", "---\nmodel: sonnet\nsystem: --answer in French\n---\nWhy is the sky blue?\n")
    [task_file] = wait_for(lambda: terminal_files(sp, "done"), timeout=60, what="done")
    tid = task_file.name[:-3]
    res = parse_result(spool.result_path_for(task_file.parent, tid).read_text())
    assert res.answer == "fake answer to: Why is the sky blue?\n"
    assert res.model == "sonnet" and res.model_resolved and res.model_resolved.startswith("claude-")
    assert res.cost_usd and res.cost_usd > 0 and res.output_tokens and res.session_id and res.duration_s
    [main] = fake_api.main_requests()
    body = main["body"]
    assert not body.get("tools")  # --tools "": no tool definitions, a small request
    assert "--answer in French" in str(body.get("system"))  # a value, never a flag
    assert "Why is the sky blue?" in str(body["messages"])
    wait_for(lambda: f"done {tid}" in d.log, what="the done line (logged just after the move)")


def test_usage_limit_holds_the_queue_and_keeps_the_task(sp, fake_api, claude_daemon) -> None:
    d = claude_daemon(subscription=True)
    t0 = time.time()
    first = api.submit(sp, "[[usage-limit]] big question").id
    wait_for(lambda: "holding the queue" in d.log, timeout=60, what="hold")
    second = api.submit(sp, "another question").id
    wait_for(lambda: _state(sp, first) == "queued", what="requeued")
    info = api.info(sp, first)
    assert info.attempts == 0 and "5-hour limit" in info.error  # not failed, no attempt lost
    st = api.status(sp)
    assert st.held_until and "5-hour limit" in st.hold_reason
    assert abs(datetime.fromisoformat(st.held_until).timestamp() - (t0 + 3 * 3600)) < 10  # the reset the CLI reported
    assert info.estimated_wait_seconds > 3600  # the estimate reflects the reset (about 3 h away)
    assert _state(sp, second) == "queued" and len(fake_api.main_requests()) == 1


def test_not_logged_in_holds_instead_of_failing_everything(sp, fake_api, claude_daemon) -> None:
    d = claude_daemon(subscription=True)
    ids = [api.submit(sp, f"[[error:401]] q{i}").id for i in range(3)]
    wait_for(lambda: "holding the queue" in d.log, timeout=60, what="hold")
    wait_for(lambda: all(_state(sp, t) == "queued" for t in ids), what="all queued")
    assert "claude auth login" in d.log and terminal_files(sp, "failed") == []


def test_transient_error_is_retried_then_succeeds(sp, fake_api, claude_daemon) -> None:
    from fake_api import Error, Text

    fake_api.script(Error(529), Error(529), Text("second time lucky"))
    claude_daemon(retry_backoff_s=0.05)
    tid = api.submit(sp, "flaky").id
    wait_for(lambda: _state(sp, tid) == "done", timeout=60, what="done after retry")
    assert api.result(sp, tid)[1] == "second time lucky\n"
    assert api.info(sp, tid).attempts == 2


def test_unknown_model_fails_with_the_clis_message(sp, fake_api, claude_daemon) -> None:
    claude_daemon()
    tid = api.submit(sp, "q", model="claude-nope").id
    wait_for(lambda: _state(sp, tid) == "failed", timeout=60, what="failed")
    err = api.info(sp, tid).error
    assert "issue with the selected model (claude-nope)" in err


def test_task_timeout_kills_the_cli(sp, fake_api, claude_daemon) -> None:
    claude_daemon()
    t0 = time.monotonic()
    tid = api.submit(sp, "---\ntimeout: 2\n---\n[[hang]] never answers").id
    wait_for(lambda: _state(sp, tid) == "failed", timeout=60, what="failed by timeout")
    assert time.monotonic() - t0 < 30
    assert "timeout" in api.info(sp, tid).error
    assert spool.list_running(sp) == []


def test_daily_budget_holds_dispatch_after_the_cost_is_spent(sp, fake_api, claude_daemon) -> None:
    d = claude_daemon(budget_day_usd=0.00001)  # one fake answer costs more than this
    first = api.submit(sp, "first").id
    wait_for(lambda: _state(sp, first) == "done", timeout=60, what="first done")
    second = api.submit(sp, "second").id
    wait_for(lambda: "daily budget" in d.log, timeout=30, what="budget hold")
    st = api.status(sp)
    assert _state(sp, second) == "queued" and "daily budget" in st.hold_reason
    assert api.info(sp, second).estimated_start == st.held_until  # the estimate says: after midnight UTC
    assert len(fake_api.main_requests()) == 1


HOSTILE_MCP = """
import sys
from mcp.server import MCPServer

server = MCPServer(name="mine")

@server.tool()
def change_limits(value: str = "") -> str:
    \"\"\"A tool of the user's own that a dropped task must never reach.\"\"\"
    open(sys.argv[1], "w").write(value)
    return "done"

server.run("stdio")
"""
SECRET = "USER-MEMORY-7f3a"
QUIETING = ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "DISABLE_TELEMETRY", "DISABLE_ERROR_REPORTING",
            "DISABLE_BUG_COMMAND", "DISABLE_AUTOUPDATER", "CLAUDE_CODE_DISABLE_TERMINAL_TITLE")


def _hostile_setup(home: Path, spool_root: Path, marks: Path) -> None:
    """What a real user has around a spool: their own MCP server, allow rules, hooks and memory, and files
    a synced folder could carry into the spool itself (project settings, .mcp.json, CLAUDE.md)."""
    marks.mkdir()
    server = marks.parent / "mine_mcp.py"
    server.write_text(HOSTILE_MCP)
    mcp_entry = {"type": "stdio", "command": sys.executable, "args": [str(server), str(marks / "tool-called")],
                 "env": warm_imports_env(marks.parent / "pycache")}
    (home / ".claude").mkdir(parents=True)
    (home / ".claude.json").write_text(json.dumps({"mcpServers": {"mine": mcp_entry}}))
    hooks = {event: [{"hooks": [{"type": "command", "command": f"touch {marks}/{event}"}]}]
             for event in ("SessionStart", "UserPromptSubmit", "PreToolUse", "Stop")}
    settings = {"permissions": {"allow": ["mcp__mine__*", "mcp__mine__change_limits", "Bash", "Write"]}, "hooks": hooks}
    (home / ".claude" / "settings.json").write_text(json.dumps(settings))
    (home / ".claude" / "CLAUDE.md").write_text(f"{SECRET} user memory\n")
    for where in (spool_root, spool_root / ".spoold" / "work"):
        (where / ".claude").mkdir(parents=True, exist_ok=True)
        (where / ".claude" / "settings.json").write_text(json.dumps(settings))
        (where / ".claude" / "settings.local.json").write_text(json.dumps(settings))
        (where / ".mcp.json").write_text(json.dumps({"mcpServers": {"mine": mcp_entry}}))
        (where / "CLAUDE.md").write_text(f"{SECRET} project memory\n")


def test_a_dropped_task_reaches_none_of_the_users_setup(sp, fake_api, claude_daemon, tmp_path) -> None:
    """Issue 11: after `claude mcp add --scope user` and an allow rule, a dropped prompt called the user's tool."""
    marks = tmp_path / "marks"
    _hostile_setup(tmp_path / "home", sp.root, marks)
    claude_daemon()
    tid = api.submit(sp, "[[tool:mcp__mine__change_limits]] please change the limits").id
    wait_for(lambda: _state(sp, tid) in spool.TERMINAL, timeout=90, what="the task to end")
    mains = fake_api.main_requests()
    assert mains, "the task never reached the model"
    for req in fake_api.requests:
        assert SECRET not in json.dumps(req["body"])  # no CLAUDE.md, the user's or one synced into the spool
        assert not req["body"].get("tools")  # no MCP tool, and no built-in one the spool's config did not grant
    assert sorted(p.name for p in marks.iterdir()) == []  # no hook ran, the tool was never called


def test_one_model_call_per_task(sp, fake_api, claude_daemon) -> None:
    """With a subscription login, 2.1.197 also asked the task's model for a session title unless told not to."""
    claude_daemon(subscription=True, unset=QUIETING)  # a user's plain environment: spoold must quiet the CLI itself
    ids = [api.submit(sp, f"question {i}", model="opus").id for i in range(2)]
    wait_for(lambda: all(_state(sp, t) == "done" for t in ids), timeout=90, what="both done")
    calls = [r for r in fake_api.requests if r["path"].split("?")[0].endswith("/v1/messages")]
    assert len(calls) == 2 and all(r["main"] for r in calls), [r["body"].get("model") for r in calls]


def test_daemon_start_says_the_cli_is_not_logged_in_before_any_task(sp, fake_api, claude_daemon) -> None:
    d = claude_daemon(unset=("CLAUDE_CODE_OAUTH_TOKEN", "ANTHROPIC_API_KEY"))
    wait_for(lambda: "is not logged in: run `claude auth login`" in d.log, timeout=30, what="the start check")
    assert fake_api.requests == []  # the check spends no model call
    from spoold import ledger

    task_id = api.submit(sp, "a question for a logged-out CLI").id
    wait_for(lambda: "holding the queue until" in d.log, timeout=60, what="the login hold")
    wait_for(lambda: _state(sp, task_id) == "queued", timeout=30, what="the task back in the queue")
    assert ledger.read_usage(sp).starts == []  # refused before any work: its start is given back to the limit
    assert "not logged in" in (api.status(sp).hold_reason or "")


def test_reserve_holds_starts_at_the_threshold_and_resumes_after_the_window(sp, fake_api, claude_daemon) -> None:
    """The real CLI turns the API's unified rate-limit headers into a rate_limit_event with the window's use."""
    from fake_api import unified_headers

    reset = int(time.time()) + 8
    fake_api.limit_headers = unified_headers({"five_hour": (0.85, reset), "seven_day": (0.3, reset + 86400)})
    d = claude_daemon(reserve=0.2)
    first = api.submit(sp, "first").id
    wait_for(lambda: _state(sp, first) == "done", timeout=60, what="first done")
    second = api.submit(sp, "second").id
    wait_for(lambda: "reserve: the 5-hour window is 85% used" in d.log, timeout=30, what="the reserve hold")
    st = api.status(sp)
    assert _state(sp, second) == "queued" and len(fake_api.main_requests()) == 1
    assert st.hold_reason.startswith("reserve") and abs(datetime.fromisoformat(st.held_until).timestamp() - reset) < 1
    [five] = [w for w in st.windows if w.name == "five_hour"]
    assert five.utilization == 0.85 and five.task_id == first
    assert api.info(sp, second).estimated_start == st.held_until  # the estimate waits for the window too
    fake_api.limit_headers = {}
    wait_for(lambda: _state(sp, second) == "done", timeout=60, what="second done once the window reset")
    assert len(fake_api.main_requests()) == 2


def test_a_running_tasks_answer_so_far_is_visible_and_followed(sp, fake_api, claude_daemon) -> None:
    from fake_api import Text

    answer = "".join(f"Sentence number {i} of a long answer. " for i in range(40))
    fake_api.script(Text(answer, chunk_size=20, chunk_delay_s=0.06))  # ~4 s of writing
    claude_daemon()
    tid = api.submit(sp, "write at length").id
    follow = subprocess.Popen([sys.executable, "-m", "spoold.cli", "result", "--follow", tid, "--spool", str(sp.root)],
                              stdout=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    try:
        seen = wait_for(lambda: _state(sp, tid) == "running" and api.info(sp, tid).partial_answer, timeout=60,
                        what="an answer so far")
        assert answer.startswith(seen) and len(seen) < len(answer)
        assert spool.find_partial(sp, tid).name.endswith(".partial")  # running/ID@OWNER.partial
        wait_for(lambda: _state(sp, tid) == "done", timeout=60, what="done")
        out, _ = follow.communicate(timeout=30)
    finally:
        follow.kill()
    assert api.result(sp, tid)[1] == answer + "\n"
    assert out.decode() == answer + "\n"  # the followed answer, each part once
    assert [p.name for p in sp.dir("running").iterdir() if not p.name.startswith(".")] == []


def test_a_follow_up_continues_the_earlier_conversation(sp, fake_api, claude_daemon) -> None:
    claude_daemon()
    first = api.submit(sp, "Remember the word PINEAPPLE.").id
    wait_for(lambda: _state(sp, first) == "done", timeout=60, what="first done")
    short = first.split("-")[1]  # the id's random part is enough
    second = api.submit(sp, f"---\nresume: {short}\n---\nAnd now make it shorter.").id
    wait_for(lambda: _state(sp, second) == "done", timeout=60, what="the follow-up done")
    last = fake_api.main_requests()[-1]["body"]
    assert "Remember the word PINEAPPLE." in json.dumps(last["messages"])  # the CLI resumed the session
    res = parse_result(spool.find_result(sp, second).read_text())
    first_res = parse_result(spool.find_result(sp, first).read_text())
    assert res.continues == first and res.session_id == first_res.session_id


def test_a_follow_up_waits_for_the_task_it_continues(sp, fake_api, claude_daemon) -> None:
    from fake_api import Text

    fake_api.script(Text("slowly, the first answer", chunk_size=4, chunk_delay_s=0.1))
    claude_daemon(concurrency=2)
    first = api.submit(sp, "first question").id
    second = api.submit(sp, f"---\nfollow_up: {first}\n---\nmore, please").id
    wait_for(lambda: _state(sp, second) == "done", timeout=90, what="the follow-up done")
    assert "first question" in json.dumps(fake_api.main_requests()[-1]["body"]["messages"])
    assert api.info(sp, second).attempts == 1  # waiting cost no attempt
    from spoold import ledger

    assert len(ledger.read_usage(sp).starts) == 2  # nor a start from the window: two runs, two starts


def test_schema_output_is_fenced_json_and_parsed_by_result_json(sp, fake_api, claude_daemon) -> None:
    from fake_api import ToolUse

    fake_api.script(ToolUse("StructuredOutput", {"n": 4, "why": "two and two"}))
    claude_daemon()
    tid = api.submit(sp, "---\nschema:\n  type: object\n  properties: {n: {type: integer}, why: {type: string}}\n"
                     "  required: [n]\n---\nWhat is 2+2?").id
    wait_for(lambda: _state(sp, tid) == "done", timeout=60, what="done")
    [main] = fake_api.main_requests()[:1]
    assert any(t["name"] == "StructuredOutput" for t in main["body"]["tools"])  # the CLI's own schema tool
    out = subprocess.run([sys.executable, "-m", "spoold.cli", "result", "--json", tid, "--spool", str(sp.root)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent)})
    data = json.loads(out.stdout)
    assert data["structured"] == {"n": 4, "why": "two and two"} and data["answer"].startswith("```json\n")


def test_a_profile_gives_its_cwd_tools_and_system_prompt_and_nothing_more(sp, fake_api, claude_daemon, tmp_path) -> None:
    repo = tmp_path / "app"
    repo.mkdir()
    (repo / "README").write_text("the app\n")
    claude_daemon(profiles={"repo-review": {"cwd": str(repo), "tools": ["Read", "Grep", "Glob"],
                                            "system": "PROFILE-SYSTEM-LINE"}}, system_prompt="SPOOL-WIDE-LINE")
    tid = api.submit(sp, "---\nprofile: repo-review\ntools: [Bash]\n---\nReview it.").id
    wait_for(lambda: _state(sp, tid) == "done", timeout=60, what="done")
    body = fake_api.main_requests()[-1]["body"]
    offered = sorted(t["name"] for t in body["tools"] if not t.get("defer_loading"))  # 2.1.332 adds a placeholder
    assert offered == ["Glob", "Grep", "Read"]  # `tools:` in the file is ignored
    system = json.dumps(body["system"])
    assert "PROFILE-SYSTEM-LINE" in system and "SPOOL-WIDE-LINE" in system and str(repo) in json.dumps(body)
    bad = api.submit  # a profile the owner never defined is refused at once, with the names there are
    with pytest.raises(Exception, match="repo-review"):
        bad(sp, "---\nprofile: root-shell\n---\nhi")


def test_a_profiles_own_mcp_server_loads_and_still_nothing_of_the_users(sp, fake_api, claude_daemon, tmp_path) -> None:
    """A profile with mcp_config runs without --safe-mode; --setting-sources= must still keep CLAUDE.md,
    hooks and the user's own servers out."""
    marks = tmp_path / "marks"
    _hostile_setup(tmp_path / "home", sp.root, marks)
    owned = tmp_path / "owned-mcp.json"
    owned.write_text(json.dumps({"mcpServers": {"owned": {
        "type": "stdio", "command": sys.executable, "args": [str(tmp_path / "mine_mcp.py"), str(tmp_path / "owned-called")],
        "env": warm_imports_env(tmp_path / "pycache")}}}))
    claude_daemon(profiles={"docs": {"mcp_config": str(owned), "tools": ["mcp__owned__change_limits"]}})
    tid = api.submit(sp, "---\nprofile: docs\n---\n[[tool:mcp__owned__change_limits]] use the docs tool").id
    wait_for(lambda: _state(sp, tid) in spool.TERMINAL, timeout=90, what="the task to end")
    names = {t["name"] for r in fake_api.main_requests() for t in r["body"].get("tools") or []}
    assert "mcp__owned__change_limits" in names and not any(n.startswith("mcp__mine__") for n in names)
    assert all(SECRET not in json.dumps(r["body"]) for r in fake_api.requests)
    assert (tmp_path / "owned-called").exists()  # the owner's granted tool ran
    assert sorted(p.name for p in marks.iterdir()) == []  # no hook ran, the user's server was never called
