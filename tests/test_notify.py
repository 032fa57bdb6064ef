"""Notifications, for real: Apprise delivering to a JSON webhook on 127.0.0.1, hooks run without a shell, retries
that survive a daemon's kill -9, one delivery per event with two daemons, and a task that cannot add an address."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import ECHO_COMMAND, ROOT, drop, terminal_files, wait_for, write_config

from spoold import api, config, intake, ledger, notify, spool


class Receiver:
    """A webhook on 127.0.0.1 that records every POST; `failing` answers 503 instead (and still records it)."""

    def __init__(self) -> None:
        self.posts: list[tuple[int, dict]] = []  # (status answered, JSON body)
        self.failing = False
        self.delay_s = 0.0  # a slow service: deliveries by two processes would overlap
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                time.sleep(receiver.delay_s)
                status = 503 if receiver.failing else 200
                receiver.posts.append((status, json.loads(body or b"{}")))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"json://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def delivered(self, path: str = "") -> list[dict]:
        return [body for status, body in self.posts if status == 200]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.server.shutdown()
    r.server.server_close()


def _outbox_empty(sp: spool.Spool) -> bool:
    return not [n for n in spool.notify_names(sp) if not n.endswith(".health")]


def test_the_rules_choose_targets_and_a_task_may_only_choose_among_them() -> None:
    s = config.Settings(notify={"phone": "ntfy://x/y", "team": "json://h/t"}, notify_on={"done": ["phone"]})
    assert notify.targets_for(s, "done") == ["phone"]
    assert notify.targets_for(s, "failed") == []  # a rule of its own replaces the defaults
    assert notify.targets_for(config.Settings(notify={"phone": "ntfy://x/y"}), "failed") == ["phone"]  # default: all
    assert notify.targets_for(s, "done", ["team"]) == ["team"] and notify.targets_for(s, "done", []) == []
    assert notify.targets_for(s, "held", ["team"]) == []  # a task chooses for its own end only


def test_a_dropped_file_cannot_add_an_address_or_a_target(sp: spool.Spool, receiver: Receiver) -> None:
    write_config(sp, notify={"phone": receiver.url})
    for name, value in (("url.md", "json://attacker.example/steal"), ("mail.md", "mailto://me@evil.example"),
                        ("unknown.md", "[pager]")):
        drop(sp, name, f"---\nnotify: {value}\n---\nq\n")
    drop(sp, "quiet.md", "---\nnotify: none\n---\nq\n")
    report = intake.scan(sp, default_model="sonnet", max_bytes=1 << 20, settings=api.load_settings(sp))
    reasons = [spool.result_path_for(sp.dir("failed"), tid).read_text() for tid in report.failed]
    assert len(report.failed) == 3 and len(report.queued) == 1
    assert sum("a task cannot add an address" in r for r in reasons) == 2
    assert any("`notify: pager` is not a notification target" in r for r in reasons)
    assert "notify: none" in Path(api.info(sp, report.queued[0]).path).read_text() and receiver.posts == []


def test_a_finished_task_reaches_the_webhook_and_the_hook_once(sp: spool.Spool, daemon, receiver: Receiver,
                                                               tmp_path: Path) -> None:
    seen = tmp_path / "hook.log"
    hook = [sys.executable, "-c", f"import os; open({str(seen)!r}, 'a').write("
            "os.environ['SPOOLD_TASK_ID'] + ' ' + os.environ['SPOOLD_STATE'] + '\\n')"]
    write_config(sp, backend="command", command=ECHO_COMMAND, notify={"team": receiver.url}, on_finish=hook,
                 notify_on={"done": ["team"]})
    d = daemon(sp)
    drop(sp, "sky.md", "---\ntitle: Sky colour\n---\nWhy is the sky blue?\n")
    [done] = wait_for(lambda: terminal_files(sp, "done"), what="done")
    tid = done.name[:-3]
    wait_for(lambda: receiver.delivered() and seen.exists() and _outbox_empty(sp), what="the webhook and the hook")
    bodies = receiver.delivered()
    assert len(bodies) == 1, bodies
    [body] = bodies
    assert body["title"] == "spoold: done: Sky colour" and tid in body["message"] and "answer:" in body["message"]
    assert seen.read_text() == f"{tid} done\n"
    assert d.stop() == 0 and len(receiver.posts) == 1  # and nothing more after a stop


def test_a_notification_that_fails_is_delivered_once_after_the_daemon_is_killed(
        sp: spool.Spool, daemon, receiver: Receiver, tmp_path: Path) -> None:
    """The webhook answers 503 and the hook fails until a file exists; the daemon is killed; then both work:
    each hears of the task exactly once."""
    receiver.failing = True
    ready, ran = tmp_path / "hook-may-run", tmp_path / "hook-ran"
    hook = [sys.executable, "-c", f"import os, sys; os.path.exists({str(ready)!r}) or sys.exit(1); "
            f"open({str(ran)!r}, 'a').write(os.environ['SPOOLD_TASK_ID'] + '\\n')"]
    write_config(sp, backend="command", command=ECHO_COMMAND, notify={"team": receiver.url},
                 notify_on={"done": ["team"]}, on_finish=hook)
    d = daemon(sp)
    tid = api.submit(sp, "tell me later").id
    wait_for(lambda: f"could not tell team about {tid}" in d.log, what="a failed delivery")
    assert "notifications to team are failing" in subprocess.run(
        [sys.executable, "-m", "spoold.cli", "status", "--spool", str(sp.root)], capture_output=True, text=True,
        cwd=ROOT).stdout
    wait_for(lambda: f"could not tell on_finish about {tid}" in d.log, what="a failed hook")
    d.stop(signal.SIGKILL)
    receiver.failing = False
    ready.touch()
    again = daemon(sp)  # takes the dead daemon's events over at once
    wait_for(lambda: receiver.delivered() and ran.exists() and _outbox_empty(sp), what="the delivery after the restart")
    assert [b["title"] for b in receiver.delivered()] == ["spoold: done: tell me later"]
    assert again.stop() == 0 and len(receiver.delivered()) == 1 and ran.read_text() == f"{tid}\n"


def test_two_daemons_tell_each_ending_once(sp: spool.Spool, daemon, receiver: Receiver) -> None:
    write_config(sp, backend="command", command=ECHO_COMMAND, notify={"team": receiver.url}, concurrency=2,
                 notify_on={"done": ["team"]})
    receiver.delay_s = 0.3
    first, second = daemon(sp), daemon(sp)
    ids = [api.submit(sp, f"task {i}").id for i in range(8)]
    wait_for(lambda: len(receiver.delivered()) >= 8 and _outbox_empty(sp), what="eight deliveries")
    assert first.stop() == 0 and second.stop() == 0
    told = sorted(next(i for i in ids if i in b["message"]) for b in receiver.delivered())
    assert told == sorted(ids)  # each once


def test_a_task_chooses_its_targets_and_a_failing_hook_never_fails_it(sp: spool.Spool, daemon, receiver: Receiver,
                                                                      tmp_path: Path) -> None:
    other = Receiver()
    try:
        write_config(sp, backend="command", command=ECHO_COMMAND, notify={"a": receiver.url, "b": other.url},
                     notify_on={"done": ["all"]}, on_finish=[sys.executable, "-c", "import sys; print('hook says no'); sys.exit(3)"])
        d = daemon(sp)
        drop(sp, "to-b.md", "---\nnotify: [b]\n---\nonly b\n")
        drop(sp, "quiet.md", "---\nnotify: none\n---\nnobody\n")
        wait_for(lambda: len(terminal_files(sp, "done")) == 2, what="both done")
        wait_for(lambda: other.delivered() and "hook" in d.log and "exited 3" in d.log, what="b told, the hook tried")
        assert [b["message"].split()[1] for b in other.delivered()] == ["done"] and receiver.posts == []
        assert "hook " in d.log and "hook says no" in d.log  # its output is logged
        assert d.stop() == 0
    finally:
        other.server.shutdown()
        other.server.server_close()


def test_a_hold_and_its_end_are_told(sp: spool.Spool, daemon, receiver: Receiver) -> None:
    write_config(sp, backend="command", command=ECHO_COMMAND, notify={"team": receiver.url}, scan_interval_s=0.5)
    settings = api.load_settings(sp)
    ledger.set_hold(sp, settings, time.time() + 3600, "usage limit reached (5-hour window)", {})
    api.submit(sp, "waits for the reset")
    d = daemon(sp)
    wait_for(lambda: [b for b in receiver.delivered() if b["title"] == "spoold: queue held"], what="held told")
    api.clear_hold(sp)
    os.utime(sp.dir("queued"))  # any change wakes the daemon; the clear itself is in the ledger
    wait_for(lambda: {b["title"] for b in receiver.delivered()} >= {"spoold: queue resumed", "spoold: queue drained"},
             what=f"resumed and drained told: {[b['title'] for b in receiver.delivered()]} {d.log}")
    held = next(b for b in receiver.delivered() if b["title"] == "spoold: queue held")
    assert "usage limit reached" in held["message"]
    assert d.stop() == 0


def test_notify_test_sends_now_and_names_a_missing_target(sp: spool.Spool, receiver: Receiver) -> None:
    ntfy = receiver.url.replace("json://", "ntfy://") + "/spoold-topic"  # an ntfy server's API, on the same receiver
    write_config(sp, notify={"team": receiver.url, "phone": ntfy})
    cli = [sys.executable, "-m", "spoold.cli", "--spool", str(sp.root), "notify", "test"]
    out = subprocess.run(cli, capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0 and sorted(out.stdout.splitlines()) == ["phone: sent", "team: sent"]
    assert {b["title"] for b in receiver.delivered()} == {"spoold: test"}
    assert [b.get("topic") for b in receiver.delivered()].count("spoold-topic") == 1  # ntfy's own payload
    receiver.posts.clear()
    missing = subprocess.run([*cli, "pager"], capture_output=True, text=True, cwd=ROOT)
    assert missing.returncode == 2 and missing.stderr.startswith("spoold: no notification target 'pager'")
    receiver.failing = True
    failed = subprocess.run([*cli, "team"], capture_output=True, text=True, cwd=ROOT)
    assert failed.returncode == 1 and failed.stdout.startswith("team: not sent: ")


def test_a_once_run_delivers_its_own_events_before_it_exits(sp: spool.Spool, receiver: Receiver) -> None:
    """`spoold run --once` from cron: the run's own ending and the drained queue are told before it exits."""
    write_config(sp, backend="command", command=ECHO_COMMAND, notify={"team": receiver.url})
    api.submit(sp, "from cron")
    subprocess.run([sys.executable, "-m", "spoold.cli", "run", "--once", "--spool", str(sp.root)], cwd=ROOT,
                   capture_output=True, check=True, timeout=60)
    assert {b["title"] for b in receiver.delivered()} == {"spoold: done: from cron", "spoold: queue drained"}
    assert _outbox_empty(sp)
