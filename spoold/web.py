"""`spoold web`: a local page for the queue and the answers, live from the spool's own changes.

Starlette and Uvicorn (which the MCP SDK brings); every action goes through spoold.api, the same functions
the CLI and the adapter call, so the page writes nothing a daemon could not have written and works whether
or not one runs. Answers are Markdown rendered with markdown-it-py with raw HTML off: a task's text is
always escaped. On 127.0.0.1 it needs no login; bound elsewhere it needs the token printed at start.
Every request that changes something carries the page's CSRF token.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import html
import json
import os
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from spoold import api, config, spool
from spoold.errors import SpooldError
from spoold.units import usd

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def token_file() -> Path:
    """Where the page's login token is kept: private, outside the spool (which other hosts may share)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "spoold" / "web_token"


def login_token() -> str:
    """The token a page bound beyond loopback asks for; made once, kept 0600."""
    path = token_file()
    with contextlib.suppress(OSError):
        kept = path.read_text().strip()
        if len(kept) >= 32:
            return kept
    made = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(made + "\n")
    return made


class Changes:
    """One watcher of the spool for every open page: each subscriber gets a tick when the spool changed."""

    def __init__(self, sp: spool.Spool) -> None:
        self.sp = sp
        self.subscribers: set[asyncio.Queue[None]] = set()
        self.task: asyncio.Task[None] | None = None

    async def run(self) -> None:
        from watchfiles import awatch

        dirs = [self.sp.dir(s) for s in spool.COUNTED]
        async for _ in awatch(*dirs, debounce=300, recursive=True, ignore_permission_denied=True):
            for q in list(self.subscribers):
                with contextlib.suppress(asyncio.QueueFull):
                    q.put_nowait(None)

    @contextlib.asynccontextmanager
    async def subscribe(self) -> AsyncIterator[asyncio.Queue[None]]:
        q: asyncio.Queue[None] = asyncio.Queue(maxsize=1)  # a burst of changes is one tick
        self.subscribers.add(q)
        try:
            yield q
        finally:
            self.subscribers.discard(q)


