"""Which filesystem events are news to the daemon (a new turn, a new listing of the queue)."""

from __future__ import annotations

from watchfiles import Change

from spoold import spool
from spoold.watcher import is_news


def test_a_running_tasks_answer_so_far_is_never_news_and_another_daemons_end_is(sp: spool.Spool) -> None:
    running, me, other = str(sp.dir("running")), spool.owner_tag(), "otherhost-42"
    name = "20261207T160000000Z-abcdef-q.1.20261207T160001000Z"
    assert not is_news(sp, Change.added, running, f"{name}@{me}.partial", me)
    assert not is_news(sp, Change.deleted, running, f"{name}@{me}.partial", me)  # a finish removes it
    assert not is_news(sp, Change.deleted, running, f"{name}@{other}.partial", me)
    assert not is_news(sp, Change.deleted, running, f"{name}@{me}.md", me)  # our own end: the run told us
    assert is_news(sp, Change.deleted, running, f"{name}@{other}.md", me)  # a slot another daemon held is free
    assert is_news(sp, Change.added, running, "20261207T160000000Z-abcdef-q.cancel", me)
    assert is_news(sp, Change.added, str(sp.dir("inbox")), "question.md", me)
