"""Several hosts on one synced spool, one process at a time: ownership, views, duplicates, takeover, shares.

The same rules over real Syncthing and Unison are in test_multihost.py.
"""

from __future__ import annotations

import os
import shutil
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest

from spoold import api, config, hosts, intake, ledger, leftovers, recovery, spool, syncrules, transitions
from spoold.task import Task

S = config.Settings(host_lease_s=60, running_lease_s=120, heartbeat_s=5, handover_s=10)
KEYS = [f"20261201T000000{i:03d}Z-abcdef" for i in range(999)]


def _beat(owner: str, seq: int, at: float, sees: tuple[str, ...] = ()) -> hosts.Beat:
    return hosts.Beat(owner=owner, seq=seq, at=at, sees=sees)


def test_every_host_computes_the_same_owner_and_a_leaving_host_moves_only_its_own_tasks() -> None:
    three = ("desk-aaaaaa", "lap-bbbbbb", "nas-cccccc")
    owners = {k: hosts.owner_of(k, three) for k in KEYS}
    assert owners == {k: hosts.owner_of(k, tuple(reversed(three))) for k in KEYS}  # order-free
    spread = Counter(owners.values())
    assert all(250 < n < 420 for n in spread.values()), spread  # about a third each
    two = ("desk-aaaaaa", "nas-cccccc")
    moved = [k for k in KEYS if hosts.owner_of(k, two) != owners[k]]
    assert moved and all(owners[k] == "lap-bbbbbb" for k in moved)


def test_a_host_claims_nothing_until_every_live_host_sees_it_then_waits_the_handover_for_what_moved() -> None:
    m = hosts.Membership("lap-bbbbbb")
    t = 1000.0
    m.refresh([_beat("desk-aaaaaa-1", 1, t)], S, now=t)  # desk is live but does not list us yet
    v = m.view
    assert v.members == ("desk-aaaaaa", "lap-bbbbbb") and not v.ready and v.peers
    assert not any(v.mine(k, S.handover_s, t) for k in KEYS)
    m.refresh([_beat("desk-aaaaaa-1", 2, t + 1, sees=("desk-aaaaaa", "lap-bbbbbb"))], S, now=t + 1)
    v = m.view
    ours = [k for k in KEYS if hosts.owner_of(k, v.members) == "lap-bbbbbb"]
    assert v.ready and ours
    assert not any(v.mine(k, S.handover_s, t + 2) for k in KEYS)  # they were desk's a moment ago
    assert all(v.mine(k, S.handover_s, t + 1 + S.handover_s) == (k in ours) for k in KEYS)


def test_a_silent_host_loses_its_queued_tasks_at_once_and_its_running_ones_after_the_running_lease() -> None:
    m = hosts.Membership("lap-bbbbbb")
    t = 1000.0
    both = ("desk-aaaaaa", "lap-bbbbbb")
    m.refresh([_beat("desk-aaaaaa-1", 1, t, both)], S, now=t)
    desks = [k for k in KEYS if hosts.owner_of(k, both) == "desk-aaaaaa"]
    assert not any(m.view.mine(k, S.handover_s, t + 20) for k in desks)
    for i in range(1, 12):  # desk's beat stops changing; we keep looking every 6 s
        m.refresh([_beat("desk-aaaaaa-1", 1, t, both)], S, now=t + 6 * i)
    v = m.view
    assert v.members == ("lap-bbbbbb",) and v.departed_stale == frozenset({"desk-aaaaaa"})
    assert all(v.mine(k, S.handover_s, t + 66) for k in desks)  # at once: desk went silent a lease ago
    assert not v.in_touch  # desk is known, not live: a second answer could come, so ours is host-named
    silent = m.silent_for("desk-aaaaaa", now=t + 66)
    assert silent is not None and S.host_lease_s < silent < S.running_lease_s
    assert m.silent_for("nobody-zzzzzz") is None  # no heartbeat: never taken over


