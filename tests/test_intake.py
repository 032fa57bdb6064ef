"""Inbox intake: what is ignored, what is taken, what is moved aside and why."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import pytest
from conftest import dead_pid, drop, results, terminal_files

from spoold import intake, recovery, spool, transitions
from spoold.task import parse_result, parse_task

IGNORED = [".q.md.swp", ".q.md.swx", "q.md~", "4913", ".#q.md", "#q.md#", ".q.md.Ab12Cd", ".syncthing.q.md.tmp",
           ".DS_Store", "~$report.md", ".~lock.q.md#", "q.md.part", "q.md.crdownload", ".dropbox.cache", "q.md.tmp"]
TAKEN = ["q.md", "q.txt", "Q.MARKDOWN", "q.sync-conflict-20261124-101010-ABCDEFG.md",
         "q (Jane's conflicted copy 2026-11-24).md", "q (conflicted copy 2026-11-24).txt"]


def scan(sp: spool.Spool) -> intake.IntakeReport:
    return intake.scan(sp, default_model="sonnet", max_bytes=1024)


@pytest.mark.parametrize("name", IGNORED)
def test_ignore_rules(name: str) -> None:
    assert intake.is_ignored(name)


@pytest.mark.parametrize("name", TAKEN)
def test_tasks_and_sync_conflict_copies_are_taken(name: str) -> None:
    assert intake.is_task_name(name)


def test_ignored_files_are_never_touched(sp: spool.Spool) -> None:
    for name in IGNORED + ["notes.pdf"]:
        (sp.dir("inbox") / name).write_text("x")
    report = scan(sp)
    assert report.queued == [] and report.failed == []
    assert sorted(os.listdir(sp.dir("inbox"))) == sorted(IGNORED + ["notes.pdf"])
    assert intake.ignored_files(sp) == ["notes.pdf"]


def test_conflict_copies_become_separate_tasks(sp: spool.Spool) -> None:
    for name in TAKEN:
        drop(sp, name, f"prompt from {name}\n")
    report = scan(sp)
    assert len(report.queued) == len(TAKEN) and os.listdir(sp.dir("inbox")) == []
    sources = set()
    for e in spool.list_queued(sp):
        t = parse_task((sp.dir("queued") / e.name).read_text(), task_id=e.task_id)
        assert t.prompt == f"prompt from {t.source}\n"
        sources.add(t.source)
    assert sources == set(TAKEN)


def test_same_name_dropped_again_and_again_is_never_merged(sp: spool.Spool) -> None:
    for _ in range(5):
        drop(sp, "same.md", "same prompt\n")
        assert len(scan(sp).queued) == 1
    assert len(spool.list_queued(sp)) == 5


def test_writer_still_open_is_not_taken(sp: spool.Spool) -> None:
    path = sp.dir("inbox") / "slow.md"
    f = open(path, "w")
    f.write("half a pro")
    f.flush()
    assert intake.writer_open(path) is True
    report = scan(sp)
    assert report.pending == ["slow.md"] and report.queued == []
    f.write("mpt\n")
    f.close()
    assert intake.writer_open(path) is False
    assert len(scan(sp).queued) == 1
    e = spool.list_queued(sp)[0]
    assert parse_task((sp.dir("queued") / e.name).read_text(), task_id=e.task_id).prompt == "half a prompt\n"


def _failed_message(sp: spool.Spool) -> str:
    [r] = results(sp, "failed")
    return parse_result(r.read_text()).error or ""


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\xff\xfe bad bytes", "not UTF-8"),
        (b"---\nmodel: [x\n---\nq", "line 3"),
        (b"", "prompt is empty"),
        (b"a\0b", "NUL"),
        (b"x" * 2000, "limit is 1,024"),
        (b"---\nmodel: opus --dangerously-skip-permissions\n---\nhi", "not a model name"),
    ],
)
def test_bad_files_move_to_failed_with_a_reason(sp: spool.Spool, content: bytes, message: str) -> None:
    drop(sp, "bad.md", content)
    report = scan(sp)
    assert len(report.failed) == 1 and os.listdir(sp.dir("inbox")) == []
    assert message in _failed_message(sp)
    [kept] = terminal_files(sp, "failed")
    assert kept.read_bytes() == content  # the user's file is kept untouched


def test_symlink_is_moved_aside_never_followed(sp: spool.Spool, tmp_path) -> None:
    secret = tmp_path / "secret.md"
    secret.write_text("top secret")
    (sp.dir("inbox") / "link.md").symlink_to(secret)
    scan(sp)
    [aside] = [p for p in sp.dir("failed").iterdir() if p.name.endswith(".rejected")]
    assert aside.is_symlink() and "symbolic link" in _failed_message(sp)
    assert secret.read_text() == "top secret"


def test_directory_and_fifo_are_moved_aside(sp: spool.Spool) -> None:
    (sp.dir("inbox") / "dir.md").mkdir()
    (sp.dir("inbox") / "dir.md" / "inner.md").write_text("q")
    os.mkfifo(sp.dir("inbox") / "pipe.md")
    report = scan(sp)
    assert len(report.failed) == 2
    kinds = sorted(parse_result(r.read_text()).error.split(" is a ")[1].split(",")[0] for r in results(sp, "failed"))
    assert kinds == ["directory", "named pipe"]
    assert (next(p for p in sp.dir("failed").iterdir() if p.is_dir()) / "inner.md").read_text() == "q"


def test_foreign_file_written_into_queued_is_taken(sp: spool.Spool) -> None:
    (sp.dir("queued") / "from-a-tool.md").write_text("---\npriority: high\n---\nhello\n")
    assert len(scan(sp).queued) == 1
    [e] = spool.list_queued(sp)
    assert e.priority == 1


def test_two_scanners_never_take_one_file_twice(sp: spool.Spool) -> None:
    for i in range(50):
        drop(sp, f"t{i}.md", f"p{i}\n")
    reports: list[intake.IntakeReport] = []
    threads = [threading.Thread(target=lambda: reports.append(scan(sp))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sum(len(r.queued) for r in reports) == 50
    assert len(spool.list_queued(sp)) == 50


def test_a_big_drop_is_taken_in_batches(sp: spool.Spool) -> None:
    for i in range(10):
        drop(sp, f"q{i:02d}.md", f"question {i}\n")
    report = intake.scan(sp, default_model="sonnet", max_bytes=1 << 20, limit=4)
    assert len(report.queued) == 4 and report.more
    assert sorted(os.listdir(sp.dir("inbox"))) == [f"q{i:02d}.md" for i in range(4, 10)]
    report = intake.scan(sp, default_model="sonnet", max_bytes=1 << 20, limit=100)
    assert len(report.queued) == 6 and not report.more and not os.listdir(sp.dir("inbox"))


def test_names_a_task_uses_are_checked_at_intake(sp: spool.Spool) -> None:
    from spoold.config import Profile, Settings

    settings = Settings(profiles={"repo-review": Profile(tools=["Read"])})
    (sp.root / "schemas").mkdir()
    (sp.root / "schemas" / "answer.json").write_text('{"type": "object", "required": ["n"]}')
    for name, front in (("ok", "profile: repo-review\nschema: answer.json"), ("noprofile", "profile: shell"),
                        ("noschema", "schema: missing.json"), ("noresume", "resume: zzzzzz")):
        (sp.dir("inbox") / f"{name}.md").write_text(f"---\n{front}\n---\nq\n")
        os.utime(sp.dir("inbox") / f"{name}.md", (0, 0))
    report = intake.scan(sp, default_model="sonnet", max_bytes=10_000, settings=settings)
    assert len(report.queued) == 1 and len(report.failed) == 3
    [queued] = spool.list_queued(sp)
    task = parse_task((sp.dir("queued") / queued.name).read_text(), task_id=queued.task_id)
    assert task.schema == {"type": "object", "required": ["n"]}  # read once, stored with the task
    reasons = " ".join(parse_result(p.read_text()).error for p in sp.dir("failed").glob("*.result.md"))
    assert "`profile: shell` is not a profile of this spool's config.yaml (repo-review)" in reasons
    assert "`schema: missing.json` names no file in" in reasons
    assert "`resume: zzzzzz`: no task 'zzzzzz' in" in reasons


def test_editor_locks_hold_a_file_until_their_editor_is_gone(sp: spool.Spool) -> None:
    inbox = sp.dir("inbox")
    (inbox / "q.md").write_text("draft\n")
    os.utime(inbox / "q.md", (0, 0))
    os.symlink(f"me@{os.uname().nodename}.{os.getpid()}:1700000000", inbox / ".#q.md")  # emacs, alive: ours
    report = scan(sp)
    assert report.editing == ["q.md"] and report.queued == []
    os.unlink(inbox / ".#q.md")
    os.symlink("me@some-other-host.12345:1700000000", inbox / ".#q.md")  # another host's editor: believed
    assert scan(sp).editing == ["q.md"]
    os.unlink(inbox / ".#q.md")
    (inbox / ".q.md.kate-swp").write_text("kate")  # no owner to check: believed for a day
    assert scan(sp).editing == ["q.md"]
    old = time.time() - intake.STALE_LOCK_S - 60
    os.utime(inbox / ".q.md.kate-swp", (old, old))
    assert len(scan(sp).queued) == 1 and (inbox / ".q.md.kate-swp").exists()  # taken; the lock is left alone
    assert [intake.lock_target(n) for n in (".q.md.swp", ".#q.md", ".q.md.kate-swp", ".q.md.swo", "q.md")] == [
        "q.md", "q.md", "q.md", "q.md", None]


# ---- a synced spool: a dropped file is taken by a link, its inbox name kept until the task is queued ----------


def synced_scan(sp: spool.Spool) -> intake.IntakeReport:
    return intake.scan(sp, default_model="sonnet", max_bytes=1024, mine=lambda key: True)


def _settled(path: Path) -> None:
    os.utime(path, (0, 0))


def test_a_synced_file_is_taken_only_once_the_sync_tool_has_set_its_time(sp: spool.Spool,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Syncthing renames a pulled file into place and only then sets its time, of which the id is made: taken in
    between, the file got an id no other host gives it, and its inbox name (its time changed since) stayed, to
    be taken in again as a second task (3 of 30 loaded runs of test_multihost's three hosts)."""
    pulled = sp.dir("inbox") / ".syncthing.q.md.tmp"
    pulled.write_text("a question\n")  # the sync tool's temp file: its time is now, not the drop's
    os.rename(pulled, sp.dir("inbox") / "q.md")
    assert synced_scan(sp).pending == ["q.md"]
    os.utime(sp.dir("inbox") / "q.md", (1_700_000_000, 1_700_000_000))  # the drop's time, set after the rename
    assert synced_scan(sp).pending == ["q.md"]  # its inode just changed: the tool may not be done with it
    later = time.time() + intake.DEFAULT_SETTLE_S
    monkeypatch.setattr(intake, "time", types.SimpleNamespace(time=lambda: later))
    report = synced_scan(sp)
    assert report.pending == [] and len(report.queued) == 1 and report.queued[0].startswith("20231114T221320000Z-")
    assert os.listdir(sp.dir("inbox")) == [] and synced_scan(sp).queued == []


