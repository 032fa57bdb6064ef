"""MCP tools and resources over the spool: submit, follow and fetch Claude prompts run by `spoold run`.

Every tool is a thin call into `spoold.api` (the same functions the CLI uses);
nothing here builds a path into the spool. Tools return pydantic models, so
each has an output schema and structured content. Errors a model can act on
leave as `ToolError` with the library's sentence. The tool list needs only the
records, so `spoold.api` loads at the first call: a client waits for the list
at start (bench/mcp_startup.py holds it to a bare SDK server's pace).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, fields, replace
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import anyio
import anyio.to_thread
from mcp.server import MCPServer
from mcp.server.mcpserver import Context
from mcp.server.mcpserver.exceptions import (
    ResourceError,
    ResourceNotFoundError,
    ToolError,
)
from mcp.types import ToolAnnotations
from pydantic import BaseModel, ConfigDict, Field

from spoold.config import Settings
from spoold.errors import BadTaskId, SpooldError, TaskNotFound
from spoold.records import TaskInfo

if TYPE_CHECKING:
    from spoold import __version__, api, config
else:  # the library itself (the spool code) loads at the first call: see _library()
    from spoold import __version__, config

log = logging.getLogger("spoold.mcp")
T = TypeVar("T", bound=TaskInfo)

MAX_WAIT_S = 50.0  # a client that shows no progress (Claude Desktop) drops a tool call after about 60 s
MAX_PROGRESS_WAIT_S = 600.0  # one that asked for progress (Claude Code) resets its timer on each notification
PROGRESS_EVERY_S = 10.0
MAX_LIST = 200
# Claude Code saves a tool result over 50,000 characters to a file and shows the model only its path;
# the answer appears twice in a result (text and structured content), so a page stays well under that.
PAGE_CHARS = 20_000
MAX_PAGE_CHARS = 100_000
RESULT_URI = "spoold://task/{task_id}/result"
QUEUE_URI = "spoold://queue"

State = Literal["running", "queued", "done", "failed", "cancelled"]  # the task states (a test holds them to the spool's)
Priority = Literal["urgent", "high", "normal", "low"]
Offset = Annotated[int, Field(ge=0, description="Start of the answer part to return, in characters "
                                               "(the next_offset of the previous call)")]
MaxChars = Annotated[int, Field(ge=1, le=MAX_PAGE_CHARS, description="At most this many characters of the answer "
                                f"(1..{MAX_PAGE_CHARS:,}); the rest follows from next_offset")]
TaskId = Annotated[str, Field(description="A task id as returned by async_submit, e.g. 20261124T180000123Z-abcdef-my-title")]

INSTRUCTIONS = """\
spoold runs Claude prompts later, one by one, within the user's rate limits, through a queue on disk.
Submit with async_submit (it returns at once with a task_id and an estimated start), then follow the task
with async_wait (blocks up to 50 s, or 10 minutes in clients that show progress) or async_status, and fetch
the answer with async_result.
Tasks wait in the queue even when the spoold daemon is not running; async_status says when the queue is held."""


# ---- output models -------------------------------------------------------------
# A task is always the one public record, spoold.api.TaskInfo (what `spoold show --json` prints), with
# what a tool adds to it; the SDK derives each output schema from these dataclasses.


PARTIAL_TAIL = 8_000


@dataclass
class TaskDetail(TaskInfo):
    """A task's record, plus whether the whole queue is held (rate limit, budget) and until when. While it
    runs, `partial_answer` is the end of the answer written so far (a few seconds behind)."""

    queue_held_until: str | None = None  # no task starts before this time
    queue_hold_reason: str | None = None


@dataclass
class Submitted(TaskInfo):
    """The queued task's record (position, estimated start) and what to call next."""

    next_step: str = ""


