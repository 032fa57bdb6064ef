"""MCP tools and resources over the spool: submit, follow and fetch Claude prompts run by `spoold run`.

Every tool is a thin call into `spoold.api` (the same functions the CLI uses);
nothing here builds a path into the spool. Tools return pydantic models, so
each has an output schema and structured content. Errors a model can act on
leave as `ToolError` with the library's sentence.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Annotated, Literal, Self

import anyio
import anyio.to_thread
from mcp.server import MCPServer
from mcp.server.mcpserver.exceptions import (
    ResourceError,
    ResourceNotFoundError,
    ToolError,
)
from mcp.types import ToolAnnotations
from pydantic import BaseModel, Field

from spoold import __version__, api, config
from spoold.api import TaskInfo
from spoold.config import Settings
from spoold.errors import BadTaskId, SpooldError, TaskNotFound

log = logging.getLogger("spoold.mcp")

MAX_WAIT_S = 50.0  # Claude Code abandons a tool call after about 60 s
POLL_S = 0.25
MAX_LIST = 200
# Claude Code saves a tool result over 50,000 characters to a file and shows the model only its path;
# the answer appears twice in a result (text and structured content), so a page stays well under that.
PAGE_CHARS = 20_000
MAX_PAGE_CHARS = 100_000
RESULT_URI = "spoold://task/{task_id}/result"
QUEUE_URI = "spoold://queue"

State = Literal["queued", "running", "done", "failed", "cancelled"]
Priority = Literal["urgent", "high", "normal", "low"]
Offset = Annotated[int, Field(ge=0, description="Start of the answer part to return, in characters "
                                               "(the next_offset of the previous call)")]
MaxChars = Annotated[int, Field(ge=1, le=MAX_PAGE_CHARS, description="At most this many characters of the answer "
                                f"(1..{MAX_PAGE_CHARS:,}); the rest follows from next_offset")]
TaskId = Annotated[str, Field(description="A task id as returned by async_submit, e.g. 20261124T180000123Z-abcdef-my-title")]

INSTRUCTIONS = """\
spoold runs Claude prompts later, one by one, within the user's rate limits, through a queue on disk.
Submit with async_submit (it returns at once with a task_id and an estimated start), then follow the task
with async_wait (blocks up to 50 s) or async_status, and fetch the answer with async_result.
Tasks wait in the queue even when the spoold daemon is not running; async_status says when the queue is held."""


# ---- output models -------------------------------------------------------------


PARTIAL_TAIL = 8_000


class TaskStatus(BaseModel):
    """Where a task is and what is known about it."""

    task_id: str
    state: State = Field(description="queued → running → done | failed | cancelled")
    title: str = ""
    model: str | None = None
    priority: str | None = None
    submitted_at: str | None = Field(None, description="ISO time, UTC")
    started_at: str | None = None
    finished_at: str | None = None
    not_before: str | None = Field(None, description="the task will not start before this time")
    attempts: int = 0
    queue_position: int | None = Field(None, description="1 = next to start; only while queued")
    estimated_start: str | None = Field(None, description="ISO time the task is expected to start; only while queued")
    estimated_wait_seconds: float | None = None
    error: str | None = Field(None, description="why the task failed or was cancelled, in words")
    warnings: list[str] = Field(default_factory=list)
    cost_usd: float | None = None
    duration_s: float | None = None

    @classmethod
    def of(cls, ti: TaskInfo, **extra: object) -> Self:
        return cls(
            task_id=ti.id, state=ti.state, title=ti.title, model=ti.model, priority=ti.priority,
            submitted_at=ti.submitted_at, started_at=ti.started_at, finished_at=ti.finished_at,
            not_before=ti.not_before, attempts=ti.attempts, queue_position=ti.position,
            estimated_start=ti.estimated_start, estimated_wait_seconds=ti.estimated_wait_seconds,
            error=ti.error, warnings=ti.warnings, cost_usd=ti.cost_usd, duration_s=ti.duration_s, **extra,
        )


class TaskDetail(TaskStatus):
    """A task's status plus whether the whole queue is held (rate limit, budget) and until when."""

    queue_held_until: str | None = Field(None, description="no task starts before this time")
    queue_hold_reason: str | None = None
    answer_so_far: str | None = Field(None, description=f"while it runs: the end of the answer written so far "
                                      f"(at most {PARTIAL_TAIL:,} characters, a few seconds behind)")


