"""Private by default: what spoold creates is 0600/0700 whatever the umask; an unsafe spool is refused."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ECHO_COMMAND, ROOT, write_config

from spoold import api, spool
from spoold.errors import BadTaskId, SpoolError


def _cli(*args: str, umask: int | None = None) -> subprocess.CompletedProcess:
    pre = (lambda: os.umask(umask)) if umask is not None else None
    return subprocess.run([sys.executable, "-m", "spoold.cli", *args], capture_output=True, text=True, timeout=60,
                          cwd=ROOT, preexec_fn=pre)


def test_everything_spoold_creates_is_private_even_with_umask_0(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    assert _cli("init", "--spool", str(root), umask=0).returncode == 0
    sp = spool.open_spool(root, create=False)
    write_config(sp, backend="command", command=ECHO_COMMAND)
    os.chmod(sp.config_path, 0o600)
    user_files = {"good.md", "bad.md"}
    (sp.dir("inbox") / "good.md").write_text("hello\n")
    (sp.dir("inbox") / "bad.md").write_text("---\nmodel: [x\n---\nq\n")
    assert _cli("submit", "--spool", str(root), "submitted", umask=0).returncode == 0
    assert _cli("config", "--spool", str(root), "--max-requests", "50", umask=0).returncode == 0
    r = _cli("run", "--once", "--spool", str(root), umask=0)
    assert r.returncode == 0, r.stderr
    assert len(list(sp.root.rglob("*.result.md"))) == 3
    checked = 0
    for p in [sp.root, *sp.root.rglob("*")]:
        mode = stat.S_IMODE(os.lstat(p).st_mode)
        if p.is_dir():
            assert mode == 0o700, (p, oct(mode))
        elif p.parent == sp.dir("failed") and p.name.endswith(".md") and not p.name.endswith(".result.md"):
            continue  # the user's own rejected file, kept as they made it
        else:
            assert mode & 0o077 == 0, (p, oct(mode))
        checked += 1
    assert checked > 15 and not (user_files & {p.name for p in sp.root.rglob("*")})


@pytest.mark.parametrize("bits", [0o777, 0o770, 0o702])
def test_a_spool_others_can_write_is_refused(tmp_path: Path, bits: int) -> None:
    root = tmp_path / "spool"
    spool.open_spool(root)
    os.chmod(root, bits)
    r = _cli("status", "--spool", str(root))
    assert r.returncode == 2 and "writable by others" in r.stderr and f"chmod 700 {root}" in r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert _cli("run", "--once", "--spool", str(root)).returncode == 2  # the daemon will not serve it either


def test_a_world_writable_inbox_is_refused(tmp_path: Path) -> None:
    sp = spool.open_spool(tmp_path / "spool")
    os.chmod(sp.dir("inbox"), 0o777)  # anyone could drop a prompt that runs on your account
    with pytest.raises(SpoolError, match="inbox is writable by others"):
        spool.open_spool(sp.root)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the spool away")
def test_a_spool_another_user_owns_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    spool.open_spool(root)
    os.chown(root, 12345, 12345)
    r = _cli("submit", "--spool", str(root), "q")
    assert r.returncode == 2 and "owned by another user (uid 12345)" in r.stderr and "Traceback" not in r.stderr


def test_a_state_directory_that_is_a_symlink_is_refused(tmp_path: Path) -> None:
    sp = spool.open_spool(tmp_path / "spool")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    sp.dir("inbox").rmdir()
    sp.dir("inbox").symlink_to(elsewhere)
    with pytest.raises(SpoolError, match="inbox is a symbolic link"):
        spool.open_spool(sp.root)


ESCAPES = ["../../etc/passwd", "/etc/passwd", "20261124T160000000Z-abcdef/../../x", "..", ".", "~root", "",
           "20261124T160000000Z-abcdef\0", "20261124T160000000Z-abcdef\n", "20261124T160000000Z-abcdef.md",
           "2.00000000T000000Z.20261124T160000000Z-abcdef", "x" * 5000, "20261124T160000000Z-abcdef-" + "a" * 60]


@pytest.mark.parametrize("bad", ESCAPES)
def test_ids_that_try_to_leave_the_spool_are_refused_before_any_path_is_built(sp, bad: str) -> None:
    for call in (lambda: api.info(sp, bad), lambda: api.result(sp, bad), lambda: api.cancel(sp, bad),
                 lambda: api.retry(sp, bad), lambda: api.wait(sp, bad, 0)):
        with pytest.raises(BadTaskId, match="not a task id"):
            call()


@pytest.mark.parametrize("cmd", ["show", "result", "cancel"])
@pytest.mark.parametrize("bad", ["..", "~root", "20261124T160000000Z-abcdef/../../x", "x" * 5000, "-"])
def test_cli_refuses_escaping_ids_in_one_line(sp, cmd: str, bad: str) -> None:
    r = _cli(cmd, "--spool", str(sp.root), "--", bad) if bad.startswith("-") else _cli(cmd, "--spool", str(sp.root), bad)
    assert r.returncode == 2 and r.stderr.startswith("spoold: not a task id") and r.stderr.count("\n") == 1
    assert len(r.stderr) < 200
