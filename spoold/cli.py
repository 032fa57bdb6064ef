"""`spoold` commands: parse arguments, call the library, format output. No spool logic here."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NoReturn

from spoold import __version__, api, config, spool, syncrules, task
from spoold.errors import ConfigError, SpooldError

# One contract for result, wait, show, cancel and retry (the README's table); errors carry their own
# (spoold/errors.py: 2 bad input or spool, 5 no such task, 6 not allowed in the task's state).
EXIT_FAILED_TASK = 1
EXIT_CANCELLED = 3
EXIT_NOT_FINISHED = 4
EXIT_TIMEOUT = 124
STATE_EXIT = {"done": 0, "failed": EXIT_FAILED_TASK, "cancelled": EXIT_CANCELLED}


def _spool(args: argparse.Namespace, create: bool = False):

    return api.open_spool(config.spool_root(args.spool or getattr(args, "spool_first", None)), create=create)


def _task_id(sp: Any, args: argparse.Namespace, wait_s: float = 0.0) -> str:
    """The task the user named: an id, a prefix, its random part, a file name, or @last. A file still in the
    inbox is not a task yet: `wait` waits (up to `wait_s`) for the daemon to take it; the others say so."""
    from spoold.errors import NotTakenYet, TaskNotFound

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return spool.resolve_id(sp, args.id)
        except TaskNotFound:
            in_inbox = spool.inbox_path(sp, args.id).exists()
            if not in_inbox:
                raise
            if time.monotonic() >= deadline:
                raise NotTakenYet(f"{args.id} is still in the inbox: no daemon has taken it yet (`spoold run`)") from None
        time.sleep(0.1)


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def _line(ti: Any) -> str:
    eta = ""
    if ti.state == "queued" and ti.estimated_start:
        eta = f"  #{ti.position} starts ~{_local(ti.estimated_start)} (in {_dur(ti.estimated_wait_seconds)})"
    return f"{ti.id}  {ti.state:<9} {ti.model or '-':<8} {ti.title[:50]}{eta}"


def _dur(s: float | None) -> str:
    from spoold.terminal import duration

    return duration(s)


# ---- commands --------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    sp = _spool(args, create=True)
    opened = [d for d in (sp.root, *(sp.dir(s) for s in spool.STATES), sp.state_dir) if d.stat().st_mode & 0o077]
    for d in opened:  # readable by others: prompts and answers are private
        d.chmod(0o700)
    if opened and not args.json:
        print(f"made {len(opened)} spool directories private (0700): others could read your prompts and answers")
    synced = syncrules.write(sp, args.sync) if args.sync else []
    if args.json:
        _print_json({"spool": str(sp.root), "inbox": str(sp.dir("inbox")), "config": str(sp.config_path),
                     "format": spool.read_format(sp), **({"sync": synced} if args.sync else {})})
    else:
        for line in synced:
            print(line)
        print(f"spool ready at {sp.root}: drop Markdown files into {sp.dir('inbox')}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from spoold import daemon

    overrides = {"concurrency": args.concurrency, "max_requests": args.max_requests,
                 "window_minutes": args.window, "backend": args.backend, "claude_bin": args.claude_bin}
    return daemon.serve(_spool(args, create=True), overrides, once=args.once)


def cmd_submit(args: argparse.Namespace) -> int:

    sp = _spool(args, create=True)
    source = None
    if args.prompt == "-":
        text = _utf8(sys.stdin.buffer.read(), "standard input")
    elif args.prompt is not None and os.path.isfile(args.prompt) and not args.text:
        text = _utf8(Path(args.prompt).read_bytes(), args.prompt)
        source = Path(args.prompt).name
    elif args.prompt is not None and not args.text and _looks_like_a_path(args.prompt):
        raise SpooldError(f"no such file: {args.prompt} (to send these words as the prompt, add --text)")
    elif args.prompt is not None:
        text = args.prompt
    else:
        raise SpooldError("nothing to submit: give a prompt, a file, or - for stdin")
    more = {"resume": args.resume, "profile": args.profile, "effort": args.effort, "max_turns": args.max_turns,
            "max_budget_usd": args.max_budget, "fallback_model": args.fallback_model, "schema": args.schema}
    ti = api.submit(sp, text, model=args.model, priority=args.priority, system=args.system, title=args.title,
                    not_before=args.not_before, tags=args.tag or None, timeout=args.timeout, source=source,
                    slug_hint=source and Path(source).stem, options_=more)
    if args.wait:
        _no_daemon_hint(sp)
        return _finish_wait(sp, ti.id, args, None)
    if args.json:
        _print_json(ti.to_dict())
    else:
        print(ti.id)
        if ti.estimated_start:
            print(f"queued #{ti.position}, starts ~{_local(ti.estimated_start)} "
                  f"(in {_dur(ti.estimated_wait_seconds)})", file=sys.stderr)
            _no_daemon_hint(sp)
    return 0


def _utf8(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise SpooldError(f"{where} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                          "a prompt must be text") from None


def _looks_like_a_path(text: str) -> bool:
    """`./q.md`, `notes/plan.txt`: one word naming a file, not a question."""
    word = text.strip()
    return (bool(word) and "\n" not in word and " " not in word
            and (os.sep in word or word.lower().endswith((".md", ".markdown", ".txt"))))


def cmd_status(args: argparse.Namespace) -> int:

    st = api.status(_spool(args))
    if args.json:
        _print_json(st.to_dict())
        return 0
    c = st.counts
    print(f"spool {st.spool}")
    for d in st.daemons:
        where = "this host" if d["this_host"] else f"host {d['host']} (another machine: not checked from here)"
        print(f"  daemon pid {d['pid']} on {where}, serving since {_local(d['since'])}")
    if not st.serving:
        print("  no daemon is serving this spool on this host: queued tasks wait until `spoold run` starts one")
    for h in st.hosts if len(st.hosts) > 1 else []:  # a synced spool's hosts; a lone host is said above
        runs = f", running {', '.join(h['running'][:3])}" + (" ..." if len(h["running"]) > 3 else "") if h["running"] else ""
        state = "live" if h["live"] else "silent"
        print(f"  host {h['host']}: {state}, heartbeat {h['age_s']:.0f} s ago (lease {h['lease_s']:g} s, "
              f"running lease {h['running_lease_s']:g} s){runs}")
    print("  " + "  ".join(f"{k} {v}" for k, v in c.items()))
    s = st.settings
    print(f"  limit {s['max_requests']} per {s['window_minutes']:g} min, concurrency {s['concurrency']}"
          + (f", reserve {s['reserve']:.0%} of each subscription window" if s.get("reserve") is not None else ""))
    when = "" if st.serving else ", once a daemon runs"
    if st.held_until:
        print(f"  next start not before {_at(st.held_until)}{when}: {st.hold_reason}")
        if any(w in (st.hold_reason or "") for w in ("subscription", "logged in", "credit", "cannot start", "claude")):
            print("  (`spoold config --clear-hold` lifts it now, once the cause is fixed)")
    elif st.next_start and st.counts.get("queued"):
        print(f"  next start ~{_at(st.next_start)}{when}")
    for line in _window_lines(st.windows):
        print(line)
    for ti in st.running:
        print(f"  running {ti.id} {ti.title[:50]} (since {ti.started_at})")
    for target, why in st.notify_failing.items():
        print(f"  notifications to {target} are failing: {why}")
    if st.duplicates:
        print(f"  {st.duplicates} duplicate answer(s) from another host kept beside their task's answer (ID@HOST.result.md)")
    for left in st.leftovers[:5]:
        print(f"  sync leftover: {left}")
    if st.ignored_inbox_files:
        print(f"  inbox files that are not tasks (use .md or .txt): {', '.join(st.ignored_inbox_files[:5])}")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:

    sp = _spool(args)
    states = [s.strip() for s in args.state.split(",")] if args.state else None
    since = _since(args.since) if args.since else None
    filtered = bool(args.state or args.since or args.tag or args.model)
    if args.limit < 1:
        raise SpooldError("-n must be 1 or more")

    def rows() -> list[Any]:
        return api.recent(sp, limit=args.limit, states=states, since=since, tag=args.tag, model=args.model)

    if args.json:
        _print_json([t.to_dict() for t in rows()])
        return 0
    if not args.watch:
        _print_listing(sp, rows(), filtered)
        return 0
    from watchfiles import watch  # lazy: only the live view watches

    try:
        for _ in _changes(watch, sp):
            sys.stdout.write("\x1b[H\x1b[2J" if sys.stdout.isatty() else "\n")
            _print_listing(sp, rows(), filtered)
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    return 0


def _changes(watch: Any, sp: Any) -> Any:
    """Once at once, then once per burst of changes in the spool (or every 5 s, for the ETAs)."""
    yield None
    dirs = [sp.dir(s) for s in spool.COUNTED]
    yield from watch(*dirs, debounce=300, rust_timeout=5000, yield_on_timeout=True, recursive=True)


def _print_listing(sp: Any, items: list[Any], filtered: bool = False) -> None:
    from spoold import terminal

    color = terminal.use_color(sys.stdout)
    header = ["ID", "STATE", "MODEL", "SUBMITTED", "WHEN", "TITLE / WHY"]
    body = [[ti.id.split("-")[1], ti.state, ti.model or "-", terminal.ago(ti.submitted_at), _when(ti),
             (ti.error or ti.title) if ti.state in ("failed", "cancelled") else ti.title] for ti in items]
    for line in terminal.table(header, body, total=terminal.width(sys.stdout), color_col=1, color=color):
        print(line)
    waiting, serving = api.inbox(sp) if not filtered else ([], True)
    if not items and not waiting:
        print("no tasks match" if filtered else "no tasks yet: drop a Markdown file into the inbox, or "
              "`spoold submit \"a question\"`")
    if waiting:
        names = ", ".join(waiting[:5]) + (f" and {len(waiting) - 5} more" if len(waiting) > 5 else "")
        print(f"in the inbox, not taken in yet: {names}" + (
            "" if serving else " (no daemon is serving this spool on this host: `spoold run` takes them in)"))
    for line in _window_lines(api.windows(sp)):
        print(line)


def _when(ti: Any) -> str:
    """The column that says when: queued #N and in how long, the cost and time of a finished task."""
    from spoold.units import usd

    if ti.state == "queued":
        if ti.position and ti.estimated_wait_seconds is not None:
            return f"#{ti.position} in {_dur(ti.estimated_wait_seconds)}"
        return f"#{ti.position:,}" if ti.position else "queued"
    if ti.state == "running":
        return "running"
    if ti.state == "done":
        return " ".join(x for x in (_dur(ti.duration_s) if ti.duration_s is not None else "",
                                    usd(ti.cost_usd) if ti.cost_usd else "") if x)
    return ""


