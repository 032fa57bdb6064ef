"""Spool format 1 → 2: a spool spoold 1 wrote (tests/fixtures/spool-v1) migrates on open, under kill -9 too."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ECHO_COMMAND, wait_for, write_config

from spoold import api, recovery, spool, transitions
from spoold.errors import SpoolError
from spoold.task import FORMAT1_KEYS, parse_text, split_frontmatter

FIXTURE = Path(__file__).parent / "fixtures" / "spool-v1"
IDS = {name: tid for tid in (
    "20261201T162315534Z-htcml3-fresh", "20261201T162315537Z-zudqgv-tried", "20261201T162315546Z-3haybj-running",
    "20261201T162315548Z-pqlej2-done", "20261201T162315552Z-ezy4zd-failed", "20261201T162315559Z-fvnzxc-cancelled",
    "20261201T162315561Z-deq734-bad") for name in [tid.rsplit("-", 1)[1]]}


def v1_spool(dest: Path) -> Path:
    """A copy of the format-1 fixture, its dead claim made this host's (as spoold 1 on this machine left it)."""
    shutil.copytree(FIXTURE, dest)
    for d in [dest, *(p for p in dest.rglob("*") if p.is_dir())]:
        d.chmod(0o700)
    for p in (dest / "running").iterdir():
        p.rename(p.with_name(p.name.replace("@HOSTID-", f"@{spool.host_id()}-")))
    return dest


def _bodies(root: Path) -> dict[str, bytes]:
    """Every task file's prompt (what follows the frontmatter), by relative path without the running/ owner."""
    out = {}
    for p in root.rglob("*.md"):
        if ".spoold" in p.parts or p.name.endswith(".result.md") or p.parent.name == "inbox":
            continue
        tid = next(t for t in IDS.values() if t in p.name)
        _, body, _ = split_frontmatter(p.read_text())
        out[tid] = body.encode()
    return out


def test_a_format_1_spool_migrates_on_open(tmp_path: Path) -> None:
    root = v1_spool(tmp_path / "spool")
    before = _bodies(root)
    bad_before = (root / "failed" / f"{IDS['bad']}.md").read_bytes()
    sp = api.open_spool(root)
    assert spool.read_format(sp) == 2 and not spool.needs_migration(sp)
    for p in root.rglob("*.md"):  # no task file keeps format 1's runtime keys
        if p.name.endswith(".result.md") or p.parent.name == "inbox" or ".spoold" in p.parts or IDS["bad"] in p.name:
            continue
        meta, _ = parse_text(p.read_text())
        assert not set(meta) & set(FORMAT1_KEYS), p
        assert meta["id"] in p.name
    assert _bodies(root) == before  # prompts byte for byte
    assert (root / "failed" / f"{IDS['bad']}.md").read_bytes() == bad_before  # bad input stays untouched
    [running] = spool.list_running(sp)
    assert (running.task_id, running.attempt, running.pid) == (IDS["running"], 1, 999999)
    tried = api.info(sp, IDS["tried"])
    assert (tried.state, tried.attempts, tried.error) == ("queued", 2, "transient error 2")
    assert api.info(sp, IDS["failed"]).attempts == 3 and api.info(sp, IDS["done"]).state == "done"
    assert api.info(sp, IDS["cancelled"]).state == "cancelled"
    assert api.open_spool(root) == sp and spool.read_format(sp) == 2  # opening again changes nothing


def test_the_migrated_spool_runs_with_its_counts_kept(tmp_path: Path, daemon) -> None:
    """The dead owner's claim is recovered as an interrupted attempt, `tried` makes its third and last attempt."""
    root = v1_spool(tmp_path / "spool")
    sp = api.open_spool(root)
    write_config(sp, backend="command", command=ECHO_COMMAND)
    d = daemon(sp)
    for name in ("fresh", "tried", "running"):
        wait_for(lambda n=name: api.info(sp, IDS[n]).state == "done", what=f"{name} done")
    wait_for(lambda: not (sp.dir("inbox") / "waiting.md").exists(), what="the waiting drop taken in")
    assert d.stop() == 0
    assert api.info(sp, IDS["tried"]).attempts == 3 and api.info(sp, IDS["running"]).attempts == 2
    _, answer = api.result(sp, IDS["fresh"])
    assert answer == "answer: A fresh question, never tried.\n"
    transitions.retry(sp, IDS["failed"])  # a format-1 failure retries like any other
    assert api.info(sp, IDS["failed"]).attempts == 0