def build_app(root: Path | str, *, token: str | None = None) -> Any:
    """The page's Starlette app for the spool at root (`token`: required of every request when set)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import HTMLResponse, PlainTextResponse, RedirectResponse, Response, StreamingResponse
    from starlette.routing import Route

    sp = api.open_spool(root, create=True)
    csrf = secrets.token_urlsafe(24)
    changes = Changes(sp)

    def allowed(request: Request) -> bool:
        if token is None:
            return True
        given = request.query_params.get("token") or request.cookies.get("spoold_token") or ""
        return hmac.compare_digest(given, token)

    def page(body: str, title: str = "spoold", status: int = 200) -> HTMLResponse:
        return HTMLResponse(_layout(title, body, csrf), status_code=status)

    def guard(request: Request) -> Response | None:
        if not allowed(request):
            return PlainTextResponse("spoold: this page needs its token (?token=...)", status_code=401)
        return None

    async def changed(request: Request) -> Response | None:
        """A POST is checked twice: the page's own token in the form, and (when a browser says) the same origin."""
        if (refused := guard(request)) is not None:
            return refused
        form = await request.form()
        if not hmac.compare_digest(str(form.get("csrf", "")), csrf):
            return PlainTextResponse("spoold: a change needs the page's form token (reload the page)", status_code=403)
        origin = request.headers.get("origin")
        if origin and origin.split("://", 1)[-1] != request.headers.get("host", ""):
            return PlainTextResponse("spoold: a change from another site is refused", status_code=403)
        return None

    async def home(request: Request) -> Response:
        if (refused := guard(request)) is not None:
            return refused
        response = page(_home(sp, csrf))
        if token is not None:
            response.set_cookie("spoold_token", token, httponly=True, samesite="strict")
        return response

    async def rows(request: Request) -> Response:
        if (refused := guard(request)) is not None:
            return refused
        return HTMLResponse(_rows(sp) + _status_line(sp))

    async def task(request: Request) -> Response:
        if (refused := guard(request)) is not None:
            return refused
        try:
            return page(_task_page(sp, spool.resolve_id(sp, request.path_params["task_id"]), csrf), "spoold: task")
        except SpooldError as e:
            return page(f"<p class=error>{html.escape(str(e))}</p>", status=404)

    async def events(request: Request) -> Response:
        """Server-sent events: a `change` whenever the spool changes (one watcher for all pages)."""
        if (refused := guard(request)) is not None:
            return refused

        async def stream() -> AsyncIterator[str]:
            async with changes.subscribe() as q:
                yield "retry: 2000\nevent: hello\ndata: {}\n\n"
                while not await request.is_disconnected():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(q.get(), 15)
                        yield f"event: change\ndata: {json.dumps({'at': time.time()})}\n\n"
                        continue
                    yield ": keep-alive\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def submit(request: Request) -> Response:
        if (refused := await changed(request)) is not None:
            return refused
        form = await request.form()
        try:
            ti = api.submit(sp, str(form.get("prompt", "")), model=str(form.get("model") or "") or None,
                            priority=str(form.get("priority") or "") or None, title=str(form.get("title") or "") or None,
                            source="web")
        except SpooldError as e:
            return page(f"<p class=error>{html.escape(str(e))}</p><p><a href=/>back</a></p>", status=400)
        return RedirectResponse(f"/task/{ti.id}", status_code=303)

    async def act(request: Request) -> Response:
        if (refused := await changed(request)) is not None:
            return refused
        tid, action = request.path_params["task_id"], request.path_params["action"]
        try:
            if action == "cancel":
                api.cancel(sp, api.check_id(tid))
            elif action == "retry":
                api.retry(sp, api.check_id(tid))
            else:
                return PlainTextResponse("spoold: no such action", status_code=404)
        except SpooldError as e:
            return page(f"<p class=error>{html.escape(str(e))}</p><p><a href=/task/{html.escape(tid)}>back</a></p>",
                        status=400)
        return RedirectResponse(f"/task/{tid}", status_code=303)

    async def clear_hold(request: Request) -> Response:
        if (refused := await changed(request)) is not None:
            return refused
        api.clear_hold(sp)
        return RedirectResponse("/", status_code=303)

    async def limits(request: Request) -> Response:
        if (refused := await changed(request)) is not None:
            return refused
        form = await request.form()
        wanted = {k: str(form.get(k) or "").strip() for k in ("max_requests", "window_minutes", "concurrency")}
        try:
            api.set_config(sp, {k: config.parse_value(v) for k, v in wanted.items() if v})
        except SpooldError as e:
            return page(f"<p class=error>{html.escape(str(e))}</p><p><a href=/>back</a></p>", status=400)
        return RedirectResponse("/", status_code=303)

    async def search(request: Request) -> Response:
        if (refused := guard(request)) is not None:
            return refused
        q = request.query_params.get("q", "").strip()
        try:
            hits = api.search(sp, q, limit=50) if q else []
        except SpooldError as e:
            return page(f"<p class=error>{html.escape(str(e))}</p>", "spoold: search", status=400)
        return page(_search_page(q, hits), "spoold: search")

    async def stats(request: Request) -> Response:
        if (refused := guard(request)) is not None:
            return refused
        from spoold import history

        return page(_stats_page(history.stats(sp)), "spoold: stats")

    async def metrics(request: Request) -> Response:
        if (refused := guard(request)) is not None:
            return refused
        from spoold import metrics as exposition

        body, kind = exposition.render(sp)
        return Response(body, media_type=kind)

    @contextlib.asynccontextmanager
    async def lifespan(_: Any) -> AsyncIterator[None]:
        changes.task = asyncio.ensure_future(changes.run())  # one watcher, whatever the number of pages open
        try:
            yield
        finally:
            changes.task.cancel()

    return Starlette(routes=[
        Route("/", home), Route("/rows", rows), Route("/events", events), Route("/metrics", metrics),
        Route("/search", search), Route("/stats", stats),
        Route("/task/{task_id}", task), Route("/task/{task_id}/{action}", act, methods=["POST"]),
        Route("/submit", submit, methods=["POST"]), Route("/clear-hold", clear_hold, methods=["POST"]),
        Route("/limits", limits, methods=["POST"]),
    ], lifespan=lifespan)


def serve(root: Path | str, host: str = "127.0.0.1", port: int = 8465) -> int:
    """Serve the page until Ctrl-C. The socket is bound here, before the address is printed: a port in use
    is one line, not an address that answers nothing."""
    import socket

    import uvicorn

    try:
        sock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    except OSError as e:
        why = os.strerror(e.errno) if e.errno else str(e)
        raise SpooldError(f"cannot listen on {host}:{port}: {why} (pick another with --port)") from None
    token = None if host in LOOPBACK else login_token()
    if token is not None:
        print(f"spoold web: bound to {host}, so it needs its token: http://{host}:{port}/?token={token}", flush=True)
    else:
        print(f"spoold web: http://{host}:{port}/", flush=True)
    uvicorn.Server(uvicorn.Config(build_app(root, token=token), log_level="warning")).run(sockets=[sock])
    return 0


