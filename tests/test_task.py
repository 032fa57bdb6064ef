"""Parsing dropped files and rendering task and result files."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from spoold.errors import BadInput
from spoold.task import (
    Result,
    parse_result,
    parse_task,
    parse_text,
    render,
    render_result,
    render_task,
    split_frontmatter,
)

TID = "20261124T160000000Z-abcdef-x"


def test_plain_prompt_gets_defaults() -> None:
    t = parse_task("Why is the sky blue?\n", task_id=TID)
    assert (t.model, t.priority, t.prompt) == ("sonnet", "normal", "Why is the sky blue?\n")


def test_body_is_kept_byte_for_byte() -> None:
    body = "\n\n  indented\r\nline with --- inside\n---not a fence\n\n"
    meta, got = parse_text(f"---\nmodel: opus\n---\n{body}")
    assert meta == {"model": "opus"} and got == body
    t = parse_task(f"---\nmodel: opus\n---\n{body}", task_id=TID)
    again = parse_task(render_task(t).decode(), task_id=TID)
    assert again.prompt == body and again.model == "opus"


def test_all_user_keys() -> None:
    text = """---
model: claude-sonnet-4-5-20250929
priority: URGENT
system: Answer in French.
title: Sky
tags: [a, b]
timeout: 30m
not_before: 2026-11-25T08:00:00Z
mystery: 42
---
Why?
"""
    t = parse_task(text, task_id=TID)
    assert t.model == "claude-sonnet-4-5-20250929" and t.priority == "urgent"
    assert t.system == "Answer in French." and t.title == "Sky" and t.tags == ["a", "b"]
    assert t.timeout == 1800 and t.not_before == datetime(2026, 11, 25, 8, tzinfo=UTC)
    assert t.extra == {"mystery": 42}
    assert t.warnings == ["unknown frontmatter key `mystery` kept but ignored"]
    again = parse_task(render_task(t).decode(), task_id=TID)
    assert again.extra == {"mystery": 42} and len(again.warnings) == 1


@pytest.mark.parametrize(
    ("text", "message", "line"),
    [
        ("---\nmodel: [unclosed\n---\nq", "not valid YAML", 3),
        ("---\nmodel: opus\nq", "no closing", 1),
        ("---\nmodel: opus\n---\n   \n", "prompt is empty", None),
        ("", "prompt is empty", None),
        ("---\n- a\n- b\n---\nq", "key: value", 2),
        ("---\nmodel: sonnet --dangerously-skip-permissions\n---\nq", "not a model name", None),
        ("---\nmodel: -x\n---\nq", "not a model name", None),
        ("---\npriority: asap\n---\nq", "must be one of", None),
        ("---\ntimeout: soon\n---\nq", "not a duration", None),
        ("---\nnot_before: tomorrow\n---\nq", "not an ISO time", None),
        ("---\na: &x [1]\nb: *x\n---\nq", "aliases", 3),
        ("---\nx: !!python/object/apply:os.system ['true']\n---\nq", "not valid YAML", None),
        ("---\ntags: {a: 1}\n---\nq", "tags", None),
    ],
)
def test_bad_input_says_what_to_fix(text: str, message: str, line: int | None) -> None:
    with pytest.raises(BadInput, match=message) as e:
        parse_task(text, task_id=TID)
    if line is not None:
        assert e.value.line == line


def test_billion_laughs_is_refused_quickly() -> None:
    lol = "---\na: &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n" + "".join(
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n" for i in range(9)
    ) + "---\nq"
    with pytest.raises(BadInput, match="aliases"):
        parse_task(lol, task_id=TID)


def test_frontmatter_only_on_line_one() -> None:
    fm, body, _ = split_frontmatter("hello\n---\nmodel: x\n---\n")
    assert fm is None and body.startswith("hello")


def test_result_round_trip() -> None:
    r = Result(id=TID, status="done", answer="# Answer\n\n42", model="sonnet", model_resolved="claude-x",
               cost_usd=0.01, input_tokens=5, output_tokens=7, duration_s=1.5, attempts=1,
               finished_at=datetime(2026, 11, 24, tzinfo=UTC))
    back = parse_result(render_result(r).decode())
    assert back.answer == "# Answer\n\n42\n"
    assert (back.cost_usd, back.output_tokens, back.model_resolved) == (0.01, 7, "claude-x")
    assert back.finished_at == datetime(2026, 11, 24, tzinfo=UTC)


def test_failed_result_says_why_in_the_body() -> None:
    text = render_result(Result(id=TID, status="failed", error="bad model")).decode()
    assert "**Failed:** bad model" in text


from hypothesis import example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_scalars = st.one_of(st.text(), st.integers(), st.floats(allow_nan=False), st.booleans(),
                     st.lists(st.text(), max_size=3))


@settings(max_examples=300, deadline=None)
@example(meta={'A': '\x85'})
@example(meta={'NO': '', 'on': 1, 'Null': 'x', 'id': '20261124T000000000Z-abcdef'})
@given(st.dictionaries(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,10}", fullmatch=True), _scalars, max_size=6))
def test_frontmatter_written_reads_back_the_same(meta: dict) -> None:
    """What spoold writes through python-frontmatter and PyYAML's C dumper, any YAML reader reads back as written."""
    import yaml

    text = render(meta, "body\n\n").decode()
    assert parse_text(text) == (meta, "body\n\n")  # the body byte for byte
    assert (yaml.safe_load(text.split("---\n")[1]) or {}) == meta


def test_a_plain_prompt_is_read_without_yaml() -> None:
    import subprocess
    import sys

    code = "import sys; from spoold.task import parse_text; parse_text('plain prompt'); print('yaml' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