def test_a_live_format_1_daemon_stops_the_migration(tmp_path: Path) -> None:
    root = v1_spool(tmp_path / "spool")
    (root / ".spoold" / "locks").mkdir(parents=True, mode=0o700)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import filelock, os, sys, time\n"
        f"l = filelock.FileLock({str(root / '.spoold' / 'locks')!r} + f'/{spool.host_id()}-{{os.getpid()}}.lock')\n"
        "l.acquire(); print('held', flush=True); time.sleep(60)\n")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(SpoolError, match=f"format 1 and a spoold daemon.*{holder.pid}.*stop it"):
            api.open_spool(root)
        assert spool.read_format(spool.open_spool(root, create=False)) is None  # nothing changed
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    assert spool.read_format(api.open_spool(root)) == 2  # once it is gone, the next open migrates


def _outcome(root: Path) -> dict[str, tuple[str, int, str | None, bytes]]:
    """Per task: state, attempts, last reason, and the task file's bytes (owner names and tmp/ aside)."""
    sp = spool.open_spool(root, create=False)
    out = {}
    for tid in IDS.values():
        ti = api.info(sp, tid, with_estimate=False)
        out[tid] = (ti.state, ti.attempts, ti.error, Path(ti.path).read_bytes())
    return out


def test_kill_9_at_any_point_of_the_migration_loses_nothing(tmp_path: Path) -> None:
    """Kill the migrating process at its 1st, 2nd, ... write, rename or fsync point (SPOOLD_FAULT=*:N), then
    open the spool again: every run ends in the same spool as a migration that was never interrupted."""
    reference = _outcome(Path(api.open_spool(v1_spool(tmp_path / "reference")).root))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent), os.environ.get("PYTHONPATH", "")])}
    opener = "import sys; from spoold import api; api.open_spool(sys.argv[1])"
    kills = 0
    for n in range(1, 400):
        root = v1_spool(tmp_path / f"run{n}")
        proc = subprocess.run([sys.executable, "-c", opener, str(root)], env={**env, "SPOOLD_FAULT": f"*:{n}"},
                              capture_output=True, text=True, timeout=60)
        if proc.returncode == 0:
            break  # the migration has fewer than n points: all were tried
        assert proc.returncode == -signal.SIGKILL, proc.stderr
        kills += 1
        assert spool.read_format(spool.open_spool(root, create=False)) in (None, 2)
        again = subprocess.run([sys.executable, "-c", opener, str(root)], env=env, capture_output=True, text=True,
                               timeout=60)
        assert again.returncode == 0, again.stderr
        assert _outcome(root) == reference, f"killed at point {n}"
        recovery.recover(spool.open_spool(root, create=False), max_attempts=3)
        assert not [p for p in (root / "tmp").iterdir()], f"killed at point {n}: tmp/ not cleaned"
        shutil.rmtree(root)
    assert kills >= 10, f"only {kills} kill points: the fault hook is not reached"
    print(f"\nmigration: killed at each of {kills} points, each finished by the next open")


def test_another_hosts_format_1_claim_stops_the_migration(tmp_path: Path) -> None:
    root = v1_spool(tmp_path / "spool")
    [mine] = (root / "running").iterdir()
    theirs = mine.with_name(mine.name.replace(f"@{spool.host_id()}-", "@desk-at-home-"))
    mine.rename(theirs)
    with pytest.raises(SpoolError, match="is being run by another host .desk-at-home"):
        api.open_spool(root)
    assert theirs.exists() and spool.read_format(spool.open_spool(root, create=False)) is None


def test_an_empty_format_1_spool_is_marked_once_no_format_1_daemon_serves_it(tmp_path: Path) -> None:
    root = tmp_path / "old"
    for d in ("inbox", "tmp", "queued", "running", "done", "failed", "cancelled", ".spoold"):
        (root / d).mkdir(parents=True, mode=0o700)
    root.chmod(0o700)
    assert spool.read_format(api.open_spool(root)) == 2
