"""The `claude` CLI dies, hangs, lies or floods: each run ends in a clear state with a message.

Each fake `claude` is a small shell script in tmp_path, run by a real daemon through
the claude backend, exactly where the real CLI would be.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from conftest import fake_claude_script, wait_for, write_config

from spoold import api, ledger, spool

OK = '{"type":"result","subtype":"success","is_error":false,"result":"fine","total_cost_usd":0.001}'
SCRIPTS = {
    "killed by a signal": ("kill -9 $$", "failed", "killed by signal 9"),
    "garbage on stdout": ("echo 'this is not json'", "failed", "printed no result (exit 0)"),
    "truncated json": ("printf '%s' '{\"type\":\"result\",\"subtype\":\"succ'; exit 1", "failed", "printed no result (exit 1)"),
    "exit 0 with is_error": ("echo '{\"type\":\"result\",\"subtype\":\"success\",\"is_error\":true,\"result\":\"boom\"}'",
                             "failed", "claude refused the task: boom"),
    "megabytes on stderr": ("head -c 5000000 /dev/zero | tr '\\0' x >&2; echo >&2; echo 'the real reason' >&2; exit 3",
                            "failed", "the real reason"),
    "megabytes of answer": ("head -c 3000000 /dev/zero | tr '\\0' a; echo; exit 0", "failed", "printed no result"),
}


def fake_claude(tmp_path: Path, body: str) -> Path:
    return fake_claude_script(tmp_path / "claude", f"cat > /dev/null\necho $$ >> {tmp_path}/pids\n{body}")


def _pids(tmp_path: Path) -> list[int]:
    p = tmp_path / "pids"
    return [int(x) for x in p.read_text().split()] if p.exists() else []


def _alive(pid: int) -> bool:
    """Running, not merely a zombie waiting for init to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("case", sorted(SCRIPTS))
def test_each_broken_run_ends_failed_with_a_message(sp, daemon, tmp_path, case) -> None:
    body, state, message = SCRIPTS[case]
    write_config(sp, claude_bin=str(fake_claude(tmp_path, body)), max_attempts=2, retry_backoff_s=0.05)
    d = daemon(sp)
    tid = api.submit(sp, "q").id
    wait_for(lambda: spool.locate(sp, tid).state in spool.TERMINAL, timeout=30, what=case)
    info = api.info(sp, tid)
    assert info.state == state and message in info.error, info.error
    assert len(info.error) < 1000  # one readable line, never the whole stream
    assert 1 <= len(_pids(tmp_path)) <= 2  # retried only while it could help, within max_attempts
    assert d.proc.poll() is None and "Traceback" not in d.log
    assert d.stop() == 0


def test_hang_past_the_timeout_kills_the_whole_process_group(sp, daemon, tmp_path) -> None:
    """The CLI ignores SIGTERM and has a child: both are gone after the timeout, and the task says why."""
    body = "trap '' TERM\nsleep 300 &\necho $! >> " + f"{tmp_path}/pids\n" + "while :; do sleep 1; done"
    write_config(sp, claude_bin=str(fake_claude(tmp_path, body)))
    d = daemon(sp)
    tid = api.submit(sp, "---\ntimeout: 1\n---\nhang\n").id
    wait_for(lambda: spool.locate(sp, tid).state == "failed", timeout=30, what="the timeout")
    info = api.info(sp, tid)
    assert "ran past its timeout" in info.error and "timeout:" in info.error
    assert len(_pids(tmp_path)) == 2
    wait_for(lambda: not any(_alive(p) for p in _pids(tmp_path)), what="the CLI and its child to be gone")
    assert d.stop() == 0


def test_a_child_left_holding_stdout_does_not_hang_the_task(sp, daemon, tmp_path) -> None:
    """The CLI answers and exits, but a background child it started still holds the pipe open."""
    body = f"sleep 300 &\necho $! >> {tmp_path}/pids\necho '{OK}'"
    write_config(sp, claude_bin=str(fake_claude(tmp_path, body)))
    d = daemon(sp)
    t0 = time.monotonic()
    tid = api.submit(sp, "q").id
    wait_for(lambda: spool.locate(sp, tid).state == "done", timeout=30, what="done despite the child")
    assert time.monotonic() - t0 < 15 and api.result(sp, tid)[1] == "fine\n"
    wait_for(lambda: not any(_alive(p) for p in _pids(tmp_path)), what="the leftover child to be killed")
    assert d.stop() == 0


def test_missing_cli_holds_the_queue_and_keeps_the_task(sp, daemon, tmp_path) -> None:
    write_config(sp, claude_bin=str(tmp_path / "no-such-claude"))
    d = daemon(sp)
    tid = api.submit(sp, "q").id
    wait_for(lambda: "holding the queue" in d.log, what="the hold")
    assert "tasks cannot run yet: claude CLI not found" in d.log and "set claude_bin" in d.log
    wait_for(lambda: spool.locate(sp, tid).state == "queued", what="the task back in the queue")
    info = api.info(sp, tid)
    assert info.attempts == 0  # not the task's fault
    assert d.stop() == 0
    usage = ledger.read_usage(sp)
    assert usage.starts == [] and usage.hold_reason and "claude CLI not found" in usage.hold_reason  # no start used
    # Fixed (claude_bin set right) and started again: the hold, about this host's CLI, has no cause left.
    write_config(sp, claude_bin=str(fake_claude(tmp_path, f"echo '{OK}'")))
    d = daemon(sp)
    wait_for(lambda: spool.locate(sp, tid).state == "done", what="the task done, without waiting out the hold")
    assert "lifted this host's hold for its CLI" in d.log and ledger.read_usage(sp).hold_until is None
    assert d.stop() == 0