def _since(text: str, flag: str = "--since") -> Any:
    """`--since 2h`, `3d`, `30m`, or an ISO time."""
    import re
    from datetime import UTC, datetime, timedelta

    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw])", text.strip())
    if m:
        unit = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[m.group(2)]
        return datetime.now(UTC) - timedelta(seconds=float(m.group(1)) * unit)
    try:
        dt = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise SpooldError(f"{flag} {text}: use a time such as 2h, 3d or 2026-11-24T18:00Z") from None
    return (dt if dt.tzinfo else dt.astimezone()).astimezone(UTC)


def _window_lines(windows: list[Any]) -> list[str]:
    """What the subscription last said of each window, in words: `status` and `ls` both show it."""
    from spoold.units import window_words

    out = []
    for w in windows:
        used = f"{w.utilization:.0%} used" if w.utilization is not None else w.status.replace("_", " ")
        seen = f" (seen by {w.task_id.split('-')[1]})" if w.task_id and "-" in w.task_id else ""
        out.append(f"  subscription {window_words(w.name)} window: {used}, resets {_at(w.resets_at)}{seen}")
    return out


def _at(iso_time: str | None) -> str:
    """A time for people: local, with its zone, and how far off it is."""
    from datetime import UTC, datetime

    from spoold import terminal

    if not iso_time:
        return "?"
    left = (datetime.fromisoformat(iso_time.replace("Z", "+00:00")) - datetime.now(UTC)).total_seconds()
    return f"{terminal.local(iso_time)} ({'in ' + _dur(left) if left > 0 else 'now'})"


