"""A small stdlib-only fake of the Anthropic Messages API, for running the real `claude` CLI offline.

Usage::

    with FakeAPI() as fake:             # serves on http://127.0.0.1:<ephemeral port>
        fake.script(Text("hello"))      # next main request gets this reply ...
        run_cli(env=claude_env(fake.url, home))
        fake.requests                   # every POST: {"method","path","headers","body","main"}

Replies for the *main* request (the one carrying the user's prompt) come, in order, from
the scripted queue (`script`), then from `default` (a Reply or a callable body -> Reply),
then from `reply_for`, which routes by markers in the last user message's text:

    [[error:NNN]]      -> Error(NNN) with the real API's error type for that status
    [[usage-limit]]    -> UsageLimit(now + 3h)   (the subscription 429; needs OAuth mode)
    [[slow:SECONDS]]   -> Slow(SECONDS, then=the default answer)
    [[hang]]           -> Hang() (headers never sent; for timeout tests)
    [[echo]]           -> Text(<the prompt text>)
    (model not like "claude-*sonnet*" etc., e.g. "claude-nope" or "sonnet --x")
                       -> Error(404, "not_found_error", "model: claude-nope")
    [[tool:NAME]]      -> ToolUse(NAME, {}) then, on the follow-up turn, the default answer
    otherwise          -> Text("fake answer to: <first 40 chars of prompt>")

Telling main requests from the CLI's own side requests (observed with 2.1.197): every model
call is a POST /v1/messages?beta=true with the same headers, so the body decides.
The title generator (sent when CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC is unset; haiku, or
the main model in OAuth mode) carries `output_config.format` (a json_schema with "title") and
wraps the prompt in `<session>...</session>`; the OAuth quota probe is `max_tokens: 1` with the
text "quota".  See `is_main_request`.  Side requests are answered with a short text (JSON
matching the schema for structured-output ones) and never consume scripted replies;
/v1/messages/count_tokens gets `{"input_tokens": N}`.  Every POST is recorded with
`"main": bool`.  Each main request (including the CLI's own retries, CLAUDE_CODE_MAX_RETRIES,
and its non-streaming fallback after a failed stream) consumes one scripted reply.
Any other path or method gets `200 {}`.
"""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = [
    "Error",
    "FakeAPI",
    "Hang",
    "Reply",
    "Slow",
    "Text",
    "ToolUse",
    "UsageLimit",
    "default_answer",
    "is_main_request",
    "prompt_text",
    "reply_for",
    "unified_headers",
]

DEFAULT_MODEL = "claude-sonnet-4-5-20250929"


# --------------------------------------------------------------------------- replies


@dataclass
class Text:
    """A normal assistant text answer (streamed as text_delta chunks when the request streams)."""

    text: str
    input_tokens: int = 25
    output_tokens: int | None = None  # default: ~len(text)/4, at least 1
    chunk_size: int = 16
    chunk_delay_s: float = 0.0  # a pause between streamed chunks: an answer that takes a while to write


@dataclass
class Error:
    """An API error: HTTP `status` with body {"type":"error","error":{"type":type,"message":message}}.

    Empty type/message default to the real API's for `status` (401: "invalid x-api-key", or
    "Invalid bearer token" when the request came with an OAuth Authorization header).
    400/401/403/404 carry `x-should-retry: false`.
    """

    status: int
    type: str = ""  # default: the real API's type for `status`
    message: str = ""
    headers: dict[str, str] | None = None


@dataclass
class UsageLimit:
    """The subscription usage-limit 429 (`anthropic-ratelimit-unified-status: rejected`).

    `claim` is the representative claim: five_hour -> "session limit", seven_day -> "weekly limit",
    seven_day_opus -> "Opus limit", seven_day_sonnet -> "Sonnet limit".
    """

    resets_at: int  # epoch seconds
    claim: str = "five_hour"


@dataclass
class ToolUse:
    """A tool_use content block (input streamed as input_json_delta), stop_reason tool_use."""

    name: str
    input: dict[str, Any] = field(default_factory=dict)
    id: str = ""
    text: str = ""  # optional text block before the tool_use


