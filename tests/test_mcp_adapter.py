"""The MCP adapter: every tool in process (errors included), then the real `spoold-mcp` over stdio."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
from conftest import ECHO_COMMAND, ROOT, write_config
from mcp import Client, MCPError
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.types import CallToolResult

from mcp_adapter import server as adapter
from spoold import api
from spoold.spool import Spool
from spoold.task import parse_task

pytestmark = pytest.mark.anyio

BAD_IDS = ["../../etc/passwd", "/etc/passwd", "20261124T180000123Z-abcdef\x00", "", "x" * 5000,
           "20261124T180000123Z-abcdef/../../x", "20261124T180000123Z-ABCDEF"]
UNKNOWN_ID = "20200101T000000000Z-aaaaaa-nothing"
TASK_TOOLS = ["async_status", "async_result", "async_wait", "async_cancel"]
READ_ONLY = {"async_status", "async_result", "async_wait", "async_list", "async_search"}
ALL_TOOLS = READ_ONLY | {"async_submit", "async_cancel", "async_rate_config"}


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def echo_sp(sp: Spool) -> Spool:
    """A spool whose daemon answers with a local command instead of the real CLI."""
    write_config(sp, backend="command", command=ECHO_COMMAND)
    return sp


@asynccontextmanager
async def connect(sp: Spool) -> AsyncIterator[Client]:
    async with Client(adapter.build_server(sp.root)) as client:
        yield client


async def call(client: Client, tool: str, **args: Any) -> dict[str, Any]:
    res = await client.call_tool(tool, args)
    assert not res.is_error, text_of(res)
    assert res.structured_content is not None
    return res.structured_content


async def call_error(client: Client, tool: str, **args: Any) -> str:
    res = await client.call_tool(tool, args)
    assert res.is_error, res.structured_content
    return text_of(res)


def text_of(res: CallToolResult) -> str:
    return " ".join(getattr(c, "text", "") for c in res.content)


async def run_daemon_once(sp: Spool) -> None:
    """`spoold run --once` with the command backend: drains the queue and exits."""
    env = {k: v for k, v in os.environ.items() if k != "SPOOLD_DIR"}
    await anyio.run_process([sys.executable, "-m", "spoold.cli", "run", "--once", "--spool", str(sp.root)],
                            env=env, cwd=ROOT, check=True)


# ---- schemas and annotations ----------------------------------------------------


async def test_tools_have_schemas_descriptions_and_annotations(sp: Spool) -> None:
    async with connect(sp) as client:
        tools = {t.name: t for t in (await client.list_tools()).tools}
    assert set(tools) == ALL_TOOLS
    for name, tool in tools.items():
        assert tool.input_schema["type"] == "object"
        assert tool.output_schema and tool.output_schema["type"] == "object", name
        assert tool.description and len(tool.description) > 60, name
        assert tool.annotations is not None
        assert tool.annotations.read_only_hint is (name in READ_ONLY), name
    assert tools["async_cancel"].annotations.destructive_hint is True
    assert tools["async_submit"].annotations.destructive_hint is False
    assert tools["async_list"].input_schema["properties"]["limit"]["maximum"] == adapter.MAX_LIST


# ---- submit, status, result, wait -----------------------------------------------


async def test_submit_returns_at_once_with_position_and_estimate(sp: Spool) -> None:
    async with connect(sp) as client:
        first = await call(client, "async_submit", query="Summarise the plot of Hamlet", title="hamlet")
        second = await call(client, "async_submit", query="second", priority="low", model="haiku")
    assert first["state"] == "queued" and first["position"] == 1
    assert first["estimated_start"] and first["estimated_wait_seconds"] is not None
    assert second["position"] == 2 and second["model"] == "haiku" and second["priority"] == "low"
    assert first["id"].endswith("-hamlet")
    assert [t.id for t in api.list_tasks(sp, "queued")] == [first["id"], second["id"]]


async def test_submit_passes_system_and_not_before(sp: Spool) -> None:
    async with connect(sp) as client:
        out = await call(client, "async_submit", query="later", system="be brief", not_before="2099-01-01T00:00:00Z")
        status = await call(client, "async_status", task_id=out["id"])
    assert out["not_before"] == status["not_before"] == "2099-01-01T00:00:00Z"
    assert "be brief" in Path(api.info(sp, out["id"]).path).read_text()


@pytest.mark.parametrize("query", ["---\nmodel: opus\n---\nhello", "---\nsection one\n---\nmore", "---\n\nrule"])
async def test_a_leading_rule_in_the_query_is_text_not_settings(sp: Spool, query: str) -> None:
    async with connect(sp) as client:
        out = await call(client, "async_submit", query=query)
    task = parse_task(Path(api.info(sp, out["id"]).path).read_text(), task_id=out["id"])
    assert task.prompt == query and task.model == "sonnet"


async def test_submit_refuses_bad_input_with_the_reason(sp: Spool) -> None:
    write_config(sp, max_bytes=100)
    async with connect(sp) as client:
        too_big = await call_error(client, "async_submit", query="x" * 101)
        big_system = await call_error(client, "async_submit", query="hi", system="y" * 101)
        bad_time = await call_error(client, "async_submit", query="hi", not_before="next tuesday")
        bad_priority = await call_error(client, "async_submit", query="hi", priority="asap")
        empty = await call_error(client, "async_submit", query="")
    assert "101 bytes" in too_big and "limit is 100" in too_big
    assert "103 bytes" in big_system and "limit is 100" in big_system  # prompt and system together
    assert "ISO time" in bad_time
    assert "priority" in bad_priority and "query" in empty
    assert api.list_tasks(sp) == []


async def test_status_and_result_of_a_queued_task(sp: Spool) -> None:
    async with connect(sp) as client:
        tid = (await call(client, "async_submit", query="not yet"))["id"]
        status = await call(client, "async_status", task_id=tid)
        result = await call(client, "async_result", task_id=tid)
    assert status["state"] == "queued" and status["position"] == 1 and status["queue_held_until"] is None
    assert result["finished"] is False and result["answer"] is None and result["next_offset"] is None
    assert result["position"] == 1


async def test_wait_returns_when_the_daemon_finishes_the_task(echo_sp: Spool) -> None:
    async with connect(echo_sp) as client:
        tid = (await call(client, "async_submit", query="ping"))["id"]
        started = time.monotonic()
        async with anyio.create_task_group() as tg:
            tg.start_soon(run_daemon_once, echo_sp)
            waited = await call(client, "async_wait", task_id=tid, timeout_seconds=20)
        elapsed = time.monotonic() - started
        result = await call(client, "async_result", task_id=tid)
        status = await call(client, "async_status", task_id=tid)
    assert elapsed < 10
    assert waited["state"] == "done" and waited["finished"] and waited["answer"].strip() == "answer: ping"
    assert result["answer"] == waited["answer"] and result["model"] == "sonnet" and result["duration_s"] is not None
    assert result["next_offset"] is None and result["answer_chars"] == len(result["answer"])  # a short answer: whole
    assert status["state"] == "done" and status["finished_at"] and status["attempts"] == 1


async def test_wait_returns_the_status_at_the_timeout(sp: Spool) -> None:
    async with connect(sp) as client:
        tid = (await call(client, "async_submit", query="nobody runs me"))["id"]
        started = time.monotonic()
        out = await call(client, "async_wait", task_id=tid, timeout_seconds=0.3)
    assert 0.25 <= time.monotonic() - started < 3
    assert out["state"] == "queued" and out["finished"] is False and out["position"] == 1


async def test_wait_caps_the_timeout(sp: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(adapter, "MAX_WAIT_S", 0.2)
    async with connect(sp) as client:
        tid = (await call(client, "async_submit", query="q"))["id"]
        started = time.monotonic()
        await call(client, "async_wait", task_id=tid, timeout_seconds=3600)
    assert time.monotonic() - started < 3


async def test_result_of_a_failed_task_carries_the_error(sp: Spool) -> None:
    write_config(sp, backend="command", max_attempts=1, command=[sys.executable, "-c", "import sys; sys.exit('boom')"])
    async with connect(sp) as client:
        tid = (await call(client, "async_submit", query="fail please"))["id"]
        await run_daemon_once(sp)
        result = await call(client, "async_result", task_id=tid)
    assert result["state"] == "failed" and result["finished"] is True
    assert "boom" in result["error"]


async def test_a_long_answer_comes_in_parts_that_join_to_the_whole(echo_sp: Spool) -> None:
    query = "".join(f"line {i}: é ✓ {'x' * (i % 70)}\n" for i in range(1200))  # about 55,000 characters
    async with connect(echo_sp) as client:
        tid = (await call(client, "async_submit", query=query))["id"]
        await run_daemon_once(echo_sp)
        whole = api.result(echo_sp, tid)[1]
        first = await call(client, "async_wait", task_id=tid, timeout_seconds=5)
        parts, offset = [first], first["next_offset"]
        while offset is not None:
            parts.append(await call(client, "async_result", task_id=tid, offset=offset, max_chars=7_000))
            offset = parts[-1]["next_offset"]
        beyond = await call(client, "async_result", task_id=tid, offset=len(whole) + 5)
        for bad in (0, adapter.MAX_PAGE_CHARS + 1):
            assert "max_chars" in await call_error(client, "async_result", task_id=tid, max_chars=bad)
        assert "offset" in await call_error(client, "async_result", task_id=tid, offset=-1)
    assert len(whole) > 2 * adapter.PAGE_CHARS and whole.startswith("answer: line 0")
    assert len(first["answer"]) == adapter.PAGE_CHARS and first["answer_chars"] == len(whole)
    assert [p["offset"] for p in parts] == [0, *(p["next_offset"] for p in parts[:-1])]
    assert "".join(p["answer"] for p in parts) == whole and all(p["finished"] for p in parts)
    assert all(len(p["answer"]) == 7_000 for p in parts[1:-1]) and 0 < len(parts[-1]["answer"]) <= 7_000
    assert beyond["answer"] == "" and beyond["next_offset"] is None and beyond["answer_chars"] == len(whole)


# ---- ids are checked before they touch a path --------------------------------------


@pytest.mark.parametrize("tool", TASK_TOOLS)
async def test_bad_ids_are_a_tool_error(sp: Spool, tool: str) -> None:
    before = sorted(sp.root.rglob("*"))
    async with connect(sp) as client:
        for bad in BAD_IDS:
            message = await call_error(client, tool, task_id=bad)
            assert "not a task id" in message and len(message) < 300, (bad, message)
    assert sorted(sp.root.rglob("*")) == before


@pytest.mark.parametrize("tool", TASK_TOOLS)
async def test_unknown_id_is_a_tool_error(sp: Spool, tool: str) -> None:
    async with connect(sp) as client:
        message = await call_error(client, tool, task_id=UNKNOWN_ID)
    assert f"no task {UNKNOWN_ID}" in message


# ---- list, cancel, config ---------------------------------------------------------


async def test_list_orders_filters_and_bounds(echo_sp: Spool) -> None:
    async with connect(echo_sp) as client:
        done_id = (await call(client, "async_submit", query="one"))["id"]
        await run_daemon_once(echo_sp)
        queued = [(await call(client, "async_submit", query=f"q{i}", title=f"title {i}"))["id"] for i in range(3)]
        everything = await call(client, "async_list")
        only_queued = await call(client, "async_list", state="queued", limit=2)
        too_many = await call_error(client, "async_list", limit=adapter.MAX_LIST + 1)
        bad_state = await call_error(client, "async_list", state="exploded")
    assert [t["id"] for t in everything["tasks"]] == [*queued, done_id]
    assert everything["counts"]["queued"] == 3 and everything["counts"]["done"] == 1
    assert [t["id"] for t in only_queued["tasks"]] == queued[:2]
    assert only_queued["tasks"][1]["position"] == 2 and only_queued["tasks"][1]["title"] == "title 1"
    assert "200" in too_many and "state" in bad_state


async def test_cancel_a_queued_task_then_again(sp: Spool) -> None:
    async with connect(sp) as client:
        tid = (await call(client, "async_submit", query="never mind"))["id"]
        out = await call(client, "async_cancel", task_id=tid)
        again = await call_error(client, "async_cancel", task_id=tid)
        result = await call(client, "async_result", task_id=tid)
    assert out == {"id": tid, "state": "cancelled"}
    assert "already cancelled" in again
    assert api.info(sp, tid).state == "cancelled"
    assert result["finished"] is True and result["answer"] is None


async def test_rate_config_reads_without_writing_and_writes_when_asked(sp: Spool) -> None:
    async with connect(sp) as client:
        read = await call(client, "async_rate_config")
        assert not sp.config_path.exists()
        written = await call(client, "async_rate_config", max_requests=5, window_minutes=30, concurrency=2)
        refused = await call_error(client, "async_rate_config", concurrency=0)
    assert read["changed"] == [] and read["settings"]["max_requests"] == 10
    assert written["changed"] == ["concurrency", "max_requests", "window_minutes"]
    assert written["settings"] | {"max_requests": 5, "window_minutes": 30.0, "concurrency": 2} == written["settings"]
    assert api.load_settings(sp).max_requests == 5
    assert "concurrency" in refused


async def test_a_broken_config_is_a_tool_error(sp: Spool) -> None:
    sp.config_path.write_text("max_requests: [1, 2\n")
    async with connect(sp) as client:
        message = await call_error(client, "async_submit", query="hi")
    assert "not valid YAML" in message


async def test_reading_tools_do_not_create_a_spool(tmp_path: Path) -> None:
    missing = Spool(tmp_path / "nowhere")
    async with connect(missing) as client:
        message = await call_error(client, "async_list")
        tid = (await call(client, "async_submit", query="creates it"))["id"]
        listed = await call(client, "async_list")
    assert "no spool at" in message
    assert [t["id"] for t in listed["tasks"]] == [tid]


# ---- resources --------------------------------------------------------------------


async def test_result_and_queue_resources(echo_sp: Spool) -> None:
    async with connect(echo_sp) as client:
        templates = (await client.list_resource_templates()).resource_templates
        static = (await client.list_resources()).resources
        tid = (await call(client, "async_submit", query="resource me"))["id"]
        uri = adapter.RESULT_URI.format(task_id=tid)
        with pytest.raises(MCPError, match="no result yet"):
            await client.read_resource(uri)
        queue = json.loads((await client.read_resource(adapter.QUEUE_URI)).contents[0].text)
        await run_daemon_once(echo_sp)
        answer = (await client.read_resource(uri, cache_mode="bypass")).contents[0]
        with pytest.raises(MCPError, match="no task"):
            await client.read_resource(adapter.RESULT_URI.format(task_id=UNKNOWN_ID))
        with pytest.raises(MCPError):
            await client.read_resource("spoold://task/..%2F..%2Fetc%2Fpasswd/result")
    assert [t.uri_template for t in templates] == [adapter.RESULT_URI]
    assert [str(r.uri) for r in static] == [adapter.QUEUE_URI]
    assert queue["counts"]["queued"] == 1 and queue["tasks"][0]["id"] == tid
    assert answer.text.strip() == "answer: resource me" and answer.mime_type == "text/markdown"


# ---- the module itself ------------------------------------------------------------


def test_adapter_imports_no_watcher_and_no_daemon() -> None:
    """The adapter only reads and writes spool files: no daemon code, no file watcher of its own."""
    tree = ast.parse(Path(adapter.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not any(m.startswith(("watchfiles", "spoold.daemon", "spoold.backends")) for m in imported)


# ---- over real stdio --------------------------------------------------------------


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "SPOOLD_DIR"}
    return env | extra


async def test_stdio_server_end_to_end(echo_sp: Spool, tmp_path: Path) -> None:
    params = StdioServerParameters(
        command=sys.executable, args=["-m", "mcp_adapter.server", "--spool", str(echo_sp.root), "--log-level", "INFO"],
        env=server_env(), cwd=str(ROOT),
    )
    errlog_path = tmp_path / "mcp-stderr.log"
    with errlog_path.open("w") as errlog:
        async with Client(stdio_client(params, errlog=errlog)) as client:
            tools = (await client.list_tools()).tools
            assert {t.name for t in tools} == ALL_TOOLS
            assert all(t.input_schema and t.output_schema for t in tools)
            tid = (await call(client, "async_submit", query="over stdio"))["id"]
            assert "not a task id" in await call_error(client, "async_status", task_id="../../etc/passwd")
            await run_daemon_once(echo_sp)
            waited = await call(client, "async_wait", task_id=tid, timeout_seconds=20)
            result = await call(client, "async_result", task_id=tid)
            resource = await client.read_resource(adapter.RESULT_URI.format(task_id=tid))
    assert waited["state"] == "done" and waited["answer"].strip() == "answer: over stdio"
    assert result["answer"] == waited["answer"] == resource.contents[0].text
    assert f"queued {tid}" in errlog_path.read_text()


def test_stdout_carries_only_the_protocol(sp: Spool, tmp_path: Path) -> None:
    """Raw JSON-RPC over the pipes, with logging on: every line on stdout is a protocol message.

    `-X importtime` also lists on stderr every module the server loaded: no daemon code among them.
    """
    messages = [
        {"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
            "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "raw", "version": "0"}}},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "async_submit",
                                                                        "arguments": {"query": "raw"}}},
        {"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "async_result",
                                                                        "arguments": {"task_id": "/etc/passwd"}}},
    ]
    errlog = tmp_path / "stderr.log"
    with errlog.open("w") as err:  # a file, not a pipe: a full pipe would stall the server mid-test
        proc = subprocess.Popen(
            [sys.executable, "-X", "importtime", "-m", "mcp_adapter.server", "--log-level", "DEBUG"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err, text=True,
            env=server_env(SPOOLD_DIR=str(sp.root)), cwd=ROOT,
        )
    assert proc.stdin and proc.stdout
    replies = []
    for m in messages:
        proc.stdin.write(json.dumps(m) + "\n")
        proc.stdin.flush()
        if "id" in m:
            replies.append(json.loads(proc.stdout.readline()))
    rest, _ = proc.communicate(timeout=30)
    stderr = errlog.read_text()
    assert [r.get("id") for r in replies] == [1, 2, 3]
    assert replies[1]["result"]["structuredContent"]["state"] == "queued"
    assert replies[2]["result"]["isError"] is True
    assert rest == "" and proc.returncode == 0 and "queued" in stderr
    loaded = {ln.rpartition("|")[2].strip() for ln in stderr.splitlines() if ln.startswith("import time:")}
    assert "spoold.api" in loaded and not {"spoold.daemon", "spoold.backends"} & loaded
    assert len(api.list_tasks(sp, "queued")) == 1


async def test_status_says_when_the_queue_is_held_and_why(sp: Spool) -> None:
    from spoold import ledger

    ledger.set_hold(sp, api.load_settings(sp), time.time() + 3600, "subscription usage limit: resets 7pm")
    async with connect(sp) as client:
        tid = (await call(client, "async_submit", query="later"))["id"]
        status = await call(client, "async_status", task_id=tid)
    assert "usage limit" in status["queue_hold_reason"] and status["queue_held_until"]
    assert status["estimated_wait_seconds"] > 3500  # the estimate waits for the hold too


def test_the_adapter_goes_through_api_alone() -> None:
    """STYLE: the adapter is a thin layer over spoold.api; it never reaches into the spool module itself."""
    import re

    source = (ROOT / "mcp_adapter" / "server.py").read_text()
    assert "from spoold import __version__, api, config\n" in source and not re.search(r"\bspool\.[A-Za-z_]", source)


def test_the_tools_states_and_priorities_are_the_spools() -> None:
    from typing import get_args

    assert set(get_args(adapter.State)) == set(api.spool.TASK_STATES)
    assert set(get_args(adapter.Priority)) == set(api.spool.PRIORITIES)


async def test_wait_reports_progress_and_so_may_wait_longer(sp: Spool, monkeypatch) -> None:
    """A client that asked for progress hears where the task is every few seconds, and may wait past the cap
    that holds for clients that show none (scaled down here: 0.5 s without progress, 1.5 s with it)."""
    monkeypatch.setattr(adapter, "MAX_WAIT_S", 0.5)
    monkeypatch.setattr(adapter, "MAX_PROGRESS_WAIT_S", 1.5)
    monkeypatch.setattr(adapter, "PROGRESS_EVERY_S", 0.3)
    heard: list[tuple[float, float | None, str | None]] = []

    async def on_progress(progress: float, total: float | None, message: str | None) -> None:
        heard.append((progress, total, message))

    async with Client(adapter.build_server(sp.root), mode="legacy") as client:  # JSON-RPC framing, as over stdio
        tid = (await call(client, "async_submit", query="nobody runs me yet"))["id"]
        t0 = time.monotonic()
        plain = await client.call_tool("async_wait", {"task_id": tid, "timeout_seconds": 10})
        t1 = time.monotonic()
        shown = await client.call_tool("async_wait", {"task_id": tid, "timeout_seconds": 10},
                                       progress_callback=on_progress)
        t2 = time.monotonic()
    assert plain.structured_content and plain.structured_content["finished"] is False and t1 - t0 < 1.2
    assert shown.structured_content and shown.structured_content["state"] == "queued" and 1.4 < t2 - t1 < 3
    assert len(heard) >= 3 and all(total == 1.5 for _, total, _ in heard)
    assert [p for p, _, _ in heard] == sorted(p for p, _, _ in heard) and heard[0][2] == "queued, #1 in the queue"
