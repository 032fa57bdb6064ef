"""`spoold search` over 10k and 100k finished tasks: building the index, a query, memory."""

from __future__ import annotations

import random
import subprocess
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from bench.common import child_env, median, new_spool, spoold_exe, table, tmpdir

WORDS = ["comet", "nebula", "orbit", "photon", "quasar", "lattice", "enzyme", "protein", "cipher", "ledger", "harbor", "glacier", "delta", "canyon", "sonnet", "fugue", "cadence", "meter", "verb", "noun", "syntax", "parser", "kernel", "thread", "socket", "packet", "router", "switch"]


def fill(root: Path, n: int) -> None:
    """n finished tasks with varied prompts and answers in one partition (setup only: no fsync)."""
    from spoold import spool
    from spoold.task import Result, Task, render_result, render_task

    sp = spool.open_spool(root)
    rng = random.Random(7)
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    d = spool.date_dir(sp, "done", t0)
    d.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        tid = spool.new_id("task", now=t0 + timedelta(milliseconds=i))
        prompt = " ".join(rng.choices(WORDS, k=12)) + "\n"
        answer = " ".join(rng.choices(WORDS, k=120)) + "\n"
        (d / f"{tid}.md").write_bytes(render_task(Task(id=tid, prompt=prompt, submitted_at=t0)))
        (d / f"{tid}.result.md").write_bytes(render_result(Result(id=tid, status="done", answer=answer,
                                                                  finished_at=t0)))


def _timed(args: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one command, from /usr/bin/time-free rusage."""
    import resource

    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    subprocess.run(args, env=env, check=True, capture_output=True)
    dt = time.perf_counter() - t
    return dt, max(before, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss) / 1024


def measure(n: int, runs: int) -> dict[str, float]:
    with tmpdir(f"search-{n}") as base:
        root = new_spool(base, backend="command", command=["true"])
        fill(root, n)
        env = child_env(SPOOLD_DIR=str(root), XDG_STATE_HOME=str(base / "state"))
        exe = spoold_exe()
        build, rss = _timed([exe, "search", "--rebuild", "comet", "nebula"], env)
        query = median([_timed([exe, "search", "comet", "nebula", "quasar"], env)[0] for _ in range(runs)])
        return {"build": build, "query": query, "rss": rss}


def run(quick: bool) -> str:
    runs = 1 if quick else 3
    sizes = (10_000, 100_000)
    res = {n: measure(n, runs) for n in sizes}
    rows = [["index built from the spool (`search --rebuild`)", *[f"{res[n]['build']:.1f} s" for n in sizes]],
            ["a query (the index brought up to date first)", *[f"{res[n]['query']:.2f} s" for n in sizes]],
            ["peak RSS of the searching process (so far)", *[f"{res[n]['rss']:.0f} MB" for n in sizes]]]
    note = (f"Finished tasks with 12-word prompts and 120-word answers in one partition; median of {runs} "
            "query run(s). Each query first brings the index up to date: only directories whose mtime moved "
            "since the last one are listed again.")
    return "### Search\n\n" + table(["", *[f"{n:,} done" for n in sizes]], rows) + "\n\n" + note
