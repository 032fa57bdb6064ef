"""Group commit (`durability: batch`) against a real power cut: the spool on an ext4 loop device, whose
backing image is copied while the daemon is frozen. The copy holds only what the filesystem had sent
to its device (what a disk keeps when the power goes); every write still in the page cache is lost.

Mounted with `commit=60`, ext4 writes nothing on its own during the test: only the daemon's group
commits reach the device. Each copy is then mounted where the spool was, a daemon recovers it and
runs what is left, and the promises are checked: no task lost, no finished task run again, and no
more undone than the last commit interval. Needs root and a loop device; skipped elsewhere.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
from conftest import DaemonProc, executable, wait_for, write_config
from loopfs import journaled_ext4, mount, unavailable, unmount

from spoold import durability as durability_mod
from spoold import spool

TASKS, SNAPSHOTS, INTERVAL_MS = 240, 5, 50
BACKEND = """#!/bin/sh
id="$SPOOLD_TASK_ID"
for f in "$PC_SPOOL"/done/*/"$id".result.md; do
  [ -e "$f" ] && echo "$id" >> "$PC_LOG/rerun-after-result"
done
echo "$id start $(date +%s.%N)" >> "$PC_LOG/events"
printf 'answer: '
cat
echo "$id end $(date +%s.%N)" >> "$PC_LOG/events"
"""
pytestmark = pytest.mark.skipif(unavailable() is not None, reason=unavailable() or "")


def _frozen(pid: int) -> bool:
    """Every thread of the process stopped (one inside a syscall stops only when the syscall returns)."""
    try:
        states = [Path(f"/proc/{pid}/task/{t}/stat").read_text().rsplit(")", 1)[1].split()[0]
                  for t in os.listdir(f"/proc/{pid}/task")]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return all(s in "tT" for s in states)


def _events(log: Path) -> list[tuple[str, str, float]]:
    try:
        lines = (log / "events").read_text().splitlines()
    except FileNotFoundError:
        return []
    return [(i, kind, float(t)) for i, kind, t in (line.split() for line in lines if len(line.split()) == 3)]


def _done_ids(sp: spool.Spool) -> set[str]:
    out = set()
    for d in spool.terminal_dirs(sp, "done"):
        out |= {n[: -len(".result.md")] for n in os.listdir(d) if n.endswith(".result.md")}
    return out


def _all_done(sp: spool.Spool) -> bool:
    waiting = [n for d in ("inbox", "queued", "running") for n in os.listdir(sp.dir(d)) if not n.startswith(".")]
    return not waiting and len(_done_ids(sp)) >= TASKS


@pytest.mark.parametrize("durability", ["batch", "full"])
def test_a_power_cut_undoes_at_most_the_last_commit_and_loses_no_task(tmp_path: Path, durability: str) -> None:
    """batch: at most the last interval is undone; full: nothing a task's result had reached the disk for."""
    rng = random.Random(int(os.environ.get("SPOOLD_CRASH_SEED", time.time_ns() % 10**9)))
    snaps: list[tuple[Path, float]] = []
    log = tmp_path / "log"
    log.mkdir()
    backend = executable(tmp_path / "backend.sh", BACKEND)
    env = {"PC_LOG": str(log)}
    with journaled_ext4(tmp_path, 64) as (mnt, image):
        root = mnt / "spool"
        env["PC_SPOOL"] = str(root)
        assert durability_mod.problem(root) is None  # group commit is on here
        sp = spool.open_spool(root)
        write_config(sp, backend="command", command=[str(backend)], concurrency=2, max_requests=1_000_000,
                     durability=durability, commit_interval_ms=INTERVAL_MS, scan_interval_s=0.5, grace_s=1)
        for k in range(TASKS):  # every task durable before the daemon starts: losing one would be ours
            (sp.dir("inbox") / f"power-task-{k:03d}.md").write_text(f"power-task-{k:03d}\n")
        os.sync()
        d = DaemonProc(sp, env)
        try:
            for k in range(SNAPSHOTS):
                time.sleep(rng.uniform(0.15, 0.5))
                cut = time.time()  # a run that ends after this is not counted as undone
                d.proc.send_signal(signal.SIGSTOP)
                wait_for(lambda: _frozen(d.proc.pid), what="the daemon frozen")
                (mnt / f"unsynced-{k}").write_text("only in the page cache")  # must not be on the copy
                snap = tmp_path / f"cut-{k}.img"
                shutil.copyfile(image, snap)  # the disk as it is: the page cache's writes are not on it
                snaps.append((snap, cut))
                d.proc.send_signal(signal.SIGCONT)
            wait_for(lambda: _all_done(sp), timeout=120, what="the first run to finish")
        finally:
            d.proc.send_signal(signal.SIGCONT)
            d.stop()
            if d.proc.poll() is None:
                d.proc.kill()
                d.proc.wait()
        assert d.proc.returncode == 0 and "Traceback" not in d.log and "batch is off" not in d.log, d.log
    first_run = _events(log)
    (log / "events").rename(log / "events-first-run")

    undone_total, report = 0, []
    for k, (snap, cut) in enumerate(snaps):
        mnt = tmp_path / "mnt"
        mount(snap, mnt)  # at the same path, as after a reboot; the mount replays ext4's journal
        r = None
        try:
            assert not (mnt / f"unsynced-{k}").exists(), "the copy kept a write that was only in the page cache"
            sp = spool.open_spool(root, create=False)
            done_at_cut = _done_ids(sp)
            ended = {i: t for i, kind, t in first_run if kind == "end" and t < cut}
            undone = {i: t for i, t in ended.items() if i not in done_at_cut}
            undone_total += len(undone)
            # at most the last interval is undone (with room for the result's write after the command's end)
            oldest_undone = cut - min(undone.values()) if undone else 0.0
            bound = 1.0 if durability == "batch" else 0.5  # full: only runs whose result was not yet written
            assert oldest_undone < bound, f"cut {k}: a task that ended {oldest_undone:.3f} s before the cut was undone"
            r = DaemonProc(sp, env)
            wait_for(lambda: _all_done(sp), timeout=120, what=f"recovery of cut {k} to finish")
            assert r.stop() == 0
            assert "Traceback" not in r.log, r.log
            rerun = {i for i, kind, _ in _events(log) if kind == "start"}
            assert not rerun & done_at_cut, f"cut {k}: finished tasks ran again: {sorted(rerun & done_at_cut)[:3]}"
            assert not (log / "rerun-after-result").exists(), f"cut {k}: a task ran again beside its result"
            done = _done_ids(sp)
            assert len(done) == TASKS, f"cut {k}: {TASKS - len(done)} tasks lost"
            for dd in spool.terminal_dirs(sp, "done"):
                for n in os.listdir(dd):
                    if n.endswith(".result.md"):
                        assert "answer: power-task-" in (dd / n).read_text(), f"cut {k}: {n} is not a whole answer"
            assert sum(len(os.listdir(x)) for x in spool.terminal_dirs(sp, "failed")) == 0
            report.append(f"cut {k}: {len(done_at_cut)} done on disk, {len(undone)} undone "
                          f"(oldest {oldest_undone * 1000:.0f} ms before the cut), {len(rerun)} run again")
        finally:
            if r is not None and r.proc.poll() is None:
                r.proc.kill()
                r.proc.wait()
            (log / "events").unlink(missing_ok=True)
            unmount(mnt)
            snap.unlink()
    print(f"\npower cut ({durability}):\n" + "\n".join(report))
    if durability == "batch":
        assert undone_total > 0, "no cut lost anything: the copies did not discard the page cache"
