"""The `spoold` commands as a user runs them: output, --json, exit codes, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    assert tid.split("-")[1] in ls.stdout and "done" in ls.stdout  # the short id a person types
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


def test_one_exit_code_contract_and_result_prints_only_the_answer(sp: spool.Spool) -> None:
    write_config(sp, backend="command", command=[sys.executable, "-c",
                 "import sys; p = sys.stdin.read(); sys.exit('boom') if 'fail' in p else print('answer: ' + p.strip())"])
    ok, bad = run(sp, "submit", "fine").stdout.strip(), run(sp, "submit", "please fail").stdout.strip()
    queued = run(sp, "submit", "later", "--not-before", "2099-01-01T00:00:00Z").stdout.strip()
    run(sp, "run", "--once")
    cancelled = run(sp, "submit", "never").stdout.strip()
    run(sp, "cancel", cancelled)
    r = run(sp, "result", ok)
    assert (r.returncode, r.stdout, r.stderr) == (0, "answer: fine\n", "")
    r = run(sp, "result", bad)
    assert r.returncode == 1 and r.stdout == "" and "failed" in r.stderr and "boom" in r.stderr
    r = run(sp, "result", cancelled)
    assert r.returncode == 3 and r.stdout == "" and "cancelled" in r.stderr
    r = run(sp, "result", queued)
    assert r.returncode == 4 and r.stdout == "" and "is queued" in r.stderr and "spoold wait" in r.stderr
    assert run(sp, "result", "20261124T160000000Z-abcdef").returncode == 5
    assert run(sp, "cancel", ok).returncode == 6
    assert [run(sp, "wait", t).returncode for t in (ok, bad, cancelled)] == [0, 1, 3]
    assert run(sp, "wait", queued, "--timeout", "0.1").returncode == 124


def test_a_task_is_named_by_prefix_random_part_file_name_or_last(sp: spool.Spool, tmp_path) -> None:
    f = tmp_path / "sky.md"
    f.write_text("why blue\n")
    sky = run(sp, "submit", str(f)).stdout.strip()
    other = run(sp, "submit", "second").stdout.strip()
    for name in (sky[:22], sky.split("-")[1], "sky.md", "sky"):
        assert json.loads(run(sp, "show", name, "--json").stdout)["id"] == sky, name
    assert json.loads(run(sp, "show", "@last", "--json").stdout)["id"] == other
    both = run(sp, "show", sky[:8])  # the date part: both tasks have it
    assert both.returncode == 2 and "names 2 tasks" in both.stderr and sky in both.stderr and other in both.stderr


def test_json_everywhere_carries_what_the_text_does(sp: spool.Spool) -> None:
    write_config(sp, backend="command", command=ECHO_COMMAND)
    tid = run(sp, "submit", "q").stdout.strip()
    run(sp, "run", "--once")
    waited = json.loads(run(sp, "wait", tid, "--json").stdout)
    assert waited["answer"] == "answer: q\n" and waited["info"]["state"] == "done"
    other = run(sp, "submit", "q2").stdout.strip()
    assert json.loads(run(sp, "cancel", other, "--json").stdout) == {"id": other, "state": "cancelled"}
    retried = json.loads(run(sp, "retry", other, "--json").stdout)
    assert retried["id"] == other and retried["state"] == "queued"


def test_submit_of_a_missing_file_is_an_error_unless_text(sp: spool.Spool) -> None:
    r = run(sp, "submit", "./missing.md")
    assert r.returncode == 2 and "no such file: ./missing.md" in r.stderr and "--text" in r.stderr
    tid = run(sp, "submit", "--text", "./missing.md").stdout.strip()
    assert json.loads(run(sp, "show", tid, "--json").stdout)["title"] == "./missing.md"


def test_spool_before_the_command_and_config_as_yaml(sp: spool.Spool) -> None:
    r = subprocess.run([sys.executable, "-m", "spoold.cli", "--spool", str(sp.root), "config"],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "max_requests: 10\n" in r.stdout and "budget_day_usd: null" in r.stdout
    assert "None" not in r.stdout and "False" not in r.stdout
    assert "notify_on:\n  done: [all]\n  failed: [all]\n" in r.stdout  # the default rule, not an empty {}
    changed = run(sp, "config", "--max-requests", "4")
    assert changed.stdout == "max_requests: 10 -> 4\n"
    bad = run(sp, "config", "--unset", "window")
    assert bad.returncode == 2 and "no setting 'window'" in bad.stderr and "window_minutes" in bad.stderr
    assert run(sp, "config", "--clear-hold").stdout == "no hold to lift\n"
    import time as time_mod

    from spoold import ledger
    from spoold.config import Settings

    ledger.set_hold(sp, Settings(), time_mod.time() + 3600, "subscription 5-hour limit reached")
    assert run(sp, "config", "--clear-hold").stdout == "hold lifted: tasks start again now\n"
    (sp.root / "config.yaml").write_text("max_reqests: 5\nmax_requests: lots\n")  # a typo and a bad value
    assert run(sp, "status").returncode == 2 and "--unset" in run(sp, "status").stderr
    assert run(sp, "config", "--unset", "max_reqests", "--unset", "max_requests").returncode == 0  # repaired
    assert run(sp, "status").returncode == 0


@pytest.mark.parametrize(("seconds", "text"), [(5, "5s"), (245, "4m05s"), (7800, "2h10m"), (97_344_000, "1126d16h")])
def test_long_waits_read_in_days(seconds: float, text: str) -> None:
    from spoold.cli import _dur

    assert _dur(seconds) == text


def test_status_says_whether_a_daemon_serves_and_shows_its_settings(sp: spool.Spool, daemon) -> None:
    run(sp, "submit", "q", "--not-before", "2099-01-01T00:00:00Z")
    idle = run(sp, "status")
    assert "no daemon is serving this spool" in idle.stdout and "once a daemon runs" in idle.stdout
    assert json.loads(run(sp, "status", "--json").stdout)["serving"] is False
    write_config(sp, backend="command", command=ECHO_COMMAND, max_requests=7)
    d = daemon(sp, env={"MAX_REQUESTS": "3"})  # the daemon's own environment sets its limit
    st = json.loads(run(sp, "status", "--json").stdout)
    [me] = st["daemons"]
    assert st["serving"] is True and me["pid"] == d.proc.pid and me["alive"] is True
    assert st["settings"]["max_requests"] == 3  # what the daemon uses, not this shell's config-only view
    assert f"daemon pid {d.proc.pid} on this host, serving since" in run(sp, "status").stdout
    assert d.stop() == 0
    assert json.loads(run(sp, "status", "--json").stdout)["daemons"] == []


def _tty_run(sp: spool.Spool, *args: str, env: dict | None = None) -> str:
    """Run a command with its stdout on a pseudo-terminal, as a person's shell would."""
    import os

    master, slave = os.openpty()
    cmd = [sys.executable, "-m", "spoold.cli", args[0], "--spool", str(sp.root), *args[1:]]
    proc = subprocess.Popen(cmd, stdout=slave, stderr=subprocess.PIPE, env=env)
    os.close(slave)
    out = b""
    while True:
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=30)
    os.close(master)
    return out.decode()