@dataclass
class TaskResult(TaskDetail):
    """A task's record with its answer once finished: `answer` is the part from `offset`, at most `max_chars`;
    `next_offset` is where the next part starts (null when this part ends the answer). While it is not
    finished, `finished` is false and `answer` null."""

    finished: bool = False
    answer: str | None = None
    answer_chars: int | None = None  # length of the whole answer
    offset: int = 0
    next_offset: int | None = None


def _extend(cls: type[T], ti: TaskInfo, **extra: Any) -> T:
    """The record `ti` as one of the tool outputs above (the same fields, and the tool's own)."""
    return cls(**{f.name: getattr(ti, f.name) for f in fields(TaskInfo)}, **extra)


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
    tasks: list[TaskInfo] = Field(description="running first, then queued in start order, then newest finished")
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
    id: str
    state: Literal["cancelled", "cancelling"] = Field(
        description="cancelled at once (was queued), or cancelling (the running task is being stopped)"
    )


class ConfigResult(BaseModel):
    spool: str
    changed: list[str] = Field(description="settings this call wrote; empty when it only read")
    settings: Settings = Field(description="the whole effective configuration after the change")


class QueueSummary(BaseModel):
    model_config = ConfigDict(defer_build=True)  # the queue resource's text, built at its first read: no tool returns it

    spool: str
    counts: dict[str, int]
    queue_held_until: str | None
    queue_hold_reason: str | None
    next_start: str | None
    tasks: list[TaskInfo]
    subscription_windows: list[SubscriptionWindow] = Field(default_factory=list)


# ---- errors --------------------------------------------------------------------


def _library() -> None:
    """Bind `api` (the spool code: most of what spoold imports) at the first tool call or resource read, not at
    start; every tool and resource enters through one of the two context managers below."""
    global api
    from spoold import api


def _io_message(e: OSError) -> str:
    return f"the spool could not be read or written: {e.strerror or e}" + (f" ({e.filename})" if e.filename else "")


@contextmanager
def tool_errors() -> Iterator[None]:
    """Library errors become a ToolError, the only kind whose message reaches the model."""
    _library()
    try:
        yield
    except SpooldError as e:
        raise ToolError(str(e)) from None
    except OSError as e:
        raise ToolError(_io_message(e)) from None


@contextmanager
def resource_errors() -> Iterator[None]:
    _library()
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
    until, why = api.hold(sp) if ti.state in api.PENDING else (None, None)
    out = _extend(TaskDetail, ti, queue_held_until=until, queue_hold_reason=why)
    out.partial_answer = ti.partial_answer[-PARTIAL_TAIL:] if ti.partial_answer else None
    return out


def task_result(sp: api.Spool, task_id: str, offset: int = 0, max_chars: int | None = None) -> TaskResult:
    """The result, with the answer cut to [offset, offset + max_chars) (all of it when max_chars is None)."""
    ti, res = api.info_and_result(sp, task_id)
    detail = task_detail(sp, task_id, ti)
    out = _extend(TaskResult, detail, queue_held_until=detail.queue_held_until,
                  queue_hold_reason=detail.queue_hold_reason, finished=ti.state in api.FINISHED, offset=offset)
    answer = api.answer_of(res)
    if res is not None and (answer or ti.state != "cancelled"):  # cancelled with nothing answered: no answer
        end = len(answer) if max_chars is None else offset + max_chars
        out.answer, out.answer_chars = answer[offset:end], len(answer)
        out.next_offset = end if end < len(answer) else None
    return out


# ---- the tools: each a plain function of the spool it is given ---------------------


@dataclass(frozen=True)
class Served:
    """What the server's lifespan hands every tool: the spool root it serves."""

    root: Path


def _spool(ctx: Context, create: bool = False) -> api.Spool:
    served = ctx.request_context.lifespan_context
    assert isinstance(served, Served)
    return api.open_spool(served.root, create=create)