def test_another_hosts_clock_is_never_compared_with_ours_and_a_sleep_forgets_what_we_saw() -> None:
    """A beat an hour old by its writer's clock, first seen now (we just started, or its clock is behind):
    live until it has not changed for a lease by ours; its running tasks are not taken on first sight."""
    both = ("desk-aaaaaa", "lap-bbbbbb")
    m = hosts.Membership("lap-bbbbbb")
    t = 1000.0 + 3600
    m.refresh([_beat("desk-aaaaaa-1", 7, 1000.0, both)], S, now=t)
    assert m.view.members == both and m.silent_for("desk-aaaaaa", now=t) == 0
    for i in range(1, 12):
        m.refresh([_beat("desk-aaaaaa-1", 7, 1000.0, both)], S, now=t + 6 * i)
    assert m.view.members == ("lap-bbbbbb",)  # unchanged for a lease, as seen here: gone
    m = hosts.Membership("lap-bbbbbb")
    m.refresh([_beat("desk-aaaaaa-1", 1, 1000.0, both)], S, now=1000.0)
    assert m.view.in_touch
    m.refresh([_beat("desk-aaaaaa-1", 2, 1000.0, both)], S, now=1000.0 + S.host_lease_s)  # the lid was shut
    assert not m.view.in_touch  # after a gap, nothing we saw before vouches for the other host


def test_with_two_hosts_a_clean_stop_still_waits_the_handover() -> None:
    """B stops (its beat deleted): B's last renames may arrive after the deletion, so its tasks wait."""
    both = ("desk-aaaaaa", "lap-bbbbbb")
    m = hosts.Membership("lap-bbbbbb")
    m.refresh([_beat("desk-aaaaaa-1", 1, 1000.0, both)], S, now=1000.0)
    desks = [k for k in KEYS if hosts.owner_of(k, both) == "desk-aaaaaa"]
    m.refresh([], S, now=1001.0)
    v = m.view
    assert v.members == ("lap-bbbbbb",) and not v.departed_stale
    assert not any(v.mine(k, S.handover_s, 1002.0) for k in desks)
    assert all(v.mine(k, S.handover_s, 1001.0 + S.handover_s) for k in desks)


def test_a_beat_under_our_host_id_that_keeps_changing_from_a_pid_not_ours_is_another_machine() -> None:
    m = hosts.Membership("lap-bbbbbb")
    def mine_dead(owner: str) -> bool:  # only our own daemon (pid 1) lives here
        return owner == "lap-bbbbbb-1"

    m.refresh([_beat("lap-bbbbbb-77", 3, 1000.0)], S, now=1000.0, alive_here=mine_dead)
    assert m.twin is None
    m.refresh([_beat("lap-bbbbbb-77", 3, 1000.0)], S, now=1000.0 + S.host_lease_s + 1, alive_here=mine_dead)
    assert m.remove == ["lap-bbbbbb-77"] and m.twin is None  # a dead daemon of ours: its beat goes
    m.refresh([_beat("lap-bbbbbb-88", 1, 2000.0)], S, now=2000.0, alive_here=mine_dead)
    m.refresh([_beat("lap-bbbbbb-88", 2, 2001.0)], S, now=2001.0, alive_here=mine_dead)
    assert m.twin == "lap-bbbbbb-88"


def test_a_host_that_cannot_write_its_heartbeat_takes_nothing_and_a_day_old_beat_is_forgotten() -> None:
    both = ("desk-aaaaaa", "lap-bbbbbb")
    m = hosts.Membership("lap-bbbbbb")
    m.refresh([_beat("desk-aaaaaa-1", 1, 1000.0, both)], S, now=1000.0, beat_ok=False)
    assert not m.view.ready and not any(m.view.mine(k, 0, 1000.0) for k in KEYS)
    m = hosts.Membership("lap-bbbbbb")
    old = _beat("desk-aaaaaa-1", 1, 1000.0, both)
    later = 1000.0 + hosts.FORGET_S + 1
    for i in range(12):  # unchanged for a lease here too
        m.refresh([old], S, now=later + 6 * i)
    assert m.remove == ["desk-aaaaaa-1"] and not m.view.peers


