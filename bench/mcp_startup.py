"""`spoold-mcp` start-up: spawn → `tools/list` answered over stdio, next to a bare MCP SDK server with one tool,
warm and cold bytecode caches, interleaved in the same run."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import anyio
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client

from bench.common import PY, ROOT, child_env, median, ms, new_spool, table, target, tmpdir

TARGET_RATIO = 1.15
WARM_UPS = 3  # writes the .pyc files and fills the page cache, as on an installed system

BARE_SERVER = '''\
from mcp.server import MCPServer

server = MCPServer(name="bare")


@server.tool()
def echo(text: str) -> str:
    """Return the text."""
    return text


server.run("stdio")
'''


def spoold_mcp_exe() -> str:
    """The installed `spoold-mcp` console script beside this interpreter: what a client's config runs."""
    beside = Path(PY).with_name("spoold-mcp")
    return str(beside) if beside.exists() else (shutil.which("spoold-mcp") or "spoold-mcp")


async def _until_tools(argv: list[str], env: dict[str, str]) -> float:
    """Seconds from spawn to the answer of tools/list (initialize first, as every client does)."""
    params = StdioServerParameters(command=argv[0], args=argv[1:], env=env, cwd=str(ROOT))
    t = time.perf_counter()
    async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
        await session.initialize()
        tools = (await session.list_tools()).tools
        elapsed = time.perf_counter() - t
    assert tools, argv
    return elapsed


def _timed(argv: list[str], env: dict[str, str], cold_base: Path | None) -> float:
    """One spawn; with `cold_base`, Python reads and writes bytecode only in a new empty directory, so every
    module (stdlib, site-packages, spoold) compiles from source, as on a fresh machine's first start."""
    if cold_base is not None:
        env = env | {"PYTHONPYCACHEPREFIX": tempfile.mkdtemp(prefix="pyc-", dir=cold_base)}
    return anyio.run(_until_tools, argv, env)


def run(quick: bool) -> str:
    runs = 5 if quick else 15
    with tmpdir("mcp-startup") as base:
        bare_py = base / "bare_server.py"
        bare_py.write_text(BARE_SERVER)
        env = child_env(SPOOLD_DIR=str(new_spool(base)))
        env.pop("PYTHONPYCACHEPREFIX", None)  # warm means the caches beside the sources, as installed
        servers = {"bare SDK server, one tool": [PY, str(bare_py)], "`spoold-mcp`": [spoold_mcp_exe()]}
        for _ in range(WARM_UPS):
            for argv in servers.values():
                _timed(argv, env, None)
        warm: dict[str, list[float]] = {name: [] for name in servers}
        cold: dict[str, list[float]] = {name: [] for name in servers}
        cold_base = base / "cold"
        cold_base.mkdir()
        for _ in range(runs):
            for name, argv in servers.items():
                warm[name].append(_timed(argv, env, None))
                cold[name].append(_timed(argv, env, cold_base))
    bare = next(iter(servers))
    rows = []
    for name in servers:
        w, c = median(warm[name]) / median(warm[bare]), median(cold[name]) / median(cold[bare])
        verdict = "" if name == bare else " / ".join(
            f"{kind} " + target(f"`spoold-mcp` spawn → `tools/list` ÷ a bare SDK server, {kind} bytecode cache",
                                f"{r:.2f}×", f"≤ {TARGET_RATIO:g}×", r <= TARGET_RATIO).rpartition(" ")[2]
            for kind, r in (("warm", w), ("cold", c)))
        rows.append([name, ms(median(warm[name])), f"{w:.2f}×", ms(median(cold[name])), f"{c:.2f}×",
                     f"≤ {TARGET_RATIO:g}× {verdict}" if verdict else ""])
    note = (f"Spawn until `tools/list` is answered (after `initialize`), through the SDK's stdio client; median of "
            f"{runs} interleaved runs each. Warm: bytecode caches beside the sources, written by {WARM_UPS} runs "
            "first. Cold: a new empty `PYTHONPYCACHEPREFIX` for every spawn, so both servers compile every module "
            "they import (stdlib, SDK, spoold) from source, as on a fresh machine or under "
            "`PYTHONDONTWRITEBYTECODE=1`; frozen stdlib modules stay frozen for both.")
    return ("### `spoold-mcp` start-up\n\n"
            + table(["server", "warm", "ratio", "cold", "ratio", "target"], rows) + "\n\n" + note)