def cmd_show(args: argparse.Namespace) -> int:
    """The whole picture of one task, in words; --json for the record."""
    from spoold import terminal
    from spoold.units import usd

    sp = _spool(args)
    ti = api.info(sp, _task_id(sp, args))
    if args.json:
        _print_json(ti.to_dict())
        return 0
    state = ti.state + _eta(ti) + (f": {ti.error}" if ti.error and ti.state in ("failed", "cancelled", "queued") else "")
    rows = [("id", ti.id), ("state", state), ("title", ti.title),
            ("model", ti.model + (f" (answered by {ti.model_resolved})" if ti.model_resolved else "") if ti.model else None),
            ("priority", ti.priority), ("tags", ", ".join(ti.tags) or None),
            ("submitted", f"{terminal.local(ti.submitted_at)} ({terminal.ago(ti.submitted_at)})"),
            ("not before", terminal.local(ti.not_before) if ti.not_before else None),
            ("started", terminal.local(ti.started_at) if ti.started_at else None),
            ("finished", terminal.local(ti.finished_at) if ti.finished_at else None),
            ("took", ", ".join(x for x in (_dur(ti.duration_s) if ti.duration_s is not None else "",
                                            usd(ti.cost_usd) if ti.cost_usd is not None else "",
                                            f"{ti.input_tokens:,} tokens in, {ti.output_tokens:,} out"
                                            if ti.input_tokens is not None and ti.output_tokens is not None else "") if x)
             or None),
            ("attempts", str(ti.attempts) if ti.attempts else None),
            ("options", ", ".join(f"{k}: {_head(str(v), 60)}" for k, v in ti.options.items()) or None),
            ("warnings", "; ".join(ti.warnings) or None),
            ("prompt", _head(ti.prompt or "")),
            ("task file", ti.path), ("result file", ti.result_path)]
    for key, value in rows:
        if value:
            print(f"{key:>12}  {value}")
    for h in ti.history:  # the attempts that went back to the queue, and retries
        when = terminal.local(h["ended_at"]) if h.get("ended_at") else ""
        what = {"requeued": "back to the queue", "waited": "waited (not counted)", "retried": "retried"}[h["kind"]]
        print(f"{'attempt ' + str(h['attempt']):>12}  {what}{', ' + when if when else ''}"
              f"{': ' + h['reason'] if h.get('reason') else ''}")
    if ti.state == "done" and ti.answer_chars:
        answer = api.result(sp, ti.id)[1]
        print(f"{'answer':>12}  {_head(answer)}" + (f"  ({ti.answer_chars:,} characters: `spoold result {ti.id.split('-')[1]}`)"
                                                   if ti.answer_chars > 300 else ""))
    if ti.partial_answer:
        print(f"\nanswer so far:\n{ti.partial_answer}")
    return 0


