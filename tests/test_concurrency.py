"""Many writers, several daemons, one spool: every task runs exactly once, every result lands, the limit holds."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from conftest import (
    ROOT,
    drop,
    executable,
    results,
    terminal_files,
    wait_for,
    worst_window,
    write_config,
)

from spoold import api, spool
from spoold.task import parse_result, parse_task

WRITERS = 50
PER_WINDOW, WINDOW_S = 60, 1.0
BACKEND = """#!/bin/sh
id="$SPOOLD_TASK_ID"
# the start is in the running/ name, ID.N.YYYYmmddTHHMMSSfffZ@OWNER.md: as ISO
started=$(ls "$CONC_SPOOL"/running | sed -n "s/^$id\\.[0-9]*\\.\\([0-9]\\{4\\}\\)\\([0-9][0-9]\\)\\([0-9][0-9]\\)T\\([0-9][0-9]\\)\\([0-9][0-9]\\)\\([0-9][0-9]\\)\\([0-9]\\{3\\}\\)Z@.*\\.md$/\\1-\\2-\\3T\\4:\\5:\\6.\\7Z/p" | head -n 1)
prompt=$(cat)
echo "$prompt $started" >> "$CONC_LOG/runs"
echo "answer: $prompt"
"""
# One writer process: drops into inbox/ (some written in place, some renamed in), `spoold submit`
# through the CLI's own entry point, or a foreign tool writing straight into queued/.
WRITER = r"""
import os, sys
from pathlib import Path
from spoold import cli
root, kind, first, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
for k in range(first, first + count):
    text = f"conc-{k}\n"
    if kind == "inbox":
        if k % 2:
            with open(root / "inbox" / f"drop {k}.md", "w") as f:  # written in place, in two steps
                f.write(text[:3]); f.flush(); f.write(text[3:])
        else:
            tmp = root.parent / f".w{k}"
            tmp.write_text(text)
            os.rename(tmp, root / "inbox" / f"drop {k}.md")
    elif kind == "submit":
        assert cli.main(["submit", "--spool", str(root), text]) == 0
    else:
        with open(root / "queued" / f"tool-{k}.md", "w") as f:
            f.write(text)
