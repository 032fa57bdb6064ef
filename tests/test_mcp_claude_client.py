"""The real Claude Code CLI as the MCP client: it loads spoold-mcp, offers its tools, and a tool call writes a task."""

from __future__ import annotations

import json
import subprocess
import sys

from claude_cli import claude_env
from conftest import warm_imports_env
from fake_api import Text, ToolUse

from spoold import api, spool
from spoold.backends.claude_stream import parse


def run_claude(sp, fake_api, claude_bin, tmp_path, prompt: str, *flags: str, timeout: float = 120):
    """`claude -p` (stream-json) with spoold-mcp as its one MCP server, against the fake API: (process, stream)."""
    mcp_config = tmp_path / "mcp.json"
    mcp_config.write_text(json.dumps({"mcpServers": {"spoold": {
        "command": sys.executable, "args": ["-m", "mcp_adapter.server", "--spool", str(sp.root)],
        "env": warm_imports_env(tmp_path / "pycache"),
    }}}))
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    env = claude_env(fake_api.url, home)
    env["PYTHONPATH"] = str(spool.Path(__file__).resolve().parent.parent)
    # The CLI waits 5 s for MCP servers by default; a loaded CI machine can need more to import the SDK.
    env["MCP_CONNECT_TIMEOUT_MS"] = "60000"
    out = subprocess.run(
        [str(claude_bin), "-p", "--output-format", "stream-json", "--verbose", "--model", "sonnet",
         "--mcp-config", str(mcp_config), "--strict-mcp-config", *flags],
        input=prompt, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout,
    )
    return out, parse(out.stdout.encode())


def test_claude_code_loads_the_adapter_and_submits_through_it(sp, fake_api, claude_bin, tmp_path) -> None:
    fake_api.script(
        ToolUse("mcp__spoold__async_submit", {"query": "Summarize the history of tea.", "priority": "high"}),
        Text("Queued it for you."),
    )
    out, stream = run_claude(sp, fake_api, claude_bin, tmp_path, "Please queue a tea history summary.",
                             "--allowedTools", "mcp__spoold__async_submit")
    assert stream.result and stream.result["result"] == "Queued it for you.", out.stdout + out.stderr
    assert [(m["name"], m["status"]) for m in stream.init["mcp_servers"]] == [("spoold", "connected")]
    # 2.1.197 offers MCP tools in the first request; 2.1.332 defers them behind ToolSearch: the init event says both
    assert {"mcp__spoold__async_submit", "mcp__spoold__async_wait", "mcp__spoold__async_result"} <= set(stream.init["tools"])
    mains = fake_api.main_requests()
    second = mains[1]
    tool_result = json.dumps(second["body"]["messages"])
    assert '\\"position\\":1' in tool_result and '\\"estimated_start\\"' in tool_result  # the task record
    [task] = api.list_tasks(sp, "queued")
    assert task.title.startswith("Summarize the history of tea") and task.priority == "high"
    assert task.id in tool_result


NATURAL_REQUESTS = [  # what a person asks for, without naming spoold or "async"
    "queue a prompt to run later in the background",
    "run this overnight when my usage limit resets",
    "submit a long research question and check on it later",
    "schedule a prompt for tomorrow morning",
    "do this in the background and tell me when it is done",
]


def test_the_cli_s_tool_search_finds_the_submit_tool_from_natural_requests(sp, fake_api, claude_bin, tmp_path) -> None:
    """Newer CLIs defer MCP tools behind ToolSearch: the model searches with its own words, and each of these
    must bring back spoold's submit tool (the fake API makes the model search; the CLI runs the search)."""
    from claude_cli import CLAUDE_CODE_VERSION, OLDER

    if CLAUDE_CODE_VERSION == OLDER:
        import pytest

        pytest.skip(f"claude {OLDER} offers every MCP tool in its first request: nothing to search")
    fake_api.script(*[ToolUse("ToolSearch", {"query": q, "max_results": 5}) for q in NATURAL_REQUESTS],
                    Text("Found it."))
    out, stream = run_claude(sp, fake_api, claude_bin, tmp_path, "Please find the right tool.", timeout=180)
    assert stream.result and stream.result["result"] == "Found it.", out.stdout[-3000:] + out.stderr[-2000:]
    conversation = fake_api.main_requests()[-1]["body"]["messages"]  # the last request carries all of it
    searched = {b["id"]: b["input"]["query"] for m in conversation if m["role"] == "assistant"
                for b in m["content"] if isinstance(b, dict) and b.get("type") == "tool_use"}
    found = {q: False for q in NATURAL_REQUESTS}
    for m in conversation:
        for b in m["content"] if m["role"] == "user" and isinstance(m["content"], list) else []:
            if isinstance(b, dict) and b.get("type") == "tool_result" and b["tool_use_id"] in searched:
                found[searched[b["tool_use_id"]]] = "mcp__spoold__async_submit" in json.dumps(b)
    assert all(found.values()), found


def test_claude_code_waits_past_a_minute_while_async_wait_reports_progress(sp, fake_api, claude_bin, tmp_path) -> None:
    """Claude Code asks for progress on a tool call and resets its idle timer on each notification: async_wait
    then waits past the 60 s a client without progress allows, and returns the task's record at its end."""
    import time

    tid = api.submit(sp, "a long one").id  # no daemon: it stays queued for the whole wait
    fake_api.script(ToolUse("mcp__spoold__async_wait", {"task_id": tid, "timeout_seconds": 70}), Text("Still waiting."))
    t0 = time.monotonic()
    out, stream = run_claude(sp, fake_api, claude_bin, tmp_path, "Wait for my task.",
                             "--allowedTools", "mcp__spoold__async_wait", timeout=240)
    elapsed = time.monotonic() - t0
    assert stream.result and stream.result["result"] == "Still waiting.", out.stdout[-3000:] + out.stderr[-2000:]
    result = json.dumps(fake_api.main_requests()[-1]["body"]["messages"][-1])
    assert '\\"finished\\":false' in result and tid in result and "error" not in result.lower()[:200], result[:800]
    assert elapsed > 68, elapsed  # it waited its 70 s: past a minute, kept alive by progress
