"""Search over finished tasks: an FTS5 index that is only ever a cache of the directories."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta

import pytest

from spoold import api, history, search, spool, transitions
from spoold.errors import BadInput
from spoold.task import Result, Task

WHEN = datetime(2026, 11, 20, 9, 0, tzinfo=UTC)


def _done(sp: spool.Spool, prompt: str, answer: str, *, title: str | None = None, tags: list[str] | None = None,
          when: datetime = WHEN, status: str = "done") -> str:
    t = Task(id=spool.new_id("t", now=when), prompt=prompt, title=title, tags=tags or [])
    transitions.enqueue(sp, t)
    [e] = [e for e in spool.list_queued(sp) if e.task_id == t.id]
    c = transitions.claim(sp, e, "sonnet")
    assert c
    transitions.finish(sp, c, Result(id=t.id, status=status, answer=answer, finished_at=when, error=None if status == "done" else "x"))
    return t.id


def test_ranked_matches_over_prompts_titles_tags_and_answers(sp: spool.Spool) -> None:
    in_title = _done(sp, "explain it", "some text", title="Rayleigh scattering for kids")
    in_answer = _done(sp, "why is the sky blue?", "Because of Rayleigh scattering of sunlight.")
    _done(sp, "unrelated", "nothing to see")
    tagged = _done(sp, "plan the trip", "go west", tags=["travel"])
    hits = api.search(sp, "rayleigh scattering")
    assert [h.id for h in hits] == [in_title, in_answer]  # a title match ranks first
    assert "[Rayleigh]" in hits[1].snippet or "[scattering]" in hits[1].snippet
    assert [h.id for h in api.search(sp, "travel")] == [tagged]
    assert api.search(sp, "rayleigh zebra") == []  # every word must appear
    with pytest.raises(BadInput):
        api.search(sp, "  ?! ")


def test_the_index_follows_the_directories_and_lives_outside_the_spool(sp: spool.Spool) -> None:
    first = _done(sp, "about comets", "ice and dust")
    assert [h.id for h in api.search(sp, "comets")] == [first]
    assert not str(search.index_path(sp)).startswith(str(sp.root))
    second = _done(sp, "more comets", "tails point away from the sun", when=WHEN + timedelta(days=2))
    assert {h.id for h in api.search(sp, "comets")} == {first, second}  # new tasks are picked up
    assert [h.id for h in api.search(sp, "comets", since=WHEN + timedelta(days=1))] == [second]
    history.prune(sp, WHEN + timedelta(days=1))
    assert [h.id for h in api.search(sp, "comets")] == [second]  # pruned tasks leave the index too
    assert search.refresh(sp) == 0  # nothing changed: nothing re-read
    search.index_path(sp).write_bytes(b"not a database at all")  # a damaged cache is rebuilt, never trusted
    assert [h.id for h in api.search(sp, "comets")] == [second]
    assert api.rebuild_index(sp) == 1


def test_state_filter(sp: spool.Spool) -> None:
    ok = _done(sp, "penguins", "they swim")
    bad = _done(sp, "penguins again", "", status="failed")
    assert {h.id for h in api.search(sp, "penguins")} == {ok, bad}
    assert [h.id for h in api.search(sp, "penguins", states=["failed"])] == [bad]
    assert os.path.exists(search.index_path(sp))


def test_only_changed_directories_are_read_again(sp: spool.Spool, monkeypatch) -> None:
    monkeypatch.setattr(search, "RACY_S", -3600.0)  # trust every mtime at once (no tick can be racy here)
    first = _done(sp, "about owls", "they hoot")
    assert [h.id for h in api.search(sp, "owls")] == [first]
    assert search.refresh(sp) == 0
    second = _done(sp, "more owls", "they fly at night")  # the same day's partition: its mtime moves
    assert {h.id for h in api.search(sp, "owls")} == {first, second}
