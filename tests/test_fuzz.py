"""Hostile and broken input: whatever lands in inbox/ or queued/ ends in failed/ with a message, or is left alone.

Hypothesis drives the names (any bytes a filesystem allows, non-UTF-8 included) and
the contents (random bytes, random text, random YAML frontmatter of any shape, and a
catalogue of known attacks); fixed tests cover what is not a regular file. Intake
never raises, never reads through a link, never touches a file outside the spool.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import ECHO_COMMAND, fake_claude_script, results, terminal_files, wait_for, write_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spoold import intake, spool, transitions
from spoold.task import MODEL_RE, parse_result, parse_task

MAX_BYTES = 64 * 1024
SECRET = "the secret outside the spool\n"

ATTACKS = [
    b"---\na: &a [x,x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n---\nq\n",
    b"---\nx: !!python/object/apply:os.system ['touch /tmp/spoold-pwned']\n---\nq\n",
    b"---\nx: !!python/name:os.system\n---\nq\n",
    b"---\nx: !!binary aGVsbG8=\n---\nq\n",
    b"---\nx: " + b"[" * 5000 + b"]" * 5000 + b"\n---\nq\n",
    b"---\nx: " + b"{a: " * 400 + b"1" + b"}" * 400 + b"\n---\nq\n",
    b"---\n" + b"k: v\n" * 20000 + b"---\nq\n",
    b"---\nmodel: sonnet --dangerously-skip-permissions\n---\nq\n",
    b"---\nsystem: --dangerously-skip-permissions\nallowedTools: [Bash]\ntools: Bash\n---\nq\n",
    b"---\nmodel: [1, 2]\npriority: {a: b}\ntimeout: -5\nnot_before: 99999-99-99\ntags: 7\n---\nq\n",
    b"---\npriority: .nan\ntimeout: .inf\ntitle: !!set {a, b}\n---\nq\n",
    b"---\nid: ../../etc/passwd\nstatus: done\nattempts: -1\nsource: /etc/passwd\n---\nq\n",
    b"---\n? [complex, key]\n: value\n---\nq\n",
    b"\xef\xbb\xbf---\nmodel: haiku\n---\nBOM first\n",
    b"---\r\nmodel: haiku\r\n---\r\nCRLF\r\n",
    b"---\n---\n",
    b"---\nx: 1\n",
    b"\0" * 10,
    b"",
    b"\xff" * 100,
]

yaml_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), st.text(max_size=40))
yaml_values = st.recursive(yaml_scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=20)
KEYS = st.sampled_from(["model", "priority", "system", "title", "tags", "timeout", "not_before", "id", "status",
                        "attempts", "source", "error", "warnings", "started_at", "allowedTools"]) | st.text(max_size=12)
frontmatter = st.dictionaries(KEYS, yaml_values, max_size=8).map(
    lambda d: b"---\n" + yaml.safe_dump(d, allow_unicode=True).encode("utf-8", "surrogatepass") + b"---\nthe prompt\n")
contents = st.one_of(st.sampled_from(ATTACKS), st.binary(max_size=2000), st.text(max_size=500).map(
    lambda t: t.encode("utf-8", "surrogatepass")), frontmatter)
name_bytes = st.binary(min_size=1, max_size=200).filter(lambda b: b"/" not in b and b"\0" not in b and b not in (b".", b".."))
names = st.one_of(name_bytes, name_bytes.map(lambda b: b[:240] + b".md"), st.sampled_from(
    [b"x.md", b"\xff\xfe.md", b"-rf.md", b"--help.md", b" .md", b"\n.md", b"a\\b.md", b"\xe9t\xe9.txt",
     "é".encode() * 120 + b".md", b"x" * 251 + b".md"]))


def _new_spool() -> tuple[spool.Spool, Path]:
    base = Path(tempfile.mkdtemp(prefix="spoold-fuzz-"))
    return spool.open_spool(base / "spool"), base


def _check(sp: spool.Spool, where: str, name: bytes, data: bytes) -> None:
    """Drop one entry, run intake, and check where it went and what was said."""
    path = os.path.join(os.fsencode(sp.dir(where)), name)
    with open(path, "wb") as f:
        f.write(data)
    report = intake.scan(sp, default_model="sonnet", max_bytes=MAX_BYTES)
    left = os.listdir(os.fsencode(sp.dir(where)))
    if where == "queued":
        left = [n for n in left if not spool.parse_queued_name(os.fsdecode(n))]
    assert os.listdir(sp.dir("tmp")) == []
    assert spool.list_running(sp) == []
    if left:  # ignored: not a task by its name, and untouched
        assert left == [name] and report.queued == report.failed == []
        assert not intake.is_task_name(os.fsdecode(name)) or (where == "inbox" and report.pending)
        with open(path, "rb") as f:
            assert f.read() == data
        return
    assert len(report.queued) + len(report.failed) == 1
    if report.failed:
        [res] = results(sp, "failed")
        r = parse_result(res.read_text(encoding="utf-8"))
        assert r.status == "failed" and r.error and "Traceback" not in r.error
        [kept] = terminal_files(sp, "failed")
        assert kept.read_bytes() == data  # the user's file, kept byte for byte
        return
    [e] = spool.list_queued(sp)
    task = parse_task((sp.dir("queued") / e.name).read_bytes().decode("utf-8"), task_id=e.task_id)
    assert task.prompt.strip() and transitions.history(sp, task.id).attempts == 0
    assert MODEL_RE.match(task.model) and task.priority in spool.PRIORITIES
    assert data.decode("utf-8-sig").endswith(task.prompt)  # the prompt is the user's own text, exactly


@pytest.fixture(scope="module")
def fuzz_budget(request: pytest.FixtureRequest) -> int:
    return 3000 if request.config.getoption("--stress") else 250


@pytest.mark.parametrize("where", ["inbox", "queued"])
def test_fuzz_dropped_names_and_contents(where: str, fuzz_budget: int) -> None:
    counted = {"n": 0}

    @settings(max_examples=fuzz_budget, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(name=names, data=contents)
    def one(name: bytes, data: bytes) -> None:
        if intake.is_ignored(os.fsdecode(name)) or (where == "queued" and spool.parse_queued_name(os.fsdecode(name))):
            name = b"t" + name[-200:] + b".md"
        counted["n"] += 1
        sp, base = _new_spool()
        try:
            _check(sp, where, name, data)
        finally:
            shutil.rmtree(base, ignore_errors=True)

    t0 = time.monotonic()
    one()
    print(f"\nfuzz ({where}): {counted['n']} cases in {time.monotonic() - t0:.1f} s")
    assert not os.path.exists("/tmp/spoold-pwned")


def test_hundred_megabyte_file_is_refused_without_reading_it(sp: spool.Spool) -> None:
    big = sp.dir("inbox") / "huge.md"
    with open(big, "wb") as f:
        f.truncate(100 * 1024 * 1024)
    t0 = time.monotonic()
    report = intake.scan(sp, default_model="sonnet", max_bytes=1024 * 1024)
    assert len(report.failed) == 1 and time.monotonic() - t0 < 5
    [res] = results(sp, "failed")
    assert "104,857,600 bytes" in parse_result(res.read_text()).error
    assert terminal_files(sp, "failed")[0].stat().st_size == 100 * 1024 * 1024  # kept, not truncated


def _not_files(sp: spool.Spool, outside: Path) -> dict[str, str]:
    """Every kind of entry that is not a regular file of the spool's own, with the word the message must use."""
    inbox = sp.dir("inbox")
    (inbox / "to-passwd.md").symlink_to("/etc/passwd")
    (inbox / "to-outside.md").symlink_to(outside / "secret.md")
    (inbox / "to-fifo.md").symlink_to(outside / "fifo")
    (inbox / "dangling.md").symlink_to(outside / "nowhere.md")
    (inbox / "loop.md").symlink_to(inbox / "loop.md")
    (inbox / "to-dir.md").symlink_to(outside)
    (inbox / "folder.md").mkdir()
    (inbox / "folder.md" / "inside.md").write_text("inner\n")
    os.mkfifo(inbox / "pipe.md")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(inbox / "sock.md"))
    s.close()
    os.link(outside / "secret.md", inbox / "hardlink.md")
    return {"to-passwd.md": "symbolic link", "to-outside.md": "symbolic link", "to-fifo.md": "symbolic link",
            "dangling.md": "symbolic link", "loop.md": "symbolic link", "to-dir.md": "symbolic link",
            "folder.md": "directory", "pipe.md": "named pipe", "sock.md": "special file", "hardlink.md": "hard link"}