@pytest.mark.usefixtures("no_settle_wait")
@pytest.mark.parametrize("claim", ["link", "rename"])
def test_a_synced_file_whose_time_changes_as_it_is_claimed_is_left_for_the_next_look(
        sp: spool.Spool, monkeypatch: pytest.MonkeyPatch, claim: str) -> None:
    """Its id was made from the time it had when looked at: taken with it, that id would be no other host's.
    (`rename`: where no link can be made, as for another user's file under fs.protected_hardlinks.)"""
    if claim == "rename":
        inbox, os_link = str(sp.dir("inbox")), os.link

        def refused(src: object, dst: object, **kwargs: object) -> None:
            if str(src).startswith(inbox):
                raise PermissionError(1, "Operation not permitted")
            os_link(src, dst, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(os, "link", refused)
    dropped = drop(sp, "q.md", "a question\n")
    os.utime(dropped, (1_700_000_000, 1_700_000_000))
    link = transitions.link_intake

    def time_set_meanwhile(sp_: spool.Spool, path: Path, task_id: str) -> object:
        os.utime(path, (1_700_000_100, 1_700_000_100))  # the sync tool's Chtimes, between our look and our link
        monkeypatch.setattr(transitions, "link_intake", link)
        return link(sp_, path, task_id)

    monkeypatch.setattr(transitions, "link_intake", time_set_meanwhile)
    report = synced_scan(sp)
    assert report.pending == ["q.md"] and report.queued == [] and os.listdir(sp.dir("tmp")) == []
    assert dropped.exists() and os.stat(dropped).st_nlink == 1 and len(spool.list_queued(sp)) == 0
    again = synced_scan(sp)
    assert len(again.queued) == 1 and again.queued[0].startswith("20231114T221500000Z-") and not dropped.exists()


KILLED_MID_INTAKE = """
import os, sys, time
from spoold import intake, spool, transitions
sp = spool.open_spool(sys.argv[1])
def stuck(*args, **kwargs):
    open(sys.argv[2], "w").close()
    time.sleep(60)
transitions.accept_intake = stuck
intake.DEFAULT_SETTLE_S = 0.0  # as no_settle_wait does in this process
intake.scan(sp, default_model="sonnet", max_bytes=1024, mine=lambda key: True)
"""


def test_a_host_killed_in_the_middle_of_intake_leaves_the_file_in_the_synced_inbox(
        sp: spool.Spool, tmp_path: Path, no_settle_wait: None) -> None:
    """tmp/ is never synced: the file must stay where every host sees it until its task is queued."""
    dropped = drop(sp, "q.md", "a question\n")
    marker = tmp_path / "linked"
    child = subprocess.Popen([sys.executable, "-c", KILLED_MID_INTAKE, str(sp.root), str(marker)])
    try:
        deadline = time.monotonic() + 30
        while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)  # a child process's progress: no event to await across processes but its file
        assert marker.exists(), "the child never reached the queueing step"
    finally:
        child.kill()
        child.wait()
    assert dropped.read_text() == "a question\n"  # still in the (synced) inbox: another host can take it
    [link] = [n for n in os.listdir(sp.dir("tmp")) if n.startswith(spool.INTAKE_PREFIX)]
    assert os.stat(dropped).st_nlink == 2
    # This host's next intake (a restarted daemon runs intake before recovery) takes it all the same...
    report = synced_scan(sp)
    assert len(report.queued) == 1 and report.failed == [] and not dropped.exists()
    # ... and recovery drops the dead process's link, never a second copy in the inbox.
    assert recovery.recover(sp, max_attempts=3) == [f"dropped the intake copy of {report.queued[0]} (already queued)"]
    assert os.listdir(sp.dir("tmp")) == [] and os.listdir(sp.dir("inbox")) == []
    assert [e.task_id for e in spool.list_queued(sp)] == report.queued and not (sp.dir("tmp") / link).exists()


