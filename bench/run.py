"""Print every benchmark as Markdown: `python bench/run.py [--quick] [--only NAME ...]`."""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import cli_overhead, concurrency, latency, limit, mcp_startup, scale, search, startup, throughput
from bench.common import CORES, TARGETS, table

PARTS = {"startup": startup, "mcp": mcp_startup, "latency": latency, "throughput": throughput, "scale": scale,
         "limit": limit, "cli": cli_overhead, "concurrency": concurrency, "search": search}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true", help="fewer runs and samples (about 3 minutes)")
    p.add_argument("--only", nargs="+", choices=sorted(PARTS), help="run only these parts")
    args = p.parse_args()
    fs = _filesystem()
    print(f"## spoold benchmarks{' (quick)' if args.quick else ''}\n")
    print(f"{CORES} cores, {platform.machine()}, Linux {platform.release()}, Python {platform.python_version()}, "
          f"spool on {fs}, {time.strftime('%Y-%m-%d')}.\n", flush=True)
    for name in args.only or PARTS:
        t = time.monotonic()
        try:
            text = PARTS[name].run(args.quick)
        except Exception as e:
            text = f"### {name}\n\n(failed: {type(e).__name__}: {e})"
        print(f"{text}\n\n<sub>{name}: {time.monotonic() - t:.0f} s</sub>\n", flush=True)
    if TARGETS:
        met = sum(1 for *_, ok in TARGETS if ok)
        print(f"### Targets: {met} of {len(TARGETS)} met\n")
        print(table(["target", "measured", "goal", ""], [[w, m, g, "met" if ok else "**missed**"]
                                                          for w, m, g, ok in TARGETS]), flush=True)
    return 0


def _filesystem() -> str:
    import tempfile

    try:
        import subprocess

        out = subprocess.run(["df", "--output=fstype", tempfile.gettempdir()], capture_output=True, text=True).stdout
        return out.split()[-1]
    except (OSError, IndexError):
        return "?"


if __name__ == "__main__":
    sys.exit(main())
