"""Tests of the fake Anthropic API itself, plus one run of the real CLI against it."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

try:  # tests/ as a package (rootdir on sys.path) or as a plain directory (rootdir-less)
    from tests.claude_cli import claude_env, ensure_claude
    from tests.fake_api import (
        Error,
        FakeAPI,
        Slow,
        Text,
        ToolUse,
        UsageLimit,
        default_answer,
    )
except ImportError:
    from claude_cli import claude_env, ensure_claude  # type: ignore[no-redef]
    from fake_api import Error, FakeAPI, Slow, Text, ToolUse, UsageLimit, default_answer  # type: ignore[no-redef]


@pytest.fixture
def fake() -> Iterator[FakeAPI]:
    with FakeAPI() as f:
        yield f


def _body(prompt: str, stream: bool = True, **extra: Any) -> dict[str, Any]:
    return {
        "model": "claude-sonnet-5",
        "max_tokens": 1000,
        "stream": stream,
        "messages": [{"role": "user", "content": [{"type": "text", "text": prompt}]}],
        **extra,
    }


def _post(fake: FakeAPI, body: dict[str, Any], path: str = "/v1/messages?beta=true") -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(
        fake.url + path, data=json.dumps(body).encode(), headers={"content-type": "application/json", "x-api-key": "k"}
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def _sse(raw: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for chunk in raw.decode().strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in chunk.splitlines())
        events.append((lines["event"], json.loads(lines["data"])))
    return events


def test_streams_text_as_sse(fake: FakeAPI) -> None:
    fake.script(Text("hello there, this is a longer answer", input_tokens=12))
    status, headers, raw = _post(fake, _body("hi"))
    assert status == 200 and headers["Content-Type"].startswith("text/event-stream")
    events = _sse(raw)
    kinds = [k for k, _ in events]
    assert kinds[:2] == ["message_start", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert kinds.count("content_block_delta") > 1
    text = "".join(d["delta"]["text"] for k, d in events if k == "content_block_delta")
    assert text == "hello there, this is a longer answer"
    assert events[0][1]["message"]["usage"]["input_tokens"] == 12
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "end_turn" and delta["usage"]["output_tokens"] > 0


def test_marker_routing_and_default_answer(fake: FakeAPI) -> None:
    status, _, raw = _post(fake, _body("What is up? [[echo]]", stream=False))
    assert status == 200 and json.loads(raw)["content"][0]["text"] == "What is up? [[echo]]"
    status, _, raw = _post(fake, _body("plain prompt", stream=False))
    assert json.loads(raw)["content"][0]["text"] == default_answer("plain prompt") == "fake answer to: plain prompt"
    status, _, raw = _post(fake, _body("x [[error:529]]"))
    assert status == 529
    assert json.loads(raw) == {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
    status, _, raw = _post(fake, dict(_body("x"), model="claude-nope"))
    assert status == 404 and json.loads(raw)["error"] == {"type": "not_found_error", "message": "model: claude-nope"}


def test_usage_limit_headers(fake: FakeAPI) -> None:
    fake.script(UsageLimit(1_800_000_000, claim="seven_day"))
    status, headers, raw = _post(fake, _body("x"))
    assert status == 429 and json.loads(raw)["error"]["type"] == "rate_limit_error"
    assert headers["anthropic-ratelimit-unified-status"] == "rejected"
    assert headers["anthropic-ratelimit-unified-reset"] == "1800000000"
    assert headers["anthropic-ratelimit-unified-representative-claim"] == "seven_day"


def test_tool_use_stream(fake: FakeAPI) -> None:
    fake.script(ToolUse("Bash", {"command": "echo hello world, a long command"}))
    events = _sse(_post(fake, _body("x"))[2])
    start = next(d for k, d in events if k == "content_block_start")
    assert start["content_block"]["type"] == "tool_use" and start["content_block"]["name"] == "Bash"
    partial = "".join(d["delta"]["partial_json"] for k, d in events if k == "content_block_delta")
    assert json.loads(partial) == {"command": "echo hello world, a long command"}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"


def test_records_requests_and_side_requests_do_not_consume_script(fake: FakeAPI) -> None:
    fake.script(Error(500), Text("second"))
    title = _body("<session>\nhi\n</session>", stream=False, output_config={"format": {"type": "json_schema", "schema": {
        "type": "object", "properties": {"title": {"type": "string"}}}}})
    status, _, raw = _post(fake, title)
    assert status == 200 and "Fake title" in raw.decode()
    assert _post(fake, {"model": "m", "messages": []}, "/v1/messages/count_tokens")[0] == 200
    assert _post(fake, {}, "/api/whatever")[:1] == (200,)
    assert _post(fake, _body("main 1"))[0] == 500
    assert _post(fake, _body("main 2", stream=False))[0] == 200
    assert [r["main"] for r in fake.requests] == [False, False, False, True, True]
    assert [r["path"] for r in fake.requests][:3] == ["/v1/messages?beta=true", "/v1/messages/count_tokens", "/api/whatever"]
    assert fake.main_requests()[0]["body"]["messages"][0]["content"][0]["text"] == "main 1"
    assert fake.requests[0]["headers"]["x-api-key"] == "k"
    with urllib.request.urlopen(fake.url + "/anything", timeout=5) as resp:
        assert resp.status == 200 and json.loads(resp.read()) == {}


def test_slow_reply_and_client_disconnect(fake: FakeAPI) -> None:
    fake.script(Slow(0.3, then=Text("late")))
    t0 = time.monotonic()
    assert json.loads(_post(fake, _body("x", stream=False))[2])["content"][0]["text"] == "late"
    assert time.monotonic() - t0 >= 0.3
    fake.script(Slow(30))
    req = urllib.request.Request(fake.url + "/v1/messages", data=json.dumps(_body("x")).encode())
    with pytest.raises(TimeoutError):
        urllib.request.urlopen(req, timeout=0.3)
    # the server is still fine afterwards
    assert _post(fake, _body("after", stream=False))[0] == 200


def test_real_cli_against_fake(fake: FakeAPI, tmp_path: Path) -> None:
    try:
        claude = ensure_claude()
    except RuntimeError as e:
        if "npm not found" in str(e):
            pytest.skip(str(e))
        raise
    home = tmp_path / "home"
    home.mkdir()
    fake.script(Text("The answer is 42."))
    proc = subprocess.run(
        [str(claude), "-p", "--output-format", "json", "--model", "sonnet", "--tools", ""],
        input=b"What is the answer? marker-7f3a",
        env=claude_env(fake.url, home),
        cwd=tmp_path,
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()
    result = json.loads(proc.stdout)
    assert result["type"] == "result" and result["is_error"] is False
    assert result["result"] == "The answer is 42."
    mains = fake.main_requests()
    assert len(mains) == 1
    assert "marker-7f3a" in json.dumps(mains[0]["body"]["messages"])
    assert mains[0]["headers"]["x-api-key"].startswith("sk-ant-")
