"""Reading `claude -p --output-format stream-json --verbose` line by line, as the CLI writes it.

The stream says what the CLI really did (`system/init`: the resolved model, the tools and MCP
servers it loaded), what the subscription allows (`rate_limit_event`), the answer as it grows
(`assistant` messages, and `stream_event` text deltas with `--include-partial-messages`), and how
it ended (the final `result`). A plain `--output-format json` object (or array) parses too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from spoold.backends import Window


@dataclass
class Stream:
    init: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    windows: dict[str, Window] = field(default_factory=dict)
    limit: Window | None = None  # the headline of the latest rate_limit_event
    errors: list[str] = field(default_factory=list)  # `assistant.error` codes: rate_limit, authentication_failed, ...
    turns: list[str] = field(default_factory=list)  # the text of each finished assistant message
    partial: str = ""  # text deltas of the message being written now
    _buf: bytes = b""

    @property
    def answer_so_far(self) -> str:
        return "\n\n".join(t for t in [*self.turns, self.partial] if t)

    def text(self) -> str:
        return self.answer_so_far

    def feed(self, chunk: bytes) -> bool:
        """Take more stdout; True when the answer so far grew."""
        before = len(self.turns), len(self.partial)
        *lines, self._buf = (self._buf + chunk).split(b"\n")
        for line in lines:
            self._line(line)
        return (len(self.turns), len(self.partial)) != before

    def close(self) -> None:
        """The stream ended: a last line without its newline still counts."""
        if self._buf.strip():
            self._line(self._buf)
        self._buf = b""

    def _line(self, line: bytes) -> None:
        line = line.strip()
        if not line:
            return
        try:
            obj = json.loads(line)
        except ValueError:
            return  # not ours to read: a CLI may print a warning line
        for event in obj if isinstance(obj, list) else [obj]:
            if isinstance(event, dict):
                self._event(event)

    def _event(self, ev: dict[str, Any]) -> None:
        kind = ev.get("type")
        if kind == "result" or (kind is None and "is_error" in ev):
            self.result = ev
        elif kind == "system" and ev.get("subtype") == "init":
            self.init = ev
        elif kind == "rate_limit_event" and isinstance(ev.get("rate_limit_info"), dict):
            self._rate_limit(ev["rate_limit_info"])
        elif kind == "assistant" and isinstance(ev.get("message"), dict):
            if ev.get("error"):
                self.errors.append(str(ev["error"]))
            if ev.get("parent_tool_use_id") is None:
                text = "".join(b.get("text", "") for b in ev["message"].get("content") or []
                               if isinstance(b, dict) and b.get("type") == "text")
                if text and not ev.get("error"):
                    self.turns.append(text)
                self.partial = ""
        elif kind == "stream_event" and ev.get("parent_tool_use_id") is None:
            delta = (ev.get("event") or {}).get("delta") or {}
            if delta.get("type") == "text_delta":
                self.partial += str(delta.get("text") or "")

    def _rate_limit(self, info: dict[str, Any]) -> None:
        if info.get("rateLimitType"):
            self.limit = Window(str(info["rateLimitType"]), str(info.get("status") or ""),
                                _num(info.get("resetsAt")), _num(info.get("utilization")))
            self.windows[self.limit.name] = self.limit
        elif info.get("status"):
            self.limit = Window("", str(info["status"]), _num(info.get("resetsAt")))
        headline = self.limit.name if self.limit else None
        for name, w in (info.get("unifiedWindows") or {}).items():  # 2.1.3xx: every window at once
            if isinstance(w, dict) and name != headline:
                self.windows[name] = Window(name, str(w.get("status") or ""), _num(w.get("resetsAt")),
                                            _num(w.get("utilization")))


def parse(stdout: bytes) -> Stream:
    s = Stream()
    s.feed(stdout)
    s.close()
    return s


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None