def async_submit(
    ctx: Context,
    query: Annotated[str, Field(min_length=1, description="The prompt to run, as complete and self-contained "
                                "as possible: it runs later in a fresh session without this conversation.")],
    model: Annotated[str | None, Field(max_length=100, description="Model alias or name (sonnet, opus, haiku, "
                                       "or a full name); default: the spool's default_model")] = None,
    priority: Priority = "normal",
    system: Annotated[str | None, Field(description="Optional system prompt for the task")] = None,
    title: Annotated[str | None, Field(max_length=200, description="Short human-readable title")] = None,
    not_before: Annotated[str | None, Field(max_length=64, description="Do not start before this ISO time, "
                                            "e.g. 2026-11-24T18:00:00Z")] = None,
) -> Submitted:
    """Queue a Claude prompt to run later, in the background, within the user's rate limits, and return at once.

    Use it for long or non-urgent work, work to run overnight or after a usage limit resets, or when the
    user asks to run something in the background, "async" or "later".
    Returns the task's id with its queue position and estimated start. Follow up with async_wait
    (blocks up to 50 s), async_status, or async_result; a task may take minutes or hours to start.
    """
    with tool_errors():
        sp = _spool(ctx, create=True)
        ti = api.submit(sp, query, model=model, priority=priority, system=system, title=title,
                        not_before=not_before, source="mcp", frontmatter=False)
    log.info("queued %s", ti.id)
    return _extend(Submitted, ti, next_step=f"call async_wait(task_id={ti.id!r}) to wait up to 50 s, "
                   "or async_result later")


def async_status(ctx: Context, task_id: TaskId) -> TaskDetail:
    """The state of a task: queued (with position and estimated start), running, done, failed or cancelled.

    Includes timestamps, attempts, the error in words when it failed, and whether the queue is held
    (rate limit or budget) and until when. Cheap; does not return the answer (use async_result).
    """
    with tool_errors():
        api.check_id(task_id)
        return task_detail(_spool(ctx), task_id)


def async_result(ctx: Context, task_id: TaskId, offset: Offset = 0, max_chars: MaxChars = PAGE_CHARS) -> TaskResult:
    """The answer of a finished task with its model, cost and duration.

    A long answer comes in parts: when `next_offset` is set, call again with offset=next_offset for
    the rest. While the task is still queued or running, `finished` is false, `answer` is null and
    the record says where it is; then wait with async_wait rather than calling this in a tight loop.
    """
    with tool_errors():
        api.check_id(task_id)
        return task_result(_spool(ctx), task_id, offset, max_chars)


async def async_wait(
    ctx: Context,
    task_id: TaskId,
    timeout_seconds: Annotated[float, Field(ge=0, description=f"How long to wait: at most {MAX_WAIT_S:g} s, or "
                                            f"{MAX_PROGRESS_WAIT_S:g} s for a client that shows progress "
                                            "(longer values are capped)")] = 30.0,
    max_chars: MaxChars = PAGE_CHARS,
) -> TaskResult:
    """Wait until the task finishes (or the timeout passes) and return its answer, or its status at the timeout.

    In a client that shows progress (Claude Code) it waits up to 10 minutes, reporting the task's state every
    few seconds; otherwise each call returns within 50 s. Call it again to keep waiting. If the task is far
    back in the queue (see estimated_start), tell the user and check back later instead of waiting
    repeatedly. A long answer comes in parts: when `next_offset` is set, fetch the rest with async_result.
    """
    with tool_errors():
        api.check_id(task_id)
        sp = _spool(ctx)
        meta = ctx.request_context.meta or {}
        progress = meta.get("progress_token") is not None
        total = min(timeout_seconds, MAX_PROGRESS_WAIT_S if progress else MAX_WAIT_S)
        start = anyio.current_time()
        while True:  # api.wait does the waiting; this only cuts it into steps to say where the task is
            left = total - (anyio.current_time() - start)
            step = min(left, PROGRESS_EVERY_S) if progress else left
            ti = await anyio.to_thread.run_sync(partial(api.wait, sp, task_id, max(0.0, step), with_estimate=progress),
                                                abandon_on_cancel=True)
            if ti.state in api.FINISHED or left <= step:
                break
            await ctx.report_progress(anyio.current_time() - start, total, _progress_words(ti))
        return await anyio.to_thread.run_sync(task_result, sp, task_id, 0, max_chars)