class SubmitResult(BaseModel):
    task_id: str
    status: State
    queue_position: int | None = None
    estimated_wait_seconds: float | None = None
    estimated_start: str | None = None
    title: str = ""
    model: str | None = None
    priority: str | None = None
    not_before: str | None = None
    next_step: str


class TaskResult(BaseModel):
    """The answer of a finished task, or `answer: null` and the status while it is not finished."""

    task_id: str
    state: State
    finished: bool = Field(description="true once done, failed or cancelled")
    answer: str | None = Field(None, description="the answer text from `offset`, at most `max_chars` of it "
                               "(partial or empty for failed/cancelled tasks)")
    answer_chars: int | None = Field(None, description="length of the whole answer, in characters")
    offset: int = Field(0, description="where this part of the answer starts")
    next_offset: int | None = Field(None, description="more of the answer follows: call async_result with this "
                                    "offset for the next part; null when the answer ends in this part")
    model: str | None = Field(None, description="the model that answered")
    cost_usd: float | None = None
    duration_s: float | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    error: str | None = None
    status: TaskDetail


class SubscriptionWindow(BaseModel):
    """What the user's Claude subscription last reported of one usage window."""

    name: str = Field(description="five_hour, seven_day, seven_day_opus, seven_day_sonnet, ...")
    status: str = Field(description="allowed, allowed_warning or rejected")
    utilization: float | None = Field(None, description="share used, 0-1 (reported once past a warning threshold)")
    resets_at: str | None = None
    seen_at: str | None = None
    task_id: str | None = Field(None, description="the task whose run reported it")

    @classmethod
    def of(cls, w: api.WindowInfo) -> SubscriptionWindow:
        return cls(**asdict(w))


class TaskList(BaseModel):
    tasks: list[TaskStatus] = Field(description="running first, then queued in start order, then newest finished")
    counts: dict[str, int] = Field(description="number of tasks in each state")
    queue_held_until: str | None = None
    queue_hold_reason: str | None = None
    subscription_windows: list[SubscriptionWindow] = Field(default_factory=list)


class SearchHit(BaseModel):
    task_id: str
    state: str
    submitted_at: str
    title: str
    snippet: str = Field(description="where the words were found, marked [like this]")


class SearchResult(BaseModel):
    hits: list[SearchHit] = Field(description="best match first")


class CancelResult(BaseModel):
    task_id: str
    state: Literal["cancelled", "cancelling"] = Field(
        description="cancelled at once (was queued), or cancelling (the running task is being stopped)"
    )


class ConfigResult(BaseModel):
    spool: str
    changed: list[str] = Field(description="settings this call wrote; empty when it only read")
    settings: Settings = Field(description="the whole effective configuration after the change")


class QueueSummary(BaseModel):
    spool: str
    counts: dict[str, int]
    queue_held_until: str | None
    queue_hold_reason: str | None
    next_start: str | None
    tasks: list[TaskStatus]
    subscription_windows: list[SubscriptionWindow] = Field(default_factory=list)


# ---- errors --------------------------------------------------------------------


def _io_message(e: OSError) -> str:
    return f"the spool could not be read or written: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")


@contextmanager
def tool_errors() -> Iterator[None]:
    """Library errors become a ToolError, the only kind whose message reaches the model."""
    try:
        yield
    except SpooldError as e:
        raise ToolError(str(e)) from None
    except OSError as e:
        raise ToolError(_io_message(e)) from None