def _task(sp: spool.Spool, prompt: str = "q\n") -> Task:
    t = Task(id=spool.new_id(prompt), prompt=prompt)
    transitions.enqueue(sp, t)
    return t


def _claim(sp: spool.Spool, t: Task) -> transitions.Claimed:
    entry = next(e for e in spool.list_queued(sp) if e.task_id == t.id)
    c = transitions.claim(sp, entry, "sonnet")
    assert c is not None
    return c


def test_an_answer_that_comes_second_is_kept_beside_the_first_named_for_its_host(sp: spool.Spool) -> None:
    sp.local.peers = True
    t = _task(sp)
    c = _claim(sp, t)
    other_dir = spool.date_dir(sp, "done", transitions.now())
    other_dir.mkdir(parents=True, exist_ok=True)
    shutil.copy(c.path, spool.task_path_for(other_dir, t.id))  # another host's finish, synced here
    first = transitions.result_for(c, "done", answer="theirs")
    spool.write_new(sp, spool.result_path_for(other_dir, t.id), transitions.render_result(first))
    transitions.finish(sp, c, transitions.result_for(c, "done", answer="ours"))
    names = sorted(os.listdir(other_dir))
    host = spool.owner_host(spool.owner_tag())
    assert names == sorted([f"{t.id}.md", f"{t.id}.result.md", f"{t.id}@{host}.result.md"])
    st = api.status(sp)
    assert st.counts["done"] == 1 and st.duplicates == 1 and st.counts["running"] == 0
    assert api.answer_of(api.info_and_result(sp, t.id)[1]).strip() == "theirs"


def test_out_of_touch_a_host_names_its_answer_for_itself_and_readers_still_find_it(sp: spool.Spool) -> None:
    sp.local.peers, sp.local.in_touch_until = True, 0.0
    t = _task(sp)
    c = _claim(sp, t)
    ledger.record_finish(sp, S, None, 1.0)
    ledger.flush(sp, S)  # this host's ledger file: readers learn its name from it
    transitions.finish(sp, c, transitions.result_for(c, "done", answer="mine"))
    loc = spool.locate(sp, t.id)
    host = spool.owner_host(spool.owner_tag())
    assert loc.state == "done" and not loc.result_path.exists()
    assert spool.host_result_path(loc.path.parent, t.id, host).exists()
    assert api.answer_of(api.info_and_result(sp, t.id)[1]).strip() == "mine"
    assert api.status(sp).duplicates == 0


def test_a_claim_another_host_took_over_ends_beside_the_task_and_is_never_requeued(sp: spool.Spool) -> None:
    sp.local.peers = True
    t = _task(sp)
    c = _claim(sp, t)
    assert spool.kept_claim_path(sp, c.path.name).exists()
    c.path.unlink()  # what a sync tool does to our running/ copy when another host renames it
    assert transitions.requeue(sp, c, "stop", count_attempt=False) == c.path
    assert len(spool.list_queued(sp)) == 0 and not spool.kept_claim_path(sp, c.path.name).exists()
    c2 = _claim(sp, _task(sp, "again\n"))
    c2.path.unlink()
    transitions.finish(sp, c2, transitions.result_for(c2, "done", answer="late"))
    loc = spool.locate(sp, c2.task.id)
    assert loc.state == "done" and api.answer_of(api.info_and_result(sp, c2.task.id)[1]).strip() == "late"
    assert not any(n.endswith(".md") for n in os.listdir(sp.dir("running")))