# ---- the HTML (plain, escaped, no framework) -------------------------------------------------


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value))


def _when(iso_time: str | None) -> str:
    """A time for people: this machine's local time with its zone (the page is served where it is read)."""
    from spoold.terminal import local

    return _e(local(iso_time)) if iso_time else ""


def _layout(title: str, body: str, csrf: str) -> str:
    return f"""<!doctype html><html lang=en><head><meta charset=utf-8><title>{_e(title)}</title>
<meta name=viewport content="width=device-width, initial-scale=1">
<style>
body{{font:15px/1.45 system-ui,sans-serif;margin:1.5rem auto;max-width:68rem;padding:0 1rem;color:#222}}
table{{border-collapse:collapse;width:100%}} td,th{{padding:.3rem .5rem;border-bottom:1px solid #ddd;text-align:left}}
.state{{font-weight:600}} .done{{color:#176f2c}} .failed{{color:#b00020}} .running{{color:#0b57d0}}
.queued{{color:#6b5900}} .cancelled{{color:#666}} .error{{color:#b00020}} .answer{{border-left:3px solid #ccc;padding:0 1rem}}
pre{{background:#f5f5f5;padding:.6rem;overflow:auto}} textarea{{width:100%;min-height:6rem}} form.inline{{display:inline}}
.muted{{color:#666}}
</style></head><body data-csrf="{_e(csrf)}"><h1><a href=/>spoold</a></h1>
<form method=get action=/search><input name=q placeholder="search the answers"> <button>search</button>
<a href=/stats>stats</a> <a href=/metrics>metrics</a></form>{body}
<script>
const es = new EventSource('/events' + location.search);
es.addEventListener('change', async () => {{
  const rows = document.getElementById('rows');
  if (rows) {{ const r = await fetch('/rows' + location.search); rows.innerHTML = await r.text(); }}
  else if (document.body.dataset.live === 'task') location.reload();
}});
</script></body></html>"""


def _csrf_field(csrf: str) -> str:
    return f'<input type=hidden name=csrf value="{_e(csrf)}">'


def _status_line(sp: spool.Spool) -> str:
    st = api.status(sp)
    held = f" · <span class=error>held until {_when(st.held_until)}: {_e(st.hold_reason)}</span>" if st.held_until else ""
    serving = "a daemon serves the spool" if st.serving else "<span class=error>no daemon is serving this spool</span>"
    windows = "".join(f" · {_e(w.name)} {w.status}" + (f" {w.utilization:.0%}" if w.utilization is not None else "")
                      for w in st.windows)
    counts = " · ".join(f"{k} {v}" for k, v in st.counts.items())
    return f"<p id=status class=muted>{counts} · {serving}{held}{windows}</p>"


def _rows(sp: spool.Spool) -> str:
    out = ["<table><tr><th>state</th><th>title</th><th>model</th><th>when</th><th>cost</th></tr>"]
    for ti in api.recent(sp, limit=50):
        when = (f"#{ti.position}, starts ~{_when(ti.estimated_start)}" if ti.state == "queued" and ti.position
                else _when(ti.finished_at or ti.started_at or ti.submitted_at))
        why = f' <span class=muted>{_e(ti.error)}</span>' if ti.error and ti.state in ("failed", "cancelled") else ""
        out.append(f'<tr data-id="{_e(ti.id)}"><td class="state {_e(ti.state)}">{_e(ti.state)}</td>'
                   f'<td><a href="/task/{_e(ti.id)}">{_e(ti.title or ti.id)}</a>{why}</td>'
                   f"<td>{_e(ti.model_resolved or ti.model)}</td><td>{when}</td>"
                   f"<td>{usd(ti.cost_usd) if ti.cost_usd is not None else ''}</td></tr>")
    return "".join(out) + "</table>"


def _home(sp: spool.Spool, csrf: str) -> str:
    st = api.status(sp)
    s = st.settings
    hold = (f'<form class=inline method=post action=/clear-hold>{_csrf_field(csrf)}<button>lift the hold</button></form>'
            if st.held_until else "")
    return f"""<div id=rows>{_rows(sp)}{_status_line(sp)}</div>{hold}
<h2>Ask</h2><form method=post action=/submit>{_csrf_field(csrf)}
<textarea name=prompt required placeholder="A question to run later"></textarea>
<p><input name=title placeholder=title> <input name=model placeholder="model ({_e(s['default_model'])})">
<select name=priority><option>normal</option><option>high</option><option>urgent</option><option>low</option></select>
<button>queue it</button></p></form>
<h2>Limits</h2><form method=post action=/limits>{_csrf_field(csrf)}
<input name=max_requests placeholder="{_e(s['max_requests'])} starts"> per
<input name=window_minutes placeholder="{_e(s['window_minutes'])} min">, concurrency
<input name=concurrency placeholder="{_e(s['concurrency'])}"> <button>change</button></form>"""