@contextmanager
def resource_errors() -> Iterator[None]:
    try:
        yield
    except (BadTaskId, TaskNotFound) as e:
        raise ResourceNotFoundError(str(e)) from None
    except SpooldError as e:
        raise ResourceError(str(e)) from None
    except OSError as e:
        raise ResourceError(_io_message(e)) from None


# ---- reading helpers (plain functions over the library) --------------------------


def task_detail(sp: api.Spool, task_id: str, ti: TaskInfo | None = None) -> TaskDetail:
    ti = ti or api.info(sp, task_id)
    until, why = api.hold(sp) if ti.state in ("queued", "running") else (None, None)
    tail = ti.partial_answer[-PARTIAL_TAIL:] if ti.partial_answer else None
    return TaskDetail.of(ti, queue_held_until=until, queue_hold_reason=why, answer_so_far=tail)


def task_result(sp: api.Spool, task_id: str, offset: int = 0, max_chars: int | None = None) -> TaskResult:
    """The result, with the answer cut to [offset, offset + max_chars) (all of it when max_chars is None)."""
    ti = api.info(sp, task_id)
    detail = task_detail(sp, task_id, ti)
    out = TaskResult(task_id=task_id, state=detail.state, finished=detail.state in api.FINISHED,
                     model=detail.model, error=detail.error, offset=offset, status=detail)
    answer = api.result(sp, task_id)[1] if out.finished and ti.result_path else ""
    if answer or (out.finished and ti.result_path and ti.state != "cancelled"):  # a cancel before it ran: none
        end = len(answer) if max_chars is None else offset + max_chars
        out.answer, out.answer_chars = answer[offset:end], len(answer)
        out.next_offset = end if end < len(answer) else None
        out.model = ti.model_resolved or ti.model or out.model
        out.cost_usd, out.duration_s = ti.cost_usd, ti.duration_s
        out.input_tokens, out.output_tokens = ti.input_tokens, ti.output_tokens
    return out


# ---- the server ----------------------------------------------------------------