def _progress_words(ti: TaskInfo) -> str:
    if ti.state == "running":
        return f"running since {ti.started_at}" + (f", {len(ti.partial_answer):,} characters so far"
                                                   if ti.partial_answer else "")
    return f"{ti.state}" + (f", #{ti.position} in the queue" if ti.position else "")


def async_search(
    ctx: Context,
    query: Annotated[str, Field(min_length=1, max_length=500, description="Words that must all appear")],
    state: Annotated[State | None, Field(description="Only tasks in this state; default: all finished")] = None,
    limit: Annotated[int, Field(ge=1, le=MAX_LIST, description=f"At most this many (1..{MAX_LIST})")] = 10,
) -> SearchResult:
    """Search the prompts, titles, tags and answers of finished tasks, best match first.

    Use it to find an earlier answer before asking again; fetch one with async_result(task_id).
    """
    with tool_errors():
        hits = api.search(_spool(ctx), query, limit=limit, states=[state] if state else None)
    return SearchResult(hits=[SearchHit(task_id=h.id, state=h.state, submitted_at=h.submitted_at, title=h.title,
                                        snippet=h.snippet) for h in hits])


def async_list(
    ctx: Context,
    state: Annotated[State | None, Field(description="Only tasks in this state; default: all")] = None,
    limit: Annotated[int, Field(ge=1, le=MAX_LIST, description=f"At most this many tasks (1..{MAX_LIST})")] = 20,
) -> TaskList:
    """Recent tasks with state, title and, while queued, position and estimated start.

    Running tasks come first, then queued ones in the order they will start, then finished ones,
    newest first. Also returns the number of tasks in each state and whether the queue is held.
    """
    with tool_errors():
        sp = _spool(ctx)
        items = api.list_tasks(sp, state, limit)
        st = api.status(sp)
    return TaskList(tasks=items, counts=st.counts, queue_held_until=st.held_until, queue_hold_reason=st.hold_reason,
                    subscription_windows=[SubscriptionWindow.of(w) for w in st.windows])


def async_cancel(ctx: Context, task_id: TaskId) -> CancelResult:
    """Cancel a queued task (at once) or a running one (the daemon stops it within seconds).

    A cancelled task does not run again; finished tasks cannot be cancelled. Only cancel what the
    user asked to cancel.
    """
    with tool_errors():
        api.check_id(task_id)
        state = api.cancel(_spool(ctx), task_id)
    log.info("cancel %s: %s", task_id, state)
    return CancelResult(id=task_id, state=state)  # type: ignore[arg-type]


