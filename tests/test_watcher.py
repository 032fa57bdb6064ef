"""Which filesystem events are news to the daemon (a new turn, a new listing of the queue)."""

from __future__ import annotations

import os
import time

from watchfiles import Change

from spoold import spool
from spoold.watcher import Watcher, is_news


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


def test_the_daemons_own_intake_is_no_news_whatever_order_a_batch_brings_its_events(sp: spool.Spool) -> None:
    """Each queued/ name the intake announces is linked, has its tmp/ name unlinked, and is claimed: none of
    that is news (the intake told the loop), in any order within a batch, and only until it leaves queued/."""
    told: list[bool] = []
    watcher = Watcher(sp, told.append)
    queued, name = str(sp.dir("queued")), "2.00000000T000000Z.20261207T160000000Z-abcdef-q.md"
    path = os.path.join(queued, name)
    watcher.expect(name)
    events = [(Change.added, path), (Change.modified, path), (Change.deleted, path)]
    for batch in ([events[0]], events[1:]), (events[::-1],):
        watcher.expect(name)
        for changes in batch:
            assert watcher.sort(set(changes)) == (False, False, False)
        assert name not in watcher._expected  # it left queued/: the same name again is news
    assert watcher.sort({(Change.added, path)}) == (True, False, True)
    other = os.path.join(queued, "2.00000000T000000Z.20261207T160000001Z-bcdefa-r.md")
    watcher.expect(name)
    assert watcher.sort({(Change.added, path), (Change.added, other)}) == (True, False, True)  # a submit's


def test_queued_names_announced_by_intake_are_the_names_it_links(sp: spool.Spool) -> None:
    from spoold import intake

    announced: list[str] = []
    (sp.dir("inbox") / "q.md").write_text("a question\n")
    past = time.time() - 5
    os.utime(sp.dir("inbox") / "q.md", (past, past))
    report = intake.scan(sp, default_model="sonnet", max_bytes=1024, announce=announced.append)
    assert report.queued and announced == os.listdir(sp.dir("queued"))
