"""Real editors in a real terminal (tmux): a file still open in vim or emacs is a draft, not a task.

Tried as a person would: `vim ~/async/inbox/q.md`, a first `:w` of a draft, more typing, `:wq`:
one task, with the final text. An editor killed with its swap file left behind holds nothing.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import pytest
from conftest import ECHO_COMMAND, drop, terminal_files, wait_for, write_config

from spoold import spool
from spoold.task import parse_result

pytestmark = pytest.mark.skipif(not shutil.which("tmux"), reason="tmux is not installed (.ci/run installs it)")


def _names_its_editor(swap: Path, pid: int) -> bool:
    """Vim writes its swap file's header (with its pid) a moment after creating the file."""
    try:
        head = swap.read_bytes()[:108]
    except FileNotFoundError:
        return False
    return head.startswith(b"b0VIM") and int.from_bytes(head[24:28], "little") == pid


def _answers(sp: spool.Spool) -> list[str]:
    return sorted(parse_result(spool.result_path_for(p.parent, p.name[:-3]).read_text()).answer
                  for p in terminal_files(sp, "done"))


def _one_scan_later(sp: spool.Spool, n: int) -> None:
    """Drop a marker and wait for its answer: the daemon has looked at the whole inbox since."""
    drop(sp, f"zz-marker-{n}.md", f"marker {n}\n")
    wait_for(lambda: any(f"marker {n}" in a for a in _answers(sp)), what=f"marker {n}")


@pytest.mark.skipif(not shutil.which("vim"), reason="vim is not installed (.ci/run installs it)")
def test_vim_draft_save_then_quit_makes_one_task_with_the_final_text(sp, daemon, terminal) -> None:
    write_config(sp, backend="command", command=ECHO_COMMAND)
    daemon(sp)
    vim = terminal(["vim", "-u", "NONE", "-N", "-i", "NONE", str(sp.dir("inbox") / "q.md")])
    vim.keys("i", "draft text", "Escape", ":w", "Enter")
    wait_for(lambda: (sp.dir("inbox") / "q.md").exists() and (sp.dir("inbox") / ".q.md.swp").exists(), what="the draft")
    _one_scan_later(sp, 1)
    assert (sp.dir("inbox") / "q.md").exists() and not any("draft" in a for a in _answers(sp))  # held, not taken
    vim.keys("o", "final text", "Escape", ":wq", "Enter")
    wait_for(lambda: any("final text" in a for a in _answers(sp)), what="the final text's answer")
    tasks = [a for a in _answers(sp) if "text" in a]
    assert tasks == ["answer: draft text\nfinal text\n"]  # one task, the whole final file


@pytest.mark.skipif(not shutil.which("vim"), reason="vim is not installed (.ci/run installs it)")
def test_an_editor_killed_with_its_swap_file_left_holds_nothing(sp, daemon, terminal) -> None:
    write_config(sp, backend="command", command=ECHO_COMMAND, scan_interval_s=0.5)
    d = daemon(sp)
    vim = terminal(["vim", "-u", "NONE", "-N", "-i", "NONE", str(sp.dir("inbox") / "lost.md")])
    vim.keys("i", "written before the crash", "Escape", ":w", "Enter")
    swap = sp.dir("inbox") / ".lost.md.swp"
    wait_for(lambda: (sp.dir("inbox") / "lost.md").exists() and _names_its_editor(swap, vim.pid),
             what="the saved file, and vim's swap file naming its process")
    os.kill(vim.pid, signal.SIGKILL)  # the swap file stays behind, naming a dead process
    wait_for(lambda: any("written before the crash" in a for a in _answers(sp)), what="the file taken after all")
    assert (sp.dir("inbox") / ".lost.md.swp").exists()  # spoold never touches an editor's files
    wait_for(lambda: "ignoring .lost.md.swp: the editor that left it is gone" in d.log, what="the report")


@pytest.mark.skipif(not shutil.which("emacs"), reason="emacs is not installed (.ci/run installs emacs-nox)")
def test_emacs_unsaved_changes_hold_the_file(sp, daemon, terminal) -> None:
    """Emacs locks a file (`.#NAME`) while its buffer has unsaved changes; the saved version waits for the last save."""
    write_config(sp, backend="command", command=ECHO_COMMAND)
    path = sp.dir("inbox") / "e.md"
    path.write_text("first version\n")  # a file in the inbox, opened before the daemon runs
    emacs = terminal(["emacs", "-nw", "-Q", str(path)])
    wait_for(lambda: "first version" in emacs.screen(), what="emacs showing the file")
    emacs.keys("M->", "more words")  # unsaved changes: emacs takes its lock
    wait_for(lambda: os.path.islink(sp.dir("inbox") / ".#e.md"), what="emacs's lock")
    daemon(sp)
    _one_scan_later(sp, 1)
    assert path.exists() and not any("first version" in a for a in _answers(sp))
    emacs.keys("C-x", "C-s")
    wait_for(lambda: any("more words" in a for a in _answers(sp)), what="the saved text's answer")
    assert [a for a in _answers(sp) if "version" in a] == ["answer: first version\nmore words\n"]
