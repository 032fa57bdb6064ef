"""The spool format: ids, names in dispatch order, the atomic write and moves."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from spoold import durability, spool
from spoold.errors import BadTaskId, SpoolError, TaskNotFound


def test_ids_are_unique_sortable_and_readable() -> None:
    t = datetime(2026, 11, 24, 16, 0, 0, tzinfo=UTC)
    ids = [spool.new_id("My Question: why?!", t + timedelta(milliseconds=i)) for i in range(200)]
    assert len(set(ids)) == 200
    assert ids == sorted(ids)
    assert all(spool.ID_RE.match(i) for i in ids)
    assert ids[0].endswith("-my-question-why")
    assert spool.id_time(ids[5]) == t + timedelta(milliseconds=5)


def test_ids_unique_at_the_same_millisecond() -> None:
    """30 random bits: 300 ids in one millisecond collide with odds of 4 in 100,000 (5,000 made it 1 in 85)."""
    t = datetime(2026, 11, 24, tzinfo=UTC)
    assert len({spool.new_id("x", t) for _ in range(300)}) == 300


@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "a\0b", "", "20261124T160000000Z-abcdef/..",
                                 "20261124T160000000Z-ABCDEF", "x" * 300, "20261124T160000000Z-abcdef-.."])
def test_check_id_refuses_anything_else(bad: str) -> None:
    with pytest.raises(BadTaskId):
        spool.check_id(bad)


def test_queued_names_sort_in_dispatch_order() -> None:
    t = datetime(2026, 11, 24, tzinfo=UTC)
    a = spool.new_id("a", t)
    b = spool.new_id("b", t + timedelta(seconds=1))
    c = spool.new_id("c", t + timedelta(seconds=2))
    names = [
        spool.queued_name(a, "low", None),
        spool.queued_name(b, "urgent", None),
        spool.queued_name(c, "normal", None),
        spool.queued_name(a, "normal", t + timedelta(hours=1)),
        spool.queued_name(b, "normal", None),
    ]
    ordered = [spool.parse_queued_name(n) for n in sorted(names)]
    assert [(e.priority, e.task_id[-1]) for e in ordered] == [(0, "b"), (2, "b"), (2, "c"), (2, "a"), (3, "a")]
    assert ordered[3].not_before == t + timedelta(hours=1)


def test_write_new_never_overwrites(sp: spool.Spool) -> None:
    dest = sp.dir("queued") / "x.md"
    spool.write_new(sp, dest, b"first")
    with pytest.raises(FileExistsError):
        spool.write_new(sp, dest, b"second")
    assert dest.read_bytes() == b"first"
    assert os.listdir(sp.dir("tmp")) == []  # the staging copy is gone
    assert dest.stat().st_mode & 0o777 == 0o600


def test_move_refuses_to_clobber_and_reports_a_lost_race(sp: spool.Spool) -> None:
    a = spool.write_new(sp, sp.dir("queued") / "a.md", b"a")
    b = spool.write_new(sp, sp.dir("failed") / "a.md", b"b")
    with pytest.raises(FileExistsError):
        spool.move(a, b)
    spool.move(a, sp.dir("cancelled") / "a.md")
    with pytest.raises(FileNotFoundError):
        spool.move(a, sp.dir("done") / "a.md")


def test_read_bytes_never_follows_links(sp: spool.Spool, tmp_path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s")
    link = sp.dir("inbox") / "l.md"
    link.symlink_to(secret)
    with pytest.raises(OSError):
        spool.read_bytes(link)


def test_directories_are_private(sp: spool.Spool) -> None:
    for state in spool.STATES:
        assert sp.dir(state).stat().st_mode & 0o777 == 0o700


def test_world_writable_spool_is_refused(tmp_path) -> None:
    root = tmp_path / "open"
    root.mkdir()
    root.chmod(0o777)
    with pytest.raises(SpoolError, match="writable by others"):
        spool.open_spool(root)


def test_missing_spool_says_what_to_do(tmp_path) -> None:
    with pytest.raises(SpoolError, match="spoold init"):
        spool.open_spool(tmp_path / "nope", create=False)


def test_locate_finds_each_state_and_refuses_unknown(sp: spool.Spool) -> None:
    tid = spool.new_id("x")
    spool.write_new(sp, sp.dir("queued") / spool.queued_name(tid, "normal", None), b"q")
    assert spool.locate(sp, tid).state == "queued"
    other = spool.new_id("y")
    spool.write_new(sp, spool.date_dir(sp, "done", datetime.now(UTC)) / f"{other}.md", b"d")
    assert spool.locate(sp, other).state == "done"
    with pytest.raises(TaskNotFound):
        spool.locate(sp, spool.new_id("z"))


def test_queue_listing_orders_by_name_and_parses_only_what_is_read(sp: spool.Spool) -> None:
    t0 = datetime(2026, 11, 24, tzinfo=UTC)
    ids = [spool.new_id(f"t{i}", now=t0 + timedelta(seconds=i)) for i in range(4)]
    later = t0 + timedelta(days=1)
    names = [spool.queued_name(ids[0], "low", None), spool.queued_name(ids[1], "normal", later),
             spool.queued_name(ids[2], "normal", None), spool.queued_name(ids[3], "urgent", None)]
    for n in names + ["2.20261399T000000Z." + ids[0] + ".md", "notes.txt"]:  # an impossible date is not ours
        (sp.dir("queued") / n).write_text("x\n")
    listing = spool.list_queued(sp)
    assert len(listing) == 4 and listing._entries == [None] * 4  # nothing parsed by listing alone
    assert [e.task_id for e in listing] == [ids[3], ids[2], ids[1], ids[0]]
    assert listing.index_of(ids[1]) == 2 and listing.index_of("nope") is None
    assert [e.task_id for e in listing.timed()] == [ids[1]] and listing.timed()[0].not_before == later
    assert [e.task_id for e in listing.by_id()] == ids and [e.task_id for e in listing.by_id(reverse=True)] == ids[::-1]
    assert listing[1:3] == [listing[1], listing[2]]


def test_no_module_but_spool_joins_a_path_into_the_spool() -> None:
    """Every name in the spool is built (and parsed) in spool.py; the others ask it."""
    import re
    from pathlib import Path

    root = Path(spool.__file__).parent.parent
    join = re.compile(r"\b(?:sp|self\.sp|spool_root)\s*\.\s*(?:dir\([^)]*\)|root|state_dir)\s*/")
    offenders = [f"{p.relative_to(root)}:{n}" for p in [*root.glob("spoold/**/*.py"), *root.glob("mcp_adapter/*.py")]
                 if p.name != "spool.py" for n, line in enumerate(p.read_text().splitlines(), 1) if join.search(line)]
    assert offenders == []


def test_host_id_is_generated_once_per_installation_and_kept_outside_the_spool(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "config"))
    monkeypatch.delenv("SPOOLD_HOST_ID", raising=False)
    spool.host_id.cache_clear()
    try:
        first = spool.host_id()
        assert first.startswith(spool.slugify(spool.legacy_host())) and first != spool.legacy_host()
        assert (tmp_path / "config" / "spoold" / "host_id").read_text().strip() == first
        spool.host_id.cache_clear()
        assert spool.host_id() == first  # the same installation keeps its id
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "other-laptop"))  # same host name, another install
        spool.host_id.cache_clear()
        assert spool.host_id() != first
        monkeypatch.setenv("SPOOLD_HOST_ID", "desk-at-home")
        spool.host_id.cache_clear()
        assert spool.host_id() == "desk-at-home"
        monkeypatch.setenv("SPOOLD_HOST_ID", "bad/id")
        spool.host_id.cache_clear()
        with pytest.raises(spool.SpoolError, match="SPOOLD_HOST_ID"):
            spool.host_id()
    finally:
        spool.host_id.cache_clear()
        spool._owner_of.cache_clear()


def test_running_names_and_attempt_records_build_and_parse_back(sp: spool.Spool) -> None:
    from datetime import UTC, datetime

    tid, started = spool.new_id("sky"), datetime(2026, 11, 24, 16, 18, 16, 140000, tzinfo=UTC)
    path = spool.running_path(sp, tid, 3, started, "laptop-ab12cd-4242")
    assert path.name == f"{tid}.3.20261124T161816140Z@laptop-ab12cd-4242.md"
    e = spool.parse_running_name(path.name)
    assert e is not None and (e.task_id, e.attempt, e.started, e.host, e.pid) == (tid, 3, started, "laptop-ab12cd", 4242)
    assert e.owner == "laptop-ab12cd-4242" and spool.partial_path(path).name.endswith("@laptop-ab12cd-4242.partial")
    assert spool.parse_running_name(f"{tid}@laptop-4242.md") is None  # format 1's name: for the migration only
    assert spool.parse_v1_running_name(f"{tid}@laptop-4242.md") == (tid, "laptop-4242", "md")
    for path in (spool.requeued_record_path(sp, tid, 2), spool.waited_record_path(sp, tid, 3, started),
                 spool.retried_result_path(sp, tid, 3, started)):
        spool.write_new(sp, path, b"{}\n")
    records = spool.attempt_records(sp, tid)
    assert [(r.attempt, r.kind, r.owner) for r in records] == [
        (2, "requeued", spool.owner_tag()), (3, "waited", spool.owner_tag()), (3, "retried", spool.owner_tag())]
    assert spool.last_attempt(records) == 3 and spool.retry_base(records) == 3
    assert spool.attempt_records(sp, spool.new_id("none")) == []


def test_group_commit_defers_every_fsync_to_one_flush(sp: spool.Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """`durability: batch`: writes and moves fsync nothing; one commit flushes them all, and only when due."""
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    sp.local.batch = True
    assert durability.commit(sp) is False  # nothing written: no flush
    path = spool.write_new(sp, sp.dir("queued") / "x.md", b"hello")
    spool.move(path, sp.dir("running") / "x.md", sp=sp)
    assert synced == [] and sp.local.dirty
    assert durability.commit(sp) is True and not sp.local.dirty
    assert (sp.dir("running") / "x.md").read_bytes() == b"hello"
    sp.local.batch = False
    spool.write_new(sp, sp.dir("queued") / "y.md", b"again")
    assert len(synced) == 2  # full durability: the file and its directory


def test_group_commit_is_refused_where_a_power_cut_could_undo_more() -> None:
    """Only ext4 with its journal, data=ordered, keeps names behind their bytes; anything else says why."""
    why = durability.problem(Path("/proc"))
    assert why is not None and "proc" in why


def test_the_names_in_queued_that_are_no_tasks_are_those_that_do_not_parse(sp: spool.Spool) -> None:
    good = "2.00000000T000000Z.20261202T095027067Z-abcdef-t3.md"
    timed = "1.20261202T010203Z.20261202T095027067Z-abcdef-t4.md"
    names = [good, timed, "x.md", "2.20261399T000000Z.20261202T095027067Z-abcdef-t3.md", "a\nb", good + ".tmp",
             "4.00000000T000000Z.20261202T095027067Z-abcdef-t3.md", ".hidden", "2.00000000T000000Z.bad.md"]
    for n in names:
        (sp.dir("queued") / n).write_text("x")
    listing = spool.list_queued(sp)
    assert listing.unparsed == sorted(n for n in names if spool.parse_queued_name(n) is None)
    assert listing.names == [timed, good] and [e.task_id for e in listing] == [spool.queued_id(timed), spool.queued_id(good)]
