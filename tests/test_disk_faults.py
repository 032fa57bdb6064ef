"""Disk full, read-only spool, clock jumps and a suspended daemon: it holds, says why, loses nothing, resumes.

The faults are injected into daemon subprocesses by tests/shim/sitecustomize.py: the
spool's write path raises ENOSPC or EROFS while a control file says so, and the wall
clock is shifted by the seconds another control file holds. Where the suite runs as root
(CI does), a spool on a small tmpfs is also filled for real.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    ECHO_COMMAND,
    ROOT,
    drop,
    results,
    start_one,
    terminal_files,
    wait_for,
    write_config,
)

from spoold import api, spool
from spoold.config import Settings
from spoold.errors import SpoolError
from spoold.task import parse_result

SHIM = Path(__file__).parent / "shim"
GATED = [sys.executable, "-c", """
import os, sys, time
prompt = sys.stdin.read()
log = os.environ["GATE_DIR"]
with open(os.path.join(log, "runs"), "a") as f:
    f.write(os.environ["SPOOLD_TASK_ID"] + "\\n")
while not os.path.exists(os.path.join(log, "go")):
    time.sleep(0.01)
print("answer: " + prompt.strip())
"""]


def shim_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"PYTHONPATH": os.pathsep.join([str(SHIM), str(ROOT)]), **extra}


def _runs(gate: Path) -> list[str]:
    p = gate / "runs"
    return p.read_text().split() if p.exists() else []


@pytest.mark.parametrize("err", ["ENOSPC", "EROFS"])
def test_full_or_read_only_spool_holds_every_task_where_it_was(sp, daemon, tmp_path, err) -> None:
    control = tmp_path / "disk"
    write_config(sp, backend="command", command=ECHO_COMMAND, scan_interval_s=0.5)
    d = daemon(sp, env=shim_env(tmp_path, SPOOLD_TEST_DISK=str(control)))
    control.write_text(err)
    queued = api.submit(sp, "submitted while the disk was full").id  # another process, whose writes still work
    drop(sp, "dropped.md", "dropped while the disk was full\n")
    wait_for(lambda: "cannot write to the spool" in d.log, what="the daemon to say why it holds")
    assert os.strerror(getattr(errno, err)) in d.log
    # It keeps trying and keeps everything where it was: inbox file back in inbox, task in queued/.
    wait_for(lambda: d.log.count("cannot record") == 0 and (sp.dir("inbox") / "dropped.md").exists()
             and not os.listdir(sp.dir("tmp")), what="the dropped file to stay in inbox/")
    assert spool.locate(sp, queued).state == "queued" and spool.list_running(sp) == []
    assert terminal_files(sp, "done") == [] and terminal_files(sp, "failed") == []
    assert d.proc.poll() is None and "Traceback" not in d.log
    assert d.log.count("cannot write to the spool") == 1  # said once, not once per retry

    control.unlink()
    wait_for(lambda: len(terminal_files(sp, "done")) == 2, what="both tasks once the disk has room")
    answers = sorted(parse_result(p.read_text()).answer for p in results(sp, "done"))
    assert answers == ["answer: dropped while the disk was full\n", "answer: submitted while the disk was full\n"]
    assert "writable again" in d.log and results(sp, "failed") == []
    assert d.stop() == 0


@pytest.mark.parametrize("err", ["ENOSPC", "EROFS"])
def test_answer_finished_while_the_disk_is_full_is_kept_until_it_can_be_written(sp, daemon, tmp_path, err) -> None:
    control, gate = tmp_path / "disk", tmp_path / "gate"
    gate.mkdir()
    write_config(sp, backend="command", command=GATED, scan_interval_s=0.5)
    d = daemon(sp, env=shim_env(tmp_path, SPOOLD_TEST_DISK=str(control), GATE_DIR=str(gate)))
    tid = api.submit(sp, "finish me").id
    wait_for(lambda: _runs(gate), what="the backend to start")
    control.write_text(err)
    (gate / "go").touch()  # the run finishes while nothing can be written
    wait_for(lambda: f"cannot record the outcome of {tid}" in d.log, what="the daemon to say it keeps the answer")
    assert spool.locate(sp, tid).state == "running" and d.proc.poll() is None
    control.unlink()
    wait_for(lambda: spool.locate(sp, tid).state == "done", what="the kept answer to land")
    _, answer = api.result(sp, tid)
    assert answer == "answer: finish me\n" and _runs(gate) == [tid]  # written, not run again
    assert d.stop() == 0 and "Traceback" not in d.log


def test_daemon_started_on_a_full_disk_waits_for_room(sp, daemon, tmp_path) -> None:
    control = tmp_path / "disk"
    control.write_text("ENOSPC")
    write_config(sp, backend="command", command=ECHO_COMMAND, scan_interval_s=0.5)
    tid = api.submit(sp, "waiting for room").id
    d = daemon(sp, env=shim_env(tmp_path, SPOOLD_TEST_DISK=str(control)))
    wait_for(lambda: "cannot write to the spool" in d.log, what="the hold")
    assert spool.locate(sp, tid).state == "queued" and d.proc.poll() is None
    control.unlink()
    wait_for(lambda: spool.locate(sp, tid).state == "done", what="done once there is room")
    assert d.stop() == 0


def test_submit_on_a_full_disk_is_a_clear_error(sp, monkeypatch) -> None:
    def full(*_: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(spool, "_write_tmp", full)
    with pytest.raises(SpoolError, match="No space left on device.*free space"):
        api.submit(sp, "q")
    assert not spool.list_queued(sp) and os.listdir(sp.dir("tmp")) == []


# ---- a really full filesystem ----------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs for the spool, so that "full" is the kernel's ENOSPC, not the shim's.

    Mounting needs root (as in CI); elsewhere the shim tests above cover the same paths.
    """
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(mnt)],
                              capture_output=True, text=True)
    except FileNotFoundError:
        pytest.skip("no mount(8) here")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)  # lazy: never fails the test on a busy mount