@dataclass
class Slow:
    """Wait `seconds` before responding with `then` (headers are not sent while waiting)."""

    seconds: float
    then: Reply = field(default_factory=lambda: Text("slow answer"))


@dataclass
class Hang:
    """Never respond (until the client disconnects or the server stops)."""


Reply = Text | Error | UsageLimit | ToolUse | Slow | Hang
ReplySource = Reply | Callable[[dict[str, Any]], Reply]

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}
_ERROR_MESSAGES = {
    400: "Invalid request",
    401: "invalid x-api-key",
    403: "Permission denied",
    404: "Not found",
    413: "Request exceeds the maximum allowed number of bytes.",
    429: "Number of request tokens has exceeded your per-minute rate limit",
    500: "Internal server error",
    529: "Overloaded",
}


# --------------------------------------------------------------------------- routing


def prompt_text(body: dict[str, Any]) -> str:
    """The text of the last user message that has text (tool_result-only turns are skipped)."""
    for msg in reversed(body.get("messages") or []):
        if msg.get("role") != "user":
            continue
        content = msg.get("content")
        if isinstance(content, str):
            return content
        texts = [
            b.get("text", "")
            for b in content or []
            if isinstance(b, dict) and b.get("type") == "text" and not b.get("text", "").startswith("<system-reminder>")
        ]
        if texts:
            return texts[-1]
    return ""


def _system_text(body: dict[str, Any]) -> str:
    system = body.get("system")
    if isinstance(system, str):
        return system
    if isinstance(system, list):
        return "\n".join(b.get("text", "") for b in system if isinstance(b, dict))
    return ""


def is_main_request(path: str, body: dict[str, Any]) -> bool:
    """True for the CLI's main conversation turn (vs. its own side requests).

    Main turns are POST /v1/messages with max_tokens > 1 and no structured-output
    `output_config.format` (the CLI's title generator uses one; `--json-schema` does not, it
    adds a StructuredOutput tool instead), and the prompt is not a `<session>` wrapper.
    Streaming or not: after some streaming errors (e.g. a 404) the CLI repeats the same turn
    non-streaming, and that repeat is a main request too.
    """
    if not path.split("?")[0].rstrip("/").endswith("/v1/messages"):
        return False
    if (body.get("max_tokens") or 0) <= 1:
        return False
    output_config = body.get("output_config")
    if isinstance(output_config, dict) and output_config.get("format"):
        return False
    return not prompt_text(body).startswith("<session>")


def default_answer(prompt: str) -> str:
    """The fixed answer for an unmarked prompt."""
    return f"fake answer to: {prompt[:40]}"


def _last_turn_is_tool_result(body: dict[str, Any]) -> bool:
    msgs = body.get("messages") or []
    if not msgs or msgs[-1].get("role") != "user" or not isinstance(msgs[-1].get("content"), list):
        return False
    return any(isinstance(b, dict) and b.get("type") == "tool_result" for b in msgs[-1]["content"])


def reply_for(body: dict[str, Any]) -> Reply:
    """Default routing for main requests, by markers in the last user message text."""
    prompt = prompt_text(body)
    model = str(body.get("model") or "")
    if model and not re.fullmatch(r"claude-[a-z0-9.-]*(opus|sonnet|haiku|fable)[a-z0-9.\[\]-]*", model):
        return Error(404, "not_found_error", f"model: {model}")
    if m := re.search(r"\[\[error:(\d{3})\]\]", prompt):
        return Error(int(m.group(1)))
    if "[[usage-limit]]" in prompt:
        return UsageLimit(int(time.time()) + 3 * 3600)
    if "[[hang]]" in prompt:
        return Hang()
    if m := re.search(r"\[\[slow:([0-9.]+)\]\]", prompt):
        return Slow(float(m.group(1)), then=Text(default_answer(prompt)))
    if "[[echo]]" in prompt:
        return Text(prompt)
    if (m := re.search(r"\[\[tool:([A-Za-z0-9_:-]+)\]\]", prompt)) and not _last_turn_is_tool_result(body):
        return ToolUse(m.group(1), {})
    return Text(default_answer(prompt))