def test_recovery_runs_again_what_a_silent_host_was_running_and_that_host_drops_its_copy(sp: spool.Spool) -> None:
    t = _task(sp)
    c = _claim(sp, t)
    theirs = spool.running_path(sp, t.id, c.number, c.started, "desk-aaaaaa-4242")
    os.rename(c.path, theirs)
    assert recovery.recover(sp, max_attempts=3, silent=lambda h: False) == []  # a live host's: left alone
    assert recovery.recover(sp, max_attempts=3, silent=lambda h: h == "desk-aaaaaa") == [f"requeued {t.id}"]
    assert spool.locate(sp, t.id).state == "queued"
    assert "went silent" in (transitions.history(sp, t.id).last_reason or "")
    # desk comes back with its old copy still in running/ (its sync had not caught up): it must not run it again
    entry = spool.parse_running_name(theirs.name)
    assert entry is not None
    theirs.write_bytes(spool.read_bytes(spool.locate(sp, t.id).path))
    assert "another host took it over" in recovery.recover_running(sp, entry, max_attempts=3)
    assert not theirs.exists() and spool.locate(sp, t.id).state == "queued"


def test_strict_mode_holds_each_host_to_its_share_and_the_union_to_the_limit(sp: spool.Spool) -> None:
    s = replace(S, max_requests=9, window_minutes=60, limit_mode="strict")
    now = 10_000.0
    own = [now - 10] * 3
    g = ledger.gate(ledger.Usage(own, {}, [], None, None), s, 0, now, own=own, members=3)
    assert g.waits and "share is 3 of 9" in (g.reason or "")
    assert not ledger.gate(ledger.Usage(own, {}, [], None, None), s, 0, now, own=own, members=2).waits
    union = [now - 10] * 9
    assert ledger.gate(ledger.Usage(union, {}, [], None, None), s, 0, now, own=[], members=3).waits
    shared = replace(s, limit_mode="shared")
    assert not ledger.gate(ledger.Usage(own, {}, [], None, None), shared, 0, now, own=own, members=3).waits


@pytest.mark.usefixtures("no_settle_wait")
def test_two_hosts_taking_in_the_same_dropped_file_make_the_same_task_byte_for_byte(tmp_path: Path) -> None:
    a, b = spool.open_spool(tmp_path / "a"), spool.open_spool(tmp_path / "b")
    for s in (a, b):
        p = s.dir("inbox") / "sky.md"
        p.write_text("---\npriority: high\n---\nWhy is the sky blue?\n")
        os.utime(p, (1_700_000_000.25, 1_700_000_000.25))
        report = intake.scan(s, default_model="sonnet", max_bytes=1 << 20, mine=lambda name: True)
        assert len(report.queued) == 1
    qa, qb = os.listdir(a.dir("queued")), os.listdir(b.dir("queued"))
    assert qa == qb
    assert (a.dir("queued") / qa[0]).read_bytes() == (b.dir("queued") / qb[0]).read_bytes()


def test_identical_conflict_copies_are_removed_and_differing_ones_kept_and_reported(sp: spool.Spool) -> None:
    d = spool.date_dir(sp, "done", transitions.now())
    d.mkdir(parents=True)
    (d / "x.md").write_text("same\n")
    (d / "x.sync-conflict-20261201-101010-ABCDEF1.md").write_text("same\n")
    (d / "z.md").write_text("same\n")
    (d / "z (conflict_on_2026-12-01).md").write_text("same\n")  # Unison's -copyonconflict
    (d / "y.result.md").write_text("one\n")
    (d / "y.result (conflicted copy 2026-12-01).md").write_text("two\n")
    (sp.dir("queued") / ".syncthing.z.md.tmp").write_text("")
    assert len(api.status(sp).leftovers) == 3  # a temp file is a transfer in flight for an hour
    os.utime(sp.dir("queued") / ".syncthing.z.md.tmp", (1e9, 1e9))
    assert len(api.status(sp).leftovers) == 4
    kept = leftovers.tidy(sp)
    assert not (d / "x.sync-conflict-20261201-101010-ABCDEF1.md").exists() and (d / "x.md").exists()
    assert not (d / "z (conflict_on_2026-12-01).md").exists()
    assert (d / "y.result (conflicted copy 2026-12-01).md").exists()
    assert any("Dropbox conflict of y.result.md" in k for k in kept)