def _fill(path: Path) -> Path:
    """Write path until the filesystem says ENOSPC, in ever smaller pieces, so not one page is left."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        chunk = 1 << 20
        while chunk:
            try:
                os.write(fd, b"\0" * chunk)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                chunk //= 2
    finally:
        os.close(fd)
    with pytest.raises(OSError, match="No space left"):
        (path.parent / ".probe").write_bytes(b"x")  # really full: not even one more page
    return path


def test_a_really_full_filesystem_holds_every_task_and_resumes_when_freed(tiny_disk, daemon) -> None:
    sp = spool.open_spool(tiny_disk)
    write_config(sp, backend="command", command=ECHO_COMMAND, scan_interval_s=0.5)
    queued = api.submit(sp, "submitted before the disk filled").id
    (sp.dir("inbox") / "dropped.md").write_text("dropped before the disk filled\n")  # no daemon yet
    filler = _fill(tiny_disk / ".filler")
    d = daemon(sp)
    wait_for(lambda: "cannot write to the spool" in d.log, what="the daemon to say why it holds")
    assert "No space left on device" in d.log
    wait_for(lambda: (sp.dir("inbox") / "dropped.md").exists() and not os.listdir(sp.dir("tmp")),
             what="the dropped file to stay in inbox/ with nothing half-written")
    assert spool.locate(sp, queued).state == "queued" and spool.list_running(sp) == []
    assert terminal_files(sp, "done") == [] and terminal_files(sp, "failed") == []
    with pytest.raises(SpoolError, match="No space left on device"):  # a submit says so in one line
        api.submit(sp, "submitted while the disk was full")
    assert d.proc.poll() is None and "Traceback" not in d.log

    filler.unlink()
    wait_for(lambda: len(terminal_files(sp, "done")) == 2, what="both tasks once the disk has room")
    answers = sorted(parse_result(p.read_text()).answer for p in results(sp, "done"))
    assert answers == ["answer: dropped before the disk filled\n", "answer: submitted before the disk filled\n"]
    assert "writable again" in d.log and results(sp, "failed") == []
    assert d.stop() == 0 and "Traceback" not in d.log
    assert os.listdir(sp.dir("tmp")) == []


def test_an_answer_that_ends_on_a_really_full_filesystem_lands_once_there_is_room(tiny_disk, daemon,
                                                                                  tmp_path) -> None:
    gate = tmp_path / "gate"
    gate.mkdir()
    sp = spool.open_spool(tiny_disk)
    write_config(sp, backend="command", command=GATED, scan_interval_s=0.5)
    d = daemon(sp, env={"GATE_DIR": str(gate)})
    tid = api.submit(sp, "finish me").id
    wait_for(lambda: _runs(gate), what="the backend to start")
    filler = _fill(tiny_disk / ".filler")
    (gate / "go").touch()  # the run ends while nothing can be written
    wait_for(lambda: f"cannot record the outcome of {tid}" in d.log, what="the daemon to say it keeps the answer")
    assert spool.locate(sp, tid).state == "running" and d.proc.poll() is None
    filler.unlink()
    wait_for(lambda: spool.locate(sp, tid).state == "done", what="the kept answer to land")
    assert api.result(sp, tid)[1] == "answer: finish me\n" and _runs(gate) == [tid]  # written, not run again
    assert d.stop() == 0 and "Traceback" not in d.log


# ---- clock jumps and suspend ----------------------------------------------------------


def test_clock_going_back_stalls_one_window_not_the_size_of_the_jump(sp) -> None:
    s = Settings(max_requests=2, window_minutes=1)
    before = 1_000_000.0
    for t in (before, before + 1):
        start_one(sp, s, lambda _t: object(), now=lambda t=t: t)
    back = before - 3600  # the clock jumped back an hour
    _, g = start_one(sp, s, lambda _t: object(), now=lambda: back)
    assert g.wait_until == pytest.approx(back + 60)  # the future stamps count as now: one window
    claimed, g = start_one(sp, s, lambda _t: "ran", now=lambda: back + 61)
    assert claimed == "ran" and g.wait_until is None


def test_clock_going_forward_never_runs_a_task_twice(sp) -> None:
    s = Settings(max_requests=2, window_minutes=1)
    t0 = 1_000_000.0
    start_one(sp, s, lambda _t: object(), now=lambda: t0)
    start_one(sp, s, lambda _t: object(), now=lambda: t0)
    assert start_one(sp, s, lambda _t: object(), now=lambda: t0)[1].wait_until == t0 + 60
    claimed, _ = start_one(sp, s, lambda _t: "ok", now=lambda: t0 + 86_400)  # a day ahead
    assert claimed == "ok"


def test_daemon_keeps_the_limit_across_a_backward_clock_jump(sp, daemon, tmp_path) -> None:
    clock = tmp_path / "clock"
    window_s = 1.0
    write_config(sp, backend="command", command=ECHO_COMMAND, max_requests=2, window_minutes=window_s / 60)
    d = daemon(sp, env=shim_env(tmp_path, SPOOLD_TEST_CLOCK=str(clock)))
    for i in range(2):
        api.submit(sp, f"before {i}")
    wait_for(lambda: len(terminal_files(sp, "done")) == 2, what="two before the jump")
    clock.write_text("-3600")
    ids = [api.submit(sp, f"after {i}").id for i in range(4)]
    wait_for(lambda: all(spool.locate(sp, t).state == "done" for t in ids), timeout=30,
             what="tasks after the jump, within a few windows rather than an hour")
    assert d.stop() == 0 and "Traceback" not in d.log


def test_suspended_daemon_keeps_its_claim_and_nothing_runs_twice(sp, daemon, tmp_path) -> None:
    """A laptop lid: one daemon stopped (SIGSTOP) mid-run for longer than the window, another keeps serving."""
    gate = tmp_path / "gate"
    gate.mkdir()
    write_config(sp, backend="command", command=GATED, max_requests=3, window_minutes=0.5 / 60, scan_interval_s=0.2,
                 concurrency=2)
    a = daemon(sp, env={"GATE_DIR": str(gate)})
    first = api.submit(sp, "long one").id
    wait_for(lambda: _runs(gate) == [first], what="the first run")
    a.proc.send_signal(signal.SIGSTOP)
    try:
        b = daemon(sp, env={"GATE_DIR": str(gate)})
        (gate / "go").touch()
        later = [api.submit(sp, f"while suspended {i}").id for i in range(4)]
        wait_for(lambda: all(spool.locate(sp, t).state == "done" for t in later), what="the other daemon's work")
        assert spool.locate(sp, first).state == "running"  # still the sleeper's: never stolen, never rerun
    finally:
        a.proc.send_signal(signal.SIGCONT)
    wait_for(lambda: spool.locate(sp, first).state == "done", what="the resumed daemon to finish its task")
    runs = _runs(gate)
    assert sorted(runs) == sorted([first, *later]) and len(runs) == len(set(runs))
    assert a.stop() == 0 and b.stop() == 0
