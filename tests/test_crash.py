"""kill -9 at every step of a task's life, hundreds of times, and the invariants that must survive it.

Each round submits a few tasks three ways (api.submit, a drop into inbox/, a foreign
file written into queued/), starts a daemon armed with SPOOLD_FAULT (SIGKILL the Nth
time it passes a named point of the write/move/finish/ledger path), or kills it from
outside at a random moment, or has the backend kill it mid-run. After every death the
visible spool must be whole; after a final clean run every task must be done exactly
once, with its own answer, and the rate limit must never have been exceeded.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from pathlib import Path

import pytest
from conftest import DaemonProc, executable, wait_for, worst_window, write_config
from loopfs import journaled_ext4

from spoold import api, spool
from spoold.task import parse_result, parse_task

POINTS = {  # point -> the range of N to draw from (how often a round passes it)
    "write:partial": 12, "write:staged": 12, "write:linked": 12, "rewrite:staged": 12,
    "move:before": 15, "move:after": 15, "rewrite:replaced": 6, "finish:result-written": 3, "ledger:locked": 8,
}
OUTSIDE = ("backend-running", "random-time")
PER_WINDOW, WINDOW_S = 3, 0.5

BACKEND = """#!/bin/sh
id="$SPOOLD_TASK_ID"
for f in "$CRASH_SPOOL"/done/*/"$id".result.md "$CRASH_SPOOL"/failed/"$id".result.md; do
  [ -e "$f" ] && echo "$id" >> "$CRASH_LOG/rerun-after-result"
done
# the start is in the running/ name, ID.N.YYYYmmddTHHMMSSfffZ@OWNER.md: as ISO
started=$(ls "$CRASH_SPOOL"/running | sed -n "s/^$id\\.[0-9]*\\.\\([0-9]\\{4\\}\\)\\([0-9][0-9]\\)\\([0-9][0-9]\\)T\\([0-9][0-9]\\)\\([0-9][0-9]\\)\\([0-9][0-9]\\)\\([0-9]\\{3\\}\\)Z@.*\\.md$/\\1-\\2-\\3T\\4:\\5:\\6.\\7Z/p" | head -n 1)
echo "$id $started" >> "$CRASH_LOG/starts"
rm "$CRASH_LOG/kill-on-run" 2>/dev/null && kill -9 $PPID
printf 'answer: '
cat
"""


def _token(text: str) -> str | None:
    for word in text.split():
        if word.startswith("crash-task-"):
            return word
    return None


def _visible_tasks(sp: spool.Spool) -> dict[str, list[tuple[str, Path]]]:
    """token -> [(state, task file)] over every state directory; every file must parse whole."""
    out: dict[str, list[tuple[str, Path]]] = {}
    dirs = [("queued", sp.dir("queued")), ("running", sp.dir("running"))]
    for state in spool.TERMINAL:
        dirs += [(state, d) for d in spool.terminal_dirs(sp, state)]
    for state, d in dirs:
        for name in os.listdir(d):
            p = d / name
            if not name.endswith(".md") or name.endswith(".result.md") or not p.is_file():
                continue
            tid = (spool.parse_queued_name(name) or spool.parse_running_name(name))
            tid = tid.task_id if tid else name[:-3]
            try:
                text = p.read_text(encoding="utf-8")
            except FileNotFoundError:
                continue  # moved on since the listing (a live daemon); a torn file would still fail below
            task = parse_task(text, task_id=tid)  # raises on a torn file
            token = _token(task.prompt)
            assert token and task.prompt == f"{token} please\n", f"half-written or altered task file {p}"
            out.setdefault(token, []).append((state, p))
    return out


def _check_whole(sp: spool.Spool) -> None:
    """What must hold at any instant, even right after a kill: no torn file, no task in two places."""
    for token, places in _visible_tasks(sp).items():
        assert len(places) == 1, f"{token} is in {places}"
    for state in ("done", "failed"):
        for d in spool.terminal_dirs(sp, state):
            for name in os.listdir(d):
                if name.endswith(".result.md"):
                    parse_result((d / name).read_text(encoding="utf-8"))  # whole, or it would not be visible


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("durability", ["full", "batch"])
def test_kill_9_at_every_step_loses_nothing(tmp_path: Path, stress: bool, durability: str) -> None:
    """Under group commit too (on the filesystem it is on for): a kill -9 leaves the page cache, so it loses
    nothing there either."""
    rounds = (500 if stress else 60) if durability == "full" else (200 if stress else 25)
    with contextlib.ExitStack() as stack:
        base = tmp_path
        if durability == "batch":
            base, _ = stack.enter_context(journaled_ext4(tmp_path))
        _kill_9_rounds(spool.open_spool(base / "spool"), tmp_path, rounds, durability)


def _kill_9_rounds(sp: spool.Spool, tmp_path: Path, rounds: int, durability: str) -> None:
    seed = int(os.environ.get("SPOOLD_CRASH_SEED", time.time_ns() % 10**9))
    print(f"\ncrash: seed {seed} (SPOOLD_CRASH_SEED={seed} replays the same kill points)")
    rng = random.Random(seed)
    log_dir = tmp_path / "log"
    log_dir.mkdir()
    backend = executable(tmp_path / "backend.sh", BACKEND)
    write_config(sp, backend="command", command=[str(backend)], max_requests=PER_WINDOW,
                 window_minutes=WINDOW_S / 60, concurrency=2, max_attempts=1000, retry_backoff_s=0.1,
                 scan_interval_s=0.2, grace_s=1, durability=durability)
    env = {"CRASH_SPOOL": str(sp.root), "CRASH_LOG": str(log_dir)}
    submitted: list[str] = []
    kills: dict[str, int] = {}

    def add(k: int) -> None:
        token, text = f"crash-task-{k}", f"crash-task-{k} please\n"
        how = k % 3
        if how == 0:
            api.submit(sp, text)
        elif how == 1:
            staging = sp.root.parent / f"drop-{k}.md"  # beside the spool: the same filesystem
            staging.write_text(text)
            os.rename(staging, sp.dir("inbox") / f"question {k}.md")
        else:  # a foreign tool writing straight into queued/
            staging = sp.root.parent / f"foreign-{k}.md"
            staging.write_text(f"---\npriority: high\n---\n{text}")
            os.rename(staging, sp.dir("queued") / f"from-a-tool-{k}.md")
        submitted.append(token)

    def all_terminal() -> bool:
        """From listings alone (cheap enough to poll): nothing waiting anywhere, one finished file per task."""
        waiting = [n for d in ("inbox", "queued", "running", "tmp") for n in os.listdir(sp.dir(d))
                   if not n.endswith(".cancel") and not n.startswith(".")]
        finished = sum(len([n for n in os.listdir(d) if n.endswith(".md") and not n.endswith(".result.md")])
                       for s in spool.TERMINAL for d in spool.terminal_dirs(sp, s))
        return not waiting and finished >= len(submitted)

    for r in range(rounds):
        for _ in range(3):
            add(len(submitted))
        how = rng.choice(list(POINTS) + list(OUTSIDE))
        fault_env = dict(env)
        if how in POINTS:
            fault_env["SPOOLD_FAULT"] = f"{how}:{rng.randint(1, POINTS[how])}"
        elif how == "backend-running":
            (log_dir / "kill-on-run").touch()
        d = DaemonProc(sp, fault_env)
        if how == "random-time":
            time.sleep(rng.uniform(0, 0.4))  # the point of this kill is that nobody chose it
            d.proc.send_signal(signal.SIGKILL)
        wait_for(lambda: d.proc.poll() is not None or all_terminal(), timeout=60, what=f"round {r} ({how})")
        if d.proc.poll() is None:
            how = "after draining"
            d.proc.send_signal(signal.SIGKILL)
        d.proc.wait()
        d._log.close()
        assert d.proc.returncode == -signal.SIGKILL, d.log
        assert "Traceback" not in d.log and "batch is off" not in d.log, d.log
        kills[how] = kills.get(how, 0) + 1
        (log_dir / "kill-on-run").unlink(missing_ok=True)
        _check_whole(sp)

    final = DaemonProc(sp, env)
    wait_for(all_terminal, timeout=120, what="every task to finish after the last restart")
    assert final.stop() == 0
    assert "Traceback" not in final.log, final.log

    tasks = _visible_tasks(sp)
    assert sorted(tasks) == sorted(submitted)  # nothing lost, nothing invented
    for token in submitted:
        [(state, path)] = tasks[token]  # exactly one file per task
        assert state == "done", (token, state, path)
        res = parse_result(spool.result_path_for(path.parent, path.name[:-3]).read_text())
        assert res.status == "done" and res.answer == f"answer: {token} please\n"
    n_results = sum(len([n for n in os.listdir(d) if n.endswith(".result.md")])
                    for s in spool.TERMINAL for d in spool.terminal_dirs(sp, s))
    assert n_results == len(submitted)  # no duplicate or stray result
    assert os.listdir(sp.dir("inbox")) == [] and spool.list_running(sp) == []
    assert os.listdir(sp.dir("tmp")) == []  # every staged write or intake claim was cleaned up
    assert not (log_dir / "rerun-after-result").exists(), "a task ran again after its result was written"

    stamps = []
    for line in (log_dir / "starts").read_text().splitlines():
        _, _, started = line.partition(" ")
        stamps.append(api.datetime.fromisoformat(started.strip("'\"").replace("Z", "+00:00")).timestamp())
    assert worst_window(stamps, WINDOW_S) <= PER_WINDOW, "the rate limit was exceeded"
    total = sum(kills.values())
    print(f"\ncrash: {total} kills survived over {len(submitted)} tasks, {len(stamps)} backend runs: {kills}")
    assert total == rounds