@pytest.mark.parametrize("tool", ["syncthing", "unison", "rsync", "nextcloud"])
def test_each_tools_rules_keep_every_local_path_local(sp: spool.Spool, tool: str) -> None:
    (line,) = syncrules.write(sp, tool)
    text = (sp.root / syncrules.RULE_FILES[tool][0]).read_text()
    assert line.startswith("wrote ")
    for rel, _ in syncrules.LOCAL:
        assert rel in text
    assert "running/*.partial" in text
    assert syncrules.is_local("tmp/x") and syncrules.is_local("running/a.1.b@h-1.partial")
    assert not syncrules.is_local("running/a.1.b@h-1.md") and not syncrules.is_local(".spoold/hosts/h-1.json")


def test_the_examples_are_what_init_writes() -> None:
    examples = Path(__file__).parent.parent / "examples" / "sync"
    for name, render in (("stignore", syncrules.syncthing), ("spoold-unison.prf", syncrules.unison),
                         ("spoold-rsync-filter", syncrules.rsync), ("sync-exclude.lst", syncrules.nextcloud)):
        assert (examples / name).read_text() == render(), f"examples/sync/{name} is stale: regenerate it"


@pytest.mark.usefixtures("no_settle_wait")
def test_a_re_dropped_finished_file_is_a_new_task_and_a_copy_already_queued_is_taken_as_is(sp: spool.Spool) -> None:
    def drop_same() -> intake.IntakeReport:
        p = sp.dir("inbox") / "weekly.md"
        p.write_text("Summarise the week.\n")
        os.utime(p, (1_700_000_000, 1_700_000_000))
        return intake.scan(sp, default_model="sonnet", max_bytes=1 << 20, mine=lambda name: True)

    (first,) = drop_same().queued
    (again,) = drop_same().queued  # the same bytes while the first is still queued: another host's copy
    assert again == first and len(spool.list_queued(sp)) == 1
    c = _claim(sp, _task_of(sp, first))
    transitions.finish(sp, c, transitions.result_for(c, "done", answer="week 1"))
    (third,) = drop_same().queued  # dropped again after it finished: a task of its own
    assert third != first and spool.locate(sp, third).state == "queued"


def _task_of(sp: spool.Spool, task_id: str) -> Task:
    return Task(id=task_id, prompt="")


def test_a_conflict_copy_in_queued_is_reported_never_taken_in(sp: spool.Spool) -> None:
    t = _task(sp)
    (name,) = spool.list_queued(sp).names
    copy = sp.dir("queued") / name.replace(".md", ".sync-conflict-20261201-101010-ABCDEF1.md")
    copy.write_bytes((sp.dir("queued") / name).read_bytes() + b"x")
    report = intake.scan(sp, default_model="sonnet", max_bytes=1 << 20, mine=lambda n: True)
    assert report.queued == [] and copy.exists() and t.id in copy.name
    assert any("sync-conflict" in left for left in api.status(sp).leftovers)


def test_a_retry_sets_every_result_of_the_task_aside(sp: spool.Spool) -> None:
    sp.local.peers, sp.local.in_touch_until = True, 0.0
    t = _task(sp)
    c = _claim(sp, t)
    transitions.finish(sp, c, transitions.result_for(c, "failed", "boom"))
    loc = spool.locate(sp, t.id)
    assert loc.state == "failed" and spool.results_of(loc.path.parent, t.id)
    transitions.retry(sp, t.id)
    assert spool.locate(sp, t.id).state == "queued" and spool.results_of(sp.dir("failed"), t.id) == []
    assert any(r.kind == "retried" for r in spool.attempt_records(sp, t.id))