"""


def test_fifty_writers_three_daemons_every_task_exactly_once(sp, daemon, tmp_path, stress) -> None:
    per_writer = 40 if stress else 8
    n = WRITERS * per_writer
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    backend = executable(tmp_path / "backend.sh", BACKEND)
    write_config(sp, backend="command", command=[str(backend)], max_requests=PER_WINDOW,
                 window_minutes=WINDOW_S / 60, concurrency=3, scan_interval_s=1)
    env = {"CONC_SPOOL": str(sp.root), "CONC_LOG": str(log_dir)}
    daemons = [daemon(sp, env=env) for _ in range(3)]
    t0 = time.monotonic()
    kinds = ("inbox", "submit", "queued")
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(sp.root), kinds[i % 3], str(i * per_writer),
                                 str(per_writer)], cwd=ROOT) for i in range(WRITERS)]
    # and a few real `spoold submit` processes on top
    extra = [subprocess.Popen([sys.executable, "-m", "spoold.cli", "submit", "--spool", str(sp.root), f"conc-{n + i}"],
                              cwd=ROOT, stdout=subprocess.DEVNULL) for i in range(5)]
    n += len(extra)
    assert all(p.wait(120) == 0 for p in writers + extra)
    wait_for(lambda: len(terminal_files(sp, "done")) + len(terminal_files(sp, "failed")) >= n, timeout=240,
             what=f"{n} tasks to finish")
    elapsed = time.monotonic() - t0
    for d in daemons:
        assert d.stop() == 0
        assert "Traceback" not in d.log, d.log

    runs = (log_dir / "runs").read_text().splitlines()
    ran = [line.split()[0] for line in runs]
    assert len(ran) == n and set(ran) == {f"conc-{k}" for k in range(n)}  # each exactly once
    assert terminal_files(sp, "failed") == []
    answers = sorted(parse_result(p.read_text()).answer for p in results(sp, "done"))
    assert answers == sorted(f"answer: conc-{k}\n" for k in range(n))  # every result landed, whole
    for p in terminal_files(sp, "done"):  # and each beside its own task
        t = parse_task(p.read_text(), task_id=p.name[:-3])
        assert parse_result(spool.result_path_for(p.parent, t.id).read_text()).answer == f"answer: {t.prompt.strip()}\n"
    stamps = [api.datetime.fromisoformat(line.split()[1].strip("'\"").replace("Z", "+00:00")).timestamp()
              for line in runs]
    assert worst_window(stamps, WINDOW_S) <= PER_WINDOW
    assert os.listdir(sp.dir("inbox")) == [] and not spool.list_queued(sp) and spool.list_running(sp) == []
    assert os.listdir(sp.dir("tmp")) == []
    shared = sum(1 for d in daemons if "spoold: running " in d.log)
    print(f"\nconcurrency: {n} tasks from {WRITERS + len(extra)} writers through 3 daemons in {elapsed:.1f} s; "
          f"{shared} daemons ran tasks")


def test_a_second_daemon_waits_while_the_first_fills_the_concurrency(sp, daemon, tmp_path) -> None:
    """Spool-wide concurrency reached by another daemon's task: wait (this used to crash on an infinite time)."""
    gate = tmp_path / "go"
    sleeper = [sys.executable, "-c", f"import os, sys, time\nsys.stdin.read()\nwhile not os.path.exists({str(gate)!r}):"
               "\n    time.sleep(0.01)\nprint('ok')"]
    write_config(sp, backend="command", command=sleeper, concurrency=1)
    a = daemon(sp)
    first = api.submit(sp, "one").id
    wait_for(lambda: spool.list_running(sp), what="the first run")
    b = daemon(sp)
    second = api.submit(sp, "two").id
    wait_for(lambda: "waiting until a running task ends" in b.log or "waiting until a running task ends" in a.log,
             what="a daemon to say it waits for the running task")
    assert spool.locate(sp, second).state == "queued" and b.proc.poll() is None
    gate.touch()
    wait_for(lambda: all(spool.locate(sp, t).state == "done" for t in (first, second)), what="both done")
    assert a.stop() == 0 and b.stop() == 0 and "Traceback" not in a.log + b.log


def test_slow_writer_is_not_taken_until_complete(sp, daemon) -> None:
    from conftest import ECHO_COMMAND

    write_config(sp, backend="command", command=ECHO_COMMAND)
    daemon(sp)
    text = "---\ntitle: slow\n---\nwritten one byte at a time\n"
    with open(sp.dir("inbox") / "slow.md", "w") as f:
        for ch in text:
            f.write(ch)
            f.flush()
            time.sleep(0.05)  # the writer's pace is the thing under test
            assert (sp.dir("inbox") / "slow.md").exists()  # never taken while open for writing
    [done] = wait_for(lambda: terminal_files(sp, "done"), what="the slow file, once closed")
    t = parse_task(done.read_text(), task_id=done.name[:-3])
    assert t.prompt == "written one byte at a time\n" and t.title == "slow"


def test_same_name_again_and_again_and_identical_prompts_are_separate_tasks(sp, daemon) -> None:
    from conftest import ECHO_COMMAND

    write_config(sp, backend="command", command=ECHO_COMMAND, max_requests=100)
    daemon(sp)
    for i in range(10):
        wait_for(lambda: not (sp.dir("inbox") / "same.md").exists(), what="the name to be free again")
        drop(sp, "same.md", f"same name, drop {i}\n")
    ids: list[str] = []
    threads = [threading.Thread(target=lambda: ids.append(api.submit(sp, "identical prompt").id)) for _ in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(ids)) == 10
    wait_for(lambda: len(terminal_files(sp, "done")) == 20, what="20 separate tasks")
    answers = sorted(parse_result(p.read_text()).answer for p in results(sp, "done"))
    assert answers == sorted([f"answer: same name, drop {i}\n" for i in range(10)] + ["answer: identical prompt\n"] * 10)
