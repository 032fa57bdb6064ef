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


def test_the_daemons_own_intake_is_no_news_whether_its_claim_comes_in_the_same_batch_or_later(
        sp: spool.Spool) -> None:
    """Each queued/ name the intake announces is linked (added), then claimed (deleted): neither is news (the
    intake told the loop), whether a batch brings both or one; after its link the name is news again."""
    watcher = Watcher(sp, lambda inbox_only: None)
    queued, name = str(sp.dir("queued")), "2.00000000T000000Z.20261207T160000000Z-abcdef-q.md"
    path = os.path.join(queued, name)
    for batches in ([{(Change.added, path)}, {(Change.deleted, path)}], [{(Change.added, path), (Change.deleted, path)}]):
        watcher.expect(name)
        assert [watcher.sort(b) for b in batches] == [(False, False, False)] * len(batches)
        assert name not in watcher._expected
    assert watcher.sort({(Change.added, path)}) == (True, False, True)  # the same name put back: news
    other = os.path.join(queued, "2.00000000T000000Z.20261207T160000001Z-bcdefa-r.md")
    watcher.expect(name)
    assert watcher.sort({(Change.added, path), (Change.added, other)}) == (True, False, True)  # a submit's


def test_an_announced_name_claimed_and_put_back_in_one_batch_is_news(sp: spool.Spool) -> None:
    """A batch is a set: linked-then-claimed looks like claimed-then-put-back (an unclaim, under the same name).
    The name still in queued/ tells them apart."""
    watcher = Watcher(sp, lambda inbox_only: None)
    name = "2.00000000T000000Z.20261207T160000000Z-abcdef-q.md"
    path = sp.dir("queued") / name
    path.write_text("---\nid: x\n---\nq\n")
    watcher.expect(name)
    assert watcher.sort({(Change.added, str(path)), (Change.deleted, str(path))}) == (True, False, True)


def test_another_daemons_watch_probe_is_no_news(sp: spool.Spool) -> None:
    watcher = Watcher(sp, lambda inbox_only: None)
    running = str(sp.dir("running"))
    theirs = os.path.join(running, ".watch-probe-otherhost-4242")
    assert watcher.sort({(Change.added, theirs), (Change.deleted, theirs)}) == (False, False, False)
    ours = str(spool.watch_probe_path(sp))
    assert watcher.sort({(Change.added, ours)}) == (False, True, False)  # ours: the watcher is up, no news


def test_queued_names_announced_by_intake_are_the_names_it_links(sp: spool.Spool) -> None:
    from spoold import intake

    announced: list[str] = []
    (sp.dir("inbox") / "q.md").write_text("a question\n")
    past = time.time() - 5
    os.utime(sp.dir("inbox") / "q.md", (past, past))
    report = intake.scan(sp, default_model="sonnet", max_bytes=1024, announce=announced.append)
    assert report.queued and announced == os.listdir(sp.dir("queued"))