def _head(text: str, limit: int = 300) -> str:
    """The start of a text on one line."""
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def cmd_result(args: argparse.Namespace) -> int:
    """Only the answer on stdout; why there is none (failed, cancelled, not finished) on stderr."""

    sp = _spool(args)
    task_id = _task_id(sp, args)
    if args.follow:
        _follow(sp, task_id, show=not args.json)
    ti = api.info(sp, task_id, with_estimate=True)
    if ti.state not in spool.TERMINAL:
        if args.json:
            _print_json({"info": ti.to_dict(), "answer": None})
        else:
            print(f"spoold: {task_id} is {ti.state}{_eta(ti)}; no answer yet (`spoold wait {args.id}`)", file=sys.stderr)
        return EXIT_NOT_FINISHED
    ti, res = api.info_and_result(sp, task_id, with_estimate=False)
    answer = api.answer_of(res)
    if args.json:
        meta = {k: v for k, v in api.result_fields(res).items() if v is not None}
        data = {"info": ti.to_dict(), "meta": meta, "answer": answer}
        if res is not None and res.structured:
            data["structured"] = api.structured(answer)
        _print_json(data)
    else:
        _write_answer(answer, raw=args.raw)
        if ti.state != "done":
            print(f"spoold: {task_id} {ti.state}: {ti.error or 'no reason recorded'}", file=sys.stderr)
    return STATE_EXIT[ti.state]


def _write_answer(answer: str, *, raw: bool = False) -> None:
    """On a terminal, the Markdown answer rendered (rich, which honours NO_COLOR); in a pipe, byte for byte."""
    if raw or not answer or not sys.stdout.isatty():
        sys.stdout.write(answer)
        return
    from rich.console import Console  # lazy: only a person at a terminal pays for it
    from rich.markdown import Markdown

    Console().print(Markdown(answer))


def _eta(ti: Any) -> str:
    return f" (#{ti.position}, starts ~{_local(ti.estimated_start)})" if ti.state == "queued" and ti.estimated_start else ""


def _local(iso_time: str | None) -> str:
    from spoold import terminal

    return terminal.local(iso_time)


def _no_daemon_hint(sp: Any) -> None:
    """Say, on stderr, what keeps the task from starting soon: no daemon serves the spool, or a hold is on
    (the wait goes on; a waiting person or script learns why at once, not when it gives up)."""
    if not api.serving(sp):
        print("spoold: no daemon is serving this spool: start one with `spoold run` (the task waits until then)",
              file=sys.stderr)
        return
    until, why = api.hold(sp)
    if why:
        print(f"spoold: every start waits until {_at(until)}: {why} (the task waits until then)", file=sys.stderr)


def _follow(sp: Any, task_id: str, *, show: bool = True, poll_s: float = 0.25) -> None:
    """Print a running task's answer as it grows, until the task ends. Then the final answer's rest, when the
    shown part is its start; when it is not (a schema task's JSON, or only the last turn), a rule and the
    whole answer. With `show=False` (--json) it only waits, and the caller prints the JSON."""

    shown = ""
    while (ti := api.info(sp, task_id, with_estimate=False)).state not in spool.TERMINAL:
        text = ti.partial_answer or ""
        if show and text.startswith(shown) and len(text) > len(shown):
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
        time.sleep(poll_s)
    if not shown:
        return  # the caller prints the answer as usual
    _, answer = api.result(sp, task_id)
    sys.stdout.write(answer[len(shown):] if answer.startswith(shown) else f"\n\n---\n{answer}")
    sys.stdout.flush()
    if ti.state != "done":
        print(f"spoold: {task_id} {ti.state}: {ti.error or 'no reason recorded'}", file=sys.stderr)
    raise SystemExit(STATE_EXIT[ti.state])


