"""The `spoold` commands as a user runs them: output, --json, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ECHO_COMMAND, write_config

from spoold import spool


def run(sp: spool.Spool | None, *args: str, stdin: str | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    spool_args = ["--spool", str(sp.root)] if sp else []
    cmd = [sys.executable, "-m", "spoold.cli", args[0], *spool_args, *args[1:]]
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=60, env=env)


def test_submit_then_drain_then_read(sp: spool.Spool) -> None:
    write_config(sp, backend="command", command=ECHO_COMMAND)
    r = run(sp, "submit", "What is 6*7?", "--model", "haiku", "--priority", "high")
    assert r.returncode == 0, r.stderr
    tid = r.stdout.strip()
    spool.check_id(tid)
    assert "queued #1" in r.stderr
    show = json.loads(run(sp, "show", tid, "--json").stdout)
    assert show["state"] == "queued" and show["position"] == 1 and show["model"] == "haiku"
    assert run(sp, "run", "--once").returncode == 0
    assert run(sp, "result", tid).stdout == "answer: What is 6*7?\n"
    assert run(sp, "wait", tid).returncode == 0
    st = json.loads(run(sp, "status", "--json").stdout)
    assert st["counts"]["done"] == 1 and st["counts"]["queued"] == 0
    ls = run(sp, "ls", "--state", "done")
    assert tid in ls.stdout and "done" in ls.stdout
    res = json.loads(run(sp, "result", tid, "--json").stdout)
    assert res["meta"]["status"] == "done" and res["answer"].startswith("answer:")


def test_submit_from_stdin_and_file(sp: spool.Spool, tmp_path) -> None:
    tid = run(sp, "submit", "-", stdin="---\ntitle: From stdin\n---\nhello\n").stdout.strip()
    assert json.loads(run(sp, "show", tid, "--json").stdout)["title"] == "From stdin"
    f = tmp_path / "research-plan.md"
    f.write_text("plan it\n")
    tid2 = run(sp, "submit", str(f)).stdout.strip()
    assert "research-plan" in tid2


def test_wait_exit_codes_and_retry(sp: spool.Spool) -> None:
    write_config(sp, backend="command", command=[sys.executable, "-c", "import sys; sys.exit('boom')"])
    tid = run(sp, "submit", "q").stdout.strip()
    assert run(sp, "wait", tid, "--timeout", "0.2").returncode == 124
    run(sp, "run", "--once")
    w = run(sp, "wait", tid)
    assert w.returncode == 1 and "boom" in w.stderr
    assert run(sp, "retry", tid).returncode == 0
    assert json.loads(run(sp, "show", tid, "--json").stdout)["state"] == "queued"


def test_cancel_queued(sp: spool.Spool) -> None:
    tid = run(sp, "submit", "q").stdout.strip()
    assert run(sp, "cancel", tid).stdout.strip() == f"{tid} cancelled"
    again = run(sp, "cancel", tid)
    assert again.returncode != 0 and again.stderr.count("\n") == 1 and "already cancelled" in again.stderr


@pytest.mark.parametrize("cmd", ["show", "result", "cancel", "wait", "retry"])
@pytest.mark.parametrize("bad", ["../../etc/passwd", "/etc/passwd", "20261124T160000000Z-abcdef"])
def test_bad_or_unknown_ids_are_one_line_errors(sp: spool.Spool, cmd: str, bad: str) -> None:
    r = run(sp, cmd, bad)
    assert r.returncode != 0
    assert r.stderr.startswith("spoold: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


def test_missing_spool_is_a_clear_error(tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "spoold.cli", "status", "--spool", str(tmp_path / "none")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "spoold init" in r.stderr and "Traceback" not in r.stderr


def test_config_reads_and_writes(sp: spool.Spool) -> None:
    out = json.loads(run(sp, "config", "--max-requests", "20", "--window", "30", "--json").stdout)
    assert out["max_requests"] == 20 and out["window_minutes"] == 30
    bad = run(sp, "config", "--concurrency", "0")
    assert bad.returncode == 2 and "concurrency must be at least 1" in bad.stderr
    assert json.loads(run(sp, "config", "--json").stdout)["concurrency"] == 1


def test_environment_and_flag_precedence(sp: spool.Spool) -> None:
    write_config(sp, max_requests=7)
    env = dict(__import__("os").environ, MAX_REQUESTS="9")
    assert json.loads(run(sp, "config", "--json", env=env).stdout)["max_requests"] == 9
    assert json.loads(run(sp, "config", "--json").stdout)["max_requests"] == 7


def test_mcp_config_prints_desktop_json(sp: spool.Spool) -> None:
    out = json.loads(run(sp, "mcp-config").stdout)
    entry = out["mcpServers"]["spoold"]
    assert entry["command"].endswith("spoold-mcp") and entry["env"]["SPOOLD_DIR"] == str(sp.root)


def test_status_and_ls_show_what_the_subscription_said(sp: spool.Spool) -> None:
    import time

    from spoold import ledger
    from spoold.config import Settings

    seen = ledger.WindowSeen("allowed_warning", time.time() + 3600, 0.85, time.time(), "20261124T160000000Z-abcdef")
    ledger.record_finish(sp, Settings(), None, None, {"five_hour": seen})
    write_config(sp, reserve=0.2)
    status = run(sp, "status")
    assert "reserve 20% of each subscription window" in status.stdout
    assert "subscription 5-hour window: 85% used, resets " in status.stdout
    assert "next start not before" in status.stdout and "reserve: the 5-hour window is 85% used" in status.stdout
    assert "subscription 5-hour window: 85% used" in run(sp, "ls").stdout
    [w] = json.loads(run(sp, "status", "--json").stdout)["windows"]
    assert w["name"] == "five_hour" and w["utilization"] == 0.85 and w["task_id"].endswith("abcdef")
