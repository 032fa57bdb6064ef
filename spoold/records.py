"""The task record the library hands out (what `spoold show --json` prints), apart from the spool code:
it imports nothing of spoold, so the MCP adapter derives its tool schemas from it without loading the library."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class TaskInfo:
    """Where a task is and what is known about it; `position`/`estimated_start` only while queued."""

    id: str
    state: str
    title: str = ""
    model: str | None = None
    priority: str | None = None
    submitted_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    not_before: str | None = None
    attempts: int = 0
    position: int | None = None
    estimated_start: str | None = None
    estimated_wait_seconds: float | None = None
    error: str | None = None
    warnings: list[str] = field(default_factory=list)
    cost_usd: float | None = None
    duration_s: float | None = None
    path: str = ""
    result_path: str | None = None
    partial_answer: str | None = None  # while it runs: the answer so far (a few seconds behind)
    tags: list[str] = field(default_factory=list)
    model_resolved: str | None = None
    prompt: str | None = None  # `info` only: the task's prompt
    input_tokens: int | None = None  # `info` only, once finished
    output_tokens: int | None = None
    answer_chars: int | None = None
    options: dict[str, Any] = field(default_factory=dict)  # `info` only: system, timeout, profile, effort, ...
    history: list[dict[str, Any]] = field(default_factory=list)  # `info` only: attempts that went back, retries

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