def _task_page(sp: spool.Spool, task_id: str, csrf: str) -> str:
    from markdown_it import MarkdownIt

    ti = api.info(sp, api.check_id(task_id))
    md = MarkdownIt("commonmark", {"html": False})  # raw HTML in a prompt or an answer is shown, never run
    answer = ""
    if ti.state in api.FINISHED:
        text = api.result(sp, ti.id)[1]
        answer = f"<div class=answer id=answer>{md.render(text)}</div>" if text else ""
    elif ti.partial_answer:
        answer = f"<div class=answer id=answer><p class=muted>so far:</p>{md.render(ti.partial_answer)}</div>"
    actions = ""
    if ti.state in api.PENDING:
        actions = f'<form class=inline method=post action="/task/{_e(ti.id)}/cancel">{_csrf_field(csrf)}<button>cancel</button></form>'
    elif ti.state in ("failed", "cancelled"):
        actions = f'<form class=inline method=post action="/task/{_e(ti.id)}/retry">{_csrf_field(csrf)}<button>retry</button></form>'
    facts = [("state", f'<span id=state class="state {_e(ti.state)}">{_e(ti.state)}</span>'
              + (f" {_e(ti.error)}" if ti.error else "")),
             ("place", f"#{ti.position}, starts ~{_when(ti.estimated_start)}" if ti.position else ""),
             ("model", _e(ti.model_resolved or ti.model)), ("submitted", _when(ti.submitted_at)),
             ("started", _when(ti.started_at)), ("finished", _when(ti.finished_at)),
             ("cost", usd(ti.cost_usd) if ti.cost_usd is not None else ""), ("attempts", _e(ti.attempts))]
    rows = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in facts if v)
    return (f"<script>document.body.dataset.live='task'</script><h2>{_e(ti.title or ti.id)}</h2>"
            f"<p class=muted>{_e(ti.id)}</p><table>{rows}</table><p>{actions}</p>"
            f"<h3>Prompt</h3><div class=prompt>{md.render(ti.prompt or '')}</div><h3>Answer</h3>{answer or _no_answer(ti.state)}")


def _search_page(q: str, hits: list[Any]) -> str:
    """Finished tasks whose prompt, title, tags or answer hold every word (the CLI's search index)."""
    if not q:
        return "<p class=muted>Words to look for in the finished tasks' prompts, titles, tags and answers.</p>"
    rows = "".join(f'<tr><td class="state {_e(h.state)}">{_e(h.state)}</td><td><a href="/task/{_e(h.id)}">'
                   f"{_e(h.title or h.id)}</a><br><span class=muted>{_marked(h.snippet)}</span></td>"
                   f"<td>{_when(h.submitted_at)}</td></tr>" for h in hits)
    return (f"<h2>{len(hits)} found for “{_e(q)}”</h2>" +
            (f"<table id=hits><tr><th>state</th><th>task</th><th>submitted</th></tr>{rows}</table>" if hits else ""))


def _marked(snippet: str) -> str:
    """The index marks the words it found [like this]: bold them, the rest escaped."""
    return _e(snippet).replace("[", "<b>").replace("]", "</b>")


def _stats_page(st: Any) -> str:
    def table(title: str, data: dict[str, Any], money: bool = False) -> str:
        rows = "".join(f"<tr><td>{_e(k)}</td><td>{usd(v) if money else _e(v)}</td></tr>" for k, v in data.items())
        return f"<h3>{title}</h3><table>{rows or '<tr><td class=muted>none</td></tr>'}</table>"

    days = {d: ", ".join(f"{n} {s}" for s, n in sorted(by.items())) for d, by in sorted(st.by_day.items())}
    p50 = "-" if st.duration_p50_s is None else f"{st.duration_p50_s:.1f} s"
    p95 = "-" if st.duration_p95_s is None else f"{st.duration_p95_s:.1f} s"
    return (f"<h2>Stats</h2><p>{st.tasks} finished tasks; duration p50 {p50}, p95 {p95}</p>"
            + table("Tasks per day", days) + table("Cost per day", dict(sorted(st.cost_by_day.items())), True)
            + table("Cost per model", st.cost_by_model, True) + table("Failures by reason", st.failures))


def _no_answer(state: str) -> str:
    return f"<p class=muted>{'none' if state in api.FINISHED else 'none yet'}</p>"
