"""`spoold submit` start-up: its wall time next to `python -c pass`, interleaved in the same run, from a
regular install (as pip or pipx leaves it) and from this checkout's editable one."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from bench.common import PY, ROOT, child_env, median, ms, new_spool, spoold_exe, table, target, tmpdir

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


def _regular_install(base: Path) -> str:
    """This checkout built as a wheel and installed (no editable import hook) in a venv of its own; its
    dependencies are this environment's, seen through a .pth line (which runs no .pth files inside)."""
    wheels = base / "wheel"
    subprocess.run([PY, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(ROOT)], check=True,
                   capture_output=True)
    venv = base / "venv"
    subprocess.run([PY, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    subprocess.run([PY, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index",
                    *map(str, wheels.glob("*.whl"))], check=True, capture_output=True)
    site = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    (Path(site) / "spoold-bench-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return str(venv / "bin" / "spoold")


def run(quick: bool) -> str:
    runs = 15 if quick else 40
    with tmpdir("startup") as base:
        env = child_env(SPOOLD_DIR=str(new_spool(base)))
        try:
            regular: str | None = _regular_install(base)
        except (subprocess.CalledProcessError, OSError) as e:
            print(f"startup: no regular install ({e}); the editable one only", file=sys.stderr)
            regular = None
        # Each spoold is held to `python -c pass` of its own interpreter and site: the editable install's
        # import hook runs at every start of this checkout's venv, and would flatter a regular install's ratio.
        commands = {"editable base": [PY, "-c", "pass"], "editable": [spoold_exe(), "submit", "what is a spool?"]}
        if regular:
            commands["regular base"] = [str(Path(regular).with_name("python")), "-c", "pass"]
            commands["regular"] = [regular, "submit", "what is a spool?"]
        for _ in range(3):  # warm the page cache and write .pyc files, as on an installed system
            for argv in commands.values():
                _wall(argv, env)
        times: dict[str, list[float]] = {k: [] for k in commands}
        for _ in range(runs):
            for k, argv in commands.items():
                times[k].append(_wall(argv, env))
        heavy = _imports_of_submit(env)
    judged = "regular" if regular else "editable"
    rows = []
    for k, label in (("regular", "a regular install (pip, pipx)"), ("editable", "this checkout's editable install")):
        if k not in times:
            continue
        base_s = median(times[f"{k} base"])
        ratio = median(times[k]) / base_s
        verdict = target("`spoold submit` start-up ÷ `python -c pass`", f"{ratio:.2f}×", f"≤ {TARGET_RATIO:g}×",
                         ratio <= TARGET_RATIO) if k == judged else ""
        rows.append([f"`python -c pass`, {label}'s interpreter", ms(base_s), "1.00×", ""])
        rows.append([f"`spoold submit \"...\"`, {label}", ms(median(times[k])), f"{ratio:.2f}×", verdict])
    note = (f"Median of {runs} interleaved runs each; each install is held to `python -c pass` of its own "
            "interpreter and site (the editable install's import hook costs every start of its venv, users never "
            "have it), and the target is judged on the regular install. Modules a submit imports "
            f"from {{{', '.join(FORBIDDEN)}}}: {', '.join(heavy) or 'none'}.")
    return "### `spoold submit` start-up\n\n" + table(["command", "wall time", "ratio", "target"], rows) + "\n\n" + note
