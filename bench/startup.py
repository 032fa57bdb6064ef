"""`spoold submit` start-up: its wall time next to `python -c pass`, interleaved in the same run."""

from __future__ import annotations

import subprocess
import time

from bench.common import PY, child_env, median, ms, new_spool, spoold_exe, table, target, tmpdir

TARGET_RATIO = 2.0
FORBIDDEN = ("mcp", "watchfiles", "filelock", "asyncio")  # a submit needs none of them


def _wall(argv: list[str], env: dict[str, str]) -> float:
    t = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def _imports_of_submit(env: dict[str, str]) -> list[str]:
    code = ("import sys; from spoold.cli import main; sys.argv = ['spoold', 'submit', 'probe']; main(); "
            f"print('IMPORTS:' + ' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))))")
    out = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return out.rpartition('IMPORTS:')[2].split()


def run(quick: bool) -> str:
    runs = 15 if quick else 40
    with tmpdir("startup") as base:
        env = child_env(SPOOLD_DIR=str(new_spool(base)))
        submit = [spoold_exe(), "submit", "what is a spool?"]
        baseline = [PY, "-c", "pass"]
        for _ in range(3):  # warm the page cache and write .pyc files, as on an installed system
            _wall(baseline, env), _wall(submit, env)
        py, sub = [], []
        for _ in range(runs):
            py.append(_wall(baseline, env))
            sub.append(_wall(submit, env))
        heavy = _imports_of_submit(env)
    ratio = median(sub) / median(py)
    rows = [
        ["`python -c pass`", ms(median(py)), "1.00×", ""],
        ["`spoold submit \"...\"`", ms(median(sub)), f"{ratio:.2f}×",
         target("`spoold submit` start-up ÷ `python -c pass`", f"{ratio:.2f}×", f"≤ {TARGET_RATIO:g}×",
                ratio <= TARGET_RATIO)],
    ]
    note = (f"Median of {runs} interleaved runs each. Modules a submit imports from "
            f"{{{', '.join(FORBIDDEN)}}}: {', '.join(heavy) or 'none'}.")
    return "### `spoold submit` start-up\n\n" + table(["command", "wall time", "ratio", "target"], rows) + "\n\n" + note