# --------------------------------------------------------------------------- server


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request: Any, client_address: Any) -> None:  # quiet: clients may vanish
        pass


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    fake: FakeAPI

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    # ---- plumbing
    def _read_body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        if n:
            return self.rfile.read(n)
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    break
                out += self.rfile.read(size)
                self.rfile.readline()
            return bytes(out)
        return b""

    def _send_json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("request-id", "req_fake_" + uuid.uuid4().hex[:20])
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def _safe(self, fn: Callable[[], None]) -> None:
        try:
            fn()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, TimeoutError, OSError):
            self.close_connection = True

    # ---- methods
    def do_GET(self) -> None:
        self._safe(lambda: self._send_json(200, {}))

    def do_HEAD(self) -> None:
        def go() -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        self._safe(go)

    def do_PUT(self) -> None:
        def go() -> None:
            self._read_body()
            self._send_json(200, {})

        self._safe(go)

    do_PATCH = do_PUT
    do_DELETE = do_GET

    def do_POST(self) -> None:
        self._safe(self._post)

    def _post(self) -> None:
        raw = self._read_body()
        try:
            body = json.loads(raw or b"{}")
        except ValueError:
            body = {"_raw": raw.decode("utf-8", "replace")}
        if not isinstance(body, dict):
            body = {"_raw": body}
        fake = self.fake
        main = is_main_request(self.path, body)
        fake._record(
            {
                "method": "POST",
                "path": self.path,
                "headers": {k.lower(): v for k, v in self.headers.items()},
                "body": body,
                "main": main,
            }
        )
        path = self.path.split("?")[0].rstrip("/")
        if path.endswith("/count_tokens"):
            self._send_json(200, {"input_tokens": max(1, len(json.dumps(body)) // 4)})
            return
        if not path.endswith("/v1/messages"):
            self._send_json(200, {})
            return
        reply = fake._next_reply(body) if main else _side_reply(body)
        self._respond(reply, body)

    # ---- replies
    def _respond(self, reply: Reply, body: dict[str, Any]) -> None:
        if isinstance(reply, Hang):
            self._wait(None)
            self.close_connection = True
            return
        if isinstance(reply, Slow):
            if not self._wait(reply.seconds):
                self.close_connection = True
                return
            self._respond(reply.then, body)
            return
        if isinstance(reply, Error):
            status = reply.status
            etype = reply.type or _ERROR_TYPES.get(status, "api_error")
            msg = reply.message or _ERROR_MESSAGES.get(status, "Error")
            if status == 401 and not reply.message and self.headers.get("Authorization"):
                msg = "Invalid bearer token"  # OAuth (subscription) mode
            headers = {"x-should-retry": "false"} if status in (400, 401, 403, 404) else {}
            headers.update(reply.headers or {})
            self._send_json(status, {"type": "error", "error": {"type": etype, "message": msg}}, headers)
            return
        if isinstance(reply, UsageLimit):
            headers = {
                "anthropic-ratelimit-unified-status": "rejected",
                "anthropic-ratelimit-unified-reset": str(reply.resets_at),
                "anthropic-ratelimit-unified-representative-claim": reply.claim,
                "anthropic-ratelimit-unified-fallback": "unavailable",
                "anthropic-ratelimit-unified-overage-status": "rejected",
                "anthropic-ratelimit-unified-overage-disabled-reason": "org_level_disabled",
                "anthropic-ratelimit-unified-5h-status": "rejected" if reply.claim == "five_hour" else "allowed",
                "anthropic-ratelimit-unified-5h-reset": str(reply.resets_at),
                "anthropic-ratelimit-unified-5h-utilization": "1.0" if reply.claim == "five_hour" else "0.5",
                "anthropic-ratelimit-unified-7d-status": "rejected" if reply.claim.startswith("seven_day") else "allowed",
                "anthropic-ratelimit-unified-7d-reset": str(reply.resets_at + 4 * 86400),
                "anthropic-ratelimit-unified-7d-utilization": "1.0" if reply.claim.startswith("seven_day") else "0.4",
                "retry-after": str(max(1, reply.resets_at - int(time.time()))),
                "x-should-retry": "false",
            }
            err = {"type": "error", "error": {"type": "rate_limit_error", "message": "Error"}}
            self._send_json(429, err, headers)
            return
        model = body.get("model") or DEFAULT_MODEL
        if body.get("stream"):
            self._stream(reply, model)
        else:
            self._send_json(200, _message_json(reply, model), self.fake.limit_headers)

    def _wait(self, seconds: float | None) -> bool:
        """Sleep up to `seconds` (None: forever); False if the client went away or the server stops."""
        import select

        deadline = None if seconds is None else time.monotonic() + seconds
        while not self.fake._stopping.is_set():
            left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
            if left <= 0:
                return True
            r, _, _ = select.select([self.connection], [], [], left)
            if r:
                try:
                    if not self.connection.recv(1, 2):  # MSG_PEEK: b"" means the client closed
                        return False
                except OSError:
                    return False
        return False

    def _stream(self, reply: Reply, model: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.send_header("request-id", "req_fake_" + uuid.uuid4().hex[:20])
        for k, v in self.fake.limit_headers.items():
            self.send_header(k, v)
        self.end_headers()
        self.close_connection = True
        delay = reply.chunk_delay_s if isinstance(reply, Text) else 0.0
        for event, data in _stream_events(reply, model):
            self.wfile.write(f"event: {event}\ndata: {json.dumps(data)}\n\n".encode())
            self.wfile.flush()
            if delay and event == "content_block_delta" and not self._wait(delay):
                return


def _side_reply(body: dict[str, Any]) -> Reply:
    """A short answer for the CLI's side requests (JSON for structured-output ones, e.g. titles)."""
    fmt = (body.get("output_config") or {}).get("format") if isinstance(body.get("output_config"), dict) else None
    if isinstance(fmt, dict) and isinstance(fmt.get("schema"), dict):
        props = fmt["schema"].get("properties") or {}
        return Text(json.dumps({k: "Fake title" for k in props}), input_tokens=10)
    return Text("OK", input_tokens=10)


def _out_tokens(reply: Text | ToolUse) -> int:
    if isinstance(reply, Text):
        return reply.output_tokens if reply.output_tokens is not None else max(1, len(reply.text) // 4)
    return max(1, len(json.dumps(reply.input)) // 4 + len(reply.text) // 4 + 10)


def _usage(input_tokens: int, output_tokens: int) -> dict[str, Any]:
    return {
        "input_tokens": input_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }


def _tool_id(reply: ToolUse) -> str:
    if not reply.id:
        reply.id = "toolu_fake_" + uuid.uuid4().hex[:16]
    return reply.id


def _message_json(reply: Reply, model: str) -> dict[str, Any]:
    """A non-streaming Messages API response."""
    if isinstance(reply, ToolUse):
        content: list[dict[str, Any]] = [{"type": "text", "text": reply.text}] if reply.text else []
        content.append({"type": "tool_use", "id": _tool_id(reply), "name": reply.name, "input": reply.input})
        stop, inp = "tool_use", 25
    else:
        assert isinstance(reply, Text)
        content, stop, inp = [{"type": "text", "text": reply.text}], "end_turn", reply.input_tokens
    return {
        "id": "msg_fake_" + uuid.uuid4().hex[:20],
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop,
        "stop_sequence": None,
        "usage": _usage(inp, _out_tokens(reply)),  # type: ignore[arg-type]
    }


def _stream_events(reply: Reply, model: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """The SSE events of a streamed Messages API response."""
    assert isinstance(reply, (Text, ToolUse))
    inp = reply.input_tokens if isinstance(reply, Text) else 25
    msg = _message_json(reply, model)
    start = dict(msg, content=[], stop_reason=None, usage=_usage(inp, 1))
    yield "message_start", {"type": "message_start", "message": start}
    index = 0
    texts = [reply.text] if isinstance(reply, Text) or reply.text else []
    size = reply.chunk_size if isinstance(reply, Text) else 16
    for text in texts:
        yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}
        for i in range(0, max(len(text), 1), size):
            delta = {"type": "text_delta", "text": text[i : i + size]}
            yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
        index += 1
    if isinstance(reply, ToolUse):
        block = {"type": "tool_use", "id": _tool_id(reply), "name": reply.name, "input": {}}
        yield "content_block_start", {"type": "content_block_start", "index": index, "content_block": block}
        js = json.dumps(reply.input)
        for i in range(0, len(js), 16):
            delta = {"type": "input_json_delta", "partial_json": js[i : i + 16]}
            yield "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
        yield "content_block_stop", {"type": "content_block_stop", "index": index}
    yield "message_delta", {
        "type": "message_delta",
        "delta": {"stop_reason": msg["stop_reason"], "stop_sequence": None},
        "usage": {"output_tokens": msg["usage"]["output_tokens"]},
    }
    yield "message_stop", {"type": "message_stop"}


WINDOW_ABBREV = {"five_hour": "5h", "seven_day": "7d"}


def unified_headers(windows: dict[str, tuple[float, int]], status: str = "allowed",
                    threshold: float = 0.75) -> dict[str, str]:
    """The `anthropic-ratelimit-unified-*` headers of a subscription answer: window -> (utilization 0-1, reset epoch).

    A window past `threshold` is marked `surpassed-threshold`, which is when the real CLI reports its
    utilization in a `rate_limit_event` (status `allowed_warning`).
    """
    worst = max(windows, key=lambda w: windows[w][0])
    out = {
        "anthropic-ratelimit-unified-status": status,
        "anthropic-ratelimit-unified-reset": str(windows[worst][1]),
        "anthropic-ratelimit-unified-representative-claim": worst,
        "anthropic-ratelimit-unified-fallback": "unavailable",
        "anthropic-ratelimit-unified-overage-status": "rejected",
        "anthropic-ratelimit-unified-overage-disabled-reason": "org_level_disabled",
    }
    for name, (util, reset) in windows.items():
        ab = WINDOW_ABBREV.get(name, name)
        out[f"anthropic-ratelimit-unified-{ab}-utilization"] = str(util)
        out[f"anthropic-ratelimit-unified-{ab}-reset"] = str(reset)
        out[f"anthropic-ratelimit-unified-{ab}-status"] = "rejected" if util >= 1 else "allowed"
        if util >= threshold:
            out[f"anthropic-ratelimit-unified-{ab}-surpassed-threshold"] = str(threshold)
    return out


class FakeAPI:
    """A fake Anthropic API on 127.0.0.1:<ephemeral port>; see the module docstring."""

    def __init__(self, default: ReplySource | None = None) -> None:
        self.default: ReplySource | None = default
        self.requests: list[dict[str, Any]] = []
        self._queue: deque[ReplySource] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""
        self.limit_headers: dict[str, str] = {}  # sent with every answer; see `unified_headers`

    # ---- lifecycle
    def start(self) -> FakeAPI:
        """Bind an ephemeral port and serve in a daemon thread."""
        handler = type("Handler", (_Handler,), {"fake": self})
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (hanging replies are released)."""
        self._stopping.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeAPI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- scripting
    def script(self, *replies: ReplySource) -> None:
        """Queue replies for the next main requests (each a Reply or a callable body -> Reply)."""
        with self._lock:
            self._queue.extend(replies)

    def reset(self) -> None:
        """Forget recorded requests and scripted replies."""
        with self._lock:
            self.requests.clear()
            self._queue.clear()

    def main_requests(self) -> list[dict[str, Any]]:
        """The recorded main (prompt-carrying) requests."""
        with self._lock:
            return [r for r in self.requests if r["main"]]

    def _record(self, entry: dict[str, Any]) -> None:
        with self._lock:
            self.requests.append(entry)

    def _next_reply(self, body: dict[str, Any]) -> Reply:
        with self._lock:
            source = self._queue.popleft() if self._queue else self.default
        if source is None:
            return reply_for(body)
        return source(body) if callable(source) else source
