"""The real sync engines that multi-host tests run on: three hosts kept in step, a rename, an ignored
directory, a host cut off and back, and what each engine does with the same file made on two hosts."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from sync_engines import ENGINES, SyncthingCluster, UnisonLoop, conflict_copies, pid_alive, start_hosts, tree

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest) -> str:
    if shutil.which(request.param) is None:
        pytest.skip(f"{request.param} is not installed")
    return request.param


def put(host: Path, rel: str, data: bytes, mtime: float | None = None) -> Path:
    """Write the way a spool does: into tmp/ (which the engines leave alone), then rename into place."""
    (host / "tmp").mkdir(exist_ok=True)
    staging = host / "tmp" / rel.replace("/", "_")
    staging.write_bytes(data)
    if mtime is not None:
        os.utime(staging, (mtime, mtime))
    dest = host / rel
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.rename(staging, dest)
    return dest


def same_everywhere(hosts: list[Path]) -> dict[str, bytes]:
    trees = [tree(h, lambda rel: rel.startswith("tmp/")) for h in hosts]
    assert trees[1] == trees[0] and trees[2] == trees[0]
    return trees[0]


def test_three_hosts(engine: str, tmp_path: Path) -> None:
    hosts, sync = start_hosts(engine, tmp_path, 3, local_dirs=["tmp"])
    pids = list(sync.pids())
    try:
        assert len(set(pids)) == (3 if isinstance(sync, SyncthingCluster) else 2)  # unison: one per spoke
        assert all(pid_alive(p) for p in pids)
        put(hosts[0], "new/a.md", b"from host 0\n")
        put(hosts[2], "new/c.md", b"from host 2\n")
        (hosts[1] / "tmp" / "scratch").parent.mkdir()
        (hosts[1] / "tmp" / "scratch").write_bytes(b"host 1's own")
        sync.wait_synced()
        assert same_everywhere(hosts) == {"new/a.md": b"from host 0\n", "new/c.md": b"from host 2\n"}
        assert not (hosts[0] / "tmp" / "scratch").exists() and not (hosts[2] / "tmp" / "scratch").exists()

        inodes = {i: (hosts[i] / "new/a.md").stat().st_ino for i in (0, 2)}
        (hosts[1] / "cur").mkdir()
        os.rename(hosts[1] / "new/a.md", hosts[1] / "cur/a.md")
        sync.wait_synced()
        assert same_everywhere(hosts) == {"cur/a.md": b"from host 0\n", "new/c.md": b"from host 2\n"}
        moved = {i: (hosts[i] / "cur/a.md").stat().st_ino == inodes[i] for i in (0, 2)}
        # Syncthing moves the receivers' own file (same inode); Unison deletes it and writes a new one.
        assert moved == ({0: True, 2: True} if engine == "syncthing" else {0: False, 2: False})

        sync.pause(2)
        assert sync.active() == [0, 1]
        put(hosts[0], "new/p.md", b"while host 2 is away\n")
        # Host 2 and host 0 make the same path with the same bytes, and another with different
        # bytes, host 2's newer (explicit times: no sleeping to get a newer one).
        now = time.time()
        put(hosts[0], "done/same.md", b"identical\n", mtime=now - 30)
        put(hosts[2], "done/same.md", b"identical\n", mtime=now - 20)
        put(hosts[0], "done/diff.md", b"older, from host 0\n", mtime=now - 30)
        put(hosts[2], "done/diff.md", b"newer, from host 2\n", mtime=now - 20)
        sync.wait_synced()  # the two still in touch
        assert (hosts[1] / "new/p.md").exists() and not (hosts[2] / "new/p.md").exists()
        assert (hosts[2] / "done/diff.md").read_bytes() == b"newer, from host 2\n"

        sync.resume(2)
        sync.wait_synced()
        files = same_everywhere(hosts)
        assert files["new/p.md"] == b"while host 2 is away\n"
        assert files["done/same.md"] == b"identical\n"  # identical bytes: no conflict copy ...
        assert files["done/diff.md"] == b"newer, from host 2\n"  # ... different: the newer wins,
        copies = conflict_copies(hosts[0])  # the older is kept beside it, on every host: once, or (Syncthing,
        # when two devices held it and resolved a second apart) twice, never anything else
        assert copies and all(c.startswith("done/diff") and files[c] == b"older, from host 0\n" for c in copies), copies
    finally:
        sync.stop()
        sync.stop()  # harmless
    started = sync.all_pids if isinstance(sync, UnisonLoop) else pids  # unison: spoke 2 was started twice
    assert len(started) == 3 and not any(pid_alive(p) for p in started)