def _outside(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.md").write_text(SECRET)
    os.mkfifo(outside / "fifo")
    return outside


def test_links_fifos_sockets_and_directories_are_moved_aside_unread(sp: spool.Spool, tmp_path: Path) -> None:
    outside = _outside(tmp_path)
    expected = _not_files(sp, outside)
    before = (outside / "secret.md").stat()
    wait_for(lambda: not intake.scan(sp, default_model="sonnet", max_bytes=MAX_BYTES).pending,
             what="every entry to be settled (a fresh hard link waits a moment)")
    assert os.listdir(sp.dir("inbox")) == [] and not spool.list_queued(sp)
    by_source = {}
    for res in results(sp, "failed"):
        r = parse_result(res.read_text())
        source = next(n for n in expected if n in r.error)
        by_source[source] = r.error
    assert set(by_source) == set(expected)
    for name, word in expected.items():
        assert word in by_source[name], (name, by_source[name])
    assert (outside / "secret.md").read_text() == SECRET and (outside / "secret.md").stat().st_mtime == before.st_mtime
    assert all(SECRET not in p.read_text(errors="replace") for p in sp.root.rglob("*.md") if p.is_file()
               and not p.is_symlink() and p.stat().st_nlink == 1)
    assert Path("/etc/passwd").exists()


def test_daemon_survives_a_hostile_inbox_and_still_serves(sp: spool.Spool, daemon, tmp_path: Path) -> None:
    write_config(sp, backend="command", command=ECHO_COMMAND, max_bytes=MAX_BYTES)
    outside = _outside(tmp_path)
    d = daemon(sp)
    expected = _not_files(sp, outside)
    for i, data in enumerate(ATTACKS):
        (sp.dir("inbox") / f"attack-{i}.md").write_bytes(data)
    os.close(os.open(os.path.join(os.fsencode(sp.dir("inbox")), b"\xff\xfe name.md"), os.O_CREAT | os.O_WRONLY))
    with open(sp.dir("inbox") / "huge.md", "wb") as f:
        f.truncate(100 * 1024 * 1024)
    (sp.dir("inbox") / "good.md").write_text("still serving?\n")
    n = len(expected) + len(ATTACKS) + 3
    wait_for(lambda: len(terminal_files(sp, "done")) + len(results(sp, "failed")) >= n, timeout=60,
             what="every hostile entry to be dealt with")
    assert d.proc.poll() is None and "Traceback" not in d.log
    assert os.listdir(sp.dir("inbox")) == []
    answers = [parse_result(r.read_text()).answer for r in results(sp, "done")]
    assert "answer: still serving?\n" in answers and all(SECRET.strip() not in a for a in answers)
    assert (outside / "secret.md").read_text() == SECRET
    assert not os.path.exists("/tmp/spoold-pwned")
    assert d.stop() == 0
    # Checked after the stop: an idle daemon may still be writing its ledger through tmp/.
    assert os.listdir(sp.dir("tmp")) == []


def test_links_and_fifos_under_a_valid_queued_name_fail_unread(sp: spool.Spool, tmp_path: Path) -> None:
    """A foreign tool (or an attacker with write access) naming a link like a real queued task."""
    from spoold import transitions

    outside = _outside(tmp_path)
    link = spool.queued_name(spool.new_id("link"), "urgent", None)
    fifo = spool.queued_name(spool.new_id("fifo"), "urgent", None)
    (sp.dir("queued") / link).symlink_to(outside / "secret.md")
    os.mkfifo(sp.dir("queued") / fifo)
    for entry in spool.list_queued(sp):
        assert transitions.claim(sp, entry, "sonnet") is None  # never runs
    assert not spool.list_queued(sp) and spool.list_running(sp) == []
    errors = [parse_result(r.read_text()).error for r in results(sp, "failed")]
    assert len(errors) == 2 and all("cannot be read" in e for e in errors)
    assert (outside / "secret.md").read_text() == SECRET


def test_smuggled_flags_reach_the_cli_only_as_values(sp: spool.Spool, daemon, tmp_path: Path) -> None:
    """Through intake, the claude backend and a real exec: the argv the CLI receives is exactly the safe one."""
    argv_log = tmp_path / "argv"
    fake = fake_claude_script(tmp_path / "claude", f"for a in \"$@\"; do printf '%s\\0' \"$a\"; done > {argv_log}\n"
                              "cat > /dev/null\necho '{\"type\":\"result\",\"subtype\":\"success\",\"is_error\":false,\"result\":\"ok\"}'")
    write_config(sp, claude_bin=str(fake))
    daemon(sp)
    (sp.dir("inbox") / "smuggle.md").write_text(
        "---\nmodel: claude-x\nsystem: \"--dangerously-skip-permissions; rm -rf ~ $(id) `id`\"\n"
        "allowedTools: [Bash]\ntools: Bash\npermission-mode: bypassPermissions\ndangerously-skip-permissions: true\n"
        "---\n--print --model opus $(id)\n")
    [done] = wait_for(lambda: terminal_files(sp, "done"), what="the smuggling task to run")
    argv = argv_log.read_bytes().split(b"\0")[:-1]
    assert argv == [b"-p", b"--output-format", b"stream-json", b"--verbose", b"--strict-mcp-config", b"--setting-sources=", b"--safe-mode",
                    b"--disable-slash-commands", b"--model=claude-x", b"--tools=",
                    b"--append-system-prompt=--dangerously-skip-permissions; rm -rf ~ $(id) `id`"]
    task = parse_task(done.read_text(), task_id=done.name[:-3])
    assert {"allowedTools", "tools", "permission-mode", "dangerously-skip-permissions"} <= set(task.extra)
    assert all("ignored" in w for w in task.warnings) and len(task.warnings) == 4