def _finish_wait(sp: Any, task_id: str, args: argparse.Namespace, timeout: float | None) -> int:

    ti = api.wait(sp, task_id, timeout)
    finished = ti.state in STATE_EXIT
    answer = api.result(sp, task_id)[1] if finished else None
    if args.json:
        data: dict[str, Any] = {"info": ti.to_dict(), "answer": answer}
        if answer and api.structured(answer) is not None:
            data["structured"] = api.structured(answer)
        _print_json(data)
    elif ti.state == "done":
        _write_answer(answer or "", raw=getattr(args, "raw", False))
    else:
        sys.stdout.write(answer or "")
        asked = getattr(args, "timeout", None)  # (the user's whole wait, not what was left of it for this part)
        why = ti.error if finished else f"still {ti.state}{_eta(ti)} after {_dur(asked if asked is not None else timeout)}"
        print(f"spoold: {task_id} {ti.state if finished else 'not finished'}: {why or 'no reason recorded'}",
              file=sys.stderr)
    return STATE_EXIT[ti.state] if finished else EXIT_TIMEOUT


def cmd_wait(args: argparse.Namespace) -> int:
    from spoold.errors import NotTakenYet

    sp = _spool(args)
    started = time.monotonic()
    try:
        task_id = _task_id(sp, args, wait_s=args.timeout if args.timeout is not None else 3600.0)
    except NotTakenYet as e:
        print(f"spoold: not finished: {e}", file=sys.stderr)
        return EXIT_TIMEOUT
    left = None if args.timeout is None else max(0.0, args.timeout - (time.monotonic() - started))
    if api.info(sp, task_id, with_estimate=False).state not in spool.TERMINAL:
        _no_daemon_hint(sp)
    return _finish_wait(sp, task_id, args, left)