def test_status_shows_each_host_its_heartbeat_age_what_it_runs_and_the_leases(sp: spool.Spool) -> None:
    import subprocess
    import sys
    import time

    now = time.time()
    hosts.write_beat(sp, replace(_beat("desk-aaaaaa-11", 4, now - 3), running=("20261201T000000000Z-abcdef",),
                                 lease_s=300, running_lease_s=900))
    hosts.write_beat(sp, _beat("lap-bbbbbb-22", 9, now - 400))
    st = api.status(sp)
    by = {h["host"]: h for h in st.hosts}
    assert by["desk-aaaaaa"]["live"] and not by["lap-bbbbbb"]["live"]
    assert list(by["desk-aaaaaa"]["running"]) == ["20261201T000000000Z-abcdef"]
    out = subprocess.run([sys.executable, "-m", "spoold.cli", "status", "--spool", str(sp.root)],
                         capture_output=True, text=True, timeout=60).stdout
    assert "host desk-aaaaaa: live, heartbeat 3 s ago (lease 300 s, running lease 900 s), running 20261201T" in out
    assert "host lap-bbbbbb: silent, heartbeat 400 s ago" in out


def test_two_changes_within_a_handover_are_measured_from_before_both() -> None:
    """desk leaves cleanly, then nas joins, within one handover: what was desk's waits for the full handover."""
    m = hosts.Membership("lap-bbbbbb")
    two = ("desk-aaaaaa", "lap-bbbbbb")
    m.refresh([_beat("desk-aaaaaa-1", 1, 1000.0, two)], S, now=1000.0)
    desks = [k for k in KEYS if hosts.owner_of(k, two) == "desk-aaaaaa"]
    m.refresh([], S, now=1001.0)
    m.refresh([_beat("nas-cccccc-1", 1, 1002.0, ("lap-bbbbbb", "nas-cccccc"))], S, now=1002.0)
    v = m.view
    ours_now = [k for k in desks if hosts.owner_of(k, v.members) == "lap-bbbbbb"]
    assert ours_now and two in v.earlier
    assert not any(v.mine(k, S.handover_s, 1003.0) for k in ours_now)
    assert all(v.mine(k, S.handover_s, 1002.0 + S.handover_s) for k in ours_now)


def test_a_sibling_daemon_dying_between_beats_is_not_a_twin_but_our_own_beat_rewritten_is() -> None:
    alive = {"lap-bbbbbb-1", "lap-bbbbbb-2"}
    m = hosts.Membership("lap-bbbbbb")
    m.refresh([_beat("lap-bbbbbb-2", 5, 1000.0)], S, now=1000.0, alive_here=lambda o: o in alive)
    alive.discard("lap-bbbbbb-2")  # it wrote seq 6, then was killed before our next look
    m.refresh([_beat("lap-bbbbbb-2", 6, 1001.0)], S, now=1001.0, alive_here=lambda o: o in alive)
    m.refresh([_beat("lap-bbbbbb-2", 6, 1001.0)], S, now=1002.0, alive_here=lambda o: o in alive)
    assert m.twin is None
    m.refresh([_beat("lap-bbbbbb-1", 9, 1003.0)], S, now=1003.0, own=("lap-bbbbbb-1", 9))
    assert m.twin is None
    m.refresh([_beat("lap-bbbbbb-1", 4, 1004.0)], S, now=1004.0, own=("lap-bbbbbb-1", 10))  # same id, same pid
    assert m.twin == "lap-bbbbbb-1"