def test_ls_is_one_table_newest_first_with_why_and_filters(sp: spool.Spool) -> None:
    write_config(sp, backend="command", command=[sys.executable, "-c",
                 "import sys; p = sys.stdin.read(); sys.exit('the model refused') if 'fail' in p else print(p)"])
    first = run(sp, "submit", "---\ntags: [sky]\n---\nan old one").stdout.strip()
    bad = run(sp, "submit", "please fail", "-m", "opus").stdout.strip()
    run(sp, "run", "--once")
    waiting = run(sp, "submit", "a new one").stdout.strip()
    lines = run(sp, "ls").stdout.splitlines()
    assert lines[0].split() == ["ID", "STATE", "MODEL", "SUBMITTED", "WHEN", "TITLE", "/", "WHY"]
    assert [ln.split()[0] for ln in lines[1:4]] == [t.split("-")[1] for t in (waiting, bad, first)]  # newest first
    assert "failed" in lines[2] and "the model refused" in lines[2]  # a failed row says why
    assert "#1 in" in lines[1] and "\x1b[" not in "".join(lines)  # plain in a pipe
    assert [ln.split()[0] for ln in run(sp, "ls", "--state", "failed").stdout.splitlines()[1:]] == [bad.split("-")[1]]
    assert run(sp, "ls", "--tag", "sky").stdout.count("\n") == 2 and first.split("-")[1] in run(sp, "ls", "--tag", "sky").stdout
    assert bad.split("-")[1] in run(sp, "ls", "--model", "opus").stdout and first.split("-")[1] not in run(sp, "ls", "--model", "opus").stdout
    assert run(sp, "ls", "-n", "1").stdout.count("\n") == 2
    assert run(sp, "ls", "--since", "1h").stdout.count("\n") == 4
    rows = json.loads(run(sp, "ls", "--json", "--state", "done").stdout)
    assert rows[0]["result_path"].endswith(".result.md") and rows[0]["duration_s"] is not None