def test_recovery_drops_a_dead_link_whose_file_is_still_in_the_inbox(sp: spool.Spool) -> None:
    dropped = drop(sp, "q.md", "a question\n")
    task_id = spool.new_id("q")
    dead = sp.dir("tmp") / f"intake~{spool.host_id()}-{dead_pid()}~{task_id}~q.md"
    os.link(dropped, dead)
    assert recovery.recover(sp, max_attempts=3) == [
        "dropped the intake link of q.md (it is still in inbox, to be taken in again)"]
    assert os.listdir(sp.dir("tmp")) == [] and os.listdir(sp.dir("inbox")) == ["q.md"]
    assert os.stat(dropped).st_nlink == 1


@pytest.mark.usefixtures("no_settle_wait")
def test_a_file_another_daemon_of_this_host_is_taking_is_passed_by(sp: spool.Spool) -> None:
    dropped = drop(sp, "q.md", "a question\n")
    _settled(dropped)
    fd = os.open(dropped, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what link_intake holds while it queues the file
        report = synced_scan(sp)
        assert report.queued == [] and report.failed == [] and dropped.exists()
        assert os.listdir(sp.dir("tmp")) == [] and os.stat(dropped).st_nlink == 1
    finally:
        os.close(fd)
    assert len(synced_scan(sp).queued) == 1 and not dropped.exists() and os.listdir(sp.dir("tmp")) == []


@pytest.mark.usefixtures("no_settle_wait")
def test_two_daemons_of_one_host_take_a_synced_file_once(sp: spool.Spool) -> None:
    for n in range(40):
        _settled(drop(sp, f"q{n}.md", f"question {n}\n"))
    reports: list[intake.IntakeReport] = []
    start = threading.Barrier(2)

    def take() -> None:
        start.wait()
        reports.append(synced_scan(sp))

    threads = [threading.Thread(target=take) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queued = [q for r in reports for q in r.queued]
    assert len(queued) == len(set(queued)) == 40 and len(spool.list_queued(sp)) == 40
    assert os.listdir(sp.dir("inbox")) == [] and os.listdir(sp.dir("tmp")) == []


def test_a_hard_link_to_a_file_elsewhere_is_still_refused_on_a_synced_spool(
        sp: spool.Spool, tmp_path: Path, no_settle_wait: None) -> None:
    secret = tmp_path / "secret.md"
    secret.write_text("not for a prompt\n")
    os.link(secret, sp.dir("inbox") / "linked.md")
    _settled(secret)
    report = synced_scan(sp)
    assert report.queued == [] and len(report.failed) == 1
    assert "is a hard link to a file elsewhere" in parse_result(results(sp, "failed")[0].read_text()).error
    assert os.listdir(sp.dir("inbox")) == [] and os.listdir(sp.dir("tmp")) == []
    assert secret.read_text() == "not for a prompt\n"


@pytest.mark.usefixtures("no_settle_wait")
@pytest.mark.parametrize("how", ["atomic", "in place"])
def test_a_new_save_over_a_file_being_taken_in_is_a_new_drop(sp: spool.Spool, how: str) -> None:
    """An editor saving while the file is queued (a rename over it, or nano and vim writing in place, which vim
    does for a file with a second link): the new text is kept in the inbox, to be taken in next."""
    dropped = drop(sp, "q.md", "first version\n")
    _settled(dropped)
    linked = transitions.link_intake(sp, dropped, spool.new_id("q"))
    assert linked is not None
    claimed, held, signature = linked
    assert held is not None
    if how == "atomic":
        drop(sp, "q.md", "second version\n")
    else:
        with open(dropped, "a") as f:
            f.write("second version\n")
    claimed.unlink()
    transitions.release_original(dropped, held, signature)
    assert dropped.read_text().endswith("second version\n")
    assert len(synced_scan(sp).queued) == 1 and not dropped.exists()


@pytest.mark.usefixtures("no_settle_wait")
def test_a_file_that_cannot_be_linked_is_taken_in_by_a_rename(sp: spool.Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """fs.protected_hardlinks refuses a link to another user's file (root's, copied in with sudo): one such
    file must not stop intake, nor leave any lock behind."""
    import errno

    inbox, link = str(sp.dir("inbox")), os.link

    def refused(src: object, dst: object, **kwargs: object) -> None:
        if str(src).startswith(inbox):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        link(src, dst, **kwargs)  # type: ignore[arg-type]

    for n in range(3):
        _settled(drop(sp, f"q{n}.md", f"question {n}\n"))
    monkeypatch.setattr(os, "link", refused)
    fds = len(os.listdir(f"/proc/{os.getpid()}/fd"))
    report = synced_scan(sp)
    assert len(report.queued) == 3 and report.failed == []
    assert os.listdir(sp.dir("inbox")) == [] and os.listdir(sp.dir("tmp")) == []
    assert len(os.listdir(f"/proc/{os.getpid()}/fd")) == fds  # no descriptor of a lock kept open


@pytest.mark.usefixtures("no_settle_wait")
def test_an_inbox_name_a_power_cut_brought_back_beside_its_running_task_is_dropped(sp: spool.Spool) -> None:
    dropped = drop(sp, "q.md", "a question\n")
    _settled(dropped)
    saved = sp.root.parent / "before-the-cut"
    shutil.copy2(dropped, saved)  # the inbox name, as a power cut before its removal reached the disk brings it back
    [task_id] = synced_scan(sp).queued
    claim = transitions.claim(sp, spool.list_queued(sp)[0], "sonnet")
    assert claim is not None and not dropped.exists()
    os.rename(saved, dropped)
    assert synced_scan(sp).queued == [] and not dropped.exists()
    assert [e.task_id for e in spool.list_running(sp)] == [task_id] and len(spool.list_queued(sp)) == 0