def cmd_cancel(args: argparse.Namespace) -> int:

    sp = _spool(args)
    task_id = _task_id(sp, args)
    state = api.cancel(sp, task_id)
    if args.json:
        _print_json({"id": task_id, "state": state})
    else:
        print(f"{task_id} {state}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:

    sp = _spool(args)
    ti = api.retry(sp, _task_id(sp, args))
    if args.json:
        _print_json(ti.to_dict())
    else:
        print(f"{ti.id} queued again{_eta(ti)}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:

    changes = {"max_requests": args.max_requests, "window_minutes": args.window, "concurrency": args.concurrency,
               "min_interval_s": args.min_interval, "budget_day_usd": args.budget_day,
               "budget_month_usd": args.budget_month, "strategy": args.strategy, "reserve": args.reserve}
    changes = {k: v for k, v in changes.items() if v is not None}
    for pair in args.set_ or []:
        key, eq, value = pair.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set takes KEY=VALUE, such as default_model=opus (got {pair!r})")
        changes[key.strip()] = config.parse_value(value)
    for k in args.unset or []:
        changes[k] = None
    sp = _spool(args, create=True)
    before = config.as_dict(api.load_settings(sp)) if not args.unset else {}
    held = api.hold(sp)[0] if args.clear_hold else None
    if args.clear_hold:
        api.clear_hold(sp)
    settings = api.set_config(sp, changes)
    data = config.as_dict(settings)
    if args.json:
        _print_json(data)
        return 0
    if not changes and not args.clear_hold:
        sys.stdout.write(config.as_yaml(data))
        return 0
    for k in changes:
        was = f"{_yaml_value(before[k])} -> " if k in before else ""
        print(f"{k}: {was}{_yaml_value(data.get(k))}" + ("  (removed from config.yaml)" if changes[k] is None else ""))
    if args.clear_hold:
        until, why = api.hold(sp, settings)
        if not held:
            print("no hold to lift" + (f"; starts wait until {until}: {why}" if until else ""))
        elif not until:
            print("hold lifted: tasks start again now")
        else:
            print(f"hold lifted; starts still wait until {until}: {why} (a limit of your own, not a hold)")
    return 0


def cmd_notify(args: argparse.Namespace) -> int:
    """`notify test [TARGET]`: send a test message now, and say which targets took it."""
    sp = _spool(args)
    sent = api.notify_test(sp, args.target)
    if args.json:
        _print_json({k: {"sent": v is None, "error": v} for k, v in sent.items()})
    for name, why in sent.items():
        if not args.json:
            print(f"{name}: sent" if why is None else f"{name}: not sent: {why}")
    return 0 if all(v is None for v in sent.values()) else 1


def cmd_web(args: argparse.Namespace) -> int:
    """The local page: the queue live, the answers rendered, submit, cancel, retry, holds, limits, /metrics."""
    from spoold import web

    return web.serve(config.spool_root(args.spool or args.spool_first), host=args.host, port=args.port)


def cmd_search(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from spoold import terminal

    sp = _spool(args)
    if args.rebuild:
        n = api.rebuild_index(sp)
        print(f"index rebuilt from the spool: {n} finished tasks", file=sys.stderr)
        if not args.query:
            return 0
    if not args.query:
        raise SpooldError("search for some words: `spoold search rayleigh scattering`")
    states = [s.strip() for s in args.state.split(",")] if args.state else None
    hits = api.search(sp, " ".join(args.query), limit=args.limit, states=states,
                        since=_since(args.since) if args.since else None)
    if args.json:
        _print_json([asdict(h) for h in hits])
        return 0
    if not hits:
        print("no finished task matches", file=sys.stderr)
        return 0
    color = terminal.use_color(sys.stdout)
    rows = [[h.id.split("-")[1], h.state, terminal.ago(h.submitted_at), f"{h.title}: {h.snippet}"] for h in hits]
    for line in terminal.table(["ID", "STATE", "SUBMITTED", "TITLE: WHERE"], rows,
                               total=terminal.width(sys.stdout), color_col=1, color=color):
        print(line)
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from spoold import history
    from spoold.units import usd

    st = history.stats(_spool(args), _since(args.since) if args.since else None)
    if args.json:
        _print_json(asdict(st))
        return 0
    print(f"{st.tasks} finished task{'s' if st.tasks != 1 else ''}" + (f" submitted since {st.since}" if st.since else ""))
    for day, counts in st.by_day.items():
        cost = f"  {usd(st.cost_by_day[day])}" if day in st.cost_by_day else ""
        print(f"  {day}  " + "  ".join(f"{k} {v}" for k, v in sorted(counts.items())) + cost)
    for month, spent in st.cost_by_month.items():
        print(f"  cost in {month}: {usd(spent)}")
    for model, spent in st.cost_by_model.items():
        print(f"  cost by {model}: {usd(spent)}")
    if st.duration_p50_s is not None:
        print(f"  a done task took {_dur(st.duration_p50_s)} (median), {_dur(st.duration_p95_s)} (95th percentile)")
    for reason, n in list(st.failures.items())[:10]:
        print(f"  failed {n}x: {reason}")
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from spoold import history

    cutoff = _since(args.older_than, "--older-than")
    states = tuple(s.strip() for s in args.state.split(",")) if args.state else spool.TERMINAL
    out = history.prune(_spool(args), cutoff, states, dry_run=args.dry_run)
    if args.json:
        _print_json(asdict(out))
        return 0
    verb = "would remove" if out.dry_run else "removed"
    print(f"{verb} {len(out.task_ids)} task{'s' if len(out.task_ids) != 1 else ''} submitted before "
          f"{cutoff.isoformat(timespec='seconds')} ({', '.join(states)}), and {len(out.transcripts)} CLI transcript"
          f"{'s' if len(out.transcripts) != 1 else ''} of their conversations")
    if out.left:  # (a dropped directory holding another user's files): gone from every listing, not from disk
        print(f"spoold: {len(out.left)} could not be deleted (not yours to delete?) and stay in tmp/: "
              f"{', '.join(out.left[:3])}{' ...' if len(out.left) > 3 else ''}", file=sys.stderr)
        return 1
    return 0


def _yaml_value(v: Any) -> str:
    """One value as YAML writes it (null, true, fifo, [a, b]), not as Python does."""
    import yaml

    return yaml.safe_dump([v], default_flow_style=True, width=10**6).strip()[1:-1]


def cmd_mcp_config(args: argparse.Namespace) -> int:

    beside = Path(sys.executable).with_name("spoold-mcp")  # the script installed with this Python, not a shim
    exe = str(beside) if beside.exists() else shutil.which("spoold-mcp") or str(beside)
    root = str(config.spool_root(args.spool or args.spool_first).absolute())
    _print_json({"mcpServers": {"spoold": {"command": exe, "args": [], "env": {"SPOOLD_DIR": root}}}})
    return 0


# ---- parser ----------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line, like every other error, with where to look. `built_only`: this parser was
    built for one subcommand alone, and it was one."""

    built_only = False

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"spoold: {message} (see `{self.prog} --help`)\n")


class _Skipped:
    """A subcommand's parser not built this time: every call on it (add_argument, groups) does nothing."""

    def __getattr__(self, name: str) -> Any:
        return lambda *a, **k: self


def _wait_s(text: str) -> float:
    from spoold.units import seconds

    secs = seconds(text)
    if secs is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30, 90s or 10m")
    return secs


def _port(text: str) -> int:
    port = int(text) if text.isdigit() else -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (1 to 65535)")
    return port


def parser(only: str | None = None) -> _Parser:
    """The whole command line; with `only`, just that subcommand's part (a `spoold submit` need not
    build the other eighteen: 9 ms of its start-up)."""
    p = _Parser(prog="spoold", description="Run Claude prompts asynchronously through a filesystem spool.",
                epilog="Examples: spoold submit \"Why is the sky blue?\"; spoold ls; spoold wait @last. The spool is "
                       "$SPOOLD_DIR or ~/async; the README describes every command and the spool format.")
    p.add_argument("--version", action="version", version=f"spoold {__version__}")
    p.add_argument("--spool", dest="spool_first", metavar="DIR", help="spool directory, before or after the command "
                   "(default $SPOOLD_DIR or ~/async)")
    p.add_argument("--json", dest="json_first", action="store_true", help="machine-readable output (any command)")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--spool", help="spool directory (default $SPOOLD_DIR or ~/async)")
    common.add_argument("--json", action="store_true", help="machine-readable output")
    common.add_argument("-v", "--verbose", action="store_true", help="log more (debug lines)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(name: str, fn: Any, help_: str) -> argparse.ArgumentParser:
        if only is not None and name != only:
            return _Skipped()  # type: ignore[return-value]
        sp = sub.add_parser(name, parents=[common], help=help_, description=help_)  # type: ignore[list-item]
        sp.set_defaults(fn=fn)
        p.built_only = True
        return sp

    i = add("init", cmd_init, "create the spool directories")
    i.add_argument("--sync", choices=syncrules.TOOLS, help="also write this sync tool's rules for what stays on "
                   "each machine (.stignore, a Unison profile, an rsync filter, .sync-exclude.lst, Dropbox attributes)")
    r = add("run", cmd_run, "run the daemon")
    r.add_argument("--once", action="store_true", help="drain what can start now, then exit (for cron)")
    r.add_argument("--log-file", help="append the log to this file instead of stderr (for `spoold run &` and cron)")
    r.add_argument("-q", "--quiet", action="store_true", help="log only warnings and errors")
    r.add_argument("--concurrency", type=int,
                   help="tasks running at once on this machine, across its daemons (overrides config.yaml)")
    r.add_argument("--max-requests", type=int, help="task starts allowed per window (overrides config.yaml)")
    r.add_argument("--window", type=float, help="the window's length in minutes")
    r.add_argument("--backend", choices=config.BACKENDS, help="what runs a task")
    r.add_argument("--claude-bin", help="path of the claude executable")
    s = add("submit", cmd_submit, "queue a prompt (text, a file, or - for stdin)")
    s.add_argument("prompt", nargs="?", help="the prompt, a file to read it from, or - for stdin")
    s.add_argument("--text", action="store_true", help="treat PROMPT as text even if a file has that name")
    s.add_argument("-m", "--model", help="sonnet, opus, haiku or a full model id")
    s.add_argument("-p", "--priority", choices=list(spool.PRIORITIES)[::-1], help="default normal")
    s.add_argument("--system", help="text appended to Claude's system prompt")
    s.add_argument("--title", help="a short label for `spoold ls`")
    s.add_argument("--not-before", help="ISO time before which it must not start")
    s.add_argument("--tag", action="append", help="a tag (repeat for more)")
    s.add_argument("--timeout", help="stop it after this long: 600, 30m, 2h")
    s.add_argument("--resume", metavar="ID", help="continue an earlier task's conversation (id, prefix, @last ...)")
    s.add_argument("--profile", help="a profile of the spool's config.yaml (cwd, tools, ...)")
    s.add_argument("--schema", metavar="NAME.json|JSON", help="a JSON Schema the answer must match: inline, or a "
                   "file in the spool's schemas/")
    s.add_argument("--effort", choices=task.EFFORTS, help="how hard the model thinks")
    s.add_argument("--max-turns", type=int, help="a cap on agent turns")
    s.add_argument("--max-budget", type=float, metavar="USD", help="a spending cap for this task")
    s.add_argument("--fallback-model", help="a model to use when the main one is busy")
    s.add_argument("--wait", action="store_true", help="wait for the answer and print it")
    add("status", cmd_status, "queue counts, running tasks, holds")
    ls = add("ls", cmd_ls, "the newest tasks across states, newest first, with why a task failed")
    ls.add_argument("--state", help="only these states, e.g. failed or queued,running")
    ls.add_argument("--since", help="only tasks submitted since: 2h, 3d, or an ISO time")
    ls.add_argument("--tag", help="only tasks with this tag")
    ls.add_argument("--model", help="only tasks for this model (as asked for or as answered)")
    ls.add_argument("-n", "--limit", type=int, default=20, help="at most this many rows (default 20)")
    ls.add_argument("-w", "--watch", action="store_true", help="a live view: redrawn as the spool changes (Ctrl-C ends)")
    for name, fn, h in (("show", cmd_show, "everything about one task, with its answer so far while it runs"),
                        ("result", cmd_result, "print a task's answer"),
                        ("cancel", cmd_cancel, "cancel a queued or running task"),
                        ("retry", cmd_retry, "queue a failed or cancelled task again")):
        cmd = add(name, fn, h)
        cmd.add_argument("id", help="an id, its first characters, its random part, the dropped file's name, or @last")
        if name == "result":
            cmd.add_argument("-f", "--follow", action="store_true",
                             help="print the answer as it is written, until the task ends")
            cmd.add_argument("--raw", action="store_true", help="the answer's Markdown as written, even on a terminal")
    w = add("wait", cmd_wait, "wait for a task and print its answer; exit 0 done, 1 failed, 3 cancelled, 124 timeout")
    w.add_argument("id", help="an id, its first characters, its random part, the dropped file's name, or @last")
    w.add_argument("--timeout", type=_wait_s, help="give up after this long: 30, 90s, 10m (exit 124)")
    c = add("config", cmd_config, "read or change the spool's settings")
    c.add_argument("--max-requests", type=int, help="task starts allowed per window")
    c.add_argument("--window", type=float, help="the window's length in minutes")
    c.add_argument("--concurrency", type=int, help="tasks running at once on this machine, across its daemons")
    c.add_argument("--min-interval", type=float, help="seconds between starts")
    c.add_argument("--budget-day", type=float, help="USD per day")
    c.add_argument("--budget-month", type=float, help="USD per month")
    c.add_argument("--strategy", choices=config.STRATEGIES, help="dispatch order")
    c.add_argument("--reserve", type=float, help="share of each subscription window kept for you, e.g. 0.2")
    c.add_argument("--set", action="append", metavar="KEY=VALUE", dest="set_",
                   help="set any setting, e.g. --set default_model=opus --set timeout_s=3600 (VALUE is YAML)")
    c.add_argument("--unset", action="append", metavar="KEY", help="remove a setting from config.yaml")
    c.add_argument("--clear-hold", action="store_true", help="lift a usage-limit or login hold now")
    w = add("web", cmd_web, "serve a local page: the queue live, the answers, submit/cancel/retry, /metrics")
    w.add_argument("--host", default="127.0.0.1", help="address to bind (beyond 127.0.0.1 the page asks for a token)")
    w.add_argument("--port", type=_port, default=8465, help="port (default 8465)")
    no = add("notify", cmd_notify, "send a test message to the spool's notification targets")
    no.add_argument("action", choices=["test"], help="test: send one now")
    no.add_argument("target", nargs="?", help="one target of config.yaml's notify: (default: all of them)")
    se = add("search", cmd_search, "search the prompts, titles, tags and answers of finished tasks, best first")
    se.add_argument("query", nargs="*", help="words that must all appear")
    se.add_argument("--state", help="only these states, e.g. done or done,failed")
    se.add_argument("--since", help="only tasks submitted since: 7d, 24h, or an ISO time")
    se.add_argument("-n", "--limit", type=int, default=20, help="at most this many (default 20)")
    se.add_argument("--rebuild", action="store_true", help="throw the index away and build it again from the spool")
    st = add("stats", cmd_stats, "tasks per day and state, cost per day, month and model, durations, failures by reason")
    st.add_argument("--since", help="only tasks submitted since: 7d, 24h, or an ISO time")
    pr = add("prune", cmd_prune, "remove old finished tasks with their results and the CLI's transcripts of them")
    pr.add_argument("--older-than", required=True, help="submitted longer ago than this: 30d, 12h, or an ISO time")
    pr.add_argument("--state", help="only these finished states (default done,failed,cancelled)")
    pr.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    add("mcp-config", cmd_mcp_config, "print the Claude Desktop config entry for the MCP adapter")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = parser(only=argv[0]) if argv and not argv[0].startswith("-") else None
    if p is None or not p.built_only:  # no command first, or not one: the whole parser
        p = parser()
    args = p.parse_args(argv)
    args.json = getattr(args, "json", False) or args.json_first
    logging.Formatter.converter = time.gmtime  # the log's times are UTC, like the spool's files and JSON
    log_file = getattr(args, "log_file", None)
    try:
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO if args.fn is cmd_run and not args.quiet
            else logging.WARNING,  # other commands print what they did; the log's info lines are the daemon's
            format="%(asctime)s spoold: %(message)s", datefmt="%Y-%m-%dT%H:%M:%SZ",
            **({"filename": log_file} if log_file else {"stream": sys.stderr}),
        )
    except OSError as e:
        print(f"spoold: cannot write the log to {log_file}: {e.strerror}", file=sys.stderr)
        return 2
    for noisy in ("watchfiles", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("apprise").setLevel(logging.ERROR)  # a failed delivery is said once, by spoold, with what follows
    try:
        return args.fn(args)
    except SpooldError as e:
        print(f"spoold: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