def test_a_spool_or_log_path_that_cannot_be_used_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    blocker = tmp_path / "afile"
    blocker.write_text("not a directory")
    for spool_dir in (blocker, blocker / "sub"):
        r = subprocess.run([sys.executable, "-m", "spoold.cli", "--spool", str(spool_dir), "init"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
        assert f"cannot make a spool at {spool_dir}: a file is in the way" in r.stderr
    good = tmp_path / "spool"
    for log_file, why in ((tmp_path / "no" / "such" / "x.log", "No such file"), (tmp_path, "Is a directory")):
        r = subprocess.run([sys.executable, "-m", "spoold.cli", "run", "--once", "--spool", str(good),
                            "--log-file", str(log_file)], capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and r.stderr == f"spoold: cannot write the log to {log_file}: {why}" + (
            "\n" if why == "Is a directory" else " or directory\n")


def test_web_on_a_port_it_cannot_have_is_one_line(sp: spool.Spool) -> None:
    import socket

    bad = run(sp, "web", "--port", "99999")
    assert bad.returncode == 2 and "'99999' is not a port (1 to 65535)" in bad.stderr and bad.stdout == ""
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        busy = run(sp, "web", "--port", str(port))
    assert busy.returncode == 2 and busy.stdout == ""  # no address printed that answers nothing
    assert busy.stderr == f"spoold: cannot listen on 127.0.0.1:{port}: Address already in use (pick another with --port)\n"


def test_wait_says_at_once_why_a_held_queue_does_not_start(sp: spool.Spool, daemon) -> None:
    import time as time_mod

    from spoold import ledger
    from spoold.config import Settings

    write_config(sp, backend="command", command=ECHO_COMMAND)
    ledger.set_hold(sp, Settings(), time_mod.time() + 3600, "subscription 5-hour limit reached")
    daemon(sp)
    tid = run(sp, "submit", "held back").stdout.strip()
    r = run(sp, "wait", tid, "--timeout", "1")
    first, *_ = r.stderr.splitlines()
    assert r.returncode == 124 and first.startswith("spoold: every start waits until ")
    assert first.endswith(": subscription 5-hour limit reached (the task waits until then)")
    assert r.stderr.splitlines()[-1].endswith(" after 1s")  # the wait asked for, not what was left of it


def test_ls_shows_dropped_files_not_taken_in_yet_and_who_takes_them(sp: spool.Spool) -> None:
    (sp.dir("inbox") / "question.md").write_text("what is a spool?\n")
    (sp.dir("inbox") / "notes.pdf").write_bytes(b"%PDF")  # not a task: `status` names it, `ls` leaves it out
    out = run(sp, "ls").stdout
    assert "no tasks yet" not in out
    assert "in the inbox, not taken in yet: question.md (no daemon is serving this spool on this host: " \
           "`spoold run` takes them in)\n" in out and "notes.pdf" not in out
    assert "question.md" not in run(sp, "ls", "--state", "done").stdout
    status = run(sp, "status").stdout
    assert "inbox 1 " in status and "inbox files that are not tasks (use .md or .txt): notes.pdf" in status


def test_ls_colours_states_on_a_terminal_and_never_with_no_color(sp: spool.Spool) -> None:
    import os

    run(sp, "submit", "q")
    coloured = _tty_run(sp, "ls", env={k: v for k, v in os.environ.items() if k != "NO_COLOR"})
    assert "\x1b[33mqueued" in coloured and "\x1b[1mID" in coloured
    plain = _tty_run(sp, "ls", env={**os.environ, "NO_COLOR": "1"})
    assert "queued" in plain and "\x1b[" not in plain


@pytest.mark.skipif(not __import__("shutil").which("tmux"), reason="tmux is not installed (.ci/run installs it)")
def test_ls_watch_redraws_as_the_spool_changes(sp: spool.Spool, terminal) -> None:
    from conftest import wait_for

    live = terminal([sys.executable, "-m", "spoold.cli", "ls", "--watch", "--spool", str(sp.root)])
    wait_for(lambda: "no tasks yet" in live.screen(), what="the empty view")
    tid = run(sp, "submit", "a question that appears by itself").stdout.strip()
    wait_for(lambda: tid.split("-")[1] in live.screen() and "a question that appears" in live.screen(),
             what="the new task on screen")
    run(sp, "cancel", tid)
    wait_for(lambda: "cancelled" in live.screen(), what="its new state on screen")
    live.keys("C-c")
    wait_for(lambda: "Traceback" not in live.screen(), what="a quiet exit")


def test_show_gives_the_whole_picture(sp: spool.Spool, tmp_path) -> None:
    from conftest import fake_claude_script

    result = ('{"type":"result","subtype":"success","is_error":false,"result":"Rayleigh scattering.",'
              '"total_cost_usd":9.199999999999999e-05,"usage":{"input_tokens":25,"output_tokens":512},'
              '"modelUsage":{"claude-sonnet-5":{"outputTokens":512}},"session_id":"s-1"}')
    write_config(sp, claude_bin=str(fake_claude_script(tmp_path / "claude", f"cat > /dev/null\necho '{result}'")))
    tid = run(sp, "submit", "Why is the sky blue? Explain it to a ten-year-old.").stdout.strip()
    run(sp, "run", "--once")
    out = run(sp, "show", tid.split("-")[1]).stdout
    for expected in (tid, "done", "sonnet (answered by claude-sonnet-5)", "$0.000092", "25 tokens in, 512 out",
                     "prompt  Why is the sky blue? Explain it to a ten-year-old.", "answer  Rayleigh scattering.",
                     ".result.md", " UTC"):
        assert expected in out, expected
    assert "e-05" not in out and "None" not in out


def test_config_sets_any_setting_and_refuses_unknown_ones(sp: spool.Spool) -> None:
    out = run(sp, "config", "--set", "default_model=opus", "--set", "allowed_tools=[Read, Grep]")
    assert out.returncode == 0 and "default_model: sonnet -> opus" in out.stdout and "[Read, Grep]" in out.stdout
    bad = run(sp, "config", "--set", "colour=blue")
    assert bad.returncode == 2 and bad.stderr.startswith("spoold: no setting 'colour'; known: ")
    assert "wrong type" in run(sp, "config", "--set", "timeout_s=soon").stderr


def test_init_makes_a_readable_spool_private(tmp_path) -> None:
    import stat as stat_mod

    root = tmp_path / "open"
    root.mkdir(mode=0o755)
    (root / "inbox").mkdir(mode=0o755)
    root.chmod(0o755)
    (root / "inbox").chmod(0o755)
    out = run(None, "init", "--spool", str(root))
    assert out.returncode == 0 and "private (0700)" in out.stdout
    assert stat_mod.S_IMODE(root.stat().st_mode) == stat_mod.S_IMODE((root / "inbox").stat().st_mode) == 0o700


def test_init_says_where_in_json_too(tmp_path) -> None:
    root = tmp_path / "new"
    out = json.loads(run(None, "init", "--spool", str(root), "--json").stdout)
    assert out == {"spool": str(root), "inbox": str(root / "inbox"), "config": str(root / "config.yaml"), "format": 2}


def test_show_lists_the_attempts_that_went_back_and_the_retries(sp: spool.Spool) -> None:
    from spoold import transitions

    tid = run(sp, "submit", "flaky").stdout.strip()
    claimed = transitions.claim(sp, spool.list_queued(sp)[0], "sonnet")
    assert claimed
    transitions.requeue(sp, claimed, "temporary API error: 529 Overloaded; retry 2 in 30 s")
    out = run(sp, "show", tid).stdout
    assert "attempt 1  back to the queue, " in out and "529 Overloaded" in out and "attempts  1" in out
    record = json.loads(run(sp, "show", "--json", tid).stdout)["history"]
    assert [(h["attempt"], h["kind"], h["reason"].split(";")[0]) for h in record] == [
        (1, "requeued", "temporary API error: 529 Overloaded")]


def test_ask_sh_makes_a_private_spool_and_its_name_names_the_task(tmp_path, daemon) -> None:
    import os
    import stat as stat_mod

    root = tmp_path / "fresh"
    env = {**os.environ, "SPOOLD_DIR": str(root)}
    ask = Path(__file__).resolve().parent.parent / "examples" / "ask.sh"
    name = subprocess.run(["sh", str(ask), "Why is the sky blue?"], capture_output=True, text=True, env=env,
                          check=True).stdout.strip()
    assert name.startswith("ask-") and name.endswith(".md")
    assert stat_mod.S_IMODE(root.stat().st_mode) == 0o700 and stat_mod.S_IMODE((root / "inbox").stat().st_mode) == 0o700
    sp = spool.open_spool(root)
    write_config(sp, backend="command", command=ECHO_COMMAND)
    daemon(sp)
    waited = subprocess.run([sys.executable, "-m", "spoold.cli", "wait", name, "--timeout", "30", "--spool", str(root)],
                            capture_output=True, text=True, timeout=60, env=env)
    assert waited.returncode == 0 and waited.stdout == "answer: Why is the sky blue?\n"


def test_stats_and_prune_from_the_command_line(sp: spool.Spool) -> None:
    write_config(sp, backend="command", command=ECHO_COMMAND)
    tid = run(sp, "submit", "q").stdout.strip()
    run(sp, "run", "--once")
    st = json.loads(run(sp, "stats", "--json").stdout)
    assert st["tasks"] == 1 and list(st["by_day"].values()) == [{"done": 1}]
    assert "1 finished task" in run(sp, "stats", "--since", "1d").stdout
    dry = run(sp, "prune", "--older-than", "0s", "--dry-run")
    assert dry.returncode == 0 and "would remove 1 task" in dry.stdout and run(sp, "show", tid).returncode == 0
    assert "removed 1 task" in run(sp, "prune", "--older-than", "0s").stdout
    assert run(sp, "show", tid).returncode == 5
    assert run(sp, "prune", "--older-than", "1d", "--state", "queued").returncode == 2


def test_run_logs_to_a_file_in_utc_and_quietly_when_asked(sp: spool.Spool, tmp_path) -> None:
    write_config(sp, backend="command", command=ECHO_COMMAND)
    run(sp, "submit", "q")
    log = tmp_path / "spoold.log"
    r = run(sp, "run", "--once", "--log-file", str(log))
    assert r.returncode == 0 and r.stderr == ""
    import re

    assert re.search(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ spoold: done ", log.read_text(), re.M)
    run(sp, "submit", "q2")
    quiet = run(sp, "run", "--once", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""


def test_submit_has_a_flag_for_every_key_a_user_may_set(sp: spool.Spool) -> None:
    first = run(sp, "submit", "first").stdout.strip()
    tid = run(sp, "submit", "and shorter", "--tag", "a", "--tag", "b", "--timeout", "30m", "--resume", "@last",
              "--effort", "high", "--max-turns", "3", "--max-budget", "0.5", "--fallback-model", "haiku",
              "--schema", '{"type": "object"}').stdout.strip()
    from spoold.task import parse_task

    task = parse_task(Path(json.loads(run(sp, "show", tid, "--json").stdout)["path"]).read_text(), task_id=tid)
    assert (task.tags, task.timeout, task.resume, task.effort, task.max_turns, task.max_budget_usd, task.fallback_model,
            task.schema) == (["a", "b"], 1800.0, first, "high", 3, 0.5, "haiku", {"type": "object"})
    bad = run(sp, "submit", "x", "--profile", "nope")
    assert bad.returncode == 2 and "not a profile of this spool" in bad.stderr


def test_binary_input_and_usage_errors_are_one_line(sp: spool.Spool, tmp_path) -> None:
    binary = tmp_path / "bin.md"
    binary.write_bytes(bytes(range(256)) * 8)
    r = run(sp, "submit", str(binary))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "is not UTF-8 text" in r.stderr
    p = subprocess.run([sys.executable, "-m", "spoold.cli", "submit", "--spool", str(sp.root), "-"], input=binary.read_bytes(),
                       capture_output=True)
    assert p.returncode == 2 and b"standard input is not UTF-8 text" in p.stderr and b"Traceback" not in p.stderr
    bad = run(sp, "submit", "x", "-p", "bogus")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "invalid choice" in bad.stderr
    assert json.loads(subprocess.run([sys.executable, "-m", "spoold.cli", "--json", "--spool", str(sp.root), "status"],
                                     capture_output=True, text=True).stdout)["counts"]["queued"] == 0


def test_a_file_not_yet_taken_is_not_finished(sp: spool.Spool) -> None:
    from conftest import drop

    drop(sp, "early.md", "not taken yet\n")
    r = run(sp, "result", "early.md")
    assert r.returncode == 4 and "still in the inbox" in r.stderr
    w = run(sp, "wait", "early.md", "--timeout", "0.3")
    assert w.returncode == 124 and "still in the inbox" in w.stderr


def test_result_renders_markdown_on_a_terminal_and_is_raw_in_a_pipe(sp: spool.Spool) -> None:
    import os

    write_config(sp, backend="command", command=[sys.executable, "-c",
                 "import sys; sys.stdin.read(); print('# Findings\\n\\n- **one** point\\n- another')"])
    tid = run(sp, "submit", "q").stdout.strip()
    run(sp, "run", "--once")
    assert run(sp, "result", tid).stdout == "# Findings\n\n- **one** point\n- another\n"  # a pipe: byte for byte
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    shown = _tty_run(sp, "result", tid, env=env)
    assert "Findings" in shown and "•" in shown and "**one**" not in shown  # rendered
    assert "**one**" in _tty_run(sp, "result", tid, "--raw", env=env)


def test_run_once_fails_behind_a_hold_only_a_person_can_end(sp: spool.Spool, tmp_path: Path) -> None:
    """cron hears of it (exit 7, one line): a missing CLI, a logged-out or unpaid account never ends by itself;
    a usage limit that resets does, and exits 0."""
    from spoold import config, ledger

    write_config(sp, backend="command", command=[str(tmp_path / "no-such-program"), "{prompt}"])
    tid = run(sp, "submit", "q").stdout.strip()
    r = run(sp, "run", "--once")
    assert r.returncode == 7, r.stderr
    assert "--once: stopping behind a hold a person must end" in r.stderr and "no-such-program" in r.stderr
    assert json.loads(run(sp, "show", tid, "--json").stdout)["state"] == "queued"
    assert run(sp, "config", "--clear-hold").returncode == 0
    ledger.set_hold(sp, config.Settings(), 4_000_000_000.0, "usage limit")  # resets by itself
    r = run(sp, "run", "--once")
    assert r.returncode == 0 and "the next start waits until" in r.stderr, r.stderr