def async_rate_config(
    ctx: Context,
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
        sp = _spool(ctx, create=bool(changes))
        settings = api.set_config(sp, changes) if changes else api.load_settings(sp)
    if changes:
        log.info("config changed: %s", changes)
    hidden = replace(settings, notify={name: "(set in config.yaml)" for name in settings.notify})  # URLs hold tokens
    return ConfigResult(spool=str(sp.root), changed=sorted(changes), settings=hidden)


def result_resource(ctx: Context, task_id: str) -> str:
    """The answer of a finished spoold task, by task id."""
    with resource_errors():
        api.check_id(task_id)
        res = task_result(_spool(ctx), task_id)
    if not res.finished:
        raise ResourceError(f"task {task_id} is {res.state}; no result yet (async_wait waits for it)")
    if res.answer is None:
        raise ResourceError(f"task {task_id} ended {res.state} without an answer")
    return res.answer


def queue_resource(root: Path) -> str:
    """The queue: counts by state, running and queued tasks with estimates, holds (a static resource gets no
    context, so the server binds it to its root)."""
    with resource_errors():
        sp = api.open_spool(root)
        st = api.status(sp)
        items = api.list_tasks(sp, None, 50)
    return QueueSummary(
        spool=st.spool, counts=st.counts, queue_held_until=st.held_until, queue_hold_reason=st.hold_reason,
        next_start=st.next_start, tasks=items, subscription_windows=[SubscriptionWindow.of(w) for w in st.windows],
    ).model_dump_json(indent=2)


READING = ToolAnnotations(read_only_hint=True, open_world_hint=False)
# Words a model may search with when Claude Code defers MCP tools behind its ToolSearch (it matches them against
# a tool's name, description and `anthropic/searchHint`): the requests people make, not spoold's own names.
SEARCH_HINTS = {
    "async_submit": "queue run later background overnight schedule defer delay batch job task prompt question "
                    "research long usage limit reset rate limit tomorrow morning tonight notify done submit",
    "async_wait": "wait until done finished background queued job task result answer check later",
    "async_result": "result answer output finished background job task fetch read",
    "async_status": "status progress state queued running background job task check",
    "async_list": "list queue jobs tasks background pending running finished",
    "async_cancel": "cancel stop abort queued background job task",
    "async_search": "search find earlier previous answers past results background jobs tasks",
}
TOOLS = (
    (async_submit, ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False,
                                   open_world_hint=False)),
    (async_status, READING), (async_result, READING), (async_wait, READING), (async_search, READING),
    (async_list, READING),
    (async_cancel, ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=False,
                                   open_world_hint=False)),
    (async_rate_config, ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=True,
                                        open_world_hint=False)),
)


# ---- the server ----------------------------------------------------------------


def build_server(spool_root: Path | str) -> MCPServer:
    """An MCP server whose tools and resources act on the spool at spool_root."""
    root = Path(spool_root).expanduser()

    @asynccontextmanager
    async def lifespan(_: MCPServer) -> AsyncIterator[Served]:
        yield Served(root)

    server = MCPServer(name="spoold", title="spoold: async Claude queue", version=__version__,
                       instructions=INSTRUCTIONS, lifespan=lifespan)
    for fn, hints in TOOLS:
        words = SEARCH_HINTS.get(fn.__name__)
        server.add_tool(fn, annotations=hints, meta={"anthropic/searchHint": words} if words else None)
    server.resource(RESULT_URI, name="task_result", mime_type="text/markdown",
                    description="The answer of a finished spoold task, by task id")(result_resource)
    server.resource(QUEUE_URI, name="queue", mime_type="application/json",
                    description="The queue: counts by state, running and queued tasks with estimates, holds"
                    )(partial(queue_resource, root))
    return server


def main(argv: list[str] | None = None) -> None:
    """`spoold-mcp [--spool DIR]`: serve the tools over stdio; logs go to stderr, never stdout."""
    parser = argparse.ArgumentParser(prog="spoold-mcp", description="MCP server (stdio) for the spoold queue")
    parser.add_argument("--spool", help="spool directory (default: $SPOOLD_DIR, else ~/async)")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    args = parser.parse_args(argv)
    # Ours, to stderr only; the SDK's own basicConfig would then leave it alone, so it is skipped.
    logging.basicConfig(stream=sys.stderr, level=args.log_level, format="spoold-mcp %(levelname)s %(message)s")
    _skip_sdk_logging()
    build_server(config.spool_root(args.spool)).run("stdio")


def _skip_sdk_logging() -> None:
    """MCPServer() calls the SDK's configure_logging, which imports rich (13 ms; 50 ms uncompiled) to build a
    handler that its basicConfig then drops, the root logger having one already: a no-op we need not pay for."""
    from mcp.server.mcpserver import server as sdk

    sdk.configure_logging = lambda level="INFO": None


if __name__ == "__main__":
    main()