def test_a_host_back_within_a_handover_is_no_longer_counted_as_gone() -> None:
    m = hosts.Membership("lap-bbbbbb")
    two = ("desk-aaaaaa", "lap-bbbbbb")
    m.refresh([_beat("desk-aaaaaa-1", 1, 1000.0, two)], S, now=1000.0)
    for i in range(1, 12):
        m.refresh([_beat("desk-aaaaaa-1", 1, 1000.0, two)], S, now=1000.0 + 6 * i)
    assert m.view.departed_stale == frozenset({"desk-aaaaaa"})
    t = 1066.0 + 1
    m.refresh([_beat("desk-aaaaaa-1", 2, t, two)], S, now=t)  # desk is back
    m.refresh([_beat("desk-aaaaaa-1", 2, t, two), _beat("nas-cccccc-1", 1, t, ("desk-aaaaaa", "lap-bbbbbb",
                                                                                 "nas-cccccc"))], S, now=t + 1)
    assert "desk-aaaaaa" not in m.view.departed_stale


def test_a_claim_made_alone_then_taken_over_ends_without_an_error(sp: spool.Spool) -> None:
    t = _task(sp)
    c = _claim(sp, t)  # alone: no kept link
    assert c.kept is None
    sp.local.peers = True  # another host appeared, and took the task over
    c.path.unlink()
    transitions.finish(sp, c, transitions.result_for(c, "done", answer="mine"))
    d = spool.date_dir(sp, "done", transitions.now())
    assert spool.results_of(d, t.id)  # the answer is kept; the task file is the other host's to move


@pytest.mark.usefixtures("no_settle_wait")
def test_a_file_rejected_on_two_hosts_is_one_result(tmp_path: Path) -> None:
    """The other host's result for the same dropped file arrived before its task file: no stall, one result."""
    other, here = spool.open_spool(tmp_path / "other"), spool.open_spool(tmp_path / "here")
    for s in (other, here):
        s.local.peers = True
        p = s.dir("inbox") / "bad.md"
        p.write_bytes(b"\0binary")
        os.utime(p, (1_700_000_000, 1_700_000_000))
    intake.scan(other, default_model="sonnet", max_bytes=1 << 20, mine=lambda name: True)
    (result,) = [n for n in os.listdir(other.dir("failed")) if n.endswith(".result.md")]
    shutil.copy(other.dir("failed") / result, here.dir("failed") / result)
    report = intake.scan(here, default_model="sonnet", max_bytes=1 << 20, mine=lambda name: True)
    assert report.failed == [result[: -len(".result.md")]]
    assert sorted(os.listdir(here.dir("failed"))) == sorted(os.listdir(other.dir("failed")))
    assert (here.dir("failed") / result).read_bytes() == (other.dir("failed") / result).read_bytes()


@pytest.mark.usefixtures("no_settle_wait")
def test_a_late_copy_of_a_dropped_file_already_answered_elsewhere_is_not_a_new_task(tmp_path: Path) -> None:
    """The sync tool brought the other host's finished task before its deletion of the dropped file."""
    other, here = spool.open_spool(tmp_path / "other"), spool.open_spool(tmp_path / "here")
    for s in (other, here):
        s.local.peers = True
        p = s.dir("inbox") / "sky.md"
        p.write_text("Why is the sky blue?\n")
        os.utime(p, (1_700_000_000, 1_700_000_000))
    (tid,) = intake.scan(other, default_model="sonnet", max_bytes=1 << 20, mine=lambda name: True).queued
    c = _claim(other, _task_of(other, tid))
    finished = transitions.finish(other, c, transitions.result_for(c, "done", answer="blue"))
    arrived = spool.date_dir(here, "done", transitions.now())
    arrived.mkdir(parents=True, exist_ok=True)
    for f in finished.parent.iterdir():  # it arrives here after the dropped file did
        shutil.copy(f, arrived / f.name)
    report = intake.scan(here, default_model="sonnet", max_bytes=1 << 20, mine=lambda name: True)
    assert report.queued == [] and not (here.dir("inbox") / "sky.md").exists()
    assert len(spool.list_queued(here)) == 0