def build_server(spool_root: Path | str) -> MCPServer:
    """An MCP server whose tools and resources act on the spool at spool_root."""
    root = Path(spool_root).expanduser()
    server = MCPServer(name="spoold", title="spoold: async Claude queue", version=__version__,
                       instructions=INSTRUCTIONS)
    reading = ToolAnnotations(read_only_hint=True, open_world_hint=False)

    def open_spool(create: bool = False) -> api.Spool:
        return api.open_spool(root, create=create)

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                                             open_world_hint=False))
    def async_submit(
        query: Annotated[str, Field(min_length=1, description="The prompt to run, as complete and self-contained "
                                    "as possible: it runs later in a fresh session without this conversation.")],
        model: Annotated[str | None, Field(max_length=100, description="Model alias or name (sonnet, opus, haiku, "
                                           "or a full name); default: the spool's default_model")] = None,
        priority: Priority = "normal",
        system: Annotated[str | None, Field(description="Optional system prompt for the task")] = None,
        title: Annotated[str | None, Field(max_length=200, description="Short human-readable title")] = None,
        not_before: Annotated[str | None, Field(max_length=64, description="Do not start before this ISO time, "
                                                "e.g. 2026-11-24T18:00:00Z")] = None,
    ) -> SubmitResult:
        """Queue a Claude prompt to run later within the user's rate limits, and return at once.

        Use it for long or non-urgent work, or when the user asks to run something "async" or "later".
        Returns a task_id with the queue position and estimated start. Follow up with async_wait
        (blocks up to 50 s), async_status, or async_result; a task may take minutes or hours to start.
        """
        with tool_errors():
            sp = open_spool(create=True)
            settings = api.load_settings(sp)
            ti = api.submit(sp, query, model=model, priority=priority, system=system, title=title,
                            not_before=not_before, source="mcp", settings=settings, frontmatter=False)
        log.info("queued %s", ti.id)
        return SubmitResult(
            task_id=ti.id, status=ti.state, queue_position=ti.position, estimated_wait_seconds=ti.estimated_wait_seconds,
            estimated_start=ti.estimated_start, title=ti.title, model=ti.model, priority=ti.priority,
            not_before=ti.not_before,
            next_step=f"call async_wait(task_id={ti.id!r}) to wait up to 50 s, or async_result later",
        )

    @server.tool(annotations=reading)
    def async_status(task_id: TaskId) -> TaskDetail:
        """The state of a task: queued (with position and estimated start), running, done, failed or cancelled.

        Includes timestamps, attempts, the error in words when it failed, and whether the queue is held
        (rate limit or budget) and until when. Cheap; does not return the answer (use async_result).
        """
        with tool_errors():
            api.check_id(task_id)
            return task_detail(open_spool(), task_id)

    @server.tool(annotations=reading)
    def async_result(task_id: TaskId, offset: Offset = 0, max_chars: MaxChars = PAGE_CHARS) -> TaskResult:
        """The answer of a finished task with its model, cost and duration.

        A long answer comes in parts: when `next_offset` is set, call again with offset=next_offset for
        the rest. While the task is still queued or running, `finished` is false, `answer` is null and
        `status` says where it is; then wait with async_wait rather than calling this in a tight loop.
        """
        with tool_errors():
            api.check_id(task_id)
            return task_result(open_spool(), task_id, offset, max_chars)

    @server.tool(annotations=reading)
    async def async_wait(
        task_id: TaskId,
        timeout_seconds: Annotated[float, Field(ge=0, description=f"How long to wait; at most {MAX_WAIT_S:g} s "
                                                "(longer values are capped)")] = 30.0,
        max_chars: MaxChars = PAGE_CHARS,
    ) -> TaskResult:
        """Wait until the task finishes (or the timeout passes) and return its answer, or its status at the timeout.

        Call it again to keep waiting; each call returns within 50 s. If the task is far back in the queue
        (see estimated_start), tell the user and check back later instead of waiting repeatedly. A long
        answer comes in parts: when `next_offset` is set, fetch the rest with async_result.
        """
        with tool_errors():
            api.check_id(task_id)
            sp = open_spool()
            deadline = anyio.current_time() + min(timeout_seconds, MAX_WAIT_S)
            while True:
                ti = await anyio.to_thread.run_sync(partial(api.info, sp, task_id, with_estimate=False))
                remaining = deadline - anyio.current_time()
                if ti.state in api.FINISHED or remaining <= 0:
                    break
                await anyio.sleep(min(POLL_S, remaining))
            return await anyio.to_thread.run_sync(task_result, sp, task_id, 0, max_chars)

    @server.tool(annotations=reading)
    def async_search(
        query: Annotated[str, Field(min_length=1, max_length=500, description="Words that must all appear")],
        state: Annotated[State | None, Field(description="Only tasks in this state; default: all finished")] = None,
        limit: Annotated[int, Field(ge=1, le=MAX_LIST, description=f"At most this many (1..{MAX_LIST})")] = 10,
    ) -> SearchResult:
        """Search the prompts, titles, tags and answers of finished tasks, best match first.

        Use it to find an earlier answer before asking again; fetch one with async_result(task_id).
        """
        with tool_errors():
            hits = api.search(open_spool(), query, limit=limit, states=[state] if state else None)
        return SearchResult(hits=[SearchHit(task_id=h.id, state=h.state, submitted_at=h.submitted_at, title=h.title,
                                            snippet=h.snippet) for h in hits])

    @server.tool(annotations=reading)
    def async_list(
        state: Annotated[State | None, Field(description="Only tasks in this state; default: all")] = None,
        limit: Annotated[int, Field(ge=1, le=MAX_LIST, description=f"At most this many tasks (1..{MAX_LIST})")] = 20,
    ) -> TaskList:
        """Recent tasks with state, title and, while queued, position and estimated start.

        Running tasks come first, then queued ones in the order they will start, then finished ones,
        newest first. Also returns the number of tasks in each state and whether the queue is held.
        """
        with tool_errors():
            sp = open_spool()
            items = api.list_tasks(sp, state, limit)
            st = api.status(sp)
        return TaskList(tasks=[TaskStatus.of(ti) for ti in items], counts=st.counts,
                        queue_held_until=st.held_until, queue_hold_reason=st.hold_reason,
                        subscription_windows=[SubscriptionWindow.of(w) for w in st.windows])

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False,
                                             open_world_hint=False))
    def async_cancel(task_id: TaskId) -> CancelResult:
        """Cancel a queued task (at once) or a running one (the daemon stops it within seconds).

        A cancelled task does not run again; finished tasks cannot be cancelled. Only cancel what the
        user asked to cancel.
        """
        with tool_errors():
            api.check_id(task_id)
            state = api.cancel(open_spool(), task_id)
        log.info("cancel %s: %s", task_id, state)
        return CancelResult(task_id=task_id, state=state)

    @server.tool(annotations=ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                                             open_world_hint=False))
    def async_rate_config(
        max_requests: Annotated[int | None, Field(ge=1, le=100_000, description="Tasks started per window")] = None,
        window_minutes: Annotated[float | None, Field(gt=0, le=525_600, description="Length of the rate-limit "
                                                      "window in minutes")] = None,
        concurrency: Annotated[int | None, Field(ge=1, le=64, description="Tasks run at the same time")] = None,
    ) -> ConfigResult:
        """Read the queue's configuration, or change its rate limit and concurrency (the daemon reloads it).

        With no argument it only reads. Change settings only when the user asks to.
        """
        changes = {"max_requests": max_requests, "window_minutes": window_minutes, "concurrency": concurrency}
        changes = {k: v for k, v in changes.items() if v is not None}
        with tool_errors():
            sp = open_spool(create=bool(changes))
            settings = api.set_config(sp, changes) if changes else api.load_settings(sp)
        if changes:
            log.info("config changed: %s", changes)
        return ConfigResult(spool=str(sp.root), changed=sorted(changes), settings=settings)

    @server.resource(RESULT_URI, name="task_result", mime_type="text/markdown",
                     description="The answer of a finished spoold task, by task id")
    def result_resource(task_id: str) -> str:
        with resource_errors():
            api.check_id(task_id)
            res = task_result(open_spool(), task_id)
        if not res.finished:
            raise ResourceError(f"task {task_id} is {res.state}; no result yet (async_wait waits for it)")
        if res.answer is None:
            raise ResourceError(f"task {task_id} ended {res.state} without an answer")
        return res.answer

    @server.resource(QUEUE_URI, name="queue", mime_type="application/json",
                     description="The queue: counts by state, running and queued tasks with estimates, holds")
    def queue_resource() -> str:
        with resource_errors():
            sp = open_spool()
            st = api.status(sp)
            items = api.list_tasks(sp, None, 50)
        return QueueSummary(
            spool=st.spool, counts=st.counts, queue_held_until=st.held_until, queue_hold_reason=st.hold_reason,
            next_start=st.next_start, tasks=[TaskStatus.of(ti) for ti in items],
            subscription_windows=[SubscriptionWindow.of(w) for w in st.windows],
        ).model_dump_json(indent=2)

    return server


def main(argv: list[str] | None = None) -> None:
    """`spoold-mcp [--spool DIR]`: serve the tools over stdio; logs go to stderr, never stdout."""
    parser = argparse.ArgumentParser(prog="spoold-mcp", description="MCP server (stdio) for the spoold queue")
    parser.add_argument("--spool", help="spool directory (default: $SPOOLD_DIR, else ~/async)")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    # Configured before the SDK's own basicConfig, which then leaves it alone: stderr only.
    logging.basicConfig(stream=sys.stderr, level=args.log_level, format="spoold-mcp %(levelname)s %(message)s")
    build_server(config.spool_root(args.spool)).run("stdio")


if __name__ == "__main__":
    main()
